//! The live agent connection of each VM: at most one; a new connection
//! from a VM replaces (closes) the old one. Domain code reaches a VM's agent
//! through the [`LinkHandle`] stored here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use uve_protocol::link::LinkHandle;

/// What the API shows about a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnSummary {
    /// Connection number (per daemon run).
    pub conn_id: u64,
    /// Agent software version from `Hello`.
    pub agent_version: String,
    /// `CAP_*` bits from `Hello`.
    pub capabilities: u64,
    /// Boot id from `Hello`, hex.
    pub boot_id: String,
    /// Negotiated protocol version.
    pub protocol: u16,
    /// When it connected (Unix ms).
    pub connected_ms: u64,
}

/// A live connection.
#[derive(Clone)]
pub struct ConnEntry {
    /// Its summary.
    pub summary: ConnSummary,
    /// Handle for UVE-2 requests.
    pub handle: LinkHandle,
}

/// Live connections by VM id.
#[derive(Default)]
pub struct Conns {
    next_id: AtomicU64,
    map: Mutex<HashMap<String, ConnEntry>>,
}

impl Conns {
    /// A fresh connection number.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Installs `entry` as `vm`'s connection and closes the one it
    /// replaces. Connection ids are taken at accept time, so "newer" means
    /// accepted later: if a later connection finished its handshake first,
    /// this (older) one is closed instead and `false` is returned.
    pub fn install(&self, vm: &str, entry: ConnEntry) -> bool {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(cur) = map.get(vm)
            && cur.summary.conn_id > entry.summary.conn_id
        {
            drop(map);
            tracing::info!(
                vm,
                conn = entry.summary.conn_id,
                "superseded before it started"
            );
            entry.handle.close();
            return false;
        }
        let old = map.insert(vm.to_string(), entry);
        drop(map);
        if let Some(old) = old {
            tracing::info!(
                vm,
                old = old.summary.conn_id,
                "new connection replaces the old one"
            );
            old.handle.close();
        }
        true
    }

    /// Removes `vm`'s connection if it is still `conn_id`; true if removed.
    pub fn remove_if(&self, vm: &str, conn_id: u64) -> bool {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if map.get(vm).is_some_and(|e| e.summary.conn_id == conn_id) {
            map.remove(vm);
            true
        } else {
            false
        }
    }

    /// `vm`'s live connection.
    pub fn get(&self, vm: &str) -> Option<ConnEntry> {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(vm)
            .cloned()
    }

    /// All live connections.
    pub fn all(&self) -> Vec<(String, ConnEntry)> {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}
