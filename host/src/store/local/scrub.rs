//! The local store's scrub: what protects its chunks against bit rot now
//! that a read no longer hashes them.
//!
//! Every indexed chunk is read, pack by pack in file order, and checked
//! against its hash, at a bounded rate so that the agents' logins and
//! logouts keep the disk. A chunk that fails is copied to `corrupt/`
//! (kept for the operator) and its pack is repacked without it: the chunk
//! is then missing, so the next upload that holds the same content — any
//! user's, thanks to deduplication — stores it again, where damaged bytes
//! left in place would be trusted by every upload that finds them
//! present. The zero block, which no agent ever uploads, is written again
//! at once. The report names the retained versions that refer to a
//! damaged chunk.

use std::collections::HashSet;
use std::fs;
use std::io::ErrorKind;
use std::sync::PoisonError;
use std::time::{Duration, Instant};

use uve_protocol::manifest::{Hash, ZERO_BLOCK};

use super::pack::read_entry;
use super::{LocalStore, lock};
use crate::store::{
    DAMAGED_LISTED, DamagedVersion, ScrubReport, StoreError, StoreResult, UifStore, check_chunk,
    keep_zero_block,
};

impl LocalStore {
    /// `UifStore::scrub` of this store.
    pub(super) fn scrub_chunks(
        &self,
        bytes_per_sec: u64,
        stop: &dyn Fn() -> bool,
    ) -> StoreResult<ScrubReport> {
        let started = Instant::now();
        let mut report = ScrubReport {
            complete: true,
            ..ScrubReport::default()
        };
        {
            let _gc = self.gc_lock.read().unwrap_or_else(PoisonError::into_inner);
            self.seal_loose()?;
        }
        let mut packs: Vec<_> = self
            .index
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .by_pack()
            .into_iter()
            .collect();
        packs.sort_by_key(|(id, _)| *id);
        let mut bad = HashSet::new();
        'packs: for (id, mut chunks) in packs {
            let file = match self.files.get(id) {
                Ok(f) => f,
                // Repacked or collected meanwhile.
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::io("open a pack to scrub", e)),
            };
            chunks.sort_by_key(|(_, l)| l.offset);
            let mut damaged = HashSet::new();
            for (hash, loc) in &chunks {
                if stop() {
                    report.complete = false;
                    break 'packs;
                }
                let data = read_entry(&file, loc.entry(*hash))
                    .map_err(|e| StoreError::io(format!("scrub pack {id:016x}"), e))?;
                report.scanned += 1;
                report.bytes += data.len() as u64;
                if check_chunk(hash, &data).is_err() {
                    tracing::error!(chunk = %hash, pack = id, "corrupt chunk: copied to corrupt/, dropped from its pack");
                    self.keep_damaged(hash, &data)?;
                    damaged.insert(*hash);
                }
                pace(started, report.bytes, bytes_per_sec);
            }
            if !damaged.is_empty() {
                report.corrupt += damaged.len() as u64;
                let _one = lock(&self.repacking);
                // What the pack holds now (a GC may have dropped chunks,
                // or repacked it: then the next scrub finds the damage in
                // its new pack).
                let index = self.index.read().unwrap_or_else(PoisonError::into_inner);
                let current = index.packs.contains_key(&id).then(|| {
                    index
                        .chunks
                        .iter()
                        .filter(|(h, l)| l.pack == id && !damaged.contains(*h))
                        .map(|(h, l)| (*h, *l))
                        .collect::<Vec<_>>()
                });
                drop(index);
                if let Some(live) = current {
                    self.repack(&[id], live)?;
                }
                if damaged.contains(&ZERO_BLOCK.hash) {
                    keep_zero_block(self)?;
                    self.seal_loose()?;
                }
                bad.extend(damaged);
            }
        }
        if !bad.is_empty() {
            self.list_damaged(&bad, &mut report)?;
        }
        Ok(report)
    }

    /// Keeps a damaged chunk's bytes in `corrupt/` for the operator.
    pub(super) fn keep_damaged(&self, hash: &Hash, data: &[u8]) -> StoreResult<()> {
        let dir = self.root.join("corrupt");
        fs::create_dir_all(&dir).map_err(|e| StoreError::io("create corrupt/", e))?;
        fs::write(dir.join(hash.to_hex()), data)
            .map_err(|e| StoreError::io("copy a corrupt chunk to corrupt/", e))
    }

    /// Adds the retained versions that refer to a chunk of `bad`.
    fn list_damaged(&self, bad: &HashSet<Hash>, report: &mut ScrubReport) -> StoreResult<()> {
        for user in self.users()? {
            for v in self.versions(&user)? {
                let m = self.manifest(&user, v.version)?;
                if m.chunks.iter().any(|c| bad.contains(&c.hash)) {
                    if report.damaged.len() < DAMAGED_LISTED {
                        report.damaged.push(DamagedVersion {
                            user: user.clone(),
                            version: v.version,
                        });
                    } else {
                        report.damaged_more += 1;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Sleeps as long as reading `bytes` since `started` was faster than
/// `bytes_per_sec` (0: no limit).
fn pace(started: Instant, bytes: u64, bytes_per_sec: u64) {
    if bytes_per_sec == 0 {
        return;
    }
    let due = Duration::from_secs_f64(bytes as f64 / bytes_per_sec as f64);
    if let Some(ahead) = due.checked_sub(started.elapsed()) {
        std::thread::sleep(ahead);
    }
}
