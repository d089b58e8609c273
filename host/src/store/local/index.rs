//! The local store's chunk index: where every stored chunk sits (pack,
//! offset, length), rebuilt at open from the packs' own indexes and kept in
//! memory (about 60 bytes per chunk: some 1 GiB per 16 M chunks, i.e. per
//! TiB of 64 KiB chunks). Also the cache of open pack files readers share.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use uve_protocol::manifest::Hash;

use super::pack::{self, Entry};
use crate::store::{StoreError, StoreResult};

/// Open pack files kept for reads; past it the cache starts over.
const OPEN_PACKS: usize = 256;

/// Where a stored chunk's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Loc {
    /// The pack.
    pub(super) pack: u64,
    /// Offset of the chunk's bytes in it.
    pub(super) offset: u64,
    /// The chunk's length.
    pub(super) len: u32,
}

impl Loc {
    /// The pack entry this location names.
    pub(super) fn entry(self, hash: Hash) -> Entry {
        Entry {
            hash,
            offset: self.offset,
            len: self.len,
        }
    }
}

/// What the index knows of a pack.
#[derive(Debug, Clone, Copy)]
pub(super) struct PackInfo {
    /// Bytes of every chunk in the pack, live or not.
    pub(super) data_bytes: u64,
    /// When its last chunk was written: the age GC's grace is measured
    /// from.
    pub(super) mtime: SystemTime,
}

/// Every stored chunk's place, and the packs.
#[derive(Default)]
pub(super) struct Index {
    /// The chunks GC has not dropped. A chunk held by two packs (two
    /// uploads raced, a repack crashed before deleting its sources) is
    /// indexed in one; the other copy is dead weight a repack removes.
    pub(super) chunks: HashMap<Hash, Loc>,
    /// The sealed packs.
    pub(super) packs: BTreeMap<u64, PackInfo>,
    next_id: u64,
}

impl Index {
    /// Reads the index of every pack under `dir`. A sealed pack whose
    /// index is unreadable is scanned instead (each chunk checked).
    pub(super) fn load(dir: &Path) -> StoreResult<Index> {
        let mut index = Index::default();
        let entries = fs::read_dir(dir).map_err(|e| StoreError::io("list packs", e))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(pack::parse_name) else {
                continue;
            };
            let path = entry.path();
            let f = File::open(&path).map_err(|e| StoreError::io("open a pack", e))?;
            let chunks = match pack::read_index(&f).map_err(|e| StoreError::io("read a pack", e))? {
                Ok(c) => c,
                Err(why) => {
                    let (c, _) = pack::scan(&f).map_err(|e| StoreError::io("scan a pack", e))?;
                    tracing::warn!(pack = %path.display(), why, kept = c.len(), "pack index unreadable: chunks read one by one");
                    c
                }
            };
            let mtime = f
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or_else(|_| SystemTime::now());
            index.add(id, &chunks, mtime);
            index.next_id = index.next_id.max(id.saturating_add(1));
        }
        Ok(index)
    }

    /// A fresh pack id.
    pub(super) fn reserve_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id - 1
    }

    /// Adds a sealed pack's chunks (those not indexed already).
    pub(super) fn add(&mut self, id: u64, entries: &[Entry], mtime: SystemTime) {
        for e in entries {
            self.chunks.entry(e.hash).or_insert(Loc {
                pack: id,
                offset: e.offset,
                len: e.len,
            });
        }
        self.add_pack(id, entries, mtime);
    }

    /// Records a sealed pack holding `entries` (its chunks are indexed by
    /// the caller).
    pub(super) fn add_pack(&mut self, id: u64, entries: &[Entry], mtime: SystemTime) {
        let data_bytes = entries.iter().map(|e| u64::from(e.len)).sum();
        self.packs.insert(id, PackInfo { data_bytes, mtime });
        self.next_id = self.next_id.max(id.saturating_add(1));
    }

    /// The indexed chunks grouped by pack.
    pub(super) fn by_pack(&self) -> HashMap<u64, Vec<(Hash, Loc)>> {
        let mut out: HashMap<u64, Vec<(Hash, Loc)>> = HashMap::new();
        for (h, loc) in &self.chunks {
            out.entry(loc.pack).or_default().push((*h, *loc));
        }
        out
    }
}

/// Open pack files, shared by readers. A reader keeps its `Arc<File>`
/// while it reads, so a pack deleted meanwhile (repacked) stays readable.
pub(super) struct PackFiles {
    dir: PathBuf,
    open: Mutex<HashMap<u64, Arc<File>>>,
}

impl PackFiles {
    /// The cache of the packs in `dir`.
    pub(super) fn new(dir: PathBuf) -> PackFiles {
        PackFiles {
            dir,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// A pack's path.
    pub(super) fn path(&self, id: u64) -> PathBuf {
        self.dir.join(pack::file_name(id))
    }

    /// The open pack `id` (`NotFound` once it is deleted).
    pub(super) fn get(&self, id: u64) -> io::Result<Arc<File>> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(f) = open.get(&id) {
            return Ok(f.clone());
        }
        let f = Arc::new(File::open(self.path(id))?);
        if open.len() >= OPEN_PACKS {
            open.clear();
        }
        open.insert(id, f.clone());
        Ok(f)
    }

    /// Closes pack `id` (before it is deleted).
    pub(super) fn forget(&self, id: u64) {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }
}
