//! Session lifecycles: login (retrieve + attach + optional supervised UA),
//! logout, unexpected disconnect, VM switch release; and in
//! [`maintain`] the ones the agent starts itself: periodic checkpoint,
//! shutdown, recovery after a VM restart, a UA's unexpected exit, the
//! push of a preserved copy. The flush they share is [`crate::flush`].
//! Every lifecycle of a user runs under that user's lock.

mod maintain;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::task::TaskTracker;
use uve_protocol::message::{DisconnectNotice, Request, UpdateCause, Version};
use uve_protocol::names::{NameError, SessionId, UaName, UserName};

use crate::base::fsutil;
use crate::config::{Config, RetrieveFailure, SharedConfig};
use crate::flush::{FlushError, FlushOutcome, Flusher};
use crate::link::LinkWatch;
use crate::stores::cache;
use crate::stores::notices::Journal;
use crate::stores::session::{SessionRecord, SessionTable, UifRecord, UserGuard, UserLocks};
use crate::stores::ua::UaStore;
use crate::supervise::Supervisor;
use crate::uif::{UifError, blocking, materialise, retrieve};

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
    /// The flush failed before anything was journalled.
    #[error(transparent)]
    Flush(#[from] FlushError),
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

/// The parts the lifecycles work with.
pub struct Lifecycle {
    /// The configuration in force.
    pub config: Arc<SharedConfig>,
    /// The state directory.
    pub state_dir: PathBuf,
    /// Sessions and attached UIFs.
    pub table: Arc<SessionTable>,
    /// The per-user locks.
    pub locks: Arc<UserLocks>,
    /// The flush, and through it the spool and the preserved copies.
    pub flusher: Arc<Flusher>,
    /// Supervised UAs.
    pub supervisor: Arc<Supervisor>,
    /// Deployed UAs.
    pub uas: Arc<UaStore>,
    /// Pending disconnect notices.
    pub notices: Journal,
    /// The host connection.
    pub link: Arc<LinkWatch>,
    /// Wakes the outbox.
    pub kick: Arc<Notify>,
    /// Background work (flushes after a VM restart), joined at shutdown.
    pub tasks: TaskTracker,
}

impl Lifecycle {
    /// Opens a session: retrieves and attaches the user's UIF unless
    /// another session of the user already has it, starts the UA if
    /// asked, announces the session. Returns a human-readable summary.
    pub async fn login(
        &self,
        user: &UserName,
        session: &SessionId,
        ua: Option<&UaName>,
    ) -> Result<String, LifecycleError> {
        if let Some(ua) = ua
            && self.uas.current(ua).is_none()
        {
            return Err(LifecycleError::UaNotDeployed(ua.to_string()));
        }
        let guard = self.locks.lock(user).await;
        if let Some(existing) = self.table.session(session) {
            return if existing.user == *user {
                Ok(format!("session {session} is already open"))
            } else {
                Err(LifecycleError::SessionTaken(session.to_string()))
            };
        }
        let mut summary = self.attach(&guard, session).await?;
        let record = SessionRecord {
            session: session.clone(),
            user: user.clone(),
            ua: ua.cloned(),
            started: fsutil::now_ms(),
            ua_process: None,
        };
        self.table.open(record.clone()).await;
        if let Some(ua) = ua
            && let Err(e) = self.start_ua(&record, ua).await
        {
            drop(guard);
            let _ = self.logout(session).await;
            return Err(e);
        }
        self.announce_start(&record).await;
        summary.push_str(&self.preserved_note(user));
        tracing::info!(%user, %session, "login: {summary}");
        Ok(summary)
    }

    /// Attaches the user's UIF unless it already is; returns the summary.
    async fn attach(
        &self,
        guard: &UserGuard,
        session: &SessionId,
    ) -> Result<String, LifecycleError> {
        let user = guard.user();
        if self.table.uif(user).is_some() {
            return Ok(format!("UIF of {user} already attached"));
        }
        let cfg = self.config.get();
        let (rec, summary) = self.obtain_uif(guard, &cfg, session).await?;
        materialise::attach(&cfg, user, session, rec.temporary)
            .await
            .map_err(uif_err(user))?;
        self.table.attach(guard, rec).await;
        Ok(summary)
    }

    async fn start_ua(&self, record: &SessionRecord, ua: &UaName) -> Result<(), LifecycleError> {
        let socket = self.config.get().control_socket.clone();
        let started = self.supervisor.start(&self.uas, &socket, record, ua)?;
        if let Some(start) = started.start {
            self.table
                .set_ua_process(&record.session, started.pid, start)
                .await;
        }
        Ok(())
    }

    async fn announce_start(&self, record: &SessionRecord) {
        if let Some(c) = self.link.current() {
            let req = Request::SessionStarted {
                session: record.session.clone(),
                user: record.user.clone(),
                ua: record.ua.clone(),
            };
            if let Err(e) = c.link.request(req).await {
                tracing::warn!(
                    session = %record.session,
                    "SessionStarted not delivered (re-announced later): {e}"
                );
            }
        }
    }

    /// What the login says about preserved copies of `user` ("" if none).
    fn preserved_note(&self, user: &str) -> String {
        let preserved = self.flusher.preserved.for_user(user);
        if preserved.is_empty() {
            return String::new();
        }
        let lines: Vec<String> = preserved.iter().map(|c| c.describe()).collect();
        format!(
            "; NOTE: {} earlier update(s) of {user} were refused by the host and are preserved on this VM (root: `uve-agent preserved list`): {}",
            preserved.len(),
            lines.join("; ")
        )
    }

    /// Retrieves the user's UIF (delivering any pending update of theirs
    /// first), or falls back to an empty temporary UIF if configured.
    async fn obtain_uif(
        &self,
        guard: &UserGuard,
        cfg: &Config,
        session: &SessionId,
    ) -> Result<(UifRecord, String), LifecycleError> {
        let user = guard.user();
        let dest = cfg.uif_path(user);
        match self.retrieve(guard, cfg, session, &dest).await? {
            Ok(r) => {
                let summary = match r.base {
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
                let rec = UifRecord {
                    base: r.base,
                    lease: r.lease,
                    temporary: false,
                    base_digest: Some(r.digest),
                };
                Ok((rec, summary))
            }
            Err(e)
                if cfg.on_retrieve_failure == RetrieveFailure::Temporary
                    && self.flusher.spool.for_user(user).is_empty() =>
            {
                tracing::error!(%user, "retrieve failed, continuing on a temporary UIF: {e}");
                let (d2, state_dir, u2) = (dest.clone(), self.state_dir.clone(), user.to_string());
                blocking(move || {
                    retrieve::write_empty(&d2)?;
                    cache::forget(&state_dir, &u2);
                    Ok(())
                })
                .await
                .map_err(uif_err(user))?;
                let rec = UifRecord {
                    base: None,
                    lease: 0,
                    temporary: true,
                    base_digest: None,
                };
                Ok((
                    rec,
                    format!("retrieve failed ({e}); running on an empty TEMPORARY UIF"),
                ))
            }
            Err(e) => Err(uif_err(user)(e)),
        }
    }

    /// Retrieves into `dest`. A connection that drops (or a busy host)
    /// during the login is retried until the login timeout, so a host
    /// restart does not fail logins. The outer error: an earlier update
    /// of the user is still pending (nothing may overwrite its file).
    async fn retrieve(
        &self,
        guard: &UserGuard,
        cfg: &Config,
        session: &SessionId,
        dest: &std::path::Path,
    ) -> Result<Result<retrieve::Retrieved, UifError>, LifecycleError> {
        let user = guard.user();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(cfg.login_timeout_secs);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(c) = self.link.wait(left).await else {
                return Ok(Err(UifError::NotConnected));
            };
            let _ = self.flusher.deliver_user_spool(guard, &c).await;
            let retry_possible = tokio::time::Instant::now() + RETRY_PAUSE < deadline;
            if !self.flusher.spool.for_user(user).is_empty() {
                if c.link.is_closed() && retry_possible {
                    tokio::time::sleep(RETRY_PAUSE).await;
                    continue;
                }
                return Err(LifecycleError::PendingUpdate(user.to_string()));
            }
            let parallel = cfg
                .fetch_parallel
                .min(
                    usize::try_from(c.welcome.limits.max_inflight)
                        .unwrap_or(1)
                        .saturating_sub(2),
                )
                .max(1);
            let got =
                retrieve::retrieve(&c.link, &self.state_dir, user, session, dest, parallel).await;
            match got {
                Err(e) if e.is_transient() && retry_possible => {
                    tracing::warn!(%user, "retrieve interrupted, retrying: {e}");
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                other => return Ok(other),
            }
        }
    }

    /// Ends a session by logout: stops its UA, flushes the UIF if it was
    /// the user's last session, announces the end.
    pub async fn logout(&self, session: &SessionId) -> Result<FlushOutcome, LifecycleError> {
        let user = self.session_user(session)?;
        let guard = self.locks.lock(&user).await;
        self.session_user(session)?;
        self.supervisor.stop(session).await;
        let outcome = self
            .end_session(&guard, session, UpdateCause::Logout)
            .await?;
        self.announce_end(std::slice::from_ref(session)).await;
        tracing::info!(%user, %session, "logout: {outcome}");
        Ok(outcome)
    }

    /// Ends a session unexpectedly (UA died, or the `disconnect` verb):
    /// journals a disconnect notice for the host, then flushes the UIF.
    pub async fn disconnect(
        &self,
        session: &SessionId,
        reason: &str,
    ) -> Result<FlushOutcome, LifecycleError> {
        let user = self.session_user(session)?;
        let guard = self.locks.lock(&user).await;
        let ua = self
            .table
            .session(session)
            .ok_or_else(|| LifecycleError::NoSuchSession(session.to_string()))?
            .ua;
        let notice = DisconnectNotice {
            id: fsutil::random_u64(),
            session: session.clone(),
            user: user.clone(),
            ua,
            reason: uve_protocol::defs::clip_text(reason).to_string(),
            at: fsutil::now_ms(),
        };
        self.notices
            .add(&notice)
            .await
            .map_err(LifecycleError::Journal)?;
        self.kick.notify_one();
        self.supervisor.stop(session).await;
        let outcome = self
            .end_session(&guard, session, UpdateCause::Disconnect)
            .await?;
        tracing::warn!(%user, %session, reason, "unexpected disconnect: {outcome}");
        Ok(outcome)
    }

    /// VM switch: ends every session of `user` and flushes their UIF with
    /// cause `Release`. Returns the committed version, if any.
    pub async fn release(&self, user: &UserName) -> Option<Version> {
        let guard = self.locks.lock(user).await;
        let sessions = self.table.sessions_of(user);
        for s in &sessions {
            self.supervisor.stop(s).await;
            self.table.end(user, s).await;
        }
        let session = sessions
            .first()
            .cloned()
            .unwrap_or_else(|| SessionId::literal("release"));
        // Older updates of the user still in the spool go first, in order.
        let spooled = match self.link.current() {
            Some(c) => self.flusher.deliver_user_spool(&guard, &c).await,
            None => None,
        };
        let flushed = self
            .flusher
            .flush(&guard, &session, UpdateCause::Release, false)
            .await;
        let outcome = match flushed {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(%user, "release flush failed: {e}");
                return None;
            }
        };
        self.announce_end(&sessions).await;
        tracing::info!(%user, "released: {outcome}");
        match outcome {
            FlushOutcome::Committed(v) => Some(v),
            FlushOutcome::Nothing(_) | FlushOutcome::Unchanged(_) => spooled,
            _ => None,
        }
    }

    /// Journals `SessionEnded` for `sessions` and tries to deliver it now;
    /// the outbox retries whatever is left after a reconnect.
    async fn announce_end(&self, sessions: &[SessionId]) {
        if sessions.is_empty() {
            return;
        }
        self.table.mark_ended(sessions).await;
        if let Some(c) = self.link.current() {
            self.deliver_ended(&c).await;
        }
    }

    fn session_user(&self, session: &str) -> Result<UserName, LifecycleError> {
        self.table
            .session(session)
            .map(|s| s.user)
            .ok_or_else(|| LifecycleError::NoSuchSession(session.into()))
    }

    /// Removes `session`; flushes the user's UIF if it was their last one.
    async fn end_session(
        &self,
        guard: &UserGuard,
        session: &SessionId,
        cause: UpdateCause,
    ) -> Result<FlushOutcome, LifecycleError> {
        let user = guard.user();
        let others = self.table.end(user, session).await;
        if others > 0 {
            return Ok(FlushOutcome::Nothing(format!(
                "{user} has {others} other open session(s)"
            )));
        }
        Ok(self.flusher.flush(guard, session, cause, false).await?)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use uve_protocol::message::Request;

    use super::*;
    use crate::testing::{COMMITTED, Rig, name};

    #[tokio::test]
    async fn login_then_logout_commits_and_announces_both() {
        let rig = Rig::new();
        let lc = &rig.lifecycle;
        let said = lc.login(&name("eve"), &name("e1"), None).await.unwrap();
        assert_eq!(said, "new user: empty UIF");
        assert_eq!(std::fs::read(rig.uif("eve")).unwrap(), b"");
        assert!(lc.table.session("e1").is_some() && lc.table.uif("eve").is_some());
        let again = lc.login(&name("eve"), &name("e1"), None).await.unwrap();
        assert!(again.contains("already open"), "{again}");
        assert!(matches!(
            lc.login(&name("fay"), &name("e1"), None).await,
            Err(LifecycleError::SessionTaken(_))
        ));
        std::fs::write(rig.uif("eve"), b"eve's notes").unwrap();
        let out = lc.logout(&name("e1")).await.unwrap();
        assert_eq!(out, FlushOutcome::Committed(COMMITTED));
        assert!(lc.table.session("e1").is_none() && lc.table.uif("eve").is_none());
        assert_eq!(
            rig.count(|r| matches!(r, Request::SessionStarted { .. })),
            1
        );
        assert_eq!(rig.count(|r| matches!(r, Request::SessionEnded { .. })), 1);
        assert!(lc.table.ended_unsent().is_empty(), "acknowledged");
    }

    #[tokio::test]
    async fn the_last_session_of_a_user_flushes_and_a_disconnect_is_journalled() {
        let rig = Rig::new();
        let lc = &rig.lifecycle;
        lc.login(&name("gus"), &name("g1"), None).await.unwrap();
        let second = lc.login(&name("gus"), &name("g2"), None).await.unwrap();
        assert!(second.contains("already attached"), "{second}");
        std::fs::write(rig.uif("gus"), b"gus").unwrap();
        let first = lc.logout(&name("g1")).await.unwrap();
        assert!(matches!(first, FlushOutcome::Nothing(_)), "{first:?}");
        let out = lc.disconnect(&name("g2"), "display died").await.unwrap();
        assert_eq!(out, FlushOutcome::Committed(COMMITTED));
        let notices = lc.notices.list();
        assert_eq!(notices.len(), 1);
        assert_eq!(notices[0].session, "g2");
        assert_eq!(notices[0].reason, "display died");
    }

    #[tokio::test]
    async fn a_login_fails_while_an_earlier_update_of_the_user_is_pending() {
        let rig = Rig::new();
        let lc = &rig.lifecycle;
        lc.login(&name("hal"), &name("h1"), None).await.unwrap();
        std::fs::write(rig.uif("hal"), b"hal's work").unwrap();
        rig.host.lock().unwrap().refuse_updates = Some(uve_protocol::ErrorCode::Busy);
        let out = lc.logout(&name("h1")).await.unwrap();
        assert!(matches!(out, FlushOutcome::Spooled(_)), "{out:?}");
        let err = lc.login(&name("hal"), &name("h2"), None).await.unwrap_err();
        assert!(matches!(err, LifecycleError::PendingUpdate(_)), "{err}");
        assert_eq!(std::fs::read(rig.uif("hal")).unwrap(), b"hal's work");
        rig.host.lock().unwrap().refuse_updates = None;
        let said = lc.login(&name("hal"), &name("h3"), None).await.unwrap();
        assert!(said.contains("new user"), "{said}");
    }

    #[tokio::test]
    async fn a_checkpoint_commits_while_the_uif_stays_attached() {
        let rig = Rig::new();
        let lc = &rig.lifecycle;
        lc.login(&name("ivy"), &name("i1"), None).await.unwrap();
        std::fs::write(rig.uif("ivy"), b"ivy, mid-session").unwrap();
        lc.checkpoint().await;
        let rec = lc.table.uif("ivy").unwrap();
        assert_eq!(rec.base, Some(COMMITTED), "rebased on the checkpoint");
        assert_eq!(
            lc.flusher.spool.count(),
            0,
            "a live checkpoint is not spooled"
        );
        // Nothing changed since: the logout uploads nothing.
        let out = lc.logout(&name("i1")).await.unwrap();
        assert_eq!(out, FlushOutcome::Unchanged(Some(COMMITTED)));
    }
}
