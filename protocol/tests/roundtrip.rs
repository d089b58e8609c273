//! Property tests: every message survives encode → frame → decode
//! unchanged, for arbitrary field values; and the decoder never panics or
//! over-allocates on arbitrary bytes.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::cast_possible_truncation
)]

mod samples;

use std::mem::{Discriminant, discriminant};

use bytes::BytesMut;
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::strategy::{Union, ValueTree};
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

/// Every error code: the variant indices the wire knows, decoded in
/// order until one is not a code (golden.rs pins the last, `Internal`, at
/// 17).
fn code() -> impl Strategy<Value = ErrorCode> {
    let all: Vec<ErrorCode> = (0u8..128)
        .map_while(|i| postcard::from_bytes(&[i]).ok())
        .collect();
    assert_eq!(all.len(), 18, "{all:?}");
    assert_eq!(all.last(), Some(&ErrorCode::Internal));
    prop::sample::select(all)
}

fn cause() -> impl Strategy<Value = UpdateCause> {
    use UpdateCause::*;
    prop::sample::select(vec![
        Logout, Release, Checkpoint, Shutdown, Disconnect, Spooled,
    ])
}

/// A strategy for the struct (or struct-like variant) `$ty` whose fields
/// are drawn from the strategies given (at most 12, proptest's largest
/// tuple): `of!(Request::Ping; nonce = any::<u64>())`.
macro_rules! of {
    ($($ty:ident)::+; $($field:ident = $strategy:expr),+ $(,)?) => {
        ($($strategy,)+).prop_map(|($($field,)+)| $($ty)::+ { $($field),+ })
    };
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
    let begin = of!(UpdateBegin;
        user = name(), session = name(), base = option::of(any::<u64>()), lease = any::<u64>(),
        header = header(), cause = cause());
    vec![
        of!(Request::UifRetrieve; user = name(), session = name()).boxed(),
        of!(Request::ManifestPage; user = name(), version = any::<u64>(), page = any::<u32>())
            .boxed(),
        of!(Request::ChunkFetch; user = name(), hash = hash()).boxed(),
        begin.prop_map(Request::UpdateBegin).boxed(),
        of!(Request::UpdatePage; upload = any::<u64>(), page = any::<u32>(), chunks = chunks())
            .boxed(),
        of!(Request::ChunkUpload; upload = any::<u64>(), hash = hash(), data = bytes()).boxed(),
        of!(Request::UpdateCommit; upload = any::<u64>()).boxed(),
        of!(Request::UpdateAbort; upload = any::<u64>()).boxed(),
    ]
}

/// UVE-5 session notices (agent → host): started, ended, unexpected
/// disconnect.
fn uve5_session_requests() -> Vec<BoxedStrategy<Request>> {
    let notice = of!(DisconnectNotice;
        id = any::<u64>(), session = name(), user = name(), ua = option::of(name()),
        reason = text(), at = any::<u64>());
    vec![
        of!(Request::SessionStarted; session = name(), user = name(), ua = option::of(name()))
            .boxed(),
        of!(Request::SessionEnded; session = name()).boxed(),
        notice.prop_map(Request::UnexpectedDisconnect).boxed(),
    ]
}

/// UVE-2 requests (host → agent): release, monitoring, UAs, suspend /
/// resume, ping, status.
fn uve2_requests() -> Vec<BoxedStrategy<Request>> {
    let bundle = of!(UaBundle;
        transfer = any::<u64>(), name = name(), version = name(), entry = vec(text(), 0..4),
        digest = hash(), size = any::<u64>(), update = any::<bool>());
    vec![
        of!(Request::UserRelease; user = name(), deadline_ms = any::<u32>()).boxed(),
        of!(Request::MonitorGrant; session = name(), monitor = name(), expires = any::<u64>())
            .boxed(),
        of!(Request::MonitorRevoke; session = name(), monitor = name()).boxed(),
        bundle.prop_map(Request::UaBegin).boxed(),
        of!(Request::UaBundleData; transfer = any::<u64>(), offset = any::<u64>(), data = bytes())
            .boxed(),
        of!(Request::UaCommit; transfer = any::<u64>()).boxed(),
        of!(Request::UaRollback; name = name()).boxed(),
        of!(Request::UaDelete; name = name(), force = any::<bool>()).boxed(),
        of!(Request::SessionSuspend; session = name()).boxed(),
        of!(Request::SessionResume; session = name()).boxed(),
        of!(Request::Ping; nonce = any::<u64>()).boxed(),
        Just(Request::AgentStatus).boxed(),
    ]
}

/// Protocol 2 (`PROTOCOL_BLOCK_DELTA`) requests: block signatures, chunk delta.
fn protocol2_requests() -> Vec<BoxedStrategy<Request>> {
    let block = of!(DeltaBlock; index = any::<u16>(), data = bytes());
    let delta = of!(ChunkDelta;
        upload = any::<u64>(), index = any::<u32>(), hash = hash(), blocks = vec(block, 0..4));
    vec![
        of!(Request::BlockSignatures; upload = any::<u64>(), chunks = vec(any::<u32>(), 0..50))
            .boxed(),
        delta.prop_map(Request::ChunkDelta).boxed(),
    ]
}

fn response() -> impl Strategy<Value = Response> {
    let grant = of!(RetrieveGrant;
        version = option::of(any::<u64>()), header = option::of(header()), lease = any::<u64>(),
        handover_timed_out = any::<bool>());
    let session = of!(SessionInfo;
        session = name(), user = name(), ua = option::of(name()), suspended = any::<bool>());
    let ua = of!(UaInfo; name = name(), current = name(), previous = option::of(name()));
    let status = of!(AgentStatus;
        sessions = vec(session, 0..4), uas = vec(ua, 0..4), spooled_updates = any::<u32>());
    prop_oneof![
        Just(Response::Ok),
        of!(WireError; code = code(), message = text()).prop_map(Response::Error),
        grant.prop_map(Response::Retrieve),
        chunks().prop_map(Response::ManifestPage),
        bytes().prop_map(Response::Chunk),
        of!(Response::UpdateAccepted; upload = any::<u64>()),
        vec(any::<u32>(), 0..50).prop_map(Response::Missing),
        of!(Response::Committed; version = any::<u64>()),
        of!(Response::Conflict; kept_as = any::<u64>(), head = option::of(any::<u64>())),
        of!(Response::Released; committed = option::of(any::<u64>())),
        of!(Response::Pong; nonce = any::<u64>()),
        status.prop_map(Response::Status),
        of!(Response::UaCurrent; version = name()),
        of!(Response::UaDeleted; stopped_sessions = vec(name(), 0..4)),
        vec(option::of(vec(any::<[u8; 16]>(), 0..66)), 0..8).prop_map(Response::BlockSignatures),
    ]
}

fn frame() -> impl Strategy<Value = Frame> {
    let hello = of!(Hello;
        protocol_min = any::<u16>(), protocol_max = any::<u16>(), agent_version = text(),
        boot_id = any::<[u8; 16]>(), capabilities = any::<u64>(), max_frame = any::<u32>());
    let limits = of!(Limits;
        max_inflight = any::<u32>(), max_uif_size = any::<u64>(), max_chunk = any::<u32>());
    let welcome = of!(Welcome;
        protocol = any::<u16>(), host_version = text(), vm_id = text(),
        heartbeat_ms = any::<u32>(), max_frame = any::<u32>(), limits = limits);
    prop_oneof![
        hello.prop_map(Frame::Hello),
        welcome.prop_map(Frame::Welcome),
        of!(Reject; code = code(), reason = text()).prop_map(Frame::Reject),
        of!(Frame::Request; id = any::<u64>(), body = request()),
        of!(Frame::Response; id = any::<u64>(), body = response()),
        of!(Frame::Heartbeat; seq = any::<u64>()),
        of!(Frame::HeartbeatAck; seq = any::<u64>()),
        of!(Goodbye; reason = text()).prop_map(Frame::Goodbye),
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

/// The variant of a frame and, for a request or a response, of its body.
type Kind = (
    Discriminant<Frame>,
    Option<Discriminant<Request>>,
    Option<Discriminant<Response>>,
);

fn kind(f: &Frame) -> Kind {
    match f {
        Frame::Request { body, .. } => (discriminant(f), Some(discriminant(body)), None),
        Frame::Response { body, .. } => (discriminant(f), None, Some(discriminant(body))),
        _ => (discriminant(f), None, None),
    }
}

#[test]
fn every_sample_variant_is_covered_by_the_strategies() {
    // The strategies above list every variant by hand; this keeps the
    // samples (one per variant) and the strategies in step: a new variant
    // without a sample fails the golden test, one without a strategy
    // fails here.
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = frame();
    let mut drawn = std::collections::HashSet::new();
    for _ in 0..20_000 {
        let tree = strategy.new_tree(&mut runner).expect("draw a frame");
        drawn.insert(kind(&tree.current()));
    }
    for (name, f) in samples::all() {
        assert!(drawn.contains(&kind(&f)), "no strategy draws {name}");
    }
}
