//! How many control requests (everything but chunk transfers: pings,
//! retrieves, manifest and update pages, commits, session notices) one
//! VM's connection may make per second. A real agent makes a handful per
//! user and login; past the rate, the host stops reading from that VM until
//! the bucket refills, so the VM's own requests wait (its link's inbound
//! budget fills, then its socket) while the others' are served. Nothing is
//! refused. Chunk transfers are bounded by the bulk pool's round-robin
//! instead (`bulk`).

use std::time::{Duration, Instant};

/// A token bucket: `per_sec` tokens a second, holding at most a second's
/// worth (`per_sec`). Rate 0 means no limit.
pub struct RequestRate {
    per_sec: f64,
    tokens: f64,
    at: Instant,
}

impl RequestRate {
    /// A full bucket of `per_sec`.
    pub fn new(per_sec: u32) -> Self {
        RequestRate {
            per_sec: f64::from(per_sec),
            tokens: f64::from(per_sec),
            at: Instant::now(),
        }
    }

    /// Takes a token; if none is left, the wait until one is (the caller
    /// sleeps it, not reading meanwhile). `None` when one was at hand.
    pub fn take(&mut self) -> Option<Duration> {
        self.take_at(Instant::now())
    }

    fn take_at(&mut self, now: Instant) -> Option<Duration> {
        if self.per_sec <= 0.0 {
            return None;
        }
        let refill = now.duration_since(self.at).as_secs_f64() * self.per_sec;
        self.tokens = (self.tokens + refill).min(self.per_sec);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return None;
        }
        let wait = (1.0 - self.tokens) / self.per_sec;
        // The token the wait buys is taken now.
        self.tokens -= 1.0;
        Some(Duration::from_secs_f64(wait))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_a_second_then_the_rate() {
        let mut r = RequestRate::new(100);
        let t0 = r.at;
        for _ in 0..100 {
            assert_eq!(r.take_at(t0), None);
        }
        let wait = r.take_at(t0).expect("the bucket is empty");
        assert_eq!(wait, Duration::from_millis(10));
        let later = t0 + Duration::from_millis(500);
        let mut free = 0;
        while r.take_at(later).is_none() {
            free += 1;
        }
        // Half a second refilled 50, one of which the wait above bought.
        assert_eq!(free, 49);
        let mut off = RequestRate::new(0);
        assert!((0..10_000).all(|_| off.take().is_none()));
    }
}
