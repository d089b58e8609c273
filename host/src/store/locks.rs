//! A lock per name, made on first use and kept (one per user at most):
//! the local store's commit locks and the leases' per-user gates.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Locks of type `L` by name.
pub struct NamedLocks<L>(Mutex<HashMap<String, Arc<L>>>);

impl<L> Default for NamedLocks<L> {
    fn default() -> Self {
        NamedLocks(Mutex::new(HashMap::new()))
    }
}

impl<L: Default> NamedLocks<L> {
    /// The lock of `name`: the same one for every call with that name.
    pub fn get(&self, name: &str) -> Arc<L> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(name.to_string())
            .or_default()
            .clone()
    }
}
