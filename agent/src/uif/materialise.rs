//! Making a retrieved UIF appear to the user and taking it back:
//! file mode runs the configured attach/detach hooks on the image (e.g. a
//! loop mount); directory mode unpacks the tar into the home directory and
//! repacks it at flush time honouring the exclude globs.
//!
//! Directory mode never follows a symlink and never acts on a path after
//! checking it, although the user (or a process of theirs left over after
//! logout) owns the home and can change it at any time:
//! - **unpack** goes into a fresh sibling `.<name>.uve-new` that root
//!   creates with mode 0700 and keeps owning until the archive is fully
//!   unpacked (fd-relative, ownership and modes set on descriptors, see
//!   [`crate::base::archive`]); only then is it chowned to the user and renamed
//!   in place of the home (the old one moved aside, locked — chowned to
//!   root, mode 0700 — then removed);
//! - **pack** runs in a child process, `uve-agent pack-home`, with the
//!   privileges of the home's owner (uid, gid, no supplementary groups,
//!   empty environment), started in the home through a descriptor root
//!   opened with `O_NOFOLLOW`: it can read only what the user can read.
//!   The child writes the tar to its stdout, a fresh root-owned 0600 temp
//!   file the daemon opened; the daemon fsyncs and renames it over the
//!   archive. The walk itself never follows symlinks and packs no file
//!   that has hard links outside the home ([`crate::base::archive::pack_to`]).
//!   When no owner is known there is no unprivileged uid to run as (and no
//!   unprivileged user owns the unpacked files), so the same walk runs in
//!   the daemon.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;

use super::UifError;
use crate::base::accounts::Account;
use crate::base::archive::{self, Excludes, UnpackPolicy};
use crate::base::nofollow::{self, Kind};
use crate::config::{Config, UifMode};

/// Longest a hook may run.
const HOOK_LIMIT: Duration = Duration::from_secs(120);

/// The pack child is killed when it has been stopped (its user sent it
/// `SIGSTOP`, or a debugger holds it) for this long...
const PACK_STOPPED: Duration = Duration::from_secs(5);

/// ...or its archive has not grown for this long (stuck on an
/// unresponsive file system)...
const PACK_STALL: Duration = Duration::from_secs(300);

/// ...or when it has run this long in all.
const PACK_LIMIT: Duration = Duration::from_secs(2 * 3600);

/// Lines of the pack child's stderr kept for an error message.
const STDERR_TAIL_LINES: usize = 10;

/// Makes `user`'s UIF (already at `cfg.uif_path(user)`) available;
/// `account` is the user's entry in the user database, if it has one.
pub async fn attach(
    cfg: &Config,
    user: &str,
    account: Option<&Account>,
    session: &str,
    temporary: bool,
) -> Result<(), UifError> {
    match cfg.uif.mode {
        UifMode::File => run_hook(cfg, &cfg.uif.attach, user, session, temporary).await,
        UifMode::Directory => {
            let archive = cfg.uif_path(user);
            let home = cfg.home_path(user, account);
            let owner = cfg.owner(account);
            super::blocking(move || unpack_home(&archive, &home, owner)).await
        }
        UifMode::Disk => {
            let (disk, user) = (cfg.disk.clone(), user.to_string());
            let (image, home) = (cfg.uif_path(&user), cfg.home_path(&user, account));
            let owner = cfg.owner(account);
            super::blocking(move || super::disk_home::attach(&disk, &user, &image, &home, owner))
                .await
        }
    }
}

/// Takes `user`'s UIF back so its file is consistent: file mode runs the
/// detach hook (unless `keep_attached`, for checkpoints); directory mode
/// packs the home into the UIF file.
pub async fn detach(
    cfg: &Config,
    user: &str,
    account: Option<&Account>,
    session: &str,
    keep_attached: bool,
) -> Result<(), UifError> {
    match cfg.uif.mode {
        UifMode::File if keep_attached => Ok(()),
        UifMode::File => run_hook(cfg, &cfg.uif.detach, user, session, false).await,
        UifMode::Directory => {
            let archive = cfg.uif_path(user);
            let home = cfg.home_path(user, account);
            let excludes = cfg.uif.exclude.clone();
            let owner = cfg.owner(account);
            let floor = cfg.state_floor_mib << 20;
            super::blocking(move || pack_home(&home, &archive, &excludes, owner, floor)).await
        }
        UifMode::Disk => {
            let (disk, user) = (cfg.disk.clone(), user.to_string());
            let (image, home) = (cfg.uif_path(&user), cfg.home_path(&user, account));
            let owner = cfg.owner(account);
            super::blocking(move || {
                super::disk_home::detach(&disk, &user, &image, &home, owner, keep_attached)
            })
            .await
        }
    }
}

/// After an agent restart within the same boot: takes up again what the
/// previous agent process served for `user` (disk mode: the profile
/// disk's device, whose home stayed mounted). Nothing in the other modes.
pub async fn reattach(cfg: &Config, user: &str) -> Result<(), UifError> {
    if cfg.uif.mode != UifMode::Disk {
        return Ok(());
    }
    let (user, image) = (user.to_string(), cfg.uif_path(user));
    super::blocking(move || super::disk_home::reattach(&user, &image).map(drop)).await
}

fn errno_at(what: &str, path: &Path) -> impl FnOnce(Errno) -> UifError {
    move |e| UifError::at(what, path, io::Error::from(e))
}

/// Refuses a home whose parent directory others could rearrange: it must
/// belong to root (or to us) and, if group- or world-writable, be sticky.
/// The renames of `.<name>.uve-new` and `.<name>.uve-old` rely on it.
fn check_home_parent(parent: &Path) -> Result<(), UifError> {
    let dir = nofollow::open_dir(parent).map_err(errno_at("open", parent))?;
    let st = nofollow::stat(dir.as_fd()).map_err(errno_at("stat", parent))?;
    let ours = st.st_uid == 0 || st.st_uid == nix::unistd::geteuid().as_raw();
    let shared = st.st_mode & 0o022 != 0 && st.st_mode & 0o1000 == 0;
    if ours && !shared {
        Ok(())
    } else {
        Err(UifError::at(
            "use home parent",
            parent,
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                "must belong to root (or the agent's user) and not be writable by others unless sticky",
            ),
        ))
    }
}

/// Removes `path` (a leftover `.<name>.uve-new`, or a moved-aside home)
/// without following it. A directory is first locked (its top chowned to
/// root, mode 0700: the user's processes can no longer enter it) so a
/// leftover process of the user can hardly keep changing it while it is
/// removed; if removing still fails, the tree is renamed out of the way
/// (`<path>.<pid>-<nanos>`, with a warning) so the login goes on.
fn discard_tree(path: &Path) -> Result<(), UifError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return std::fs::remove_file(path).map_err(|e| UifError::at("remove", path, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(UifError::at("stat", path, e)),
    }
    if let Ok(dir) = nofollow::open_dir(path) {
        let (uid, gid) = (nix::unistd::geteuid(), nix::unistd::getegid());
        let _ = nofollow::chown_fd(dir.as_fd(), uid.as_raw(), gid.as_raw());
        let _ = nofollow::chmod_fd(dir.as_fd(), 0o700);
    }
    let mut last = None;
    for _ in 0..3 {
        match std::fs::remove_dir_all(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let trash = crate::base::fsutil::sibling(path, &format!(".{}-{nanos}", std::process::id()));
    tracing::warn!(
        path = %path.display(), trash = %trash.display(),
        error = %last.map(|e| e.to_string()).unwrap_or_default(),
        "cannot remove (changing under us?); moved aside"
    );
    std::fs::rename(path, &trash).map_err(|e| UifError::at("move aside", path, e))
}

/// Unpacks into `.<name>.uve-new` beside the home (root's, mode 0700, until it is whole;
/// then chowned to `owner`), then swaps it in place of `home`.
fn unpack_home(archive: &Path, home: &Path, owner: Option<(u32, u32)>) -> Result<(), UifError> {
    // Hidden names (`.alice.uve-new`): `bob.uve-old` is a valid user name,
    // whose home these must never be.
    let new = crate::base::fsutil::hidden_sibling(home, ".uve-new");
    let old = crate::base::fsutil::hidden_sibling(home, ".uve-old");
    if let Some(parent) = home.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| UifError::at("create", parent, e))?;
        check_home_parent(parent)?;
    }
    for leftover in [&new, &old] {
        discard_tree(leftover)?;
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&new)
        .map_err(|e| UifError::at("create", &new, e))?;
    let dir = nofollow::open_dir(&new).map_err(errno_at("open", &new))?;
    let st = nofollow::stat(dir.as_fd()).map_err(errno_at("stat", &new))?;
    if nofollow::kind(&st) != Kind::Dir || st.st_uid != nix::unistd::geteuid().as_raw() {
        return Err(UifError::at(
            "use",
            &new,
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                "not the directory we created",
            ),
        ));
    }
    let policy = UnpackPolicy {
        symlinks_anywhere: true,
        strict_types: false,
        owner,
    };
    let unpacked = nofollow::chmod_fd(dir.as_fd(), 0o700)
        .map_err(errno_at("chmod", &new))
        .and_then(|()| archive::unpack_into(archive, dir.as_fd(), policy).map_err(Into::into))
        .and_then(|_| match owner {
            // The user gets the tree only now that it is whole.
            Some((uid, gid)) => {
                nofollow::chown_fd(dir.as_fd(), uid, gid).map_err(errno_at("chown", &new))
            }
            None => Ok(()),
        });
    drop(dir);
    if let Err(e) = unpacked {
        let _ = std::fs::remove_dir_all(&new);
        return Err(e);
    }
    if std::fs::symlink_metadata(home).is_ok() {
        std::fs::rename(home, &old).map_err(|e| UifError::at("move aside", home, e))?;
    }
    std::fs::rename(&new, home).map_err(|e| UifError::at("move into place", home, e))?;
    if let Err(e) = discard_tree(&old) {
        tracing::warn!("previous home left behind: {e}");
    }
    Ok(())
}

/// Packs `home` into `archive` (temp + rename, so the previous archive,
/// which is also the chunk cache, stays intact until the new one is
/// whole): as `owner` in a `pack-home` child, or in-process when no
/// unprivileged owner is known (see the module header).
fn pack_home(
    home: &Path,
    archive: &Path,
    excludes: &[String],
    owner: Option<(u32, u32)>,
    floor: u64,
) -> Result<(), UifError> {
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
        Err(e) => return Err(errno_at("open", home)(e)),
    };
    // The user's lock makes this the archive's only writer. On an error
    // `out` is dropped, and its temp file with it.
    let out = crate::base::fsutil::DurableFile::create_sole(archive)
        .map_err(|e| UifError::at("create a new", archive, e))?;
    match owner {
        Some((uid, gid)) if uid != 0 => {
            pack_as_owner(home, &home_dir, out.file(), excludes, (uid, gid), floor)?;
        }
        // No unprivileged owner: nobody but root owns the files; the walk
        // is the same, only in-process.
        _ => pack_in_process(&home_dir, out.file(), excludes)?,
    }
    out.publish()
        .map_err(|e| UifError::at("publish", archive, e))
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

/// Runs `uve-agent pack-home` as `uid`:`gid` (std's `Command::uid` also
/// drops root's supplementary groups; checked again before exec), in the
/// home opened by the daemon, its stdout the temp archive `out`, its
/// stderr forwarded to the log and kept for the error message.
fn pack_as_owner(
    home: &Path,
    home_dir: &OwnedFd,
    out: &File,
    excludes: &[String],
    (uid, gid): (u32, u32),
    floor: u64,
) -> Result<(), UifError> {
    let what = format!("pack {} as uid {uid}", home.display());
    let fail = |why: String| UifError::io(&what, io::Error::other(why));
    let exe = std::env::current_exe().map_err(|e| UifError::io("find own executable", e))?;
    let stdout = out
        .try_clone()
        .map_err(|e| UifError::io("duplicate archive descriptor", e))?;
    let mut cmd = pack_command(&exe, home_dir, stdout, excludes, (uid, gid));
    let mut child = cmd
        .spawn()
        .map_err(|e| fail(format!("cannot start {}: {e}", exe.display())))?;
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
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
    let status = wait_pack_child(&mut child, out, floor).map_err(fail)?;
    // The reader ends at EOF, right after the child exits.
    let _ = done_rx.recv_timeout(Duration::from_secs(2));
    if status.success() {
        return Ok(());
    }
    let tail = tail
        .lock()
        .map(|t| t.iter().cloned().collect::<Vec<String>>().join(" | "))
        .unwrap_or_default();
    Err(fail(format!("pack-home {status}: {tail}")))
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

/// Waits for the pack child, killing it when its archive `out` would
/// leave less than `floor` bytes free on the state filesystem, it stays
/// stopped for [`PACK_STOPPED`], the archive stops growing for
/// [`PACK_STALL`], or the pack runs past [`PACK_LIMIT`].
fn wait_pack_child(
    child: &mut std::process::Child,
    out: &File,
    floor: u64,
) -> Result<std::process::ExitStatus, String> {
    let start = Instant::now();
    let (mut size, mut grew) = (0u64, Instant::now());
    let mut stopped_since: Option<Instant> = None;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) => {}
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("wait for pack-home: {e}"));
            }
        }
        let now_size = out.metadata().map(|m| m.len()).unwrap_or(size);
        if now_size != size {
            (size, grew) = (now_size, Instant::now());
        }
        stopped_since = if is_stopped(child.id()) {
            stopped_since.or_else(|| Some(Instant::now()))
        } else {
            None
        };
        if let Some((free, floor)) = free_and_floor(out, floor)
            && free < floor
        {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "the home packs to more than the state filesystem can take: the archive reached \
                 {} MiB with {} MiB left free (the floor: {} MiB, state_floor_mib or a tenth of \
                 the filesystem); stopped, nothing of it kept, the home left as it is. Large \
                 files count at full size, a sparse file's holes too",
                size >> 20,
                free >> 20,
                floor >> 20
            ));
        }
        if stopped_since.is_some_and(|t| t.elapsed() > PACK_STOPPED) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "pack-home was stopped for more than {PACK_STOPPED:?} (SIGSTOP by its user, or \
                 a debugger); killed. The home is left as it is"
            ));
        }
        if grew.elapsed() > PACK_STALL || start.elapsed() > PACK_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "pack-home made no progress for {:?} (or ran longer than {PACK_LIMIT:?}); killed",
                grew.elapsed().min(PACK_STALL)
            ));
        }
        crate::base::fsutil::pause(Duration::from_millis(10));
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

/// Runs a hook argv with `{path}`, `{user}`, `{session}` substituted; the
/// same values are in `UVE_UIF_PATH`, `UVE_USER`, `UVE_SESSION`, plus
/// `UVE_UIF_TEMPORARY=1` for a temporary UIF. No hook configured = no-op.
async fn run_hook(
    cfg: &Config,
    argv: &[String],
    user: &str,
    session: &str,
    temporary: bool,
) -> Result<(), UifError> {
    let Some((prog, args)) = argv.split_first() else {
        return Ok(());
    };
    let path = cfg.uif_path(user);
    let subst = |s: &String| {
        s.replace("{path}", &path.to_string_lossy())
            .replace("{user}", user)
            .replace("{session}", session)
    };
    let mut cmd = tokio::process::Command::new(subst(prog));
    cmd.args(args.iter().map(subst))
        .env("UVE_UIF_PATH", &path)
        .env("UVE_USER", user)
        .env("UVE_SESSION", session)
        .env("UVE_UIF_TEMPORARY", if temporary { "1" } else { "0" })
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let status = tokio::time::timeout(HOOK_LIMIT, cmd.status())
        .await
        .map_err(|_| UifError::Hook(format!("{prog} did not finish within {HOOK_LIMIT:?}")))?
        .map_err(|e| UifError::Hook(format!("cannot run {prog}: {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(UifError::Hook(format!("{prog} exited with {status}")))
    }
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
