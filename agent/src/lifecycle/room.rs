//! Room for a profile disk: when the filesystem that holds the disks'
//! working copies lacks what a login's disk needs (its growth to
//! `[disk] size_mib`, or `reserve_mib`), the working copies other users
//! left on this VM are removed, least recently used first, until it
//! fits. They are caches of committed versions: that user's next login
//! here fetches every data block again, nothing else is lost. Never
//! removed: a disk attached on this VM, one with a pending (spooled)
//! update, one held in place as a refused update, one whose device is recorded as served, one whose user has a
//! lifecycle running (the user's lock is held). The login then checks the
//! room itself (and refuses with the figures if it still lacks it).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use uve_protocol::names::UserName;

use super::Lifecycle;
use crate::config::{Config, UifMode};
use crate::stores::cache;
use crate::stores::session::UserGuard;
use crate::uif::{UifError, blocking, disk_home};

/// Suffix of a disk's working copy in `<state>/uif`.
const DISK_SUFFIX: &str = ".disk";

/// A working copy that could be removed.
struct Cached {
    user: UserName,
    path: PathBuf,
    used: SystemTime,
    held: u64,
}

/// The disks' working copies in `dir`, least recently used first (the
/// last write: the logout or retrieve that left them).
fn cached_disks(dir: &Path) -> Vec<Cached> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<Cached> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let user = UserName::new(name.strip_suffix(DISK_SUFFIX)?).ok()?;
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
        let mut short = room.need - room.free;
        let dir = image.parent().unwrap_or(Path::new("/")).to_path_buf();
        let candidates = blocking(move || Ok(cached_disks(&dir))).await?;
        for c in candidates {
            if short == 0 {
                break;
            }
            if c.user == *guard.user() {
                continue;
            }
            let Some(victim) = self.locks.try_lock(&c.user) else {
                continue;
            };
            if self.table.uif(&c.user).is_some()
                || self.flusher.spooled_for(&c.user) > 0
                || self.flusher.preserved().held_for(&c.user).is_some()
                || disk_home::has_device_record(&c.path)
            {
                continue;
            }
            let (path, state_dir, user) = (c.path.clone(), self.state_dir.clone(), c.user.clone());
            let removed = blocking(move || {
                // The manifest first: a copy without one is never trusted.
                cache::forget(&state_dir, &user);
                std::fs::remove_file(&path).map_err(|e| UifError::at("remove", &path, e))
            })
            .await;
            drop(victim);
            match removed {
                Ok(()) => {
                    tracing::warn!(
                        user = %guard.user(),
                        evicted = %c.user,
                        freed_mib = c.held >> 20,
                        "no room for the profile disk: removed the least recently used \
                         working copy of another user (its next login here fetches it again)"
                    );
                    short = short.saturating_sub(c.held);
                }
                Err(e) => tracing::warn!(evicted = %c.user, "making room: {e}"),
            }
        }
        Ok(())
    }
}
