//! Layer 2, the adapters: where requests come in. [`conn`] dials the host
//! and publishes each new link; [`dispatch`] answers the host's UVE-2
//! requests on it; [`control`] serves the local control socket (PAM hook,
//! CLI, UAs), authorising every request by the caller's uid; [`outbox`]
//! delivers what the stores journalled. They call the lifecycle, never the
//! other way round.

pub mod conn;
pub mod control;
pub mod dispatch;
pub mod outbox;
