//! What the local store finds at open besides its packs: the unsealed
//! packs of an interrupted run, and the files of the earlier layout (one
//! file per chunk), which it migrates into packs in place.
//!
//! An unsealed pack keeps its intact chunks (each checked against its
//! hash, up to the first torn one): they are sealed into a pack, so an
//! agent's retry resends only what was lost, and GC takes those no commit
//! refers to after its grace. The earlier layout's chunk files are
//! checked, copied into packs of at most [`MIGRATE_PACK`] bytes, and
//! deleted once their pack is sealed: a crash in between leaves both, and
//! the next open migrates the files again (the copy GC finds twice goes at
//! a repack). A damaged chunk file is moved to `corrupt/`; a torn staged
//! one (never made durable) is deleted.

use std::fs;
use std::path::{Path, PathBuf};

use uve_protocol::manifest::Hash;

use super::LocalStore;
use super::pack::PackWriter;
use crate::store::{StoreError, StoreResult, check_chunk};

/// Bytes of chunks per pack a migration writes.
const MIGRATE_PACK: u64 = 1 << 30;

/// Where a chunk file of the earlier layout came from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// `chunks/`: durable; damage is bit rot.
    Stored,
    /// `staging/`: maybe torn by an OS crash.
    Staged,
}

impl LocalStore {
    /// Adopts unsealed packs and migrates the earlier layout. Returns how
    /// many files were dropped (torn, damaged, temp leftovers).
    pub(super) fn adopt_leftovers(&self) -> StoreResult<usize> {
        let mut dropped = 0;
        let mut files = Vec::new();
        let entries: Vec<_> = fs::read_dir(&self.staging)
            .map_err(|e| StoreError::io("list staging directory", e))?
            .flatten()
            .collect();
        for entry in entries {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                // A stage of the earlier layout.
                for f in fs::read_dir(&path).into_iter().flatten().flatten() {
                    files.push((f.path(), Origin::Staged));
                }
            } else if name.ends_with(".pack") {
                self.adopt_pack(&path)?;
            } else if Hash::from_hex(&name).is_some() {
                files.push((path, Origin::Staged));
            } else {
                let _ = fs::remove_file(&path);
                dropped += 1;
            }
        }
        let old = self.root.join("chunks");
        if old.is_dir() {
            for prefix in fs::read_dir(&old).into_iter().flatten().flatten() {
                for f in fs::read_dir(prefix.path()).into_iter().flatten().flatten() {
                    files.push((f.path(), Origin::Stored));
                }
            }
        }
        if !files.is_empty() {
            tracing::info!(
                files = files.len(),
                "migrating chunk files of the earlier layout into packs"
            );
            dropped += self.migrate(&files)?;
        }
        // What is left: emptied stage directories, chunks/ and its prefixes.
        for entry in fs::read_dir(&self.staging).into_iter().flatten().flatten() {
            if entry.path().is_dir() {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
        if old.is_dir() {
            fs::remove_dir_all(&old).map_err(|e| StoreError::io("remove chunks/", e))?;
        }
        Ok(dropped)
    }

    /// Seals the intact chunks of an unsealed pack.
    fn adopt_pack(&self, path: &Path) -> StoreResult<()> {
        let w = PackWriter::resume(path).map_err(|e| StoreError::io("read an unsealed pack", e))?;
        tracing::info!(pack = %path.display(), chunks = w.entries().len(), "adopting the chunks of an interrupted upload");
        self.install(w)
    }

    /// Copies chunk files into packs, deleting each once its pack is
    /// sealed; returns how many were dropped.
    fn migrate(&self, files: &[(PathBuf, Origin)]) -> StoreResult<usize> {
        let mut dropped = 0;
        let mut w = self.new_writer("migrate")?.temporary();
        let mut batch = Vec::new();
        for (path, origin) in files {
            let Some(hash) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(Hash::from_hex)
            else {
                let _ = fs::remove_file(path);
                dropped += 1;
                continue;
            };
            let data = fs::read(path)
                .map_err(|e| StoreError::io(format!("migrate {}", path.display()), e))?;
            if check_chunk(&hash, &data).is_err() {
                dropped += 1;
                if *origin == Origin::Stored {
                    tracing::error!(chunk = %hash, "corrupt chunk file: moved to corrupt/");
                    self.keep_corrupt(&hash, path)?;
                } else {
                    let _ = fs::remove_file(path);
                }
                continue;
            }
            w.append(&hash, &data)
                .map_err(|e| StoreError::io("write a migrated chunk", e))?;
            batch.push(path.clone());
            if w.data_bytes() >= MIGRATE_PACK {
                self.install(w)?;
                remove_all(&mut batch);
                w = self.new_writer("migrate")?.temporary();
            }
        }
        self.install(w)?;
        remove_all(&mut batch);
        Ok(dropped)
    }

    /// Moves a damaged chunk file to `corrupt/` for the operator (an
    /// error stops the open: the file is never deleted).
    fn keep_corrupt(&self, hash: &Hash, path: &Path) -> StoreResult<()> {
        let dir = self.root.join("corrupt");
        fs::create_dir_all(&dir).map_err(|e| StoreError::io("create corrupt/", e))?;
        fs::rename(path, dir.join(hash.to_hex()))
            .map_err(|e| StoreError::io("move a corrupt chunk file to corrupt/", e))
    }
}

fn remove_all(batch: &mut Vec<PathBuf>) {
    for p in batch.drain(..) {
        let _ = fs::remove_file(p);
    }
}
