//! The journal of unexpected-disconnect notices (UVE-5
//! `UnexpectedDisconnect`): each notice is written durably under
//! `<state>/notices/` before it is sent and removed only when the host
//! answers `Ok`. Delivery is at-least-once; the notice id makes it
//! idempotent at the host.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use crate::link::HostLink;
use uve_protocol::message::{DisconnectNotice, Request};
use uve_protocol::names::{SessionId, UaName, UserName};

use crate::base::fsutil;

/// The notice journal, with an in-memory index (read once at start). File
/// work runs on blocking threads.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
    index: Arc<Mutex<BTreeMap<u64, DisconnectNotice>>>,
}

impl Journal {
    /// The journal under `state_dir`, its notices loaded.
    pub fn load(state_dir: &Path) -> Journal {
        let dir = state_dir.join("notices");
        let index = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
                    .filter_map(|e| fsutil::read_json::<Record>(&e.path()).ok().flatten())
                    .map(|r| (r.id, DisconnectNotice::from(r)))
                    .collect()
            })
            .unwrap_or_default();
        Journal {
            dir,
            index: Arc::new(Mutex::new(index)),
        }
    }

    fn index(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, DisconnectNotice>> {
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Journals a notice durably.
    pub async fn add(&self, notice: &DisconnectNotice) -> std::io::Result<()> {
        let (dir, path, record) = (self.dir.clone(), self.path(notice.id), Record::from(notice));
        tokio::task::spawn_blocking(move || {
            fsutil::ensure_dir(&dir)?;
            fsutil::write_json(&path, &record)
        })
        .await
        .map_err(std::io::Error::other)??;
        self.index().insert(notice.id, notice.clone());
        Ok(())
    }

    /// Pending notices, oldest first.
    pub fn list(&self) -> Vec<DisconnectNotice> {
        let mut out: Vec<DisconnectNotice> = self.index().values().cloned().collect();
        out.sort_by_key(|n| (n.at, n.id));
        out
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
        let path = self.path(id);
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(path)).await;
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
