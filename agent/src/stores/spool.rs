//! The offline spool: every update is journalled here *before* it is sent
//! (entry = JSON record + postcard manifest; the UIF file itself stays in
//! place), and removed once the host has committed it or kept it as a
//! conflict version. So an update survives the host being down, the
//! connection dropping mid-upload and the agent being killed; it is
//! delivered after the next handshake.
//!
//! "Spooled" means durable: the flush fsyncs the UIF file before it adds
//! the entry, and the entry's manifest and record are fsynced in that
//! order (the record's presence makes the entry valid). The record names
//! the kernel boot it was written in: after a VM restart the file is
//! checked chunk by chunk against the manifest, and a file that no longer
//! matches (torn by a power loss, or written after spooling) is sent only
//! as a conflict version, never as the user's head.
//!
//! An entry the host refuses for good leaves the spool only after its file
//! was moved into the preserved area ([`super::preserve`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uve_protocol::manifest::Manifest;
use uve_protocol::message::{UpdateCause, Version};
use uve_protocol::names::{SessionId, UserName};

use super::records::Records;
use crate::base::fsutil;

/// One pending update.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpoolEntry {
    /// Unique id (also the file name).
    pub id: u64,
    /// Whose UIF.
    pub user: UserName,
    /// The session it came from.
    pub session: SessionId,
    /// Version it was derived from.
    pub base: Option<Version>,
    /// Lease epoch of the retrieve.
    pub lease: u64,
    /// Why it was made.
    pub cause: UpdateCause,
    /// The UIF file whose content the manifest describes.
    pub file: PathBuf,
    /// When it was spooled (Unix ms).
    pub created: u64,
    /// The kernel boot id when it was spooled (`None`: unknown, treated as
    /// another boot).
    #[serde(default)]
    pub boot: Option<String>,
}

impl SpoolEntry {
    /// True if the entry was spooled during an earlier boot of the VM (or
    /// the boot is unknown): its file may have been torn by a crash since.
    pub fn from_earlier_boot(&self) -> bool {
        self.boot.is_none() || self.boot != crate::base::fsutil::kernel_boot()
    }
}

/// The spool directory, with an in-memory index of its records (read once
/// at start: the outbox asks for it every round). File work runs on
/// blocking threads.
#[derive(Debug, Clone)]
pub struct Spool {
    records: Records<SpoolEntry>,
}

impl Spool {
    /// The spool under `state_dir`, its records loaded.
    pub fn load(state_dir: &Path) -> Spool {
        let records = Records::load(state_dir.join("spool"), |e: SpoolEntry| (e.id, e));
        Spool { records }
    }

    fn index(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, SpoolEntry>> {
        self.records.index()
    }

    /// Journals `entry` durably: manifest first, then the record (whose
    /// presence makes the entry valid). Replaces an entry of the same id.
    pub async fn add(&self, entry: &SpoolEntry, manifest: &Manifest) -> std::io::Result<()> {
        let bytes = postcard::to_stdvec(manifest).map_err(std::io::Error::other)?;
        let e2 = entry.clone();
        let (mpath, rpath) = (self.manifest_path(entry.id), self.record_path(entry.id));
        self.records
            .add(entry.id, entry, move || {
                fsutil::atomic_write(&mpath, &bytes)?;
                fsutil::write_json(&rpath, &e2)
            })
            .await
    }

    /// All entries, oldest first.
    pub fn list(&self) -> Vec<SpoolEntry> {
        self.records.sorted_by_key(|e| (e.created, e.id))
    }

    /// Entries of one user, oldest first.
    pub fn for_user(&self, user: &str) -> Vec<SpoolEntry> {
        self.list().into_iter().filter(|e| e.user == user).collect()
    }

    /// True if entry `id` is still pending.
    pub fn contains(&self, id: u64) -> bool {
        self.index().contains_key(&id)
    }

    /// The manifest of entry `id`.
    pub async fn manifest(&self, id: u64) -> std::io::Result<Manifest> {
        let path = self.manifest_path(id);
        let bytes = tokio::task::spawn_blocking(move || std::fs::read(path))
            .await
            .map_err(std::io::Error::other)??;
        postcard::from_bytes(&bytes)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    /// Removes a delivered (or superseded) entry, durably.
    pub async fn remove(&self, id: u64) {
        self.index().remove(&id);
        let (rpath, mpath) = (self.record_path(id), self.manifest_path(id));
        let done = tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_file(&rpath);
            let _ = std::fs::remove_file(&mpath);
            fsutil::sync_parent(&rpath)
        })
        .await;
        if let Ok(Err(e)) = done {
            tracing::warn!(id, "spool entry removed, directory not synced: {e}");
        }
    }

    /// Number of pending entries.
    pub fn count(&self) -> usize {
        self.index().len()
    }

    fn record_path(&self, id: u64) -> PathBuf {
        self.records.record_path(id)
    }

    fn manifest_path(&self, id: u64) -> PathBuf {
        self.records.dir().join(format!("{id:016x}.manifest"))
    }
}
