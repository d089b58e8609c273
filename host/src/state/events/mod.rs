//! Operator events (commit, conflict, unexpected_disconnect, vm_lost, ...):
//! numbered, kept in a bounded in-memory ring for `GET /v1/events?since=N`
//! and broadcast to live followers. A slow follower never blocks the
//! daemon: it is served what it missed from the ring, and told how many
//! the ring no longer holds (`api::feed`). The
//! kinds and their fields are the [`Event`] enum (`kinds`).

#[cfg(test)]
pub(crate) mod golden;
mod kinds;

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

pub use kinds::{DisconnectSource, Event, UpdateFields};

use crate::store::now_ms;

/// One recorded event: a line of `GET /v1/events`,
/// `{"seq", "at_ms", "kind", ...fields}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    /// Sequence number, from 1, strictly increasing.
    pub seq: u64,
    /// When it happened (Unix ms).
    pub at_ms: u64,
    /// What happened (its `kind` and fields).
    #[serde(flatten)]
    pub event: Event,
}

struct Ring {
    next: u64,
    events: VecDeque<Recorded>,
}

/// The event log.
pub struct Events {
    cap: usize,
    ring: Mutex<Ring>,
    tx: broadcast::Sender<Recorded>,
}

impl Events {
    /// An event log keeping the last `cap` events.
    pub fn new(cap: usize) -> Self {
        Events {
            cap: cap.max(1),
            ring: Mutex::new(Ring {
                next: 1,
                events: VecDeque::new(),
            }),
            tx: broadcast::channel(1024).0,
        }
    }

    /// Records an event and returns its sequence number.
    pub fn emit(&self, event: Event) -> u64 {
        let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        let recorded = Recorded {
            seq: ring.next,
            at_ms: now_ms(),
            event,
        };
        ring.next += 1;
        log(&recorded);
        ring.events.push_back(recorded.clone());
        while ring.events.len() > self.cap {
            ring.events.pop_front();
        }
        let seq = recorded.seq;
        // Sent under the lock so followers see events in order.
        let _ = self.tx.send(recorded);
        seq
    }

    /// Retained events with `seq > since`, and a receiver for later ones
    /// (subscribed atomically, so nothing falls between them).
    pub fn since(&self, since: u64) -> (Vec<Recorded>, broadcast::Receiver<Recorded>) {
        let ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        let rx = self.tx.subscribe();
        let events = ring
            .events
            .iter()
            .filter(|e| e.seq > since)
            .cloned()
            .collect();
        (events, rx)
    }
}

/// Logs an event as `kind` and its other fields.
fn log(r: &Recorded) {
    let mut fields = match serde_json::to_value(&r.event) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    let kind = fields.remove("kind");
    let kind = kind
        .as_ref()
        .and_then(serde_json::Value::as_str)
        .unwrap_or("?");
    let shown = serde_json::Value::Object(fields);
    tracing::info!(seq = r.seq, kind, fields = %shown, "event");
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn lost(vm: &str) -> Event {
        Event::VmLost {
            vm: vm.into(),
            conn_id: 1,
            reason: "gone".into(),
        }
    }

    #[test]
    fn ring_is_bounded_and_since_filters() {
        let ev = Events::new(3);
        for i in 0..5 {
            ev.emit(lost(&format!("vm{i}")));
        }
        let (all, _) = ev.since(0);
        assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        let (late, mut rx) = ev.since(4);
        assert_eq!(late.len(), 1);
        ev.emit(Event::VmRegistered { vm: "a".into() });
        let e = rx.try_recv().unwrap();
        assert_eq!(e.seq, 6);
        assert_eq!(e.event, Event::VmRegistered { vm: "a".into() });
    }
}
