//! Golden test of the API's JSON: a sample of every request, answer and
//! error type with the exact object the daemon sent for it before the
//! types existed (`uvectl --json`, tests/ and operators' scripts parse
//! it). `openapi_check` validates the same samples against the schemas of
//! host/openapi.json.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Debug;
use std::path::PathBuf;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::*;

/// A sample: its schema in host/openapi.json, its JSON, the JSON wanted.
pub(crate) type Sample = (&'static str, Value, Value);

fn case<T>(schema: &'static str, t: T, want: Value) -> Sample
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let got = serde_json::to_value(&t).unwrap();
    let back: T = serde_json::from_value(got.clone()).unwrap();
    assert_eq!(back, t, "{schema} round trip");
    (schema, got, want)
}

fn s(x: &str) -> String {
    x.to_string()
}

fn conn() -> ConnSummary {
    ConnSummary {
        conn_id: 2,
        agent_version: s("0.1.0"),
        capabilities: 3,
        boot_id: s("00ff"),
        protocol: 2,
        connected_ms: 1000,
    }
}

fn conn_json() -> Value {
    json!({"conn_id": 2, "agent_version": "0.1.0", "capabilities": 3, "boot_id": "00ff",
           "protocol": 2, "connected_ms": 1000})
}

fn vm(connection: Option<ConnSummary>) -> VmInfo {
    VmInfo {
        id: s("vm1"),
        cid: None,
        uds_path: Some(PathBuf::from("/run/vm1/v.sock")),
        port: None,
        unix: None,
        listen_path: Some(PathBuf::from("/run/vm1/v.sock_7075")),
        connected: connection.is_some(),
        connection,
    }
}

fn vm_json(connection: Value) -> Value {
    json!({"id": "vm1", "cid": null, "uds_path": "/run/vm1/v.sock", "port": null, "unix": null,
           "listen_path": "/run/vm1/v.sock_7075", "connected": !connection.is_null(),
           "connection": connection})
}

fn session() -> SessionRec {
    SessionRec {
        vm: s("vm1"),
        session: s("S-1"),
        user: s("alice"),
        ua: None,
        started_ms: 5,
    }
}

fn vms() -> Vec<Sample> {
    let mut detail = vm_json(conn_json());
    detail["sessions"] = json!([{"vm": "vm1", "session": "S-1", "user": "alice", "ua": null,
                                 "started_ms": 5}]);
    detail["assigned_users"] = json!(["alice"]);
    vec![
        case(
            "VmSpec",
            VmSpec {
                id: s("vm2"),
                cid: None,
                uds_path: None,
                port: None,
                unix: Some(PathBuf::from("/tmp/vm2.sock")),
            },
            json!({"id": "vm2", "unix": "/tmp/vm2.sock"}),
        ),
        case("VmInfo", vm(None), vm_json(Value::Null)),
        case("VmInfo", vm(Some(conn())), vm_json(conn_json())),
        case(
            "VmDetail",
            VmDetail {
                vm: vm(Some(conn())),
                sessions: vec![session()],
                assigned_users: vec![s("alice")],
            },
            detail,
        ),
        case(
            "Assignments",
            Assignments::from([(s("alice"), s("vm1"))]),
            json!({"alice": "vm1"}),
        ),
        case(
            "AssignBody",
            AssignBody { vm: s("vm2") },
            json!({"vm": "vm2"}),
        ),
        case(
            "AssignOutcome",
            AssignOutcome {
                user: s("alice"),
                vm: Some(s("vm2")),
                previous: Some(s("vm1")),
                release_requested_from: Some(s("vm1")),
            },
            json!({"user": "alice", "vm": "vm2", "previous": "vm1",
                   "release_requested_from": "vm1"}),
        ),
        case(
            "AssignOutcome",
            AssignOutcome {
                user: s("alice"),
                vm: None,
                previous: Some(s("vm1")),
                release_requested_from: None,
            },
            json!({"user": "alice", "vm": null, "previous": "vm1",
                   "release_requested_from": null}),
        ),
    ]
}

fn version() -> VersionInfo {
    VersionInfo {
        version: 2,
        kind: VersionKind::Conflict,
        created_ms: 9,
        size: 100,
        digest: s("ab"),
        chunk_count: 1,
        base: Some(1),
        origin: s("vm:vm1"),
    }
}

fn users() -> Vec<Sample> {
    let lease = UserLease {
        epoch: 4,
        vm: s("vm1"),
        past: vec![s("vm0")],
        granted: Some(Granted {
            base: Some(1),
            at_ms: 7,
        }),
    };
    vec![
        case(
            "UserRow",
            UserRow {
                user: s("alice"),
                head: Some(1),
                assigned_to: Some(s("vm1")),
                lease: Some(lease),
            },
            json!({"user": "alice", "head": 1, "assigned_to": "vm1",
                   "lease": {"epoch": 4, "vm": "vm1", "past": ["vm0"],
                             "granted": {"base": 1, "at_ms": 7}}}),
        ),
        case(
            "UserRow",
            UserRow {
                user: s("bob"),
                head: None,
                assigned_to: None,
                lease: None,
            },
            json!({"user": "bob", "head": null, "assigned_to": null, "lease": null}),
        ),
        case(
            "VersionList",
            VersionList {
                head: Some(1),
                versions: vec![version()],
            },
            json!({"head": 1, "versions": [{"version": 2, "kind": "conflict", "created_ms": 9,
                   "size": 100, "digest": "ab", "chunk_count": 1, "base": 1,
                   "origin": "vm:vm1"}]}),
        ),
        case(
            "Imported",
            Imported {
                user: s("alice"),
                version: 1,
                size: 10,
                digest: s("cd"),
                chunks: 1,
            },
            json!({"user": "alice", "version": 1, "size": 10, "digest": "cd", "chunks": 1}),
        ),
        case(
            "RollbackBody",
            RollbackBody { version: 1 },
            json!({"version": 1}),
        ),
        case(
            "RolledBack",
            RolledBack {
                user: s("alice"),
                version: 3,
                copied_from: 1,
            },
            json!({"user": "alice", "version": 3, "copied_from": 1}),
        ),
        case(
            "GcReport",
            GcReport {
                scanned: 5,
                referenced: 3,
                spared: 1,
                deleted: 1,
                bytes_freed: 100,
            },
            json!({"scanned": 5, "referenced": 3, "spared": 1, "deleted": 1, "bytes_freed": 100}),
        ),
    ]
}

fn quota() -> Vec<Sample> {
    vec![
        case(
            "UserDetail",
            UserDetail {
                user: s("alice"),
                head: Some(3),
                assigned_to: Some(s("vm1")),
                lease: None,
                holdings: Holdings {
                    held_bytes: 300,
                    quota_bytes: 1000,
                    quota_override: Some(1000),
                    conflict_quota_bytes: 1000,
                    conflicts: vec![OriginHoldings {
                        origin: s("vm:vm0"),
                        versions: 2,
                        held_bytes: 50,
                    }],
                },
                in_flight_bytes: 20,
            },
            json!({"user": "alice", "head": 3, "assigned_to": "vm1", "lease": null,
                   "held_bytes": 300, "quota_bytes": 1000, "quota_override": 1000,
                   "conflict_quota_bytes": 1000,
                   "conflicts": [{"origin": "vm:vm0", "versions": 2, "held_bytes": 50}],
                   "in_flight_bytes": 20}),
        ),
        case(
            "QuotaBody",
            QuotaBody {
                quota_bytes: Some(5 << 30),
            },
            json!({"quota_bytes": 5_368_709_120_u64}),
        ),
        case(
            "QuotaBody",
            QuotaBody { quota_bytes: None },
            json!({"quota_bytes": null}),
        ),
        case(
            "VersionDeleted",
            VersionDeleted {
                user: s("alice"),
                version: 2,
            },
            json!({"user": "alice", "version": 2}),
        ),
    ]
}

fn agents() -> Vec<Sample> {
    vec![
        case(
            "UaDeployed",
            UaDeployed {
                vm: s("vm1"),
                name: s("desk"),
                current: s("1.0"),
                size: 10240,
                digest: s("ef"),
            },
            json!({"vm": "vm1", "name": "desk", "current": "1.0", "size": 10240, "digest": "ef"}),
        ),
        case(
            "UaCurrent",
            UaCurrent {
                vm: s("vm1"),
                name: s("desk"),
                current: s("0.9"),
            },
            json!({"vm": "vm1", "name": "desk", "current": "0.9"}),
        ),
        case(
            "UaDeleted",
            UaDeleted {
                vm: s("vm1"),
                name: s("desk"),
                stopped_sessions: vec![s("S-1")],
            },
            json!({"vm": "vm1", "name": "desk", "stopped_sessions": ["S-1"]}),
        ),
        case(
            "SessionActionDone",
            SessionActionDone {
                vm: s("vm1"),
                session: s("S-1"),
                action: SessionAction::Resume,
            },
            json!({"vm": "vm1", "session": "S-1", "action": "resume"}),
        ),
        case(
            "MonitorBody",
            MonitorBody {
                session: s("S-1"),
                monitor: s("helpdesk"),
                ttl_secs: 600,
            },
            json!({"session": "S-1", "monitor": "helpdesk", "ttl_secs": 600}),
        ),
        case(
            "MonitorGranted",
            MonitorGranted {
                vm: s("vm1"),
                session: s("S-1"),
                monitor: s("helpdesk"),
                expires: 7,
            },
            json!({"vm": "vm1", "session": "S-1", "monitor": "helpdesk", "expires": 7}),
        ),
        case(
            "MonitorRevoked",
            MonitorRevoked {
                vm: s("vm1"),
                session: s("S-1"),
                monitor: s("helpdesk"),
                revoked: true,
            },
            json!({"vm": "vm1", "session": "S-1", "monitor": "helpdesk", "revoked": true}),
        ),
        case(
            "Pong",
            Pong {
                vm: s("vm1"),
                pong: true,
            },
            json!({"vm": "vm1", "pong": true}),
        ),
    ]
}

fn status() -> Sample {
    case(
        "VmStatus",
        VmStatus {
            vm: s("vm1"),
            sessions: vec![AgentSession {
                session: s("S-1"),
                user: s("alice"),
                ua: Some(s("desk")),
                suspended: true,
            }],
            uas: vec![AgentUa {
                name: s("desk"),
                current: s("1.0"),
                previous: None,
            }],
            spooled_updates: 1,
        },
        json!({"vm": "vm1", "sessions": [{"session": "S-1", "user": "alice", "ua": "desk",
               "suspended": true}], "uas": [{"name": "desk", "current": "1.0", "previous": null}],
               "spooled_updates": 1}),
    )
}

fn errors() -> Vec<Sample> {
    ApiErrorCode::every()
        .map(|code| {
            let body = ErrorBody {
                error: code,
                message: s("why"),
            };
            case(
                "ErrorBody",
                body,
                json!({"error": code.as_str(), "message": "why"}),
            )
        })
        .collect()
}

/// Every sample.
pub(crate) fn samples() -> Vec<Sample> {
    [vms(), users(), quota(), agents(), vec![status()], errors()].concat()
}

#[test]
fn answers_keep_their_wire_form() {
    for (schema, got, want) in samples() {
        assert_eq!(got, want, "wire form of a {schema}");
    }
}

/// Each code's name and HTTP status.
fn statuses(codes: impl IntoIterator<Item = ApiErrorCode>) -> Vec<(&'static str, u16)> {
    codes
        .into_iter()
        .map(|c| (c.as_str(), c.status().as_u16()))
        .collect()
}

#[test]
fn error_codes_decide_the_status_as_before() {
    assert_eq!(
        statuses(ApiErrorCode::ALL),
        [
            ("bad_request", 400),
            ("invalid_name", 400),
            ("not_found", 404),
            ("conflict", 409),
            ("too_large", 413),
            ("quota_exceeded", 413),
            ("agent_refused", 422),
            ("agent_error", 502),
            ("store_unavailable", 502),
            ("vm_not_connected", 503),
            ("contended", 503),
            ("timeout", 504),
            ("internal", 500),
        ]
    );
}

#[test]
fn import_query_says_empty_only_when_it_is() {
    assert_eq!(q(&ImportQuery::default()), "");
    assert_eq!(q(&ImportQuery { empty: true }), "empty=true");
    let read: ImportQuery = serde_urlencoded::from_str("empty=true").unwrap();
    assert!(read.empty);
    assert!(serde_urlencoded::from_str::<ImportQuery>("empty=yes").is_err());
}

#[test]
fn routing_codes_have_their_statuses() {
    assert_eq!(
        statuses(ApiErrorCode::ROUTING),
        [("method_not_allowed", 405), ("unsupported_media_type", 415)]
    );
}

#[test]
fn queries_are_written_and_read_as_before() {
    assert_eq!(q(&SessionsQuery::default()), "");
    assert_eq!(q(&SessionsQuery { vm: Some(s("vm1")) }), "vm=vm1");
    assert_eq!(
        q(&GcQuery {
            grace_secs: Some(0)
        }),
        "grace_secs=0"
    );
    assert_eq!(
        q(&EventsQuery {
            since: 3,
            follow: false
        }),
        "since=3&follow=false"
    );
    assert_eq!(q(&UaDeleteQuery { force: true }), "force=true");
    let read = |s: &str| {
        serde_urlencoded::from_str::<UaDeleteQuery>(s)
            .unwrap()
            .force
    };
    assert!(read("force=true") && read("force=1"));
    assert!(!read("force=yes") && !read(""));
    let e: EventsQuery = serde_urlencoded::from_str("").unwrap();
    assert_eq!((e.since, e.follow), (0, true));
    let d: DeployQuery = serde_urlencoded::from_str("name=desk&version=1.0").unwrap();
    assert_eq!((d.entry.as_str(), d.update), ("", false));
    let m: MonitorBody = serde_json::from_value(json!({"session": "S", "monitor": "m"})).unwrap();
    assert_eq!(m.ttl_secs, 3600);
}

/// A query struct written as a query string.
fn q<T: Serialize>(t: &T) -> String {
    serde_urlencoded::to_string(t).unwrap()
}

#[test]
fn a_quota_body_must_say_its_quota_even_if_null() {
    assert!(serde_json::from_str::<QuotaBody>("{}").is_err());
    assert_eq!(
        serde_json::from_str::<QuotaBody>(r#"{"quota_bytes": null}"#).unwrap(),
        QuotaBody { quota_bytes: None }
    );
}
