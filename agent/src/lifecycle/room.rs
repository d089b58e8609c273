//! The working copies other users left on this VM: caches of committed
//! versions, which make their next login here warm (only changed chunks
//! or blocks are fetched). Two rules bound them, both by removing the
//! least recently used copies first (by the last write: the logout or
//! retrieve that left them):
//!
//! - **the cache budget** (`cache_mib`, default a quarter of the state
//!   filesystem): after a logout, the copies of users with no session here
//!   are trimmed to it;
//! - **room for a profile disk**: when the filesystem that holds the disks
//!   lacks what a login's disk needs (its growth to `[disk] size_mib`, or
//!   `reserve_mib`), copies are removed until it fits; the login then
//!   checks the room itself (and refuses with the figures if it still
//!   lacks it).
//!
//! A removed copy costs its user a cold login here, nothing else. In file
//! mode only images still exactly as the agent stamped them at their last
//! flush or retrieve in this boot count as copies (the image directory may
//! hold other files, and a process of the user may have written the image
//! since). Never removed: a copy attached on this VM, one with a pending (spooled)
//! update, one held in place as a refused update (or any, while the held
//! records cannot be read), one whose disk device is recorded as served,
//! one whose user has a lifecycle running (the user's lock is held; a
//! removal keeps that lock until the file is gone).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use uve_protocol::names::UserName;

use super::Lifecycle;
use crate::config::{Config, UifMode};
use crate::stores::cache;
use crate::stores::session::UserGuard;
use crate::uif::{UifError, blocking, disk_home};

/// A working copy that could be removed.
struct Cached {
    user: UserName,
    path: PathBuf,
    used: SystemTime,
    held: u64,
}

/// Where `cfg`'s working copies are: their directory, and the parts of a
/// file name before and after the user's name. `None` when the UIF path
/// template puts `{user}` anywhere but once in the file name (the copies
/// cannot be listed).
fn copies_of(cfg: &Config) -> Option<(PathBuf, String, String)> {
    let template = match cfg.uif.mode {
        UifMode::File => PathBuf::from(&cfg.uif.path),
        UifMode::Directory | UifMode::Disk => cfg.uif_path("{user}"),
    };
    let dir = template.parent()?;
    let name = template.file_name()?.to_str()?;
    if dir.to_string_lossy().contains("{user}") || name.matches("{user}").count() != 1 {
        return None;
    }
    let (before, after) = name.split_once("{user}")?;
    Some((dir.to_path_buf(), before.to_string(), after.to_string()))
}

/// The working copies in `dir` named `<before><user><after>`, least
/// recently used first.
fn cached_copies(dir: &Path, before: &str, after: &str) -> Vec<Cached> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<Cached> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let user = name.strip_prefix(before)?.strip_suffix(after)?;
            // Temp files (`.<name>…`) are no one's copy.
            let user = UserName::new(user).ok().filter(|u| !u.starts_with('.'))?;
            let meta = e.path().symlink_metadata().ok()?;
            if !meta.is_file() {
                return None;
            }
            Some(Cached {
                user,
                path: e.path(),
                used: meta.modified().ok()?,
                held: std::os::unix::fs::MetadataExt::blocks(&meta) * 512,
            })
        })
        .collect();
    found.sort_by_key(|c| c.used);
    found
}

impl Lifecycle {
    /// Disk mode: makes room for the disk of `guard`'s user by removing
    /// other users' cached working copies, least recently used first.
    /// Does nothing in the other modes or when the room is there.
    pub(super) async fn make_room_for_disk(
        &self,
        guard: &UserGuard,
        cfg: &Config,
    ) -> Result<(), UifError> {
        if cfg.uif.mode != UifMode::Disk {
            return Ok(());
        }
        let image = cfg.uif_path(guard.user());
        let (size, reserve) = (cfg.disk.size_mib << 20, cfg.disk.reserve_mib);
        let at = image.clone();
        let room = blocking(move || disk_home::room(&at, size, reserve)).await?;
        if room.free >= room.need {
            return Ok(());
        }
        let freed = self.evict(cfg, room.need - room.free).await?;
        if freed > 0 {
            tracing::warn!(
                user = %guard.user(),
                freed_mib = freed >> 20,
                "no room for the profile disk: removed the least recently used working \
                 copies of other users (their next login here fetches them again)"
            );
        }
        Ok(())
    }

    /// Trims the working copies of users not logged in here to the cache
    /// budget (`cache_mib`), least recently used first. Returns the bytes
    /// removed.
    pub(super) async fn trim_cache(&self) -> Result<u64, UifError> {
        let cfg = self.config.get();
        let Some((dir, ..)) = copies_of(&cfg) else {
            return Ok(0);
        };
        let fs_size = blocking(move || {
            let at = dir
                .ancestors()
                .find(|d| d.is_dir())
                .unwrap_or(Path::new("/"));
            let st = nix::sys::statvfs::statvfs(at)
                .map_err(|e| UifError::at("statvfs", at, e.into()))?;
            Ok(st.blocks().saturating_mul(st.fragment_size()))
        })
        .await?;
        let budget = cfg.cache_budget(fs_size);
        let cached: u64 = self.removable(&cfg).await?.iter().map(|c| c.held).sum();
        if cached <= budget {
            return Ok(0);
        }
        let freed = self.evict(&cfg, cached - budget).await?;
        tracing::info!(
            cached_mib = cached >> 20,
            budget_mib = budget >> 20,
            freed_mib = freed >> 20,
            "working copies of users not logged in here trimmed to the cache budget \
             (cache_mib; their next login here fetches them again)"
        );
        Ok(freed)
    }

    /// The working copies that may go now, least recently used first (a
    /// snapshot: [`Lifecycle::evict`] checks each again under its user's
    /// lock). None when the held copies cannot be listed (fail closed).
    async fn removable(&self, cfg: &Config) -> Result<Vec<Cached>, UifError> {
        let Some((dir, before, after)) = copies_of(cfg) else {
            return Ok(Vec::new());
        };
        let file_mode = cfg.uif.mode == UifMode::File;
        let (state_dir, preserved) = (self.state_dir.clone(), self.flusher.preserved().clone());
        let all = blocking(move || {
            let Ok(held) = preserved.held() else {
                return Ok(Vec::new());
            };
            let mut all = cached_copies(&dir, &before, &after);
            all.retain(|c| {
                !held.iter().any(|h| h.user == c.user)
                    && !disk_home::has_device_record(&c.path)
                    && (!file_mode || unwritten_since_flush(&state_dir, c))
            });
            Ok(all)
        })
        .await?;
        Ok(all.into_iter().filter(|c| self.detached(c)).collect())
    }

    /// Whether `c`'s user has no UIF attached here and nothing spooled.
    fn detached(&self, c: &Cached) -> bool {
        self.table.uif(&c.user).is_none() && self.flusher.spooled_for(&c.user) == 0
    }

    /// Removes working copies, least recently used first, until `short`
    /// bytes are freed or none is left that may go. Returns the bytes
    /// freed. Each removal holds its user's lock until the file is gone,
    /// also when this future is dropped half way (the lock moves into the
    /// blocking task): a login of that user waits for it.
    async fn evict(&self, cfg: &Config, short: u64) -> Result<u64, UifError> {
        let mut freed = 0u64;
        let file_mode = cfg.uif.mode == UifMode::File;
        for c in self.removable(cfg).await? {
            if freed >= short {
                break;
            }
            // A user whose lock is held has a lifecycle running: skipped.
            let Some(victim) = self.locks.try_lock(&c.user) else {
                continue;
            };
            if !self.detached(&c) {
                continue;
            }
            let (path, state_dir, user) = (c.path.clone(), self.state_dir.clone(), c.user.clone());
            let preserved = self.flusher.preserved().clone();
            let removed = blocking(move || {
                let _victim = victim;
                // Checked again under the lock, on this side of the await.
                if !matches!(preserved.held_for(&user), Ok(None))
                    || disk_home::has_device_record(&path)
                    || (file_mode && !cache::unchanged_since_stamped(&state_dir, &user, &path))
                {
                    return Ok(false);
                }
                // The manifest first: a copy without one is never trusted.
                cache::forget(&state_dir, &user);
                std::fs::remove_file(&path).map_err(|e| UifError::at("remove", &path, e))?;
                Ok(true)
            })
            .await;
            match removed {
                Ok(true) => {
                    tracing::info!(evicted = %c.user, mib = c.held >> 20, "working copy removed");
                    freed = freed.saturating_add(c.held);
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(evicted = %c.user, "removing a working copy: {e}"),
            }
        }
        Ok(freed)
    }
}

/// File mode: whether `c` is still what the agent stamped at its last
/// flush or retrieve in this boot (an image the user's processes wrote
/// since is not a cache; one from an earlier boot is not known to be).
fn unwritten_since_flush(state_dir: &Path, c: &Cached) -> bool {
    cache::manifest_path(state_dir, &c.user).exists()
        && cache::unchanged_since_stamped(state_dir, &c.user, &c.path)
}
