//! LocalStore-only unit tests: crash recovery, corrupt state, loose and
//! unsealed packs, migration of the earlier layout, repacking. What every store must do (CAS, conflicts, history, quota, GC)
//! is the shared suite in `host/tests/stores.rs`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

use super::*;
use uve_protocol::chunker::chunk_stream;
use uve_protocol::manifest::ZERO_BLOCK;

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

fn packs(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    out.sort();
    out
}

fn policy_keep(n: usize) -> StorePolicy {
    StorePolicy {
        history_keep: n,
        ..StorePolicy::default()
    }
}

#[test]
fn loose_chunks_are_stored_at_once_and_sealed_by_the_commit_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let before = packs(dir.path()).len();
    let data = noise(400_000, 7);
    let m = put(&s, &data);
    for c in &m.chunks {
        assert!(
            s.has_chunk(&c.hash).unwrap(),
            "a loose chunk counts as stored"
        );
        assert_eq!(s.read_chunk(&c.hash).unwrap().len(), c.len as usize);
    }
    assert_eq!(
        packs(dir.path()).len(),
        before,
        "not sealed before a commit"
    );
    assert_eq!(
        s.commit("alice", &m, None, true, "t").unwrap(),
        CommitOutcome::Committed(1)
    );
    assert_eq!(packs(dir.path()).len(), before + 1, "one pack per commit");
    assert!(lock(&s.loose).is_none(), "sealed by the commit");
    assert_eq!(read_all(&s, "alice", 1), data);
    drop(s);
    let s = open(dir.path());
    assert_eq!(read_all(&s, "alice", 1), data, "indexed again at open");
}

#[test]
fn torn_unsealed_packs_keep_their_intact_chunks_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let m = {
        let s = open(dir.path());
        put(&s, &noise(400_000, 8))
    };
    assert!(m.chunks.len() >= 3);
    let loose: Vec<PathBuf> = fs::read_dir(dir.path().join("staging"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(loose.len(), 1, "{loose:?}");
    // What an OS crash can leave of a never-synced file: a short one,
    // here cut inside the second chunk.
    let f = fs::OpenOptions::new().write(true).open(&loose[0]).unwrap();
    f.set_len(8 + 36 + u64::from(m.chunks[0].len) + 36 + 100)
        .unwrap();
    drop(f);
    fs::write(dir.path().join("staging/123.4.tmp"), b"junk").unwrap();
    let s = open(dir.path());
    assert!(
        s.has_chunk(&m.chunks[0].hash).unwrap(),
        "intact: kept for the retry"
    );
    for c in &m.chunks[1..] {
        assert!(
            !s.has_chunk(&c.hash).unwrap(),
            "torn or after it: sent again"
        );
    }
    assert_eq!(fs::read_dir(dir.path().join("staging")).unwrap().count(), 0);
    assert!(matches!(
        s.commit("alice", &m, None, true, "t"),
        Err(StoreError::MissingChunk(h)) if h == m.chunks[1].hash
    ));
    assert_eq!(s.head("alice").unwrap(), None);
}

/// A store of the earlier layout (a file per chunk under `chunks/`, loose
/// and per-upload staged files under `staging/`) opens migrated.
#[test]
fn a_store_of_the_earlier_layout_is_migrated_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let data = noise(500_000, 9);
    let (m, extra) = {
        let s = open(dir.path());
        let m = put(&s, &data);
        s.commit("alice", &m, None, true, "t").unwrap();
        (m, put(&s, &noise(300_000, 10)))
    };
    // Rewrite it in the earlier layout.
    let s = open(dir.path());
    let index = s.index.read().unwrap().chunks.clone();
    // (The extra chunks, loose when the store closed, come back below as
    // staged files of the earlier layout instead.)
    for h in index
        .keys()
        .filter(|h| !extra.chunks.iter().any(|c| c.hash == **h))
    {
        let hex = h.to_hex();
        let d = dir.path().join("chunks").join(&hex[..2]);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join(&hex), s.read_chunk(h).unwrap()).unwrap();
    }
    drop(s);
    for p in packs(dir.path()) {
        fs::remove_file(p).unwrap();
    }
    let (loose, staged) = (extra.chunks[0], extra.chunks[1]);
    let extra_data = noise(300_000, 10);
    let bytes = |i: usize| bytes_of(&extra_data, &extra, i);
    fs::write(
        dir.path().join("staging").join(loose.hash.to_hex()),
        bytes(0),
    )
    .unwrap();
    let stage = dir.path().join("staging/0123abcd");
    fs::create_dir_all(&stage).unwrap();
    fs::write(stage.join(staged.hash.to_hex()), bytes(1)).unwrap();
    assert!(extra.chunks.len() >= 3);
    let torn = extra.chunks[2];
    fs::write(stage.join(torn.hash.to_hex()), b"short").unwrap();
    // Bit rot in a stored chunk file.
    let rotten = m.chunks[0].hash.to_hex();
    let rotten_path = dir.path().join("chunks").join(&rotten[..2]).join(&rotten);
    let mut b = fs::read(&rotten_path).unwrap();
    b[10] ^= 1;
    fs::write(&rotten_path, &b).unwrap();

    let s = open(dir.path());
    assert!(!dir.path().join("chunks").exists(), "the old tree is gone");
    assert_eq!(fs::read_dir(dir.path().join("staging")).unwrap().count(), 0);
    assert!(!packs(dir.path()).is_empty());
    for (i, c) in m.chunks.iter().enumerate().skip(1) {
        assert_eq!(s.read_chunk(&c.hash).unwrap(), bytes_of(&data, &m, i));
    }
    assert!(
        !s.has_chunk(&m.chunks[0].hash).unwrap(),
        "the rotten one is missing"
    );
    assert_eq!(
        fs::read(dir.path().join("corrupt").join(&rotten)).unwrap(),
        b
    );
    assert!(s.has_chunk(&loose.hash).unwrap() && s.has_chunk(&staged.hash).unwrap());
    assert!(!s.has_chunk(&torn.hash).unwrap());
    assert!(s.has_chunk(&ZERO_BLOCK.hash).unwrap());
    // The next upload of that content stores it again.
    put(&s, &data);
    assert_eq!(read_all(&s, "alice", 1), data);
}

/// The bytes of chunk `i` of `m`, a manifest of `data`.
fn bytes_of(data: &[u8], m: &Manifest, i: usize) -> Vec<u8> {
    let (at, c) = m.offsets().nth(i).unwrap();
    data[at as usize..(at + u64::from(c.len)) as usize].to_vec()
}

/// GC frees the space of dead chunks inside packs: a pack with nothing
/// live goes, one at most half live is rewritten, small old ones merge;
/// readers never miss a live chunk meanwhile, and a reopen sees the same.
#[test]
fn gc_repacks_dead_space_while_readers_read() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(LocalStore::open(dir.path(), policy_keep(1)).unwrap());
    // One upload's pack holds two versions' chunks; v1 is pruned by v2.
    let (a, b) = (noise(600_000, 11), noise(600_000, 12));
    let (ma, mb) = (put(&s, &a), put(&s, &b));
    let va = match s.commit("bob", &ma, None, true, "t").unwrap() {
        CommitOutcome::Committed(v) => v,
        o => panic!("{o:?}"),
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (s, stop, mb) = (s.clone(), stop.clone(), mb.clone());
        std::thread::spawn(move || {
            let mut reads = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for c in &mb.chunks {
                    assert_eq!(s.read_chunk(&c.hash).unwrap().len(), c.len as usize);
                    reads += 1;
                }
            }
            reads
        })
    };
    s.commit("bob", &mb, Some(va), true, "t").unwrap();
    let shared = packs(dir.path());
    let size = |p: &Path| fs::metadata(p).unwrap().len();
    let before: u64 = shared.iter().map(|p| size(p)).sum();
    let r = s.gc(Duration::ZERO).unwrap();
    assert_eq!(r.deleted, ma.chunks.len() as u64, "{r:?}");
    let after: u64 = packs(dir.path()).iter().map(|p| size(p)).sum();
    assert!(
        after + 500_000 < before,
        "v1's half of the pack is reclaimed: {before} -> {after}"
    );
    // Small packs of many small commits are merged.
    let mut head = s.head("bob").unwrap();
    for i in 0..10 {
        let m = put(&s, &noise(20_000, 100 + i));
        head = Some(
            match s
                .commit("carol", &m, head.filter(|_| i > 0), true, "t")
                .unwrap()
            {
                CommitOutcome::Committed(v) => v,
                o => panic!("{o:?}"),
            },
        );
    }
    let many = packs(dir.path()).len();
    s.gc(Duration::ZERO).unwrap();
    let merged = packs(dir.path()).len();
    assert!(merged + 8 <= many, "{many} packs -> {merged}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);
    assert_eq!(read_all(&s, "bob", va + 1), b);
    drop(s);
    let s = open(dir.path());
    assert_eq!(read_all(&s, "bob", va + 1), b, "the same after a reopen");
    assert!(!s.has_chunk(&ma.chunks[0].hash).unwrap());
}

/// A repack checks what it copies: a damaged live chunk is not carried
/// into the new pack (it goes missing, its bytes kept in `corrupt/`).
#[test]
fn a_repack_drops_a_damaged_chunk_it_copies() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let s = LocalStore::open(dir.path(), policy_keep(1)).unwrap();
    let (a, b) = (noise(600_000, 13), noise(600_000, 14));
    let (ma, mb) = (put(&s, &a), put(&s, &b));
    let va = match s.commit("dan", &ma, None, true, "t").unwrap() {
        CommitOutcome::Committed(v) => v,
        o => panic!("{o:?}"),
    };
    s.commit("dan", &mb, Some(va), true, "t").unwrap();
    let victim = mb.chunks[1].hash;
    let loc = s.index.read().unwrap().chunks[&victim];
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(s.files.path(loc.pack))
        .unwrap();
    let mut byte = [0u8; 1];
    f.read_exact_at(&mut byte, loc.offset + 5).unwrap();
    f.write_all_at(&[byte[0] ^ 1], loc.offset + 5).unwrap();
    drop(f);
    // v1's chunks are dead: the shared pack is at most half live, so GC
    // repacks it, copying v2's chunks.
    s.gc(Duration::ZERO).unwrap();
    assert!(
        !s.has_chunk(&victim).unwrap(),
        "the damaged chunk is missing"
    );
    assert!(dir.path().join("corrupt").join(victim.to_hex()).is_file());
    for c in mb.chunks.iter().filter(|c| c.hash != victim) {
        assert!(s.has_chunk(&c.hash).unwrap());
    }
    // The next upload of that content stores it again.
    put(&s, &b);
    assert_eq!(read_all(&s, "dan", va + 1), b);
}
