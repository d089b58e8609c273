//! The durable event journal, `<data_dir>/events.jsonl`: the events an
//! operator must act on ([`Event::journalled`](super::Event::journalled))
//! kept across floods and restarts, and the sequence numbers' high-water
//! mark, so numbering continues after a restart.
//!
//! The file is JSON lines, each one of [`Line`]: an event, a reservation
//! (`{"reserved":R}`: no event of this run has a higher number) or the
//! clean-shutdown mark (`{"closed":S}`: S was the last number given).
//!
//! **Writing.** One thread (`uve-events`) takes the events from a bounded
//! channel and group-commits them: it drains what is queued (up to
//! [`BATCH`]), appends the lines with one `write` and makes them durable
//! with one `fdatasync`. Emitting never waits for the disk. Should the
//! channel be full (the disk stalled), the event is kept in memory and the
//! writer rewrites the file from memory at its next batch; so does a
//! failed write. **A crash loses at most the batch being written** (and
//! whatever was queued behind it).
//!
//! **Size.** The retained set in memory is a [`FairLog`] of
//! `event_journal` events, none older than `event_journal_max_age_secs`
//! (fair share per VM). The file is appended to until it holds twice that
//! many lines, then rewritten (temp, fsync, rename, fsync of the
//! directory) with the retained set only; it is also rewritten at start.
//!
//! **Numbering.** At start the next number is one past the `closed` mark if
//! the file ends with it (clean shutdown), else one past the last
//! reservation or event (a crash): the writer keeps a reservation
//! [`RESERVE`] numbers ahead of the last number given, so after a crash the
//! numbering skips ahead instead of reusing numbers followers saw.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::fair::FairLog;
use super::{Recorded, Shared};
use crate::store::durable;

/// The journal's file name under the data directory.
pub const FILE: &str = "events.jsonl";

/// How far ahead of the last number given the reservation is kept.
pub const RESERVE: u64 = 1_000_000;

/// Events queued for the writer before emitting falls back to a rewrite.
const QUEUE: usize = 4096;

/// Most messages one batch takes.
const BATCH: usize = 1024;

/// How long [`Writer::close`] waits for the last batch.
const CLOSE_LIMIT: Duration = Duration::from_secs(5);

/// One line of the file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Line {
    /// An event.
    Event(Recorded),
    /// No number above this was given before it was written.
    Reserved(u64),
    /// Clean shutdown: this was the last number given.
    Closed(u64),
}

/// What the writer thread is sent.
pub(super) enum Msg {
    /// An event to append.
    Event(Recorded),
    /// The numbers near the reservation: extend it.
    Extend,
    /// Answer once everything queued before is durable.
    Flush(SyncSender<()>),
    /// Write the last batch and the `closed` mark, answer, stop.
    Close(SyncSender<()>),
}

/// What [`load`] read.
pub(super) struct Loaded {
    /// The retained events.
    pub(super) log: FairLog,
    /// The first number this run gives.
    pub(super) next: u64,
}

/// Reads the journal at `path` (absent: empty) into a [`FairLog`] of
/// `cap` events, none older than `max_age_ms`. Lines that do not parse
/// (a torn last line after a crash) are skipped with a warning.
pub(super) fn load(path: &Path, cap: usize, max_age_ms: Option<u64>) -> io::Result<Loaded> {
    let mut log = FairLog::new(cap, max_age_ms);
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Loaded { log, next: 1 }),
        Err(e) => return Err(e),
    };
    let (mut high, mut closed, mut bad) = (0u64, None, 0usize);
    for line in io::BufReader::new(file).split(b'\n') {
        let line = line?;
        if line.is_empty() {
            continue;
        }
        match serde_json::from_slice::<Line>(&line) {
            Ok(Line::Event(r)) => {
                high = high.max(r.seq);
                closed = None;
                // A rewrite can repeat an event appended before it: keep one.
                if log.last_seq().is_none_or(|last| r.seq > last) {
                    log.insert(r);
                }
            }
            Ok(Line::Reserved(r)) => {
                high = high.max(r);
                closed = None;
            }
            Ok(Line::Closed(s)) => closed = Some(s),
            Err(_) => bad += 1,
        }
    }
    if bad > 0 {
        tracing::warn!(
            path = %path.display(),
            lines = bad,
            "event journal: lines that do not parse were skipped (a write cut short by a crash)"
        );
    }
    let last = closed.map_or(high, |s| s.max(log.last_seq().unwrap_or(0)));
    log.expire(crate::store::now_ms());
    Ok(Loaded {
        log,
        next: last.saturating_add(1),
    })
}

/// The lines of a rewrite: the retained events and a reservation.
fn rewrite_bytes(events: &[Recorded], reserved: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for r in events {
        push_line(&mut out, &Line::Event(r.clone()));
    }
    push_line(&mut out, &Line::Reserved(reserved));
    out
}

fn push_line(out: &mut Vec<u8>, line: &Line) {
    if serde_json::to_writer(&mut *out, line).is_ok() {
        out.push(b'\n');
    }
}

/// The writer thread's handle.
pub(super) struct Writer {
    tx: SyncSender<Msg>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Writer {
    /// Rewrites the journal with `shared`'s retained events and a fresh
    /// reservation (so a crash from now on skips past this run's
    /// numbers), then starts the writer thread.
    pub(super) fn start(
        path: PathBuf,
        tmp: PathBuf,
        shared: Arc<Shared>,
        cap: usize,
    ) -> io::Result<Writer> {
        let mut file = JournalFile {
            path,
            tmp,
            append: None,
            lines: 0,
            written_high: 0,
            reserved: 0,
            dirty: false,
            cap,
        };
        file.rewrite(&shared)?;
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let thread = std::thread::Builder::new()
            .name("uve-events".into())
            .spawn(move || run(&mut file, &rx, &shared))?;
        Ok(Writer {
            tx,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues a message without waiting; false if the queue is full (the
    /// writer then rewrites from memory).
    pub(super) fn offer(&self, msg: Msg) -> bool {
        match self.tx.try_send(msg) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => false,
            // The thread is gone (closed): nothing more is written.
            Err(TrySendError::Disconnected(_)) => true,
        }
    }

    /// Waits until everything queued is durable (at most [`CLOSE_LIMIT`]).
    /// Blocking.
    pub(super) fn flush(&self) {
        let (ack, done) = mpsc::sync_channel(1);
        if self.tx.send(Msg::Flush(ack)).is_ok() {
            let _ = done.recv_timeout(CLOSE_LIMIT);
        }
    }

    /// Writes what is queued and the `closed` mark, and stops the thread
    /// (waits at most [`CLOSE_LIMIT`]). Blocking.
    pub(super) fn close(&self) {
        let (ack, done) = mpsc::sync_channel(1);
        if self.tx.send(Msg::Close(ack)).is_err() {
            return;
        }
        match done.recv_timeout(CLOSE_LIMIT) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {}
            Err(RecvTimeoutError::Timeout) => {
                tracing::warn!("event journal: the last batch was not written in time");
                return;
            }
        }
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

/// The file as the writer thread sees it.
struct JournalFile {
    path: PathBuf,
    tmp: PathBuf,
    append: Option<File>,
    /// Lines in the file.
    lines: usize,
    /// Events with numbers up to this are in the file (or were evicted).
    written_high: u64,
    /// The reservation in the file.
    reserved: u64,
    /// A write failed or events were not queued: rewrite from memory.
    dirty: bool,
    cap: usize,
}

impl JournalFile {
    /// Replaces the file with the retained events and a reservation.
    fn rewrite(&mut self, shared: &Shared) -> io::Result<()> {
        let (events, next) = shared.journal_snapshot();
        let reserved = next.saturating_sub(1).saturating_add(RESERVE);
        let bytes = rewrite_bytes(&events, reserved);
        self.append = None;
        durable::write_atomic(&self.tmp, &self.path, &bytes)?;
        self.append = Some(OpenOptions::new().append(true).open(&self.path)?);
        self.lines = events.len() + 1;
        self.written_high = next.saturating_sub(1);
        self.reserved = reserved;
        self.dirty = false;
        shared
            .extend_at
            .store(reserved - RESERVE / 2, Ordering::Relaxed);
        Ok(())
    }

    /// Appends `bytes` (`lines` lines) and makes them durable.
    fn append(&mut self, bytes: &[u8], lines: usize) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let file = match &mut self.append {
            Some(f) => f,
            None => self
                .append
                .insert(OpenOptions::new().append(true).open(&self.path)?),
        };
        file.write_all(bytes)?;
        file.sync_data()?;
        self.lines += lines;
        Ok(())
    }

    /// Writes one batch: appended, or the whole file rewritten if it is
    /// dirty or has grown past twice the retained count.
    fn write_batch(&mut self, batch: Vec<Msg>, shared: &Shared) -> Acks {
        let mut acks = Acks::default();
        let (mut out, mut lines) = (Vec::new(), 0);
        let mut high = self.written_high;
        for m in batch {
            match m {
                Msg::Event(r) if r.seq > high => {
                    high = r.seq;
                    push_line(&mut out, &Line::Event(r));
                    lines += 1;
                }
                Msg::Event(_) | Msg::Extend => {}
                Msg::Flush(ack) => acks.flushed.push(ack),
                Msg::Close(ack) => acks.close = Some(ack),
            }
        }
        if shared.resync.swap(false, Ordering::AcqRel) {
            self.dirty = true;
        }
        let result = if self.dirty || self.lines + lines > self.cap.saturating_mul(2) {
            self.rewrite(shared)
        } else {
            let next = shared.next_seq();
            if next.saturating_add(RESERVE / 2) > self.reserved {
                self.reserved = next.saturating_sub(1).saturating_add(RESERVE);
                push_line(&mut out, &Line::Reserved(self.reserved));
                lines += 1;
            }
            let r = self.append(&out, lines);
            if r.is_ok() {
                self.written_high = high;
                shared
                    .extend_at
                    .store(self.reserved - RESERVE / 2, Ordering::Relaxed);
            }
            r
        };
        if let Err(e) = result {
            tracing::error!(path = %self.path.display(), error = %e, "event journal: write failed; rewriting it from memory at the next batch");
            self.dirty = true;
        }
        acks
    }

    /// The `closed` mark, durable.
    fn close(&mut self, shared: &Shared) {
        if self.dirty
            && let Err(e) = self.rewrite(shared)
        {
            tracing::error!(error = %e, "event journal: final rewrite failed");
            return;
        }
        let last = shared.next_seq().saturating_sub(1);
        let mut out = Vec::new();
        push_line(&mut out, &Line::Closed(last));
        if let Err(e) = self.append(&out, 1) {
            tracing::error!(error = %e, "event journal: closing mark not written");
        }
    }
}

/// Who waits for a batch.
#[derive(Default)]
struct Acks {
    flushed: Vec<SyncSender<()>>,
    close: Option<SyncSender<()>>,
}

fn run(file: &mut JournalFile, rx: &Receiver<Msg>, shared: &Shared) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let acks = file.write_batch(batch, shared);
        for ack in acks.flushed {
            let _ = ack.send(());
        }
        if let Some(ack) = acks.close {
            file.close(shared);
            let _ = ack.send(());
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::state::events::{Event, Events};

    fn refused(vm: &str, user: &str) -> Event {
        Event::UpdateRefused {
            vm: vm.into(),
            user: user.into(),
            session: "s1".into(),
            cause: uve_protocol::message::UpdateCause::Logout,
            base: None,
            size: 1,
            code: uve_protocol::message::ErrorCode::QuotaExceeded,
            reason: "quota".into(),
        }
    }

    fn open(dir: &Path, cap: usize) -> Events {
        let tmp = dir.join("tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        Events::open(dir, &tmp, 16, cap, None).unwrap()
    }

    #[test]
    fn numbers_continue_after_a_clean_close_and_skip_ahead_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let ev = open(dir.path(), 100);
        ev.emit(refused("vm1", "alice"));
        ev.emit(Event::VmRegistered { vm: "vm1".into() });
        assert_eq!(ev.emit(refused("vm1", "bob")), 3);
        ev.close();
        drop(ev);
        let ev = open(dir.path(), 100);
        let (kept, _) = ev.since(0);
        let seqs: Vec<u64> = kept.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 3], "only journalled kinds survive");
        assert_eq!(ev.emit(refused("vm2", "carol")), 4, "clean: continues");
        // A crash: no close. The file's reservation is ahead.
        ev.flush();
        drop(ev);
        let ev = open(dir.path(), 100);
        let seq = ev.emit(refused("vm2", "dave"));
        assert!(
            seq > 4 + RESERVE / 2,
            "after a crash numbering skips ahead: {seq}"
        );
        let (kept, _) = ev.since(0);
        assert_eq!(kept.len(), 4, "event 4 was written before the crash");
        ev.close();
    }

    #[test]
    fn the_file_stays_bounded_and_keeps_each_vms_share() {
        let dir = tempfile::tempdir().unwrap();
        let ev = open(dir.path(), 50);
        ev.emit(refused("good", "alice"));
        for i in 0..2_000 {
            ev.emit(refused("flood", &format!("u{i}")));
        }
        ev.close();
        drop(ev);
        let text = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert!(
            text.lines().count() <= 2 * 50 + 2,
            "{} lines",
            text.lines().count()
        );
        let ev = open(dir.path(), 50);
        let (kept, _) = ev.since(0);
        assert_eq!(kept.len(), 50);
        assert_eq!(kept[0].seq, 1, "the good VM's event survived the flood");
        assert_eq!(ev.emit(refused("good", "bob")), 2_002);
        ev.close();
    }

    #[test]
    fn a_torn_last_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let ev = open(dir.path(), 10);
        ev.emit(refused("vm1", "alice"));
        ev.close();
        drop(ev);
        let path = dir.path().join(FILE);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"event\":{\"seq\":9,\"at_").unwrap();
        drop(f);
        let ev = open(dir.path(), 10);
        let (kept, _) = ev.since(0);
        assert_eq!(kept.len(), 1);
        assert_eq!(
            ev.emit(refused("vm1", "bob")),
            2,
            "the closed mark still counts"
        );
        ev.close();
    }
}
