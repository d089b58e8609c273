//! The token bucket the rate budgets share (`conflict_rate`, `rate`,
//! `request_rate`): `burst` tokens at most, refilled at `per_sec`.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// One token bucket.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f64,
    at: Instant,
    burst: f64,
    per_sec: f64,
}

impl TokenBucket {
    /// A full bucket of `burst` tokens refilled at `per_sec`.
    pub fn full(burst: f64, per_sec: f64, now: Instant) -> Self {
        TokenBucket {
            tokens: burst,
            at: now,
            burst,
            per_sec,
        }
    }

    /// The tokens it would hold at `now` (refilled, not taken).
    pub fn level(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (self.tokens + elapsed * self.per_sec).min(self.burst)
    }

    fn refill(&mut self, now: Instant) {
        self.tokens = self.level(now);
        self.at = now;
    }

    /// Takes a token if one is left at `now`.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Takes a token at `now`, borrowing it if none is left: then the wait
    /// until the borrowed token would have been there.
    pub fn take_or_wait(&mut self, now: Instant) -> Option<Duration> {
        self.take_n_or_wait(1.0, now)
    }

    /// [`take_or_wait`](Self::take_or_wait) of `n` tokens at once.
    pub fn take_n_or_wait(&mut self, n: f64, now: Instant) -> Option<Duration> {
        self.refill(now);
        if self.tokens >= n {
            self.tokens -= n;
            return None;
        }
        let wait = (n - self.tokens) / self.per_sec;
        self.tokens -= n;
        Some(Duration::from_secs_f64(wait))
    }
}

/// A token bucket per VM, made on the VM's first use (the per-VM rate
/// budgets keep theirs here).
#[derive(Default)]
pub struct VmBuckets(Mutex<HashMap<String, TokenBucket>>);

impl VmBuckets {
    /// Runs `f` on `vm`'s bucket, made by `new` if `vm` has none yet.
    pub fn with<T>(
        &self,
        vm: &str,
        new: impl FnOnce() -> TokenBucket,
        f: impl FnOnce(&mut TokenBucket) -> T,
    ) -> T {
        let mut buckets = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        f(buckets.entry(vm.to_string()).or_insert_with(new))
    }

    /// Forgets `vm`'s bucket (the VM was removed).
    pub fn forget(&self, vm: &str) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(vm);
    }

    /// VMs with a bucket.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}
