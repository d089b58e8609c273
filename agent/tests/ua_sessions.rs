//! UVE-2 and session supervision end to end: UA deploy/update/rollback/
//! delete (and malicious bundles refused with nothing written outside),
//! supervised UA crash → disconnect notice acknowledged once and UIF
//! flushed, suspend/resume really stopping the UA, monitoring grants.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation,
    missing_docs
)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    AgentProc, LONG, TestHost, file_agent, host_in_tempdir, must, skip_unless_root, start_agent,
    uif,
};
use uve_e2e::names::valid;
use uve_protocol::manifest::Hash;
use uve_protocol::message::{ErrorCode, Request, Response, UaBundle, UpdateCause};

/// A tar entry for hand-made (possibly hostile) archives.
enum E<'a> {
    File(&'a str, &'a [u8], u32),
    Dir(&'a str),
    Symlink(&'a str, &'a str),
}

/// Builds a tar with raw names (the tar crate's builder refuses `..` and
/// absolute paths, which is exactly what hostile bundles contain).
fn raw_tar(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        let (name, link, data, kind, mode): (&str, Option<&str>, &[u8], tar::EntryType, u32) =
            match e {
                E::File(n, d, m) => (n, None, d, tar::EntryType::Regular, *m),
                E::Dir(n) => (n, None, b"", tar::EntryType::Directory, 0o755),
                E::Symlink(n, t) => (n, Some(t), b"", tar::EntryType::Symlink, 0o777),
            };
        {
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name.as_bytes());
            if let Some(t) = link {
                gnu.linkname[..t.len()].copy_from_slice(t.as_bytes());
            }
        }
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

static NEXT_TRANSFER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Deploys a bundle through UaBegin / UaBundleData / UaCommit.
fn deploy(host: &TestHost, name: &str, version: &str, entry: &[&str], bundle: &[u8]) -> Response {
    let transfer = NEXT_TRANSFER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let r = host
        .request(Request::UaBegin(UaBundle {
            transfer,
            name: valid(name),
            version: valid(version),
            entry: entry.iter().map(|s| s.to_string()).collect(),
            digest: Hash::of(bundle),
            size: bundle.len() as u64,
            update: false,
        }))
        .unwrap();
    assert_eq!(r, Response::Ok);
    for (i, piece) in bundle.chunks(100_000).enumerate() {
        let r = host
            .request(Request::UaBundleData {
                transfer,
                offset: (i * 100_000) as u64,
                data: piece.to_vec(),
            })
            .unwrap();
        assert_eq!(r, Response::Ok);
    }
    match host.request(Request::UaCommit { transfer }) {
        Ok(r) => r,
        Err(uve_protocol::link::LinkError::Remote(e)) => Response::Error(e),
        Err(e) => panic!("{e}"),
    }
}

fn code_of(r: &Response) -> Option<ErrorCode> {
    match r {
        Response::Error(e) => Some(e.code),
        _ => None,
    }
}

fn host_req(host: &TestHost, req: Request) -> Response {
    match host.request(req) {
        Ok(r) => r,
        Err(uve_protocol::link::LinkError::Remote(e)) => Response::Error(e),
        Err(e) => panic!("{e}"),
    }
}

/// For the tests that need root (`None`, skipped, otherwise): a
/// directory anybody can write into (UAs run as `nobody`), the fake host
/// in it and a file-mode agent, connected.
fn ua_rig(test: &str) -> Option<(tempfile::TempDir, TestHost, AgentProc)> {
    if skip_unless_root(test) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let host = TestHost::start(dir.path());
    let agent = file_agent(dir.path());
    Some((dir, host, agent))
}

/// The answer of a deploy (or rollback) that made `version` current.
fn current(version: &str) -> Response {
    Response::UaCurrent {
        version: valid(version),
    }
}

/// Logs `nobody` in to `session` with UA `ua` supervised.
fn login_with_ua(agent: &AgentProc, session: &str, ua: &str) {
    agent.ok(&[
        "login",
        "--user",
        "nobody",
        "--session",
        session,
        "--ua",
        ua,
    ]);
}

/// Deploys UA `crashy` 1, which waits until the file it returns exists,
/// then exits 3.
fn deploy_crashy(host: &TestHost, dir: &Path) -> PathBuf {
    let go = dir.join("crash-now");
    let script = format!(
        "#!/bin/sh\nwhile [ ! -e {} ]; do sleep 0.02; done\nexit 3\n",
        go.display()
    );
    let bundle = raw_tar(&[E::File("crash.sh", script.as_bytes(), 0o755)]);
    let r = deploy(host, "crashy", "1", &["crash.sh"], &bundle);
    assert_eq!(r, current("1"));
    go
}

const TICKER: &[u8] = b"#!/bin/sh\nwhile true; do echo tick >> \"$1\"; sleep 0.02; done\n";

#[test]
fn ua_deploy_update_rollback_delete_and_hostile_bundles() {
    let Some((dir, host, agent)) = ua_rig("ua_deploy_update_rollback_delete_and_hostile_bundles")
    else {
        return;
    };
    let ticks = dir.path().join("ticks");
    let ticks_s = ticks.to_str().unwrap();

    let ua_dir = agent.state.join("ua/ticker");
    let v1 = deploy_update_and_roll_back(&host, &ua_dir, ticks_s);
    bad_transfers_are_refused(&host, &v1);
    hostile_bundles_land_nowhere(&host, &agent, dir.path());
    delete_is_refused_while_in_use_unless_forced(&host, &agent, &ticks, &ua_dir);
}

/// Deploys `ticker` 1.0 and 2.0 (`previous` then names 1.0), rolls back
/// to 1.0; returns the 1.0 bundle.
fn deploy_update_and_roll_back(host: &TestHost, ua_dir: &Path, ticks_s: &str) -> Vec<u8> {
    let v1 = raw_tar(&[E::Dir("bin"), E::File("bin/run.sh", TICKER, 0o755)]);
    let r = deploy(host, "ticker", "1.0", &["bin/run.sh", ticks_s], &v1);
    assert_eq!(r, current("1.0"));
    assert_eq!(
        std::fs::read(ua_dir.join("1.0/bin/run.sh")).unwrap(),
        TICKER
    );
    assert_eq!(
        std::fs::read_link(ua_dir.join("current")).unwrap(),
        Path::new("1.0")
    );

    let v2 = raw_tar(&[
        E::Dir("bin"),
        E::File("bin/run.sh", TICKER, 0o755),
        E::File("VERSION", b"2\n", 0o644),
        E::Symlink("latest", "bin/run.sh"),
    ]);
    let r = deploy(host, "ticker", "2.0", &["bin/run.sh", ticks_s], &v2);
    assert_eq!(r, current("2.0"));
    assert_eq!(
        std::fs::read_link(ua_dir.join("previous")).unwrap(),
        Path::new("1.0")
    );
    let st = host_req(host, Request::AgentStatus);
    let Response::Status(st) = st else {
        panic!("{st:?}")
    };
    assert_eq!(st.uas.len(), 1);
    assert_eq!(st.uas[0].current, "2.0");
    assert_eq!(st.uas[0].previous.as_deref(), Some("1.0"));

    // Rollback: current back to 1.0.
    let r = host_req(
        host,
        Request::UaRollback {
            name: valid("ticker"),
        },
    );
    assert_eq!(r, current("1.0"));
    assert_eq!(
        std::fs::read_link(ua_dir.join("current")).unwrap(),
        Path::new("1.0")
    );

    v1
}

/// A bundle whose digest is wrong, or larger than announced: refused.
fn bad_transfers_are_refused(host: &TestHost, v1: &[u8]) {
    // Wrong digest: refused, current unchanged.
    let transfer = 9_000;
    host.request(Request::UaBegin(UaBundle {
        transfer,
        name: valid("ticker"),
        version: valid("3.0"),
        entry: vec!["bin/run.sh".into()],
        digest: Hash([0; 32]),
        size: v1.len() as u64,
        update: true,
    }))
    .unwrap();
    host.request(Request::UaBundleData {
        transfer,
        offset: 0,
        data: v1.to_vec(),
    })
    .unwrap();
    let r = host_req(host, Request::UaCommit { transfer });
    assert_eq!(code_of(&r), Some(ErrorCode::BadDigest), "{r:?}");
    // Larger than announced: refused.
    let r = host_req(
        host,
        Request::UaBegin(UaBundle {
            transfer: 9_001,
            name: valid("ticker"),
            version: valid("3.1"),
            entry: vec!["x".into()],
            digest: Hash([0; 32]),
            size: 10,
            update: true,
        }),
    );
    assert_eq!(r, Response::Ok);
    let r = host_req(
        host,
        Request::UaBundleData {
            transfer: 9_001,
            offset: 0,
            data: vec![0; 11],
        },
    );
    assert_eq!(code_of(&r), Some(ErrorCode::TooLarge), "{r:?}");
}

/// Hostile bundles: nothing may land outside the UA directory.
fn hostile_bundles_land_nowhere(host: &TestHost, agent: &AgentProc, dir: &Path) {
    let outside = dir.join("outside");
    std::fs::create_dir(&outside).unwrap();
    let abs_target = format!("{}/abs-pwned", outside.display());
    let hostile: Vec<(&str, Vec<u8>)> = vec![
        (
            "dotdot",
            raw_tar(&[E::File("../../../../outside-pwned", b"x", 0o644)]),
        ),
        ("absolute", raw_tar(&[E::File(&abs_target, b"x", 0o644)])),
        (
            "symlink-abs",
            raw_tar(&[
                E::Symlink("out", outside.to_str().unwrap()),
                E::File("out/pwned", b"x", 0o644),
            ]),
        ),
        (
            "symlink-rel",
            raw_tar(&[
                E::Symlink("up", "../../../../../../../../.."),
                E::File("up/pwned", b"x", 0o644),
            ]),
        ),
    ];
    for (what, bundle) in hostile {
        let r = deploy(host, "evil", what, &["run"], &bundle);
        assert_eq!(
            code_of(&r),
            Some(ErrorCode::BundleRejected),
            "{what}: {r:?}"
        );
    }
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "written outside"
    );
    assert!(!dir.join("outside-pwned").exists());
    assert!(!agent.state.join("outside-pwned").exists());
    assert!(!Path::new("/outside-pwned").exists());
    assert!(
        agent.status()["uas"].as_array().unwrap().len() == 1,
        "evil not deployed"
    );
}

/// Delete while a session uses it: refused unless forced; a forced stop
/// is not an unexpected disconnect.
fn delete_is_refused_while_in_use_unless_forced(
    host: &TestHost,
    agent: &AgentProc,
    ticks: &Path,
    ua_dir: &Path,
) {
    login_with_ua(agent, "u1", "ticker");
    must("UA ticking", LONG, || {
        (std::fs::metadata(ticks).map(|m| m.len()).unwrap_or(0) > 0).then_some(())
    });
    let r = host_req(
        host,
        Request::UaDelete {
            name: valid("ticker"),
            force: false,
        },
    );
    assert_eq!(code_of(&r), Some(ErrorCode::UaInUse), "{r:?}");
    assert!(ua_dir.exists());
    let r = host_req(
        host,
        Request::UaDelete {
            name: valid("ticker"),
            force: true,
        },
    );
    assert_eq!(
        r,
        Response::UaDeleted {
            stopped_sessions: vec![valid("u1")]
        }
    );
    assert!(!ua_dir.exists());
    assert!(agent.sessions().is_empty());
    // A forced stop is not an unexpected disconnect.
    assert!(host.with(|h| h.notices.is_empty()));
}

#[test]
fn ua_crash_sends_one_disconnect_notice_and_flushes() {
    let Some((dir, host, agent)) = ua_rig("ua_crash_sends_one_disconnect_notice_and_flushes")
    else {
        return;
    };
    let go = deploy_crashy(&host, dir.path());
    host.with(|h| h.seed("nobody", b"hello world, this is the nobody UIF"));
    login_with_ua(&agent, "c1", "crashy");
    let img = uif(dir.path(), "nobody");
    std::fs::write(&img, b"changed before the crash").unwrap();
    // The host is busy the first time: the notice must be retried.
    host.with(|h| h.busy_notices = 1);
    std::fs::write(&go, b"").unwrap();
    must("disconnect notice", LONG, || {
        host.with(|h| (!h.notices.is_empty()).then_some(()))
    });
    must("journal drained", LONG, || {
        (agent.status()["pending_notices"] == 0).then_some(())
    });
    let (notices, sessions) = host.with(|h| (h.notices.clone(), h.notice_sessions.clone()));
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert_eq!(notices.values().copied().collect::<Vec<_>>(), [1]);
    assert_eq!(sessions[0].1, "c1");
    assert!(sessions[0].2.contains("exit"), "{}", sessions[0].2);
    host.wait_head("UIF flushed", "nobody", b"changed before the crash");
    let c = host.last_commit();
    assert_eq!(c.cause, UpdateCause::Disconnect);
    assert!(agent.sessions().is_empty());

    // The `disconnect` verb does the same for an unsupervised session.
    agent.ok(&["login", "--user", "nobody", "--session", "c2"]);
    let out = agent.ok(&[
        "disconnect",
        "--session",
        "c2",
        "--reason",
        "display closed",
    ]);
    assert!(out.contains("committed"), "{out}");
    must("second notice", LONG, || {
        host.with(|h| (h.notices.len() == 2).then_some(()))
    });
    let reasons = host.with(|h| h.notice_sessions.clone());
    assert_eq!(reasons[1].1, "c2");
    assert_eq!(reasons[1].2, "display closed");
    assert!(host.with(|h| h.notices.values().all(|n| *n == 1)));
}

#[test]
fn suspend_and_resume_really_stop_the_ua() {
    let Some((dir, host, agent)) = ua_rig("suspend_and_resume_really_stop_the_ua") else {
        return;
    };
    let ticks = dir.path().join("ticks");
    let bundle = raw_tar(&[E::File("run.sh", TICKER, 0o755)]);
    let r = deploy(
        &host,
        "ticker",
        "1",
        &["run.sh", ticks.to_str().unwrap()],
        &bundle,
    );
    assert_eq!(r, current("1"));
    login_with_ua(&agent, "t1", "ticker");
    let size = || std::fs::metadata(&ticks).map(|m| m.len()).unwrap_or(0);
    must("UA writes", LONG, || (size() > 0).then_some(()));
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&ticks).unwrap());
    assert_eq!(owner, 65534, "UA runs as nobody");

    let r = host_req(
        &host,
        Request::SessionSuspend {
            session: valid("t1"),
        },
    );
    assert_eq!(r, Response::Ok);
    assert_eq!(agent.status()["sessions"][0]["suspended"], true);
    // Frozen: the size stays the same over several observations.
    let frozen = size();
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(size(), frozen, "file grew while suspended");
    }
    let r = host_req(
        &host,
        Request::SessionResume {
            session: valid("t1"),
        },
    );
    assert_eq!(r, Response::Ok);
    must("UA writes again", LONG, || (size() > frozen).then_some(()));
    let r = host_req(
        &host,
        Request::SessionSuspend {
            session: valid("nope"),
        },
    );
    assert_eq!(code_of(&r), Some(ErrorCode::NotFound));

    // Logout stops the UA without a disconnect notice.
    let out = agent.ok(&["logout", "--session", "t1"]);
    assert!(out.contains("committed"), "{out}");
    let after = size();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(size(), after, "UA still running after logout");
    }
    assert!(host.with(|h| h.notices.is_empty()));
}

#[test]
fn monitor_grants_expire_and_revoke() {
    let (dir, host) = host_in_tempdir();
    let mut agent = start_agent(dir.path(), "");
    agent.wait_connected();
    let check = |a: &AgentProc, m: &str| {
        a.cli(&["monitor-check", "--session", "s1", "--user", m])
            .status
            .code()
    };
    assert_eq!(check(&agent, "mallory"), Some(1));
    let now = uve_protocol_now();
    assert_eq!(grant(&host, "helpdesk", now + 3_600_000), Response::Ok);
    assert_eq!(check(&agent, "helpdesk"), Some(0));
    assert_eq!(check(&agent, "mallory"), Some(1));
    // Persisted across an agent restart.
    agent.restart_connected();
    assert_eq!(check(&agent, "helpdesk"), Some(0));
    let r = host_req(
        &host,
        Request::MonitorRevoke {
            session: valid("s1"),
            monitor: valid("helpdesk"),
        },
    );
    assert_eq!(r, Response::Ok);
    assert_eq!(check(&agent, "helpdesk"), Some(1));
    // A short grant expires by itself.
    let expires = uve_protocol_now() + 1_500;
    assert_eq!(grant(&host, "trainee", expires), Response::Ok);
    must("grant expired", LONG, || {
        (check(&agent, "trainee") == Some(1)).then_some(())
    });
    // An invalid name, sent raw (the types hold none): refused on its own
    // request, and the link stays up (the ping below).
    let r = host
        .request_with(|n| Request::MonitorGrant {
            session: n.session("../etc"),
            monitor: n.user("x"),
            expires: 0,
        })
        .unwrap_or_else(|e| match e {
            uve_protocol::link::LinkError::Remote(e) => Response::Error(e),
            e => panic!("{e}"),
        });
    assert_eq!(code_of(&r), Some(ErrorCode::InvalidName));
    let r = host_req(&host, Request::Ping { nonce: 42 });
    assert_eq!(r, Response::Pong { nonce: 42 });
    let r = host_req(
        &host,
        Request::ChunkFetch {
            user: valid("x"),
            hash: Hash([0; 32]),
        },
    );
    assert_eq!(code_of(&r), Some(ErrorCode::Unsupported));
}

/// Grants `monitor` access to session `s1` until `expires`.
fn grant(host: &TestHost, monitor: &str, expires: u64) -> Response {
    host_req(
        host,
        Request::MonitorGrant {
            session: valid("s1"),
            monitor: valid(monitor),
            expires,
        },
    )
}

fn uve_protocol_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn ua_surviving_an_agent_restart_is_still_supervised() {
    let Some((dir, host, mut agent)) = ua_rig("ua_surviving_an_agent_restart_is_still_supervised")
    else {
        return;
    };
    let go = deploy_crashy(&host, dir.path());
    login_with_ua(&agent, "r1", "crashy");
    let pid = agent.status()["sessions"][0]["pid"].as_i64().unwrap();
    agent.restart_connected();
    let st = agent.status();
    assert_eq!(st["sessions"][0]["session"], "r1");
    assert_eq!(st["sessions"][0]["pid"].as_i64(), Some(pid), "adopted");
    // The session wrote to its UIF, so the flush has something to commit.
    std::fs::write(uif(dir.path(), "nobody"), b"the session's work").unwrap();
    std::fs::write(&go, b"").unwrap();
    host.wait_notice("disconnect notice after restart", "r1");
    must("session gone", LONG, || {
        agent.sessions().is_empty().then_some(())
    });
    must("UIF flushed after the adopted UA died", LONG, || {
        host.with(|h| {
            h.commits
                .iter()
                .any(|c| c.user == "nobody" && c.cause == UpdateCause::Disconnect)
                .then_some(())
        })
    });
}
