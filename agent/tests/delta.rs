//! Block deltas on update (protocol 2), the real agent binary against the
//! test host: scattered 4 KiB writes are sent as the differing blocks of
//! their chunks and round-trip byte-identical, also from the spool after an
//! outage and an agent restart; a refused delta is resent whole, refused
//! signatures mean whole chunks; a host that speaks only protocol 1 gets
//! whole chunks.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation,
    missing_docs
)]

mod common;

use std::collections::HashSet;

use common::{AgentProc, LONG, TestHost, file_cfg, must, noise, start_agent};
use uve_protocol::chunker::chunk_stream;
use uve_protocol::message::UpdateCause;
use uve_protocol::testdata::scattered_writes;

/// Bytes an update from `old` to `new` costs when every chunk of `new`
/// missing from `old` is sent whole.
fn whole_chunk_cost(old: &[u8], new: &[u8]) -> u64 {
    let have: HashSet<_> = chunk_stream(old, |_, _| Ok(()))
        .unwrap()
        .chunks
        .iter()
        .map(|c| c.hash)
        .collect();
    let m = chunk_stream(new, |_, _| Ok(())).unwrap();
    let mut seen = HashSet::new();
    m.chunks
        .iter()
        .filter(|c| !have.contains(&c.hash) && seen.insert(c.hash))
        .map(|c| u64::from(c.len))
        .sum()
}

/// Logs `user` in (retrieving `data`), applies `count` scattered 4 KiB
/// writes to the image and returns the new bytes (not yet logged out).
fn login_and_scribble(agent: &AgentProc, user: &str, data: &[u8], count: usize) -> Vec<u8> {
    let out = agent.ok(&["login", "--user", user, "--session", "s1"]);
    assert!(out.contains("retrieved version"), "{out}");
    let img = agent.dir.join(format!("uif/{user}.img"));
    assert!(std::fs::read(&img).unwrap() == data);
    let new = scattered_writes(data, count, 500);
    std::fs::write(&img, &new).unwrap();
    new
}

#[test]
fn scattered_4k_writes_send_only_the_changed_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::start(dir.path());
    let original = noise(8 << 20, 61);
    let v1 = host.with(|h| h.seed("dora", &original));
    let agent = start_agent(dir.path(), &file_cfg(dir.path(), ""));
    agent.wait_connected();
    let new = login_and_scribble(&agent, "dora", &original, 24);
    let out = agent.ok(&["logout", "--session", "s1"]);
    assert!(out.contains("committed as version"), "{out}");

    let (head, deltas, delta_bytes, whole_bytes, sigs, protocol) = host.with(|h| {
        (
            h.head_bytes("dora").unwrap(),
            h.chunk_deltas,
            h.delta_bytes,
            h.upload_bytes,
            h.signature_requests,
            h.protocol,
        )
    });
    assert_eq!(protocol, 2);
    assert!(head == new, "committed bytes differ from the file");
    let commit = host.with(|h| h.commits.last().cloned().unwrap());
    assert_eq!((commit.base, commit.conflict), (Some(v1), false));
    // Every chunk touched by a write travels as its changed blocks, also
    // those whose boundaries the write moved (the base is the old bytes at
    // the same offset), and blocks are aligned to the file: exactly the 24
    // written blocks are sent, nothing whole.
    assert!(deltas >= 24, "{deltas} chunks sent as deltas");
    assert_eq!((delta_bytes, whole_bytes), (24 * 4096, 0));
    assert!(
        (1..=2).contains(&sigs),
        "{sigs} signature requests (batched)"
    );
    let sent = delta_bytes + whole_bytes;
    let whole = whole_chunk_cost(&original, &new);
    assert!(
        sent * 4 < whole,
        "sent {sent} bytes ({delta_bytes} as deltas, {whole_bytes} whole); whole chunks: {whole}"
    );

    // A cold login elsewhere (the image gone) gets exactly these bytes back
    // from the chunks the host rebuilt.
    std::fs::remove_file(dir.path().join("uif/dora.img")).unwrap();
    std::fs::remove_dir_all(agent.state.join("cache")).unwrap();
    agent.ok(&["login", "--user", "dora", "--session", "s2"]);
    assert!(std::fs::read(dir.path().join("uif/dora.img")).unwrap() == new);
    agent.ok(&["logout", "--session", "s2"]);
}

#[test]
fn an_old_host_gets_whole_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::start(dir.path());
    let original = noise(4 << 20, 62);
    host.with(|h| {
        h.protocol_max = Some(1);
        h.seed("emil", &original)
    });
    let agent = start_agent(dir.path(), &file_cfg(dir.path(), ""));
    agent.wait_connected();
    let new = login_and_scribble(&agent, "emil", &original, 12);
    let out = agent.ok(&["logout", "--session", "s1"]);
    assert!(out.contains("committed as version"), "{out}");
    let (head, deltas, sigs, whole_bytes, protocol) = host.with(|h| {
        (
            h.head_bytes("emil").unwrap(),
            h.chunk_deltas,
            h.signature_requests,
            h.upload_bytes,
            h.protocol,
        )
    });
    assert_eq!(protocol, 1);
    assert!(head == new);
    assert_eq!(
        (deltas, sigs),
        (0, 0),
        "no protocol-2 request to an old host"
    );
    assert_eq!(whole_bytes, whole_chunk_cost(&original, &new));
}

#[test]
fn a_refused_delta_is_resent_whole() {
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::start(dir.path());
    let original = noise(4 << 20, 63);
    host.with(|h| h.seed("finn", &original));
    let agent = start_agent(dir.path(), &file_cfg(dir.path(), ""));
    agent.wait_connected();
    let new = login_and_scribble(&agent, "finn", &original, 12);
    host.with(|h| h.refuse_deltas = 3);
    let out = agent.ok(&["logout", "--session", "s1"]);
    assert!(out.contains("committed as version"), "{out}");
    let (head, deltas, uploads, left) = host.with(|h| {
        (
            h.head_bytes("finn").unwrap(),
            h.chunk_deltas,
            h.chunk_uploads,
            h.refuse_deltas,
        )
    });
    assert!(head == new);
    assert_eq!(left, 0, "three deltas were refused");
    assert!(uploads >= 3, "the refused ones went whole ({uploads})");
    assert!(deltas >= 1, "the others as deltas ({deltas})");
}

#[test]
fn refused_signatures_mean_whole_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::start(dir.path());
    let original = noise(4 << 20, 65);
    host.with(|h| h.seed("hana", &original));
    let agent = start_agent(dir.path(), &file_cfg(dir.path(), ""));
    agent.wait_connected();
    let new = login_and_scribble(&agent, "hana", &original, 12);
    host.with(|h| h.refuse_signatures = 1);
    let out = agent.ok(&["logout", "--session", "s1"]);
    assert!(out.contains("committed as version"), "{out}");
    let (head, deltas, whole_bytes) = host.with(|h| {
        (
            h.head_bytes("hana").unwrap(),
            h.chunk_deltas,
            h.upload_bytes,
        )
    });
    assert!(head == new);
    assert_eq!(deltas, 0);
    assert_eq!(whole_bytes, whole_chunk_cost(&original, &new));
}

#[test]
fn a_spooled_update_is_sent_as_deltas_after_an_outage_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::start(dir.path());
    let original = noise(4 << 20, 64);
    host.with(|h| h.seed("gus", &original));
    let mut agent = start_agent(dir.path(), &file_cfg(dir.path(), ""));
    agent.wait_connected();
    let new = login_and_scribble(&agent, "gus", &original, 12);
    host.down();
    let out = agent.ok(&["logout", "--session", "s1"]);
    assert!(out.contains("spooled"), "{out}");
    agent.kill();
    agent.spawn().unwrap();
    host.up();
    must("spooled update committed", LONG, || {
        host.with(|h| (h.head_bytes("gus").as_deref() == Some(&new[..])).then_some(()))
    });
    let c = host.with(|h| h.commits.last().cloned().unwrap());
    assert_eq!((c.cause, c.conflict), (UpdateCause::Spooled, false));
    let (deltas, whole_bytes) = host.with(|h| (h.chunk_deltas, h.upload_bytes));
    assert!(deltas >= 8, "{deltas} chunks sent as deltas");
    assert!(whole_bytes < whole_chunk_cost(&original, &new));
}
