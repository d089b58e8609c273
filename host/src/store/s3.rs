//! [`S3Store`]: the UIF store on S3-compatible object storage, shared by
//! every hypervisor host of a Data Centre.
//!
//! ```text
//! <prefix>/chunks/<64 hex>            chunk bytes: content-addressed, immutable
//! <prefix>/users/<user>/head.json     head object: head, next number, retained versions
//! <prefix>/users/<user>/m/<64 hex>    manifest (postcard), keyed by its manifest digest
//! <prefix>/staging/…                 stages of hosts before local staging (swept by GC)
//! <prefix>/selftest/<nonce>           start-up self-test objects (deleted after)
//! ```
//!
//! **Staging.** An upload's chunks wait on the host's local disk (see
//! `stage`) and are PUT once, to their content keys, by its commit: the
//! bucket never holds a chunk of an abandoned upload, and reclaiming one
//! never deletes an object.
//!
//! **Commit point.** Chunks and manifests are written first with plain
//! PUTs under content-derived keys (idempotent; a racing writer can only
//! write the same bytes). The small per-user head object is then replaced
//! by compare-and-swap: `If-None-Match: *` for a user's first version,
//! `If-Match: <ETag read before>` after. A precondition failure means
//! another host changed the head: the state is read again and the decision
//! (head or conflict version) re-made, exactly as the local store decides
//! under its lock. Each write carries a nonce, so a PUT that succeeded but
//! whose answer was lost (and got a 412 on retry) is recognised as ours.
//! Multipart uploads are never used for the CAS (RGW ignores conditions on
//! CompleteMultipartUpload).
//!
//! **Start-up self-test.** [`S3Store::open`] checks on the real bucket that
//! a second create fails and that a stale `If-Match` fails, and finds out
//! whether the server wants the ETag quoted in `If-Match` (Ceph RGW wants
//! it bare). A server that ignores either condition is refused.
//!
//! **GC with several hosts.** Any host may collect. A chunk is deleted
//! only if no retained version of any user refers to it (marked from every
//! head object, read again after listing to catch commits that landed
//! meanwhile), it is not pinned here, its `Last-Modified` is older than the
//! grace period, and a HEAD right before the DELETE still says so. The other
//! side of the bargain is in commit: a chunk the new version refers to that
//! no retained version of the user refers to, and that this process has
//! not seen written within half the grace period, is checked and, if old,
//! rewritten (GET + PUT) before the head moves, so that it is young again
//! when it becomes referenced. What remains is the gap between one GC's
//! HEAD and its DELETE (one round trip) meeting such a rewrite.

mod gc;
mod head;
mod selftest;
mod stage;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{StreamExt, stream};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use uve_protocol::manifest::{Hash, Manifest};
use uve_protocol::message::Version;
use uve_protocol::names;

pub use super::S3Config;

use super::{
    Charge, ChunkPins, CommitOutcome, GcReport, Holdings, NewVersion, PinTable, QuotaBase, StageId,
    StoreError, StorePolicy, StoreResult, UifStore, UserEdit, UserState, VersionInfo, check_chunk,
    now_ms, quota, user_names,
};

/// How many times a commit re-reads the head after losing a race.
const CAS_ATTEMPTS: u32 = 32;
/// Manifests kept decoded in memory (they are immutable).
const MANIFEST_CACHE: usize = 256;
/// Chunk freshness records kept in memory before the table is reset.
const KNOWN_CHUNKS: usize = 1 << 18;

/// A UIF store in an S3 bucket.
pub struct S3Store {
    /// Runs the object-store futures; the store's methods are blocking.
    rt: Option<tokio::runtime::Runtime>,
    s3: Arc<AmazonS3>,
    prefix: String,
    policy: StorePolicy,
    /// Below this age a chunk is safe from any host's GC without a check.
    fresh: Duration,
    concurrency: usize,
    /// Whether `If-Match` wants the ETag in quotes (found by the self-test).
    quote_etag: bool,
    pins: Arc<PinTable>,
    /// Local directory of the uploads' stages (see `stage`).
    staging: PathBuf,
    /// Chunks known to exist, with the newest `Last-Modified` seen (ms).
    known: Mutex<HashMap<Hash, u64>>,
    manifests: Mutex<HashMap<Hash, Arc<Manifest>>>,
    nonce: AtomicU64,
}

fn remote(context: impl Into<String>, e: impl std::fmt::Display) -> StoreError {
    StoreError::Remote {
        context: context.into(),
        message: e.to_string(),
    }
}

/// A setting of the `[s3]` section, else the first of the environment
/// variables `vars` that is set.
fn setting<const N: usize>(configured: &Option<String>, vars: [&str; N]) -> Option<String> {
    configured
        .clone()
        .or_else(|| vars.into_iter().find_map(|v| std::env::var(v).ok()))
}

impl S3Store {
    /// Connects to the bucket, runs the conditional-write self-test and
    /// returns the store. `gc_grace` is the GC grace period of every host
    /// sharing the bucket (chunks younger than half of it are reused
    /// without a check). Uploads stage in the local directory `staging`,
    /// which belongs to this store alone: it is emptied here.
    pub fn open(
        config: &S3Config,
        policy: StorePolicy,
        gc_grace: Duration,
        staging: &std::path::Path,
    ) -> StoreResult<Self> {
        if config.bucket.is_empty() {
            return Err(remote("s3 configuration", "`bucket` is required"));
        }
        let cleared = Self::open_staging(staging)?;
        if cleared > 0 {
            tracing::info!(cleared, "removed upload stages of an earlier run");
        }
        // reqwest is built without a default crypto provider (see Cargo.toml).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut b = AmazonS3Builder::from_env().with_bucket_name(&config.bucket);
        if let Some(e) = &config.endpoint {
            b = b.with_endpoint(e);
        }
        let endpoint =
            setting(&config.endpoint, ["AWS_ENDPOINT_URL", "AWS_ENDPOINT"]).unwrap_or_default();
        let allow_http = config
            .allow_http
            .unwrap_or_else(|| endpoint.starts_with("http://"));
        b = b.with_allow_http(allow_http);
        let region = setting(&config.region, ["AWS_REGION", "AWS_DEFAULT_REGION"])
            .unwrap_or_else(|| "us-east-1".to_string());
        b = b.with_region(region);
        if let Some(k) = &config.access_key_id {
            b = b.with_access_key_id(k);
        }
        if let Some(k) = &config.secret_access_key {
            b = b.with_secret_access_key(k);
        }
        if let Some(t) = &config.session_token {
            b = b.with_token(t);
        }
        let s3 = b.build().map_err(|e| remote("s3 configuration", e))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("uve-s3")
            .enable_all()
            .build()
            .map_err(|e| StoreError::io("start the S3 client runtime", e))?;
        let prefix = config.prefix.trim_matches('/').to_string();
        let mut store = S3Store {
            rt: Some(rt),
            s3: Arc::new(s3),
            prefix,
            policy,
            fresh: gc_grace / 2,
            concurrency: config.concurrency.unwrap_or(32).max(1),
            quote_etag: true,
            pins: Arc::new(PinTable::default()),
            staging: staging.to_path_buf(),
            known: Mutex::new(HashMap::new()),
            manifests: Mutex::new(HashMap::new()),
            nonce: AtomicU64::new(0),
        };
        store.quote_etag = store.self_test()?;
        super::keep_zero_block(&store)?;
        tracing::info!(
            bucket = config.bucket,
            prefix = store.prefix,
            endpoint,
            quote_etag = store.quote_etag,
            "S3 store ready (conditional writes verified)"
        );
        Ok(store)
    }

    fn block_on<F: Future>(&self, f: F) -> F::Output {
        match &self.rt {
            Some(rt) => rt.block_on(f),
            // `rt` is only taken in `drop`.
            None => unreachable!("S3 store used after drop"),
        }
    }

    fn key(&self, rel: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(rel)
        } else {
            Path::from(format!("{}/{rel}", self.prefix))
        }
    }

    fn chunk_key(&self, hash: &Hash) -> Path {
        self.key(&format!("chunks/{}", hash.to_hex()))
    }

    fn head_key(&self, user: &str) -> Path {
        self.key(&format!("users/{user}/head.json"))
    }

    fn manifest_key(&self, user: &str, digest: &Hash) -> Path {
        self.key(&format!("users/{user}/m/{}", digest.to_hex()))
    }

    fn next_nonce(&self) -> String {
        let n = self.nonce.fetch_add(1, Ordering::Relaxed);
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let mut h = blake3::Hasher::new();
        h.update(&std::process::id().to_le_bytes());
        h.update(&t.to_le_bytes());
        h.update(&n.to_le_bytes());
        h.finalize().to_hex()[..20].to_string()
    }

    fn if_match(&self, e_tag: &str) -> String {
        let bare = e_tag.trim_matches('"');
        if self.quote_etag {
            format!("\"{bare}\"")
        } else {
            bare.to_string()
        }
    }

    fn remember(&self, hash: Hash, modified_ms: u64) {
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        if known.len() >= KNOWN_CHUNKS {
            known.clear();
        }
        let e = known.entry(hash).or_insert(0);
        *e = (*e).max(modified_ms);
    }

    fn forget(&self, hash: &Hash) {
        self.known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(hash);
    }

    /// True if this process knows the chunk exists and is young enough
    /// that no host's GC can take it before it is referenced.
    fn known_fresh(&self, hash: &Hash) -> bool {
        let fresh_ms = u64::try_from(self.fresh.as_millis()).unwrap_or(u64::MAX);
        self.known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(hash)
            .is_some_and(|m| now_ms().saturating_sub(*m) < fresh_ms)
    }

    /// The bytes of object `key` (one GET).
    fn get_bytes(&self, key: &Path) -> object_store::Result<bytes::Bytes> {
        let (s3, key) = (self.s3.clone(), key.clone());
        self.block_on(async move { s3.get(&key).await?.bytes().await })
    }

    fn load_manifest(&self, user: &str, digest: &Hash) -> StoreResult<Arc<Manifest>> {
        if let Some(m) = self
            .manifests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(digest)
        {
            return Ok(m.clone());
        }
        let key = self.manifest_key(user, digest);
        let bytes = match self.get_bytes(&key) {
            Ok(b) => b,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(StoreError::Corrupt {
                    path: key.to_string(),
                    why: "manifest named by the head object is missing".into(),
                });
            }
            Err(e) => return Err(remote(format!("read {key}"), e)),
        };
        let m: Manifest = postcard::from_bytes(&bytes).map_err(|e| StoreError::Corrupt {
            path: key.to_string(),
            why: e.to_string(),
        })?;
        m.validate()?;
        if m.header.digest != *digest {
            return Err(StoreError::Corrupt {
                path: key.to_string(),
                why: "manifest digest does not match its key".into(),
            });
        }
        let m = Arc::new(m);
        let mut cache = self
            .manifests
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= MANIFEST_CACHE {
            cache.clear();
        }
        cache.insert(*digest, m.clone());
        Ok(m)
    }

    fn version_digest(info: &VersionInfo) -> StoreResult<Hash> {
        Hash::from_hex(&info.digest).ok_or_else(|| StoreError::Corrupt {
            path: format!("version {}", info.version),
            why: "bad digest in head object".into(),
        })
    }

    /// Every chunk referred to by a retained version of `state`.
    fn referenced(&self, user: &str, state: &UserState) -> StoreResult<HashSet<Hash>> {
        let mut out = HashSet::new();
        let mut seen = HashSet::new();
        for info in &state.versions {
            let d = Self::version_digest(info)?;
            if seen.insert(d) {
                out.extend(self.load_manifest(user, &d)?.chunks.iter().map(|c| c.hash));
            }
        }
        Ok(out)
    }

    /// Makes sure every chunk of `manifest` that `protected` does not cover
    /// exists and is young enough to outlive any GC until it is referenced
    /// (old ones are rewritten).
    fn secure_chunks(&self, manifest: &Manifest, protected: &HashSet<Hash>) -> StoreResult<()> {
        let mut seen = HashSet::new();
        let check: Vec<Hash> = manifest
            .chunks
            .iter()
            .map(|c| c.hash)
            .filter(|h| seen.insert(*h) && !protected.contains(h) && !self.known_fresh(h))
            .collect();
        if check.is_empty() {
            return Ok(());
        }
        let fresh_ms = u64::try_from(self.fresh.as_millis()).unwrap_or(u64::MAX);
        let s3 = self.s3.clone();
        let keys: Vec<(Hash, Path)> = check.iter().map(|h| (*h, self.chunk_key(h))).collect();
        let results: Vec<StoreResult<(Hash, u64)>> = self.block_on(
            stream::iter(keys)
                .map(|(h, key)| {
                    let s3 = s3.clone();
                    async move {
                        let meta = match s3.head(&key).await {
                            Ok(m) => m,
                            Err(object_store::Error::NotFound { .. }) => {
                                return Err(StoreError::MissingChunk(h));
                            }
                            Err(e) => return Err(remote(format!("check {key}"), e)),
                        };
                        let modified =
                            u64::try_from(meta.last_modified.timestamp_millis()).unwrap_or(0);
                        if now_ms().saturating_sub(modified) < fresh_ms {
                            return Ok((h, modified));
                        }
                        // Old and unreferenced: rewrite so a GC that listed it
                        // before now sees it young.
                        let data = match s3.get(&key).await {
                            Ok(r) => r.bytes().await.map_err(|e| remote("refresh chunk", e))?,
                            Err(object_store::Error::NotFound { .. }) => {
                                return Err(StoreError::MissingChunk(h));
                            }
                            Err(e) => return Err(remote("refresh chunk", e)),
                        };
                        if Hash::of(&data) != h {
                            return Err(StoreError::BadChunk(h));
                        }
                        s3.put(&key, PutPayload::from(data))
                            .await
                            .map_err(|e| remote("refresh chunk", e))?;
                        Ok((h, now_ms()))
                    }
                })
                .buffer_unordered(self.concurrency)
                .collect(),
        );
        for r in results {
            match r {
                Ok((h, m)) => self.remember(h, m),
                Err(e) => {
                    if let StoreError::MissingChunk(h) | StoreError::BadChunk(h) = &e {
                        self.forget(h);
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

impl Drop for S3Store {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside async code.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl UifStore for S3Store {
    fn has_chunk(&self, hash: &Hash) -> StoreResult<bool> {
        Ok(self.has_chunks(std::slice::from_ref(hash))?.first() == Some(&true))
    }

    fn has_chunks(&self, hashes: &[Hash]) -> StoreResult<Vec<bool>> {
        let s3 = self.s3.clone();
        let todo: Vec<(usize, Hash, Path)> = hashes
            .iter()
            .enumerate()
            .filter(|(_, h)| !self.known_fresh(h))
            .map(|(i, h)| (i, *h, self.chunk_key(h)))
            .collect();
        let mut out = vec![true; hashes.len()];
        let found: Vec<StoreResult<(usize, Hash, Option<u64>)>> = self.block_on(
            stream::iter(todo)
                .map(|(i, h, key)| {
                    let s3 = s3.clone();
                    async move {
                        match s3.head(&key).await {
                            Ok(m) => Ok((
                                i,
                                h,
                                Some(
                                    u64::try_from(m.last_modified.timestamp_millis()).unwrap_or(0),
                                ),
                            )),
                            Err(object_store::Error::NotFound { .. }) => Ok((i, h, None)),
                            Err(e) => Err(remote(format!("check {key}"), e)),
                        }
                    }
                })
                .buffer_unordered(self.concurrency)
                .collect(),
        );
        for r in found {
            let (i, h, modified) = r?;
            match modified {
                Some(m) => self.remember(h, m),
                None => {
                    if let Some(slot) = out.get_mut(i) {
                        *slot = false;
                    }
                }
            }
        }
        Ok(out)
    }

    fn put_chunk(&self, hash: &Hash, data: &[u8]) -> StoreResult<()> {
        check_chunk(hash, data)?;
        if self.known_fresh(hash) {
            return Ok(());
        }
        let key = self.chunk_key(hash);
        let payload = PutPayload::from(data.to_vec());
        let s3 = self.s3.clone();
        self.block_on(async move { s3.put(&key, payload).await })
            .map_err(|e| remote("write chunk", e))?;
        self.remember(*hash, now_ms());
        Ok(())
    }

    fn read_chunk(&self, hash: &Hash) -> StoreResult<Vec<u8>> {
        let data = match self.get_bytes(&self.chunk_key(hash)) {
            Ok(b) => b,
            Err(object_store::Error::NotFound { .. }) => {
                self.forget(hash);
                return Err(StoreError::MissingChunk(*hash));
            }
            Err(e) => return Err(remote("read chunk", e)),
        };
        check_chunk(hash, &data)?;
        Ok(data.to_vec())
    }

    fn head(&self, user: &str) -> StoreResult<Option<Version>> {
        names::user(user)?;
        Ok(self.read_head(user)?.state.head)
    }

    fn manifest(&self, user: &str, version: Version) -> StoreResult<Manifest> {
        names::user(user)?;
        let state = self.read_head(user)?.state;
        let info = state
            .versions
            .iter()
            .find(|v| v.version == version)
            .ok_or_else(|| StoreError::NoSuchVersion {
                user: user.to_string(),
                version,
            })?;
        let m = self.load_manifest(user, &Self::version_digest(info)?)?;
        Ok(Manifest::clone(&m))
    }

    fn versions(&self, user: &str) -> StoreResult<Vec<VersionInfo>> {
        names::user(user)?;
        Ok(self.read_head(user)?.state.versions)
    }

    fn users(&self) -> StoreResult<Vec<String>> {
        let key = self.key("users");
        let s3 = self.s3.clone();
        let listed = self
            .block_on(async move { s3.list_with_delimiter(Some(&key)).await })
            .map_err(|e| remote("list users", e))?;
        Ok(user_names(
            listed
                .common_prefixes
                .iter()
                .filter_map(|p| p.filename().map(str::to_string)),
        ))
    }

    /// Adds a version by compare-and-swap of the head object.
    fn add_version(&self, new: &NewVersion<'_>) -> StoreResult<CommitOutcome> {
        self.commit_cas(new)
    }

    fn quota_base(&self, user: &str, charge: &Charge) -> StoreResult<QuotaBase> {
        names::user(user)?;
        Ok(QuotaBase::of(
            &self.policy,
            &self.read_head(user)?.state,
            charge,
        ))
    }

    fn holdings(&self, user: &str) -> StoreResult<Holdings> {
        names::user(user)?;
        let state = self.read_head(user)?.state;
        quota::holdings(&self.policy, &state, |i| {
            self.load_manifest(user, &Self::version_digest(i)?)
        })
    }

    fn edit_user(&self, user: &str, edit: UserEdit) -> StoreResult<()> {
        names::user(user)?;
        self.edit_cas(user, edit)
    }

    fn stage_chunk(&self, stage: &StageId, hash: &Hash, data: &[u8]) -> StoreResult<u64> {
        self.put_staged(stage, hash, data)
    }

    fn publish(&self, stage: &StageId, hashes: &[Hash]) -> StoreResult<()> {
        self.publish_stage(stage, hashes)
    }

    fn discard(&self, stage: &StageId, _hashes: &[Hash]) -> StoreResult<()> {
        self.discard_stage(stage)
    }

    /// The free space of the local staging directory's filesystem: the
    /// bucket has no such figure, and staging is what fills the disk.
    fn free_bytes(&self) -> Option<u64> {
        super::local::free_bytes_at(&self.staging)
    }

    fn gc(&self, grace: Duration) -> StoreResult<GcReport> {
        self.collect(grace)
    }

    fn pin(&self, hashes: &[Hash]) -> ChunkPins {
        self.pins.pin(hashes)
    }

    fn policy(&self) -> &StorePolicy {
        &self.policy
    }

    fn bulk_threads(&self) -> usize {
        // Each chunk is one HTTP round trip; the threads mostly wait.
        self.concurrency.clamp(4, 128)
    }
}
