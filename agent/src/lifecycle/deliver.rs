//! What the outbox delivers on the host connection, on the lifecycles'
//! behalf: the re-announce of open sessions after a reconnect, journalled
//! "session ended" and disconnect notices, spooled updates, and the
//! session table's catch-up write after a failed one.

use std::time::Duration;

use tokio::sync::watch;
use uve_protocol::message::Request;

use super::Lifecycle;
use crate::link::Connected;

impl Lifecycle {
    /// The host connection as it comes and goes.
    pub fn connections(&self) -> watch::Receiver<Option<Connected>> {
        self.link.subscribe()
    }

    /// Waits until something new is journalled or spooled.
    pub async fn kicked(&self) {
        self.kick.notified().await;
    }

    /// Wakes the outbox: something is waiting for delivery.
    pub fn kick(&self) {
        self.kick.notify_one();
    }

    /// Asks the outbox to announce the open sessions again (one was not
    /// delivered: the host was busy or the link failed) and wakes it.
    pub fn announce_again(&self) {
        self.reannounce
            .store(true, std::sync::atomic::Ordering::Release);
        self.kick();
    }

    /// True (once) if the open sessions are to be announced again.
    pub fn take_announce_again(&self) -> bool {
        self.reannounce
            .swap(false, std::sync::atomic::Ordering::AcqRel)
    }

    /// Re-announces every open session (idempotent at the host); false if
    /// one was not delivered (the host answered `Busy` past its rate bound,
    /// or the connection failed), which asks for another round at the
    /// outbox's next retry.
    pub async fn announce_sessions(&self, c: &Connected) -> bool {
        for s in self.table.sessions() {
            let req = Request::SessionStarted {
                session: s.session.clone(),
                user: s.user,
                ua: s.ua,
            };
            if let Err(e) = c.link.request(req).await {
                tracing::warn!(session = %s.session, "re-announce failed: {e}");
                // Retried at the outbox's next round (not at once: a host
                // answering Busy is over its rate bound).
                self.reannounce
                    .store(true, std::sync::atomic::Ordering::Release);
                return false;
            }
        }
        true
    }

    /// Delivers on `c` what is journalled: ended sessions, disconnect
    /// notices, spooled updates (each in order; each stops at its first
    /// transient failure).
    pub async fn deliver_pending(&self, c: &Connected) {
        self.deliver_ended(c).await;
        self.notices.deliver(&c.link).await;
        self.flusher.deliver_spool(c).await;
    }

    /// Whether anything still waits: a delivery, or a session-table write
    /// that failed (retried here, so the disk catches up as soon as it
    /// takes writes again).
    pub async fn pending(&self) -> bool {
        let behind = self.table.write_if_behind().await.is_err();
        behind
            || self.reannounce.load(std::sync::atomic::Ordering::Acquire)
            || self.notices.count() + self.flusher.pending_updates() > 0
            || !self.table.ended_unsent().is_empty()
    }

    /// Sends every journalled `SessionEnded`; stops at the first failure.
    pub async fn deliver_ended(&self, c: &Connected) {
        for session in self.table.ended_unsent() {
            let req = Request::SessionEnded {
                session: session.clone(),
            };
            match c.link.request_timeout(req, Duration::from_secs(10)).await {
                Ok(_) | Err(uve_protocol::link::LinkError::Remote(_)) => {
                    // Not durable: a restart re-announces it, and the host
                    // takes a repeated end as a no-op.
                    let _ = self.table.ack_ended(&session).await;
                }
                Err(e) => {
                    tracing::warn!(%session, "SessionEnded not delivered yet: {e}");
                    return;
                }
            }
        }
    }
}
