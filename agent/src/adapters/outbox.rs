//! The outbox: after every (re)connect it re-announces open sessions, then
//! delivers journalled "session ended" and disconnect notices and spooled
//! updates; it is also kicked whenever a new notice or spool entry
//! appears, and retries every few seconds while anything is pending.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use uve_protocol::message::Request;

use crate::lifecycle::Lifecycle;
use crate::link::Connected;

/// Retry interval while deliveries are pending.
pub const RETRY: Duration = Duration::from_secs(3);

/// Runs until `stop` is cancelled.
pub async fn run(lc: Arc<Lifecycle>, stop: CancellationToken) {
    let mut rx = lc.link.subscribe();
    let mut announced = 0u64;
    loop {
        let current = rx.borrow_and_update().clone();
        if let Some(c) = current.filter(|c| !c.link.is_closed()) {
            if c.generation != announced && announce(&lc, &c).await {
                announced = c.generation;
            }
            lc.deliver_ended(&c).await;
            lc.notices.deliver(&c.link).await;
            lc.flusher.deliver_spool(&c).await;
        }
        let pending = lc.notices.count() + lc.flusher.spool.count() > 0
            || !lc.table.ended_unsent().is_empty();
        let retry = if pending {
            RETRY
        } else {
            Duration::from_secs(3600)
        };
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            () = lc.kick.notified() => {}
            () = tokio::time::sleep(retry) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Re-announces every open session (idempotent at the host).
async fn announce(lc: &Lifecycle, c: &Connected) -> bool {
    for s in lc.table.sessions() {
        let req = Request::SessionStarted {
            session: s.session.clone(),
            user: s.user,
            ua: s.ua,
        };
        if let Err(e) = c.link.request(req).await {
            tracing::warn!(session = %s.session, "re-announce failed: {e}");
            return false;
        }
    }
    true
}
