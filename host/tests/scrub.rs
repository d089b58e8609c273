//! The local store's scrub against the real daemon: a chunk file damaged
//! on disk is found, moved out of the store and its versions named; the
//! next upload holding the same content stores it again, and the damaged
//! version retrieves byte-identical after that.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::{HostProc, noise};
use hyper::Method;
use serde_json::json;
use uve_protocol::manifest::ZERO_BLOCK;

/// The chunk files under `<store>/chunks/`, but the zero block's.
fn chunk_files(store: &Path) -> Vec<PathBuf> {
    let zero = ZERO_BLOCK.hash.to_hex();
    let mut out = Vec::new();
    for prefix in std::fs::read_dir(store.join("chunks")).unwrap() {
        for f in std::fs::read_dir(prefix.unwrap().path()).unwrap() {
            let path = f.unwrap().path();
            if path.file_name().unwrap().to_str().unwrap() != zero {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_chunk_is_found_moved_out_and_stored_again_by_the_next_upload() {
    let (host, path, alice) = HostProc::with_agent("", "vm1", &["alice"]).await;
    host.assign("bob", "vm1").await;
    alice.retrieve("alice", "s1").await.unwrap();
    let data = noise(3 << 20, 7);
    alice.update_from_lease("alice", &data).await.unwrap();
    let store = host.api_socket().parent().unwrap().join("store");
    let files = chunk_files(&store);
    assert!(files.len() > 10, "{} chunk files", files.len());

    // A clean store: everything read, nothing found.
    let (s, clean) = host
        .call(Method::POST, "/v1/scrub?mib_per_sec=0", json!({}))
        .await;
    assert_eq!(s, 200, "{clean}");
    assert_eq!(clean["corrupt"], 0, "{clean}");
    assert_eq!(clean["complete"], true);
    // Every chunk file, the zero block's too.
    assert_eq!(clean["scanned"], files.len() as u64 + 1, "{clean}");

    // One bit flips on the disk.
    let victim = &files[files.len() / 2];
    let mut bytes = std::fs::read(victim).unwrap();
    bytes[100] ^= 0x10;
    std::fs::write(victim, &bytes).unwrap();
    let hash = victim.file_name().unwrap().to_str().unwrap().to_string();

    let (s, found) = host.call(Method::POST, "/v1/scrub", json!({})).await;
    assert_eq!(s, 200, "{found}");
    assert_eq!(found["corrupt"], 1, "{found}");
    assert_eq!(
        found["damaged"],
        json!([{"user": "alice", "version": 1}]),
        "{found}"
    );
    assert!(!victim.exists(), "the damaged file left the store");
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
    assert!(store.join("chunks").join(&hash[..2]).join(&hash).is_file());
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
    // Stored at open as a loose chunk (no commit has referred to it yet).
    let path = store.join("staging").join(&zero);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[0] = 1;
    std::fs::write(&path, &bytes).unwrap();
    let (s, found) = host
        .call(Method::POST, "/v1/scrub?mib_per_sec=0", json!({}))
        .await;
    assert_eq!(s, 200, "{found}");
    assert_eq!(found["corrupt"], 1, "{found}");
    assert_eq!(found["damaged"], json!([]));
    let back = std::fs::read(&path).unwrap();
    assert_eq!(back.len(), ZERO_BLOCK.len as usize);
    assert!(
        back.iter().all(|b| *b == 0),
        "the zero block is whole again"
    );
}
