//! The working copy of one user's disk: a sparse file in the agent's
//! state directory, read and written in place by the block front end.
//! Unwritten and trimmed ranges are holes, so the file costs only the
//! blocks the user's filesystem holds.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use rustix::fs::FallocateFlags;

use super::device::BlockDevice;
use crate::base::fsutil;

/// A disk backed by a sparse file.
pub struct WorkingCopy {
    file: File,
    size: u64,
}

impl WorkingCopy {
    /// Creates a sparse file of `size` bytes at `path` (mode 0600; it must
    /// not exist yet).
    pub fn create(path: &Path, size: u64) -> io::Result<WorkingCopy> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        file.set_len(size)?;
        Ok(WorkingCopy { file, size })
    }

    /// Opens the working copy at `path`; its size is the file's length.
    pub fn open(path: &Path) -> io::Result<WorkingCopy> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file", path.display()),
            ));
        }
        Ok(WorkingCopy {
            file,
            size: meta.len(),
        })
    }

    fn fallocate_or_zero(&self, how: FallocateFlags, offset: u64, len: u64) -> io::Result<()> {
        fsutil::zero_range(&self.file, how, offset, len)
    }
}

impl BlockDevice for WorkingCopy {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        fsutil::sync_data(&self.file)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate_or_zero(FallocateFlags::PUNCH_HOLE, offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, allocate: bool) -> io::Result<()> {
        let how = if allocate {
            FallocateFlags::ZERO_RANGE
        } else {
            FallocateFlags::PUNCH_HOLE
        };
        self.fallocate_or_zero(how, offset, len)
    }
}
