//! Packing a directory-mode home into its archive at flush time.
//!
//! The pack runs in a child process, `uve-agent pack-home` ([`pack_child`]
//! is its side), with the privileges of the home's owner (uid, gid, no
//! supplementary groups, empty environment), started in the home through
//! a descriptor root opened with `O_NOFOLLOW`: it can read only what the
//! user can read. It makes itself non-dumpable, so its user can neither
//! ptrace it nor read its memory. The child writes the tar to its stdout,
//! a fresh root-owned 0600 temp file the daemon opened; the daemon fsyncs
//! and renames it over the archive. The walk itself never follows
//! symlinks and packs no file that has hard links outside the home
//! ([`crate::base::archive::pack_to`]). When no owner is known there is
//! no unprivileged uid to run as (and no unprivileged user owns the
//! unpacked files), so the same walk runs in the daemon.
//!
//! Where the agent has cgroups (see [`crate::supervise::Cgroups`]), the
//! child runs in a cgroup of the agent's own per user,
//! `<agent's cgroup>/pack/<user>` — not in the user's logind session,
//! which logind may kill at logout, and not among the agent's own
//! processes — and a kill goes to the whole cgroup (`cgroup.kill`).
//!
//! The daemon watches the child from its async runtime, holding no
//! blocking thread while it runs (the agent has only four, which every
//! fsync needs): a child its user stopped, one that stops writing, runs
//! too long, or would leave the state filesystem below its floor is
//! killed, and the home is left as it is.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use tokio::time::Instant;

use super::{UifError, blocking};
use crate::base::archive::{self, Excludes};
use crate::base::fsutil::DurableFile;
use crate::base::nofollow;

/// The pack child is killed when it has been stopped (its user sent it
/// `SIGSTOP`, or a debugger holds it) for this long...
const PACK_STOPPED: Duration = Duration::from_secs(5);

/// ...or its archive has not grown for this long (stuck on an
/// unresponsive file system)...
const PACK_STALL: Duration = Duration::from_secs(300);

/// ...or when it has run this long in all.
const PACK_LIMIT: Duration = Duration::from_secs(2 * 3600);

/// How often the daemon looks at the pack child.
const PACK_POLL: Duration = Duration::from_millis(10);

/// Lines of the pack child's stderr kept for an error message.
const STDERR_TAIL_LINES: usize = 10;

/// The parent of the pack children's per-user cgroups, once the daemon
/// has found its cgroup layout (none: the children stay in the agent's).
static PACK_CGROUPS: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Makes every later pack child run in `<base>/<user>` (the daemon calls
/// it once at start, when it has cgroups).
pub fn use_cgroups(base: PathBuf) {
    let _ = PACK_CGROUPS.set(base);
}

/// A pack child's cgroup: entered right after the spawn, removed (once
/// empty) when dropped.
struct PackCgroup(PathBuf);

impl PackCgroup {
    /// Moves `pid` into `<base>/<user>`, creating it; `None` (with a
    /// warning: the child then runs in the agent's cgroup) if that fails.
    fn enter(base: &Path, user: &str, pid: u32) -> Option<PackCgroup> {
        let dir = base.join(user);
        let moved = std::fs::create_dir_all(&dir).and_then(|()| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.procs"))?
                .write_all(pid.to_string().as_bytes())
        });
        match moved {
            Ok(()) => Some(PackCgroup(dir)),
            Err(e) => {
                tracing::warn!(cgroup = %dir.display(), "pack child left in the agent's cgroup: {e}");
                None
            }
        }
    }

    /// Kills every process in it.
    fn kill(&self) {
        let _ = std::fs::write(self.0.join("cgroup.kill"), b"1");
    }
}

impl Drop for PackCgroup {
    fn drop(&mut self) {
        // Empty once the child is reaped; a cgroup the kernel still counts
        // as populated for a moment is removed at that user's next pack.
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Packs `home` into `archive` (temp + rename, so the previous archive,
/// which is also the chunk cache, stays intact until the new one is
/// whole): as `owner` in a `pack-home` child, or in-process when no
/// unprivileged owner is known (see the module header). `floor`: bytes
/// the pack leaves free on the archive's filesystem.
pub async fn pack_home(
    user: &str,
    home: PathBuf,
    archive: PathBuf,
    excludes: Vec<String>,
    owner: Option<(u32, u32)>,
    floor: u64,
) -> Result<(), UifError> {
    let Some((uid, gid)) = owner.filter(|(uid, _)| *uid != 0) else {
        // No unprivileged owner: nobody but root owns the files; the walk
        // is the same, only in-process.
        return blocking(move || {
            let (home_dir, out) = open_for_pack(&home, &archive)?;
            pack_in_process(&home_dir, out.file(), &excludes)?;
            out.publish()
                .map_err(|e| UifError::at("publish", &archive, e))
        })
        .await;
    };
    let what = format!("pack {} as uid {uid}", home.display());
    let fail = |why: String| UifError::io(&what, io::Error::other(why));
    let (h2, a2, u2) = (home.clone(), archive.clone(), user.to_string());
    // On an error `out` is dropped, and its temp file with it.
    let (mut started, out, cgroup) = blocking(move || {
        let (home_dir, out) = open_for_pack(&h2, &a2)?;
        let started = start_child(&h2, &home_dir, out.file(), &excludes, (uid, gid))?;
        // Never pid 0: written to cgroup.procs, it would move the agent.
        let cgroup = PACK_CGROUPS
            .get()
            .zip(started.child.as_ref())
            .and_then(|(base, child)| PackCgroup::enter(base, &u2, child.id()));
        Ok((started, out, cgroup))
    })
    .await?;
    // Dropped before the child is reaped (this future cancelled, or a
    // child that will not die), it kills the child and reaps it on a
    // thread of its own.
    let mut running = Running {
        child: started.child.take(),
        cgroup,
    };
    let status = watch(&mut running, out.file(), floor).await.map_err(fail)?;
    drop(running);
    // The reader ends at EOF, right after the child exits.
    let _ = tokio::time::timeout(Duration::from_secs(2), started.stderr_done).await;
    if !status.success() {
        let tail = started
            .tail
            .lock()
            .map(|t| t.iter().cloned().collect::<Vec<String>>().join(" | "))
            .unwrap_or_default();
        return Err(fail(format!("pack-home {status}: {tail}")));
    }
    blocking(move || {
        out.publish()
            .map_err(|e| UifError::at("publish", &archive, e))
    })
    .await
}

/// Opens `home` (never through a symlink) and starts a new version of
/// `archive`.
fn open_for_pack(home: &Path, archive: &Path) -> Result<(OwnedFd, DurableFile), UifError> {
    if let Some(dir) = archive.parent() {
        crate::base::fsutil::ensure_dir(dir).map_err(|e| UifError::at("create", dir, e))?;
    }
    let home_dir = match nofollow::open_dir(home) {
        Ok(d) => d,
        Err(Errno::ENOENT) => {
            return Err(UifError::at(
                "pack home",
                home,
                io::Error::new(io::ErrorKind::NotFound, "home directory is missing"),
            ));
        }
        Err(e @ (Errno::ELOOP | Errno::ENOTDIR)) => {
            return Err(UifError::at(
                "pack home",
                home,
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("not a directory (symlink?): {e}"),
                ),
            ));
        }
        Err(e) => return Err(UifError::at("open", home, e.into())),
    };
    // The user's lock makes this the archive's only writer.
    let out =
        DurableFile::create_sole(archive).map_err(|e| UifError::at("create a new", archive, e))?;
    Ok((home_dir, out))
}

fn pack_in_process(home: &OwnedFd, out: &File, excludes: &[String]) -> Result<(), UifError> {
    let excludes = Excludes::new(excludes)
        .map_err(|e| UifError::io("exclude", io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    let w = io::BufWriter::with_capacity(256 << 10, out);
    let (mut w, count) = archive::pack_to(home.as_fd(), w, &excludes)?;
    w.flush().map_err(|e| UifError::io("write archive", e))?;
    tracing::debug!(count, "packed home in-process");
    Ok(())
}

/// A started pack child and the reader of its stderr.
struct Started {
    child: Option<Child>,
    /// The last lines of its stderr.
    tail: Arc<Mutex<VecDeque<String>>>,
    /// Completes when the stderr reader has seen EOF.
    stderr_done: tokio::sync::oneshot::Receiver<()>,
}

/// Starts `uve-agent pack-home` as `uid`:`gid` (std's `Command::uid` also
/// drops root's supplementary groups; checked again before exec), in the
/// home opened by the daemon, its stdout the temp archive `out`, its
/// stderr forwarded to the log (by a small thread of its own) and kept
/// for the error message.
fn start_child(
    home: &Path,
    home_dir: &OwnedFd,
    out: &File,
    excludes: &[String],
    (uid, gid): (u32, u32),
) -> Result<Started, UifError> {
    let what = format!("pack {} as uid {uid}", home.display());
    let exe = std::env::current_exe().map_err(|e| UifError::io("find own executable", e))?;
    let stdout = out
        .try_clone()
        .map_err(|e| UifError::io("duplicate archive descriptor", e))?;
    let mut cmd = pack_command(&exe, home_dir, stdout, excludes, (uid, gid));
    let mut child = cmd.spawn().map_err(|e| {
        UifError::io(
            &what,
            io::Error::other(format!("cannot start {}: {e}", exe.display())),
        )
    })?;
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let (done_tx, stderr_done) = tokio::sync::oneshot::channel::<()>();
    if let Some(stderr) = child.stderr.take() {
        let tail = tail.clone();
        let label = home.display().to_string();
        let spawned = std::thread::Builder::new()
            .name("pack-home-stderr".into())
            .stack_size(128 * 1024)
            .spawn(move || {
                forward_stderr(stderr, &label, &tail);
                let _ = done_tx.send(());
            });
        if let Err(e) = spawned {
            let _ = child.kill();
            let _ = child.wait();
            return Err(UifError::io("start stderr reader", e));
        }
    }
    Ok(Started {
        child: Some(child),
        tail,
        stderr_done,
    })
}

/// The `pack-home` command: `exe` as `owner`, started in the open home
/// `home_dir`, writing the archive to `stdout`, with no environment.
fn pack_command(
    exe: &Path,
    home_dir: &OwnedFd,
    stdout: File,
    excludes: &[String],
    (uid, gid): (u32, u32),
) -> Command {
    let mut cmd = Command::new(exe);
    cmd.args(["pack-home", "--home", "."]);
    for e in excludes {
        cmd.arg(format!("--exclude={e}"));
    }
    cmd.env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::piped())
        .uid(uid)
        .gid(gid);
    let dir_fd = home_dir.as_raw_fd();
    let was_root = nix::unistd::geteuid().is_root();
    // SAFETY: the closure runs in the forked child before exec and only
    // makes two system calls (fchdir, getgroups), both async-signal-safe;
    // it allocates nothing and touches no locks. `dir_fd` stays open in
    // the parent (borrowed from `home_dir`) until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::fchdir(dir_fd).map_err(io::Error::from)?;
            if was_root && libc::getgroups(0, std::ptr::null_mut()) != 0 {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            Ok(())
        });
    }
    cmd
}

/// Bytes free for unprivileged writers on the filesystem of `f`, and the
/// floor a pack must leave there: `floor`, but at most a tenth of the
/// filesystem (a small VM's state filesystem may be smaller than the
/// configured floor).
fn free_and_floor(f: &File, floor: u64) -> Option<(u64, u64)> {
    let st = nix::sys::statvfs::fstatvfs(f).ok()?;
    let free = st.blocks_available().saturating_mul(st.fragment_size());
    let size = st.blocks().saturating_mul(st.fragment_size());
    Some((free, floor.min(size / 10)))
}

/// True if process `pid` is stopped (`T`) or stopped by a tracer (`t`).
fn is_stopped(pid: u32) -> bool {
    // `pid (comm) S ...`: the state follows the last `)`.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|c| c == 'T' || c == 't')
    })
}

/// A pack child being watched, and its cgroup. Dropped while the child
/// is not reaped, it kills it (and its cgroup) and reaps it on a thread
/// of its own, so neither a cancelled pack nor a child stuck in the
/// kernel holds the runtime.
struct Running {
    child: Option<Child>,
    cgroup: Option<PackCgroup>,
}

impl Running {
    /// The child's exit status once it has exited (then it is reaped).
    fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        let status = child.try_wait()?;
        if status.is_some() {
            self.child = None;
        }
        Ok(status)
    }

    /// The child's pid (0 once reaped).
    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGKILL to the child and everything in its cgroup.
    fn kill(&mut self) {
        if let Some(cg) = &self.cgroup {
            cg.kill();
        }
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        self.kill();
        let cgroup = self.cgroup.take();
        let reaped = std::thread::Builder::new()
            .name("pack-home-reap".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                let _ = child.kill();
                let _ = child.wait();
                drop(cgroup);
            });
        if let Err(e) = reaped {
            tracing::warn!("cannot reap a killed pack child (it stays a zombie): {e}");
        }
    }
}

/// Kills the child (and its cgroup), waits up to a second for it to be
/// reaped without blocking the runtime (one stuck in the kernel is left
/// to [`Running`]'s drop), then gives `why` as the error.
async fn killed(running: &mut Running, why: String) -> Result<ExitStatus, String> {
    running.kill();
    for _ in 0..100 {
        if !matches!(running.try_wait(), Ok(None)) || running.child.is_none() {
            break;
        }
        tokio::time::sleep(PACK_POLL).await;
    }
    Err(why)
}

/// Waits for the pack child without holding a thread (a look every
/// [`PACK_POLL`]: its exit, its `/proc` state, the archive's size and the
/// free space, none of which blocks), killing it when its archive `out`
/// would leave less than `floor` bytes free on the state filesystem, it
/// stays stopped for [`PACK_STOPPED`], the archive stops growing for
/// [`PACK_STALL`], or the pack runs past [`PACK_LIMIT`].
async fn watch(running: &mut Running, out: &File, floor: u64) -> Result<ExitStatus, String> {
    let start = Instant::now();
    let (mut size, mut grew) = (0u64, Instant::now());
    let mut stopped_since: Option<Instant> = None;
    let mut tick = tokio::time::interval(PACK_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match running.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) => {}
            Err(e) => return killed(running, format!("wait for pack-home: {e}")).await,
        }
        let now_size = out.metadata().map(|m| m.len()).unwrap_or(size);
        if now_size != size {
            (size, grew) = (now_size, Instant::now());
        }
        stopped_since = if is_stopped(running.pid()) {
            stopped_since.or_else(|| Some(Instant::now()))
        } else {
            None
        };
        if let Some((free, floor)) = free_and_floor(out, floor)
            && free < floor
        {
            return killed(
                running,
                format!(
                    "the home packs to more than the state filesystem can take: the archive \
                     reached {} MiB with {} MiB left free (the floor: {} MiB, state_floor_mib or \
                     a tenth of the filesystem); stopped, nothing of it kept, the home left as it \
                     is. Large files count at full size, a sparse file's holes too",
                    size >> 20,
                    free >> 20,
                    floor >> 20
                ),
            )
            .await;
        }
        if stopped_since.is_some_and(|t| t.elapsed() > PACK_STOPPED) {
            return killed(
                running,
                format!(
                    "pack-home was stopped for more than {PACK_STOPPED:?} (SIGSTOP by its user, \
                     or a debugger); killed. The home is left as it is"
                ),
            )
            .await;
        }
        if grew.elapsed() > PACK_STALL || start.elapsed() > PACK_LIMIT {
            return killed(
                running,
                format!(
                    "pack-home made no progress for {:?} (or ran longer than {PACK_LIMIT:?}); \
                     killed",
                    grew.elapsed().min(PACK_STALL)
                ),
            )
            .await;
        }
    }
}

/// Logs the pack child's stderr line by line (bounded) and keeps the last
/// lines in `tail`.
fn forward_stderr(mut stderr: impl Read, home: &str, tail: &Mutex<VecDeque<String>>) {
    const MAX_LINE: usize = 2048;
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    let emit = |line: &[u8]| {
        let text = String::from_utf8_lossy(line.get(..MAX_LINE).unwrap_or(line))
            .trim()
            .to_string();
        if text.is_empty() {
            return;
        }
        tracing::warn!(home, "pack-home: {text}");
        if let Ok(mut t) = tail.lock() {
            if t.len() == STDERR_TAIL_LINES {
                t.pop_front();
            }
            t.push_back(text);
        }
    };
    loop {
        let n = match stderr.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        pending.extend_from_slice(buf.get(..n).unwrap_or_default());
        while let Some(i) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=i).collect();
            emit(&line);
        }
        if pending.len() > MAX_LINE {
            emit(&pending);
            pending.clear();
        }
    }
    emit(&pending);
}

/// The `pack-home` child: packs `home` (normally `.`: the daemon starts
/// it in the home) as a tar archive to stdout, warnings on stderr. Runs
/// with the privileges of the home's user (see the module header); the
/// walk never follows symlinks either way.
pub fn pack_child(home: &Path, excludes: &[String]) -> anyhow::Result<()> {
    use anyhow::Context;
    // Not dumpable: its user may not ptrace it (and so make it write any
    // archive for root to unpack) nor read its memory. Set here, after
    // exec, which resets the flag for a binary that is not setuid.
    nix::sys::prctl::set_dumpable(false).context("PR_SET_DUMPABLE")?;
    let _ = tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .with_max_level(tracing::Level::WARN)
        .try_init();
    let dir = nofollow::open_dir(home)
        .map_err(io::Error::from)
        .with_context(|| format!("open {}", home.display()))?;
    let out = File::from(
        io::stdout()
            .as_fd()
            .try_clone_to_owned()
            .context("duplicate stdout")?,
    );
    let excludes = Excludes::new(excludes)?;
    let w = io::BufWriter::with_capacity(256 << 10, out);
    let (mut w, _count) = archive::pack_to(dir.as_fd(), w, &excludes)?;
    w.flush().context("write archive")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_pack_child_enters_its_users_cgroup_and_a_kill_goes_to_the_cgroup() {
        // A fake cgroup2 directory: the kernel makes cgroup.procs at mkdir.
        let t = tempfile::tempdir().unwrap();
        let base = t.path().join("pack");
        std::fs::create_dir_all(base.join("ann")).unwrap();
        std::fs::write(base.join("ann/cgroup.procs"), "").unwrap();
        let cg = PackCgroup::enter(&base, "ann", 4242).unwrap();
        assert_eq!(
            std::fs::read_to_string(base.join("ann/cgroup.procs")).unwrap(),
            "4242"
        );
        cg.kill();
        assert_eq!(
            std::fs::read_to_string(base.join("ann/cgroup.kill")).unwrap(),
            "1"
        );
        // Where no cgroup can be made the child stays in the agent's.
        let file = t.path().join("not-a-dir");
        std::fs::write(&file, "").unwrap();
        assert!(PackCgroup::enter(&file, "bob", 1).is_none());
    }
}
