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

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uve_protocol::manifest::Manifest;
use uve_protocol::message::{UpdateCause, Version};

use crate::fsutil;

/// One pending update.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpoolEntry {
    /// Unique id (also the file name).
    pub id: u64,
    /// Whose UIF.
    pub user: String,
    /// The session it came from.
    pub session: String,
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
        self.boot.is_none() || self.boot != crate::fsutil::kernel_boot()
    }
}

/// The spool directory.
#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
}

impl Spool {
    /// The spool under `state_dir`.
    pub fn new(state_dir: &Path) -> Spool {
        Spool {
            dir: state_dir.join("spool"),
        }
    }

    /// Journals `entry` durably: manifest first, then the record (whose
    /// presence makes the entry valid).
    pub fn add(&self, entry: &SpoolEntry, manifest: &Manifest) -> std::io::Result<()> {
        fsutil::ensure_dir(&self.dir)?;
        let bytes = postcard::to_stdvec(manifest).map_err(std::io::Error::other)?;
        fsutil::atomic_write(&self.manifest_path(entry.id), &bytes)?;
        fsutil::write_json(&self.record_path(entry.id), entry)
    }

    /// All valid entries, oldest first.
    pub fn list(&self) -> Vec<SpoolEntry> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out: Vec<SpoolEntry> = rd
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .filter_map(|e| fsutil::read_json::<SpoolEntry>(&e.path()).ok().flatten())
            .collect();
        out.sort_by_key(|e| (e.created, e.id));
        out
    }

    /// Entries of one user.
    pub fn for_user(&self, user: &str) -> Vec<SpoolEntry> {
        self.list().into_iter().filter(|e| e.user == user).collect()
    }

    /// The manifest of entry `id`.
    pub fn manifest(&self, id: u64) -> std::io::Result<Manifest> {
        let bytes = std::fs::read(self.manifest_path(id))?;
        postcard::from_bytes(&bytes)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    /// Removes a delivered entry.
    pub fn remove(&self, id: u64) {
        let _ = std::fs::remove_file(self.record_path(id));
        let _ = std::fs::remove_file(self.manifest_path(id));
        let _ = fsutil::sync_parent(&self.record_path(id));
    }

    /// Number of pending entries.
    pub fn count(&self) -> usize {
        self.list().len()
    }

    fn record_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:016x}.json"))
    }

    fn manifest_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:016x}.manifest"))
    }
}
