//! Fuzzes the frame decoder with arbitrary byte streams: it must never
//! panic, never reserve more than the frame limit, and everything it
//! decodes must re-encode to a frame that decodes to the same value.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;
use uve_protocol::codec::{FrameCodec, encode_frame};

const LIMIT: u32 = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let mut codec = FrameCodec::new(LIMIT);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = codec.decode(&mut buf) {
        let mut again = encode_frame(&frame, LIMIT).expect("a decoded frame re-encodes");
        let back = codec
            .decode(&mut again)
            .expect("re-decode")
            .expect("complete");
        assert_eq!(back, frame);
    }
    assert!(buf.capacity() <= data.len() + LIMIT as usize + 4);
});
