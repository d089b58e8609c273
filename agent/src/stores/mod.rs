//! Layer 5, the stores: each owns one piece of the agent's durable state
//! and its invariants, and writes it only off the runtime thread. The
//! session table ([`session`]), disconnect notices ([`notices`]),
//! monitoring grants ([`monitor`]), deployed UAs ([`ua`]), pending updates
//! ([`spool`]), refused updates' bytes ([`preserve`]) and the chunk cache
//! ([`cache`]); [`state_file`] is the JSON-file form several of them share,
//! [`records`] the directory of JSON records the notices and the spool
//! keep.

pub mod cache;
pub mod monitor;
pub mod notices;
pub mod preserve;
pub mod records;
pub mod session;
pub mod spool;
pub mod state_file;
pub mod ua;
