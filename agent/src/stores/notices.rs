//! The journal of unexpected-disconnect notices (UVE-5
//! `UnexpectedDisconnect`): each notice is written durably under
//! `<state>/notices/` before it is sent and removed only when the host
//! answers `Ok`. Delivery is at-least-once; the notice id makes it
//! idempotent at the host.

use std::collections::BTreeMap;
use std::path::Path;

use crate::link::HostLink;
use uve_protocol::message::{DisconnectNotice, Request};
use uve_protocol::names::{SessionId, UaName, UserName};

use super::records::Records;
use crate::base::fsutil;

/// The notice journal, with an in-memory index (read once at start). File
/// work runs on blocking threads.
#[derive(Debug, Clone)]
pub struct Journal {
    records: Records<DisconnectNotice>,
}

impl Journal {
    /// The journal under `state_dir`, its notices loaded.
    pub fn load(state_dir: &Path) -> Journal {
        let records = Records::load(state_dir.join("notices"), |r: Record| {
            (r.id, DisconnectNotice::from(r))
        });
        Journal { records }
    }

    fn index(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, DisconnectNotice>> {
        self.records.index()
    }

    /// Journals a notice durably.
    pub async fn add(&self, notice: &DisconnectNotice) -> std::io::Result<()> {
        let (path, record) = (self.records.record_path(notice.id), Record::from(notice));
        self.records
            .add(notice.id, notice, move || {
                fsutil::write_json(&path, &record)
            })
            .await
    }

    /// Pending notices, oldest first.
    pub fn list(&self) -> Vec<DisconnectNotice> {
        self.records.sorted_by_key(|n| (n.at, n.id))
    }

    /// Number of pending notices.
    pub fn count(&self) -> usize {
        self.index().len()
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
                    self.remove(id).await;
                }
                Err(e) if e.refusal().is_some() => {
                    tracing::error!(id, "host refused disconnect notice for good: {e}");
                    self.remove(id).await;
                }
                Err(e) => {
                    tracing::warn!(id, "disconnect notice not delivered yet: {e}");
                    return;
                }
            }
        }
    }

    async fn remove(&self, id: u64) {
        self.index().remove(&id);
        let path = self.records.record_path(id);
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(path)).await;
    }
}

/// On-disk form of a notice (the wire type has no serde-json-stable shape
/// guarantee, so the journal owns its own).
#[derive(serde::Serialize, serde::Deserialize)]
struct Record {
    id: u64,
    session: SessionId,
    user: UserName,
    ua: Option<UaName>,
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
