//! The outbox: after every (re)connect, and when a `SessionStarted` was
//! not delivered (the host was busy), it re-announces open sessions, then
//! delivers journalled "session ended" and disconnect notices and spooled
//! updates; it is also kicked whenever a new notice or spool entry
//! appears, and retries every few seconds while anything is pending (a
//! session-table write that failed included).

use std::sync::Arc;
use std::time::Duration;

use crate::lifecycle::Lifecycle;
use tokio_util::sync::CancellationToken;

/// Retry interval while deliveries are pending.
pub const RETRY: Duration = Duration::from_secs(3);

/// Runs until `stop` is cancelled.
pub async fn run(lc: Arc<Lifecycle>, stop: CancellationToken) {
    let mut rx = lc.connections();
    let mut announced = 0u64;
    loop {
        let current = rx.borrow_and_update().clone();
        if let Some(c) = current.filter(|c| !c.link.is_closed()) {
            let again = lc.take_announce_again();
            if (c.generation != announced || again) && lc.announce_sessions(&c).await {
                announced = c.generation;
            }
            lc.deliver_pending(&c).await;
        }
        let retry = if lc.pending().await {
            RETRY
        } else {
            Duration::from_secs(3600)
        };
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            () = lc.kicked() => {}
            () = tokio::time::sleep(retry) => {}
            () = stop.cancelled() => return,
        }
    }
}
