//! A hostile agent on the other end of an in-process pipe: it handshakes
//! with the host's real server path ([`uve_host::wire::server::serve_connection`]),
//! then writes request frames in batches and collects the responses,
//! checking that the host answers every request exactly once, on its own
//! id, with a frame that decodes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::task::JoinHandle;
use tokio_util::codec::{FramedRead, FramedWrite};
use uve_host::host::Host;
use uve_protocol::codec::{FrameCodec, encode_frame};
use uve_protocol::defs::{DEFAULT_MAX_FRAME, MAX_CHUNK};
use uve_protocol::handshake;
use uve_protocol::message::{Frame, Hello, Request, Response, Welcome};
use uve_protocol::transport::Peer as Origin;

/// How long the host may take to answer a batch or to end a connection.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// What the peer sends as one request.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// A request, encoded by the peer.
    Request(Request),
    /// Request bytes as given: the frame is the request tag, the id and
    /// these bytes (they may not decode at all).
    Raw(Vec<u8>),
}

/// What became of one request of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The host answered.
    Got(Response),
    /// Too large for the negotiated frame: a real agent cannot send it
    /// either, so it was not sent.
    NotSent,
    /// No answer: the link was going down ([`Peer::ending`]).
    Unanswered,
}

/// The agent end of a connection.
pub struct Peer {
    reader: FramedRead<ReadHalf<DuplexStream>, FrameCodec>,
    writer: WriteHalf<DuplexStream>,
    next_id: u64,
    /// What the host welcomed us with.
    pub welcome: Welcome,
    /// Set once the link is known to be going down (the peer sent
    /// something that ends it): later requests may go unanswered.
    pub ending: bool,
}

/// A connection's server task: the host's `serve_connection`.
pub type Served = JoinHandle<bool>;

impl Peer {
    /// Connects to `vm` on `host` with `hello`: the host's end runs as a
    /// task. `Err` carries the host's refusal.
    pub async fn connect(
        host: &Arc<Host>,
        vm: &str,
        hello: Hello,
    ) -> (Result<Peer, handshake::HandshakeError>, Served) {
        let (ours, theirs) = tokio::io::duplex(4 * MAX_CHUNK as usize);
        let origin = Origin::Unix {
            path: format!("/nonexistent/{vm}.sock").into(),
        };
        let served = tokio::spawn(uve_host::wire::server::serve_connection(
            host.clone(),
            vm.to_string(),
            Box::new(theirs),
            origin,
        ));
        let (r, w) = tokio::io::split(ours);
        let mut reader = FramedRead::new(r, FrameCodec::new(DEFAULT_MAX_FRAME));
        let mut writer = FramedWrite::new(w, FrameCodec::new(DEFAULT_MAX_FRAME));
        let welcome = handshake::client(&mut reader, &mut writer, hello, PATIENCE).await;
        let peer = welcome.map(|welcome| Peer {
            reader,
            writer: writer.into_inner(),
            next_id: 1,
            welcome,
            ending: false,
        });
        (peer, served)
    }

    /// Sends `batch` back to back and returns what became of each request.
    pub async fn exchange(&mut self, batch: &[Outgoing]) -> Vec<Answer> {
        let max_frame = self.welcome.max_frame;
        let mut bytes = Vec::new();
        let mut ids = HashMap::new();
        for (slot, out) in batch.iter().enumerate() {
            let id = self.next_id;
            self.next_id += 1;
            let frame = match out {
                Outgoing::Request(body) => {
                    let frame = Frame::Request {
                        id,
                        body: body.clone(),
                    };
                    match encode_frame(&frame, max_frame) {
                        Ok(b) => b.to_vec(),
                        // Too large for the link: a real agent cannot send
                        // it either; it stays unanswered.
                        Err(_) => continue,
                    }
                }
                Outgoing::Raw(body) => {
                    let mut f = postcard::to_stdvec(&(3u32, id)).expect("encode header");
                    f.extend_from_slice(body);
                    if uve_protocol::codec::decode_body(&f).is_err_and(|e| {
                        !matches!(e, uve_protocol::codec::FrameError::BadName { .. })
                    }) {
                        // The host ends a link on a frame it cannot decode.
                        self.ending = true;
                    }
                    let mut framed = u32::try_from(f.len())
                        .unwrap_or(u32::MAX)
                        .to_le_bytes()
                        .to_vec();
                    framed.extend_from_slice(&f);
                    framed
                }
            };
            bytes.extend_from_slice(&frame);
            ids.insert(id, slot);
        }
        let mut answers = vec![Answer::NotSent; batch.len()];
        for slot in ids.values() {
            answers[*slot] = Answer::Unanswered;
        }
        let expected = ids.len();
        let writer = &mut self.writer;
        let write = async {
            // A host that ends the link stops reading; what is left unwritten
            // goes unanswered.
            let _ = writer.write_all(&bytes).await;
            let _ = writer.flush().await;
        };
        let reader = &mut self.reader;
        let ending = self.ending;
        let read = async {
            let mut got = 0;
            while got < expected {
                let frame = match tokio::time::timeout(PATIENCE, reader.next()).await {
                    Err(_) => panic!(
                        "{} of {expected} requests unanswered after {PATIENCE:?}",
                        expected - got
                    ),
                    Ok(None) if ending => return,
                    Ok(None) => panic!(
                        "the host closed the link with {} requests unanswered",
                        expected - got
                    ),
                    Ok(Some(Err(e))) => panic!("the host sent a frame that does not decode: {e}"),
                    Ok(Some(Ok(f))) => f,
                };
                match frame {
                    Frame::Response { id, body } => {
                        let slot = *ids
                            .get(&id)
                            .unwrap_or_else(|| panic!("response to unknown request {id}"));
                        assert_eq!(
                            answers[slot],
                            Answer::Unanswered,
                            "request {id} answered twice"
                        );
                        answers[slot] = Answer::Got(body);
                        got += 1;
                    }
                    Frame::Heartbeat { .. } | Frame::HeartbeatAck { .. } => {}
                    Frame::Goodbye(g) if ending => {
                        let _ = g;
                        return;
                    }
                    other => panic!("the host sent {other:?} to an agent that asked nothing of it"),
                }
            }
        };
        tokio::join!(write, read);
        answers
    }

    /// Ends the connection: an orderly `Goodbye`, or the pipe just closed.
    pub async fn close(mut self, goodbye: bool) {
        if goodbye {
            let frame = Frame::Goodbye(uve_protocol::message::Goodbye {
                reason: "fuzz case over".into(),
            });
            if let Ok(b) = encode_frame(&frame, self.welcome.max_frame) {
                let _ = self.writer.write_all(&b).await;
                let _ = self.writer.flush().await;
            }
        }
        drop(self);
    }
}

/// Waits for a connection's server task to end.
pub async fn ended(served: Served) -> bool {
    match tokio::time::timeout(PATIENCE, served).await {
        Err(_) => panic!("the host did not end the connection within {PATIENCE:?}"),
        Ok(Err(e)) => panic!("the connection's task failed: {e}"),
        Ok(Ok(admitted)) => admitted,
    }
}
