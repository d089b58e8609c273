//! LocalStore-only unit tests: crash recovery, corrupt state, staged
//! chunks. What every store must do (CAS, conflicts, history, quota, GC)
//! is the shared suite in `host/tests/stores.rs`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

use super::*;
use uve_protocol::chunker::chunk_stream;

use uve_protocol::testdata::noise;

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
