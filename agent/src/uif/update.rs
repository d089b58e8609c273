//! UIF update (WIRE.md §8): `UpdateBegin`, the manifest in pages (the host
//! answers which chunks it lacks), the missing chunks (several in flight,
//! each re-verified as it is read back from the file), `UpdateCommit`. The
//! host commits only if the base and lease still hold; otherwise the upload
//! is kept as a conflict version.
//!
//! With protocol 2 and a base version, a missing chunk is sent as a block
//! delta when that is smaller: the host sends the digests of the
//! file-aligned 4 KiB blocks of the bytes the base version holds at the
//! chunk's offset (`BlockSignatures`, asked in batches ahead of the
//! uploads), and the agent sends only the blocks whose digest differs
//! (`ChunkDelta`). The
//! agent needs no old bytes or base manifest for this, so a spooled update
//! delivered after a restart gets deltas too.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use std::collections::VecDeque;

use crate::link::HostLink;
use tokio::task::{JoinHandle, JoinSet};
use uve_protocol::defs::{MAX_SIGNATURE_BATCH, PROTOCOL_BLOCK_DELTA};
use uve_protocol::delta;
use uve_protocol::link::LinkError;
use uve_protocol::manifest::{Hash, Manifest, chunks_per_page};
use uve_protocol::message::{
    BlockDigest, ChunkDelta, ErrorCode, Request, Response, UpdateBegin, Version,
};

use super::UifError;
use crate::stores::cache::FileId;

/// Chunk uploads kept in flight.
const UPLOAD_PARALLEL: usize = 8;

/// `BlockSignatures` requests kept in flight ahead of the chunks being sent.
const SIGNATURES_AHEAD: usize = 2;

/// How the host took an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateOutcome {
    /// The update is the user's new head.
    Committed(Version),
    /// Compare-and-swap failed; the upload is kept as a conflict version.
    Conflict {
        /// Version number the upload was kept under.
        kept_as: Version,
        /// The user's head at the time.
        head: Option<Version>,
    },
}

/// Uploads `file`, whose content `manifest` describes, as a new version.
/// On failure after `UpdateBegin` the upload is aborted (best effort).
///
/// Every chunk read back from the file is checked before it is sent: by
/// its hash, or, when `stamped` is the identity under which the file was
/// recorded as holding `manifest` (see [`super::cache::stamped_id`]), by
/// the open file still having that identity after the read (any write to
/// the file changes its ctime first), which costs an `fstat` instead of a
/// second BLAKE3 pass over every uploaded byte.
pub async fn upload(
    link: &HostLink,
    file: &Path,
    manifest: &Manifest,
    begin: UpdateBegin,
    stamped: Option<FileId>,
) -> Result<UpdateOutcome, UifError> {
    let started = Instant::now();
    let f = Arc::new(File::open(file).map_err(|e| UifError::at("open", file, e))?);
    let base = begin.base;
    let upload = match link.request(Request::UpdateBegin(begin)).await? {
        Response::UpdateAccepted { upload } => upload,
        other => return Err(unexpected("UpdateBegin", &other)),
    };
    // Block deltas need protocol 2 and a base version to diff against.
    let deltas = link.protocol() >= PROTOCOL_BLOCK_DELTA && base.is_some();
    match send_body(link, &f, manifest, upload, stamped, started, deltas).await {
        Ok(outcome) => Ok(outcome),
        // Uploads belong to the connection that opened them: on a live
        // link, `NotFound` for this one means the host expired it.
        Err(UifError::Link(LinkError::Remote(e)))
            if e.code == ErrorCode::NotFound && !link.is_closed() =>
        {
            tracing::warn!(upload, "the host expired the upload: {e}");
            Err(UifError::UploadExpired(upload))
        }
        Err(e) => {
            if !link.is_closed() {
                let _ = link
                    .request_timeout(
                        Request::UpdateAbort { upload },
                        std::time::Duration::from_secs(5),
                    )
                    .await;
            }
            Err(e)
        }
    }
}

/// Per-update transfer statistics (logged).
#[derive(Debug, Default)]
struct Sent {
    /// Chunk payload bytes sent (whole chunks and delta blocks).
    bytes: u64,
    /// Chunks sent whole.
    whole: usize,
    /// Chunks sent as block deltas.
    deltas: usize,
    /// Chunks re-hashed because the file's stamp did not vouch for them.
    hashed: usize,
}

/// A chunk the host lacks, read back and verified.
struct Pending {
    /// Its index in the manifest.
    index: u32,
    /// Its offset in the file.
    offset: u64,
    hash: Hash,
    data: Vec<u8>,
}

/// What one upload's body is sent from.
struct Body<'a> {
    link: &'a HostLink,
    f: &'a Arc<File>,
    manifest: &'a Manifest,
    offsets: Vec<u64>,
    upload: u64,
    stamped: Option<FileId>,
    deltas: bool,
}

impl Body<'_> {
    /// Lists `page` (chunks from `start`); returns the indices, into the
    /// whole chunk list, of those the host lacks.
    async fn list_page(&self, page: u32, start: usize, end: usize) -> Result<Vec<usize>, UifError> {
        let chunks = self
            .manifest
            .chunks
            .get(start..end)
            .unwrap_or_default()
            .to_vec();
        let n = chunks.len();
        let missing = match self
            .link
            .request(Request::UpdatePage {
                upload: self.upload,
                page,
                chunks,
            })
            .await?
        {
            Response::Missing(m) => m,
            other => return Err(unexpected("UpdatePage", &other)),
        };
        let mut global = Vec::with_capacity(missing.len());
        for idx in missing {
            if (idx as usize) >= n {
                return Err(UifError::Protocol(format!(
                    "host reported missing chunk {idx} outside page {page}"
                )));
            }
            global.push(start + idx as usize);
        }
        Ok(global)
    }

    /// Sends the chunks `missing`, [`UPLOAD_PARALLEL`] at a time: as block
    /// deltas where the host's signatures (asked a few batches ahead)
    /// make that smaller, else whole.
    async fn send_missing(&self, missing: &[usize], sent: &mut Sent) -> Result<(), UifError> {
        let mut inflight: JoinSet<Result<Sent, UifError>> = JoinSet::new();
        let (link, upload) = (self.link, self.upload);
        let mut batches = missing.chunks(if self.deltas {
            MAX_SIGNATURE_BATCH as usize
        } else {
            missing.len().max(1)
        });
        let mut ahead: VecDeque<(Vec<usize>, Option<JoinHandle<SigResult>>)> = VecDeque::new();
        loop {
            while ahead.len() < SIGNATURES_AHEAD {
                let Some(b) = batches.next() else { break };
                let task = self
                    .deltas
                    .then(|| tokio::spawn(signatures(link.clone(), upload, b.to_vec())));
                ahead.push_back((b.to_vec(), task));
            }
            let Some((batch, task)) = ahead.pop_front() else {
                break;
            };
            let sigs = match task {
                Some(t) => t
                    .await
                    .map_err(|e| UifError::Task(format!("signature task: {e}")))??,
                None => vec![None; batch.len()],
            };
            for (i, sig) in batch.into_iter().zip(sigs) {
                while inflight.len() >= UPLOAD_PARALLEL {
                    join_one(&mut inflight, sent).await?;
                }
                let p = read_chunk(self.f, self.manifest, &self.offsets, i, self.stamped, sent)?;
                inflight.spawn(send_chunk(link.clone(), upload, p, sig));
            }
        }
        while !inflight.is_empty() {
            join_one(&mut inflight, sent).await?;
        }
        Ok(())
    }
}

async fn send_body(
    link: &HostLink,
    f: &Arc<File>,
    manifest: &Manifest,
    upload: u64,
    stamped: Option<FileId>,
    started: Instant,
    deltas: bool,
) -> Result<UpdateOutcome, UifError> {
    let mut sent = Sent::default();
    let body = Body {
        link,
        f,
        manifest,
        offsets: manifest.offsets().map(|(off, _)| off).collect(),
        upload,
        stamped,
        deltas,
    };
    let per = chunks_per_page(link.max_frame()) as usize;
    let (mut start, mut page) = (0usize, 0u32);
    loop {
        let end = (start + per).min(manifest.chunks.len());
        let missing = body.list_page(page, start, end).await?;
        body.send_missing(&missing, &mut sent).await?;
        page += 1;
        start = end;
        if start >= manifest.chunks.len() {
            break;
        }
    }
    let chunks_ms = started.elapsed().as_millis();
    let t = Instant::now();
    let answer = link.request(Request::UpdateCommit { upload }).await?;
    tracing::info!(
        upload,
        chunks_ms,
        commit_ms = t.elapsed().as_millis(),
        sent = sent.bytes,
        whole = sent.whole,
        deltas = sent.deltas,
        rehashed = sent.hashed,
        "update: chunks sent, commit answered"
    );
    match answer {
        Response::Committed { version } => Ok(UpdateOutcome::Committed(version)),
        Response::Conflict { kept_as, head } => Ok(UpdateOutcome::Conflict { kept_as, head }),
        other => Err(unexpected("UpdateCommit", &other)),
    }
}

/// Reads chunk `i` back from the file and checks it still is that chunk:
/// by the file's stamp when it vouches for the manifest, else by hash.
fn read_chunk(
    f: &File,
    manifest: &Manifest,
    offsets: &[u64],
    i: usize,
    stamped: Option<FileId>,
    sent: &mut Sent,
) -> Result<Pending, UifError> {
    let (Some(c), Some(off)) = (manifest.chunks.get(i), offsets.get(i)) else {
        return Err(UifError::Protocol(format!(
            "chunk {i} is not in the manifest"
        )));
    };
    let mut data = vec![0u8; c.len as usize];
    if crate::base::fault::hit("upload-read") {
        let eio = std::io::Error::from_raw_os_error(libc::EIO);
        return Err(UifError::io("read chunk to upload", eio));
    }
    f.read_exact_at(&mut data, *off)
        .map_err(|e| UifError::io("read chunk to upload", e))?;
    let unchanged = stamped.is_some_and(|id| FileId::of_file(f) == Some(id));
    if !unchanged {
        sent.hashed += 1;
        if !uve_protocol::chunker::chunk_matches(c, &data) {
            return Err(UifError::Changed);
        }
    }
    let index = u32::try_from(i).map_err(|_| UifError::Protocol("chunk index overflow".into()))?;
    Ok(Pending {
        index,
        offset: *off,
        hash: c.hash,
        data,
    })
}

type SigResult = Result<Vec<Option<Vec<BlockDigest>>>, UifError>;

/// Asks the host for the base-chunk signatures of chunks `indices`. A
/// host that refuses the request gets those chunks whole.
async fn signatures(link: HostLink, upload: u64, indices: Vec<usize>) -> SigResult {
    let chunks = indices
        .iter()
        .map(|&i| u32::try_from(i).map_err(|_| UifError::Protocol("chunk index overflow".into())))
        .collect::<Result<Vec<u32>, _>>()?;
    let n = chunks.len();
    match link
        .request(Request::BlockSignatures { upload, chunks })
        .await
    {
        Ok(Response::BlockSignatures(sigs)) if sigs.len() == n => Ok(sigs),
        Ok(other) => Err(unexpected("BlockSignatures", &other)),
        Err(LinkError::Remote(e)) => {
            tracing::warn!(
                upload,
                "host refused block signatures ({e}); sending whole chunks"
            );
            Ok(vec![None; n])
        }
        Err(e) => Err(e.into()),
    }
}

/// Sends one chunk: as a delta against its base bytes when the host sent
/// their block digests and the differing blocks are smaller than the
/// chunk, else whole. A delta the host cannot apply (base gone, or the
/// rebuilt chunk does not match: a block digest collision) is resent whole.
async fn send_chunk(
    link: HostLink,
    upload: u64,
    p: Pending,
    base: Option<Vec<BlockDigest>>,
) -> Result<Sent, UifError> {
    let blocks = base.and_then(|digests| {
        let blocks = delta::diff(p.offset, &p.data, &digests)?;
        let size = delta::DELTA_FIXED_WIRE + delta::blocks_wire_size(&blocks);
        (size < p.data.len()).then_some(blocks)
    });
    if let Some(blocks) = blocks {
        let bytes: u64 = blocks.iter().map(|b| b.data.len() as u64).sum();
        let request = Request::ChunkDelta(ChunkDelta {
            upload,
            index: p.index,
            hash: p.hash,
            blocks,
        });
        match link.request(request).await {
            Ok(Response::Ok) => {
                return Ok(Sent {
                    bytes,
                    deltas: 1,
                    ..Sent::default()
                });
            }
            Err(LinkError::Remote(e))
                if matches!(e.code, ErrorCode::NotFound | ErrorCode::BadChunk) =>
            {
                tracing::warn!(chunk = %p.hash, "delta refused ({e}); sending the chunk whole");
            }
            Ok(other) => return Err(unexpected("ChunkDelta", &other)),
            Err(e) => return Err(e.into()),
        }
    }
    let bytes = p.data.len() as u64;
    match link
        .request(Request::ChunkUpload {
            upload,
            hash: p.hash,
            data: p.data,
        })
        .await?
    {
        Response::Ok => Ok(Sent {
            bytes,
            whole: 1,
            ..Sent::default()
        }),
        other => Err(unexpected("ChunkUpload", &other)),
    }
}

async fn join_one(
    set: &mut JoinSet<Result<Sent, UifError>>,
    total: &mut Sent,
) -> Result<(), UifError> {
    match set.join_next().await {
        Some(r) => {
            let s = r.map_err(|e| UifError::Task(format!("upload task: {e}")))??;
            total.bytes += s.bytes;
            total.whole += s.whole;
            total.deltas += s.deltas;
            Ok(())
        }
        None => Ok(()),
    }
}

fn unexpected(what: &str, got: &Response) -> UifError {
    UifError::Protocol(format!("unexpected answer to {what}: {got:?}"))
}
