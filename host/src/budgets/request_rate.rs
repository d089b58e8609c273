//! How many control requests (everything but chunk transfers: pings,
//! retrieves, manifest and update pages, commits, session notices) one VM
//! may make per second. A real agent makes a handful per user and login;
//! past the rate, the host stops reading from that VM until its bucket
//! refills, so the VM's own requests wait (its link's inbound budget
//! fills, then its socket) while the others' are served. Nothing is
//! refused. The bucket is the VM's, not its connection's: reconnecting
//! does not refill it. Chunk transfers are bounded by the bulk pool
//! instead (`bulk`).

use std::time::{Duration, Instant};

use super::bucket::{TokenBucket, VmBuckets};

/// A bucket per VM: `per_sec` tokens a second, holding at most a second's
/// worth. Rate 0 means no limit.
pub struct RequestRate {
    per_sec: u32,
    buckets: VmBuckets,
}

impl RequestRate {
    /// Full buckets of `per_sec` for every VM.
    pub fn new(per_sec: u32) -> Self {
        RequestRate {
            per_sec,
            buckets: VmBuckets::default(),
        }
    }

    /// Takes a token of `vm`'s; if none is left, the wait until one is (the
    /// caller sleeps it, not reading meanwhile). `None` when one was at
    /// hand.
    pub fn take(&self, vm: &str) -> Option<Duration> {
        self.take_at(vm, Instant::now())
    }

    fn take_at(&self, vm: &str, now: Instant) -> Option<Duration> {
        if self.per_sec == 0 {
            return None;
        }
        let rate = f64::from(self.per_sec);
        self.buckets.with(
            vm,
            || TokenBucket::full(rate, rate, now),
            |b| b.take_or_wait(now),
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

    #[test]
    fn a_burst_of_a_second_then_the_rate_per_vm_across_its_connections() {
        let t0 = Instant::now();
        let r = RequestRate::new(100);
        for _ in 0..100 {
            assert_eq!(r.take_at("vm1", t0), None);
        }
        let wait = r.take_at("vm1", t0).expect("the bucket is empty");
        assert_eq!(wait, Duration::from_millis(10));
        // Another VM has its own; a new connection of vm1 (the same
        // bucket, kept by the host) does not start full.
        assert_eq!(r.take_at("vm2", t0), None);
        assert!(r.take_at("vm1", t0).is_some());
        let later = t0 + Duration::from_millis(500);
        let mut free = 0;
        while r.take_at("vm1", later).is_none() {
            free += 1;
        }
        // Half a second refilled 50, two of which the waits above bought.
        assert_eq!(free, 48);
        // A removed VM's bucket goes with it.
        r.forget("vm1");
        assert_eq!(r.buckets.len(), 1);
        assert_eq!(
            r.take_at("vm1", later),
            None,
            "a VM added again starts full"
        );
        let off = RequestRate::new(0);
        assert!((0..10_000).all(|_| off.take("vm1").is_none()));
    }
}
