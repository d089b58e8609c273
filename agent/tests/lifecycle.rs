//! Session lifecycle end to end: the PAM hook, clear login failures, the
//! temporary-UIF fallback that can never overwrite the real head, SIGTERM
//! flushing, re-announcing sessions after a host restart, VM-switch
//! release, and a connection reset in the middle of an update.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation,
    missing_docs
)]

mod common;

use std::path::Path;
use std::process::Command;

use common::{
    LONG, TestHost, file_agent, file_cfg, host_in_tempdir, logged_in, must, noise, start_agent,
    start_agent_with_env, uif,
};
use uve_e2e::names::valid;
use uve_protocol::message::{Request, Response, UpdateCause};

#[test]
fn pam_hook_opens_and_closes_sessions() {
    let (dir, host) = host_in_tempdir();
    let data = noise(300_000, 5);
    host.with(|h| h.seed("dave", &data));
    let agent = file_agent(dir.path());
    let hook = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/pam/uve-pam-hook");
    // Options come only from the pam_exec line (arguments); the PAM
    // environment, which pam_env may fill from the user's own files, is
    // ignored: these would point the hook at another binary, socket and
    // session.
    let run = |ty: &str| {
        Command::new("/bin/sh")
            .arg(&hook)
            .arg("--agent")
            .arg(common::agent_bin())
            .arg("--socket")
            .arg(&agent.socket)
            .env("PAM_TYPE", ty)
            .env("PAM_USER", "dave")
            .env("PAM_SERVICE", "sshd")
            .env("UVE_AGENT", "/bin/false")
            .env("UVE_SOCKET", dir.path().join("elsewhere.sock"))
            .env("UVE_SESSION", "pam session/1")
            .env("PATH", dir.path())
            .output()
            .unwrap()
    };
    let out = run("open_session");
    assert!(out.status.success(), "{out:?}");
    let st = agent.status();
    // "<user>-<service>-<pid of the PAM process>": this test process.
    let expected = format!("dave-sshd-{}", std::process::id());
    assert_eq!(st["sessions"][0]["session"], expected.as_str());
    assert_eq!(st["sessions"][0]["user"], "dave");
    let img = uif(dir.path(), "dave");
    assert_eq!(std::fs::read(&img).unwrap(), data);
    std::fs::write(&img, b"edited over ssh").unwrap();
    let out = run("close_session");
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("committed"));
    assert_eq!(host.head("dave").as_deref(), Some(&b"edited over ssh"[..]));
    assert!(run("auth").status.success());
}

#[test]
fn failed_retrieve_fails_login_or_runs_on_a_temporary_uif_that_never_wins() {
    // Default: login fails with a clear error.
    let (dir, host) = host_in_tempdir();
    let real = noise(200_000, 9);
    let head = host.with(|h| {
        h.unassigned.insert("erin".into());
        h.seed("erin", &real)
    });
    let mut agent = file_agent(dir.path());
    let out = agent.cli(&["login", "--user", "erin", "--session", "e1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("NotAssigned"), "{err}");
    assert!(agent.sessions().is_empty());
    // Invalid names are refused before anything happens: a spelling whose
    // name would exceed 128 bytes (`../root` is a valid spelling now: its
    // name, `~2e.~2froot`, is one safe path component), and a bad session.
    let long = "CORP\\".repeat(30);
    let out = agent.cli(&["login", "--user", &long, "--session", "e1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("user name is") && err.contains("limit is 128"),
        "{err}"
    );
    let out = agent.cli(&["login", "--user", "erin", "--session", "../e1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("session name"));
    agent.kill();

    // With on_retrieve_failure = "temporary": login proceeds on an empty
    // UIF; its update has no base and lands as a conflict version.
    let cfg = file_cfg(dir.path(), "on_retrieve_failure = \"temporary\"");
    let agent = start_agent(dir.path(), &cfg);
    agent.wait_connected();
    let out = agent.ok(&["login", "--user", "erin", "--session", "e2"]);
    assert!(out.contains("TEMPORARY"), "{out}");
    let img = uif(dir.path(), "erin");
    assert_eq!(std::fs::read(&img).unwrap(), b"");
    std::fs::write(&img, b"work done on the temporary profile").unwrap();
    host.with(|h| h.unassigned.clear());
    let out = agent.ok(&["logout", "--session", "e2"]);
    assert!(out.contains("conflict"), "{out}");
    let (now_head, last) = host.with(|h| (h.heads["erin"], h.commits.last().cloned().unwrap()));
    assert_eq!(now_head, head, "the real head must not move");
    assert_eq!(host.head("erin").unwrap(), real);
    assert!(last.conflict);
    assert_eq!(last.base, None);
}

#[test]
fn sigterm_flushes_open_sessions_and_exits_zero() {
    let (dir, host, mut agent) = logged_in("frank", b"before", "f1");
    let img = uif(dir.path(), "frank");
    std::fs::write(&img, b"after").unwrap();
    assert_eq!(agent.terminate(), Some(0));
    assert_eq!(host.head("frank").as_deref(), Some(&b"after"[..]));
    let c = host.last_commit();
    assert_eq!(c.cause, UpdateCause::Shutdown);
    // An agent restart is not the end of the session: it is re-announced,
    // and the later logout builds on the shutdown flush.
    let started = host.with(|h| h.sessions_started.len());
    agent.spawn().unwrap();
    agent.wait_connected();
    assert_eq!(agent.status()["sessions"][0]["session"], "f1");
    must("re-announced", LONG, || {
        (host.with(|h| h.sessions_started.len()) > started).then_some(())
    });
    std::fs::write(&img, b"after the restart").unwrap();
    let out = agent.ok(&["logout", "--session", "f1"]);
    assert!(out.contains("committed"), "{out}");
    let last = host.last_commit();
    assert_eq!(last.base, Some(c.version));
    assert!(!last.conflict);
    assert!(host.with(|h| h.sessions_ended.contains(&"f1".to_string())));
}

#[test]
fn host_restart_reannounces_sessions_then_user_release_flushes() {
    let (dir, host, agent) = logged_in("gina", b"gina v1", "g1");
    host.down();
    host.up();
    must("re-announce after reconnect", LONG, || {
        host.with(|h| {
            (h.connections >= 2 && h.sessions_started.iter().filter(|s| *s == "g1").count() >= 2)
                .then_some(())
        })
    });
    std::fs::write(uif(dir.path(), "gina"), b"gina v2").unwrap();
    let r = host
        .request(Request::UserRelease {
            user: valid("gina"),
            deadline_ms: 20_000,
        })
        .unwrap();
    let Response::Released { committed: Some(v) } = r else {
        panic!("{r:?}")
    };
    assert_eq!(host.with(|h| h.heads["gina"]), v);
    assert_eq!(host.head("gina").as_deref(), Some(&b"gina v2"[..]));
    let c = host.last_commit();
    assert_eq!(c.cause, UpdateCause::Release);
    assert!(agent.sessions().is_empty());
    // Nothing left to release: answered with no version.
    let r = host
        .request(Request::UserRelease {
            user: valid("gina"),
            deadline_ms: 5_000,
        })
        .unwrap();
    assert_eq!(r, Response::Released { committed: None });
}

#[test]
fn connection_reset_mid_update_is_spooled_and_retried() {
    let (dir, host, agent) = logged_in("hank", &noise(600_000, 1), "h1");
    let new = noise(900_000, 2);
    std::fs::write(uif(dir.path(), "hank"), &new).unwrap();
    host.with(|h| h.drop_on_upload = true);
    let out = agent.ok(&["logout", "--session", "h1"]);
    assert!(out.contains("spooled"), "{out}");
    host.wait_head("retried update committed", "hank", &new);
    let c = host.last_commit();
    assert_eq!(c.cause, UpdateCause::Spooled);
    assert!(!c.conflict);
    agent.wait_spool_empty();
}

#[test]
fn checkpoints_commit_while_the_session_runs() {
    let (dir, host) = host_in_tempdir();
    host.with(|h| h.seed("ivan", b"start"));
    let agent = start_agent(
        dir.path(),
        &file_cfg(dir.path(), "checkpoint_interval_secs = 1"),
    );
    agent.wait_connected();
    agent.ok(&["login", "--user", "ivan", "--session", "i1"]);
    let img = uif(dir.path(), "ivan");
    std::fs::write(&img, b"midway").unwrap();
    let cp = must("checkpoint commit", LONG, || {
        host.with(|h| {
            h.commits
                .iter()
                .find(|c| c.cause == UpdateCause::Checkpoint && !c.conflict)
                .filter(|c| h.version_bytes("ivan", c.version).as_deref() == Some(&b"midway"[..]))
                .cloned()
        })
    });
    assert_eq!(agent.status()["sessions"][0]["session"], "i1");
    std::fs::write(&img, b"the end").unwrap();
    let out = agent.ok(&["logout", "--session", "i1"]);
    let last = host.last_commit();
    assert!(!last.conflict);
    assert!(last.base >= Some(cp.version), "based on a checkpoint");
    if out.contains("committed as version") {
        // The usual order: the logout flush committed the final content.
        assert_eq!(last.cause, UpdateCause::Logout, "{out}");
        assert!(
            out.contains(&format!("committed as version {}", last.version)),
            "{out}"
        );
    } else {
        // A checkpoint fired between the write and the logout and already
        // committed the final content: the logout then has nothing to add,
        // and says which version holds it.
        assert_eq!(last.cause, UpdateCause::Checkpoint, "{out}");
        assert!(
            out.contains(&format!(
                "unchanged since version {}; nothing committed",
                last.version
            )),
            "{out}"
        );
    }
    assert_eq!(host.head("ivan").as_deref(), Some(&b"the end"[..]));
}

#[test]
fn sighup_reloads_the_host_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let host_a = TestHost::start(dir.path());
    let host_b = TestHost::start(dir_b.path());
    let agent = start_agent(dir.path(), "");
    agent.wait_connected();
    // Point the agent at host B and reload.
    let text = std::fs::read_to_string(&agent.config).unwrap().replace(
        &TestHost::socket_path(dir.path()).display().to_string(),
        &TestHost::socket_path(dir_b.path()).display().to_string(),
    );
    std::fs::write(&agent.config, text).unwrap();
    // SAFETY: signalling the agent process this test started.
    unsafe {
        libc::kill(agent.pid().unwrap() as i32, libc::SIGHUP);
    }
    must("reload logged", LONG, || {
        std::fs::read_to_string(dir.path().join("agent.log"))
            .unwrap()
            .contains("configuration reloaded")
            .then_some(())
    });
    assert_eq!(host_b.with(|h| h.connections), 0);
    host_a.down();
    must("agent on host B", LONG, || {
        (host_b.with(|h| h.connections) == 1).then_some(())
    });
    if let Some(kib) = common::status_kib(agent.pid().unwrap(), "VmRSS") {
        eprintln!(
            "agent RSS while connected and idle: {kib} KiB ({})",
            common::agent_bin().display()
        );
    }
}

#[test]
fn lost_notice_ack_is_redelivered_with_the_same_id() {
    let (dir, host) = host_in_tempdir();
    let agent = file_agent(dir.path());
    agent.ok(&["login", "--user", "jane", "--session", "j1"]);
    host.with(|h| h.drop_after_notice = true);
    agent.ok(&["disconnect", "--session", "j1", "--reason", "network cable"]);
    must("notice redelivered and acknowledged", LONG, || {
        (agent.status()["pending_notices"] == 0
            && host.with(|h| h.notices.values().any(|n| *n >= 2)))
        .then_some(())
    });
    let (ids, events) = host.with(|h| (h.notices.clone(), h.notice_sessions.clone()));
    assert_eq!(ids.len(), 1, "one notice id: {ids:?}");
    assert_eq!(events.len(), 1, "one event after dedupe: {events:?}");
    assert_eq!(events[0].1, "j1");
}

#[test]
fn a_session_start_the_host_is_too_busy_for_is_announced_again() {
    let (dir, host) = host_in_tempdir();
    let agent = file_agent(dir.path());
    // The host's rate bound answers the first two announcements Busy.
    host.with(|h| h.busy_session_starts = 2);
    agent.ok(&["login", "--user", "lena", "--session", "l1"]);
    must("session announced after the host was busy", LONG, || {
        host.with(|h| h.sessions_started.contains(&"l1".to_string()))
            .then_some(())
    });
    assert_eq!(host.with(|h| h.busy_session_starts), 0);
}

#[test]
fn sigterm_with_host_down_spools_and_delivers_after_restart() {
    let (dir, host, mut agent) = logged_in("kim", b"kim v1", "k1");
    let out = agent.cli(&[
        "login",
        "--user",
        "kim",
        "--session",
        "k2",
        "--ua",
        "missing",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not deployed"));
    let img = uif(dir.path(), "kim");
    std::fs::write(&img, b"kim v2").unwrap();
    host.down();
    assert_eq!(agent.terminate(), Some(0));
    agent.spawn().unwrap();
    assert_eq!(agent.status()["spooled_updates"], 1);
    // The session goes on and writes more before the host is back: the
    // spooled snapshot is stale, the newest content is delivered.
    std::fs::write(&img, b"kim v3, written after the restart").unwrap();
    host.up();
    host.wait_head(
        "delivered after restart",
        "kim",
        b"kim v3, written after the restart",
    );
    let c = host.last_commit();
    assert_eq!(c.cause, UpdateCause::Spooled);
    assert!(!c.conflict);
    agent.wait_spool_empty();
    std::fs::write(&img, b"kim v4").unwrap();
    let out = agent.ok(&["logout", "--session", "k1"]);
    assert!(out.contains("committed"), "{out}");
    let last = host.last_commit();
    assert_eq!(
        last.base,
        Some(c.version),
        "logout builds on the spooled commit"
    );
    assert!(!last.conflict);
    assert_eq!(
        host.with(|h| h.commits.iter().filter(|c| c.conflict).count()),
        0
    );
}

#[test]
fn sessions_from_a_previous_boot_are_reported_and_flushed() {
    let (dir, host, mut agent) = logged_in("lea", b"lea v1", "l1");
    std::fs::write(uif(dir.path(), "lea"), b"lea v2, written before the crash").unwrap();
    agent.kill();
    // Pretend the table was written during another boot of the VM.
    let table = agent.state.join("sessions.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&table).unwrap()).unwrap();
    assert!(v["kernel_boot"].is_string(), "{v}");
    v["kernel_boot"] = "an-earlier-boot".into();
    std::fs::write(&table, serde_json::to_vec(&v).unwrap()).unwrap();
    agent.spawn().unwrap();
    host.wait_notice("stale session reported", "l1");
    host.wait_head(
        "UIF from before the crash committed",
        "lea",
        b"lea v2, written before the crash",
    );
    assert!(agent.sessions().is_empty());
    let c = host.last_commit();
    assert_eq!(c.cause, UpdateCause::Disconnect);
}

/// The agent SIGKILLed at each instant of a logout (the session marked
/// ending; the update chunked and spooled; the host's commit answer
/// arrived but not recorded), restarted, and the logout retried as a PAM
/// hook would: the work becomes the head exactly once, with no conflict
/// version, and the retried logout reports that commit.
#[test]
fn a_logout_cut_by_a_crash_at_any_step_commits_exactly_once() {
    for (i, point) in ["logout-ending", "flush-journalled", "flush-committed"]
        .into_iter()
        .enumerate()
    {
        let (dir, host) = host_in_tempdir();
        let fault = format!("{point}=1");
        let mut agent = start_agent_with_env(
            dir.path(),
            &file_cfg(dir.path(), ""),
            &[("UVE_AGENT_FAULTS", fault.as_str())],
        );
        agent.wait_connected();
        agent.ok(&["login", "--user", "kit", "--session", "k1"]);
        let mine = noise(300_000, 70 + i as u64);
        std::fs::write(uif(dir.path(), "kit"), &mine).unwrap();
        let cut = agent.cli(&["logout", "--session", "k1"]);
        assert!(!cut.status.success(), "{point}: the logout was not cut");
        // The restarted agent runs without the fault.
        agent.env.clear();
        agent.restart_connected();
        let out = agent.ok(&["logout", "--session", "k1"]);
        assert!(out.contains("committed as version"), "{point}: {out}");
        must("the head", LONG, || {
            host.with(|h| (h.head_bytes("kit") == Some(mine.clone())).then_some(()))
        });
        agent.wait_spool_empty();
        let (commits, conflicts) = host.with(|h| {
            let of_kit = h.commits.iter().filter(|c| c.user == "kit");
            (
                of_kit.clone().filter(|c| !c.conflict).count(),
                of_kit.filter(|c| c.conflict).count(),
            )
        });
        assert_eq!((commits, conflicts), (1, 0), "{point}: commits, conflicts");
        assert!(agent.sessions().is_empty(), "{point}: the session ended");
    }
}
