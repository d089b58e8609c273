//! Hostile VMs against the real daemon, each beside a good VM whose login
//! and logout must keep working: a VM that floods requests and stops
//! reading is cut off within `write_deadline_ms` and the host's memory
//! stays within its link budgets; thousands of half-open connections cost
//! the host a handful of file descriptors; CIDs that are not a guest's are
//! refused at registration.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

mod common;

use std::time::Duration;

use std::path::PathBuf;

use common::{HostProc, ReleaseMode, TestAgent, assert_committed, begin_alice, noise, on_release};
use futures_util::StreamExt;
use hyper::Method;
use serde_json::json;
use uve_e2e::names::valid;
use uve_e2e::poll::until_async;
use uve_e2e::process::status_kib;
use uve_e2e::raw_peer::{RawPeer, write_until_closed};
use uve_protocol::message::{ErrorCode, Request, Response};
use uve_protocol::names::SessionId;

/// What a non-reading VM floods the host with.
#[derive(Clone, Copy, Debug)]
enum Flood {
    /// Retrieves of a user not assigned to it: small error answers.
    Refused,
    /// Fetches of a chunk it may fetch: chunk-sized answers.
    Chunks,
}

/// Peak RSS growth allowed over the host's RSS before the flood, KiB:
/// the link budgets (2 MiB in, 2 MiB out), `max_inflight` answers of one
/// chunk, the good VM's transfer and the allocator's slack.
const RSS_ALLOWANCE_KIB: u64 = 48 << 10;

/// alice on the bad VM, bob on the good one.
const BAD_AND_GOOD: &[(&str, &str)] = &[("alice", "bad"), ("bob", "good")];

/// The good VM's user logs in and out with `data` and gets it back.
async fn good_round_trip(host: &HostProc, path: &std::path::Path, data: &[u8]) {
    let agent = host.connect_agent(path, "good").await;
    agent.retrieve("bob", "g1").await.unwrap();
    let r = agent.update_from_lease("bob", data).await.unwrap();
    assert_committed(&r);
    let (_, back) = agent.retrieve("bob", "g2").await.unwrap();
    assert!(back == data, "the good VM's UIF came back different");
}

/// The non-reader's connection and its flood: `count` requests, encoded.
async fn prepare_flood(
    host: &HostProc,
    bad: &std::path::Path,
    flood: Flood,
) -> (RawPeer, Vec<u8>, usize) {
    if matches!(flood, Flood::Chunks) {
        let agent = host.connect_agent(bad, "bad").await;
        agent.retrieve("alice", "s0").await.unwrap();
        agent
            .update_from_lease("alice", &noise(4 << 20, 5))
            .await
            .unwrap();
    }
    let mut peer = RawPeer::connect(bad, "non-reader").await.unwrap();
    let (bytes, count) = match flood {
        Flood::Refused => {
            let f = peer.encode_flood(200_000, || Request::UifRetrieve {
                user: valid("mallory"),
                session: valid("x"),
            });
            (f, 200_000)
        }
        Flood::Chunks => {
            let Response::Retrieve(grant) = peer
                .call(Request::UifRetrieve {
                    user: valid("alice"),
                    session: valid("s1"),
                })
                .await
                .unwrap()
            else {
                panic!("no grant")
            };
            let Response::ManifestPage(refs) = peer
                .call(Request::ManifestPage {
                    user: valid("alice"),
                    version: grant.version.unwrap(),
                    page: 0,
                })
                .await
                .unwrap()
            else {
                panic!("no manifest page")
            };
            let hash = refs.iter().max_by_key(|r| r.len).unwrap().hash;
            let f = peer.encode_flood(4_000, || Request::ChunkFetch {
                user: valid("alice"),
                hash,
            });
            (f, 4_000)
        }
    };
    (peer, bytes, count)
}

async fn non_reader_is_cut_off(flood: Flood) {
    let extra = "write_deadline_ms = 4000";
    let (host, [bad, good]) = HostProc::with_vms(extra, ["bad", "good"], BAD_AND_GOOD).await;
    let (peer, bytes, count) = prepare_flood(&host, &bad, flood).await;
    let pid = host.pid().unwrap();
    let before = status_kib(pid, "VmRSS").unwrap();
    let (mut w, mut r) = peer.into_raw_writer();
    let writer = tokio::spawn(async move {
        let out = write_until_closed(&mut w, &bytes, 64 << 10).await;
        (out, w)
    });

    // While the flood stalls, the good VM is served.
    good_round_trip(&host, &good, &noise(1 << 20, 6)).await;

    let lost = host.wait_event("vm_lost", |e| e["vm"] == "bad").await;
    let reason = lost["reason"].as_str().unwrap_or_default().to_string();
    assert!(reason.contains("stopped reading"), "{lost}");
    assert_eq!(host.metric("uve_stalled_cut_off_total").await, 1);
    let cut = host
        .wait_event("budget_exceeded", |e| e["budget"] == "write_deadline_ms")
        .await;
    assert_eq!(cut["vm"], "bad", "{cut}");
    assert_eq!(cut["limit"], 4000, "{cut}");
    if matches!(flood, Flood::Chunks) {
        // Backpressure on the way, counted (no event): the answers filled
        // the VM's outbound budget, and its requests waited for slots.
        assert!(host.metric("uve_link_outbound_waits_total").await > 0);
        assert!(host.metric("uve_inflight_waits_total").await > 0);
    }
    // The host closed the connection: what it had written drains to EOF.
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(_)) = r.next().await {}
    })
    .await;
    assert!(closed.is_ok(), "the host kept the connection open");
    let ((written, _), _w) = tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .expect("the flood's writer never ended")
        .unwrap();
    let peak = status_kib(pid, "VmHWM").unwrap();
    println!(
        "{flood:?}: {count} requests, {written} bytes taken; host RSS {before} KiB, peak {peak} KiB"
    );
    assert!(
        peak.saturating_sub(before) < RSS_ALLOWANCE_KIB,
        "{flood:?}: {count} requests ({written} bytes taken) grew the host's peak RSS from {before} KiB to {peak} KiB"
    );
    // And after the cut-off the good VM still logs in and out.
    good_round_trip(&host, &good, &noise(1 << 20, 7)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_flooding_refused_requests_without_reading_is_cut_off() {
    non_reader_is_cut_off(Flood::Refused).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_flooding_chunk_fetches_without_reading_is_cut_off() {
    non_reader_is_cut_off(Flood::Chunks).await;
}

/// File descriptors `pid` has open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(Iterator::count)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connections_cost_the_host_a_handful_of_descriptors() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    // The host runs with the common default soft limit of 1024 (what the
    // unit would give it without LimitNOFILE); this test process needs
    // more for its own 2,000 connections.
    setrlimit(Resource::RLIMIT_NOFILE, soft.min(1024), hard).unwrap();
    let (host, [bad, good]) = HostProc::with_vms("", ["bad", "good"], &[("bob", "good")]).await;
    setrlimit(Resource::RLIMIT_NOFILE, hard.min(8192), hard).unwrap();
    let pid = host.pid().unwrap();

    let mut half_open = Vec::new();
    for _ in 0..2_000 {
        let c = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::UnixStream::connect(&bad),
        )
        .await
        .expect("connect to the host stalled")
        .expect("connect");
        half_open.push(c);
    }
    // All but the VM's 4 handshake places are closed as the host accepts
    // them (well within the 10 s handshake timeout that frees the 4).
    let refused = until_async(Duration::from_secs(8), || async {
        let n = host.metric("uve_handshakes_refused_total").await;
        (n >= 1_996).then_some(n)
    })
    .await;
    let fds = open_fds(pid);
    println!("host descriptors with 2,000 half-open connections: {fds}");
    assert!(
        refused.is_some(),
        "only {} of 2,000 half-open connections were closed at accept",
        host.metric("uve_handshakes_refused_total").await
    );
    assert!(
        fds < 100,
        "the host holds {fds} descriptors with 2,000 half-open connections"
    );
    good_round_trip(&host, &good, &noise(1 << 20, 8)).await;
    drop(half_open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cids_that_are_not_a_guests_are_refused() {
    let host = HostProc::temp("").await;
    for cid in [0u64, 1, 2, u64::from(u32::MAX)] {
        let (s, v) = host
            .call(Method::POST, "/v1/vms", json!({"id": "v", "cid": cid}))
            .await;
        assert_eq!(s, 400, "CID {cid}: {v}");
        assert!(v.to_string().contains("cannot be a VM's"), "{v}");
    }
    let (s, v) = host
        .call(Method::POST, "/v1/vms", json!({"id": "v", "cid": 3}))
        .await;
    assert_eq!(s, 201, "{v}");
    drop(host);
    let host = HostProc::temp("allow_local_cid = true").await;
    let (s, v) = host
        .call(Method::POST, "/v1/vms", json!({"id": "v", "cid": 1}))
        .await;
    assert_eq!(s, 201, "CID 1 with allow_local_cid: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_of_tiny_chunks_is_refused_at_update_page() {
    use uve_protocol::manifest::{ChunkRef, Hash, ManifestHeader, digest_of};
    use uve_protocol::message::{UpdateBegin, UpdateCause};
    let (_host, _, agent) = HostProc::with_agent("", "bad", &["alice"]).await;
    let (grant, _) = agent.retrieve("alice", "s1").await.unwrap();
    // 1 MiB as 2^20 one-byte chunks: one BlockSignatures on such a base
    // would queue a million chunk reads.
    let chunks: Vec<ChunkRef> = (0u32..1 << 20)
        .map(|i| ChunkRef {
            hash: Hash(*blake3::hash(&i.to_le_bytes()).as_bytes()),
            len: 1,
        })
        .collect();
    let begin = UpdateBegin {
        user: valid("alice"),
        session: valid("s1"),
        base: grant.version,
        lease: grant.lease,
        header: ManifestHeader {
            size: 1 << 20,
            digest: digest_of(&chunks),
            chunk_count: 1 << 20,
        },
        cause: UpdateCause::Logout,
    };
    let Response::UpdateAccepted { upload } =
        agent.request(Request::UpdateBegin(begin)).await.unwrap()
    else {
        panic!("begin refused")
    };
    let per = uve_protocol::manifest::chunks_per_page(agent.welcome.max_frame) as usize;
    let e = agent
        .request(Request::UpdatePage {
            upload,
            page: 0,
            chunks: chunks[..per].to_vec(),
        })
        .await
        .expect_err("tiny chunks accepted");
    assert_eq!(e.remote_code(), Some(ErrorCode::BadRequest), "{e}");
    assert!(e.to_string().contains("at least 16384"), "{e}");
    // A UIF smaller than one chunk is one short chunk: still accepted.
    let r = agent.update_from_lease("alice", b"tiny").await.unwrap();
    assert_committed(&r);
}

/// A page refused for listing one hash with two lengths leaves the upload
/// as it was: the agent's corrected resend of that page is accepted, its
/// missing chunks are reported, and the update commits. (Found by the
/// `manifest_pages` fuzz target: the refused page's first length stayed
/// recorded, so every resend was refused.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_page_can_be_sent_again_corrected() {
    use uve_protocol::manifest::{ChunkRef, Hash, Manifest};
    use uve_protocol::message::{UpdateBegin, UpdateCause};
    let (_host, _, agent) = HostProc::with_agent("", "bad", &["alice"]).await;
    let (grant, _) = agent.retrieve("alice", "s1").await.unwrap();
    let (a, b) = (noise(20_000, 41), noise(30_000, 42));
    let data = [a.as_slice(), a.as_slice(), b.as_slice()].concat();
    let chunk = |d: &[u8]| ChunkRef {
        hash: Hash::of(d),
        len: d.len() as u32,
    };
    let manifest = Manifest::from_chunks(vec![chunk(&a), chunk(&a), chunk(&b)]);
    let begin = UpdateBegin {
        user: valid("alice"),
        session: valid("s1"),
        base: grant.version,
        lease: grant.lease,
        header: manifest.header,
        cause: UpdateCause::Logout,
    };
    let Response::UpdateAccepted { upload } =
        agent.request(Request::UpdateBegin(begin)).await.unwrap()
    else {
        panic!("begin refused")
    };
    let mut lying = manifest.chunks.clone();
    lying[0].len -= 1;
    let e = agent
        .request(Request::UpdatePage {
            upload,
            page: 0,
            chunks: lying,
        })
        .await
        .expect_err("one hash with two lengths accepted");
    assert_eq!(e.remote_code(), Some(ErrorCode::BadRequest), "{e}");
    let answer = agent
        .request(Request::UpdatePage {
            upload,
            page: 0,
            chunks: manifest.chunks.clone(),
        })
        .await
        .expect("the corrected page is accepted");
    assert_eq!(
        answer,
        Response::Missing(vec![0, 2]),
        "each new chunk reported missing once"
    );
    for d in [&a, &b] {
        let r = agent
            .request(Request::ChunkUpload {
                upload,
                hash: Hash::of(d),
                data: d.clone(),
            })
            .await
            .unwrap();
        assert_eq!(r, Response::Ok);
    }
    let r = agent
        .request(Request::UpdateCommit { upload })
        .await
        .unwrap();
    assert!(matches!(r, Response::Committed { .. }), "{r:?}");
    let (_, back) = agent.retrieve("alice", "s2").await.unwrap();
    assert!(back == data, "the committed UIF came back different");
}

/// A commit refused after its stage was published (here: chunks missing)
/// leaves the upload open; a chunk staged in it afterwards is still
/// reclaimed when the upload ends, so its bytes are not charged to the VM
/// (nor left on disk) until a restart. (Found by the `host_requests` fuzz
/// target.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_staged_after_a_failed_commit_is_reclaimed() {
    let (host, _, agent) = HostProc::with_agent("", "bad", &["alice"]).await;
    let (grant, _) = agent.retrieve("alice", "s1").await.unwrap();
    let l = begin_alice(&agent, grant.version, grant.lease, &noise(300_000, 43))
        .await
        .unwrap();
    assert!(l.missing.len() >= 2, "{} chunks missing", l.missing.len());
    let e = agent
        .request(Request::UpdateCommit { upload: l.upload })
        .await
        .expect_err("a commit with chunks missing");
    assert_eq!(e.remote_code(), Some(ErrorCode::BadRequest), "{e}");
    let c = l.manifest.chunks[l.missing[0]];
    let r = agent
        .request(Request::ChunkUpload {
            upload: l.upload,
            hash: c.hash,
            data: l.bytes[&c.hash].clone(),
        })
        .await
        .unwrap();
    assert_eq!(r, Response::Ok);
    assert_eq!(host.metric("uve_staged_bytes").await, u64::from(c.len));
    let r = agent
        .request(Request::UpdateAbort { upload: l.upload })
        .await
        .unwrap();
    assert_eq!(r, Response::Ok);
    let reclaimed = until_async(Duration::from_secs(10), || async {
        (host.metric("uve_staged_bytes").await == 0).then_some(())
    })
    .await;
    assert!(reclaimed.is_some(), "the chunk's bytes stay charged");
    let stages = std::fs::read_dir(host.data.join("store/staging"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .count();
    assert_eq!(stages, 0, "the stage is left on disk");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_notices_for_another_vms_user_are_refused() {
    use uve_protocol::message::DisconnectNotice;
    let (host, [bad, good]) = HostProc::with_vms("", ["bad", "good"], BAD_AND_GOOD).await;
    let b = host.connect_agent(&good, "good").await;
    b.request(Request::SessionStarted {
        session: valid("bob-1"),
        user: valid("bob"),
        ua: None,
    })
    .await
    .unwrap();
    let a = host.connect_agent(&bad, "bad").await;
    let notice = |id, session: &str, user: &str| {
        Request::UnexpectedDisconnect(DisconnectNotice {
            id,
            session: valid(session),
            user: valid(user),
            ua: None,
            reason: "forged".into(),
            at: 1,
        })
    };
    for (id, session) in [(1, "bob-1"), (2, "other")] {
        let e = a
            .request(notice(id, session, "bob"))
            .await
            .expect_err("forged notice accepted");
        assert_eq!(e.remote_code(), Some(ErrorCode::NotAssigned), "{e}");
    }
    // Nor may it start sessions for bob.
    let e = a
        .request(Request::SessionStarted {
            session: valid("x"),
            user: valid("bob"),
            ua: None,
        })
        .await
        .expect_err("session for another VM's user accepted");
    assert_eq!(e.remote_code(), Some(ErrorCode::NotAssigned), "{e}");
    // Its own user's notice is taken.
    a.request(notice(3, "alice-1", "alice")).await.unwrap();
    let events = host.events().await;
    let disconnects: Vec<_> = events
        .iter()
        .filter(|e| e["kind"] == "unexpected_disconnect")
        .collect();
    assert_eq!(disconnects.len(), 1, "{disconnects:?}");
    assert_eq!(disconnects[0]["user"], "alice");
    let (_, vm) = host.get("/v1/vms/good").await;
    assert_eq!(vm["sessions"][0]["session"], "bob-1", "{vm}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_event_follower_is_told_how_many_it_missed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // No rate bound on new sessions: the 3,000 are the point here.
    let extra = "event_ring = 64\nsession_starts_per_minute = 0";
    let (host, _, agent) = HostProc::with_agent(extra, "vm1", &["alice"]).await;
    // A follower that sends its request and then does not read.
    let mut follower = tokio::net::UnixStream::connect(host.api_socket())
        .await
        .unwrap();
    follower
        .write_all(b"GET /v1/events?since=0&follow=true HTTP/1.1\r\nHost: uve\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // 6,000 events: far more than the socket, the broadcast (1024) and the
    // ring (64) hold between them.
    for i in 0..3_000 {
        let session: SessionId = valid(&format!("s{i}"));
        agent
            .request(Request::SessionStarted {
                session: session.clone(),
                user: valid("alice"),
                ua: None,
            })
            .await
            .unwrap();
        agent
            .request(Request::SessionEnded { session })
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n) = follower.read(&mut buf).await {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&got).contains("\"s2999\"") {
                break;
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("\"kind\":\"lagged\""), "no lagged line");
    assert!(text.contains("\"missed\":"), "no missed count");
    assert!(
        text.contains("\"s2999\""),
        "the follower did not catch up to the last event"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_uploads_expire_and_free_their_slots() {
    use uve_protocol::message::ErrorCode;
    let (host, _, agent) = HostProc::with_agent("upload_idle_ms = 1000", "vm1", &["alice"]).await;
    let (grant, _) = agent.retrieve("alice", "s1").await.unwrap();
    // Four uploads listed and then left alone: every slot is taken.
    let mut listed = Vec::new();
    for seed in 0..4 {
        let data = noise(1 << 20, 20 + seed);
        let l = begin_alice(&agent, grant.version, grant.lease, &data)
            .await
            .unwrap();
        listed.push(l);
    }
    let busy = begin_alice(&agent, grant.version, grant.lease, &noise(1 << 20, 30))
        .await
        .err()
        .expect("a fifth upload was accepted");
    assert_eq!(busy.remote_code(), Some(ErrorCode::Busy), "{busy}");
    let expired = until_async(Duration::from_secs(10), || async {
        let n = host.metric("uve_uploads_expired_total").await;
        (n == 4).then_some(n)
    })
    .await;
    assert!(expired.is_some(), "the idle uploads did not expire");
    let reported = host
        .wait_event("budget_exceeded", |e| e["budget"] == "upload_idle_ms")
        .await;
    assert_eq!(reported["vm"], "vm1", "{reported}");
    let budgets: Vec<_> = host
        .events()
        .await
        .into_iter()
        .filter(|e| e["kind"] == "budget_exceeded")
        .map(|e| e["budget"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        budgets,
        ["max_uploads_per_vm", "upload_idle_ms"],
        "the fifth upload refused, four expiries: one event each budget"
    );
    assert_eq!(host.metric("uve_uploads_refused_total").await, 1);
    let l = &listed[0];
    let i = l.missing[0];
    let e = agent
        .request(Request::ChunkUpload {
            upload: l.upload,
            hash: l.manifest.chunks[i].hash,
            data: l.bytes[&l.manifest.chunks[i].hash].clone(),
        })
        .await
        .expect_err("chunk for an expired upload");
    assert_eq!(e.remote_code(), Some(ErrorCode::NotFound), "{e}");
    // The slots are free again: a whole update goes through.
    let r = agent
        .update_from_lease("alice", &noise(1 << 20, 31))
        .await
        .unwrap();
    assert_committed(&r);
}

/// A host (`extra` config) with VMs vmA and vmB, alice assigned to vmA and
/// an agent connected there: the host, vmA's path and its agent.
async fn alice_on_vm_a(extra: &str) -> (HostProc, PathBuf, TestAgent) {
    let (host, pa, a) = HostProc::with_agent(extra, "vmA", &["alice"]).await;
    host.add_unix_vm("vmB").await;
    (host, pa, a)
}

/// Moves alice to vmB while vmA's agent `a` never answers the release,
/// and waits for the hand-over to fail.
async fn move_alice_from_silent_vm_a(host: &HostProc, a: &TestAgent) {
    on_release(a, "alice", ReleaseMode::Ignore);
    host.assign("alice", "vmB").await;
    host.wait_event("handover_failed", |_| true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_vms_commit_lands_as_a_conflict() {
    let (host, pa, a) = alice_on_vm_a("handover_timeout_ms = 800").await;
    a.retrieve("alice", "s1").await.unwrap();
    let v1 = noise(300_000, 40);
    a.update_from_lease("alice", &v1).await.unwrap();
    a.retrieve("alice", "s2").await.unwrap();
    // Moved to vmB, which has not logged her in yet; vmA never answers.
    move_alice_from_silent_vm_a(&host, &a).await;
    let late = noise(300_000, 41);
    let r = a.update_from_lease("alice", &late).await.unwrap();
    assert_eq!(
        r.answer,
        Response::Conflict {
            kept_as: 2,
            head: Some(1)
        },
        "the evicted VM's commit replaced the head"
    );
    assert!(host.export("alice", 2).await == late, "conflict kept");
    // Unassigning revokes too (vmA not connected: at once).
    host.assign("bob", "vmA").await;
    let (gb, _) = a.retrieve("bob", "b1").await.unwrap();
    a.handle.close();
    host.wait_event("vm_lost", |_| true).await;
    let (s, v) = host.delete("/v1/assignments/bob").await;
    assert_eq!(s, 200, "{v}");
    let leases = host.data.join("leases.json");
    let revoked = until_async(Duration::from_secs(5), || async {
        let text = std::fs::read_to_string(&leases).ok()?;
        let l: serde_json::Value = serde_json::from_str(&text).ok()?;
        (l["users"]["bob"]["vm"] == "").then_some(())
    })
    .await;
    assert!(revoked.is_some(), "bob's lease still names vmA");
    let epoch = gb.lease;
    let a = TestAgent::connect(&pa).await.unwrap();
    let r = a
        .update("bob", "b2", None, epoch, &noise(100_000, 42))
        .await
        .unwrap();
    assert_eq!(
        r.answer,
        Response::Conflict {
            kept_as: 1,
            head: None
        },
        "a commit with a revoked lease became head"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_vms_conflicts_are_rate_limited() {
    // 12 per hour: a burst of one, then one every five minutes.
    let extra = "handover_timeout_ms = 500\nconflict_updates_per_hour = 12";
    let (host, _, a) = alice_on_vm_a(extra).await;
    a.retrieve("alice", "s1").await.unwrap();
    move_alice_from_silent_vm_a(&host, &a).await;
    let first = a
        .update_from_lease("alice", &noise(100_000, 50))
        .await
        .unwrap();
    assert!(
        matches!(first.answer, Response::Conflict { head: None, .. }),
        "{:?}",
        first.answer
    );
    for _ in 0..3 {
        let e = a
            .update_from_lease("alice", &noise(100_000, 51))
            .await
            .expect_err("a second conflict within the burst");
        assert_eq!(e.remote_code(), Some(ErrorCode::Busy), "{e}");
    }
    let hit = host
        .wait_event("budget_exceeded", |e| {
            e["budget"] == "conflict_updates_per_hour"
        })
        .await;
    assert_eq!(hit["vm"], "vmA");
    assert_eq!(hit["user"], "alice");
    let reported = host.count_events("budget_exceeded").await;
    assert_eq!(reported, 1, "one event per run of refusals, not per retry");
    assert_eq!(host.metric("uve_conflict_updates_refused_total").await, 3);
    let (_, v) = host.get("/v1/users/alice/versions").await;
    assert_eq!(v["versions"].as_array().map(Vec::len), Some(1), "{v}");
    // The VM she moved to is not limited: it holds the lease.
    let b = host.connect_agent(&host.data.join("vmB.sock"), "vmB").await;
    b.retrieve("alice", "s2").await.unwrap();
    let r = b
        .update_from_lease("alice", &noise(100_000, 52))
        .await
        .unwrap();
    assert_committed(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_holder_cannot_claim_a_base_it_was_not_granted() {
    let (host, _, a) = HostProc::with_agent("", "vmA", &["alice"]).await;
    let (g, _) = a.retrieve("alice", "s1").await.unwrap();
    assert_eq!(g.version, None);
    // An operator imports v1 while she is logged in; the VM never saw it
    // but claims it as its base, with its current lease.
    let imported = noise(100_000, 60);
    let ans = host
        .api
        .call(
            Method::POST,
            "/v1/users/alice/import",
            uve_host::api::client::bytes(imported.clone()),
        )
        .await
        .unwrap();
    assert_eq!(ans.status.as_u16(), 200, "{:?}", ans.json());
    let claimed = a
        .update("alice", "s1", Some(1), g.lease, &noise(100_000, 61))
        .await
        .unwrap();
    assert_eq!(
        claimed.answer,
        Response::Conflict {
            kept_as: 2,
            head: Some(1)
        },
        "an update on a base it was not granted became head"
    );
    // Granted v1 now: checkpoints chain on what it committed since.
    let (g, _) = a.retrieve("alice", "s1").await.unwrap();
    assert_eq!(g.version, Some(1));
    let mut base = Some(1);
    for seed in 62..65 {
        let r = a
            .update("alice", "s1", base, g.lease, &noise(100_000, seed))
            .await
            .unwrap();
        let Response::Committed { version } = r.answer else {
            panic!("a checkpoint on its own commit: {:?}", r.answer);
        };
        base = Some(version);
    }
    assert!(host.export("alice", base.unwrap()).await == noise(100_000, 64));
}
