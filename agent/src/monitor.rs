//! Monitoring grants (UVE-2 `MonitorGrant`/`MonitorRevoke`): "user M may
//! monitor session S until T", persisted in `<state>/monitor.json` and
//! queried locally by `uve-agent monitor-check`. Expired grants answer no
//! and are dropped at the next change.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use uve_protocol::message::UnixMillis;

use crate::fsutil;

/// One grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The monitored session.
    pub session: String,
    /// The monitoring user.
    pub monitor: String,
    /// Expiry (Unix ms).
    pub expires: UnixMillis,
}

/// The persisted set of grants.
pub struct Grants {
    path: PathBuf,
    grants: Mutex<Vec<Grant>>,
}

impl Grants {
    /// Loads the grants under `state_dir`.
    pub fn load(state_dir: &Path) -> Grants {
        let path = state_dir.join("monitor.json");
        let grants = fsutil::read_json(&path).ok().flatten().unwrap_or_default();
        Grants {
            path,
            grants: Mutex::new(grants),
        }
    }

    fn change(&self, f: impl FnOnce(&mut Vec<Grant>)) -> std::io::Result<()> {
        let mut g = self.grants.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut g);
        let now = fsutil::now_ms();
        g.retain(|x| x.expires > now);
        fsutil::write_json(&self.path, &*g)
    }

    /// Records (or extends) a grant.
    pub fn grant(&self, session: &str, monitor: &str, expires: UnixMillis) -> std::io::Result<()> {
        self.change(|g| {
            g.retain(|x| !(x.session == session && x.monitor == monitor));
            g.push(Grant {
                session: session.into(),
                monitor: monitor.into(),
                expires,
            });
        })
    }

    /// Removes a grant (no error if absent).
    pub fn revoke(&self, session: &str, monitor: &str) -> std::io::Result<()> {
        self.change(|g| g.retain(|x| !(x.session == session && x.monitor == monitor)))
    }

    /// True if `monitor` may monitor `session` now.
    pub fn allowed(&self, session: &str, monitor: &str) -> bool {
        let now = fsutil::now_ms();
        self.grants
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .any(|x| x.session == session && x.monitor == monitor && x.expires > now)
    }

    /// Number of live grants.
    pub fn count(&self) -> usize {
        let now = fsutil::now_ms();
        self.grants
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|x| x.expires > now)
            .count()
    }
}
