//! Garbage collection on the shared store: mark from every head object,
//! sweep chunks and manifests nothing refers to that are older than the
//! grace period (see the parent's *GC with several hosts*).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt, stream};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use uve_protocol::manifest::{Hash, ZERO_BLOCK};

use super::{S3Store, remote};
use crate::store::{GcReport, StoreResult, UifStore, now_ms};

/// What a GC mark found: every referenced chunk, and per user the digests
/// of the manifests its head object names.
struct Marked {
    chunks: HashSet<Hash>,
    manifests: HashMap<String, HashSet<Hash>>,
}

impl S3Store {
    /// `UifStore::gc` on the shared store (see the parent's *GC with
    /// several hosts*).
    pub(super) fn collect(&self, grace: Duration) -> StoreResult<GcReport> {
        // Other hosts trust that chunks younger than the configured grace
        // survive until their commit; a shorter grace asked for here (e.g.
        // `POST /v1/gc?grace_secs=0`) would break that promise.
        let floor = self.fresh * 2;
        if grace < floor {
            tracing::warn!(
                asked = grace.as_secs(),
                used = floor.as_secs(),
                "GC grace raised to the configured gc_grace_secs: the S3 store is shared"
            );
        }
        let grace = grace.max(floor);
        let cutoff = now_ms().saturating_sub(u64::try_from(grace.as_millis()).unwrap_or(u64::MAX));
        let referenced = self.mark()?.chunks;
        let mut report = GcReport::default();
        let mut candidates = Vec::new();
        for meta in self.list("chunks")? {
            let Some(hash) = meta.location.filename().and_then(Hash::from_hex) else {
                continue;
            };
            report.scanned += 1;
            if referenced.contains(&hash) {
                report.referenced += 1;
                continue;
            }
            let young = u64::try_from(meta.last_modified.timestamp_millis()).unwrap_or(0) >= cutoff;
            if young || self.pins.is_pinned(&hash) {
                report.spared += 1;
                continue;
            }
            candidates.push(hash);
        }
        // Commits that landed while we listed: mark again.
        let Marked {
            chunks: referenced,
            manifests,
        } = self.mark()?;
        let before = candidates.len();
        candidates.retain(|h| !referenced.contains(h) && !self.pins.is_pinned(h));
        report.spared += (before - candidates.len()) as u64;
        for h in &candidates {
            self.forget(h);
        }
        let keys = candidates.iter().map(|h| self.chunk_key(h)).collect();
        let (deleted, bytes) = self.delete_if_old(keys, cutoff);
        report.deleted = deleted;
        report.bytes_freed = bytes;
        report.spared += candidates.len() as u64 - deleted;
        // Manifests no head object names (pruned versions, a crashed
        // commit), stages hosts of earlier versions kept in the bucket,
        // self-test leftovers.
        let mut stale = Vec::new();
        for (user, keep) in &manifests {
            for meta in self.list(&format!("users/{user}/m"))? {
                let named = meta
                    .location
                    .filename()
                    .and_then(Hash::from_hex)
                    .is_some_and(|d| keep.contains(&d));
                if !named {
                    stale.push(meta.location);
                }
            }
        }
        stale.extend(self.list("staging")?.into_iter().map(|m| m.location));
        stale.extend(self.list("selftest")?.into_iter().map(|m| m.location));
        self.delete_if_old(stale, cutoff);
        Ok(report)
    }

    /// Every chunk or manifest referred to by some retained version.
    fn mark(&self) -> StoreResult<Marked> {
        let mut chunks = HashSet::from([ZERO_BLOCK.hash]);
        let mut manifests = HashMap::new();
        for user in self.users()? {
            let state = self.read_head(&user)?.state;
            let mut digests = HashSet::new();
            for info in &state.versions {
                digests.insert(Self::version_digest(info)?);
            }
            chunks.extend(self.referenced(&user, &state)?);
            manifests.insert(user, digests);
        }
        Ok(Marked { chunks, manifests })
    }

    fn list(&self, rel: &str) -> StoreResult<Vec<object_store::ObjectMeta>> {
        let key = self.key(rel);
        let s3 = self.s3.clone();
        self.block_on(async move { s3.list(Some(&key)).try_collect::<Vec<_>>().await })
            .map_err(|e| remote(format!("list {rel}"), e))
    }

    /// Deletes `keys` whose `Last-Modified` is still older than `cutoff_ms`
    /// when looked at right before; returns (deleted, bytes).
    fn delete_if_old(&self, keys: Vec<Path>, cutoff_ms: u64) -> (u64, u64) {
        let s3 = self.s3.clone();
        let results: Vec<Option<u64>> = self.block_on(
            stream::iter(keys)
                .map(|key| {
                    let s3 = s3.clone();
                    async move {
                        let meta = s3.head(&key).await.ok()?;
                        let modified =
                            u64::try_from(meta.last_modified.timestamp_millis()).unwrap_or(0);
                        if modified >= cutoff_ms {
                            return None;
                        }
                        s3.delete(&key).await.ok().map(|()| meta.size)
                    }
                })
                .buffer_unordered(self.concurrency)
                .collect(),
        );
        results
            .into_iter()
            .flatten()
            .fold((0, 0), |(n, b), size| (n + 1, b + size))
    }
}
