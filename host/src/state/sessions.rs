//! Sessions open on each VM as the agents report them (at most
//! `max_sessions_per_vm` per VM), and de-duplication of
//! unexpected-disconnect notices by `(vm, id)` (bounded memory: the last
//! `notice_ids_per_vm` ids per VM).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use crate::store::now_ms;

/// What [`Sessions::first_notice`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoticeSeen {
    /// The id was seen before: a redelivery.
    Repeat,
    /// The first time; `forgot` if the VM's oldest remembered id was
    /// forgotten to make room.
    First {
        /// An older id was forgotten.
        forgot: bool,
    },
}

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
pub struct Sessions {
    max_per_vm: usize,
    notice_ids: usize,
    data: Mutex<Data>,
}

impl Default for Sessions {
    /// The defaults: 256 sessions and 4096 notice ids per VM.
    fn default() -> Self {
        Sessions::new(256, 4096)
    }
}

impl Sessions {
    /// A table allowing `max_per_vm` open sessions per VM and remembering
    /// `notice_ids` notice ids per VM (each at least 1).
    pub fn new(max_per_vm: usize, notice_ids: usize) -> Self {
        Sessions {
            max_per_vm: max_per_vm.max(1),
            notice_ids: notice_ids.max(1),
            data: Mutex::new(Data::default()),
        }
    }

    /// Sessions one VM may have open.
    pub fn max_per_vm(&self) -> usize {
        self.max_per_vm
    }

    /// True if `session` is open on `vm`.
    pub fn is_open(&self, vm: &str, session: &str) -> bool {
        self.lock()
            .open
            .contains_key(&(vm.to_string(), session.to_string()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Data> {
        self.data.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a session (idempotent): `Some(true)` if it was new, `None`
    /// if `vm` already has its maximum open.
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
        if open_on_vm >= self.max_per_vm {
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

    /// True if notice `id` from `vm` was seen (and is still remembered).
    pub fn notice_seen(&self, vm: &str, id: u64) -> bool {
        self.lock()
            .seen
            .get(vm)
            .is_some_and(|s| s.ids.contains(&id))
    }

    /// Whether notice `id` from `vm` is seen for the first time.
    pub fn first_notice(&self, vm: &str, id: u64) -> NoticeSeen {
        let cap = self.notice_ids;
        let mut d = self.lock();
        let seen = d.seen.entry(vm.to_string()).or_default();
        if !seen.ids.insert(id) {
            return NoticeSeen::Repeat;
        }
        seen.order.push_back(id);
        let mut forgot = false;
        if seen.order.len() > cap
            && let Some(old) = seen.order.pop_front()
        {
            seen.ids.remove(&old);
            forgot = true;
        }
        NoticeSeen::First { forgot }
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
        let first = NoticeSeen::First { forgot: false };
        assert_eq!(s.first_notice("vm1", 7), first);
        assert_eq!(s.first_notice("vm1", 7), NoticeSeen::Repeat);
        assert_eq!(s.first_notice("vm2", 7), first);
        let small = Sessions::new(2, 2);
        assert_eq!(small.first_notice("vm1", 1), first);
        assert_eq!(small.first_notice("vm1", 2), first);
        assert_eq!(
            small.first_notice("vm1", 3),
            NoticeSeen::First { forgot: true }
        );
        assert_eq!(
            small.first_notice("vm1", 1),
            NoticeSeen::First { forgot: true },
            "1 was forgotten"
        );
        assert_eq!(s.drain_vm("vm1", true).len(), 1);
        assert!(s.take_lost("vm1", "alice"));
        assert!(!s.take_lost("vm1", "alice"));
        assert_eq!(s.list(None).len(), 1);
        assert!(s.ended("vm2", "s1").is_some());
        assert!(s.ended("vm2", "s1").is_none());
    }

    #[test]
    fn sessions_per_vm_are_capped() {
        let s = Sessions::new(256, 16);
        for i in 0..256 {
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
