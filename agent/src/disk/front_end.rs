//! How a disk is presented to the guest kernel as a block device: the
//! one interface between disk mode and a block front end. NBD through the
//! kernel's `nbd` driver is the one built ([`crate::disk::nbd::NbdKernel`]);
//! ublk (kernels that build it) or a host-side vhost-user-blk would be
//! others, without touching disk mode.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::device::BlockDevice;

/// What a front end is asked to present.
pub struct Disk {
    /// A name for logs and for the front end (the user's).
    pub name: String,
    /// The bytes.
    pub device: Arc<dyn BlockDevice>,
    /// After this process dies, how long the kernel keeps the device
    /// waiting for [`FrontEnd::represent`] before failing I/O.
    pub reattach_timeout: Duration,
}

/// A front end failed to present or take back a device.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FrontEndError(pub String);

/// A way to present disks to the kernel.
pub trait FrontEnd: Send + Sync {
    /// Presents `disk` as a new block device.
    fn present(&self, disk: Disk) -> Result<Box<dyn Presented>, FrontEndError>;

    /// Presents `disk` again on the device a previous agent process
    /// presented it on, named by that device's [`Presented::record`].
    fn represent(&self, record: &str, disk: Disk) -> Result<Box<dyn Presented>, FrontEndError>;
}

/// A disk presented as a block device, served by this process.
pub trait Presented: Send {
    /// The block device's path (`/dev/nbd0`).
    fn path(&self) -> PathBuf;

    /// Waits until the kernel shows the device with its size.
    fn wait_ready(&self, limit: Duration) -> Result<(), FrontEndError>;

    /// What a restarted agent needs to present the disk again on the same
    /// device (kept beside the working copy).
    fn record(&self) -> String;

    /// Takes the device away (unmount it first).
    fn withdraw(self: Box<Self>) -> Result<(), FrontEndError>;
}
