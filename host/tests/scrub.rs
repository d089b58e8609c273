//! The local store's scrub against the real daemon: a chunk damaged in
//! its pack on disk is found, moved out of the store and its versions named; the
//! next upload holding the same content stores it again, and the damaged
//! version retrieves byte-identical after that.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

mod common;

use std::path::{Path, PathBuf};

use common::{HostProc, noise};
use hyper::Method;
use serde_json::json;
use uve_protocol::manifest::ZERO_BLOCK;

/// A chunk in a pack file of the store.
struct Stored {
    pack: PathBuf,
    hash: String,
    /// Offset of the chunk's bytes in the pack.
    at: u64,
    len: usize,
}

/// The chunks the store's sealed packs hold (`<store>/packs/*.pack`, read
/// by their format: "UVEPACK1", entries of hash, u32 length and bytes,
/// then the index and a 56-byte trailer naming where the index starts).
fn stored_chunks(store: &Path) -> Vec<Stored> {
    let mut out = Vec::new();
    let mut packs: Vec<PathBuf> = std::fs::read_dir(store.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    packs.sort();
    for pack in packs {
        let b = std::fs::read(&pack).unwrap();
        assert_eq!(&b[..8], b"UVEPACK1");
        let trailer = &b[b.len() - 56..];
        assert_eq!(&trailer[48..], b"UVEPIDX1");
        let index_at = u64::from_le_bytes(trailer[8..16].try_into().unwrap()) as usize;
        let mut at = 8;
        while at < index_at {
            let hash = uve_protocol::manifest::Hash(b[at..at + 32].try_into().unwrap());
            let len = u32::from_le_bytes(b[at + 32..at + 36].try_into().unwrap()) as usize;
            out.push(Stored {
                pack: pack.clone(),
                hash: hash.to_hex(),
                at: (at + 36) as u64,
                len,
            });
            at += 36 + len;
        }
    }
    out
}

/// Flips one bit of a stored chunk on disk; returns the damaged bytes.
fn flip(c: &Stored) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&c.pack)
        .unwrap();
    let mut bytes = vec![0u8; c.len];
    f.read_exact_at(&mut bytes, c.at).unwrap();
    bytes[c.len / 2] ^= 0x10;
    f.write_all_at(&bytes, c.at).unwrap();
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_chunk_is_found_moved_out_and_stored_again_by_the_next_upload() {
    let (host, path, alice) = HostProc::with_agent("", "vm1", &["alice"]).await;
    host.assign("bob", "vm1").await;
    alice.retrieve("alice", "s1").await.unwrap();
    let data = noise(3 << 20, 7);
    alice.update_from_lease("alice", &data).await.unwrap();
    let store = host.api_socket().parent().unwrap().join("store");
    let zero = ZERO_BLOCK.hash.to_hex();
    let chunks: Vec<Stored> = stored_chunks(&store)
        .into_iter()
        .filter(|c| c.hash != zero)
        .collect();
    assert!(chunks.len() > 10, "{} chunks", chunks.len());

    // A clean store: everything read, nothing found.
    let (s, clean) = host
        .call(Method::POST, "/v1/scrub?mib_per_sec=0", json!({}))
        .await;
    assert_eq!(s, 200, "{clean}");
    assert_eq!(clean["corrupt"], 0, "{clean}");
    assert_eq!(clean["complete"], true);
    // Every chunk, the zero block too.
    assert_eq!(clean["scanned"], chunks.len() as u64 + 1, "{clean}");

    // One bit flips on the disk.
    let victim = &chunks[chunks.len() / 2];
    let bytes = flip(victim);
    let hash = victim.hash.clone();
    let held = |hash: &str| stored_chunks(&store).iter().any(|c| c.hash == hash);

    let (s, found) = host.call(Method::POST, "/v1/scrub", json!({})).await;
    assert_eq!(s, 200, "{found}");
    assert_eq!(found["corrupt"], 1, "{found}");
    assert_eq!(
        found["damaged"],
        json!([{"user": "alice", "version": 1}]),
        "{found}"
    );
    assert!(!held(&hash), "the damaged chunk left the store's packs");
    assert_eq!(
        std::fs::read(store.join("corrupt").join(&hash)).unwrap(),
        bytes,
        "kept for the operator in corrupt/"
    );
    assert_eq!(host.metric("uve_chunks_corrupt_total").await, 1);
    let event = host.wait_event("scrub", |e| e["corrupt"] == 1).await;
    assert_eq!(event["damaged"][0]["user"], "alice");

    // Bob's upload of the same content sends that chunk, and only it.
    let bob = host.connect_agent(&path, "vm1").await;
    bob.retrieve("bob", "s2").await.unwrap();
    let healed = bob.update_from_lease("bob", &data).await.unwrap();
    assert_eq!(healed.missing, 1, "only the damaged chunk is sent again");
    assert!(held(&hash), "stored again");
    assert!(
        host.export("alice", 1).await == data,
        "alice's v1 is whole again"
    );
    let (_, again) = host
        .call(Method::POST, "/v1/scrub?mib_per_sec=0", json!({}))
        .await;
    assert_eq!(again["corrupt"], 0, "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_zero_block_is_stored_again_at_once() {
    let host = HostProc::temp("").await;
    let store = host.api_socket().parent().unwrap().join("store");
    let zero = ZERO_BLOCK.hash.to_hex();
    let find = || {
        stored_chunks(&store)
            .into_iter()
            .find(|c| c.hash == zero)
            .expect("the zero block is stored at open")
    };
    flip(&find());
    let (s, found) = host
        .call(Method::POST, "/v1/scrub?mib_per_sec=0", json!({}))
        .await;
    assert_eq!(s, 200, "{found}");
    assert_eq!(found["corrupt"], 1, "{found}");
    assert_eq!(found["damaged"], json!([]));
    let whole = find();
    let pack = std::fs::read(&whole.pack).unwrap();
    let back = &pack[whole.at as usize..whole.at as usize + whole.len];
    assert_eq!(back.len(), ZERO_BLOCK.len as usize);
    assert!(
        back.iter().all(|b| *b == 0),
        "the zero block is whole again"
    );
}

/// The periodic scrub counts from the last complete one, kept in
/// `<data_dir>/scrubbed_at` across restarts: a host restarted more often
/// than `scrub_interval_secs` still scrubs on time, and one that has just
/// scrubbed does not scrub again at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_periodic_scrub_counts_from_the_last_one_across_restarts() {
    let fresh = HostProc::temp("").await;
    let fresh_stamp = fresh.api_socket().parent().unwrap().join("scrubbed_at");
    let written = uve_e2e::poll::until_async(std::time::Duration::from_secs(5), || async {
        std::fs::read_to_string(&fresh_stamp).ok()
    })
    .await;
    assert!(written.is_some(), "a first start sets the clock");
    drop(fresh);

    let dir = tempfile::tempdir().unwrap();
    let stamp = dir.path().join("scrubbed_at");
    let two_hours_ago = uve_protocol::defs::now_ms() - 7_200_000;
    std::fs::write(&stamp, two_hours_ago.to_string()).unwrap();
    let config = "scrub_interval_secs = 3600";
    let host = HostProc::start(dir.path(), config).await;
    let event = host.wait_event("scrub", |_| true).await;
    assert_eq!(event["complete"], true, "{event}");
    let moved = uve_e2e::poll::until_async(std::time::Duration::from_secs(5), || async {
        let at: u64 = std::fs::read_to_string(&stamp).ok()?.trim().parse().ok()?;
        (at > two_hours_ago).then_some(at)
    })
    .await;
    assert!(moved.is_some(), "the stamp moves to the scrub's end");
    drop(host);
    let host = HostProc::start(dir.path(), config).await;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(host.count_events("scrub").await, 0, "just scrubbed");
}
