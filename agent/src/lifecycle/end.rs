//! The end of a session: logout, unexpected disconnect, VM switch
//! release; each flushes the user's UIF when their last session ends and
//! journals `SessionEnded`.

use uve_protocol::message::{DisconnectNotice, UpdateCause, Version};
use uve_protocol::names::{SessionId, UserName};

use super::{Lifecycle, LifecycleError};
use crate::base::fsutil;
use crate::flush::FlushOutcome;
use crate::uif::{UifError, blocking};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::PoisonError;

use crate::stores::session::{NotDurable, UserGuard};

impl Lifecycle {
    /// Ends a session by logout: stops its UA, flushes the UIF if it was
    /// the user's last session, announces the end.
    ///
    /// A logout of a session that an earlier logout (or one a restarted
    /// agent finished) has ended reports that logout's outcome.
    pub async fn logout(&self, session: &SessionId) -> Result<Ended, LifecycleError> {
        let user = match self.session_user(session) {
            Ok(u) => u,
            Err(e) => return self.earlier_end(session).ok_or(e),
        };
        let guard = self.locks.lock(&user).await;
        if let Err(e) = self.session_user(session) {
            // Another logout of it finished while this one waited.
            return self.earlier_end(session).ok_or(e);
        }
        self.supervisor.stop(session).await;
        let ended = self
            .end_session(&guard, session, UpdateCause::Logout)
            .await?;
        self.announce_end(&guard, std::slice::from_ref(session))
            .await;
        tracing::info!(%user, %session, "logout: {ended}");
        self.keep_cache_in_budget().await;
        Ok(ended)
    }

    /// Ends a session unexpectedly (UA died, or the `disconnect` verb):
    /// journals a disconnect notice for the host, then flushes the UIF.
    pub async fn disconnect(
        &self,
        session: &SessionId,
        reason: &str,
    ) -> Result<Ended, LifecycleError> {
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
        let ended = self
            .end_session(&guard, session, UpdateCause::Disconnect)
            .await?;
        tracing::warn!(%user, %session, reason, "unexpected disconnect: {ended}");
        self.keep_cache_in_budget().await;
        Ok(ended)
    }

    /// VM switch: ends every session of `user` and flushes their UIF with
    /// cause `Release`. Returns the committed version, if any.
    pub async fn release(&self, user: &UserName) -> Option<Version> {
        let guard = self.locks.lock(user).await;
        let sessions = self.table.sessions_of(user);
        for s in &sessions {
            self.supervisor.stop(s).await;
            // Not durable: the flush below still runs; a restart repairs.
            let _ = self.table.end(&guard, s).await;
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
        self.announce_end(&guard, &sessions).await;
        tracing::info!(%user, "released: {outcome}");
        self.keep_cache_in_budget().await;
        match outcome {
            FlushOutcome::Committed(v) => Some(v),
            FlushOutcome::Nothing(_) | FlushOutcome::Unchanged(_) => spooled,
            _ => None,
        }
    }

    /// Journals `SessionEnded` for `sessions` and tries to deliver it now;
    /// the outbox retries whatever is left after a reconnect.
    pub(super) async fn announce_end(&self, guard: &UserGuard, sessions: &[SessionId]) {
        if sessions.is_empty() {
            return;
        }
        // Not durable: the ends are still delivered now, from memory; a
        // restart before that re-announces nothing, and the host closes
        // the VM's sessions when it sees the VM again.
        let _ = self.table.mark_ended(guard, sessions).await;
        if let Some(c) = self.link.current() {
            self.deliver_ended(&c).await;
        }
    }

    /// After a session's end: the working copies of users not logged in
    /// here back within the cache budget (see [`super::room`]).
    async fn keep_cache_in_budget(&self) {
        if let Err(e) = self.trim_cache().await {
            tracing::warn!("cannot trim the working copies to the cache budget: {e}");
        }
    }

    fn session_user(&self, session: &str) -> Result<UserName, LifecycleError> {
        self.table
            .session(session)
            .map(|s| s.user)
            .ok_or_else(|| LifecycleError::NoSuchSession(session.into()))
    }

    /// Removes `session`; flushes the user's UIF if it was their last one.
    pub(super) async fn end_session(
        &self,
        guard: &UserGuard,
        session: &SessionId,
        cause: UpdateCause,
    ) -> Result<Ended, LifecycleError> {
        let user = guard.user();
        let others = self
            .table
            .sessions_of(user)
            .iter()
            .filter(|s| *s != session)
            .count();
        // A table that cannot be written does not keep the user's work
        // from the host: the flush runs all the same, and the error is
        // reported beside its outcome.
        if others > 0 {
            let table = self.table.end(guard, session).await.err();
            let outcome =
                FlushOutcome::Nothing(format!("{user} has {others} other open session(s)"));
            return Ok(self.remember_end(session, outcome, table).await);
        }
        // The session ends only once its UIF is committed, spooled or
        // preserved; until then it is marked ending, and a restarted agent
        // finishes the logout (`recover_at_start`).
        let marked = self.table.mark_ending(guard, session).await.err();
        crate::base::fault::crash_at("logout-ending");
        let outcome = match self.flusher.flush(guard, session, cause, false).await? {
            // Detached already, its update spooled (an agent that died
            // after journalling it): that update is this logout's work.
            FlushOutcome::Nothing(_) if self.flusher.spooled_for(user) > 0 => {
                self.deliver_spooled_now(guard).await
            }
            other => other,
        };
        let table = self.table.end(guard, session).await.err().or(marked);
        Ok(self.remember_end(session, outcome, table).await)
    }

    /// Delivers the spooled updates of `guard`'s user now (waiting a
    /// little for the host after a restart); what became of them.
    async fn deliver_spooled_now(&self, guard: &UserGuard) -> FlushOutcome {
        let user = guard.user();
        if let Some(c) = self.link.wait(crate::flush::FLUSH_CONNECT_WAIT).await
            && let Some(v) = self.flusher.deliver_user_spool(guard, &c).await
            && self.flusher.spooled_for(user) == 0
        {
            return FlushOutcome::Committed(v);
        }
        FlushOutcome::Spooled(format!(
            "an update of {user} is spooled; delivered when the host takes it"
        ))
    }

    /// Keeps the outcome of `session`'s end for a retried logout of it
    /// ([`RECENT_ENDS`] at most, also on disk: a retry may come after an
    /// agent restart), and returns it.
    async fn remember_end(
        &self,
        session: &SessionId,
        outcome: FlushOutcome,
        table: Option<NotDurable>,
    ) -> Ended {
        let writing = self.ends_written.lock().await;
        let snapshot = {
            let mut recent = self
                .recent_ends
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if recent.len() >= RECENT_ENDS {
                recent.pop_front();
            }
            recent.push_back((session.clone(), outcome.clone()));
            RecentEnds {
                boot: fsutil::kernel_boot(),
                ends: recent.clone(),
            }
        };
        let path = recent_ends_path(&self.state_dir);
        let written = blocking(move || {
            fsutil::write_json(&path, &snapshot).map_err(|e| UifError::at("write", &path, e))
        })
        .await;
        drop(writing);
        if let Err(e) = written {
            // The outcome stands; only a retry after a restart would not
            // find it.
            tracing::warn!(%session, "the end is remembered in memory only: {e}");
        }
        Ended {
            outcome,
            table,
            earlier: false,
        }
    }

    /// How an earlier logout ended `session`, if one did since the agent
    /// started.
    fn earlier_end(&self, session: &str) -> Option<Ended> {
        let recent = self
            .recent_ends
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        recent
            .iter()
            .rev()
            .find(|(s, _)| s.as_str() == session)
            .map(|(_, outcome)| Ended {
                outcome: outcome.clone(),
                table: None,
                earlier: true,
            })
    }
}

/// How a session ended: what became of the user's bytes, and a session
/// table write that failed on the way (the change holds in memory; what a
/// restart finds of it is repaired then).
#[derive(Debug)]
pub struct Ended {
    /// The flush's outcome.
    pub outcome: FlushOutcome,
    /// The table error, if its write failed.
    pub table: Option<NotDurable>,
    /// An earlier end of the session (a logout, a disconnect, or one a
    /// restarted agent finished) ended it; this is its outcome.
    pub earlier: bool,
}

/// Ends of sessions remembered for retried logouts.
pub const RECENT_ENDS: usize = 256;

/// Where the latest ends are kept across restarts.
fn recent_ends_path(state_dir: &Path) -> PathBuf {
    state_dir.join("recent-ends.json")
}

/// The file of the latest ends: of this boot only (session ids may come
/// again after a reboot).
#[derive(serde::Serialize, serde::Deserialize)]
struct RecentEnds {
    boot: Option<String>,
    ends: VecDeque<(SessionId, FlushOutcome)>,
}

/// The latest ends an earlier agent process of this boot recorded (none
/// when the file is missing, of another boot, or unreadable: then a
/// retried logout of one of them says `no open session`, and its outcome
/// stands as it was).
pub(super) fn load_recent_ends(state_dir: &Path) -> VecDeque<(SessionId, FlushOutcome)> {
    let path = recent_ends_path(state_dir);
    match fsutil::read_json::<RecentEnds>(&path) {
        Ok(Some(file)) if file.boot.is_some() && file.boot == fsutil::kernel_boot() => {
            let mut ends = file.ends;
            while ends.len() > RECENT_ENDS {
                ends.pop_front();
            }
            ends
        }
        Ok(_) => VecDeque::new(),
        Err(e) => {
            tracing::warn!(path = %path.display(), "ignoring the recorded session ends: {e}");
            VecDeque::new()
        }
    }
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.earlier {
            f.write_str("already ended earlier: ")?;
        }
        write!(f, "{}", self.outcome)?;
        if let Some(e) = &self.table {
            write!(f, "; WARNING: {e}; it is repaired at the next start")?;
        }
        Ok(())
    }
}
