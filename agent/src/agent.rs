//! The agent's shared state and its background "outbox": after every
//! (re)connect it re-announces open sessions, then delivers journalled
//! disconnect notices and spooled updates; it is also kicked whenever a
//! new notice or spool entry appears.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use std::time::Duration;

use tokio::sync::Notify;
use uve_protocol::message::Request;

use crate::config::Config;
use crate::conn::{Conn, Connected};
use crate::monitor::Grants;
use crate::notices::Journal;
use crate::session::Table;
use crate::supervise::Supervisor;
use crate::ua::UaStore;
use crate::uif::preserve::Preserved;
use crate::uif::spool::Spool;

/// Everything the agent's tasks share.
pub struct Agent {
    config: Mutex<Arc<Config>>,
    /// The state directory (fixed at start; not reloadable).
    pub state_dir: PathBuf,
    /// This boot's random id (sent in `Hello`).
    pub boot_id: [u8; 16],
    /// The host connection.
    pub conn: Conn,
    /// Sessions and attached UIFs.
    pub table: Mutex<Table>,
    /// Supervised UA processes.
    pub supervisor: Supervisor,
    /// Monitoring grants.
    pub grants: Grants,
    /// Deployed UAs.
    pub uas: UaStore,
    /// Pending updates.
    pub spool: Spool,
    /// Bytes of updates the host refused for good.
    pub preserved: Preserved,
    /// Pending disconnect notices.
    pub notices: Journal,
    /// Wakes the outbox.
    pub kick: Notify,
    user_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Agent {
    /// Builds the agent from a configuration, loading persisted state.
    pub fn new(config: Config) -> std::io::Result<Agent> {
        let state_dir = config.state_dir.clone();
        // Traverse-only for others: UAs running as the session's user must
        // reach `ua/`; everything else below is 0700.
        crate::fsutil::ensure_dir_mode(&state_dir, 0o711)?;
        let boot_id = match kernel_boot_id() {
            Some(id) => id,
            None => crate::fsutil::random_bytes::<16>()?,
        };
        Ok(Agent {
            table: Mutex::new(Table::load(&state_dir)),
            supervisor: Supervisor::default(),
            grants: Grants::load(&state_dir),
            uas: UaStore::new(&state_dir, config.max_ua_bundle),
            spool: Spool::new(&state_dir),
            preserved: Preserved::new(&state_dir),
            notices: Journal::new(&state_dir),
            kick: Notify::new(),
            user_locks: Mutex::new(HashMap::new()),
            conn: Conn::default(),
            config: Mutex::new(Arc::new(config)),
            state_dir,
            boot_id,
        })
    }

    /// The current configuration.
    pub fn config(&self) -> Arc<Config> {
        self.config
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the configuration (SIGHUP). The state dir and control
    /// socket keep their values until restart.
    pub fn reload(&self, mut config: Config) {
        let old = self.config();
        if config.state_dir != old.state_dir || config.control_socket != old.control_socket {
            tracing::warn!("state_dir and control_socket changes take effect after a restart");
            config.state_dir = old.state_dir.clone();
            config.control_socket = old.control_socket.clone();
        }
        *self.config.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(config);
        tracing::info!("configuration reloaded");
    }

    /// The lock serialising login, logout, flush and spool delivery of one
    /// user.
    pub fn user_lock(&self, user: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.user_locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(user.to_string())
            .or_default()
            .clone()
    }

    /// Runs `f` on the session table and persists it.
    pub fn with_table<T>(&self, f: impl FnOnce(&mut Table) -> T) -> T {
        let mut t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let out = f(&mut t);
        if let Err(e) = t.save(&self.state_dir) {
            tracing::error!("cannot persist the session table: {e}");
        }
        out
    }

    /// A copy of the session table's contents.
    pub fn snapshot(&self) -> Table {
        let t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        Table {
            sessions: t.sessions.clone(),
            uifs: t.uifs.clone(),
            ended_unsent: t.ended_unsent.clone(),
            kernel_boot: t.kernel_boot.clone(),
        }
    }
}

/// The kernel's random per-boot id (a UUID), so `Hello.boot_id` tells the
/// host a VM reboot from an agent restart or reconnect.
fn kernel_boot_id() -> Option<[u8; 16]> {
    let text = crate::fsutil::kernel_boot()?;
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    (hex.len() == 32).then_some(out)
}

/// Retry interval of the outbox while deliveries are pending.
const RETRY: Duration = Duration::from_secs(3);

/// The outbox loop: never returns.
pub async fn outbox(agent: Arc<Agent>) {
    let mut rx = agent.conn.subscribe();
    let mut announced = 0u64;
    loop {
        let current = rx.borrow_and_update().clone();
        if let Some(c) = current.filter(|c| !c.link.is_closed()) {
            if c.generation != announced && announce(&agent, &c).await {
                announced = c.generation;
            }
            crate::lifecycle::deliver_ended(&agent, &c).await;
            agent.notices.deliver(&c.link).await;
            crate::flush::deliver_spool(&agent, &c).await;
        }
        // Retry later while something is still pending (host busy, link
        // flapping), even without a reconnect or a new kick.
        let pending = agent.notices.count() + agent.spool.count() > 0
            || !agent.snapshot().ended_unsent.is_empty();
        let retry = if pending {
            RETRY
        } else {
            Duration::from_secs(3600)
        };
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            () = agent.kick.notified() => {}
            () = tokio::time::sleep(retry) => {}
        }
    }
}

/// Re-announces every open session (idempotent at the host).
async fn announce(agent: &Agent, c: &Connected) -> bool {
    for s in agent.snapshot().sessions.into_values() {
        let req = Request::SessionStarted {
            session: s.session.clone(),
            user: s.user,
            ua: s.ua,
        };
        if let Err(e) = c.link.request(req).await {
            tracing::warn!(session = %s.session, "re-announce failed: {e}");
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    #[test]
    fn kernel_boot_id_is_stable_within_a_boot() {
        let a = super::kernel_boot_id();
        assert!(a.is_some(), "/proc/sys/kernel/random/boot_id unreadable");
        assert_eq!(a, super::kernel_boot_id());
    }
}
