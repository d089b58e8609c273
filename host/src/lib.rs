//! # uve-host
//!
//! The host bridge daemon: serves UVE-5 (UIF retrieve/update, session
//! notices) to guest agents over vsock / hybrid vsock / Unix sockets, drives
//! UVE-2 (UA management, suspend/resume, monitoring, user release) and
//! offers a management API on a Unix socket.
//!
//! Dependencies run one way: `server` (link) → `dispatch` → domain
//! (`uve5`, `switch`, `uve2`, `store`, ...) → link handle.

pub mod api;
pub mod bulk;
pub mod client;
pub mod config;
pub mod conflict_rate;
pub mod conns;
pub mod daemon;
pub mod dispatch;
pub mod durable;
pub mod events;
pub mod gate;
pub mod handover;
pub mod host;
pub mod leases;
pub mod metrics;
pub mod notify;
pub mod registry;
pub mod server;
pub mod sessions;
pub mod staging;
pub mod store;
pub mod switch;
pub mod uve2;
pub mod uve5;
