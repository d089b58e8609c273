//! Block deltas on update (protocol 2) against the real daemon: a delta
//! rebuilds its chunk byte-identical; the base is only ever the upload's own
//! base version at the chunk's own offset (a chunk outside it, an upload
//! without a base, a delta naming another chunk are refused); wrong bytes
//! are a `BadChunk` and nothing is committed; malformed deltas are refused
//! and contained; an agent that speaks only protocol 1 updates with whole
//! chunks and cannot send deltas.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

mod common;

use std::collections::HashSet;

use common::{HostProc, Listed, TestAgent, begin_alice, manifest_of, noise, update_with_deltas};
use uve_protocol::delta;
use uve_protocol::link::LinkError;
use uve_protocol::manifest::Hash;
use uve_protocol::message::{BlockDigest, ChunkDelta, DeltaBlock, ErrorCode, Request, Response};
use uve_protocol::testdata::scattered_writes;

/// A host with VM `vm1`, `alice` (and `bob`) assigned to it, a connected
/// agent speaking up to `protocol`, and `base` committed as alice's
/// version 1 (and `noise` as bob's).
async fn setup(protocol: u16, base: &[u8]) -> (HostProc, TestAgent) {
    let host = HostProc::temp("").await;
    let path = host.add_unix_vm("vm1").await;
    host.assign("alice", "vm1").await;
    host.assign("bob", "vm1").await;
    let agent = TestAgent::connect_speaking(&path, protocol).await.unwrap();
    assert_eq!(agent.welcome.protocol, protocol);
    for (user, data) in [("alice", base.to_vec()), ("bob", noise(2 << 20, 77))] {
        agent.retrieve(user, "s1").await.unwrap();
        let r = agent.update_from_lease(user, &data).await.unwrap();
        assert!(matches!(r.answer, Response::Committed { .. }), "{r:?}");
    }
    (host, agent)
}

/// An upload of alice's begun and listed by an agent speaking up to
/// `protocol`: her version 1 ([`setup`]) is 4 MiB of `noise(_, seed)`, the
/// upload's bytes are 8 blocks of it overwritten (`writes_seed`). Returns
/// the host, the agent, the upload's bytes and its listing.
async fn begun(
    protocol: u16,
    seed: u64,
    writes_seed: u64,
) -> (HostProc, TestAgent, Vec<u8>, Listed) {
    let base = noise(4 << 20, seed);
    let (host, agent) = setup(protocol, &base).await;
    let new = scattered_writes(&base, 8, writes_seed);
    let (v, l) = lease(&agent, "alice");
    let listed = begin_alice(&agent, v, l, &new).await.unwrap();
    (host, agent, new, listed)
}

/// Alice still has only her version 1, as head.
async fn only_version_1(host: &HostProc) {
    let versions = host.versions("alice").await;
    assert_eq!(versions["head"], 1, "{versions}");
    assert_eq!(versions["versions"].as_array().unwrap().len(), 1);
}

fn lease(agent: &TestAgent, user: &str) -> (Option<u64>, u64) {
    agent.state.lock().unwrap().leases[user]
}

/// Asks the block digests of the base bytes of chunks `chunks` of `l`.
async fn signatures(
    agent: &TestAgent,
    l: &Listed,
    chunks: Vec<u32>,
) -> Result<Response, LinkError> {
    agent
        .request(Request::BlockSignatures {
            upload: l.upload,
            chunks,
        })
        .await
}

/// Commits `l`'s upload.
async fn commit(agent: &TestAgent, l: &Listed) -> Result<Response, LinkError> {
    agent
        .request(Request::UpdateCommit { upload: l.upload })
        .await
}

/// Sends `blocks` as the delta of chunk `index` of `l`, said to be `hash`.
async fn send_delta(
    agent: &TestAgent,
    l: &Listed,
    index: u32,
    hash: Hash,
    blocks: Vec<DeltaBlock>,
) -> Result<Response, LinkError> {
    let delta = ChunkDelta {
        upload: l.upload,
        index,
        hash,
        blocks,
    };
    agent.request(Request::ChunkDelta(delta)).await
}

fn code(r: Result<Response, LinkError>) -> Option<ErrorCode> {
    match r {
        Err(e) => e.remote_code(),
        Ok(other) => panic!("expected an error, got {other:?}"),
    }
}

/// A missing chunk of `l` with base bytes: its index, bytes, the base's
/// block digests and the blocks that differ.
async fn a_delta(
    agent: &TestAgent,
    l: &Listed,
) -> (usize, Vec<u8>, Vec<BlockDigest>, Vec<DeltaBlock>) {
    for &i in &l.missing {
        let c = l.manifest.chunks[i];
        let sigs = match signatures(agent, l, vec![i as u32]).await.unwrap() {
            Response::BlockSignatures(s) => s,
            other => panic!("unexpected {other:?}"),
        };
        if let Some(Some(digests)) = sigs.into_iter().next() {
            let data = l.bytes[&c.hash].clone();
            let blocks = delta::diff(l.offset(i), &data, &digests).unwrap();
            assert!(!blocks.is_empty());
            return (i, data, digests, blocks);
        }
    }
    panic!("no missing chunk has base bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_rebuilds_the_chunk_byte_identical() {
    let base = noise(8 << 20, 5);
    let (host, agent) = setup(2, &base).await;
    let new = scattered_writes(&base, 16, 900);
    let (v, l) = lease(&agent, "alice");
    let r = update_with_deltas(&agent.handle, "alice", v, l, &new)
        .await
        .unwrap();
    assert_eq!(r.answer, Response::Committed { version: 2 }, "{r:?}");
    // Every touched chunk (also one whose boundary a write moved) has base
    // bytes at its offset, and blocks are file-aligned: exactly the 16
    // written blocks travel.
    assert!(r.deltas >= 16, "{r:?}");
    assert_eq!((r.delta_bytes, r.whole_bytes), (16 * 4096, 0), "{r:?}");
    let (old_m, _) = manifest_of(&base);
    let old: HashSet<Hash> = old_m.chunks.iter().map(|c| c.hash).collect();
    let (new_m, _) = manifest_of(&new);
    let whole: u32 = new_m
        .chunks
        .iter()
        .filter(|c| !old.contains(&c.hash))
        .map(|c| c.len)
        .sum();
    assert!(
        (r.delta_bytes + r.whole_bytes) * 4 < whole as usize,
        "{r:?}, whole chunks {whole}"
    );
    assert!(
        host.export("alice", 2).await == new,
        "exported bytes differ"
    );
    let (_, back) = agent.retrieve("alice", "s2").await.unwrap();
    assert!(back == new, "retrieved bytes differ");
    assert_eq!(host.metric("uve_chunk_deltas_total").await, r.deltas as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_can_only_rebuild_from_the_uploads_own_base_version() {
    let base = noise(4 << 20, 6);
    let (host, agent) = setup(2, &base).await;
    // The file grew: its new tail has no base bytes.
    let mut new = scattered_writes(&base, 8, 901);
    new.extend_from_slice(&noise(300_000, 12));
    let (v, l) = lease(&agent, "alice");
    let listed = begin_alice(&agent, v, l, &new).await.unwrap();
    let last = *listed.missing.last().unwrap();
    assert!(listed.offset(last) + 4096 > base.len() as u64);
    let r = signatures(&agent, &listed, vec![last as u32])
        .await
        .unwrap();
    assert_eq!(r, Response::BlockSignatures(vec![None]), "tail: send whole");
    let c = listed.manifest.chunks[last];
    let r = send_delta(&agent, &listed, last as u32, c.hash, Vec::new()).await;
    assert_eq!(code(r), Some(ErrorCode::BadRequest), "outside the base");
    // A delta naming another chunk than the one at its index.
    let (i, _, _, blocks) = a_delta(&agent, &listed).await;
    let other = listed.missing.iter().find(|&&j| j != i).copied().unwrap();
    let r = send_delta(
        &agent,
        &listed,
        i as u32,
        listed.manifest.chunks[other].hash,
        blocks.clone(),
    )
    .await;
    assert_eq!(
        code(r),
        Some(ErrorCode::BadRequest),
        "hash of another index"
    );
    // The chunks were never stored: the commit fails and nothing changes.
    let r = commit(&agent, &listed).await;
    assert!(code(r).is_some());
    only_version_1(&host).await;

    // An upload without a base version has no base bytes at all, although
    // alice's version 1 (and bob's) hold the very same bytes.
    let (_, l) = lease(&agent, "alice");
    let listed = begin_alice(&agent, None, l, &new).await.unwrap();
    let i = listed.missing[0];
    let r = signatures(&agent, &listed, vec![i as u32]).await.unwrap();
    assert_eq!(r, Response::BlockSignatures(vec![None]));
    let r = send_delta(
        &agent,
        &listed,
        i as u32,
        listed.manifest.chunks[i].hash,
        Vec::new(),
    )
    .await;
    assert_eq!(code(r), Some(ErrorCode::BadRequest), "no base version");
    assert_eq!(host.metric("uve_chunk_deltas_total").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_with_wrong_bytes_is_a_bad_chunk_and_nothing_is_committed() {
    let (host, agent, _, listed) = begun(2, 7, 902).await;
    let (i, _, _, mut blocks) = a_delta(&agent, &listed).await;
    blocks[0].data[17] ^= 0x40;
    let wrong = ChunkDelta {
        upload: listed.upload,
        index: i as u32,
        hash: listed.manifest.chunks[i].hash,
        blocks,
    };
    let r = agent.request(Request::ChunkDelta(wrong.clone())).await;
    assert_eq!(code(r), Some(ErrorCode::BadChunk));
    // Bad deltas cost the host a base chunk read each: after 16 in one
    // upload it asks for whole chunks instead.
    for _ in 1..16 {
        let r = agent.request(Request::ChunkDelta(wrong.clone())).await;
        assert_eq!(code(r), Some(ErrorCode::BadChunk));
    }
    let r = agent.request(Request::ChunkDelta(wrong)).await;
    assert_eq!(code(r), Some(ErrorCode::NotFound), "send it whole");
    let r = commit(&agent, &listed).await;
    assert!(code(r).is_some(), "commit without the chunk must fail");
    only_version_1(&host).await;
    assert_eq!(host.metric("uve_chunk_deltas_total").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_deltas_and_signature_requests_are_refused_and_contained() {
    let (host, agent, new, listed) = begun(2, 8, 903).await;
    let (i, data, _, blocks) = a_delta(&agent, &listed).await;
    let c = listed.manifest.chunks[i];
    for (what, index, hash, blocks) in malformed_deltas(&listed, i, &data, &blocks) {
        let r = send_delta(&agent, &listed, index, hash, blocks).await;
        assert_eq!(code(r), Some(ErrorCode::BadRequest), "{what}");
    }
    signature_requests_are_refused(&agent, &listed).await;
    assert_eq!(host.metric("uve_chunk_deltas_total").await, 0);
    signatures_are_asked_once_and_only_for_missing_chunks(&agent, &listed, i).await;
    // Contained: the same upload still completes with good deltas.
    let good = ChunkDelta {
        upload: listed.upload,
        index: i as u32,
        hash: c.hash,
        blocks,
    };
    let r = agent
        .request(Request::ChunkDelta(good.clone()))
        .await
        .unwrap();
    assert_eq!(r, Response::Ok);
    let r = agent.request(Request::ChunkDelta(good)).await;
    assert_eq!(code(r), Some(ErrorCode::BadRequest), "stored already");
    for &j in &listed.missing {
        if j == i {
            continue;
        }
        let cj = listed.manifest.chunks[j];
        let r = agent
            .request(Request::ChunkUpload {
                upload: listed.upload,
                hash: cj.hash,
                data: listed.bytes[&cj.hash].clone(),
            })
            .await
            .unwrap();
        assert_eq!(r, Response::Ok);
    }
    let r = commit(&agent, &listed).await.unwrap();
    assert_eq!(r, Response::Committed { version: 2 });
    assert!(host.export("alice", 2).await == new);
}

/// Deltas for chunk `i` of `listed` (its bytes `data`, good `blocks`)
/// that are each wrong in one way: what is wrong, index, hash, blocks.
fn malformed_deltas(
    listed: &Listed,
    i: usize,
    data: &[u8],
    blocks: &[DeltaBlock],
) -> Vec<(&'static str, u32, Hash, Vec<DeltaBlock>)> {
    let c = listed.manifest.chunks[i];
    let at = listed.offset(i);
    let places: Vec<_> = delta::blocks(at, data.len()).collect();
    let last = places.len() - 1;
    let block = |index: usize, len: usize| DeltaBlock {
        index: index as u16,
        data: vec![1; len],
    };
    vec![
        (
            "block past the end",
            i as u32,
            c.hash,
            vec![block(last + 1, 4096)],
        ),
        (
            "block index far out",
            i as u32,
            c.hash,
            vec![block(u16::MAX.into(), 4096)],
        ),
        (
            "short first block",
            i as u32,
            c.hash,
            vec![block(0, places[0].len() - 1)],
        ),
        (
            "long last block",
            i as u32,
            c.hash,
            vec![block(last, places[last].len() + 1)],
        ),
        (
            "blocks out of order",
            i as u32,
            c.hash,
            vec![block(2, 4096), block(1, 4096)],
        ),
        (
            "repeated block",
            i as u32,
            c.hash,
            vec![block(1, 4096), block(1, 4096)],
        ),
        (
            "index never listed",
            listed.manifest.chunks.len() as u32,
            c.hash,
            blocks.to_vec(),
        ),
        (
            "another chunk's hash",
            i as u32,
            Hash([0x33; 32]),
            blocks.to_vec(),
        ),
    ]
}

/// Signature requests: too many at once, an index never listed, an
/// unknown upload.
async fn signature_requests_are_refused(agent: &TestAgent, listed: &Listed) {
    let r = signatures(agent, listed, vec![0; 129]).await;
    assert_eq!(code(r), Some(ErrorCode::TooLarge));
    let r = signatures(agent, listed, vec![listed.manifest.chunks.len() as u32]).await;
    assert_eq!(code(r), Some(ErrorCode::BadRequest));
    let r = agent
        .request(Request::BlockSignatures {
            upload: 999,
            chunks: vec![0],
        })
        .await;
    assert_eq!(code(r), Some(ErrorCode::NotFound));
}

/// Each missing chunk's signatures are asked once; present chunks never.
async fn signatures_are_asked_once_and_only_for_missing_chunks(
    agent: &TestAgent,
    listed: &Listed,
    i: usize,
) {
    let r = signatures(agent, listed, vec![i as u32]).await;
    assert_eq!(code(r), Some(ErrorCode::BadRequest), "asked twice");
    let present = (0..listed.manifest.chunks.len())
        .find(|j| !listed.missing.contains(j))
        .unwrap();
    let r = signatures(agent, listed, vec![present as u32]).await;
    assert_eq!(code(r), Some(ErrorCode::BadRequest), "a chunk the host has");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_agent_updates_with_whole_chunks_and_cannot_send_deltas() {
    let (host, agent, new, listed) = begun(1, 9, 904).await;
    let r = signatures(&agent, &listed, vec![listed.missing[0] as u32]).await;
    assert_eq!(code(r), Some(ErrorCode::Unsupported));
    let c = listed.manifest.chunks[listed.missing[0]];
    let r = send_delta(
        &agent,
        &listed,
        listed.missing[0] as u32,
        c.hash,
        Vec::new(),
    )
    .await;
    assert_eq!(code(r), Some(ErrorCode::Unsupported));
    agent
        .request(Request::UpdateAbort {
            upload: listed.upload,
        })
        .await
        .unwrap();
    let r = agent.update_from_lease("alice", &new).await.unwrap();
    assert_eq!(r.answer, Response::Committed { version: 2 });
    assert!(host.export("alice", 2).await == new);
    assert_eq!(host.metric("uve_chunk_deltas_total").await, 0);
}
