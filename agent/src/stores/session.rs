//! The table of open sessions and attached UIFs, persisted in
//! `<state>/sessions.json` so that an agent restart re-announces its
//! sessions and can still flush their UIFs at logout. [`SessionTable`]
//! owns the file and the rules that keep it consistent: several sessions
//! of one user share one attached UIF (flushed when the last one ends), a
//! reopened session id is no longer an unsent "ended", and every change is
//! durable (off the runtime thread, see [`crate::stores::state_file`]) before its
//! caller goes on. [`UserLocks`] serialise everything that touches one
//! user's UIF; a [`UserGuard`] is the proof of holding that lock.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use uve_protocol::manifest::Hash;
use uve_protocol::message::Version;
use uve_protocol::names::{SessionId, UaName, UserName};

use crate::stores::state_file::StateFile;

/// One open session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Session id.
    pub session: SessionId,
    /// Its user.
    pub user: UserName,
    /// The UA serving it, if named at login.
    pub ua: Option<UaName>,
    /// When it started (Unix ms).
    pub started: u64,
    /// The supervised UA's process, so a restarted agent can keep
    /// watching it.
    #[serde(default)]
    pub ua_process: Option<UaProcess>,
}

/// A supervised UA process, named so that a recycled pid is not mistaken
/// for it. Tables of older agents wrote it as `[pid, start]`, which still
/// reads (a struct also decodes from a sequence).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UaProcess {
    /// Its pid.
    pub pid: i32,
    /// Its start time, in clock ticks since boot (`/proc/<pid>/stat`).
    pub start: u64,
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
    pub sessions: BTreeMap<SessionId, SessionRecord>,
    /// Attached UIFs by user.
    pub uifs: BTreeMap<UserName, UifRecord>,
    /// Ended sessions whose `SessionEnded` the host has not acknowledged.
    #[serde(default)]
    pub ended_unsent: Vec<SessionId>,
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

    /// Sessions of `user`.
    pub fn sessions_of(&self, user: &str) -> Vec<SessionId> {
        self.sessions
            .values()
            .filter(|s| s.user == user)
            .map(|s| s.session.clone())
            .collect()
    }

    /// Sessions served by UA `name`.
    pub fn sessions_using(&self, name: &str) -> Vec<SessionId> {
        self.sessions
            .values()
            .filter(|s| s.ua.as_deref() == Some(name))
            .map(|s| s.session.clone())
            .collect()
    }
}

/// The persisted session table (see the module header).
pub struct SessionTable {
    file: StateFile<Table>,
}

/// A failed write of the table is logged, not fatal: the change stays in
/// memory and reaches the disk with the next successful write.
fn logged<R>(r: std::io::Result<R>) -> Option<R> {
    r.map_err(|e| tracing::error!("cannot persist the session table: {e}"))
        .ok()
}

impl SessionTable {
    /// Loads the table under `state_dir` (empty if missing; unreadable is
    /// logged and empty).
    pub fn load(state_dir: &Path) -> SessionTable {
        let (file, error) = StateFile::load(&Table::path(state_dir));
        if let Some(e) = error {
            tracing::error!("cannot read the session table, starting empty: {e}");
        }
        SessionTable { file }
    }

    /// A copy of the whole table (status reports, tests).
    pub fn snapshot(&self) -> Table {
        self.file.read(|t| Table {
            sessions: t.sessions.clone(),
            uifs: t.uifs.clone(),
            ended_unsent: t.ended_unsent.clone(),
            kernel_boot: t.kernel_boot.clone(),
        })
    }

    /// Session `id`, if open.
    pub fn session(&self, id: &str) -> Option<SessionRecord> {
        self.file.read(|t| t.sessions.get(id).cloned())
    }

    /// Every open session.
    pub fn sessions(&self) -> Vec<SessionRecord> {
        self.file.read(|t| t.sessions.values().cloned().collect())
    }

    /// Open sessions of `user`.
    pub fn sessions_of(&self, user: &str) -> Vec<SessionId> {
        self.file.read(|t| t.sessions_of(user))
    }

    /// Open sessions served by UA `name`.
    pub fn sessions_using(&self, name: &str) -> Vec<SessionId> {
        self.file.read(|t| t.sessions_using(name))
    }

    /// `user`'s attached UIF, if any.
    pub fn uif(&self, user: &str) -> Option<UifRecord> {
        self.file.read(|t| t.uifs.get(user).cloned())
    }

    /// Users with an attached UIF.
    pub fn attached(&self) -> Vec<UserName> {
        self.file.read(|t| t.uifs.keys().cloned().collect())
    }

    /// Ended sessions whose `SessionEnded` the host has not acknowledged.
    pub fn ended_unsent(&self) -> Vec<SessionId> {
        self.file.read(|t| t.ended_unsent.clone())
    }

    /// Opens `rec` (a reopened id is no longer an unsent "ended").
    pub async fn open(&self, rec: SessionRecord) {
        logged(
            self.file
                .change(|t| {
                    t.ended_unsent.retain(|s| *s != rec.session);
                    t.sessions.insert(rec.session.clone(), rec);
                })
                .await,
        );
    }

    /// Ends `session`; returns how many sessions its user still has open.
    pub async fn end(&self, user: &str, session: &str) -> usize {
        let change = self.file.change(|t| {
            t.sessions.remove(session);
            t.sessions_of(user).len()
        });
        logged(change.await).unwrap_or_else(|| self.sessions_of(user).len())
    }

    /// Ends every session (a VM restart ended them); returns them.
    pub async fn end_all(&self) -> Vec<SessionRecord> {
        let change = self
            .file
            .change(|t| std::mem::take(&mut t.sessions).into_values().collect());
        logged(change.await).unwrap_or_default()
    }

    /// Records `user`'s UIF as attached.
    pub async fn attach(&self, guard: &UserGuard, rec: UifRecord) {
        let user = guard.user().clone();
        logged(self.file.change(|t| t.uifs.insert(user, rec)).await);
    }

    /// Forgets `user`'s attached UIF.
    pub async fn detach(&self, guard: &UserGuard) {
        logged(self.file.change(|t| t.uifs.remove(guard.user())).await);
    }

    /// A UIF still attached is now based on version `base` with manifest
    /// digest `digest` (a checkpoint or shutdown flush committed it).
    pub async fn rebase(&self, user: &str, base: Version, digest: Hash) {
        logged(
            self.file
                .change(|t| {
                    if let Some(r) = t.uifs.get_mut(user) {
                        r.base = Some(base);
                        r.base_digest = Some(digest);
                    }
                })
                .await,
        );
    }

    /// Records the supervised UA process of `session`.
    pub async fn set_ua_process(&self, session: &str, pid: i32, start: u64) {
        logged(
            self.file
                .change(|t| {
                    if let Some(r) = t.sessions.get_mut(session) {
                        r.ua_process = Some(UaProcess { pid, start });
                    }
                })
                .await,
        );
    }

    /// Journals `SessionEnded` for `sessions`.
    pub async fn mark_ended(&self, sessions: &[SessionId]) {
        logged(
            self.file
                .change(|t| t.ended_unsent.extend(sessions.iter().cloned()))
                .await,
        );
    }

    /// The host acknowledged `SessionEnded` of `session`.
    pub async fn ack_ended(&self, session: &str) {
        logged(
            self.file
                .change(|t| t.ended_unsent.retain(|s| s != session))
                .await,
        );
    }

    /// Records the kernel boot the table belongs to; returns the boot it
    /// belonged to before.
    pub async fn set_kernel_boot(&self, boot: &str) -> Option<String> {
        let change = self
            .file
            .change(|t| t.kernel_boot.replace(boot.to_string()));
        logged(change.await).flatten()
    }
}

/// The per-user locks: login, logout, flush and spool delivery of one
/// user run one at a time.
#[derive(Default)]
pub struct UserLocks {
    locks: Mutex<HashMap<UserName, Arc<tokio::sync::Mutex<()>>>>,
}

impl UserLocks {
    /// Waits for `user`'s lock.
    pub async fn lock(&self, user: &UserName) -> UserGuard {
        let lock = self
            .locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(user.clone())
            .or_default()
            .clone();
        UserGuard {
            user: user.clone(),
            _guard: lock.lock_owned().await,
        }
    }
}

/// Holding one user's lock: functions that require the lock take one.
pub struct UserGuard {
    user: UserName,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl UserGuard {
    /// The user whose lock this is.
    pub fn user(&self) -> &UserName {
        &self.user
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn rec(session: &str, user: &str) -> SessionRecord {
        SessionRecord {
            session: SessionId::new(session).unwrap(),
            user: UserName::new(user).unwrap(),
            ua: None,
            started: 1,
            ua_process: None,
        }
    }

    #[tokio::test]
    async fn intents_keep_the_table_consistent_and_durable() {
        let dir = tempfile::tempdir().unwrap();
        let t = SessionTable::load(dir.path());
        let locks = UserLocks::default();
        t.mark_ended(&[SessionId::new("s1").unwrap()]).await;
        t.open(rec("s1", "ann")).await;
        assert!(
            t.ended_unsent().is_empty(),
            "a reopened id is not an unsent end"
        );
        t.open(rec("s2", "ann")).await;
        let ann = UserName::new("ann").unwrap();
        let g = locks.lock(&ann).await;
        t.attach(
            &g,
            UifRecord {
                base: Some(1),
                lease: 7,
                temporary: false,
                base_digest: None,
            },
        )
        .await;
        assert_eq!(t.end("ann", "s1").await, 1, "one session of ann left");
        t.rebase("ann", 2, Hash::of(b"x")).await;
        t.set_ua_process("s2", 42, 99).await;
        // What a restarted agent finds.
        let again = SessionTable::load(dir.path());
        assert_eq!(again.sessions_of("ann"), ["s2"]);
        assert_eq!(
            again.session("s2").unwrap().ua_process,
            Some(UaProcess { pid: 42, start: 99 })
        );
        assert_eq!(again.uif("ann").unwrap().base, Some(2));
        t.detach(&g).await;
        assert_eq!(t.end("ann", "s2").await, 0);
        t.mark_ended(&[SessionId::new("s2").unwrap()]).await;
        t.ack_ended("s2").await;
        assert_eq!(t.set_kernel_boot("b1").await, None);
        assert_eq!(t.set_kernel_boot("b2").await.as_deref(), Some("b1"));
        let again = SessionTable::load(dir.path());
        assert!(again.sessions().is_empty() && again.attached().is_empty());
        assert!(again.ended_unsent().is_empty());
    }

    #[tokio::test]
    async fn user_locks_exclude_each_other() {
        let locks = Arc::new(UserLocks::default());
        let (ann, bob) = (UserName::new("ann").unwrap(), UserName::new("bob").unwrap());
        let g = locks.lock(&ann).await;
        let l2 = locks.clone();
        let other = tokio::spawn(async move { l2.lock(&ann).await.user().to_string() });
        let bob = locks.lock(&bob).await;
        assert_eq!(bob.user(), "bob", "another user's lock is free");
        tokio::task::yield_now().await;
        assert!(!other.is_finished());
        drop(g);
        assert_eq!(other.await.unwrap(), "ann");
    }
}
