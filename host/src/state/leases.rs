//! Writer leases: the fencing tokens of UVE-5. Every retrieve grant bumps
//! the user's lease epoch and names the VM holding it; a commit becomes
//! head only if it presents the current epoch from the holding VM.
//!
//! Epochs are globally increasing and persisted in `<data_dir>/leases.json`
//! so an agent's retry after a host restart still presents a valid lease
//! (and an old lease can never match a new grant). A per-user async gate
//! makes "check lease + commit" atomic against a concurrent grant.
//!
//! A lease follows the assignment: when the user is moved away from the
//! holding VM (once it has answered `UserRelease`, or did not in time) or
//! the VM is removed, the lease is revoked — nobody holds it until the
//! next grant, so the evicted VM's later updates land as conflict versions.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use crate::store::durable;
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

#[derive(Debug, Default, Serialize, Deserialize)]
struct LeaseData {
    next_epoch: u64,
    users: BTreeMap<String, UserLease>,
}

/// Lease table.
pub struct Leases {
    path: PathBuf,
    tmp: PathBuf,
    /// False for a table kept in memory only ([`Leases::in_memory`]).
    durable: bool,
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
            path,
            tmp: tmp.to_path_buf(),
            durable: true,
            data: Mutex::new(data),
            gates: NamedLocks::default(),
        })
    }

    /// An empty table that is never written anywhere (tests and the fuzz
    /// targets: a grant costs no fsync).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn in_memory() -> Self {
        Leases {
            path: PathBuf::new(),
            tmp: PathBuf::new(),
            durable: false,
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

    /// Grants a new lease on `user` to `vm` on the user's head `base`
    /// (durably) and returns its epoch.
    pub fn grant(&self, user: &str, vm: &str, base: Option<u64>) -> Result<u64, LeaseError> {
        let mut data = self.data.lock().unwrap_or_else(PoisonError::into_inner);
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
        self.save(&data)?;
        Ok(epoch)
    }

    fn save(&self, data: &LeaseData) -> Result<(), LeaseError> {
        if !self.durable {
            return Ok(());
        }
        let err = |why: String| LeaseError {
            path: self.path.display().to_string(),
            why,
        };
        let bytes = serde_json::to_vec_pretty(data).map_err(|e| err(e.to_string()))?;
        durable::write_atomic(&self.tmp, &self.path, &bytes).map_err(|e| err(e.to_string()))
    }

    /// Revokes `user`'s lease if `vm` holds it (durably): `vm` becomes a
    /// past holder and nobody holds the lease until the next grant.
    /// Returns whether it was revoked.
    pub fn revoke(&self, user: &str, vm: &str) -> Result<bool, LeaseError> {
        let mut data = self.data.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(entry) = data.users.get_mut(user) else {
            return Ok(false);
        };
        if entry.vm != vm {
            return Ok(false);
        }
        entry.vm = String::new();
        entry.past.retain(|p| p != vm);
        entry.past.push(vm.to_string());
        if entry.past.len() > PAST_HOLDERS {
            entry.past.remove(0);
        }
        self.save(&data)?;
        Ok(true)
    }

    /// Forgets `vm` in every lease, current or past (the VM was removed:
    /// a VM registered later under the same id inherits nothing).
    pub fn forget_vm(&self, vm: &str) -> Result<(), LeaseError> {
        let mut data = self.data.lock().unwrap_or_else(PoisonError::into_inner);
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
            self.save(&data)?;
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn epochs_increase_and_survive_reload() {
        let dir = tempfile::tempdir().unwrap();
        let l = Leases::load(dir.path(), dir.path()).unwrap();
        let a = l.grant("alice", "vm1", None).unwrap();
        assert!(l.is_current("alice", a, "vm1"));
        let b = l.grant("alice", "vm2", None).unwrap();
        assert!(b > a);
        assert!(!l.is_current("alice", a, "vm1"));
        assert!(l.held_by("alice", "vm1"));
        assert!(!l.held_by("alice", "vm3"));
        let l = Leases::load(dir.path(), dir.path()).unwrap();
        assert!(l.is_current("alice", b, "vm2"));
        assert!(l.grant("bob", "vm1", None).unwrap() > b);
    }

    #[test]
    fn revoked_leases_are_nobodys_and_survive_reload() {
        let dir = tempfile::tempdir().unwrap();
        let l = Leases::load(dir.path(), dir.path()).unwrap();
        let a = l.grant("alice", "vm1", None).unwrap();
        assert!(!l.revoke("alice", "vm2").unwrap(), "vm2 does not hold it");
        assert!(l.revoke("alice", "vm1").unwrap());
        assert!(!l.is_current("alice", a, "vm1"));
        assert!(
            l.held_by("alice", "vm1"),
            "a past holder may still send conflicts"
        );
        let l = Leases::load(dir.path(), dir.path()).unwrap();
        assert!(!l.is_current("alice", a, "vm1"));
        l.forget_vm("vm1").unwrap();
        assert!(!l.held_by("alice", "vm1"));
        let b = l.grant("alice", "vm1", None).unwrap();
        assert!(b > a && l.is_current("alice", b, "vm1"));
    }
}
