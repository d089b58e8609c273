//! Chunk pins: reference counts that keep chunks of uploads in flight safe
//! from garbage collection between `UpdatePage` (which tells the agent a
//! chunk is already present) and `UpdateCommit` (which references it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use uve_protocol::manifest::Hash;

/// Shared pin counts.
#[derive(Debug, Default)]
pub struct PinTable {
    counts: Mutex<HashMap<Hash, u32>>,
}

impl PinTable {
    /// Pins `hashes`; they stay pinned until the guard drops.
    pub fn pin(self: &Arc<Self>, hashes: &[Hash]) -> ChunkPins {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        for h in hashes {
            *counts.entry(*h).or_insert(0) += 1;
        }
        ChunkPins {
            table: self.clone(),
            hashes: hashes.to_vec(),
        }
    }

    /// True if `hash` is pinned.
    pub fn is_pinned(&self, hash: &Hash) -> bool {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(hash)
    }

    /// How many distinct chunks are pinned now.
    pub fn pinned(&self) -> usize {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// Guard of pinned chunks.
#[derive(Debug)]
pub struct ChunkPins {
    table: Arc<PinTable>,
    hashes: Vec<Hash>,
}

/// Pins released per hold of the table's lock: a large upload's release
/// never holds it long against `pin` and `is_pinned` callers.
const RELEASE_BATCH: usize = 4096;

impl Drop for ChunkPins {
    fn drop(&mut self) {
        for batch in self.hashes.chunks(RELEASE_BATCH) {
            let mut counts = self
                .table
                .counts
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for h in batch {
                if let Some(n) = counts.get_mut(h) {
                    *n -= 1;
                    if *n == 0 {
                        counts.remove(h);
                    }
                }
            }
        }
    }
}
