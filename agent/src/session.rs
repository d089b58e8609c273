//! The table of open sessions and attached UIFs, persisted in
//! `<state>/sessions.json` so that an agent restart re-announces its
//! sessions and can still flush their UIFs at logout. Several sessions of
//! one user share one attached UIF; it is flushed when the last one ends.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uve_protocol::manifest::Hash;
use uve_protocol::message::Version;

use crate::fsutil;

/// One open session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Session id.
    pub session: String,
    /// Its user.
    pub user: String,
    /// The UA serving it, if named at login.
    pub ua: Option<String>,
    /// When it started (Unix ms).
    pub started: u64,
    /// The supervised UA's process (pid, start time in clock ticks), so a
    /// restarted agent can keep watching it.
    #[serde(default)]
    pub ua_process: Option<(i32, u64)>,
}

/// A user's attached UIF.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UifRecord {
    /// The version it was retrieved as (or last checkpointed to).
    pub base: Option<Version>,
    /// Lease epoch from the retrieve (fencing token).
    pub lease: u64,
    /// True if the retrieve failed and the user runs on an empty UIF.
    pub temporary: bool,
    /// Manifest digest of `base` as it was put on disk (the empty UIF's for
    /// a new user): a flush whose file still has this digest has nothing
    /// to commit. `None` (temporary UIF, table of an older agent): always
    /// upload.
    #[serde(default)]
    pub base_digest: Option<Hash>,
}

/// Sessions and attached UIFs.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Table {
    /// Open sessions by id.
    pub sessions: BTreeMap<String, SessionRecord>,
    /// Attached UIFs by user.
    pub uifs: BTreeMap<String, UifRecord>,
    /// Ended sessions whose `SessionEnded` the host has not acknowledged.
    #[serde(default)]
    pub ended_unsent: Vec<String>,
    /// The kernel's boot id when the table was written: sessions in a
    /// table from another boot are gone.
    #[serde(default)]
    pub kernel_boot: Option<String>,
}

impl Table {
    /// Where the table lives.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("sessions.json")
    }

    /// Loads the table (empty if missing; unreadable is logged and empty).
    pub fn load(state_dir: &Path) -> Table {
        match fsutil::read_json(&Self::path(state_dir)) {
            Ok(Some(t)) => t,
            Ok(None) => Table::default(),
            Err(e) => {
                tracing::error!("cannot read the session table, starting empty: {e}");
                Table::default()
            }
        }
    }

    /// Persists the table durably.
    pub fn save(&self, state_dir: &Path) -> std::io::Result<()> {
        fsutil::write_json(&Self::path(state_dir), self)
    }

    /// Sessions of `user`.
    pub fn sessions_of(&self, user: &str) -> Vec<String> {
        self.sessions
            .values()
            .filter(|s| s.user == user)
            .map(|s| s.session.clone())
            .collect()
    }

    /// Sessions served by UA `name`.
    pub fn sessions_using(&self, name: &str) -> Vec<String> {
        self.sessions
            .values()
            .filter(|s| s.ua.as_deref() == Some(name))
            .map(|s| s.session.clone())
            .collect()
    }
}
