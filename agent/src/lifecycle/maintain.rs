//! The lifecycles the agent starts itself: periodic checkpoints, the
//! shutdown flush, recovery after a VM restart, a UA's unexpected exit,
//! delivering journalled "session ended" notices, and pushing a preserved
//! copy back to the host.

use uve_protocol::message::{DisconnectNotice, UpdateCause};
use uve_protocol::names::SessionId;

use super::Lifecycle;
use crate::base::fsutil;
use crate::config::UifMode;
use crate::supervise::UaExited;
use crate::uif::{blocking, disk_home, materialise};

/// Users whose UIFs a checkpoint or the shutdown flush uploads at once
/// (uve-host's default uploads per VM).
pub const FLUSH_PARALLEL: usize = 4;

impl Lifecycle {
    /// Flushes every attached UIF with `cause` without detaching it.
    /// Profile disks are the exception (a mounted disk's image is live):
    /// checkpoints leave them alone, and a shutdown of the system releases
    /// them as a logout does (unmount, upload or spool), while any other
    /// stop of the agent (a restart, an upgrade) leaves them served for
    /// the next agent process, which serves them again.
    async fn flush_attached(&self, cause: UpdateCause, fallback_session: &'static str) {
        let disks = self.config.get().uif.mode == UifMode::Disk;
        let release_disks = disks
            && cause == UpdateCause::Shutdown
            && blocking(|| Ok(disk_home::system_stopping()))
                .await
                .unwrap_or(true);
        if disks && !release_disks {
            tracing::info!(
                ?cause,
                "profile disks stay mounted and served (uploaded at logout, VM switch or system shutdown)"
            );
            return;
        }
        // Every user at once, [`FLUSH_PARALLEL`] flushing: a user whose
        // lock is held (a stalled logout) or whose flush is slow never
        // holds the others back, and the host's uploads per VM bound the
        // rest.
        let flushing = tokio::sync::Semaphore::new(FLUSH_PARALLEL);
        let users = self.table.attached();
        futures_util::future::join_all(users.into_iter().map(|user| {
            let flushing = &flushing;
            async move {
                let guard = self.locks.lock(&user).await;
                let Ok(_permit) = flushing.acquire().await else {
                    return;
                };
                let session = self
                    .table
                    .sessions_of(&user)
                    .first()
                    .cloned()
                    .unwrap_or_else(|| SessionId::literal(fallback_session));
                match self
                    .flusher
                    .flush(&guard, &session, cause, !release_disks)
                    .await
                {
                    Ok(o) => tracing::info!(%user, ?cause, "flush: {o}"),
                    Err(e) => tracing::warn!(%user, ?cause, "flush failed: {e}"),
                }
            }
        }))
        .await;
    }

    /// After an agent restart within the same boot: finishes every logout
    /// the previous agent process had under way (sessions marked ending),
    /// in the background, each holding its user's lock from before this
    /// returns, so nothing else of that user runs first. The outcome is
    /// what a retried logout of the session reports.
    async fn finish_logouts(self: &std::sync::Arc<Self>) {
        let ending: Vec<_> = self
            .table
            .sessions()
            .into_iter()
            .filter(|s| s.ending)
            .collect();
        for rec in ending {
            let guard = self.locks.lock(&rec.user).await;
            let me = self.clone();
            self.spawn(async move {
                me.supervisor.stop(&rec.session).await;
                match me.end_session(&guard, &rec.session, UpdateCause::Logout).await {
                    Ok(ended) => {
                        me.announce_end(&guard, std::slice::from_ref(&rec.session))
                            .await;
                        tracing::info!(user = %rec.user, session = %rec.session, "logout under way at the restart, finished: {ended}");
                    }
                    Err(e) => tracing::error!(user = %rec.user, session = %rec.session, "logout under way at the restart: {e}"),
                }
            });
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
    /// [`recover_at_start`](Self::recover_at_start) ends them.
    pub async fn shutdown(&self) {
        self.flush_attached(UpdateCause::Shutdown, "shutdown").await;
    }

    /// At startup, before anything else is served: if the session table
    /// was written during another boot of the VM (crash, power loss,
    /// reboot), its sessions are gone. Each is reported as an unexpected
    /// disconnect and each attached UIF (still on disk) is flushed with
    /// cause `Disconnect`. Within the same boot (an agent restart), the
    /// table is repaired: a UIF that no open session holds (a logout or a
    /// failed login whose table write did not reach the disk) is flushed
    /// and detached. Flushes run in the background (on
    /// [`Lifecycle::tasks`]).
    pub async fn recover_at_start(self: &std::sync::Arc<Self>) {
        let before = self.table.kernel_boot();
        let now = fsutil::kernel_boot();
        if let Some(n) = &now {
            let _ = self.table.set_kernel_boot(n).await;
        }
        let rebooted = matches!((&before, &now), (Some(b), Some(n)) if b != n);
        let lost = if rebooted {
            self.report_lost_sessions().await
        } else {
            // UAs that outlived an agent restart are watched again.
            self.supervisor.adopt(self.table.sessions());
            Vec::new()
        };
        let cfg = self.config.get();
        if !rebooted {
            self.finish_logouts().await;
        }
        for user in self.table.attached() {
            if !rebooted && let Err(e) = materialise::reattach(&cfg, &user).await {
                tracing::error!(%user, "UIF found attached at start: {e}");
            }
            let open = self.table.sessions_of(&user);
            if !rebooted && !open.is_empty() {
                continue;
            }
            let (session, cause) = match lost.iter().find(|s| s.user == user) {
                Some(s) => (s.session.clone(), UpdateCause::Disconnect),
                None if rebooted => (SessionId::literal("reboot"), UpdateCause::Disconnect),
                None => (SessionId::literal("repair"), UpdateCause::Logout),
            };
            let me = self.clone();
            self.spawn(async move {
                let guard = me.locks.lock(&user).await;
                let flushed = me.flusher.flush(&guard, &session, cause, false).await;
                match flushed {
                    Ok(o) => tracing::info!(%user, ?cause, "UIF found attached at start: {o}"),
                    Err(e) => tracing::error!(%user, ?cause, "UIF found attached at start: {e}"),
                }
            });
        }
    }

    /// The VM restarted: ends every recorded session and journals an
    /// unexpected disconnect for each; returns them.
    async fn report_lost_sessions(&self) -> Vec<crate::stores::session::SessionRecord> {
        let lost = self.table.sessions();
        let _ = self.table.end_all().await;
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
        lost
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
}
