//! The handshake gate: how many accepted connections may be in the
//! handshake at once, per VM and in all. A guest that opens connections and
//! never speaks holds a file descriptor each until the handshake times out;
//! past its share such connections are closed at accept, so it cannot
//! starve `accept`, store reads or lease writes of the other VMs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bounds connections in the handshake.
pub struct HandshakeGate {
    per_vm_cap: usize,
    total: Arc<Semaphore>,
    per_vm: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// The one share of all peers no VM is registered for.
    unknown: Arc<Semaphore>,
}

/// A connection's place in the handshake; dropping it frees the place.
pub struct HandshakeTicket {
    _total: OwnedSemaphorePermit,
    _vm: OwnedSemaphorePermit,
}

impl HandshakeGate {
    /// A gate admitting `per_vm` handshakes per VM and `total` in all (both
    /// at least 1).
    pub fn new(per_vm: usize, total: usize) -> Self {
        HandshakeGate {
            per_vm_cap: per_vm.max(1),
            total: Arc::new(Semaphore::new(total.clamp(1, Semaphore::MAX_PERMITS))),
            per_vm: Mutex::new(HashMap::new()),
            unknown: Arc::new(Semaphore::new(per_vm.max(1))),
        }
    }

    /// A place for a connection of `vm` (`None`: a peer no VM is registered
    /// for; all such peers share one VM's share), or `None` if the share or
    /// the total is taken.
    pub fn admit(&self, vm: Option<&str>) -> Option<HandshakeTicket> {
        let share = match vm {
            Some(id) => self
                .per_vm
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(id.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_vm_cap)))
                .clone(),
            None => self.unknown.clone(),
        };
        let vm_permit = share.try_acquire_owned().ok()?;
        let total = self.total.clone().try_acquire_owned().ok()?;
        Some(HandshakeTicket {
            _total: total,
            _vm: vm_permit,
        })
    }

    /// Forgets `vm`'s share (the VM was removed).
    pub fn forget(&self, vm: &str) {
        self.per_vm
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(vm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_per_vm_and_in_all() {
        let gate = HandshakeGate::new(2, 3);
        let a1 = gate.admit(Some("a"));
        let a2 = gate.admit(Some("a"));
        assert!(a1.is_some() && a2.is_some());
        assert!(gate.admit(Some("a")).is_none(), "a's share is taken");
        let b1 = gate.admit(Some("b"));
        assert!(b1.is_some(), "b has its own share");
        assert!(gate.admit(Some("c")).is_none(), "the total is taken");
        drop(a1);
        let u1 = gate.admit(None);
        assert!(u1.is_some(), "a freed place serves unknown peers");
        assert!(gate.admit(Some("a")).is_none(), "the total is taken again");
        drop(b1);
        assert!(gate.admit(Some("a")).is_some());
        let gate = HandshakeGate::new(1, 10);
        let _u = gate.admit(None);
        assert!(gate.admit(None).is_none(), "unknown peers share one share");
        assert!(
            gate.admit(Some("a")).is_some(),
            "known VMs are not affected"
        );
    }
}
