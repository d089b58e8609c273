//! Per-upload stages of the S3 store, on the host's local disk:
//! `<staging dir>/<stage>/<64 hex>` files, written by one upload only. The
//! bucket sees no chunk of an upload before its commit: `publish` PUTs each
//! staged chunk once, to its content key, and deletes the stage; `discard`
//! (an abandoned upload) deletes the local files and never touches the
//! bucket, so it cannot take a chunk another upload, on this host or
//! another, is about to reference. The staging directory belongs to one
//! store: what a crashed or killed process left there is deleted at open.

use std::path::{Path, PathBuf};

use futures_util::{StreamExt, stream};
use object_store::path::Path as Key;
use object_store::{ObjectStoreExt, PutPayload};
use uve_protocol::manifest::Hash;

use super::{S3Store, remote};
use crate::store::{StageId, StoreError, StoreResult, check_chunk, durable, now_ms};

/// What publishing one chunk takes.
enum Publish {
    /// PUT the staged file to the chunk's key.
    Staged(PathBuf),
    /// Not staged here: it must be stored already (a HEAD tells).
    Stored,
}

impl S3Store {
    /// Prepares `dir` as this store's staging directory: created if
    /// missing, emptied of the stages of an earlier run. Returns how many
    /// entries were removed.
    pub(super) fn open_staging(dir: &Path) -> StoreResult<usize> {
        durable::clear_dir(dir)
            .map_err(|e| StoreError::io(format!("prepare staging directory {}", dir.display()), e))
    }

    fn stage_dir(&self, stage: &StageId) -> PathBuf {
        self.staging.join(stage.as_str())
    }

    /// `UifStore::stage_chunk`: one local file, no request (none at all if
    /// the chunk is known to be stored and fresh).
    pub(super) fn put_staged(&self, stage: &StageId, hash: &Hash, data: &[u8]) -> StoreResult<u64> {
        check_chunk(hash, data)?;
        if self.known_fresh(hash) {
            return Ok(0);
        }
        let dir = self.stage_dir(stage);
        let path = dir.join(hash.to_hex());
        if path.is_file() {
            return Ok(0);
        }
        std::fs::create_dir_all(&dir).map_err(|e| StoreError::io("create stage directory", e))?;
        // No fsync: the bucket holds the chunk durably once `publish` has
        // PUT it; a crash before that loses the upload, which the agent
        // retries.
        durable::write_unsynced(&dir, &path, data).map_err(|e| StoreError::io("stage chunk", e))?;
        Ok(data.len() as u64)
    }

    /// `UifStore::publish`: each chunk staged here is PUT once to its
    /// content key (`concurrency` at a time; a fresh `Last-Modified` keeps
    /// it from any host's GC until the commit references it); a chunk not
    /// staged here must be stored already. Then the stage is deleted.
    pub(super) fn publish_stage(&self, stage: &StageId, hashes: &[Hash]) -> StoreResult<()> {
        let dir = self.stage_dir(stage);
        let jobs: Vec<(Hash, Key, Publish)> = hashes
            .iter()
            .filter_map(|h| {
                let file = dir.join(h.to_hex());
                let how = if file.is_file() {
                    Publish::Staged(file)
                } else if self.known_fresh(h) {
                    return None;
                } else {
                    Publish::Stored
                };
                Some((*h, self.chunk_key(h), how))
            })
            .collect();
        let (s3, started, n) = (self.s3.clone(), std::time::Instant::now(), jobs.len());
        // Each PUT is a task of its own: signing hashes the payload, CPU
        // work that one task driving them all would do on one thread.
        let results: Vec<StoreResult<(Hash, Option<u64>)>> = self.block_on(
            stream::iter(jobs)
                .map(|(h, key, how)| {
                    let task = tokio::spawn(publish_one(s3.clone(), h, key, how));
                    async move { task.await.map_err(|e| remote("publish a chunk", e))? }
                })
                .buffer_unordered(self.concurrency)
                .collect(),
        );
        tracing::debug!(
            stage = stage.as_str(),
            chunks = n,
            elapsed_ms = started.elapsed().as_millis(),
            "stage published"
        );
        for r in results {
            if let (h, Some(modified)) = r? {
                self.remember(h, modified);
            }
        }
        if let Err(e) = self.remove_stage(stage) {
            tracing::warn!(stage = stage.as_str(), error = %e, "published stage not removed");
        }
        Ok(())
    }

    /// `UifStore::discard`: deletes the stage's local files. Nothing in the
    /// bucket is touched.
    pub(super) fn discard_stage(&self, stage: &StageId) -> StoreResult<()> {
        self.remove_stage(stage)
            .map_err(|e| StoreError::io("delete an upload's stage", e))
    }

    fn remove_stage(&self, stage: &StageId) -> std::io::Result<()> {
        match std::fs::remove_dir_all(self.stage_dir(stage)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// Publishes one chunk (see [`S3Store::publish_stage`]): the chunk and its
/// `Last-Modified` (ms) as now known.
async fn publish_one(
    s3: std::sync::Arc<object_store::aws::AmazonS3>,
    h: Hash,
    key: Key,
    how: Publish,
) -> StoreResult<(Hash, Option<u64>)> {
    match how {
        Publish::Staged(file) => {
            let data = tokio::fs::read(&file)
                .await
                .map_err(|e| StoreError::io("read staged chunk", e))?;
            s3.put(&key, PutPayload::from(data))
                .await
                .map_err(|e| remote(format!("publish {key}"), e))?;
            Ok((h, Some(now_ms())))
        }
        Publish::Stored => match s3.head(&key).await {
            Ok(m) => Ok((
                h,
                Some(u64::try_from(m.last_modified.timestamp_millis()).unwrap_or(0)),
            )),
            Err(object_store::Error::NotFound { .. }) => Err(StoreError::MissingChunk(h)),
            Err(e) => Err(remote(format!("check {key}"), e)),
        },
    }
}
