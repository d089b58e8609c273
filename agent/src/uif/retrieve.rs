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
//!   the whole file changes anyway and is rewritten). When the versions'
//!   sizes differ by whole filesystem blocks, the range where they first
//!   differ is inserted or collapsed first (`fallocate`, ext4 and XFS), so
//!   that after a block-aligned insertion or deletion the rest of the file
//!   is in place again; a filesystem that cannot gets the file rewritten. A durable marker
//!   ([`cache::begin_patch`]) is set before the first write and removed once
//!   the file, its manifest and its new stamp are durable: a retrieve that
//!   finds it (crash, dropped connection mid-patch) treats the file as
//!   unknown and takes the rewrite path, verifying every cached chunk.
//! - **Rewrite**: temp → fsync → rename into place; until the rename the
//!   previous file is untouched.

use std::path::Path;
use std::time::Instant;

use crate::link::HostLink;
use uve_protocol::manifest::{ChunkRef, Hash, Manifest, chunks_per_page, page_count};
use uve_protocol::message::{Request, Response, Version};
use uve_protocol::names::{SessionId, UserName};

use super::{UifError, blocking};
use crate::base::fsutil::{self, DurableFile};
use crate::stores::cache;

mod fetch;
mod patch;

use fetch::fill;
use patch::{patch, plan_patch};

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
    user: &'a UserName,
    dest: &'a Path,
    parallel: usize,
}

/// Retrieves `user`'s head into `dest`, reusing chunks of the file already
/// at `dest` (described by the cached manifest under `state_dir`).
pub async fn retrieve(
    link: &HostLink,
    state_dir: &Path,
    user: &UserName,
    session: &SessionId,
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
            user: user.clone(),
            session: session.clone(),
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
            %user,
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
        let digest = empty.header.digest;
        self.write_and_record(empty, write_empty).await?;
        Ok(digest)
    }

    /// Off the runtime thread: `write` makes the destination hold
    /// `manifest`, which is then recorded (see [`record`]).
    async fn write_and_record(
        &self,
        manifest: Manifest,
        write: impl FnOnce(&Path) -> Result<(), UifError> + Send + 'static,
    ) -> Result<(), UifError> {
        let (sd, u, d) = (
            self.state_dir.to_path_buf(),
            self.user.to_string(),
            self.dest.to_path_buf(),
        );
        blocking(move || {
            write(&d)?;
            record(&sd, &u, &d, &manifest)
        })
        .await
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
                    user: self.user.clone(),
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
                user = %self.user,
                "chunks moved by more than {RELOCATE_BUDGET} bytes: rewriting the UIF file"
            );
            return Ok(None);
        };
        let t = Instant::now();
        let shift = plan.shift();
        let Some((fetched, reused)) = patch(
            self.link,
            self.state_dir,
            self.user,
            self.dest,
            manifest,
            plan,
            self.parallel,
        )
        .await?
        else {
            tracing::info!(
                user = %self.user,
                ?shift,
                "the file's filesystem cannot insert or collapse a range: rewriting the UIF file"
            );
            return Ok(None);
        };
        tracing::info!(
            user = %self.user,
            version,
            manifest_ms,
            patch_ms = t.elapsed().as_millis(),
            fetched,
            reused,
            shifted = ?shift,
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
        // The user's lock makes this the file's only writer.
        let out =
            DurableFile::create_sole(dest).map_err(|e| UifError::at("create a new", dest, e))?;
        let t = Instant::now();
        // On an error `out` is dropped, and its temp file with it.
        let (fetched, reused) = fill(
            self.link,
            user,
            dest,
            out.file(),
            manifest,
            previous,
            self.parallel,
        )
        .await?;
        let chunks_ms = t.elapsed().as_millis();
        let t = Instant::now();
        self.settle(out, manifest, version).await?;
        tracing::info!(
            %user,
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
        out: DurableFile,
        manifest: &Manifest,
        version: Version,
    ) -> Result<(), UifError> {
        let size = manifest.header.size;
        let u = self.user.to_string();
        self.write_and_record(manifest.clone(), move |d| {
            let written = out
                .file()
                .metadata()
                .map(|m| m.len())
                .map_err(|e| UifError::at("stat", out.temp_path(), e))?;
            if written != size {
                return Err(UifError::Protocol(format!(
                    "assembled {written} bytes for {u} version {version}, expected {size}"
                )));
            }
            out.publish().map_err(|e| UifError::at("publish", d, e))
        })
        .await
    }
}

/// Records that `dest` now holds `manifest` (see [`cache::record`]) with a
/// stamp, waiting up to [`cache::RACY`] for the just-written file's ctime
/// to settle: then a logout that finds the file unchanged need not re-read
/// it, and a later retrieve may patch it.
pub(super) fn record(
    state_dir: &Path,
    user: &str,
    dest: &Path,
    manifest: &Manifest,
) -> Result<(), UifError> {
    cache::record(state_dir, user, manifest, cache::settled_id(dest))
        .map_err(|e| UifError::at("record cache manifest for", dest, e))
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

pub(super) fn unexpected(what: &str, got: &Response) -> UifError {
    UifError::Protocol(format!("unexpected answer to {what}: {got:?}"))
}
