//! [`TableWriter`]: the one writer of a durable table (the registry, the
//! lease table). A change is made in memory under the table's own lock,
//! which hands a snapshot of the whole table, stamped with the next
//! generation, to the writer and is then released: no disk is touched
//! under that lock, so the async handlers that take it never wait on one.
//! The caller then waits until its generation is durable ([`Staged`]):
//! async callers without holding a runtime thread (the write runs on a
//! blocking thread), the others on their own thread.
//!
//! One write at a time, always of the newest snapshot. A snapshot replaced
//! by a newer one before its turn is never written (the newer one holds
//! its change), so a late write can never overwrite a newer generation,
//! and the changes made during one write become durable together with the
//! next (group commit). A failed write fails the callers waiting on its
//! generation or an older one; the table's next change writes everything
//! again.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use crate::store::durable;

/// Makes the bytes of a snapshot (run by the writer, off the table's lock).
pub type Snapshot = Box<dyn FnOnce() -> Result<Vec<u8>, String> + Send>;

/// Why a table's change is not known to be durable.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{path}: {why}")]
pub struct TableError {
    /// The table's file.
    pub path: String,
    /// What failed.
    pub why: String,
}

/// Where a durable table lives.
struct Files {
    /// The table's file.
    path: PathBuf,
    /// The directory of its temp files (same filesystem).
    tmp: PathBuf,
}

#[derive(Default)]
struct Inner {
    /// The last generation handed out.
    staged: u64,
    /// The newest snapshot not yet written, and its generation.
    pending: Option<(u64, Snapshot)>,
    /// A writer is running.
    writing: bool,
    /// The newest generation on disk.
    durable: u64,
    /// The last failed write: the generation it held, and why.
    failed: Option<(u64, String)>,
}

/// The writer of one durable table.
pub struct TableWriter {
    /// `None`: the table lives in memory only (tests, fuzzing); every
    /// generation is durable at once and nothing is written.
    files: Option<Files>,
    inner: Mutex<Inner>,
    /// Wakes the threads waiting for a generation.
    done: Condvar,
    /// Wakes the tasks waiting for a generation.
    done_async: tokio::sync::Notify,
}

impl TableWriter {
    /// The writer of the table in `path` (temp files in `tmp`).
    pub fn new(path: PathBuf, tmp: PathBuf) -> Arc<Self> {
        Self::with(Some(Files { path, tmp }))
    }

    /// A writer that writes nothing: the table lives in memory only.
    pub fn in_memory() -> Arc<Self> {
        Self::with(None)
    }

    fn with(files: Option<Files>) -> Arc<Self> {
        Arc::new(TableWriter {
            files,
            inner: Mutex::new(Inner::default()),
            done: Condvar::new(),
            done_async: tokio::sync::Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The table's file, for messages.
    fn path(&self) -> String {
        self.files
            .as_ref()
            .map_or_else(String::new, |f| f.path.display().to_string())
    }

    /// Hands over the table as it is now: call it under the table's lock,
    /// right after the change, so generations follow the changes' order.
    /// `snapshot` is called (with the table's lock held) only if the table
    /// is written at all; it should copy the table and leave the encoding
    /// to the [`Snapshot`] it returns.
    pub fn stage<V>(self: &Arc<Self>, value: V, snapshot: impl FnOnce() -> Snapshot) -> Staged<V> {
        // Taken before the writer's lock: the table's lock, held by the
        // caller, keeps the order.
        let snapshot = self.files.as_ref().map(|_| snapshot());
        let mut inner = self.lock();
        inner.staged += 1;
        let generation = inner.staged;
        match snapshot {
            // Replaces an older snapshot still waiting: this one holds its
            // change too.
            Some(s) => inner.pending = Some((generation, s)),
            None => inner.durable = generation,
        }
        Staged {
            value,
            writer: self.clone(),
            generation,
        }
    }

    /// `value` of a call that changed nothing: durable once every change
    /// handed over so far is (the caller may have seen one of them).
    pub fn settled<V>(self: &Arc<Self>, value: V) -> Staged<V> {
        let generation = self.lock().staged;
        Staged {
            value,
            writer: self.clone(),
            generation,
        }
    }

    /// The newest generation on disk.
    pub fn durable_generation(&self) -> u64 {
        self.lock().durable
    }

    /// `Some` once `generation` is durable, or its write failed.
    fn outcome(&self, inner: &Inner, generation: u64) -> Option<Result<(), TableError>> {
        if inner.durable >= generation {
            return Some(Ok(()));
        }
        match &inner.failed {
            Some((g, why)) if *g >= generation => Some(Err(TableError {
                path: self.path(),
                why: why.clone(),
            })),
            _ => None,
        }
    }

    /// Runs as the one writer (`writing` set by the caller): writes the
    /// newest snapshot until none is left, then stops.
    fn write_pending(&self) {
        let Some(files) = &self.files else {
            self.lock().writing = false;
            return;
        };
        loop {
            let (generation, snapshot) = {
                let mut inner = self.lock();
                match inner.pending.take() {
                    Some(p) => p,
                    None => {
                        inner.writing = false;
                        break;
                    }
                }
            };
            let written = snapshot().and_then(|bytes| {
                durable::write_atomic(&files.tmp, &files.path, &bytes).map_err(|e| e.to_string())
            });
            {
                let mut inner = self.lock();
                match written {
                    Ok(()) => {
                        inner.durable = generation;
                        inner.failed = None;
                    }
                    Err(why) => {
                        tracing::error!(file = %files.path.display(), generation, "table not written: {why}");
                        inner.failed = Some((generation, why));
                    }
                }
            }
            self.wake();
        }
        self.wake();
    }

    fn wake(&self) {
        self.done.notify_all();
        self.done_async.notify_waiters();
    }

    /// Waits until `generation` is durable, writing on this thread if no
    /// writer is running.
    fn wait_blocking(&self, generation: u64) -> Result<(), TableError> {
        let mut inner = self.lock();
        loop {
            if let Some(outcome) = self.outcome(&inner, generation) {
                return outcome;
            }
            if inner.writing {
                inner = self
                    .done
                    .wait(inner)
                    .unwrap_or_else(PoisonError::into_inner);
            } else {
                inner.writing = true;
                drop(inner);
                self.write_pending();
                inner = self.lock();
            }
        }
    }

    /// Waits until `generation` is durable; if no writer is running, starts
    /// one on a blocking thread.
    async fn wait(self: &Arc<Self>, generation: u64) -> Result<(), TableError> {
        loop {
            let notified = self.done_async.notified();
            tokio::pin!(notified);
            // Registered before the check: a wake between the check and
            // the await is not lost.
            notified.as_mut().enable();
            {
                let mut inner = self.lock();
                if let Some(outcome) = self.outcome(&inner, generation) {
                    return outcome;
                }
                if !inner.writing {
                    inner.writing = true;
                    let run = WriterRun(Some(self.clone()));
                    tokio::task::spawn_blocking(move || run.run());
                }
            }
            notified.await;
        }
    }
}

/// A writer handed to a blocking thread. Dropped without running (the
/// runtime is shutting down), it stands down, so a later waiter writes.
struct WriterRun(Option<Arc<TableWriter>>);

impl WriterRun {
    fn run(mut self) {
        if let Some(w) = self.0.take() {
            w.write_pending();
        }
    }
}

impl Drop for WriterRun {
    fn drop(&mut self) {
        if let Some(w) = self.0.take() {
            w.lock().writing = false;
            w.wake();
        }
    }
}

/// A change made in memory and handed to its table's writer: its value
/// once the change is durable.
#[must_use = "a table's change is not durable until waited for"]
pub struct Staged<V> {
    value: V,
    writer: Arc<TableWriter>,
    generation: u64,
}

impl<V> Staged<V> {
    /// The generation of the change.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Waits, without blocking the runtime, until the change is durable.
    pub async fn durable(self) -> Result<V, TableError> {
        self.writer.wait(self.generation).await?;
        Ok(self.value)
    }

    /// Waits until the change is durable, blocking this thread (which may
    /// write the table itself): for threads that may block.
    pub fn durable_blocking(self) -> Result<V, TableError> {
        self.writer.wait_blocking(self.generation)?;
        Ok(self.value)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn snap(n: u64) -> impl FnOnce() -> Snapshot {
        move || Box::new(move || Ok(n.to_string().into_bytes()))
    }

    fn on_disk(path: &std::path::Path) -> u64 {
        std::fs::read_to_string(path).unwrap().parse().unwrap()
    }

    #[test]
    fn concurrent_changes_leave_the_newest_generation_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("table.json");
        let w = TableWriter::new(path.clone(), dir.path().to_path_buf());
        // The table: a counter, changed under its own lock.
        let table = Arc::new(Mutex::new(0u64));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (w, table, path) = (w.clone(), table.clone(), path.clone());
                std::thread::spawn(move || {
                    for _ in 0..25 {
                        let staged = {
                            let mut t = table.lock().unwrap();
                            *t += 1;
                            w.stage(*t, snap(*t))
                        };
                        let g = staged.generation();
                        let value = staged.durable_blocking().unwrap();
                        // Durable when answered: on disk is this change
                        // or a newer one.
                        assert!(on_disk(&path) >= value);
                        assert!(w.durable_generation() >= g);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(on_disk(&path), 200, "the newest generation is on disk");
        assert_eq!(w.durable_generation(), 200);
    }

    #[test]
    fn a_slow_write_holds_no_table_lock_and_never_lands_over_a_newer_one() {
        use std::sync::mpsc;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("table.json");
        let w = TableWriter::new(path.clone(), dir.path().to_path_buf());
        let table = Mutex::new(0u64);
        let (started_tx, started) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        // Generation 1's write blocks (a slow disk) until released.
        let first = {
            let mut t = table.lock().unwrap();
            *t = 1;
            w.stage(1, move || {
                Box::new(move || {
                    started_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                    Ok(b"1".to_vec())
                })
            })
        };
        let a = std::thread::spawn(move || first.durable_blocking().unwrap());
        started.recv().unwrap();
        // While it is being written, the table is free to read and change.
        let second = {
            let mut t = table.lock().unwrap();
            *t = 2;
            w.stage(2, snap(2))
        };
        let w2 = w.clone();
        let b = std::thread::spawn(move || {
            let v = second.durable_blocking().unwrap();
            assert_eq!(w2.durable_generation(), 2);
            v
        });
        release.send(()).unwrap();
        assert_eq!(a.join().unwrap(), 1);
        assert_eq!(b.join().unwrap(), 2);
        assert_eq!(on_disk(&path), 2, "generation 1 never lands after 2");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn async_waiters_are_answered_once_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("table.json");
        let w = TableWriter::new(path.clone(), dir.path().to_path_buf());
        let table = Arc::new(Mutex::new(0u64));
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let (w, table, path) = (w.clone(), table.clone(), path.clone());
                tokio::spawn(async move {
                    let staged = {
                        let mut t = table.lock().unwrap();
                        *t += 1;
                        w.stage(*t, snap(*t))
                    };
                    let value = staged.durable().await.unwrap();
                    assert!(on_disk(&path) >= value);
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(on_disk(&path), 50);
    }

    #[test]
    fn a_failed_write_fails_its_waiters_and_the_next_change_writes_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("table.json");
        let w = TableWriter::new(path.clone(), dir.path().join("missing-tmp"));
        let e = w.stage((), snap(1)).durable_blocking().unwrap_err();
        assert!(e.path.ends_with("table.json"), "{e}");
        assert!(!path.exists());
        std::fs::create_dir(dir.path().join("missing-tmp")).unwrap();
        w.stage((), snap(2)).durable_blocking().unwrap();
        assert_eq!(on_disk(&path), 2);
    }

    #[test]
    fn an_in_memory_table_writes_nothing() {
        let w = TableWriter::in_memory();
        let staged = w.stage(7, || panic!("no snapshot is taken"));
        assert_eq!(staged.durable_blocking().unwrap(), 7);
        assert_eq!(w.durable_generation(), 1);
    }
}
