//! LocalStore unit tests: CAS, conflicts, history, quota, GC and recovery.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

use super::*;
use uve_protocol::chunker::chunk_stream;

fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn put(store: &LocalStore, data: &[u8]) -> Manifest {
    chunk_stream(data, |c, bytes| {
        store
            .put_chunk(&c.hash, bytes)
            .map_err(std::io::Error::other)
    })
    .unwrap()
}

fn read_all(store: &LocalStore, user: &str, v: Version) -> Vec<u8> {
    let m = store.manifest(user, v).unwrap();
    let mut out = Vec::new();
    for c in &m.chunks {
        out.extend(store.read_chunk(&c.hash).unwrap());
    }
    assert_eq!(out.len() as u64, m.header.size);
    out
}

fn open(dir: &Path) -> LocalStore {
    LocalStore::open(dir, StorePolicy::default()).unwrap()
}

#[test]
fn cas_commits_and_keeps_conflicts() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let a = noise(300_000, 1);
    let m = put(&s, &a);
    assert_eq!(s.head("alice").unwrap(), None);
    assert_eq!(
        s.commit("alice", &m, None, true, "t").unwrap(),
        CommitOutcome::Committed(1)
    );
    let b = noise(200_000, 2);
    let mb = put(&s, &b);
    // stale base: conflict, kept, head unchanged
    assert_eq!(
        s.commit("alice", &mb, None, true, "t").unwrap(),
        CommitOutcome::Conflict {
            kept_as: 2,
            head: Some(1)
        }
    );
    // right base but stale lease: conflict too
    assert_eq!(
        s.commit("alice", &mb, Some(1), false, "t").unwrap(),
        CommitOutcome::Conflict {
            kept_as: 3,
            head: Some(1)
        }
    );
    assert_eq!(
        s.commit("alice", &mb, Some(1), true, "t").unwrap(),
        CommitOutcome::Committed(4)
    );
    assert_eq!(s.head("alice").unwrap(), Some(4));
    assert_eq!(read_all(&s, "alice", 1), a);
    assert_eq!(read_all(&s, "alice", 2), b);
    assert_eq!(read_all(&s, "alice", 4), b);
    let kinds: Vec<_> = s
        .versions("alice")
        .unwrap()
        .iter()
        .map(|v| (v.version, v.kind))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (1, VersionKind::Committed),
            (2, VersionKind::Conflict),
            (3, VersionKind::Conflict),
            (4, VersionKind::Committed)
        ]
    );
}

#[test]
fn refuses_hostile_names_missing_chunks_and_quota() {
    let dir = tempfile::tempdir().unwrap();
    let policy = StorePolicy {
        quota_bytes: 1000,
        ..StorePolicy::default()
    };
    let s = LocalStore::open(dir.path(), policy).unwrap();
    let m = put(&s, b"small");
    for bad in ["../x", "", ".hidden", "a/b"] {
        assert!(matches!(
            s.commit(bad, &m, None, true, "t"),
            Err(StoreError::InvalidName(_))
        ));
    }
    let big = chunk_stream(&noise(5000, 3)[..], |_, _| Ok(())).unwrap();
    assert!(matches!(
        s.commit("bob", &big, None, true, "t"),
        Err(StoreError::QuotaExceeded { .. })
    ));
    // chunks never uploaded
    let m2 = chunk_stream(&b"never stored"[..], |_, _| Ok(())).unwrap();
    assert!(matches!(
        s.commit("bob", &m2, None, true, "t"),
        Err(StoreError::MissingChunk(_))
    ));
    assert_eq!(s.head("bob").unwrap(), None);
    assert!(matches!(
        s.put_chunk(&Hash::of(b"x"), b"y"),
        Err(StoreError::BadChunk(_))
    ));
}

#[test]
fn history_is_pruned_but_head_and_numbering_survive() {
    let dir = tempfile::tempdir().unwrap();
    let policy = StorePolicy {
        history_keep: 3,
        conflict_keep: 2,
        ..StorePolicy::default()
    };
    let s = LocalStore::open(dir.path(), policy).unwrap();
    let mut head = None;
    for i in 0..6u64 {
        let m = put(&s, &noise(1000, i + 10));
        if let CommitOutcome::Committed(v) = s.commit("u", &m, head, true, "t").unwrap() {
            head = Some(v);
        }
        s.commit("u", &m, None, true, "t").unwrap(); // a conflict each round
    }
    let vs = s.versions("u").unwrap();
    let committed: Vec<_> = vs
        .iter()
        .filter(|v| v.kind == VersionKind::Committed)
        .map(|v| v.version)
        .collect();
    let conflicts: Vec<_> = vs
        .iter()
        .filter(|v| v.kind == VersionKind::Conflict)
        .map(|v| v.version)
        .collect();
    assert_eq!(committed, vec![7, 9, 11]);
    assert_eq!(conflicts, vec![10, 12]);
    assert_eq!(head, Some(11));
    assert!(s.manifest("u", 1).is_err());
    assert_eq!(read_all(&s, "u", 11), noise(1000, 15));
    // rollback makes a copy of an old version the new head
    let v = s.rollback("u", 7).unwrap();
    assert_eq!(v, 13);
    assert_eq!(s.head("u").unwrap(), Some(13));
    assert_eq!(read_all(&s, "u", 13), noise(1000, 13));
}

#[test]
fn gc_sweeps_only_old_unreferenced_unpinned_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let policy = StorePolicy {
        history_keep: 1,
        ..StorePolicy::default()
    };
    let s = LocalStore::open(dir.path(), policy).unwrap();
    let a = noise(400_000, 1);
    let ma = put(&s, &a);
    s.commit("u", &ma, None, true, "t").unwrap();
    let b = noise(400_000, 2);
    let mb = put(&s, &b);
    s.commit("u", &mb, Some(1), true, "t").unwrap(); // version 1 pruned
    let orphan = noise(50_000, 3);
    let mo = put(&s, &orphan);
    let pinned = noise(50_000, 4);
    let mp = put(&s, &pinned);
    let pins = s.pin(&mp.chunks.iter().map(|c| c.hash).collect::<Vec<_>>());

    // within the grace period nothing is deleted
    let r = s.gc(Duration::from_secs(3600)).unwrap();
    assert_eq!(r.deleted, 0);
    // with zero grace: version-1 chunks and the orphan go, pinned stay
    let r = s.gc(Duration::ZERO).unwrap();
    assert_eq!(r.deleted as usize, ma.chunks.len() + mo.chunks.len());
    assert_eq!(read_all(&s, "u", 2), b);
    for c in &mp.chunks {
        assert!(s.has_chunk(&c.hash).unwrap());
    }
    drop(pins);
    let r = s.gc(Duration::ZERO).unwrap();
    assert_eq!(r.deleted as usize, mp.chunks.len());
    assert_eq!(read_all(&s, "u", 2), b);
}

/// Crash safety: a crash can leave (a) temp files, (b) a manifest written
/// but not yet named by the state (the commit point was not reached), (c)
/// a chunk never referenced. Recovery must delete (a) and (b), keep the
/// head and its bytes, and number the next version without reusing (b)'s
/// number being visible.
#[test]
fn recovery_after_crash_keeps_head_and_drops_partial_version() {
    let dir = tempfile::tempdir().unwrap();
    let a = noise(300_000, 7);
    {
        let s = open(dir.path());
        let m = put(&s, &a);
        s.commit("alice", &m, None, true, "t").unwrap();
        // simulate a commit that crashed after writing version 2's manifest
        let b = noise(100_000, 8);
        let mb = put(&s, &b);
        s.write_manifest("alice", 2, &mb).unwrap();
        // and a half-written temp file (state or chunk being written)
        fs::write(s.tmp.join("999.1.tmp"), b"{\"head\": 7, \"ne").unwrap();
    }
    let s = open(dir.path());
    assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    assert!(!dir.path().join("users/alice/v/2").exists());
    assert_eq!(s.head("alice").unwrap(), Some(1));
    assert_eq!(s.versions("alice").unwrap().len(), 1);
    assert_eq!(read_all(&s, "alice", 1), a);
    // the retry commits cleanly
    let b = noise(100_000, 8);
    let mb = put(&s, &b);
    assert_eq!(
        s.commit("alice", &mb, Some(1), true, "t").unwrap(),
        CommitOutcome::Committed(2)
    );
    assert_eq!(read_all(&s, "alice", 2), b);
}

#[test]
fn corrupt_state_is_an_error_not_a_reset() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = open(dir.path());
        let m = put(&s, b"x");
        s.commit("alice", &m, None, true, "t").unwrap();
    }
    fs::write(dir.path().join("users/alice/state.json"), b"garbage").unwrap();
    assert!(matches!(
        LocalStore::open(dir.path(), StorePolicy::default()),
        Err(StoreError::Corrupt { .. })
    ));
}

#[test]
fn uploaded_chunks_are_staged_until_a_commit_promotes_them() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let data = noise(400_000, 7);
    let m = put(&s, &data);
    for c in &m.chunks {
        assert!(
            s.has_chunk(&c.hash).unwrap(),
            "a staged chunk counts as stored"
        );
        assert!(s.staged_path(&c.hash).is_file());
        assert!(
            !s.chunk_path(&c.hash).exists(),
            "not promoted before a commit"
        );
    }
    assert_eq!(
        s.commit("alice", &m, None, true, "t").unwrap(),
        CommitOutcome::Committed(1)
    );
    for c in &m.chunks {
        assert!(s.chunk_path(&c.hash).is_file(), "promoted by the commit");
        assert!(!s.staged_path(&c.hash).exists());
    }
    assert_eq!(read_all(&s, "alice", 1), data);
}

#[test]
fn torn_staged_chunks_are_dropped_at_open_and_intact_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    let m = {
        let s = open(dir.path());
        put(&s, &noise(400_000, 8))
    };
    let (torn, intact) = (m.chunks[0], m.chunks[1]);
    let s = open(dir.path());
    // What an OS crash can leave of a never-synced file: a short one.
    std::fs::write(s.staged_path(&torn.hash), b"short").unwrap();
    std::fs::write(s.staging.join("123.4.tmp"), b"junk").unwrap();
    drop(s);
    let s = open(dir.path());
    assert!(
        !s.has_chunk(&torn.hash).unwrap(),
        "torn staged chunk must be re-uploaded"
    );
    assert!(
        s.has_chunk(&intact.hash).unwrap(),
        "intact staged chunk is kept for the retry"
    );
    assert!(!s.staging.join("123.4.tmp").exists());
    assert!(matches!(
        s.commit("alice", &m, None, true, "t"),
        Err(StoreError::MissingChunk(h)) if h == torn.hash
    ));
    assert_eq!(s.head("alice").unwrap(), None);
}
