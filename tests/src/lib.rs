//! # uve-e2e: end-to-end suites and the one test kit
//!
//! The real `uve-host` daemon on this machine, the real static `uve-agent`
//! inside QEMU guests (a Debian kernel, a busybox initramfs) talking over a
//! real virtio-vsock device (rust-vmm's `vhost-device-vsock`, hybrid vsock
//! on the host side). The library is also the test kit every other suite
//! uses (the agent's and the host's integration tests, the benchmarks):
//! nothing in it is written again elsewhere. Modules:
//!
//! - [`poll`]: waiting with deadlines, sync and async;
//! - [`process`]: a child daemon with a log file (start, signal, reap)
//!   and small `/proc` and privilege probes;
//! - [`tree`]: the process tree (cgroup, process groups, a record swept by
//!   the next run) that every started process and its forks die with;
//! - [`agent`]: a real `uve-agent` process on this machine;
//! - [`host`]: the real `uve-host` daemon driven through `uvectl`;
//! - [`guest_host`]: the real `uve-host` inside a QEMU guest (the kernel
//!   AF_VSOCK path), driven through `uvectl` in that guest;
//! - [`fake_host`]: a fake host protocol peer for a real agent;
//! - [`fake_agent`]: a fake agent protocol peer for a real host;
//! - [`names`]: names in the kit's requests, valid or (for hostile tests)
//!   not;
//! - [`ingredients`]: finds the cached kernel, backend and static binaries
//!   (prepared by `tests/prepare.sh`), or says what is missing;
//! - [`initramfs`]: builds a guest initramfs per scenario;
//! - [`vm`]: boots and kills a guest, and talks to it through [`channel`];
//! - [`channel`]: the host ↔ guest command channel protocol;
//! - [`binaries`]: locates (and under cargo, builds) the release binaries;
//! - [`rgw`]: a real single-node Ceph RGW on loopback (S3 store tests,
//!   `uve-bench s3`);
//! - [`rogue`]: the hostile-guest probes run inside a guest;
//! - [`scenario`]: a scenario's run directory (kept on failure) and step
//!   timer;
//! - [`rootdisk`]: a Debian guest disk baked with the uve-agent package
//!   (`packaging/bake-image.sh`) and the initramfs that boots it;
//! - [`baked`]: what the baked-image scenarios share (bake with a
//!   configuration and extra packages, boot under systemd, UA bundles).

pub mod agent;
pub mod baked;
pub mod binaries;
pub mod channel;
pub mod fake_agent;
pub mod fake_host;
pub mod guest_host;
pub mod host;
pub mod ingredients;
pub mod initramfs;
pub mod names;
pub mod poll;
pub mod process;
pub mod raw_peer;
pub mod rgw;
pub mod rogue;
pub mod rootdisk;
pub mod scenario;
pub mod tree;
pub mod vm;
