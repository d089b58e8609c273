//! Disk mode: the user's UIF is an ext4 disk image, served to the guest
//! kernel by the agent's own NBD server and mounted as the home.
//!
//! Attach (first session of the user on this VM): a first login (an
//! empty UIF) gets a sparse image of `[disk] size_mib` with an ext4
//! filesystem whose root belongs to the user, made in full at once (no
//! lazy initialisation later); a smaller image grows to the configured
//! size (`resize2fs`). Every image is checked with `e2fsck -p` before it is
//! served, and refused — never mounted — when that cannot repair it (a
//! hostile VM may have committed a crafted image). The backing filesystem
//! must have room for the disk to grow (or `reserve_mib`), else the login
//! fails with the figures. Then the image is served as `/dev/nbdN` and
//! mounted `nosuid,nodev` at the home.
//!
//! Detach (the user's last session ends): unmount, waiting up to
//! `logout_grace_secs` for the user's processes to let go of the home,
//! then killing them; the unmount flushes the filesystem through the
//! device into the image; then the device is disconnected, and the image
//! is a consistent UIF to upload. A mounted disk is not uploaded by
//! checkpoints (a live image would be torn); the agent's stop releases it
//! only when the system is shutting down ([`system_stopping`]).
//!
//! The devices this process serves are in one process-wide table, as the
//! kernel's devices are.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};

use super::UifError;
use crate::base::fsutil;
use crate::config::DiskConfig;
use crate::disk::device::BlockDevice;
use crate::disk::front_end::{Disk, FrontEnd, Presented};
use crate::disk::nbd::NbdKernel;
use crate::disk::working_copy::WorkingCopy;

/// The devices served, by user.
static SERVED: Mutex<Option<HashMap<String, Box<dyn Presented>>>> = Mutex::new(None);

/// The block front end disks are presented through.
static FRONT_END: NbdKernel = NbdKernel;

/// The file beside the working copy that names its device while it is
/// served (`<image>.nbd`: the front end's [`Presented::record`], N of
/// `/dev/nbdN`), so that a restarted agent can serve it again.
fn record_file(image: &Path) -> PathBuf {
    fsutil::sibling(image, ".nbd")
}

/// True if a device is recorded for the disk at `image`: it is served
/// (by this agent, or by one that died and whose successor will serve it
/// again), so its working copy is in use.
pub fn has_device_record(image: &Path) -> bool {
    record_file(image).exists()
}

/// Whether the system is shutting down (systemd's state is `stopping`):
/// then the agent's stop releases the mounted disks as logouts do; any
/// other stop (a restart, an upgrade) leaves them served, and the next
/// agent process serves them again. Without systemd, or when `systemctl`
/// cannot tell, the stop is taken for a shutdown (the user's work is
/// uploaded rather than left behind a device nobody may serve again).
pub fn system_stopping() -> bool {
    if !Path::new("/run/systemd/system").exists() {
        return true;
    }
    match Command::new("systemctl").arg("is-system-running").output() {
        Ok(out) => {
            let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
            tracing::info!(%state, "system state at the agent's stop");
            state == "stopping"
        }
        Err(e) => {
            tracing::warn!("systemctl is-system-running: {e}; taking the stop for a shutdown");
            true
        }
    }
}

/// After the grace period and the kill, how long the unmount keeps trying.
const AFTER_KILL: Duration = Duration::from_secs(5);

fn disk_err(msg: String) -> UifError {
    UifError::Disk(msg)
}

/// A program of e2fsprogs (searched in the sbin directories, then `PATH`).
fn tool(name: &str) -> PathBuf {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Runs `cmd`; its exit code and the tail of its output.
fn run(mut cmd: Command) -> Result<(i32, String), UifError> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .map_err(|e| UifError::io(format!("run {shown}"), e))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let tail: Vec<&str> = text.lines().rev().take(6).collect();
    let tail = tail.into_iter().rev().collect::<Vec<_>>().join(" / ");
    Ok((out.status.code().unwrap_or(-1), tail))
}

/// Makes the filesystem of a new disk in `image` (`size` bytes, sparse).
fn make_filesystem(
    image: &Path,
    size: u64,
    owner: (u32, u32),
    extra: &[String],
) -> Result<(), UifError> {
    OpenOptions::new()
        .write(true)
        .open(image)
        .and_then(|f| f.set_len(size))
        .map_err(|e| UifError::at("size", image, e))?;
    let attempt = |prezeroed: bool| {
        let mut ext = format!(
            "root_owner={}:{},lazy_itable_init=0,lazy_journal_init=0",
            owner.0, owner.1
        );
        if prezeroed {
            // e2fsprogs ≥ 1.47: the sparse file reads as zeroes already.
            ext.push_str(",assume_storage_prezeroed=1");
        }
        let mut c = Command::new(tool("mkfs.ext4"));
        // 4 KiB blocks: the device's logical block size (a small disk would
        // otherwise get 1 KiB blocks, which ext4 cannot mount on it).
        c.args(["-F", "-q", "-b", "4096", "-m", "0", "-E", &ext])
            .args(extra)
            .arg(image);
        run(c)
    };
    let (code, tail) = match attempt(true)? {
        (0, t) => (0, t),
        (_, t) if t.contains("assume_storage_prezeroed") || t.contains("Bad option") => {
            attempt(false)?
        }
        other => other,
    };
    if code != 0 {
        return Err(disk_err(format!(
            "mkfs.ext4 failed (exit {code}) on {}: {tail}",
            image.display()
        )));
    }
    Ok(())
}

/// `e2fsck -p` (or `-f -p` before a resize): repairs what is safe to
/// repair, refuses the rest.
fn check_filesystem(user: &str, image: &Path, force: bool) -> Result<(), UifError> {
    let mut c = Command::new(tool("e2fsck"));
    c.arg("-p");
    if force {
        c.arg("-f");
    }
    c.arg(image);
    let (code, tail) = run(c)?;
    match code {
        0 => Ok(()),
        1 | 2 => {
            tracing::warn!(%user, "e2fsck repaired the profile disk: {tail}");
            Ok(())
        }
        _ => Err(disk_err(format!(
            "the disk of {user} has errors that e2fsck -p cannot repair (exit {code}: {tail}); \
             it was not mounted. Its versions are still in the store: an operator can roll \
             back to an earlier one (uvectl versions / rollback)"
        ))),
    }
}

/// What the backing filesystem of a disk has, and what the disk needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    /// Bytes free for the agent on the filesystem of the disk's image.
    pub free: u64,
    /// Bytes the disk may still take: its size less what its image holds
    /// already, or the configured reserve.
    pub need: u64,
}

/// The room for the disk at `image` (which need not exist yet) of `size`
/// bytes.
pub fn room(image: &Path, size: u64, reserve_mib: u64) -> Result<Room, UifError> {
    // The nearest directory that exists (before a first retrieve, the
    // working copies' directory may not).
    let dir = image
        .ancestors()
        .skip(1)
        .find(|d| d.is_dir())
        .unwrap_or(Path::new("/"));
    let st = nix::sys::statvfs::statvfs(dir).map_err(|e| UifError::at("statvfs", dir, e.into()))?;
    let free = st.blocks_available().saturating_mul(st.fragment_size());
    let held = match std::fs::metadata(image) {
        Ok(m) => m.blocks() * 512,
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => return Err(UifError::at("stat", image, e)),
    };
    let need = if reserve_mib == 0 {
        size.saturating_sub(held)
    } else {
        reserve_mib << 20
    };
    Ok(Room { free, need })
}

/// Refuses to mount when the backing filesystem of `image` cannot take
/// the disk's growth (or the reserve).
fn check_room(user: &str, image: &Path, size: u64, reserve_mib: u64) -> Result<(), UifError> {
    let Room { free, need } = room(image, size, reserve_mib)?;
    let dir = image.parent().unwrap_or(Path::new("/"));
    if free < need {
        return Err(disk_err(format!(
            "no room for the disk of {user}: {} has {} MiB free, the disk may grow by {} MiB \
             ([disk] size_mib = {}, reserve_mib = {reserve_mib}); it was not mounted",
            dir.display(),
            free >> 20,
            need >> 20,
            size >> 20
        )));
    }
    Ok(())
}

/// Makes `user`'s disk (the UIF at `image`) the home at `home`, owned by
/// `owner` (root when none is known).
pub fn attach(
    cfg: &DiskConfig,
    user: &str,
    image: &Path,
    home: &Path,
    owner: Option<(u32, u32)>,
) -> Result<(), UifError> {
    let owner = owner.unwrap_or((0, 0));
    let size = cfg.size_mib << 20;
    let len = std::fs::metadata(image)
        .map(|m| m.len())
        .map_err(|e| UifError::at("stat", image, e))?;
    if len == 0 {
        tracing::info!(%user, size_mib = cfg.size_mib, "first login: making the profile disk");
        make_filesystem(image, size, owner, &cfg.mkfs_options)?;
    } else if len < size {
        tracing::info!(%user, from = len >> 20, to = cfg.size_mib, "growing the profile disk (MiB)");
        check_filesystem(user, image, true)?;
        OpenOptions::new()
            .write(true)
            .open(image)
            .and_then(|f| f.set_len(size))
            .map_err(|e| UifError::at("grow", image, e))?;
        let mut c = Command::new(tool("resize2fs"));
        c.arg(image);
        let (code, tail) = run(c)?;
        if code != 0 {
            return Err(disk_err(format!("resize2fs failed (exit {code}): {tail}")));
        }
    }
    check_filesystem(user, image, false)?;
    let copy = WorkingCopy::open(image).map_err(|e| UifError::at("open", image, e))?;
    check_room(user, image, copy.size(), cfg.reserve_mib)?;
    let disk = Disk {
        name: user.to_string(),
        device: Arc::new(copy),
        reattach_timeout: Duration::from_secs(cfg.reattach_timeout_secs),
    };
    let dev = FRONT_END.present(disk).map_err(|e| {
        disk_err(format!(
            "cannot serve the disk of {user} to the kernel: {e}"
        ))
    })?;
    if let Err(e) = fsutil::atomic_write(&record_file(image), dev.record().as_bytes()) {
        let _ = dev.withdraw();
        return Err(UifError::at("record the device of", image, e));
    }
    let mounted = dev
        .wait_ready(Duration::from_secs(10))
        .map_err(|e| disk_err(e.to_string()))
        .and_then(|()| mount(cfg, &dev.path(), home, owner));
    if let Err(e) = mounted {
        let _ = dev.withdraw();
        return Err(e);
    }
    tracing::info!(%user, device = %dev.path().display(), home = %home.display(), "profile disk mounted");
    SERVED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get_or_insert_with(HashMap::new)
        .insert(user.to_string(), dev);
    Ok(())
}

fn mount(cfg: &DiskConfig, dev: &Path, home: &Path, owner: (u32, u32)) -> Result<(), UifError> {
    match std::fs::DirBuilder::new().mode(0o700).create(home) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            return Err(UifError::at("create", home, e));
        }
        _ => {}
    }
    let (flags, data) = mount_options(&cfg.mount_options);
    let data = (!data.is_empty()).then_some(data.as_str());
    nix::mount::mount(Some(dev), home, Some("ext4"), flags, data).map_err(|e| {
        disk_err(format!(
            "mount {} on {}: {e}",
            dev.display(),
            home.display()
        ))
    })?;
    // The root belongs to the user here, whatever uid made the disk.
    nix::unistd::chown(home, Some(owner.0.into()), Some(owner.1.into()))
        .map_err(|e| UifError::at("chown", home, e.into()))
}

/// `nosuid,nodev` plus the configured options: those that are mount
/// flags (`noatime`, `noexec`, ...) as flags, the rest as ext4's options.
fn mount_options(configured: &str) -> (MsFlags, String) {
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let mut data = Vec::new();
    for o in configured
        .split(',')
        .map(str::trim)
        .filter(|o| !o.is_empty())
    {
        let flag = match o {
            "noatime" => MsFlags::MS_NOATIME,
            "nodiratime" => MsFlags::MS_NODIRATIME,
            "relatime" => MsFlags::MS_RELATIME,
            "strictatime" => MsFlags::MS_STRICTATIME,
            "lazytime" => MsFlags::MS_LAZYTIME,
            "noexec" => MsFlags::MS_NOEXEC,
            "sync" => MsFlags::MS_SYNCHRONOUS,
            "dirsync" => MsFlags::MS_DIRSYNC,
            "nosuid" | "nodev" => MsFlags::empty(),
            other => {
                data.push(other);
                continue;
            }
        };
        flags |= flag;
    }
    (flags, data.join(","))
}

/// Kills every process whose real or effective uid is `uid`.
fn kill_processes_of(uid: u32) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut killed = 0;
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let ids: Vec<u32> = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .map(|l| {
                l.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        if ids.iter().take(2).any(|&i| i == uid) {
            let pid = nix::unistd::Pid::from_raw(pid);
            if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).is_ok() {
                killed += 1;
            }
        }
    }
    killed
}

/// Trims the mounted filesystem (`syncfs`, then `fstrim`): the blocks of deleted files
/// become holes in the working copy, so they read as zeroes, cost no
/// space and upload as the one zero block. A failure only costs that.
fn trim(user: &str, home: &Path) {
    // Blocks freed by a delete are free for the trim only once the
    // journal has committed the delete: sync the filesystem first.
    match std::fs::File::open(home) {
        Ok(dir) => {
            if let Err(e) = nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir)) {
                tracing::warn!(%user, "syncfs of the home: {e}");
            }
        }
        Err(e) => tracing::warn!(%user, "open the home to sync it: {e}"),
    }
    let mut c = Command::new(tool("fstrim"));
    c.arg(home);
    match run(c) {
        Ok((0, _)) => {}
        Ok((code, tail)) => tracing::warn!(%user, code, "fstrim of the home failed: {tail}"),
        Err(e) => tracing::warn!(%user, "fstrim of the home: {e}"),
    }
}

/// Unmounts `home`, retrying while busy until `until`.
fn unmount_until(home: &Path, until: Instant) -> Result<(), Errno> {
    loop {
        match nix::mount::umount2(home, MntFlags::empty()) {
            Ok(()) | Err(Errno::EINVAL | Errno::ENOENT) => return Ok(()),
            Err(Errno::EBUSY) if Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Takes `user`'s disk back: unmounts the home (killing the user's
/// processes after the grace period) and disconnects the device, so that
/// the image is consistent. `keep_attached` (a checkpoint) is refused.
pub fn detach(
    cfg: &DiskConfig,
    user: &str,
    image: &Path,
    home: &Path,
    owner: Option<(u32, u32)>,
    keep_attached: bool,
) -> Result<(), UifError> {
    let served = SERVED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
        .is_some_and(|m| m.contains_key(user));
    if keep_attached {
        return Err(disk_err(format!(
            "the disk of {user} is mounted: a profile disk is uploaded at logout, not by checkpoints"
        )));
    }
    if !served {
        // Nothing served by this process: the image is as the last
        // detach (or a crash) left it.
        return Ok(());
    }
    trim(user, home);
    let grace = Instant::now() + Duration::from_secs(cfg.logout_grace_secs);
    if let Err(Errno::EBUSY) = unmount_until(home, grace)
        && let Some((uid, _)) = owner.filter(|(uid, _)| *uid != 0)
    {
        let n = kill_processes_of(uid);
        tracing::warn!(%user, uid, killed = n, "the home stayed busy after the grace period: killed the user's processes");
    }
    unmount_until(home, Instant::now() + AFTER_KILL).map_err(|e| {
        disk_err(format!(
            "cannot unmount the home of {user} at {}: {e}; the disk stays mounted and was not uploaded",
            home.display()
        ))
    })?;
    let dev = SERVED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_mut()
        .and_then(|m| m.remove(user));
    if let Some(dev) = dev
        && let Err(e) = dev.withdraw()
    {
        // Unmounted: every write reached the image through a FLUSH.
        tracing::warn!(%user, "disconnecting the profile disk's device: {e}");
    }
    match std::fs::remove_file(record_file(image)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            tracing::warn!(%user, "removing the profile disk's device record: {e}");
        }
        _ => {}
    }
    Ok(())
}

/// After an agent restart within the same boot: serves `user`'s disk
/// again on the device the previous agent process served it on (whose
/// mounted home has been waiting, `reattach_timeout_secs` at most).
/// `Ok(false)` when no device was recorded for it.
pub fn reattach(user: &str, image: &Path) -> Result<bool, UifError> {
    let record = record_file(image);
    let recorded = match std::fs::read_to_string(&record) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            tracing::info!(%user, "no profile disk device recorded: nothing to serve again");
            return Ok(false);
        }
        Err(e) => return Err(UifError::at("read", &record, e)),
    };
    let copy = WorkingCopy::open(image).map_err(|e| UifError::at("open", image, e))?;
    let disk = Disk {
        name: user.to_string(),
        device: Arc::new(copy),
        reattach_timeout: Duration::ZERO,
    };
    let dev = FRONT_END.represent(&recorded, disk).map_err(|e| {
        disk_err(format!(
            "cannot serve the disk of {user} again (device {}; the kernel gives up after \
             reattach_timeout_secs): {e}",
            recorded.trim()
        ))
    })?;
    tracing::info!(%user, device = %dev.path().display(), "profile disk served again after an agent restart");
    SERVED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get_or_insert_with(HashMap::new)
        .insert(user.to_string(), dev);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_flags_are_flags_and_the_rest_goes_to_ext4() {
        let (flags, data) = mount_options("noatime, commit=30,noexec,nodev,errors=remount-ro");
        assert_eq!(
            flags,
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOATIME | MsFlags::MS_NOEXEC
        );
        assert_eq!(data, "commit=30,errors=remount-ro");
        assert_eq!(
            mount_options(""),
            (MsFlags::MS_NOSUID | MsFlags::MS_NODEV, String::new())
        );
    }
}
