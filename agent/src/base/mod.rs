//! Layer 7, the leaves every layer may use; none knows of sessions, the
//! host or the lifecycle: durable files and the runtime-thread assertion
//! ([`fsutil`]), the user database ([`accounts`]: NSS, or `/etc/passwd` and `getent`), symlink-proof walks
//! ([`nofollow`]), the home archive format ([`archive`]), the `UVE_LOG`
//! filter ([`logfilter`]) and fault injection for tests ([`fault`]).

pub mod accounts;
pub mod archive;
pub mod fault;
pub mod fsutil;
pub mod logfilter;
pub mod nofollow;
