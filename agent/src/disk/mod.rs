//! Profile disks (`[uif] mode = "disk"`): the UIF as a block device the
//! agent serves to the guest kernel and that is mounted as the home.
//!
//! This folder owns the block side only: [`device`] (what a served disk
//! can do, [`device::BlockDevice`]), [`front_end`] (how a disk is
//! presented to the kernel, [`front_end::FrontEnd`]), [`working_copy`] (the sparse file in
//! the agent's state directory that backs one user's disk), and [`nbd`]
//! (the NBD server that serves a device to any NBD client: the kernel's
//! `nbd` driver, or `qemu-io` and `nbdcopy` in tests). It calls nothing
//! above it; the lifecycle decides when a disk is served.

pub mod device;
pub mod front_end;
pub mod nbd;
pub mod working_copy;
