//! UIF retrieve (WIRE.md §7): ask for the grant, read the manifest pages,
//! take every chunk the local cache has intact, fetch the rest with several
//! `ChunkFetch` requests in flight, verify each chunk and the manifest
//! digest. Two ways to put the version on disk:
//!
//! - **Patch in place** when the file is stamped as holding the previous
//!   version (see [`cache::trusted`]): only the chunks whose content or
//!   offset changed are written, then the file is fsynced, so a login after
//!   a small change costs in proportion to the change. Chunks that moved are
//!   read from the file before anything is written (up to
//!   [`RELOCATE_BUDGET`]; beyond, e.g. after an insertion near the start,
//!   the whole file changes anyway and is rewritten). A durable marker
//!   ([`cache::begin_patch`]) is set before the first write and removed once
//!   the file, its manifest and its new stamp are durable: a retrieve that
//!   finds it (crash, dropped connection mid-patch) treats the file as
//!   unknown and takes the rewrite path, verifying every cached chunk.
//! - **Rewrite**: temp → fsync → rename into place; until the rename the
//!   previous file is untouched.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use crate::link::HostLink;
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
    /// The file was patched in place (only changed chunks written).
    pub patched: bool,
    /// Digest of the version now on disk (of the empty UIF if `base` is
    /// `None`).
    pub digest: Hash,
}

/// Most bytes of moved chunks a patch holds in memory; a version whose
/// chunks moved more than this is written as a new file instead.
pub const RELOCATE_BUDGET: u64 = 16 << 20;

/// Where a retrieve writes, and through what.
struct Target<'a> {
    link: &'a HostLink,
    state_dir: &'a Path,
    user: &'a str,
    dest: &'a Path,
    parallel: usize,
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
    let t = Target {
        link,
        state_dir,
        user,
        dest,
        parallel,
    };
    let started = Instant::now();
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
    let done = |base, digest, (fetched, reused), patched| Retrieved {
        base,
        lease: grant.lease,
        fetched,
        reused,
        handover_timed_out: grant.handover_timed_out,
        patched,
        digest,
    };
    let (Some(version), Some(header)) = (grant.version, grant.header) else {
        let digest = t.first_login().await?;
        return Ok(done(None, digest, (0, 0), false));
    };
    let manifest = t.manifest(version, header).await?;
    let digest = manifest.header.digest;
    let manifest_ms = started.elapsed().as_millis();
    let previous = cache::load(state_dir, user);
    if cache::patch_interrupted(state_dir, user) {
        tracing::warn!(
            user,
            "an earlier retrieve was interrupted while patching the UIF file; rewriting it whole"
        );
    }
    let trusted = previous
        .as_ref()
        .is_some_and(|m| cache::trusted(state_dir, user, dest, m));
    if trusted
        && let Some(prev) = &previous
        && let Some(counts) = t.try_patch(prev, &manifest, version, manifest_ms).await?
    {
        return Ok(done(Some(version), digest, counts, true));
    }
    let counts = t
        .rewrite(&manifest, (previous, trusted), version, manifest_ms)
        .await?;
    Ok(done(Some(version), digest, counts, false))
}

impl Target<'_> {
    /// First login: an empty UIF. Returns the empty manifest's digest.
    async fn first_login(&self) -> Result<Hash, UifError> {
        let empty = empty_manifest();
        let (sd, u, d, m) = (
            self.state_dir.to_path_buf(),
            self.user.to_string(),
            self.dest.to_path_buf(),
            empty.clone(),
        );
        blocking(move || {
            write_empty(&d)?;
            record(&sd, &u, &d, &m)
        })
        .await?;
        Ok(empty.header.digest)
    }

    /// Reads and validates the manifest of `version`, page by page.
    async fn manifest(
        &self,
        version: Version,
        header: uve_protocol::manifest::ManifestHeader,
    ) -> Result<Manifest, UifError> {
        let max_frame = self.link.max_frame();
        let pages = page_count(header.chunk_count, max_frame);
        let per_page = chunks_per_page(max_frame) as usize;
        let mut chunks: Vec<ChunkRef> = Vec::new();
        for page in 0..pages {
            let list = match self
                .link
                .request(Request::ManifestPage {
                    user: self.user.into(),
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
        Ok(manifest)
    }

    /// Patches the file (which holds `prev`) in place, unless too much of
    /// it moved: then `None`, and the caller rewrites it.
    async fn try_patch(
        &self,
        prev: &Manifest,
        manifest: &Manifest,
        version: Version,
        manifest_ms: u128,
    ) -> Result<Option<(usize, usize)>, UifError> {
        let plan = {
            let (prev, next, dest) = (prev.clone(), manifest.clone(), self.dest.to_path_buf());
            blocking(move || Ok(plan_patch(&prev, &next, &dest))).await?
        };
        let Some(plan) = plan else {
            tracing::info!(
                user = self.user,
                "chunks moved by more than {RELOCATE_BUDGET} bytes: rewriting the UIF file"
            );
            return Ok(None);
        };
        let t = Instant::now();
        let (fetched, reused) = patch(
            self.link,
            self.state_dir,
            self.user,
            self.dest,
            manifest,
            plan,
            self.parallel,
        )
        .await?;
        tracing::info!(
            user = self.user,
            version,
            manifest_ms,
            patch_ms = t.elapsed().as_millis(),
            fetched,
            reused,
            "retrieve: patched the file in place"
        );
        Ok(Some((fetched, reused)))
    }

    /// Writes the version to a temp file (cached chunks from the previous
    /// file, the rest fetched), fsyncs it and renames it into place; until
    /// the rename the previous file is untouched.
    async fn rewrite(
        &self,
        manifest: &Manifest,
        previous: (Option<Manifest>, bool),
        version: Version,
        manifest_ms: u128,
    ) -> Result<(usize, usize), UifError> {
        let (user, dest) = (self.user, self.dest);
        let tmp = fsutil::sibling(dest, ".uve-part");
        let _ = std::fs::remove_file(&tmp);
        let out = fsutil::create_private(&tmp).map_err(|e| UifError::at("create", &tmp, e))?;
        let t = Instant::now();
        let result = fill(
            self.link,
            user,
            dest,
            &out,
            manifest,
            previous,
            self.parallel,
        )
        .await;
        let (fetched, reused) = match result {
            Ok(counts) => counts,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let chunks_ms = t.elapsed().as_millis();
        let t = Instant::now();
        self.settle(out, tmp, manifest, version).await?;
        tracing::info!(
            user,
            version,
            manifest_ms,
            chunks_ms,
            fsync_ms = t.elapsed().as_millis(),
            fetched,
            reused,
            "retrieve: wrote a new file"
        );
        Ok((fetched, reused))
    }

    /// Makes the assembled temp file the UIF: fsync, size check, rename,
    /// directory fsync, cache record. The manifest digest (checked by
    /// `validate`) commits to the chunk list, and every chunk was verified
    /// against its hash, so a file of the announced size is the version,
    /// byte for byte.
    async fn settle(
        &self,
        out: File,
        tmp: std::path::PathBuf,
        manifest: &Manifest,
        version: Version,
    ) -> Result<(), UifError> {
        let size = manifest.header.size;
        let (sd, u, d, m) = (
            self.state_dir.to_path_buf(),
            self.user.to_string(),
            self.dest.to_path_buf(),
            manifest.clone(),
        );
        blocking(move || {
            out.sync_all().map_err(|e| UifError::at("fsync", &tmp, e))?;
            let written = out
                .metadata()
                .map(|m| m.len())
                .map_err(|e| UifError::at("stat", &tmp, e))?;
            if written != size {
                let _ = std::fs::remove_file(&tmp);
                return Err(UifError::Protocol(format!(
                    "assembled {written} bytes for {u} version {version}, expected {size}"
                )));
            }
            std::fs::rename(&tmp, &d).map_err(|e| UifError::at("rename into", &d, e))?;
            fsutil::sync_parent(&d).map_err(|e| UifError::at("fsync dir of", &d, e))?;
            record(&sd, &u, &d, &m)
        })
        .await
    }
}

/// Records that `dest` now holds `manifest` (see [`cache::record`]) with a
/// stamp, waiting up to [`cache::RACY`] for the just-written file's ctime
/// to settle: then a logout that finds the file unchanged need not re-read
/// it, and a later retrieve may patch it.
fn record(state_dir: &Path, user: &str, dest: &Path, manifest: &Manifest) -> Result<(), UifError> {
    cache::record(state_dir, user, manifest, cache::settled_id(dest))
        .map_err(|e| UifError::at("record cache manifest for", dest, e))
}

/// What an in-place patch has to write.
#[derive(Debug, Default)]
struct PatchPlan {
    /// Chunks to fetch: hash → offsets in the new version.
    wanted: HashMap<Hash, Vec<u64>>,
    /// Fetch order (distinct hashes).
    order: Vec<ChunkRef>,
    /// Chunks found in the file at another offset, read before any write:
    /// (bytes, offsets in the new version).
    moved: Vec<(Vec<u8>, Vec<u64>)>,
    /// Chunks already in place.
    in_place: usize,
}

/// Plans patching `dest` (which holds `prev`) into `next`; `None` if more
/// than [`RELOCATE_BUDGET`] bytes moved (then rewriting is as cheap and
/// needs no memory). Moved chunks are read and verified here, before the
/// file is touched; one that does not verify is fetched instead.
fn plan_patch(prev: &Manifest, next: &Manifest, dest: &Path) -> Option<PatchPlan> {
    let at: HashMap<u64, ChunkRef> = prev.offsets().map(|(off, c)| (off, *c)).collect();
    let anywhere: HashMap<Hash, (u64, u32)> = prev
        .offsets()
        .map(|(off, c)| (c.hash, (off, c.len)))
        .collect();
    let mut plan = PatchPlan::default();
    let mut moved: HashMap<Hash, (u64, u32, Vec<u64>)> = HashMap::new();
    let mut moved_bytes = 0u64;
    for (off, c) in next.offsets() {
        if at.get(&off) == Some(c) {
            plan.in_place += 1;
        } else if let Some(places) = plan.wanted.get_mut(&c.hash) {
            places.push(off);
        } else if let Some((_, _, places)) = moved.get_mut(&c.hash) {
            places.push(off);
        } else if let Some(&(from, len)) = anywhere.get(&c.hash).filter(|(_, l)| *l == c.len) {
            moved_bytes += u64::from(len);
            if moved_bytes > RELOCATE_BUDGET {
                return None;
            }
            moved.insert(c.hash, (from, len, vec![off]));
        } else {
            plan.wanted.insert(c.hash, vec![off]);
            plan.order.push(*c);
        }
    }
    if !moved.is_empty() {
        let file = File::open(dest).ok()?;
        for (hash, (from, len, places)) in moved {
            let mut buf = vec![0u8; len as usize];
            let ok = file.read_exact_at(&mut buf, from).is_ok() && Hash::of(&buf) == hash;
            if ok {
                plan.moved.push((buf, places));
            } else {
                plan.order.push(ChunkRef { hash, len });
                plan.wanted.insert(hash, places);
            }
        }
    }
    Some(plan)
}

/// Patches `dest` into `manifest` following `plan`, behind the patch
/// marker. Returns (chunks fetched, chunks reused).
async fn patch(
    link: &HostLink,
    state_dir: &Path,
    user: &str,
    dest: &Path,
    manifest: &Manifest,
    plan: PatchPlan,
    parallel: usize,
) -> Result<(usize, usize), UifError> {
    let PatchPlan {
        wanted,
        order,
        moved,
        in_place,
    } = plan;
    let reused = in_place + moved.len();
    let size = manifest.header.size;
    let out = {
        let (state_dir, user, dest) = (
            state_dir.to_path_buf(),
            user.to_string(),
            dest.to_path_buf(),
        );
        blocking(move || {
            let out = OpenOptions::new()
                .write(true)
                .open(&dest)
                .map_err(|e| UifError::at("open", &dest, e))?;
            cache::begin_patch(&state_dir, &user)
                .map_err(|e| UifError::at("mark patch of", &dest, e))?;
            for (data, places) in &moved {
                for off in places {
                    out.write_all_at(data, *off)
                        .map_err(|e| UifError::at("patch", &dest, e))?;
                }
            }
            out.set_len(size)
                .map_err(|e| UifError::at("resize", &dest, e))?;
            Ok(out)
        })
        .await?
    };
    let fetched = fetch_missing(link, user, &out, wanted, order, parallel).await?;
    let dest2 = dest.to_path_buf();
    let written = blocking(move || {
        out.sync_all()
            .map_err(|e| UifError::at("fsync", &dest2, e))?;
        out.metadata()
            .map(|m| m.len())
            .map_err(|e| UifError::at("stat", &dest2, e))
    })
    .await?;
    if written != size {
        return Err(UifError::Protocol(format!(
            "patched {written} bytes for {user}, expected {size}"
        )));
    }
    let (sd, u, d, m) = (
        state_dir.to_path_buf(),
        user.to_string(),
        dest.to_path_buf(),
        manifest.clone(),
    );
    blocking(move || record(&sd, &u, &d, &m)).await?;
    Ok((fetched, reused))
}

/// Writes every chunk of `manifest` into `out`: from the cache when intact,
/// otherwise fetched (each distinct hash once, `parallel` at a time).
async fn fill(
    link: &HostLink,
    user: &str,
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
            let cache = cache::ChunkCache::open(&dest, previous, trusted);
            reuse_cached(&out, &cache, &manifest)
        })
        .await?
    };
    let fetched = fetch_missing(link, user, out, wanted, order, parallel).await?;
    Ok((fetched, reused))
}

/// Fetches the chunks in `order` (`parallel` requests in flight), verifies
/// each and writes it at its offsets in `wanted`. Returns the number
/// fetched.
///
/// The runtime thread only moves frames; verifying (BLAKE3) and writing
/// (a copy into the page cache) run on a blocking thread fed through a
/// bounded channel, so they overlap with receiving the next chunks and
/// heartbeats never wait behind them.
async fn fetch_missing(
    link: &HostLink,
    user: &str,
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
            out.write_all_at(&data, *off)
                .map_err(|e| UifError::io("write fetched chunk", e))?;
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
        if let Some(places) = wanted.get_mut(&c.hash) {
            places.push(off);
            continue;
        }
        match cache.get(&c.hash).filter(|d| d.len() == c.len as usize) {
            Some(data) => {
                out.write_all_at(&data, off)
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use uve_protocol::testdata::noise;

    use super::*;

    fn manifest(data: &[u8]) -> Manifest {
        uve_protocol::chunker::chunk_stream(data, |_, _| Ok(())).unwrap()
    }

    /// `prev` on disk, planned into `next`.
    fn plan(prev: &[u8], next: &[u8]) -> (Option<PatchPlan>, Manifest) {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("uif.img");
        std::fs::write(&dest, prev).unwrap();
        let next_m = manifest(next);
        (plan_patch(&manifest(prev), &next_m, &dest), next_m)
    }

    #[test]
    fn a_small_overwrite_fetches_only_the_chunks_it_touched() {
        let prev = noise(4 << 20, 1);
        let mut next = prev.clone();
        next[2_000_000..2_004_096].copy_from_slice(&noise(4096, 2));
        let (p, next_m) = plan(&prev, &next);
        let p = p.unwrap();
        assert!(p.moved.is_empty(), "nothing moved");
        assert!(
            (1..=3).contains(&p.order.len()),
            "{} fetched",
            p.order.len()
        );
        assert_eq!(
            p.in_place + p.wanted.values().map(Vec::len).sum::<usize>(),
            next_m.chunks.len()
        );
    }

    #[test]
    fn an_insertion_moves_chunks_read_from_the_file_and_verified() {
        let prev = noise(4 << 20, 3);
        let mut next = noise(1000, 4);
        next.extend_from_slice(&prev);
        let (p, next_m) = plan(&prev, &next);
        let p = p.unwrap();
        assert!(!p.moved.is_empty());
        for (bytes, places) in &p.moved {
            let h = Hash::of(bytes);
            let offsets: Vec<u64> = next_m
                .offsets()
                .filter(|(_, c)| c.hash == h)
                .map(|(off, _)| off)
                .collect();
            assert_eq!(
                &offsets, places,
                "each moved chunk goes where the new version has it"
            );
        }
        assert!(p.order.len() <= 2, "{} fetched", p.order.len());
    }

    #[test]
    fn beyond_the_relocation_budget_the_file_is_rewritten() {
        let big = usize::try_from(RELOCATE_BUDGET).unwrap() + (4 << 20);
        let prev = noise(big, 5);
        let mut next = noise(1000, 6);
        next.extend_from_slice(&prev);
        assert!(plan(&prev, &next).0.is_none());
    }

    #[test]
    fn a_moved_chunk_that_no_longer_verifies_is_fetched() {
        let prev = noise(2 << 20, 7);
        let mut next = noise(1000, 8);
        next.extend_from_slice(&prev);
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("uif.img");
        // The file no longer holds what its manifest says.
        std::fs::write(&dest, vec![0u8; prev.len()]).unwrap();
        let p = plan_patch(&manifest(&prev), &manifest(&next), &dest).unwrap();
        assert!(p.moved.is_empty());
        assert_eq!(p.order.len(), manifest(&next).chunks.len() - p.in_place);
    }
}
