//! What the host's integration tests share: the test kit's host process
//! ([`uve_e2e::host::HostDaemon`], here the `uve-host` binary under test
//! on a temp data directory) with calls through the host's own API client
//! on top, and the kit's fake agent ([`TestAgent`] and its UVE-5 flows).
#![allow(dead_code, unused_imports)] // not every test binary uses every helper

use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper::Method;
use serde_json::{Value, json};
use uve_e2e::host::{HostDaemon, HostSpec, UP_LIMIT};
use uve_e2e::poll::until_async;
use uve_host::api::client::{self, ApiClient};

pub use uve_e2e::fake_agent::{
    AgentState, DeltaUpdated, Listed, ReleaseMode, TestAgent, Updated, begin_and_list, manifest_of,
    retrieve, update, update_with_deltas,
};
pub use uve_protocol::testdata::noise;

pub mod rgw;

/// A running `uve-host` (the kit's process) and a client of its API.
pub struct HostProc {
    /// The process, its data directory and `uvectl`.
    pub daemon: HostDaemon,
    /// A client of its API socket.
    pub api: ApiClient,
}

impl Deref for HostProc {
    type Target = HostDaemon;
    fn deref(&self) -> &HostDaemon {
        &self.daemon
    }
}

impl DerefMut for HostProc {
    fn deref_mut(&mut self) -> &mut HostDaemon {
        &mut self.daemon
    }
}

impl HostProc {
    /// Starts the daemon on `data` (config and log in it too) with a 1 s
    /// heartbeat and extra TOML config lines.
    pub async fn start(data: &Path, extra: &str) -> Self {
        let spec = HostSpec {
            host_bin: env!("CARGO_BIN_EXE_uve-host").into(),
            uvectl: env!("CARGO_BIN_EXE_uvectl").into(),
            data: data.to_path_buf(),
            config: data.join("config.toml"),
            log: data.join("host.log"),
            defaults: vec!["heartbeat_ms = 1000".into()],
            extra: extra.into(),
        };
        let daemon = HostDaemon::prepare(&spec).unwrap();
        let api = ApiClient::new(daemon.api_socket());
        let mut h = HostProc { daemon, api };
        h.spawn().await;
        h
    }

    /// (Re)spawns the process and waits for the API (polled without
    /// blocking the test's runtime).
    pub async fn spawn(&mut self) {
        self.daemon.spawn_detached().unwrap();
        let api = self.api.clone();
        let up = until_async(UP_LIMIT, || {
            let api = api.clone();
            async move {
                api.get("/v1/vms")
                    .await
                    .ok()
                    .filter(|a| a.status.is_success())
            }
        })
        .await;
        assert!(
            up.is_some(),
            "uve-host did not come up; see {}",
            self.daemon.log.display()
        );
    }

    pub async fn call(&self, method: Method, path: &str, body: Value) -> (u16, Value) {
        let a = self
            .api
            .call(method, path, client::json(&body))
            .await
            .unwrap();
        (a.status.as_u16(), a.json())
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let a = self.api.get(path).await.unwrap();
        (a.status.as_u16(), a.json())
    }

    /// Registers a VM listening on a plain Unix path; returns the path.
    pub async fn add_unix_vm(&self, id: &str) -> PathBuf {
        let path = self.data.join(format!("{id}.sock"));
        let (s, v) = self
            .call(Method::POST, "/v1/vms", json!({"id": id, "unix": path}))
            .await;
        assert_eq!(s, 201, "{v}");
        path
    }

    /// Registers a hybrid-vsock VM; returns the path the host listens on.
    pub async fn add_hybrid_vm(&self, id: &str) -> PathBuf {
        let uds = self.data.join(format!("{id}.vsock"));
        let (s, v) = self
            .call(Method::POST, "/v1/vms", json!({"id": id, "uds_path": uds}))
            .await;
        assert_eq!(s, 201, "{v}");
        let mut p = uds.into_os_string();
        p.push("_7075");
        PathBuf::from(p)
    }

    /// Connects a test agent and waits until the host lists the VM as
    /// connected (the host installs the connection just after `Welcome`).
    pub async fn connect_agent(&self, path: &Path, vm: &str) -> TestAgent {
        let agent = TestAgent::connect(path).await.unwrap();
        let ok = until_async(Duration::from_secs(10), || async {
            let (_, v) = self.get(&format!("/v1/vms/{vm}")).await;
            (v["connected"] == true).then_some(())
        })
        .await;
        assert!(ok.is_some(), "{vm} never showed as connected");
        agent
    }

    pub async fn assign(&self, user: &str, vm: &str) {
        let (s, v) = self
            .call(
                Method::PUT,
                &format!("/v1/assignments/{user}"),
                json!({"vm": vm}),
            )
            .await;
        assert_eq!(s, 200, "{v}");
    }

    /// Retained events (no follow).
    pub async fn events(&self) -> Vec<Value> {
        let a = self
            .api
            .get("/v1/events?since=0&follow=false")
            .await
            .unwrap();
        String::from_utf8_lossy(&a.body)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits for an event matching `pred`.
    pub async fn wait_event(&self, pred: impl Fn(&Value) -> bool) -> Value {
        let found = until_async(Duration::from_secs(20), || async {
            self.events().await.into_iter().find(|e| pred(e))
        })
        .await;
        found.unwrap_or_else(|| panic!("event not seen; events: (see host.log)"))
    }

    pub async fn versions(&self, user: &str) -> Value {
        self.get(&format!("/v1/users/{user}/versions")).await.1
    }

    pub async fn export(&self, user: &str, v: u64) -> Vec<u8> {
        let a = self
            .api
            .get(&format!("/v1/users/{user}/versions/{v}/export"))
            .await
            .unwrap();
        assert!(a.status.is_success(), "export {user} {v}: {}", a.status);
        a.body.to_vec()
    }

    /// A counter from `/metrics`.
    pub async fn metric(&self, name: &str) -> u64 {
        let a = self.api.get("/metrics").await.unwrap();
        String::from_utf8_lossy(&a.body)
            .lines()
            .find_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                (k == name).then(|| v.parse().ok()).flatten()
            })
            .unwrap_or(0)
    }
}
