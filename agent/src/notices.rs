//! The journal of unexpected-disconnect notices (UVE-5
//! `UnexpectedDisconnect`): each notice is written durably under
//! `<state>/notices/` before it is sent and removed only when the host
//! answers `Ok`. Delivery is at-least-once; the notice id makes it
//! idempotent at the host.

use std::path::{Path, PathBuf};

use crate::conn::HostLink;
use uve_protocol::message::{DisconnectNotice, Request};

use crate::fsutil;

/// The notice journal.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    /// The journal under `state_dir`.
    pub fn new(state_dir: &Path) -> Journal {
        Journal {
            dir: state_dir.join("notices"),
        }
    }

    /// Journals a notice durably.
    pub fn add(&self, notice: &DisconnectNotice) -> std::io::Result<()> {
        fsutil::ensure_dir(&self.dir)?;
        let record = Record::from(notice);
        fsutil::write_json(&self.path(notice.id), &record)
    }

    /// Pending notices, oldest first.
    pub fn list(&self) -> Vec<DisconnectNotice> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out: Vec<DisconnectNotice> = rd
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .filter_map(|e| fsutil::read_json::<Record>(&e.path()).ok().flatten())
            .map(DisconnectNotice::from)
            .collect();
        out.sort_by_key(|n| (n.at, n.id));
        out
    }

    /// Number of pending notices.
    pub fn count(&self) -> usize {
        self.list().len()
    }

    /// Sends every pending notice; stops at the first transient failure.
    /// A notice the host refuses for good (after its reason was clipped to
    /// the wire's byte limit, for journals of older agents too) is dropped
    /// with an error in the log, so it never blocks the notices behind it.
    pub async fn deliver(&self, link: &HostLink) {
        for mut notice in self.list() {
            let id = notice.id;
            notice.reason = uve_protocol::defs::clip_text(&notice.reason).to_string();
            match link
                .request_timeout(
                    Request::UnexpectedDisconnect(notice),
                    std::time::Duration::from_secs(30),
                )
                .await
            {
                Ok(_) => {
                    tracing::info!(id, "disconnect notice acknowledged");
                    self.remove(id);
                }
                Err(e) if e.refusal().is_some() => {
                    tracing::error!(id, "host refused disconnect notice for good: {e}");
                    self.remove(id);
                }
                Err(e) => {
                    tracing::warn!(id, "disconnect notice not delivered yet: {e}");
                    return;
                }
            }
        }
    }

    fn remove(&self, id: u64) {
        let _ = std::fs::remove_file(self.path(id));
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:016x}.json"))
    }
}

/// On-disk form of a notice (the wire type has no serde-json-stable shape
/// guarantee, so the journal owns its own).
#[derive(serde::Serialize, serde::Deserialize)]
struct Record {
    id: u64,
    session: String,
    user: String,
    ua: Option<String>,
    reason: String,
    at: u64,
}

impl From<&DisconnectNotice> for Record {
    fn from(n: &DisconnectNotice) -> Self {
        Record {
            id: n.id,
            session: n.session.clone(),
            user: n.user.clone(),
            ua: n.ua.clone(),
            reason: n.reason.clone(),
            at: n.at,
        }
    }
}

impl From<Record> for DisconnectNotice {
    fn from(r: Record) -> Self {
        DisconnectNotice {
            id: r.id,
            session: r.session,
            user: r.user,
            ua: r.ua,
            reason: r.reason,
            at: r.at,
        }
    }
}
