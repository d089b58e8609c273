//! UVE-5 against the real daemon: retrieve/update round trips over a
//! hybrid-vsock listener path and a plain Unix listener, incremental
//! updates, CAS conflicts, refusals, and disconnect events.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

mod common;

use common::{HostProc, TestAgent, listed, noise};
use hyper::Method;
use serde_json::json;
use uve_e2e::names::valid;
use uve_protocol::manifest::{Hash, ManifestHeader};
use uve_protocol::message::{
    DisconnectNotice, ErrorCode, Request, Response, UpdateBegin, UpdateCause,
};

fn code(e: &uve_protocol::link::LinkError) -> Option<ErrorCode> {
    e.remote_code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_is_byte_identical_over_hybrid_and_unix() {
    let host = HostProc::temp("").await;
    let hybrid = host.add_hybrid_vm("fc1").await;
    assert!(hybrid.to_string_lossy().ends_with("fc1.vsock_7075"));
    let unix = host.add_unix_vm("t1").await;
    host.assign("alice", "fc1").await;
    host.assign("bob", "t1").await;
    for (path, user, vm, seed) in [(&hybrid, "alice", "fc1", 1), (&unix, "bob", "t1", 2)] {
        let agent = TestAgent::connect(path).await.unwrap();
        assert_eq!(agent.welcome.vm_id, vm, "VM bound by the listener");
        let (g, empty) = agent.retrieve(user, "s1").await.unwrap();
        assert_eq!((g.version, empty.len()), (None, 0));
        let data = noise(3 << 20, seed);
        let r = agent.update_from_lease(user, &data).await.unwrap();
        assert_eq!(r.answer, Response::Committed { version: 1 });
        let (g, back) = agent.retrieve(user, "s2").await.unwrap();
        assert_eq!(g.version, Some(1));
        assert!(!g.handover_timed_out);
        assert!(back == data, "retrieved bytes differ");
        assert!(host.export(user, 1).await == data, "exported bytes differ");
    }
    let (_, vm) = host.get("/v1/vms/fc1").await; // installed: it served requests
    assert_eq!(vm["connected"], true);
    assert_eq!(vm["connection"]["agent_version"], "test-agent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_update_sends_only_changed_chunks() {
    let (host, _, agent) = HostProc::with_agent("", "vm1", &["alice"]).await;
    agent.retrieve("alice", "s1").await.unwrap();
    let mut data = noise(8 << 20, 3);
    let first = agent.update_from_lease("alice", &data).await.unwrap();
    let total = first.missing;
    assert!(total > 50, "first upload sends everything ({total})");
    // change 4 KiB in the middle
    data[4 << 20..(4 << 20) + 4096].copy_from_slice(&noise(4096, 99));
    let second = agent.update_from_lease("alice", &data).await.unwrap();
    assert_eq!(second.answer, Response::Committed { version: 2 });
    assert!(
        (1..=3).contains(&second.missing),
        "{} of {total} chunks resent",
        second.missing
    );
    let fetched_before = host
        .metric("uve_user_chunks_fetched_total{user=\"alice\"}")
        .await;
    let (_, back) = agent.retrieve("alice", "s2").await.unwrap();
    assert!(back == data);
    let fetched = host
        .metric("uve_user_chunks_fetched_total{user=\"alice\"}")
        .await;
    assert!(fetched > fetched_before);
    let commit = host.wait_event("commit", |e| e["version"] == 2).await;
    assert_eq!(commit["chunks_uploaded"], json!(second.missing));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cas_conflict_keeps_both_versions() {
    let (host, _, agent) = HostProc::with_agent("", "vm1", &["alice"]).await;
    let (g, _) = agent.retrieve("alice", "s1").await.unwrap();
    let a = noise(500_000, 4);
    let b = noise(600_000, 5);
    let ra = agent
        .update("alice", "s1", None, g.lease, &a)
        .await
        .unwrap();
    assert_eq!(ra.answer, Response::Committed { version: 1 });
    // same stale base: kept as a conflict version
    let rb = agent
        .update("alice", "s1", None, g.lease, &b)
        .await
        .unwrap();
    assert_eq!(
        rb.answer,
        Response::Conflict {
            kept_as: 2,
            head: Some(1)
        }
    );
    // a session that never retrieved (base None, lease 0) can never win
    let rc = agent.update("alice", "s9", None, 0, &b).await.unwrap();
    assert!(matches!(rc.answer, Response::Conflict { kept_as: 3, .. }));
    let v = host.versions("alice").await;
    assert_eq!(v["head"], 1);
    assert_eq!(
        listed(&v, "kind"),
        vec![
            (1, "committed".to_string()),
            (2, "conflict".to_string()),
            (3, "conflict".to_string())
        ]
    );
    assert!(host.export("alice", 1).await == a);
    assert!(host.export("alice", 2).await == b);
    host.wait_event("conflict", |e| e["kept_as"] == 2).await;
    assert_eq!(host.metric("uve_conflicts_total").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_redelivered_after_its_commit_is_answered_as_that_commit() {
    // The agent crashed after the host committed and before it recorded
    // the answer: its spool sends the same bytes from the same base again.
    let (host, _, agent) = HostProc::with_agent("", "vm1", &["alice"]).await;
    let (g, _) = agent.retrieve("alice", "s1").await.unwrap();
    let a = noise(400_000, 6);
    let first = agent
        .update("alice", "s1", None, g.lease, &a)
        .await
        .unwrap();
    assert_eq!(first.answer, Response::Committed { version: 1 });
    let again = agent
        .update("alice", "s1", None, g.lease, &a)
        .await
        .unwrap();
    assert_eq!(again.answer, Response::Committed { version: 1 });
    let v = host.versions("alice").await;
    assert_eq!(listed(&v, "kind"), vec![(1, "committed".to_string())]);
    assert_eq!(host.metric("uve_conflicts_total").await, 0);
    assert_eq!(host.metric("uve_commits_total").await, 1, "one commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unassigned_user_is_refused_and_nothing_is_read() {
    let (host, [p1, p2]) = HostProc::with_vms("", ["vm1", "vm2"], &[("alice", "vm1")]).await;
    let owner = TestAgent::connect(&p1).await.unwrap();
    owner.retrieve("alice", "s1").await.unwrap();
    let data = noise(400_000, 6);
    owner.update_from_lease("alice", &data).await.unwrap();
    let (_, _) = owner.retrieve("alice", "s2").await.unwrap();
    let head_chunk = {
        let (m, _) = common::manifest_of(&data);
        m.chunks[0].hash
    };
    let fetched = host.metric("uve_chunks_fetched_total").await;

    let intruder = TestAgent::connect(&p2).await.unwrap();
    let e = intruder.retrieve("alice", "x").await.unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::NotAssigned));
    for r in [
        Request::ManifestPage {
            user: valid("alice"),
            version: 1,
            page: 0,
        },
        Request::ChunkFetch {
            user: valid("alice"),
            hash: head_chunk,
        },
    ] {
        let e = intruder.request(r).await.unwrap_err();
        assert_eq!(code(&e), Some(ErrorCode::NotAssigned));
    }
    let e = intruder
        .update("alice", "x", Some(1), 0, b"evil")
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::NotAssigned));
    assert_eq!(host.metric("uve_chunks_fetched_total").await, fetched);
    assert_eq!(host.versions("alice").await["head"], 1);

    // the owner may fetch only chunks of manifests served to it
    let e = owner
        .request(Request::ChunkFetch {
            user: valid("alice"),
            hash: Hash::of(b"not in any served manifest"),
        })
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::NotFound));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_names_and_oversized_sizes_are_refused() {
    // The quota counts unique bytes, which only the pages show: it is
    // tested in quota.rs.
    let extra = "max_uif_size = 10000000";
    let (host, _, agent) = HostProc::with_agent(extra, "vm1", &["alice"]).await;
    for bad in ["../etc", ".hidden", "a/b", "", "-rf", "x y"] {
        let e = agent.retrieve(bad, "s1").await.unwrap_err();
        assert_eq!(code(&e), Some(ErrorCode::InvalidName), "{bad:?}");
    }
    let e = agent.retrieve("alice", "../s").await.unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::InvalidName));
    let (g, _) = agent.retrieve("alice", "s1").await.unwrap();
    let begin = |size: u64, chunk_count: u32| alice_begin(g.lease, size, chunk_count);
    let cases = [
        (u64::MAX, u32::MAX, ErrorCode::TooLarge),
        (20_000_000, 100, ErrorCode::TooLarge),
        (100, 1000, ErrorCode::BadRequest),
        (4_000_000, 1, ErrorCode::BadRequest),
    ];
    for (size, count, want) in cases {
        let e = agent.request(begin(size, count)).await.unwrap_err();
        assert_eq!(code(&e), Some(want), "size {size} count {count}");
    }
    bad_pages_chunks_and_digests_are_refused(&agent, begin(10, 1)).await;
    assert_eq!(
        host.versions("alice").await["head"],
        serde_json::Value::Null
    );
    // a hostile VM id or user in the API is refused as well
    let (s, _) = host
        .call(
            Method::POST,
            "/v1/vms",
            json!({"id": "../x", "unix": "/tmp/x"}),
        )
        .await;
    assert_eq!(s, 400);
    let (s, _) = host.get("/v1/users/..%2Fetc/versions").await;
    assert_eq!(s, 400);
}

/// An `UpdateBegin` of alice with no base and a bogus digest.
fn alice_begin(lease: u64, size: u64, chunk_count: u32) -> Request {
    Request::UpdateBegin(UpdateBegin {
        user: valid("alice"),
        session: valid("s1"),
        base: None,
        lease,
        header: ManifestHeader {
            size,
            digest: Hash([0; 32]),
            chunk_count,
        },
        cause: UpdateCause::Logout,
    })
}

/// After `begin` (one chunk of 10 bytes announced): a page with more
/// chunks than announced, a chunk with a wrong hash, and a commit with the
/// bogus digest announced in the header are refused.
async fn bad_pages_chunks_and_digests_are_refused(agent: &TestAgent, begin: Request) {
    // a page with more chunks than announced, and a chunk with a wrong hash
    let upload = match agent.request(begin).await.unwrap() {
        Response::UpdateAccepted { upload } => upload,
        other => panic!("{other:?}"),
    };
    let c = uve_protocol::ChunkRef {
        hash: Hash::of(b"0123456789"),
        len: 10,
    };
    let e = agent
        .request(Request::UpdatePage {
            upload,
            page: 0,
            chunks: vec![c, c],
        })
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::TooLarge));
    agent
        .request(Request::UpdatePage {
            upload,
            page: 0,
            chunks: vec![c],
        })
        .await
        .unwrap();
    let chunk = |data: &[u8]| Request::ChunkUpload {
        upload,
        hash: c.hash,
        data: data.to_vec(),
    };
    let e = agent.request(chunk(b"0123456780")).await.unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::BadChunk));
    // commit with the bogus digest announced in the header
    agent.request(chunk(b"0123456789")).await.unwrap();
    let e = agent
        .request(Request::UpdateCommit { upload })
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::BadDigest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_notices_are_deduplicated_and_dropped_links_reported() {
    let (host, _, agent) = HostProc::with_agent("", "vm1", &["alice", "bob"]).await;
    for (s, u) in [("s1", "alice"), ("s2", "bob")] {
        let r = Request::SessionStarted {
            session: valid(s),
            user: valid(u),
            ua: Some(valid("desk")),
        };
        assert_eq!(agent.request(r.clone()).await.unwrap(), Response::Ok);
        assert_eq!(agent.request(r).await.unwrap(), Response::Ok);
    }
    let (_, sessions) = host.get("/v1/sessions").await;
    assert_eq!(sessions.as_array().unwrap().len(), 2);
    let notice = DisconnectNotice {
        id: 42,
        session: valid("s1"),
        user: valid("alice"),
        ua: Some(valid("desk")),
        reason: "UA exited with signal 9".into(),
        at: 1,
    };
    for _ in 0..3 {
        let r = Request::UnexpectedDisconnect(notice.clone());
        assert_eq!(agent.request(r).await.unwrap(), Response::Ok);
    }
    let count = |evs: &[serde_json::Value]| {
        evs.iter()
            .filter(|e| e["kind"] == "unexpected_disconnect" && e["source"] == "agent")
            .count()
    };
    assert_eq!(count(&host.events().await), 1);
    // drop the connection without Goodbye: bob's session is reported
    agent.handle.close();
    let e = host
        .wait_event("unexpected_disconnect", |e| e["source"] == "host")
        .await;
    assert_eq!(
        (e["session"].as_str(), e["user"].as_str()),
        (Some("s2"), Some("bob"))
    );
    host.wait_event("vm_lost", |e| e["vm"] == "vm1").await;
    let (_, vm) = host.get("/v1/vms/vm1").await;
    assert_eq!(vm["connected"], false);
    assert_eq!(count(&host.events().await), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connection_replaces_old_one() {
    let host = HostProc::temp("").await;
    let path = host.add_unix_vm("vm1").await;
    let first = TestAgent::connect(&path).await.unwrap();
    let second = TestAgent::connect(&path).await.unwrap();
    first.handle.closed().await;
    assert_eq!(
        second.request(Request::Ping { nonce: 5 }).await.unwrap(),
        Response::Pong { nonce: 5 }
    );
    let connected = uve_e2e::poll::until_async(std::time::Duration::from_secs(10), || async {
        let (_, v) = host.get("/v1/vms/vm1").await;
        (v["connected"] == true).then_some(())
    })
    .await;
    assert!(connected.is_some());
    let (s, v) = host.call(Method::POST, "/v1/vms/vm1/ping", json!({})).await;
    assert_eq!((s, v["pong"].as_bool()), (200, Some(true)));
    // a UVE-2 request sent to the host is answered Unsupported
    let e = second.request(Request::AgentStatus).await.unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::Unsupported));
    let lost = host.count_events("vm_lost").await;
    assert_eq!(lost, 0, "a replaced connection is not a lost VM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_uif_round_trips_and_gc_keeps_live_chunks() {
    let (host, _, agent) = HostProc::with_agent("", "vm1", &["alice"]).await;
    agent.retrieve("alice", "s1").await.unwrap();
    let data = noise(900_000, 50);
    agent.update_from_lease("alice", &data).await.unwrap();
    let r = agent.update_from_lease("alice", b"").await.unwrap();
    assert_eq!(r.answer, Response::Committed { version: 2 });
    let (g, back) = agent.retrieve("alice", "s2").await.unwrap();
    assert_eq!((g.version, back.len()), (Some(2), 0));
    // version 1 is still retained: a zero-grace GC must not touch its chunks
    let (s, report) = host
        .call(Method::POST, "/v1/gc?grace_secs=0", json!({}))
        .await;
    assert_eq!(s, 200);
    assert_eq!(report["deleted"], 0, "{report}");
    assert!(host.export("alice", 1).await == data);
}
