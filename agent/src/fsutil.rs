//! Small file-system and entropy helpers every module relies on: durable
//! atomic writes (temp + fsync + rename + fsync of the directory), reading
//! JSON state files, random ids from the kernel and the wall clock.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Writes `data` to `path` so that a crash leaves either the old or the new
/// content, never a mix: write a sibling temp file, fsync it, rename it over
/// `path`, fsync the directory.
pub fn atomic_write(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = sibling(path, ".uve-tmp");
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    sync_parent(path)
}

/// Serialises `value` as JSON and writes it with [`atomic_write`].
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let data = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    atomic_write(path, &data)
}

/// Reads a JSON state file; `Ok(None)` if it does not exist.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    match fs::read(path) {
        Ok(data) => serde_json::from_slice(&data)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Fsyncs the directory holding `path`, making a rename in it durable.
pub fn sync_parent(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// Starts writeback of every dirty page of `f` without waiting for it
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): called while a large file
/// is still being written, the disk works in parallel with the rest of the
/// transfer and the final fsync finds little left to flush. An
/// optimisation only: the caller still fsyncs, which reports any error.
pub fn start_writeback(f: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range only uses the descriptor, which `f` keeps
    // open for the duration of the call; no memory is passed.
    let r = unsafe { libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Bytes written between two [`start_writeback`] calls.
pub const WRITEBACK_STEP: u64 = 16 << 20;

/// `path` with `suffix` appended to its file name.
pub fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// Creates `dir` and its parents with mode 0700 if missing.
pub fn ensure_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Creates `dir` and its parents if missing, and gives `dir` mode `mode`.
pub fn ensure_dir_mode(dir: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    ensure_dir(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
}

/// Random bytes from the kernel (`/dev/urandom`).
pub fn random_bytes<const N: usize>() -> io::Result<[u8; N]> {
    let mut out = [0u8; N];
    File::open("/dev/urandom")?.read_exact(&mut out)?;
    Ok(out)
}

/// A random non-zero `u64` (idempotency ids, backoff jitter).
pub fn random_u64() -> u64 {
    match random_bytes::<8>() {
        Ok(b) => u64::from_le_bytes(b).max(1),
        // /dev/urandom missing: fall back to time and pid; ids need only be
        // unique, not secret.
        Err(_) => now_ms().rotate_left(20) ^ u64::from(std::process::id()) ^ 1,
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn atomic_write_replaces_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        atomic_write(&p, b"one").unwrap();
        atomic_write(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert!(!sibling(&p, ".uve-tmp").exists());
        let v: Option<Vec<u32>> = read_json(&dir.path().join("missing")).unwrap();
        assert!(v.is_none());
    }
}
