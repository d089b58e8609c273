//! The handshake gate: how many accepted connections may be in the
//! handshake at once, per VM and in all. A guest that opens connections and
//! never speaks holds a file descriptor each until the handshake times out;
//! past its share such connections are closed at accept, so it cannot
//! starve `accept`, store reads or lease writes of the other VMs. A peer no
//! VM is registered for never gets here: it is closed at accept, unread.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bounds connections in the handshake.
pub struct HandshakeGate {
    per_vm_cap: usize,
    total: Arc<Semaphore>,
    per_vm: Mutex<HashMap<String, Arc<Semaphore>>>,
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
        }
    }

    /// A place for a connection of `vm`, or `None` if its share or the
    /// total is taken.
    pub fn admit(&self, vm: &str) -> Option<HandshakeTicket> {
        let share = self
            .per_vm
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(vm.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_vm_cap)))
            .clone();
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
        let a1 = gate.admit("a");
        let a2 = gate.admit("a");
        assert!(a1.is_some() && a2.is_some());
        assert!(gate.admit("a").is_none(), "a's share is taken");
        let b1 = gate.admit("b");
        assert!(b1.is_some(), "b has its own share");
        assert!(gate.admit("c").is_none(), "the total is taken");
        drop(a1);
        let c1 = gate.admit("c");
        assert!(c1.is_some(), "a freed place serves another VM");
        assert!(gate.admit("a").is_none(), "the total is taken again");
        drop(b1);
        assert!(gate.admit("a").is_some());
        let gate = HandshakeGate::new(1, 10);
        let _b = gate.admit("b");
        assert!(gate.admit("b").is_none(), "b's one place is taken");
        assert!(gate.admit("a").is_some(), "other VMs are not affected");
    }
}
