//! The local chunk cache: the previous version of a user's UIF stays on
//! disk (the image in file mode, the tar in directory mode) together with
//! its manifest. A retrieve reads every chunk it lists from that file by
//! offset instead of fetching it. The manifest alone is only a hint: every
//! chunk read from the cache is verified against its hash, so a file changed
//! behind the agent's back costs a fetch, never wrong bytes.
//!
//! A [`Stamp`] next to the manifest makes it more than a hint: it records
//! the file's identity and change time (device, inode, size, mtime, ctime)
//! taken when the file was known to hold exactly that manifest. While the
//! file still has that stamp (and no patch was interrupted, see
//! [`begin_patch`]), a retrieve may trust the manifest without reading the
//! file and patch only the chunks that differ, in place. ctime cannot be set
//! from user space and changes with every write, so a stale stamp means a
//! changed file; a stamp taken within [`RACY`] of the file's last change is
//! not recorded (a write in the same timestamp tick would not change ctime:
//! git's "racily clean" problem). The one write that can escape a stamp is
//! one through a shared mapping made writable before the stamp was taken;
//! the file is stamped when the agent wrote it or right after the detach
//! hook, when nothing should map it.
//!
//! A flush also uses the stamp: a file still stamped as holding the recorded
//! manifest is not re-read and re-chunked.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use uve_protocol::manifest::{Hash, Manifest};

use crate::base::fsutil;

/// A stamp is recorded only if the file's ctime was at least this much
/// older than the clock when the stamp was taken: the kernel stamps
/// changes with a coarse clock (one jiffy, ≤ 10 ms at `HZ=100`), so a write
/// within the same tick as the recorded ctime would leave ctime unchanged.
/// Two jiffies guarantee that any later write gets a later ctime.
pub const RACY: Duration = Duration::from_millis(25);

/// Where the manifest describing `user`'s UIF file is kept.
pub fn manifest_path(state_dir: &Path, user: &str) -> PathBuf {
    state_dir.join("cache").join(format!("{user}.manifest"))
}

/// Records that `user`'s UIF file currently holds `manifest`.
pub fn save(state_dir: &Path, user: &str, manifest: &Manifest) -> std::io::Result<()> {
    let path = manifest_path(state_dir, user);
    if let Some(dir) = path.parent() {
        fsutil::ensure_dir(dir)?;
    }
    let bytes = postcard::to_stdvec(manifest).map_err(std::io::Error::other)?;
    fsutil::atomic_write(&path, &bytes)
}

/// The recorded manifest of `user`'s UIF file, if any and readable.
pub fn load(state_dir: &Path, user: &str) -> Option<Manifest> {
    let bytes = std::fs::read(manifest_path(state_dir, user)).ok()?;
    let m: Manifest = postcard::from_bytes(&bytes).ok()?;
    m.validate().ok().map(|()| m)
}

/// Forgets the cache of `user` (its file no longer matches any manifest).
pub fn forget(state_dir: &Path, user: &str) {
    let _ = std::fs::remove_file(manifest_path(state_dir, user));
    let _ = std::fs::remove_file(stamp_path(state_dir, user));
    let _ = std::fs::remove_file(patch_marker_path(state_dir, user));
}

/// Where the [`Stamp`] of `user`'s UIF file is kept.
pub fn stamp_path(state_dir: &Path, user: &str) -> PathBuf {
    state_dir.join("cache").join(format!("{user}.stamp"))
}

/// The marker of a retrieve patching `user`'s UIF file in place: while it
/// exists the file may be half patched and is treated as unknown.
pub fn patch_marker_path(state_dir: &Path, user: &str) -> PathBuf {
    state_dir.join("cache").join(format!("{user}.patching"))
}

/// A file's identity and change times, as `stat(2)` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i128,
    /// Status change time, ns since the epoch.
    pub ctime_ns: i128,
}

impl FileId {
    /// The identity of the regular file at `path` (not following a
    /// symlink); `None` if it is missing or not a regular file.
    pub fn of(path: &Path) -> Option<FileId> {
        let m = std::fs::symlink_metadata(path).ok()?;
        m.file_type().is_file().then(|| FileId::from_metadata(&m))
    }

    /// The identity of the open file `f` (`fstat`).
    pub fn of_file(f: &File) -> Option<FileId> {
        f.metadata().ok().map(|m| FileId::from_metadata(&m))
    }

    fn from_metadata(m: &std::fs::Metadata) -> FileId {
        use std::os::unix::fs::MetadataExt;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        FileId {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        }
    }

    /// True if the last change is older than [`RACY`] at `now_ns`, so any
    /// later write gets a different ctime.
    fn settled_at(&self, now_ns: i128) -> bool {
        now_ns - self.ctime_ns >= RACY.as_nanos() as i128
    }
}

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// "`file` held the manifest with `digest` when it had identity `file`",
/// during kernel boot `boot`.
///
/// A stamp vouches only within the boot it was taken in: after a crash or
/// power loss, data the kernel had not written back may be lost or half
/// written while the inode's times still read as stamped (an overwrite in
/// place journals no metadata before its data reaches the disk), so a file
/// from an earlier boot is always verified by hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    /// Digest of the manifest the file held.
    pub digest: Hash,
    /// The file's identity then.
    pub file: FileId,
    /// The kernel boot id when the stamp was taken (`None`: a stamp of an
    /// older agent, never trusted).
    #[serde(default)]
    pub boot: Option<String>,
}

/// Takes the identity of `path` for a stamp, waiting (at most twice
/// [`RACY`]) for a just-written file's ctime to settle. `None` if the file
/// is missing or keeps changing: then no stamp is recorded and the next
/// retrieve verifies the file instead of trusting it.
pub fn settled_id(path: &Path) -> Option<FileId> {
    for _ in 0..3 {
        let id = FileId::of(path)?;
        let now = now_ns();
        if id.settled_at(now) {
            return Some(id);
        }
        let wait =
            (RACY.as_nanos() as i128 - (now - id.ctime_ns)).clamp(0, RACY.as_nanos() as i128);
        fsutil::pause(
            Duration::from_nanos(u64::try_from(wait).unwrap_or(0)) + Duration::from_millis(1),
        );
    }
    None
}

/// Records that the file with identity `id` holds the manifest with
/// `digest` (`id: None` removes any stamp: the file is not vouched for).
pub fn save_stamp(
    state_dir: &Path,
    user: &str,
    digest: Hash,
    id: Option<FileId>,
) -> std::io::Result<()> {
    let path = stamp_path(state_dir, user);
    match id {
        Some(file) => {
            if let Some(dir) = path.parent() {
                fsutil::ensure_dir(dir)?;
            }
            let boot = fsutil::kernel_boot();
            fsutil::write_json(&path, &Stamp { digest, file, boot })
        }
        None => match std::fs::remove_file(&path) {
            Ok(()) => fsutil::sync_parent(&path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        },
    }
}

/// True if `file` provably holds `manifest`: no interrupted patch, a stamp
/// for this manifest's digest, and the file still has the stamped
/// identity and size.
pub fn trusted(state_dir: &Path, user: &str, file: &Path, manifest: &Manifest) -> bool {
    stamped_id(state_dir, user, manifest).is_some_and(|id| FileId::of(file) == Some(id))
}

/// True if `file` is still exactly what `user`'s stamp vouched for when it
/// was taken in this boot (no interrupted patch, same identity and size):
/// nothing has written it since. Whatever the manifest.
pub fn unchanged_since_stamped(state_dir: &Path, user: &str, file: &Path) -> bool {
    if patch_marker_path(state_dir, user).exists() {
        return false;
    }
    let Ok(Some(stamp)) = fsutil::read_json::<Stamp>(&stamp_path(state_dir, user)) else {
        return false;
    };
    stamp.boot.is_some()
        && stamp.boot == fsutil::kernel_boot()
        && FileId::of(file) == Some(stamp.file)
}

/// The identity a file must still have to hold `manifest`, per the stamp
/// of `user` (no interrupted patch, stamp of this manifest's digest).
/// Whoever reads the file compares it with the file's identity after
/// reading: equal means the bytes read are the manifest's.
pub fn stamped_id(state_dir: &Path, user: &str, manifest: &Manifest) -> Option<FileId> {
    if patch_marker_path(state_dir, user).exists() {
        return None;
    }
    let stamp = fsutil::read_json::<Stamp>(&stamp_path(state_dir, user))
        .ok()
        .flatten()?;
    let this_boot = stamp.boot.is_some() && stamp.boot == fsutil::kernel_boot();
    (this_boot && stamp.digest == manifest.header.digest && stamp.file.size == manifest.header.size)
        .then_some(stamp.file)
}

/// Durably marks `user`'s file as being patched in place: until
/// [`end_patch`] it is treated as unknown (a crash leaves it so).
pub fn begin_patch(state_dir: &Path, user: &str) -> std::io::Result<()> {
    let path = patch_marker_path(state_dir, user);
    if let Some(dir) = path.parent() {
        fsutil::ensure_dir(dir)?;
    }
    fsutil::atomic_write(
        &path,
        b"retrieve in progress; the UIF file may be half patched\n",
    )
}

/// Removes the patch marker (after the file, its manifest and stamp are
/// durable), durably.
pub fn end_patch(state_dir: &Path, user: &str) -> std::io::Result<()> {
    let path = patch_marker_path(state_dir, user);
    match std::fs::remove_file(&path) {
        Ok(()) => fsutil::sync_parent(&path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Records that `user`'s file holds `manifest`: the manifest, the stamp
/// (`id`, taken before the file was read or after it was written; `None`
/// removes the stamp) and clears a patch marker, in this order, so a crash
/// in between leaves the file unknown, never wrongly trusted.
pub fn record(
    state_dir: &Path,
    user: &str,
    manifest: &Manifest,
    id: Option<FileId>,
) -> std::io::Result<()> {
    save(state_dir, user, manifest)?;
    save_stamp(state_dir, user, manifest.header.digest, id)?;
    end_patch(state_dir, user)
}

/// True if a patch of `user`'s file was interrupted.
pub fn patch_interrupted(state_dir: &Path, user: &str) -> bool {
    patch_marker_path(state_dir, user).exists()
}

/// Chunks available locally, by hash.
pub struct ChunkCache {
    file: Option<File>,
    index: HashMap<Hash, (u64, u32)>,
    verify: bool,
}

impl ChunkCache {
    /// Opens the cache of `file` described by `manifest`; empty if either
    /// is missing. Every chunk read is verified against its hash unless
    /// `trusted` (the file is stamped as holding `manifest`, see
    /// [`trusted`]).
    pub fn open(file: &Path, manifest: Option<Manifest>, trusted: bool) -> ChunkCache {
        let (Some(m), Ok(f)) = (manifest, File::open(file)) else {
            return ChunkCache {
                file: None,
                index: HashMap::new(),
                verify: true,
            };
        };
        let index = m.offsets().map(|(off, c)| (c.hash, (off, c.len))).collect();
        ChunkCache {
            file: Some(f),
            index,
            verify: !trusted,
        }
    }

    /// The bytes of chunk `hash`, if the cache has it intact.
    pub fn get(&self, hash: &Hash) -> Option<Vec<u8>> {
        let (off, len) = *self.index.get(hash)?;
        let mut buf = vec![0u8; len as usize];
        self.file.as_ref()?.read_exact_at(&mut buf, off).ok()?;
        (!self.verify || Hash::of(&buf) == *hash).then_some(buf)
    }
}
