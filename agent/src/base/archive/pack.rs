//! Packing a directory tree as a deterministic tar archive without
//! following symlinks or acting on a path after checking it (see the
//! [module header](super)).

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
#[cfg(test)]
use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
#[cfg(test)]
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::stat::FileStat;

use super::{ArchiveError, Excludes, errno_err, io_err};
use crate::base::nofollow::{self, Kind};

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
    let excludes = Excludes::new(excludes).map_err(|e| ArchiveError::Io {
        context: "exclude patterns".into(),
        source: io::Error::new(io::ErrorKind::InvalidInput, e),
    })?;
    let (w, count) = pack_to(dir.as_fd(), io::BufWriter::new(file), &excludes)?;
    let f = w
        .into_inner()
        .map_err(|e| io_err("flush archive")(e.into_error()))?;
    crate::base::fsutil::sync(&f).map_err(io_err("fsync archive"))?;
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
    excludes: &'a Excludes,
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
            if self.excludes.matches(&path) {
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
    excludes: &Excludes,
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
