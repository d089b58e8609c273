//! The multiplexed connection loop shared by host and agent.
//!
//! A link owns one connection after the handshake. It runs two tasks:
//!
//! - the **reader** decodes frames, routes responses to the requests waiting
//!   for them, answers heartbeats, and hands incoming requests to the
//!   dispatcher through a bounded channel of [`Incoming`];
//! - the **writer** sends encoded frames from two bounded queues, always
//!   draining the *control* queue before the *bulk* queue (chunk and bundle
//!   bytes), so a multi-GiB transfer delays a heartbeat or a disconnect
//!   notice by at most one bulk frame already being written.
//!
//! Frames are encoded by the caller (so an oversized frame is refused to the
//! caller, synchronously). The link knows nothing of sessions, stores or
//! UAs: domain code uses the cloneable [`LinkHandle`]; the dispatcher
//! consumes [`Incoming`]. A peer silent for `HEARTBEAT_MISSES` intervals is
//! declared dead and the link closes; every open request then fails with
//! [`LinkError::Closed`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::codec::{FrameError, encode_frame};
use crate::defs::HEARTBEAT_MISSES;
use crate::handshake::FrameReader;
use crate::message::{ErrorCode, Frame, Goodbye, Request, Response, WireError};

/// Tunables of one link.
#[derive(Debug, Clone, Copy)]
pub struct LinkConfig {
    /// Interval between our heartbeats; the peer is dead after
    /// `HEARTBEAT_MISSES` intervals without any frame from it.
    pub heartbeat: Duration,
    /// Negotiated frame limit (for encoding).
    pub max_frame: u32,
    /// Capacity of the control queue (frames).
    pub control_queue: usize,
    /// Capacity of the bulk queue (frames; each up to one chunk).
    pub bulk_queue: usize,
    /// Capacity of the incoming-request channel to the dispatcher.
    pub incoming_queue: usize,
}

impl LinkConfig {
    /// Defaults for a given heartbeat interval and frame limit.
    pub fn new(heartbeat: Duration, max_frame: u32) -> Self {
        LinkConfig {
            heartbeat,
            max_frame,
            control_queue: 64,
            bulk_queue: 4,
            incoming_queue: 64,
        }
    }
}

/// Why a link ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEnd {
    /// The peer said goodbye (orderly).
    Goodbye(String),
    /// We closed it (goodbye sent or local shutdown).
    Local,
    /// The peer closed the connection without a goodbye.
    PeerClosed,
    /// Nothing heard from the peer for this long.
    DeadPeer(Duration),
    /// The peer sent a frame we could not accept; the reason is logged.
    BadFrame(String),
    /// Writing to the socket failed.
    WriteFailed(String),
}

impl LinkEnd {
    /// True if the peer ended the connection on purpose.
    pub fn is_orderly(&self) -> bool {
        matches!(self, LinkEnd::Goodbye(_) | LinkEnd::Local)
    }
}

impl std::fmt::Display for LinkEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkEnd::Goodbye(r) => write!(f, "peer said goodbye: {r}"),
            LinkEnd::Local => f.write_str("closed locally"),
            LinkEnd::PeerClosed => f.write_str("peer closed the connection"),
            LinkEnd::DeadPeer(d) => write!(f, "peer silent for {d:?}"),
            LinkEnd::BadFrame(e) => write!(f, "bad frame from peer: {e}"),
            LinkEnd::WriteFailed(e) => write!(f, "write failed: {e}"),
        }
    }
}

/// Why a request or response could not be exchanged.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The link is gone.
    #[error("link closed: {0}")]
    Closed(LinkEnd),
    /// No answer in time.
    #[error("no response within {0:?}")]
    Timeout(Duration),
    /// The frame could not be encoded (e.g. larger than the frame limit).
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The peer answered with an error.
    #[error("peer refused: {0}")]
    Remote(WireError),
}

impl LinkError {
    /// The wire error code if the peer refused, else `None`.
    pub fn remote_code(&self) -> Option<ErrorCode> {
        match self {
            LinkError::Remote(e) => Some(e.code),
            _ => None,
        }
    }

    /// The peer's final refusal, if that is what this is: a remote error
    /// whose code is not [transient](ErrorCode::is_transient). A closed
    /// link, a timeout or an unencodable frame says nothing about what the
    /// peer would answer, so a retry may succeed.
    pub fn refusal(&self) -> Option<&WireError> {
        match self {
            LinkError::Remote(e) if !e.code.is_transient() => Some(e),
            _ => None,
        }
    }
}

struct Shared {
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, oneshot::Sender<Response>>>,
    control: mpsc::Sender<Bytes>,
    bulk: mpsc::Sender<Bytes>,
    cancel: CancellationToken,
    end: watch::Sender<Option<LinkEnd>>,
    max_frame: u32,
}

impl Shared {
    fn finish(&self, end: LinkEnd) {
        self.end.send_if_modified(|slot| {
            if slot.is_none() {
                *slot = Some(end);
                true
            } else {
                false
            }
        });
        self.cancel.cancel();
        // Dropping the senders fails every waiting request with Closed.
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    fn end_reason(&self) -> LinkEnd {
        self.end.borrow().clone().unwrap_or(LinkEnd::Local)
    }

    async fn enqueue(&self, frame: &Frame) -> Result<(), LinkError> {
        let bytes = encode_frame(frame, self.max_frame)?.freeze();
        let queue = if frame.is_bulk() {
            &self.bulk
        } else {
            &self.control
        };
        tokio::select! {
            sent = queue.send(bytes) => sent.map_err(|_| LinkError::Closed(self.end_reason())),
            () = self.cancel.cancelled() => Err(LinkError::Closed(self.end_reason())),
        }
    }
}

/// Cloneable handle for sending requests over a link.
#[derive(Clone)]
pub struct LinkHandle {
    shared: Arc<Shared>,
}

impl LinkHandle {
    /// Sends a request and waits for its response. A `Response::Error` from
    /// the peer becomes [`LinkError::Remote`].
    pub async fn request(&self, body: Request) -> Result<Response, LinkError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, tx);
        if self.shared.cancel.is_cancelled() {
            self.forget(id);
            return Err(LinkError::Closed(self.shared.end_reason()));
        }
        if let Err(e) = self.shared.enqueue(&Frame::Request { id, body }).await {
            self.forget(id);
            return Err(e);
        }
        match rx.await {
            Ok(Response::Error(e)) => Err(LinkError::Remote(e)),
            Ok(r) => Ok(r),
            Err(_) => Err(LinkError::Closed(self.shared.end_reason())),
        }
    }

    /// Like [`request`](Self::request), bounded in time.
    pub async fn request_timeout(
        &self,
        body: Request,
        limit: Duration,
    ) -> Result<Response, LinkError> {
        tokio::time::timeout(limit, self.request(body))
            .await
            .map_err(|_| LinkError::Timeout(limit))?
    }

    fn forget(&self, id: u64) {
        self.shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }

    /// Sends `Goodbye` and closes the link once it is written.
    pub async fn goodbye(&self, reason: &str) {
        let frame = Frame::Goodbye(Goodbye {
            reason: reason.to_string(),
        });
        if self.shared.enqueue(&frame).await.is_err() {
            return;
        }
        // The writer closes the link after writing a Goodbye; bound the wait.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.closed()).await;
        self.shared.finish(LinkEnd::Local);
    }

    /// Closes the link now, without a goodbye.
    pub fn close(&self) {
        self.shared.finish(LinkEnd::Local);
    }

    /// Waits until the link has ended and says why.
    pub async fn closed(&self) -> LinkEnd {
        let mut rx = self.shared.end.subscribe();
        loop {
            if let Some(end) = rx.borrow_and_update().clone() {
                return end;
            }
            if rx.changed().await.is_err() {
                return LinkEnd::Local;
            }
        }
    }

    /// True once the link has ended.
    pub fn is_closed(&self) -> bool {
        self.shared.cancel.is_cancelled()
    }

    /// The negotiated frame limit.
    pub fn max_frame(&self) -> u32 {
        self.shared.max_frame
    }
}

/// A request from the peer, to be answered through its [`Responder`].
pub struct Incoming {
    /// The request.
    pub request: Request,
    /// Where the answer goes.
    pub responder: Responder,
}

/// Answers one incoming request. Dropping it unanswered sends
/// `Internal` so the peer never waits forever.
pub struct Responder {
    id: u64,
    shared: Option<Arc<Shared>>,
}

impl Responder {
    /// Sends the response.
    pub async fn send(mut self, body: Response) -> Result<(), LinkError> {
        let Some(shared) = self.shared.take() else {
            return Ok(());
        };
        shared.enqueue(&Frame::Response { id: self.id, body }).await
    }

    /// Sends an error response.
    pub async fn error(
        self,
        code: ErrorCode,
        message: impl std::fmt::Display,
    ) -> Result<(), LinkError> {
        self.send(Response::Error(WireError::new(code, message)))
            .await
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            let frame = Frame::Response {
                id: self.id,
                body: Response::Error(WireError::new(
                    ErrorCode::Internal,
                    "request dropped unanswered",
                )),
            };
            if let Ok(bytes) = encode_frame(&frame, shared.max_frame) {
                let _ = shared.control.try_send(bytes.freeze());
            }
        }
    }
}

/// Starts the reader and writer tasks of a link over an established
/// (handshaken) connection. Returns the handle and the incoming requests.
pub fn spawn<R, W>(
    reader: FrameReader<R>,
    writer: W,
    config: LinkConfig,
) -> (LinkHandle, mpsc::Receiver<Incoming>)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (control_tx, control_rx) = mpsc::channel(config.control_queue.max(1));
    let (bulk_tx, bulk_rx) = mpsc::channel(config.bulk_queue.max(1));
    let (incoming_tx, incoming_rx) = mpsc::channel(config.incoming_queue.max(1));
    let shared = Arc::new(Shared {
        next_id: AtomicU64::new(1),
        pending: Mutex::new(HashMap::new()),
        control: control_tx,
        bulk: bulk_tx,
        cancel: CancellationToken::new(),
        end: watch::channel(None).0,
        max_frame: config.max_frame,
    });
    tokio::spawn(read_loop(reader, shared.clone(), incoming_tx, config));
    tokio::spawn(write_loop(
        writer,
        shared.clone(),
        control_rx,
        bulk_rx,
        config,
    ));
    (LinkHandle { shared }, incoming_rx)
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: FrameReader<R>,
    shared: Arc<Shared>,
    incoming: mpsc::Sender<Incoming>,
    config: LinkConfig,
) {
    let dead_after = config.heartbeat * HEARTBEAT_MISSES;
    let end = loop {
        let next = tokio::select! {
            () = shared.cancel.cancelled() => break LinkEnd::Local,
            next = tokio::time::timeout(dead_after, reader.next()) => next,
        };
        let frame = match next {
            Err(_) => break LinkEnd::DeadPeer(dead_after),
            Ok(None) => break LinkEnd::PeerClosed,
            Ok(Some(Err(FrameError::Io(e)))) if is_reset(&e) => break LinkEnd::PeerClosed,
            Ok(Some(Err(e))) => break LinkEnd::BadFrame(e.to_string()),
            Ok(Some(Ok(frame))) => frame,
        };
        match frame {
            Frame::Request { id, body } => {
                let item = Incoming {
                    request: body,
                    responder: Responder {
                        id,
                        shared: Some(shared.clone()),
                    },
                };
                tokio::select! {
                    sent = incoming.send(item) => if sent.is_err() { break LinkEnd::Local },
                    () = shared.cancel.cancelled() => break LinkEnd::Local,
                }
            }
            Frame::Response { id, body } => {
                let waiter = shared
                    .pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id);
                match waiter {
                    Some(tx) => {
                        let _ = tx.send(body);
                    }
                    None => tracing::debug!(id, "response to unknown or abandoned request"),
                }
            }
            Frame::Heartbeat { seq } => {
                if shared.enqueue(&Frame::HeartbeatAck { seq }).await.is_err() {
                    break shared.end_reason();
                }
            }
            Frame::HeartbeatAck { .. } => {}
            Frame::Goodbye(g) => break LinkEnd::Goodbye(g.reason),
            Frame::Hello(_) | Frame::Welcome(_) | Frame::Reject(_) => {
                break LinkEnd::BadFrame("handshake frame after the handshake".into());
            }
        }
    };
    if !matches!(end, LinkEnd::Local) {
        tracing::debug!(%end, "link ended");
    }
    shared.finish(end);
}

fn is_reset(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
    matches!(e.kind(), ConnectionReset | ConnectionAborted | BrokenPipe)
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    shared: Arc<Shared>,
    mut control: mpsc::Receiver<Bytes>,
    mut bulk: mpsc::Receiver<Bytes>,
    config: LinkConfig,
) {
    let mut tick = tokio::time::interval(config.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.reset();
    let mut seq = 0u64;
    loop {
        let bytes = tokio::select! {
            biased;
            () = shared.cancel.cancelled() => break,
            Some(b) = control.recv() => b,
            _ = tick.tick() => {
                seq += 1;
                match encode_frame(&Frame::Heartbeat { seq }, config.max_frame) {
                    Ok(b) => b.freeze(),
                    Err(_) => continue,
                }
            }
            Some(b) = bulk.recv() => b,
        };
        let goodbye = is_goodbye(&bytes);
        let written = tokio::select! {
            r = writer.write_all(&bytes) => r,
            () = shared.cancel.cancelled() => break,
        };
        let flushed = match written {
            Ok(()) => writer.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = flushed {
            shared.finish(LinkEnd::WriteFailed(e.to_string()));
            break;
        }
        if goodbye {
            shared.finish(LinkEnd::Local);
            break;
        }
    }
    let _ = tokio::time::timeout(Duration::from_millis(200), writer.shutdown()).await;
}

/// `Goodbye` is variant 7 of `Frame`: body starts with byte 7 after the header.
fn is_goodbye(bytes: &[u8]) -> bool {
    bytes.get(crate::codec::HEADER_LEN) == Some(&7)
}
