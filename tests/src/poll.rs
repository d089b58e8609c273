//! Polling with deadlines: the one wait helper family of the test kit.
//!
//! Tests watch processes they do not control (a daemon coming up, an
//! event arriving, a file appearing), so every wait is a condition polled
//! at [`INTERVAL`] until a limit passes. Sync tests use [`until`],
//! [`wait_for`] or [`must`]; async tests (a tokio runtime that must keep
//! serving links while they wait) use [`until_async`].

use std::future::Future;
use std::time::{Duration, Instant};

/// How often a condition is polled.
pub const INTERVAL: Duration = Duration::from_millis(25);

/// The generous limit tests use for "this must happen eventually".
pub const LONG: Duration = Duration::from_secs(30);

/// Polls `f` every [`INTERVAL`] until it returns `Some`, or `None` once
/// `limit` has passed.
pub fn until<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(INTERVAL);
    }
}

/// Polls `ready` until it holds (true) or `limit` passes (false).
pub fn wait_for(limit: Duration, mut ready: impl FnMut() -> bool) -> bool {
    until(limit, || ready().then_some(())).is_some()
}

/// Polls `f` until it returns `Some`; panics naming `what` after `limit`.
pub fn must<T>(what: &str, limit: Duration, f: impl FnMut() -> Option<T>) -> T {
    match until(limit, f) {
        Some(v) => v,
        None => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// Like [`until`] for an async condition; sleeps on the tokio timer so the
/// runtime keeps serving other tasks while it waits.
pub async fn until_async<T, F, Fut>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(INTERVAL).await;
    }
}
