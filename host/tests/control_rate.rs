//! A VM that floods control requests is read at `max_control_requests_per_sec`
//! while another VM is served at once; nothing of the flood is refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::HostProc;
use uve_protocol::message::{Request, Response};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_flood_waits_its_turn_and_the_other_vm_is_served() {
    let extra = "max_control_requests_per_sec = 100";
    let (host, [flooder, quiet]) = HostProc::with_vms(extra, ["flooder", "quiet"], &[]).await;
    let f = Arc::new(host.connect_agent(&flooder, "flooder").await);
    let q = host.connect_agent(&quiet, "quiet").await;
    let total: usize = 400;
    let answered = Arc::new(AtomicUsize::new(0));
    let mut flood = tokio::task::JoinSet::new();
    for n in 0..total as u64 {
        let (f, answered) = (f.clone(), answered.clone());
        flood.spawn(async move {
            let r = f.request(Request::Ping { nonce: n }).await;
            assert_eq!(r.unwrap(), Response::Pong { nonce: n });
            answered.fetch_add(1, Ordering::Relaxed);
        });
    }
    // 400 pings at 100 a second (a burst of 100) take three seconds; the
    // quiet VM's ping does not wait for them.
    while host.metric("uve_control_requests_throttled_total").await == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let r = q.request(Request::Ping { nonce: 7 }).await.unwrap();
    assert_eq!(r, Response::Pong { nonce: 7 });
    let done = answered.load(Ordering::Relaxed);
    assert!(done < total, "the flood was not held back");
    while flood.join_next().await.is_some() {}
    assert_eq!(answered.load(Ordering::Relaxed), total, "nothing refused");
    // How many waited depends on how fast this process sent them (the
    // bucket refills meanwhile); that the quiet VM was answered first is
    // what matters, and some did wait.
    let throttled = host.metric("uve_control_requests_throttled_total").await;
    assert!(
        throttled > 0 && throttled <= total as u64 - 100,
        "{throttled} waited"
    );
}
