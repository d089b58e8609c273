//! Sessions open on each VM as the agents report them, and de-duplication
//! of unexpected-disconnect notices by `(vm, id)` (bounded memory: the last
//! `NOTICE_MEMORY` ids per VM).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use crate::store::now_ms;

/// Notice ids remembered per VM for de-duplication.
const NOTICE_MEMORY: usize = 4096;

/// Sessions one VM may have open at once; a `SessionStarted` beyond is
/// refused (a desktop VM serves a handful).
pub const MAX_SESSIONS_PER_VM: usize = 256;

/// An open session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRec {
    /// The VM.
    pub vm: String,
    /// Session id.
    pub session: String,
    /// Its user.
    pub user: String,
    /// Its UA.
    pub ua: Option<String>,
    /// When it was first reported (Unix ms).
    pub started_ms: u64,
}

#[derive(Default)]
struct Seen {
    ids: HashSet<u64>,
    order: VecDeque<u64>,
}

#[derive(Default)]
struct Data {
    open: BTreeMap<(String, String), SessionRec>,
    seen: HashMap<String, Seen>,
    /// (vm, user) pairs whose session was open when the VM's connection
    /// was lost: that VM may hold changes of the user nobody committed.
    lost: HashSet<(String, String)>,
}

/// Session table.
#[derive(Default)]
pub struct Sessions {
    data: Mutex<Data>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, Data> {
        self.data.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a session (idempotent): `Some(true)` if it was new, `None`
    /// if `vm` already has [`MAX_SESSIONS_PER_VM`] open.
    pub fn started(&self, vm: &str, session: &str, user: &str, ua: Option<String>) -> Option<bool> {
        let key = (vm.to_string(), session.to_string());
        let mut d = self.lock();
        if d.open.contains_key(&key) {
            return Some(false);
        }
        let open_on_vm = d
            .open
            .range((vm.to_string(), String::new())..)
            .take_while(|((v, _), _)| v == vm)
            .count();
        if open_on_vm >= MAX_SESSIONS_PER_VM {
            return None;
        }
        d.open.insert(
            key,
            SessionRec {
                vm: vm.to_string(),
                session: session.to_string(),
                user: user.to_string(),
                ua,
                started_ms: now_ms(),
            },
        );
        Some(true)
    }

    /// The user of `session` if it is open on `vm`.
    pub fn user_of(&self, vm: &str, session: &str) -> Option<String> {
        self.lock()
            .open
            .get(&(vm.to_string(), session.to_string()))
            .map(|s| s.user.clone())
    }

    /// Removes a session; returns it if it was open.
    pub fn ended(&self, vm: &str, session: &str) -> Option<SessionRec> {
        self.lock()
            .open
            .remove(&(vm.to_string(), session.to_string()))
    }

    /// True the first time notice `id` from `vm` is seen.
    pub fn first_notice(&self, vm: &str, id: u64) -> bool {
        let mut d = self.lock();
        let seen = d.seen.entry(vm.to_string()).or_default();
        if !seen.ids.insert(id) {
            return false;
        }
        seen.order.push_back(id);
        if seen.order.len() > NOTICE_MEMORY
            && let Some(old) = seen.order.pop_front()
        {
            seen.ids.remove(&old);
        }
        true
    }

    /// Removes and returns every session of `vm`; with `lost`, remembers
    /// their users as possibly unflushed on that VM.
    pub fn drain_vm(&self, vm: &str, lost: bool) -> Vec<SessionRec> {
        let mut d = self.lock();
        let keys: Vec<_> = d.open.keys().filter(|(v, _)| v == vm).cloned().collect();
        let out: Vec<SessionRec> = keys.iter().filter_map(|k| d.open.remove(k)).collect();
        if lost {
            for s in &out {
                d.lost.insert((vm.to_string(), s.user.clone()));
            }
        }
        out
    }

    /// True (once) if `user` had a session on `vm` when `vm` was lost.
    pub fn take_lost(&self, vm: &str, user: &str) -> bool {
        self.lock().lost.remove(&(vm.to_string(), user.to_string()))
    }

    /// Forgets a lost-session mark (the VM committed or re-announced).
    pub fn clear_lost(&self, vm: &str, user: &str) {
        self.take_lost(vm, user);
    }

    /// All open sessions (optionally of one VM).
    pub fn list(&self, vm: Option<&str>) -> Vec<SessionRec> {
        self.lock()
            .open
            .values()
            .filter(|s| vm.is_none_or(|v| s.vm == v))
            .cloned()
            .collect()
    }

    /// True if `vm` has an open session of `user`.
    pub fn has_user(&self, vm: &str, user: &str) -> bool {
        self.lock()
            .open
            .values()
            .any(|s| s.vm == vm && s.user == user)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn sessions_and_notice_dedup() {
        let s = Sessions::default();
        assert_eq!(s.started("vm1", "s1", "alice", None), Some(true));
        assert_eq!(s.started("vm1", "s1", "alice", None), Some(false));
        assert_eq!(s.started("vm2", "s1", "bob", None), Some(true));
        assert!(s.has_user("vm1", "alice"));
        assert!(s.first_notice("vm1", 7));
        assert!(!s.first_notice("vm1", 7));
        assert!(s.first_notice("vm2", 7));
        assert_eq!(s.drain_vm("vm1", true).len(), 1);
        assert!(s.take_lost("vm1", "alice"));
        assert!(!s.take_lost("vm1", "alice"));
        assert_eq!(s.list(None).len(), 1);
        assert!(s.ended("vm2", "s1").is_some());
        assert!(s.ended("vm2", "s1").is_none());
    }

    #[test]
    fn sessions_per_vm_are_capped() {
        let s = Sessions::default();
        for i in 0..MAX_SESSIONS_PER_VM {
            assert_eq!(
                s.started("vm1", &format!("s{i}"), "alice", None),
                Some(true)
            );
        }
        assert_eq!(s.started("vm1", "one-more", "alice", None), None);
        assert_eq!(
            s.started("vm1", "s0", "alice", None),
            Some(false),
            "known: idempotent"
        );
        assert_eq!(
            s.started("vm10", "s0", "bob", None),
            Some(true),
            "another VM (a prefix) is not affected"
        );
        s.ended("vm1", "s0");
        assert_eq!(s.started("vm1", "one-more", "alice", None), Some(true));
    }
}
