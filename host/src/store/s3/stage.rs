//! Per-upload stages on the shared store: `<prefix>/staging/<stage>/<64 hex>`
//! objects, written by one upload only, copied under `chunks/` by its
//! commit and deleted by its commit or its end. Stages a crashed host left
//! behind are swept by GC once older than the grace period.

use futures_util::{StreamExt, stream};
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use uve_protocol::manifest::Hash;

use super::{S3Store, remote};
use crate::store::{StageId, StoreError, StoreResult, check_chunk, now_ms};

impl S3Store {
    fn stage_key(&self, stage: &StageId, hash: &Hash) -> Path {
        self.key(&format!("staging/{}/{}", stage.as_str(), hash.to_hex()))
    }

    /// `UifStore::stage_chunk`: one PUT under the stage (none if the chunk
    /// is known to be stored and fresh).
    pub(super) fn put_staged(&self, stage: &StageId, hash: &Hash, data: &[u8]) -> StoreResult<u64> {
        check_chunk(hash, data)?;
        if self.known_fresh(hash) {
            return Ok(0);
        }
        let key = self.stage_key(stage, hash);
        let payload = PutPayload::from(data.to_vec());
        let s3 = self.s3.clone();
        self.block_on(async move { s3.put(&key, payload).await })
            .map_err(|e| remote("stage chunk", e))?;
        Ok(data.len() as u64)
    }

    /// `UifStore::publish`: a server-side copy of each staged chunk under
    /// `chunks/` (a fresh `Last-Modified` there, as a PUT would give), then
    /// the staged objects are deleted.
    pub(super) fn publish_stage(&self, stage: &StageId, hashes: &[Hash]) -> StoreResult<()> {
        let s3 = self.s3.clone();
        let jobs: Vec<(Hash, Path, Path)> = hashes
            .iter()
            .map(|h| (*h, self.stage_key(stage, h), self.chunk_key(h)))
            .collect();
        let results: Vec<StoreResult<Hash>> = self.block_on(
            stream::iter(jobs)
                .map(|(h, from, to)| {
                    let s3 = s3.clone();
                    async move {
                        match s3.copy(&from, &to).await {
                            Ok(()) => {}
                            // Not staged here: it must be stored already.
                            Err(object_store::Error::NotFound { .. }) => match s3.head(&to).await {
                                Ok(_) => return Ok(h),
                                Err(object_store::Error::NotFound { .. }) => {
                                    return Err(StoreError::MissingChunk(h));
                                }
                                Err(e) => return Err(remote(format!("check {to}"), e)),
                            },
                            Err(e) => return Err(remote(format!("publish {from}"), e)),
                        }
                        let _ = s3.delete(&from).await;
                        Ok(h)
                    }
                })
                .buffer_unordered(self.concurrency)
                .collect(),
        );
        let now = now_ms();
        for r in results {
            self.remember(r?, now);
        }
        Ok(())
    }

    /// `UifStore::discard`: deletes the staged objects (a missing one is
    /// fine: it was never written, or already deleted).
    pub(super) fn discard_stage(&self, stage: &StageId, hashes: &[Hash]) -> StoreResult<()> {
        let s3 = self.s3.clone();
        let keys: Vec<Path> = hashes.iter().map(|h| self.stage_key(stage, h)).collect();
        let results: Vec<Result<(), object_store::Error>> = self.block_on(
            stream::iter(keys)
                .map(|key| {
                    let s3 = s3.clone();
                    async move {
                        match s3.delete(&key).await {
                            Err(object_store::Error::NotFound { .. }) => Ok(()),
                            r => r,
                        }
                    }
                })
                .buffer_unordered(self.concurrency)
                .collect(),
        );
        results
            .into_iter()
            .collect::<Result<Vec<()>, _>>()
            .map(|_| ())
            .map_err(|e| remote("delete an upload's stage", e))
    }
}
