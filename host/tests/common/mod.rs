//! What the host's integration tests share: the test kit's host process
//! ([`uve_e2e::host::HostDaemon`], here the `uve-host` binary under test
//! on a temp data directory) with calls through the host's own API client
//! on top, and the kit's fake agent ([`TestAgent`] and its UVE-5 flows).
//! Events, metrics, exports and the waits for start-up and for a connected
//! VM are the kit's own (through `uvectl`), run with
//! [`tokio::task::block_in_place`] so the test's runtime keeps serving the
//! fake agents meanwhile; what is here is only what needs the host's API
//! client, and the set-up most tests begin with ([`HostProc::with_agent`]).
#![allow(dead_code, unused_imports)] // not every test binary uses every helper

use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper::Method;
use serde_json::{Value, json};
use tempfile::TempDir;
use uve_e2e::host::{HostDaemon, HostSpec};
use uve_host::api::client::{self, ApiClient};
use uve_protocol::link::LinkError;
use uve_protocol::message::{Response, Version};

pub use uve_e2e::fake_agent::{
    AgentState, DeltaUpdated, Listed, ReleaseMode, TestAgent, Updated, begin_and_list, manifest_of,
    retrieve, update, update_with_deltas,
};
pub use uve_protocol::testdata::noise;

pub mod rgw;

/// How long [`HostProc::wait_event`] waits.
const EVENT_LIMIT: Duration = Duration::from_secs(20);

/// How long [`HostProc::connect_agent`] waits for the VM to show as
/// connected.
const CONNECT_LIMIT: Duration = Duration::from_secs(10);

/// Runs a blocking kit call (a `uvectl` process, a poll) without stopping
/// the runtime's other tasks (the fake agents answering the host).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// A running `uve-host` (the kit's process) and a client of its API.
pub struct HostProc {
    /// The process, its data directory and `uvectl`.
    pub daemon: HostDaemon,
    /// A client of its API socket.
    pub api: ApiClient,
    /// The data directory when the host made it (removed after the
    /// process is gone: fields drop in order).
    temp: Option<TempDir>,
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
        let mut h = HostProc {
            daemon,
            api,
            temp: None,
        };
        h.spawn().await;
        h
    }

    /// Like [`start`](Self::start) on a fresh temp directory, removed when
    /// the host is dropped.
    pub async fn temp(extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut host = Self::start(dir.path(), extra).await;
        host.temp = Some(dir);
        host
    }

    /// The set-up most tests begin with: a host on a temp directory
    /// ([`temp`](Self::temp)), VM `vm` on a Unix socket, `users` assigned
    /// to it, and a test agent connected there. Returns the host, the VM's
    /// socket and the agent.
    pub async fn with_agent(extra: &str, vm: &str, users: &[&str]) -> (Self, PathBuf, TestAgent) {
        let assigned: Vec<(&str, &str)> = users.iter().map(|u| (*u, vm)).collect();
        let (host, [path]) = Self::with_vms(extra, [vm], &assigned).await;
        let agent = host.connect_agent(&path, vm).await;
        (host, path, agent)
    }

    /// A host on a temp directory ([`temp`](Self::temp)) with the VMs
    /// `vms` on Unix sockets and the `(user, vm)` assignments made.
    /// Returns the host and the VMs' sockets.
    pub async fn with_vms<const N: usize>(
        extra: &str,
        vms: [&str; N],
        assignments: &[(&str, &str)],
    ) -> (Self, [PathBuf; N]) {
        let host = Self::temp(extra).await;
        let mut paths = Vec::with_capacity(N);
        for vm in vms {
            paths.push(host.add_unix_vm(vm).await);
        }
        for (user, vm) in assignments {
            host.assign(user, vm).await;
        }
        let Ok(paths) = paths.try_into() else {
            unreachable!("one path per VM")
        };
        (host, paths)
    }

    /// (Re)spawns the process and waits for its API (the kit's wait).
    pub async fn spawn(&mut self) {
        if let Err(e) = blocking(|| self.daemon.spawn()) {
            panic!("uve-host did not come up: {e}");
        }
    }

    /// An API call with a JSON body: the status and the JSON answer.
    pub async fn call(&self, method: Method, path: &str, body: Value) -> (u16, Value) {
        let a = self
            .api
            .call(method, path, client::json(&body))
            .await
            .unwrap();
        (a.status.as_u16(), a.json())
    }

    /// `GET path`: the status and the JSON answer.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let a = self.api.get(path).await.unwrap();
        (a.status.as_u16(), a.json())
    }

    /// `POST path` with an empty JSON object: the status and the answer.
    pub async fn post(&self, path: &str) -> (u16, Value) {
        self.call(Method::POST, path, json!({})).await
    }

    /// `DELETE path`: the status and the answer.
    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.call(Method::DELETE, path, json!({})).await
    }

    /// Registers VM `id` (`POST /v1/vms` with `spec` and the id), which
    /// must succeed.
    async fn add_vm(&self, id: &str, mut spec: Value) {
        spec["id"] = json!(id);
        let (s, v) = self.call(Method::POST, "/v1/vms", spec).await;
        assert_eq!(s, 201, "{v}");
    }

    /// Registers a VM listening on a plain Unix path; returns the path.
    pub async fn add_unix_vm(&self, id: &str) -> PathBuf {
        let path = self.data.join(format!("{id}.sock"));
        self.add_vm(id, json!({"unix": path})).await;
        path
    }

    /// Registers a hybrid-vsock VM; returns the path the host listens on.
    pub async fn add_hybrid_vm(&self, id: &str) -> PathBuf {
        let uds = self.data.join(format!("{id}.vsock"));
        self.add_vm(id, json!({"uds_path": uds})).await;
        let mut p = uds.into_os_string();
        p.push("_7075");
        PathBuf::from(p)
    }

    /// Connects a test agent and waits until the host lists the VM as
    /// connected (the host installs the connection just after `Welcome`).
    pub async fn connect_agent(&self, path: &Path, vm: &str) -> TestAgent {
        let agent = TestAgent::connect(path).await.unwrap();
        let connected = blocking(|| self.daemon.wait_connected(vm, CONNECT_LIMIT));
        assert!(connected, "{vm} never showed as connected");
        agent
    }

    /// Assigns `user` to `vm`, which must succeed.
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
        blocking(|| self.daemon.events(0))
    }

    /// Waits for an event of `kind` matching `pred`.
    pub async fn wait_event(&self, kind: &str, pred: impl Fn(&Value) -> bool) -> Value {
        blocking(|| self.daemon.wait_event(0, kind, EVENT_LIMIT, pred))
    }

    /// The events of `kind` retained now.
    pub async fn count_events(&self, kind: &str) -> usize {
        self.events()
            .await
            .iter()
            .filter(|e| e["kind"] == kind)
            .count()
    }

    /// `GET /v1/users/{user}/versions`.
    pub async fn versions(&self, user: &str) -> Value {
        self.get(&format!("/v1/users/{user}/versions")).await.1
    }

    /// Version `v` of `user`, exported (which must succeed).
    pub async fn export(&self, user: &str, v: u64) -> Vec<u8> {
        blocking(|| self.daemon.export(user, v, &self.daemon.data))
    }

    /// A counter from `/metrics`.
    pub async fn metric(&self, name: &str) -> u64 {
        blocking(|| self.daemon.metric(name))
    }
}

/// Makes `agent` answer a `UserRelease` of `user` as `mode` says.
pub fn on_release(agent: &TestAgent, user: &str, mode: ReleaseMode) {
    agent
        .state
        .lock()
        .unwrap()
        .release
        .insert(user.into(), mode);
}

/// Asserts the host committed an update (as head).
pub fn assert_committed(r: &Updated) {
    assert!(
        matches!(r.answer, Response::Committed { .. }),
        "{:?}",
        r.answer
    );
}

/// `(version, field)` of each version a `GET /v1/users/{user}/versions`
/// answer lists, in its order.
pub fn listed(versions: &Value, field: &str) -> Vec<(u64, String)> {
    versions["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["version"].as_u64().unwrap(),
                x[field].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// [`begin_and_list`] for alice's session `s1` on `base` under `lease`.
pub async fn begin_alice(
    agent: &TestAgent,
    base: Option<Version>,
    lease: u64,
    data: &[u8],
) -> Result<Listed, LinkError> {
    begin_and_list(&agent.handle, "alice", "s1", base, lease, data).await
}
