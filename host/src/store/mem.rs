//! [`MemStore`]: the UIF store in memory, for tests and the fuzz targets
//! (`host/fuzz`, feature `fuzzing`); never part of a shipped build.
//!
//! It keeps the contract of [`UifStore`] as the local store does: chunks
//! are checked against their hash, an upload's stage is invisible to every
//! other upload until its commit publishes it, a version is added only when
//! every chunk it lists is stored, and the head moves by compare-and-swap
//! with the retention rules every store shares (`UserState::add_version`).
//! Nothing is durable and nothing touches a disk, so a harness can build a
//! fresh store per input at memory speed.
//!
//! Two things a disk cannot offer make it a test double: it can be told to
//! fail its next operations ([`MemStore::fail_next`]), so that the callers'
//! error paths run, and it reports what it holds ([`MemStore::held`]), so
//! that a test can check that nothing an upload staged outlives it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use uve_protocol::manifest::{Hash, Manifest, ZERO_BLOCK};
use uve_protocol::message::Version;
use uve_protocol::names;

use super::{
    Charge, ChunkPins, CommitOutcome, GcReport, Holdings, NewVersion, PinTable, QuotaBase, StageId,
    StoreError, StorePolicy, StoreResult, UifStore, UserEdit, UserState, VersionInfo, check_chunk,
    now_ms, quota, user_names,
};

/// A stored or staged chunk: its bytes (shared, so seeding many stores
/// with the same content costs no copies) and when it was last written.
#[derive(Clone)]
struct Stored {
    bytes: Arc<[u8]>,
    written_ms: u64,
}

/// One user's versions: the shared state record and the manifests it names.
#[derive(Clone, Default)]
struct UserData {
    state: UserState,
    manifests: HashMap<Version, Arc<Manifest>>,
}

impl UserData {
    /// A retained version's manifest.
    fn manifest(&self, user: &str, version: Version) -> StoreResult<Arc<Manifest>> {
        self.manifests
            .get(&version)
            .cloned()
            .ok_or_else(|| StoreError::NoSuchVersion {
                user: user.to_string(),
                version,
            })
    }
}

#[derive(Default)]
struct Data {
    chunks: HashMap<Hash, Stored>,
    stages: HashMap<StageId, HashMap<Hash, Stored>>,
    /// Stages whose discard failed: left in place, as a real store leaves
    /// them for its next start to recover.
    orphans: HashSet<StageId>,
    users: BTreeMap<String, UserData>,
}

/// What a [`MemStore`] holds right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    /// Stored chunks.
    pub chunks: usize,
    /// Their bytes.
    pub chunk_bytes: u64,
    /// Open stages (uploads that staged something and neither published
    /// nor discarded it), not counting orphans.
    pub stages: usize,
    /// Bytes staged in them, orphans included.
    pub staged_bytes: u64,
    /// Stages left behind because their discard failed.
    pub orphans: usize,
    /// Distinct chunks pinned by uploads in flight.
    pub pinned: usize,
}

/// A UIF store in memory (tests and fuzzing).
pub struct MemStore {
    policy: StorePolicy,
    pins: Arc<PinTable>,
    bulk_threads: usize,
    /// The size of the pretend filesystem: `free_bytes` is what the chunks
    /// and stages leave of it (`None`: the store cannot tell, like S3).
    capacity: Option<u64>,
    data: Mutex<Data>,
    /// Operations still to fail ([`MemStore::fail_next`]).
    fail: AtomicU32,
    /// Operations failed so far on purpose.
    failed: AtomicU64,
}

impl MemStore {
    /// An empty store with `policy`, one bulk thread and no free-space
    /// figure.
    pub fn new(policy: StorePolicy) -> Self {
        let store = MemStore {
            policy,
            pins: Arc::new(PinTable::default()),
            bulk_threads: 1,
            capacity: None,
            data: Mutex::new(Data::default()),
            fail: AtomicU32::new(0),
            failed: AtomicU64::new(0),
        };
        // No fault is injected yet: this cannot fail.
        let _ = super::keep_zero_block(&store);
        store
    }

    /// A store that starts with what this one holds now (chunk bytes
    /// shared, not copied; nothing staged, nothing pinned) under `policy`:
    /// a harness seeds one store once and forks it for every case.
    pub fn fork(&self, policy: StorePolicy) -> MemStore {
        let d = self.lock();
        let store = MemStore::new(policy);
        {
            let mut fresh = store.lock();
            fresh.chunks = d.chunks.clone();
            fresh.users = d.users.clone();
        }
        store
    }

    /// Sets the bulk threads the host should start for it (0: the host
    /// runs chunk work on its blocking threads instead).
    #[must_use]
    pub fn with_bulk_threads(mut self, threads: usize) -> Self {
        self.bulk_threads = threads;
        self
    }

    /// Pretends the chunks live on a filesystem of `bytes`: `free_bytes`
    /// reports what stored and staged chunks leave of it.
    #[must_use]
    pub fn with_capacity(mut self, bytes: u64) -> Self {
        self.capacity = Some(bytes);
        self
    }

    /// Makes the next `n` store operations fail with an i/o error (what a
    /// full disk or a lost object store looks like to the caller).
    pub fn fail_next(&self, n: u32) {
        self.fail.store(n, Ordering::SeqCst);
    }

    /// How many operations have failed because of [`fail_next`](Self::fail_next).
    pub fn failures(&self) -> u64 {
        self.failed.load(Ordering::SeqCst)
    }

    /// What the store holds now.
    pub fn held(&self) -> Held {
        let d = self.lock();
        let bytes =
            |m: &HashMap<Hash, Stored>| m.values().map(|s| s.bytes.len() as u64).sum::<u64>();
        Held {
            chunks: d.chunks.len(),
            chunk_bytes: bytes(&d.chunks),
            stages: d.stages.keys().filter(|s| !d.orphans.contains(*s)).count(),
            staged_bytes: d.stages.values().map(bytes).sum(),
            orphans: d.orphans.len(),
            pinned: self.pins.pinned(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Data> {
        self.data.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Fails this operation if [`fail_next`](Self::fail_next) asked for it.
    fn injected(&self, what: &str) -> StoreResult<()> {
        let take = self
            .fail
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if take.is_ok() {
            self.failed.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::io(
                what,
                std::io::Error::other("failure injected by the test"),
            ));
        }
        Ok(())
    }
}

fn stored(data: &[u8]) -> Stored {
    Stored {
        bytes: Arc::from(data),
        written_ms: now_ms(),
    }
}

impl UifStore for MemStore {
    fn has_chunk(&self, hash: &Hash) -> StoreResult<bool> {
        self.injected("stat chunk")?;
        Ok(self.lock().chunks.contains_key(hash))
    }

    fn put_chunk(&self, hash: &Hash, data: &[u8]) -> StoreResult<()> {
        self.injected("write chunk")?;
        check_chunk(hash, data)?;
        let mut d = self.lock();
        match d.chunks.get_mut(hash) {
            // Written again: its grace period starts anew, as a file's
            // refreshed mtime does.
            Some(s) => s.written_ms = now_ms(),
            None => {
                d.chunks.insert(*hash, stored(data));
            }
        }
        Ok(())
    }

    fn read_chunk(&self, hash: &Hash) -> StoreResult<Vec<u8>> {
        self.injected("read chunk")?;
        let bytes = self
            .lock()
            .chunks
            .get(hash)
            .map(|s| s.bytes.clone())
            .ok_or(StoreError::MissingChunk(*hash))?;
        check_chunk(hash, &bytes)?;
        Ok(bytes.to_vec())
    }

    fn head(&self, user: &str) -> StoreResult<Option<Version>> {
        names::user(user)?;
        self.injected("read user state")?;
        Ok(self.lock().users.get(user).and_then(|u| u.state.head))
    }

    fn manifest(&self, user: &str, version: Version) -> StoreResult<Manifest> {
        names::user(user)?;
        self.injected("read manifest")?;
        let d = self.lock();
        match d.users.get(user) {
            Some(u) => u.manifest(user, version).map(|m| m.as_ref().clone()),
            None => Err(StoreError::NoSuchVersion {
                user: user.to_string(),
                version,
            }),
        }
    }

    fn versions(&self, user: &str) -> StoreResult<Vec<VersionInfo>> {
        names::user(user)?;
        self.injected("read user state")?;
        Ok(self
            .lock()
            .users
            .get(user)
            .map(|u| u.state.versions.clone())
            .unwrap_or_default())
    }

    fn users(&self) -> StoreResult<Vec<String>> {
        self.injected("list users")?;
        Ok(user_names(self.lock().users.keys().cloned()))
    }

    fn add_version(&self, new: &NewVersion<'_>) -> StoreResult<CommitOutcome> {
        new.check()?;
        self.injected("write user state")?;
        let mut d = self.lock();
        if let Some(c) = new
            .manifest
            .chunks
            .iter()
            .find(|c| !d.chunks.contains_key(&c.hash))
        {
            return Err(StoreError::MissingChunk(c.hash));
        }
        let empty = UserData::default();
        let user = d.users.get(new.user).unwrap_or(&empty);
        // Changed on a copy: a version the quota refuses leaves no trace.
        let mut state = user.state.clone();
        if let Some(v) = state.redelivered(new) {
            return Ok(CommitOutcome::Redelivered(v));
        }
        let (outcome, mut pruned) = state.add_version(&self.policy, new);
        let (CommitOutcome::Committed(v)
        | CommitOutcome::Redelivered(v)
        | CommitOutcome::Conflict { kept_as: v, .. }) = outcome;
        pruned.extend(quota::fit(
            &self.policy,
            new.user,
            &mut state,
            v,
            new.manifest,
            |i| user.manifest(new.user, i.version),
        )?);
        let user = d.users.entry(new.user.to_string()).or_default();
        user.state = state;
        user.manifests.insert(v, Arc::new(new.manifest.clone()));
        for p in pruned {
            user.manifests.remove(&p);
        }
        Ok(outcome)
    }

    fn quota_base(&self, user: &str, charge: &Charge) -> StoreResult<QuotaBase> {
        names::user(user)?;
        self.injected("read user state")?;
        let d = self.lock();
        let empty = UserState::default();
        let state = d.users.get(user).map_or(&empty, |u| &u.state);
        Ok(QuotaBase::of(&self.policy, state, charge))
    }

    fn holdings(&self, user: &str) -> StoreResult<Holdings> {
        names::user(user)?;
        self.injected("read user state")?;
        let d = self.lock();
        let empty = UserData::default();
        let u = d.users.get(user).unwrap_or(&empty);
        quota::holdings(&self.policy, &u.state, |i| u.manifest(user, i.version))
    }

    fn edit_user(&self, user: &str, edit: UserEdit) -> StoreResult<()> {
        names::user(user)?;
        self.injected("write user state")?;
        let mut d = self.lock();
        let mut state = d
            .users
            .get(user)
            .map(|u| u.state.clone())
            .unwrap_or_default();
        let gone = edit.apply(user, &mut state)?;
        let u = d.users.entry(user.to_string()).or_default();
        u.state = state;
        if let Some(v) = gone {
            u.manifests.remove(&v);
        }
        Ok(())
    }

    fn stage_chunk(&self, stage: &StageId, hash: &Hash, data: &[u8]) -> StoreResult<u64> {
        self.injected("write chunk")?;
        check_chunk(hash, data)?;
        let mut d = self.lock();
        if let Some(s) = d.chunks.get_mut(hash) {
            s.written_ms = now_ms();
            return Ok(0);
        }
        let staged = d.stages.entry(stage.clone()).or_default();
        if staged.contains_key(hash) {
            return Ok(0);
        }
        staged.insert(*hash, stored(data));
        Ok(data.len() as u64)
    }

    fn publish(&self, stage: &StageId, hashes: &[Hash]) -> StoreResult<()> {
        self.injected("publish a stage")?;
        let mut d = self.lock();
        let d = &mut *d;
        let empty = HashMap::new();
        let staged = d.stages.get(stage).unwrap_or(&empty);
        if let Some(h) = hashes
            .iter()
            .find(|h| !staged.contains_key(*h) && !d.chunks.contains_key(*h))
        {
            return Err(StoreError::MissingChunk(*h));
        }
        // What the stage holds beyond `hashes` goes with it, as the local
        // store deletes the stage's directory.
        let mut staged = d.stages.remove(stage).unwrap_or_default();
        for h in hashes {
            if let Some(s) = staged.remove(h) {
                d.chunks.entry(*h).or_insert(s);
            }
        }
        Ok(())
    }

    fn discard(&self, stage: &StageId, _hashes: &[Hash]) -> StoreResult<()> {
        if let Err(e) = self.injected("delete a stage") {
            let mut d = self.lock();
            if d.stages.contains_key(stage) {
                d.orphans.insert(stage.clone());
            }
            return Err(e);
        }
        let mut d = self.lock();
        d.stages.remove(stage);
        d.orphans.remove(stage);
        Ok(())
    }

    fn free_bytes(&self) -> Option<u64> {
        let held = self.held();
        self.capacity
            .map(|c| c.saturating_sub(held.chunk_bytes + held.staged_bytes))
    }

    fn gc(&self, grace: Duration) -> StoreResult<GcReport> {
        self.injected("collect garbage")?;
        let mut d = self.lock();
        let referenced: HashSet<Hash> = d
            .users
            .values()
            .flat_map(|u| u.manifests.values())
            .flat_map(|m| m.chunks.iter().map(|c| c.hash))
            .chain([ZERO_BLOCK.hash])
            .collect();
        let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
        let now = now_ms();
        let mut report = GcReport::default();
        d.chunks.retain(|hash, s| {
            report.scanned += 1;
            if referenced.contains(hash) {
                report.referenced += 1;
                return true;
            }
            if now.saturating_sub(s.written_ms) < grace_ms || self.pins.is_pinned(hash) {
                report.spared += 1;
                return true;
            }
            report.deleted += 1;
            report.bytes_freed += s.bytes.len() as u64;
            false
        });
        Ok(report)
    }

    fn pin(&self, hashes: &[Hash]) -> ChunkPins {
        self.pins.pin(hashes)
    }

    fn policy(&self) -> &StorePolicy {
        &self.policy
    }

    fn bulk_threads(&self) -> usize {
        self.bulk_threads
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::store::HeadRule;
    use uve_protocol::manifest::ChunkRef;
    use uve_protocol::testdata::noise;

    fn chunk(len: usize, seed: u64) -> (ChunkRef, Vec<u8>) {
        let data = noise(len, seed);
        let len = u32::try_from(len).unwrap();
        (
            ChunkRef {
                hash: Hash::of(&data),
                len,
            },
            data,
        )
    }

    fn commit(s: &MemStore, m: &Manifest, base: Option<Version>) -> CommitOutcome {
        s.add_version(&NewVersion {
            user: "alice",
            manifest: m,
            base,
            origin: "vm:vm1",
            rule: HeadRule::IfHeadIs(base),
        })
        .unwrap()
    }

    #[test]
    fn a_stage_is_invisible_until_published_and_gone_when_discarded() {
        let s = MemStore::new(StorePolicy::default());
        let (a, da) = chunk(1000, 1);
        let (b, db) = chunk(2000, 2);
        let (one, two) = (StageId::fresh(), StageId::fresh());
        assert_eq!(s.stage_chunk(&one, &a.hash, &da).unwrap(), 1000);
        assert_eq!(s.stage_chunk(&one, &a.hash, &da).unwrap(), 0, "staged once");
        assert!(!s.has_chunk(&a.hash).unwrap(), "staged is not stored");
        assert!(matches!(
            s.read_chunk(&a.hash),
            Err(StoreError::MissingChunk(_))
        ));
        assert!(matches!(
            s.stage_chunk(&two, &b.hash, &da),
            Err(StoreError::BadChunk(_))
        ));
        s.stage_chunk(&two, &b.hash, &db).unwrap();
        assert!(matches!(
            s.publish(&one, &[a.hash, b.hash]),
            Err(StoreError::MissingChunk(h)) if h == b.hash
        ));
        s.publish(&one, &[a.hash]).unwrap();
        assert_eq!(s.read_chunk(&a.hash).unwrap(), da);
        assert_eq!(
            s.stage_chunk(&two, &a.hash, &da).unwrap(),
            0,
            "stored already"
        );
        s.discard(&two, &[b.hash]).unwrap();
        assert!(!s.has_chunk(&b.hash).unwrap());
        let held = s.held();
        let zero = u64::from(ZERO_BLOCK.len);
        assert_eq!(
            (held.chunks, held.chunk_bytes),
            (2, 1000 + zero),
            "the zero block and a"
        );
        assert_eq!((held.stages, held.staged_bytes), (0, 0));
    }

    #[test]
    fn versions_need_their_chunks_and_move_the_head_by_compare_and_swap() {
        let s = MemStore::new(StorePolicy {
            history_keep: 2,
            ..StorePolicy::default()
        });
        let (a, da) = chunk(5000, 3);
        let m = Manifest::from_chunks(vec![a]);
        let missing = s.add_version(&NewVersion {
            user: "alice",
            manifest: &m,
            base: None,
            origin: "vm:vm1",
            rule: HeadRule::IfHeadIs(None),
        });
        assert!(matches!(missing, Err(StoreError::MissingChunk(_))));
        s.put_chunk(&a.hash, &da).unwrap();
        assert_eq!(commit(&s, &m, None), CommitOutcome::Committed(1));
        assert_eq!(
            commit(&s, &m, None),
            CommitOutcome::Redelivered(1),
            "the head's own bytes, base and origin again: its commit"
        );
        let other = Manifest::from_chunks(vec![a, a]);
        assert_eq!(
            commit(&s, &other, None),
            CommitOutcome::Conflict {
                kept_as: 2,
                head: Some(1)
            }
        );
        assert_eq!(commit(&s, &m, Some(1)), CommitOutcome::Committed(3));
        assert_eq!(commit(&s, &m, Some(3)), CommitOutcome::Committed(4));
        let kept: Vec<Version> = s
            .versions("alice")
            .unwrap()
            .iter()
            .map(|v| v.version)
            .collect();
        assert_eq!(kept, vec![2, 3, 4], "history_keep 2 prunes version 1");
        assert!(matches!(
            s.manifest("alice", 1),
            Err(StoreError::NoSuchVersion { .. })
        ));
        assert_eq!(s.manifest("alice", 4).unwrap(), m);
        assert_eq!(s.head("alice").unwrap(), Some(4));
        assert_eq!(s.users().unwrap(), vec!["alice".to_string()]);
        assert!(matches!(s.head("../x"), Err(StoreError::InvalidName(_))));
    }

    #[test]
    fn gc_spares_referenced_pinned_and_young_chunks() {
        let s = MemStore::new(StorePolicy::default());
        let (a, da) = chunk(100, 4);
        let (b, db) = chunk(200, 5);
        let (c, dc) = chunk(300, 6);
        for (r, d) in [(a, &da), (b, &db), (c, &dc)] {
            s.put_chunk(&r.hash, d).unwrap();
        }
        commit(&s, &Manifest::from_chunks(vec![a]), None);
        assert_eq!(s.gc(Duration::from_secs(3600)).unwrap().deleted, 0, "young");
        let pins = s.pin(&[b.hash]);
        assert_eq!(s.held().pinned, 1);
        let report = s.gc(Duration::ZERO).unwrap();
        assert_eq!(
            (report.referenced, report.spared, report.deleted),
            (2, 1, 1),
            "a and the zero block referenced, b pinned, c deleted"
        );
        assert_eq!(report.bytes_freed, 300);
        drop(pins);
        assert_eq!(s.held().pinned, 0);
        assert_eq!(s.gc(Duration::ZERO).unwrap().deleted, 1);
        assert!(s.has_chunk(&a.hash).unwrap());
    }

    #[test]
    fn injected_failures_fail_exactly_the_next_operations() {
        let zero = u64::from(ZERO_BLOCK.len);
        let s = MemStore::new(StorePolicy::default()).with_capacity(zero + 10_000);
        let (a, da) = chunk(1000, 7);
        s.fail_next(2);
        assert!(matches!(
            s.put_chunk(&a.hash, &da),
            Err(StoreError::Io { .. })
        ));
        assert!(matches!(s.has_chunk(&a.hash), Err(StoreError::Io { .. })));
        s.put_chunk(&a.hash, &da).unwrap();
        assert_eq!(s.failures(), 2);
        assert_eq!(s.free_bytes(), Some(9_000));
        let (b, db) = chunk(500, 8);
        let stage = StageId::fresh();
        s.stage_chunk(&stage, &b.hash, &db).unwrap();
        s.fail_next(1);
        assert!(s.discard(&stage, &[b.hash]).is_err());
        let held = s.held();
        assert_eq!((held.stages, held.orphans, held.staged_bytes), (0, 1, 500));
    }
}
