//! UIF update (logout, VM switch, checkpoint): `UpdateBegin` checks
//! everything announced (names, rights, sizes) before allocating; pages
//! arrive in order, are counted against the user's quota (`quota_check`)
//! and answered with the chunks the store lacks;
//! uploaded chunks are checked against hash and announced length; commit
//! checks the manifest digest, then compare-and-swaps under the user's
//! lease gate. A stale base or lease keeps the upload as a conflict version.
//!
//! Protocol 2 adds block deltas (`BlockSignatures`, `ChunkDelta`), handled
//! in the submodule `block_delta` on the same upload state.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{OwnedRwLockReadGuard, RwLock};
use uve_protocol::defs::MAX_CHUNK;
use uve_protocol::delta::BaseIndex;
use uve_protocol::manifest::{ChunkRef, Hash};
use uve_protocol::message::{ErrorCode, Response, UpdateBegin, WireError};

mod block_delta;
mod commit;
mod pages;
mod quota_check;

pub use block_delta::{chunk_delta, signatures};
pub use commit::commit;
use pages::base_index;
pub use pages::page;

use super::{Handled, VmConnection};
use crate::budgets::conflict_rate::Admit;
use crate::budgets::report::Budget;
use crate::budgets::staging::{Stage, StagingBudget, StagingRefused};
use crate::host::wire_store_error;
use crate::state::events::Event;
use crate::state::metrics;
use crate::store::{ChunkPins, StageId, StoreResult, now_ms};

/// An upload in progress on one connection.
pub struct Upload {
    begin: UpdateBegin,
    /// Where its chunks are staged until the commit publishes them;
    /// reclaimed when the last reference to it goes without one.
    stage: Arc<Stage>,
    /// When a request last named this upload (Unix ms).
    touched: AtomicU64,
    /// Chunk uploads hold it shared, commit exclusively: a commit pipelined
    /// right behind the last chunk waits for that chunk to be stored.
    gate: Arc<RwLock<()>>,
    state: Mutex<UploadState>,
}

impl Drop for Upload {
    fn drop(&mut self) {
        // Its pins, listing and base index can be large (1M chunks): they
        // go on the reclaimer thread, not on an async worker.
        let st = std::mem::take(self.state.get_mut().unwrap_or_else(PoisonError::into_inner));
        if !st.pins.is_empty() || !st.listed.is_empty() {
            self.stage.drop_later(Box::new(st));
        }
    }
}

#[derive(Default)]
struct UploadState {
    chunks: Vec<ChunkRef>,
    /// Offset of each listed chunk in the new version (for pairing).
    starts: Vec<u64>,
    /// Offset just past the last listed chunk.
    end: u64,
    next_page: u32,
    /// Every hash listed so far (what uploads may carry).
    listed: HashMap<Hash, Listed>,
    /// Chunk indices whose signatures were asked (once per chunk, so the
    /// host reads base bytes at most once per missing chunk).
    signed: HashSet<u32>,
    /// Deltas whose rebuilt chunk did not match its hash.
    bad_deltas: u32,
    /// Chunks given base signatures that then came whole, and that came
    /// as deltas (see `block_delta::deltas_pay`).
    signed_whole: u32,
    deltas: u32,
    uploaded: u64,
    pins: Vec<ChunkPins>,
    /// Chunks of the base version (loaded with the first page): present
    /// without asking the store, and the only possible delta bases. Should
    /// the base be pruned before the commit, the store's commit checks them
    /// like any other chunk.
    base: Option<Arc<BaseIndex>>,
    /// The quota count (taken with the first page).
    quota: Option<quota_check::QuotaCheck>,
}

/// A hash listed in an upload's pages.
#[derive(Clone, Copy)]
struct Listed {
    /// Its length.
    len: u32,
    /// Reported missing and not stored by this upload yet: only such a
    /// chunk may be asked about or sent as a delta.
    awaited: bool,
    /// Its base bytes' signatures were offered.
    signed: bool,
}

fn bad(code: ErrorCode, msg: impl std::fmt::Display) -> WireError {
    WireError::new(code, msg)
}

fn get(conn: &VmConnection, upload: u64) -> Result<Arc<Upload>, WireError> {
    let up = conn.state().uploads.get(&upload).cloned().ok_or_else(|| {
        bad(
            ErrorCode::NotFound,
            format!("no upload {upload} (ended, aborted or expired)"),
        )
    })?;
    up.touched.store(now_ms(), Ordering::Relaxed);
    Ok(up)
}

/// Drops the uploads of `conn` no request has named for `idle` and none is
/// working on (a handler holds a reference while it runs), releasing their
/// slots and pins. Returns how many expired.
pub fn expire_idle(conn: &VmConnection, idle: std::time::Duration) -> usize {
    let limit = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
    let now = now_ms();
    let expired: Vec<Arc<Upload>> = {
        let mut st = conn.state();
        let ids: Vec<u64> = st
            .uploads
            .iter()
            .filter(|(_, up)| {
                Arc::strong_count(up) == 1
                    && now.saturating_sub(up.touched.load(Ordering::Relaxed)) > limit
            })
            .map(|(id, _)| *id)
            .collect();
        ids.iter().filter_map(|id| st.uploads.remove(id)).collect()
    };
    for up in &expired {
        tracing::warn!(
            vm = conn.vm(),
            user = %up.begin.user,
            session = %up.begin.session,
            "upload expired: idle for {idle:?}"
        );
    }
    // Pins are released here, outside the connection's lock.
    let n = expired.len();
    drop(expired);
    n
}

/// Records an update refused for good: an `update_refused` event naming
/// the VM, user, session, reason and size, so an operator learns of it at
/// once (the agent keeps the bytes as a preserved copy; see the agent's
/// README). Transient refusals (busy, shutting down) are retried by the
/// agent and recorded nowhere.
fn refused(conn: &VmConnection, b: &UpdateBegin, e: &WireError) {
    if e.code.is_transient() {
        return;
    }
    metrics::add(&conn.host().metrics().updates_refused, 1);
    conn.host().emit(Event::UpdateRefused {
        vm: conn.vm().to_string(),
        user: b.user.to_string(),
        session: b.session.to_string(),
        cause: b.cause,
        base: b.base,
        size: b.header.size,
        code: e.code,
        reason: e.message.clone(),
    });
}

/// `UpdateBegin`.
pub fn begin(conn: &VmConnection, b: UpdateBegin) -> Handled {
    // A malformed name is a hostile or broken peer, not a user's update.
    let asked = b.clone();
    open_upload(conn, b).inspect_err(|e| refused(conn, &asked, e))
}

fn open_upload(conn: &VmConnection, b: UpdateBegin) -> Handled {
    let host = conn.host();
    if host.shutdown().is_cancelled() {
        return Err(bad(ErrorCode::ShuttingDown, "host is shutting down"));
    }
    let assigned = host.registry().assignment(&b.user).as_deref() == Some(conn.vm());
    if !assigned && !host.leases().held_by(&b.user, conn.vm()) {
        return Err(bad(
            ErrorCode::NotAssigned,
            format!(
                "user {} is not assigned to VM {} and it holds no lease",
                b.user,
                conn.vm()
            ),
        ));
    }
    let (h, cfg) = (b.header, host.config());
    check_sizes(cfg, &h)?;
    check_conflict_rate(conn, &b)?;
    let mut st = conn.state();
    if st.uploads.len() >= cfg.max_uploads_per_vm {
        drop(st);
        let limit = cfg.max_uploads_per_vm as u64;
        host.refused(Budget::MaxUploadsPerVm, conn.vm(), Some(&b.user), limit);
        return Err(bad(
            ErrorCode::Busy,
            "too many uploads open on this connection",
        ));
    }
    st.next_upload += 1;
    let id = st.next_upload;
    st.uploads.insert(
        id,
        Arc::new(Upload {
            stage: Arc::new(host.staging().open(conn.vm(), &b.user, h.size)),
            begin: b,
            touched: AtomicU64::new(now_ms()),
            gate: Arc::new(RwLock::new(())),
            state: Mutex::new(UploadState::default()),
        }),
    );
    Ok(Response::UpdateAccepted { upload: id })
}

/// Checks the sizes an `UpdateBegin` announces against the limits before
/// anything is allocated: the UIF's size (largest accepted, what one VM or
/// user may stage), its chunk count, and that the two agree. The quota
/// counts unique bytes, which only the pages show (`quota_check`).
fn check_sizes(
    cfg: &crate::config::Config,
    h: &uve_protocol::manifest::ManifestHeader,
) -> Result<(), WireError> {
    use ErrorCode::TooLarge;
    let stage_limit = cfg.staging_limits().stage_limit();
    let (size, chunks) = (h.size, u64::from(h.chunk_count));
    let refused = if size > cfg.max_uif_size {
        let limit = cfg.max_uif_size;
        Some((
            TooLarge,
            format!("UIF of {size} bytes exceeds the limit of {limit}"),
        ))
    } else if size > stage_limit {
        let what = "what one VM or user may stage";
        Some((
            TooLarge,
            format!("UIF of {size} bytes exceeds {what} ({stage_limit})"),
        ))
    } else if chunks > u64::from(cfg.max_chunks) {
        let limit = cfg.max_chunks;
        Some((
            TooLarge,
            format!("{chunks} chunks exceed the limit of {limit}"),
        ))
    } else {
        None
    };
    if let Some((code, msg)) = refused {
        return Err(bad(code, msg));
    }
    if chunks > size || size > chunks * u64::from(MAX_CHUNK) {
        return Err(bad(
            ErrorCode::BadRequest,
            format!("{} bytes cannot be {} chunks", h.size, h.chunk_count),
        ));
    }
    Ok(())
}

/// An update from a VM without the user's current lease can only become a
/// conflict version: at most `conflict_updates_per_hour` of them per user
/// and VM, else `Busy` (the agent retries later) and, once per run of
/// refusals, a `budget_exceeded` event.
fn check_conflict_rate(conn: &VmConnection, b: &UpdateBegin) -> Result<(), WireError> {
    let host = conn.host();
    if host.leases().is_current(&b.user, b.lease, conn.vm()) {
        return Ok(());
    }
    let Admit::No { first } = host.conflict_rate().admit(&b.user, conn.vm()) else {
        return Ok(());
    };
    metrics::add(&host.metrics().conflict_updates_refused, 1);
    let limit = host.config().conflict_updates_per_hour;
    if first {
        tracing::warn!(
            vm = conn.vm(),
            user = %b.user,
            "updates without the current lease refused: over {limit} per hour"
        );
        host.emit(Event::BudgetExceeded {
            vm: conn.vm().to_string(),
            user: Some(b.user.to_string()),
            budget: "conflict_updates_per_hour".to_string(),
            limit: u64::from(limit),
        });
    }
    Err(bad(
        ErrorCode::Busy,
        format!(
            "VM {} does not hold the lease of {}: its updates become conflict versions, at most {limit} per hour",
            conn.vm(),
            b.user
        ),
    ))
}

/// Takes the shared side of an upload's gate (in the dispatcher, before the
/// chunk's handler is spawned, so a later commit waits for it).
pub async fn chunk_guard(conn: &VmConnection, upload: u64) -> Option<OwnedRwLockReadGuard<()>> {
    let up = get(conn, upload).ok()?;
    Some(up.gate.clone().read_owned().await)
}

/// `ChunkUpload`.
pub async fn chunk(conn: &VmConnection, upload: u64, hash: Hash, data: Vec<u8>) -> Handled {
    let up = get(conn, upload)?;
    let listed = up
        .state
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .listed
        .get(&hash)
        .copied();
    match listed.map(|l| l.len) {
        None => {
            return Err(bad(
                ErrorCode::BadRequest,
                format!("chunk {hash} was not listed"),
            ));
        }
        Some(len) if len as usize != data.len() => {
            return Err(bad(
                ErrorCode::BadChunk,
                format!("chunk {hash} is {} bytes, listed as {len}", data.len()),
            ));
        }
        Some(_) => {}
    }
    // `stage_chunk` checks BLAKE3(data) == hash (BadChunk otherwise);
    // hashing here too would cost a second pass over every uploaded byte.
    let n = data.len() as u64;
    let staged: Result<(), std::convert::Infallible> =
        stage_chunk(conn, &up, hash, n, move |s, stage| {
            s.stage_chunk(stage, &hash, &data).map(Ok)
        })
        .await?;
    let Ok(()) = staged;
    mark_stored(&up, &hash, false);
    conn.host().metrics().chunk_uploaded(&up.begin.user, n);
    Ok(Response::Ok)
}

/// Stages one chunk of `len` bytes for `up` with `write` (on a bulk
/// thread), charged to the staging budgets first. A refusal by a budget is
/// `Busy` (the agent retries the update later) and an event naming the VM;
/// `write`'s inner error is passed through.
pub(super) async fn stage_chunk<E, F>(
    conn: &VmConnection,
    up: &Upload,
    hash: Hash,
    len: u64,
    write: F,
) -> Result<Result<(), E>, WireError>
where
    E: Send + 'static,
    F: FnOnce(&dyn crate::store::UifStore, &StageId) -> StoreResult<Result<u64, E>>
        + Send
        + 'static,
{
    let host = conn.host();
    if up.stage.holds(&hash) {
        return Ok(Ok(()));
    }
    if let Err(e) = up.stage.reserve(len) {
        return Err(staging_refused(conn, up, &e));
    }
    // The job owns a reference to the stage: it cannot be reclaimed while
    // the chunk is being written, even if this handler is cancelled.
    let stage = up.stage.clone();
    let stored = host
        .store_call_bulk(conn.vm(), move |s| {
            if let Err(e) = stage.check_free(s.free_bytes(), len) {
                stage.unreserve(len);
                return Ok(Err(Refusal::Budget(e)));
            }
            match write(s, stage.id()) {
                Ok(Ok(wrote)) => {
                    stage.staged(hash, len, wrote);
                    Ok(Ok(()))
                }
                Ok(Err(e)) => {
                    stage.unreserve(len);
                    Ok(Err(Refusal::Inner(e)))
                }
                Err(e) => {
                    stage.unreserve(len);
                    Err(e)
                }
            }
        })
        .await
        .map_err(|e| wire_store_error(&e))?;
    match stored {
        Ok(()) => Ok(Ok(())),
        Err(Refusal::Budget(e)) => Err(staging_refused(conn, up, &e)),
        Err(Refusal::Inner(e)) => Ok(Err(e)),
    }
}

enum Refusal<E> {
    Budget(StagingRefused),
    Inner(E),
}

/// `Busy` for a staging budget's refusal (`BadRequest` for an upload that
/// sends more than it announced), with a `budget_exceeded` event the first
/// time for this upload (the metric counts every refusal).
fn staging_refused(conn: &VmConnection, up: &Upload, e: &StagingRefused) -> WireError {
    if up.stage.first_refusal() {
        tracing::warn!(vm = conn.vm(), user = %up.begin.user, "chunk refused: {e}");
        conn.host().emit(Event::BudgetExceeded {
            vm: conn.vm().to_string(),
            user: Some(up.begin.user.to_string()),
            budget: e.budget.name().to_string(),
            limit: e.limit,
        });
    }
    let code = match e.budget {
        StagingBudget::Upload => ErrorCode::BadRequest,
        _ => ErrorCode::Busy,
    };
    bad(code, e)
}

/// Counts a chunk stored by this upload (`delta`: rebuilt from a block
/// delta); it is no longer awaited.
fn mark_stored(up: &Upload, hash: &Hash, delta: bool) {
    let mut st = up.state.lock().unwrap_or_else(PoisonError::into_inner);
    st.uploaded += 1;
    let signed = st.listed.get_mut(hash).is_some_and(|l| {
        l.awaited = false;
        l.signed
    });
    if delta {
        st.deltas += 1;
    } else if signed {
        st.signed_whole += 1;
    }
}

/// `UpdateAbort`.
pub fn abort(conn: &VmConnection, upload: u64) -> Handled {
    conn.state()
        .uploads
        .remove(&upload)
        .map(|_| Response::Ok)
        .ok_or_else(|| bad(ErrorCode::NotFound, format!("no upload {upload}")))
}
