//! UVE-2 through the management API to a test agent: UA deploy, update,
//! rollback and delete (bundle bytes and digest checked by the agent),
//! session suspend/resume, monitoring grants, status, and the errors an
//! operator sees when a VM is unknown or not connected.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{HostProc, noise};
use hyper::Method;
use serde_json::json;
use std::time::Duration;
use uve_e2e::names::valid;
use uve_e2e::poll::until_async;
use uve_host::api::client;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ua_management_round_trips_to_the_agent() {
    let (host, _, agent) = HostProc::with_agent("", "vm1", &[]).await;
    let v1 = noise(700_000, 30);
    let v2 = noise(300_000, 31);
    for (ver, bundle, update) in [("1.0", &v1, false), ("2.0", &v2, true)] {
        let a = host
            .api
            .call(
                Method::POST,
                &format!(
                    "/v1/vms/vm1/ua?name=desk&version={ver}&entry=bin/desk%20--full&update={update}"
                ),
                client::bytes(bundle.clone()),
            )
            .await
            .unwrap();
        assert_eq!(a.status, 200, "{:?}", a.json());
        assert_eq!(a.json()["current"], ver);
        let got = agent
            .state
            .lock()
            .unwrap()
            .bundles
            .get(&format!("desk/{ver}"))
            .cloned();
        assert!(
            got.as_ref() == Some(bundle),
            "agent received different bytes"
        );
    }
    let (s, v) = host.post("/v1/vms/vm1/ua/desk/rollback").await;
    assert_eq!((s, v["current"].as_str()), (200, Some("1.0")));
    let (_, st) = host.get("/v1/vms/vm1/status").await;
    assert_eq!(st["uas"][0]["current"], "1.0");
    assert_eq!(st["uas"][0]["previous"], "2.0");

    // the agent refuses deleting a UA in use unless forced
    agent
        .state
        .lock()
        .unwrap()
        .uas
        .insert(valid("busy"), (valid("1"), None));
    let (s, v) = host.delete("/v1/vms/vm1/ua/busy").await;
    assert_eq!(s, 409, "{v}");
    let (s, v) = host.delete("/v1/vms/vm1/ua/busy?force=true").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["stopped_sessions"], json!(["s1"]));
    let (s, _) = host.delete("/v1/vms/vm1/ua/nope").await;
    assert_eq!(s, 404);
    let (s, _) = host.post("/v1/vms/vm1/ua?name=../x&version=1").await;
    assert_eq!(s, 400);
    host.wait_event("ua_deleted", |e| e["name"] == "busy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_resume_and_monitoring_reach_the_agent() {
    let host = HostProc::temp("").await;
    let path = host.add_hybrid_vm("vm1").await;
    let agent = host.connect_agent(&path, "vm1").await;
    let (s, _) = host.post("/v1/vms/vm1/sessions/s7/suspend").await;
    assert_eq!(s, 200);
    assert_eq!(
        agent.state.lock().unwrap().suspended,
        vec!["s7".to_string()]
    );
    let (_, st) = host.get("/v1/vms/vm1/status").await;
    assert_eq!(st["sessions"][0]["suspended"], true);
    let (s, _) = host.post("/v1/vms/vm1/sessions/s7/resume").await;
    assert_eq!(s, 200);
    assert!(agent.state.lock().unwrap().suspended.is_empty());
    let (s, v) = host
        .call(
            Method::POST,
            "/v1/vms/vm1/monitor",
            json!({"session": "s7", "monitor": "helpdesk", "ttl_secs": 60}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    {
        let st = agent.state.lock().unwrap();
        assert_eq!(st.monitors.len(), 1);
        assert_eq!(
            (st.monitors[0].0.as_str(), st.monitors[0].1.as_str()),
            ("s7", "helpdesk")
        );
        assert_eq!(st.monitors[0].2, v["expires"].as_u64().unwrap());
    }
    let (s, _) = host
        .delete("/v1/vms/vm1/monitor?session=s7&monitor=helpdesk")
        .await;
    assert_eq!(s, 200);
    assert!(agent.state.lock().unwrap().monitors.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_or_disconnected_vms_give_clear_errors() {
    let host = HostProc::temp("").await;
    let path = host.add_unix_vm("vm1").await;
    let (s, v) = host.get("/v1/vms/vm1/status").await;
    assert_eq!((s, v["error"].as_str()), (503, Some("vm_not_connected")));
    let (s, _) = host.get("/v1/vms/ghost/status").await;
    assert_eq!(s, 404);
    let agent = host.connect_agent(&path, "vm1").await;
    let (s, _) = host.get("/v1/vms/vm1/status").await;
    assert_eq!(s, 200);
    agent.handle.close();
    let gone = until_async(Duration::from_secs(10), || async {
        let (s, _) = host.get("/v1/vms/vm1/status").await;
        (s == 503).then_some(())
    })
    .await;
    assert!(gone.is_some());
    // unregistering a VM removes its listener socket
    let (s, _) = host.delete("/v1/vms/vm1").await;
    assert_eq!(s, 204);
    let removed = until_async(Duration::from_secs(10), || async {
        (!path.exists()).then_some(())
    })
    .await;
    assert!(removed.is_some(), "listener socket still there");
}
