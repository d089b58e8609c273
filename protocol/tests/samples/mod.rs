//! One sample value of every wire message, shared by the golden-vector and
//! round-trip tests. Adding a message means adding it here (and a golden
//! vector); changing an existing sample's encoding is a protocol break.

use uve_protocol::manifest::{ChunkRef, Hash, ManifestHeader};
use uve_protocol::message::*;

/// A hash made of one repeated byte.
pub fn h(b: u8) -> Hash {
    Hash([b; 32])
}

/// A fixed manifest header.
pub fn header() -> ManifestHeader {
    ManifestHeader {
        size: 300,
        digest: h(0xd1),
        chunk_count: 2,
    }
}

fn req(id: u64, body: Request) -> Frame {
    Frame::Request { id, body }
}

fn resp(id: u64, body: Response) -> Frame {
    Frame::Response { id, body }
}

/// (name, frame) for every variant of every wire enum, family by family.
pub fn all() -> Vec<(&'static str, Frame)> {
    [
        handshake_frames(),
        uve5_retrieve_requests(),
        uve5_update_requests(),
        uve5_session_requests(),
        uve2_release_and_monitor_requests(),
        uve2_ua_session_and_status_requests(),
        uve5_responses(),
        uve2_responses(),
        protocol2_frames(),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// A string of the sample: a `String`, or a name newtype (every sample
/// name is valid).
fn s<T: TryFrom<String>>(x: &str) -> T
where
    T::Error: std::fmt::Debug,
{
    T::try_from(x.to_string()).unwrap()
}

/// The handshake and link-keeping frames: hello, welcome, reject,
/// heartbeat, heartbeat ack, goodbye.
fn handshake_frames() -> Vec<(&'static str, Frame)> {
    vec![
        (
            "hello",
            Frame::Hello(Hello {
                protocol_min: 1,
                protocol_max: 1,
                agent_version: s("0.1.0"),
                boot_id: [0xb0; 16],
                capabilities: CAP_UIF_FILE | CAP_UIF_DIRECTORY,
                max_frame: 1 << 20,
            }),
        ),
        (
            "welcome",
            Frame::Welcome(Welcome {
                protocol: 1,
                host_version: s("0.1.0"),
                vm_id: s("vm1"),
                heartbeat_ms: 5000,
                max_frame: 1 << 20,
                limits: Limits {
                    max_inflight: 32,
                    max_uif_size: 1 << 34,
                    max_chunk: 256 * 1024,
                },
            }),
        ),
        (
            "reject",
            Frame::Reject(Reject {
                code: ErrorCode::UnknownVm,
                reason: s("no such vm"),
            }),
        ),
        ("heartbeat", Frame::Heartbeat { seq: 300 }),
        ("heartbeat_ack", Frame::HeartbeatAck { seq: 300 }),
        ("goodbye", Frame::Goodbye(Goodbye { reason: s("bye") })),
    ]
}

/// UVE-5 requests (agent → host) of a login's retrieve: UIF retrieve,
/// manifest page, chunk fetch.
fn uve5_retrieve_requests() -> Vec<(&'static str, Frame)> {
    vec![
        (
            "uif_retrieve",
            req(
                1,
                Request::UifRetrieve {
                    user: s("alice"),
                    session: s("s1"),
                },
            ),
        ),
        (
            "manifest_page",
            req(
                2,
                Request::ManifestPage {
                    user: s("alice"),
                    version: 3,
                    page: 0,
                },
            ),
        ),
        (
            "chunk_fetch",
            req(
                3,
                Request::ChunkFetch {
                    user: s("alice"),
                    hash: h(1),
                },
            ),
        ),
    ]
}

/// UVE-5 requests (agent → host) of an update: begin, page, chunk upload,
/// commit, abort.
fn uve5_update_requests() -> Vec<(&'static str, Frame)> {
    vec![
        (
            "update_begin",
            req(
                4,
                Request::UpdateBegin(UpdateBegin {
                    user: s("alice"),
                    session: s("s1"),
                    base: Some(3),
                    lease: 7,
                    header: header(),
                    cause: UpdateCause::Logout,
                }),
            ),
        ),
        (
            "update_page",
            req(
                5,
                Request::UpdatePage {
                    upload: 9,
                    page: 0,
                    chunks: vec![
                        ChunkRef {
                            hash: h(1),
                            len: 100,
                        },
                        ChunkRef {
                            hash: h(2),
                            len: 200,
                        },
                    ],
                },
            ),
        ),
        (
            "chunk_upload",
            req(
                6,
                Request::ChunkUpload {
                    upload: 9,
                    hash: h(2),
                    data: vec![1, 2, 3],
                },
            ),
        ),
        ("update_commit", req(7, Request::UpdateCommit { upload: 9 })),
        ("update_abort", req(8, Request::UpdateAbort { upload: 9 })),
    ]
}

/// UVE-5 session notices (agent → host): started, ended, unexpected
/// disconnect.
fn uve5_session_requests() -> Vec<(&'static str, Frame)> {
    vec![
        (
            "session_started",
            req(
                9,
                Request::SessionStarted {
                    session: s("s1"),
                    user: s("alice"),
                    ua: Some(s("desk")),
                },
            ),
        ),
        (
            "session_ended",
            req(10, Request::SessionEnded { session: s("s1") }),
        ),
        (
            "unexpected_disconnect",
            req(
                11,
                Request::UnexpectedDisconnect(DisconnectNotice {
                    id: 77,
                    session: s("s1"),
                    user: s("alice"),
                    ua: None,
                    reason: s("ua exited with signal 9"),
                    at: 1_700_000_000_000,
                }),
            ),
        ),
    ]
}

/// UVE-2 requests (host → agent): user release, monitoring grant and
/// revoke.
fn uve2_release_and_monitor_requests() -> Vec<(&'static str, Frame)> {
    vec![
        (
            "user_release",
            req(
                12,
                Request::UserRelease {
                    user: s("alice"),
                    deadline_ms: 30_000,
                },
            ),
        ),
        (
            "monitor_grant",
            req(
                13,
                Request::MonitorGrant {
                    session: s("s1"),
                    monitor: s("bob"),
                    expires: 1_700_000_060_000,
                },
            ),
        ),
        (
            "monitor_revoke",
            req(
                14,
                Request::MonitorRevoke {
                    session: s("s1"),
                    monitor: s("bob"),
                },
            ),
        ),
    ]
}

/// UVE-2 requests (host → agent): UA deploy / update / rollback / delete,
/// session suspend / resume, ping, agent status.
fn uve2_ua_session_and_status_requests() -> Vec<(&'static str, Frame)> {
    vec![
        (
            "ua_begin",
            req(
                15,
                Request::UaBegin(UaBundle {
                    transfer: 1,
                    name: s("desk"),
                    version: s("2.0"),
                    entry: vec![s("bin/desk"), s("--fast")],
                    digest: h(3),
                    size: 4096,
                    update: true,
                }),
            ),
        ),
        (
            "ua_bundle_data",
            req(
                16,
                Request::UaBundleData {
                    transfer: 1,
                    offset: 0,
                    data: vec![9; 4],
                },
            ),
        ),
        ("ua_commit", req(17, Request::UaCommit { transfer: 1 })),
        (
            "ua_rollback",
            req(18, Request::UaRollback { name: s("desk") }),
        ),
        (
            "ua_delete",
            req(
                19,
                Request::UaDelete {
                    name: s("desk"),
                    force: true,
                },
            ),
        ),
        (
            "session_suspend",
            req(20, Request::SessionSuspend { session: s("s1") }),
        ),
        (
            "session_resume",
            req(21, Request::SessionResume { session: s("s1") }),
        ),
        ("ping", req(22, Request::Ping { nonce: 5 })),
        ("agent_status", req(23, Request::AgentStatus)),
    ]
}

/// Responses: the generic ok / error, then the answers to UVE-5 requests.
fn uve5_responses() -> Vec<(&'static str, Frame)> {
    vec![
        ("resp_ok", resp(1, Response::Ok)),
        (
            "resp_error",
            resp(
                2,
                Response::Error(WireError::new(
                    ErrorCode::NotAssigned,
                    "alice is not assigned to vm1",
                )),
            ),
        ),
        (
            "resp_retrieve",
            resp(
                3,
                Response::Retrieve(RetrieveGrant {
                    version: Some(3),
                    header: Some(header()),
                    lease: 7,
                    handover_timed_out: false,
                }),
            ),
        ),
        (
            "resp_manifest_page",
            resp(
                4,
                Response::ManifestPage(vec![ChunkRef {
                    hash: h(1),
                    len: 100,
                }]),
            ),
        ),
        ("resp_chunk", resp(5, Response::Chunk(vec![0xaa, 0xbb]))),
        (
            "resp_update_accepted",
            resp(6, Response::UpdateAccepted { upload: 9 }),
        ),
        ("resp_missing", resp(7, Response::Missing(vec![0, 1, 300]))),
        (
            "resp_committed",
            resp(8, Response::Committed { version: 4 }),
        ),
        (
            "resp_conflict",
            resp(
                9,
                Response::Conflict {
                    kept_as: 5,
                    head: Some(4),
                },
            ),
        ),
    ]
}

/// Responses to UVE-2 requests: released, pong, status, UA current, UA
/// deleted.
fn uve2_responses() -> Vec<(&'static str, Frame)> {
    vec![
        (
            "resp_released",
            resp(10, Response::Released { committed: Some(4) }),
        ),
        ("resp_pong", resp(11, Response::Pong { nonce: 5 })),
        (
            "resp_status",
            resp(
                12,
                Response::Status(AgentStatus {
                    sessions: vec![SessionInfo {
                        session: s("s1"),
                        user: s("alice"),
                        ua: None,
                        suspended: true,
                    }],
                    uas: vec![UaInfo {
                        name: s("desk"),
                        current: s("2.0"),
                        previous: Some(s("1.0")),
                    }],
                    spooled_updates: 1,
                }),
            ),
        ),
        (
            "resp_ua_current",
            resp(13, Response::UaCurrent { version: s("2.0") }),
        ),
        (
            "resp_ua_deleted",
            resp(
                14,
                Response::UaDeleted {
                    stopped_sessions: vec![s("s1")],
                },
            ),
        ),
    ]
}

/// Protocol 2 (`PROTOCOL_BLOCK_DELTA`): block signatures and chunk delta
/// requests, the block signatures response.
fn protocol2_frames() -> Vec<(&'static str, Frame)> {
    vec![
        (
            "block_signatures",
            req(
                24,
                Request::BlockSignatures {
                    upload: 9,
                    chunks: vec![0, 300],
                },
            ),
        ),
        (
            "chunk_delta",
            req(
                25,
                Request::ChunkDelta(ChunkDelta {
                    upload: 9,
                    index: 300,
                    hash: h(2),
                    blocks: vec![
                        DeltaBlock {
                            index: 1,
                            data: vec![4, 5],
                        },
                        DeltaBlock {
                            index: 300,
                            data: vec![6],
                        },
                    ],
                }),
            ),
        ),
        (
            "resp_block_signatures",
            resp(
                15,
                Response::BlockSignatures(vec![Some(vec![[0xa1; 16], [0xa2; 16]]), None]),
            ),
        ),
    ]
}
