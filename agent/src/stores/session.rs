//! The table of open sessions and attached UIFs, persisted in
//! `<state>/sessions.json` so that an agent restart re-announces its
//! sessions and can still flush their UIFs at logout. [`SessionTable`]
//! owns the file and the rules that keep it consistent: several sessions
//! of one user share one attached UIF (flushed when the last one ends), a
//! reopened session id is no longer an unsent "ended", and every change is
//! durable (off the runtime thread, see [`crate::stores::state_file`]) before its
//! caller goes on. [`UserLocks`] serialise everything that touches one
//! user's UIF; a [`UserGuard`] is the proof of holding that lock, and every
//! intent that changes a user's sessions or UIF takes one.
//!
//! A change whose write fails returns [`NotDurable`]: it holds in memory
//! for the rest of this run, and reaches the disk with the next write that
//! succeeds. Each caller says what it then does (a login fails and undoes
//! what it recorded; a logout still flushes and reports the table error
//! beside its outcome). What a restart finds of such a change is repaired
//! then: an attached UIF that no open session holds is flushed and
//! detached (`Lifecycle::repair_after_restart`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use uve_protocol::manifest::Hash;
use uve_protocol::message::Version;
use uve_protocol::names::{SessionId, UaName, UserName};

use crate::base::accounts::Account;
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
    /// Its logout is under way: the session ends once the UIF is
    /// committed, spooled or preserved, and a restarted agent finishes it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ending: bool,
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
    /// The user as the user database knew them at login (ids, groups,
    /// home): attach, detach and UA starts use it, so a logout never
    /// depends on the directory being reachable. `None`: the database did
    /// not know the user (or a table of an older agent).
    #[serde(default)]
    pub account: Option<Account>,
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
    /// A change is in memory that no write has made durable yet.
    behind: std::sync::atomic::AtomicBool,
}

/// A change to the table that did not reach the disk: it holds in memory
/// for this run and is written with the next change that succeeds.
#[derive(Debug, thiserror::Error)]
#[error(
    "the session table could not be written ({source}); the change holds in memory until a later write succeeds"
)]
pub struct NotDurable {
    #[source]
    source: std::io::Error,
}

impl SessionTable {
    /// The outcome of a change: marks the table behind the disk or caught
    /// up.
    fn durable<R>(&self, r: std::io::Result<R>) -> Result<R, NotDurable> {
        use std::sync::atomic::Ordering;
        match r {
            Ok(v) => {
                self.behind.store(false, Ordering::Relaxed);
                Ok(v)
            }
            Err(source) => {
                self.behind.store(true, Ordering::Relaxed);
                tracing::error!("cannot persist the session table: {source}");
                Err(NotDurable { source })
            }
        }
    }

    /// Writes the table if a change failed to reach the disk since the last
    /// write that succeeded (the outbox calls it every few seconds while
    /// the agent runs); returns whether it wrote.
    pub async fn write_if_behind(&self) -> Result<bool, NotDurable> {
        if !self.behind.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(false);
        }
        self.durable(self.file.change(|_| ()).await).map(|()| true)
    }
}

impl SessionTable {
    /// Loads the table under `state_dir` (empty if missing; unreadable is
    /// logged and empty).
    pub fn load(state_dir: &Path) -> SessionTable {
        let (file, error) = StateFile::load(&Table::path(state_dir));
        if let Some(e) = error {
            tracing::error!("cannot read the session table, starting empty: {e}");
        }
        SessionTable {
            file,
            behind: std::sync::atomic::AtomicBool::new(false),
        }
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

    /// Opens `rec`, a session of the user whose lock `guard` holds (a
    /// reopened id is no longer an unsent "ended").
    pub async fn open(&self, guard: &UserGuard, rec: SessionRecord) -> Result<(), NotDurable> {
        debug_assert_eq!(&rec.user, guard.user(), "a session of the locked user");
        self.durable(
            self.file
                .change(|t| {
                    t.ended_unsent.retain(|s| *s != rec.session);
                    t.sessions.insert(rec.session.clone(), rec);
                })
                .await,
        )
    }

    /// Ends `session` of the user whose lock `guard` holds; returns how
    /// many sessions that user still has open (also in memory, when the
    /// write failed: [`Self::sessions_of`]).
    pub async fn end(&self, guard: &UserGuard, session: &str) -> Result<usize, NotDurable> {
        let user = guard.user();
        let change = self.file.change(|t| {
            t.sessions.remove(session);
            t.sessions_of(user).len()
        });
        self.durable(change.await)
    }

    /// Durably marks `session` (of the user whose lock `guard` holds) as
    /// ending: its logout is under way.
    pub async fn mark_ending(&self, guard: &UserGuard, session: &str) -> Result<(), NotDurable> {
        self.durable(
            self.file
                .change(|t| {
                    if let Some(r) = t.sessions.get_mut(session)
                        && r.user == *guard.user()
                    {
                        r.ending = true;
                    }
                })
                .await,
        )
    }

    /// Ends every session (a VM restart ended them). Only at startup,
    /// before any other intent runs.
    pub async fn end_all(&self) -> Result<(), NotDurable> {
        self.durable(self.file.change(|t| t.sessions.clear()).await)
    }

    /// The kernel boot the table was last recorded in.
    pub fn kernel_boot(&self) -> Option<String> {
        self.file.read(|t| t.kernel_boot.clone())
    }

    /// Records the UIF of the user whose lock `guard` holds as attached.
    pub async fn attach(&self, guard: &UserGuard, rec: UifRecord) -> Result<(), NotDurable> {
        let user = guard.user().clone();
        self.durable(self.file.change(|t| t.uifs.insert(user, rec)).await)
            .map(drop)
    }

    /// Forgets the attached UIF of the user whose lock `guard` holds.
    pub async fn detach(&self, guard: &UserGuard) -> Result<(), NotDurable> {
        self.durable(self.file.change(|t| t.uifs.remove(guard.user())).await)
            .map(drop)
    }

    /// The UIF of the user whose lock `guard` holds, if still attached, is
    /// now based on version `base` with manifest digest `digest` (a
    /// checkpoint or shutdown flush committed it).
    pub async fn rebase(
        &self,
        guard: &UserGuard,
        base: Version,
        digest: Hash,
    ) -> Result<(), NotDurable> {
        self.durable(
            self.file
                .change(|t| {
                    if let Some(r) = t.uifs.get_mut(guard.user()) {
                        r.base = Some(base);
                        r.base_digest = Some(digest);
                    }
                })
                .await,
        )
    }

    /// Records the supervised UA process of `session`, a session of the
    /// user whose lock `guard` holds.
    pub async fn set_ua_process(
        &self,
        guard: &UserGuard,
        session: &str,
        process: UaProcess,
    ) -> Result<(), NotDurable> {
        self.durable(
            self.file
                .change(|t| {
                    if let Some(r) = t.sessions.get_mut(session)
                        && r.user == *guard.user()
                    {
                        r.ua_process = Some(process);
                    }
                })
                .await,
        )
    }

    /// Journals `SessionEnded` for `sessions`, which the user whose lock
    /// `guard` holds has just ended.
    pub async fn mark_ended(
        &self,
        _guard: &UserGuard,
        sessions: &[SessionId],
    ) -> Result<(), NotDurable> {
        self.durable(
            self.file
                .change(|t| t.ended_unsent.extend(sessions.iter().cloned()))
                .await,
        )
    }

    /// The host acknowledged `SessionEnded` of `session`. No user's lock:
    /// the session has ended, and only the outbox journal changes.
    pub async fn ack_ended(&self, session: &str) -> Result<(), NotDurable> {
        self.durable(
            self.file
                .change(|t| t.ended_unsent.retain(|s| s != session))
                .await,
        )
    }

    /// Records the kernel boot the table belongs to; returns the boot it
    /// belonged to before. Only at startup.
    pub async fn set_kernel_boot(&self, boot: &str) -> Result<Option<String>, NotDurable> {
        let change = self
            .file
            .change(|t| t.kernel_boot.replace(boot.to_string()));
        self.durable(change.await)
    }
}

/// The per-user locks: login, logout, flush and spool delivery of one
/// user run one at a time.
#[derive(Default)]
pub struct UserLocks {
    locks: Mutex<HashMap<UserName, Arc<tokio::sync::Mutex<()>>>>,
}

impl UserLocks {
    /// The lock of `user` (made at first use).
    fn of(&self, user: &UserName) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(user.clone())
            .or_default()
            .clone()
    }

    /// Waits for `user`'s lock.
    pub async fn lock(&self, user: &UserName) -> UserGuard {
        UserGuard {
            user: user.clone(),
            _guard: self.of(user).lock_owned().await,
        }
    }

    /// `user`'s lock if nobody holds it now (never waits).
    pub fn try_lock(&self, user: &UserName) -> Option<UserGuard> {
        Some(UserGuard {
            user: user.clone(),
            _guard: self.of(user).try_lock_owned().ok()?,
        })
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
            ending: false,
        }
    }

    #[tokio::test]
    async fn intents_keep_the_table_consistent_and_durable() {
        let dir = tempfile::tempdir().unwrap();
        let t = SessionTable::load(dir.path());
        let locks = UserLocks::default();
        let ann = UserName::new("ann").unwrap();
        let g = locks.lock(&ann).await;
        t.mark_ended(&g, &[SessionId::new("s1").unwrap()])
            .await
            .unwrap();
        t.open(&g, rec("s1", "ann")).await.unwrap();
        assert!(
            t.ended_unsent().is_empty(),
            "a reopened id is not an unsent end"
        );
        t.open(&g, rec("s2", "ann")).await.unwrap();
        t.attach(
            &g,
            UifRecord {
                base: Some(1),
                lease: 7,
                temporary: false,
                base_digest: None,
                account: Some(Account {
                    name: "CORP\\ann".into(),
                    uid: 20001,
                    gid: 20001,
                    groups: vec![20001, 50],
                    home: "/home/corp/ann".into(),
                }),
            },
        )
        .await
        .unwrap();
        assert_eq!(t.end(&g, "s1").await.unwrap(), 1, "one session of ann left");
        t.rebase(&g, 2, Hash::of(b"x")).await.unwrap();
        t.set_ua_process(&g, "s2", UaProcess { pid: 42, start: 99 })
            .await
            .unwrap();
        // What a restarted agent finds.
        let again = SessionTable::load(dir.path());
        assert_eq!(again.sessions_of("ann"), ["s2"]);
        assert_eq!(
            again.session("s2").unwrap().ua_process,
            Some(UaProcess { pid: 42, start: 99 })
        );
        assert_eq!(again.uif("ann").unwrap().base, Some(2));
        assert_eq!(
            again.uif("ann").unwrap().account.map(|a| (a.uid, a.groups)),
            Some((20001, vec![20001, 50])),
            "the entry of the login is kept for the logout"
        );
        t.detach(&g).await.unwrap();
        assert_eq!(t.end(&g, "s2").await.unwrap(), 0);
        t.mark_ended(&g, &[SessionId::new("s2").unwrap()])
            .await
            .unwrap();
        t.ack_ended("s2").await.unwrap();
        assert_eq!(t.set_kernel_boot("b1").await.unwrap(), None);
        assert_eq!(
            t.set_kernel_boot("b2").await.unwrap().as_deref(),
            Some("b1")
        );
        let again = SessionTable::load(dir.path());
        assert!(again.sessions().is_empty() && again.attached().is_empty());
        assert!(again.ended_unsent().is_empty());
    }

    #[tokio::test]
    async fn a_failed_write_reaches_the_caller_and_holds_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let t = SessionTable::load(dir.path());
        let locks = UserLocks::default();
        let g = locks.lock(&UserName::new("ann").unwrap()).await;
        t.open(&g, rec("s1", "ann")).await.unwrap();
        // The table's path becomes a directory: no write can replace it.
        let path = Table::path(dir.path());
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("keep"), b"x").unwrap();
        let err = t.open(&g, rec("s2", "ann")).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("session table could not be written"),
            "{err}"
        );
        assert_eq!(t.sessions_of("ann"), ["s1", "s2"], "held in memory");
        assert!(t.end(&g, "s1").await.is_err());
        assert_eq!(t.sessions_of("ann"), ["s2"]);
        // Once writes succeed again, the disk catches up.
        std::fs::remove_dir_all(&path).unwrap();
        t.ack_ended("nothing").await.unwrap();
        let again = SessionTable::load(dir.path());
        assert_eq!(again.sessions_of("ann"), ["s2"]);
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
