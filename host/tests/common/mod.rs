//! Shared integration-test harness: runs the real `uve-host` binary on a
//! temp data directory, talks to its API socket, and plays a guest agent
//! written with `uve_protocol` (handshake + link) that answers UVE-2.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::Method;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite};
use uve_host::client::{self, ApiClient};
use uve_protocol::chunker::chunk_stream;
use uve_protocol::codec::FrameCodec;
use uve_protocol::defs::{DEFAULT_MAX_FRAME, PROTOCOL_MAX, PROTOCOL_MIN};
use uve_protocol::handshake;
use uve_protocol::link::{self, Incoming, LinkConfig, LinkError, LinkHandle};
use uve_protocol::manifest::{Hash, Manifest, digest_of};
use uve_protocol::message::{
    AgentStatus, ChunkDelta, Hello, Request, Response, RetrieveGrant, SessionInfo, UaInfo,
    UpdateBegin, UpdateCause, Version, Welcome,
};
use uve_protocol::transport::{Endpoint, dial};

pub mod rgw;

#[allow(unused_imports)] // not every test binary makes data
pub use uve_protocol::testdata::noise;

/// Polls `f` until it returns `Some` or `limit` passes.
pub async fn poll<T, F, Fut>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() > end {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A running `uve-host`.
pub struct HostProc {
    pub child: Option<Child>,
    pub data: PathBuf,
    pub api: ApiClient,
    pub config: PathBuf,
}

impl HostProc {
    /// Starts the daemon on `data` with extra TOML config lines.
    pub async fn start(data: &Path, extra: &str) -> Self {
        std::fs::create_dir_all(data).unwrap();
        let config = data.join("config.toml");
        std::fs::write(
            &config,
            format!("data_dir = {:?}\nheartbeat_ms = 1000\n{extra}\n", data),
        )
        .unwrap();
        let mut h = HostProc {
            child: None,
            data: data.to_path_buf(),
            api: ApiClient::new(data.join("api.sock")),
            config,
        };
        h.spawn().await;
        h
    }

    /// (Re)spawns the process and waits for the API.
    pub async fn spawn(&mut self) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.data.join("host.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_uve-host"))
            .args(["run", "--config"])
            .arg(&self.config)
            .env("UVE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let api = self.api.clone();
        let up = poll(Duration::from_secs(20), || {
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
            "uve-host did not come up; see {}/host.log",
            self.data.display()
        );
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        // SAFETY: plain kill(2) on the pid of a child we spawned and have not reaped.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        c.wait().ok()?.code()
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
        let ok = poll(Duration::from_secs(10), || async {
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
        let found = poll(Duration::from_secs(20), || async {
            self.events().await.into_iter().find(|e| pred(e))
        })
        .await;
        found.unwrap_or_else(|| panic!("event not seen; events: {:#?}", futures_block(self)))
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

fn futures_block(_h: &HostProc) -> &'static str {
    "(see host.log)"
}

impl Drop for HostProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How the test agent answers `UserRelease`.
#[derive(Clone, Debug)]
pub enum ReleaseMode {
    /// Upload `data` for the user (with its stored base and lease), then
    /// answer `Released`.
    Flush(Vec<u8>),
    /// Never answer.
    Ignore,
}

/// What the test agent has seen and holds.
#[derive(Default)]
pub struct AgentState {
    pub release: HashMap<String, ReleaseMode>,
    /// user → (base, lease) from the last retrieve.
    pub leases: HashMap<String, (Option<Version>, u64)>,
    pub uas: HashMap<String, (String, Option<String>)>,
    pub bundles: HashMap<String, Vec<u8>>,
    pub transfers: HashMap<u64, (uve_protocol::message::UaBundle, Vec<u8>)>,
    pub suspended: Vec<String>,
    pub monitors: Vec<(String, String, u64)>,
    pub requests: Vec<String>,
    /// Kept so an ignored request is never answered.
    pub parked: Vec<link::Responder>,
}

/// A test agent connected to the host.
pub struct TestAgent {
    pub handle: LinkHandle,
    pub welcome: Welcome,
    pub state: Arc<Mutex<AgentState>>,
}

/// Outcome of a test update.
#[derive(Debug)]
pub struct Updated {
    pub answer: Response,
    pub missing: usize,
}

impl TestAgent {
    /// Dials `path`, handshakes and starts the UVE-2 responder.
    pub async fn connect(path: &Path) -> Result<Self, String> {
        Self::connect_speaking(path, PROTOCOL_MAX).await
    }

    /// Like [`connect`](Self::connect), for an agent that speaks protocol
    /// versions up to `protocol_max` only (an old agent).
    pub async fn connect_speaking(path: &Path, protocol_max: u16) -> Result<Self, String> {
        let stream = dial(&Endpoint::Unix(path.to_path_buf()), Duration::from_secs(5))
            .await
            .map_err(|e| e.to_string())?;
        let (r, w) = tokio::io::split(stream);
        let mut reader = FramedRead::new(r, FrameCodec::new(DEFAULT_MAX_FRAME));
        let mut writer = FramedWrite::new(w, FrameCodec::new(DEFAULT_MAX_FRAME));
        let hello = Hello {
            protocol_min: PROTOCOL_MIN,
            protocol_max,
            agent_version: "test-agent".into(),
            boot_id: [7; 16],
            capabilities: 0,
            max_frame: DEFAULT_MAX_FRAME,
        };
        let welcome = handshake::client(&mut reader, &mut writer, hello, Duration::from_secs(5))
            .await
            .map_err(|e| e.to_string())?;
        let cfg = LinkConfig::new(
            Duration::from_millis(u64::from(welcome.heartbeat_ms)),
            welcome.max_frame,
        );
        let (handle, incoming) = link::spawn(reader, writer.into_inner(), cfg);
        let state = Arc::new(Mutex::new(AgentState::default()));
        tokio::spawn(serve_uve2(handle.clone(), state.clone(), incoming));
        Ok(TestAgent {
            handle,
            welcome,
            state,
        })
    }

    /// Connects, retrying until `limit` (the host may be restarting).
    pub async fn connect_retry(path: &Path, limit: Duration) -> Self {
        let end = Instant::now() + limit;
        loop {
            match Self::connect(path).await {
                Ok(a) => return a,
                Err(e) if Instant::now() > end => panic!("cannot connect: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// Full retrieve; verifies every chunk and the manifest digest.
    pub async fn retrieve(
        &self,
        user: &str,
        session: &str,
    ) -> Result<(RetrieveGrant, Vec<u8>), LinkError> {
        retrieve(&self.handle, &self.state, user, session).await
    }

    /// Full update of `data` with explicit base and lease.
    pub async fn update(
        &self,
        user: &str,
        session: &str,
        base: Option<Version>,
        lease: u64,
        data: &[u8],
    ) -> Result<Updated, LinkError> {
        update(&self.handle, user, session, base, lease, data).await
    }

    /// Update based on what the last retrieve of `user` granted.
    pub async fn update_from_lease(&self, user: &str, data: &[u8]) -> Result<Updated, LinkError> {
        let (base, lease) = self
            .state
            .lock()
            .unwrap()
            .leases
            .get(user)
            .copied()
            .unwrap_or((None, 0));
        let r = self.update(user, "s1", base, lease, data).await?;
        if let Response::Committed { version } = r.answer {
            self.state
                .lock()
                .unwrap()
                .leases
                .insert(user.into(), (Some(version), lease));
        }
        Ok(r)
    }

    /// Sends a raw request.
    pub async fn request(&self, r: Request) -> Result<Response, LinkError> {
        self.handle.request(r).await
    }
}

pub async fn retrieve(
    handle: &LinkHandle,
    state: &Arc<Mutex<AgentState>>,
    user: &str,
    session: &str,
) -> Result<(RetrieveGrant, Vec<u8>), LinkError> {
    let grant = match handle
        .request(Request::UifRetrieve {
            user: user.into(),
            session: session.into(),
        })
        .await?
    {
        Response::Retrieve(g) => g,
        other => panic!("unexpected {other:?}"),
    };
    state
        .lock()
        .unwrap()
        .leases
        .insert(user.into(), (grant.version, grant.lease));
    let (Some(version), Some(header)) = (grant.version, grant.header) else {
        return Ok((grant, Vec::new()));
    };
    let pages = uve_protocol::manifest::page_count(header.chunk_count, handle.max_frame());
    let mut chunks = Vec::new();
    for page in 0..pages {
        match handle
            .request(Request::ManifestPage {
                user: user.into(),
                version,
                page,
            })
            .await?
        {
            Response::ManifestPage(refs) => chunks.extend(refs),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(digest_of(&chunks), header.digest, "manifest digest");
    let mut data = Vec::with_capacity(header.size as usize);
    for c in &chunks {
        match handle
            .request(Request::ChunkFetch {
                user: user.into(),
                hash: c.hash,
            })
            .await?
        {
            Response::Chunk(bytes) => {
                assert!(uve_protocol::chunker::chunk_matches(c, &bytes));
                data.extend_from_slice(&bytes);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    Ok((grant, data))
}

pub fn manifest_of(data: &[u8]) -> (Manifest, HashMap<Hash, Vec<u8>>) {
    let mut bytes = HashMap::new();
    let m = chunk_stream(data, |c, b| {
        bytes.insert(c.hash, b.to_vec());
        Ok(())
    })
    .unwrap();
    (m, bytes)
}

/// A whole update: begin, every page, the missing chunks whole, commit.
pub async fn update(
    handle: &LinkHandle,
    user: &str,
    session: &str,
    base: Option<Version>,
    lease: u64,
    data: &[u8],
) -> Result<Updated, LinkError> {
    let l = begin_and_list(handle, user, session, base, lease, data).await?;
    for &i in &l.missing {
        let hash = l.manifest.chunks[i].hash;
        handle
            .request(Request::ChunkUpload {
                upload: l.upload,
                hash,
                data: l.bytes[&hash].clone(),
            })
            .await?;
    }
    let answer = handle
        .request(Request::UpdateCommit { upload: l.upload })
        .await?;
    Ok(Updated {
        answer,
        missing: l.missing.len(),
    })
}

/// An update begun and fully listed, its chunks not yet sent.
pub struct Listed {
    pub upload: u64,
    pub manifest: Manifest,
    pub bytes: HashMap<Hash, Vec<u8>>,
    /// Indices (into the whole chunk list) the host said it lacks.
    pub missing: Vec<usize>,
}

impl Listed {
    /// File offset of chunk `i`.
    pub fn offset(&self, i: usize) -> u64 {
        self.manifest.chunks[..i]
            .iter()
            .map(|c| u64::from(c.len))
            .sum()
    }
}

/// `UpdateBegin` + every `UpdatePage` of `data`; no chunk sent.
pub async fn begin_and_list(
    handle: &LinkHandle,
    user: &str,
    session: &str,
    base: Option<Version>,
    lease: u64,
    data: &[u8],
) -> Result<Listed, LinkError> {
    let (manifest, bytes) = manifest_of(data);
    let begin = UpdateBegin {
        user: user.into(),
        session: session.into(),
        base,
        lease,
        header: manifest.header,
        cause: UpdateCause::Logout,
    };
    let upload = match handle.request(Request::UpdateBegin(begin)).await? {
        Response::UpdateAccepted { upload } => upload,
        other => panic!("unexpected {other:?}"),
    };
    let per = uve_protocol::manifest::chunks_per_page(handle.max_frame()) as usize;
    let mut missing = Vec::new();
    for (p, page) in manifest.chunks.chunks(per.max(1)).enumerate() {
        match handle
            .request(Request::UpdatePage {
                upload,
                page: p as u32,
                chunks: page.to_vec(),
            })
            .await?
        {
            Response::Missing(idx) => missing.extend(idx.iter().map(|i| p * per + *i as usize)),
            other => panic!("unexpected {other:?}"),
        }
    }
    Ok(Listed {
        upload,
        manifest,
        bytes,
        missing,
    })
}

/// What an update by block deltas sent.
#[derive(Debug)]
pub struct DeltaUpdated {
    pub answer: Response,
    pub missing: usize,
    pub deltas: usize,
    pub delta_bytes: usize,
    pub whole_bytes: usize,
}

/// An update as a protocol-2 agent sends it: block signatures for the
/// missing chunks, then each as a delta when the host named a base chunk,
/// else whole.
pub async fn update_with_deltas(
    handle: &LinkHandle,
    user: &str,
    base: Option<Version>,
    lease: u64,
    data: &[u8],
) -> Result<DeltaUpdated, LinkError> {
    let l = begin_and_list(handle, user, "s1", base, lease, data).await?;
    let mut out = DeltaUpdated {
        answer: Response::Ok,
        missing: l.missing.len(),
        deltas: 0,
        delta_bytes: 0,
        whole_bytes: 0,
    };
    let batch = uve_protocol::defs::MAX_SIGNATURE_BATCH as usize;
    for idx in l.missing.chunks(batch) {
        let sigs = match handle
            .request(Request::BlockSignatures {
                upload: l.upload,
                chunks: idx.iter().map(|&i| i as u32).collect(),
            })
            .await?
        {
            Response::BlockSignatures(s) => s,
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(sigs.len(), idx.len());
        for (&i, sig) in idx.iter().zip(sigs) {
            let c = l.manifest.chunks[i];
            let offset = l.offset(i);
            let data = l.bytes[&c.hash].clone();
            let request = match sig {
                Some(digests) => {
                    let blocks = uve_protocol::delta::diff(offset, &data, &digests).unwrap();
                    out.deltas += 1;
                    out.delta_bytes += blocks.iter().map(|b| b.data.len()).sum::<usize>();
                    Request::ChunkDelta(ChunkDelta {
                        upload: l.upload,
                        index: i as u32,
                        hash: c.hash,
                        blocks,
                    })
                }
                None => {
                    out.whole_bytes += data.len();
                    Request::ChunkUpload {
                        upload: l.upload,
                        hash: c.hash,
                        data,
                    }
                }
            };
            match handle.request(request).await? {
                Response::Ok => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    out.answer = handle
        .request(Request::UpdateCommit { upload: l.upload })
        .await?;
    Ok(out)
}

async fn serve_uve2(
    handle: LinkHandle,
    state: Arc<Mutex<AgentState>>,
    mut rx: mpsc::Receiver<Incoming>,
) {
    while let Some(Incoming { request, responder }) = rx.recv().await {
        state
            .lock()
            .unwrap()
            .requests
            .push(format!("{request:?}").chars().take(80).collect());
        let answer = match request {
            Request::UserRelease { user, .. } => {
                let mode = state.lock().unwrap().release.get(&user).cloned();
                match mode {
                    None | Some(ReleaseMode::Ignore) => {
                        state.lock().unwrap().parked.push(responder);
                        continue;
                    }
                    Some(ReleaseMode::Flush(data)) => {
                        let (handle, state) = (handle.clone(), state.clone());
                        tokio::spawn(async move {
                            let (base, lease) = state
                                .lock()
                                .unwrap()
                                .leases
                                .get(&user)
                                .copied()
                                .unwrap_or((None, 0));
                            let r = update(&handle, &user, "s1", base, lease, &data).await;
                            let committed = match r {
                                Ok(Updated {
                                    answer: Response::Committed { version },
                                    ..
                                }) => Some(version),
                                _ => None,
                            };
                            let _ = responder.send(Response::Released { committed }).await;
                        });
                        continue;
                    }
                }
            }
            Request::Ping { nonce } => Response::Pong { nonce },
            Request::UaBegin(b) => {
                state
                    .lock()
                    .unwrap()
                    .transfers
                    .insert(b.transfer, (b, Vec::new()));
                Response::Ok
            }
            Request::UaBundleData {
                transfer,
                offset,
                data,
            } => {
                let mut st = state.lock().unwrap();
                match st.transfers.get_mut(&transfer) {
                    Some((_, buf)) if buf.len() as u64 == offset => {
                        buf.extend_from_slice(&data);
                        Response::Ok
                    }
                    _ => err("bad transfer or offset"),
                }
            }
            Request::UaCommit { transfer } => {
                let mut st = state.lock().unwrap();
                match st.transfers.remove(&transfer) {
                    Some((b, buf)) if Hash::of(&buf) == b.digest && buf.len() as u64 == b.size => {
                        let prev = st.uas.get(&b.name).map(|(cur, _)| cur.clone());
                        st.uas.insert(b.name.clone(), (b.version.clone(), prev));
                        st.bundles.insert(format!("{}/{}", b.name, b.version), buf);
                        Response::UaCurrent { version: b.version }
                    }
                    _ => Response::Error(uve_protocol::WireError::new(
                        uve_protocol::ErrorCode::BadDigest,
                        "bundle digest mismatch",
                    )),
                }
            }
            Request::UaRollback { name } => {
                let mut st = state.lock().unwrap();
                match st.uas.get(&name).cloned() {
                    Some((cur, Some(prev))) => {
                        st.uas.insert(name, (prev.clone(), Some(cur)));
                        Response::UaCurrent { version: prev }
                    }
                    _ => Response::Error(uve_protocol::WireError::new(
                        uve_protocol::ErrorCode::NotFound,
                        "no previous version",
                    )),
                }
            }
            Request::UaDelete { name, force } => {
                let mut st = state.lock().unwrap();
                if name == "busy" && !force {
                    Response::Error(uve_protocol::WireError::new(
                        uve_protocol::ErrorCode::UaInUse,
                        "sessions use it",
                    ))
                } else if st.uas.remove(&name).is_some() {
                    Response::UaDeleted {
                        stopped_sessions: if force { vec!["s1".into()] } else { vec![] },
                    }
                } else {
                    Response::Error(uve_protocol::WireError::new(
                        uve_protocol::ErrorCode::NotFound,
                        "no such UA",
                    ))
                }
            }
            Request::SessionSuspend { session } => {
                state.lock().unwrap().suspended.push(session);
                Response::Ok
            }
            Request::SessionResume { session } => {
                state.lock().unwrap().suspended.retain(|s| *s != session);
                Response::Ok
            }
            Request::MonitorGrant {
                session,
                monitor,
                expires,
            } => {
                state
                    .lock()
                    .unwrap()
                    .monitors
                    .push((session, monitor, expires));
                Response::Ok
            }
            Request::MonitorRevoke { session, monitor } => {
                state
                    .lock()
                    .unwrap()
                    .monitors
                    .retain(|(s, m, _)| !(*s == session && *m == monitor));
                Response::Ok
            }
            Request::AgentStatus => {
                let st = state.lock().unwrap();
                Response::Status(AgentStatus {
                    sessions: st
                        .suspended
                        .iter()
                        .map(|s| SessionInfo {
                            session: s.clone(),
                            user: "alice".into(),
                            ua: None,
                            suspended: true,
                        })
                        .collect(),
                    uas: st
                        .uas
                        .iter()
                        .map(|(n, (c, p))| UaInfo {
                            name: n.clone(),
                            current: c.clone(),
                            previous: p.clone(),
                        })
                        .collect(),
                    spooled_updates: 0,
                })
            }
            _ => err("unsupported"),
        };
        let _ = responder.send(answer).await;
    }
}

fn err(m: &str) -> Response {
    Response::Error(uve_protocol::WireError::new(
        uve_protocol::ErrorCode::BadRequest,
        m,
    ))
}
