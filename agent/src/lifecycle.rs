//! Session lifecycles: login (retrieve + attach + optional supervised UA),
//! logout, unexpected disconnect, VM switch release, periodic checkpoint,
//! agent shutdown and recovery after a VM restart. The flush they share
//! lives in [`crate::flush`].

use std::sync::Arc;
use std::time::Duration;

use uve_protocol::message::{DisconnectNotice, Request, UpdateCause, Version};
use uve_protocol::names::{self, NameError};

use crate::agent::Agent;
use crate::config::{Config, RetrieveFailure};
use crate::conn::Connected;
use crate::flush::{FlushOutcome, deliver_user_spool, flush_user};
use crate::fsutil;
use crate::session::{SessionRecord, UifRecord};
use crate::uif::{UifError, cache, materialise, retrieve};

/// Pause before retrying an interrupted retrieve.
const RETRY_PAUSE: Duration = Duration::from_millis(300);

/// Why a lifecycle operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// A name is malformed.
    #[error(transparent)]
    Name(#[from] NameError),
    /// No such session.
    #[error("no open session {0}")]
    NoSuchSession(String),
    /// The session id is in use by another user.
    #[error("session {0} is already open for another user")]
    SessionTaken(String),
    /// The UA named at login is not deployed.
    #[error("UA {0} is not deployed on this VM")]
    UaNotDeployed(String),
    /// An earlier update of the user could not be delivered yet.
    #[error("an earlier update of {0} is still waiting for the host; try again when connected")]
    PendingUpdate(String),
    /// A UIF step failed.
    #[error("UIF of {user}: {source}")]
    Uif {
        /// Whose UIF.
        user: String,
        /// What failed.
        source: UifError,
    },
    /// Starting the UA failed.
    #[error("cannot start UA: {0}")]
    Supervise(#[from] crate::supervise::SuperviseError),
    /// Journalling failed.
    #[error("cannot journal: {0}")]
    Journal(std::io::Error),
    /// No preserved copy has this id.
    #[error("no preserved copy {0} (see `uve-agent preserved list`)")]
    NoSuchPreserved(String),
}

fn uif_err(user: &str) -> impl FnOnce(UifError) -> LifecycleError + '_ {
    move |source| LifecycleError::Uif {
        user: user.to_string(),
        source,
    }
}

/// Opens a session: retrieves and attaches the user's UIF unless another
/// session of the user already has it, starts the UA if asked, announces
/// the session. Returns a human-readable summary.
pub async fn login(
    agent: &Arc<Agent>,
    user: &str,
    session: &str,
    ua: Option<&str>,
) -> Result<String, LifecycleError> {
    names::user(user)?;
    names::session(session)?;
    if let Some(ua) = ua {
        names::ua(ua)?;
        if agent.uas.current(ua).is_none() {
            return Err(LifecycleError::UaNotDeployed(ua.into()));
        }
    }
    let lock = agent.user_lock(user);
    let _guard = lock.lock().await;
    if let Some(existing) = agent.snapshot().sessions.get(session) {
        return if existing.user == user {
            Ok(format!("session {session} is already open"))
        } else {
            Err(LifecycleError::SessionTaken(session.into()))
        };
    }
    let cfg = agent.config();
    let mut summary = String::new();
    if agent.snapshot().uifs.contains_key(user) {
        summary = format!("UIF of {user} already attached");
    } else {
        let rec = obtain_uif(agent, &cfg, user, session, &mut summary).await?;
        materialise::attach(&cfg, user, session, rec.temporary)
            .await
            .map_err(uif_err(user))?;
        agent.with_table(|t| t.uifs.insert(user.to_string(), rec));
    }
    let record = SessionRecord {
        session: session.into(),
        user: user.into(),
        ua: ua.map(str::to_string),
        started: fsutil::now_ms(),
        ua_process: None,
    };
    agent.with_table(|t| {
        t.ended_unsent.retain(|s| s != session);
        t.sessions.insert(session.to_string(), record.clone())
    });
    if let Some(Err(e)) = ua.map(|ua| crate::supervise::start(agent, &record, ua)) {
        drop(_guard);
        let _ = logout(agent, session).await;
        return Err(e.into());
    }
    if let Some(c) = agent.conn.current() {
        let req = Request::SessionStarted {
            session: session.into(),
            user: user.into(),
            ua: ua.map(str::to_string),
        };
        if let Err(e) = c.link.request(req).await {
            tracing::warn!(
                session,
                "SessionStarted not delivered (re-announced later): {e}"
            );
        }
    }
    let preserved = agent.preserved.for_user(user);
    if !preserved.is_empty() {
        summary.push_str(&format!(
            "; NOTE: {} earlier update(s) of {user} were refused by the host and are preserved on this VM (root: `uve-agent preserved list`): ",
            preserved.len()
        ));
        let lines: Vec<String> = preserved.iter().map(|c| c.describe()).collect();
        summary.push_str(&lines.join("; "));
    }
    tracing::info!(user, session, "login: {summary}");
    Ok(summary)
}

/// Retrieves the user's UIF (delivering any pending update of theirs
/// first), or falls back to an empty temporary UIF if configured.
async fn obtain_uif(
    agent: &Arc<Agent>,
    cfg: &Config,
    user: &str,
    session: &str,
    summary: &mut String,
) -> Result<UifRecord, LifecycleError> {
    let dest = cfg.uif_path(user);
    // A connection that drops (or a busy host) during the login is retried
    // until the login timeout, so a host restart does not fail logins.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(cfg.login_timeout_secs);
    let result = loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(c) = agent.conn.wait(left).await else {
            break Err(UifError::NotConnected);
        };
        let _ = deliver_user_spool(agent, &c, user).await;
        let retry_possible = tokio::time::Instant::now() + RETRY_PAUSE < deadline;
        if !agent.spool.for_user(user).is_empty() {
            if c.link.is_closed() && retry_possible {
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
            return Err(LifecycleError::PendingUpdate(user.into()));
        }
        let parallel = cfg
            .fetch_parallel
            .min(
                usize::try_from(c.welcome.limits.max_inflight)
                    .unwrap_or(1)
                    .saturating_sub(2),
            )
            .max(1);
        match retrieve::retrieve(&c.link, &agent.state_dir, user, session, &dest, parallel).await {
            Err(e) if e.is_transient() && retry_possible => {
                tracing::warn!(user, "retrieve interrupted, retrying: {e}");
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            other => break other,
        }
    };
    match result {
        Ok(r) => {
            *summary = match r.base {
                Some(v) => format!(
                    "retrieved version {v} ({} chunks fetched, {} reused{}){}",
                    r.fetched,
                    r.reused,
                    if r.patched { ", patched in place" } else { "" },
                    if r.handover_timed_out {
                        "; hand-over from the previous VM timed out"
                    } else {
                        ""
                    }
                ),
                None => "new user: empty UIF".into(),
            };
            Ok(UifRecord {
                base: r.base,
                lease: r.lease,
                temporary: false,
                base_digest: Some(r.digest),
            })
        }
        Err(e)
            if cfg.on_retrieve_failure == RetrieveFailure::Temporary
                && agent.spool.for_user(user).is_empty() =>
        {
            tracing::error!(user, "retrieve failed, continuing on a temporary UIF: {e}");
            retrieve::write_empty(&dest).map_err(uif_err(user))?;
            cache::forget(&agent.state_dir, user);
            *summary = format!("retrieve failed ({e}); running on an empty TEMPORARY UIF");
            Ok(UifRecord {
                base: None,
                lease: 0,
                temporary: true,
                base_digest: None,
            })
        }
        Err(e) => Err(uif_err(user)(e)),
    }
}

/// Ends a session by logout: stops its UA, flushes the UIF if it was the
/// user's last session, announces the end.
pub async fn logout(agent: &Arc<Agent>, session: &str) -> Result<FlushOutcome, LifecycleError> {
    names::session(session)?;
    let user = session_user(agent, session)?;
    let lock = agent.user_lock(&user);
    let _guard = lock.lock().await;
    session_user(agent, session)?;
    crate::supervise::stop(agent, session).await;
    let outcome = end_session(agent, &user, session, UpdateCause::Logout).await?;
    announce_end(agent, &[session.to_string()]).await;
    tracing::info!(user, session, "logout: {outcome}");
    Ok(outcome)
}

/// Ends a session unexpectedly (UA died, or the `disconnect` verb):
/// journals a disconnect notice for the host, then flushes the UIF.
pub async fn disconnect(
    agent: &Arc<Agent>,
    session: &str,
    reason: &str,
) -> Result<FlushOutcome, LifecycleError> {
    names::session(session)?;
    let user = session_user(agent, session)?;
    let lock = agent.user_lock(&user);
    let _guard = lock.lock().await;
    let ua = agent
        .snapshot()
        .sessions
        .get(session)
        .ok_or_else(|| LifecycleError::NoSuchSession(session.into()))?
        .ua
        .clone();
    let notice = DisconnectNotice {
        id: fsutil::random_u64(),
        session: session.into(),
        user: user.clone(),
        ua,
        reason: uve_protocol::defs::clip_text(reason).to_string(),
        at: fsutil::now_ms(),
    };
    agent
        .notices
        .add(&notice)
        .map_err(LifecycleError::Journal)?;
    agent.kick.notify_one();
    crate::supervise::stop(agent, session).await;
    let outcome = end_session(agent, &user, session, UpdateCause::Disconnect).await?;
    tracing::warn!(user, session, reason, "unexpected disconnect: {outcome}");
    Ok(outcome)
}

/// Sends preserved copy `id` to the host as a conflict version (base
/// `None`, so it can never replace the user's head; a user without any
/// version yet gets it as their first). Removes the copy once the host
/// took it, unless `keep`. A refusal leaves the copy as it is.
pub async fn push_preserved(
    agent: &Arc<Agent>,
    id: &str,
    keep: bool,
) -> Result<FlushOutcome, LifecycleError> {
    let copy = agent
        .preserved
        .get(id)
        .ok_or_else(|| LifecycleError::NoSuchPreserved(id.into()))?;
    let lock = agent.user_lock(&copy.user);
    let _guard = lock.lock().await;
    let wait = Duration::from_secs(agent.config().login_timeout_secs);
    let c = agent.conn.wait(wait).await.ok_or_else(|| LifecycleError::Uif {
        user: copy.user.clone(),
        source: UifError::NotConnected,
    })?;
    let path = copy.bytes.clone();
    let manifest = crate::uif::blocking(move || {
        uve_protocol::chunker::chunk_file(&path).map_err(|e| UifError::at("chunk", &path, e))
    })
    .await
    .map_err(uif_err(&copy.user))?;
    let begin = uve_protocol::message::UpdateBegin {
        user: copy.user.clone(),
        session: copy.session.clone(),
        base: None,
        lease: 0,
        header: manifest.header,
        cause: UpdateCause::Spooled,
    };
    let outcome = crate::uif::update::upload(&c.link, &copy.bytes, &manifest, begin, None)
        .await
        .map_err(uif_err(&copy.user))?;
    let outcome = match outcome {
        crate::uif::update::UpdateOutcome::Committed(v) => FlushOutcome::Committed(v),
        crate::uif::update::UpdateOutcome::Conflict { kept_as, head } => {
            FlushOutcome::Conflict { kept_as, head }
        }
    };
    tracing::info!(user = %copy.user, id, "preserved copy pushed: {outcome}");
    if !keep {
        let (preserved, id) = (agent.preserved.clone(), id.to_string());
        crate::uif::blocking(move || {
            preserved
                .remove(&id)
                .map_err(|e| UifError::io(format!("remove preserved copy {id}"), e))
        })
        .await
        .map_err(uif_err(&copy.user))?;
    }
    Ok(outcome)
}

/// VM switch: ends every session of `user` and flushes their UIF with
/// cause `Release`. Returns the committed version, if any.
pub async fn release(agent: &Arc<Agent>, user: &str) -> Option<Version> {
    let lock = agent.user_lock(user);
    let _guard = lock.lock().await;
    let sessions = agent.snapshot().sessions_of(user);
    for s in &sessions {
        crate::supervise::stop(agent, s).await;
    }
    agent.with_table(|t| {
        for s in &sessions {
            t.sessions.remove(s);
        }
    });
    let session = sessions
        .first()
        .cloned()
        .unwrap_or_else(|| "release".into());
    // Older updates of the user still in the spool go first, in order.
    let spooled = match agent.conn.current() {
        Some(c) => deliver_user_spool(agent, &c, user).await,
        None => None,
    };
    let outcome = match flush_user(agent, user, &session, UpdateCause::Release, false).await {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(user, "release flush failed: {e}");
            return None;
        }
    };
    announce_end(agent, &sessions).await;
    tracing::info!(user, "released: {outcome}");
    match outcome {
        FlushOutcome::Committed(v) => Some(v),
        FlushOutcome::Nothing(_) | FlushOutcome::Unchanged(_) => spooled,
        _ => None,
    }
}

/// At startup: if the session table was written during another boot of
/// the VM (crash, power loss, reboot), its sessions are gone. Each is
/// reported as an unexpected disconnect and each attached UIF (still on
/// disk) is flushed with cause `Disconnect`, in the background.
pub fn recover_after_reboot(agent: &Arc<Agent>) {
    let Some(now) = fsutil::kernel_boot() else {
        return;
    };
    let before = agent.snapshot();
    agent.with_table(|t| t.kernel_boot = Some(now.clone()));
    match &before.kernel_boot {
        Some(b) if *b != now => {}
        _ => return,
    }
    tracing::warn!(
        sessions = before.sessions.len(),
        "the VM restarted since the sessions were recorded; reporting them as disconnected"
    );
    for s in before.sessions.values() {
        let notice = DisconnectNotice {
            id: fsutil::random_u64(),
            session: s.session.clone(),
            user: s.user.clone(),
            ua: s.ua.clone(),
            reason: "the VM restarted; session lost".into(),
            at: fsutil::now_ms(),
        };
        if let Err(e) = agent.notices.add(&notice) {
            tracing::error!(session = %s.session, "cannot journal disconnect notice: {e}");
        }
    }
    agent.with_table(|t| t.sessions.clear());
    agent.kick.notify_one();
    for user in before.uifs.keys() {
        let session = before
            .sessions_of(user)
            .first()
            .cloned()
            .unwrap_or_else(|| "reboot".into());
        let user = user.clone();
        let agent = agent.clone();
        tokio::spawn(async move {
            let lock = agent.user_lock(&user);
            let _guard = lock.lock().await;
            match flush_user(&agent, &user, &session, UpdateCause::Disconnect, false).await {
                Ok(o) => tracing::info!(user, "UIF from before the restart: {o}"),
                Err(e) => tracing::error!(user, "UIF from before the restart: {e}"),
            }
        });
    }
}

/// Agent shutdown: flushes every attached UIF (cause `Shutdown`) without
/// detaching it; updates the host cannot take stay in the spool. Sessions
/// stay recorded: after an agent restart they continue (their UAs are
/// adopted); after a VM restart [`recover_after_reboot`] ends them.
pub async fn shutdown(agent: &Arc<Agent>) {
    let users: Vec<String> = agent.snapshot().uifs.keys().cloned().collect();
    for user in users {
        let lock = agent.user_lock(&user);
        let _guard = lock.lock().await;
        let session = agent
            .snapshot()
            .sessions_of(&user)
            .first()
            .cloned()
            .unwrap_or_else(|| "shutdown".into());
        match flush_user(agent, &user, &session, UpdateCause::Shutdown, true).await {
            Ok(o) => tracing::info!(user, "shutdown flush: {o}"),
            Err(e) => tracing::error!(user, "shutdown flush failed: {e}"),
        }
    }
}

/// Journals `SessionEnded` for `sessions` and tries to deliver it now; the
/// outbox retries whatever is left after a reconnect.
async fn announce_end(agent: &Agent, sessions: &[String]) {
    if sessions.is_empty() {
        return;
    }
    agent.with_table(|t| t.ended_unsent.extend(sessions.iter().cloned()));
    if let Some(c) = agent.conn.current() {
        deliver_ended(agent, &c).await;
    }
}

/// Sends every journalled `SessionEnded`; stops at the first failure.
pub async fn deliver_ended(agent: &Agent, c: &Connected) {
    let pending = agent.snapshot().ended_unsent;
    for session in pending {
        let req = Request::SessionEnded {
            session: session.clone(),
        };
        match c.link.request_timeout(req, Duration::from_secs(10)).await {
            Ok(_) | Err(uve_protocol::link::LinkError::Remote(_)) => {
                agent.with_table(|t| t.ended_unsent.retain(|s| *s != session));
            }
            Err(e) => {
                tracing::warn!(session, "SessionEnded not delivered yet: {e}");
                return;
            }
        }
    }
}

/// Periodic checkpoint: uploads every attached UIF without detaching it.
pub async fn checkpoint(agent: &Arc<Agent>) {
    let users: Vec<String> = agent.snapshot().uifs.keys().cloned().collect();
    for user in users {
        let lock = agent.user_lock(&user);
        let _guard = lock.lock().await;
        let session = agent
            .snapshot()
            .sessions_of(&user)
            .first()
            .cloned()
            .unwrap_or_else(|| "checkpoint".into());
        match flush_user(agent, &user, &session, UpdateCause::Checkpoint, true).await {
            Ok(o) => tracing::info!(user, "checkpoint: {o}"),
            Err(e) => tracing::warn!(user, "checkpoint failed: {e}"),
        }
    }
}

fn session_user(agent: &Agent, session: &str) -> Result<String, LifecycleError> {
    agent
        .snapshot()
        .sessions
        .get(session)
        .map(|s| s.user.clone())
        .ok_or_else(|| LifecycleError::NoSuchSession(session.into()))
}

/// Removes `session`; flushes the user's UIF if it was their last one.
async fn end_session(
    agent: &Arc<Agent>,
    user: &str,
    session: &str,
    cause: UpdateCause,
) -> Result<FlushOutcome, LifecycleError> {
    let others = agent.with_table(|t| {
        t.sessions.remove(session);
        t.sessions_of(user).len()
    });
    if others > 0 {
        return Ok(FlushOutcome::Nothing(format!(
            "{user} has {others} other open session(s)"
        )));
    }
    flush_user(agent, user, session, cause, false).await
}
