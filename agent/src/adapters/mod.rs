//! Layer 2, the adapters: where requests come in. [`conn`] dials the host
//! and publishes each new link; [`dispatch`] answers the host's UVE-2
//! requests on it; [`control`] serves the local control socket (PAM hook,
//! CLI, UAs), authorising every request by the caller's uid, within the
//! per-uid connection budget of [`admission`]; [`outbox`]
//! delivers what the stores journalled. They call the lifecycle, never the
//! other way round; the two that answer requests share one [`Backend`].

pub mod admission;
pub mod conn;
pub mod control;
pub mod dispatch;
pub mod outbox;

use std::sync::Arc;

use tokio_util::task::TaskTracker;

use crate::lifecycle::Lifecycle;
use crate::stores::monitor::Grants;

/// What the host's and the control socket's requests are answered from.
#[derive(Clone)]
pub struct Backend {
    /// Sessions, UIFs, UAs, preserved copies.
    pub lifecycle: Arc<Lifecycle>,
    /// Monitoring grants.
    pub grants: Arc<Grants>,
    /// Where request and client tasks run.
    pub tasks: TaskTracker,
}
