//! # uve-agent: the guest agent, as a library
//!
//! The binary (`main.rs`) only parses the command line. The layers, top
//! to bottom, each a folder (or one file) of this crate; each depends only
//! on the ones below it, and a lower layer reports upward through a
//! channel, never by calling up:
//!
//! 1. [`daemon`] builds every part and owns every task;
//!    [`cli`] is the verbs' client of the control socket; [`args`] is the
//!    command line (clap), shared with the man-page generator.
//! 2. [`adapters`]: `conn` (dials the host), `dispatch` (answers the
//!    host's UVE-2 requests), `control` (the local control socket),
//!    `outbox` (delivers what is journalled).
//! 3. [`lifecycle`]: login, logout, disconnect, release, checkpoint,
//!    shutdown, recovery.
//! 4. [`flush`] (detach, journal, upload, preserve) and [`supervise`]
//!    (UA processes).
//! 5. [`uif`] (retrieve, update, materialise) above [`stores`], which own
//!    their persistence: sessions, notices, grants, UAs, spool, preserved
//!    copies, the chunk cache; [`disk`], the profile disk's block side
//!    (the working copy and the NBD server that serves it).
//! 6. [`link`]: the host connection as a handle and a watch.
//! 7. [`base`]: the leaves (`fsutil`, `passwd`, `nofollow`, `archive`,
//!    `logfilter`, `fault`); [`config`], the configuration every layer reads; and
//!    `uve-protocol`.

pub mod adapters;
pub mod args;
pub mod base;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod disk;
pub mod flush;
pub mod lifecycle;
pub mod link;
pub mod stores;
pub mod supervise;
pub mod uif;

#[cfg(test)]
pub mod testing;
