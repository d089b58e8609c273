//! [`LocalStore`]: the UIF store over a local directory.
//!
//! ```text
//! <root>/packs/<16 hex>.pack         sealed packs of chunks (see `pack`)
//! <root>/users/<user>/state.json     head, next version number, retained versions
//! <root>/users/<user>/v/<n>          manifest of version n (postcard)
//! <root>/staging/<stage>.<n>.pack        one upload's chunks until its commit (unsealed)
//! <root>/staging/loose.<n>.pack     chunks stored outside an upload (imports, the zero block)
//! <root>/tmp/                        temp files; emptied at open
//! <root>/corrupt/<64 hex>            chunk bytes a scrub found damaged (see `scrub`)
//! ```
//!
//! The commit point of a version is the atomic replacement of `state.json`:
//! the manifest file is written (durably) first, the state naming it second.
//! A crash before the state write leaves an orphan manifest that recovery
//! deletes; the old head stays intact.
//!
//! Chunks are made durable before either, a pack at a time: an upload's
//! chunks are appended to its own unsealed pack under `staging/` without
//! fsync; its publish *seals* that pack (index and trailer appended, one
//! fsync), renames it into `packs/` and fsyncs that directory, so a GiB of
//! uploads costs two fsyncs where it cost 16 k file creations. Only then
//! are the chunks in the in-memory [`Index`] every reader and upload
//! consults, so a file under `packs/` is always sealed and durable. A
//! stage's chunks are private to it until then; anything but a publish
//! deletes the stage's pack at once. Chunks stored outside an upload
//! (imports) go to the loose pack, stored from the moment they are
//! written, sealed by the first commit that refers to them.
//!
//! At open, unsealed packs an interrupted run left under `staging/` give
//! their intact chunks (each checked against its hash, up to the first
//! torn one) to a sealed pack, so an agent's retry resends only what was
//! lost; GC takes the rest after its grace. A store of the earlier layout
//! (one file per chunk under `chunks/`) is migrated in place at open.
//!
//! GC drops unreferenced chunks from the index and rewrites (repacks) a
//! pack once at most half its bytes are live; small old packs are merged.
//! See `repack`.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use uve_protocol::manifest::{Hash, Manifest};
use uve_protocol::message::Version;
use uve_protocol::names;

use self::index::{Index, PackFiles};
use self::pack::{PackWriter, read_entry};
use super::locks::NamedLocks;
use super::{
    Charge, ChunkPins, CommitOutcome, GcReport, Holdings, NewVersion, PinTable, QuotaBase,
    ScrubReport, StageId, StoreError, StorePolicy, StoreResult, UifStore, UserEdit, UserState,
    VersionInfo, check_chunk, quota, user_names,
};
use crate::store::durable;

/// Dedup hits remembered for GC's grace before the oldest are forgotten.
const TOUCHED_KEPT: usize = 1 << 16;

/// A UIF store in a local directory.
pub struct LocalStore {
    root: PathBuf,
    tmp: PathBuf,
    staging: PathBuf,
    packs_dir: PathBuf,
    policy: StorePolicy,
    /// Serialises commits per user (read-modify-write of `state.json`).
    user_locks: NamedLocks<Mutex<()>>,
    /// Writers (chunk puts, publishes, commits) share it; GC takes it
    /// exclusively to decide what is dead, so that decision never races a
    /// version being made visible.
    gc_lock: RwLock<()>,
    pins: Arc<PinTable>,
    /// Where every stored chunk is.
    index: RwLock<Index>,
    /// Open pack files.
    files: PackFiles,
    /// The pack of chunks stored outside an upload, until a commit (or GC,
    /// a scrub) seals it. Its chunks count as stored.
    loose: Mutex<Option<PackWriter>>,
    /// The unsealed pack of each upload in flight.
    /// (`None` once published or discarded: a late chunk opens it again.)
    stages: Mutex<HashMap<String, Stage>>,
    /// When an upload last found a stored chunk present (a dedup hit):
    /// GC's grace covers it from then, as a fresh write would.
    touched: Mutex<HashMap<Hash, SystemTime>>,
    /// One repack at a time (GC, scrub).
    repacking: Mutex<()>,
}

/// An upload's unsealed pack.
type Stage = Arc<Mutex<Option<PackWriter>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl LocalStore {
    /// Opens (creating if needed) a store at `root` and recovers from a
    /// crash: temp files are deleted, unsealed packs give their intact
    /// chunks to a sealed one, manifests no state names are deleted, a
    /// store of the earlier one-file-per-chunk layout is migrated. A state
    /// file that cannot be read is an error, never silently reset.
    pub fn open(root: &Path, policy: StorePolicy) -> StoreResult<Self> {
        let packs_dir = root.join("packs");
        for d in [&packs_dir, &root.join("users"), &root.join("staging")] {
            fs::create_dir_all(d)
                .map_err(|e| StoreError::io(format!("create {}", d.display()), e))?;
        }
        let store = LocalStore {
            root: root.to_path_buf(),
            tmp: root.join("tmp"),
            staging: root.join("staging"),
            index: RwLock::new(Index::load(&packs_dir)?),
            files: PackFiles::new(packs_dir.clone()),
            packs_dir,
            policy,
            user_locks: NamedLocks::default(),
            gc_lock: RwLock::new(()),
            pins: Arc::new(PinTable::default()),
            loose: Mutex::new(None),
            stages: Mutex::new(HashMap::new()),
            touched: Mutex::new(HashMap::new()),
            repacking: Mutex::new(()),
        };
        let cleared = durable::clear_dir(&store.tmp)
            .map_err(|e| StoreError::io("clear store temp directory", e))?
            + store.adopt_leftovers()?;
        if cleared > 0 {
            tracing::info!(cleared, "removed torn or temp leftovers of an earlier run");
        }
        for user in store.users()? {
            store.remove_orphans(&user)?;
        }
        super::keep_zero_block(&store)?;
        store.seal_loose()?;
        Ok(store)
    }

    fn user_dir(&self, user: &str) -> PathBuf {
        self.root.join("users").join(user)
    }

    fn manifest_path(&self, user: &str, v: Version) -> PathBuf {
        self.user_dir(user).join("v").join(v.to_string())
    }

    /// A fresh unsealed pack under `staging/`, named `<what>.<id>.pack`.
    fn new_writer(&self, what: &str) -> StoreResult<PackWriter> {
        let path = self
            .staging
            .join(format!("{what}.{}.pack", StageId::fresh().as_str()));
        PackWriter::create(&path).map_err(|e| StoreError::io("create a pack", e))
    }

    /// Seals `w` into `packs/` (one fsync of the pack, one of the
    /// directory) and indexes its chunks. An empty pack is deleted.
    fn install(&self, w: PackWriter) -> StoreResult<()> {
        if w.entries().is_empty() {
            return w
                .abandon()
                .map_err(|e| StoreError::io("delete an empty pack", e));
        }
        let id = self
            .index
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .reserve_id();
        let mtime = w.last_write();
        let src = w.path().to_path_buf();
        let entries = match w.seal(&self.files.path(id)) {
            Ok(e) => e,
            Err(e) => {
                let _ = fs::remove_file(&src);
                return Err(StoreError::io("seal a pack", e));
            }
        };
        durable::sync_dir(&self.packs_dir).map_err(|e| StoreError::io("sync packs/", e))?;
        self.index
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .add(id, &entries, mtime);
        Ok(())
    }

    /// Seals the loose pack, if it holds anything.
    pub(super) fn seal_loose(&self) -> StoreResult<()> {
        // Held across the seal: a reader that finds the loose pack gone
        // then finds its chunks indexed.
        let mut loose = lock(&self.loose);
        match loose.take() {
            Some(w) => self.install(w),
            None => Ok(()),
        }
    }

    /// Whether the chunk is indexed or in the loose pack.
    fn stored(&self, hash: &Hash) -> bool {
        lock(&self.loose)
            .as_ref()
            .is_some_and(|w| w.get(hash).is_some())
            || self
                .index
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .chunks
                .contains_key(hash)
    }

    /// Checks that every chunk of `hashes` is stored (else `MissingChunk`)
    /// and seals the loose pack if any of them is only there, so that
    /// what a version names is durable before it is committed. Called
    /// under the GC lock (read).
    fn ensure_stored(&self, hashes: impl Iterator<Item = Hash>) -> StoreResult<()> {
        let mut seen = HashSet::new();
        let mut loose = false;
        for h in hashes {
            if !seen.insert(h) {
                continue;
            }
            let indexed = self
                .index
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .chunks
                .contains_key(&h);
            if indexed {
                continue;
            }
            // In the loose pack (or put there since the look above, or
            // sealed meanwhile): seal it, so that nothing a commit names
            // is only in an unsynced file.
            if !self.stored(&h) {
                return Err(StoreError::MissingChunk(h));
            }
            loose = true;
        }
        if loose { self.seal_loose() } else { Ok(()) }
    }

    /// Remembers a dedup hit for GC's grace.
    fn touch(&self, hash: &Hash) {
        let now = SystemTime::now();
        let mut touched = lock(&self.touched);
        if touched.len() >= TOUCHED_KEPT {
            let hour = Duration::from_secs(3600);
            touched.retain(|_, t| now.duration_since(*t).is_ok_and(|age| age < hour));
            // Still half full: forget them all (pins still cover uploads),
            // so that pruning stays rare.
            if touched.len() >= TOUCHED_KEPT / 2 {
                touched.clear();
            }
        }
        touched.insert(*hash, now);
    }

    /// The unsealed pack of `stage` (created on its first chunk).
    fn stage_writer(&self, stage: &StageId) -> Stage {
        lock(&self.stages)
            .entry(stage.as_str().to_string())
            .or_default()
            .clone()
    }

    /// Reads an indexed chunk, or `None` if it is not indexed.
    fn read_indexed(&self, hash: &Hash) -> StoreResult<Option<Vec<u8>>> {
        // A repack may move the chunk between the lookup and the open.
        for _ in 0..3 {
            let loc = self
                .index
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .chunks
                .get(hash)
                .copied();
            let Some(loc) = loc else {
                return Ok(None);
            };
            match self.files.get(loc.pack) {
                Ok(f) => {
                    return read_entry(&f, loc.entry(*hash))
                        .map(Some)
                        .map_err(|e| StoreError::io("read chunk", e));
                }
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::io("open a pack", e)),
            }
        }
        Ok(None)
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
}

impl UifStore for LocalStore {
    fn has_chunk(&self, hash: &Hash) -> StoreResult<bool> {
        Ok(self.stored(hash))
    }

    fn put_chunk(&self, hash: &Hash, data: &[u8]) -> StoreResult<()> {
        check_chunk(hash, data)?;
        let _gc = self.gc_lock.read().unwrap_or_else(PoisonError::into_inner);
        if self.stored(hash) {
            self.touch(hash);
            return Ok(());
        }
        let mut loose = lock(&self.loose);
        if loose.is_none() {
            *loose = Some(self.new_writer("loose")?);
        }
        if let Some(w) = loose.as_mut() {
            // Made durable by the commit that first refers to it.
            w.append(hash, data)
                .map_err(|e| StoreError::io("write chunk", e))?;
        }
        Ok(())
    }

    fn stage_chunk(&self, stage: &StageId, hash: &Hash, data: &[u8]) -> StoreResult<u64> {
        check_chunk(hash, data)?;
        let _gc = self.gc_lock.read().unwrap_or_else(PoisonError::into_inner);
        // An upload's pin keeps a stored chunk from GC; the touch keeps it
        // from a GC that decided before the pin.
        if self.stored(hash) {
            self.touch(hash);
            return Ok(0);
        }
        let stage_pack = self.stage_writer(stage);
        let mut w = lock(&stage_pack);
        if w.is_none() {
            // Published or discarded since `stage_writer`: a chunk of an
            // upload that has ended is not taken (its pack would be
            // nobody's).
            let current = lock(&self.stages)
                .get(stage.as_str())
                .is_some_and(|s| Arc::ptr_eq(s, &stage_pack));
            if !current {
                return Err(StoreError::Busy(format!(
                    "upload stage {} has ended",
                    stage.as_str()
                )));
            }
            *w = Some(self.new_writer(stage.as_str())?);
        }
        let Some(w) = w.as_mut() else {
            return Ok(0);
        };
        // Made durable by the commit's `publish`.
        let appended = w
            .append(hash, data)
            .map_err(|e| StoreError::io("write chunk", e))?;
        Ok(if appended { data.len() as u64 } else { 0 })
    }

    fn publish(&self, stage: &StageId, hashes: &[Hash]) -> StoreResult<()> {
        let _gc = self.gc_lock.read().unwrap_or_else(PoisonError::into_inner);
        let Some(stage_pack) = lock(&self.stages).get(stage.as_str()).cloned() else {
            return self.ensure_stored(hashes.iter().copied());
        };
        // Waits for a chunk of the stage still being appended.
        let mut w = lock(&stage_pack);
        let missing = hashes
            .iter()
            .find(|h| w.as_ref().is_none_or(|w| w.get(h).is_none()) && !self.stored(h))
            .copied();
        if let Some(h) = missing {
            return Err(StoreError::MissingChunk(h));
        }
        lock(&self.stages).remove(stage.as_str());
        if let Some(w) = w.take() {
            self.install(w)?;
        }
        drop(w);
        // Loose chunks it names are sealed too.
        self.ensure_stored(hashes.iter().copied())
    }

    fn discard(&self, stage: &StageId, _hashes: &[Hash]) -> StoreResult<()> {
        let Some(stage_pack) = lock(&self.stages).remove(stage.as_str()) else {
            return Ok(());
        };
        let taken = lock(&stage_pack).take();
        match taken {
            Some(w) => w
                .abandon()
                .map_err(|e| StoreError::io("delete an upload's stage", e)),
            None => Ok(()),
        }
    }

    fn free_bytes(&self) -> Option<u64> {
        free_bytes_at(&self.root)
    }

    fn read_chunk(&self, hash: &Hash) -> StoreResult<Vec<u8>> {
        // Loose first: a seal moves its chunks to the index under this
        // lock, so a chunk is always found in one or the other.
        {
            let loose = lock(&self.loose);
            if let Some((w, e)) = loose.as_ref().and_then(|w| w.get(hash).map(|e| (w, e))) {
                return w.read(e).map_err(|e| StoreError::io("read chunk", e));
            }
        }
        // Not hashed again: every chunk was checked against its hash
        // before it was written, and a pack is sealed (fsynced) before it
        // is indexed. Bit rot is the scrub's business (`scrub`), and the
        // agent checks every chunk it receives.
        self.read_indexed(hash)?
            .ok_or(StoreError::MissingChunk(*hash))
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
        self.ensure_stored(manifest.chunks.iter().map(|c| c.hash))?;
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
        self.collect(grace)
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

mod index;
mod migrate;
mod pack;
mod repack;
mod scrub;
#[cfg(test)]
mod tests;
