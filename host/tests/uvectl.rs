//! `uvectl` against the real daemon: tables, `--json`, import/export round
//! trip, and the documented exit codes (0 ok, 1 error, 2 usage, 3 not
//! found, 4 conflict, 5 VM not connected). The tables' times are checked
//! against `date` in the same time zone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Output};

use common::{HostProc, noise};
use serde_json::Value;
use uve_e2e::names::valid;
use uve_protocol::message::{Request, Response};

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

/// `uvectl ARGS` in table form with the time zone `tz` (`None`: no `TZ`,
/// so `/etc/localtime`); its stdout lines.
fn table(host: &HostProc, tz: Option<&str>, args: &[&str]) -> Vec<String> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_uvectl"));
    cmd.arg("--socket").arg(host.api_socket()).args(args);
    match tz {
        Some(tz) => cmd.env("TZ", tz),
        None => cmd.env_remove("TZ"),
    };
    let out = tokio::task::block_in_place(|| cmd.output()).unwrap();
    assert_eq!(out.status.code(), Some(0), "uvectl {args:?}: {out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// What `date` prints for the Unix time `ms` (milliseconds) in `tz`.
fn date(tz: Option<&str>, ms: u64) -> String {
    let mut cmd = Command::new("date");
    cmd.arg("-d")
        .arg(format!("@{}", ms / 1000))
        .arg("+%Y-%m-%d %H:%M:%S");
    match tz {
        Some(tz) => cmd.env("TZ", tz),
        None => cmd.env_remove("TZ"),
    };
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn heads(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

/// A table's cell: the text under `head` in line `row`. Cells are two or
/// more spaces apart and hold no two spaces in a row themselves, and no
/// cell is empty (`-` stands for no value).
fn cell<'a>(lines: &'a [String], head: &str, row: usize) -> &'a str {
    let cells = |l: &'a str| -> Vec<&'a str> {
        l.split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect()
    };
    let heads = cells(&lines[0]);
    let row = cells(&lines[row]);
    assert_eq!(row.len(), heads.len(), "{lines:?}");
    let i = heads.iter().position(|h| *h == head).unwrap();
    row[i]
}

/// `versions alice` in `tz`, against its JSON form `json`; returns the
/// CREATED cell.
fn versions_table(host: &HostProc, tz: Option<&str>, json: &Value) -> String {
    let v = table(host, tz, &["versions", "alice"]);
    assert_eq!(v[0], "head: 1");
    let rows = &v[1..];
    assert_eq!(
        heads(&rows[0]),
        [
            "VERSION", "KIND", "CREATED", "SIZE", "CHUNKS", "BASE", "ORIGIN", "DIGEST"
        ]
    );
    assert_eq!(rows.len(), 2, "{v:?}");
    let first = &json["versions"][0];
    let created = first["created_ms"].as_u64().unwrap();
    assert_eq!(cell(rows, "VERSION", 1), "1");
    assert_eq!(cell(rows, "KIND", 1), "committed");
    assert_eq!(cell(rows, "CREATED", 1), date(tz, created), "TZ={tz:?}");
    assert_eq!(cell(rows, "SIZE", 1), "1.4 MiB");
    assert_eq!(cell(rows, "CHUNKS", 1), first["chunk_count"].to_string());
    assert_eq!(cell(rows, "BASE", 1), "-");
    assert_eq!(cell(rows, "ORIGIN", 1), "vm:vm1");
    assert_eq!(cell(rows, "DIGEST", 1), first["digest"].as_str().unwrap());
    // SIZE and CHUNKS are right-aligned: they end where their headings end.
    for head in ["SIZE", "CHUNKS"] {
        let end = rows[0].find(head).unwrap() + head.len();
        assert!(rows[1][..end].ends_with(cell(rows, head, 1)), "{v:?}");
    }
    cell(rows, "CREATED", 1).to_string()
}

/// `sessions` in `tz`: alice's `s1` on vm1 with UA desk, started at `ms`.
fn sessions_table(host: &HostProc, tz: Option<&str>, ms: u64) {
    let s = table(host, tz, &["sessions"]);
    assert_eq!(heads(&s[0]), ["VM", "SESSION", "USER", "UA", "STARTED"]);
    assert_eq!(s.len(), 2, "{s:?}");
    for (head, want) in [
        ("VM", "vm1"),
        ("SESSION", "s1"),
        ("USER", "alice"),
        ("UA", "desk"),
    ] {
        assert_eq!(cell(&s, head, 1), want);
    }
    assert_eq!(cell(&s, "STARTED", 1), date(tz, ms));
}

/// `vm list` in `tz`: vm1 (Unix socket) connected at `ms`, vm2 (CID 7)
/// not connected.
fn vms_table(host: &HostProc, tz: Option<&str>, ms: u64) {
    let m = table(host, tz, &["vm", "list"]);
    assert_eq!(
        heads(&m[0]),
        [
            "ID",
            "CONNECTED",
            "SINCE",
            "AGENT",
            "CID",
            "UDS_PATH",
            "PORT",
            "UNIX",
            "LISTEN_PATH"
        ]
    );
    assert_eq!(m.len(), 3, "{m:?}");
    let sock = host.data.join("vm1.sock");
    let sock = sock.to_str().unwrap();
    for (row, want) in [
        (
            1,
            [
                "vm1",
                "yes",
                &date(tz, ms),
                "test-agent",
                "-",
                "-",
                "-",
                sock,
                sock,
            ],
        ),
        (2, ["vm2", "no", "-", "-", "7", "-", "-", "-", "-"]),
    ] {
        let heads = heads(&m[0]);
        let got: Vec<&str> = heads.iter().map(|h| cell(&m, h, row)).collect();
        assert_eq!(got, want, "{m:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uvectl_tables_put_the_identifier_first_with_local_times_and_binary_sizes() {
    let (host, _, agent) = HostProc::with_agent("", "vm1", &["alice"]).await;
    let out = tokio::task::block_in_place(|| uvectl(&host, &["vm", "add", "vm2", "--cid", "7"]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    agent.retrieve("alice", "s1").await.unwrap();
    let data = noise(1_500_000, 7);
    let r = agent.update_from_lease("alice", &data).await.unwrap();
    assert_eq!(r.answer, Response::Committed { version: 1 });
    let started = Request::SessionStarted {
        session: valid("s1"),
        user: valid("alice"),
        ua: Some(valid("desk")),
    };
    assert_eq!(agent.request(started).await.unwrap(), Response::Ok);

    let json = |args: &[&str]| -> Value {
        let out = tokio::task::block_in_place(|| uvectl(&host, args));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let versions = json(&["--json", "versions", "alice"]);
    let connected = json(&["--json", "vm", "list"])[0]["connection"]["connected_ms"]
        .as_u64()
        .unwrap();
    let started = json(&["--json", "sessions"])[0]["started_ms"]
        .as_u64()
        .unwrap();

    // The same instants in three zones: the system's, UTC, and one 5:30
    // ahead of it (a POSIX TZ string, so no zone database is needed).
    let mut created = Vec::new();
    for tz in [None, Some("UTC0"), Some("IST-5:30")] {
        created.push(versions_table(&host, tz, &versions));
        sessions_table(&host, tz, started);
        vms_table(&host, tz, connected);
    }
    assert_ne!(created[1], created[2], "TZ is honoured");

    let u = table(&host, None, &["users"]);
    assert_eq!(
        u,
        [
            "USER   HEAD  ASSIGNED_TO  LEASE".to_string(),
            "alice  1     vm1          vm1 (epoch 1)".to_string(),
        ]
    );
}
