//! [`LocalStore`]: the UIF store over a local directory.
//!
//! ```text
//! <root>/chunks/<2 hex>/<64 hex>     chunk bytes
//! <root>/users/<user>/state.json     head, next version number, retained versions
//! <root>/users/<user>/v/<n>          manifest of version n (postcard)
//! <root>/staging/<64 hex>             chunks stored outside an upload (import); verified at open
//! <root>/staging/<stage>/<64 hex>     one upload's chunks until its commit
//! <root>/tmp/                        temp files; emptied at open
//! <root>/corrupt/<64 hex>            chunk files a scrub found damaged (see `scrub`)
//! ```
//!
//! The commit point of a version is the atomic replacement of `state.json`:
//! the manifest file is written (durably) first, the state naming it second.
//! A crash before the state write leaves an orphan manifest that recovery
//! deletes; the old head stays intact.
//!
//! Chunks are written before either, in two steps, so that a GiB of
//! uploads costs two `syncfs` calls instead of 32 k fsyncs: an uploaded
//! chunk lands in `staging/` without fsync; the commit that first refers
//! to it syncs the filesystem, renames it into `chunks/` and syncs again,
//! and only then writes the manifest. A file under `chunks/` is therefore
//! always complete and durable; `staging/` may hold torn files after an OS
//! crash, so at open every staged file is checked against its hash and
//! kept only if intact.
//!
//! A VM's upload stages under its own directory (`staging/<stage>/`):
//! its commit renames those chunks into `chunks/` as above, anything else
//! deletes the directory at once. The stages of uploads a crash or restart
//! interrupted give their intact chunks to `staging/` at open, so the
//! agent's retry resends only what was lost; GC takes the rest after its
//! grace.

use std::collections::HashSet;
use std::fs;
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use uve_protocol::defs::MAX_CHUNK;
use uve_protocol::manifest::{Hash, Manifest, ZERO_BLOCK};
use uve_protocol::message::Version;
use uve_protocol::names;

use super::locks::NamedLocks;
use super::{
    Charge, ChunkPins, CommitOutcome, GcReport, Holdings, NewVersion, PinTable, QuotaBase,
    ScrubReport, StageId, StoreError, StorePolicy, StoreResult, UifStore, UserEdit, UserState,
    VersionInfo, check_chunk, quota, user_names,
};
use crate::store::durable;

/// Commits promoting at most this many chunks fsync each one instead of
/// the whole filesystem.
const SMALL_PROMOTE: usize = 32;

/// A UIF store in a local directory.
pub struct LocalStore {
    root: PathBuf,
    tmp: PathBuf,
    staging: PathBuf,
    policy: StorePolicy,
    /// Serialises commits per user (read-modify-write of `state.json`).
    user_locks: NamedLocks<Mutex<()>>,
    /// Writers (chunk puts, commits) share it; GC takes it exclusively, so
    /// a sweep never races a version being made visible.
    gc_lock: RwLock<()>,
    pins: Arc<PinTable>,
}

impl LocalStore {
    /// Opens (creating if needed) a store at `root` and recovers from a
    /// crash: temp files are deleted, manifests no state names are deleted.
    /// A state file that cannot be read is an error, never silently reset.
    pub fn open(root: &Path, policy: StorePolicy) -> StoreResult<Self> {
        let store = LocalStore {
            root: root.to_path_buf(),
            tmp: root.join("tmp"),
            staging: root.join("staging"),
            policy,
            user_locks: NamedLocks::default(),
            gc_lock: RwLock::new(()),
            pins: Arc::new(PinTable::default()),
        };
        for d in [root.join("chunks"), root.join("users")] {
            fs::create_dir_all(&d)
                .map_err(|e| StoreError::io(format!("create {}", d.display()), e))?;
        }
        let cleared = durable::clear_dir(&store.tmp)
            .map_err(|e| StoreError::io("clear store temp directory", e))?
            + store.verify_staging()?;
        if cleared > 0 {
            tracing::info!(cleared, "removed temp leftovers of an earlier run");
        }
        for user in store.users()? {
            store.remove_orphans(&user)?;
        }
        super::keep_zero_block(&store)?;
        Ok(store)
    }

    fn user_dir(&self, user: &str) -> PathBuf {
        self.root.join("users").join(user)
    }

    fn manifest_path(&self, user: &str, v: Version) -> PathBuf {
        self.user_dir(user).join("v").join(v.to_string())
    }

    /// Keeps the staged chunks of interrupted uploads that are intact (so a
    /// retry need not resend them) and deletes the rest: after an OS crash
    /// a never-synced file may be short or empty. The stages of uploads the
    /// last run left open give their intact chunks to `staging/` (where GC
    /// takes them after its grace unless a commit refers to them) and go.
    /// Returns how many files went.
    fn verify_staging(&self) -> StoreResult<usize> {
        fs::create_dir_all(&self.staging)
            .map_err(|e| StoreError::io("create staging directory", e))?;
        let entries =
            fs::read_dir(&self.staging).map_err(|e| StoreError::io("list staging directory", e))?;
        let mut removed = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                removed += self.adopt_stage(&path);
            } else if staged_hash(&path).is_none() {
                let _ = fs::remove_file(&path);
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Moves the intact chunks of a dead upload's stage to `staging/` and
    /// deletes the stage; returns how many files were not kept.
    fn adopt_stage(&self, dir: &Path) -> usize {
        let mut dropped = 0;
        for f in fs::read_dir(dir).into_iter().flatten().flatten() {
            let kept = staged_hash(&f.path())
                .is_some_and(|h| fs::rename(f.path(), self.staged_path(&h)).is_ok());
            if !kept {
                dropped += 1;
            }
        }
        let _ = fs::remove_dir_all(dir);
        dropped
    }

    fn staged_path(&self, hash: &Hash) -> PathBuf {
        self.staging.join(hash.to_hex())
    }

    fn stage_dir(&self, stage: &StageId) -> PathBuf {
        self.staging.join(stage.as_str())
    }

    /// Makes staged chunks (at `from(hash)`) durable and moves them under
    /// `chunks/`.
    fn promote(&self, staged: &[Hash], from: impl Fn(&Hash) -> PathBuf) -> StoreResult<()> {
        if staged.is_empty() {
            return Ok(());
        }
        if staged.len() <= SMALL_PROMOTE {
            return self.promote_each(staged, from);
        }
        durable::sync_filesystem(&self.root)
            .map_err(|e| StoreError::io("sync staged chunks", e))?;
        for hash in staged {
            let dest = self.chunk_path(hash);
            if let Some(dir) = dest.parent() {
                fs::create_dir_all(dir).map_err(|e| StoreError::io("create chunk directory", e))?;
            }
            match fs::rename(from(hash), &dest) {
                Ok(()) => {}
                // A concurrent commit promoted it first.
                Err(e) if e.kind() == ErrorKind::NotFound && dest.is_file() => {}
                Err(e) => return Err(StoreError::io("promote staged chunk", e)),
            }
        }
        durable::sync_filesystem(&self.root).map_err(|e| StoreError::io("sync promoted chunks", e))
    }

    /// [`promote`](Self::promote) of a few chunks: each file fsynced, then
    /// renamed, then each directory it went to fsynced — so a small commit
    /// never waits for what other uploads have written and not yet synced
    /// (a `syncfs` would).
    fn promote_each(&self, staged: &[Hash], from: impl Fn(&Hash) -> PathBuf) -> StoreResult<()> {
        let mut dirs = HashSet::new();
        for hash in staged {
            let src = from(hash);
            let dest = self.chunk_path(hash);
            match fs::File::open(&src).and_then(|f| f.sync_all()) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound && dest.is_file() => continue,
                Err(e) => return Err(StoreError::io("sync staged chunk", e)),
            }
            if let Some(dir) = dest.parent() {
                fs::create_dir_all(dir).map_err(|e| StoreError::io("create chunk directory", e))?;
                dirs.insert(dir.to_path_buf());
            }
            match fs::rename(&src, &dest) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound && dest.is_file() => {}
                Err(e) => return Err(StoreError::io("promote staged chunk", e)),
            }
        }
        // A new chunks/xx directory must be durable in chunks/ too.
        dirs.insert(self.root.join("chunks"));
        for dir in dirs {
            durable::sync_dir(&dir).map_err(|e| StoreError::io("sync chunk directory", e))?;
        }
        Ok(())
    }

    fn chunk_path(&self, hash: &Hash) -> PathBuf {
        let hex = hash.to_hex();
        self.root.join("chunks").join(&hex[..2]).join(hex)
    }

    /// Reads and checks version `version`'s manifest file (whether the
    /// state lists it is the caller's business).
    fn read_manifest(&self, user: &str, version: Version) -> StoreResult<Manifest> {
        let path = self.manifest_path(user, version);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(StoreError::NoSuchVersion {
                    user: user.to_string(),
                    version,
                });
            }
            Err(e) => return Err(StoreError::io("read manifest", e)),
        };
        let m: Manifest = postcard::from_bytes(&bytes).map_err(|e| StoreError::Corrupt {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
        m.validate()?;
        Ok(m)
    }

    fn read_state(&self, user: &str) -> StoreResult<UserState> {
        let path = self.user_dir(user).join("state.json");
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                path: path.display().to_string(),
                why: e.to_string(),
            }),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(UserState {
                next: 1,
                ..UserState::default()
            }),
            Err(e) => Err(StoreError::io(format!("read {}", path.display()), e)),
        }
    }

    fn write_state(&self, user: &str, state: &UserState) -> StoreResult<()> {
        let dir = self.user_dir(user);
        // A quota override may come before the user's first version.
        fs::create_dir_all(&dir)
            .map_err(|e| StoreError::io(format!("create {}", dir.display()), e))?;
        let path = dir.join("state.json");
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| StoreError::Corrupt {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
        durable::write_atomic(&self.tmp, &path, &bytes)
            .map_err(|e| StoreError::io(format!("write {}", path.display()), e))
    }

    /// Deletes manifest files of `user` that its state does not list
    /// (written by a commit that crashed before its state write, or left
    /// by a prune that crashed before deleting).
    fn remove_orphans(&self, user: &str) -> StoreResult<()> {
        let state = self.read_state(user)?;
        let keep: HashSet<Version> = state.versions.iter().map(|v| v.version).collect();
        let dir = self.user_dir(user).join("v");
        let Ok(entries) = fs::read_dir(&dir) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let listed = name
                .to_str()
                .and_then(|n| n.parse::<Version>().ok())
                .is_some_and(|v| keep.contains(&v));
            if !listed {
                tracing::info!(user, file = ?name, "removing orphan manifest");
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    fn write_manifest(&self, user: &str, v: Version, manifest: &Manifest) -> StoreResult<()> {
        let dir = self.user_dir(user).join("v");
        fs::create_dir_all(&dir)
            .map_err(|e| StoreError::io(format!("create {}", dir.display()), e))?;
        let bytes = postcard::to_stdvec(manifest).map_err(|e| StoreError::Corrupt {
            path: dir.display().to_string(),
            why: e.to_string(),
        })?;
        durable::write_atomic(&self.tmp, &self.manifest_path(user, v), &bytes)
            .map_err(|e| StoreError::io("write manifest", e))
    }

    /// If the chunk is stored (under `chunks/` or `staging/`), refreshes
    /// its mtime so that a concurrent GC's grace period covers it, and
    /// says so. Called under the GC lock (read).
    fn refresh_stored(&self, hash: &Hash) -> bool {
        let stored = [self.chunk_path(hash), self.staged_path(hash)]
            .into_iter()
            .find(|p| p.is_file());
        if let Some(path) = &stored {
            let _ = fs::File::options()
                .append(true)
                .open(path)
                .and_then(|f| f.set_modified(SystemTime::now()));
        }
        stored.is_some()
    }

    fn chunk_files(&self) -> Vec<(PathBuf, Hash)> {
        let mut out = Vec::new();
        let Ok(prefixes) = fs::read_dir(self.root.join("chunks")) else {
            return out;
        };
        for prefix in prefixes.flatten() {
            let Ok(files) = fs::read_dir(prefix.path()) else {
                continue;
            };
            for f in files.flatten() {
                if let Some(h) = f.file_name().to_str().and_then(Hash::from_hex) {
                    out.push((f.path(), h));
                }
            }
        }
        // Staged chunks of uploads that never committed are swept too.
        if let Ok(files) = fs::read_dir(&self.staging) {
            for f in files.flatten() {
                if let Some(h) = f.file_name().to_str().and_then(Hash::from_hex) {
                    out.push((f.path(), h));
                }
            }
        }
        out
    }
}

impl UifStore for LocalStore {
    fn has_chunk(&self, hash: &Hash) -> StoreResult<bool> {
        for path in [self.chunk_path(hash), self.staged_path(hash)] {
            match fs::metadata(&path) {
                Ok(m) if m.is_file() => return Ok(true),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io("stat chunk", e)),
            }
        }
        Ok(false)
    }

    fn put_chunk(&self, hash: &Hash, data: &[u8]) -> StoreResult<()> {
        check_chunk(hash, data)?;
        let _gc = self.gc_lock.read().unwrap_or_else(PoisonError::into_inner);
        if self.refresh_stored(hash) {
            return Ok(());
        }
        // Made durable by the commit that first refers to it (`promote`).
        durable::write_unsynced(&self.tmp, &self.staged_path(hash), data)
            .map_err(|e| StoreError::io("write chunk", e))
    }

    fn stage_chunk(&self, stage: &StageId, hash: &Hash, data: &[u8]) -> StoreResult<u64> {
        check_chunk(hash, data)?;
        let _gc = self.gc_lock.read().unwrap_or_else(PoisonError::into_inner);
        // An upload's pin keeps a stored chunk from GC; the fresh mtime
        // keeps it from a GC that listed it before the pin.
        if self.refresh_stored(hash) {
            return Ok(0);
        }
        let dir = self.stage_dir(stage);
        let path = dir.join(hash.to_hex());
        if path.is_file() {
            return Ok(0);
        }
        fs::create_dir_all(&dir).map_err(|e| StoreError::io("create stage directory", e))?;
        // Made durable by the commit's `publish`.
        durable::write_unsynced(&self.tmp, &path, data)
            .map_err(|e| StoreError::io("write chunk", e))?;
        Ok(data.len() as u64)
    }

    fn publish(&self, stage: &StageId, hashes: &[Hash]) -> StoreResult<()> {
        let _gc = self.gc_lock.read().unwrap_or_else(PoisonError::into_inner);
        let dir = self.stage_dir(stage);
        let mut staged = Vec::with_capacity(hashes.len());
        for h in hashes {
            if dir.join(h.to_hex()).is_file() {
                staged.push(*h);
            } else if !self.chunk_path(h).is_file() && !self.staged_path(h).is_file() {
                return Err(StoreError::MissingChunk(*h));
            }
        }
        self.promote(&staged, |h| dir.join(h.to_hex()))?;
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                tracing::warn!(stage = stage.as_str(), error = %e, "published stage not removed");
            }
            _ => {}
        }
        Ok(())
    }

    fn discard(&self, stage: &StageId, _hashes: &[Hash]) -> StoreResult<()> {
        match fs::remove_dir_all(self.stage_dir(stage)) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                Err(StoreError::io("delete an upload's stage", e))
            }
            _ => Ok(()),
        }
    }

    fn free_bytes(&self) -> Option<u64> {
        free_bytes_at(&self.root)
    }

    fn read_chunk(&self, hash: &Hash) -> StoreResult<Vec<u8>> {
        let f = match fs::File::open(self.chunk_path(hash)) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                match fs::File::open(self.staged_path(hash)) {
                    Ok(f) => f,
                    Err(e) if e.kind() == ErrorKind::NotFound => {
                        return Err(StoreError::MissingChunk(*hash));
                    }
                    Err(e) => return Err(StoreError::io("open chunk", e)),
                }
            }
            Err(e) => return Err(StoreError::io("open chunk", e)),
        };
        let mut data = Vec::with_capacity(64 * 1024);
        f.take(u64::from(MAX_CHUNK) + 1)
            .read_to_end(&mut data)
            .map_err(|e| StoreError::io("read chunk", e))?;
        // Not hashed again: every file here was checked against its hash
        // before it was written, and is complete (renamed into place after
        // its write; a staged file torn by an OS crash is dropped at open).
        // Bit rot is the scrub's business (`scrub`), and the agent checks
        // every chunk it receives.
        if data.len() > MAX_CHUNK as usize {
            return Err(StoreError::BadChunk(*hash));
        }
        Ok(data)
    }

    fn head(&self, user: &str) -> StoreResult<Option<Version>> {
        names::user(user)?;
        Ok(self.read_state(user)?.head)
    }

    fn manifest(&self, user: &str, version: Version) -> StoreResult<Manifest> {
        names::user(user)?;
        let listed = self
            .read_state(user)?
            .versions
            .iter()
            .any(|v| v.version == version);
        if !listed {
            return Err(StoreError::NoSuchVersion {
                user: user.to_string(),
                version,
            });
        }
        self.read_manifest(user, version)
    }

    fn versions(&self, user: &str) -> StoreResult<Vec<VersionInfo>> {
        names::user(user)?;
        Ok(self.read_state(user)?.versions)
    }

    fn users(&self) -> StoreResult<Vec<String>> {
        let entries = fs::read_dir(self.root.join("users"))
            .map_err(|e| StoreError::io("list users", e))?
            .flatten();
        Ok(user_names(entries.filter_map(|e| {
            e.file_name().to_str().map(str::to_string)
        })))
    }

    fn add_version(&self, new: &NewVersion<'_>) -> StoreResult<CommitOutcome> {
        new.check()?;
        let (user, manifest) = (new.user, new.manifest);
        let _gc = self.gc_lock.read().unwrap_or_else(PoisonError::into_inner);
        let mut staged = Vec::new();
        let mut seen = HashSet::new();
        for c in &manifest.chunks {
            if !seen.insert(c.hash) || self.chunk_path(&c.hash).is_file() {
                continue;
            }
            if self.staged_path(&c.hash).is_file() {
                staged.push(c.hash);
            } else {
                return Err(StoreError::MissingChunk(c.hash));
            }
        }
        self.promote(&staged, |h| self.staged_path(h))?;
        let lock = self.user_locks.get(user);
        let _user = lock.lock().unwrap_or_else(PoisonError::into_inner);
        let mut state = self.read_state(user)?;
        if let Some(v) = state.redelivered(new) {
            return Ok(CommitOutcome::Redelivered(v));
        }
        let (outcome, mut pruned) = state.add_version(&self.policy, new);
        let (CommitOutcome::Committed(v)
        | CommitOutcome::Redelivered(v)
        | CommitOutcome::Conflict { kept_as: v, .. }) = outcome;
        pruned.extend(quota::fit(
            &self.policy,
            user,
            &mut state,
            v,
            manifest,
            |i| self.read_manifest(user, i.version).map(Arc::new),
        )?);
        self.write_manifest(user, v, manifest)?;
        self.write_state(user, &state)?;
        for p in pruned {
            let _ = fs::remove_file(self.manifest_path(user, p));
        }
        Ok(outcome)
    }

    fn quota_base(&self, user: &str, charge: &Charge) -> StoreResult<QuotaBase> {
        names::user(user)?;
        Ok(QuotaBase::of(&self.policy, &self.read_state(user)?, charge))
    }

    fn holdings(&self, user: &str) -> StoreResult<Holdings> {
        names::user(user)?;
        let state = self.read_state(user)?;
        quota::holdings(&self.policy, &state, |i| {
            self.read_manifest(user, i.version).map(Arc::new)
        })
    }

    fn edit_user(&self, user: &str, edit: UserEdit) -> StoreResult<()> {
        names::user(user)?;
        let lock = self.user_locks.get(user);
        let _user = lock.lock().unwrap_or_else(PoisonError::into_inner);
        let mut state = self.read_state(user)?;
        let gone = edit.apply(user, &mut state)?;
        self.write_state(user, &state)?;
        if let Some(v) = gone {
            let _ = fs::remove_file(self.manifest_path(user, v));
        }
        Ok(())
    }

    fn gc(&self, grace: Duration) -> StoreResult<GcReport> {
        let _gc = self.gc_lock.write().unwrap_or_else(PoisonError::into_inner);
        let mut referenced: HashSet<Hash> = HashSet::new();
        for user in self.users()? {
            for v in self.versions(&user)? {
                let m = self.manifest(&user, v.version)?;
                referenced.extend(m.chunks.iter().map(|c| c.hash));
            }
        }
        referenced.insert(ZERO_BLOCK.hash);
        let now = SystemTime::now();
        let mut report = GcReport::default();
        for (path, hash) in self.chunk_files() {
            report.scanned += 1;
            if referenced.contains(&hash) {
                report.referenced += 1;
                continue;
            }
            let meta = fs::metadata(&path).ok();
            let young = meta
                .as_ref()
                .and_then(|m| m.modified().ok())
                .and_then(|t| now.duration_since(t).ok())
                .is_none_or(|age| age < grace);
            if young || self.pins.is_pinned(&hash) {
                report.spared += 1;
                continue;
            }
            if fs::remove_file(&path).is_ok() {
                report.deleted += 1;
                report.bytes_freed += meta.map_or(0, |m| m.len());
            }
        }
        Ok(report)
    }

    fn scrub(&self, bytes_per_sec: u64, stop: &dyn Fn() -> bool) -> StoreResult<ScrubReport> {
        self.scrub_chunks(bytes_per_sec, stop)
    }

    fn pin(&self, hashes: &[Hash]) -> ChunkPins {
        self.pins.pin(hashes)
    }

    fn policy(&self) -> &StorePolicy {
        &self.policy
    }
}

/// Free bytes an unprivileged writer has on the filesystem holding `path`
/// (`statvfs`), if it can be read.
pub(super) fn free_bytes_at(path: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    Some(st.blocks_available().saturating_mul(st.fragment_size()))
}

/// The hash a staged chunk file is named by, if its bytes match it.
fn staged_hash(path: &Path) -> Option<Hash> {
    let h = path.file_name()?.to_str().and_then(Hash::from_hex)?;
    let f = fs::File::open(path).ok()?;
    let mut data = Vec::new();
    f.take(u64::from(MAX_CHUNK) + 1)
        .read_to_end(&mut data)
        .ok()?;
    check_chunk(&h, &data).is_ok().then_some(h)
}

mod scrub;
#[cfg(test)]
mod tests;
