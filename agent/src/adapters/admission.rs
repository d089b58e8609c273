//! The control socket's connection budget: a connection is admitted only
//! after the kernel has said who made it (`SO_PEERCRED`), so one uid can
//! never take the slots other users' logins and logouts need. Root (the
//! PAM hook, the display manager) is always admitted; every other uid may
//! hold [`PER_UID`] connections at once, and all of them together
//! [`MAX_OTHERS`]. A connection over the budget is answered at once with
//! the rule that refused it, and closed; refusals are counted (root's
//! `uve-agent status`: `control_refused`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// Connections one non-root uid may hold at once.
pub const PER_UID: usize = 4;

/// Connections all non-root uids together may hold at once.
pub const MAX_OTHERS: usize = 64;

/// Who holds how many connections.
#[derive(Default)]
pub struct Admission {
    held: Mutex<Held>,
    refused: AtomicU64,
}

#[derive(Default)]
struct Held {
    by_uid: HashMap<u32, usize>,
    others: usize,
}

/// One admitted connection; its slot is given back when dropped.
pub struct Slot {
    admission: Arc<Admission>,
    uid: u32,
}

impl Admission {
    /// Admits a connection of `uid`, or says which budget refuses it.
    pub fn admit(self: &Arc<Self>, uid: u32) -> Result<Slot, String> {
        if uid != 0 {
            let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
            let mine = held.by_uid.get(&uid).copied().unwrap_or(0);
            let why = if mine >= PER_UID {
                Some(format!(
                    "uid {uid} holds {mine} connections to the agent already (at most {PER_UID} at once)"
                ))
            } else if held.others >= MAX_OTHERS {
                Some(format!(
                    "the agent serves {MAX_OTHERS} connections of other users already; try again"
                ))
            } else {
                None
            };
            if let Some(why) = why {
                self.refused.fetch_add(1, Ordering::Relaxed);
                return Err(why);
            }
            *held.by_uid.entry(uid).or_default() += 1;
            held.others += 1;
        }
        Ok(Slot {
            admission: self.clone(),
            uid,
        })
    }

    /// Connections refused since the agent started.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.uid == 0 {
            return;
        }
        let mut held = self
            .admission
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        held.others = held.others.saturating_sub(1);
        if let Some(n) = held.by_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                held.by_uid.remove(&self.uid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uid_gets_its_share_root_always_and_slots_come_back() {
        let a = Arc::new(Admission::default());
        let mine: Vec<Slot> = (0..PER_UID).filter_map(|_| a.admit(1000).ok()).collect();
        assert_eq!(mine.len(), PER_UID);
        assert!(a.admit(1000).is_err_and(|why| why.contains("uid 1000")));
        let root: Vec<Slot> = (0..100).filter_map(|_| a.admit(0).ok()).collect();
        assert_eq!(root.len(), 100, "root is always admitted");
        assert!(a.admit(1001).is_ok(), "another uid has its own share");
        drop(mine);
        assert!(a.admit(1000).is_ok(), "slots are given back");
        assert_eq!(a.refused(), 1);
        let many: Vec<Slot> = (2000..2100u32)
            .filter_map(|uid| a.admit(uid).ok())
            .collect();
        assert_eq!(many.len(), MAX_OTHERS, "all others together are bounded");
        assert_eq!(a.refused(), 1 + 100 - MAX_OTHERS as u64);
        drop(root);
    }
}
