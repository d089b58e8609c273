//! The end of a session: logout, unexpected disconnect, VM switch
//! release; each flushes the user's UIF when their last session ends and
//! journals `SessionEnded`.

use uve_protocol::message::{DisconnectNotice, UpdateCause, Version};
use uve_protocol::names::{SessionId, UserName};

use super::{Lifecycle, LifecycleError};
use crate::base::fsutil;
use crate::flush::FlushOutcome;
use crate::stores::session::{NotDurable, UserGuard};

impl Lifecycle {
    /// Ends a session by logout: stops its UA, flushes the UIF if it was
    /// the user's last session, announces the end.
    pub async fn logout(&self, session: &SessionId) -> Result<Ended, LifecycleError> {
        let user = self.session_user(session)?;
        let guard = self.locks.lock(&user).await;
        self.session_user(session)?;
        self.supervisor.stop(session).await;
        let ended = self
            .end_session(&guard, session, UpdateCause::Logout)
            .await?;
        self.announce_end(&guard, std::slice::from_ref(session))
            .await;
        tracing::info!(%user, %session, "logout: {ended}");
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
        match outcome {
            FlushOutcome::Committed(v) => Some(v),
            FlushOutcome::Nothing(_) | FlushOutcome::Unchanged(_) => spooled,
            _ => None,
        }
    }

    /// Journals `SessionEnded` for `sessions` and tries to deliver it now;
    /// the outbox retries whatever is left after a reconnect.
    async fn announce_end(&self, guard: &UserGuard, sessions: &[SessionId]) {
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
    ) -> Result<Ended, LifecycleError> {
        let user = guard.user();
        // A table that cannot be written does not keep the user's work
        // from the host: the flush runs all the same, and the error is
        // reported beside its outcome.
        let (others, table) = match self.table.end(guard, session).await {
            Ok(n) => (n, None),
            Err(e) => (self.table.sessions_of(user).len(), Some(e)),
        };
        let outcome = if others > 0 {
            FlushOutcome::Nothing(format!("{user} has {others} other open session(s)"))
        } else {
            self.flusher.flush(guard, session, cause, false).await?
        };
        Ok(Ended { outcome, table })
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
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.outcome)?;
        if let Some(e) = &self.table {
            write!(f, "; WARNING: {e}; it is repaired at the next start")?;
        }
        Ok(())
    }
}
