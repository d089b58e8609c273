//! The S3 side of the store suite: the [`Backend`] on a real Ceph RGW,
//! two `uve-host` processes sharing one bucket, and the servers a store
//! must refuse (one that ignores conditional writes, a missing bucket).

use std::sync::Arc;
use std::time::Duration;

use uve_host::config::S3Config;
use uve_host::store::{S3Store, StoreError, StorePolicy, StoreResult, UifStore};
use uve_protocol::message::Response;

use super::Backend;
use crate::common::rgw::{self, Rgw};
use crate::common::{HostProc, TestAgent, listed, noise};

/// The S3 store on the RGW: two handles per location, as two hosts hold,
/// each with its own local staging directory under `.1`.
pub struct S3<'a>(pub &'a Rgw, pub tempfile::TempDir);

impl<'a> S3<'a> {
    /// The backend on `rgw`.
    pub fn new(rgw: &'a Rgw) -> Self {
        S3(rgw, tempfile::tempdir().unwrap())
    }
}

impl Backend for S3<'_> {
    fn name(&self) -> &str {
        "s3"
    }
    fn open_pair(
        &self,
        location: &str,
        policy: StorePolicy,
        grace: Duration,
    ) -> (Arc<dyn UifStore>, Arc<dyn UifStore>) {
        let cfg = rgw::config(self.0, location);
        let stage = |host: &str| self.1.path().join(location).join(host);
        let a = S3Store::open(&cfg, policy.clone(), grace, &stage("a")).unwrap();
        let b = S3Store::open(&cfg, policy, grace, &stage("b")).unwrap();
        (Arc::new(a), Arc::new(b))
    }
}

/// Two `uve-host` processes on one bucket: alice commits on host 1, moves
/// to a VM on host 2 and gets that version; then both VMs log in on the
/// same head and update at once, `rounds` times.
pub async fn two_hosts_share_one_bucket(rgw: &Rgw, rounds: u32) {
    let dir = tempfile::tempdir().unwrap();
    let toml = rgw.toml("two-hosts");
    let host1 = HostProc::start(&dir.path().join("h1"), &toml).await;
    let host2 = HostProc::start(&dir.path().join("h2"), &toml).await;
    let pa = host1.add_unix_vm("vmA").await;
    let pb = host2.add_unix_vm("vmB").await;
    host1.assign("alice", "vmA").await;
    let a = TestAgent::connect(&pa).await.unwrap();
    let (g, data) = a.retrieve("alice", "s1").await.unwrap();
    assert_eq!((g.version, data.len()), (None, 0));
    let v1 = noise(500_000, 50);
    let r = a.update_from_lease("alice", &v1).await.unwrap();
    assert_eq!(r.answer, Response::Committed { version: 1 });
    // The user moves to a VM on the other hypervisor.
    host2.assign("alice", "vmB").await;
    let b = TestAgent::connect(&pb).await.unwrap();
    let (g, data) = b.retrieve("alice", "s2").await.unwrap();
    assert_eq!(g.version, Some(1));
    assert!(data == v1, "host 2 serves what host 1 committed");
    let mut head = 1;
    for round in 0..rounds {
        // Each round both VMs log her in on the head (an update may only be
        // based on the version its lease was granted on, or one its VM
        // committed since), then both update at once.
        let (ga, _) = a.retrieve("alice", "s1").await.unwrap();
        let (gb, _) = b.retrieve("alice", "s2").await.unwrap();
        assert_eq!((ga.version, gb.version), (Some(head), Some(head)));
        let (la, lb) = (ga.lease, gb.lease);
        let da = noise(300_000, 2000 + u64::from(round) * 2);
        let db = noise(300_000, 2001 + u64::from(round) * 2);
        let (ra, rb) = tokio::join!(
            a.update("alice", "s1", Some(head), la, &da),
            b.update("alice", "s2", Some(head), lb, &db)
        );
        let (ra, rb) = (ra.unwrap().answer, rb.unwrap().answer);
        let (winner, loser) = match (&ra, &rb) {
            (Response::Committed { version }, Response::Conflict { kept_as, head: h })
            | (Response::Conflict { kept_as, head: h }, Response::Committed { version }) => {
                assert_eq!(*h, Some(*version), "round {round}");
                (*version, *kept_as)
            }
            other => panic!("round {round}: not one head and one conflict: {other:?}"),
        };
        for host in [&host1, &host2] {
            let v = host.versions("alice").await;
            assert_eq!(v["head"], winner, "round {round}: {v}");
        }
        let v = host1.versions("alice").await;
        let kinds = listed(&v, "kind");
        assert!(kinds.contains(&(winner, "committed".into())), "{kinds:?}");
        assert!(kinds.contains(&(loser, "conflict".into())), "{kinds:?}");
        let expected = if matches!(ra, Response::Committed { .. }) {
            &da
        } else {
            &db
        };
        assert!(host2.export("alice", winner).await == *expected);
        head = winner;
    }
    // Each host reported its own side of every race.
    let count = |events: Vec<serde_json::Value>, kind: &str| {
        events.iter().filter(|e| e["kind"] == kind).count()
    };
    let (e1, e2) = (host1.events().await, host2.events().await);
    let commits = count(e1.clone(), "commit") + count(e2.clone(), "commit");
    let conflicts = count(e1, "conflict") + count(e2, "conflict");
    assert_eq!(commits, 1 + rounds as usize);
    assert_eq!(conflicts, rounds as usize);
}

/// An HTTP proxy in front of RGW that answers "200 OK" where RGW said
/// "412 Precondition Failed": from the client's side, a server that ignores
/// conditional writes (as Garage does). One request per connection.
async fn lying_proxy(upstream: String) -> String {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::{TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let upstream = upstream.trim_start_matches("http://").to_string();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                    let _ = sw.shutdown().await;
                });
                let mut sr = BufReader::new(&mut sr);
                let mut head = Vec::new();
                loop {
                    let mut line = String::new();
                    if sr.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    if head.is_empty() && line.contains(" 412 ") {
                        head.push("HTTP/1.1 200 OK\r\n".to_string());
                        head.push("ETag: \"forged\"\r\n".to_string());
                    } else if line == "\r\n" {
                        head.push("Connection: close\r\n\r\n".into());
                        break;
                    } else if !line.to_ascii_lowercase().starts_with("connection:") {
                        head.push(line);
                    }
                }
                if cw.write_all(head.concat().as_bytes()).await.is_err() {
                    return;
                }
                let _ = tokio::io::copy(&mut sr, &mut cw).await;
            });
        }
    });
    format!("http://{addr}")
}

/// A server that ignores conditional writes is refused at start-up, by the
/// store and by the daemon, with an error that names the behaviour.
pub async fn unsafe_server_is_refused(rgw: &Rgw) {
    let proxy = lying_proxy(rgw.endpoint.clone()).await;
    let mut cfg = rgw::config(rgw, "unsafe");
    cfg.endpoint = Some(proxy.clone());
    let err = refused(cfg, "a server that ignores If-None-Match must be refused").await;
    assert!(matches!(err, StoreError::UnsafeStore(_)), "{err}");
    assert!(err.to_string().contains("If-None-Match"), "{err}");
    // The daemon refuses to start and says why.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("host.toml");
    let toml = rgw.toml("unsafe").replace(&rgw.endpoint, &proxy);
    std::fs::write(&config, format!("data_dir = {:?}\n{toml}", dir.path())).unwrap();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_uve-host"))
            .args(["run", "--config"])
            .arg(&config)
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "uve-host started on an unsafe store");
    assert!(
        stderr.contains("unsafe for compare-and-swap") && stderr.contains("If-None-Match"),
        "{stderr}"
    );
}

/// A bucket that does not exist is a clear error at open.
pub async fn missing_bucket_is_a_clear_error(rgw: &Rgw) {
    let mut cfg = rgw::config(rgw, "x");
    cfg.bucket = "no-such-bucket".into();
    let err = refused(cfg, "the bucket does not exist").await;
    assert!(matches!(err, StoreError::Remote { .. }), "{err}");
    assert!(err.to_string().contains("NoSuchBucket"), "{err}");
}

/// An S3 store on `cfg` with the default policy, an hour's GC grace and a
/// staging directory of its own.
pub fn open(cfg: &S3Config) -> StoreResult<S3Store> {
    let dir = tempfile::tempdir().unwrap();
    S3Store::open(
        cfg,
        StorePolicy::default(),
        Duration::from_secs(3600),
        dir.path(),
    )
}

/// [`open`] on `cfg` (off the runtime), which must fail (`expected` says
/// why): the error.
async fn refused(cfg: S3Config, expected: &str) -> StoreError {
    tokio::task::spawn_blocking(move || open(&cfg))
        .await
        .unwrap()
        .err()
        .expect(expected)
}
