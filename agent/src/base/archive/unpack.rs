//! Unpacking a tar archive into a directory without trusting it: plain
//! relative paths only, every entry created relative to its parent's
//! descriptor, parents opened one component at a time with `O_NOFOLLOW`
//! (see the [module header](super)).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;

use super::{ArchiveError, errno_err, io_err};
use crate::base::nofollow::{self, Kind, borrow};

/// How strict unpacking is.
#[derive(Debug, Clone, Copy)]
pub struct UnpackPolicy {
    /// Symlinks may point anywhere (a user's home) instead of only inside
    /// the tree (a UA bundle).
    pub symlinks_anywhere: bool,
    /// Refuse devices and fifos instead of skipping them.
    pub strict_types: bool,
    /// Give every unpacked entry this owner.
    pub owner: Option<(u32, u32)>,
}

/// Checks an archive path: relative, only normal components.
fn clean_path(raw: &Path) -> Result<PathBuf, ArchiveError> {
    let shown = raw.to_string_lossy().into_owned();
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(ArchiveError::Unsafe {
                    path: shown,
                    why: "contains `..`",
                });
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(ArchiveError::Unsafe {
                    path: shown,
                    why: "is absolute",
                });
            }
        }
    }
    Ok(out)
}

/// True if `target`, a symlink's target placed at `link` (relative to the
/// root), stays inside the root.
fn link_stays_inside(link: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut depth: i64 = link.parent().map_or(0, |p| p.components().count() as i64);
    for c in target.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            Component::CurDir => {}
            _ => return false,
        }
    }
    true
}

/// Mode given to directories the archive implies but does not list.
const IMPLIED_DIR_MODE: u32 = 0o755;

/// The parent directories of the entries being unpacked, opened from the
/// root one component at a time without following symlinks (missing ones
/// are created); the last one is kept open, as entries usually come
/// grouped by directory.
struct Parents<'a> {
    root: BorrowedFd<'a>,
    owner: Option<(u32, u32)>,
    last: Option<(PathBuf, OwnedFd)>,
}

impl<'a> Parents<'a> {
    /// The directory `parent` (relative to the root) of the entry `entry`;
    /// directories created on the way are recorded in `modes`.
    fn get(
        &mut self,
        parent: &Path,
        entry: &Path,
        modes: &mut BTreeMap<PathBuf, u32>,
    ) -> Result<BorrowedFd<'_>, ArchiveError> {
        if parent.as_os_str().is_empty() {
            return Ok(self.root);
        }
        let hit = matches!(&self.last, Some((p, _)) if p == parent);
        if !hit {
            let mut cur = self
                .root
                .try_clone_to_owned()
                .map_err(io_err("duplicate directory descriptor"))?;
            let mut sofar = PathBuf::new();
            for c in parent.components() {
                let name = c.as_os_str();
                sofar.push(name);
                let next = match nofollow::open_dir_at(borrow(&cur), name) {
                    Ok(fd) => fd,
                    Err(Errno::ENOENT) => {
                        nofollow::mkdir_at(borrow(&cur), name, 0o700)
                            .map_err(errno_err(format!("mkdir {}", sofar.display())))?;
                        let fd = nofollow::open_dir_at(borrow(&cur), name)
                            .map_err(errno_err(format!("open {}", sofar.display())))?;
                        if let Some((uid, gid)) = self.owner {
                            nofollow::chown_fd(fd.as_fd(), uid, gid)
                                .map_err(errno_err(format!("chown {}", sofar.display())))?;
                        }
                        modes.entry(sofar.clone()).or_insert(IMPLIED_DIR_MODE);
                        fd
                    }
                    Err(Errno::ELOOP | Errno::ENOTDIR) => {
                        return Err(ArchiveError::Unsafe {
                            path: entry.to_string_lossy().into_owned(),
                            why: "a parent is not a directory (symlink?)",
                        });
                    }
                    Err(e) => return Err(errno_err(format!("open {}", sofar.display()))(e)),
                };
                cur = next;
            }
            self.last = Some((parent.to_path_buf(), cur));
        }
        match &self.last {
            Some((_, fd)) => Ok(fd.as_fd()),
            None => Ok(self.root),
        }
    }
}

/// Unpacks `archive` into `root` (an existing, empty directory; not
/// followed if it is a symlink). See [`unpack_into`].
pub fn unpack(archive: &Path, root: &Path, policy: UnpackPolicy) -> Result<u64, ArchiveError> {
    let dir = nofollow::open_dir(root).map_err(errno_err(format!("open {}", root.display())))?;
    unpack_into(archive, dir.as_fd(), policy)
}

/// Unpacks `archive` into the open directory `root` (empty, and reachable
/// by nobody but the caller until this returns: the caller makes it
/// private); returns the number of entries created. Directory modes are
/// applied last, deepest first, so read-only directories do not block
/// unpacking their children.
pub fn unpack_into(
    archive: &Path,
    root: BorrowedFd<'_>,
    policy: UnpackPolicy,
) -> Result<u64, ArchiveError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(archive)
        .map_err(io_err(format!("open {}", archive.display())))?;
    if file.metadata().map(|m| m.len()).unwrap_or(0) == 0 {
        return Ok(0);
    }
    super::bounds::check(&file)?;
    let mut ar = tar::Archive::new(file);
    let mut parents = Parents {
        root,
        owner: policy.owner,
        last: None,
    };
    let mut modes: BTreeMap<PathBuf, u32> = BTreeMap::new();
    let mut count = 0u64;
    for entry in ar.entries().map_err(io_err("read archive"))? {
        let mut entry = entry.map_err(io_err("read archive entry"))?;
        let raw = entry.path().map_err(io_err("entry path"))?.into_owned();
        let rel = clean_path(&raw)?;
        let Some(name) = rel.file_name().map(OsString::from) else {
            continue; // the root itself ("./")
        };
        let kind = entry.header().entry_type();
        // Hard-link sources are resolved before borrowing the parent.
        let link_src = if kind == tar::EntryType::Link {
            let target = link_target(&entry, &rel, "hard link without target")?;
            Some(link_source(root, &clean_path(&target)?, &rel)?)
        } else {
            None
        };
        let parent = parents.get(rel.parent().unwrap_or(Path::new("")), &rel, &mut modes)?;
        let at = At {
            parent,
            name: &name,
            rel: &rel,
            policy,
        };
        if at.entry(&mut entry, link_src, &mut modes)? {
            count += 1;
        }
    }
    drop(parents);
    apply_dir_modes(root, modes)?;
    Ok(count)
}

/// The target a symlink or hard-link entry names; `missing` if none.
fn link_target<R: io::Read>(
    entry: &tar::Entry<'_, R>,
    rel: &Path,
    missing: &'static str,
) -> Result<PathBuf, ArchiveError> {
    Ok(entry
        .link_name()
        .map_err(io_err("link name"))?
        .ok_or(ArchiveError::Unsafe {
            path: rel.to_string_lossy().into_owned(),
            why: missing,
        })?
        .into_owned())
}

/// Where one entry is created: its open parent, name and relative path.
struct At<'a> {
    parent: BorrowedFd<'a>,
    name: &'a OsString,
    rel: &'a Path,
    policy: UnpackPolicy,
}

impl At<'_> {
    fn shown(&self) -> String {
        self.rel.to_string_lossy().into_owned()
    }

    /// Creates the entry; false if it was skipped (special files).
    fn entry<R: io::Read>(
        &self,
        entry: &mut tar::Entry<'_, R>,
        link_src: Option<(OwnedFd, OsString)>,
        modes: &mut BTreeMap<PathBuf, u32>,
    ) -> Result<bool, ArchiveError> {
        let header = entry.header().clone();
        let mode = header.mode().unwrap_or(0o644) & 0o1777;
        match header.entry_type() {
            tar::EntryType::Directory => {
                self.dir()?;
                modes.insert(self.rel.to_path_buf(), mode);
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                self.file(entry, header.mtime().ok(), mode)?;
            }
            tar::EntryType::Symlink => {
                let target = link_target(entry, self.rel, "symlink without target")?;
                self.symlink(&target)?;
            }
            tar::EntryType::Link => {
                let Some((src_dir, src_name)) = link_src else {
                    return Ok(false); // resolved by the caller for every Link entry
                };
                nofollow::link_at(borrow(&src_dir), &src_name, self.parent, self.name)
                    .map_err(errno_err(format!("link {}", self.shown())))?;
            }
            _ if self.policy.strict_types => {
                return Err(ArchiveError::Unsafe {
                    path: self.shown(),
                    why: "device, fifo or unknown entry type",
                });
            }
            other => {
                tracing::warn!(path = %self.shown(), ?other, "skipping special archive entry");
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn dir(&self) -> Result<(), ArchiveError> {
        match nofollow::mkdir_at(self.parent, self.name, 0o700) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(errno_err(format!("mkdir {}", self.shown()))(e)),
        }
        let dir = match nofollow::open_dir_at(self.parent, self.name) {
            Ok(fd) => fd,
            Err(Errno::ELOOP | Errno::ENOTDIR) => {
                return Err(ArchiveError::Unsafe {
                    path: self.shown(),
                    why: "directory over an existing non-directory",
                });
            }
            Err(e) => return Err(errno_err(format!("open {}", self.shown()))(e)),
        };
        if let Some((uid, gid)) = self.policy.owner {
            nofollow::chown_fd(dir.as_fd(), uid, gid)
                .map_err(errno_err(format!("chown {}", self.shown())))?;
        }
        Ok(())
    }

    fn file(
        &self,
        data: &mut impl io::Read,
        mtime: Option<u64>,
        mode: u32,
    ) -> Result<(), ArchiveError> {
        let mut out = nofollow::create_at(self.parent, self.name, 0o600)
            .map_err(errno_err(format!("create {}", self.shown())))?;
        io::copy(data, &mut out).map_err(io_err(format!("write {}", self.shown())))?;
        if let Some(mtime) = mtime {
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime);
            let _ = out.set_modified(t);
        }
        if let Some((uid, gid)) = self.policy.owner {
            nofollow::chown_fd(out.as_fd(), uid, gid)
                .map_err(errno_err(format!("chown {}", self.shown())))?;
        }
        nofollow::chmod_fd(out.as_fd(), mode).map_err(errno_err(format!("chmod {}", self.shown())))
    }

    fn symlink(&self, target: &Path) -> Result<(), ArchiveError> {
        if !self.policy.symlinks_anywhere && !link_stays_inside(self.rel, target) {
            return Err(ArchiveError::Unsafe {
                path: self.shown(),
                why: "symlink points outside the archive",
            });
        }
        nofollow::symlink_at(target, self.parent, self.name)
            .map_err(errno_err(format!("symlink {}", self.shown())))?;
        if let Some((uid, gid)) = self.policy.owner {
            nofollow::chown_at(self.parent, self.name, uid, gid)
                .map_err(errno_err(format!("chown {}", self.shown())))?;
        }
        Ok(())
    }
}

/// Directory modes, applied after every entry, deepest first (a read-only
/// directory must not block unpacking its children).
fn apply_dir_modes(
    root: BorrowedFd<'_>,
    modes: BTreeMap<PathBuf, u32>,
) -> Result<(), ArchiveError> {
    let mut dirs: Vec<(PathBuf, u32)> = modes.into_iter().collect();
    dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
    for (rel, mode) in dirs {
        let dir = nofollow::open_dir_beneath(root, &rel)
            .map_err(errno_err(format!("open {}", rel.display())))?;
        nofollow::chmod_fd(dir.as_fd(), mode)
            .map_err(errno_err(format!("chmod {}", rel.display())))?;
    }
    Ok(())
}

/// The parent directory and name of a hard link's source `target`, which
/// must have been unpacked as a regular file (reached without following
/// any symlink).
fn link_source(
    root: BorrowedFd<'_>,
    target: &Path,
    entry: &Path,
) -> Result<(OwnedFd, OsString), ArchiveError> {
    let refuse = || ArchiveError::Unsafe {
        path: entry.to_string_lossy().into_owned(),
        why: "hard link to something not unpacked as a regular file",
    };
    let name = target.file_name().ok_or_else(refuse)?;
    let dir = nofollow::open_dir_beneath(root, target.parent().unwrap_or(Path::new("")))
        .map_err(|_| refuse())?;
    match nofollow::stat_at(dir.as_fd(), name) {
        Ok(st) if nofollow::kind(&st) == Kind::File => Ok((dir, name.to_os_string())),
        _ => Err(refuse()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_escape_detection() {
        assert!(link_stays_inside(Path::new("a/l"), Path::new("../b")));
        assert!(!link_stays_inside(Path::new("a/l"), Path::new("../../b")));
        assert!(!link_stays_inside(Path::new("l"), Path::new("/etc/passwd")));
        assert!(link_stays_inside(Path::new("l"), Path::new("x/y")));
    }
}
