//! A JSON state file owned by one store (the session table, the monitoring
//! grants): the value lives in memory; every change is written durably
//! ([`fsutil::atomic_write`]) on a blocking thread — never on the agent's
//! runtime thread, which also drives heartbeats — before the caller of
//! [`StateFile::change`] continues.
//!
//! Writes are ordered by a generation number: each change snapshots the
//! value with the next generation under the lock, and a writer skips a
//! snapshot older than one already on disk, so concurrent changes can
//! finish in any order and the file always ends with the newest state.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::base::fsutil;

/// One JSON state file and its value.
pub struct StateFile<T> {
    path: PathBuf,
    /// The value and the generation of its last change.
    value: Mutex<(T, u64)>,
    /// The generation on disk; held while writing.
    written: tokio::sync::Mutex<u64>,
}

impl<T: Serialize + DeserializeOwned + Default> StateFile<T> {
    /// Loads `path` (the default value when missing); an unreadable file
    /// also yields the default, with its error.
    pub fn load(path: &Path) -> (StateFile<T>, Option<io::Error>) {
        let (value, error) = match fsutil::read_json(path) {
            Ok(v) => (v.unwrap_or_default(), None),
            Err(e) => (T::default(), Some(e)),
        };
        let file = StateFile {
            path: path.to_path_buf(),
            value: Mutex::new((value, 0)),
            written: tokio::sync::Mutex::new(0),
        };
        (file, error)
    }

    /// Reads the value.
    pub fn read<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        f(&self.value.lock().unwrap_or_else(PoisonError::into_inner).0)
    }

    /// Changes the value and makes the change durable. On a write error
    /// the change stays in memory (and reaches the disk with the next
    /// successful write); the error is returned.
    pub async fn change<R>(&self, f: impl FnOnce(&mut T) -> R) -> io::Result<R> {
        let (out, bytes, generation) = {
            let mut guard = self.value.lock().unwrap_or_else(PoisonError::into_inner);
            let out = f(&mut guard.0);
            guard.1 += 1;
            let bytes = serde_json::to_vec_pretty(&guard.0).map_err(io::Error::other)?;
            (out, bytes, guard.1)
        };
        let mut written = self.written.lock().await;
        if *written < generation {
            let path = self.path.clone();
            tokio::task::spawn_blocking(move || fsutil::atomic_write(&path, &bytes))
                .await
                .map_err(io::Error::other)??;
            *written = generation;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn changes_reach_the_disk_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let (file, err) = StateFile::<Vec<u32>>::load(&path);
        assert!(err.is_none());
        let file = std::sync::Arc::new(file);
        let mut tasks = Vec::new();
        for i in 0..20 {
            let f = file.clone();
            tasks.push(tokio::spawn(async move { f.change(|v| v.push(i)).await }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let on_disk: Vec<u32> = fsutil::read_json(&path).unwrap().unwrap();
        assert_eq!(
            on_disk.len(),
            20,
            "the newest state is on disk: {on_disk:?}"
        );
        assert_eq!(file.read(Vec::len), 20);
        let (again, _) = StateFile::<Vec<u32>>::load(&path);
        assert_eq!(again.read(Clone::clone), on_disk);
    }

    #[tokio::test]
    async fn an_unreadable_file_loads_as_default_with_its_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, b"{ not json").unwrap();
        let (file, err) = StateFile::<Vec<u32>>::load(&path);
        assert!(err.is_some());
        assert!(file.read(Vec::is_empty));
    }
}
