//! The bytes a user's own uploads in flight add to what the user holds:
//! each open upload from the VM holding the user's lease charges the
//! chunks its pages list that the user's retained versions do not hold,
//! until it commits or goes. An upload's quota check counts the other
//! uploads' charges with its own, so two uploads of one user cannot each
//! fit the quota alone and exceed it together. Uploads from VMs without the
//! lease are never charged here (they are held to their origin's conflict
//! bound instead), so they cannot make the lease holder's update fail.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// The charges of every user with an upload in flight.
#[derive(Default)]
pub struct QuotaCharges {
    users: Arc<Mutex<HashMap<String, u64>>>,
}

impl QuotaCharges {
    /// A fresh, empty table.
    pub fn new() -> Self {
        QuotaCharges::default()
    }

    /// Opens one upload's charge for `user` (released when dropped).
    pub fn open(&self, user: &str) -> QuotaCharge {
        QuotaCharge {
            users: self.users.clone(),
            user: user.to_string(),
            bytes: 0,
        }
    }

    /// Bytes charged for `user` by every upload in flight.
    pub fn charged(&self, user: &str) -> u64 {
        let users = self.users.lock().unwrap_or_else(PoisonError::into_inner);
        users.get(user).copied().unwrap_or(0)
    }
}

/// One upload's charge.
pub struct QuotaCharge {
    users: Arc<Mutex<HashMap<String, u64>>>,
    user: String,
    bytes: u64,
}

impl QuotaCharge {
    /// Bytes this upload charges.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Makes this upload's charge `n` bytes (up or down: an estimate is
    /// replaced by the exact count).
    pub fn set(&mut self, n: u64) {
        if n == self.bytes {
            return;
        }
        let mut users = self.users.lock().unwrap_or_else(PoisonError::into_inner);
        let total = users.entry(self.user.clone()).or_default();
        *total = total.saturating_sub(self.bytes).saturating_add(n);
        if *total == 0 {
            users.remove(&self.user);
        }
        self.bytes = n;
    }
}

impl Drop for QuotaCharge {
    fn drop(&mut self) {
        if self.bytes == 0 {
            return;
        }
        let mut users = self.users.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(b) = users.get_mut(&self.user) {
            *b = b.saturating_sub(self.bytes);
            if *b == 0 {
                users.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_add_up_per_user_and_go_with_their_upload() {
        let t = QuotaCharges::new();
        let mut a = t.open("alice");
        let mut b = t.open("alice");
        let mut c = t.open("bob");
        a.set(10);
        b.set(9);
        c.set(7);
        b.set(5);
        assert_eq!((t.charged("alice"), t.charged("bob")), (15, 7));
        drop(a);
        assert_eq!(t.charged("alice"), 5);
        drop(b);
        drop(c);
        assert_eq!((t.charged("alice"), t.charged("bob")), (0, 0));
        assert!(
            t.users
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_empty()
        );
    }
}
