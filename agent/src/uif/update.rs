//! UIF update (WIRE.md §7): `UpdateBegin`, the manifest in pages (the host
//! answers which chunks it lacks), the missing chunks (several in flight,
//! each re-verified as it is read back from the file), `UpdateCommit`. The
//! host commits only if the base and lease still hold; otherwise the upload
//! is kept as a conflict version.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::conn::HostLink;
use tokio::task::JoinSet;
use uve_protocol::manifest::{Manifest, chunks_per_page};
use uve_protocol::message::{Request, Response, UpdateBegin, Version};

use super::UifError;
use super::cache::FileId;

/// Chunk uploads kept in flight.
const UPLOAD_PARALLEL: usize = 8;

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
    let upload = match link.request(Request::UpdateBegin(begin)).await? {
        Response::UpdateAccepted { upload } => upload,
        other => return Err(unexpected("UpdateBegin", &other)),
    };
    match send_body(link, &f, manifest, upload, stamped, started).await {
        Ok(outcome) => Ok(outcome),
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

async fn send_body(
    link: &HostLink,
    f: &Arc<File>,
    manifest: &Manifest,
    upload: u64,
    stamped: Option<FileId>,
    started: Instant,
) -> Result<UpdateOutcome, UifError> {
    let (mut sent, mut hashed) = (0u64, 0usize);
    let offsets: Vec<u64> = manifest.offsets().map(|(off, _)| off).collect();
    let per = chunks_per_page(link.max_frame()) as usize;
    let mut start = 0usize;
    let mut page = 0u32;
    loop {
        let end = (start + per).min(manifest.chunks.len());
        let chunks = manifest.chunks.get(start..end).unwrap_or_default().to_vec();
        let missing = match link
            .request(Request::UpdatePage {
                upload,
                page,
                chunks: chunks.clone(),
            })
            .await?
        {
            Response::Missing(m) => m,
            other => return Err(unexpected("UpdatePage", &other)),
        };
        let mut inflight: JoinSet<Result<(), UifError>> = JoinSet::new();
        for idx in missing {
            let i = idx as usize;
            let (Some(c), Some(off)) = (chunks.get(i), offsets.get(start + i)) else {
                return Err(UifError::Protocol(format!(
                    "host reported missing chunk {idx} outside page {page}"
                )));
            };
            while inflight.len() >= UPLOAD_PARALLEL {
                join_one(&mut inflight).await?;
            }
            let mut data = vec![0u8; c.len as usize];
            f.read_exact_at(&mut data, *off)
                .map_err(|e| UifError::io("read chunk to upload", e))?;
            let unchanged = stamped.is_some_and(|id| FileId::of_file(f) == Some(id));
            if !unchanged {
                hashed += 1;
                if !uve_protocol::chunker::chunk_matches(c, &data) {
                    return Err(UifError::Changed);
                }
            }
            sent += u64::from(c.len);
            let link = link.clone();
            let hash = c.hash;
            inflight.spawn(async move {
                match link
                    .request(Request::ChunkUpload { upload, hash, data })
                    .await?
                {
                    Response::Ok => Ok(()),
                    other => Err(unexpected("ChunkUpload", &other)),
                }
            });
        }
        while !inflight.is_empty() {
            join_one(&mut inflight).await?;
        }
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
        sent,
        rehashed = hashed,
        "update: chunks sent, commit answered"
    );
    match answer {
        Response::Committed { version } => Ok(UpdateOutcome::Committed(version)),
        Response::Conflict { kept_as, head } => Ok(UpdateOutcome::Conflict { kept_as, head }),
        other => Err(unexpected("UpdateCommit", &other)),
    }
}

async fn join_one(set: &mut JoinSet<Result<(), UifError>>) -> Result<(), UifError> {
    match set.join_next().await {
        Some(r) => r.map_err(|e| UifError::Protocol(format!("upload task failed: {e}")))?,
        None => Ok(()),
    }
}

fn unexpected(what: &str, got: &Response) -> UifError {
    UifError::Protocol(format!("unexpected answer to {what}: {got:?}"))
}
