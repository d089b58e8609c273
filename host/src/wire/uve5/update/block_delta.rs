//! Block deltas (protocol 2) of an upload: `BlockSignatures` answers,
//! for chunks the host lacks, the digests of the file-aligned 4 KiB blocks
//! of the bytes the upload's base version holds at the same offset;
//! `ChunkDelta` rebuilds a chunk from those base bytes (only ever the
//! upload's own base version, at the chunk's own offset) and the blocks
//! sent, and stores it through the same checked put as a whole chunk.
//! An upload whose chunks keep coming whole after their signatures (a
//! rewritten file) gets no more base reads ([`deltas_pay`]).

use std::sync::PoisonError;

use uve_protocol::defs::{MAX_SIGNATURE_BATCH, PROTOCOL_BLOCK_DELTA};
use uve_protocol::delta::{self, BasePart};
use uve_protocol::message::{BlockDigest, ChunkDelta, ErrorCode, Response, WireError};

use super::{Upload, bad, base_index, get, mark_stored, stage_chunk};
use crate::state::metrics;
use crate::store::{StoreResult, UifStore};
use crate::wire::uve5::{Handled, VmConnection};

/// Deltas per upload whose rebuilt chunk does not match its hash before
/// the host refuses further deltas of that upload (each costs a base bytes
/// read, for a few bytes from the agent; an honest agent sees none).
const MAX_BAD_DELTAS: u32 = 16;

/// Chunks given signatures that must come whole before an upload's deltas
/// are judged (see [`deltas_pay`]).
const DELTA_PROBE: u32 = 64;

/// Base reads one `BlockSignatures` request keeps queued on the bulk
/// threads at once.
const SIGNATURE_READS_IN_FLIGHT: usize = 4;

/// `BlockSignatures` (protocol 2): for each missing chunk index, the
/// digests of the blocks of the base version's bytes over the same range,
/// or `None` (the range is not inside the base version, or cannot be read:
/// the agent sends the chunk whole).
pub async fn signatures(conn: &VmConnection, upload: u64, indices: Vec<u32>) -> Handled {
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
        let pays = deltas_pay(st.signed_whole, st.deltas);
        let mut ranges = Vec::with_capacity(indices.len());
        for &i in &indices {
            let (Some(c), Some(at)) = (st.chunks.get(i as usize), st.starts.get(i as usize)) else {
                return Err(bad(
                    ErrorCode::BadRequest,
                    format!("chunk index {i} is not listed in this upload's pages"),
                ));
            };
            let awaited = st.listed.get(&c.hash).is_some_and(|l| l.awaited);
            if !awaited || !st.signed.insert(i) {
                return Err(bad(
                    ErrorCode::BadRequest,
                    format!("chunk {i} was not reported missing, or was asked about already"),
                ));
            }
            let parts = base.covering(*at, c.len).filter(|_| pays);
            if let (Some(_), Some(l)) = (&parts, st.listed.get_mut(&c.hash)) {
                l.signed = true;
            }
            ranges.push((*at, c.len, parts));
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
            let (host, vm) = (conn.host().clone(), conn.vm().to_string());
            reads.spawn(async move {
                let r = host
                    .store_call_bulk(&vm, move |s| {
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
                tracing::warn!(user = %up.begin.user, error = %e,
                    "base bytes unreadable; the agent will send the chunk whole");
            }
        }
    }
    Ok(Response::BlockSignatures(out))
}

/// Whether an upload's block deltas still pay for the base reads their
/// signatures cost: once `DELTA_PROBE` chunks given signatures came whole
/// and fewer than one in eight came as deltas (a rewritten file: nothing
/// of the base is left to reuse), its further signatures are `None`
/// without a read. On a remote store each read is a GET: a full rewrite
/// would read the whole base version to send nothing less.
fn deltas_pay(signed_whole: u32, deltas: u32) -> bool {
    signed_whole < DELTA_PROBE || deltas.saturating_mul(8) >= signed_whole
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
pub async fn chunk_delta(conn: &VmConnection, d: ChunkDelta) -> Handled {
    conn.check_protocol(PROTOCOL_BLOCK_DELTA, "ChunkDelta")?;
    let up = get(conn, d.upload)?;
    let base = base_index(conn, &up).await;
    let (at, len, bad_deltas) = awaited(&up, &d)?;
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
    // not `hash`) or a budget refused it; inner error: the base bytes are
    // unusable.
    let stored = stage_chunk(conn, &up, hash, u64::from(len), move |s, stage| {
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
        s.stage_chunk(stage, &hash, &new).map(Ok)
    })
    .await;
    let based = match stored {
        Ok(based) => based,
        Err(e) => {
            if e.code == ErrorCode::BadChunk {
                up.state
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .bad_deltas += 1;
            }
            return Err(e);
        }
    };
    if let Err(e) = based {
        // The base is gone (pruned meanwhile) or damaged: the agent sends
        // the chunk whole instead.
        tracing::warn!(user = %up.begin.user, chunk = %hash, error = %e, "delta base unusable");
        return Err(bad(
            ErrorCode::NotFound,
            format!("the base of chunk {hash} cannot be read ({e}); send it whole"),
        ));
    }
    mark_stored(&up, &hash, true);
    conn.host().metrics().chunk_uploaded(&up.begin.user, n);
    metrics::add(&conn.host().metrics().chunk_deltas, 1);
    Ok(Response::Ok)
}

/// The offset and length of the chunk a delta rebuilds, and the bad
/// deltas of its upload so far; refused unless the chunk is listed at that
/// index and still awaited.
fn awaited(up: &Upload, d: &ChunkDelta) -> Result<(u64, u32, u32), WireError> {
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
    Ok((*at, c.len, st.bad_deltas))
}

#[cfg(test)]
mod tests {
    use super::{DELTA_PROBE, deltas_pay};

    #[test]
    fn deltas_stop_paying_once_signed_chunks_keep_coming_whole() {
        assert!(deltas_pay(0, 0));
        assert!(
            deltas_pay(DELTA_PROBE - 1, 0),
            "judged only after the probe"
        );
        assert!(!deltas_pay(DELTA_PROBE, 0), "a rewritten file");
        assert!(
            deltas_pay(DELTA_PROBE, DELTA_PROBE / 8),
            "one in eight pays"
        );
        assert!(!deltas_pay(10 * DELTA_PROBE, DELTA_PROBE));
        assert!(deltas_pay(u32::MAX, u32::MAX), "no overflow");
    }
}
