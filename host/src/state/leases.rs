//! Writer leases: the fencing tokens of UVE-5. Every retrieve grant bumps
//! the user's lease epoch and names the VM holding it; a commit becomes
//! head only if it presents the current epoch from the holding VM.
//!
//! Epochs are globally increasing and persisted in `<data_dir>/leases.json`
//! so an agent's retry after a host restart still presents a valid lease
//! (and an old lease can never match a new grant). A per-user async gate
//! makes "check lease + commit" atomic against a concurrent grant.
//!
//! A change is made in memory under the table's mutex, which async
//! handlers take too; the file is written by the table's one writer
//! ([`TableWriter`]) after the mutex is released, and each change returns
//! a [`Staged`] value that its caller awaits: a grant is answered only once
//! its generation is durable.
//!
//! A lease follows the assignment: when the user is moved away from the
//! holding VM (once it has answered `UserRelease`, or did not in time) or
//! the VM is removed, the lease is revoked — nobody holds it until the
//! next grant, so the evicted VM's later updates land as conflict versions.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};

use crate::state::table::{Snapshot, Staged, TableError, TableWriter};
use crate::store::locks::NamedLocks;

/// Previous holders remembered per user (they may still send a late update,
/// which is accepted and kept as a conflict version).
const PAST_HOLDERS: usize = 8;

/// One user's lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserLease {
    /// Current epoch.
    pub epoch: u64,
    /// VM holding it.
    pub vm: String,
    /// Earlier holders, newest last.
    pub past: Vec<String>,
    /// What the current epoch was granted on (absent in a lease file
    /// written before it was recorded: such a lease's bases are not
    /// checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granted: Option<Granted>,
}

/// The grant of a lease's current epoch: an update under it may become
/// head only if it is based on this version, or on one its VM committed
/// since (checkpoints, spooled re-deliveries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Granted {
    /// The head when the lease was granted (`None`: the user had none).
    pub base: Option<u64>,
    /// When it was granted (Unix ms).
    pub at_ms: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct LeaseData {
    next_epoch: u64,
    users: BTreeMap<String, UserLease>,
}

/// Lease table.
pub struct Leases {
    writer: Arc<TableWriter>,
    data: Mutex<LeaseData>,
    gates: NamedLocks<tokio::sync::Mutex<()>>,
}

/// Why the lease file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("lease file {path}: {why}")]
pub struct LeaseError {
    path: String,
    why: String,
}

impl From<TableError> for LeaseError {
    fn from(e: TableError) -> Self {
        LeaseError {
            path: e.path,
            why: e.why,
        }
    }
}

impl Leases {
    /// Loads `<data_dir>/leases.json` (empty if absent).
    pub fn load(data_dir: &Path, tmp: &Path) -> Result<Self, LeaseError> {
        let path = data_dir.join("leases.json");
        let err = |why: String| LeaseError {
            path: path.display().to_string(),
            why,
        };
        let mut data: LeaseData = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| err(e.to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => LeaseData::default(),
            Err(e) => return Err(err(e.to_string())),
        };
        data.next_epoch = data.next_epoch.max(1);
        Ok(Leases {
            writer: TableWriter::new(path, tmp.to_path_buf()),
            data: Mutex::new(data),
            gates: NamedLocks::default(),
        })
    }

    /// An empty table that is never written anywhere (tests and the fuzz
    /// targets: a grant costs no fsync).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn in_memory() -> Self {
        Leases {
            writer: TableWriter::in_memory(),
            data: Mutex::new(LeaseData {
                next_epoch: 1,
                users: BTreeMap::new(),
            }),
            gates: NamedLocks::default(),
        }
    }

    /// The per-user gate serialising grants and commits.
    pub fn gate(&self, user: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.gates.get(user)
    }

    fn lock(&self) -> MutexGuard<'_, LeaseData> {
        self.data.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hands the table as `data` holds it now to the writer (call it under
    /// the lock, right after the change).
    fn stage<V>(&self, data: &LeaseData, value: V) -> Staged<V> {
        self.writer.stage(value, || snapshot(data.clone()))
    }

    /// Grants a new lease on `user` to `vm` on the user's head `base` and
    /// returns its epoch once durable.
    pub fn grant(&self, user: &str, vm: &str, base: Option<u64>) -> Staged<u64> {
        let mut data = self.lock();
        let epoch = data.next_epoch;
        data.next_epoch += 1;
        let entry = data.users.entry(user.to_string()).or_insert(UserLease {
            epoch,
            vm: vm.to_string(),
            past: Vec::new(),
            granted: None,
        });
        if entry.vm != vm {
            let old = std::mem::replace(&mut entry.vm, vm.to_string());
            entry.past.retain(|p| *p != old && p != vm);
            if !old.is_empty() {
                entry.past.push(old);
            }
            if entry.past.len() > PAST_HOLDERS {
                entry.past.remove(0);
            }
        }
        entry.epoch = epoch;
        entry.granted = Some(Granted {
            base,
            at_ms: crate::store::now_ms(),
        });
        self.stage(&data, epoch)
    }

    /// Revokes `user`'s lease if `vm` holds it: `vm` becomes a past holder
    /// and nobody holds the lease until the next grant. Returns, once
    /// durable, whether it was revoked.
    pub fn revoke(&self, user: &str, vm: &str) -> Staged<bool> {
        let mut data = self.lock();
        let Some(entry) = data.users.get_mut(user) else {
            return self.writer.settled(false);
        };
        if entry.vm != vm {
            return self.writer.settled(false);
        }
        entry.vm = String::new();
        entry.past.retain(|p| p != vm);
        entry.past.push(vm.to_string());
        if entry.past.len() > PAST_HOLDERS {
            entry.past.remove(0);
        }
        self.stage(&data, true)
    }

    /// Forgets `vm` in every lease, current or past (the VM was removed:
    /// a VM registered later under the same id inherits nothing); done
    /// once durable.
    pub fn forget_vm(&self, vm: &str) -> Staged<()> {
        let mut data = self.lock();
        let mut changed = false;
        for entry in data.users.values_mut() {
            if entry.vm == vm {
                entry.vm = String::new();
                changed = true;
            }
            let before = entry.past.len();
            entry.past.retain(|p| p != vm);
            changed |= entry.past.len() != before;
        }
        if changed {
            self.stage(&data, ())
        } else {
            self.writer.settled(())
        }
    }

    /// The users whose current lease `vm` holds.
    pub fn users_held_by(&self, vm: &str) -> Vec<String> {
        self.data
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .users
            .iter()
            .filter(|(_, l)| !vm.is_empty() && l.vm == vm)
            .map(|(u, _)| u.clone())
            .collect()
    }

    /// The user's lease, if any.
    pub fn get(&self, user: &str) -> Option<UserLease> {
        self.data
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .users
            .get(user)
            .cloned()
    }

    /// True if `vm` holds `user`'s current lease with epoch `lease`.
    pub fn is_current(&self, user: &str, lease: u64, vm: &str) -> bool {
        self.get(user)
            .is_some_and(|l| l.epoch == lease && !vm.is_empty() && l.vm == vm)
    }

    /// True if `vm` holds or held a lease on `user`.
    pub fn held_by(&self, user: &str, vm: &str) -> bool {
        self.get(user)
            .is_some_and(|l| (!vm.is_empty() && l.vm == vm) || l.past.iter().any(|p| p == vm))
    }
}

/// The bytes of the lease file for `data`, made by the writer.
fn snapshot(data: LeaseData) -> Snapshot {
    Box::new(move || serde_json::to_vec_pretty(&data).map_err(|e| e.to_string()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn epochs_increase_and_survive_reload() {
        let dir = tempfile::tempdir().unwrap();
        let l = Leases::load(dir.path(), dir.path()).unwrap();
        let a = l.grant("alice", "vm1", None).durable_blocking().unwrap();
        assert!(l.is_current("alice", a, "vm1"));
        let b = l.grant("alice", "vm2", None).durable_blocking().unwrap();
        assert!(b > a);
        assert!(!l.is_current("alice", a, "vm1"));
        assert!(l.held_by("alice", "vm1"));
        assert!(!l.held_by("alice", "vm3"));
        let l = Leases::load(dir.path(), dir.path()).unwrap();
        assert!(l.is_current("alice", b, "vm2"));
        assert!(l.grant("bob", "vm1", None).durable_blocking().unwrap() > b);
    }

    #[test]
    fn revoked_leases_are_nobodys_and_survive_reload() {
        let dir = tempfile::tempdir().unwrap();
        let l = Leases::load(dir.path(), dir.path()).unwrap();
        let a = l.grant("alice", "vm1", None).durable_blocking().unwrap();
        assert!(
            !l.revoke("alice", "vm2").durable_blocking().unwrap(),
            "vm2 does not hold it"
        );
        assert!(l.revoke("alice", "vm1").durable_blocking().unwrap());
        assert!(!l.is_current("alice", a, "vm1"));
        assert!(
            l.held_by("alice", "vm1"),
            "a past holder may still send conflicts"
        );
        let l = Leases::load(dir.path(), dir.path()).unwrap();
        assert!(!l.is_current("alice", a, "vm1"));
        l.forget_vm("vm1").durable_blocking().unwrap();
        assert!(!l.held_by("alice", "vm1"));
        let b = l.grant("alice", "vm1", None).durable_blocking().unwrap();
        assert!(b > a && l.is_current("alice", b, "vm1"));
    }
}
