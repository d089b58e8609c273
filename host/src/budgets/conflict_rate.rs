//! How often a VM that does not hold a user's current lease may open an
//! update for that user. Such an update can only become a conflict
//! version, so a past holder (or a VM the user was just assigned to and
//! that skipped the retrieve) gets a token bucket per user:
//! `conflict_updates_per_hour`, with a burst of a twelfth of it (at least
//! one). Past it, `UpdateBegin` is refused with `Busy` and the agent
//! retries from its spool; nothing is lost, and a hostile past holder
//! cannot churn the store.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use super::bucket::TokenBucket;

/// Buckets kept before full ones are forgotten.
const MAX_BUCKETS: usize = 4096;

struct Bucket {
    tokens: TokenBucket,
    /// A refusal was already reported since the last admission.
    reported: bool,
}

/// What [`ConflictRate::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// The update may be opened.
    Yes,
    /// Refused; `first` is true for the first refusal since the last
    /// admission (report it once, not per retry).
    No {
        /// First refusal since the last admission.
        first: bool,
    },
}

/// The token buckets, per (user, VM).
pub struct ConflictRate {
    per_hour: u32,
    buckets: Mutex<HashMap<(String, String), Bucket>>,
}

impl ConflictRate {
    /// Allows `per_hour` conflict-bound updates per user and VM (0: no limit).
    pub fn new(per_hour: u32) -> Self {
        ConflictRate {
            per_hour,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// The burst: how many such updates may be opened at once.
    pub fn burst(&self) -> f64 {
        f64::from((self.per_hour / 12).max(1))
    }

    /// Takes a token for an update of `user` from `vm`, if one is left.
    pub fn admit(&self, user: &str, vm: &str) -> Admit {
        if self.per_hour == 0 {
            return Admit::Yes;
        }
        let now = Instant::now();
        let (burst, rate) = (self.burst(), f64::from(self.per_hour) / 3600.0);
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() >= MAX_BUCKETS {
            buckets.retain(|_, b| b.tokens.level(now) < burst);
        }
        let b = buckets
            .entry((user.to_string(), vm.to_string()))
            .or_insert_with(|| Bucket {
                tokens: TokenBucket::full(burst, rate, now),
                reported: false,
            });
        if b.tokens.try_take(now) {
            b.reported = false;
            Admit::Yes
        } else {
            let first = !b.reported;
            b.reported = true;
            Admit::No { first }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_refusals_reported_once_per_user_and_vm() {
        let r = ConflictRate::new(60);
        for _ in 0..5 {
            assert_eq!(r.admit("alice", "vm1"), Admit::Yes);
        }
        assert_eq!(r.admit("alice", "vm1"), Admit::No { first: true });
        assert_eq!(r.admit("alice", "vm1"), Admit::No { first: false });
        assert_eq!(r.admit("alice", "vm2"), Admit::Yes, "per VM");
        assert_eq!(r.admit("bob", "vm1"), Admit::Yes, "per user");
        let unlimited = ConflictRate::new(0);
        for _ in 0..100 {
            assert_eq!(unlimited.admit("alice", "vm1"), Admit::Yes);
        }
    }
}
