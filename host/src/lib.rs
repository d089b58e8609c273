//! # uve-host
//!
//! The host bridge daemon: serves UVE-5 (UIF retrieve/update, session
//! notices) to guest agents over vsock / hybrid vsock / Unix sockets, drives
//! UVE-2 (UA management, suspend/resume, monitoring, user release) and
//! offers a management API on a Unix socket.
//!
//! The layers, top to bottom, each a folder; dependencies run one way:
//!
//! 1. [`daemon`] wires and runs everything; [`host::Host`] is the shared
//!    context the layers below receive; [`config`] is read by all.
//! 2. [`wire`]: agent connections (`server`, `conns`, `dispatch`) and the
//!    UVE-5 (`uve5`) and UVE-2 (`uve2`, with the VM switch) handlers;
//!    [`api`]: the management API, its types and its client.
//! 3. [`budgets`]: what a VM may make the host spend (handshakes, bulk
//!    work, staged bytes, conflict updates).
//! 4. [`state`]: the registry, leases, sessions, events and metrics.
//! 5. [`store`]: the UIF store (local directory or S3) and durable files.

pub mod api;
pub mod budgets;
pub mod config;
pub mod daemon;
pub mod host;
pub mod state;
pub mod store;
pub mod wire;
