//! # uve-e2e: end-to-end suites
//!
//! The real `uve-host` daemon on this machine, the real static `uve-agent`
//! inside QEMU guests (a Debian kernel, a busybox initramfs) talking over a
//! real virtio-vsock device (rust-vmm's `vhost-device-vsock`, hybrid vsock
//! on the host side). Modules:
//!
//! - [`ingredients`]: finds the cached kernel, backend and static binaries
//!   (prepared by `tests/prepare.sh`), or says what is missing;
//! - [`initramfs`]: builds a guest initramfs per scenario;
//! - [`vm`]: boots and kills a guest, and talks to it through [`channel`];
//! - [`channel`]: the host ↔ guest command channel protocol;
//! - [`agent`]: a real `uve-agent` process on this machine (demo, benchmarks);
//! - [`binaries`]: locates (and under cargo, builds) the release binaries;
//! - [`host`]: the real `uve-host` daemon driven through `uvectl`;
//! - [`rgw`]: a real single-node Ceph RGW on loopback (S3 store tests,
//!   `uve-bench s3`);
//! - [`rogue`]: the hostile-guest probes run inside a guest;
//! - [`rootdisk`]: a Debian guest disk baked with the uve-agent package
//!   (`packaging/bake-image.sh`) and the initramfs that boots it.

pub mod agent;
pub mod binaries;
pub mod channel;
pub mod host;
pub mod ingredients;
pub mod initramfs;
pub mod rgw;
pub mod rogue;
pub mod rootdisk;
pub mod vm;
