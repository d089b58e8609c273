//! The per-connection dispatcher: consumes the link's incoming requests and
//! calls the UVE-5 domain handlers. Requests whose order matters
//! (`UpdateBegin`, `UpdatePage`, session notices) are handled inline, in
//! arrival order; the rest run as tasks, at most `max_inflight` at a time
//! per connection, so one VM's burst cannot starve the others. A task holds
//! its slot until its answer is queued on the link (so a VM that stops
//! reading stalls its own requests, never the host's memory), and the tasks
//! of a connection end with it: only a commit already running completes.
//! Control requests past `max_control_requests_per_sec` wait before they
//! are read (`budgets::request_rate`).
//! Every `upload_idle_ms / 4` it drops the connection's idle uploads.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use uve_protocol::link::Incoming;
use uve_protocol::message::{ErrorCode, Request, Response, WireError};

use crate::budgets::report::Budget;
use crate::wire::uve5::{Handled, VmConnection, notices, retrieve, update};

/// The bulk outbound bytes a `ChunkFetch` reserves before its chunk is
/// read: the largest chunk and its frame's header.
const FETCH_FRAME: usize = uve_protocol::defs::MAX_CHUNK as usize + 64;

/// Runs until the link closes.
pub async fn run(conn: Arc<VmConnection>, mut incoming: mpsc::Receiver<Incoming>) {
    let permits = Arc::new(Semaphore::new(
        usize::try_from(conn.host().config().max_inflight.max(1)).unwrap_or(32),
    ));
    // Cancelled when this loop ends or is aborted (the link closed).
    let cancel = CancellationToken::new();
    let _cancel_on_exit = cancel.clone().drop_guard();
    let idle = conn.host().config().upload_idle_ms.max(1);
    let mut sweep = tokio::time::interval(std::time::Duration::from_millis((idle / 4).max(1)));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next = tokio::select! {
            next = incoming.recv() => next,
            _ = sweep.tick() => {
                expire_idle(&conn, idle);
                continue;
            }
        };
        let Some(Incoming { request, responder }) = next else {
            break;
        };
        pace(&conn, &request).await;
        let answer: Handled = match request {
            Request::UpdateBegin(b) => update::begin(&conn, b),
            Request::UpdatePage {
                upload,
                page,
                chunks,
            } => update::page(&conn, upload, page, chunks).await,
            Request::UpdateAbort { upload } => update::abort(&conn, upload),
            Request::SessionStarted { session, user, ua } => {
                notices::started(&conn, &session, &user, ua)
            }
            Request::SessionEnded { session } => notices::ended(&conn, &session),
            Request::UnexpectedDisconnect(n) => notices::disconnect(&conn, n),
            other => {
                let Some(permit) = slot(&conn, &permits).await else {
                    break;
                };
                let chunk_guard = match &other {
                    Request::ChunkUpload { upload, .. }
                    | Request::ChunkDelta(uve_protocol::message::ChunkDelta { upload, .. }) => {
                        update::chunk_guard(&conn, *upload).await
                    }
                    _ => None,
                };
                let conn = conn.clone();
                let cancel = cancel.clone();
                let mut responder = responder;
                tokio::spawn(async move {
                    // A chunk is read only once the link has room to send
                    // it: a VM that reads its answers slowly (or not at
                    // all) holds at most its link's bulk outbound budget
                    // in chunk bytes, however many fetches it has in flight.
                    if matches!(other, Request::ChunkFetch { .. }) {
                        tokio::select! {
                            r = responder.reserve_bulk(FETCH_FRAME) => if r.is_err() { return },
                            () = cancel.cancelled() => return,
                        }
                    }
                    // A commit runs to its end: its outcome is the user's.
                    let cancellable = !matches!(other, Request::UpdateCommit { .. });
                    let answer = tokio::select! {
                        a = handle(&conn, other) => a,
                        () = cancel.cancelled(), if cancellable => return,
                    };
                    drop(chunk_guard);
                    let _ = responder.send(flatten(answer)).await;
                    drop(permit);
                });
                continue;
            }
        };
        let _ = responder.send(flatten(answer)).await;
    }
}

/// One of the connection's `max_inflight` slots; waiting for one is
/// backpressure, not a refusal: counted, no event. `None` if closed.
async fn slot(conn: &VmConnection, permits: &Arc<Semaphore>) -> Option<OwnedSemaphorePermit> {
    if let Ok(p) = permits.clone().try_acquire_owned() {
        return Some(p);
    }
    crate::state::metrics::add(&conn.host().metrics().inflight_waits, 1);
    permits.clone().acquire_owned().await.ok()
}

/// Drops the connection's uploads idle for `idle_ms`, each reported
/// (`upload_idle_ms`).
fn expire_idle(conn: &VmConnection, idle_ms: u64) {
    let n = update::expire_idle(conn, std::time::Duration::from_millis(idle_ms));
    for _ in 0..n {
        conn.host()
            .refused(Budget::UploadIdle, conn.vm(), None, idle_ms);
    }
}

/// Chunk transfers: bounded by the bulk pool, not the control rate.
fn is_bulk(r: &Request) -> bool {
    matches!(
        r,
        Request::ChunkFetch { .. }
            | Request::ChunkUpload { .. }
            | Request::ChunkDelta(_)
            | Request::BlockSignatures { .. }
    )
}

/// Waits before `request` is handled when its VM is past its control
/// request rate, or stages or fetches heavily while a light VM works:
/// nothing more is read from that VM meanwhile (backpressure, not a
/// refusal).
async fn pace(conn: &VmConnection, request: &Request) {
    let host = conn.host();
    let wait = if matches!(request, Request::ChunkFetch { .. }) {
        host.fetch_wait(conn.vm())
            .inspect(|_| crate::state::metrics::add(&host.metrics().heavy_fetch_throttled, 1))
    } else if is_bulk(request) {
        staged_bytes(request)
            .and_then(|bytes| host.staging().intake_wait(conn.vm(), bytes))
            .inspect(|_| crate::state::metrics::add(&host.metrics().heavy_staging_throttled, 1))
    } else {
        host.request_rate()
            .take(conn.vm())
            .inspect(|_| crate::state::metrics::add(&host.metrics().control_requests_throttled, 1))
    };
    if let Some(wait) = wait {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = host.shutdown().cancelled() => {}
        }
    }
}

/// The bytes a request asks the host to stage (its chunk, or its delta's
/// blocks).
fn staged_bytes(r: &Request) -> Option<u64> {
    match r {
        Request::ChunkUpload { data, .. } => Some(data.len() as u64),
        Request::ChunkDelta(d) => Some(d.blocks.iter().map(|b| b.data.len() as u64).sum()),
        _ => None,
    }
}

fn flatten(h: Handled) -> Response {
    h.unwrap_or_else(Response::Error)
}

async fn handle(conn: &VmConnection, request: Request) -> Handled {
    match request {
        Request::UifRetrieve { user, session } => retrieve::grant(conn, &user, &session).await,
        Request::ManifestPage {
            user,
            version,
            page,
        } => retrieve::page(conn, &user, version, page).await,
        Request::ChunkFetch { user, hash } => retrieve::fetch(conn, &user, hash).await,
        Request::ChunkUpload { upload, hash, data } => {
            update::chunk(conn, upload, hash, data).await
        }
        Request::UpdateCommit { upload } => update::commit(conn, upload).await,
        Request::BlockSignatures { upload, chunks } => {
            update::signatures(conn, upload, chunks).await
        }
        Request::ChunkDelta(d) => update::chunk_delta(conn, d).await,
        Request::Ping { nonce } => Ok(Response::Pong { nonce }),
        _ => Err(WireError::new(
            ErrorCode::Unsupported,
            "this request is served by the agent, not the host",
        )),
    }
}
