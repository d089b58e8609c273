//! A directory of JSON records, one file `<id:016x>.json` per id, with an
//! in-memory index of them read once at start (the disconnect-notice
//! journal and the offline spool). The stores write and remove the files
//! themselves, on blocking threads; this keeps the directory, the index
//! and the file names.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::de::DeserializeOwned;

use crate::base::fsutil;

/// The records of one directory, indexed by id; clones share the index.
#[derive(Debug, Clone)]
pub struct Records<T> {
    dir: PathBuf,
    index: Arc<Mutex<BTreeMap<u64, T>>>,
}

impl<T> Records<T> {
    /// Indexes every `*.json` file of `dir` that reads as an `R`, turned
    /// into its id and entry by `entry`; unreadable files are skipped, a
    /// missing directory is empty.
    pub fn load<R: DeserializeOwned>(dir: PathBuf, entry: impl Fn(R) -> (u64, T)) -> Self {
        let index = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
                    .filter_map(|e| fsutil::read_json::<R>(&e.path()).ok().flatten())
                    .map(&entry)
                    .collect()
            })
            .unwrap_or_default();
        Records {
            dir,
            index: Arc::new(Mutex::new(index)),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The index, locked.
    pub fn index(&self) -> MutexGuard<'_, BTreeMap<u64, T>> {
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The record file of `id`.
    pub fn record_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:016x}.json"))
    }
}

impl<T: Clone> Records<T> {
    /// Creates the directory and runs `write` (which writes the files of
    /// `id` durably) on a blocking thread, then indexes `entry` as `id`.
    pub async fn add(
        &self,
        id: u64,
        entry: &T,
        write: impl FnOnce() -> io::Result<()> + Send + 'static,
    ) -> io::Result<()> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || {
            fsutil::ensure_dir(&dir)?;
            write()
        })
        .await
        .map_err(io::Error::other)??;
        self.index().insert(id, entry.clone());
        Ok(())
    }

    /// Every entry, sorted by `key`.
    pub fn sorted_by_key<K: Ord>(&self, key: impl FnMut(&T) -> K) -> Vec<T> {
        let mut out: Vec<T> = self.index().values().cloned().collect();
        out.sort_by_key(key);
        out
    }
}
