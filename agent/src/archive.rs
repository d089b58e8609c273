//! Tar archives the agent reads and writes: home directories (directory
//! mode UIFs) and UA bundles.
//!
//! Unpacking never trusts the archive: only plain relative paths are
//! accepted (no `..`, no absolute paths), every entry is created relative
//! to its parent directory's descriptor, each parent opened from the root
//! one component at a time with `O_NOFOLLOW` (a symlink on the way is
//! refused, nothing is ever written through one), files are created fresh
//! (`O_EXCL`), ownership and modes are set on the opened descriptors
//! (`lchown` only for symlinks), setuid/setgid bits are dropped, and — for
//! UA bundles — links may not point outside the tree.
//!
//! Packing walks the tree the same way ([`crate::nofollow`]): directories
//! are listed through their descriptors, every entry is `fstatat`ed
//! without following, a file is opened `O_NOFOLLOW` relative to its parent
//! and packed only if the opened file is the one that was listed (same
//! device, inode and type), a symlink is recorded as a symlink. A regular
//! file with several hard links is packed only if all of its links were
//! found in the walked tree (then once, its other names as tar hard links
//! at the end of the archive): a link into the home to a file outside it
//! never carries that file out. Entries that cannot be read or changed
//! while packing are skipped with a warning. Packing is deterministic
//! (sorted, no owner ids) so an unchanged home yields identical chunks.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::sys::stat::FileStat;

use crate::nofollow::{self, Kind, borrow};

/// Why an archive was refused or could not be processed.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// An entry would escape the destination or is of a refused kind.
    #[error("unsafe archive entry {path:?}: {why}")]
    Unsafe {
        /// The entry's path as written in the archive.
        path: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Reading or writing failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The error.
        source: io::Error,
    },
}

fn io_err(context: impl std::fmt::Display) -> impl FnOnce(io::Error) -> ArchiveError {
    move |source| ArchiveError::Io {
        context: context.to_string(),
        source,
    }
}

fn errno_err(context: impl std::fmt::Display) -> impl FnOnce(Errno) -> ArchiveError {
    move |e| io_err(context)(io::Error::from(e))
}

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
        let shown = || rel.to_string_lossy().into_owned();
        let parent_rel = rel.parent().unwrap_or(Path::new(""));
        let header = entry.header().clone();
        let mode = header.mode().unwrap_or(0o644) & 0o1777;
        let kind = header.entry_type();
        // Hard-link sources are resolved before borrowing the parent.
        let link_src = if kind == tar::EntryType::Link {
            let target = entry
                .link_name()
                .map_err(io_err("link name"))?
                .ok_or(ArchiveError::Unsafe {
                    path: shown(),
                    why: "hard link without target",
                })?
                .into_owned();
            Some(link_source(root, &clean_path(&target)?, &rel)?)
        } else {
            None
        };
        let parent = parents.get(parent_rel, &rel, &mut modes)?;
        match kind {
            tar::EntryType::Directory => {
                match nofollow::mkdir_at(parent, &name, 0o700) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(errno_err(format!("mkdir {}", shown()))(e)),
                }
                let dir = match nofollow::open_dir_at(parent, &name) {
                    Ok(fd) => fd,
                    Err(Errno::ELOOP | Errno::ENOTDIR) => {
                        return Err(ArchiveError::Unsafe {
                            path: shown(),
                            why: "directory over an existing non-directory",
                        });
                    }
                    Err(e) => return Err(errno_err(format!("open {}", shown()))(e)),
                };
                if let Some((uid, gid)) = policy.owner {
                    nofollow::chown_fd(dir.as_fd(), uid, gid)
                        .map_err(errno_err(format!("chown {}", shown())))?;
                }
                modes.insert(rel.clone(), mode);
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut out = nofollow::create_at(parent, &name, 0o600)
                    .map_err(errno_err(format!("create {}", shown())))?;
                io::copy(&mut entry, &mut out).map_err(io_err(format!("write {}", shown())))?;
                if let Ok(mtime) = header.mtime() {
                    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime);
                    let _ = out.set_modified(t);
                }
                if let Some((uid, gid)) = policy.owner {
                    nofollow::chown_fd(out.as_fd(), uid, gid)
                        .map_err(errno_err(format!("chown {}", shown())))?;
                }
                nofollow::chmod_fd(out.as_fd(), mode)
                    .map_err(errno_err(format!("chmod {}", shown())))?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(io_err("link name"))?
                    .ok_or(ArchiveError::Unsafe {
                        path: shown(),
                        why: "symlink without target",
                    })?
                    .into_owned();
                if !policy.symlinks_anywhere && !link_stays_inside(&rel, &target) {
                    return Err(ArchiveError::Unsafe {
                        path: shown(),
                        why: "symlink points outside the archive",
                    });
                }
                nofollow::symlink_at(&target, parent, &name)
                    .map_err(errno_err(format!("symlink {}", shown())))?;
                if let Some((uid, gid)) = policy.owner {
                    nofollow::chown_at(parent, &name, uid, gid)
                        .map_err(errno_err(format!("chown {}", shown())))?;
                }
            }
            tar::EntryType::Link => {
                let Some((src_dir, src_name)) = link_src else {
                    continue; // resolved above for every Link entry
                };
                nofollow::link_at(borrow(&src_dir), &src_name, parent, &name)
                    .map_err(errno_err(format!("link {}", shown())))?;
            }
            _ if policy.strict_types => {
                return Err(ArchiveError::Unsafe {
                    path: shown(),
                    why: "device, fifo or unknown entry type",
                });
            }
            other => {
                tracing::warn!(path = %shown(), ?other, "skipping special archive entry");
                continue;
            }
        }
        count += 1;
    }
    drop(parents);
    // Directory modes last, deepest first.
    let mut dirs: Vec<(PathBuf, u32)> = modes.into_iter().collect();
    dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
    for (rel, mode) in dirs {
        let dir = nofollow::open_dir_beneath(root, &rel)
            .map_err(errno_err(format!("open {}", rel.display())))?;
        nofollow::chmod_fd(dir.as_fd(), mode)
            .map_err(errno_err(format!("chmod {}", rel.display())))?;
    }
    Ok(count)
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

/// Packs the tree under `root` into the file `out` (created or truncated,
/// not followed if it is a symlink, fsynced); see [`pack_to`].
#[cfg(test)]
pub fn pack(root: &Path, out: &Path, excludes: &[String]) -> Result<u64, ArchiveError> {
    let dir = nofollow::open_dir(root).map_err(errno_err(format!("open {}", root.display())))?;
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(out)
        .map_err(io_err(format!("create {}", out.display())))?;
    let (w, count) = pack_to(dir.as_fd(), io::BufWriter::new(file), excludes)?;
    let f = w
        .into_inner()
        .map_err(|e| io_err("flush archive")(e.into_error()))?;
    f.sync_all().map_err(io_err("fsync archive"))?;
    Ok(count)
}

/// Errors that mean "this entry is unreadable or changed under us": it is
/// skipped with a warning instead of failing the whole pack.
fn skippable(e: Errno) -> bool {
    matches!(
        e,
        Errno::ENOENT
            | Errno::EACCES
            | Errno::EPERM
            | Errno::ELOOP
            | Errno::ENOTDIR
            | Errno::EINVAL
            | Errno::ENXIO
            | Errno::ENODEV
            | Errno::EAGAIN
            | Errno::ESTALE
    )
}

/// Device and inode: which file (see [`nofollow::id`]).
type FileId = (u64, u64);

/// A subdirectory still to visit: its name and identity when listed.
type Subdir = (OsString, FileId);

/// A regular file with several hard links, seen during the walk.
struct LinkGroup {
    id: FileId,
    /// Its paths found in the walk, in walk order.
    paths: Vec<PathBuf>,
    /// Its link count, as last seen.
    nlink: u64,
}

/// One open directory of the walk and its subdirectories still to visit.
struct Frame {
    dir: OwnedFd,
    rel: PathBuf,
    subdirs: std::vec::IntoIter<Subdir>,
}

/// The walk of [`pack_to`].
struct Packer<'a, W: Write> {
    b: tar::Builder<W>,
    excludes: &'a [String],
    count: u64,
    groups: Vec<LinkGroup>,
    group_of: HashMap<FileId, usize>,
}

fn header(kind: tar::EntryType, st: &FileStat, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(st.st_mode & 0o7777);
    h.set_mtime(u64::try_from(st.st_mtime).unwrap_or(0));
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(size);
    h
}

/// Reads exactly `left` bytes of a file that may change while packed: a
/// longer file is cut, a shorter one padded with zeros (the header's size
/// is already written).
struct Exactly {
    file: File,
    left: u64,
    short: bool,
}

impl Read for Exactly {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let Some(buf) = buf.get_mut(..want) else {
            return Ok(0);
        };
        if buf.is_empty() {
            return Ok(0);
        }
        let n = if self.short { 0 } else { self.file.read(buf)? };
        let n = if n == 0 {
            self.short = true;
            buf.fill(0);
            buf.len()
        } else {
            n
        };
        self.left -= n as u64;
        Ok(n)
    }
}

impl<W: Write> Packer<'_, W> {
    fn append_dir(&mut self, path: &Path, st: &FileStat) -> Result<(), ArchiveError> {
        let mut h = header(tar::EntryType::Directory, st, 0);
        self.b
            .append_data(&mut h, path, io::empty())
            .map_err(io_err("write archive"))?;
        self.count += 1;
        Ok(())
    }

    fn append_file(&mut self, path: &Path, file: File, st: &FileStat) -> Result<(), ArchiveError> {
        let size = u64::try_from(st.st_size).unwrap_or(0);
        let mut h = header(tar::EntryType::Regular, st, size);
        let mut data = Exactly {
            file,
            left: size,
            short: false,
        };
        self.b
            .append_data(&mut h, path, &mut data)
            .map_err(io_err(format!("pack {}", path.display())))?;
        if data.short {
            tracing::warn!(path = %path.display(), "file shrank while packing; padded with zeros");
        }
        self.count += 1;
        Ok(())
    }

    fn defer(&mut self, path: PathBuf, st: &FileStat) {
        let id = nofollow::id(st);
        let i = *self.group_of.entry(id).or_insert_with(|| {
            self.groups.push(LinkGroup {
                id,
                paths: Vec::new(),
                nlink: 0,
            });
            self.groups.len() - 1
        });
        if let Some(g) = self.groups.get_mut(i) {
            g.paths.push(path);
            g.nlink = nofollow::nlink(st);
        }
    }

    /// Packs the entries of the open directory `dir` (at `rel`); returns
    /// its subdirectories (name and identity) to visit next.
    fn pack_dir(&mut self, dir: BorrowedFd<'_>, rel: &Path) -> Result<Vec<Subdir>, ArchiveError> {
        let names = match nofollow::list(dir) {
            Ok(n) => n,
            Err(e) if skippable(e) => {
                tracing::warn!(path = %rel.display(), error = %e, "cannot list directory; skipped");
                return Ok(Vec::new());
            }
            Err(e) => return Err(errno_err(format!("list {}", rel.display()))(e)),
        };
        let mut subdirs = Vec::new();
        for name in names {
            let path = rel.join(&name);
            if excluded(&path, self.excludes) {
                continue;
            }
            let st = match nofollow::stat_at(dir, &name) {
                Ok(st) => st,
                Err(e) if skippable(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot stat; skipped");
                    continue;
                }
                Err(e) => return Err(errno_err(format!("stat {}", path.display()))(e)),
            };
            match nofollow::kind(&st) {
                Kind::Dir => {
                    self.append_dir(&path, &st)?;
                    subdirs.push((name, nofollow::id(&st)));
                }
                Kind::File if nofollow::nlink(&st) > 1 => self.defer(path, &st),
                Kind::File => {
                    let Some((file, fst)) = open_same(dir, &name, &path, &st)? else {
                        continue;
                    };
                    if nofollow::nlink(&fst) > 1 {
                        self.defer(path, &fst);
                    } else {
                        self.append_file(&path, file, &fst)?;
                    }
                }
                Kind::Symlink => {
                    let target = match nofollow::readlink_at(dir, &name) {
                        Ok(t) => t,
                        Err(e) if skippable(e) => {
                            tracing::warn!(path = %path.display(), error = %e, "cannot read symlink; skipped");
                            continue;
                        }
                        Err(e) => {
                            return Err(errno_err(format!("readlink {}", path.display()))(e));
                        }
                    };
                    let mut h = header(tar::EntryType::Symlink, &st, 0);
                    self.b
                        .append_link(&mut h, &path, &target)
                        .map_err(io_err("write archive"))?;
                    self.count += 1;
                }
                Kind::Other => {} // sockets, fifos, devices: not part of a home
            }
        }
        Ok(subdirs)
    }

    /// The hard-linked files, after the walk: packed (first path as the
    /// file, the others as links to it) only if every link was found.
    fn pack_link_groups(&mut self, root: BorrowedFd<'_>) -> Result<(), ArchiveError> {
        for g in std::mem::take(&mut self.groups) {
            let Some((first, others)) = g.paths.split_first() else {
                continue;
            };
            let found = g.paths.len() as u64;
            if found != g.nlink {
                tracing::warn!(
                    path = %first.display(), links = g.nlink, found,
                    "hard-linked file with links outside the packed tree; not packed"
                );
                continue;
            }
            let (Some(name), parent) = (first.file_name(), first.parent()) else {
                continue;
            };
            let dir = match nofollow::open_dir_beneath(root, parent.unwrap_or(Path::new(""))) {
                Ok(d) => d,
                Err(e) if skippable(e) => {
                    tracing::warn!(path = %first.display(), error = %e, "cannot reopen; skipped");
                    continue;
                }
                Err(e) => return Err(errno_err(format!("open {}", first.display()))(e)),
            };
            let st = match nofollow::stat_at(dir.as_fd(), name) {
                Ok(st) if nofollow::id(&st) == g.id => st,
                Ok(_) | Err(_) => {
                    tracing::warn!(path = %first.display(), "changed while packing; skipped");
                    continue;
                }
            };
            let Some((file, fst)) = open_same(dir.as_fd(), name, first, &st)? else {
                continue;
            };
            if nofollow::nlink(&fst) != found {
                tracing::warn!(
                    path = %first.display(), links = nofollow::nlink(&fst), found,
                    "hard-linked file with links outside the packed tree; not packed"
                );
                continue;
            }
            self.append_file(first, file, &fst)?;
            for other in others {
                let mut h = header(tar::EntryType::Link, &fst, 0);
                self.b
                    .append_link(&mut h, other, first)
                    .map_err(io_err("write archive"))?;
                self.count += 1;
            }
        }
        Ok(())
    }
}

/// Opens the regular file `name` in `dir` (at `path`) that `st` describes:
/// `None` (with a warning) if it cannot be opened or is not that file any
/// more (swapped since it was listed).
fn open_same(
    dir: BorrowedFd<'_>,
    name: &std::ffi::OsStr,
    path: &Path,
    st: &FileStat,
) -> Result<Option<(File, FileStat)>, ArchiveError> {
    let file = match nofollow::open_read_at(dir, name) {
        Ok(f) => f,
        Err(e) if skippable(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot open; skipped");
            return Ok(None);
        }
        Err(e) => return Err(errno_err(format!("open {}", path.display()))(e)),
    };
    let fst =
        nofollow::stat(file.as_fd()).map_err(errno_err(format!("stat {}", path.display())))?;
    if nofollow::id(&fst) != nofollow::id(st) || nofollow::kind(&fst) != Kind::File {
        tracing::warn!(path = %path.display(), "replaced while packing; skipped");
        return Ok(None);
    }
    Ok(Some((file, fst)))
}

/// Packs the tree under the open directory `root` as a tar archive into
/// `out`, leaving out paths matching `excludes`; returns `out` and the
/// number of entries. Deterministic: entries in sorted depth-first order
/// (each directory's entries, then its subdirectories), no owner ids,
/// hard-linked files last. Never follows a symlink and skips (with a
/// warning) what cannot be read or changes while packing; see the module
/// header.
pub fn pack_to<W: Write>(
    root: BorrowedFd<'_>,
    out: W,
    excludes: &[String],
) -> Result<(W, u64), ArchiveError> {
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    let mut p = Packer {
        b,
        excludes,
        count: 0,
        groups: Vec::new(),
        group_of: HashMap::new(),
    };
    let top = root
        .try_clone_to_owned()
        .map_err(io_err("duplicate directory descriptor"))?;
    let subdirs = p.pack_dir(top.as_fd(), Path::new(""))?;
    let mut stack = vec![Frame {
        dir: top,
        rel: PathBuf::new(),
        subdirs: subdirs.into_iter(),
    }];
    while let Some(frame) = stack.last_mut() {
        let Some((name, id)) = frame.subdirs.next() else {
            stack.pop();
            continue;
        };
        let rel = frame.rel.join(&name);
        let dir = match nofollow::open_dir_at(frame.dir.as_fd(), &name) {
            Ok(d) => d,
            Err(e) if skippable(e) => {
                tracing::warn!(path = %rel.display(), error = %e, "cannot open directory; skipped");
                continue;
            }
            Err(e) => return Err(errno_err(format!("open {}", rel.display()))(e)),
        };
        match nofollow::stat(dir.as_fd()) {
            Ok(st) if nofollow::id(&st) == id => {}
            Ok(_) => {
                tracing::warn!(path = %rel.display(), "directory replaced while packing; skipped");
                continue;
            }
            Err(e) => return Err(errno_err(format!("stat {}", rel.display()))(e)),
        }
        let subdirs = p.pack_dir(dir.as_fd(), &rel)?;
        stack.push(Frame {
            dir,
            rel,
            subdirs: subdirs.into_iter(),
        });
    }
    p.pack_link_groups(root)?;
    let count = p.count;
    let w = p.b.into_inner().map_err(io_err("finish archive"))?;
    Ok((w, count))
}

/// True if `path` (relative) matches one of the glob patterns. A pattern
/// without `/` matches any single component (like `.gitignore`); with `/`
/// it matches the whole relative path. `*` and `?` stay within a
/// component, `**` crosses them.
pub fn excluded(path: &Path, patterns: &[String]) -> bool {
    let full = path.to_string_lossy();
    patterns.iter().any(|p| {
        let p = p.trim_start_matches("./").trim_end_matches('/');
        if p.contains('/') {
            glob(p.as_bytes(), full.as_bytes())
        } else {
            path.components()
                .any(|c| glob(p.as_bytes(), c.as_os_str().to_string_lossy().as_bytes()))
        }
    })
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    match p.first() {
        None => s.is_empty(),
        Some(b'*') if p.get(1) == Some(&b'*') => {
            let rest = p.get(2..).unwrap_or_default();
            let rest = rest.strip_prefix(b"/").unwrap_or(rest);
            (0..=s.len()).any(|i| glob(rest, s.get(i..).unwrap_or_default()))
        }
        Some(b'*') => {
            let rest = p.get(1..).unwrap_or_default();
            (0..=s.len())
                .take_while(|&i| i == 0 || s.get(i - 1) != Some(&b'/'))
                .any(|i| glob(rest, s.get(i..).unwrap_or_default()))
        }
        Some(b'?') => {
            matches!(s.first(), Some(c) if *c != b'/')
                && glob(
                    p.get(1..).unwrap_or_default(),
                    s.get(1..).unwrap_or_default(),
                )
        }
        Some(c) => {
            s.first() == Some(c)
                && glob(
                    p.get(1..).unwrap_or_default(),
                    s.get(1..).unwrap_or_default(),
                )
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::fs;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn globs() {
        let ex = |p: &str, pats: &[&str]| {
            excluded(
                Path::new(p),
                &pats.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )
        };
        assert!(ex(".cache/x/y", &[".cache"]));
        assert!(ex("a/b.tmp", &["*.tmp"]));
        assert!(!ex("a/b.tmpx", &["*.tmp"]));
        assert!(ex("a/b/c.log", &["a/**/*.log"]));
        assert!(ex("a/c.log", &["a/**/*.log"]));
        assert!(!ex("b/c.log", &["a/*.log"]));
    }

    #[test]
    fn link_escape_detection() {
        assert!(link_stays_inside(Path::new("a/l"), Path::new("../b")));
        assert!(!link_stays_inside(Path::new("a/l"), Path::new("../../b")));
        assert!(!link_stays_inside(Path::new("l"), Path::new("/etc/passwd")));
        assert!(link_stays_inside(Path::new("l"), Path::new("x/y")));
    }

    #[test]
    fn pack_unpack_round_trip() {
        let src = tempfile::tempdir().unwrap();
        fs::create_dir_all(src.path().join("d/e")).unwrap();
        fs::write(src.path().join("d/e/f.txt"), b"hello").unwrap();
        fs::write(src.path().join("skip.tmp"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", src.path().join("ln")).unwrap();
        let out = tempfile::tempdir().unwrap();
        let ar = out.path().join("a.tar");
        pack(src.path(), &ar, &["*.tmp".into()]).unwrap();
        let dst = out.path().join("dst");
        fs::create_dir(&dst).unwrap();
        let policy = UnpackPolicy {
            symlinks_anywhere: true,
            strict_types: false,
            owner: None,
        };
        unpack(&ar, &dst, policy).unwrap();
        assert_eq!(fs::read(dst.join("d/e/f.txt")).unwrap(), b"hello");
        assert!(!dst.join("skip.tmp").exists());
        assert_eq!(
            fs::read_link(dst.join("ln")).unwrap(),
            Path::new("/etc/hostname")
        );
        // determinism
        let ar2 = out.path().join("b.tar");
        pack(src.path(), &ar2, &["*.tmp".into()]).unwrap();
        assert_eq!(fs::read(&ar).unwrap(), fs::read(&ar2).unwrap());
        // strict policy refuses the outward symlink
        let dst2 = out.path().join("dst2");
        fs::create_dir(&dst2).unwrap();
        let strict = UnpackPolicy {
            symlinks_anywhere: false,
            strict_types: true,
            owner: None,
        };
        assert!(matches!(
            unpack(&ar, &dst2, strict),
            Err(ArchiveError::Unsafe { .. })
        ));
    }

    #[test]
    fn hard_links_are_packed_only_when_all_inside() {
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path().join("home");
        fs::create_dir_all(home.join("sub")).unwrap();
        // One link inside, one outside: never packed.
        let outside = tmp.path().join("outside-secret");
        fs::write(&outside, b"OUTSIDE-BYTES-4d2a").unwrap();
        fs::hard_link(&outside, home.join("stolen")).unwrap();
        // Two links, both inside: packed once, linked once.
        fs::write(home.join("a"), b"shared content").unwrap();
        fs::hard_link(home.join("a"), home.join("sub/b")).unwrap();
        fs::write(home.join("plain"), b"plain").unwrap();
        let ar = tmp.path().join("h.tar");
        pack(&home, &ar, &[]).unwrap();
        let bytes = fs::read(&ar).unwrap();
        assert!(
            !bytes.windows(18).any(|w| w == b"OUTSIDE-BYTES-4d2a"),
            "the outside file was packed"
        );
        let mut kinds = Vec::new();
        for e in tar::Archive::new(&bytes[..]).entries().unwrap() {
            let e = e.unwrap();
            kinds.push((
                e.path().unwrap().to_string_lossy().into_owned(),
                e.header().entry_type(),
            ));
        }
        assert!(!kinds.iter().any(|(p, _)| p == "stolen"), "{kinds:?}");
        let regular = |p: &str| kinds.contains(&(p.to_string(), tar::EntryType::Regular));
        let linked = |p: &str| kinds.contains(&(p.to_string(), tar::EntryType::Link));
        assert!(
            (regular("a") && linked("sub/b")) || (regular("sub/b") && linked("a")),
            "{kinds:?}"
        );
        assert!(regular("plain"), "{kinds:?}");
        // Round trip: one inode, two names, the content once.
        let dst = tmp.path().join("dst");
        fs::create_dir(&dst).unwrap();
        let policy = UnpackPolicy {
            symlinks_anywhere: true,
            strict_types: false,
            owner: None,
        };
        unpack(&ar, &dst, policy).unwrap();
        assert_eq!(fs::read(dst.join("a")).unwrap(), b"shared content");
        assert_eq!(fs::read(dst.join("sub/b")).unwrap(), b"shared content");
        let (a, b) = (
            fs::metadata(dst.join("a")).unwrap(),
            fs::metadata(dst.join("sub/b")).unwrap(),
        );
        assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()));
        assert_eq!(a.nlink(), 2);
        assert!(!dst.join("stolen").exists());
        // Deterministic too.
        let ar2 = tmp.path().join("h2.tar");
        pack(&home, &ar2, &[]).unwrap();
        assert_eq!(bytes, fs::read(&ar2).unwrap());
    }

    fn raw(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, link) in entries {
            let mut h = tar::Header::new_gnu();
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name.as_bytes());
            gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
            let data: &[u8] = if *kind == tar::EntryType::Regular {
                b"x"
            } else {
                b""
            };
            h.set_entry_type(*kind);
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            h.set_cksum();
            b.append(&h, data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn home_policy_still_refuses_escapes() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let home = UnpackPolicy {
            symlinks_anywhere: true,
            strict_types: false,
            owner: None,
        };
        let out = outside.to_str().unwrap().to_string();
        let cases: Vec<Vec<u8>> = vec![
            raw(&[("../escape", tar::EntryType::Regular, "")]),
            raw(&[("/abs", tar::EntryType::Regular, "")]),
            raw(&[
                ("ln", tar::EntryType::Symlink, out.as_str()),
                ("ln/pwned", tar::EntryType::Regular, ""),
            ]),
            raw(&[
                ("f", tar::EntryType::Regular, ""),
                ("hl", tar::EntryType::Link, "../../etc/passwd"),
            ]),
        ];
        for (i, ar) in cases.iter().enumerate() {
            let path = tmp.path().join(format!("{i}.tar"));
            fs::write(&path, ar).unwrap();
            let dst = tmp.path().join(format!("dst{i}"));
            fs::create_dir(&dst).unwrap();
            assert!(
                matches!(unpack(&path, &dst, home), Err(ArchiveError::Unsafe { .. })),
                "case {i}"
            );
        }
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
        assert!(!tmp.path().join("escape").exists());
    }
}
