//! # uve-host
//!
//! The host bridge daemon: serves UVE-5 (UIF retrieve/update, session
//! notices) to guest agents over vsock / hybrid vsock / Unix sockets, drives
//! UVE-2 (UA management, suspend/resume, monitoring, user release) and
//! offers a management API on a Unix socket.
//!
//! The layers, top to bottom, each a folder; dependencies run one way:
//!
//! 1. [`daemon`] wires and runs everything; [`args`] holds the command
//!    lines of `uve-host` and `uvectl`.
//! 2. [`api`]: the management API, its types and its client.
//! 3. [`wire`]: agent connections (`server`, `dispatch`) and the UVE-5
//!    (`uve5`) and UVE-2 (`uve2`, with the VM switch) handlers.
//! 4. [`host::Host`], the shared context the API and the handlers receive,
//!    and the [`config`] it is built from.
//! 5. [`budgets`]: what a VM may make the host spend (handshakes, bulk
//!    work, staged bytes, conflict updates).
//! 6. [`state`]: the registry, leases, sessions, each VM's live link,
//!    switches in flight, events and metrics.
//! 7. [`store`]: the UIF store (local directory or S3) and durable files.
//!
//! `.ci/layers` checks that imports point only downwards.

pub mod api;
pub mod args;
pub mod budgets;
pub mod config;
pub mod daemon;
pub mod host;
pub mod state;
pub mod store;
pub mod wire;
