//! # uve-agent: the guest agent, as a library
//!
//! The binary (`main.rs`) only parses the command line. The layers, top
//! to bottom; each depends only on the ones below it, and a lower layer
//! reports upward through a channel, never by calling up:
//!
//! 1. [`daemon`] builds every part and owns every task;
//!    [`cli`] is the verbs' client of the control socket.
//! 2. The adapters: [`conn`] (dials the host), [`dispatch`] (answers the
//!    host's UVE-2 requests), [`control`] (the local control socket),
//!    [`outbox`] (delivers what is journalled).
//! 3. [`lifecycle`]: login, logout, disconnect, release, checkpoint,
//!    shutdown, recovery.
//! 4. [`flush`] (detach, journal, upload, preserve) and [`supervise`]
//!    (UA processes).
//! 5. [`uif`] (retrieve, update, cache, spool, preserved copies,
//!    materialise) and the stores that own their persistence:
//!    [`session`], [`notices`], [`monitor`], [`ua`] ([`state_file`],
//!    [`archive`], [`nofollow`] beneath them).
//! 6. [`link`]: the host connection as a handle and a watch.
//! 7. `uve-protocol`; and leaf helpers: [`config`], [`fsutil`],
//!    [`passwd`], [`fault`].

pub mod archive;
pub mod cli;
pub mod config;
pub mod conn;
pub mod control;
pub mod daemon;
pub mod dispatch;
pub mod fault;
pub mod flush;
pub mod fsutil;
pub mod lifecycle;
pub mod link;
pub mod monitor;
pub mod nofollow;
pub mod notices;
pub mod outbox;
pub mod passwd;
pub mod session;
pub mod state_file;
pub mod supervise;
pub mod ua;
pub mod uif;

#[cfg(test)]
pub mod testing;
