//! Monitoring grants (UVE-2 `MonitorGrant`/`MonitorRevoke`): "user M may
//! monitor session S until T", persisted in `<state>/monitor.json` and
//! queried locally by `uve-agent monitor-check`. Expired grants answer no
//! and are dropped at the next change.

use std::path::Path;

use serde::{Deserialize, Serialize};
use uve_protocol::message::UnixMillis;
use uve_protocol::names::{SessionId, UserName};

use crate::base::fsutil;
use crate::stores::state_file::StateFile;

/// One grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The monitored session.
    pub session: SessionId,
    /// The monitoring user.
    pub monitor: UserName,
    /// Expiry (Unix ms).
    pub expires: UnixMillis,
}

/// The persisted set of grants.
pub struct Grants {
    file: StateFile<Vec<Grant>>,
}

impl Grants {
    /// Loads the grants under `state_dir`.
    pub fn load(state_dir: &Path) -> Grants {
        let (file, error) = StateFile::load(&state_dir.join("monitor.json"));
        if let Some(e) = error {
            tracing::error!("cannot read monitoring grants, starting with none: {e}");
        }
        Grants { file }
    }

    async fn change(&self, f: impl FnOnce(&mut Vec<Grant>)) -> std::io::Result<()> {
        self.file
            .change(|g| {
                f(g);
                let now = fsutil::now_ms();
                g.retain(|x| x.expires > now);
            })
            .await
    }

    /// Records (or extends) a grant.
    pub async fn grant(
        &self,
        session: &SessionId,
        monitor: &UserName,
        expires: UnixMillis,
    ) -> std::io::Result<()> {
        self.change(|g| {
            g.retain(|x| !(x.session == *session && x.monitor == *monitor));
            g.push(Grant {
                session: session.clone(),
                monitor: monitor.clone(),
                expires,
            });
        })
        .await
    }

    /// Removes a grant (no error if absent).
    pub async fn revoke(&self, session: &str, monitor: &str) -> std::io::Result<()> {
        self.change(|g| g.retain(|x| !(x.session == session && x.monitor == monitor)))
            .await
    }

    /// True if `monitor` may monitor `session` now.
    pub fn allowed(&self, session: &str, monitor: &str) -> bool {
        let now = fsutil::now_ms();
        self.file.read(|g| {
            g.iter()
                .any(|x| x.session == session && x.monitor == monitor && x.expires > now)
        })
    }

    /// Number of live grants.
    pub fn count(&self) -> usize {
        let now = fsutil::now_ms();
        self.file
            .read(|g| g.iter().filter(|x| x.expires > now).count())
    }
}
