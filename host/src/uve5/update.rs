//! UIF update (logout, VM switch, checkpoint): `UpdateBegin` checks
//! everything announced (names, rights, sizes, quota) before allocating;
//! pages arrive in order and are answered with the chunks the store lacks;
//! uploaded chunks are checked against hash and announced length; commit
//! checks the manifest digest, then compare-and-swaps under the user's
//! lease gate. A stale base or lease keeps the upload as a conflict version.
//!
//! Protocol 2 adds block deltas: `BlockSignatures` answers, for chunks the
//! host lacks, the digests of the file-aligned 4 KiB blocks of the bytes
//! the upload's base version holds at the same offset; `ChunkDelta`
//! rebuilds a chunk from those base bytes (only ever the upload's own base
//! version, at the chunk's own offset) and the blocks sent, and stores it
//! through the same checked put as a whole chunk.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{OwnedRwLockReadGuard, RwLock};
use uve_protocol::defs::{MAX_CHUNK, MAX_SIGNATURE_BATCH, PROTOCOL_BLOCK_DELTA};
use uve_protocol::delta::{self, BaseIndex, BasePart};
use uve_protocol::manifest::{ChunkRef, Hash, Manifest, ManifestError, chunks_per_page};
use uve_protocol::message::{BlockDigest, ChunkDelta, ErrorCode, Response, UpdateBegin, WireError};

use super::{Conn, Handled, check_name};
use crate::events::{Event, UpdateFields};
use crate::host::wire_store_error;
use crate::metrics;
use crate::store::{ChunkPins, CommitOutcome, StoreError, StoreResult, UifStore};

/// An upload in progress on one connection.
pub struct Upload {
    begin: UpdateBegin,
    /// Chunk uploads hold it shared, commit exclusively: a commit pipelined
    /// right behind the last chunk waits for that chunk to be stored.
    gate: Arc<RwLock<()>>,
    state: Mutex<UploadState>,
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
    /// Bit `i`: the signatures of chunk `i` were asked (once per chunk, so
    /// the host reads base bytes at most once per missing chunk).
    signed: Vec<u64>,
    /// Deltas whose rebuilt chunk did not match its hash.
    bad_deltas: u32,
    uploaded: u64,
    pins: Vec<ChunkPins>,
    /// Chunks of the base version (loaded with the first page): present
    /// without asking the store, and the only possible delta bases. Should
    /// the base be pruned before the commit, the store's commit checks them
    /// like any other chunk.
    base: Option<Arc<BaseIndex>>,
}

/// A hash listed in an upload's pages.
#[derive(Clone, Copy)]
struct Listed {
    /// Its length.
    len: u32,
    /// Reported missing and not stored by this upload yet: only such a
    /// chunk may be asked about or sent as a delta.
    awaited: bool,
}

/// Deltas per upload whose rebuilt chunk does not match its hash before
/// the host refuses further deltas of that upload (each costs a base bytes
/// read, for a few bytes from the agent; an honest agent sees none).
const MAX_BAD_DELTAS: u32 = 16;

/// Base reads one `BlockSignatures` request keeps queued on the bulk
/// threads at once.
const SIGNATURE_READS_IN_FLIGHT: usize = 4;

fn bad(code: ErrorCode, msg: impl std::fmt::Display) -> WireError {
    WireError::new(code, msg)
}

fn get(conn: &Conn, upload: u64) -> Result<Arc<Upload>, WireError> {
    conn.state()
        .uploads
        .get(&upload)
        .cloned()
        .ok_or_else(|| bad(ErrorCode::NotFound, format!("no upload {upload}")))
}

/// Records an update refused for good: an `update_refused` event naming
/// the VM, user, session, reason and size, so an operator learns of it at
/// once (the agent keeps the bytes as a preserved copy; see the agent's
/// README). Transient refusals (busy, shutting down) are retried by the
/// agent and recorded nowhere.
fn refused(conn: &Conn, b: &UpdateBegin, e: &WireError) {
    if e.code.is_transient() {
        return;
    }
    metrics::add(&conn.host.metrics.updates_refused, 1);
    conn.host.events.emit(Event::UpdateRefused {
        vm: conn.vm.clone(),
        user: b.user.clone(),
        session: b.session.clone(),
        cause: b.cause,
        base: b.base,
        size: b.header.size,
        code: e.code,
        reason: e.message.clone(),
    });
}

/// `UpdateBegin`.
pub fn begin(conn: &Conn, b: UpdateBegin) -> Handled {
    // A malformed name is a hostile or broken peer, not a user's update.
    check_name("user", &b.user)?;
    check_name("session", &b.session)?;
    let asked = b.clone();
    open_upload(conn, b).inspect_err(|e| refused(conn, &asked, e))
}

fn open_upload(conn: &Conn, b: UpdateBegin) -> Handled {
    let host = &conn.host;
    if host.shutdown.is_cancelled() {
        return Err(bad(ErrorCode::ShuttingDown, "host is shutting down"));
    }
    let assigned = host.registry.assignment(&b.user).as_deref() == Some(conn.vm.as_str());
    if !assigned && !host.leases.held_by(&b.user, &conn.vm) {
        return Err(bad(
            ErrorCode::NotAssigned,
            format!(
                "user {} is not assigned to VM {} and it holds no lease",
                b.user, conn.vm
            ),
        ));
    }
    let h = b.header;
    let cfg = &host.config;
    if h.size > cfg.max_uif_size {
        return Err(bad(
            ErrorCode::TooLarge,
            format!(
                "UIF of {} bytes exceeds the limit of {}",
                h.size, cfg.max_uif_size
            ),
        ));
    }
    let quota = host.store.policy().quota_bytes;
    if h.size > quota {
        return Err(bad(
            ErrorCode::QuotaExceeded,
            format!("UIF of {} bytes exceeds the quota of {quota}", h.size),
        ));
    }
    if h.chunk_count > cfg.max_chunks {
        return Err(bad(
            ErrorCode::TooLarge,
            format!(
                "{} chunks exceed the limit of {}",
                h.chunk_count, cfg.max_chunks
            ),
        ));
    }
    let count = u64::from(h.chunk_count);
    if count > h.size || h.size > count * u64::from(MAX_CHUNK) {
        return Err(bad(
            ErrorCode::BadRequest,
            format!("{} bytes cannot be {} chunks", h.size, h.chunk_count),
        ));
    }
    let mut st = conn.state();
    if st.uploads.len() >= cfg.max_uploads_per_vm {
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
            begin: b,
            gate: Arc::new(RwLock::new(())),
            state: Mutex::new(UploadState::default()),
        }),
    );
    Ok(Response::UpdateAccepted { upload: id })
}

/// `UpdatePage`: returns the indices (within the page) the store lacks.
pub async fn page(conn: &Conn, upload: u64, page: u32, chunks: Vec<ChunkRef>) -> Handled {
    let up = get(conn, upload)?;
    list_page(conn, &up, page, chunks)
        .await
        .inspect_err(|e| refused(conn, &up.begin, e))
}

async fn list_page(conn: &Conn, up: &Arc<Upload>, page: u32, chunks: Vec<ChunkRef>) -> Handled {
    let per = chunks_per_page(conn.max_frame) as usize;
    {
        let st = up.state.lock().unwrap_or_else(PoisonError::into_inner);
        if page != st.next_page {
            return Err(bad(
                ErrorCode::BadRequest,
                format!("page {page} out of order, expected {}", st.next_page),
            ));
        }
        let total = st.chunks.len() + chunks.len();
        if chunks.len() > per || total > up.begin.header.chunk_count as usize {
            return Err(bad(
                ErrorCode::TooLarge,
                "page lists more chunks than announced",
            ));
        }
    }
    if let Some(c) = chunks.iter().find(|c| c.len == 0 || c.len > MAX_CHUNK) {
        return Err(bad(
            ErrorCode::BadRequest,
            format!("chunk length {} out of range", c.len),
        ));
    }
    let hashes: Vec<Hash> = chunks.iter().map(|c| c.hash).collect();
    // Pin first, then look: a chunk reported present cannot be swept
    // before the commit that references it.
    let pins = conn.host.store.pin(&hashes);
    let base_chunks = base_index(conn, up).await;
    let ask: Vec<Hash> = hashes
        .iter()
        .filter(|h| !base_chunks.contains(h))
        .copied()
        .collect();
    let answers = conn
        .host
        .store_call(move |s| s.has_chunks(&ask))
        .await
        .map_err(|e| wire_store_error(&e))?;
    let mut answers = answers.into_iter();
    let present: Vec<bool> = hashes
        .iter()
        .map(|h| base_chunks.contains(h) || answers.next().unwrap_or(false))
        .collect();
    let mut st = up.state.lock().unwrap_or_else(PoisonError::into_inner);
    let mut missing = Vec::new();
    for (i, (c, here)) in chunks.iter().zip(present).enumerate() {
        let new = match st.listed.get(&c.hash) {
            Some(l) if l.len != c.len => {
                return Err(bad(
                    ErrorCode::BadRequest,
                    "one hash listed with two lengths",
                ));
            }
            Some(_) => false,
            None => {
                st.listed.insert(
                    c.hash,
                    Listed {
                        len: c.len,
                        awaited: !here,
                    },
                );
                true
            }
        };
        if new && !here {
            missing.push(u32::try_from(i).unwrap_or(u32::MAX));
        }
    }
    for c in &chunks {
        let at = st.end;
        st.starts.push(at);
        st.end = at + u64::from(c.len);
    }
    st.chunks.extend_from_slice(&chunks);
    st.next_page += 1;
    st.pins.push(pins);
    Ok(Response::Missing(missing))
}

/// The chunks of the upload's base version, loaded once (empty when
/// there is no base or it cannot be read: then the store is asked and no
/// chunk can be sent as a delta).
async fn base_index(conn: &Conn, up: &Upload) -> Arc<BaseIndex> {
    if let Some(ix) = &up.state.lock().unwrap_or_else(PoisonError::into_inner).base {
        return ix.clone();
    }
    let ix = match up.begin.base {
        None => BaseIndex::default(),
        Some(base) => {
            let user = up.begin.user.clone();
            match conn.host.store_call(move |s| s.manifest(&user, base)).await {
                Ok(m) => BaseIndex::new(&m),
                Err(e) => {
                    tracing::debug!(user = up.begin.user, base, error = %e, "base manifest unavailable");
                    BaseIndex::default()
                }
            }
        }
    };
    let ix = Arc::new(ix);
    up.state.lock().unwrap_or_else(PoisonError::into_inner).base = Some(ix.clone());
    ix
}

/// `BlockSignatures` (protocol 2): for each missing chunk index, the
/// digests of the blocks of the base version's bytes over the same range,
/// or `None` (the range is not inside the base version, or cannot be read:
/// the agent sends the chunk whole).
pub async fn signatures(conn: &Conn, upload: u64, indices: Vec<u32>) -> Handled {
    conn.check_protocol(PROTOCOL_BLOCK_DELTA, "BlockSignatures")?;
    let up = get(conn, upload)?;
    if indices.len() > MAX_SIGNATURE_BATCH as usize {
        return Err(bad(
            ErrorCode::TooLarge,
            format!(
                "{} chunks asked at once, at most {MAX_SIGNATURE_BATCH}",
                indices.len()
            ),
        ));
    }
    let base = base_index(conn, &up).await;
    let ranges: Vec<(u64, u32, Option<Vec<BasePart>>)> = {
        let mut guard = up.state.lock().unwrap_or_else(PoisonError::into_inner);
        let st = &mut *guard;
        let mut ranges = Vec::with_capacity(indices.len());
        for &i in &indices {
            let (Some(c), Some(at)) = (st.chunks.get(i as usize), st.starts.get(i as usize)) else {
                return Err(bad(
                    ErrorCode::BadRequest,
                    format!("chunk index {i} is not listed in this upload's pages"),
                ));
            };
            let (word, bit) = ((i / 64) as usize, 1u64 << (i % 64));
            if st.signed.len() <= word {
                st.signed.resize(word + 1, 0);
            }
            let awaited = st.listed.get(&c.hash).is_some_and(|l| l.awaited);
            if !awaited || st.signed[word] & bit != 0 {
                return Err(bad(
                    ErrorCode::BadRequest,
                    format!("chunk {i} was not reported missing, or was asked about already"),
                ));
            }
            st.signed[word] |= bit;
            ranges.push((*at, c.len, base.covering(*at, c.len)));
        }
        ranges
    };
    // One bulk job per chunk, a few in flight: a remote store reads them
    // concurrently, and one request cannot flood the bulk queue that all
    // VMs share (at most `max_inflight` requests × this many jobs per VM).
    let mut out: Vec<Option<Vec<BlockDigest>>> = vec![None; indices.len()];
    let mut reads = tokio::task::JoinSet::new();
    let mut todo = ranges.into_iter().enumerate();
    loop {
        while reads.len() < SIGNATURE_READS_IN_FLIGHT {
            let Some((slot, (at, len, parts))) = todo.next() else {
                break;
            };
            let Some(parts) = parts else { continue };
            let host = conn.host.clone();
            reads.spawn(async move {
                let r = host
                    .store_call_bulk(move |s| {
                        let bytes = read_base(s, at, len, &parts)?;
                        Ok(bytes.map(|b| delta::block_digests(at, &b)))
                    })
                    .await;
                (slot, r)
            });
        }
        let Some(joined) = reads.join_next().await else {
            break;
        };
        let Ok((slot, r)) = joined else { continue };
        match r {
            Ok(digests) => {
                if let Some(o) = out.get_mut(slot) {
                    *o = digests;
                }
            }
            Err(e) => {
                tracing::warn!(user = up.begin.user, error = %e,
                    "base bytes unreadable; the agent will send the chunk whole");
            }
        }
    }
    Ok(Response::BlockSignatures(out))
}

/// The base version's bytes `[at, at + len)` from the chunks covering them
/// (each read checks its hash); `None` if a chunk has the wrong length.
fn read_base(
    s: &dyn UifStore,
    at: u64,
    len: u32,
    parts: &[BasePart],
) -> StoreResult<Option<Vec<u8>>> {
    delta::assemble(at, len as usize, parts, |c| s.read_chunk(&c.hash))
}

/// `ChunkDelta` (protocol 2): rebuilds a missing chunk from the base
/// version's bytes at its offset and the blocks sent, then stores it like
/// an uploaded chunk (`BadChunk` if the result is not the announced hash).
pub async fn chunk_delta(conn: &Conn, d: ChunkDelta) -> Handled {
    conn.check_protocol(PROTOCOL_BLOCK_DELTA, "ChunkDelta")?;
    let up = get(conn, d.upload)?;
    let base = base_index(conn, &up).await;
    let (at, len, bad_deltas) = {
        let st = up.state.lock().unwrap_or_else(PoisonError::into_inner);
        let i = d.index as usize;
        let (Some(c), Some(at)) = (st.chunks.get(i), st.starts.get(i)) else {
            return Err(bad(
                ErrorCode::BadRequest,
                format!(
                    "chunk index {} is not listed in this upload's pages",
                    d.index
                ),
            ));
        };
        if c.hash != d.hash {
            return Err(bad(
                ErrorCode::BadRequest,
                format!("chunk {} is not {} but {}", d.index, d.hash, c.hash),
            ));
        }
        if !st.listed.get(&c.hash).is_some_and(|l| l.awaited) {
            return Err(bad(
                ErrorCode::BadRequest,
                format!(
                    "chunk {} was not reported missing, or was stored already",
                    d.hash
                ),
            ));
        }
        (*at, c.len, st.bad_deltas)
    };
    if bad_deltas >= MAX_BAD_DELTAS {
        return Err(bad(
            ErrorCode::NotFound,
            format!(
                "{bad_deltas} bad deltas in this upload; send chunk {} whole",
                d.hash
            ),
        ));
    }
    // The base is the upload's own base version, at the chunk's own offset:
    // never bytes of another user or version.
    let Some(parts) = base.covering(at, len) else {
        return Err(bad(
            ErrorCode::BadRequest,
            format!(
                "chunk {} (bytes {at}..{}) is not inside the upload's base version ({:?})",
                d.index,
                at + u64::from(len),
                up.begin.base
            ),
        ));
    };
    delta::check(at, len as usize, &d.blocks).map_err(|e| {
        bad(
            ErrorCode::BadRequest,
            format!("malformed delta for chunk {}: {e}", d.hash),
        )
    })?;
    let n: u64 = d.blocks.iter().map(|b| b.data.len() as u64).sum();
    let (hash, blocks) = (d.hash, d.blocks);
    // Outer error: storing the rebuilt chunk failed (`BadChunk` if it is
    // not `hash`); inner error: the base bytes are unusable.
    let stored = conn
        .host
        .store_call_bulk(move |s| {
            let old = match read_base(s, at, len, &parts) {
                Ok(Some(old)) => old,
                Ok(None) => {
                    return Ok(Err(format!(
                        "a base chunk of bytes {at}.. has the wrong length"
                    )));
                }
                Err(e) => return Ok(Err(e.to_string())),
            };
            let new = match delta::apply(at, &old, &blocks) {
                Ok(new) => new,
                Err(e) => return Ok(Err(e.to_string())),
            };
            s.put_chunk(&hash, &new).map(Ok)
        })
        .await;
    let based = match stored {
        Ok(based) => based,
        Err(e) => {
            if matches!(e, StoreError::BadChunk(_)) {
                up.state
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .bad_deltas += 1;
            }
            return Err(wire_store_error(&e));
        }
    };
    if let Err(e) = based {
        // The base is gone (pruned meanwhile) or damaged: the agent sends
        // the chunk whole instead.
        tracing::warn!(user = up.begin.user, chunk = %hash, error = %e, "delta base unusable");
        return Err(bad(
            ErrorCode::NotFound,
            format!("the base of chunk {hash} cannot be read ({e}); send it whole"),
        ));
    }
    mark_stored(&up, &hash);
    conn.host.metrics.chunk_uploaded(&up.begin.user, n);
    metrics::add(&conn.host.metrics.chunk_deltas, 1);
    Ok(Response::Ok)
}

/// Takes the shared side of an upload's gate (in the dispatcher, before the
/// chunk's handler is spawned, so a later commit waits for it).
pub async fn chunk_guard(conn: &Conn, upload: u64) -> Option<OwnedRwLockReadGuard<()>> {
    let up = get(conn, upload).ok()?;
    Some(up.gate.clone().read_owned().await)
}

/// `ChunkUpload`.
pub async fn chunk(conn: &Conn, upload: u64, hash: Hash, data: Vec<u8>) -> Handled {
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
    // `put_chunk` checks BLAKE3(data) == hash (BadChunk otherwise); hashing
    // here too would cost a second pass over every uploaded byte.
    let n = data.len() as u64;
    conn.host
        .store_call_bulk(move |s| s.put_chunk(&hash, &data))
        .await
        .map_err(|e| wire_store_error(&e))?;
    mark_stored(&up, &hash);
    conn.host.metrics.chunk_uploaded(&up.begin.user, n);
    Ok(Response::Ok)
}

/// Counts a chunk stored by this upload; it is no longer awaited.
fn mark_stored(up: &Upload, hash: &Hash) {
    let mut st = up.state.lock().unwrap_or_else(PoisonError::into_inner);
    st.uploaded += 1;
    if let Some(l) = st.listed.get_mut(hash) {
        l.awaited = false;
    }
}

/// `UpdateAbort`.
pub fn abort(conn: &Conn, upload: u64) -> Handled {
    conn.state()
        .uploads
        .remove(&upload)
        .map(|_| Response::Ok)
        .ok_or_else(|| bad(ErrorCode::NotFound, format!("no upload {upload}")))
}

/// `UpdateCommit`.
pub async fn commit(conn: &Conn, upload: u64) -> Handled {
    let up = get(conn, upload)?;
    commit_upload(conn, &up, upload)
        .await
        .inspect_err(|e| refused(conn, &up.begin, e))
}

async fn commit_upload(conn: &Conn, up: &Arc<Upload>, upload: u64) -> Handled {
    let _exclusive = up.gate.clone().write_owned().await;
    let host = conn.host.clone();
    let _commit = host.commit_guard();
    let (manifest, uploaded) = {
        let st = up.state.lock().unwrap_or_else(PoisonError::into_inner);
        let m = Manifest {
            header: up.begin.header,
            chunks: st.chunks.clone(),
        };
        (m, st.uploaded)
    };
    // Count, size, lengths and the manifest digest (which commits to every
    // chunk hash, hence every byte); the store checks every chunk is present.
    manifest.validate().map_err(|e| match e {
        ManifestError::Digest => bad(ErrorCode::BadDigest, e),
        e => bad(
            ErrorCode::BadRequest,
            format!("incomplete or inconsistent upload: {e}"),
        ),
    })?;
    let m = Arc::new(manifest);
    let b = &up.begin;
    let gate = host.leases.gate(&b.user);
    let outcome = {
        let _user = gate.lock().await;
        let lease_ok = host.leases.is_current(&b.user, b.lease, &conn.vm);
        let (user, base, origin, m) = (b.user.clone(), b.base, conn.origin(), m.clone());
        host.store_call(move |s| s.commit(&user, &m, base, lease_ok, &origin))
            .await
            .map_err(|e| wire_store_error(&e))?
    };
    conn.state().uploads.remove(&upload);
    let update = UpdateFields {
        user: b.user.clone(),
        vm: conn.vm.clone(),
        session: b.session.clone(),
        cause: b.cause,
        base: b.base,
        size: m.header.size,
        chunks: m.header.chunk_count,
        chunks_uploaded: uploaded,
    };
    Ok(match outcome {
        CommitOutcome::Committed(version) => {
            host.sessions.clear_lost(&conn.vm, &b.user);
            metrics::add(&host.metrics.commits, 1);
            host.events.emit(Event::Commit { update, version });
            Response::Committed { version }
        }
        CommitOutcome::Conflict { kept_as, head } => {
            metrics::add(&host.metrics.conflicts, 1);
            host.events.emit(Event::Conflict {
                update,
                kept_as,
                head,
            });
            Response::Conflict { kept_as, head }
        }
    })
}
