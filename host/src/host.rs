//! [`Host`]: the daemon's shared state, one part per concern (store,
//! registry, leases, hand-overs, sessions, connections, events, metrics,
//! budgets), each with its own lock. The parts are private: domain modules
//! take `&Host` and ask it for the part they work with (`host.registry()`)
//! or for what they want done (`host.emit(event)`, `host.store_call(..)`,
//! `host.commit_guard()`). Nothing here knows about sockets or HTTP.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uve_protocol::message::{ErrorCode, WireError};

use crate::budgets::bulk::{BulkJob, BulkPool, Refused};
use crate::budgets::conflict_rate::ConflictRate;
use crate::budgets::gate::HandshakeGate;
use crate::budgets::heavy::HeavyShare;
use crate::budgets::quota_charges::QuotaCharges;
use crate::budgets::rate::PerVmRate;
use crate::budgets::report::{Budget, Reports};
use crate::budgets::staging::Staging;
use crate::config::Config;
use crate::state::conns::Conns;
use crate::state::events::{Event, Events};
use crate::state::handover::Handovers;
use crate::state::leases::Leases;
use crate::state::metrics::{Metrics, add};
use crate::state::registry::Registry;
use crate::state::sessions::Sessions;
use crate::store::{ScrubReport, StoreError, StoreResult, UifStore};

/// What a chunk fetch counts for in `heavy_fetch_bytes_per_sec` (the
/// average chunk; its length is known only once it is read).
pub const FETCH_COUNTED: u64 = 64 << 10;

/// Shared daemon state.
pub struct Host {
    /// Configuration.
    config: Config,
    /// Temp directory for durable writes outside the store.
    tmp: PathBuf,
    /// The UIF store.
    store: Arc<dyn UifStore>,
    /// VMs and assignments.
    registry: Registry,
    /// Writer leases.
    leases: Leases,
    /// VM switch hand-overs.
    handovers: Handovers,
    /// Open sessions.
    sessions: Sessions,
    /// Live agent connections.
    conns: Conns,
    /// Event log.
    events: Events,
    /// Counters.
    metrics: Arc<Metrics>,
    /// Staged bytes of open uploads: budgets and reclaim.
    staging: Arc<Staging>,
    /// Cancelled when the daemon begins shutting down.
    shutdown: CancellationToken,
    /// Held shared by each connection from accept until it is installed;
    /// shutdown takes it exclusively so no half-set-up connection misses
    /// its `Goodbye`.
    setup: Arc<tokio::sync::RwLock<()>>,
    /// Bounds connections in the handshake, per VM and in all.
    handshakes: HandshakeGate,
    /// Bounds updates from VMs without the user's current lease.
    conflict_rate: ConflictRate,
    /// What the users' own uploads in flight add to what they hold.
    quota_charges: QuotaCharges,
    /// How fast VMs fetching chunks heavily go while others work.
    fetches: Mutex<HeavyShare>,
    /// Bounds `UnexpectedDisconnect` notices per VM and minute.
    notice_rate: PerVmRate,
    /// Control requests per VM and second.
    request_rate: crate::budgets::request_rate::RequestRate,
    /// Bounds new sessions per VM and minute.
    session_rate: PerVmRate,
    /// Rate-limits the `budget_exceeded` events.
    reports: Reports,
    commits: AtomicUsize,
    commits_idle: Notify,
    bulk: BulkPool,
    /// A scrub is running (cleared by the blocking task that runs it).
    scrubbing: Arc<AtomicBool>,
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
    /// Assembles the shared state, with an event log in memory only (see
    /// [`with_events`](Self::with_events)).
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
        let sessions = Sessions::new(config.max_sessions_per_vm, config.notice_ids_per_vm);
        let notice_rate = PerVmRate::new(config.notices_per_minute);
        let session_rate = PerVmRate::new(config.session_starts_per_minute);
        let request_rate =
            crate::budgets::request_rate::RequestRate::new(config.max_control_requests_per_sec);
        let reports = Reports::new(Duration::from_secs(config.budget_event_interval_secs));
        let bulk = BulkPool::start(bulk_threads, config.bulk_queue_per_vm);
        let fetches = Mutex::new(HeavyShare::new(
            config.heavy_fetch_bytes_per_sec,
            crate::budgets::heavy::HEAVY_FETCHED,
        ));
        Host {
            config,
            tmp,
            store,
            registry,
            leases,
            handovers: Handovers::default(),
            sessions,
            conns: Conns::default(),
            events,
            metrics,
            staging,
            shutdown: CancellationToken::new(),
            setup: Arc::new(tokio::sync::RwLock::new(())),
            handshakes,
            conflict_rate,
            quota_charges: QuotaCharges::new(),
            notice_rate,
            fetches,
            request_rate,
            session_rate,
            reports,
            commits: AtomicUsize::new(0),
            commits_idle: Notify::new(),
            bulk,
            scrubbing: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The same host with `events` as its event log (the daemon's, with
    /// its durable journal: [`Events::open`]).
    #[must_use]
    pub fn with_events(mut self, events: Events) -> Self {
        self.events = events;
        self
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The directory for durable writes outside the store (spooled API
    /// bodies, registry and lease files' temps).
    pub fn tmp(&self) -> &std::path::Path {
        &self.tmp
    }

    /// The UIF store (blocking: call it through [`Self::store_call`]).
    pub fn store(&self) -> &Arc<dyn UifStore> {
        &self.store
    }

    /// VMs and assignments.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Writer leases.
    pub fn leases(&self) -> &Leases {
        &self.leases
    }

    /// VM switch hand-overs.
    pub fn handovers(&self) -> &Handovers {
        &self.handovers
    }

    /// Sessions the agents reported.
    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// Live agent connections.
    pub fn conns(&self) -> &Conns {
        &self.conns
    }

    /// The event log (reading and following it).
    pub fn events(&self) -> &Events {
        &self.events
    }

    /// Records an operator event.
    pub fn emit(&self, event: crate::state::events::Event) {
        self.events.emit(event);
    }

    /// Counts a refusal or cut-off of `vm` by `budget` in its metric and,
    /// at most once per `budget_event_interval_secs` for this VM and
    /// budget, reports it as a `budget_exceeded` event (and a warning).
    pub fn refused(&self, budget: Budget, vm: &str, user: Option<&str>, limit: u64) {
        add(budget.metric(&self.metrics), 1);
        if self.reports.due(vm, budget) {
            tracing::warn!(
                vm,
                user,
                budget = budget.name(),
                limit,
                "VM reached a budget"
            );
            self.emit(crate::state::events::Event::BudgetExceeded {
                vm: vm.to_string(),
                user: user.map(str::to_string),
                budget: budget.name().to_string(),
                limit,
            });
        }
    }

    /// Bounds `UnexpectedDisconnect` notices per VM and minute.
    pub fn notice_rate(&self) -> &PerVmRate {
        &self.notice_rate
    }

    /// Bounds control requests per VM and second (over all of the VM's
    /// connections).
    pub fn request_rate(&self) -> &crate::budgets::request_rate::RequestRate {
        &self.request_rate
    }

    /// Bounds new sessions per VM and minute.
    pub fn session_rate(&self) -> &PerVmRate {
        &self.session_rate
    }

    fn fetches(&self) -> std::sync::MutexGuard<'_, HeavyShare> {
        self.fetches.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records that `vm` is about to fetch a chunk; the wait before it is
    /// read, if `vm` fetches heavily while a light VM works (see
    /// [`crate::budgets::heavy`]). A chunk counts as [`FETCH_COUNTED`]
    /// bytes: its length is known only once it is read.
    pub fn fetch_wait(&self, vm: &str) -> Option<Duration> {
        self.fetches().take(vm, FETCH_COUNTED, Instant::now())
    }

    /// Drops what the rate budgets keep of `vm` (it was removed).
    pub fn forget_rates(&self, vm: &str) {
        self.request_rate.forget(vm);
        self.notice_rate.forget(vm);
        self.session_rate.forget(vm);
    }

    /// The counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Staged bytes of open uploads: budgets and reclaim.
    pub fn staging(&self) -> &Arc<Staging> {
        &self.staging
    }

    /// Cancelled when the daemon begins shutting down.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Held shared by each connection from accept until it is installed;
    /// shutdown takes it exclusively so no half-set-up connection misses
    /// its `Goodbye`.
    pub fn setup(&self) -> &Arc<tokio::sync::RwLock<()>> {
        &self.setup
    }

    /// Bounds connections in the handshake, per VM and in all.
    pub fn handshakes(&self) -> &HandshakeGate {
        &self.handshakes
    }

    /// Bounds updates from VMs without the user's current lease.
    pub fn conflict_rate(&self) -> &ConflictRate {
        &self.conflict_rate
    }

    /// What the users' own uploads in flight add to what they hold.
    pub fn quota_charges(&self) -> &QuotaCharges {
        &self.quota_charges
    }

    /// Runs a bulk store operation (reading or writing one chunk) for `vm`
    /// on the bulk pool ([`crate::budgets::bulk`]: lower CPU priority, VMs served
    /// round-robin). Skipped if this future is dropped before a thread
    /// takes it (its connection closed). Falls back to a blocking thread
    /// if the pool has none; a VM with a full bulk queue gets
    /// [`StoreError::Busy`] (answered `Busy`: the agent retries), counted
    /// in `uve_bulk_queue_refused_total` and reported (`bulk_queue_per_vm`).
    pub async fn store_call_bulk<T, F>(&self, vm: &str, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn UifStore) -> StoreResult<T> + Send + 'static,
    {
        let now = Instant::now();
        let (staging, fetching) = (self.staging.is_heavy(vm), self.fetches().is_heavy(vm, now));
        self.staging.active(vm, fetching);
        self.fetches().active(vm, now, staging);
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
                let cap = self.bulk.per_vm();
                self.refused(Budget::BulkQueuePerVm, vm, None, cap as u64);
                return Err(StoreError::Busy(format!(
                    "VM {vm} has {cap} bulk jobs queued"
                )));
            }
        }
        rx.await.map_err(|_| {
            StoreError::io(
                "bulk store task",
                std::io::Error::other("bulk task ended without an answer"),
            )
        })?
    }

    /// Scrubs the store (`UifStore::scrub`) at `mib_per_sec` (default
    /// `scrub_mib_per_sec`), one scrub at a time (a second one is
    /// [`StoreError::Busy`]); stops early at shutdown. Emits `scrub` and
    /// counts `uve_chunks_scrubbed_total` / `uve_chunks_corrupt_total`.
    pub async fn scrub(&self, mib_per_sec: Option<u64>) -> StoreResult<ScrubReport> {
        if self.scrubbing.swap(true, Ordering::AcqRel) {
            return Err(StoreError::Busy("a scrub is running".into()));
        }
        let rate = mib_per_sec
            .unwrap_or(self.config.scrub_mib_per_sec)
            .saturating_mul(1 << 20);
        let (stop, running) = (self.shutdown.clone(), self.scrubbing.clone());
        // The flag is cleared where the scrub ends, on its blocking
        // thread: an API client that hangs up drops this future, not the
        // scrub, and must neither leave the flag set nor let a second
        // scrub start beside the first.
        let report = self
            .store_call(move |s| {
                let report = s.scrub(rate, &|| stop.is_cancelled());
                running.store(false, Ordering::Release);
                report
            })
            .await?;
        self.metrics
            .chunks_scrubbed
            .fetch_add(report.scanned, Ordering::Relaxed);
        self.metrics
            .chunks_corrupt
            .fetch_add(report.corrupt, Ordering::Relaxed);
        if report.corrupt > 0 {
            tracing::error!(
                corrupt = report.corrupt,
                damaged = report.damaged.len() as u64 + report.damaged_more,
                "scrub found corrupt chunks"
            );
        }
        self.emit(Event::Scrub(report.clone()));
        Ok(report)
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
        StoreError::MissingChunk(_)
        | StoreError::HeadVersion { .. }
        | StoreError::Unsupported(_) => ErrorCode::BadRequest,
        StoreError::BadChunk(_) => ErrorCode::BadChunk,
        StoreError::BadManifest(uve_protocol::manifest::ManifestError::Digest) => {
            ErrorCode::BadDigest
        }
        StoreError::BadManifest(_) => ErrorCode::BadRequest,
        StoreError::QuotaExceeded { .. } => ErrorCode::QuotaExceeded,
        StoreError::Contended { .. } | StoreError::Busy(_) => ErrorCode::Busy,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A full bulk queue is a transient refusal the agent retries, not a
    /// failure of the host.
    #[test]
    fn a_full_bulk_queue_is_answered_busy_not_internal() {
        let e = StoreError::Busy(format!("VM vm-a has {} bulk jobs queued", 512));
        let w = wire_store_error(&e);
        assert_eq!(w.code, ErrorCode::Busy);
        assert!(w.code.is_transient(), "the agent retries Busy");
        assert!(w.message.contains("512 bulk jobs"), "{}", w.message);
    }
}
