//! VM switch hand-overs: when a user is assigned away from the VM holding
//! their lease, that VM is asked to release the user (UVE-2 `UserRelease`);
//! a retrieve on the new VM waits, bounded, for the outcome.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

/// How a hand-over ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandoverOutcome {
    /// The old VM answered `Released`.
    Released,
    /// The old VM failed, refused or did not answer in time.
    Failed,
}

/// Pending and finished hand-overs by user.
#[derive(Default)]
pub struct Handovers {
    map: Mutex<HashMap<String, watch::Receiver<Option<HandoverOutcome>>>>,
}

/// The sending side of one hand-over; dropping it unfinished counts as failed.
pub struct HandoverTicket {
    tx: watch::Sender<Option<HandoverOutcome>>,
}

impl HandoverTicket {
    /// Publishes the outcome.
    pub fn finish(self, outcome: HandoverOutcome) {
        self.tx.send_replace(Some(outcome));
    }
}

impl Drop for HandoverTicket {
    fn drop(&mut self) {
        self.tx.send_if_modified(|v| {
            if v.is_none() {
                *v = Some(HandoverOutcome::Failed);
                true
            } else {
                false
            }
        });
    }
}

impl Handovers {
    /// Starts a hand-over of `user` (replacing any earlier one).
    pub fn start(&self, user: &str) -> HandoverTicket {
        let (tx, rx) = watch::channel(None);
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(user.to_string(), rx);
        HandoverTicket { tx }
    }

    /// Waits up to `limit` for `user`'s hand-over. `None`: there was none
    /// (or it was already consumed); `Some(true)`: it did not complete
    /// successfully in time. Consumes a finished hand-over.
    pub async fn wait(&self, user: &str, limit: Duration) -> Option<bool> {
        let mut rx = self
            .map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(user)
            .cloned()?;
        let outcome = tokio::time::timeout(limit, async {
            loop {
                if let Some(o) = *rx.borrow_and_update() {
                    return o;
                }
                if rx.changed().await.is_err() {
                    return HandoverOutcome::Failed;
                }
            }
        })
        .await
        .unwrap_or(HandoverOutcome::Failed);
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(user);
        Some(outcome != HandoverOutcome::Released)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[tokio::test]
    async fn waits_for_outcome_or_times_out() {
        let h = Handovers::default();
        assert_eq!(h.wait("u", Duration::from_millis(1)).await, None);
        let t = h.start("u");
        t.finish(HandoverOutcome::Released);
        assert_eq!(h.wait("u", Duration::from_secs(5)).await, Some(false));
        assert_eq!(h.wait("u", Duration::from_secs(5)).await, None);
        let _t = h.start("u");
        assert_eq!(h.wait("u", Duration::from_millis(20)).await, Some(true));
        drop(h.start("v"));
        assert_eq!(h.wait("v", Duration::from_secs(5)).await, Some(true));
    }
}
