//! The handshake gate: how many accepted connections may be in the
//! handshake at once, per VM and in all. A guest that opens connections and
//! never speaks holds a file descriptor each until the handshake times out;
//! past its share such connections are closed at accept, so it cannot
//! starve `accept`, store reads or lease writes of the other VMs. A peer no
//! VM is registered for never gets here: it is closed at accept, unread.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Which handshake limit a connection met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// Its VM's places (`max_handshakes_per_vm`) are taken.
    Vm(usize),
    /// All places (`max_handshakes`) are taken.
    Total(usize),
}

/// Bounds connections in the handshake.
pub struct HandshakeGate {
    per_vm_cap: usize,
    total_cap: usize,
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
        let total_cap = total.clamp(1, Semaphore::MAX_PERMITS);
        HandshakeGate {
            per_vm_cap: per_vm.max(1),
            total_cap,
            total: Arc::new(Semaphore::new(total_cap)),
            per_vm: Mutex::new(HashMap::new()),
        }
    }

    /// A place for a connection of `vm`, or which limit is reached.
    pub fn admit(&self, vm: &str) -> Result<HandshakeTicket, Full> {
        let share = self
            .per_vm
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(vm.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_vm_cap)))
            .clone();
        let vm_permit = share
            .try_acquire_owned()
            .map_err(|_| Full::Vm(self.per_vm_cap))?;
        let total = self
            .total
            .clone()
            .try_acquire_owned()
            .map_err(|_| Full::Total(self.total_cap))?;
        Ok(HandshakeTicket {
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
        assert!(a1.is_ok() && a2.is_ok());
        assert_eq!(
            gate.admit("a").err(),
            Some(Full::Vm(2)),
            "a's share is taken"
        );
        let b1 = gate.admit("b");
        assert!(b1.is_ok(), "b has its own share");
        assert_eq!(
            gate.admit("c").err(),
            Some(Full::Total(3)),
            "the total is taken"
        );
        drop(a1);
        let c1 = gate.admit("c");
        assert!(c1.is_ok(), "a freed place serves another VM");
        assert!(gate.admit("a").is_err(), "the total is taken again");
        drop(b1);
        assert!(gate.admit("a").is_ok());
        let gate = HandshakeGate::new(1, 10);
        let _b = gate.admit("b");
        assert!(gate.admit("b").is_err(), "b's one place is taken");
        assert!(gate.admit("a").is_ok(), "other VMs are not affected");
    }
}
