//! The flush every lifecycle shares — detach/pack, chunk, journal in the
//! spool, upload — and the delivery of spooled updates after a reconnect.
//! An update is always journalled before it is sent, so "committed" and
//! "safely spooled" are the outcomes of a flush that did not fail locally,
//! besides "unchanged": a UIF whose manifest digest is still that of the
//! version it was retrieved as (or last committed) is not uploaded at all.

use std::sync::Arc;
use std::time::Duration;

use uve_protocol::message::{UpdateBegin, UpdateCause, Version};

use crate::agent::Agent;
use crate::conn::Connected;
use crate::fsutil;
use crate::lifecycle::LifecycleError;
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
    /// Journalled; delivered after reconnect.
    Spooled(String),
    /// The host refused the update for good (kept under `spool/rejected`).
    Rejected(String),
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
            FlushOutcome::Rejected(why) => write!(f, "rejected by the host: {why}"),
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
    };
    if cause != UpdateCause::Checkpoint || !keep_attached {
        // Off the runtime thread: the manifest of a large UIF is a
        // megabyte written and fsynced.
        let (spool, e2, m2) = (agent.spool.clone(), entry.clone(), manifest.clone());
        tokio::task::spawn_blocking(move || spool.add(&e2, &m2))
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
    Ok(outcome)
}

/// Uploads one update; removes its spool entry once the host took it.
async fn deliver_entry(
    agent: &Agent,
    c: &Connected,
    entry: &SpoolEntry,
    manifest: &uve_protocol::manifest::Manifest,
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
    let stamped = cache::stamped_id(&agent.state_dir, &entry.user, manifest);
    let mut result = update::upload(&c.link, &entry.file, manifest, begin.clone(), stamped).await;
    if matches!(result, Err(UifError::Changed)) && !live_checkpoint {
        // The UIF is still attached and was written to since it was
        // spooled: send what it holds now (newer data of the same user).
        let path = entry.file.clone();
        match blocking(move || {
            uve_protocol::chunker::chunk_file(&path).map_err(|e| UifError::at("chunk", &path, e))
        })
        .await
        {
            Ok(fresh) => {
                if let Err(e) = agent.spool.add(entry, &fresh) {
                    tracing::warn!(id = entry.id, "cannot rewrite spool manifest: {e}");
                }
                let _ = cache::save(&agent.state_dir, &entry.user, &fresh);
                let begin = UpdateBegin {
                    header: fresh.header,
                    ..begin
                };
                digest = fresh.header.digest;
                result = update::upload(&c.link, &entry.file, &fresh, begin, None).await;
            }
            Err(e) => result = Err(e),
        }
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
        Err(e) if live_checkpoint => FlushOutcome::Rejected(format!("checkpoint not taken: {e}")),
        Err(e) if e.is_transient() => FlushOutcome::Spooled(e.to_string()),
        Err(e) => {
            tracing::error!(user = %entry.user, id = entry.id, "host refused update for good: {e}");
            agent.spool.reject(entry.id);
            FlushOutcome::Rejected(e.to_string())
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

/// Delivers one spooled entry.
async fn deliver_one(agent: &Agent, c: &Connected, entry: &SpoolEntry) -> FlushOutcome {
    let manifest = match agent.spool.manifest(entry.id) {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(
                id = entry.id,
                "unreadable spool manifest, moving aside: {e}"
            );
            agent.spool.reject(entry.id);
            return FlushOutcome::Rejected(format!("unreadable spool manifest: {e}"));
        }
    };
    let outcome = deliver_entry(agent, c, entry, &manifest, UpdateCause::Spooled, false).await;
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
