//! A hostile VM's raw connection for the host's budget tests and the
//! hostile benchmark: it handshakes as an agent and then writes frames
//! itself, without a link, so it can do what a real agent never does —
//! stop reading, flood requests, leave frames half sent.

use std::path::Path;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio_util::codec::{FramedRead, FramedWrite};
use uve_protocol::codec::{FrameCodec, encode_frame};
use uve_protocol::defs::PROTOCOL_MAX;
use uve_protocol::message::{Frame, Request, Response, Welcome};
use uve_protocol::transport::BoxStream;

use crate::fake_agent::{dial_and_handshake, hello};

/// A handshaken connection whose frames the test writes and reads itself.
pub struct RawPeer {
    /// Frames from the host.
    pub reader: FramedRead<ReadHalf<BoxStream>, FrameCodec>,
    /// Frames to the host.
    pub writer: FramedWrite<WriteHalf<BoxStream>, FrameCodec>,
    /// What the host answered in the handshake.
    pub welcome: Welcome,
    next_id: u64,
}

impl RawPeer {
    /// Dials the Unix socket `path` and handshakes as agent `name`.
    pub async fn connect(path: &Path, name: &str) -> Result<Self, String> {
        let hello = hello(name, PROTOCOL_MAX, [0x0b; 16]);
        let (reader, writer, welcome) =
            dial_and_handshake(path, hello, Duration::from_secs(10)).await?;
        Ok(RawPeer {
            reader,
            writer,
            welcome,
            next_id: 1,
        })
    }

    /// Sends `body` and reads frames until its answer (within 10 s).
    pub async fn call(&mut self, body: Request) -> Result<Response, String> {
        let id = self.next_id;
        self.next_id += 1;
        self.writer
            .send(Frame::Request { id, body })
            .await
            .map_err(|e| e.to_string())?;
        let wait = async {
            while let Some(frame) = self.reader.next().await {
                match frame.map_err(|e| e.to_string())? {
                    Frame::Response { id: got, body } if got == id => return Ok(body),
                    _ => {}
                }
            }
            Err("connection closed".to_string())
        };
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .map_err(|_| "no answer in 10 s".to_string())?
    }

    /// `count` requests made by `make`, encoded back to back (ids go on
    /// from this peer's last).
    pub fn encode_flood(&mut self, count: usize, make: impl Fn() -> Request) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..count {
            let frame = Frame::Request {
                id: self.next_id,
                body: make(),
            };
            self.next_id += 1;
            if let Ok(b) = encode_frame(&frame, self.welcome.max_frame) {
                out.extend_from_slice(&b);
            }
        }
        out
    }

    /// Splits off the write side as a raw byte sink: the host's frames are
    /// then never read (the returned reader is kept only so the socket
    /// stays open).
    pub fn into_raw_writer(
        self,
    ) -> (
        WriteHalf<BoxStream>,
        FramedRead<ReadHalf<BoxStream>, FrameCodec>,
    ) {
        (self.writer.into_inner(), self.reader)
    }
}

/// Writes `bytes` in pieces of `piece` bytes until all are written or the
/// host closes the connection; returns the bytes written and the error
/// that stopped it, if any.
pub async fn write_until_closed(
    w: &mut WriteHalf<BoxStream>,
    bytes: &[u8],
    piece: usize,
) -> (usize, Option<std::io::Error>) {
    let mut done = 0;
    for part in bytes.chunks(piece.max(1)) {
        if let Err(e) = w.write_all(part).await {
            return (done, Some(e));
        }
        done += part.len();
    }
    (done, None)
}
