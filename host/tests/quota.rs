//! The quota over what a user holds, against the real daemon: unique bytes
//! of head and history plus the user's own uploads in flight never pass
//! it across many logouts of fresh content; an update that would is
//! refused (final `QuotaExceeded`) while its pages are listed, before its
//! bytes are sent; the operator's way out (what the user holds, deleting
//! an old version, a per-user override) works through the API; a VM
//! without the lease is held to its own conflict bound and never makes
//! the lease holder's logout fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{HostProc, ReleaseMode, TestAgent, assert_committed, begin_alice, noise, on_release};
use hyper::Method;
use serde_json::{Value, json};
use uve_protocol::message::{ErrorCode, Request, Response};

const MIB: u64 = 1 << 20;
/// Bytes of one logout's fresh content.
const LOGOUT: usize = 3 << 20;

/// What `GET /v1/users/alice` says (which must succeed).
async fn alice(host: &HostProc) -> Value {
    let (s, v) = host.get("/v1/users/alice").await;
    assert_eq!(s, 200, "{v}");
    v
}

fn held(v: &Value) -> u64 {
    v["held_bytes"].as_u64().unwrap()
}

/// A logout of 3 MiB of fresh content: committed, or refused with the
/// error's code and message.
async fn logout(a: &TestAgent, seed: u64) -> Result<(), (Option<ErrorCode>, String)> {
    let data = noise(LOGOUT, seed);
    match a.update_from_lease("alice", &data).await {
        Ok(r) => {
            assert_committed(&r);
            Ok(())
        }
        Err(e) => Err((e.remote_code(), e.to_string())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_logouts_of_fresh_content_never_exceed_the_quota() {
    let quota = 8 * MIB;
    let (host, _, a) =
        HostProc::with_agent(&format!("user_quota_bytes = {quota}"), "vm1", &["alice"]).await;
    a.retrieve("alice", "s1").await.unwrap();
    let mut refusals = 0;
    for seed in 0..12 {
        let uploaded = host.metric("uve_chunks_uploaded_total").await;
        match logout(&a, 100 + seed).await {
            Ok(()) => assert!(seed < 2, "logout {seed} committed past the quota"),
            Err((code, msg)) => {
                assert!(seed >= 2, "logout {seed} refused within the quota: {msg}");
                assert_eq!(code, Some(ErrorCode::QuotaExceeded), "{msg}");
                for hint in [
                    "uvectl user show alice",
                    "uvectl user rm-version alice",
                    "uvectl user quota alice",
                ] {
                    assert!(
                        msg.contains(hint),
                        "the refusal does not name {hint:?}: {msg}"
                    );
                }
                assert_eq!(
                    host.metric("uve_chunks_uploaded_total").await,
                    uploaded,
                    "a refused update's chunks were sent"
                );
                refusals += 1;
            }
        }
        let v = alice(&host).await;
        assert!(held(&v) <= quota, "alice holds {} > {quota}: {v}", held(&v));
        assert_eq!(v["in_flight_bytes"], 0, "{v}");
    }
    assert_eq!(refusals, 10);
    assert_eq!(host.metric("uve_quota_refused_total").await, 10);
    let refused = host
        .wait_event("update_refused", |e| e["code"] == "QuotaExceeded")
        .await;
    assert_eq!(refused["user"], "alice");
    the_way_out(host, &a, quota).await;
}

/// The operator's way out once alice (v1, v2 of 3 MiB) is at her `quota`
/// of 8 MiB.
async fn the_way_out(host: HostProc, a: &TestAgent, quota: u64) {
    // The head cannot go, an old version can.
    let (s, v) = host.delete("/v1/users/alice/versions/2").await;
    assert_eq!((s, &v["error"]), (409, &json!("conflict")), "{v}");
    let (s, v) = host.delete("/v1/users/alice/versions/1").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(held(&alice(&host).await), 3 * MIB);
    logout(a, 200).await.expect("room made by deleting v1");

    // A per-user override, kept in the store: raised, then cleared.
    let (s, v) = host
        .call(
            Method::PUT,
            "/v1/users/alice/quota",
            json!({"quota_bytes": 64 * MIB}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["quota_override"], 64 * MIB);
    for seed in 0..4 {
        logout(a, 300 + seed)
            .await
            .expect("within the raised quota");
    }
    let v = alice(&host).await;
    assert_eq!(held(&v), 6 * 3 * MIB, "{v}");
    let (s, v) = host
        .call(
            Method::PUT,
            "/v1/users/alice/quota",
            json!({"quota_bytes": null}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (v["quota_bytes"].as_u64(), &v["quota_override"]),
        (Some(quota), &Value::Null)
    );
    let (code, _) = logout(a, 400).await.expect_err("over the default again");
    assert_eq!(code, Some(ErrorCode::QuotaExceeded));
    // The same through uvectl; the override survives a restart (it is in
    // the store).
    let (rc, out) = host.uvectl(&["user", "quota", "alice", "64MiB"]);
    assert_eq!(rc, 0, "{out}");
    let mut host = host;
    host.terminate();
    host.spawn().await;
    assert_eq!(alice(&host).await["quota_bytes"], 64 * MIB);
    let shown = host.uvectl_human(&["user", "show", "alice"]);
    assert!(shown.contains("of 64.0 MiB (override)"), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_quota_prunes_history_old_versions_make_room() {
    let quota = 8 * MIB;
    let extra = format!("user_quota_bytes = {quota}\nquota_prunes_history = true");
    let (host, _, a) = HostProc::with_agent(&extra, "vm1", &["alice"]).await;
    a.retrieve("alice", "s1").await.unwrap();
    for seed in 0..6 {
        logout(&a, 500 + seed)
            .await
            .expect("history dropped for room");
        let v = alice(&host).await;
        assert!(held(&v) <= quota, "{v}");
    }
    let versions = host.versions("alice").await;
    let kept: Vec<u64> = versions["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_u64().unwrap())
        .collect();
    assert_eq!(kept, vec![5, 6], "the newest two of 3 MiB fit in 8 MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_users_own_uploads_in_flight_count_together() {
    let quota = 8 * MIB;
    let (host, _, a) =
        HostProc::with_agent(&format!("user_quota_bytes = {quota}"), "vm1", &["alice"]).await;
    let (g, _) = a.retrieve("alice", "s1").await.unwrap();
    logout(&a, 600).await.unwrap();
    let base = host.versions("alice").await["head"].as_u64();
    // Two uploads of 3 MiB each beside the 3 MiB head: each fits alone,
    // not together.
    let first = begin_alice(&a, base, g.lease, &noise(LOGOUT, 601))
        .await
        .expect("the first fits");
    assert_eq!(alice(&host).await["in_flight_bytes"], 3 * MIB);
    let Err(e) = begin_alice(&a, base, g.lease, &noise(LOGOUT, 602)).await else {
        panic!("the second fits only alone");
    };
    assert_eq!(e.remote_code(), Some(ErrorCode::QuotaExceeded), "{e}");
    a.request(Request::UpdateAbort {
        upload: first.upload,
    })
    .await
    .unwrap();
    let freed = uve_e2e::poll::until_async(Duration::from_secs(5), || async {
        (alice(&host).await["in_flight_bytes"] == 0).then_some(())
    })
    .await;
    assert!(freed.is_some(), "an aborted upload still charges the quota");
    begin_alice(&a, base, g.lease, &noise(LOGOUT, 603))
        .await
        .expect("room again once the first went");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_vms_conflicts_have_their_own_bound() {
    let extra = "handover_timeout_ms = 500\nconflict_updates_per_hour = 0\n\
                 user_quota_bytes = 1000000\nconflict_quota_bytes = 700000";
    let (host, _, a) = HostProc::with_agent(extra, "vmA", &["alice"]).await;
    host.add_unix_vm("vmB").await;
    a.retrieve("alice", "s1").await.unwrap();
    assert_committed(
        &a.update_from_lease("alice", &noise(300_000, 700))
            .await
            .unwrap(),
    );
    // Moved to vmB; vmA never answers the release and keeps writing.
    on_release(&a, "alice", ReleaseMode::Ignore);
    host.assign("alice", "vmB").await;
    host.wait_event("handover_failed", |_| true).await;
    for seed in 0..2 {
        let r = a
            .update_from_lease("alice", &noise(300_000, 710 + seed))
            .await
            .unwrap();
        assert!(
            matches!(r.answer, Response::Conflict { .. }),
            "{:?}",
            r.answer
        );
    }
    let e = a
        .update_from_lease("alice", &noise(300_000, 720))
        .await
        .expect_err("a third conflict of 300 kB passes 700 kB");
    assert_eq!(e.remote_code(), Some(ErrorCode::QuotaExceeded), "{e}");
    assert!(
        e.to_string().contains("conflict versions from vm:vmA"),
        "{e}"
    );
    assert_eq!(host.metric("uve_conflict_quota_refused_total").await, 1);
    assert_eq!(host.metric("uve_quota_refused_total").await, 0);
    let v = alice(&host).await;
    assert_eq!(v["conflicts"][0]["origin"], "vm:vmA", "{v}");
    assert_eq!(v["conflicts"][0]["held_bytes"], 600_000, "{v}");
    // The lease holder commits: vmA's 600 kB count for nothing against
    // alice's 1 MB (300 kB head + 300 kB new).
    let b = host.connect_agent(&host.data.join("vmB.sock"), "vmB").await;
    b.retrieve("alice", "s2").await.unwrap();
    assert_committed(
        &b.update_from_lease("alice", &noise(300_000, 730))
            .await
            .unwrap(),
    );
    assert_eq!(held(&alice(&host).await), 600_000);
}
