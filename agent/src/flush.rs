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

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use uve_protocol::manifest::Manifest;
use uve_protocol::message::{UpdateBegin, UpdateCause, Version, WireError};

use crate::agent::Agent;
use crate::conn::Connected;
use crate::fsutil;
use crate::lifecycle::LifecycleError;
use crate::uif::preserve::{PreservedCopy, Refused, human_size};
use crate::uif::spool::SpoolEntry;
use crate::uif::update::{self, UpdateOutcome};
use crate::uif::{UifError, blocking, cache, materialise};

/// How long a flush waits for a connection before leaving the update in
/// the spool.
const FLUSH_CONNECT_WAIT: Duration = Duration::from_secs(3);

fn uif_err(user: &str) -> impl FnOnce(UifError) -> LifecycleError + '_ {
    move |source| LifecycleError::Uif {
        user: user.to_string(),
        source,
    }
}

/// Where the bytes of an update the host refused for good are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kept {
    /// Moved into the preserved area.
    Preserved(PreservedCopy),
    /// Still at the UIF path, which is still attached to a session (a
    /// shutdown flush): the session's next flush sends them again.
    InPlace(PathBuf),
}

/// What a flush achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// Detaches (unless `keep_attached`), chunks, journals and uploads the
/// user's UIF. The caller holds the user's lock.
pub async fn flush_user(
    agent: &Arc<Agent>,
    user: &str,
    session: &str,
    cause: UpdateCause,
    keep_attached: bool,
) -> Result<FlushOutcome, LifecycleError> {
    let Some(rec) = agent.snapshot().uifs.get(user).cloned() else {
        return Ok(FlushOutcome::Nothing(format!("no UIF of {user} attached")));
    };
    let cfg = agent.config();
    if let Err(e) = materialise::detach(&cfg, user, session, keep_attached).await {
        match e {
            UifError::Hook(_) => tracing::error!(user, "detach hook failed, flushing anyway: {e}"),
            e => return Err(uif_err(user)(e)),
        }
    }
    if keep_attached && cfg.uif.mode == crate::config::UifMode::File {
        // The image may be mounted: write the filesystem's dirty pages into
        // it first, so the snapshot is at least crash-consistent. Off the
        // runtime thread: with many dirty pages sync(2) takes seconds, and
        // heartbeats must keep flowing meanwhile.
        blocking(|| {
            // SAFETY: sync(2) has no preconditions.
            unsafe { libc::sync() };
            Ok(())
        })
        .await
        .map_err(uif_err(user))?;
    }
    let path = cfg.uif_path(user);
    let p2 = path.clone();
    let (state_dir, u2) = (agent.state_dir.clone(), user.to_string());
    let started = std::time::Instant::now();
    let (manifest, id) = blocking(move || {
        // A file still stamped as holding the recorded manifest (not
        // written since the retrieve or the last flush) need not be read.
        if let Some(m) = cache::load(&state_dir, &u2)
            && cache::trusted(&state_dir, &u2, &p2, &m)
        {
            return Ok((m, None));
        }
        // The file's identity is taken before it is read: any write after
        // that changes its ctime, so the stamp vouches only for what was
        // chunked.
        let id = cache::settled_id(&p2);
        let m =
            uve_protocol::chunker::chunk_file(&p2).map_err(|e| UifError::at("chunk", &p2, e))?;
        Ok((m, Some(id)))
    })
    .await
    .map_err(uif_err(user))?;
    match id {
        None => tracing::debug!(user, "UIF file unchanged since stamped; not re-chunked"),
        Some(id) => {
            tracing::info!(
                user,
                chunk_ms = started.elapsed().as_millis(),
                chunks = manifest.chunks.len(),
                "flush: UIF file chunked"
            );
            if let Err(e) = cache::record(&agent.state_dir, user, &manifest, id) {
                tracing::warn!(user, "cannot record cache manifest: {e}");
            }
        }
    }
    if rec.base_digest == Some(manifest.header.digest) {
        // Older pending snapshots of this file (never committed) are
        // superseded by its current content, which the host already has.
        for old in agent.spool.for_user(user) {
            if old.file == path {
                agent.spool.remove(old.id);
            }
        }
        if !keep_attached {
            agent.with_table(|t| t.uifs.remove(user));
        }
        tracing::info!(user, base = ?rec.base, ?cause, "UIF unchanged; nothing to commit");
        return Ok(FlushOutcome::Unchanged(rec.base));
    }
    let entry = SpoolEntry {
        id: fsutil::random_u64(),
        user: user.into(),
        session: session.into(),
        base: rec.base,
        lease: rec.lease,
        cause,
        file: path,
        created: fsutil::now_ms(),
        boot: fsutil::kernel_boot(),
    };
    if cause != UpdateCause::Checkpoint || !keep_attached {
        // "Spooled" means durable: the file first (one fsync of it, not a
        // sync of every filesystem), then the entry. Off the runtime
        // thread: the manifest of a large UIF is a megabyte written and
        // fsynced.
        let (spool, e2, m2) = (agent.spool.clone(), entry.clone(), manifest.clone());
        tokio::task::spawn_blocking(move || {
            fsutil::sync_file(&e2.file)?;
            spool.add(&e2, &m2)
        })
        .await
        .map_err(|e| LifecycleError::Journal(std::io::Error::other(e.to_string())))?
        .map_err(LifecycleError::Journal)?;
        // Older pending snapshots of the same file are superseded: the file
        // holds newer data now, and none of them was committed, so they all
        // share this entry's base.
        for old in agent.spool.for_user(user) {
            if old.id != entry.id && old.file == entry.file {
                agent.spool.remove(old.id);
            }
        }
    }
    if !keep_attached {
        agent.with_table(|t| t.uifs.remove(user));
    }
    // At shutdown every second counts (systemd's stop timeout): only use a
    // connection that is up now.
    let wait = if cause == UpdateCause::Shutdown {
        Duration::ZERO
    } else {
        FLUSH_CONNECT_WAIT
    };
    let outcome = match agent.conn.wait(wait).await {
        None => FlushOutcome::Spooled("host unreachable".into()),
        Some(c) => {
            let live_checkpoint = keep_attached && cause == UpdateCause::Checkpoint;
            deliver_entry(agent, &c, &entry, &manifest, cause, live_checkpoint).await
        }
    };
    if matches!(outcome, FlushOutcome::Spooled(_)) {
        // The outbox retries it (every few seconds while anything is
        // pending), also when the link stays up.
        agent.kick.notify_one();
    }
    Ok(outcome)
}

/// Uploads one update; removes its spool entry once the host took it, or
/// once its bytes are preserved after a final refusal.
async fn deliver_entry(
    agent: &Agent,
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
        cache::stamped_id(&agent.state_dir, &entry.user, manifest)
    };
    let mut result = update::upload(&c.link, &entry.file, manifest, begin.clone(), stamped).await;
    if matches!(result, Err(UifError::Changed)) && !live_checkpoint {
        result = resend_changed(agent, c, entry, begin, earlier_boot, &mut digest).await;
    }
    match result {
        Ok(UpdateOutcome::Committed(v)) => {
            agent.spool.remove(entry.id);
            // A UIF still attached (checkpoint, shutdown) is now based on v.
            agent.with_table(|t| {
                if let Some(r) = t.uifs.get_mut(&entry.user) {
                    r.base = Some(v);
                    r.base_digest = Some(digest);
                }
            });
            FlushOutcome::Committed(v)
        }
        Ok(UpdateOutcome::Conflict { kept_as, head }) => {
            agent.spool.remove(entry.id);
            tracing::warn!(user = %entry.user, kept_as, ?head, "update landed as a conflict version");
            FlushOutcome::Conflict { kept_as, head }
        }
        Err(e) if live_checkpoint => FlushOutcome::NotTaken(e.to_string()),
        Err(e) => match e.refusal() {
            None => {
                tracing::warn!(user = %entry.user, id = entry.id, "update stays spooled: {e}");
                FlushOutcome::Spooled(e.to_string())
            }
            Some(refusal) => keep_refused(agent, entry, refusal.clone()).await,
        },
    }
}

/// The UIF was written to after it was spooled: sends what it holds now.
/// In the same boot that is newer data of the same user, on the same base;
/// after a VM restart the file may be torn, so it goes only as a conflict
/// version (base `None`), never as the head.
async fn resend_changed(
    agent: &Agent,
    c: &Connected,
    entry: &SpoolEntry,
    begin: UpdateBegin,
    earlier_boot: bool,
    digest: &mut uve_protocol::manifest::Hash,
) -> Result<UpdateOutcome, UifError> {
    let (path, state_dir, spool, e2) = (
        entry.file.clone(),
        agent.state_dir.clone(),
        agent.spool.clone(),
        entry.clone(),
    );
    let fresh = blocking(move || {
        let m = uve_protocol::chunker::chunk_file(&path)
            .map_err(|e| UifError::at("chunk", &path, e))?;
        if let Err(e) = spool.add(&e2, &m) {
            tracing::warn!(id = e2.id, "cannot rewrite spool manifest: {e}");
        }
        if earlier_boot {
            cache::forget(&state_dir, &e2.user);
        } else {
            let _ = cache::save(&state_dir, &e2.user, &m);
        }
        Ok(m)
    })
    .await?;
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

/// The host refused `entry` for good: moves its bytes into the preserved
/// area (or leaves them where a session still has them attached), then
/// drops the entry. If the bytes cannot be moved, the entry stays in the
/// spool, so no retrieve may overwrite its file (logins of the user fail
/// with "pending update" until it is resolved).
async fn keep_refused(agent: &Agent, entry: &SpoolEntry, refusal: WireError) -> FlushOutcome {
    let attached = agent.snapshot().uifs.contains_key(&entry.user)
        && agent.config().uif_path(&entry.user) == entry.file;
    tracing::error!(user = %entry.user, id = entry.id, attached, "host refused update for good: {refusal}");
    if attached {
        agent.spool.remove(entry.id);
        return FlushOutcome::Refused {
            refusal,
            kept: Kept::InPlace(entry.file.clone()),
        };
    }
    let (preserved, state_dir, e2, r2) = (
        agent.preserved.clone(),
        agent.state_dir.clone(),
        entry.clone(),
        refusal.clone(),
    );
    let kept = blocking(move || {
        let what = Refused {
            user: &e2.user,
            session: &e2.session,
            cause: e2.cause,
            base: e2.base,
            file: &e2.file,
            refusal: &r2,
        };
        let copy = preserved
            .keep(&what)
            .map_err(|e| UifError::at("preserve", &e2.file, e))?;
        // The file the cache describes is gone.
        cache::forget(&state_dir, &e2.user);
        Ok(copy)
    })
    .await;
    match kept {
        Ok(copy) => {
            agent.spool.remove(entry.id);
            FlushOutcome::Refused {
                refusal,
                kept: Kept::Preserved(copy),
            }
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

/// Delivers the spooled updates of one user (caller holds the user lock).
/// Returns the last version they committed, if any.
pub async fn deliver_user_spool(agent: &Agent, c: &Connected, user: &str) -> Option<Version> {
    let mut committed = None;
    for entry in agent.spool.for_user(user) {
        match deliver_one(agent, c, &entry).await {
            FlushOutcome::Spooled(_) => break,
            FlushOutcome::Committed(v) => committed = Some(v),
            _ => {}
        }
    }
    committed
}

/// Delivers one spooled entry. An entry whose manifest cannot be read is
/// re-chunked from its file and sent as a conflict version only (nothing
/// vouches for the file any more); one whose file is gone is dropped.
async fn deliver_one(agent: &Agent, c: &Connected, entry: &SpoolEntry) -> FlushOutcome {
    let (manifest, entry) = match agent.spool.manifest(entry.id) {
        Ok(m) => (m, entry.clone()),
        Err(e) => {
            tracing::error!(
                id = entry.id,
                "unreadable spool manifest, re-chunking the file as an unverified update: {e}"
            );
            let path = entry.file.clone();
            match blocking(move || {
                uve_protocol::chunker::chunk_file(&path)
                    .map_err(|e| UifError::at("chunk", &path, e))
            })
            .await
            {
                Ok(m) => {
                    let unverified = SpoolEntry {
                        base: None,
                        ..entry.clone()
                    };
                    if let Err(e) = agent.spool.add(&unverified, &m) {
                        tracing::warn!(id = entry.id, "cannot rewrite spool entry: {e}");
                    }
                    (m, unverified)
                }
                Err(UifError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    tracing::error!(id = entry.id, file = %entry.file.display(), "the spooled UIF file is gone; dropping the entry");
                    agent.spool.remove(entry.id);
                    return FlushOutcome::Nothing("the spooled file is gone".into());
                }
                Err(e) => return FlushOutcome::Spooled(e.to_string()),
            }
        }
    };
    let outcome = deliver_entry(agent, c, &entry, &manifest, UpdateCause::Spooled, false).await;
    tracing::info!(user = %entry.user, id = entry.id, "spooled update: {outcome}");
    outcome
}

/// Delivers the whole spool in order; stops at the first transient failure.
pub async fn deliver_spool(agent: &Arc<Agent>, c: &Connected) {
    for entry in agent.spool.list() {
        let lock = agent.user_lock(&entry.user);
        let _guard = lock.lock().await;
        // Someone (a login) may have delivered it while we waited.
        if !agent.spool.list().iter().any(|e| e.id == entry.id) {
            continue;
        }
        if let FlushOutcome::Spooled(_) = deliver_one(agent, c, &entry).await {
            return;
        }
    }
}
