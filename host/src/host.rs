//! [`Host`]: the daemon's shared state, one field per concern (store,
//! registry, leases, hand-overs, sessions, connections, events, metrics),
//! each with its own lock. Domain modules take `&Host`; nothing here knows
//! about sockets or HTTP.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uve_protocol::message::{ErrorCode, WireError};

use crate::budgets::bulk::{BulkJob, BulkPool, MAX_QUEUED_PER_VM, Refused};
use crate::budgets::conflict_rate::ConflictRate;
use crate::budgets::gate::HandshakeGate;
use crate::budgets::staging::Staging;
use crate::config::Config;
use crate::state::events::Events;
use crate::state::leases::Leases;
use crate::state::metrics::Metrics;
use crate::state::registry::Registry;
use crate::state::sessions::Sessions;
use crate::store::{StoreError, StoreResult, UifStore};
use crate::wire::conns::Conns;
use crate::wire::uve2::handover::Handovers;

/// Shared daemon state.
pub struct Host {
    /// Configuration.
    pub config: Config,
    /// Temp directory for durable writes outside the store.
    pub tmp: PathBuf,
    /// The UIF store.
    pub store: Arc<dyn UifStore>,
    /// VMs and assignments.
    pub registry: Registry,
    /// Writer leases.
    pub leases: Leases,
    /// VM switch hand-overs.
    pub handovers: Handovers,
    /// Open sessions.
    pub sessions: Sessions,
    /// Live agent connections.
    pub conns: Conns,
    /// Event log.
    pub events: Events,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Staged bytes of open uploads: budgets and reclaim.
    pub staging: Arc<Staging>,
    /// Cancelled when the daemon begins shutting down.
    pub shutdown: CancellationToken,
    /// Held shared by each connection from accept until it is installed;
    /// shutdown takes it exclusively so no half-set-up connection misses
    /// its `Goodbye`.
    pub setup: Arc<tokio::sync::RwLock<()>>,
    /// Bounds connections in the handshake, per VM and in all.
    pub handshakes: HandshakeGate,
    /// Bounds updates from VMs without the user's current lease.
    pub conflict_rate: ConflictRate,
    commits: AtomicUsize,
    commits_idle: Notify,
    bulk: BulkPool,
}

/// Marks a commit in flight; shutdown waits for all of them.
pub struct CommitGuard<'a> {
    host: &'a Host,
}

impl Drop for CommitGuard<'_> {
    fn drop(&mut self) {
        if self.host.commits.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.host.commits_idle.notify_waiters();
        }
    }
}

impl Host {
    /// Assembles the shared state.
    pub fn new(
        config: Config,
        tmp: PathBuf,
        store: Arc<dyn UifStore>,
        registry: Registry,
        leases: Leases,
    ) -> Self {
        let events = Events::new(config.event_ring);
        let handshakes = HandshakeGate::new(config.max_handshakes_per_vm, config.max_handshakes);
        let bulk_threads = store.bulk_threads();
        let metrics = Arc::new(Metrics::default());
        let conflict_rate = ConflictRate::new(config.conflict_updates_per_hour);
        let staging = Staging::start(config.staging_limits(), store.clone(), metrics.clone());
        Host {
            config,
            tmp,
            store,
            registry,
            leases,
            handovers: Handovers::default(),
            sessions: Sessions::default(),
            conns: Conns::default(),
            events,
            metrics,
            staging,
            shutdown: CancellationToken::new(),
            setup: Arc::new(tokio::sync::RwLock::new(())),
            handshakes,
            conflict_rate,
            commits: AtomicUsize::new(0),
            commits_idle: Notify::new(),
            bulk: BulkPool::start(bulk_threads),
        }
    }

    /// Runs a bulk store operation (reading or writing one chunk) for `vm`
    /// on the bulk pool ([`crate::budgets::bulk`]: lower CPU priority, VMs served
    /// round-robin). Skipped if this future is dropped before a thread
    /// takes it (its connection closed). Falls back to a blocking thread
    /// if the pool has none; a VM with a full bulk queue gets an error
    /// (`Internal`: the agent retries).
    pub async fn store_call_bulk<T, F>(&self, vm: &str, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn UifStore) -> StoreResult<T> + Send + 'static,
    {
        let store = self.store.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: BulkJob = Box::new(move || {
            if tx.is_closed() {
                return;
            }
            let _ = tx.send(f(store.as_ref()));
        });
        match self.bulk.submit(vm, job) {
            Ok(()) => {}
            Err(Refused::NoThreads(job)) => {
                tokio::task::spawn_blocking(job)
                    .await
                    .map_err(|e| StoreError::io("store task", std::io::Error::other(e)))?;
            }
            Err(Refused::QueueFull) => {
                return Err(StoreError::io(
                    "bulk queue",
                    std::io::Error::other(format!(
                        "VM {vm} has {MAX_QUEUED_PER_VM} bulk jobs queued"
                    )),
                ));
            }
        }
        rx.await.map_err(|_| {
            StoreError::io(
                "bulk store task",
                std::io::Error::other("bulk task ended without an answer"),
            )
        })?
    }

    /// Runs a blocking store operation off the async workers.
    pub async fn store_call<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn UifStore) -> StoreResult<T> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .map_err(|e| StoreError::io("store task", std::io::Error::other(e)))?
    }

    /// Registers a commit in flight.
    pub fn commit_guard(&self) -> CommitGuard<'_> {
        self.commits.fetch_add(1, Ordering::AcqRel);
        CommitGuard { host: self }
    }

    /// Waits (bounded) until no commit is in flight.
    pub async fn commits_drained(&self, limit: Duration) -> bool {
        let wait = async {
            loop {
                let idle = self.commits_idle.notified();
                if self.commits.load(Ordering::Acquire) == 0 {
                    return;
                }
                idle.await;
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }

    /// A time limit from a `*_ms` config field.
    pub fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }
}

/// Maps a store error to the wire error an agent sees.
pub fn wire_store_error(e: &StoreError) -> WireError {
    let code = match e {
        StoreError::InvalidName(_) => ErrorCode::InvalidName,
        StoreError::NoSuchVersion { .. } => ErrorCode::NotFound,
        StoreError::MissingChunk(_) => ErrorCode::BadRequest,
        StoreError::BadChunk(_) => ErrorCode::BadChunk,
        StoreError::BadManifest(uve_protocol::manifest::ManifestError::Digest) => {
            ErrorCode::BadDigest
        }
        StoreError::BadManifest(_) => ErrorCode::BadRequest,
        StoreError::QuotaExceeded { .. } => ErrorCode::QuotaExceeded,
        StoreError::Contended { .. } => ErrorCode::Busy,
        StoreError::Corrupt { .. }
        | StoreError::Io { .. }
        | StoreError::Remote { .. }
        | StoreError::UnsafeStore(_) => {
            tracing::error!(error = %e, "store failure");
            ErrorCode::Internal
        }
    };
    WireError::new(code, e)
}
