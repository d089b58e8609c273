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
//!
//! What one peer can make the link hold is bounded in bytes, not only in
//! frames: requests read from the peer and not yet answered hold at most
//! `max_inbound_bytes` (the reader stops reading until answers free some),
//! frames queued for writing at most `max_outbound_bytes` in each queue
//! (so a control frame never waits behind bulk bytes), and a frame the
//! peer does not take within `write_deadline` (it stopped reading) ends the
//! link with [`LinkEnd::WriteStalled`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use crate::codec::{Carrier, FrameError, Inbound, LinkCodec, REQUEST_TAG, encode_frame};
use crate::defs::HEARTBEAT_MISSES;
use crate::handshake::FrameReader;
use crate::message::{ErrorCode, Frame, Goodbye, Request, Response, WireError};
use crate::names::NameError;

mod end;

pub use end::{LinkEnd, LinkError, within};

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
    /// Bytes of the peer's requests read but not yet answered; once
    /// reached, the reader waits for answers before reading on.
    pub max_inbound_bytes: usize,
    /// Bytes of encoded frames queued but not yet written, per queue
    /// (control, bulk); once reached, senders wait for the writer.
    pub max_outbound_bytes: usize,
    /// A frame not taken by the peer within this time ends the link
    /// ([`LinkEnd::WriteStalled`]).
    pub write_deadline: Duration,
}

/// Default of [`LinkConfig::max_inbound_bytes`]: eight 256 KiB chunks.
pub const DEFAULT_MAX_INBOUND_BYTES: usize = 2 << 20;
/// Default of [`LinkConfig::max_outbound_bytes`]: eight 256 KiB chunks.
pub const DEFAULT_MAX_OUTBOUND_BYTES: usize = 2 << 20;

impl LinkConfig {
    /// Defaults for a given heartbeat interval and frame limit.
    pub fn new(heartbeat: Duration, max_frame: u32) -> Self {
        LinkConfig {
            heartbeat,
            max_frame,
            control_queue: 64,
            bulk_queue: 4,
            incoming_queue: 64,
            max_inbound_bytes: DEFAULT_MAX_INBOUND_BYTES,
            max_outbound_bytes: DEFAULT_MAX_OUTBOUND_BYTES,
            write_deadline: heartbeat * HEARTBEAT_MISSES,
        }
    }
}

/// An encoded frame on its way to the writer, with the share of the
/// outbound byte budget it holds until written.
struct Queued {
    bytes: Bytes,
    _budget: Option<OwnedSemaphorePermit>,
}

/// How often links had to wait for their byte budgets: a counter each, which
/// the owner of the links may share between them (the host sums all its
/// VMs' links in its metrics).
#[derive(Debug, Default)]
pub struct LinkStats {
    /// Requests read while `max_inbound_bytes` was taken: the reader
    /// waited for answers before reading on.
    pub inbound_waits: AtomicU64,
    /// Frames queued while their queue's `max_outbound_bytes` was taken:
    /// the sender waited for the writer.
    pub outbound_waits: AtomicU64,
}

/// A byte budget: a semaphore of bytes and its size. A frame takes
/// `min(len, cap)` so that one frame larger than the budget still passes.
struct Budget {
    bytes: Arc<Semaphore>,
    cap: usize,
    /// Where a wait for it is counted.
    stats: Arc<LinkStats>,
    inbound: bool,
}

impl Budget {
    fn new(cap: usize, stats: Arc<LinkStats>, inbound: bool) -> Self {
        let cap = cap.clamp(1, Semaphore::MAX_PERMITS);
        Budget {
            bytes: Arc::new(Semaphore::new(cap)),
            cap,
            stats,
            inbound,
        }
    }

    /// Takes `len` bytes of the budget, waiting (counted in the link's
    /// [`LinkStats`]) until they are free or the link is cancelled
    /// (`None`).
    async fn take(&self, len: usize, cancel: &CancellationToken) -> Option<OwnedSemaphorePermit> {
        let n = u32::try_from(len.clamp(1, self.cap)).unwrap_or(u32::MAX);
        if let Ok(p) = self.bytes.clone().try_acquire_many_owned(n) {
            return Some(p);
        }
        let waits = if self.inbound {
            &self.stats.inbound_waits
        } else {
            &self.stats.outbound_waits
        };
        waits.fetch_add(1, Ordering::Relaxed);
        tokio::select! {
            p = self.bytes.clone().acquire_many_owned(n) => p.ok(),
            () = cancel.cancelled() => None,
        }
    }
}

struct Shared {
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, oneshot::Sender<Response>>>,
    control: mpsc::Sender<Queued>,
    bulk: mpsc::Sender<Queued>,
    cancel: CancellationToken,
    end: watch::Sender<Option<LinkEnd>>,
    max_frame: u32,
    outbound_control: Budget,
    outbound_bulk: Budget,
    inbound: Budget,
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

    /// Encodes `frame` and queues it; the frame itself (a chunk's bytes)
    /// is dropped before any wait, so only the encoded copy is held while
    /// it waits for its queue's budget.
    async fn enqueue(&self, frame: Frame) -> Result<(), LinkError> {
        let bytes = encode_frame(&frame, self.max_frame)?.freeze();
        let bulk = frame.is_bulk();
        drop(frame);
        self.enqueue_bytes(bytes, bulk).await
    }

    /// Queues bulk `frame` on the bulk queue with the budget `reserved`
    /// already holds, taking what the frame needs beyond it.
    async fn enqueue_reserved(
        &self,
        frame: Frame,
        mut reserved: OwnedSemaphorePermit,
    ) -> Result<(), LinkError> {
        let bytes = encode_frame(&frame, self.max_frame)?.freeze();
        drop(frame);
        let need = bytes.len().clamp(1, self.outbound_bulk.cap);
        if need > reserved.num_permits() {
            let Some(more) = self
                .outbound_bulk
                .take(need - reserved.num_permits(), &self.cancel)
                .await
            else {
                return Err(LinkError::Closed(self.end_reason()));
            };
            reserved.merge(more);
        } else if let Some(spare) = reserved.split(reserved.num_permits() - need) {
            drop(spare);
        }
        let item = Queued {
            bytes,
            _budget: Some(reserved),
        };
        tokio::select! {
            sent = self.bulk.send(item) => sent.map_err(|_| LinkError::Closed(self.end_reason())),
            () = self.cancel.cancelled() => Err(LinkError::Closed(self.end_reason())),
        }
    }

    /// Queues an encoded frame (header included) on the bulk or control
    /// queue, within that queue's byte budget.
    async fn enqueue_bytes(&self, bytes: Bytes, bulk: bool) -> Result<(), LinkError> {
        let (queue, budget) = if bulk {
            (&self.bulk, &self.outbound_bulk)
        } else {
            (&self.control, &self.outbound_control)
        };
        let Some(budget) = budget.take(bytes.len(), &self.cancel).await else {
            return Err(LinkError::Closed(self.end_reason()));
        };
        let item = Queued {
            bytes,
            _budget: Some(budget),
        };
        tokio::select! {
            sent = queue.send(item) => sent.map_err(|_| LinkError::Closed(self.end_reason())),
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
        self.exchange(id, async {
            if self.shared.cancel.is_cancelled() {
                return Err(LinkError::Closed(self.shared.end_reason()));
            }
            self.shared.enqueue(Frame::Request { id, body }).await
        })
        .await
    }

    /// Sends a request whose body is already postcard-encoded and waits
    /// for its response, as [`request`](Self::request) does. This is how a
    /// peer sends what the types refuse to hold (a hostile-peer test's
    /// invalid name); the body still has to fit the frame limit.
    pub async fn request_encoded(&self, body: &[u8]) -> Result<Response, LinkError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let mut frame = postcard::to_allocvec(&(REQUEST_TAG, id))
            .map_err(|e| LinkError::Frame(FrameError::Undecodable(e)))?;
        frame.extend_from_slice(body);
        let len = u32::try_from(frame.len())
            .ok()
            .filter(|n| *n <= self.shared.max_frame)
            .ok_or(LinkError::Frame(FrameError::Oversize {
                len: frame.len() as u64,
                max: self.shared.max_frame,
            }))?;
        let mut bytes = Vec::with_capacity(frame.len() + 4);
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(&frame);
        self.exchange(id, self.shared.enqueue_bytes(bytes.into(), false))
            .await
    }

    /// Registers request `id` as waiting, runs `send` (which writes it) and
    /// waits for the answer; `id` is forgotten if `send` fails. A
    /// `Response::Error` from the peer becomes [`LinkError::Remote`].
    async fn exchange(
        &self,
        id: u64,
        send: impl Future<Output = Result<(), LinkError>>,
    ) -> Result<Response, LinkError> {
        let (tx, rx) = oneshot::channel();
        self.shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, tx);
        if let Err(e) = send.await {
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
        within(limit, self.request(body)).await
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
        if self.shared.enqueue(frame).await.is_err() {
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
/// `Internal` so the peer never waits forever. Until the answer is queued
/// it holds the request's share of the inbound byte budget.
pub struct Responder {
    id: u64,
    shared: Option<Arc<Shared>>,
    _budget: Option<OwnedSemaphorePermit>,
    /// Bulk outbound budget taken ahead by [`Responder::reserve_bulk`].
    reserved: Option<OwnedSemaphorePermit>,
}

impl Responder {
    /// Takes `len` bytes of the link's bulk outbound budget *before* the
    /// answer exists (waiting, as a send would, while the peer has not
    /// taken what was sent before): a server that reads a chunk only once
    /// this returns holds, per link, no more chunk bytes than that budget
    /// however many requests are in flight. [`send`](Self::send) then uses
    /// the reservation (taking more if the frame is larger); an answer
    /// that is not bulk releases it.
    pub async fn reserve_bulk(&mut self, len: usize) -> Result<(), LinkError> {
        let Some(shared) = self.shared.as_ref() else {
            return Ok(());
        };
        let permit = shared
            .outbound_bulk
            .take(len, &shared.cancel)
            .await
            .ok_or_else(|| LinkError::Closed(shared.end_reason()))?;
        self.reserved = Some(permit);
        Ok(())
    }

    /// Sends the response.
    pub async fn send(mut self, body: Response) -> Result<(), LinkError> {
        let Some(shared) = self.shared.take() else {
            return Ok(());
        };
        let frame = Frame::Response { id: self.id, body };
        match self.reserved.take() {
            Some(reserved) if frame.is_bulk() => shared.enqueue_reserved(frame, reserved).await,
            _ => shared.enqueue(frame).await,
        }
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
            // Small and at most one per request read, which the inbound
            // budget bounds: queued without waiting for the outbound budget.
            if let Ok(bytes) = encode_frame(&frame, shared.max_frame) {
                let _ = shared.control.try_send(Queued {
                    bytes: bytes.freeze(),
                    _budget: shared
                        .outbound_control
                        .bytes
                        .clone()
                        .try_acquire_owned()
                        .ok(),
                });
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
    spawn_counted(reader, writer, config, Arc::default())
}

/// [`spawn`], counting the link's waits for its byte budgets in `stats`.
pub fn spawn_counted<R, W>(
    reader: FrameReader<R>,
    writer: W,
    config: LinkConfig,
    stats: Arc<LinkStats>,
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
        outbound_control: Budget::new(config.max_outbound_bytes, stats.clone(), false),
        outbound_bulk: Budget::new(config.max_outbound_bytes, stats.clone(), false),
        inbound: Budget::new(config.max_inbound_bytes, stats, true),
    });
    let reader = reader.map_decoder(LinkCodec);
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

/// A request with an invalid name is answered `InvalidName` on its own id;
/// a response with one fails the request it answers. The link goes on.
async fn refuse_bad_name(
    shared: &Shared,
    what: Carrier,
    id: u64,
    error: &NameError,
) -> Result<(), LinkError> {
    tracing::debug!(%what, id, %error, "frame refused for an invalid name");
    match what {
        Carrier::Request => {
            let body = Response::Error(WireError::new(ErrorCode::InvalidName, error));
            shared.enqueue(Frame::Response { id, body }).await
        }
        Carrier::Response => {
            let waiter = shared
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
            if let Some(tx) = waiter {
                let message = format!("the peer's answer has an invalid name: {error}");
                let _ = tx.send(Response::Error(WireError::new(
                    ErrorCode::BadRequest,
                    message,
                )));
            }
            Ok(())
        }
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: FramedRead<R, LinkCodec>,
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
            Ok(Some(Err(e @ FrameError::Oversize { .. }))) => {
                break LinkEnd::Oversize(e.to_string());
            }
            Ok(Some(Err(e))) => break LinkEnd::BadFrame(e.to_string()),
            Ok(Some(Ok(Inbound::Frame(frame)))) => frame,
            Ok(Some(Ok(Inbound::BadName { what, id, error }))) => {
                if refuse_bad_name(&shared, what, id, &error).await.is_err() {
                    break shared.end_reason();
                }
                continue;
            }
        };
        match frame {
            Frame::Request { id, body } => {
                let len = reader.decoder().last_len();
                let Some(budget) = shared.inbound.take(len, &shared.cancel).await else {
                    break LinkEnd::Local;
                };
                let item = Incoming {
                    request: body,
                    responder: Responder {
                        id,
                        shared: Some(shared.clone()),
                        _budget: Some(budget),
                        reserved: None,
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
                if shared.enqueue(Frame::HeartbeatAck { seq }).await.is_err() {
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
    mut control: mpsc::Receiver<Queued>,
    mut bulk: mpsc::Receiver<Queued>,
    config: LinkConfig,
) {
    let mut tick = tokio::time::interval(config.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.reset();
    let mut seq = 0u64;
    loop {
        let item = tokio::select! {
            biased;
            () = shared.cancel.cancelled() => break,
            Some(q) = control.recv() => q,
            _ = tick.tick() => {
                seq += 1;
                match encode_frame(&Frame::Heartbeat { seq }, config.max_frame) {
                    Ok(b) => Queued { bytes: b.freeze(), _budget: None },
                    Err(_) => continue,
                }
            }
            Some(q) = bulk.recv() => q,
        };
        let goodbye = is_goodbye(&item.bytes);
        let write = async {
            writer.write_all(&item.bytes).await?;
            writer.flush().await
        };
        let written = tokio::select! {
            r = tokio::time::timeout(config.write_deadline, write) => r,
            () = shared.cancel.cancelled() => break,
        };
        drop(item);
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                shared.finish(LinkEnd::WriteFailed(e.to_string()));
                break;
            }
            Err(_) => {
                tracing::warn!(deadline = ?config.write_deadline, "peer stopped reading; closing the link");
                shared.finish(LinkEnd::WriteStalled(config.write_deadline));
                break;
            }
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
