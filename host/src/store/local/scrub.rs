//! The local store's scrub: what protects its chunks against bit rot now
//! that a read no longer hashes them.
//!
//! Every chunk file (under `chunks/`, and the loose ones under `staging/`)
//! is read and checked against its hash, at a bounded rate so that the
//! agents' logins and logouts keep the disk. A file that fails is moved
//! to `corrupt/` (kept for the operator, never read again): the chunk is
//! then missing, so the next upload that holds the same content — any
//! user's, thanks to deduplication — stores it again, where a damaged file
//! left in place would be trusted by every upload that finds it present.
//! The zero block, which no agent ever uploads, is written again at once.
//! The report names the retained versions that refer to a damaged chunk.

use std::collections::HashSet;
use std::fs;
use std::io::ErrorKind;
use std::path::Path;
use std::time::{Duration, Instant};

use uve_protocol::manifest::{Hash, ZERO_BLOCK};

use super::LocalStore;
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
        let mut bad = HashSet::new();
        for (path, hash) in self.chunk_files() {
            if stop() {
                report.complete = false;
                break;
            }
            let data = match fs::read(&path) {
                Ok(d) => d,
                // Collected or promoted meanwhile.
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::io(format!("scrub {}", path.display()), e)),
            };
            report.scanned += 1;
            report.bytes += data.len() as u64;
            if check_chunk(&hash, &data).is_err() {
                tracing::error!(chunk = %hash, path = %path.display(), "corrupt chunk: moved to corrupt/");
                self.quarantine(&path, &hash)?;
                report.corrupt += 1;
                bad.insert(hash);
            }
            pace(started, report.bytes, bytes_per_sec);
        }
        if !bad.is_empty() {
            self.list_damaged(&bad, &mut report)?;
        }
        Ok(report)
    }

    /// Moves a damaged chunk file to `corrupt/`; the zero block is stored
    /// again at once.
    fn quarantine(&self, path: &Path, hash: &Hash) -> StoreResult<()> {
        let dir = self.root.join("corrupt");
        fs::create_dir_all(&dir).map_err(|e| StoreError::io("create corrupt/", e))?;
        match fs::rename(path, dir.join(hash.to_hex())) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io("move a corrupt chunk to corrupt/", e)),
        }
        if *hash == ZERO_BLOCK.hash {
            keep_zero_block(self)?;
        }
        Ok(())
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
