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

use common::{AgentProc, HostState, TestHost, file_agent, host_in_tempdir, noise, uif};
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

/// A test directory with its fake host holding `user`'s version of
/// `size` noise bytes (after `prepare` ran on the host's state), and a
/// file-mode agent on which `user` logged in (retrieving that version)
/// and made `count` scattered 4 KiB writes, not yet logged out.
struct Scribbled {
    // Dropped in this order: the agent, then the host, then the directory.
    agent: AgentProc,
    host: TestHost,
    dir: tempfile::TempDir,
    /// The version's bytes.
    original: Vec<u8>,
    /// The image's bytes after the writes.
    new: Vec<u8>,
    /// The version's number.
    v1: u64,
}

fn scribbled(
    user: &str,
    (size, seed): (usize, u64),
    count: usize,
    prepare: impl FnOnce(&mut HostState),
) -> Scribbled {
    let (dir, host) = host_in_tempdir();
    let original = noise(size, seed);
    let v1 = host.with(|h| {
        prepare(h);
        h.seed(user, &original)
    });
    let agent = file_agent(dir.path());
    let out = agent.ok(&["login", "--user", user, "--session", "s1"]);
    assert!(out.contains("retrieved version"), "{out}");
    let img = uif(&agent.dir, user);
    assert!(std::fs::read(&img).unwrap() == original);
    let new = scattered_writes(&original, count, 500);
    std::fs::write(&img, &new).unwrap();
    Scribbled {
        agent,
        host,
        dir,
        original,
        new,
        v1,
    }
}

/// Logs session `s1` out; the update must be committed.
fn logout_commits(agent: &AgentProc) {
    let out = agent.ok(&["logout", "--session", "s1"]);
    assert!(out.contains("committed as version"), "{out}");
}

#[test]
fn scattered_4k_writes_send_only_the_changed_blocks() {
    let r = scribbled("dora", (8 << 20, 61), 24, |_| {});
    let (agent, host, new) = (&r.agent, &r.host, &r.new);
    logout_commits(agent);

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
    assert!(head == *new, "committed bytes differ from the file");
    let commit = host.last_commit();
    assert_eq!((commit.base, commit.conflict), (Some(r.v1), false));
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
    let whole = whole_chunk_cost(&r.original, new);
    assert!(
        sent * 4 < whole,
        "sent {sent} bytes ({delta_bytes} as deltas, {whole_bytes} whole); whole chunks: {whole}"
    );

    // A cold login elsewhere (the image gone) gets exactly these bytes back
    // from the chunks the host rebuilt.
    std::fs::remove_file(uif(r.dir.path(), "dora")).unwrap();
    std::fs::remove_dir_all(agent.state.join("cache")).unwrap();
    agent.ok(&["login", "--user", "dora", "--session", "s2"]);
    assert!(std::fs::read(uif(r.dir.path(), "dora")).unwrap() == *new);
    agent.ok(&["logout", "--session", "s2"]);
}

#[test]
fn an_old_host_gets_whole_chunks() {
    let r = scribbled("emil", (4 << 20, 62), 12, |h| h.protocol_max = Some(1));
    logout_commits(&r.agent);
    let (head, deltas, sigs, whole_bytes, protocol) = r.host.with(|h| {
        (
            h.head_bytes("emil").unwrap(),
            h.chunk_deltas,
            h.signature_requests,
            h.upload_bytes,
            h.protocol,
        )
    });
    assert_eq!(protocol, 1);
    assert!(head == r.new);
    assert_eq!(
        (deltas, sigs),
        (0, 0),
        "no protocol-2 request to an old host"
    );
    assert_eq!(whole_bytes, whole_chunk_cost(&r.original, &r.new));
}

#[test]
fn a_refused_delta_is_resent_whole() {
    let r = scribbled("finn", (4 << 20, 63), 12, |_| {});
    r.host.with(|h| h.refuse_deltas = 3);
    logout_commits(&r.agent);
    let (head, deltas, uploads, left) = r.host.with(|h| {
        (
            h.head_bytes("finn").unwrap(),
            h.chunk_deltas,
            h.chunk_uploads,
            h.refuse_deltas,
        )
    });
    assert!(head == r.new);
    assert_eq!(left, 0, "three deltas were refused");
    assert!(uploads >= 3, "the refused ones went whole ({uploads})");
    assert!(deltas >= 1, "the others as deltas ({deltas})");
}

#[test]
fn refused_signatures_mean_whole_chunks() {
    let r = scribbled("hana", (4 << 20, 65), 12, |_| {});
    r.host.with(|h| h.refuse_signatures = 1);
    logout_commits(&r.agent);
    let (head, deltas, whole_bytes) = r.host.with(|h| {
        (
            h.head_bytes("hana").unwrap(),
            h.chunk_deltas,
            h.upload_bytes,
        )
    });
    assert!(head == r.new);
    assert_eq!(deltas, 0);
    assert_eq!(whole_bytes, whole_chunk_cost(&r.original, &r.new));
}

#[test]
fn a_spooled_update_is_sent_as_deltas_after_an_outage_and_a_restart() {
    let mut r = scribbled("gus", (4 << 20, 64), 12, |_| {});
    r.host.down();
    let out = r.agent.ok(&["logout", "--session", "s1"]);
    assert!(out.contains("spooled"), "{out}");
    r.agent.kill();
    r.agent.spawn().unwrap();
    r.host.up();
    r.host.wait_head("spooled update committed", "gus", &r.new);
    let c = r.host.last_commit();
    assert_eq!((c.cause, c.conflict), (UpdateCause::Spooled, false));
    let (deltas, whole_bytes) = r.host.with(|h| (h.chunk_deltas, h.upload_bytes));
    assert!(deltas >= 8, "{deltas} chunks sent as deltas");
    assert!(whole_bytes < whole_chunk_cost(&r.original, &r.new));
}
