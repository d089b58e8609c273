//! Operator events (commit, conflict, unexpected_disconnect, vm_lost, ...):
//! numbered, kept in a bounded in-memory ring for `GET /v1/events?since=N`
//! and broadcast to live followers. Losing events to a slow follower is
//! acceptable (it resumes with `since`); blocking the daemon is not.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::broadcast;

use crate::store::now_ms;

/// One event.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Sequence number, from 1, strictly increasing.
    pub seq: u64,
    /// When it happened (Unix ms).
    pub at_ms: u64,
    /// What happened.
    pub kind: String,
    /// Event-specific fields (vm, user, session, version, ...).
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

struct Ring {
    next: u64,
    events: VecDeque<Event>,
}

/// The event log.
pub struct Events {
    cap: usize,
    ring: Mutex<Ring>,
    tx: broadcast::Sender<Event>,
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

    /// Records an event; `fields` must be a JSON object (anything else is
    /// stored under `detail`).
    pub fn emit(&self, kind: &str, fields: Value) -> u64 {
        let fields = match fields {
            Value::Object(m) => m,
            other => {
                let mut m = Map::new();
                m.insert("detail".into(), other);
                m
            }
        };
        let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        let event = Event {
            seq: ring.next,
            at_ms: now_ms(),
            kind: kind.to_string(),
            fields,
        };
        ring.next += 1;
        let shown = Value::Object(event.fields.clone());
        tracing::info!(seq = event.seq, kind, fields = %shown, "event");
        ring.events.push_back(event.clone());
        while ring.events.len() > self.cap {
            ring.events.pop_front();
        }
        let seq = event.seq;
        // Sent under the lock so followers see events in order.
        let _ = self.tx.send(event);
        seq
    }

    /// Retained events with `seq > since`, and a receiver for later ones
    /// (subscribed atomically, so nothing falls between them).
    pub fn since(&self, since: u64) -> (Vec<Event>, broadcast::Receiver<Event>) {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn ring_is_bounded_and_since_filters() {
        let ev = Events::new(3);
        for i in 0..5 {
            ev.emit("commit", serde_json::json!({"i": i}));
        }
        let (all, _) = ev.since(0);
        assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        let (late, mut rx) = ev.since(4);
        assert_eq!(late.len(), 1);
        ev.emit("vm_lost", serde_json::json!({"vm": "a"}));
        let e = rx.try_recv().unwrap();
        assert_eq!((e.seq, e.kind.as_str()), (6, "vm_lost"));
        assert_eq!(e.fields["vm"], "a");
    }
}
