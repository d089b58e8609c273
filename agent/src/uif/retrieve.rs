//! UIF retrieve (WIRE.md §6): ask for the grant, read the manifest pages,
//! take every chunk the local cache has intact, fetch the rest with several
//! `ChunkFetch` requests in flight, verify each chunk and the manifest digest,
//! then write temp → fsync → rename into place. Until the rename the
//! previous file is untouched.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::conn::HostLink;
use tokio::task::JoinSet;
use uve_protocol::manifest::{ChunkRef, Hash, Manifest, chunks_per_page, page_count};
use uve_protocol::message::{Request, Response, Version};

use super::{UifError, blocking, cache};
use crate::fsutil;

/// What a retrieve produced.
#[derive(Debug, Clone)]
pub struct Retrieved {
    /// The version now on disk (`None`: the user had no UIF yet).
    pub base: Option<Version>,
    /// Lease epoch to present at update.
    pub lease: u64,
    /// Chunks fetched from the host.
    pub fetched: usize,
    /// Chunks taken from the local cache.
    pub reused: usize,
    /// The host's hand-over from another VM timed out.
    pub handover_timed_out: bool,
}

/// Retrieves `user`'s head into `dest`, reusing chunks of the file already
/// at `dest` (described by the cached manifest under `state_dir`).
pub async fn retrieve(
    link: &HostLink,
    state_dir: &Path,
    user: &str,
    session: &str,
    dest: &Path,
    parallel: usize,
) -> Result<Retrieved, UifError> {
    if let Some(dir) = dest.parent() {
        fsutil::ensure_dir(dir).map_err(|e| UifError::at("create", dir, e))?;
    }
    let grant = match link
        .request(Request::UifRetrieve {
            user: user.into(),
            session: session.into(),
        })
        .await?
    {
        Response::Retrieve(g) => g,
        other => return Err(unexpected("UifRetrieve", &other)),
    };
    let (Some(version), Some(header)) = (grant.version, grant.header) else {
        // First login: an empty UIF.
        write_empty(dest)?;
        cache::save(state_dir, user, &empty_manifest())
            .map_err(|e| UifError::at("save cache manifest for", dest, e))?;
        return Ok(Retrieved {
            base: None,
            lease: grant.lease,
            fetched: 0,
            reused: 0,
            handover_timed_out: grant.handover_timed_out,
        });
    };
    let max_frame = link.max_frame();
    let pages = page_count(header.chunk_count, max_frame);
    let per_page = chunks_per_page(max_frame) as usize;
    let mut chunks: Vec<ChunkRef> = Vec::new();
    for page in 0..pages {
        let list = match link
            .request(Request::ManifestPage {
                user: user.into(),
                version,
                page,
            })
            .await?
        {
            Response::ManifestPage(list) => list,
            other => return Err(unexpected("ManifestPage", &other)),
        };
        if list.len() > per_page || chunks.len() + list.len() > header.chunk_count as usize {
            return Err(UifError::Protocol(format!(
                "manifest page {page} has {} chunks, more than announced",
                list.len()
            )));
        }
        chunks.extend(list);
    }
    let manifest = Manifest { header, chunks };
    manifest
        .validate()
        .map_err(|e| UifError::Protocol(e.to_string()))?;

    let tmp = fsutil::sibling(dest, ".uve-part");
    let out = OpenOptions::new()
        .write(true)
        .read(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| UifError::at("create", &tmp, e))?;
    let result = fill(link, user, dest, &out, &manifest, state_dir, parallel).await;
    let (fetched, reused) = match result {
        Ok(counts) => counts,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    // The manifest digest (checked by `validate`) commits to the chunk
    // list, and every chunk was verified against its hash, so a file of
    // the announced size is the version, byte for byte.
    let size = manifest.header.size;
    let tmp2 = tmp.clone();
    let written = blocking(move || {
        out.sync_all()
            .map_err(|e| UifError::at("fsync", &tmp2, e))?;
        out.metadata()
            .map(|m| m.len())
            .map_err(|e| UifError::at("stat", &tmp2, e))
    })
    .await?;
    if written != size {
        let _ = std::fs::remove_file(&tmp);
        return Err(UifError::Protocol(format!(
            "assembled {written} bytes for {user} version {version}, expected {size}"
        )));
    }
    std::fs::rename(&tmp, dest).map_err(|e| UifError::at("rename into", dest, e))?;
    fsutil::sync_parent(dest).map_err(|e| UifError::at("fsync dir of", dest, e))?;
    cache::save(state_dir, user, &manifest)
        .map_err(|e| UifError::at("save cache manifest for", dest, e))?;
    Ok(Retrieved {
        base: Some(version),
        lease: grant.lease,
        fetched,
        reused,
        handover_timed_out: grant.handover_timed_out,
    })
}

/// Writes every chunk of `manifest` into `out`: from the cache when intact,
/// otherwise fetched (each distinct hash once, `parallel` at a time).
async fn fill(
    link: &HostLink,
    user: &str,
    dest: &Path,
    out: &File,
    manifest: &Manifest,
    state_dir: &Path,
    parallel: usize,
) -> Result<(usize, usize), UifError> {
    // Reading and verifying cached chunks is CPU and disk work: off the
    // runtime thread, so the link keeps answering heartbeats.
    let (wanted, order, reused) = {
        let out = out
            .try_clone()
            .map_err(|e| UifError::io("clone retrieve file", e))?;
        let (dest, state_dir, user) = (
            dest.to_path_buf(),
            state_dir.to_path_buf(),
            user.to_string(),
        );
        let manifest = manifest.clone();
        blocking(move || reuse_cached(&out, &dest, &state_dir, &user, &manifest)).await?
    };
    let mut fetched = 0usize;
    let mut queue = order.into_iter();
    let mut inflight: JoinSet<Result<(ChunkRef, Vec<u8>), UifError>> = JoinSet::new();
    loop {
        while inflight.len() < parallel.max(1) {
            let Some(c) = queue.next() else { break };
            let link = link.clone();
            let user = user.to_string();
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
            break;
        };
        let (c, data) =
            done.map_err(|e| UifError::Protocol(format!("fetch task failed: {e}")))??;
        if !uve_protocol::chunker::chunk_matches(&c, &data) {
            return Err(UifError::Protocol(format!(
                "chunk {} does not match its hash or length",
                c.hash
            )));
        }
        for off in wanted.get(&c.hash).map(Vec::as_slice).unwrap_or_default() {
            out.write_all_at(&data, *off)
                .map_err(|e| UifError::io("write fetched chunk", e))?;
        }
        fetched += 1;
    }
    Ok((fetched, reused))
}

/// Copies every chunk the cache has intact into `out`; returns the
/// chunks still wanted (hash → offsets), their fetch order and the number
/// reused.
#[allow(clippy::type_complexity)]
fn reuse_cached(
    out: &File,
    dest: &Path,
    state_dir: &Path,
    user: &str,
    manifest: &Manifest,
) -> Result<(HashMap<Hash, Vec<u64>>, Vec<ChunkRef>, usize), UifError> {
    let cache = cache::ChunkCache::open(dest, cache::load(state_dir, user));
    let mut wanted: HashMap<Hash, Vec<u64>> = HashMap::new();
    let mut order: Vec<ChunkRef> = Vec::new();
    let mut reused = 0usize;
    for (off, c) in manifest.offsets() {
        if let Some(places) = wanted.get_mut(&c.hash) {
            places.push(off);
            continue;
        }
        match cache.get(&c.hash).filter(|d| d.len() == c.len as usize) {
            Some(data) => {
                out.write_all_at(&data, off)
                    .map_err(|e| UifError::io("write retrieved chunk", e))?;
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

/// The manifest of an empty UIF.
pub fn empty_manifest() -> Manifest {
    Manifest::from_chunks(Vec::new())
}

/// Replaces `dest` with an empty file, durably.
pub fn write_empty(dest: &Path) -> Result<(), UifError> {
    if let Some(dir) = dest.parent() {
        fsutil::ensure_dir(dir).map_err(|e| UifError::at("create", dir, e))?;
    }
    fsutil::atomic_write(dest, b"").map_err(|e| UifError::at("write", dest, e))
}

fn unexpected(what: &str, got: &Response) -> UifError {
    UifError::Protocol(format!("unexpected answer to {what}: {got:?}"))
}
