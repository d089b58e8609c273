//! The flush every lifecycle shares — detach/pack, chunk, make durable,
//! journal in the spool, upload — and the delivery of spooled updates after
//! a reconnect. An update is always journalled before it is sent, so
//! "committed" and "safely spooled" are the outcomes of a flush that did
//! not fail locally, besides "unchanged": a UIF whose manifest digest is
//! still that of the version it was retrieved as (or last committed) is not
//! uploaded at all.
//!
//! What the host answers decides what happens to the bytes, by one rule
//! ([`UifError::refusal`]): a transient failure (link down, host busy, a
//! local i/o error) leaves the update in the spool to be retried; a final
//! refusal (quota, not assigned, too large) moves the file into the
//! preserved area before the entry leaves the spool, so no later retrieve
//! can overwrite it.

mod deliver;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use uve_protocol::message::{UpdateCause, Version, WireError};
use uve_protocol::names::SessionId;

use crate::base::fsutil;
use crate::config::SharedConfig;
use crate::link::LinkWatch;
use crate::stores::cache;
use crate::stores::preserve::{Preserved, PreservedCopy, human_size};
use crate::stores::session::{SessionTable, UserGuard, UserLocks};
use crate::stores::spool::{Spool, SpoolEntry};
use crate::uif::{UifError, UserUifError, blocking, materialise, uif_err};

/// How long a flush waits for a connection before leaving the update in
/// the spool.
pub const FLUSH_CONNECT_WAIT: Duration = Duration::from_secs(3);

/// Why a flush failed before its update was journalled (nothing was
/// spooled: the UIF stays where it is, attached).
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    /// Detaching, packing or chunking the UIF failed.
    #[error(transparent)]
    Uif(#[from] UserUifError),
    /// Writing the spool entry failed.
    #[error("cannot journal the update of {user}: {source}")]
    Journal {
        /// Whose update.
        user: String,
        /// The error.
        source: std::io::Error,
    },
}

/// The parts a flush works with.
pub struct Flusher {
    /// The configuration in force.
    config: Arc<SharedConfig>,
    /// The state directory.
    state_dir: PathBuf,
    /// Sessions and attached UIFs.
    table: Arc<SessionTable>,
    /// Pending updates.
    spool: Spool,
    /// Bytes of refused updates.
    preserved: Preserved,
    /// The host connection.
    link: Arc<LinkWatch>,
    /// The per-user locks (spool delivery takes them itself).
    locks: Arc<UserLocks>,
    /// Wakes the outbox (retries of spooled updates).
    kick: Arc<Notify>,
}

impl Flusher {
    /// The flush over the spool and preserved area of `config`'s state
    /// directory.
    pub fn new(
        config: Arc<SharedConfig>,
        table: Arc<SessionTable>,
        link: Arc<LinkWatch>,
        locks: Arc<UserLocks>,
        kick: Arc<Notify>,
    ) -> Flusher {
        let state_dir = config.get().state_dir.clone();
        Flusher {
            spool: Spool::load(&state_dir),
            preserved: Preserved::new(&state_dir),
            config,
            state_dir,
            table,
            link,
            locks,
            kick,
        }
    }

    /// The preserved copies of refused updates.
    pub fn preserved(&self) -> &Preserved {
        &self.preserved
    }

    /// How many updates wait in the spool.
    pub fn pending_updates(&self) -> usize {
        self.spool.count()
    }

    /// The spooled updates of `user`.
    pub fn spooled_for(&self, user: &str) -> usize {
        self.spool.for_user(user).len()
    }
}

/// Where the bytes of an update the host refused for good are.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Kept {
    /// Moved into the preserved area.
    Preserved(Box<PreservedCopy>),
    /// Still at the UIF path, which is still attached to a session (a
    /// shutdown flush): the session's next flush sends them again.
    InPlace(PathBuf),
    /// Over the preserved area's budget: held where the user left them
    /// (see [`crate::stores::preserve`]); the user's logins on this VM are
    /// refused until root pushes or deletes the copy.
    Held(Box<PreservedCopy>),
}

/// What a flush achieved (serialisable: the latest session ends are kept
/// across agent restarts for retried logouts).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FlushOutcome {
    /// The update is the user's new head.
    Committed(Version),
    /// The host kept the update as a conflict version.
    Conflict {
        /// Version it was kept as.
        kept_as: Version,
        /// The head at the time.
        head: Option<Version>,
    },
    /// Journalled durably; delivered after reconnect.
    Spooled(String),
    /// The host refused the update for good; its bytes are kept.
    Refused {
        /// The host's refusal.
        refusal: WireError,
        /// Where the bytes are.
        kept: Kept,
    },
    /// A live checkpoint was not taken; the UIF stays attached and the
    /// session's next flush sends it.
    NotTaken(String),
    /// Nothing to flush (no UIF attached, or other sessions still use it).
    Nothing(String),
    /// The UIF still holds its base version (same manifest digest): no new
    /// version was uploaded or committed.
    Unchanged(Option<Version>),
}

impl std::fmt::Display for FlushOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FlushOutcome::Committed(v) => write!(f, "committed as version {v}"),
            FlushOutcome::Conflict { kept_as, head } => write!(
                f,
                "committed as conflict version {kept_as} (head is {head:?})"
            ),
            FlushOutcome::Spooled(why) => {
                write!(f, "spooled ({why}); delivered when the host is back")
            }
            FlushOutcome::Refused { refusal, kept } => {
                write!(
                    f,
                    "REFUSED by the host ({:?}: {}); nothing is lost: ",
                    refusal.code, refusal.message
                )?;
                match kept {
                    Kept::Preserved(c) => write!(
                        f,
                        "the UIF ({}) is preserved on this VM as copy {} at {}; once the cause is fixed, `uve-agent preserved push --id {}` sends it to the host as a conflict version",
                        human_size(c.size),
                        c.id,
                        c.bytes.display(),
                        c.id
                    ),
                    Kept::InPlace(p) => write!(
                        f,
                        "the UIF stays attached at {}; the session's next flush sends it again",
                        p.display()
                    ),
                    Kept::Held(c) => write!(
                        f,
                        "the UIF ({}) could not be set aside ({}), so it is HELD where it is, at {}; \
                         {}'s logins on this VM are refused until root runs \
                         `uve-agent preserved push --id {}` once the cause is fixed",
                        human_size(c.size),
                        c.held.as_deref().unwrap_or_default(),
                        c.bytes.display(),
                        c.user,
                        c.id
                    ),
                }
            }
            FlushOutcome::NotTaken(why) => write!(f, "checkpoint not taken: {why}"),
            FlushOutcome::Nothing(why) => write!(f, "nothing flushed ({why})"),
            FlushOutcome::Unchanged(Some(v)) => {
                write!(f, "unchanged since version {v}; nothing committed")
            }
            FlushOutcome::Unchanged(None) => {
                write!(f, "unchanged (still the empty UIF); nothing committed")
            }
        }
    }
}

impl Flusher {
    /// Detaches (unless `keep_attached`), chunks, makes durable, journals
    /// and uploads the UIF of the user whose lock `guard` holds.
    pub async fn flush(
        &self,
        guard: &UserGuard,
        session: &SessionId,
        cause: UpdateCause,
        keep_attached: bool,
    ) -> Result<FlushOutcome, FlushError> {
        let user = guard.user();
        let Some(rec) = self.table.uif(user) else {
            return Ok(FlushOutcome::Nothing(format!("no UIF of {user} attached")));
        };
        let cfg = self.config.get();
        self.take_back(&cfg, user, session, keep_attached).await?;
        let path = cfg.uif_path(user);
        let params = cfg.chunk_params();
        let manifest = self.chunk(user, &path, params).await?;
        if rec.base_digest == Some(manifest.header.digest) {
            // Older pending snapshots of this file (never committed) are
            // superseded by its current content, which the host already has.
            self.drop_superseded(user, &path, None).await;
            if !keep_attached {
                // Not durable: a restart finds it attached with no session
                // and repairs that (it is unchanged, so nothing is sent).
                let _ = self.table.detach(guard).await;
            }
            tracing::info!(%user, base = ?rec.base, ?cause, "UIF unchanged; nothing to commit");
            return Ok(FlushOutcome::Unchanged(rec.base));
        }
        let entry = SpoolEntry {
            id: fsutil::random_u64(),
            user: user.clone(),
            session: session.clone(),
            base: rec.base,
            lease: rec.lease,
            cause,
            file: path,
            created: fsutil::now_ms(),
            boot: fsutil::kernel_boot(),
        };
        let live_checkpoint = keep_attached && cause == UpdateCause::Checkpoint;
        if !live_checkpoint {
            self.journal(&entry, &manifest).await?;
            crate::base::fault::crash_at("flush-journalled");
        }
        if !keep_attached {
            // Not durable: the update is journalled already, so the bytes
            // are safe; a restart finds the UIF attached with no session
            // and repairs that.
            let _ = self.table.detach(guard).await;
        }
        // At shutdown every second counts (systemd's stop timeout): only use a
        // connection that is up now.
        let wait = if cause == UpdateCause::Shutdown {
            Duration::ZERO
        } else {
            FLUSH_CONNECT_WAIT
        };
        let outcome = match self.link.wait(wait).await {
            None => FlushOutcome::Spooled("host unreachable".into()),
            Some(c) => {
                self.deliver_entry(guard, &c, &entry, &manifest, cause, live_checkpoint)
                    .await
            }
        };
        if matches!(outcome, FlushOutcome::Spooled(_)) {
            // The outbox retries it (every few seconds while anything is
            // pending), also when the link stays up.
            self.kick.notify_one();
        }
        Ok(outcome)
    }

    /// Makes the UIF file consistent: detach hook or pack (see
    /// [`materialise::detach`]); a live file-mode snapshot first gets the
    /// mounted filesystem's dirty pages written into the image.
    async fn take_back(
        &self,
        cfg: &crate::config::Config,
        user: &str,
        session: &str,
        keep_attached: bool,
    ) -> Result<(), FlushError> {
        let account = self.table.uif(user).and_then(|r| r.account);
        if let Err(e) =
            materialise::detach(cfg, user, account.as_ref(), session, keep_attached).await
        {
            match e {
                UifError::Hook(_) => {
                    tracing::error!(%user, "detach hook failed, flushing anyway: {e}");
                }
                e => return Err(uif_err(user)(e).into()),
            }
        }
        if keep_attached && cfg.uif.mode == crate::config::UifMode::File {
            // The image may be mounted through a loop device whose dirty
            // pages only sync(2) reaches (the mount point is the hook's
            // business). Off the runtime thread: with many dirty pages
            // sync(2) takes seconds, and heartbeats must keep flowing.
            blocking(|| {
                fsutil::sync_filesystems();
                Ok(())
            })
            .await
            .map_err(uif_err(user))?;
        }
        Ok(())
    }

    /// The manifest of the UIF file at `path`: the recorded one while the
    /// file's stamp still vouches for it, else chunked afresh with `params`
    /// (and recorded with a new stamp).
    async fn chunk(
        &self,
        user: &str,
        path: &std::path::Path,
        params: uve_protocol::chunker::ChunkParams,
    ) -> Result<uve_protocol::manifest::Manifest, FlushError> {
        let (p2, state_dir, u2) = (path.to_path_buf(), self.state_dir.clone(), user.to_string());
        blocking(move || {
            if let Some(m) = cache::load(&state_dir, &u2)
                && cache::trusted(&state_dir, &u2, &p2, &m)
            {
                tracing::debug!(
                    user = u2,
                    "UIF file unchanged since stamped; not re-chunked"
                );
                return Ok(m);
            }
            // The file's identity is taken before it is read: any write
            // after that changes its ctime, so the stamp vouches only for
            // what was chunked.
            let started = std::time::Instant::now();
            let id = cache::settled_id(&p2);
            let m = uve_protocol::chunker::chunk_file_with(&p2, params)
                .map_err(|e| UifError::at("chunk", &p2, e))?;
            tracing::info!(
                user = u2,
                chunk_ms = started.elapsed().as_millis(),
                chunks = m.chunks.len(),
                "flush: UIF file chunked"
            );
            if let Err(e) = cache::record(&state_dir, &u2, &m, id) {
                tracing::warn!(user = u2, "cannot record cache manifest: {e}");
            }
            Ok(m)
        })
        .await
        .map_err(|e| uif_err(user)(e).into())
    }

    /// Journals `entry`: "spooled" means durable, so the file first (one
    /// fsync of it, not a sync of every filesystem), then the entry. Older
    /// pending snapshots of the same file are superseded: the file holds
    /// newer data now, and none of them was committed, so they all share
    /// this entry's base.
    async fn journal(
        &self,
        entry: &SpoolEntry,
        manifest: &uve_protocol::manifest::Manifest,
    ) -> Result<(), FlushError> {
        let journal_err = |source| FlushError::Journal {
            user: entry.user.to_string(),
            source,
        };
        let file = entry.file.clone();
        tokio::task::spawn_blocking(move || fsutil::sync_file(&file))
            .await
            .map_err(|e| journal_err(std::io::Error::other(e)))?
            .map_err(journal_err)?;
        self.spool.add(entry, manifest).await.map_err(journal_err)?;
        self.drop_superseded(&entry.user, &entry.file, Some(entry.id))
            .await;
        Ok(())
    }

    /// Removes `user`'s spool entries of `file`, but `keep`.
    async fn drop_superseded(&self, user: &str, file: &std::path::Path, keep: Option<u64>) {
        for old in self.spool.for_user(user) {
            if Some(old.id) != keep && old.file == file {
                self.spool.remove(old.id).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use uve_protocol::message::{ErrorCode, Request};

    use super::*;
    use crate::stores::session::UifRecord;
    use crate::testing::{COMMITTED, Rig, name};

    /// Attaches a UIF of `user` holding `bytes`, based on version 1.
    async fn attached(rig: &Rig, user: &str, bytes: &[u8]) -> UserGuard {
        let path = rig.uif(user);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        let guard = rig.lifecycle.locks().lock(&name(user)).await;
        let rec = UifRecord {
            base: Some(1),
            lease: 1,
            temporary: false,
            base_digest: None,
            account: None,
        };
        rig.lifecycle.table().attach(&guard, rec).await.unwrap();
        guard
    }

    /// The flush of session `s1`'s logout.
    async fn logout(f: &Flusher, g: &UserGuard) -> FlushOutcome {
        f.flush(g, &name("s1"), UpdateCause::Logout, false)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_changed_uif_is_committed_and_nothing_stays_spooled() {
        let rig = Rig::new();
        let data = uve_protocol::testdata::noise(300_000, 1);
        let g = attached(&rig, "ann", &data).await;
        let f = rig.lifecycle.flusher();
        let out = logout(f, &g).await;
        assert_eq!(out, FlushOutcome::Committed(COMMITTED));
        assert_eq!(f.spool.count(), 0);
        assert!(rig.lifecycle.table().uif("ann").is_none(), "detached");
        let uploaded = rig.count(|r| matches!(r, Request::ChunkUpload { .. }));
        assert!(uploaded > 0);
    }

    #[tokio::test]
    async fn a_refusal_preserves_the_bytes_and_frees_the_path() {
        let rig = Rig::new();
        rig.refuse_updates(Some(ErrorCode::QuotaExceeded));
        let data = uve_protocol::testdata::noise(100_000, 2);
        let g = attached(&rig, "ben", &data).await;
        let f = rig.lifecycle.flusher();
        let out = logout(f, &g).await;
        let FlushOutcome::Refused {
            refusal,
            kept: Kept::Preserved(copy),
        } = out
        else {
            panic!("not preserved: {out:?}");
        };
        assert_eq!(refusal.code, ErrorCode::QuotaExceeded);
        assert_eq!(std::fs::read(&copy.bytes).unwrap(), data);
        assert!(!rig.uif("ben").exists());
        assert_eq!(f.spool.count(), 0);
        assert_eq!(f.preserved.list(), vec![*copy]);
    }

    #[tokio::test]
    async fn a_transient_refusal_leaves_it_spooled_durably() {
        let rig = Rig::new();
        rig.refuse_updates(Some(ErrorCode::Busy));
        let g = attached(&rig, "cat", b"cat's work").await;
        let f = rig.lifecycle.flusher();
        let out = logout(f, &g).await;
        assert!(matches!(out, FlushOutcome::Spooled(_)), "{out:?}");
        let entries = f.spool.list();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].boot, fsutil::kernel_boot());
        // What a restarted agent finds on disk.
        let again = Spool::load(rig.state());
        assert_eq!(again.count(), 1);
        let m = again.manifest(entries[0].id).await.unwrap();
        assert_eq!(m.header.size, 10);
        assert!(rig.uif("cat").exists(), "the bytes stay in place");
    }

    #[tokio::test]
    async fn an_unchanged_uif_is_not_uploaded() {
        let rig = Rig::new();
        let g = attached(&rig, "dan", b"same as base").await;
        let digest = uve_protocol::chunker::chunk_file(&rig.uif("dan"))
            .unwrap()
            .header
            .digest;
        rig.lifecycle.table().rebase(&g, 1, digest).await.unwrap();
        let f = rig.lifecycle.flusher();
        let out = logout(f, &g).await;
        assert_eq!(out, FlushOutcome::Unchanged(Some(1)));
        assert_eq!(rig.count(|r| matches!(r, Request::UpdateBegin(_))), 0);
    }
}
