//! File-system primitives that never follow a symlink and never act on a
//! path after checking it: everything is relative to an open directory
//! descriptor, one name at a time (`openat`, `fstatat`, `mkdirat`,
//! `symlinkat`, `linkat`, `readlinkat` with `O_NOFOLLOW` /
//! `AT_SYMLINK_NOFOLLOW`), and ownership and modes are set on descriptors
//! (`fchown`, `fchmod`). A directory is identified by the descriptor once
//! opened, so renaming or replacing its path afterwards cannot redirect
//! the caller. Used by the archive code (`archive`) to unpack and
//! pack directory-mode homes and UA bundles.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Component, Path};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode};
use nix::unistd::{Gid, Uid};

/// What a file is, from its `st_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file.
    File,
    /// A symbolic link.
    Symlink,
    /// A device, fifo or socket.
    Other,
}

/// The kind of the file `st` describes.
pub fn kind(st: &FileStat) -> Kind {
    match st.st_mode & libc::S_IFMT {
        libc::S_IFDIR => Kind::Dir,
        libc::S_IFREG => Kind::File,
        libc::S_IFLNK => Kind::Symlink,
        _ => Kind::Other,
    }
}

/// Device and inode number: which file `st` describes.
#[allow(clippy::useless_conversion)] // dev_t/ino_t widths differ by target
pub fn id(st: &FileStat) -> (u64, u64) {
    (u64::from(st.st_dev), u64::from(st.st_ino))
}

/// Number of hard links of the file `st` describes.
#[allow(clippy::useless_conversion)] // nlink_t is u32 on some targets
pub fn nlink(st: &FileStat) -> u64 {
    u64::from(st.st_nlink)
}

/// Takes ownership of a descriptor a successful `open`/`openat` returned.
fn owned(raw: RawFd) -> OwnedFd {
    // SAFETY: `raw` was just returned by a successful open call and is not
    // owned by anything else; the OwnedFd becomes its only owner.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

/// Opens the directory at `path`; fails (`ELOOP`/`ENOTDIR`) if its last
/// component is a symlink or not a directory. The components before it
/// are resolved normally: only for paths whose parents are trusted.
pub fn open_dir(path: &Path) -> nix::Result<OwnedFd> {
    nix::fcntl::open(path, dir_flags(), Mode::empty()).map(owned)
}

/// Opens the directory `name` in `dir`, refusing a symlink.
pub fn open_dir_at(dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<OwnedFd> {
    nix::fcntl::openat(Some(dir.as_raw_fd()), name, dir_flags(), Mode::empty()).map(owned)
}

/// Opens the directory `rel` beneath `root` one component at a time, each
/// with `O_NOFOLLOW`: a symlink anywhere on the way fails with `ELOOP` or
/// `ENOTDIR`. `rel` may hold only normal components (`EINVAL` otherwise);
/// an empty `rel` yields a duplicate of `root`.
pub fn open_dir_beneath(root: BorrowedFd<'_>, rel: &Path) -> nix::Result<OwnedFd> {
    let mut cur = root
        .try_clone_to_owned()
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EBADF)))?;
    for c in rel.components() {
        match c {
            Component::Normal(name) => {
                let next = open_dir_at(borrow(&cur), name)?;
                cur = next;
            }
            Component::CurDir => {}
            _ => return Err(Errno::EINVAL),
        }
    }
    Ok(cur)
}

/// Borrows an owned descriptor.
pub fn borrow(fd: &OwnedFd) -> BorrowedFd<'_> {
    use std::os::fd::AsFd;
    fd.as_fd()
}

/// `lstat` of `name` in `dir`.
pub fn stat_at(dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<FileStat> {
    nix::sys::stat::fstatat(Some(dir.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW)
}

/// `fstat` of an open file.
pub fn stat(fd: BorrowedFd<'_>) -> nix::Result<FileStat> {
    nix::sys::stat::fstat(fd.as_raw_fd())
}

/// Opens `name` in `dir` for reading, refusing a symlink; `O_NONBLOCK` so
/// a fifo swapped in cannot block, `O_NOCTTY` so a terminal cannot become
/// ours. The caller checks what it opened with [`stat`].
pub fn open_read_at(dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<File> {
    let flags = OFlag::O_RDONLY
        | OFlag::O_NOFOLLOW
        | OFlag::O_NONBLOCK
        | OFlag::O_NOCTTY
        | OFlag::O_CLOEXEC;
    nix::fcntl::openat(Some(dir.as_raw_fd()), name, flags, Mode::empty())
        .map(|fd| File::from(owned(fd)))
}

/// Creates the file `name` in `dir` for writing (`O_EXCL`: it must not
/// exist, not even as a symlink) with permission bits `mode`.
pub fn create_at(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> nix::Result<File> {
    let flags =
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    nix::fcntl::openat(
        Some(dir.as_raw_fd()),
        name,
        flags,
        Mode::from_bits_truncate(mode),
    )
    .map(|fd| File::from(owned(fd)))
}

/// Creates the directory `name` in `dir`.
pub fn mkdir_at(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> nix::Result<()> {
    nix::sys::stat::mkdirat(Some(dir.as_raw_fd()), name, Mode::from_bits_truncate(mode))
}

/// Creates the symlink `name` in `dir`, pointing at `target`.
pub fn symlink_at(target: &Path, dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<()> {
    nix::unistd::symlinkat(target, Some(dir.as_raw_fd()), name)
}

/// Hard-links `from_name` in `from_dir` as `to_name` in `to_dir`; a
/// symlink at `from_name` is linked itself, never followed.
pub fn link_at(
    from_dir: BorrowedFd<'_>,
    from_name: &OsStr,
    to_dir: BorrowedFd<'_>,
    to_name: &OsStr,
) -> nix::Result<()> {
    nix::unistd::linkat(
        Some(from_dir.as_raw_fd()),
        from_name,
        Some(to_dir.as_raw_fd()),
        to_name,
        AtFlags::empty(),
    )
}

/// The target of the symlink `name` in `dir` (`EINVAL` if it is not one).
pub fn readlink_at(dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<OsString> {
    nix::fcntl::readlinkat(Some(dir.as_raw_fd()), name)
}

/// `fchown` of an open file.
pub fn chown_fd(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> nix::Result<()> {
    nix::unistd::fchown(
        fd.as_raw_fd(),
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
    )
}

/// `lchown` of `name` in `dir` (for symlinks, which cannot be opened).
pub fn chown_at(dir: BorrowedFd<'_>, name: &OsStr, uid: u32, gid: u32) -> nix::Result<()> {
    nix::unistd::fchownat(
        Some(dir.as_raw_fd()),
        name,
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
}

/// `fchmod` of an open file.
pub fn chmod_fd(fd: BorrowedFd<'_>, mode: u32) -> nix::Result<()> {
    nix::sys::stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(mode))
}

/// The names in the open directory `dir` (without `.` and `..`), sorted
/// and without duplicates (a name renamed away and back while listing may
/// be reported twice).
pub fn list(dir: BorrowedFd<'_>) -> nix::Result<Vec<OsString>> {
    use std::os::unix::ffi::OsStrExt;
    let dup = dir
        .try_clone_to_owned()
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EBADF)))?;
    let mut d = nix::dir::Dir::from(dup)?;
    let mut names = Vec::new();
    for entry in d.iter() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_os_string());
        }
    }
    names.sort();
    names.dedup();
    Ok(names)
}
