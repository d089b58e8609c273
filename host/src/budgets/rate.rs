//! Per-VM rates: how many `UnexpectedDisconnect` notices and new sessions
//! one VM may report per minute. Each VM has a token bucket of a minute's
//! worth (the burst), refilled evenly; past it the request is answered
//! `Busy` and the agent retries (notices stay in its journal, sessions are
//! announced again), so nothing the protocol promises is lost, while a
//! flooding VM adds at most its rate of events.

use std::time::Instant;

use super::bucket::{TokenBucket, VmBuckets};

/// Token buckets per VM.
pub struct PerVmRate {
    per_minute: u32,
    buckets: VmBuckets,
}

impl PerVmRate {
    /// Allows `per_minute` per VM, as many at once (0: no limit).
    pub fn new(per_minute: u32) -> Self {
        PerVmRate {
            per_minute,
            buckets: VmBuckets::default(),
        }
    }

    /// The limit (per minute; 0: none).
    pub fn per_minute(&self) -> u32 {
        self.per_minute
    }

    /// Takes a token of `vm`'s, if one is left.
    pub fn admit(&self, vm: &str) -> bool {
        self.admit_at(vm, Instant::now())
    }

    fn admit_at(&self, vm: &str, now: Instant) -> bool {
        if self.per_minute == 0 {
            return true;
        }
        let burst = f64::from(self.per_minute);
        self.buckets.with(
            vm,
            || TokenBucket::full(burst, burst / 60.0, now),
            |b| b.try_take(now),
        )
    }

    /// Forgets `vm` (the VM was removed).
    pub fn forget(&self, vm: &str) {
        self.buckets.forget(vm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_of_a_minute_then_the_rate_per_vm() {
        let r = PerVmRate::new(60);
        let t0 = Instant::now();
        for _ in 0..60 {
            assert!(r.admit_at("vm1", t0));
        }
        assert!(!r.admit_at("vm1", t0), "the burst is spent");
        assert!(r.admit_at("vm2", t0), "another VM has its own");
        assert!(!r.admit_at("vm1", t0 + Duration::from_millis(500)));
        assert!(
            r.admit_at("vm1", t0 + Duration::from_millis(1_000)),
            "one a second"
        );
        assert!(!r.admit_at("vm1", t0 + Duration::from_millis(1_100)));
        let unlimited = PerVmRate::new(0);
        for _ in 0..1_000 {
            assert!(unlimited.admit_at("vm1", t0));
        }
    }
}
