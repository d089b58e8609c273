//! Staged bytes: chunks uploads have stored and not yet committed.
//! [`Staging`] owns their budgets (per upload its announced size, per VM,
//! per user, in all, and a free-space floor on the store's filesystem),
//! the `uve_staged_bytes` gauge, and the reclaimer thread. Each upload
//! holds a [`Stage`]: its commit publishes it; an upload that ends any
//! other way (abort, idle expiry, closed or replaced connection, a failed
//! commit) drops it, and the reclaimer deletes its chunks within moments
//! and gives the bytes back to the budgets.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};

use uve_protocol::manifest::Hash;

use crate::state::metrics::{self, Metrics};
use crate::store::{StageId, UifStore};

/// The staged-byte budgets (see `host/API.md`, *Budgets*).
#[derive(Debug, Clone, Copy)]
pub struct StagingLimits {
    /// Bytes one VM's uploads may have staged.
    pub per_vm: u64,
    /// Bytes one user's uploads may have staged.
    pub per_user: u64,
    /// Bytes all uploads may have staged.
    pub total: u64,
    /// Free bytes the store's filesystem keeps beyond what is staged.
    pub min_free: u64,
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
        }
    }
}

/// A chunk refused by a staging budget.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("staging {len} more bytes would exceed {} ({limit} bytes)", .budget.name())]
pub struct StagingRefused {
    /// The budget.
    pub budget: StagingBudget,
    /// Its limit, bytes.
    pub limit: u64,
    /// The chunk's length.
    pub len: u64,
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
    counts: Mutex<Counts>,
    metrics: Arc<Metrics>,
    reclaim: Mutex<Option<mpsc::Sender<Job>>>,
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
            counts: Mutex::new(Counts::default()),
            metrics,
            reclaim: Mutex::new(Some(tx)),
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

    /// The free-space floor: `Err` if staging `len` more bytes would leave
    /// the store's filesystem (as `free` reports it) below it.
    pub fn check_free(&self, free: Option<u64>, len: u64) -> Result<(), StagingRefused> {
        match free {
            Some(free) if free < self.limits.min_free.saturating_add(len) => Err(StagingRefused {
                budget: StagingBudget::FreeSpace,
                limit: self.limits.min_free,
                len,
            }),
            _ => Ok(()),
        }
    }

    fn charge(&self, vm: &str, user: &str, len: u64) -> Result<(), StagingRefused> {
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let l = self.limits;
        let over = [
            (StagingBudget::Total, c.total, l.total),
            (
                StagingBudget::PerVm,
                c.per_vm.get(vm).copied().unwrap_or(0),
                l.per_vm,
            ),
            (
                StagingBudget::PerUser,
                c.per_user.get(user).copied().unwrap_or(0),
                l.per_user,
            ),
        ]
        .into_iter()
        .find(|(_, used, limit)| used.saturating_add(len) > *limit);
        if let Some((budget, _, limit)) = over {
            metrics::add(&self.metrics.staging_refused, 1);
            return Err(StagingRefused { budget, limit, len });
        }
        c.add(vm, user, len);
        self.metrics
            .staged_bytes
            .store(c.total, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn release(&self, vm: &str, user: &str, n: u64) {
        if n == 0 {
            return;
        }
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        c.sub(vm, user, n);
        self.metrics
            .staged_bytes
            .store(c.total, std::sync::atomic::Ordering::Relaxed);
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

    /// Charges `len` bytes for a chunk about to be staged, or refuses it.
    /// Follow with [`staged`](Self::staged) or [`unreserve`](Self::unreserve).
    pub fn reserve(&self, len: u64) -> Result<(), StagingRefused> {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if st.bytes + st.reserved + len > self.announced {
            metrics::add(&self.staging.metrics.staging_refused, 1);
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
