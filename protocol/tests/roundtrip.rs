//! Property tests: every message survives encode → frame → decode
//! unchanged, for arbitrary field values; and the decoder never panics or
//! over-allocates on arbitrary bytes.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::cast_possible_truncation
)]

mod samples;

use bytes::BytesMut;
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::strategy::Union;
use tokio_util::codec::Decoder;
use uve_protocol::codec::{FrameCodec, FrameError, encode_frame};
use uve_protocol::defs::DEFAULT_MAX_FRAME;
use uve_protocol::manifest::{ChunkRef, Hash, ManifestHeader};
use uve_protocol::message::*;

fn text() -> impl Strategy<Value = String> {
    ".{0,40}"
}

/// A valid name of any kind (user, session, UA, UA version): the types
/// hold no other.
fn name<T>() -> impl Strategy<Value = T>
where
    T: TryFrom<String> + std::fmt::Debug + Clone + 'static,
{
    "[A-Za-z0-9_@][A-Za-z0-9._@-]{0,40}".prop_filter_map("a valid name", |s| T::try_from(s).ok())
}

fn hash() -> impl Strategy<Value = Hash> {
    any::<[u8; 32]>().prop_map(Hash)
}

fn header() -> impl Strategy<Value = ManifestHeader> {
    (any::<u64>(), hash(), any::<u32>()).prop_map(|(size, digest, chunk_count)| ManifestHeader {
        size,
        digest,
        chunk_count,
    })
}

fn chunks() -> impl Strategy<Value = Vec<ChunkRef>> {
    vec(
        (hash(), any::<u32>()).prop_map(|(hash, len)| ChunkRef { hash, len }),
        0..20,
    )
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..2048)
}

fn code() -> impl Strategy<Value = ErrorCode> {
    use ErrorCode::*;
    prop::sample::select(vec![
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
    ])
}

fn cause() -> impl Strategy<Value = UpdateCause> {
    use UpdateCause::*;
    prop::sample::select(vec![
        Logout, Release, Checkpoint, Shutdown, Disconnect, Spooled,
    ])
}

/// One strategy per request variant, all equally likely, in the enum's
/// order (exactly what `prop_oneof!` over all of them builds): UVE-5
/// transfers and session notices, UVE-2, protocol 2.
fn request() -> impl Strategy<Value = Request> {
    Union::new(
        [
            uve5_transfer_requests(),
            uve5_session_requests(),
            uve2_requests(),
            protocol2_requests(),
        ]
        .into_iter()
        .flatten(),
    )
}

/// UVE-5 requests (agent → host) of a retrieve and of an update.
fn uve5_transfer_requests() -> Vec<BoxedStrategy<Request>> {
    vec![
        (name(), name())
            .prop_map(|(user, session)| Request::UifRetrieve { user, session })
            .boxed(),
        (name(), any::<u64>(), any::<u32>())
            .prop_map(|(user, version, page)| Request::ManifestPage {
                user,
                version,
                page,
            })
            .boxed(),
        (name(), hash())
            .prop_map(|(user, hash)| Request::ChunkFetch { user, hash })
            .boxed(),
        (
            name(),
            name(),
            option::of(any::<u64>()),
            any::<u64>(),
            header(),
            cause(),
        )
            .prop_map(|(user, session, base, lease, header, cause)| {
                Request::UpdateBegin(UpdateBegin {
                    user,
                    session,
                    base,
                    lease,
                    header,
                    cause,
                })
            })
            .boxed(),
        (any::<u64>(), any::<u32>(), chunks())
            .prop_map(|(upload, page, chunks)| Request::UpdatePage {
                upload,
                page,
                chunks,
            })
            .boxed(),
        (any::<u64>(), hash(), bytes())
            .prop_map(|(upload, hash, data)| Request::ChunkUpload { upload, hash, data })
            .boxed(),
        any::<u64>()
            .prop_map(|upload| Request::UpdateCommit { upload })
            .boxed(),
        any::<u64>()
            .prop_map(|upload| Request::UpdateAbort { upload })
            .boxed(),
    ]
}

/// UVE-5 session notices (agent → host): started, ended, unexpected
/// disconnect.
fn uve5_session_requests() -> Vec<BoxedStrategy<Request>> {
    vec![
        (name(), name(), option::of(name()))
            .prop_map(|(session, user, ua)| Request::SessionStarted { session, user, ua })
            .boxed(),
        name()
            .prop_map(|session| Request::SessionEnded { session })
            .boxed(),
        (
            any::<u64>(),
            name(),
            name(),
            option::of(name()),
            text(),
            any::<u64>(),
        )
            .prop_map(|(id, session, user, ua, reason, at)| {
                Request::UnexpectedDisconnect(DisconnectNotice {
                    id,
                    session,
                    user,
                    ua,
                    reason,
                    at,
                })
            })
            .boxed(),
    ]
}

/// UVE-2 requests (host → agent): release, monitoring, UAs, suspend /
/// resume, ping, status.
fn uve2_requests() -> Vec<BoxedStrategy<Request>> {
    vec![
        (name(), any::<u32>())
            .prop_map(|(user, deadline_ms)| Request::UserRelease { user, deadline_ms })
            .boxed(),
        (name(), name(), any::<u64>())
            .prop_map(|(session, monitor, expires)| Request::MonitorGrant {
                session,
                monitor,
                expires,
            })
            .boxed(),
        (name(), name())
            .prop_map(|(session, monitor)| Request::MonitorRevoke { session, monitor })
            .boxed(),
        (
            any::<u64>(),
            name(),
            name(),
            vec(text(), 0..4),
            hash(),
            any::<u64>(),
            any::<bool>(),
        )
            .prop_map(|(transfer, name, version, entry, digest, size, update)| {
                Request::UaBegin(UaBundle {
                    transfer,
                    name,
                    version,
                    entry,
                    digest,
                    size,
                    update,
                })
            })
            .boxed(),
        (any::<u64>(), any::<u64>(), bytes())
            .prop_map(|(transfer, offset, data)| Request::UaBundleData {
                transfer,
                offset,
                data,
            })
            .boxed(),
        any::<u64>()
            .prop_map(|transfer| Request::UaCommit { transfer })
            .boxed(),
        name().prop_map(|name| Request::UaRollback { name }).boxed(),
        (name(), any::<bool>())
            .prop_map(|(name, force)| Request::UaDelete { name, force })
            .boxed(),
        name()
            .prop_map(|session| Request::SessionSuspend { session })
            .boxed(),
        name()
            .prop_map(|session| Request::SessionResume { session })
            .boxed(),
        any::<u64>()
            .prop_map(|nonce| Request::Ping { nonce })
            .boxed(),
        Just(Request::AgentStatus).boxed(),
    ]
}

/// Protocol 2 (`PROTOCOL_BLOCK_DELTA`) requests: block signatures, chunk delta.
fn protocol2_requests() -> Vec<BoxedStrategy<Request>> {
    vec![
        (any::<u64>(), vec(any::<u32>(), 0..50))
            .prop_map(|(upload, chunks)| Request::BlockSignatures { upload, chunks })
            .boxed(),
        (
            any::<u64>(),
            any::<u32>(),
            hash(),
            vec((any::<u16>(), bytes()), 0..4),
        )
            .prop_map(|(upload, index, hash, blocks)| {
                Request::ChunkDelta(ChunkDelta {
                    upload,
                    index,
                    hash,
                    blocks: blocks
                        .into_iter()
                        .map(|(index, data)| DeltaBlock { index, data })
                        .collect(),
                })
            })
            .boxed(),
    ]
}

fn response() -> impl Strategy<Value = Response> {
    prop_oneof![
        Just(Response::Ok),
        (code(), text()).prop_map(|(code, message)| Response::Error(WireError { code, message })),
        (
            option::of(any::<u64>()),
            option::of(header()),
            any::<u64>(),
            any::<bool>()
        )
            .prop_map(
                |(version, header, lease, handover_timed_out)| Response::Retrieve(RetrieveGrant {
                    version,
                    header,
                    lease,
                    handover_timed_out
                })
            ),
        chunks().prop_map(Response::ManifestPage),
        bytes().prop_map(Response::Chunk),
        any::<u64>().prop_map(|upload| Response::UpdateAccepted { upload }),
        vec(any::<u32>(), 0..50).prop_map(Response::Missing),
        any::<u64>().prop_map(|version| Response::Committed { version }),
        (any::<u64>(), option::of(any::<u64>()))
            .prop_map(|(kept_as, head)| Response::Conflict { kept_as, head }),
        option::of(any::<u64>()).prop_map(|committed| Response::Released { committed }),
        any::<u64>().prop_map(|nonce| Response::Pong { nonce }),
        (
            vec((name(), name(), option::of(name()), any::<bool>()), 0..4),
            vec((name(), name(), option::of(name())), 0..4),
            any::<u32>()
        )
            .prop_map(|(s, u, spooled_updates)| Response::Status(AgentStatus {
                sessions: s
                    .into_iter()
                    .map(|(session, user, ua, suspended)| SessionInfo {
                        session,
                        user,
                        ua,
                        suspended
                    })
                    .collect(),
                uas: u
                    .into_iter()
                    .map(|(name, current, previous)| UaInfo {
                        name,
                        current,
                        previous
                    })
                    .collect(),
                spooled_updates,
            })),
        name().prop_map(|version| Response::UaCurrent { version }),
        vec(name(), 0..4).prop_map(|stopped_sessions| Response::UaDeleted { stopped_sessions }),
        vec(option::of(vec(any::<[u8; 16]>(), 0..66)), 0..8).prop_map(Response::BlockSignatures),
    ]
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (
            any::<u16>(),
            any::<u16>(),
            text(),
            any::<[u8; 16]>(),
            any::<u64>(),
            any::<u32>()
        )
            .prop_map(
                |(protocol_min, protocol_max, agent_version, boot_id, capabilities, max_frame)| {
                    Frame::Hello(Hello {
                        protocol_min,
                        protocol_max,
                        agent_version,
                        boot_id,
                        capabilities,
                        max_frame,
                    })
                }
            ),
        (
            any::<u16>(),
            text(),
            text(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u64>(),
            any::<u32>()
        )
            .prop_map(
                |(
                    protocol,
                    host_version,
                    vm_id,
                    heartbeat_ms,
                    max_frame,
                    max_inflight,
                    max_uif_size,
                    max_chunk,
                )| {
                    Frame::Welcome(Welcome {
                        protocol,
                        host_version,
                        vm_id,
                        heartbeat_ms,
                        max_frame,
                        limits: Limits {
                            max_inflight,
                            max_uif_size,
                            max_chunk,
                        },
                    })
                }
            ),
        (code(), text()).prop_map(|(code, reason)| Frame::Reject(Reject { code, reason })),
        (any::<u64>(), request()).prop_map(|(id, body)| Frame::Request { id, body }),
        (any::<u64>(), response()).prop_map(|(id, body)| Frame::Response { id, body }),
        any::<u64>().prop_map(|seq| Frame::Heartbeat { seq }),
        any::<u64>().prop_map(|seq| Frame::HeartbeatAck { seq }),
        text().prop_map(|reason| Frame::Goodbye(Goodbye { reason })),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn every_frame_round_trips(f in frame()) {
        let mut buf = encode_frame(&f, DEFAULT_MAX_FRAME).expect("encode");
        let decoded = FrameCodec::default().decode(&mut buf).expect("decode").expect("complete");
        prop_assert_eq!(decoded, f);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn back_to_back_frames_split_anywhere_decode_in_order(fs in vec(frame(), 1..6), cut in any::<prop::sample::Index>()) {
        let mut wire = Vec::new();
        for f in &fs {
            wire.extend_from_slice(&encode_frame(f, DEFAULT_MAX_FRAME).expect("encode"));
        }
        let cut = cut.index(wire.len() + 1);
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::from(&wire[..cut]);
        let mut out = Vec::new();
        while let Some(f) = codec.decode(&mut buf).expect("decode") { out.push(f); }
        buf.extend_from_slice(&wire[cut..]);
        while let Some(f) = codec.decode(&mut buf).expect("decode") { out.push(f); }
        prop_assert_eq!(out, fs);
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_stay_bounded(data in vec(any::<u8>(), 0..4096)) {
        let mut codec = FrameCodec::new(1024);
        let mut buf = BytesMut::from(&data[..]);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(FrameError::Oversize { len, max }) => { prop_assert!(len > u64::from(max)); break }
                Err(_) => break,
            }
        }
        prop_assert!(buf.capacity() <= 4096 + 1024 + 4);
    }
}

#[test]
fn every_sample_variant_is_covered_by_the_strategies() {
    // The strategies above list every variant by hand; this keeps the
    // samples (one per variant) and the enums in step: a new variant
    // without a sample fails the golden test, and the exhaustive matches
    // here fail to compile without a strategy being considered.
    for (_, f) in samples::all() {
        match f {
            Frame::Request { body, .. } => match body {
                Request::UifRetrieve { .. }
                | Request::ManifestPage { .. }
                | Request::ChunkFetch { .. }
                | Request::UpdateBegin(_)
                | Request::UpdatePage { .. }
                | Request::ChunkUpload { .. }
                | Request::UpdateCommit { .. }
                | Request::UpdateAbort { .. }
                | Request::SessionStarted { .. }
                | Request::SessionEnded { .. }
                | Request::UnexpectedDisconnect(_)
                | Request::UserRelease { .. }
                | Request::MonitorGrant { .. }
                | Request::MonitorRevoke { .. }
                | Request::UaBegin(_)
                | Request::UaBundleData { .. }
                | Request::UaCommit { .. }
                | Request::UaRollback { .. }
                | Request::UaDelete { .. }
                | Request::SessionSuspend { .. }
                | Request::SessionResume { .. }
                | Request::Ping { .. }
                | Request::AgentStatus
                | Request::BlockSignatures { .. }
                | Request::ChunkDelta(_) => {}
            },
            Frame::Response { body, .. } => match body {
                Response::Ok
                | Response::Error(_)
                | Response::Retrieve(_)
                | Response::ManifestPage(_)
                | Response::Chunk(_)
                | Response::UpdateAccepted { .. }
                | Response::Missing(_)
                | Response::Committed { .. }
                | Response::Conflict { .. }
                | Response::Released { .. }
                | Response::Pong { .. }
                | Response::Status(_)
                | Response::UaCurrent { .. }
                | Response::UaDeleted { .. }
                | Response::BlockSignatures(_) => {}
            },
            Frame::Hello(_)
            | Frame::Welcome(_)
            | Frame::Reject(_)
            | Frame::Heartbeat { .. }
            | Frame::HeartbeatAck { .. }
            | Frame::Goodbye(_) => {}
        }
    }
}
