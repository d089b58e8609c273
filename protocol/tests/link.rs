//! Link behaviour over real Unix socket pairs: multiplexing, priority of
//! control frames over bulk frames, heartbeats, dead-peer detection,
//! goodbye, and containment of garbage.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::cast_possible_truncation
)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::Semaphore;
use tokio_util::codec::FramedRead;
use uve_protocol::codec::FrameCodec;
use uve_protocol::defs::DEFAULT_MAX_FRAME;
use uve_protocol::link::{self, Incoming, LinkConfig, LinkEnd, LinkError, LinkHandle};
use uve_protocol::message::{ErrorCode, Request, Response};
use uve_protocol::{Hash, Response as R};

fn cfg(hb_ms: u64) -> LinkConfig {
    LinkConfig::new(Duration::from_millis(hb_ms), DEFAULT_MAX_FRAME)
}

fn start(s: UnixStream, c: LinkConfig) -> (LinkHandle, tokio::sync::mpsc::Receiver<Incoming>) {
    let (r, w) = s.into_split();
    link::spawn(FramedRead::new(r, FrameCodec::new(c.max_frame)), w, c)
}

fn pair(
    hb_ms: u64,
) -> (
    (LinkHandle, tokio::sync::mpsc::Receiver<Incoming>),
    (LinkHandle, tokio::sync::mpsc::Receiver<Incoming>),
) {
    let (a, b) = UnixStream::pair().expect("pair");
    (start(a, cfg(hb_ms)), start(b, cfg(hb_ms)))
}

/// Answers Ping with Pong and everything else with Ok, recording the order.
fn echo_server(
    mut rx: tokio::sync::mpsc::Receiver<Incoming>,
) -> tokio::task::JoinHandle<Vec<Request>> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(inc) = rx.recv().await {
            let resp = match &inc.request {
                Request::Ping { nonce } => Response::Pong { nonce: *nonce },
                _ => Response::Ok,
            };
            seen.push(inc.request);
            let _ = inc.responder.send(resp).await;
        }
        seen
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_flow_both_ways_concurrently() {
    let ((a, a_in), (b, b_in)) = pair(1000);
    echo_server(a_in);
    echo_server(b_in);
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let (a, b) = (a.clone(), b.clone());
        tasks.push(tokio::spawn(async move {
            assert_eq!(
                a.request(Request::Ping { nonce: i }).await.expect("a→b"),
                R::Pong { nonce: i }
            );
            assert_eq!(
                b.request(Request::Ping { nonce: i + 1000 })
                    .await
                    .expect("b→a"),
                R::Pong { nonce: i + 1000 }
            );
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_frames_overtake_queued_bulk_frames() {
    // A receiver that holds the first bulk request until the ping has been
    // queued (with a 1-slot incoming queue) makes the bulk frames back up in
    // the sender's queue and the socket; how far they back up does not
    // depend on timing, so neither does the ping's position.
    let (x, y) = UnixStream::pair().expect("pair");
    let (a, _a_in) = start(x, cfg(1000));
    let slow = LinkConfig {
        incoming_queue: 1,
        ..cfg(1000)
    };
    let (_b, mut b_in) = start(y, slow);
    let gate = Arc::new(Semaphore::new(0));
    let (first_tx, mut first_rx) = tokio::sync::mpsc::channel::<()>(1);
    let server = tokio::spawn({
        let gate = gate.clone();
        async move {
            let mut seen = Vec::new();
            while let Some(inc) = b_in.recv().await {
                let resp = match &inc.request {
                    Request::Ping { nonce } => Response::Pong { nonce: *nonce },
                    _ => {
                        let _ = first_tx.try_send(());
                        gate.acquire().await.expect("gate").forget();
                        Response::Ok
                    }
                };
                seen.push(inc.request);
                let _ = inc.responder.send(resp).await;
            }
            seen
        }
    });
    const BULK: usize = 32;
    let mut bulk = Vec::new();
    for i in 0..BULK {
        let a = a.clone();
        bulk.push(tokio::spawn(async move {
            a.request(Request::ChunkUpload {
                upload: i as u64,
                hash: Hash([0; 32]),
                data: vec![i as u8; 200 * 1024],
            })
            .await
            .expect("bulk")
        }));
    }
    // The first bulk request is held by the receiver: from here on the
    // others can only queue up behind it.
    first_rx.recv().await.expect("first bulk request");
    // One poll queues the ping (the control queue has room); its answer
    // cannot come before the gate opens.
    let mut ping = Box::pin(a.request(Request::Ping { nonce: 7 }));
    let polled = std::future::poll_fn(|cx| std::task::Poll::Ready(ping.as_mut().poll(cx))).await;
    assert!(
        polled.is_pending(),
        "ping answered while the receiver is held"
    );
    gate.add_permits(BULK);
    assert_eq!(ping.await.expect("ping"), R::Pong { nonce: 7 });
    for t in bulk {
        t.await.expect("bulk task");
    }
    a.close();
    let seen = server.await.expect("server");
    let pos = seen
        .iter()
        .position(|r| matches!(r, Request::Ping { .. }))
        .expect("ping seen");
    assert_eq!(seen.len(), BULK + 1);
    assert!(
        pos < BULK / 2,
        "ping arrived after {pos} of {BULK} bulk frames queued before it"
    );
}

#[tokio::test]
async fn idle_link_stays_up_on_heartbeats() {
    let ((a, _ai), (b, _bi)) = pair(50);
    tokio::time::sleep(Duration::from_millis(400)).await; // 8 intervals
    assert!(!a.is_closed() && !b.is_closed());
}

// Paused time: "not before three missed intervals" is checked on tokio's
// virtual clock, exactly, instead of on the wall clock.
#[tokio::test(start_paused = true)]
async fn silent_peer_is_declared_dead_and_requests_fail() {
    let (a, peer) = UnixStream::pair().expect("pair");
    let (h, _in) = start(a, cfg(50));
    let started = tokio::time::Instant::now();
    let err = h
        .request(Request::Ping { nonce: 1 })
        .await
        .expect_err("dead peer");
    assert!(
        matches!(err, LinkError::Closed(LinkEnd::DeadPeer(_))),
        "{err}"
    );
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert!(matches!(h.closed().await, LinkEnd::DeadPeer(_)));
    drop(peer);
}

#[tokio::test]
async fn goodbye_is_seen_as_orderly_by_the_peer() {
    let ((a, _ai), (b, _bi)) = pair(1000);
    a.goodbye("agent shutting down").await;
    assert_eq!(
        b.closed().await,
        LinkEnd::Goodbye("agent shutting down".into())
    );
    assert!(a.closed().await.is_orderly());
}

#[tokio::test]
async fn garbage_closes_only_that_link_with_a_reason() {
    let (a, mut raw) = UnixStream::pair().expect("pair");
    let (h, _in) = start(a, cfg(1000));
    raw.write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff])
        .await
        .expect("write");
    match h.closed().await {
        LinkEnd::BadFrame(why) => assert!(why.contains("undecodable"), "{why}"),
        other => panic!("expected BadFrame, got {other:?}"),
    }
    let (a, mut raw) = UnixStream::pair().expect("pair");
    let (h, _in) = start(a, cfg(1000));
    raw.write_all(&u32::MAX.to_le_bytes()).await.expect("write");
    match h.closed().await {
        LinkEnd::Oversize(why) => assert!(why.contains("exceeds the limit"), "{why}"),
        other => panic!("expected Oversize, got {other:?}"),
    }
}

#[tokio::test]
async fn unanswered_request_gets_internal_error_not_a_hang() {
    let ((a, _ai), (_b, mut b_in)) = pair(1000);
    tokio::spawn(async move {
        while let Some(inc) = b_in.recv().await {
            drop(inc); // dispatcher bug: never answers
        }
    });
    let err = a
        .request_timeout(Request::Ping { nonce: 1 }, Duration::from_secs(5))
        .await
        .expect_err("must fail");
    assert_eq!(err.remote_code(), Some(ErrorCode::Internal), "{err}");
}

#[tokio::test]
async fn oversized_request_is_refused_to_the_caller() {
    let ((a, _ai), (_b, _bi)) = pair(1000);
    let err = a
        .request(Request::ChunkUpload {
            upload: 1,
            hash: Hash([0; 32]),
            data: vec![0; DEFAULT_MAX_FRAME as usize],
        })
        .await
        .expect_err("too big");
    assert!(matches!(err, LinkError::Frame(_)), "{err}");
    assert!(!a.is_closed(), "a refused frame must not close the link");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_for_the_inbound_byte_budget_are_counted() {
    let (a, b) = UnixStream::pair().expect("pair");
    let (ha, _ain) = start(a, cfg(1000));
    let mut c = cfg(1000);
    c.max_inbound_bytes = 64;
    let stats = Arc::new(link::LinkStats::default());
    let (r, w) = b.into_split();
    let (_hb, mut b_in) = link::spawn_counted(
        FramedRead::new(r, FrameCodec::new(c.max_frame)),
        w,
        c,
        stats.clone(),
    );
    // Twenty pings, none answered yet: the reader stops at 64 bytes.
    let calls: Vec<_> = (0..20u64)
        .map(|nonce| {
            let ha = ha.clone();
            tokio::spawn(async move { ha.request(Request::Ping { nonce }).await })
        })
        .collect();
    let first = b_in.recv().await.expect("a request");
    let waited = tokio::time::timeout(Duration::from_secs(10), async {
        while stats
            .inbound_waits
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "the reader never waited for its budget");
    let mut pending = vec![first];
    for _ in 0..19 {
        if let Some(inc) = pending.pop() {
            let _ = inc.responder.send(Response::Ok).await;
        }
        pending.push(b_in.recv().await.expect("the reader read on"));
    }
    for inc in pending {
        let _ = inc.responder.send(Response::Ok).await;
    }
    for call in calls {
        call.await.unwrap().expect("answered");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_reserving_bulk_budget_holds_no_more_for_a_peer_that_does_not_read() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use uve_protocol::codec::encode_frame;
    use uve_protocol::message::Frame;
    const CHUNK: usize = 256 << 10;
    let (mut raw, b) = UnixStream::pair().expect("pair");
    let mut c = cfg(60_000);
    c.max_outbound_bytes = 2 * (CHUNK + 64);
    let (_hb, mut b_in) = start(b, c);
    // The peer sends ten fetches and never reads an answer.
    for id in 1..=10u64 {
        let frame = Frame::Request {
            id,
            body: Request::ChunkFetch {
                user: "alice".to_string().try_into().unwrap(),
                hash: Hash::of(b"x"),
            },
        };
        raw.write_all(&encode_frame(&frame, DEFAULT_MAX_FRAME).unwrap())
            .await
            .unwrap();
    }
    // The server reads a chunk only once its answer has room.
    let read = Arc::new(AtomicUsize::new(0));
    for _ in 0..10 {
        let mut inc = b_in.recv().await.expect("a fetch");
        let read = read.clone();
        tokio::spawn(async move {
            if inc.responder.reserve_bulk(CHUNK + 64).await.is_err() {
                return;
            }
            read.fetch_add(1, Ordering::SeqCst);
            let _ = inc.responder.send(Response::Chunk(vec![7; CHUNK])).await;
        });
    }
    let two = tokio::time::timeout(Duration::from_secs(10), async {
        while read.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(two.is_ok(), "the budget's two chunks were never read");
    // Nothing more while the peer reads nothing: the socket buffer holds
    // less than one chunk, so both stay queued or half written.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(read.load(Ordering::SeqCst), 2);
    // The peer reads: the rest follow.
    let drain = tokio::spawn(async move {
        let mut buf = vec![0u8; 1 << 20];
        while tokio::io::AsyncReadExt::read(&mut raw, &mut buf)
            .await
            .unwrap_or(0)
            > 0
        {}
    });
    let all = tokio::time::timeout(Duration::from_secs(10), async {
        while read.load(Ordering::SeqCst) < 10 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(all.is_ok(), "reading on did not free the budget");
    drain.abort();
}
