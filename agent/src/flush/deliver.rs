//! Delivering one journalled update — the flush's own, or a spooled one
//! after a reconnect — and deciding, by the host's answer, what happens to
//! its bytes: committed or kept as a conflict (the entry goes), a
//! transient failure (the entry stays), a final refusal (the bytes move
//! to the preserved area first, or are held in place when it has no room
//! for them, then the entry goes).

use uve_protocol::manifest::{Hash, Manifest};
use uve_protocol::message::{UpdateBegin, UpdateCause, Version, WireError};

use super::{FlushOutcome, Flusher, Kept};
use crate::base::fsutil;
use crate::link::Connected;
use crate::stores::cache;
use crate::stores::preserve::{Budget, Refused};
use crate::stores::session::UserGuard;
use crate::stores::spool::SpoolEntry;
use crate::uif::update::{self, UpdateOutcome};
use crate::uif::{UifError, blocking};

/// Times an update is started (`UpdateBegin`) on one connection when the
/// host expires its upload (idle too long: a slow disk, a stalled read);
/// after that it stays spooled and the outbox retries it later.
pub const UPLOAD_ATTEMPTS: u32 = 3;

impl Flusher {
    /// Uploads one update (again from `UpdateBegin` if the host expired
    /// the upload, [`UPLOAD_ATTEMPTS`] in all; then it stays spooled);
    /// removes its spool entry once the host took it,
    /// or once its bytes are preserved after a final refusal.
    pub(super) async fn deliver_entry(
        &self,
        guard: &UserGuard,
        c: &Connected,
        entry: &SpoolEntry,
        manifest: &Manifest,
        cause: UpdateCause,
        live_checkpoint: bool,
    ) -> FlushOutcome {
        let begin = UpdateBegin {
            user: entry.user.clone(),
            session: entry.session.clone(),
            base: entry.base,
            lease: entry.lease,
            header: manifest.header,
            cause,
        };
        let mut digest = manifest.header.digest;
        // After a VM restart a stamp proves nothing (see `cache::Stamp`):
        // every chunk is read back and checked against the spooled manifest.
        let earlier_boot = entry.from_earlier_boot();
        let stamped = if earlier_boot {
            None
        } else {
            cache::stamped_id(&self.state_dir, &entry.user, manifest)
        };
        let mut result =
            update::upload(&c.link, &entry.file, manifest, begin.clone(), stamped).await;
        for attempt in 2..=UPLOAD_ATTEMPTS {
            if !matches!(result, Err(UifError::UploadExpired(_))) {
                break;
            }
            tracing::info!(user = %entry.user, id = entry.id, attempt, "starting the update again");
            result = update::upload(&c.link, &entry.file, manifest, begin.clone(), stamped).await;
        }
        if matches!(result, Err(UifError::Changed)) && !live_checkpoint {
            result = self
                .resend_changed(c, entry, begin, earlier_boot, &mut digest)
                .await;
        }
        match result {
            Ok(UpdateOutcome::Committed(v)) => {
                crate::base::fault::crash_at("flush-committed");
                self.spool.remove(entry.id).await;
                // A UIF still attached (checkpoint, shutdown) is now based
                // on v. Not durable: its next flush then looks changed and
                // is sent again (a restart repairs the table).
                let _ = self.table.rebase(guard, v, digest).await;
                FlushOutcome::Committed(v)
            }
            Ok(UpdateOutcome::Conflict { kept_as, head }) => {
                self.spool.remove(entry.id).await;
                tracing::warn!(user = %entry.user, kept_as, ?head, "update landed as a conflict version");
                FlushOutcome::Conflict { kept_as, head }
            }
            Err(e) if live_checkpoint => FlushOutcome::NotTaken(e.to_string()),
            Err(e) => match e.refusal() {
                None => {
                    tracing::warn!(user = %entry.user, id = entry.id, "update stays spooled: {e}");
                    FlushOutcome::Spooled(e.to_string())
                }
                Some(refusal) => self.keep_refused(entry, refusal.clone()).await,
            },
        }
    }

    /// The UIF was written to after it was spooled: sends what it holds
    /// now. In the same boot that is newer data of the same user, on the
    /// same base; after a VM restart the file may be torn, so it goes only
    /// as a conflict version (base `None`), never as the head.
    async fn resend_changed(
        &self,
        c: &Connected,
        entry: &SpoolEntry,
        begin: UpdateBegin,
        earlier_boot: bool,
        digest: &mut Hash,
    ) -> Result<UpdateOutcome, UifError> {
        let (path, state_dir, user) = (
            entry.file.clone(),
            self.state_dir.clone(),
            entry.user.clone(),
        );
        let params = self.config.get().chunk_params();
        let fresh = blocking(move || {
            let m = uve_protocol::chunker::chunk_file_with(&path, params)
                .map_err(|e| UifError::at("chunk", &path, e))?;
            if earlier_boot {
                cache::forget(&state_dir, &user);
            } else {
                let _ = cache::save(&state_dir, &user, &m);
            }
            Ok(m)
        })
        .await?;
        if let Err(e) = self.spool.add(entry, &fresh).await {
            tracing::warn!(id = entry.id, "cannot rewrite spool manifest: {e}");
        }
        let base = if earlier_boot {
            tracing::warn!(
                user = %entry.user,
                id = entry.id,
                "the UIF no longer matches what was spooled before the VM restarted \
                 (torn by a crash, or written since): sending it as a conflict version only"
            );
            None
        } else {
            begin.base
        };
        let begin = UpdateBegin {
            header: fresh.header,
            base,
            ..begin
        };
        *digest = fresh.header.digest;
        update::upload(&c.link, &entry.file, &fresh, begin, None).await
    }

    /// The host refused `entry` for good: moves its bytes into the
    /// preserved area (or leaves them where a session still has them
    /// attached; or holds them in place when the area's budget has no
    /// room: see [`crate::stores::preserve`]), then drops the entry. If
    /// the bytes cannot be moved, the entry stays in the spool, so no
    /// retrieve may overwrite its file (logins of the user fail with
    /// "pending update" until it is resolved).
    async fn keep_refused(&self, entry: &SpoolEntry, refusal: WireError) -> FlushOutcome {
        let attached = self.table.uif(&entry.user).is_some()
            && self.config.get().uif_path(&entry.user) == entry.file;
        tracing::error!(user = %entry.user, id = entry.id, attached, "host refused update for good: {refusal}");
        if attached {
            self.spool.remove(entry.id).await;
            return FlushOutcome::Refused {
                refusal,
                kept: Kept::InPlace(entry.file.clone()),
            };
        }
        let (preserved, state_dir, e2, r2) = (
            self.preserved.clone(),
            self.state_dir.clone(),
            entry.clone(),
            refusal.clone(),
        );
        let cfg = self.config.get();
        let kept = blocking(move || {
            let what = Refused {
                user: &e2.user,
                session: &e2.session,
                cause: e2.cause,
                base: e2.base,
                file: &e2.file,
                refusal: &r2,
            };
            let size = std::fs::symlink_metadata(&e2.file)
                .map_err(|e| UifError::at("preserve", &e2.file, e))?
                .len();
            let kept = match preserved.no_room(&e2.user, size, preserved_budget(&cfg, &state_dir)) {
                None => Kept::Preserved(Box::new(
                    preserved
                        .keep(&what)
                        .map_err(|e| UifError::at("preserve", &e2.file, e))?,
                )),
                Some(why) => {
                    let at = held_at(&cfg, &e2);
                    Kept::Held(Box::new(
                        preserved
                            .hold(&what, &at, why)
                            .map_err(|e| UifError::at("hold", &e2.file, e))?,
                    ))
                }
            };
            // The file the cache describes is gone (or must never be
            // trusted as a cache of a committed version).
            cache::forget(&state_dir, &e2.user);
            Ok(kept)
        })
        .await;
        match kept {
            Ok(kept) => {
                self.spool.remove(entry.id).await;
                if let Kept::Held(copy) = &kept
                    && copy.bytes != entry.file
                {
                    // The home stands in for the archive: its space goes
                    // back, now that no spool entry names it.
                    let archive = entry.file.clone();
                    let removed = blocking(move || {
                        std::fs::remove_file(&archive)
                            .and_then(|()| fsutil::sync_parent(&archive))
                            .map_err(|e| UifError::at("remove", &archive, e))
                    })
                    .await;
                    if let Err(e) = removed {
                        tracing::warn!(user = %entry.user, "the held home's archive stays: {e}");
                    }
                }
                FlushOutcome::Refused { refusal, kept }
            }
            Err(e) => {
                tracing::error!(user = %entry.user, id = entry.id, "cannot preserve refused update, keeping it spooled: {e}");
                FlushOutcome::Spooled(format!(
                    "the host refused it ({:?}: {}) and it could not be set aside ({e}); it stays in the spool and its file in place",
                    refusal.code, refusal.message
                ))
            }
        }
    }

    /// Delivers the spooled updates of the user whose lock `guard` holds.
    /// Returns the last version they committed, if any.
    pub async fn deliver_user_spool(&self, guard: &UserGuard, c: &Connected) -> Option<Version> {
        let mut committed = None;
        for entry in self.spool.for_user(guard.user()) {
            match self.deliver_one(guard, c, &entry).await {
                FlushOutcome::Spooled(_) => break,
                FlushOutcome::Committed(v) => committed = Some(v),
                _ => {}
            }
        }
        committed
    }

    /// Delivers one spooled entry. An entry whose manifest cannot be read
    /// is re-chunked from its file and sent as a conflict version only
    /// (nothing vouches for the file any more); one whose file is gone is
    /// dropped.
    async fn deliver_one(
        &self,
        guard: &UserGuard,
        c: &Connected,
        entry: &SpoolEntry,
    ) -> FlushOutcome {
        let (manifest, entry) = match self.spool.manifest(entry.id).await {
            Ok(m) => (m, entry.clone()),
            Err(e) => {
                tracing::error!(
                    id = entry.id,
                    "unreadable spool manifest, re-chunking the file as an unverified update: {e}"
                );
                match self.unverified(entry).await {
                    Ok(pair) => pair,
                    Err(outcome) => return outcome,
                }
            }
        };
        let outcome = self
            .deliver_entry(guard, c, &entry, &manifest, UpdateCause::Spooled, false)
            .await;
        tracing::info!(user = %entry.user, id = entry.id, "spooled update: {outcome}");
        outcome
    }

    /// Re-journals `entry` from its file, with no base (conflict only).
    async fn unverified(&self, entry: &SpoolEntry) -> Result<(Manifest, SpoolEntry), FlushOutcome> {
        let path = entry.file.clone();
        let params = self.config.get().chunk_params();
        let chunked = blocking(move || {
            uve_protocol::chunker::chunk_file_with(&path, params)
                .map_err(|e| UifError::at("chunk", &path, e))
        })
        .await;
        match chunked {
            Ok(m) => {
                let unverified = SpoolEntry {
                    base: None,
                    ..entry.clone()
                };
                if let Err(e) = self.spool.add(&unverified, &m).await {
                    tracing::warn!(id = entry.id, "cannot rewrite spool entry: {e}");
                }
                Ok((m, unverified))
            }
            Err(UifError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                tracing::error!(id = entry.id, file = %entry.file.display(), "the spooled UIF file is gone; dropping the entry");
                self.spool.remove(entry.id).await;
                Err(FlushOutcome::Nothing("the spooled file is gone".into()))
            }
            Err(e) => Err(FlushOutcome::Spooled(e.to_string())),
        }
    }

    /// Delivers the whole spool in order, taking each user's lock; stops
    /// at the first transient failure.
    pub async fn deliver_spool(&self, c: &Connected) {
        for entry in self.spool.list() {
            let guard = self.locks.lock(&entry.user).await;
            // Someone (a login) may have delivered it while we waited.
            if !self.spool.contains(entry.id) {
                continue;
            }
            if let FlushOutcome::Spooled(_) = self.deliver_one(&guard, c, &entry).await {
                return;
            }
        }
    }
}

/// The preserved area's budget under `cfg`, on the filesystem of
/// `state_dir` (its size decides the defaults).
fn preserved_budget(cfg: &crate::config::Config, state_dir: &std::path::Path) -> Budget {
    let fs_size = nix::sys::statvfs::statvfs(state_dir)
        .map(|st| st.blocks().saturating_mul(st.fragment_size()))
        .unwrap_or(0);
    Budget::new(cfg.preserved_mib, cfg.preserved_per_user_mib, fs_size)
}

/// Where the refused update `entry` is held in place: its file itself,
/// except in directory mode, where the home it was packed from holds the
/// same bytes (and the archive can go) — but only when that is provably
/// the home packed: packed in this boot (no home recreated since), the
/// user found in the user database, and the home a directory (not a
/// symlink) owned by the user the pack ran as. Otherwise the archive
/// itself is held.
fn held_at(cfg: &crate::config::Config, entry: &SpoolEntry) -> std::path::PathBuf {
    use std::os::unix::fs::MetadataExt;
    let file = entry.file.clone();
    if cfg.uif.mode != crate::config::UifMode::Directory || entry.boot != fsutil::kernel_boot() {
        return file;
    }
    let Ok(account) = crate::base::accounts::lookup(&entry.user) else {
        return file;
    };
    let home = cfg.home_path(&entry.user, Some(&account));
    let owner = cfg.owner(Some(&account)).map(|(uid, _)| uid);
    match std::fs::symlink_metadata(&home) {
        Ok(m) if m.is_dir() && owner == Some(m.uid()) => home,
        _ => file,
    }
}
