//! Golden test of the events' JSON: one sample of every [`Event`] kind,
//! with the exact object `GET /v1/events` sends for it (the wire form the
//! host wrote with `json!` before the enum existed; tests/ and operators'
//! scripts parse it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{Value, json};
use uve_protocol::message::{ErrorCode, UpdateCause};

use super::{DisconnectSource, Event, Recorded, UpdateFields};
use crate::store::{DamagedVersion, GcReport, ScrubReport};

/// Index of each kind; the match has no wildcard, so a new kind does not
/// compile until it is listed here, and the test then wants a sample.
fn index(e: &Event) -> usize {
    match e {
        Event::VmRegistered { .. } => 0,
        Event::VmUnregistered { .. } => 1,
        Event::VmConnected { .. } => 2,
        Event::VmDisconnected { .. } => 3,
        Event::VmLost { .. } => 4,
        Event::SessionStarted { .. } => 5,
        Event::SessionEnded { .. } => 6,
        Event::UnexpectedDisconnect { .. } => 7,
        Event::Retrieve { .. } => 8,
        Event::Commit { .. } => 9,
        Event::Conflict { .. } => 10,
        Event::UpdateRefused { .. } => 11,
        Event::Assigned { .. } => 12,
        Event::Unassigned { .. } => 13,
        Event::UserReleased { .. } => 14,
        Event::HandoverFailed { .. } => 15,
        Event::HandoverTimeout { .. } => 16,
        Event::Import { .. } => 17,
        Event::Rollback { .. } => 18,
        Event::Gc(_) => 19,
        Event::UaDeployed { .. } => 20,
        Event::UaRolledBack { .. } => 21,
        Event::UaDeleted { .. } => 22,
        Event::SessionSuspended { .. } => 23,
        Event::SessionResumed { .. } => 24,
        Event::MonitorGranted { .. } => 25,
        Event::MonitorRevoked { .. } => 26,
        Event::BudgetExceeded { .. } => 27,
        Event::Scrub(_) => 28,
    }
}
const KINDS: usize = 29;

fn s(x: &str) -> String {
    x.to_string()
}

fn update(cause: UpdateCause, base: Option<u64>) -> UpdateFields {
    UpdateFields {
        user: s("alice"),
        vm: s("vm1"),
        session: s("S-1"),
        cause,
        base,
        size: 4096,
        chunks: 2,
        chunks_uploaded: 1,
    }
}

fn vms() -> Vec<(Event, Value)> {
    vec![
        (
            Event::VmRegistered { vm: s("vm1") },
            json!({"kind": "vm_registered", "vm": "vm1"}),
        ),
        (
            Event::VmUnregistered {
                vm: s("vm1"),
                forced: false,
            },
            json!({"kind": "vm_unregistered", "vm": "vm1"}),
        ),
        (
            Event::VmUnregistered {
                vm: s("vm1"),
                forced: true,
            },
            json!({"kind": "vm_unregistered", "vm": "vm1", "forced": true}),
        ),
        (
            Event::VmConnected {
                vm: s("vm1"),
                conn_id: 3,
                agent_version: s("0.1.0"),
            },
            json!({"kind": "vm_connected", "vm": "vm1", "conn_id": 3, "agent_version": "0.1.0"}),
        ),
        (
            Event::VmDisconnected {
                vm: s("vm1"),
                conn_id: 3,
                reason: s("goodbye: bye"),
            },
            json!({"kind": "vm_disconnected", "vm": "vm1", "conn_id": 3, "reason": "goodbye: bye"}),
        ),
        (
            Event::VmLost {
                vm: s("vm1"),
                conn_id: 3,
                reason: s("eof"),
            },
            json!({"kind": "vm_lost", "vm": "vm1", "conn_id": 3, "reason": "eof"}),
        ),
        (
            Event::BudgetExceeded {
                vm: s("vm1"),
                user: Some(s("alice")),
                budget: s("max_staged_bytes_per_vm"),
                limit: 1 << 30,
            },
            json!({"kind": "budget_exceeded", "vm": "vm1", "user": "alice",
                   "budget": "max_staged_bytes_per_vm", "limit": 1_u64 << 30}),
        ),
    ]
}

fn sessions() -> Vec<(Event, Value)> {
    vec![
        (
            Event::SessionStarted {
                vm: s("vm1"),
                session: s("S-1"),
                user: s("alice"),
                ua: None,
            },
            json!({"kind": "session_started", "vm": "vm1", "session": "S-1", "user": "alice", "ua": null}),
        ),
        (
            Event::SessionEnded {
                vm: s("vm1"),
                session: s("S-1"),
                user: s("alice"),
                ua: Some(s("desk")),
            },
            json!({"kind": "session_ended", "vm": "vm1", "session": "S-1", "user": "alice", "ua": "desk"}),
        ),
        (
            Event::UnexpectedDisconnect {
                vm: s("vm1"),
                session: s("S-1"),
                user: s("alice"),
                ua: Some(s("desk")),
                reason: s("UA crashed"),
                at: 1000,
                id: Some(7),
                source: DisconnectSource::Agent,
            },
            json!({"kind": "unexpected_disconnect", "vm": "vm1", "session": "S-1", "user": "alice",
                   "ua": "desk", "reason": "UA crashed", "at": 1000, "id": 7, "source": "agent"}),
        ),
        (
            Event::SessionSuspended {
                vm: s("vm1"),
                session: s("S-1"),
            },
            json!({"kind": "session_suspended", "vm": "vm1", "session": "S-1"}),
        ),
        (
            Event::SessionResumed {
                vm: s("vm1"),
                session: s("S-1"),
            },
            json!({"kind": "session_resumed", "vm": "vm1", "session": "S-1"}),
        ),
    ]
}

fn uifs() -> Vec<(Event, Value)> {
    vec![
        (
            Event::Retrieve {
                user: s("alice"),
                vm: s("vm1"),
                session: s("S-1"),
                version: None,
                lease: 4,
                handover_timed_out: false,
            },
            json!({"kind": "retrieve", "user": "alice", "vm": "vm1", "session": "S-1",
                   "version": null, "lease": 4, "handover_timed_out": false}),
        ),
        (
            Event::Commit {
                update: update(UpdateCause::Logout, Some(1)),
                version: 2,
            },
            json!({"kind": "commit", "user": "alice", "vm": "vm1", "session": "S-1",
                   "cause": "logout", "base": 1, "size": 4096, "chunks": 2,
                   "chunks_uploaded": 1, "version": 2}),
        ),
        (
            Event::Conflict {
                update: update(UpdateCause::Spooled, None),
                kept_as: 3,
                head: Some(2),
            },
            json!({"kind": "conflict", "user": "alice", "vm": "vm1", "session": "S-1",
                   "cause": "spooled", "base": null, "size": 4096, "chunks": 2,
                   "chunks_uploaded": 1, "kept_as": 3, "head": 2}),
        ),
        (
            Event::UpdateRefused {
                vm: s("vm1"),
                user: s("alice"),
                session: s("S-1"),
                cause: UpdateCause::Checkpoint,
                base: None,
                size: 1 << 40,
                code: ErrorCode::QuotaExceeded,
                reason: s("over quota"),
            },
            json!({"kind": "update_refused", "vm": "vm1", "user": "alice", "session": "S-1",
                   "cause": "checkpoint", "base": null, "size": 1_u64 << 40,
                   "code": "QuotaExceeded", "reason": "over quota"}),
        ),
        (
            Event::Import {
                user: s("alice"),
                version: 1,
                size: 10,
                chunks: 1,
            },
            json!({"kind": "import", "user": "alice", "version": 1, "size": 10, "chunks": 1}),
        ),
        (
            Event::Rollback {
                user: s("alice"),
                from_version: 1,
                version: 3,
            },
            json!({"kind": "rollback", "user": "alice", "from_version": 1, "version": 3}),
        ),
    ]
}

/// The store's own runs (no VM).
fn store_runs() -> Vec<(Event, Value)> {
    vec![
        (
            Event::Gc(GcReport {
                scanned: 5,
                referenced: 3,
                spared: 1,
                deleted: 1,
                bytes_freed: 100,
            }),
            json!({"kind": "gc", "scanned": 5, "referenced": 3, "spared": 1, "deleted": 1,
                   "bytes_freed": 100}),
        ),
        (
            Event::Scrub(ScrubReport {
                scanned: 5,
                bytes: 1000,
                corrupt: 1,
                damaged: vec![DamagedVersion {
                    user: s("alice"),
                    version: 2,
                }],
                damaged_more: 0,
                complete: true,
            }),
            json!({"kind": "scrub", "scanned": 5, "bytes": 1000, "corrupt": 1,
                   "damaged": [{"user": "alice", "version": 2}], "damaged_more": 0,
                   "complete": true}),
        ),
    ]
}

fn switches() -> Vec<(Event, Value)> {
    vec![
        (
            Event::Assigned {
                user: s("alice"),
                vm: s("vm2"),
                previous: Some(s("vm1")),
                release_requested_from: None,
            },
            json!({"kind": "assigned", "user": "alice", "vm": "vm2", "previous": "vm1",
                   "release_requested_from": null}),
        ),
        (
            Event::Unassigned {
                user: s("alice"),
                previous: s("vm2"),
                release_requested_from: Some(s("vm2")),
            },
            json!({"kind": "unassigned", "user": "alice", "previous": "vm2",
                   "release_requested_from": "vm2"}),
        ),
        (
            Event::UserReleased {
                user: s("alice"),
                vm: s("vm1"),
                committed: None,
            },
            json!({"kind": "user_released", "user": "alice", "vm": "vm1", "committed": null}),
        ),
        (
            Event::HandoverFailed {
                user: s("alice"),
                vm: s("vm1"),
                reason: s("timeout"),
            },
            json!({"kind": "handover_failed", "user": "alice", "vm": "vm1", "reason": "timeout"}),
        ),
        (
            Event::HandoverTimeout {
                user: s("alice"),
                vm: s("vm2"),
                session: s("S-2"),
            },
            json!({"kind": "handover_timeout", "user": "alice", "vm": "vm2", "session": "S-2"}),
        ),
    ]
}

fn agents() -> Vec<(Event, Value)> {
    vec![
        (
            Event::UaDeployed {
                vm: s("vm1"),
                name: s("desk"),
                version: s("1.0"),
                update: false,
                size: 10240,
            },
            json!({"kind": "ua_deployed", "vm": "vm1", "name": "desk", "version": "1.0",
                   "update": false, "size": 10240}),
        ),
        (
            Event::UaRolledBack {
                vm: s("vm1"),
                name: s("desk"),
                version: s("0.9"),
            },
            json!({"kind": "ua_rolled_back", "vm": "vm1", "name": "desk", "version": "0.9"}),
        ),
        (
            Event::UaDeleted {
                vm: s("vm1"),
                name: s("desk"),
                stopped_sessions: vec![s("S-1")],
            },
            json!({"kind": "ua_deleted", "vm": "vm1", "name": "desk", "stopped_sessions": ["S-1"]}),
        ),
        (
            Event::MonitorGranted {
                vm: s("vm1"),
                session: s("S-1"),
                monitor: s("helpdesk"),
                expires: 5000,
            },
            json!({"kind": "monitor_granted", "vm": "vm1", "session": "S-1",
                   "monitor": "helpdesk", "expires": 5000}),
        ),
        (
            Event::MonitorRevoked {
                vm: s("vm1"),
                session: s("S-1"),
                monitor: s("helpdesk"),
            },
            json!({"kind": "monitor_revoked", "vm": "vm1", "session": "S-1", "monitor": "helpdesk"}),
        ),
    ]
}

/// One sample of every kind and its JSON (without `seq` and `at_ms`).
pub(crate) fn samples() -> Vec<(Event, Value)> {
    [
        vms(),
        sessions(),
        uifs(),
        store_runs(),
        switches(),
        agents(),
    ]
    .concat()
}

#[test]
fn every_kind_has_its_wire_form() {
    let mut seen = [false; KINDS];
    for (i, (event, mut want)) in samples().into_iter().enumerate() {
        seen[index(&event)] = true;
        let seq = i as u64 + 1;
        let recorded = Recorded {
            seq,
            at_ms: 1_700_000_000_000,
            event,
        };
        if let Value::Object(m) = &mut want {
            m.insert("seq".into(), json!(seq));
            m.insert("at_ms".into(), json!(1_700_000_000_000_u64));
        }
        let got = serde_json::to_value(&recorded).unwrap();
        assert_eq!(got, want, "wire form of {:?}", recorded.event);
        let back: Recorded = serde_json::from_value(got).unwrap();
        assert_eq!(back, recorded, "round trip");
    }
    let missing: Vec<usize> = (0..KINDS).filter(|k| !seen[*k]).collect();
    assert!(missing.is_empty(), "kinds without a sample: {missing:?}");
}

#[test]
fn a_host_reported_disconnect_has_no_id() {
    let e = Event::UnexpectedDisconnect {
        vm: s("vm1"),
        session: s("S-1"),
        user: s("alice"),
        ua: None,
        reason: s("connection lost: eof"),
        at: 1000,
        id: None,
        source: DisconnectSource::Host,
    };
    let v = serde_json::to_value(&e).unwrap();
    assert_eq!(
        v,
        json!({"kind": "unexpected_disconnect", "vm": "vm1", "session": "S-1", "user": "alice",
               "ua": null, "reason": "connection lost: eof", "at": 1000, "source": "host"})
    );
}

#[test]
fn every_update_cause_is_a_lower_case_word() {
    use UpdateCause::*;
    for (cause, word) in [
        (Logout, "logout"),
        (Release, "release"),
        (Checkpoint, "checkpoint"),
        (Shutdown, "shutdown"),
        (Disconnect, "disconnect"),
        (Spooled, "spooled"),
    ] {
        // What the host wrote before: `format!("{:?}", cause).to_lowercase()`.
        assert_eq!(format!("{cause:?}").to_lowercase(), word);
        let v = serde_json::to_value(Event::Commit {
            update: update(cause, None),
            version: 1,
        })
        .unwrap();
        assert_eq!(v["cause"], word);
    }
}

#[test]
fn error_codes_are_written_as_before() {
    use ErrorCode::*;
    for code in [
        BadRequest,
        Unsupported,
        InvalidName,
        NotAssigned,
        NotFound,
        TooLarge,
        QuotaExceeded,
        BadChunk,
        BadDigest,
        VersionMismatch,
        UnknownVm,
        AlreadyConnected,
        Busy,
        Timeout,
        UaInUse,
        BundleRejected,
        ShuttingDown,
        Internal,
    ] {
        // What the host wrote before: `format!("{:?}", code)`.
        assert_eq!(
            serde_json::to_value(code).unwrap(),
            json!(format!("{code:?}"))
        );
    }
}

/// Which kinds the durable journal keeps, and whose share of the ring and
/// the journal each kind takes: the VM its JSON names in `vm`, or the
/// share of events naming none. Pinned for every sample, so a new kind
/// states both.
#[test]
fn every_kind_has_its_share_and_journal_rule() {
    // `scrub` only when it found a corrupt chunk (the sample did).
    const JOURNALLED: [&str; 7] = [
        "scrub",
        "update_refused",
        "conflict",
        "budget_exceeded",
        "handover_failed",
        "vm_lost",
        "unexpected_disconnect",
    ];
    let mut journalled = Vec::new();
    for (event, want) in samples() {
        let kind = want["kind"].as_str().unwrap().to_string();
        assert_eq!(
            event.vm(),
            want["vm"].as_str(),
            "the share of {kind} is the VM it names"
        );
        if event.journalled() {
            journalled.push(kind.clone());
        }
        assert_eq!(
            event.journalled(),
            JOURNALLED.contains(&kind.as_str()),
            "{kind}"
        );
    }
    journalled.sort();
    journalled.dedup();
    assert_eq!(journalled.len(), JOURNALLED.len(), "{journalled:?}");
    assert!(!Event::Scrub(ScrubReport::default()).journalled());
}
