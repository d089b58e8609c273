//! The event stream (`GET /v1/events`, JSON lines, `?since=N`,
//! `?follow=false` to stop after the retained events) and `GET /metrics`.
//! A follower that falls behind the live broadcast is served the missed
//! events from the ring and the journal; those no longer held are
//! announced by one `{"kind":"lagged","missed":N,"after_seq":S}` line,
//! never dropped silently.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use tokio::sync::broadcast::error::RecvError;

use super::ApiState;
use super::extract::ApiQuery;
use super::types::EventsQuery;
use crate::state::events::Recorded;

fn line(e: &Recorded) -> Bytes {
    let mut v = serde_json::to_vec(e).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// The line announcing the events after `last` that are no longer held,
/// if any: the numbers between `last` and the newest retained event that
/// `retained` lacks (evicted from the ring, or from a VM's share, while
/// the follower lagged; they may lie between the ones it is served).
fn lagged_line(last: u64, retained: &[Recorded]) -> Option<Bytes> {
    let newest = retained.last()?.seq;
    let missed = newest
        .checked_sub(last)
        .and_then(|n| n.checked_sub(retained.len() as u64))
        .filter(|n| *n > 0)?;
    tracing::warn!(missed, after_seq = last, "event follower lagged");
    let mut v = serde_json::to_vec(&serde_json::json!({
        "kind": "lagged",
        "missed": missed,
        "after_seq": last,
    }))
    .unwrap_or_default();
    v.push(b'\n');
    Some(Bytes::from(v))
}

/// `GET /v1/events`.
pub async fn events(
    State(d): State<Arc<ApiState>>,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> Response {
    let (past, mut rx) = d.host.events().since(q.since);
    let stop = d.host.shutdown().clone();
    let daemon = d.clone();
    let (tx, body_rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(64);
    tokio::spawn(async move {
        let mut last = q.since;
        for e in &past {
            last = e.seq;
            if tx.send(Ok(line(e))).await.is_err() {
                return;
            }
        }
        if !q.follow {
            return;
        }
        loop {
            let e = tokio::select! {
                () = stop.cancelled() => return,
                () = tx.closed() => return,
                e = rx.recv() => e,
            };
            match e {
                Ok(e) if e.seq > last => {
                    last = e.seq;
                    if tx.send(Ok(line(&e))).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => {
                    let (missed, new_rx) = daemon.host.events().since(last);
                    rx = new_rx;
                    if let Some(gap) = lagged_line(last, &missed)
                        && tx.send(Ok(gap)).await.is_err()
                    {
                        return;
                    }
                    for e in &missed {
                        last = e.seq;
                        if tx.send(Ok(line(e))).await.is_err() {
                            return;
                        }
                    }
                }
                Err(RecvError::Closed) => return,
            }
        }
    });
    let stream = futures_util::stream::unfold(body_rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// `GET /metrics`.
pub async fn metrics(State(d): State<Arc<ApiState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        d.host.metrics().render(),
    )
        .into_response()
}
