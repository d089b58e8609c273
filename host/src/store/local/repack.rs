//! The local store's GC: drops dead chunks from the index, then reclaims
//! their space by rewriting packs.
//!
//! A chunk is dead when no retained version refers to it, no upload pins
//! it, and neither its pack's last write nor an upload's last dedup hit
//! on it is younger than the grace. Deciding that takes the GC lock
//! exclusively (no version becomes visible meanwhile), as before packs.
//! Space follows without that lock: a pack with no live chunk is deleted,
//! a pack at most half live is repacked (its live chunks copied to a new
//! pack, the index switched over, the old file deleted; readers holding
//! the old file finish on it), and small packs older than the grace are
//! merged, so that many small logouts do not leave a file each forever.
//! A repack never decides liveness: it moves what the index holds, so an
//! upload that finds a chunk present during one still finds it after.
//!
//! A crash in a repack leaves the old pack beside the new one: the chunks
//! are then held twice (one copy indexed), and a later repack drops the
//! other.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::ErrorKind;
use std::sync::PoisonError;
use std::time::{Duration, SystemTime};

use uve_protocol::manifest::{Hash, ZERO_BLOCK};

use super::index::Loc;
use super::pack::read_entry;
use super::{LocalStore, lock};
use crate::store::{GcReport, StoreError, StoreResult, UifStore, check_chunk, durable};

/// Packs smaller than this (bytes of chunks) are merged once GC finds
/// [`MERGE_AT_LEAST`] of them older than its grace.
const SMALL_PACK: u64 = 8 << 20;
/// How many small packs make a merge worth its copy.
const MERGE_AT_LEAST: usize = 8;

/// The packs a GC rewrites: each entry is one new pack made of the live
/// chunks of the listed old ones.
type Plan = Vec<(Vec<u64>, Vec<(Hash, Loc)>)>;

impl LocalStore {
    /// `UifStore::gc` of this store.
    pub(super) fn collect(&self, grace: Duration) -> StoreResult<GcReport> {
        let _one = lock(&self.repacking);
        let mut report = GcReport::default();
        let (empty, plan) = {
            let _gc = self.gc_lock.write().unwrap_or_else(PoisonError::into_inner);
            self.seal_loose()?;
            let referenced = self.referenced()?;
            let now = SystemTime::now();
            let young = |t: SystemTime| now.duration_since(t).map_or(true, |age| age < grace);
            let mut touched = lock(&self.touched);
            touched.retain(|_, t| young(*t));
            let mut index = self.index.write().unwrap_or_else(PoisonError::into_inner);
            let mut dead = Vec::new();
            for (h, loc) in &index.chunks {
                report.scanned += 1;
                if referenced.contains(h) {
                    report.referenced += 1;
                    continue;
                }
                let pack_young = index.packs.get(&loc.pack).is_none_or(|p| young(p.mtime));
                if pack_young || touched.contains_key(h) || self.pins.is_pinned(h) {
                    report.spared += 1;
                    continue;
                }
                dead.push(*h);
            }
            for h in dead {
                if let Some(loc) = index.chunks.remove(&h) {
                    report.deleted += 1;
                    report.bytes_freed += u64::from(loc.len);
                }
            }
            plan(&mut index, &young)
        };
        for id in &empty {
            self.delete_pack(*id)?;
        }
        if !empty.is_empty() {
            durable::sync_dir(&self.packs_dir).map_err(|e| StoreError::io("sync packs/", e))?;
        }
        for (ids, live) in plan {
            self.repack(&ids, live)?;
        }
        Ok(report)
    }

    /// Every chunk a retained version refers to, and the zero block.
    fn referenced(&self) -> StoreResult<HashSet<Hash>> {
        let mut referenced: HashSet<Hash> = HashSet::new();
        for user in self.users()? {
            for v in self.versions(&user)? {
                let m = self.manifest(&user, v.version)?;
                referenced.extend(m.chunks.iter().map(|c| c.hash));
            }
        }
        referenced.insert(ZERO_BLOCK.hash);
        Ok(referenced)
    }

    /// Copies the chunks `live` (indexed in the packs `ids`) to one new
    /// pack, switches the index to it and deletes the old packs. Chunks of
    /// those packs not in `live` are gone with them. Called under the
    /// repack lock.
    pub(super) fn repack(&self, ids: &[u64], mut live: Vec<(Hash, Loc)>) -> StoreResult<()> {
        let mtime = {
            let index = self.index.read().unwrap_or_else(PoisonError::into_inner);
            ids.iter()
                .filter_map(|id| index.packs.get(id).map(|p| p.mtime))
                .max()
        };
        live.sort_by_key(|(_, l)| (l.pack, l.offset));
        let mut w = self.new_writer("repack")?.temporary();
        for (h, loc) in &live {
            let f = self
                .files
                .get(loc.pack)
                .map_err(|e| StoreError::io("open a pack to repack", e))?;
            let data = read_entry(&f, loc.entry(*h))
                .map_err(|e| StoreError::io("read a chunk to repack", e))?;
            // Checked as it is copied (a scrub's work for free): a damaged
            // chunk is not carried into the new pack, so it goes missing
            // and the next upload of that content stores it again.
            if check_chunk(h, &data).is_err() {
                tracing::error!(chunk = %h, pack = loc.pack, "corrupt chunk found while repacking: dropped");
                self.keep_damaged(h, &data)?;
                continue;
            }
            w.append(h, &data)
                .map_err(|e| StoreError::io("write a repacked chunk", e))?;
        }
        if let Some(t) = mtime {
            w.set_last_write(t);
        }
        let moved: HashMap<Hash, Loc> = live
            .into_iter()
            .filter(|(h, _)| w.get(h).is_some())
            .collect();
        let new_id = if w.entries().is_empty() {
            w.abandon()
                .map_err(|e| StoreError::io("delete an empty pack", e))?;
            None
        } else {
            let id = self
                .index
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .reserve_id();
            let entries = w
                .seal(&self.files.path(id))
                .map_err(|e| StoreError::io("seal a repacked pack", e))?;
            durable::sync_dir(&self.packs_dir).map_err(|e| StoreError::io("sync packs/", e))?;
            Some((id, entries))
        };
        {
            let mut index = self.index.write().unwrap_or_else(PoisonError::into_inner);
            let old: HashSet<u64> = ids.iter().copied().collect();
            index
                .chunks
                .retain(|h, l| !old.contains(&l.pack) || moved.contains_key(h));
            if let Some((id, entries)) = &new_id {
                index.add_pack(*id, entries, mtime.unwrap_or_else(SystemTime::now));
                for e in entries {
                    if let Some(l) = index.chunks.get_mut(&e.hash)
                        && old.contains(&l.pack)
                    {
                        *l = Loc {
                            pack: *id,
                            offset: e.offset,
                            len: e.len,
                        };
                    }
                }
            }
        }
        for id in ids {
            self.delete_pack(*id)?;
        }
        durable::sync_dir(&self.packs_dir).map_err(|e| StoreError::io("sync packs/", e))
    }

    /// Forgets pack `id` and deletes its file (the file first: a reader
    /// that opens it after its name is gone gets `NotFound` and looks the
    /// chunk up again, and no cached descriptor keeps the space).
    fn delete_pack(&self, id: u64) -> StoreResult<()> {
        self.index
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .packs
            .remove(&id);
        let removed = match fs::remove_file(self.files.path(id)) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(StoreError::io("delete a pack", e)),
            _ => Ok(()),
        };
        self.files.forget(id);
        removed
    }
}

/// Decides, from the index after dead chunks are dropped, which packs go
/// (no live chunk) and which are rewritten: each pack at most half live,
/// alone; small packs older than the grace, together.
fn plan(index: &mut super::index::Index, young: &dyn Fn(SystemTime) -> bool) -> (Vec<u64>, Plan) {
    let mut by_pack = index.by_pack();
    let mut empty = Vec::new();
    let mut plan = Plan::new();
    let mut small: (Vec<u64>, Vec<(Hash, Loc)>) = (Vec::new(), Vec::new());
    for (id, info) in &index.packs {
        let Some(live) = by_pack.remove(id) else {
            empty.push(*id);
            continue;
        };
        let live_bytes: u64 = live.iter().map(|(_, l)| u64::from(l.len)).sum();
        if live_bytes.saturating_mul(2) <= info.data_bytes {
            plan.push((vec![*id], live));
        } else if info.data_bytes < SMALL_PACK && !young(info.mtime) {
            small.0.push(*id);
            small.1.extend(live);
        }
    }
    if small.0.len() >= MERGE_AT_LEAST {
        plan.push(small);
    }
    (empty, plan)
}
