//! Framing: every frame is a `u32` little-endian body length followed by a
//! postcard-encoded [`Frame`]. The decoder checks the announced length
//! against the negotiated limit *before* reserving any memory, so a peer
//! announcing 4 GiB costs nothing but an error, and it grows its buffer only
//! as bytes arrive ([`RESERVE_STEP`] at a time), so a peer announcing a
//! maximal frame and then stalling holds no more than it sent.

use bytes::{Buf, BufMut, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::defs::DEFAULT_MAX_FRAME;
use crate::message::Frame;
use crate::names::{self, NameError};

/// Length of the frame header.
pub const HEADER_LEN: usize = 4;

/// The most the decoder reserves ahead of the bytes received.
pub const RESERVE_STEP: usize = 64 * 1024;

/// Why a frame could not be read or written. Any of these closes the
/// connection it happened on, and only that connection.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// A frame announced (or would need) more than the negotiated limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    Oversize {
        /// Announced or encoded body length.
        len: u64,
        /// The limit.
        max: u32,
    },
    /// The stream ended inside a frame.
    #[error("connection closed inside a frame ({have} of {need} bytes received)")]
    Truncated {
        /// Bytes of the frame received.
        have: usize,
        /// Bytes the frame needs (header included).
        need: usize,
    },
    /// The body is not a valid postcard `Frame` (unknown variant, bad
    /// varint, invalid UTF-8, ...).
    #[error("undecodable frame: {0}")]
    Undecodable(#[from] postcard::Error),
    /// The body decoded but left bytes over: a framing desync or a peer
    /// speaking another version of a message.
    #[error("frame body has {0} trailing bytes")]
    TrailingBytes(usize),
    /// The underlying socket failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A request or response that is well framed but carries an invalid
    /// name. Only the handshake treats it as fatal: a link answers the
    /// request `InvalidName` on its own id (or fails the request this
    /// answers) and reads on ([`LinkCodec`]).
    #[error("{what} {id} has an invalid name: {error}")]
    BadName {
        /// Whether a request or a response.
        what: Carrier,
        /// Its request id.
        id: u64,
        /// What is wrong with the name.
        error: NameError,
    },
}

/// Which kind of frame carried an invalid name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    /// A request (answered `InvalidName`).
    Request,
    /// A response (the request it answers fails).
    Response,
}

impl std::fmt::Display for Carrier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Carrier::Request => "request",
            Carrier::Response => "response",
        })
    }
}

/// Postcard's variant indices of the frames that carry a request id (the
/// index of [`Frame::Request`] and [`Frame::Response`]; pinned by the
/// golden vectors).
pub(crate) const REQUEST_TAG: u32 = 3;
const RESPONSE_TAG: u32 = 4;

/// `tokio_util` codec for [`Frame`]s with a maximum body size.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    max_frame: u32,
    last_len: usize,
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(DEFAULT_MAX_FRAME)
    }
}

impl FrameCodec {
    /// A codec refusing bodies larger than `max_frame` bytes.
    pub fn new(max_frame: u32) -> Self {
        FrameCodec {
            max_frame,
            last_len: 0,
        }
    }

    /// Encoded length (header included) of the last frame decoded.
    pub fn last_len(&self) -> usize {
        self.last_len
    }

    /// The current limit.
    pub fn max_frame(&self) -> u32 {
        self.max_frame
    }

    /// Changes the limit (after the handshake negotiated one).
    pub fn set_max_frame(&mut self, max_frame: u32) {
        self.max_frame = max_frame;
    }
}

/// Encodes one frame to a standalone buffer (header included).
pub fn encode_frame(frame: &Frame, max_frame: u32) -> Result<BytesMut, FrameError> {
    let mut buf = BytesMut::new();
    FrameCodec::new(max_frame).encode(frame, &mut buf)?;
    Ok(buf)
}

/// Decodes exactly one frame body (header excluded).
///
/// Names are decoded as newtypes that refuse invalid names, which fails the
/// whole decode. When that happens to a request or a response, the frame's
/// request id (which precedes the body) is read on its own and the failure
/// is [`FrameError::BadName`], so the link can answer or fail just that
/// request.
pub fn decode_body(body: &[u8]) -> Result<Frame, FrameError> {
    names::clear_refusal();
    let (frame, rest) = match postcard::take_from_bytes::<Frame>(body) {
        Ok(decoded) => decoded,
        Err(e) => {
            let refused = names::take_refusal();
            return Err(refused
                .and_then(|error| bad_name(body, error))
                .unwrap_or(FrameError::Undecodable(e)));
        }
    };
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes(rest.len()));
    }
    Ok(frame)
}

/// The [`FrameError::BadName`] of a request or response frame whose body
/// refused `error`, or `None` for any other frame.
fn bad_name(body: &[u8], error: NameError) -> Option<FrameError> {
    let ((tag, id), _) = postcard::take_from_bytes::<(u32, u64)>(body).ok()?;
    let what = match tag {
        REQUEST_TAG => Carrier::Request,
        RESPONSE_TAG => Carrier::Response,
        _ => return None,
    };
    Some(FrameError::BadName { what, id, error })
}

/// What a link reads: a frame, or a request or response that is well
/// framed but refused for an invalid name ([`FrameError::BadName`]).
#[derive(Debug)]
pub enum Inbound {
    /// A decoded frame.
    Frame(Frame),
    /// A request (answer `InvalidName` on `id`) or a response (fail the
    /// request `id`) with an invalid name.
    BadName {
        /// Request or response.
        what: Carrier,
        /// Its request id.
        id: u64,
        /// What is wrong with the name.
        error: NameError,
    },
}

/// The codec of an established link: [`FrameCodec`], except that a frame
/// refused for a name is an item ([`Inbound::BadName`]) rather than an
/// error, so the stream goes on (a `FramedRead` ends at its first error).
#[derive(Debug, Clone, Copy)]
pub struct LinkCodec(pub FrameCodec);

impl LinkCodec {
    /// Encoded length (header included) of the last frame decoded.
    pub fn last_len(&self) -> usize {
        self.0.last_len()
    }
}

impl Decoder for LinkCodec {
    type Item = Inbound;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Inbound>, FrameError> {
        inbound(self.0.decode(src))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Inbound>, FrameError> {
        inbound(self.0.decode_eof(src))
    }
}

/// What [`LinkCodec`] makes of [`FrameCodec`]'s answer: a frame refused for
/// a name becomes an item.
fn inbound(decoded: Result<Option<Frame>, FrameError>) -> Result<Option<Inbound>, FrameError> {
    match decoded {
        Ok(frame) => Ok(frame.map(Inbound::Frame)),
        Err(FrameError::BadName { what, id, error }) => {
            Ok(Some(Inbound::BadName { what, id, error }))
        }
        Err(e) => Err(e),
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_le_bytes([src[0], src[1], src[2], src[3]]);
        if len > self.max_frame {
            return Err(FrameError::Oversize {
                len: u64::from(len),
                max: self.max_frame,
            });
        }
        let need = HEADER_LEN + len as usize;
        if src.len() < need {
            // Grow with the bytes that arrive, not with what was announced.
            src.reserve((need - src.len()).min(RESERVE_STEP));
            return Ok(None);
        }
        self.last_len = need;
        src.advance(HEADER_LEN);
        let body = src.split_to(len as usize);
        decode_body(&body).map(Some)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => {
                let need = if src.len() >= HEADER_LEN {
                    HEADER_LEN + u32::from_le_bytes([src[0], src[1], src[2], src[3]]) as usize
                } else {
                    HEADER_LEN
                };
                Err(FrameError::Truncated {
                    have: src.len(),
                    need,
                })
            }
        }
    }
}

impl Encoder<&Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        let start = dst.len();
        dst.put_u32_le(0);
        let mut writer = dst.writer();
        let written = postcard::to_io(frame, &mut writer).map(|_| ());
        let dst = writer.into_inner();
        if let Err(e) = written {
            dst.truncate(start);
            return Err(e.into());
        }
        let len = dst.len() - start - HEADER_LEN;
        if len > self.max_frame as usize {
            dst.truncate(start);
            return Err(FrameError::Oversize {
                len: len as u64,
                max: self.max_frame,
            });
        }
        let len_bytes = u32::try_from(len)
            .map_err(|_| FrameError::Oversize {
                len: len as u64,
                max: self.max_frame,
            })?
            .to_le_bytes();
        dst[start..start + HEADER_LEN].copy_from_slice(&len_bytes);
        Ok(())
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        self.encode(&frame, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Request;

    #[test]
    fn four_gib_header_allocates_nothing_and_errors() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::with_capacity(8);
        buf.put_u32_le(u32::MAX);
        buf.put_u8(0);
        let cap_before = buf.capacity();
        let err = codec.decode(&mut buf).expect_err("must refuse");
        assert!(
            matches!(err, FrameError::Oversize { len, max } if len == u64::from(u32::MAX) && max == DEFAULT_MAX_FRAME)
        );
        assert_eq!(
            buf.capacity(),
            cap_before,
            "decoder reserved memory for a refused frame"
        );
    }

    #[test]
    fn announced_maximal_frame_reserves_only_a_step() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        buf.put_u32_le(DEFAULT_MAX_FRAME);
        buf.put_u8(0);
        assert!(codec.decode(&mut buf).expect("waits").is_none());
        assert!(
            buf.capacity() <= HEADER_LEN + 1 + RESERVE_STEP,
            "reserved {} bytes for a frame of which 1 byte arrived",
            buf.capacity()
        );
    }

    #[test]
    fn partial_frame_waits_then_decodes() {
        let frame = Frame::Request {
            id: 9,
            body: Request::Ping { nonce: 42 },
        };
        let bytes = encode_frame(&frame, DEFAULT_MAX_FRAME).expect("encode");
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        for (i, b) in bytes.iter().enumerate() {
            buf.put_u8(*b);
            let out = codec.decode(&mut buf).expect("decode");
            if i + 1 < bytes.len() {
                assert!(out.is_none());
            } else {
                assert_eq!(out, Some(frame.clone()));
            }
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn truncated_at_eof_is_an_error() {
        let frame = Frame::Heartbeat { seq: 1 };
        let bytes = encode_frame(&frame, DEFAULT_MAX_FRAME).expect("encode");
        let mut buf = BytesMut::from(&bytes[..bytes.len() - 1]);
        let err = FrameCodec::default()
            .decode_eof(&mut buf)
            .expect_err("truncated");
        assert!(
            matches!(err, FrameError::Truncated { have, need } if have == bytes.len() - 1 && need == bytes.len())
        );
    }

    #[test]
    fn garbage_and_trailing_bytes_are_errors() {
        let mut buf = BytesMut::new();
        buf.put_u32_le(3);
        buf.put_slice(&[0xff, 0xff, 0xff]);
        assert!(matches!(
            FrameCodec::default().decode(&mut buf),
            Err(FrameError::Undecodable(_))
        ));
        // A valid Heartbeat{seq:1} body (variant 5, varint 1) plus one extra byte.
        let mut buf = BytesMut::new();
        buf.put_u32_le(3);
        buf.put_slice(&[5, 1, 0]);
        assert!(matches!(
            FrameCodec::default().decode(&mut buf),
            Err(FrameError::TrailingBytes(1))
        ));
    }

    #[test]
    fn encoder_refuses_frames_over_the_limit() {
        let frame = Frame::Request {
            id: 1,
            body: Request::ChunkUpload {
                upload: 1,
                hash: crate::Hash([0; 32]),
                data: vec![0u8; 2000],
            },
        };
        let mut buf = BytesMut::new();
        let err = FrameCodec::new(1000)
            .encode(&frame, &mut buf)
            .expect_err("too big");
        assert!(matches!(err, FrameError::Oversize { max: 1000, .. }));
        assert!(
            buf.is_empty(),
            "a refused frame must leave nothing in the buffer"
        );
    }
}
