//! Staged bytes: chunks uploads have stored and not yet committed.
//! [`Staging`] owns their budgets (per upload its announced size, per VM,
//! per user, in all, and a free-space floor on the filesystem where
//! uploads stage, which refuses a VM over its share first; see [`room`]),
//! their metrics, and the reclaimer thread. Each upload
//! holds a [`Stage`]: its commit publishes it; an upload that ends any
//! other way (abort, idle expiry, closed or replaced connection, a failed
//! commit) drops it, and the reclaimer deletes its chunks within moments
//! and gives the bytes back to the budgets.

pub mod room;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use uve_protocol::manifest::Hash;

use super::heavy::HeavyShare;
use crate::state::metrics::{self, Metrics};
use crate::store::{StageId, UifStore};
use room::{Cap, Room};

/// The staged-byte budgets (see `host/API.md`, *Budgets*).
#[derive(Debug, Clone, Copy)]
pub struct StagingLimits {
    /// Bytes one VM's uploads may have staged.
    pub per_vm: Cap,
    /// Bytes one user's uploads may have staged.
    pub per_user: Cap,
    /// Bytes all uploads may have staged.
    pub total: u64,
    /// Free bytes the staging filesystem keeps beyond what is staged.
    pub min_free: u64,
    /// The staging room (free space beyond `min_free`, plus what is
    /// staged) is divided into this many shares.
    pub shares: u64,
    /// Bytes a second the heavy VMs share while a light one works (see
    /// [`super::heavy`]; 0: no limit).
    pub heavy_per_sec: u64,
    /// Test-only: the staging filesystem is taken to be this large and to
    /// hold nothing but staged chunks, instead of asking it.
    pub simulated_free: Option<u64>,
}

impl StagingLimits {
    /// The most one upload can ever stage, whatever the free space: an
    /// announced size above it is refused at `UpdateBegin` (`TooLarge`).
    pub fn stage_limit(&self) -> u64 {
        self.per_vm.floor().min(self.per_user.floor())
    }
}

/// Which budget refused a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StagingBudget {
    /// The upload would stage more than it announced.
    Upload,
    /// `max_staged_bytes_per_vm`.
    PerVm,
    /// `max_staged_bytes_per_user`.
    PerUser,
    /// `max_staged_bytes`.
    Total,
    /// `store_min_free_bytes`.
    FreeSpace,
    /// `staging_shares`: the VM is over its share while free space is low.
    Share,
}

impl StagingBudget {
    /// The budget's name, as in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            StagingBudget::Upload => "announced_size",
            StagingBudget::PerVm => "max_staged_bytes_per_vm",
            StagingBudget::PerUser => "max_staged_bytes_per_user",
            StagingBudget::Total => "max_staged_bytes",
            StagingBudget::FreeSpace => "store_min_free_bytes",
            StagingBudget::Share => "staging_shares",
        }
    }

    /// The counter of its refusals.
    fn counter(self, m: &Metrics) -> Option<&AtomicU64> {
        match self {
            StagingBudget::Upload => None,
            StagingBudget::PerVm => Some(&m.staged_per_vm_refused),
            StagingBudget::PerUser => Some(&m.staged_per_user_refused),
            StagingBudget::Total => Some(&m.staged_all_refused),
            StagingBudget::FreeSpace => Some(&m.staging_free_space_refused),
            StagingBudget::Share => Some(&m.staging_share_refused),
        }
    }
}

/// A chunk refused by a staging budget.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("{}", self.describe())]
pub struct StagingRefused {
    /// The budget.
    pub budget: StagingBudget,
    /// Its limit, bytes.
    pub limit: u64,
    /// The chunk's length.
    pub len: u64,
}

impl StagingRefused {
    fn describe(&self) -> String {
        let (len, limit, name) = (self.len, self.limit, self.budget.name());
        match self.budget {
            StagingBudget::Share => format!(
                "staging {len} more bytes refused: the VM is over its share of the staging room ({limit} bytes, {name}) and free space is low"
            ),
            _ => format!("staging {len} more bytes would exceed {name} ({limit} bytes)"),
        }
    }
}

#[derive(Default)]
struct Counts {
    total: u64,
    per_vm: HashMap<String, u64>,
    per_user: HashMap<String, u64>,
}

impl Counts {
    fn add(&mut self, vm: &str, user: &str, n: u64) {
        self.total += n;
        *self.per_vm.entry(vm.to_string()).or_default() += n;
        *self.per_user.entry(user.to_string()).or_default() += n;
    }

    fn sub(&mut self, vm: &str, user: &str, n: u64) {
        self.total = self.total.saturating_sub(n);
        for (map, key) in [(&mut self.per_vm, vm), (&mut self.per_user, user)] {
            if let Some(v) = map.get_mut(key) {
                *v = v.saturating_sub(n);
                if *v == 0 {
                    map.remove(key);
                }
            }
        }
    }
}

/// Work for the reclaimer thread.
enum Job {
    /// Delete a stage.
    Reclaim(Reclaim),
    /// Drop what an ended upload held (its pins, listing and base index):
    /// a 1M-chunk upload's pins are released under the pin table's lock,
    /// which must not stall an async worker.
    Drop(Box<dyn Send>),
}

/// A stage to delete: what an upload that ended without a commit staged.
struct Reclaim {
    id: StageId,
    vm: String,
    user: String,
    hashes: Vec<Hash>,
    bytes: u64,
}

/// The daemon's staged bytes and their reclaimer.
pub struct Staging {
    limits: StagingLimits,
    /// One share of the staging room as last measured (`u64::MAX`: not
    /// measured yet).
    share: AtomicU64,
    counts: Mutex<Counts>,
    metrics: Arc<Metrics>,
    reclaim: Mutex<Option<mpsc::Sender<Job>>>,
    /// How fast heavy VMs stage while light ones work.
    intake: Mutex<HeavyShare>,
}

impl Staging {
    /// Starts the reclaimer thread for `store`.
    pub fn start(
        limits: StagingLimits,
        store: Arc<dyn UifStore>,
        metrics: Arc<Metrics>,
    ) -> Arc<Staging> {
        let (tx, rx) = mpsc::channel::<Job>();
        let staging = Arc::new(Staging {
            limits,
            share: AtomicU64::new(u64::MAX),
            counts: Mutex::new(Counts::default()),
            metrics,
            reclaim: Mutex::new(Some(tx)),
            intake: Mutex::new(HeavyShare::new(
                limits.heavy_per_sec,
                super::heavy::HEAVY_STAGED,
            )),
        });
        let weak = Arc::downgrade(&staging);
        let spawned = std::thread::Builder::new()
            .name("uve-reclaim".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    let r = match job {
                        Job::Reclaim(r) => r,
                        Job::Drop(garbage) => {
                            drop(garbage);
                            continue;
                        }
                    };
                    if let Err(e) = store.discard(&r.id, &r.hashes) {
                        tracing::error!(stage = r.id.as_str(), vm = r.vm, error = %e, "an abandoned upload's chunks were not deleted");
                    }
                    if let Some(s) = weak.upgrade() {
                        s.release(&r.vm, &r.user, r.bytes);
                        metrics::add(&s.metrics.staged_reclaimed_bytes, r.bytes);
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "no reclaimer thread: stages of abandoned uploads stay until a restart");
            *staging
                .reclaim
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = None;
        }
        staging
    }

    fn intake(&self) -> std::sync::MutexGuard<'_, HeavyShare> {
        self.intake.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records that `vm` has bulk work now (see [`super::heavy`]).
    pub fn active(&self, vm: &str, heavy_elsewhere: bool) {
        self.intake().active(vm, Instant::now(), heavy_elsewhere);
    }

    /// Whether `vm` stages heavily now (see [`super::heavy`]).
    pub fn is_heavy(&self, vm: &str) -> bool {
        self.intake().is_heavy(vm, Instant::now())
    }

    /// Records that `vm` is about to stage `bytes`; the wait before its
    /// chunk is read, if it stages heavily while a light VM works (see
    /// [`super::heavy`]).
    pub fn intake_wait(&self, vm: &str, bytes: u64) -> Option<std::time::Duration> {
        self.intake().take(vm, bytes, Instant::now())
    }

    /// Drops `garbage` on the reclaimer thread (here if there is none).
    pub fn drop_later(&self, garbage: Box<dyn Send>) {
        let tx = self
            .reclaim
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(tx) = tx {
            // On failure the value comes back and drops here.
            let _ = tx.send(Job::Drop(garbage));
        }
    }

    /// Bytes staged now, in all.
    pub fn staged_bytes(&self) -> u64 {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }

    /// A new, empty stage for an upload of `user` by `vm` announcing
    /// `announced` bytes.
    pub fn open(self: &Arc<Self>, vm: &str, user: &str, announced: u64) -> Stage {
        Stage {
            id: StageId::fresh(),
            vm: vm.to_string(),
            user: user.to_string(),
            announced,
            staging: self.clone(),
            state: Mutex::new(StageState::default()),
        }
    }

    /// One share of the staging room as last measured.
    fn share(&self) -> Option<u64> {
        match self.share.load(Ordering::Relaxed) {
            u64::MAX => None,
            s => Some(s),
        }
    }

    /// The free-space floor for a chunk of `len` bytes `vm` has reserved
    /// (see [`Room::check`]), with the staging filesystem's free bytes as
    /// `free` reports them (`None`: unknown, no floor). Records the share
    /// and the free space it saw.
    fn check_free(&self, vm: &str, free: Option<u64>, len: u64) -> Result<(), StagingRefused> {
        let l = self.limits;
        let (staged, vm_staged) = {
            let c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
            (c.total, c.per_vm.get(vm).copied().unwrap_or(0))
        };
        let room = match (l.simulated_free, free) {
            (Some(size), _) => Room::simulated(size, staged, l.min_free, l.shares),
            (None, Some(free)) => Room::measured(free, len, staged, l.min_free, l.shares),
            (None, None) => return Ok(()),
        };
        self.share.store(room.share, Ordering::Relaxed);
        let m = &self.metrics;
        m.staging_share_bytes.store(room.share, Ordering::Relaxed);
        m.staging_free_bytes
            .store(room.after.saturating_add(len), Ordering::Relaxed);
        room.check(vm_staged, len, l.min_free)
            .inspect_err(|e| self.count_refusal(e.budget))
    }

    fn count_refusal(&self, budget: StagingBudget) {
        metrics::add(&self.metrics.staging_refused, 1);
        if let Some(c) = budget.counter(&self.metrics) {
            metrics::add(c, 1);
        }
    }

    fn charge(&self, vm: &str, user: &str, len: u64) -> Result<(), StagingRefused> {
        let (l, share) = (self.limits, self.share());
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let over = [
            (StagingBudget::Total, c.total, l.total),
            (
                StagingBudget::PerVm,
                c.per_vm.get(vm).copied().unwrap_or(0),
                l.per_vm.limit(share),
            ),
            (
                StagingBudget::PerUser,
                c.per_user.get(user).copied().unwrap_or(0),
                l.per_user.limit(share),
            ),
        ]
        .into_iter()
        .find(|(_, used, limit)| used.saturating_add(len) > *limit);
        if let Some((budget, _, limit)) = over {
            drop(c);
            self.count_refusal(budget);
            return Err(StagingRefused { budget, limit, len });
        }
        c.add(vm, user, len);
        self.metrics.staged_bytes.store(c.total, Ordering::Relaxed);
        Ok(())
    }

    fn release(&self, vm: &str, user: &str, n: u64) {
        if n == 0 {
            return;
        }
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        c.sub(vm, user, n);
        self.metrics.staged_bytes.store(c.total, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct StageState {
    /// Chunks staged here (what publish moves and discard deletes).
    hashes: HashSet<Hash>,
    /// Their bytes, charged to the budgets.
    bytes: u64,
    /// Bytes charged for chunks being written now.
    reserved: u64,
    /// A refusal of this stage was reported already.
    refusal_reported: bool,
}

/// One upload's stage, charged to its VM and user; when dropped, what it
/// holds that no commit published is reclaimed.
pub struct Stage {
    id: StageId,
    vm: String,
    user: String,
    announced: u64,
    staging: Arc<Staging>,
    state: Mutex<StageState>,
}

impl Stage {
    /// Drops `garbage` on the reclaimer thread (see [`Staging::drop_later`]).
    pub fn drop_later(&self, garbage: Box<dyn Send>) {
        self.staging.drop_later(garbage);
    }

    /// True the first time it is called: a stage's budget refusals are
    /// reported (event, warning) once, not once per refused chunk, so a VM
    /// cannot flood the event ring by resending chunks.
    pub fn first_refusal(&self) -> bool {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        !std::mem::replace(&mut st.refusal_reported, true)
    }

    /// The stage's id in the store.
    pub fn id(&self) -> &StageId {
        &self.id
    }

    /// The free-space floor for a chunk of `len` bytes reserved here, with
    /// the staging filesystem's free bytes as the store reports them (on
    /// the thread that writes the chunk: the figure is a system call).
    /// On `Err`, follow with [`unreserve`](Self::unreserve).
    pub fn check_free(&self, free: Option<u64>, len: u64) -> Result<(), StagingRefused> {
        self.staging.check_free(&self.vm, free, len)
    }

    /// Charges `len` bytes for a chunk about to be staged, or refuses it.
    /// Follow with [`staged`](Self::staged) or [`unreserve`](Self::unreserve).
    pub fn reserve(&self, len: u64) -> Result<(), StagingRefused> {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if st.bytes + st.reserved + len > self.announced {
            self.staging.count_refusal(StagingBudget::Upload);
            return Err(StagingRefused {
                budget: StagingBudget::Upload,
                limit: self.announced,
                len,
            });
        }
        self.staging.charge(&self.vm, &self.user, len)?;
        st.reserved += len;
        Ok(())
    }

    /// Records a chunk reserved for with `len` whose staging wrote `wrote`
    /// bytes (0: it was stored already, nothing to reclaim).
    pub fn staged(&self, hash: Hash, len: u64, wrote: u64) {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.reserved = st.reserved.saturating_sub(len);
        let charged = if wrote > 0 && st.hashes.insert(hash) {
            st.bytes += wrote;
            wrote
        } else {
            0
        };
        drop(st);
        self.staging
            .release(&self.vm, &self.user, len.saturating_sub(charged));
    }

    /// Gives back a reservation whose chunk was not staged (refused, or the
    /// write failed).
    pub fn unreserve(&self, len: u64) {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.reserved = st.reserved.saturating_sub(len);
        drop(st);
        self.staging.release(&self.vm, &self.user, len);
    }

    /// True if `hash` is staged here already (a resent chunk: nothing to
    /// write again).
    pub fn holds(&self, hash: &Hash) -> bool {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .hashes
            .contains(hash)
    }

    /// The chunks staged here, for the commit to publish.
    pub fn hashes(&self) -> Vec<Hash> {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .hashes
            .iter()
            .copied()
            .collect()
    }

    /// Marks the stage published (its chunks are stored chunks now) and
    /// frees its bytes in the budgets.
    pub fn published(&self) {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.hashes.clear();
        let n = std::mem::take(&mut st.bytes);
        drop(st);
        self.staging.release(&self.vm, &self.user, n);
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        let st = std::mem::take(self.state.get_mut().unwrap_or_else(PoisonError::into_inner));
        // What was published is not here any more; a chunk staged after a
        // publish (the commit failed later and the upload went on) is.
        if st.hashes.is_empty() && st.reserved == 0 {
            return;
        }
        let r = Reclaim {
            id: self.id.clone(),
            vm: self.vm.clone(),
            user: self.user.clone(),
            hashes: st.hashes.into_iter().collect(),
            bytes: st.bytes + st.reserved,
        };
        let tx = self
            .staging
            .reclaim
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let unsent = match tx {
            Some(tx) => match tx.send(Job::Reclaim(r)) {
                Err(mpsc::SendError(Job::Reclaim(r))) => Some(r),
                _ => None,
            },
            None => Some(r),
        };
        if let Some(r) = unsent {
            // No reclaimer: the bytes stay charged until a restart deletes
            // the stage (never silently uncounted).
            tracing::error!(
                stage = r.id.as_str(),
                vm = r.vm,
                bytes = r.bytes,
                "stage not reclaimed"
            );
        }
    }
}
