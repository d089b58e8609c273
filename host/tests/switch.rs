//! VM switch hand-over against the real daemon: the old VM is asked to
//! release the user; the new VM's retrieve waits for its commit, or gets
//! the last committed head with `handover_timed_out` when the old VM stays
//! silent. A late update from the old VM is fenced into a conflict version.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;

use common::{HostProc, ReleaseMode, TestAgent, Updated, noise, on_release};
use hyper::Method;
use serde_json::json;
use uve_e2e::names::valid;
use uve_protocol::message::Response;

/// A host (`extra` config) with VMs vmA and vmB (on hybrid vsock if
/// `hybrid_b`), alice assigned to vmA, whose agent retrieved and then
/// committed `v1` for her: the host, vmA's agent, vmB's path and the
/// answer to the update.
async fn alice_committed_on_a(
    extra: &str,
    hybrid_b: bool,
    v1: &[u8],
) -> (HostProc, TestAgent, PathBuf, Updated) {
    let host = HostProc::temp(extra).await;
    let pa = host.add_unix_vm("vmA").await;
    let pb = if hybrid_b {
        host.add_hybrid_vm("vmB").await
    } else {
        host.add_unix_vm("vmB").await
    };
    host.assign("alice", "vmA").await;
    let a = TestAgent::connect(&pa).await.unwrap();
    a.retrieve("alice", "s1").await.unwrap();
    let r = a.update_from_lease("alice", v1).await.unwrap();
    (host, a, pb, r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_waits_for_the_old_vm_commit() {
    let v1 = noise(700_000, 10);
    let (host, a, pb, r) = alice_committed_on_a("", true, &v1).await;
    let b = TestAgent::connect(&pb).await.unwrap();
    assert_eq!(r.answer, Response::Committed { version: 1 });
    let flushed = noise(700_000, 11);
    on_release(&a, "alice", ReleaseMode::Flush(flushed.clone()));
    let (s, v) = host
        .call(Method::PUT, "/v1/assignments/alice", json!({"vm": "vmB"}))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["release_requested_from"], "vmA");
    let (g, data) = b.retrieve("alice", "s2").await.unwrap();
    assert_eq!(g.version, Some(2), "B waited for A's flush");
    assert!(!g.handover_timed_out);
    assert!(data == flushed);
    host.wait_event("user_released", |e| e["vm"] == "vmA").await;
    // A's late update (stale lease) can never become head
    let late = a
        .update_from_lease("alice", &noise(1000, 12))
        .await
        .unwrap();
    assert!(
        matches!(late.answer, Response::Conflict { head: Some(2), .. }),
        "{:?}",
        late.answer
    );
    assert_eq!(host.versions("alice").await["head"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_with_silent_old_vm_times_out_and_serves_last_head() {
    let v1 = noise(300_000, 13);
    let (host, a, pb, _) = alice_committed_on_a("handover_timeout_ms = 1500", false, &v1).await;
    let b = TestAgent::connect(&pb).await.unwrap();
    on_release(&a, "alice", ReleaseMode::Ignore);
    host.assign("alice", "vmB").await;
    let (g, data) = b.retrieve("alice", "s2").await.unwrap();
    assert_eq!(g.version, Some(1));
    assert!(g.handover_timed_out);
    assert!(data == v1);
    let ev = host.wait_event("handover_timeout", |_| true).await;
    assert_eq!(ev["user"], "alice");
    assert_eq!(ev["vm"], "vmB");
    // B works on; A's late flush lands as a conflict, B's commit is head
    let rb = b
        .update_from_lease("alice", &noise(300_000, 14))
        .await
        .unwrap();
    assert_eq!(rb.answer, Response::Committed { version: 2 });
    let ra = a
        .update_from_lease("alice", &noise(300_000, 15))
        .await
        .unwrap();
    assert_eq!(
        ra.answer,
        Response::Conflict {
            kept_as: 3,
            head: Some(2)
        }
    );
    assert!(
        host.export("alice", 3).await == noise(300_000, 15),
        "conflict kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_away_from_a_lost_vm_flags_the_retrieve() {
    let v1 = noise(200_000, 16);
    let (host, a, pb, _) = alice_committed_on_a("", false, &v1).await;
    host.assign("bob", "vmA").await;
    a.retrieve("alice", "s1").await.unwrap();
    let started = uve_protocol::message::Request::SessionStarted {
        session: valid("s1"),
        user: valid("alice"),
        ua: None,
    };
    a.request(started).await.unwrap();
    // bob logged out properly on vmA long ago: no session open
    a.retrieve("bob", "s0").await.unwrap();
    a.handle.close();
    host.wait_event("vm_lost", |_| true).await;
    host.assign("alice", "vmB").await;
    host.assign("bob", "vmB").await;
    let b = TestAgent::connect(&pb).await.unwrap();
    let (g, data) = b.retrieve("alice", "s2").await.unwrap();
    assert_eq!(g.version, Some(1));
    assert!(g.handover_timed_out, "alice's session died with vmA");
    assert!(data == v1);
    let (g, _) = b.retrieve("bob", "s3").await.unwrap();
    assert!(!g.handover_timed_out, "bob had nothing open on vmA");
}

/// Removing a VM asks it first, as unassign does: alice is unassigned, the
/// VM flushes her last changes while releasing her, and they become head
/// before the VM is gone. With `force`, a VM goes at once and the event
/// says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_vm_asks_it_to_release_its_users_first() {
    let v1 = noise(300_000, 20);
    let (host, a, pb, r) = alice_committed_on_a("", false, &v1).await;
    assert_eq!(r.answer, Response::Committed { version: 1 });
    let flushed = noise(300_000, 21);
    on_release(&a, "alice", ReleaseMode::Flush(flushed.clone()));
    let (s, v) = host.delete("/v1/vms/vmA").await;
    assert_eq!(s, 204, "{v}");
    // Done by the time the removal answered: released, committed, gone.
    assert_eq!(host.versions("alice").await["head"], 2, "the flush is head");
    assert!(host.export("alice", 2).await == flushed);
    host.wait_event("user_released", |e| {
        e["vm"] == "vmA" && e["user"] == "alice"
    })
    .await;
    let ev = host
        .wait_event("vm_unregistered", |e| e["vm"] == "vmA")
        .await;
    assert!(ev.get("forced").is_none(), "{ev}");
    let (s, v) = host.get("/v1/assignments").await;
    assert_eq!(s, 200);
    assert!(
        !v.to_string().contains("alice"),
        "alice still assigned: {v}"
    );
    let (s, _) = host.get("/v1/vms/vmA").await;
    assert_eq!(s, 404);
    // A late update of the removed VM's agent can never become head.
    let _ = a.update_from_lease("alice", &noise(1000, 22)).await;
    assert_eq!(host.versions("alice").await["head"], 2);

    // Forced: at once, no release asked, and the event says so.
    host.assign("bob", "vmB").await;
    let b = TestAgent::connect(&pb).await.unwrap();
    b.retrieve("bob", "s9").await.unwrap();
    on_release(&b, "bob", ReleaseMode::Ignore);
    let (s, v) = host.delete("/v1/vms/vmB?force=true").await;
    assert_eq!(s, 204, "{v}");
    let ev = host
        .wait_event("vm_unregistered", |e| e["vm"] == "vmB")
        .await;
    assert_eq!(ev["forced"], true, "{ev}");
    let asked_b = host
        .events()
        .await
        .iter()
        .filter(|e| e["kind"] == "user_released" || e["kind"] == "handover_failed")
        .filter(|e| e["vm"] == "vmB")
        .count();
    assert_eq!(asked_b, 0, "a forced removal asks nothing");
}
