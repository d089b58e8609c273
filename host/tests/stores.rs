//! One store test suite, two backends: every case below runs against the
//! local store and against `S3Store` on a real Ceph RGW started by the test
//! (`tests/s3/rgw.sh`). The RGW test also runs two `uve-host` processes
//! sharing one bucket: a user moves from a VM on host 1 to a VM on host 2,
//! and racing updates from both hosts leave one head and one conflict.
//! An upload abandoned on one host never takes a chunk that a concurrent
//! upload on the other commits (`stores/abandon.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

#[cfg(feature = "s3")]
use common::rgw::Rgw;
use common::{manifest_of, noise};
use uve_host::store::{
    CommitOutcome, LocalStore, StageId, StoreError, StorePolicy, UifStore, UserEdit, VersionKind,
};
use uve_protocol::manifest::{Hash, Manifest, ZERO_BLOCK};
use uve_protocol::message::Version;

#[path = "stores/abandon.rs"]
mod abandon;
#[cfg(feature = "s3")]
#[path = "stores/s3.rs"]
mod s3;

/// Opens a store (two handles that act as two hosts) at a fresh location.
trait Backend {
    fn name(&self) -> &str;
    /// Two handles on one store at `location`, as two hosts would hold.
    /// (The local store is single-host: both handles are the same store.)
    fn open_pair(
        &self,
        location: &str,
        policy: StorePolicy,
        grace: Duration,
    ) -> (Arc<dyn UifStore>, Arc<dyn UifStore>);
    fn open(&self, location: &str, policy: StorePolicy) -> Arc<dyn UifStore> {
        self.open_pair(location, policy, Duration::from_secs(3600))
            .0
    }
}

struct Local(PathBuf);

impl Backend for Local {
    fn name(&self) -> &str {
        "local"
    }
    fn open_pair(
        &self,
        location: &str,
        policy: StorePolicy,
        _grace: Duration,
    ) -> (Arc<dyn UifStore>, Arc<dyn UifStore>) {
        let s: Arc<dyn UifStore> =
            Arc::new(LocalStore::open(&self.0.join(location), policy).unwrap());
        (s.clone(), s)
    }
}

fn put_all(store: &dyn UifStore, data: &[u8]) -> Manifest {
    let (m, bytes) = manifest_of(data);
    for (h, b) in &bytes {
        store.put_chunk(h, b).unwrap();
    }
    m
}

fn read_all(store: &dyn UifStore, user: &str, v: Version) -> Vec<u8> {
    let m = store.manifest(user, v).unwrap();
    let mut out = Vec::new();
    for c in &m.chunks {
        out.extend(store.read_chunk(&c.hash).unwrap());
    }
    out
}

fn committed(o: CommitOutcome) -> Version {
    match o {
        CommitOutcome::Committed(v) => v,
        other => panic!("expected a commit, got {other:?}"),
    }
}

fn policy(history_keep: usize) -> StorePolicy {
    policy_with(|p| p.history_keep = history_keep)
}

/// The default policy changed by `set`.
fn policy_with(set: impl FnOnce(&mut StorePolicy)) -> StorePolicy {
    let mut p = StorePolicy::default();
    set(&mut p);
    p
}

/// An update re-delivered after a crash lost its commit's answer (same
/// bytes, same base, same origin as the head) is answered as that head,
/// and stores nothing; anything else stale is still a conflict version.
fn a_redelivered_update_is_answered_as_its_commit(b: &dyn Backend) {
    let s = b.open("redeliver", policy(10));
    let (d1, d2) = (noise(200_000, 41), noise(200_000, 42));
    let m1 = put_all(s.as_ref(), &d1);
    let v1 = committed(s.commit("erin", &m1, None, true, "vm:a").unwrap());
    let m2 = put_all(s.as_ref(), &d2);
    let v2 = committed(s.commit("erin", &m2, Some(v1), true, "vm:a").unwrap());
    for lease_ok in [true, false] {
        assert_eq!(
            s.commit("erin", &m2, Some(v1), lease_ok, "vm:a").unwrap(),
            CommitOutcome::Redelivered(v2),
            "lease ok: {lease_ok}"
        );
    }
    assert_eq!(s.versions("erin").unwrap().len(), 2, "nothing stored");
    assert!(
        matches!(
            s.commit("erin", &m2, Some(v1), true, "vm:b").unwrap(),
            CommitOutcome::Conflict { .. }
        ),
        "another VM's same bytes are its own conflict"
    );
    assert!(
        matches!(
            s.commit("erin", &m1, Some(v1), true, "vm:a").unwrap(),
            CommitOutcome::Conflict { .. }
        ),
        "other bytes from the same base"
    );
    assert!(
        matches!(
            s.commit("erin", &m2, None, true, "vm:a").unwrap(),
            CommitOutcome::Conflict { .. }
        ),
        "the same bytes from another base"
    );
    assert_eq!(s.head("erin").unwrap(), Some(v2));
}

fn cas_commits_and_keeps_conflicts(b: &dyn Backend) {
    let s = b.open("cas", policy(10));
    let (d1, d2) = (noise(300_000, 1), noise(300_000, 2));
    let m1 = put_all(s.as_ref(), &d1);
    assert_eq!(s.head("alice").unwrap(), None);
    assert_eq!(
        s.commit("alice", &m1, None, true, "vm:a").unwrap(),
        CommitOutcome::Committed(1)
    );
    let m2 = put_all(s.as_ref(), &d2);
    assert_eq!(
        s.commit("alice", &m2, None, true, "vm:b").unwrap(),
        CommitOutcome::Conflict {
            kept_as: 2,
            head: Some(1)
        },
        "stale base"
    );
    assert_eq!(
        s.commit("alice", &m2, Some(1), false, "vm:b").unwrap(),
        CommitOutcome::Conflict {
            kept_as: 3,
            head: Some(1)
        },
        "stale lease"
    );
    assert_eq!(
        s.commit("alice", &m2, Some(1), true, "vm:b").unwrap(),
        CommitOutcome::Committed(4)
    );
    assert_eq!(s.head("alice").unwrap(), Some(4));
    assert!(read_all(s.as_ref(), "alice", 1) == d1);
    assert!(read_all(s.as_ref(), "alice", 2) == d2);
    assert!(read_all(s.as_ref(), "alice", 4) == d2);
    let kinds: Vec<(Version, VersionKind, String)> = s
        .versions("alice")
        .unwrap()
        .into_iter()
        .map(|v| (v.version, v.kind, v.origin))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (1, VersionKind::Committed, "vm:a".into()),
            (2, VersionKind::Conflict, "vm:b".into()),
            (3, VersionKind::Conflict, "vm:b".into()),
            (4, VersionKind::Committed, "vm:b".into()),
        ]
    );
    assert_eq!(s.users().unwrap(), vec!["alice".to_string()]);
    assert!(matches!(
        s.manifest("alice", 99),
        Err(StoreError::NoSuchVersion { version: 99, .. })
    ));
    // A second handle (another host) sees the same store.
    let again = b.open("cas", policy(10));
    assert_eq!(again.head("alice").unwrap(), Some(4));
    assert!(read_all(again.as_ref(), "alice", 4) == d2);
}

fn refuses_bad_input(b: &dyn Backend) {
    let s = b.open("refusals", policy_with(|p| p.quota_bytes = 100_000));
    let small = noise(50_000, 3);
    let (m, bytes) = manifest_of(&small);
    let (h, data) = bytes.iter().next().unwrap();
    // A chunk whose bytes do not match its hash is refused and not stored.
    let wrong = Hash::of(b"something else");
    assert!(matches!(
        s.put_chunk(&wrong, data),
        Err(StoreError::BadChunk(x)) if x == wrong
    ));
    assert!(!s.has_chunk(&wrong).unwrap());
    // Committing before the chunks are there.
    assert!(matches!(
        s.commit("bob", &m, None, true, "vm:a"),
        Err(StoreError::MissingChunk(_))
    ));
    assert_eq!(s.head("bob").unwrap(), None);
    s.put_chunk(h, data).unwrap();
    assert_eq!(s.has_chunks(&[*h, wrong]).unwrap(), vec![true, false]);
    for hostile in ["../etc", "a/b", "", ".."] {
        assert!(matches!(s.head(hostile), Err(StoreError::InvalidName(_))));
        assert!(matches!(
            s.commit(hostile, &m, None, true, "vm:a"),
            Err(StoreError::InvalidName(_))
        ));
    }
    let big = put_all(s.as_ref(), &noise(150_000, 4));
    assert!(matches!(
        s.commit("bob", &big, None, true, "vm:a"),
        Err(StoreError::QuotaExceeded {
            held: 150_000,
            quota: 100_000,
            conflict_origin: None,
            ..
        })
    ));
    // A manifest whose digest does not match its chunk list.
    let mut forged = m.clone();
    forged.header.digest = Hash::of(b"forged");
    assert!(matches!(
        s.commit("bob", &forged, None, true, "vm:a"),
        Err(StoreError::BadManifest(_))
    ));
    assert_eq!(s.head("bob").unwrap(), None);
    assert!(s.versions("bob").unwrap().is_empty());
}

fn history_is_pruned_and_rollback_makes_a_new_head(b: &dyn Backend) {
    let s = b.open(
        "history",
        policy_with(|p| {
            p.history_keep = 3;
            p.conflict_keep = 2;
        }),
    );
    let mut head = None;
    for i in 0..6u64 {
        let m = put_all(s.as_ref(), &noise(1000, i + 10));
        head = Some(committed(
            s.commit("carol", &m, head, true, "vm:a").unwrap(),
        ));
        // A stale upload each round: a conflict version.
        s.commit("carol", &m, None, true, "vm:b").unwrap();
    }
    let vs = s.versions("carol").unwrap();
    let of_kind = |k| {
        vs.iter()
            .filter(|v| v.kind == k)
            .map(|v| v.version)
            .collect::<Vec<_>>()
    };
    assert_eq!(of_kind(VersionKind::Committed), vec![7, 9, 11]);
    assert_eq!(of_kind(VersionKind::Conflict), vec![10, 12]);
    assert_eq!(head, Some(11));
    assert!(matches!(
        s.manifest("carol", 1),
        Err(StoreError::NoSuchVersion { .. })
    ));
    assert!(read_all(s.as_ref(), "carol", 11) == noise(1000, 15));
    // Rollback makes a copy of an old version the new head.
    assert_eq!(s.rollback("carol", 7).unwrap(), 13);
    assert_eq!(s.head("carol").unwrap(), Some(13));
    assert!(read_all(s.as_ref(), "carol", 13) == noise(1000, 13));
    let v13 = s.versions("carol").unwrap().pop().unwrap();
    assert_eq!(v13.origin, "rollback:7");
    assert_eq!(v13.kind, VersionKind::Committed);
    assert!(matches!(
        s.rollback("carol", 1),
        Err(StoreError::NoSuchVersion { .. })
    ));
}

/// `conflict_keep` counts per origin: a VM adding conflict versions in a
/// loop (one that lost its lease, say) evicts only its own, never those of
/// another writer.
fn one_origins_conflicts_never_evict_anothers(b: &dyn Backend) {
    let s = b.open("origins", policy_with(|p| p.conflict_keep = 2));
    let m = put_all(s.as_ref(), &noise(1000, 40));
    let head = committed(s.commit("frank", &m, None, true, "vm:a").unwrap());
    let genuine = s.commit("frank", &m, None, true, "vm:b").unwrap();
    let CommitOutcome::Conflict {
        kept_as: genuine, ..
    } = genuine
    else {
        panic!("a stale base must be a conflict: {genuine:?}");
    };
    for _ in 0..6 {
        s.commit("frank", &m, Some(head), false, "vm:evicted")
            .unwrap();
    }
    let vs = s.versions("frank").unwrap();
    let conflicts_of = |origin: &str| {
        vs.iter()
            .filter(|v| v.kind == VersionKind::Conflict && v.origin == origin)
            .map(|v| v.version)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        conflicts_of("vm:b"),
        vec![genuine],
        "another origin's conflict evicted"
    );
    assert_eq!(
        conflicts_of("vm:evicted"),
        vec![7, 8],
        "the newest two of its own kept"
    );
    assert_eq!(s.head("frank").unwrap(), Some(head));
}

fn gc_sweeps_only_unreferenced_old_unpinned_chunks(b: &dyn Backend) {
    // A shared (S3) store never sweeps younger than its configured grace,
    // whatever `gc` is asked: 1 s here.
    let s = b.open_pair("gc", policy(1), Duration::from_secs(1)).0;
    assert!(
        s.has_chunk(&ZERO_BLOCK.hash).unwrap(),
        "the zero block is held from the moment the store opens"
    );
    let (d1, d2) = (noise(200_000, 20), noise(200_000, 21));
    let m1 = put_all(s.as_ref(), &d1);
    let v1 = committed(s.commit("dave", &m1, None, true, "vm:a").unwrap());
    let m2 = put_all(s.as_ref(), &d2);
    committed(s.commit("dave", &m2, Some(v1), true, "vm:a").unwrap());
    let only_v1: Vec<Hash> = m1.chunks.iter().map(|c| c.hash).collect();
    let orphan = noise(40_000, 22);
    let orphan_hash = Hash::of(&orphan);
    s.put_chunk(&orphan_hash, &orphan).unwrap();
    let pinned = noise(40_000, 23);
    let pinned_hash = Hash::of(&pinned);
    s.put_chunk(&pinned_hash, &pinned).unwrap();
    let pin = s.pin(&[pinned_hash]);
    let young = s.gc(Duration::from_secs(3600)).unwrap();
    assert_eq!(young.deleted, 0, "{young:?}");
    assert!(s.has_chunk(&orphan_hash).unwrap());
    // S3 Last-Modified has one-second resolution.
    std::thread::sleep(Duration::from_millis(1100));
    let r = s.gc(Duration::ZERO).unwrap();
    assert_eq!(
        r.deleted,
        only_v1.len() as u64 + 1,
        "v1's chunks (pruned) and the orphan: {r:?}"
    );
    assert!(!s.has_chunk(&orphan_hash).unwrap());
    for h in &only_v1 {
        assert!(!s.has_chunk(h).unwrap());
    }
    assert!(s.has_chunk(&pinned_hash).unwrap(), "pinned chunk survives");
    assert!(read_all(s.as_ref(), "dave", 2) == d2, "head intact");
    drop(pin);
    let r = s.gc(Duration::ZERO).unwrap();
    assert_eq!(r.deleted, 1, "{r:?}");
    assert!(read_all(s.as_ref(), "dave", 2) == d2, "head intact");
    let zero = s.read_chunk(&ZERO_BLOCK.hash).unwrap();
    assert!(
        zero.len() == ZERO_BLOCK.len as usize && zero.iter().all(|&b| b == 0),
        "no version refers to the zero block, and GC keeps it"
    );
}

/// Whatever the interleaving of a reuse of an old unreferenced chunk and a
/// GC on another host, no committed version may refer to a missing chunk:
/// the commit fails (and the retry uploads it) or the chunk survives.
fn reusing_an_old_orphan_never_dangles(b: &dyn Backend) {
    let grace = Duration::from_secs(2);
    let (h1, h2) = b.open_pair("orphans", policy(10), grace);
    // 1: the orphan is collected between "present" and the commit.
    let d = noise(150_000, 30);
    let m = put_all(h1.as_ref(), &d);
    std::thread::sleep(grace + Duration::from_millis(1100));
    let hashes: Vec<Hash> = m.chunks.iter().map(|c| c.hash).collect();
    assert!(h2.has_chunks(&hashes).unwrap().iter().all(|p| *p));
    let r = h1.gc(grace).unwrap();
    assert_eq!(r.deleted, hashes.len() as u64, "{r:?}");
    assert!(matches!(
        h2.commit("erin", &m, None, true, "vm:b"),
        Err(StoreError::MissingChunk(_))
    ));
    assert_eq!(h2.head("erin").unwrap(), None);
    assert!(h2.has_chunks(&hashes).unwrap().iter().all(|p| !*p));
    put_all(h2.as_ref(), &d);
    let v = committed(h2.commit("erin", &m, None, true, "vm:b").unwrap());
    assert!(read_all(h1.as_ref(), "erin", v) == d);
    // 2: an orphan older than half the grace is reused; a GC right after
    // the commit must find it referenced or young.
    let d2 = noise(150_000, 31);
    let m2 = put_all(h1.as_ref(), &d2);
    std::thread::sleep(grace / 2 + Duration::from_millis(1100));
    let hashes2: Vec<Hash> = m2.chunks.iter().map(|c| c.hash).collect();
    assert!(h2.has_chunks(&hashes2).unwrap().iter().all(|p| *p));
    let v2 = committed(h2.commit("erin", &m2, Some(v), true, "vm:b").unwrap());
    h1.gc(grace).unwrap();
    assert!(read_all(h1.as_ref(), "erin", v2) == d2);
}

/// Two hosts commit on the same base at the same moment, many rounds:
/// exactly one wins each round, the other is kept as a conflict version.
fn racing_commits_leave_one_head_and_one_conflict(b: &dyn Backend, rounds: u32) {
    let (h1, h2) = b.open_pair("race", policy(5), Duration::from_secs(3600));
    let first = put_all(h1.as_ref(), &noise(80_000, 40));
    let mut head = committed(h1.commit("frank", &first, None, true, "vm:a").unwrap());
    let mut numbers = HashSet::from([head]);
    for round in 0..rounds {
        let da = noise(80_000, 1000 + u64::from(round) * 2);
        let db = noise(80_000, 1001 + u64::from(round) * 2);
        let ma = put_all(h1.as_ref(), &da);
        let mb = put_all(h2.as_ref(), &db);
        let barrier = Arc::new(Barrier::new(2));
        let spawn = |s: Arc<dyn UifStore>, m: Manifest, origin: &'static str| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                s.commit("frank", &m, Some(head), true, origin).unwrap()
            })
        };
        let ta = spawn(h1.clone(), ma, "vm:a");
        let tb = spawn(h2.clone(), mb, "vm:b");
        let (oa, ob) = (ta.join().unwrap(), tb.join().unwrap());
        let (winner, loser, winner_data) = match (oa, ob) {
            (CommitOutcome::Committed(w), CommitOutcome::Conflict { kept_as, head: h }) => {
                assert_eq!(h, Some(w), "round {round}");
                (w, kept_as, &da)
            }
            (CommitOutcome::Conflict { kept_as, head: h }, CommitOutcome::Committed(w)) => {
                assert_eq!(h, Some(w), "round {round}");
                (w, kept_as, &db)
            }
            other => panic!("round {round}: not one winner and one conflict: {other:?}"),
        };
        assert!(
            numbers.insert(winner) && numbers.insert(loser),
            "numbers reused"
        );
        assert_eq!(h1.head("frank").unwrap(), Some(winner));
        assert_eq!(h2.head("frank").unwrap(), Some(winner));
        assert!(read_all(h2.as_ref(), "frank", winner) == *winner_data);
        let versions = h1.versions("frank").unwrap();
        let kind = |v| versions.iter().find(|i| i.version == v).map(|i| i.kind);
        assert_eq!(kind(winner), Some(VersionKind::Committed));
        assert_eq!(kind(loser), Some(VersionKind::Conflict));
        head = winner;
    }
}

/// An upload's stage is its own: other uploads (and the other host) do not
/// see its chunks until it is published, and a discarded stage leaves no
/// chunk behind, nor touches a chunk another upload published.
fn stages_are_private_until_published(b: &dyn Backend) {
    let (h1, h2) = b.open_pair("stages", policy(10), Duration::from_secs(3600));
    let data = noise(600_000, 90);
    let (m, bytes) = manifest_of(&data);
    let hashes: Vec<Hash> = bytes.keys().copied().collect();
    let (a, other) = (StageId::fresh(), StageId::fresh());
    for (h, d) in &bytes {
        assert_eq!(h1.stage_chunk(&a, h, d).unwrap(), d.len() as u64);
    }
    let first = hashes[0];
    assert_eq!(
        h2.stage_chunk(&other, &first, &bytes[&first]).unwrap(),
        bytes[&first].len() as u64,
        "another upload saw a staged chunk as stored"
    );
    for s in [&h1, &h2] {
        assert!(
            s.has_chunks(&hashes).unwrap().iter().all(|p| !p),
            "{}",
            b.name()
        );
    }
    assert!(matches!(
        h1.commit("gina", &m, None, true, "vm:a"),
        Err(StoreError::MissingChunk(_))
    ));
    h1.publish(&a, &hashes).unwrap();
    assert!(h2.has_chunks(&hashes).unwrap().iter().all(|p| *p));
    let v = committed(h1.commit("gina", &m, None, true, "vm:a").unwrap());
    // Discarding the other stage, which held a now published chunk, keeps it.
    h2.discard(&other, &[first]).unwrap();
    assert!(read_all(h2.as_ref(), "gina", v) == data);
    // A discarded stage leaves nothing: its chunks are not stored, and
    // publishing it afterwards finds them missing.
    let (m2, bytes2) = manifest_of(&noise(300_000, 91));
    let gone = StageId::fresh();
    for (h, d) in &bytes2 {
        h1.stage_chunk(&gone, h, d).unwrap();
    }
    let hashes2: Vec<Hash> = bytes2.keys().copied().collect();
    h1.discard(&gone, &hashes2).unwrap();
    assert!(h2.has_chunks(&hashes2).unwrap().iter().all(|p| !p));
    assert!(matches!(
        h1.publish(&gone, &hashes2),
        Err(StoreError::MissingChunk(_))
    ));
    assert!(matches!(
        h1.commit("gina", &m2, Some(v), true, "vm:a"),
        Err(StoreError::MissingChunk(_))
    ));
}

/// The quota counts unique bytes of head and history; each origin's
/// conflict versions have a bound of their own; the operator's edits
/// (delete an old version, a per-user override) are seen by every handle.
fn quota_bounds_what_a_user_holds(b: &dyn Backend) {
    let (s, other) = b.open_pair(
        "quota",
        policy_with(|p| {
            p.quota_bytes = 1_000_000;
            p.conflict_quota_bytes = Some(500_000);
        }),
        Duration::from_secs(3600),
    );
    let mut head = None;
    let mut refused = 0;
    for i in 0..8 {
        let m = put_all(s.as_ref(), &noise(300_000, 800 + i));
        match s.commit("hana", &m, head, true, "vm:a") {
            Ok(CommitOutcome::Committed(v)) => head = Some(v),
            Err(StoreError::QuotaExceeded {
                held,
                quota: 1_000_000,
                conflict_origin: None,
                ..
            }) => {
                assert_eq!(held, 1_200_000, "{}", b.name());
                refused += 1;
            }
            other => panic!("{}: {other:?}", b.name()),
        }
        let held = s.holdings("hana").unwrap().held_bytes;
        assert!(held <= 1_000_000, "{}: hana holds {held}", b.name());
    }
    assert_eq!(refused, 5, "{}: three versions of 300 kB fit", b.name());
    // Chunks shared with retained versions cost nothing more.
    let again = s.manifest("hana", 1).unwrap();
    head = Some(committed(
        s.commit("hana", &again, head, true, "vm:a").unwrap(),
    ));
    assert_eq!(s.holdings("hana").unwrap().held_bytes, 900_000);
    conflicts_and_operator_edits(b, &s, &other, head);
}

/// Continues [`quota_bounds_what_a_user_holds`]: hana holds 900 kB of her
/// 1 MB quota at `head`; `other` is a second handle (host) on the store.
fn conflicts_and_operator_edits(
    b: &dyn Backend,
    s: &Arc<dyn UifStore>,
    other: &Arc<dyn UifStore>,
    mut head: Option<Version>,
) {
    // A writer without the lease: its own bound, the head line untouched.
    let c1 = put_all(s.as_ref(), &noise(300_000, 900));
    assert!(matches!(
        s.commit("hana", &c1, head, false, "vm:b").unwrap(),
        CommitOutcome::Conflict { .. }
    ));
    let c2 = put_all(s.as_ref(), &noise(300_000, 901));
    match s.commit("hana", &c2, head, false, "vm:b") {
        Err(StoreError::QuotaExceeded {
            conflict_origin: Some(o),
            held: 600_000,
            quota: 500_000,
            ..
        }) => assert_eq!(o, "vm:b"),
        other => panic!("{}: {other:?}", b.name()),
    }
    assert!(matches!(
        s.commit("hana", &c2, head, false, "vm:c").unwrap(),
        CommitOutcome::Conflict { .. }
    ));
    let h = other.holdings("hana").unwrap();
    assert_eq!(h.held_bytes, 900_000);
    let per: Vec<(String, u64)> = h
        .conflicts
        .iter()
        .map(|c| (c.origin.clone(), c.held_bytes))
        .collect();
    assert_eq!(
        per,
        vec![("vm:b".to_string(), 300_000), ("vm:c".to_string(), 300_000)]
    );
    // The operator's way out, seen by the other handle (host) too.
    assert!(matches!(
        other.edit_user("hana", UserEdit::DeleteVersion(head.unwrap())),
        Err(StoreError::HeadVersion { .. })
    ));
    other.edit_user("hana", UserEdit::DeleteVersion(2)).unwrap();
    assert_eq!(s.holdings("hana").unwrap().held_bytes, 600_000);
    let m = put_all(s.as_ref(), &noise(300_000, 902));
    head = Some(committed(s.commit("hana", &m, head, true, "vm:a").unwrap()));
    other
        .edit_user("hana", UserEdit::SetQuota(Some(2_000_000)))
        .unwrap();
    for i in 0..3 {
        let m = put_all(s.as_ref(), &noise(300_000, 910 + i));
        head = Some(committed(s.commit("hana", &m, head, true, "vm:a").unwrap()));
    }
    let h = s.holdings("hana").unwrap();
    assert_eq!(
        (h.held_bytes, h.quota_bytes, h.quota_override),
        (1_800_000, 2_000_000, Some(2_000_000))
    );
    other.edit_user("hana", UserEdit::SetQuota(None)).unwrap();
    // An override may come before the user's first version.
    s.edit_user("ida", UserEdit::SetQuota(Some(1))).unwrap();
    assert_eq!(other.holdings("ida").unwrap().quota_bytes, 1);
    let m1 = put_all(s.as_ref(), &noise(1000, 930));
    assert!(matches!(
        other.commit("ida", &m1, None, true, "vm:a"),
        Err(StoreError::QuotaExceeded { quota: 1, .. })
    ));
    let m = put_all(s.as_ref(), &noise(300_000, 920));
    assert!(matches!(
        s.commit("hana", &m, head, true, "vm:a"),
        Err(StoreError::QuotaExceeded { .. })
    ));
    assert_eq!(s.head("hana").unwrap(), head);
}

fn run_suite(b: &dyn Backend, race_rounds: u32) {
    let t = Instant::now();
    stages_are_private_until_published(b);
    cas_commits_and_keeps_conflicts(b);
    a_redelivered_update_is_answered_as_its_commit(b);
    refuses_bad_input(b);
    quota_bounds_what_a_user_holds(b);
    history_is_pruned_and_rollback_makes_a_new_head(b);
    one_origins_conflicts_never_evict_anothers(b);
    gc_sweeps_only_unreferenced_old_unpinned_chunks(b);
    reusing_an_old_orphan_never_dangles(b);
    racing_commits_leave_one_head_and_one_conflict(b, race_rounds);
    abandon::abandoned_upload_never_deletes_a_chunk_another_host_commits(b, 6);
    eprintln!("{} store suite passed in {:.1?}", b.name(), t.elapsed());
}

#[test]
fn local_store_suite() {
    let dir = tempfile::tempdir().unwrap();
    run_suite(&Local(dir.path().to_path_buf()), 20);
}

#[cfg(feature = "s3")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_on_ceph_rgw() {
    let Some(rgw) = tokio::task::spawn_blocking(|| Rgw::start_for_test("stores"))
        .await
        .unwrap()
    else {
        return;
    };
    let rgw = Arc::new(rgw);
    let r = rgw.clone();
    tokio::task::spawn_blocking(move || run_suite(&s3::S3::new(&r), 20))
        .await
        .unwrap();
    s3::unsafe_server_is_refused(&rgw).await;
    s3::missing_bucket_is_a_clear_error(&rgw).await;
    s3::two_hosts_share_one_bucket(&rgw, 10).await;
}

/// An https endpoint goes through the TLS stack (rustls with ring, the
/// system's CA store) and an unreachable one is a clear error, not a hang
/// or a panic.
#[cfg(feature = "s3")]
#[test]
fn unreachable_https_endpoint_is_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = uve_host::config::S3Config {
        endpoint: Some(format!("https://127.0.0.1:{port}")),
        bucket: "uve".into(),
        access_key_id: Some("k".into()),
        secret_access_key: Some("s".into()),
        ..Default::default()
    };
    let t = Instant::now();
    let err = s3::open(&cfg).err().expect("nothing listens there");
    assert!(matches!(err, StoreError::Remote { .. }), "{err}");
    assert!(err.to_string().contains("self-test"), "{err}");
    eprintln!("refused after {:.1?}: {err}", t.elapsed());
}
