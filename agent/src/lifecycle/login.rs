//! Login: retrieve (after delivering any pending update of the user),
//! attach, record the session, start its UA if asked, announce it.

use std::time::Duration;

use uve_protocol::message::Request;
use uve_protocol::names::{SessionId, UaName, UserName};

use super::{Lifecycle, LifecycleError, uif_err};
use crate::base::fsutil;
use crate::config::{Config, RetrieveFailure};
use crate::stores::cache;
use crate::stores::session::{SessionRecord, UaProcess, UifRecord, UserGuard};
use crate::uif::{UifError, blocking, materialise, retrieve};

/// Pause before retrying an interrupted retrieve.
const RETRY_PAUSE: Duration = Duration::from_millis(300);

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
        let attached_now = self.table.uif(user).is_none();
        let mut summary = self.attach(&guard, session).await?;
        let record = SessionRecord {
            session: session.clone(),
            user: user.clone(),
            ua: ua.cloned(),
            started: fsutil::now_ms(),
            ua_process: None,
        };
        if let Err(e) = self.table.open(&guard, record.clone()).await {
            // Nothing of this login is left recorded: the session is not
            // open, and a UIF it attached is not (its files stay where
            // they are; the next login retrieves again).
            let _ = self.table.end(&guard, session).await;
            if attached_now {
                let _ = self.table.detach(&guard).await;
            }
            return Err(e.into());
        }
        if let Some(ua) = ua
            && let Err(e) = self.start_ua(&guard, &record, ua).await
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
        if let Err(e) = self.table.attach(guard, rec).await {
            // Not recorded as attached, in memory either: the login fails.
            let _ = self.table.detach(guard).await;
            return Err(e.into());
        }
        Ok(summary)
    }

    async fn start_ua(
        &self,
        guard: &UserGuard,
        record: &SessionRecord,
        ua: &UaName,
    ) -> Result<(), LifecycleError> {
        let socket = self.config.get().control_socket.clone();
        let started = self.supervisor.start(&self.uas, &socket, record, ua)?;
        if let Some(start) = started.start {
            let process = UaProcess {
                pid: started.pid,
                start,
            };
            if self
                .table
                .set_ua_process(guard, &record.session, process)
                .await
                .is_err()
            {
                tracing::warn!(session = %record.session, "the UA runs and is supervised, but an agent restarted before the table is written cannot watch it");
            }
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
        let preserved = self.flusher.preserved().for_user(user);
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
                    && self.flusher.spooled_for(user) == 0 =>
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
            if self.flusher.spooled_for(user) > 0 {
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
}
