//! Operator evidence no VM can erase, and every budget visible, against the
//! real daemon with hostile peers: a VM flooding disconnect notices cannot
//! push another VM's `update_refused` and `conflict` events out of what
//! `GET /v1/events` serves, neither live nor after a clean restart or a
//! crash (the durable journal), and sequence numbers continue across both;
//! the notice and session rate bounds answer `Busy`, and each budget's
//! refusal or cut-off increments its metric and is reported once as a
//! `budget_exceeded` event naming the VM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{HostProc, TestAgent, noise};
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use uve_e2e::names::valid;
use uve_e2e::poll::until_async;
use uve_e2e::raw_peer::RawPeer;
use uve_protocol::message::{DisconnectNotice, ErrorCode, Request, Response};

/// bob on the good VM, mallory on the flooding one.
const GOOD_AND_FLOOD: &[(&str, &str)] = &[("bob", "good"), ("mallory", "flood")];

/// An `UnexpectedDisconnect` of mallory's with notice id `id`.
fn notice(id: u64) -> Request {
    Request::UnexpectedDisconnect(DisconnectNotice {
        id,
        session: valid(&format!("m{id}")),
        user: valid("mallory"),
        ua: None,
        reason: "flood".into(),
        at: id,
    })
}

/// The good VM's evidence: bob's logout over the quota (refused for good:
/// `update_refused`) and an update under a stale lease (`conflict`).
async fn good_vm_evidence(host: &HostProc, good: &Path) {
    let g = host.connect_agent(good, "good").await;
    let (first, _) = g.retrieve("bob", "g1").await.unwrap();
    let e = g
        .update_from_lease("bob", &noise(2 << 20, 1))
        .await
        .expect_err("an update over the quota was taken");
    assert_eq!(e.remote_code(), Some(ErrorCode::QuotaExceeded), "{e}");
    g.retrieve("bob", "g2").await.unwrap();
    let r = g
        .update("bob", "g1", first.version, first.lease, &noise(100_000, 2))
        .await
        .unwrap();
    assert!(
        matches!(r.answer, Response::Conflict { .. }),
        "{:?}",
        r.answer
    );
    host.wait_event("conflict", |e| e["vm"] == "good").await;
}

/// Asserts the operator reads the good VM's evidence through the API;
/// returns the highest sequence number served.
async fn assert_evidence_listed(host: &HostProc, when: &str) -> u64 {
    let events = host.events().await;
    let has = |kind: &str| {
        events
            .iter()
            .any(|e| e["kind"] == kind && e["vm"] == "good" && e["user"] == "bob")
    };
    assert!(
        has("update_refused"),
        "{when}: bob's update_refused is gone"
    );
    assert!(has("conflict"), "{when}: bob's conflict is gone");
    let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "{when}: sequence numbers out of order"
    );
    seqs.last().copied().unwrap_or(0)
}

/// `count` notices from the flooding VM, ids from `first`, every one taken.
async fn flood(agent: &TestAgent, first: u64, count: u64) {
    for id in first..first + count {
        let r = agent.request(notice(id)).await.unwrap();
        assert_eq!(r, Response::Ok);
    }
}

/// A new event after a restart (the good VM connecting) and its number.
async fn next_seq_after_restart(host: &HostProc, good: &Path) -> u64 {
    let _g = host.connect_agent(good, "good").await;
    let e = host.wait_event("vm_connected", |e| e["vm"] == "good").await;
    let events = host.events().await;
    let seqs: Vec<u64> = events
        .iter()
        .filter(|e| e["kind"] == "vm_connected" && e["vm"] == "good")
        .filter_map(|e| e["seq"].as_u64())
        .collect();
    assert!(e["seq"].as_u64().is_some());
    seqs.into_iter().max().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_flood_cannot_erase_another_vms_evidence_nor_can_a_restart() {
    // No rate bound here: the fair shares alone must hold the evidence
    // against 3,000 events in a ring and a journal of 64.
    let extra = "user_quota_bytes = 1048576\nnotices_per_minute = 0\n\
                 event_ring = 64\nevent_journal = 64";
    let (mut host, [good, flood_vm]) =
        HostProc::with_vms(extra, ["good", "flood"], GOOD_AND_FLOOD).await;
    good_vm_evidence(&host, &good).await;
    let f = host.connect_agent(&flood_vm, "flood").await;
    let t = std::time::Instant::now();
    flood(&f, 1, 3_000).await;
    let journal = host.data.join(uve_host::state::events::JOURNAL_FILE);
    let bytes = std::fs::metadata(&journal).map_or(0, |m| m.len());
    println!(
        "3,000 notices answered in {:?}; journal {bytes} bytes",
        t.elapsed()
    );
    let floods = host.count_events("unexpected_disconnect").await;
    assert!(
        floods > 0 && floods <= 128,
        "{floods} flood events retained"
    );
    let before = assert_evidence_listed(&host, "after the flood").await;
    assert!(
        before >= 3_000,
        "the flood's events were numbered: {before}"
    );
    drop(f);

    // A clean restart: the journal brings the evidence back, and the
    // numbering goes on exactly where it stopped.
    tokio::task::block_in_place(|| host.stop(true));
    host.spawn().await;
    assert_evidence_listed(&host, "after a restart").await;
    let after = next_seq_after_restart(&host, &good).await;
    assert!(
        after > before,
        "numbering restarted: {after} after {before}"
    );

    // Another flood, then a crash once the evidence is on disk: it is
    // served again, and the numbering skips ahead instead of going back.
    let f = host.connect_agent(&flood_vm, "flood").await;
    flood(&f, 10_000, 1_000).await;
    let last = assert_evidence_listed(&host, "after a second flood").await;
    let on_disk = until_async(Duration::from_secs(10), || async {
        let text = std::fs::read_to_string(&journal).ok()?;
        let kept = text.lines().any(|l| {
            serde_json::from_str::<Value>(l).is_ok_and(|v| v["event"]["seq"].as_u64() == Some(last))
        });
        kept.then_some(())
    })
    .await;
    assert!(
        on_disk.is_some(),
        "the flood's last event never reached the journal"
    );
    drop(f);
    tokio::task::block_in_place(|| host.kill());
    host.spawn().await;
    assert_evidence_listed(&host, "after a crash").await;
    let after_crash = next_seq_after_restart(&host, &good).await;
    assert!(
        after_crash > last,
        "numbering went back after a crash: {after_crash} after {last}"
    );
}

/// notices_per_minute = 5 on the flooding VM `f`: a burst of 5, then
/// `Busy` (the agent retries), counted; another VM has its own rate.
async fn notices_are_rate_bound(host: &HostProc, f: &TestAgent, good: &Path) {
    let (mut taken, mut busy) = (Vec::new(), 0u64);
    for id in 1..=50 {
        match f.request(notice(id)).await {
            Ok(_) => taken.push(id),
            Err(e) => {
                assert_eq!(e.remote_code(), Some(ErrorCode::Busy), "{e}");
                busy += 1;
            }
        }
    }
    assert!(
        busy > 0 && taken.len() >= 5,
        "{} taken, {busy} busy",
        taken.len()
    );
    assert_eq!(host.metric("uve_notices_refused_total").await, busy);
    // A redelivery of a notice already taken costs nothing: answered.
    assert_eq!(f.request(notice(taken[0])).await.unwrap(), Response::Ok);
    let disconnects = host.count_events("unexpected_disconnect").await;
    assert_eq!(disconnects, taken.len(), "one event per notice taken");
    let g = host.connect_agent(good, "good").await;
    let bob = Request::UnexpectedDisconnect(DisconnectNotice {
        id: 1,
        session: valid("b1"),
        user: valid("bob"),
        ua: None,
        reason: "display closed".into(),
        at: 1,
    });
    assert_eq!(g.request(bob).await.unwrap(), Response::Ok);
}

/// session_starts_per_minute = 3 and max_sessions_per_vm = 2.
async fn sessions_are_bound(host: &HostProc, f: &TestAgent) {
    let start = |s: &str| Request::SessionStarted {
        session: valid(s),
        user: valid("mallory"),
        ua: None,
    };
    assert_eq!(f.request(start("s1")).await.unwrap(), Response::Ok);
    assert_eq!(f.request(start("s2")).await.unwrap(), Response::Ok);
    let e = f.request(start("s3")).await.expect_err("a third session");
    assert_eq!(e.remote_code(), Some(ErrorCode::TooLarge), "{e}");
    let e = f.request(start("s4")).await.expect_err("a fourth start");
    assert_eq!(e.remote_code(), Some(ErrorCode::Busy), "{e}");
    assert_eq!(
        f.request(start("s1")).await.unwrap(),
        Response::Ok,
        "announcing a known session again costs nothing"
    );
    assert_eq!(host.metric("uve_sessions_refused_total").await, 1);
    assert_eq!(host.metric("uve_session_starts_refused_total").await, 1);
}

/// max_uploads_per_vm = 1: a second upload is refused `Busy`.
async fn uploads_are_bound(host: &HostProc, f: &TestAgent) {
    let (grant, _) = f.retrieve("mallory", "s1").await.unwrap();
    let (one, two) = (noise(100_000, 3), noise(100_000, 4));
    let begin =
        |data| common::begin_and_list(&f.handle, "mallory", "s1", grant.version, grant.lease, data);
    let open = begin(&one).await.unwrap();
    let e = begin(&two).await.err().expect("a second upload was opened");
    assert_eq!(e.remote_code(), Some(ErrorCode::Busy), "{e}");
    assert_eq!(host.metric("uve_uploads_refused_total").await, 1);
    drop(open);
}

/// A frame announced over `max_frame` cuts the VM off; returns the limit.
async fn oversize_frames_cut_off(host: &HostProc, flood_vm: &Path) -> u32 {
    let peer = RawPeer::connect(flood_vm, "oversize").await.unwrap();
    let max = peer.welcome.max_frame;
    let (mut w, _r) = peer.into_raw_writer();
    w.write_all(&(max + 1).to_le_bytes()).await.unwrap();
    w.flush().await.unwrap();
    host.wait_event("vm_lost", |e| {
        e["vm"] == "flood" && e["reason"].as_str().is_some_and(|r| r.contains("exceeds"))
    })
    .await;
    assert_eq!(host.metric("uve_frames_too_large_total").await, 1);
    max
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_budgets_refusal_increments_its_metric_and_is_reported_once() {
    let extra = "notices_per_minute = 5\nsession_starts_per_minute = 3\n\
                 max_sessions_per_vm = 2\nmax_uploads_per_vm = 1\n\
                 budget_event_interval_secs = 3600";
    let (host, [good, flood_vm]) =
        HostProc::with_vms(extra, ["good", "flood"], GOOD_AND_FLOOD).await;
    let f = host.connect_agent(&flood_vm, "flood").await;
    notices_are_rate_bound(&host, &f, &good).await;
    sessions_are_bound(&host, &f).await;
    uploads_are_bound(&host, &f).await;
    let max = oversize_frames_cut_off(&host, &flood_vm).await;

    // Each budget reached is one event naming the VM (the interval is an
    // hour), whatever the number of refusals.
    let events = host.events().await;
    for (budget, limit) in [
        ("notices_per_minute", 5),
        ("session_starts_per_minute", 3),
        ("max_sessions_per_vm", 2),
        ("max_uploads_per_vm", 1),
        ("max_frame", u64::from(max)),
    ] {
        let reported: Vec<&Value> = events
            .iter()
            .filter(|e| e["kind"] == "budget_exceeded" && e["budget"] == budget)
            .collect();
        assert_eq!(reported.len(), 1, "{budget}: {reported:?}");
        assert_eq!(reported[0]["vm"], "flood", "{budget}");
        assert_eq!(reported[0]["limit"], limit, "{budget}");
    }
}
