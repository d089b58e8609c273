//! The agent's one durable path, and small file-system and entropy helpers
//! every module relies on.
//!
//! Every call that waits on the disk goes through this module: durable
//! atomic writes ([`atomic_write`]: unique temp + fsync + rename + fsync of
//! the directory), files written in pieces and then published
//! ([`DurableFile`]), an fsync of an open file ([`sync`]) or of a path
//! ([`sync_file`]), of a directory ([`sync_parent`]), of every filesystem
//! ([`sync_filesystems`]), symlink swaps ([`replace_symlink`]) and the
//! blocking waits on a disk ([`pause`]). Each holds the runtime-thread
//! assertion: the agent's single runtime thread also drives heartbeats, and
//! one fsync under dirty pages can take seconds, so debug builds abort when
//! one of these runs on it ([`mark_runtime_thread`]).
//!
//! Temporary files start with `.` (`.<name>.uve-tmp-<random>`), which no
//! valid user, session or UA name may, so no name can collide with one.
//! Also here: private state files (0600, never through a symlink), JSON
//! state files, the kernel's boot id, random ids and the wall clock.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

thread_local! {
    /// Set on the thread that drives the agent's runtime.
    static RUNTIME_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks the calling thread as the agent's runtime thread (the daemon
/// calls it before `block_on`): durable writes from it are a bug, since
/// it also drives heartbeats and one fsync under dirty pages can take
/// seconds.
pub fn mark_runtime_thread() {
    RUNTIME_THREAD.with(|t| t.set(true));
}

/// In debug and test builds, aborts the process if called on the runtime
/// thread, with a backtrace naming the caller: a blocking call that comes
/// back fails every test that exercises its path, deterministically.
fn assert_off_runtime(what: &str) {
    if cfg!(debug_assertions) && RUNTIME_THREAD.with(std::cell::Cell::get) {
        let trace = std::backtrace::Backtrace::force_capture().to_string();
        let ours: Vec<&str> = trace
            .lines()
            .filter(|l| l.contains("uve_agent::"))
            .collect();
        eprintln!(
            "BUG: {what} on the agent's runtime thread, from:\n{}",
            ours.join("\n")
        );
        std::process::abort();
    }
}

/// Mode of every state file the agent writes: only root reads its state
/// (sessions, grants, manifests, spool records name users and sessions).
pub const STATE_FILE_MODE: u32 = 0o600;

/// Creates a new private file at `path`: mode [`STATE_FILE_MODE`], failing
/// if anything (a file, a symlink planted by someone) is already there.
pub fn create_private(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .read(true)
        .create_new(true)
        .mode(STATE_FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// The prefix of every temporary name made for `path`:
/// `.<file name>.uve-tmp-`.
fn temp_prefix(path: &Path) -> std::ffi::OsString {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(".uve-tmp-");
    name
}

/// A temp name next to `path` that no other writer uses and no valid name
/// can take: [`temp_prefix`] and a random tag.
fn unique_temp(path: &Path) -> PathBuf {
    let mut name = temp_prefix(path);
    name.push(format!("{:016x}", random_u64()));
    path.with_file_name(name)
}

/// Writes `data` to `path` so that a crash leaves either the old or the new
/// content, never a mix: write a fresh, uniquely named sibling temp file
/// (0600, `O_EXCL`, no symlink followed), fsync it, rename it over `path`,
/// fsync the directory. On error the temp file is removed.
pub fn atomic_write(path: &Path, data: &[u8]) -> io::Result<()> {
    assert_off_runtime("atomic_write");
    let f = DurableFile::create(path)?;
    f.file().write_all(data)?;
    f.publish()
}

/// A file written in pieces (a UIF can be many GiB) and then published at
/// its destination in one step, so a crash leaves the old file or the new
/// one whole, never a mix. It is written as a private temp sibling (0600,
/// `O_EXCL`, no symlink followed, a name no valid name can take);
/// [`publish`](Self::publish) fsyncs it, renames it over the destination
/// and fsyncs the directory. Dropped unpublished (an error on the way),
/// the temp file is removed.
#[derive(Debug)]
pub struct DurableFile {
    file: File,
    temp: PathBuf,
    dest: PathBuf,
    published: bool,
}

impl DurableFile {
    /// Starts a new version of `dest`.
    pub fn create(dest: &Path) -> io::Result<DurableFile> {
        let temp = unique_temp(dest);
        let file = create_private(&temp)?;
        Ok(DurableFile {
            file,
            temp,
            dest: dest.to_path_buf(),
            published: false,
        })
    }

    /// Like [`create`](Self::create), first removing the temp files of
    /// earlier versions of `dest` that a crash left behind. Only for a
    /// destination the caller alone writes (a user's UIF, under the user's
    /// lock): another writer's temp file would go too.
    pub fn create_sole(dest: &Path) -> io::Result<DurableFile> {
        remove_stale_temps(dest);
        Self::create(dest)
    }

    /// The file being written.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Where it is written until published (for messages).
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// Makes the file durable and the destination's content: fsync,
    /// rename, fsync of the directory.
    pub fn publish(mut self) -> io::Result<()> {
        assert_off_runtime("DurableFile::publish");
        self.file.sync_all()?;
        fs::rename(&self.temp, &self.dest)?;
        self.published = true;
        sync_parent(&self.dest)
    }
}

impl Drop for DurableFile {
    fn drop(&mut self) {
        if !self.published {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// Removes the temp files of `dest` left by a crash (see
/// [`DurableFile::create_sole`]).
fn remove_stale_temps(dest: &Path) {
    let prefix = temp_prefix(dest);
    let dir = match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    use std::os::unix::ffi::OsStrExt;
    for e in entries.flatten() {
        if e.file_name().as_bytes().starts_with(prefix.as_bytes()) {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Makes an open file's content durable (`fsync`).
pub fn sync(f: &File) -> io::Result<()> {
    assert_off_runtime("sync");
    f.sync_all()
}

/// Makes an open file's data durable (`fdatasync`): what a block device's
/// FLUSH asks of its backing file.
pub fn sync_data(f: &File) -> io::Result<()> {
    assert_off_runtime("sync_data");
    f.sync_data()
}

/// Writes every filesystem's dirty pages (`sync(2)`): what reaches a file
/// image mounted through a loop device, whose pages only a global sync
/// flushes. Takes seconds under many dirty pages.
pub fn sync_filesystems() {
    assert_off_runtime("sync_filesystems");
    nix::unistd::sync();
}

/// Waits `d` on a blocking thread, for a disk to settle (a file's ctime,
/// a child writing an archive).
pub fn pause(d: std::time::Duration) {
    assert_off_runtime("pause");
    std::thread::sleep(d);
}

/// Points the symlink `<dir>/<link>` at `target` (a sibling name)
/// atomically and durably: a new link under a unique temp name, renamed
/// over the old one, then a directory fsync.
pub fn replace_symlink(dir: &Path, link: &str, target: &str) -> io::Result<()> {
    assert_off_runtime("replace_symlink");
    let path = dir.join(link);
    let tmp = unique_temp(&path);
    std::os::unix::fs::symlink(target, &tmp)?;
    if let Err(e) = fs::rename(&tmp, &path) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_parent(&path)
}

/// Makes `path`'s content durable (`fsync` of that one file, which a
/// read-only descriptor allows), without following a symlink.
pub fn sync_file(path: &Path) -> io::Result<()> {
    assert_off_runtime("sync_file");
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?
        .sync_all()
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
    assert_off_runtime("sync_parent");
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
    // Neither nix nor rustix wraps sync_file_range(2); hence libc.
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

/// A buffer of zeroes for [`zero_range`]'s fallback.
static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

/// Makes `len` bytes of `file` at `offset` read as zeroes without changing
/// its length: `fallocate` with `how` (`PUNCH_HOLE` frees the blocks,
/// `ZERO_RANGE` keeps them allocated), or writing zeroes where the
/// filesystem supports neither.
pub fn zero_range(
    file: &File,
    how: rustix::fs::FallocateFlags,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    match rustix::fs::fallocate(
        file,
        how | rustix::fs::FallocateFlags::KEEP_SIZE,
        offset,
        len,
    ) {
        Ok(()) => return Ok(()),
        Err(e) if e == rustix::io::Errno::OPNOTSUPP => {}
        Err(e) => return Err(e.into()),
    }
    let mut done = 0u64;
    while done < len {
        let n = usize::try_from(len - done).map_or(ZEROES.len(), |n| n.min(ZEROES.len()));
        file.write_all_at(&ZEROES[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// `path` with `suffix` appended to its file name.
pub fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// `<dir>/.<name><suffix>` for `path` = `<dir>/<name>`: a working name
/// beside `path` that starts with `.`, which no valid user name may, so it
/// can never be another user's home or file.
pub fn hidden_sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
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

/// The kernel's random per-boot id (`/proc/sys/kernel/random/boot_id`, a
/// UUID), trimmed; `None` where unreadable. State written during another
/// boot tells a VM restart (power loss, crash) from an agent restart.
pub fn kernel_boot() -> Option<String> {
    let text = fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = text.trim();
    (!id.is_empty()).then(|| id.to_string())
}

/// Random bytes from the kernel (`getrandom(2)`).
pub fn random_bytes<const N: usize>() -> io::Result<[u8; N]> {
    let mut out = [0u8; N];
    getrandom::fill(&mut out).map_err(io::Error::from)?;
    Ok(out)
}

/// A random non-zero `u64` (idempotency ids, backoff jitter).
pub fn random_u64() -> u64 {
    match random_bytes::<8>() {
        Ok(b) => u64::from_le_bytes(b).max(1),
        // No kernel randomness (seccomp?): fall back to time and pid; ids need only be
        // unique, not secret.
        Err(_) => now_ms().rotate_left(20) ^ u64::from(std::process::id()) ^ 1,
    }
}

/// `ms` since the Unix epoch as a UTC date and time, `2026-12-01 23:04:05Z`.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Milliseconds since the Unix epoch, now (one definition for both peers).
pub use uve_protocol::defs::now_ms;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A fresh directory and the path of `name` in it, a file holding
    /// `bytes` if given.
    fn scratch(name: &str, bytes: Option<&[u8]>) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(name);
        if let Some(b) = bytes {
            fs::write(&p, b).unwrap();
        }
        (dir, p)
    }

    #[test]
    fn atomic_write_replaces_content() {
        let (dir, p) = scratch("f", None);
        atomic_write(&p, b"one").unwrap();
        atomic_write(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Nothing but the file itself is left in the directory.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        let v: Option<Vec<u32>> = read_json(&dir.path().join("missing")).unwrap();
        assert!(v.is_none());
    }

    #[test]
    fn durable_files_publish_whole_or_leave_nothing() {
        let (dir, p) = scratch("uif.img", Some(b"old"));
        // A crash left a temp file of an earlier version.
        let stale = dir.path().join(".uif.img.uve-tmp-00000000000000aa");
        fs::write(&stale, b"torn").unwrap();
        let f = DurableFile::create_sole(&p).unwrap();
        assert!(!stale.exists(), "the sole writer removes stale temps");
        assert!(
            f.temp_path()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with('.'),
            "no valid name starts with a dot"
        );
        f.file().write_all(b"piece one, ").unwrap();
        f.file().write_all(b"piece two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"old", "untouched until published");
        f.publish().unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"piece one, piece two");
        let g = DurableFile::create(&p).unwrap();
        g.file().write_all(b"abandoned").unwrap();
        drop(g);
        assert_eq!(fs::read(&p).unwrap(), b"piece one, piece two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temp left");
        replace_symlink(dir.path(), "current", "uif.img").unwrap();
        replace_symlink(dir.path(), "current", "other").unwrap();
        assert_eq!(
            fs::read_link(dir.path().join("current")).unwrap(),
            Path::new("other")
        );
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    /// The child half of [`every_durable_call_aborts_on_the_runtime_thread`]:
    /// marks its thread as the runtime thread and makes the call named by
    /// `UVE_FSUTIL_ON_RUNTIME`, which must abort before returning.
    fn durable_call_on_runtime_thread(call: &str) {
        let (dir, p) = scratch("f", Some(b"x"));
        mark_runtime_thread();
        match call {
            "atomic_write" => drop(atomic_write(&p, b"y")),
            "publish" => {
                // Created off the mark's reach is irrelevant: only the
                // publishing waits on the disk.
                let f = DurableFile::create(&p).unwrap();
                drop(f.publish());
            }
            "sync" => drop(sync(&File::open(&p).unwrap())),
            "sync_file" => drop(sync_file(&p)),
            "sync_parent" => drop(sync_parent(&p)),
            "sync_filesystems" => sync_filesystems(),
            "pause" => pause(std::time::Duration::from_millis(1)),
            "replace_symlink" => drop(replace_symlink(dir.path(), "l", "f")),
            other => panic!("unknown call {other}"),
        }
        // Reached only if the assertion did not fire.
        std::process::exit(0);
    }

    #[test]
    fn every_durable_call_aborts_on_the_runtime_thread() {
        if let Ok(call) = std::env::var("UVE_FSUTIL_ON_RUNTIME") {
            durable_call_on_runtime_thread(&call);
            return;
        }
        let me = std::env::current_exe().unwrap();
        for call in [
            "atomic_write",
            "publish",
            "sync",
            "sync_file",
            "sync_parent",
            "sync_filesystems",
            "pause",
            "replace_symlink",
        ] {
            let out = std::process::Command::new(&me)
                .args([
                    "--exact",
                    "base::fsutil::tests::every_durable_call_aborts_on_the_runtime_thread",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("UVE_FSUTIL_ON_RUNTIME", call)
                .output()
                .unwrap();
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(
                out.status.signal(),
                Some(libc::SIGABRT),
                "{call} on the runtime thread must abort; {:?}",
                out.status
            );
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("on the agent's runtime thread"),
                "{call}: {err}"
            );
        }
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00Z");
        assert_eq!(utc(1_796_166_245_000), "2026-12-01 23:04:05Z");
    }

    #[test]
    fn private_files_refuse_planted_symlinks() {
        let (dir, target) = scratch("target", Some(b"keep"));
        let p = dir.path().join("state.json");
        std::os::unix::fs::symlink(&target, &p).unwrap();
        assert!(create_private(&p).is_err());
        assert!(sync_file(&p).is_err());
        // atomic_write replaces the link itself, never writes through it.
        atomic_write(&p, b"new").unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"keep");
        assert!(!fs::symlink_metadata(&p).unwrap().file_type().is_symlink());
    }
}
