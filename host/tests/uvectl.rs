//! `uvectl` against the real daemon: tables, `--json`, import/export round
//! trip, and the documented exit codes (0 ok, 1 error, 2 usage, 3 not
//! found, 4 conflict, 5 VM not connected).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Output};

use common::{HostProc, noise};

fn uvectl(host: &HostProc, args: &[&str]) -> Output {
    host.uvectl_output(args).unwrap()
}

/// Runs each `uvectl` command in turn and checks its exit code.
fn exit_codes(host: &HostProc, cases: &[(&[&str], i32)]) {
    for (args, code) in cases {
        assert_eq!(uvectl(host, args).status.code(), Some(*code), "{args:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uvectl_drives_the_api_with_documented_exit_codes() {
    let host = HostProc::temp("").await;
    let sock = host.data.join("vm1.sock");
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
    exit_codes(
        &host,
        &[
            (&["vm", "show", "nope"], 3),
            (&["vm", "status", "vm1"], 5),
            (&["vm", "frobnicate"], 2),
            (&["assign", "alice", "vm1"], 0),
            (&["assign", "bob", "ghost"], 3),
        ],
    );

    let uif = host.data.join("alice.uif");
    let data = noise(1_500_000, 40);
    std::fs::write(&uif, &data).unwrap();
    let out = uvectl(&host, &["import", "alice", uif.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let back = host.data.join("back.uif");
    let out = uvectl(
        &host,
        &["export", "alice", "1", "-o", back.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(std::fs::read(&back).unwrap() == data);
    exit_codes(
        &host,
        &[
            (&["export", "alice", "9"], 3),
            (&["import", "alice", uif.to_str().unwrap()], 0),
            (&["rollback", "alice", "1"], 0),
        ],
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
    exit_codes(&host, &[(&["gc", "--grace-secs", "0"], 0)]);
    // a dead socket is a plain error
    let out = Command::new(env!("CARGO_BIN_EXE_uvectl"))
        .args(["--socket", "/nonexistent/api.sock", "vm", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}
