//! Durable file replacement: write a temp file, fsync it, rename it over the
//! destination, fsync the directory. A reader (or a restart after a crash)
//! sees either the old file or the complete new one, never a torn write.
//!
//! Temp files live in one directory on the same filesystem as every
//! destination (so `rename` is atomic) and are named `<pid>.<n>.tmp`; the
//! daemon empties that directory at startup (see [`clear_dir`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static NEXT_TMP: AtomicU64 = AtomicU64::new(0);

/// A fresh temp file path inside `tmp_dir`.
pub fn temp_path(tmp_dir: &Path) -> PathBuf {
    let n = NEXT_TMP.fetch_add(1, Ordering::Relaxed);
    tmp_dir.join(format!("{}.{n}.tmp", std::process::id()))
}

/// fsyncs a directory so a rename inside it is durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Durably replaces `dest` with `bytes` (temp in `tmp_dir`, fsync, rename,
/// fsync of `dest`'s directory).
pub fn write_atomic(tmp_dir: &Path, dest: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = temp_path(tmp_dir);
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, dest)?;
        sync_dir(dest.parent().unwrap_or(Path::new(".")))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Writes `bytes` to `dest` through a temp file in `tmp_dir` and a rename,
/// **without** fsync: for files a crash may lose (the S3 store's local
/// stages).
pub fn write_unsynced(tmp_dir: &Path, dest: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = temp_path(tmp_dir);
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        start_writeback(&f);
        drop(f);
        fs::rename(&tmp, dest)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Starts writing `f`'s dirty pages back without waiting for them
/// (`POSIX_FADV_DONTNEED` writes back asynchronously, then drops the pages
/// already clean), so that one VM staging a lot of chunks leaves little
/// for anyone else's sync to flush. Advice only: an error changes nothing.
fn start_writeback(f: &File) {
    use std::os::fd::AsRawFd;
    let _ = nix::fcntl::posix_fadvise(
        f.as_raw_fd(),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
}

/// Removes every entry of `dir` (creating it if absent); used at startup to
/// drop temp leftovers of a crashed process. Returns how many were removed.
pub fn clear_dir(dir: &Path) -> io::Result<usize> {
    fs::create_dir_all(dir)?;
    let mut n = 0;
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            fs::remove_dir_all(&path)?;
        } else {
            fs::remove_file(&path)?;
        }
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn replaces_atomically_and_clears_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("tmp");
        fs::create_dir_all(&tmp).unwrap();
        let dest = dir.path().join("f");
        write_atomic(&tmp, &dest, b"one").unwrap();
        write_atomic(&tmp, &dest, b"two").unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"two");
        assert_eq!(fs::read_dir(&tmp).unwrap().count(), 0);
        fs::write(temp_path(&tmp), b"half").unwrap();
        assert_eq!(clear_dir(&tmp).unwrap(), 1);
        assert_eq!(fs::read(&dest).unwrap(), b"two");
    }
}
