//! Host restarts and crashes against the real daemon: a restart mid-update
//! leaves the previous head intact and the retry commits; SIGTERM shuts
//! down gracefully (exit 0, Goodbye); and a crash test SIGKILLs the host at
//! many points during concurrent updates, then checks every user's head is
//! complete and digest-valid and no acknowledged version was lost; lease
//! grants answered just before a SIGKILL are in force after it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

mod common;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{HostProc, TestAgent, listed, manifest_of, noise};
use uve_e2e::names::valid;
use uve_protocol::link::LinkEnd;
use uve_protocol::message::{Request, Response, UpdateBegin, UpdateCause};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_mid_update_keeps_head_and_retry_commits() {
    let (mut host, path, agent) = HostProc::with_agent("", "vm1", &["alice"]).await;
    let (g, _) = agent.retrieve("alice", "s1").await.unwrap();
    let v1 = noise(2 << 20, 20);
    agent
        .update("alice", "s1", None, g.lease, &v1)
        .await
        .unwrap();

    // start v2 and upload half of its missing chunks, then crash the host
    let v2 = noise(2 << 20, 21);
    let (m, bytes) = manifest_of(&v2);
    let begin = UpdateBegin {
        user: valid("alice"),
        session: valid("s1"),
        base: Some(1),
        lease: g.lease,
        header: m.header,
        cause: UpdateCause::Logout,
    };
    let Response::UpdateAccepted { upload } =
        agent.request(Request::UpdateBegin(begin)).await.unwrap()
    else {
        panic!("not accepted")
    };
    let Response::Missing(missing) = agent
        .request(Request::UpdatePage {
            upload,
            page: 0,
            chunks: m.chunks.clone(),
        })
        .await
        .unwrap()
    else {
        panic!("no Missing")
    };
    let total = missing.len();
    for &i in &missing[..total / 2] {
        let c = m.chunks[i as usize];
        agent
            .request(Request::ChunkUpload {
                upload,
                hash: c.hash,
                data: bytes[&c.hash].clone(),
            })
            .await
            .unwrap();
    }
    host.kill();
    host.spawn().await;
    let v = host.versions("alice").await;
    assert_eq!(v["head"], 1);
    assert_eq!(v["versions"].as_array().unwrap().len(), 1);
    assert!(host.export("alice", 1).await == v1, "previous head intact");

    // the retry (same base, same lease: leases survive restarts) commits
    let agent = TestAgent::connect_retry(&path, Duration::from_secs(10)).await;
    let r = agent
        .update("alice", "s1", Some(1), g.lease, &v2)
        .await
        .unwrap();
    assert_eq!(r.answer, Response::Committed { version: 2 });
    assert!(
        r.missing <= total - total / 2,
        "chunks stored before the crash are not resent ({} of {total})",
        r.missing
    );
    assert!(host.export("alice", 2).await == v2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_says_goodbye_and_exits_zero() {
    let (mut host, _, agent) = HostProc::with_agent("", "vm1", &[]).await;
    assert_eq!(host.terminate(), Some(0));
    let end = agent.handle.closed().await;
    let log = host.log_text();
    assert!(matches!(end, LinkEnd::Goodbye(_)), "{end:?}\n{log}");
    assert!(!host.api_socket().exists(), "API socket removed");
}

/// A lease grant is answered only once the lease file holds it: a host
/// SIGKILLed right after the answers restarts with every grant in force,
/// and an update under the last one becomes head. The users' grants run at
/// once, so their writes share the lease table's one writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_is_durable_when_answered() {
    const USERS: [&str; 4] = ["alice", "bob", "carol", "dave"];
    let (mut host, path, mut agent) = HostProc::with_agent("", "vm1", &USERS).await;
    for round in 0..3u64 {
        let session = format!("s{round}");
        let grants =
            futures_util::future::join_all(USERS.iter().map(|user| agent.retrieve(user, &session)))
                .await;
        host.kill();
        host.spawn().await;
        for (user, grant) in USERS.iter().zip(&grants) {
            let (grant, _) = grant.as_ref().unwrap();
            let (status, v) = host.get(&format!("/v1/users/{user}")).await;
            assert_eq!(status, 200, "{v}");
            assert_eq!(
                v["lease"]["epoch"], grant.lease,
                "{user}'s answered grant of round {round} is lost after a crash: {v}"
            );
            assert_eq!(v["lease"]["vm"], "vm1", "{v}");
        }
        agent = TestAgent::connect_retry(&path, Duration::from_secs(10)).await;
        let (grant, _) = grants[0].as_ref().unwrap();
        let r = agent
            .update(
                "alice",
                &session,
                grant.version,
                grant.lease,
                &noise(64 << 10, round),
            )
            .await
            .unwrap();
        assert_eq!(
            r.answer,
            Response::Committed { version: round + 1 },
            "the update under the grant answered before the crash"
        );
    }
}

/// What the crash test's clients learned.
#[derive(Default)]
struct Ledger {
    /// (user, version) → manifest digest of every acknowledged commit.
    acked: HashMap<(String, u64), String>,
    /// Manifest digests of everything any client tried to commit.
    attempted: HashSet<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_test_sigkill_during_concurrent_updates() {
    const KILLS: usize = 50;
    const USERS: usize = 3;
    let started = Instant::now();
    let mut host = HostProc::temp("history_keep = 100000\nconflict_keep = 100000").await;
    let mut paths = Vec::new();
    for i in 0..USERS {
        paths.push(host.add_unix_vm(&format!("vm{i}")).await);
        host.assign(&format!("user{i}"), &format!("vm{i}")).await;
    }
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut seed = 1000u64;
    for round in 0..KILLS {
        let acked_before = ledger.lock().unwrap().acked.len();
        let mut tasks = Vec::new();
        for (i, path) in paths.iter().enumerate() {
            let (path, ledger) = (path.clone(), ledger.clone());
            let user = format!("user{i}");
            seed += 100;
            let base_seed = seed;
            tasks.push(tokio::spawn(update_until_killed(
                path, ledger, user, i, base_seed,
            )));
        }
        // Every other round kills the host only once this round has had a
        // commit acknowledged (however slow the machine), so the ledger
        // checks below always have acknowledged versions to check; the other
        // rounds kill at a time alone, possibly before any commit.
        if round % 2 == 0 {
            let progressed = uve_e2e::poll::until_async(Duration::from_secs(60), || {
                let ledger = ledger.clone();
                async move { (ledger.lock().unwrap().acked.len() > acked_before).then_some(()) }
            })
            .await;
            assert!(progressed.is_some(), "round {round}: no commit in 60 s");
        }
        // let the updates run for a varying time, then kill the host
        let ms = 30 + (round as u64 * 37) % 170;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        host.kill();
        for t in tasks {
            t.await.unwrap();
        }
        host.spawn().await;
    }
    // verify: every acknowledged version is retained with its digest, and
    // every retained version (heads included) exports digest-valid bytes
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    assert!(
        ledger.acked.len() >= KILLS / 2,
        "too few commits: {}",
        ledger.acked.len()
    );
    for i in 0..USERS {
        versions_are_intact(&host, &format!("user{i}"), &ledger).await;
    }
    eprintln!(
        "crash test: {KILLS} kills, {} acknowledged commits, {:?}",
        ledger.acked.len(),
        started.elapsed()
    );
}

/// One agent's updates of `user` (a retrieve, then updates until the
/// host is killed), each attempt and acknowledgement in `ledger`; the
/// head it retrieves must be something someone wrote.
async fn update_until_killed(
    path: PathBuf,
    ledger: Arc<Mutex<Ledger>>,
    user: String,
    i: usize,
    base_seed: u64,
) {
    let Ok(agent) = TestAgent::connect(&path).await else {
        return;
    };
    let Ok((g, data)) = agent.retrieve(&user, "s").await else {
        return;
    };
    if let Some(h) = g.header {
        let digest = h.digest.to_hex();
        assert!(
            ledger.lock().unwrap().attempted.contains(&digest),
            "head of {user} is something nobody wrote"
        );
        assert_eq!(manifest_of(&data).0.header.digest, h.digest);
    }
    let mut base = g.version;
    for k in 0.. {
        let len = 100_000 + ((base_seed + k) % 7) as usize * 60_000;
        let mut data = noise(len, base_seed + k);
        data.extend_from_slice(&noise(200_000, i as u64)); // shared tail
        let digest = manifest_of(&data).0.header.digest.to_hex();
        ledger.lock().unwrap().attempted.insert(digest.clone());
        match agent.update(&user, "s", base, g.lease, &data).await {
            Ok(r) => match r.answer {
                Response::Committed { version } => {
                    ledger
                        .lock()
                        .unwrap()
                        .acked
                        .insert((user.clone(), version), digest);
                    base = Some(version);
                }
                other => panic!("{user}: unexpected {other:?}"),
            },
            Err(_) => return, // host killed
        }
    }
}

/// Every version of `ledger` acknowledged for `user` is retained with its
/// digest, and every retained version (heads included) exports
/// digest-valid bytes someone attempted.
async fn versions_are_intact(host: &HostProc, user: &str, ledger: &Ledger) {
    let v = host.versions(user).await;
    let listed: HashMap<u64, String> = listed(&v, "digest").into_iter().collect();
    let head = v["head"].as_u64().expect("every user has a head");
    for ((u, version), digest) in ledger.acked.iter() {
        if *u == user {
            assert_eq!(listed.get(version), Some(digest), "{user} v{version} lost");
            assert!(head >= *version);
        }
    }
    for (version, digest) in &listed {
        let bytes = host.export(user, *version).await;
        assert_eq!(&manifest_of(&bytes).0.header.digest.to_hex(), digest);
        assert!(ledger.attempted.contains(digest));
    }
}
