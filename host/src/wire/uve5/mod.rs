//! UVE-5, the host side: what an agent may ask of the host (retrieve,
//! update, session notices). [`VmConnection`] is the per-connection context the
//! dispatcher passes to every handler: which VM (from the listener, never
//! from the guest), what was served to it, which uploads it has open.

pub mod notices;
pub mod retrieve;
pub mod update;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use uve_protocol::manifest::{Hash, Manifest};
use uve_protocol::message::{ErrorCode, Response, Version, WireError};
use uve_protocol::names::UserName;

use crate::host::Host;

/// Result of a UVE-5 handler: the response or the error to send.
pub type Handled = Result<Response, WireError>;

/// Per-connection context: which VM, what was negotiated, what was served
/// and which uploads are open. Private: handlers ask for what they want.
pub struct VmConnection {
    /// Shared daemon state.
    host: Arc<Host>,
    /// The VM this connection belongs to.
    vm: String,
    /// Connection number.
    conn_id: u64,
    /// Negotiated frame limit.
    max_frame: u32,
    /// Negotiated protocol version (requests newer than it are refused).
    protocol: u16,
    state: Mutex<ConnState>,
}

#[derive(Default)]
struct ConnState {
    /// Versions granted per user on this connection.
    granted: HashMap<UserName, HashSet<Version>>,
    /// Chunks listed in manifest pages served per user: the only chunks
    /// this connection may fetch.
    fetchable: HashMap<UserName, HashSet<Hash>>,
    /// Recently served manifests (small cache; pages are asked in a row).
    manifests: Vec<((UserName, Version), Arc<Manifest>)>,
    /// Open uploads.
    uploads: HashMap<u64, Arc<update::Upload>>,
    next_upload: u64,
}

impl VmConnection {
    /// A context for a new connection of `vm`.
    pub fn new(host: Arc<Host>, vm: String, conn_id: u64, max_frame: u32, protocol: u16) -> Self {
        VmConnection {
            host,
            vm,
            conn_id,
            max_frame,
            protocol,
            state: Mutex::new(ConnState::default()),
        }
    }

    /// The daemon's shared state.
    pub fn host(&self) -> &Arc<Host> {
        &self.host
    }

    /// The VM this connection belongs to (named by its listener).
    pub fn vm(&self) -> &str {
        &self.vm
    }

    /// The connection's number.
    pub fn conn_id(&self) -> u64 {
        self.conn_id
    }

    /// The negotiated frame limit.
    pub fn max_frame(&self) -> u32 {
        self.max_frame
    }

    fn state(&self) -> MutexGuard<'_, ConnState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Refuses unless `user` is assigned to this VM.
    pub fn check_assigned(&self, user: &str) -> Result<(), WireError> {
        if self.host.registry().assignment(user).as_deref() == Some(self.vm.as_str()) {
            Ok(())
        } else {
            Err(WireError::new(
                ErrorCode::NotAssigned,
                format!("user {user} is not assigned to VM {}", self.vm),
            ))
        }
    }

    /// Refuses a request introduced in protocol `since` on a connection
    /// that negotiated an older version.
    pub fn check_protocol(&self, since: u16, what: &str) -> Result<(), WireError> {
        if self.protocol >= since {
            Ok(())
        } else {
            Err(WireError::new(
                ErrorCode::Unsupported,
                format!(
                    "{what} needs protocol {since}; this connection speaks {}",
                    self.protocol
                ),
            ))
        }
    }

    /// Origin string recorded with versions this VM writes.
    pub fn origin(&self) -> String {
        format!("vm:{}", self.vm)
    }
}

/// Validates free text from the peer.
pub fn check_text(what: &str, text: &str) -> Result<(), WireError> {
    if text.len() > uve_protocol::defs::MAX_TEXT_LEN {
        return Err(WireError::new(
            ErrorCode::TooLarge,
            format!(
                "{what} is longer than {} bytes",
                uve_protocol::defs::MAX_TEXT_LEN
            ),
        ));
    }
    Ok(())
}
