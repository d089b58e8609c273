//! A bounded set of events where no VM takes more than its fair share:
//! the live ring and the durable journal both keep their events in a
//! [`FairLog`]. When it is full, the oldest event of the *share holding the
//! most* is evicted (a share is one VM, [`Event::vm`]; events naming no VM
//! have a share of their own). So a VM that floods the log only ever
//! evicts its own events once it holds more than any other share, and
//! every share keeps at least `cap / shares` of its most recent events.
//! Among shares of equal size, the one with the oldest event loses it.
//! Events older than the maximum age (if any) are dropped first.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use super::Recorded;

/// Whose share an event is in: its VM, or `None` for events naming none.
type Share = Option<String>;

/// Events by sequence number, bounded in count (fair share per VM) and
/// optionally in age.
pub(super) struct FairLog {
    cap: usize,
    max_age_ms: Option<u64>,
    events: BTreeMap<u64, Recorded>,
    /// Sequence numbers of each share, oldest first.
    shares: HashMap<Share, VecDeque<u64>>,
    /// `(count, oldest seq reversed, share)` of every non-empty share: the
    /// last entry is the share to evict from.
    sizes: BTreeSet<(usize, Reverse<u64>, Share)>,
}

impl FairLog {
    /// An empty log of at most `cap` events (at least 1), none older than
    /// `max_age_ms` if given.
    pub(super) fn new(cap: usize, max_age_ms: Option<u64>) -> Self {
        FairLog {
            cap: cap.max(1),
            max_age_ms,
            events: BTreeMap::new(),
            shares: HashMap::new(),
            sizes: BTreeSet::new(),
        }
    }

    /// The share's entry in `sizes`, if it holds events.
    fn size_key(&self, share: &Share) -> Option<(usize, Reverse<u64>, Share)> {
        let q = self.shares.get(share)?;
        let oldest = *q.front()?;
        Some((q.len(), Reverse(oldest), share.clone()))
    }

    /// Runs `f` on `share`'s queue, keeping `sizes` in step.
    fn update(&mut self, share: &Share, f: impl FnOnce(&mut VecDeque<u64>)) {
        if let Some(k) = self.size_key(share) {
            self.sizes.remove(&k);
        }
        let q = self.shares.entry(share.clone()).or_default();
        f(q);
        if q.is_empty() {
            self.shares.remove(share);
        }
        if let Some(k) = self.size_key(share) {
            self.sizes.insert(k);
        }
    }

    /// Adds an event (sequence numbers must increase), then evicts what
    /// is over the age or the count.
    pub(super) fn insert(&mut self, r: Recorded) {
        let share: Share = r.event.vm().map(str::to_string);
        let (seq, now) = (r.seq, r.at_ms);
        self.events.insert(seq, r);
        self.update(&share, |q| q.push_back(seq));
        self.expire(now);
        while self.events.len() > self.cap {
            let Some((_, _, largest)) = self.sizes.last().cloned() else {
                break;
            };
            let mut evicted = None;
            self.update(&largest, |q| evicted = q.pop_front());
            if let Some(old) = evicted {
                self.events.remove(&old);
            }
        }
    }

    /// Drops the events older than the maximum age at `now_ms`.
    pub(super) fn expire(&mut self, now_ms: u64) {
        let Some(age) = self.max_age_ms else {
            return;
        };
        let cutoff = now_ms.saturating_sub(age);
        while let Some((&seq, first)) = self.events.first_key_value() {
            if first.at_ms >= cutoff {
                break;
            }
            let share: Share = first.event.vm().map(str::to_string);
            self.events.remove(&seq);
            // Sequence numbers increase within a share too: the oldest
            // event overall is the front of its share.
            self.update(&share, |q| {
                if q.front() == Some(&seq) {
                    q.pop_front();
                } else {
                    q.retain(|s| *s != seq);
                }
            });
        }
    }

    /// The events with `seq > since`, oldest first.
    pub(super) fn since(&self, since: u64) -> impl Iterator<Item = &Recorded> {
        self.events.range(since.saturating_add(1)..).map(|(_, r)| r)
    }

    /// Number of events held.
    pub(super) fn len(&self) -> usize {
        self.events.len()
    }

    /// The highest sequence number held.
    pub(super) fn last_seq(&self) -> Option<u64> {
        self.events.last_key_value().map(|(s, _)| *s)
    }

    /// How many events `vm`'s share holds (`None`: the share of events
    /// naming no VM).
    #[cfg(test)]
    pub(super) fn held_by(&self, vm: Option<&str>) -> usize {
        self.shares
            .get(&vm.map(str::to_string))
            .map_or(0, VecDeque::len)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::state::events::Event;

    fn rec(seq: u64, at_ms: u64, event: Event) -> Recorded {
        Recorded { seq, at_ms, event }
    }

    fn lost(vm: &str) -> Event {
        Event::VmLost {
            vm: vm.into(),
            conn_id: 1,
            reason: "gone".into(),
        }
    }

    fn gc() -> Event {
        Event::Gc(crate::store::GcReport::default())
    }

    #[test]
    fn a_flooding_vm_evicts_only_its_own_events() {
        let mut log = FairLog::new(10, None);
        log.insert(rec(1, 1, lost("good")));
        log.insert(rec(2, 2, gc()));
        log.insert(rec(3, 3, lost("other")));
        for seq in 4..1_000 {
            log.insert(rec(seq, seq, lost("flood")));
        }
        assert_eq!(log.len(), 10);
        assert_eq!(log.held_by(Some("good")), 1);
        assert_eq!(log.held_by(Some("other")), 1);
        assert_eq!(log.held_by(None), 1);
        assert!(gc().vm().is_none());
        assert_eq!(log.held_by(Some("flood")), 7);
        let seqs: Vec<u64> = log.since(0).map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 993, 994, 995, 996, 997, 998, 999]);
        assert_eq!(log.last_seq(), Some(999));
    }

    #[test]
    fn two_floods_share_evenly_and_ties_lose_their_oldest() {
        let mut log = FairLog::new(4, None);
        for seq in 1..=4 {
            log.insert(rec(seq, seq, lost("a")));
        }
        // b's events push a's out until both hold the same; then the
        // share with the oldest event loses it.
        for seq in 5..=8 {
            log.insert(rec(seq, seq, lost("b")));
        }
        let seqs: Vec<u64> = log.since(0).map(|r| r.seq).collect();
        assert_eq!(seqs, [3, 4, 7, 8]);
        let seqs: Vec<u64> = log.since(4).map(|r| r.seq).collect();
        assert_eq!(seqs, [7, 8]);
    }

    #[test]
    fn old_events_age_out() {
        let mut log = FairLog::new(100, Some(1_000));
        log.insert(rec(1, 10, lost("a")));
        log.insert(rec(2, 500, lost("b")));
        log.insert(rec(3, 1_200, lost("a")));
        let seqs: Vec<u64> = log.since(0).map(|r| r.seq).collect();
        assert_eq!(seqs, [2, 3], "seq 1 is older than 1 s at 1.2 s");
        log.expire(5_000);
        assert_eq!(log.len(), 0);
        assert_eq!(log.held_by(Some("a")), 0);
        log.insert(rec(4, 5_001, lost("a")));
        assert_eq!(log.held_by(Some("a")), 1);
    }
}
