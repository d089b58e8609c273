//! Request bodies too large for memory (UIF imports, UA bundles) are
//! spooled to a temp file in the daemon's temp directory, with a size limit
//! checked while streaming and the BLAKE3 digest computed on the way. The
//! file is removed when the [`Spooled`] guard drops.

use std::path::{Path, PathBuf};

use axum::body::Body;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use uve_protocol::manifest::Hash;

use super::ApiError;
use super::types::ApiErrorCode;

/// A spooled body.
pub struct Spooled {
    /// The temp file.
    pub path: PathBuf,
    /// Its size.
    pub size: u64,
    /// Its BLAKE3 digest.
    pub digest: Hash,
}

impl Drop for Spooled {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Writes `body` to a temp file in `dir`, refusing more than `limit` bytes.
pub async fn spool(body: Body, dir: &Path, limit: u64) -> Result<Spooled, ApiError> {
    let path = crate::store::durable::temp_path(dir);
    let mut spooled = Spooled {
        path,
        size: 0,
        digest: Hash([0; 32]),
    };
    let mut file = tokio::fs::File::create(&spooled.path)
        .await
        .map_err(|e| ApiError::internal(format!("spool file: {e}")))?;
    let mut hasher = blake3::Hasher::new();
    let mut stream = body.into_data_stream();
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|e| ApiError::bad_request(format!("reading body: {e}")))?;
        spooled.size += piece.len() as u64;
        if spooled.size > limit {
            return Err(ApiError::new(
                ApiErrorCode::TooLarge,
                format!("body exceeds the limit of {limit} bytes"),
            ));
        }
        hasher.update(&piece);
        file.write_all(&piece)
            .await
            .map_err(|e| ApiError::internal(format!("spool file: {e}")))?;
    }
    file.flush()
        .await
        .map_err(|e| ApiError::internal(format!("spool file: {e}")))?;
    spooled.digest = Hash(*hasher.finalize().as_bytes());
    Ok(spooled)
}
