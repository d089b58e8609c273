//! `uvectl` against the real daemon: tables, `--json`, import/export round
//! trip, and the documented exit codes (0 ok, 1 error, 2 usage, 3 not
//! found, 4 conflict, 5 VM not connected).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Output};

use common::{HostProc, noise};

fn uvectl(host: &HostProc, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_uvectl"))
        .arg("--socket")
        .arg(host.data.join("api.sock"))
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uvectl_drives_the_api_with_documented_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let host = HostProc::start(dir.path(), "").await;
    let sock = dir.path().join("vm1.sock");
    let out = uvectl(
        &host,
        &["vm", "add", "vm1", "--unix", sock.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = uvectl(&host, &["vm", "add", "vm1", "--unix", "/tmp/other.sock"]);
    assert_eq!(out.status.code(), Some(4), "duplicate VM is a conflict");
    let out = uvectl(&host, &["vm", "list"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("ID") || table.contains("ID"), "{table}");
    assert!(table.contains("vm1"));
    let out = uvectl(&host, &["--json", "vm", "list"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["id"], "vm1");
    assert_eq!(
        uvectl(&host, &["vm", "show", "nope"]).status.code(),
        Some(3)
    );
    assert_eq!(
        uvectl(&host, &["vm", "status", "vm1"]).status.code(),
        Some(5)
    );
    assert_eq!(uvectl(&host, &["vm", "frobnicate"]).status.code(), Some(2));
    assert_eq!(
        uvectl(&host, &["assign", "alice", "vm1"]).status.code(),
        Some(0)
    );
    assert_eq!(
        uvectl(&host, &["assign", "bob", "ghost"]).status.code(),
        Some(3)
    );

    let uif = dir.path().join("alice.uif");
    let data = noise(1_500_000, 40);
    std::fs::write(&uif, &data).unwrap();
    let out = uvectl(&host, &["import", "alice", uif.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let back = dir.path().join("back.uif");
    let out = uvectl(
        &host,
        &["export", "alice", "1", "-o", back.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(std::fs::read(&back).unwrap() == data);
    assert_eq!(
        uvectl(&host, &["export", "alice", "9"]).status.code(),
        Some(3)
    );
    let out = uvectl(&host, &["import", "alice", uif.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        uvectl(&host, &["rollback", "alice", "1"]).status.code(),
        Some(0)
    );
    let out = uvectl(&host, &["--json", "versions", "alice"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["head"], 3);
    let out = uvectl(&host, &["events"]);
    let events = String::from_utf8_lossy(&out.stdout);
    assert!(
        events.lines().any(|l| l.contains("\"kind\":\"rollback\"")),
        "{events}"
    );
    let out = uvectl(&host, &["metrics"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("uve_commits_total"));
    assert_eq!(
        uvectl(&host, &["gc", "--grace-secs", "0"]).status.code(),
        Some(0)
    );
    // a dead socket is a plain error
    let out = Command::new(env!("CARGO_BIN_EXE_uvectl"))
        .args(["--socket", "/nonexistent/api.sock", "vm", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}
