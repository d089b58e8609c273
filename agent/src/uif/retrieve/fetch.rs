//! Getting a version's chunks into the file: from the local cache when
//! intact, the rest fetched from the host with several requests in flight,
//! verified and written off the runtime thread.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use tokio::task::JoinSet;
use uve_protocol::manifest::{ChunkRef, Hash, Manifest};
use uve_protocol::message::{Request, Response};
use uve_protocol::names::UserName;

use super::unexpected;
use crate::base::fsutil;
use crate::link::HostLink;
use crate::stores::cache;
use crate::uif::{UifError, blocking};

/// Writes every chunk of `manifest` into `out`: from the cache when intact,
/// otherwise fetched (each distinct hash once, `parallel` at a time).
pub(super) async fn fill(
    link: &HostLink,
    user: &UserName,
    dest: &Path,
    out: &File,
    manifest: &Manifest,
    (previous, trusted): (Option<Manifest>, bool),
    parallel: usize,
) -> Result<(usize, usize), UifError> {
    // Reading and verifying cached chunks is CPU and disk work: off the
    // runtime thread, so the link keeps answering heartbeats.
    let (wanted, order, reused) = {
        let out = out
            .try_clone()
            .map_err(|e| UifError::io("clone retrieve file", e))?;
        let dest = dest.to_path_buf();
        let manifest = manifest.clone();
        blocking(move || {
            // Full length at once: chunks of zeroes are then left as holes
            // ([`write_chunk`]), so a mostly empty disk image stays sparse.
            out.set_len(manifest.header.size)
                .map_err(|e| UifError::at("size", &dest, e))?;
            let cache = cache::ChunkCache::open(&dest, previous, trusted);
            reuse_cached(&out, &cache, &manifest)
        })
        .await?
    };
    let fetched = fetch_missing(link, user, out, wanted, order, parallel).await?;
    Ok((fetched, reused))
}

/// Writes a chunk at `off` of a file already at its full length; a chunk
/// of zeroes becomes a hole (punched: a file patched in place may hold
/// other bytes there), so a mostly empty disk image stays sparse.
pub(super) fn write_chunk(out: &File, data: &[u8], off: u64) -> std::io::Result<()> {
    if data.iter().all(|&b| b == 0) {
        let len = data.len() as u64;
        return fsutil::zero_range(out, rustix::fs::FallocateFlags::PUNCH_HOLE, off, len);
    }
    out.write_all_at(data, off)
}

/// Fetches the chunks in `order` (`parallel` requests in flight), verifies
/// each and writes it at its offsets in `wanted`. Returns the number
/// fetched.
///
/// The runtime thread only moves frames; verifying (BLAKE3) and writing
/// (a copy into the page cache) run on a blocking thread fed through a
/// bounded channel, so they overlap with receiving the next chunks and
/// heartbeats never wait behind them.
pub(super) async fn fetch_missing(
    link: &HostLink,
    user: &UserName,
    out: &File,
    wanted: HashMap<Hash, Vec<u64>>,
    order: Vec<ChunkRef>,
    parallel: usize,
) -> Result<usize, UifError> {
    let parallel = parallel.max(1);
    let file = out
        .try_clone()
        .map_err(|e| UifError::io("clone retrieve file", e))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<(ChunkRef, Vec<u8>)>(parallel);
    let writer = tokio::task::spawn_blocking(move || write_fetched(&file, &wanted, rx));
    let mut fetched = 0usize;
    let mut queue = order.into_iter();
    let mut inflight: JoinSet<Result<(ChunkRef, Vec<u8>), UifError>> = JoinSet::new();
    let received: Result<(), UifError> = async {
        loop {
            while inflight.len() < parallel {
                let Some(c) = queue.next() else { break };
                let link = link.clone();
                let user = user.clone();
                inflight.spawn(async move {
                    match link
                        .request(Request::ChunkFetch { user, hash: c.hash })
                        .await?
                    {
                        Response::Chunk(data) => Ok((c, data)),
                        other => Err(unexpected("ChunkFetch", &other)),
                    }
                });
            }
            let Some(done) = inflight.join_next().await else {
                return Ok(());
            };
            let chunk =
                done.map_err(|e| UifError::Protocol(format!("fetch task failed: {e}")))??;
            if tx.send(chunk).await.is_err() {
                // The writer stopped: its error is reported below.
                return Ok(());
            }
            fetched += 1;
        }
    }
    .await;
    drop(tx);
    let written = writer
        .await
        .map_err(|e| UifError::io("chunk writer", std::io::Error::other(e.to_string())))?;
    received?;
    written?;
    Ok(fetched)
}

/// The blocking half of [`fetch_missing`]: verifies each fetched chunk,
/// writes it at its offsets and starts writeback every
/// [`fsutil::WRITEBACK_STEP`] bytes, so the disk works while the rest
/// arrives and the final fsync finds little left.
fn write_fetched(
    out: &File,
    wanted: &HashMap<Hash, Vec<u64>>,
    mut rx: tokio::sync::mpsc::Receiver<(ChunkRef, Vec<u8>)>,
) -> Result<(), UifError> {
    let mut unflushed = 0u64;
    while let Some((c, data)) = rx.blocking_recv() {
        if !uve_protocol::chunker::chunk_matches(&c, &data) {
            return Err(UifError::Protocol(format!(
                "chunk {} does not match its hash or length",
                c.hash
            )));
        }
        for off in wanted.get(&c.hash).map(Vec::as_slice).unwrap_or_default() {
            write_chunk(out, &data, *off).map_err(|e| UifError::io("write fetched chunk", e))?;
            unflushed += u64::from(c.len);
        }
        if unflushed >= fsutil::WRITEBACK_STEP {
            unflushed = 0;
            let _ = fsutil::start_writeback(out);
        }
    }
    Ok(())
}

/// Copies every chunk the cache has intact into `out`; returns the
/// chunks still wanted (hash → offsets), their fetch order and the number
/// reused.
#[allow(clippy::type_complexity)]
fn reuse_cached(
    out: &File,
    cache: &cache::ChunkCache,
    manifest: &Manifest,
) -> Result<(HashMap<Hash, Vec<u64>>, Vec<ChunkRef>, usize), UifError> {
    let mut wanted: HashMap<Hash, Vec<u64>> = HashMap::new();
    let mut order: Vec<ChunkRef> = Vec::new();
    let mut reused = 0usize;
    let mut unflushed = 0u64;
    for (off, c) in manifest.offsets() {
        if unflushed >= fsutil::WRITEBACK_STEP {
            unflushed = 0;
            let _ = fsutil::start_writeback(out);
        }
        if c.is_zero_block() {
            // Never fetched: the new file's hole reads as zeroes.
            reused += 1;
            continue;
        }
        if let Some(places) = wanted.get_mut(&c.hash) {
            places.push(off);
            continue;
        }
        match cache.get(&c.hash).filter(|d| d.len() == c.len as usize) {
            Some(data) => {
                write_chunk(out, &data, off)
                    .map_err(|e| UifError::io("write retrieved chunk", e))?;
                unflushed += u64::from(c.len);
                reused += 1;
            }
            None => {
                wanted.insert(c.hash, vec![off]);
                order.push(*c);
            }
        }
    }
    Ok((wanted, order, reused))
}
