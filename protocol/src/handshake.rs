//! The connection handshake: the agent sends `Hello`, the host answers
//! `Welcome` or `Reject`. Negotiation is a pure function so both the rule
//! and its edge cases are unit-tested without sockets; the async helpers
//! only add the time limits and the frame-size switch.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::codec::{FrameCodec, FrameError};
use crate::defs::{MAX_MAX_FRAME, MIN_MAX_FRAME, PROTOCOL_MAX, PROTOCOL_MIN};
use crate::message::{ErrorCode, Frame, Hello, Limits, Reject, Welcome};

/// Reads frames from one half of a connection.
pub type FrameReader<R> = FramedRead<R, FrameCodec>;
/// Writes frames to one half of a connection.
pub type FrameWriter<W> = FramedWrite<W, FrameCodec>;

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The host refused us.
    #[error("host rejected the agent ({:?}): {}", .0.code, .0.reason)]
    Rejected(Reject),
    /// The peer did not answer in time.
    #[error("handshake timed out after {0:?}")]
    Timeout(Duration),
    /// The peer closed the connection during the handshake.
    #[error("connection closed during handshake")]
    Closed,
    /// The peer sent something other than the expected handshake frame.
    #[error("unexpected frame during handshake: {0}")]
    Unexpected(&'static str),
    /// The peer's parameters are unacceptable.
    #[error("bad handshake parameters: {0}")]
    Bad(String),
    /// Framing or i/o failure.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// What the host offers; combined with a `Hello` by [`negotiate`].
#[derive(Debug, Clone)]
pub struct HostOffer {
    /// Host software version.
    pub host_version: String,
    /// The VM id the connection is bound to.
    pub vm_id: String,
    /// Heartbeat interval.
    pub heartbeat_ms: u32,
    /// The host's receive limit.
    pub max_frame: u32,
    /// Further limits.
    pub limits: Limits,
}

/// Chooses the protocol version and frame limit, or explains the refusal.
pub fn negotiate(hello: &Hello, offer: &HostOffer) -> Result<Welcome, Reject> {
    let low = hello.protocol_min.max(PROTOCOL_MIN);
    let high = hello.protocol_max.min(PROTOCOL_MAX);
    if low > high || hello.protocol_min > hello.protocol_max {
        return Err(Reject {
            code: ErrorCode::VersionMismatch,
            reason: format!(
                "agent speaks protocol {}..={}, host speaks {PROTOCOL_MIN}..={PROTOCOL_MAX}",
                hello.protocol_min, hello.protocol_max
            ),
        });
    }
    if hello.max_frame < MIN_MAX_FRAME {
        return Err(Reject {
            code: ErrorCode::TooLarge,
            reason: format!(
                "agent frame limit {} is below the protocol minimum {MIN_MAX_FRAME}",
                hello.max_frame
            ),
        });
    }
    let max_frame = hello
        .max_frame
        .min(offer.max_frame)
        .clamp(MIN_MAX_FRAME, MAX_MAX_FRAME);
    Ok(Welcome {
        protocol: high,
        host_version: offer.host_version.clone(),
        vm_id: offer.vm_id.clone(),
        heartbeat_ms: offer.heartbeat_ms.max(100),
        max_frame,
        limits: offer.limits,
    })
}

async fn next_frame<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    limit: Duration,
) -> Result<Frame, HandshakeError> {
    match tokio::time::timeout(limit, reader.next()).await {
        Err(_) => Err(HandshakeError::Timeout(limit)),
        Ok(None) => Err(HandshakeError::Closed),
        Ok(Some(frame)) => Ok(frame?),
    }
}

/// Agent side: send `hello`, wait for the answer, switch both codecs to the
/// negotiated frame limit.
pub async fn client<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    hello: Hello,
    limit: Duration,
) -> Result<Welcome, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    tokio::time::timeout(limit, writer.send(Frame::Hello(hello.clone())))
        .await
        .map_err(|_| HandshakeError::Timeout(limit))?
        .map_err(closed_or)?;
    match next_frame(reader, limit).await.map_err(|e| match e {
        HandshakeError::Frame(f) => closed_or(f),
        e => e,
    })? {
        Frame::Welcome(w) => {
            if w.protocol < hello.protocol_min || w.protocol > hello.protocol_max {
                return Err(HandshakeError::Bad(format!(
                    "host chose protocol {} outside our range",
                    w.protocol
                )));
            }
            if !(MIN_MAX_FRAME..=hello.max_frame).contains(&w.max_frame) {
                return Err(HandshakeError::Bad(format!(
                    "host chose frame limit {} outside {MIN_MAX_FRAME}..={}",
                    w.max_frame, hello.max_frame
                )));
            }
            reader.decoder_mut().set_max_frame(w.max_frame);
            writer.encoder_mut().set_max_frame(w.max_frame);
            Ok(w)
        }
        Frame::Reject(r) => Err(HandshakeError::Rejected(r)),
        _ => Err(HandshakeError::Unexpected("expected Welcome or Reject")),
    }
}

/// A peer that closed its end (the write hit a closed pipe, the read a
/// reset) is [`HandshakeError::Closed`]; other framing errors stay what
/// they are.
fn closed_or(e: FrameError) -> HandshakeError {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    match &e {
        FrameError::Io(io)
            if matches!(
                io.kind(),
                BrokenPipe | ConnectionReset | ConnectionAborted | UnexpectedEof
            ) =>
        {
            HandshakeError::Closed
        }
        _ => HandshakeError::Frame(e),
    }
}

/// Host side: read the agent's `Hello` within `limit`.
pub async fn read_hello<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    limit: Duration,
) -> Result<Hello, HandshakeError> {
    match next_frame(reader, limit).await? {
        Frame::Hello(h) => Ok(h),
        _ => Err(HandshakeError::Unexpected("expected Hello")),
    }
}

/// Host side: send the verdict; on `Welcome` switch both codecs to the
/// negotiated limit.
pub async fn answer<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    verdict: Result<Welcome, Reject>,
    limit: Duration,
) -> Result<Welcome, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (frame, outcome) = match verdict {
        Ok(w) => (Frame::Welcome(w.clone()), Ok(w)),
        Err(r) => (Frame::Reject(r.clone()), Err(HandshakeError::Rejected(r))),
    };
    tokio::time::timeout(limit, writer.send(frame))
        .await
        .map_err(|_| HandshakeError::Timeout(limit))??;
    if let Ok(w) = &outcome {
        reader.decoder_mut().set_max_frame(w.max_frame);
        writer.encoder_mut().set_max_frame(w.max_frame);
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::defs::DEFAULT_MAX_FRAME;

    fn hello(min: u16, max: u16, frame: u32) -> Hello {
        Hello {
            protocol_min: min,
            protocol_max: max,
            agent_version: "t".into(),
            boot_id: [0; 16],
            capabilities: 0,
            max_frame: frame,
        }
    }

    fn offer() -> HostOffer {
        HostOffer {
            host_version: "h".into(),
            vm_id: "vm1".into(),
            heartbeat_ms: 1000,
            max_frame: DEFAULT_MAX_FRAME,
            limits: Limits {
                max_inflight: 16,
                max_uif_size: 1 << 40,
                max_chunk: crate::defs::MAX_CHUNK,
            },
        }
    }

    #[test]
    fn picks_highest_common_version_and_smallest_frame() {
        let w = negotiate(&hello(1, 9, 8 << 20), &offer()).expect("welcome");
        assert_eq!(w.protocol, PROTOCOL_MAX);
        assert_eq!(w.max_frame, DEFAULT_MAX_FRAME);
        let w = negotiate(&hello(1, 1, MIN_MAX_FRAME), &offer()).expect("welcome");
        assert_eq!(w.protocol, 1, "an agent speaking only version 1 gets 1");
        assert_eq!(w.max_frame, MIN_MAX_FRAME);
        assert_eq!(w.vm_id, "vm1");
    }

    #[test]
    fn refuses_disjoint_versions_and_tiny_frames() {
        let r = negotiate(
            &hello(PROTOCOL_MAX + 1, PROTOCOL_MAX + 3, DEFAULT_MAX_FRAME),
            &offer(),
        )
        .expect_err("future agent");
        assert_eq!(r.code, ErrorCode::VersionMismatch);
        let r = negotiate(&hello(3, 2, DEFAULT_MAX_FRAME), &offer()).expect_err("inverted");
        assert_eq!(r.code, ErrorCode::VersionMismatch);
        let r = negotiate(&hello(1, 1, 1024), &offer()).expect_err("tiny frame");
        assert_eq!(r.code, ErrorCode::TooLarge);
    }

    /// A host that closes the connection unread (an unregistered peer) is
    /// `Closed` to the agent, whether its `Hello` write or its read is the
    /// one that notices, on a real Unix socket.
    #[tokio::test]
    async fn a_connection_closed_unread_is_closed_not_an_io_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let closer = tokio::spawn(async move {
            for _ in 0..2 {
                let (s, _) = listener.accept().await.expect("accept");
                drop(s);
            }
        });
        for _ in 0..2 {
            let stream = tokio::net::UnixStream::connect(&path)
                .await
                .expect("connect");
            // Let the host's close land first, as it does at accept.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let (r, w) = tokio::io::split(stream);
            let mut reader = FramedRead::new(r, FrameCodec::default());
            let mut writer = FramedWrite::new(w, FrameCodec::default());
            let e = client(
                &mut reader,
                &mut writer,
                hello(1, PROTOCOL_MAX, DEFAULT_MAX_FRAME),
                Duration::from_secs(5),
            )
            .await
            .expect_err("closed");
            assert!(matches!(e, HandshakeError::Closed), "{e}");
        }
        closer.await.expect("closer");
    }
}
