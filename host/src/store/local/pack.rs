//! Pack files: the local store's container of chunks, many chunks to a
//! file.
//!
//! ```text
//! "UVEPACK1"                                   8 bytes
//! entry*:  hash (32) | len (u32 LE) | bytes    one per chunk, appended
//! index:   (hash (32) | offset (u64 LE) | len (u32 LE))*   sealed packs only
//! trailer: count (u64 LE) | index offset (u64 LE) | BLAKE3 of index (32) | "UVEPIDX1"
//! ```
//!
//! A pack is written by one [`PackWriter`] (an upload's stage, the store's
//! loose chunks, a repack, a migration) without fsync, then *sealed*: the
//! index and trailer are appended, the file is fsynced once and renamed
//! into place. A sealed pack's index is read at open without reading its
//! chunks. A pack that was never sealed (its writer died) is read by
//! [`scan`]ning its entries, each checked against its hash, up to the first
//! one that is torn.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use uve_protocol::defs::MAX_CHUNK;
use uve_protocol::manifest::Hash;

use crate::store::check_chunk;

const MAGIC: &[u8; 8] = b"UVEPACK1";
const TRAILER_MAGIC: &[u8; 8] = b"UVEPIDX1";
/// Bytes before an entry's chunk bytes: its hash and length.
const ENTRY_HEAD: u64 = HEAD_LEN as u64;
const HEAD_LEN: usize = 36;
const INDEX_ENTRY: usize = 44;
const TRAILER: u64 = TRAILER_LEN as u64;
const TRAILER_LEN: usize = 56;
/// Unsynced bytes after which a writer starts their write-back, so that a
/// seal (and other uploads' seals) find little left to flush.
const WRITEBACK_EVERY: u64 = 8 << 20;

/// Where a chunk's bytes sit in a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Entry {
    /// The chunk's hash.
    pub(super) hash: Hash,
    /// Offset of the chunk's bytes (after its entry head).
    pub(super) offset: u64,
    /// The chunk's length.
    pub(super) len: u32,
}

/// A pack being written. Not synced until [`seal`](Self::seal).
pub(super) struct PackWriter {
    file: File,
    path: PathBuf,
    len: u64,
    entries: Vec<Entry>,
    by_hash: HashMap<Hash, usize>,
    /// When the last chunk was appended: a sealed pack keeps it as its
    /// mtime, the age GC's grace is measured from.
    last_write: SystemTime,
    written_back: u64,
    /// Deleted if dropped unsealed (a repack's or migration's copy; an
    /// upload's pack stays for the next open to adopt).
    temporary: bool,
}

impl Drop for PackWriter {
    fn drop(&mut self) {
        if self.temporary {
            let _ = fs::remove_file(&self.path);
        }
    }
}

impl PackWriter {
    /// Creates a new, empty pack at `path` (which must not exist).
    pub(super) fn create(path: &Path) -> io::Result<PackWriter> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        file.write_all_at(MAGIC, 0)?;
        Ok(PackWriter {
            file,
            path: path.to_path_buf(),
            len: MAGIC.len() as u64,
            entries: Vec::new(),
            by_hash: HashMap::new(),
            last_write: SystemTime::now(),
            written_back: 0,
            temporary: false,
        })
    }

    /// Makes the pack one that is deleted if dropped before it is sealed.
    pub(super) fn temporary(mut self) -> PackWriter {
        self.temporary = true;
        self
    }

    /// Takes over a pack its writer left unsealed (a crash, a restart):
    /// keeps its intact entries and cuts the file after the last one.
    pub(super) fn resume(path: &Path) -> io::Result<PackWriter> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let (entries, end) = scan(&file)?;
        file.set_len(end)?;
        let last_write = file.metadata()?.modified()?;
        let by_hash = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.hash, i))
            .collect();
        Ok(PackWriter {
            file,
            path: path.to_path_buf(),
            len: end,
            entries,
            by_hash,
            last_write,
            written_back: 0,
            temporary: false,
        })
    }

    /// Appends a chunk (already checked against its hash) unless the pack
    /// holds it; returns whether it was appended.
    pub(super) fn append(&mut self, hash: &Hash, data: &[u8]) -> io::Result<bool> {
        if self.by_hash.contains_key(hash) {
            return Ok(false);
        }
        let len = u32::try_from(data.len()).map_err(|_| io::Error::other("chunk too long"))?;
        let mut head = [0u8; HEAD_LEN];
        head[..32].copy_from_slice(&hash.0);
        head[32..].copy_from_slice(&len.to_le_bytes());
        // Positional writes: a failed append (a full disk) is overwritten
        // by the next one, and readers of the same file are not disturbed.
        self.file.write_all_at(&head, self.len)?;
        self.file.write_all_at(data, self.len + ENTRY_HEAD)?;
        self.by_hash.insert(*hash, self.entries.len());
        self.entries.push(Entry {
            hash: *hash,
            offset: self.len + ENTRY_HEAD,
            len,
        });
        self.len += ENTRY_HEAD + u64::from(len);
        self.last_write = SystemTime::now();
        if self.len - self.written_back >= WRITEBACK_EVERY {
            start_writeback(&self.file, self.written_back, self.len - self.written_back);
            self.written_back = self.len;
        }
        Ok(true)
    }

    /// Where the pack holds `hash`, if it does.
    pub(super) fn get(&self, hash: &Hash) -> Option<Entry> {
        self.by_hash.get(hash).map(|&i| self.entries[i])
    }

    /// Reads an entry's bytes back.
    pub(super) fn read(&self, e: Entry) -> io::Result<Vec<u8>> {
        read_entry(&self.file, e)
    }

    /// The chunks appended so far, in order.
    pub(super) fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Bytes of chunks (without entry heads).
    pub(super) fn data_bytes(&self) -> u64 {
        self.len - MAGIC.len() as u64 - ENTRY_HEAD * self.entries.len() as u64
    }

    /// When the last chunk was appended.
    pub(super) fn last_write(&self) -> SystemTime {
        self.last_write
    }

    /// The unsealed pack's path.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Dates the pack back (a repack keeps its sources' age).
    pub(super) fn set_last_write(&mut self, t: SystemTime) {
        self.last_write = t;
    }

    /// Appends the index and trailer, fsyncs the file once and renames it
    /// to `dest`. The caller fsyncs `dest`'s directory.
    pub(super) fn seal(mut self, dest: &Path) -> io::Result<Vec<Entry>> {
        let mut index = Vec::with_capacity(self.entries.len() * INDEX_ENTRY);
        for e in &self.entries {
            index.extend_from_slice(&e.hash.0);
            index.extend_from_slice(&e.offset.to_le_bytes());
            index.extend_from_slice(&e.len.to_le_bytes());
        }
        let mut trailer = Vec::with_capacity(TRAILER_LEN);
        trailer.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        trailer.extend_from_slice(&self.len.to_le_bytes());
        trailer.extend_from_slice(blake3::hash(&index).as_bytes());
        trailer.extend_from_slice(TRAILER_MAGIC);
        index.extend_from_slice(&trailer);
        // A failed append may have left bytes past the last chunk.
        self.file.set_len(self.len)?;
        self.file.write_all_at(&index, self.len)?;
        self.file.sync_all()?;
        self.file.set_modified(self.last_write)?;
        fs::rename(&self.path, dest)?;
        self.temporary = false;
        Ok(std::mem::take(&mut self.entries))
    }

    /// Deletes the unsealed pack.
    pub(super) fn abandon(self) -> io::Result<()> {
        match fs::remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// Reads a chunk's bytes at `e` (not checked against the hash: see the
/// store's scrub).
pub(super) fn read_entry(file: &File, e: Entry) -> io::Result<Vec<u8>> {
    let mut data = vec![0u8; e.len as usize];
    file.read_exact_at(&mut data, e.offset)?;
    Ok(data)
}

/// The index of a sealed pack, or why it cannot be read (then [`scan`]
/// the pack instead).
pub(super) fn read_index(file: &File) -> io::Result<Result<Vec<Entry>, String>> {
    let len = file.metadata()?.len();
    if len < MAGIC.len() as u64 + TRAILER {
        return Ok(Err("shorter than a sealed pack".into()));
    }
    let mut trailer = [0u8; TRAILER_LEN];
    file.read_exact_at(&mut trailer, len - TRAILER)?;
    if &trailer[48..] != TRAILER_MAGIC {
        return Ok(Err("no index trailer (never sealed)".into()));
    }
    let count = u64_at(&trailer, 0);
    let index_at = u64_at(&trailer, 8);
    let index_len = count.checked_mul(INDEX_ENTRY as u64);
    if index_at < MAGIC.len() as u64
        || index_len
            .and_then(|l| l.checked_add(index_at))
            .and_then(|l| l.checked_add(TRAILER))
            != Some(len)
    {
        return Ok(Err("index bounds do not match the file".into()));
    }
    let Ok(index_len) = usize::try_from(len - TRAILER - index_at) else {
        return Ok(Err("index too large".into()));
    };
    let mut index = vec![0u8; index_len];
    file.read_exact_at(&mut index, index_at)?;
    if blake3::hash(&index).as_bytes() != &trailer[16..48] {
        return Ok(Err("index does not match its hash".into()));
    }
    let mut entries = Vec::with_capacity(index_len / INDEX_ENTRY);
    for raw in index.chunks_exact(INDEX_ENTRY) {
        let e = Entry {
            hash: hash_at(raw, 0),
            offset: u64_at(raw, 32),
            len: u32::from_le_bytes([raw[40], raw[41], raw[42], raw[43]]),
        };
        if e.len > MAX_CHUNK || e.offset < MAGIC.len() as u64 + ENTRY_HEAD {
            return Ok(Err(format!("index entry of {} out of bounds", e.hash)));
        }
        if e.offset
            .checked_add(u64::from(e.len))
            .is_none_or(|end| end > index_at)
        {
            return Ok(Err(format!("index entry of {} past the chunks", e.hash)));
        }
        entries.push(e);
    }
    Ok(Ok(entries))
}

/// The entries of a pack read one by one, each checked against its hash,
/// up to the first torn or damaged one; and the offset where that one
/// starts (the end of what is intact).
pub(super) fn scan(file: &File) -> io::Result<(Vec<Entry>, u64)> {
    let len = file.metadata()?.len();
    let mut magic = [0u8; 8];
    if len < MAGIC.len() as u64 {
        return Ok((Vec::new(), 0));
    }
    file.read_exact_at(&mut magic, 0)?;
    if &magic != MAGIC {
        return Ok((Vec::new(), 0));
    }
    let mut at = MAGIC.len() as u64;
    let mut entries = Vec::new();
    let mut head = [0u8; HEAD_LEN];
    while at + ENTRY_HEAD <= len {
        file.read_exact_at(&mut head, at)?;
        let e = Entry {
            hash: hash_at(&head, 0),
            offset: at + ENTRY_HEAD,
            len: u32::from_le_bytes([head[32], head[33], head[34], head[35]]),
        };
        if e.len > MAX_CHUNK || e.offset + u64::from(e.len) > len {
            break;
        }
        let data = read_entry(file, e)?;
        if check_chunk(&e.hash, &data).is_err() {
            break;
        }
        entries.push(e);
        at = e.offset + u64::from(e.len);
    }
    Ok((entries, at))
}

/// A pack's file name.
pub(super) fn file_name(id: u64) -> String {
    format!("{id:016x}.pack")
}

/// The id a pack's file name carries.
pub(super) fn parse_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".pack")?;
    (hex.len() == 16)
        .then(|| u64::from_str_radix(hex, 16).ok())
        .flatten()
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

fn hash_at(b: &[u8], at: usize) -> Hash {
    let mut h = [0u8; 32];
    h.copy_from_slice(&b[at..at + 32]);
    Hash(h)
}

/// Starts writing back a range of `f`'s dirty pages without waiting
/// (`POSIX_FADV_DONTNEED` writes back asynchronously). Advice only.
fn start_writeback(f: &File, from: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(from), Ok(len)) = (i64::try_from(from), i64::try_from(len)) else {
        return;
    };
    let _ = nix::fcntl::posix_fadvise(
        f.as_raw_fd(),
        from,
        len,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn chunk(seed: u8, len: usize) -> (Hash, Vec<u8>) {
        let data = uve_protocol::testdata::noise(len, u64::from(seed));
        (Hash::of(&data), data)
    }

    #[test]
    fn a_sealed_pack_reads_back_by_its_index_and_a_torn_one_by_scanning() {
        let dir = tempfile::tempdir().unwrap();
        let chunks: Vec<_> = (1..=5).map(|s| chunk(s, 1000 * usize::from(s))).collect();
        let mut w = PackWriter::create(&dir.path().join("a")).unwrap();
        for (h, d) in &chunks {
            assert!(w.append(h, d).unwrap());
        }
        assert!(!w.append(&chunks[0].0, &chunks[0].1).unwrap(), "held once");
        let sealed = w.seal(&dir.path().join(file_name(7))).unwrap();
        let f = File::open(dir.path().join("0000000000000007.pack")).unwrap();
        let index = read_index(&f).unwrap().unwrap();
        assert_eq!(index, sealed);
        for (e, (h, d)) in index.iter().zip(&chunks) {
            assert_eq!(e.hash, *h);
            assert_eq!(read_entry(&f, *e).unwrap(), *d);
        }
        assert_eq!(parse_name(&file_name(7)), Some(7));
        // Never sealed, and its last entry torn: the intact ones are kept.
        let mut w = PackWriter::create(&dir.path().join("b")).unwrap();
        for (h, d) in &chunks {
            w.append(h, d).unwrap();
        }
        drop(w);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.path().join("b"))
            .unwrap();
        let cut = f.metadata().unwrap().len() - 10;
        f.set_len(cut).unwrap();
        assert!(read_index(&f).unwrap().is_err());
        let w = PackWriter::resume(&dir.path().join("b")).unwrap();
        let kept: Vec<Hash> = w.entries().iter().map(|e| e.hash).collect();
        let want: Vec<Hash> = chunks[..4].iter().map(|c| c.0).collect();
        assert_eq!(kept, want);
        // A flipped bit in the index is seen; scanning still finds all.
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.path().join(file_name(7)))
            .unwrap();
        let len = f.metadata().unwrap().len();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, len - TRAILER - 3).unwrap();
        f.write_all_at(&[b[0] ^ 1], len - TRAILER - 3).unwrap();
        assert!(read_index(&f).unwrap().is_err());
        assert_eq!(scan(&f).unwrap().0.len(), 5);
    }
}
