//! Operator events (commit, conflict, unexpected_disconnect, vm_lost, ...):
//! numbered, kept in a bounded in-memory ring for `GET /v1/events?since=N`
//! and broadcast to live followers. A slow follower never blocks the
//! daemon: it is served what it missed from the ring, and told how many
//! are no longer held (`api::feed`). The kinds and their fields are the
//! [`Event`] enum (`kinds`).
//!
//! No VM can push another's events out: the ring and the retained set of
//! operator events are [`fair::FairLog`]s, which evict from the share (VM)
//! holding the most. The events an operator must act on
//! ([`Event::journalled`]) are also kept in a durable journal under the
//! data directory (`journal`): they survive floods and restarts, and the
//! sequence numbers continue across restarts.

mod fair;
#[cfg(test)]
pub(crate) mod golden;
mod journal;
mod kinds;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

pub use journal::FILE as JOURNAL_FILE;
pub use kinds::{DisconnectSource, Event, UpdateFields};

use crate::store::now_ms;
use fair::FairLog;
use journal::{Msg, Writer};

/// One recorded event: a line of `GET /v1/events`,
/// `{"seq", "at_ms", "kind", ...fields}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    /// Sequence number, strictly increasing, continued across restarts
    /// (not dense: a crash skips ahead).
    pub seq: u64,
    /// When it happened (Unix ms).
    pub at_ms: u64,
    /// What happened (its `kind` and fields).
    #[serde(flatten)]
    pub event: Event,
}

/// What the emitters, the readers and the journal's writer share.
struct Inner {
    next: u64,
    /// Every kind, the last `event_ring`.
    ring: FairLog,
    /// The journalled kinds, the last `event_journal`.
    kept: FairLog,
}

/// The state the journal's writer thread reads.
pub(crate) struct Shared {
    inner: Mutex<Inner>,
    /// Events were not queued for the writer (its queue was full): it
    /// rewrites the journal from `kept`.
    resync: AtomicBool,
    /// Once a number reaches this, the writer is asked to extend its
    /// reservation.
    extend_at: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The retained journalled events and the next number, read together.
    fn journal_snapshot(&self) -> (Vec<Recorded>, u64) {
        let mut inner = self.lock();
        inner.kept.expire(now_ms());
        (inner.kept.since(0).cloned().collect(), inner.next)
    }

    /// The next number to be given.
    fn next_seq(&self) -> u64 {
        self.lock().next
    }
}

/// The event log.
pub struct Events {
    shared: std::sync::Arc<Shared>,
    tx: broadcast::Sender<Recorded>,
    journal: Option<Writer>,
}

impl Events {
    /// An event log in memory only (no journal), keeping the last `cap`
    /// events; numbering starts at 1.
    pub fn new(cap: usize) -> Self {
        Self::build(
            Inner {
                next: 1,
                ring: FairLog::new(cap, None),
                kept: FairLog::new(cap, None),
            },
            None,
        )
    }

    /// The event log of a daemon: the last `ring` events in memory, and
    /// the last `journal` journalled ones (none older than
    /// `max_age_secs`, 0 = no age limit) durable in
    /// `<data_dir>/events.jsonl`, read back here; numbering continues
    /// after the journal's. Starts the journal's writer thread. `tmp` is
    /// on the same filesystem (rewrites are renamed into place).
    pub fn open(
        data_dir: &Path,
        tmp: &Path,
        ring: usize,
        journal: usize,
        max_age_secs: Option<u64>,
    ) -> std::io::Result<Self> {
        let max_age_ms = max_age_secs
            .filter(|s| *s > 0)
            .map(|s| s.saturating_mul(1000));
        let path = data_dir.join(journal::FILE);
        let loaded = journal::load(&path, journal, max_age_ms)?;
        tracing::info!(
            path = %path.display(),
            events = loaded.log.len(),
            next_seq = loaded.next,
            "event journal read"
        );
        let mut events = Self::build(
            Inner {
                next: loaded.next,
                ring: FairLog::new(ring, None),
                kept: loaded.log,
            },
            None,
        );
        let writer = Writer::start(path, tmp.to_path_buf(), events.shared.clone(), journal)?;
        events.journal = Some(writer);
        Ok(events)
    }

    fn build(inner: Inner, journal: Option<Writer>) -> Self {
        Events {
            shared: std::sync::Arc::new(Shared {
                inner: Mutex::new(inner),
                resync: AtomicBool::new(false),
                extend_at: AtomicU64::new(u64::MAX),
            }),
            tx: broadcast::channel(1024).0,
            journal,
        }
    }

    /// Records an event and returns its sequence number. Never waits for
    /// the disk: a journalled event is queued for the journal's writer.
    pub fn emit(&self, event: Event) -> u64 {
        let mut inner = self.shared.lock();
        let recorded = Recorded {
            seq: inner.next,
            at_ms: now_ms(),
            event,
        };
        inner.next += 1;
        log(&recorded);
        let seq = recorded.seq;
        inner.ring.insert(recorded.clone());
        if recorded.event.journalled() {
            inner.kept.insert(recorded.clone());
            if let Some(j) = &self.journal
                && !j.offer(Msg::Event(recorded.clone()))
            {
                self.shared.resync.store(true, Ordering::Release);
            }
        }
        if let Some(j) = &self.journal
            && seq >= self.shared.extend_at.load(Ordering::Relaxed)
        {
            self.shared.extend_at.store(u64::MAX, Ordering::Relaxed);
            j.offer(Msg::Extend);
        }
        // Sent under the lock so followers see events in order.
        let _ = self.tx.send(recorded);
        seq
    }

    /// Retained events with `seq > since` (the ring's and the journal's,
    /// in order), and a receiver for later ones (subscribed atomically, so
    /// nothing falls between them).
    pub fn since(&self, since: u64) -> (Vec<Recorded>, broadcast::Receiver<Recorded>) {
        let mut inner = self.shared.lock();
        inner.kept.expire(now_ms());
        let rx = self.tx.subscribe();
        let mut ring = inner.ring.since(since).peekable();
        let mut kept = inner.kept.since(since).peekable();
        let mut events = Vec::new();
        loop {
            let next = match (ring.peek(), kept.peek()) {
                (Some(a), Some(b)) if a.seq == b.seq => {
                    kept.next();
                    ring.next()
                }
                (Some(a), Some(b)) if a.seq < b.seq => ring.next(),
                (Some(_), Some(_)) | (None, Some(_)) => kept.next(),
                (Some(_), None) => ring.next(),
                (None, None) => break,
            };
            events.extend(next.cloned());
        }
        (events, rx)
    }

    /// The number the next event gets.
    pub fn next_seq(&self) -> u64 {
        self.shared.next_seq()
    }

    /// Makes the journal durable up to now, writes its clean-shutdown
    /// mark and stops its writer (blocking; at shutdown). Events emitted
    /// later are kept in memory only.
    pub fn close(&self) {
        if let Some(j) = &self.journal {
            j.close();
        }
    }

    /// Waits until the journal holds every event emitted so far
    /// (blocking).
    pub fn flush(&self) {
        if let Some(j) = &self.journal {
            j.flush();
        }
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
