//! Malformed requests against the real daemon: every kind the HTTP layer
//! refuses before a handler (a path or query value of the wrong type or
//! negative, a body that is not JSON, of the wrong shape, missing a field,
//! with an unknown field, over the size limit or without the JSON content
//! type, an unknown path, a method the path does not serve) is answered
//! with the API's JSON error body, the status host/API.md documents and a
//! stable code; an import
//! needs a body unless `?empty=true` says an empty UIF is meant, and
//! `uvectl import` of an empty file says so. Requests are written by hand
//! on the API socket, so the headers are exactly the ones each case needs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::HostProc;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// An answer read off the socket.
#[derive(Debug)]
struct Raw {
    status: u16,
    /// Header lines, names lowercased.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// Sends `method path` with the extra header lines `headers` and `body`
/// (a `content-length` is added only when `body` is given) and reads the
/// whole answer (`connection: close`).
async fn raw(
    host: &HostProc,
    method: &str,
    path: &str,
    headers: &[&str],
    body: Option<&[u8]>,
) -> Raw {
    let mut s = UnixStream::connect(host.api_socket()).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: uve-host\r\nconnection: close\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    if let Some(b) = body {
        req.push_str(&format!("content-length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    // The daemon may answer (413) and close before it has read a large
    // body: the rest of the body then meets a closed socket, and the
    // answer is still there to read, followed by a reset instead of the
    // end of the stream (what was read is kept either way).
    let _ = s.write_all(body.unwrap_or_default()).await;
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer).await;
    parse(&answer)
}

fn parse(answer: &[u8]) -> Raw {
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header block");
    let head = String::from_utf8_lossy(&answer[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body = answer[split + 4..].to_vec();
    assert!(
        headers.iter().all(|(k, _)| k != "transfer-encoding"),
        "error answers have a length: {head}"
    );
    Raw {
        status,
        headers,
        body,
    }
}

/// Asserts `a` is the API's JSON error with this status and code.
fn assert_error(what: &str, a: &Raw, status: u16, code: &str) {
    assert_eq!(a.status, status, "{what}: {a:?}");
    assert_eq!(
        a.header("content-type"),
        Some("application/json"),
        "{what}: {a:?}"
    );
    let v = a.json();
    assert_eq!(v["error"], json!(code), "{what}: {v}");
    assert!(
        v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {v}"
    );
    assert_eq!(v.as_object().map(|o| o.len()), Some(2), "{what}: {v}");
}

const JSON: &str = "content-type: application/json";

async fn imported(host: &HostProc, user: &str, body: &[u8]) -> Value {
    let a = raw(
        host,
        "POST",
        &format!("/v1/users/{user}/import"),
        &[],
        Some(body),
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    a.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_paths_and_queries_get_the_json_error() {
    let host = HostProc::temp("").await;
    imported(&host, "alice", b"home").await;
    for (path, what) in [
        ("/v1/users/alice/versions/-1/export", "negative version"),
        (
            "/v1/users/alice/versions/one/export",
            "version not a number",
        ),
        (
            "/v1/users/alice/versions/99999999999999999999/export",
            "version over u64",
        ),
        ("/v1/events?since=-1&follow=false", "negative since"),
        ("/v1/events?since=x&follow=false", "since not a number"),
        ("/v1/events?follow=maybe", "follow not a boolean"),
        ("/v1/sessions?vm=a%2Fb", "VM name with a slash"),
    ] {
        let a = raw(&host, "GET", path, &[], None).await;
        let code = if what.contains("name") {
            "invalid_name"
        } else {
            "bad_request"
        };
        assert_error(what, &a, 400, code);
    }
    let a = raw(&host, "POST", "/v1/gc?grace_secs=-1", &[], None).await;
    assert_error("negative grace_secs", &a, 400, "bad_request");
    let a = raw(
        &host,
        "POST",
        "/v1/users/alice/import?empty=maybe",
        &[],
        Some(b"x"),
    )
    .await;
    assert_error("empty not a boolean", &a, 400, "bad_request");
    let a = raw(&host, "GET", "/v1/users/.hidden/versions", &[], None).await;
    assert_error("hidden user name", &a, 400, "invalid_name");
    let a = raw(&host, "GET", "/v1/vms/-vm", &[], None).await;
    assert_error("VM id starting with -", &a, 400, "invalid_name");
    // The well-formed requests still work.
    let a = raw(&host, "GET", "/v1/users/alice/versions/1/export", &[], None).await;
    assert_eq!((a.status, a.body.as_slice()), (200, &b"home"[..]));
    let a = raw(&host, "POST", "/v1/gc?grace_secs=0", &[], None).await;
    assert_eq!(a.status, 200, "{a:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_get_the_json_error() {
    let host = HostProc::temp("").await;
    imported(&host, "alice", b"v1").await;
    imported(&host, "alice", b"v2").await;
    let rollback = "/v1/users/alice/rollback";
    for (body, what) in [
        (&b"{"[..], "truncated JSON"),
        (b"", "no JSON at all"),
        (b"[1]", "an array"),
        (br#"{"version": "one"}"#, "a string for an integer"),
        (br#"{"version": -1}"#, "a negative version"),
        (br#"{"version": 1.5}"#, "a fraction"),
        (b"{}", "the version missing"),
        (br#"{"version": 1, "force": true}"#, "an unknown field"),
    ] {
        let a = raw(&host, "POST", rollback, &[JSON], Some(body)).await;
        assert_error(what, &a, 400, "bad_request");
    }
    let vm = br#"{"id": "vm1", "cid": 3, "unix": "vm1.sock"}"#;
    let a = raw(&host, "POST", "/v1/vms", &[JSON], Some(vm)).await;
    assert_error("two transports", &a, 400, "bad_request");
    let a = raw(
        &host,
        "POST",
        "/v1/vms",
        &[JSON],
        Some(br#"{"id": "vm1", "unix": ""}"#),
    )
    .await;
    assert_error("an empty socket path", &a, 400, "bad_request");
    let a = raw(
        &host,
        "POST",
        rollback,
        &["content-type: text/plain"],
        Some(br#"{"version": 1}"#),
    )
    .await;
    assert_error("text/plain", &a, 415, "unsupported_media_type");
    let a = raw(&host, "POST", rollback, &[], Some(br#"{"version": 1}"#)).await;
    assert_error("no content type", &a, 415, "unsupported_media_type");
    let big = format!(r#"{{"version": 1, "pad": "{}"}}"#, "x".repeat(3 << 20));
    let a = raw(&host, "POST", rollback, &[JSON], Some(big.as_bytes())).await;
    assert_error("a JSON body over 2 MiB", &a, 413, "too_large");
    // An integer written with a zero fraction is that integer (JSON Schema).
    let a = raw(
        &host,
        "POST",
        rollback,
        &[JSON],
        Some(br#"{"version": 1.0}"#),
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.json()["copied_from"], json!(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_methods_get_the_json_error() {
    let host = HostProc::temp("").await;
    for path in ["/v1/nope", "/v2/vms", "/v1/vms/vm1/frobnicate", "/"] {
        let a = raw(&host, "GET", path, &[], None).await;
        assert_error(path, &a, 404, "not_found");
    }
    for (method, path, allow) in [
        ("PATCH", "/v1/vms", "GET,HEAD,POST"),
        ("DELETE", "/v1/users", "GET,HEAD"),
        ("GET", "/v1/gc", "POST"),
        ("PUT", "/v1/vms/vm1", "GET,HEAD,DELETE"),
    ] {
        let a = raw(&host, method, path, &[], None).await;
        assert_error(&format!("{method} {path}"), &a, 405, "method_not_allowed");
        let mut got: Vec<&str> = a
            .header("allow")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .collect();
        let mut want: Vec<&str> = allow.split(',').collect();
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got, want, "Allow of {path}");
    }
}

fn versions(v: &Value) -> usize {
    v["versions"].as_array().map_or(0, Vec::len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_needs_a_body_unless_it_says_empty() {
    let host = HostProc::temp("").await;
    let import = "/v1/users/bob/import";
    let octets = "content-type: application/octet-stream";
    // No body at all (no content-length), and an explicitly empty one.
    let a = raw(&host, "POST", import, &[], None).await;
    assert_error("no body", &a, 400, "bad_request");
    assert!(a.json()["message"].as_str().unwrap().contains("empty=true"));
    let a = raw(&host, "POST", import, &[octets], Some(b"")).await;
    assert_error("content-length 0", &a, 400, "bad_request");
    let a = raw(
        &host,
        "POST",
        &format!("{import}?empty=false"),
        &[octets],
        Some(b""),
    )
    .await;
    assert_error("empty=false", &a, 400, "bad_request");
    let chunked = ["transfer-encoding: chunked", octets];
    let mut s = UnixStream::connect(host.api_socket()).await.unwrap();
    let head = format!(
        "POST {import} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{}\r\n{}\r\n\r\n0\r\n\r\n",
        chunked[0], chunked[1]
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).await.unwrap();
    assert_error("chunked, no chunk", &parse(&answer), 400, "bad_request");
    let (_, v) = host.get("/v1/users/bob/versions").await;
    assert_eq!(
        (versions(&v), v["head"].clone()),
        (0, Value::Null),
        "nothing stored: {v}"
    );

    // With empty=true an empty body is an empty UIF.
    let a = raw(
        &host,
        "POST",
        &format!("{import}?empty=true"),
        &[octets],
        Some(b""),
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    let v = a.json();
    assert_eq!(
        (v["size"].clone(), v["chunks"].clone()),
        (json!(0), json!(0)),
        "{v}"
    );
    let (_, list) = host.get("/v1/users/bob/versions").await;
    assert_eq!(
        (versions(&list), list["head"].clone()),
        (1, v["version"].clone())
    );
    // empty=true does not refuse a body that has bytes.
    let a = raw(
        &host,
        "POST",
        &format!("{import}?empty=true"),
        &[octets],
        Some(b"uif"),
    )
    .await;
    assert_eq!(
        (a.status, a.json()["size"].clone()),
        (200, json!(3)),
        "{a:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uvectl_imports_an_empty_file_as_an_empty_uif() {
    let host = HostProc::temp("").await;
    let empty = host.data.join("empty.uif");
    std::fs::write(&empty, b"").unwrap();
    let full = host.data.join("full.uif");
    std::fs::write(&full, b"not empty").unwrap();
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let v = host.ok(&["import", "carol", &path(&empty)]);
    assert_eq!(
        (v["size"].clone(), v["version"].clone()),
        (json!(0), json!(1))
    );
    let v = host.ok(&["import", "carol", &path(&full)]);
    assert_eq!(
        (v["size"].clone(), v["version"].clone()),
        (json!(9), json!(2))
    );
}
