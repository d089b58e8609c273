//! What a served disk can do: the one interface between a block front end
//! (NBD today; ublk or a host-side vhost-user-blk later) and what holds
//! the bytes ([`super::working_copy::WorkingCopy`]).

use std::io;

/// A fixed-size disk that a front end serves. Every method may block on
/// the disk: it is called from the serving threads, never from the
/// runtime thread. Offsets and lengths are in bytes; callers check them
/// against [`size`](Self::size) first.
pub trait BlockDevice: Send + Sync {
    /// The disk's size in bytes.
    fn size(&self) -> u64;

    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes `buf` at `offset`; durable only after [`flush`](Self::flush).
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Makes every completed write durable (the kernel's FLUSH, and FUA).
    fn flush(&self) -> io::Result<()>;

    /// The client no longer needs `len` bytes at `offset` (TRIM). They
    /// read as zeroes afterwards, partial blocks included: the range is
    /// exactly what was asked, whatever the device's block size.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Makes `len` bytes at `offset` read as zeroes (WRITE_ZEROES);
    /// `allocate` keeps the space allocated (the client's NO_HOLE flag).
    fn write_zeroes(&self, offset: u64, len: u64, allocate: bool) -> io::Result<()>;
}
