//! # uve-host
//!
//! The host bridge daemon: serves UVE-5 (UIF retrieve/update, session
//! notices) to guest agents over vsock / hybrid vsock / Unix sockets, drives
//! UVE-2 (UA management, suspend/resume, monitoring, user release) and
//! offers a management API on a Unix socket.
//!
//! Dependencies run one way: `link → dispatcher → domain → handle`.

pub mod durable;
pub mod store;
