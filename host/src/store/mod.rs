//! The UIF store: content-addressed chunks keyed by BLAKE3 hash, per-user
//! manifests as numbered versions, and a per-user head pointer changed only
//! by compare-and-swap ([`UifStore::commit`]).
//!
//! Policy decided here (and documented in `host/API.md`):
//!
//! - **Versions** are numbered per user from 1, strictly increasing, never
//!   reused; conflict versions and rollbacks get numbers too.
//! - **History:** the newest `history_keep` committed versions (the head
//!   always among them) are retained; conflict versions are pruned
//!   separately, beyond `conflict_keep` per origin (one writer never evicts
//!   another's) or when older than
//!   `conflict_max_age`.
//! - **Quota:** per user, over what the user holds: the unique bytes of
//!   head and history together (`quota_bytes`, or the user's override),
//!   and, apart, of each origin's conflict versions
//!   (`conflict_quota_bytes`), so a writer without the lease never makes
//!   the lease holder's logout fail (`quota`).
//! - **GC** removes chunks referenced by no retained version, not
//!   pinned by an upload in flight, and older than a grace period.
//! - **Staging:** a VM's upload stores its chunks in a stage of its own
//!   ([`StageId`]) on the host's local disk (the S3 store too), invisible
//!   to every other upload and never swept by GC; its commit publishes them
//!   (S3: one PUT per chunk, to its content key), anything else discards
//!   them at once. So an abandoned upload's bytes go within seconds, and
//!   discarding deletes only the stage's own files, never a stored chunk
//!   another upload (here or on another host of a shared store) reuses.
//!
//! Stores: [`LocalStore`] (a directory), `S3Store` (feature `s3`) and, for
//! tests and the fuzz targets only (feature `fuzzing`), [`MemStore`].

pub mod durable;
mod local;
pub mod locks;
#[cfg(any(test, feature = "fuzzing"))]
mod mem;
mod pins;
mod quota;
#[cfg(feature = "s3")]
mod s3;
mod s3_config;

pub use local::LocalStore;
#[cfg(any(test, feature = "fuzzing"))]
pub use mem::{Held, MemStore};
pub use pins::{ChunkPins, PinTable};
pub use quota::{
    Charge, Holdings, OriginHoldings, QuotaBase, Tally, UserEdit, exceeded as quota_exceeded,
};
#[cfg(feature = "s3")]
pub use s3::S3Store;
pub use s3_config::S3Config;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use uve_protocol::defs::MAX_CHUNK;
use uve_protocol::manifest::{Hash, Manifest, ZERO_BLOCK};
use uve_protocol::message::Version;
use uve_protocol::names;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A user name failed validation.
    #[error(transparent)]
    InvalidName(#[from] uve_protocol::names::NameError),
    /// The user has no such version.
    #[error("user {user} has no version {version}")]
    NoSuchVersion {
        /// The user.
        user: String,
        /// The version asked for.
        version: Version,
    },
    /// The chunk is not in the store.
    #[error("chunk {0} is not in the store")]
    MissingChunk(Hash),
    /// Chunk bytes do not match their hash (or are too long).
    #[error("chunk {0} is corrupt or does not match its hash")]
    BadChunk(Hash),
    /// The manifest is inconsistent.
    #[error("invalid manifest: {0}")]
    BadManifest(#[from] uve_protocol::manifest::ManifestError),
    /// The new version would make the user hold more unique bytes than
    /// the quota (head and history), or a writer's conflict versions more
    /// than their bound per origin. Final: the writer keeps its bytes.
    #[error(
        "{what} of user {user} would hold {held} bytes (unique, counted once), over {bound} of {quota}; `uvectl user show {user}` shows what is held, `uvectl user rm-version {user} <version>` deletes an old version, `uvectl user quota {user} <bytes>` raises the quota",
        what = conflict_origin.as_deref().map_or_else(|| "head and history".to_string(), |o| format!("the conflict versions from {o}")),
        bound = if conflict_origin.is_some() { "the per-writer conflict bound" } else { "the quota" }
    )]
    QuotaExceeded {
        /// The user.
        user: String,
        /// Unique bytes the versions would hold with the new one.
        held: u64,
        /// The bound.
        quota: u64,
        /// The writer, if the new version is a conflict version (which is
        /// held to its own bound per origin).
        conflict_origin: Option<String>,
    },
    /// The head version cannot be deleted.
    #[error("v{version} is the head of user {user}: only older versions can be deleted")]
    HeadVersion {
        /// The user.
        user: String,
        /// The version asked for.
        version: Version,
    },
    /// A stored file could not be decoded.
    #[error("corrupt store file {path}: {why}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// The object store failed (network, credentials, server error).
    #[error("object store: {context}: {message}")]
    Remote {
        /// What we were doing.
        context: String,
        /// The client's error.
        message: String,
    },
    /// The object store does not honour conditional writes.
    #[error("the object store is unsafe for compare-and-swap, refusing to use it: {0}")]
    UnsafeStore(String),
    /// The user's head kept changing under a commit.
    #[error("the head of {user} changed {attempts} times in a row during a commit; try again")]
    Contended {
        /// The user.
        user: String,
        /// Attempts made.
        attempts: u32,
    },
    /// A budget of the host is full for now (a VM's bulk queue): the
    /// caller retries later.
    #[error("busy: {0}; try again")]
    Busy(String),
    /// The store does not do this.
    #[error("{0}")]
    Unsupported(&'static str),
    /// Filesystem error.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StoreError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Result of a store operation.
pub type StoreResult<T> = Result<T, StoreError>;

/// Per-user state (the local `state.json`, the S3 head object): the single
/// source of truth of which versions exist and which is head.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct UserState {
    pub(crate) head: Option<Version>,
    pub(crate) next: Version,
    pub(crate) versions: Vec<VersionInfo>,
    /// Nonce of the write that produced this state (S3: recognises a
    /// compare-and-swap whose answer was lost).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) writer: Option<String>,
    /// The operator's quota override for this user (bytes), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) quota_bytes: Option<u64>,
}

/// When a new version becomes the user's head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadRule {
    /// Only if the head is still this version (compare-and-swap on the
    /// update's base); otherwise it is kept as a conflict version.
    IfHeadIs(Option<Version>),
    /// Never: kept as a conflict version (an update under a lost lease).
    Never,
    /// Always (a rollback).
    Always,
}

impl HeadRule {
    fn admits(self, head: Option<Version>) -> bool {
        match self {
            HeadRule::IfHeadIs(base) => head == base,
            HeadRule::Never => false,
            HeadRule::Always => true,
        }
    }
}

/// A version to add ([`UifStore::add_version`]): whose, its manifest,
/// the base it names, who wrote it and whether it becomes head.
#[derive(Debug, Clone, Copy)]
pub struct NewVersion<'a> {
    /// The user.
    pub user: &'a str,
    /// Its manifest (every chunk already stored).
    pub manifest: &'a Manifest,
    /// The version it was based on, as announced.
    pub base: Option<Version>,
    /// Who wrote it (`vm:<id>`, `import`, `rollback:<v>`).
    pub origin: &'a str,
    /// When it becomes head.
    pub rule: HeadRule,
}

impl NewVersion<'_> {
    /// The checks every store makes before adding a version: a valid user
    /// name, a consistent manifest (the quota is checked against the
    /// user's state, [`quota::fit`]).
    pub(crate) fn check(&self) -> StoreResult<()> {
        names::user(self.user)?;
        self.manifest.validate()?;
        Ok(())
    }
}

/// Refuses chunk bytes longer than `MAX_CHUNK` or not of `hash`
/// (`BadChunk`): what every store checks of a chunk it writes or reads.
pub(crate) fn check_chunk(hash: &Hash, data: &[u8]) -> StoreResult<()> {
    if data.len() > MAX_CHUNK as usize || Hash::of(data) != *hash {
        return Err(StoreError::BadChunk(*hash));
    }
    Ok(())
}

/// The valid user names among `names` (a store's directory or key
/// listing), sorted.
pub(crate) fn user_names(names: impl Iterator<Item = String>) -> Vec<String> {
    let mut out: Vec<String> = names.filter(|n| names::user(n).is_ok()).collect();
    out.sort();
    out
}

impl UserState {
    /// The head, if `new` would not become head and the head already is
    /// `new`: committed from the same base by the same origin with the
    /// same digest (see [`CommitOutcome::Redelivered`]).
    pub(crate) fn redelivered(&self, new: &NewVersion<'_>) -> Option<Version> {
        let head = self.head?;
        if new.rule.admits(self.head) {
            return None;
        }
        self.versions
            .iter()
            .find(|v| v.version == head)
            .filter(|v| {
                v.kind == VersionKind::Committed
                    && v.base == new.base
                    && v.origin == new.origin
                    && v.digest == new.manifest.header.digest.to_hex()
            })
            .map(|v| v.version)
    }

    /// Records `new` as the next version (head or conflict by its rule)
    /// and prunes by `policy`. Returns the outcome and the versions pruned
    /// (whose manifests the store may delete once the new state is
    /// written).
    pub(crate) fn add_version(
        &mut self,
        policy: &StorePolicy,
        new: &NewVersion<'_>,
    ) -> (CommitOutcome, Vec<Version>) {
        let NewVersion {
            manifest,
            base,
            origin,
            rule,
            ..
        } = *new;
        let v = self.next.max(1);
        let becomes_head = rule.admits(self.head);
        let previous_head = self.head;
        self.next = v + 1;
        self.versions.push(VersionInfo {
            version: v,
            kind: if becomes_head {
                VersionKind::Committed
            } else {
                VersionKind::Conflict
            },
            created_ms: now_ms(),
            size: manifest.header.size,
            digest: manifest.header.digest.to_hex(),
            chunk_count: manifest.header.chunk_count,
            base,
            origin: origin.to_string(),
        });
        let outcome = if becomes_head {
            self.head = Some(v);
            CommitOutcome::Committed(v)
        } else {
            CommitOutcome::Conflict {
                kept_as: v,
                head: previous_head,
            }
        };
        let pruned = prune(policy, self);
        (outcome, pruned)
    }
}

/// Drops versions beyond the retention policy from `state`; returns their
/// numbers (oldest first).
pub(crate) fn prune(policy: &StorePolicy, state: &mut UserState) -> Vec<Version> {
    let now = now_ms();
    let max_age = u64::try_from(policy.conflict_max_age.as_millis()).unwrap_or(u64::MAX);
    let committed: Vec<Version> = state
        .versions
        .iter()
        .filter(|v| v.kind == VersionKind::Committed)
        .map(|v| v.version)
        .collect();
    let conflicts: Vec<&VersionInfo> = state
        .versions
        .iter()
        .filter(|v| v.kind == VersionKind::Conflict)
        .collect();
    let mut drop: std::collections::HashSet<Version> = std::collections::HashSet::new();
    let keep = policy.history_keep.max(1);
    if committed.len() > keep {
        drop.extend(committed[..committed.len() - keep].iter().copied());
    }
    // `conflict_keep` per origin: one writer's conflict versions (a VM
    // that lost its lease, say) never evict another's.
    let mut per_origin: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for c in &conflicts {
        *per_origin.entry(c.origin.as_str()).or_default() += 1;
    }
    for c in &conflicts {
        let left = per_origin.entry(c.origin.as_str()).or_default();
        if *left > policy.conflict_keep || now.saturating_sub(c.created_ms) > max_age {
            drop.insert(c.version);
        }
        *left -= 1;
    }
    if let Some(h) = state.head {
        drop.remove(&h);
    }
    state.versions.retain(|v| !drop.contains(&v.version));
    let mut out: Vec<Version> = drop.into_iter().collect();
    out.sort_unstable();
    out
}

/// Names one upload's private stage in the store: 24 lowercase hex digits,
/// unique per process and, in practice, across the hosts of a shared store.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StageId(String);

impl StageId {
    /// A fresh id (process id, time and a counter, hashed).
    pub fn fresh() -> StageId {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let mut h = blake3::Hasher::new();
        h.update(&std::process::id().to_le_bytes());
        h.update(&t.to_le_bytes());
        h.update(&n.to_le_bytes());
        StageId(h.finalize().to_hex()[..24].to_string())
    }

    /// The id as a file or key name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Retention and quota settings of a store.
#[derive(Debug, Clone)]
pub struct StorePolicy {
    /// Committed versions kept per user (the head always among them).
    pub history_keep: usize,
    /// Conflict versions kept per user and origin (the writer).
    pub conflict_keep: usize,
    /// Conflict versions older than this are pruned.
    pub conflict_max_age: Duration,
    /// Unique bytes a user's head and history may hold together (a user's
    /// override in the store takes precedence).
    pub quota_bytes: u64,
    /// Unique bytes one origin's conflict versions of a user may hold
    /// (default: the user's quota).
    pub conflict_quota_bytes: Option<u64>,
    /// Drop the oldest history (never the head) to fit a new head in the
    /// quota instead of refusing it.
    pub quota_prunes_history: bool,
}

impl Default for StorePolicy {
    fn default() -> Self {
        StorePolicy {
            history_keep: 10,
            conflict_keep: 10,
            conflict_max_age: Duration::from_secs(30 * 24 * 3600),
            quota_bytes: 64 << 30,
            conflict_quota_bytes: None,
            quota_prunes_history: false,
        }
    }
}

/// Whether a version became head or was kept aside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VersionKind {
    /// Committed by compare-and-swap (or import/rollback); was head.
    Committed,
    /// Upload whose base or lease was stale; kept, never head.
    Conflict,
}

/// Metadata of one retained version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// Version number.
    pub version: Version,
    /// Committed or conflict.
    pub kind: VersionKind,
    /// When it was stored (Unix ms).
    pub created_ms: u64,
    /// Size in bytes.
    pub size: u64,
    /// Whole-file BLAKE3 digest, hex.
    pub digest: String,
    /// Number of chunks.
    pub chunk_count: u32,
    /// The version it was based on, as announced.
    pub base: Option<Version>,
    /// Who wrote it (`vm:<id>`, `import`, `rollback:<v>`).
    pub origin: String,
}

/// Outcome of [`UifStore::commit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// The version is the new head.
    Committed(Version),
    /// The head already is this update: the same bytes, from the same
    /// base, by the same origin (an update re-delivered after a crash
    /// lost the commit's answer). Nothing was stored.
    Redelivered(Version),
    /// Compare-and-swap failed; the upload is kept as a conflict version.
    Conflict {
        /// Number of the conflict version.
        kept_as: Version,
        /// The head at the time.
        head: Option<Version>,
    },
}

/// What a garbage collection did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    /// Stored chunks examined.
    pub scanned: u64,
    /// Chunks still referenced.
    pub referenced: u64,
    /// Unreferenced chunks spared because they are young or pinned.
    pub spared: u64,
    /// Chunks deleted.
    pub deleted: u64,
    /// Bytes of the chunks deleted (the local store frees a pack's dead
    /// bytes on disk once at most half of it is live).
    pub bytes_freed: u64,
}

/// A retained version that refers to a corrupt chunk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DamagedVersion {
    /// The user.
    pub user: String,
    /// The version.
    pub version: Version,
}

/// Damaged versions a [`ScrubReport`] lists at most.
pub const DAMAGED_LISTED: usize = 64;

/// What a scrub found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubReport {
    /// Chunk files read.
    pub scanned: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Chunk files whose bytes did not match their hash: moved out of the
    /// store (to `corrupt/`), so that the next upload holding the same
    /// content stores it again.
    pub corrupt: u64,
    /// Retained versions that refer to a corrupt chunk (at most
    /// [`DAMAGED_LISTED`]); a retrieve of one fails until the chunk is
    /// stored again.
    pub damaged: Vec<DamagedVersion>,
    /// Damaged versions beyond those listed.
    pub damaged_more: u64,
    /// False when the scrub stopped before the end (the host shut down).
    pub complete: bool,
}

/// A content-addressed, versioned UIF store. Blocking: call from
/// `spawn_blocking` in async code.
pub trait UifStore: Send + Sync + 'static {
    /// True if the chunk is stored.
    fn has_chunk(&self, hash: &Hash) -> StoreResult<bool>;
    /// [`has_chunk`](Self::has_chunk) for many chunks at once (a remote
    /// store asks concurrently).
    fn has_chunks(&self, hashes: &[Hash]) -> StoreResult<Vec<bool>> {
        hashes.iter().map(|h| self.has_chunk(h)).collect()
    }
    /// Stores a chunk after checking `hash == BLAKE3(data)` (else
    /// `BadChunk`). It is durable no later than the commit of the first
    /// version that refers to it.
    fn put_chunk(&self, hash: &Hash, data: &[u8]) -> StoreResult<()>;
    /// Reads a chunk (at most `MAX_CHUNK` bytes) and verifies its hash.
    fn read_chunk(&self, hash: &Hash) -> StoreResult<Vec<u8>>;
    /// The user's head version.
    fn head(&self, user: &str) -> StoreResult<Option<Version>>;
    /// A retained version's manifest.
    fn manifest(&self, user: &str, version: Version) -> StoreResult<Manifest>;
    /// The user's retained versions, oldest first.
    fn versions(&self, user: &str) -> StoreResult<Vec<VersionInfo>>;
    /// Users with a store entry.
    fn users(&self) -> StoreResult<Vec<String>>;
    /// Stores `new.manifest` as the user's next version, head or conflict
    /// version as `new.rule` says against the current head (atomically
    /// with respect to other writers). Every chunk must already be stored.
    fn add_version(&self, new: &NewVersion<'_>) -> StoreResult<CommitOutcome>;
    /// Stores `manifest` as a new version. It becomes head only if the head
    /// is `base` and `lease_ok`; otherwise it is kept as a conflict version.
    /// Every chunk must already be stored.
    fn commit(
        &self,
        user: &str,
        manifest: &Manifest,
        base: Option<Version>,
        lease_ok: bool,
        origin: &str,
    ) -> StoreResult<CommitOutcome> {
        let rule = if lease_ok {
            HeadRule::IfHeadIs(base)
        } else {
            HeadRule::Never
        };
        self.add_version(&NewVersion {
            user,
            manifest,
            base,
            origin,
            rule,
        })
    }
    /// Makes a copy of retained version `to` the new head (a new version).
    fn rollback(&self, user: &str, to: Version) -> StoreResult<Version> {
        let manifest = self.manifest(user, to)?;
        let origin = format!("rollback:{to}");
        let new = NewVersion {
            user,
            manifest: &manifest,
            base: Some(to),
            origin: &origin,
            rule: HeadRule::Always,
        };
        match self.add_version(&new)? {
            CommitOutcome::Committed(v)
            | CommitOutcome::Redelivered(v)
            | CommitOutcome::Conflict { kept_as: v, .. } => Ok(v),
        }
    }
    /// Stores a chunk in `stage` only, after checking `hash ==
    /// BLAKE3(data)` (else `BadChunk`): no other upload sees it until
    /// [`publish`](Self::publish). Returns the bytes newly staged: 0 if the
    /// chunk is already stored (then it is not staged). The caller stages a
    /// chunk once per stage.
    fn stage_chunk(&self, stage: &StageId, hash: &Hash, data: &[u8]) -> StoreResult<u64>;
    /// Makes the chunks `hashes` staged in `stage` stored chunks, durably,
    /// and empties the stage. A hash not staged there must already be
    /// stored (else `MissingChunk`).
    fn publish(&self, stage: &StageId, hashes: &[Hash]) -> StoreResult<()>;
    /// Deletes the stage and the chunks `hashes` staged in it (never a
    /// stored chunk).
    fn discard(&self, stage: &StageId, hashes: &[Hash]) -> StoreResult<()>;
    /// What a new version of `user` charged to `charge` will be counted
    /// with (the bound and the retained versions that share it).
    fn quota_base(&self, user: &str, charge: &Charge) -> StoreResult<QuotaBase>;
    /// What `user` holds against the quota, each origin's conflict
    /// versions apart (reads every retained manifest).
    fn holdings(&self, user: &str) -> StoreResult<Holdings>;
    /// Applies an operator's edit to the user's state atomically with
    /// respect to other writers: deleting an old version (never the head;
    /// its chunks go at the next GC) or setting the quota override.
    fn edit_user(&self, user: &str, edit: UserEdit) -> StoreResult<()>;
    /// Free bytes on the filesystem where uploads stage, if the store can
    /// tell (the local store's directory; the S3 store's local staging
    /// directory).
    fn free_bytes(&self) -> Option<u64> {
        None
    }
    /// Deletes unreferenced, unpinned chunks older than `grace`.
    fn gc(&self, grace: Duration) -> StoreResult<GcReport>;
    /// Reads every stored chunk and checks it against its hash, reading
    /// at most `bytes_per_sec` (0: no limit) and stopping early once
    /// `stop` says so. What protects a store that does not verify on read
    /// against bit rot. Stores that verify every read (S3) do not scrub.
    fn scrub(&self, bytes_per_sec: u64, stop: &dyn Fn() -> bool) -> StoreResult<ScrubReport> {
        let _ = (bytes_per_sec, stop);
        Err(StoreError::Unsupported(
            "this store verifies every chunk it reads; it has nothing to scrub",
        ))
    }
    /// Protects chunks from GC until the returned guard is dropped.
    fn pin(&self, hashes: &[Hash]) -> ChunkPins;
    /// The store's retention and quota policy.
    fn policy(&self) -> &StorePolicy;
    /// Threads the host should run chunk reads and writes on: CPU-bound
    /// work on a local disk wants about two per core; a remote store
    /// mostly waits on the network and wants as many as it serves requests
    /// at once.
    fn bulk_threads(&self) -> usize {
        std::thread::available_parallelism()
            .map_or(2, |n| n.get() * 2)
            .clamp(2, 16)
    }
}

/// Stores the zero block ([`ZERO_BLOCK`]) unless `store` holds it: every
/// store holds it from the moment it opens, and GC never collects it, so
/// no agent ever uploads it.
pub(crate) fn keep_zero_block(store: &impl UifStore) -> StoreResult<()> {
    if !store.has_chunk(&ZERO_BLOCK.hash)? {
        store.put_chunk(&ZERO_BLOCK.hash, &vec![0u8; ZERO_BLOCK.len as usize])?;
    }
    Ok(())
}

/// Milliseconds since the Unix epoch, now (one definition for both peers).
pub use uve_protocol::defs::now_ms;
