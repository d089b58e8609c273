//! Making budgets visible: each budget a VM can run into ([`Budget`],
//! named as its configuration key) has a metric counting every refusal or
//! cut-off, and a `budget_exceeded` event naming the VM, at most one per
//! budget and VM every `budget_event_interval_secs` ([`Reports`]), so a
//! VM hammering a budget cannot flood the event log with the evidence of
//! it. Backpressure that well-behaved VMs meet (a request waiting for a
//! `max_inflight` slot, a full link budget) is counted but is no event.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::state::metrics::Metrics;

/// A budget whose refusals and cut-offs are reported (host/API.md,
/// *Budgets*).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Budget {
    /// `UnexpectedDisconnect` notices per minute (`Busy`).
    NoticesPerMinute,
    /// New sessions per minute (`Busy`).
    SessionStartsPerMinute,
    /// Sessions open at once (`TooLarge`).
    MaxSessionsPerVm,
    /// Uploads open at once on a connection (`Busy`).
    MaxUploadsPerVm,
    /// An upload left idle (dropped).
    UploadIdle,
    /// Bulk jobs queued (`Busy`).
    BulkQueuePerVm,
    /// Connections of one VM in the handshake (closed at accept).
    MaxHandshakesPerVm,
    /// Connections of all VMs in the handshake (closed at accept).
    MaxHandshakes,
    /// A VM that stopped reading (cut off).
    WriteDeadline,
    /// A frame larger than the negotiated limit (cut off).
    MaxFrame,
}

impl Budget {
    /// Its configuration key (the event's `budget`).
    pub fn name(self) -> &'static str {
        match self {
            Budget::NoticesPerMinute => "notices_per_minute",
            Budget::SessionStartsPerMinute => "session_starts_per_minute",
            Budget::MaxSessionsPerVm => "max_sessions_per_vm",
            Budget::MaxUploadsPerVm => "max_uploads_per_vm",
            Budget::UploadIdle => "upload_idle_ms",
            Budget::BulkQueuePerVm => "bulk_queue_per_vm",
            Budget::MaxHandshakesPerVm => "max_handshakes_per_vm",
            Budget::MaxHandshakes => "max_handshakes",
            Budget::WriteDeadline => "write_deadline_ms",
            Budget::MaxFrame => "max_frame",
        }
    }

    /// The counter of its refusals or cut-offs.
    pub fn metric(self, m: &Metrics) -> &AtomicU64 {
        match self {
            Budget::NoticesPerMinute => &m.notices_refused,
            Budget::SessionStartsPerMinute => &m.session_starts_refused,
            Budget::MaxSessionsPerVm => &m.sessions_refused,
            Budget::MaxUploadsPerVm => &m.uploads_refused,
            Budget::UploadIdle => &m.uploads_expired,
            Budget::BulkQueuePerVm => &m.bulk_queue_refused,
            Budget::MaxHandshakesPerVm | Budget::MaxHandshakes => &m.handshakes_refused,
            Budget::WriteDeadline => &m.stalled_cut_off,
            Budget::MaxFrame => &m.frames_too_large,
        }
    }
}

/// (VM, budget) pairs tracked before the stale ones are forgotten.
const MAX_TRACKED: usize = 4096;

/// When each VM's `budget_exceeded` event for each budget was last sent.
pub struct Reports {
    interval: Duration,
    last: Mutex<HashMap<(String, Budget), Instant>>,
}

impl Reports {
    /// At most one event per budget and VM every `interval`.
    pub fn new(interval: Duration) -> Self {
        Reports {
            interval,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// True if a refusal of `vm` by `budget` now is to be reported.
    pub fn due(&self, vm: &str, budget: Budget) -> bool {
        self.due_at(vm, budget, Instant::now())
    }

    fn due_at(&self, vm: &str, budget: Budget, now: Instant) -> bool {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if last.len() >= MAX_TRACKED {
            let interval = self.interval;
            last.retain(|_, at| now.saturating_duration_since(*at) < interval);
        }
        match last.get_mut(&(vm.to_string(), budget)) {
            Some(at) if now.saturating_duration_since(*at) < self.interval => false,
            Some(at) => {
                *at = now;
                true
            }
            None => {
                last.insert((vm.to_string(), budget), now);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_report_per_budget_and_vm_and_interval() {
        let r = Reports::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert!(r.due_at("vm1", Budget::NoticesPerMinute, t0));
        assert!(!r.due_at("vm1", Budget::NoticesPerMinute, t0 + Duration::from_secs(1)));
        assert!(r.due_at("vm2", Budget::NoticesPerMinute, t0), "per VM");
        assert!(r.due_at("vm1", Budget::MaxFrame, t0), "per budget");
        assert!(r.due_at(
            "vm1",
            Budget::NoticesPerMinute,
            t0 + Duration::from_secs(60)
        ));
        assert_eq!(Budget::BulkQueuePerVm.name(), "bulk_queue_per_vm");
    }
}
