//! Session lifecycles: login (retrieve + attach + optional supervised UA),
//! logout, unexpected disconnect, VM switch release; and in
//! [`maintain`] the ones the agent starts itself: periodic checkpoint,
//! shutdown, recovery after a VM restart, a UA's unexpected exit, the
//! push of a preserved copy. The flush they share is [`crate::flush`].
//! Every lifecycle of a user runs under that user's lock.
//!
//! [`Lifecycle`] is also what the adapters above see of the agent: its
//! parts are private, and it offers what they want, one file per kind of
//! caller: [`status`] (the local and the host's view), [`deliver`] (the
//! outbox's work), [`preserved`] (root's handling of preserved copies),
//! [`uas`] (the host's UA and suspend requests).

mod deliver;
mod end;
mod login;
mod maintain;
mod preserved;
mod room;
mod status;
#[cfg(test)]
mod tests;
mod uas;

pub use end::Ended;
pub use login::{Attached, LoginReport};
pub use status::{SessionStatus, StatusReport, UaStatus, VmWide};

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uve_protocol::names::{NameError, SessionId};

use crate::config::{Config, SharedConfig};
use crate::flush::{FlushError, FlushOutcome, Flusher};
use crate::link::LinkWatch;
use crate::stores::notices::Journal;
use crate::stores::session::{NotDurable, SessionRecord, SessionTable, UserLocks};
use crate::stores::ua::UaStore;
use crate::supervise::{Cgroups, Supervisor, UaExited};
use crate::uif::UserUifError;

/// Why a lifecycle operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// A name is malformed.
    #[error(transparent)]
    Name(#[from] NameError),
    /// No such session.
    #[error("no open session {0}")]
    NoSuchSession(String),
    /// The session id is in use by another user.
    #[error("session {0} is already open for another user")]
    SessionTaken(String),
    /// The UA named at login is not deployed.
    #[error("UA {0} is not deployed on this VM")]
    UaNotDeployed(String),
    /// An earlier update of the user could not be delivered yet.
    #[error("an earlier update of {0} is still waiting for the host; try again when connected")]
    PendingUpdate(String),
    /// A UIF step failed.
    #[error(transparent)]
    Uif(#[from] UserUifError),
    /// The flush failed before anything was journalled.
    #[error(transparent)]
    Flush(#[from] FlushError),
    /// Starting the UA failed.
    #[error("cannot start UA: {0}")]
    Supervise(#[from] crate::supervise::SuperviseError),
    /// Journalling failed.
    #[error("cannot journal: {0}")]
    Journal(std::io::Error),
    /// The user's last update was refused and is held in place (over the
    /// preserved area's budget): a retrieve would overwrite it.
    #[error("refused: a login now would overwrite unsaved work on this VM: {0}")]
    Held(String),
    /// No preserved copy has this id.
    #[error("no preserved copy {0} (see `uve-agent preserved list`)")]
    NoSuchPreserved(String),
    /// The session table could not record the login.
    #[error("the login was not recorded: {0}")]
    Table(#[from] NotDurable),
    /// The user database could not answer (directory unreachable):
    /// transient, the login may be retried.
    #[error(transparent)]
    Directory(crate::base::accounts::LookupError),
}

/// The lifecycles and the parts they work with. The parts are private:
/// callers say what they want (`login`, `status`, `deliver_pending`).
pub struct Lifecycle {
    /// The configuration in force.
    config: Arc<SharedConfig>,
    /// The state directory.
    state_dir: PathBuf,
    /// Sessions and attached UIFs.
    table: Arc<SessionTable>,
    /// The per-user locks.
    locks: Arc<UserLocks>,
    /// The flush, and through it the spool and the preserved copies.
    flusher: Arc<Flusher>,
    /// Supervised UAs.
    supervisor: Arc<Supervisor>,
    /// Deployed UAs.
    uas: Arc<UaStore>,
    /// Pending disconnect notices.
    notices: Journal,
    /// The host connection.
    link: Arc<LinkWatch>,
    /// Wakes the outbox.
    kick: Arc<Notify>,
    /// A `SessionStarted` was not delivered (the host answered `Busy`, or
    /// the link failed): the outbox announces the open sessions again.
    reannounce: std::sync::atomic::AtomicBool,
    /// Background work (flushes after a VM restart, UA exits), joined at
    /// shutdown.
    tasks: TaskTracker,
    /// The outcomes of the latest session ends, for retried logouts (also
    /// in `<state>/recent-ends.json`, so they outlive a restart).
    recent_ends: std::sync::Mutex<std::collections::VecDeque<(SessionId, FlushOutcome)>>,
    /// Held while the recent ends are written: each write's snapshot is
    /// taken under it, so the last write is the newest.
    ends_written: tokio::sync::Mutex<()>,
}

impl Lifecycle {
    /// Builds the lifecycles and every part beneath them (session table,
    /// locks, flush with its spool and preserved copies, supervisor, UA
    /// store, notices journal) on the state directory of `config`: the one
    /// wiring of the agent, used by the daemon and the unit-test rig.
    /// `link` publishes the host connection; `cgroups` is where UAs' cgroups
    /// go; `tasks` and `stop` are the daemon's. Returns the supervisor's
    /// reports of UAs that ended.
    pub fn open(
        config: Arc<SharedConfig>,
        link: Arc<LinkWatch>,
        cgroups: Cgroups,
        tasks: &TaskTracker,
        stop: &CancellationToken,
    ) -> (Arc<Lifecycle>, mpsc::UnboundedReceiver<UaExited>) {
        let cfg = config.get();
        let state_dir = cfg.state_dir.clone();
        let (exits_tx, exits) = mpsc::unbounded_channel();
        let kick = Arc::new(Notify::new());
        let table = Arc::new(SessionTable::load(&state_dir));
        let locks = Arc::new(UserLocks::default());
        let flusher = Arc::new(Flusher::new(
            config.clone(),
            table.clone(),
            link.clone(),
            locks.clone(),
            kick.clone(),
        ));
        let lifecycle = Lifecycle {
            supervisor: Arc::new(Supervisor::new(
                exits_tx,
                cgroups,
                tasks.clone(),
                stop.clone(),
            )),
            uas: Arc::new(UaStore::new(&state_dir, cfg.max_ua_bundle)),
            notices: Journal::load(&state_dir),
            config: config.clone(),
            state_dir,
            table,
            locks,
            flusher,
            link,
            kick,
            reannounce: std::sync::atomic::AtomicBool::new(false),
            tasks: tasks.clone(),
            recent_ends: std::sync::Mutex::new(end::load_recent_ends(&cfg.state_dir)),
            ends_written: tokio::sync::Mutex::new(()),
        };
        (Arc::new(lifecycle), exits)
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.config.get()
    }

    /// Puts a new configuration in force (SIGHUP).
    pub fn reload(&self, config: Config) {
        self.config.reload(config);
    }

    /// Session `id`, if open.
    pub fn session(&self, id: &str) -> Option<SessionRecord> {
        self.table.session(id)
    }

    /// Runs `work` as background work of the lifecycles, joined at
    /// shutdown.
    pub fn spawn(&self, work: impl std::future::Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(work);
    }
}

/// The parts, for unit tests of the layers beneath (the flush, the
/// supervisor) built through the one wiring.
#[cfg(test)]
impl Lifecycle {
    pub(crate) fn table(&self) -> &SessionTable {
        &self.table
    }

    pub(crate) fn locks(&self) -> &UserLocks {
        &self.locks
    }

    pub(crate) fn flusher(&self) -> &Flusher {
        &self.flusher
    }

    pub(crate) fn supervisor(&self) -> &Supervisor {
        &self.supervisor
    }
}
