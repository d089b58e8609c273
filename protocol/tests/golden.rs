//! Golden byte vectors: the exact encoding of every message. If one of
//! these fails, an existing message's encoding changed, which breaks every
//! agent already baked into a VM image. Append new variants instead (see
//! WIRE.md §12), and add their vectors here.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::cast_possible_truncation
)]

mod samples;

use uve_protocol::codec::{FrameCodec, encode_frame};
use uve_protocol::defs::DEFAULT_MAX_FRAME;
use uve_protocol::message::ErrorCode;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Expected `len || body` of each sample, in hex.
const GOLDEN: &[(&str, &str)] = &[
    (
        "hello",
        "1d00000000010105302e312e30b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b003808040",
    ),
    (
        "welcome",
        "1a000000010105302e312e3003766d318827808040208080808040808010",
    ),
    ("reject", "0d000000020a0a6e6f207375636820766d"),
    ("heartbeat", "0300000005ac02"),
    ("heartbeat_ack", "0300000006ac02"),
    ("goodbye", "050000000703627965"),
    ("uif_retrieve", "0c00000003010005616c696365027331"),
    ("manifest_page", "0b00000003020105616c6963650300"),
    (
        "chunk_fetch",
        "2900000003030205616c6963650101010101010101010101010101010101010101010101010101010101010101",
    ),
    (
        "update_begin",
        "3300000003040305616c696365027331010307ac02d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d10200",
    ),
    (
        "update_page",
        "490000000305040900020101010101010101010101010101010101010101010101010101010101010101640202020202020202020202020202020202020202020202020202020202020202c801",
    ),
    (
        "chunk_upload",
        "2800000003060509020202020202020202020202020202020202020202020202020202020202020203010203",
    ),
    ("update_commit", "0400000003070609"),
    ("update_abort", "0400000003080709"),
    (
        "session_started",
        "1200000003090802733105616c69636501046465736b",
    ),
    ("session_ended", "06000000030a09027331"),
    (
        "unexpected_disconnect",
        "2c000000030b0a4d02733105616c69636500177561206578697465642077697468207369676e616c203980d095ffbc31",
    ),
    ("user_release", "0c000000030c0b05616c696365b0ea01"),
    ("monitor_grant", "10000000030d0c02733103626f62e0a499ffbc31"),
    ("monitor_revoke", "0a000000030e0d02733103626f62"),
    (
        "ua_begin",
        "41000000030f0e01046465736b03322e30020862696e2f6465736b062d2d666173740303030303030303030303030303030303030303030303030303030303030303802001",
    ),
    ("ua_bundle_data", "0a00000003100f01000409090909"),
    ("ua_commit", "0400000003111001"),
    ("ua_rollback", "08000000031211046465736b"),
    ("ua_delete", "09000000031312046465736b01"),
    ("session_suspend", "06000000031413027331"),
    ("session_resume", "06000000031514027331"),
    ("ping", "0400000003161505"),
    ("agent_status", "03000000031716"),
    ("resp_ok", "03000000040100"),
    (
        "resp_error",
        "21000000040201031c616c696365206973206e6f742061737369676e656420746f20766d31",
    ),
    (
        "resp_retrieve",
        "2b000000040302010301ac02d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1020700",
    ),
    (
        "resp_manifest_page",
        "2500000004040301010101010101010101010101010101010101010101010101010101010101010164",
    ),
    ("resp_chunk", "0600000004050402aabb"),
    ("resp_update_accepted", "0400000004060509"),
    ("resp_missing", "08000000040706030001ac02"),
    ("resp_committed", "0400000004080704"),
    ("resp_conflict", "06000000040908050104"),
    ("resp_released", "05000000040a090104"),
    ("resp_pong", "04000000040b0a05"),
    (
        "resp_status",
        "1f000000040c0b0102733105616c696365000101046465736b03322e300103312e3001",
    ),
    ("resp_ua_current", "07000000040d0c03322e30"),
    ("resp_ua_deleted", "07000000040e0d01027331"),
    // ---- protocol 2 ----
    ("block_signatures", "08000000031817090200ac02"),
    (
        "chunk_delta",
        "2f00000003191809ac0202020202020202020202020202020202020202020202020202020202020202020201020405ac020106",
    ),
    (
        "resp_block_signatures",
        "27000000040f0e020102a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a2a2a2a2a2a2a2a2a2a2a2a2a2a2a2a200",
    ),
];

#[test]
fn every_sample_matches_its_golden_vector() {
    let samples = samples::all();
    let mut mismatches = Vec::new();
    for (name, frame) in &samples {
        let got = hex(&encode_frame(frame, DEFAULT_MAX_FRAME).expect("encode"));
        match GOLDEN.iter().find(|(n, _)| n == name) {
            Some((_, want)) if *want == got => {}
            Some((_, want)) => mismatches.push(format!(
                "{name}: want {want}\n{:>width$}  got  {got}",
                "",
                width = name.len()
            )),
            None => mismatches.push(format!(
                "{name}: no golden vector; add (\"{name}\", \"{got}\"),"
            )),
        }
    }
    assert!(
        mismatches.is_empty(),
        "encoding changed:\n{}",
        mismatches.join("\n")
    );
    assert_eq!(
        GOLDEN.len(),
        samples.len(),
        "golden vector without a sample"
    );
}

#[test]
fn golden_vectors_decode_to_their_samples() {
    use tokio_util::codec::Decoder;
    for (name, frame) in samples::all() {
        let (_, want) = GOLDEN.iter().find(|(n, _)| *n == name).expect("vector");
        let bytes: Vec<u8> = (0..want.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&want[i..i + 2], 16).expect("hex"))
            .collect();
        let mut buf = bytes::BytesMut::from(&bytes[..]);
        let decoded = FrameCodec::default()
            .decode(&mut buf)
            .expect("decode")
            .expect("complete");
        assert_eq!(decoded, frame, "{name}");
        assert!(buf.is_empty());
    }
}

/// Enum variant indices are the wire format; pin a few that peers branch on.
#[test]
fn error_code_indices_are_stable() {
    let idx = |c: ErrorCode| postcard::to_stdvec(&c).expect("encode")[0];
    assert_eq!(idx(ErrorCode::BadRequest), 0);
    assert_eq!(idx(ErrorCode::NotAssigned), 3);
    assert_eq!(idx(ErrorCode::UnknownVm), 10);
    assert_eq!(idx(ErrorCode::Internal), 17);
}
