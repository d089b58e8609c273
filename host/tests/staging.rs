//! Staged bytes cannot fill the host's disk: a VM that uploads chunks and
//! then aborts, goes idle or drops its connection leaves nothing staged
//! once the reclaim has run, and the staging budgets refuse (with `Busy`
//! and an event naming the VM) what would exceed them, while the same VM's
//! honest update goes through once room is back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{HostProc, Listed, TestAgent, assert_committed, begin_alice, noise};
use uve_e2e::poll::until_async;
use uve_protocol::message::{ErrorCode, Request, Response};

/// Sends every chunk the host said it lacks; returns the bytes sent.
async fn send_missing(agent: &TestAgent, l: &Listed) -> Result<u64, ErrorCode> {
    let mut sent = 0;
    for &i in &l.missing {
        let hash = l.manifest.chunks[i].hash;
        let data = l.bytes[&hash].clone();
        sent += data.len() as u64;
        match agent
            .request(Request::ChunkUpload {
                upload: l.upload,
                hash,
                data,
            })
            .await
        {
            Ok(Response::Ok) => {}
            Ok(other) => panic!("chunk answered {other:?}"),
            Err(e) => return Err(e.remote_code().expect("a remote error")),
        }
    }
    Ok(sent)
}

/// Entries under the local store's `staging/` that are upload stages
/// (unsealed packs `<stage>.<n>.pack`; `loose.<n>.pack` holds imports).
fn stages_on_disk(data: &Path) -> usize {
    std::fs::read_dir(data.join("store/staging"))
        .unwrap()
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.ends_with(".pack") && !name.starts_with("loose.")
        })
        .count()
}

async fn wait_staged(host: &HostProc, want: u64) -> bool {
    until_async(Duration::from_secs(10), || async {
        (host.metric("uve_staged_bytes").await == want).then_some(())
    })
    .await
    .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_uploads_leave_no_staged_bytes() {
    let host = HostProc::temp("upload_idle_ms = 1500").await;
    let path = host.add_unix_vm("vm1").await;
    host.assign("alice", "vm1").await;
    let mut abandoned = 0;
    // Three ways to abandon an upload: abort it, leave it idle, hang up.
    for (round, how) in ["abort", "idle", "hang up"].into_iter().enumerate() {
        let agent = host.connect_agent(&path, "vm1").await;
        let (grant, _) = agent.retrieve("alice", "s1").await.unwrap();
        let data = noise(2 << 20, 50 + round as u64);
        let l = begin_alice(&agent, grant.version, grant.lease, &data)
            .await
            .unwrap();
        let sent = send_missing(&agent, &l).await.unwrap();
        assert!(sent >= 2 << 20, "{how}: only {sent} bytes were missing");
        assert_eq!(host.metric("uve_staged_bytes").await, sent, "{how}");
        assert_eq!(stages_on_disk(host.data.as_path()), 1, "{how}");
        match how {
            "abort" => {
                let r = agent
                    .request(Request::UpdateAbort { upload: l.upload })
                    .await;
                assert!(matches!(r, Ok(Response::Ok)), "{r:?}");
            }
            "idle" => {}
            _ => agent.handle.close(),
        }
        abandoned += sent;
        assert!(wait_staged(&host, 0).await, "{how}: staged bytes stayed");
        assert_eq!(
            stages_on_disk(host.data.as_path()),
            0,
            "{how}: stage left on disk"
        );
        assert_eq!(
            host.metric("uve_staged_reclaimed_bytes_total").await,
            abandoned,
            "{how}"
        );
    }
    // Nothing of it became a version or a stored chunk; an honest logout
    // still commits and its stage goes with the commit.
    let agent = host.connect_agent(&path, "vm1").await;
    agent.retrieve("alice", "s2").await.unwrap();
    let r = agent
        .update_from_lease("alice", &noise(1 << 20, 60))
        .await
        .unwrap();
    assert_committed(&r);
    assert_eq!(host.metric("uve_staged_bytes").await, 0);
    assert_eq!(stages_on_disk(host.data.as_path()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_budgets_refuse_with_busy_and_free_up_on_abort() {
    let extra = "max_staged_bytes_per_vm = 3_145_728";
    let (host, _, agent) = HostProc::with_agent(extra, "vm1", &["alice"]).await;
    let (grant, _) = agent.retrieve("alice", "s1").await.unwrap();
    // More than one VM may stage is refused at once, for good.
    let big = noise(4 << 20, 70);
    let e = begin_alice(&agent, grant.version, grant.lease, &big)
        .await
        .err()
        .expect("a 4 MiB upload was accepted under a 3 MiB staging budget");
    assert_eq!(e.remote_code(), Some(ErrorCode::TooLarge), "{e}");
    // Two uploads of 2 MiB fit one at a time: the second gets Busy.
    let (a, b) = (noise(2 << 20, 71), noise(2 << 20, 72));
    let la = begin_alice(&agent, grant.version, grant.lease, &a)
        .await
        .unwrap();
    send_missing(&agent, &la).await.unwrap();
    let lb = begin_alice(&agent, grant.version, grant.lease, &b)
        .await
        .unwrap();
    assert_eq!(send_missing(&agent, &lb).await, Err(ErrorCode::Busy));
    // Resending is refused again, counted, and not reported again.
    let refused = host.metric("uve_staging_refused_total").await;
    assert!(refused >= 1);
    assert_eq!(send_missing(&agent, &lb).await, Err(ErrorCode::Busy));
    assert!(host.metric("uve_staging_refused_total").await > refused);
    let ev = host.wait_event("budget_exceeded", |_| true).await;
    let reported = host.count_events("budget_exceeded").await;
    assert_eq!(reported, 1, "one event per upload, not per refused chunk");
    assert_eq!(ev["vm"], "vm1");
    assert_eq!(ev["user"], "alice");
    assert_eq!(ev["budget"], "max_staged_bytes_per_vm");
    assert_eq!(ev["limit"], 3_145_728);
    // Aborting the first gives its bytes back; the second then completes.
    let r = agent
        .request(Request::UpdateAbort { upload: la.upload })
        .await;
    assert!(matches!(r, Ok(Response::Ok)), "{r:?}");
    until_async(Duration::from_secs(10), || async {
        (host.metric("uve_staged_reclaimed_bytes_total").await > 0).then_some(())
    })
    .await
    .expect("the aborted upload was not reclaimed");
    assert!(host.metric("uve_staged_bytes").await <= 1 << 20);
    send_missing(&agent, &lb).await.unwrap();
    let r = agent
        .request(Request::UpdateCommit { upload: lb.upload })
        .await
        .unwrap();
    let Response::Committed { version } = r else {
        panic!("{r:?}")
    };
    assert_eq!(host.export("alice", version).await, b);
    assert_eq!(host.metric("uve_staged_bytes").await, 0);
}

/// One VM staging all it may leaves another VM's logout committing: with
/// the staging filesystem simulated (`test_staging_free_bytes`: 17 MiB,
/// 1 MiB of it the floor, so eight shares of 2 MiB), VM 1 stages a
/// 16 MiB upload (its budget is `max_uif_size`, more than its share) and
/// gets `Busy` once it is over its share and less than a share is left
/// above the floor; VM 2, within its share, still stages and commits while
/// VM 1 holds its bytes. Without the share rule VM 1 would take the free
/// space down to the floor and VM 2's chunks would be refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_over_its_share_leaves_another_vms_logout_committing() {
    const MIB: u64 = 1 << 20;
    let extra = format!(
        "max_uif_size = {}\nstore_min_free_bytes = {}\ntest_staging_free_bytes = {}",
        16 * MIB,
        MIB,
        17 * MIB
    );
    let (host, [p1, p2]) =
        HostProc::with_vms(&extra, ["vm1", "vm2"], &[("alice", "vm1"), ("bob", "vm2")]).await;
    let (hostile, good) = (
        host.connect_agent(&p1, "vm1").await,
        host.connect_agent(&p2, "vm2").await,
    );
    let (grant, _) = hostile.retrieve("alice", "s1").await.unwrap();
    let big = noise(16 << 20, 80);
    let l = begin_alice(&hostile, grant.version, grant.lease, &big)
        .await
        .unwrap();
    assert_eq!(send_missing(&hostile, &l).await, Err(ErrorCode::Busy));
    let held = host.metric("uve_staged_bytes").await;
    let share = host.metric("uve_staging_share_bytes").await;
    assert_eq!(share, 2 * MIB, "16 MiB of room in eight shares");
    assert!(
        held > 13 * MIB && held <= 14 * MIB,
        "VM 1 was stopped with less than a share above the floor: {held}"
    );
    assert_eq!(host.metric("uve_staging_share_refused_total").await, 1);
    let ev = host.wait_event("budget_exceeded", |_| true).await;
    assert_eq!(ev["vm"], "vm1");
    assert_eq!(ev["budget"], "staging_shares");
    assert_eq!(ev["limit"], 2 * MIB);
    // VM 2's logout, within its share, commits while VM 1 holds its bytes.
    good.retrieve("bob", "s1").await.unwrap();
    let mine = noise(3 << 19, 81);
    let r = good.update_from_lease("bob", &mine).await.unwrap();
    assert_committed(&r);
    let Response::Committed { version } = r.answer else {
        unreachable!()
    };
    assert!(host.export("bob", version).await == mine);
    assert_eq!(host.metric("uve_staged_bytes").await, held);
    assert_eq!(host.metric("uve_staging_free_space_refused_total").await, 0);
    assert_eq!(host.metric("uve_staging_refused_total").await, 1);
    assert_eq!(host.count_events("budget_exceeded").await, 1);
}

/// A VM staging heavily is never slowed alone on the host; while another
/// VM has bulk work (logins fetching chunks) it shares
/// `heavy_staging_bytes_per_sec` with the other heavy VMs, and both
/// VMs' work completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heavy_stager_is_slowed_only_while_a_light_vm_works() {
    let (host, [big_path, small_path]) = HostProc::with_vms(
        "heavy_staging_bytes_per_sec = 16777216\n",
        ["big", "small"],
        &[("alice", "big"), ("bob", "small")],
    )
    .await;
    let throttled = "uve_heavy_staging_throttled_total";
    let big = host.connect_agent(&big_path, "big").await;
    big.retrieve("alice", "s1").await.unwrap();
    // Alone: 24 MiB at full speed, nothing read late.
    assert_committed(
        &big.update_from_lease("alice", &noise(24 << 20, 1))
            .await
            .unwrap(),
    );
    assert_eq!(host.metric(throttled).await, 0, "alone, never slowed");

    // Bob's VM logs in and out over and over (bulk work: chunk fetches
    // and a few staged chunks) while alice's VM stages 24 MiB more.
    let small = host.connect_agent(&small_path, "small").await;
    small.retrieve("bob", "s2").await.unwrap();
    assert_committed(
        &small
            .update_from_lease("bob", &noise(2 << 20, 2))
            .await
            .unwrap(),
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let logins = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let (_, bytes) = small.retrieve("bob", &format!("r{n}")).await.unwrap();
                assert_eq!(bytes.len(), 2 << 20);
            }
            n
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    assert_committed(
        &big.update_from_lease("alice", &noise(24 << 20, 3))
            .await
            .unwrap(),
    );
    let took = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let logins = logins.await.unwrap();
    assert!(logins > 1, "bob's logins went on ({logins})");
    assert!(
        host.metric(throttled).await > 0,
        "slowed while bob's VM worked"
    );
    // 16 MiB of the 24 past the first 8 and a quarter second's burst go
    // at 16 MiB/s at most.
    assert!(took >= Duration::from_millis(500), "{took:?}");
}

/// The same rule for fetches (`heavy_fetch_bytes_per_sec`): a VM fetching
/// a large UIF is slowed only while another VM has bulk work (and only
/// past the 32 MiB a VM may fetch at once before it counts as heavy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heavy_fetcher_is_slowed_only_while_a_light_vm_works() {
    let (host, [big_path, small_path]) = HostProc::with_vms(
        "heavy_fetch_bytes_per_sec = 16777216\nheavy_staging_bytes_per_sec = 0\n",
        ["big", "small"],
        &[("alice", "big"), ("bob", "small")],
    )
    .await;
    let throttled = "uve_heavy_fetch_throttled_total";
    let big = host.connect_agent(&big_path, "big").await;
    big.retrieve("alice", "s1").await.unwrap();
    let data = noise(64 << 20, 4);
    assert_committed(&big.update_from_lease("alice", &data).await.unwrap());
    // Alone: 64 MiB fetched at full speed, nothing read late.
    let (_, bytes) = big.retrieve("alice", "s2").await.unwrap();
    assert!(bytes == data);
    assert_eq!(host.metric(throttled).await, 0, "alone, never slowed");

    // Bob's VM logs out small changes over and over (light bulk work that
    // fetches nothing) while alice's VM fetches her 64 MiB again.
    let small = host.connect_agent(&small_path, "small").await;
    small.retrieve("bob", "s3").await.unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let logouts = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let r = small
                    .update_from_lease("bob", &noise(256 << 10, 100 + u64::from(n)))
                    .await
                    .unwrap();
                assert_committed(&r);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            n
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let (_, bytes) = big.retrieve("alice", "s4").await.unwrap();
    let took = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let logouts = logouts.await.unwrap();
    assert!(bytes == data);
    assert!(logouts > 1, "bob's logouts went on ({logouts})");
    assert!(
        host.metric(throttled).await > 0,
        "slowed while bob's VM worked"
    );
    // 28 MiB of the 64 past the first 32 and a quarter second's burst go
    // at 16 MiB/s at most.
    assert!(took >= Duration::from_millis(1500), "{took:?}");
}
