//! The lifecycles the agent starts itself: periodic checkpoints, the
//! shutdown flush, recovery after a VM restart, a UA's unexpected exit,
//! delivering journalled "session ended" notices, and pushing a preserved
//! copy back to the host.

use std::time::Duration;

use uve_protocol::message::{DisconnectNotice, Request, UpdateBegin, UpdateCause};
use uve_protocol::names::SessionId;

use super::{Lifecycle, LifecycleError, uif_err};
use crate::base::fsutil;
use crate::flush::FlushOutcome;
use crate::link::Connected;
use crate::supervise::UaExited;
use crate::uif::update::{self, UpdateOutcome};
use crate::uif::{UifError, blocking};

impl Lifecycle {
    /// Flushes every attached UIF with `cause` without detaching it.
    async fn flush_attached(&self, cause: UpdateCause, fallback_session: &'static str) {
        for user in self.table.attached() {
            let guard = self.locks.lock(&user).await;
            let session = self
                .table
                .sessions_of(&user)
                .first()
                .cloned()
                .unwrap_or_else(|| SessionId::literal(fallback_session));
            match self.flusher.flush(&guard, &session, cause, true).await {
                Ok(o) => tracing::info!(%user, ?cause, "flush: {o}"),
                Err(e) => tracing::warn!(%user, ?cause, "flush failed: {e}"),
            }
        }
    }

    /// Periodic checkpoint: uploads every attached UIF without detaching it.
    pub async fn checkpoint(&self) {
        self.flush_attached(UpdateCause::Checkpoint, "checkpoint")
            .await;
    }

    /// Agent shutdown: flushes every attached UIF (cause `Shutdown`)
    /// without detaching it; updates the host cannot take stay in the
    /// spool. Sessions stay recorded: after an agent restart they continue
    /// (their UAs are adopted); after a VM restart
    /// [`recover_after_reboot`](Self::recover_after_reboot) ends them.
    pub async fn shutdown(&self) {
        self.flush_attached(UpdateCause::Shutdown, "shutdown").await;
    }

    /// At startup: if the session table was written during another boot
    /// of the VM (crash, power loss, reboot), its sessions are gone. Each
    /// is reported as an unexpected disconnect and each attached UIF
    /// (still on disk) is flushed with cause `Disconnect`, in the
    /// background (on [`Lifecycle::tasks`]).
    pub async fn recover_after_reboot(self: &std::sync::Arc<Self>) {
        let Some(now) = fsutil::kernel_boot() else {
            return;
        };
        match self.table.set_kernel_boot(&now).await {
            Some(before) if before != now => {}
            _ => return,
        }
        let lost = self.table.end_all().await;
        tracing::warn!(
            sessions = lost.len(),
            "the VM restarted since the sessions were recorded; reporting them as disconnected"
        );
        for s in &lost {
            let notice = DisconnectNotice {
                id: fsutil::random_u64(),
                session: s.session.clone(),
                user: s.user.clone(),
                ua: s.ua.clone(),
                reason: "the VM restarted; session lost".into(),
                at: fsutil::now_ms(),
            };
            if let Err(e) = self.notices.add(&notice).await {
                tracing::error!(session = %s.session, "cannot journal disconnect notice: {e}");
            }
        }
        self.kick.notify_one();
        for user in self.table.attached() {
            let session = lost
                .iter()
                .find(|s| s.user == user)
                .map_or_else(|| SessionId::literal("reboot"), |s| s.session.clone());
            let me = self.clone();
            self.tasks.spawn(async move {
                let guard = me.locks.lock(&user).await;
                let flushed = me
                    .flusher
                    .flush(&guard, &session, UpdateCause::Disconnect, false)
                    .await;
                match flushed {
                    Ok(o) => tracing::info!(%user, "UIF from before the restart: {o}"),
                    Err(e) => tracing::error!(%user, "UIF from before the restart: {e}"),
                }
            });
        }
    }

    /// A supervised UA ended without a logout: an unexpected disconnect of
    /// its session, if the session is still open.
    pub async fn on_ua_exit(&self, exit: UaExited) {
        if self.table.session(&exit.session).is_none() {
            return;
        }
        tracing::warn!(session = %exit.session, "{} without logout", exit.reason);
        if let Err(e) = self.disconnect(&exit.session, &exit.reason).await {
            tracing::error!(session = %exit.session, "cannot handle UA exit: {e}");
        }
    }

    /// Sends every journalled `SessionEnded`; stops at the first failure.
    pub async fn deliver_ended(&self, c: &Connected) {
        for session in self.table.ended_unsent() {
            let req = Request::SessionEnded {
                session: session.clone(),
            };
            match c.link.request_timeout(req, Duration::from_secs(10)).await {
                Ok(_) | Err(uve_protocol::link::LinkError::Remote(_)) => {
                    self.table.ack_ended(&session).await;
                }
                Err(e) => {
                    tracing::warn!(%session, "SessionEnded not delivered yet: {e}");
                    return;
                }
            }
        }
    }

    /// Sends preserved copy `id` to the host as a conflict version (base
    /// `None`, so it can never replace the user's head; a user without
    /// any version yet gets it as their first). Removes the copy once the
    /// host took it, unless `keep`. A refusal leaves the copy as it is.
    pub async fn push_preserved(
        &self,
        id: &str,
        keep: bool,
    ) -> Result<FlushOutcome, LifecycleError> {
        let preserved = &self.flusher.preserved;
        let copy = preserved
            .get(id)
            .ok_or_else(|| LifecycleError::NoSuchPreserved(id.into()))?;
        let user = copy.user.clone();
        let _guard = self.locks.lock(&user).await;
        let wait = Duration::from_secs(self.config.get().login_timeout_secs);
        let c = self
            .link
            .wait(wait)
            .await
            .ok_or_else(|| uif_err(&user)(UifError::NotConnected))?;
        let path = copy.bytes.clone();
        let manifest = blocking(move || {
            uve_protocol::chunker::chunk_file(&path).map_err(|e| UifError::at("chunk", &path, e))
        })
        .await
        .map_err(uif_err(&user))?;
        let begin = UpdateBegin {
            user: user.clone(),
            session: copy.session.clone(),
            base: None,
            lease: 0,
            header: manifest.header,
            cause: UpdateCause::Spooled,
        };
        let outcome = update::upload(&c.link, &copy.bytes, &manifest, begin, None)
            .await
            .map_err(uif_err(&user))?;
        let outcome = match outcome {
            UpdateOutcome::Committed(v) => FlushOutcome::Committed(v),
            UpdateOutcome::Conflict { kept_as, head } => FlushOutcome::Conflict { kept_as, head },
        };
        tracing::info!(%user, id, "preserved copy pushed: {outcome}");
        if !keep {
            let (preserved, id) = (preserved.clone(), id.to_string());
            blocking(move || {
                preserved
                    .remove(&id)
                    .map_err(|e| UifError::io(format!("remove preserved copy {id}"), e))
            })
            .await
            .map_err(uif_err(&user))?;
        }
        Ok(outcome)
    }
}
