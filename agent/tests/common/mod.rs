//! Test harness: a small in-memory **test host** speaking the real
//! protocol over a real Unix socket (`<dir>/v.sock_7075`, the hybrid-vsock
//! naming), and a wrapper that runs the real `uve-agent` binary against it.
//! The host keeps a chunk store and per-user head versions, counts what the
//! agent sends (chunk fetches, uploads, disconnect notices per id) and can
//! send UVE-2 requests. It runs on its own thread and runtime so tests are
//! plain synchronous functions that poll with deadlines.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation,
    dead_code,
    missing_docs
)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use uve_protocol::FrameCodec;
use uve_protocol::defs::PROTOCOL_BLOCK_DELTA;
use uve_protocol::delta::{self, BaseIndex};
use uve_protocol::handshake::{self, HostOffer};
use uve_protocol::link::{self, Incoming, LinkConfig, LinkError, LinkHandle};
use uve_protocol::manifest::{ChunkRef, Hash, Manifest, chunks_per_page};
use uve_protocol::message::{
    ErrorCode, Limits, Request, Response, RetrieveGrant, UpdateBegin, UpdateCause, Version,
};
use uve_protocol::transport::bind_unix;

pub fn is_root() -> bool {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() == 0 }
}

/// Skips the calling test (returns true) when not root.
pub fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        false
    } else {
        eprintln!("SKIP {test}: needs root (setuid, chown)");
        true
    }
}

#[allow(unused_imports)] // not every test binary makes data
pub use uve_protocol::testdata::noise;

/// Polls `f` until it returns `Some`, or panics after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > limit {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

pub const LONG: Duration = Duration::from_secs(30);

/// Heartbeat interval the test host offers.
const HEARTBEAT_MS: u32 = uve_protocol::defs::DEFAULT_HEARTBEAT_MS;

#[derive(Debug, Clone)]
pub struct Commit {
    pub user: String,
    pub version: Version,
    pub base: Option<Version>,
    pub cause: UpdateCause,
    pub conflict: bool,
}

struct Upload {
    begin: UpdateBegin,
    chunks: Vec<ChunkRef>,
    /// Offset of each listed chunk.
    starts: Vec<u64>,
    end: u64,
}

#[derive(Default)]
pub struct HostState {
    pub chunks: HashMap<Hash, Vec<u8>>,
    /// user -> head version
    pub heads: HashMap<String, Version>,
    pub versions: HashMap<(String, Version), Manifest>,
    pub next_version: Version,
    pub leases: HashMap<String, u64>,
    uploads: HashMap<u64, Upload>,
    next_upload: u64,
    pub chunk_fetches: usize,
    pub chunk_uploads: usize,
    pub retrieves: usize,
    /// notice id -> times delivered
    pub notices: BTreeMap<u64, usize>,
    pub notice_sessions: Vec<(u64, String, String)>,
    pub sessions_started: Vec<String>,
    pub sessions_ended: Vec<String>,
    pub commits: Vec<Commit>,
    pub connections: usize,
    pub unassigned: HashSet<String>,
    /// Refuse this many next notices with Busy (tests retry).
    pub busy_notices: usize,
    /// Refuse this many next notices for good (`TooLarge`).
    pub refuse_notices: usize,
    /// Refuse every `UpdateBegin` for good with this code (quota, ...).
    pub refuse_updates: Option<ErrorCode>,
    /// Drop the connection (no goodbye) at the next chunk upload.
    pub drop_on_upload: bool,
    /// Drop the connection (no goodbye) at the next chunk fetch.
    pub drop_on_fetch: bool,
    /// Serve this many more chunk fetches, then drop the connection (no
    /// goodbye) at the next one.
    pub drop_after_fetches: Option<usize>,
    /// Record the next disconnect notice, then drop the connection before
    /// acknowledging it (the agent must redeliver the same id).
    pub drop_after_notice: bool,
    /// Speak at most this protocol version (an old host); `None`: the
    /// newest this build knows.
    pub protocol_max: Option<u16>,
    /// Protocol version negotiated on the latest connection.
    pub protocol: u16,
    /// Bytes of whole chunks uploaded.
    pub upload_bytes: u64,
    /// Chunks received as block deltas, and their block bytes.
    pub chunk_deltas: usize,
    pub delta_bytes: u64,
    pub signature_requests: usize,
    /// Refuse this many next deltas with `NotFound` (base unreadable).
    pub refuse_deltas: usize,
    /// Refuse this many next signature requests with `Internal`.
    pub refuse_signatures: usize,
    max_frame: u32,
}

impl HostState {
    /// The bytes of `user`'s head version.
    pub fn head_bytes(&self, user: &str) -> Option<Vec<u8>> {
        let v = *self.heads.get(user)?;
        self.version_bytes(user, v)
    }

    pub fn version_bytes(&self, user: &str, v: Version) -> Option<Vec<u8>> {
        let m = self.versions.get(&(user.to_string(), v))?;
        let mut out = Vec::new();
        for c in &m.chunks {
            out.extend_from_slice(self.chunks.get(&c.hash)?);
        }
        Some(out)
    }

    /// Stores `data` as `user`'s new head (as if uploaded by an operator).
    pub fn seed(&mut self, user: &str, data: &[u8]) -> Version {
        let mut chunks = Vec::new();
        let m = uve_protocol::chunker::chunk_stream(data, |c, bytes| {
            chunks.push((c.hash, bytes.to_vec()));
            Ok(())
        })
        .unwrap();
        for (h, b) in chunks {
            self.chunks.insert(h, b);
        }
        self.next_version += 1;
        let v = self.next_version;
        self.versions.insert((user.into(), v), m);
        self.heads.insert(user.into(), v);
        v
    }
}

pub struct TestHost {
    pub dir: PathBuf,
    pub state: Arc<Mutex<HostState>>,
    rt: tokio::runtime::Handle,
    link: Arc<Mutex<Option<LinkHandle>>>,
    stop: Mutex<Option<CancellationToken>>,
    _thread: std::thread::JoinHandle<()>,
}

impl TestHost {
    pub fn socket_path(dir: &Path) -> PathBuf {
        dir.join("v.sock_7075")
    }

    pub fn start(dir: &Path) -> TestHost {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            tx.send(rt.handle().clone()).unwrap();
            rt.block_on(std::future::pending::<()>());
        });
        let rt = rx.recv().unwrap();
        let host = TestHost {
            dir: dir.to_path_buf(),
            state: Arc::new(Mutex::new(HostState::default())),
            rt,
            link: Arc::new(Mutex::new(None)),
            stop: Mutex::new(None),
            _thread: thread,
        };
        host.up();
        host
    }

    /// Starts listening (again).
    pub fn up(&self) {
        let path = Self::socket_path(&self.dir);
        let stop = CancellationToken::new();
        *self.stop.lock().unwrap() = Some(stop.clone());
        let state = self.state.clone();
        let slot = self.link.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        self.rt.spawn(async move {
            let listener = bind_unix(&path).unwrap();
            tx.send(()).unwrap();
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    acc = listener.accept() => {
                        let Ok((s, _)) = acc else { continue };
                        tokio::spawn(serve_conn(s, state.clone(), slot.clone(), stop.clone()));
                    }
                }
            }
            drop(listener);
            let _ = std::fs::remove_file(&path);
        });
        rx.recv().unwrap();
    }

    /// Stops listening and drops the connection without a goodbye.
    pub fn down(&self) {
        if let Some(s) = self.stop.lock().unwrap().take() {
            s.cancel();
        }
        if let Some(l) = self.link.lock().unwrap().take() {
            l.close();
        }
        wait_for("host socket removed", LONG, || {
            (!Self::socket_path(&self.dir).exists()).then_some(())
        });
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut HostState) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    pub fn connected(&self) -> bool {
        self.link
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|l| !l.is_closed())
    }

    /// Sends a UVE-2 request to the connected agent.
    pub fn request(&self, req: Request) -> Result<Response, LinkError> {
        let link = wait_for("agent connection", LONG, || {
            self.link.lock().unwrap().clone().filter(|l| !l.is_closed())
        });
        let (tx, rx) = std::sync::mpsc::channel();
        self.rt.spawn(async move {
            let r = link.request_timeout(req, Duration::from_secs(60)).await;
            let _ = tx.send(r);
        });
        rx.recv().unwrap()
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        if let Some(s) = self.stop.lock().unwrap().take() {
            s.cancel();
        }
    }
}

async fn serve_conn(
    s: tokio::net::UnixStream,
    state: Arc<Mutex<HostState>>,
    slot: Arc<Mutex<Option<LinkHandle>>>,
    stop: CancellationToken,
) {
    let (r, w) = s.into_split();
    let mut reader = FramedRead::new(r, FrameCodec::default());
    let mut writer = FramedWrite::new(w, FrameCodec::default());
    let limit = Duration::from_secs(5);
    let Ok(hello) = handshake::read_hello(&mut reader, limit).await else {
        return;
    };
    let offer = HostOffer {
        host_version: "test-host".into(),
        vm_id: "vm-test".into(),
        // The production default (15 s to declare a peer dead), not a short
        // test value: the agent's single runtime thread also does its fsyncs,
        // and on a loaded machine one can take longer than 3 x 500 ms; the
        // link would then drop (a spurious reconnect, a logout spooled
        // instead of committed). No test waits for a heartbeat timeout: the
        // test host closes its connections explicitly.
        heartbeat_ms: HEARTBEAT_MS,
        max_frame: uve_protocol::defs::DEFAULT_MAX_FRAME,
        limits: Limits {
            max_inflight: 32,
            max_uif_size: 1 << 34,
            max_chunk: uve_protocol::defs::MAX_CHUNK,
        },
    };
    let cap = state.lock().unwrap().protocol_max;
    let verdict = handshake::negotiate(&hello, &offer).map(|mut w| {
        if let Some(max) = cap {
            w.protocol = w.protocol.min(max);
        }
        w
    });
    let Ok(welcome) = handshake::answer(&mut reader, &mut writer, verdict, limit).await else {
        return;
    };
    let (link, mut incoming) = link::spawn(
        reader,
        writer.into_inner(),
        LinkConfig::new(
            Duration::from_millis(u64::from(HEARTBEAT_MS)),
            welcome.max_frame,
        ),
    );
    {
        let mut st = state.lock().unwrap();
        st.connections += 1;
        st.max_frame = welcome.max_frame;
        st.protocol = welcome.protocol;
    }
    if let Some(old) = slot.lock().unwrap().replace(link.clone()) {
        old.close();
    }
    loop {
        tokio::select! {
            () = stop.cancelled() => { link.close(); break }
            item = incoming.recv() => {
                let Some(Incoming { request, responder }) = item else { break };
                let drop_now = {
                    let mut st = state.lock().unwrap();
                    let upload = st.drop_on_upload && matches!(request, Request::ChunkUpload { .. });
                    let fetch = st.drop_on_fetch && matches!(request, Request::ChunkFetch { .. });
                    if upload {
                        st.drop_on_upload = false;
                    }
                    if fetch {
                        st.drop_on_fetch = false;
                    }
                    let counted = match st.drop_after_fetches {
                        Some(n) if matches!(request, Request::ChunkFetch { .. }) => {
                            st.drop_after_fetches = n.checked_sub(1);
                            n == 0
                        }
                        _ => false,
                    };
                    upload || fetch || counted
                };
                if drop_now {
                    std::mem::forget(responder);
                    link.close();
                    break;
                }
                let lose_ack = {
                    let mut st = state.lock().unwrap();
                    let hit = st.drop_after_notice
                        && matches!(request, Request::UnexpectedDisconnect(_));
                    if hit {
                        st.drop_after_notice = false;
                    }
                    hit
                };
                let answer = handle(&state, request);
                if lose_ack {
                    std::mem::forget(responder);
                    link.close();
                    break;
                }
                let _ = responder.send(answer).await;
            }
        }
    }
}

/// The bytes the base version of `up` holds at `[at, at + len)`.
fn base_bytes(st: &HostState, up: &Upload, at: u64, len: u32) -> Option<Vec<u8>> {
    let base = up.begin.base?;
    let m = st.versions.get(&(up.begin.user.clone(), base))?;
    let parts = BaseIndex::new(m).covering(at, len)?;
    delta::assemble(at, len as usize, &parts, |c| {
        st.chunks.get(&c.hash).cloned().ok_or(())
    })
    .ok()
    .flatten()
}

fn err(code: ErrorCode, msg: &str) -> Response {
    Response::Error(uve_protocol::WireError::new(code, msg))
}

fn handle(state: &Mutex<HostState>, req: Request) -> Response {
    let mut st = state.lock().unwrap();
    match req {
        Request::UifRetrieve { user, .. } => {
            if st.unassigned.contains(&user) {
                return err(ErrorCode::NotAssigned, "not assigned");
            }
            st.retrieves += 1;
            let lease = {
                let l = st.leases.entry(user.clone()).or_insert(0);
                *l += 1;
                *l
            };
            let version = st.heads.get(&user).copied();
            let header =
                version.and_then(|v| st.versions.get(&(user.clone(), v)).map(|m| m.header));
            Response::Retrieve(RetrieveGrant {
                version,
                header,
                lease,
                handover_timed_out: false,
            })
        }
        Request::ManifestPage {
            user,
            version,
            page,
        } => {
            let mf = st.max_frame;
            match st.versions.get(&(user, version)) {
                Some(m) => match m.page(page, mf) {
                    Ok(p) => Response::ManifestPage(p.to_vec()),
                    Err(_) => err(ErrorCode::NotFound, "page"),
                },
                None => err(ErrorCode::NotFound, "version"),
            }
        }
        Request::ChunkFetch { hash, .. } => {
            st.chunk_fetches += 1;
            match st.chunks.get(&hash) {
                Some(d) => Response::Chunk(d.clone()),
                None => err(ErrorCode::NotFound, "chunk"),
            }
        }
        Request::UpdateBegin(begin) => {
            if st.unassigned.contains(&begin.user) {
                return err(ErrorCode::NotAssigned, "not assigned");
            }
            if let Some(code) = st.refuse_updates {
                return err(code, "refused by the test host");
            }
            st.next_upload += 1;
            let id = st.next_upload;
            st.uploads.insert(
                id,
                Upload {
                    begin,
                    chunks: Vec::new(),
                    starts: Vec::new(),
                    end: 0,
                },
            );
            Response::UpdateAccepted { upload: id }
        }
        Request::UpdatePage {
            upload,
            page,
            chunks,
        } => {
            let per = chunks_per_page(st.max_frame) as usize;
            let missing: Vec<u32> = chunks
                .iter()
                .enumerate()
                .filter(|(_, c)| !st.chunks.contains_key(&c.hash))
                .map(|(i, _)| i as u32)
                .collect();
            let Some(up) = st.uploads.get_mut(&upload) else {
                return err(ErrorCode::NotFound, "upload");
            };
            if up.chunks.len() != page as usize * per {
                return err(ErrorCode::BadRequest, "page out of order");
            }
            for c in &chunks {
                up.starts.push(up.end);
                up.end += u64::from(c.len);
            }
            up.chunks.extend(chunks);
            Response::Missing(missing)
        }
        Request::ChunkUpload { upload, hash, data } => {
            if !st.uploads.contains_key(&upload) {
                return err(ErrorCode::NotFound, "upload");
            }
            if Hash::of(&data) != hash {
                return err(ErrorCode::BadChunk, "hash");
            }
            st.chunk_uploads += 1;
            st.upload_bytes += data.len() as u64;
            st.chunks.insert(hash, data);
            Response::Ok
        }
        Request::BlockSignatures { upload, chunks } => {
            if st.protocol < PROTOCOL_BLOCK_DELTA {
                return err(ErrorCode::Unsupported, "protocol 1 host");
            }
            st.signature_requests += 1;
            if st.refuse_signatures > 0 {
                st.refuse_signatures -= 1;
                return err(ErrorCode::Internal, "cannot sign now");
            }
            let Some(up) = st.uploads.get(&upload) else {
                return err(ErrorCode::NotFound, "upload");
            };
            let mut out = Vec::new();
            for i in chunks {
                let (Some(c), Some(at)) = (up.chunks.get(i as usize), up.starts.get(i as usize))
                else {
                    return err(ErrorCode::BadRequest, "chunk index not listed");
                };
                out.push(base_bytes(&st, up, *at, c.len).map(|b| delta::block_digests(*at, &b)));
            }
            Response::BlockSignatures(out)
        }
        Request::ChunkDelta(d) => {
            if st.protocol < PROTOCOL_BLOCK_DELTA {
                return err(ErrorCode::Unsupported, "protocol 1 host");
            }
            if st.refuse_deltas > 0 {
                st.refuse_deltas -= 1;
                return err(ErrorCode::NotFound, "base chunk gone");
            }
            let Some(up) = st.uploads.get(&d.upload) else {
                return err(ErrorCode::NotFound, "upload");
            };
            let i = d.index as usize;
            let (Some(c), Some(at)) = (up.chunks.get(i), up.starts.get(i)) else {
                return err(ErrorCode::BadRequest, "chunk index not listed");
            };
            if c.hash != d.hash {
                return err(ErrorCode::BadRequest, "not the chunk at that index");
            }
            let Some(old) = base_bytes(&st, up, *at, c.len) else {
                return err(ErrorCode::BadRequest, "outside the base version");
            };
            let Ok(new) = delta::apply(*at, &old, &d.blocks) else {
                return err(ErrorCode::BadRequest, "malformed delta");
            };
            if Hash::of(&new) != d.hash {
                return err(ErrorCode::BadChunk, "hash");
            }
            st.chunk_deltas += 1;
            st.delta_bytes += d.blocks.iter().map(|b| b.data.len() as u64).sum::<u64>();
            st.chunks.insert(d.hash, new);
            Response::Ok
        }
        Request::UpdateCommit { upload } => {
            let Some(up) = st.uploads.remove(&upload) else {
                return err(ErrorCode::NotFound, "upload");
            };
            let m = Manifest {
                header: up.begin.header,
                chunks: up.chunks,
            };
            if m.validate().is_err() {
                return err(ErrorCode::BadDigest, "manifest");
            }
            if m.chunks.iter().any(|c| !st.chunks.contains_key(&c.hash)) {
                return err(ErrorCode::BadRequest, "chunks missing");
            }
            let user = up.begin.user.clone();
            st.next_version += 1;
            let v = st.next_version;
            st.versions.insert((user.clone(), v), m);
            let head = st.heads.get(&user).copied();
            let lease_ok = st.leases.get(&user).copied().unwrap_or(0) == up.begin.lease;
            let ok = head == up.begin.base && (lease_ok || head.is_none());
            st.commits.push(Commit {
                user: user.clone(),
                version: v,
                base: up.begin.base,
                cause: up.begin.cause,
                conflict: !ok,
            });
            if ok {
                st.heads.insert(user, v);
                Response::Committed { version: v }
            } else {
                Response::Conflict { kept_as: v, head }
            }
        }
        Request::UpdateAbort { upload } => {
            st.uploads.remove(&upload);
            Response::Ok
        }
        Request::SessionStarted { session, .. } => {
            st.sessions_started.push(session);
            Response::Ok
        }
        Request::SessionEnded { session } => {
            st.sessions_ended.push(session);
            Response::Ok
        }
        Request::UnexpectedDisconnect(n) => {
            // As the real host: free text is limited in bytes.
            if n.reason.len() > uve_protocol::defs::MAX_TEXT_LEN {
                return err(ErrorCode::TooLarge, "reason too long");
            }
            if st.busy_notices > 0 {
                st.busy_notices -= 1;
                return err(ErrorCode::Busy, "try later");
            }
            if st.refuse_notices > 0 {
                st.refuse_notices -= 1;
                return err(ErrorCode::TooLarge, "refused for good");
            }
            let seen = st.notices.entry(n.id).or_insert(0);
            *seen += 1;
            if *seen == 1 {
                st.notice_sessions.push((n.id, n.session, n.reason));
            }
            Response::Ok
        }
        _ => err(ErrorCode::Unsupported, "agent-side request"),
    }
}

/// A running `uve-agent run`.
pub struct AgentProc {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub state: PathBuf,
    /// Extra environment of the daemon (e.g. `UVE_AGENT_FAULTS`).
    pub env: Vec<(String, String)>,
    child: Option<Child>,
}

/// The agent binary under test; `UVE_AGENT_BIN` overrides it (e.g. to run
/// the suite against the static release build).
pub fn agent_bin() -> String {
    std::env::var("UVE_AGENT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_uve-agent").into())
}

/// Resident set size of a process in KiB.
pub fn rss_kib(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

impl AgentProc {
    /// Writes a config (extra TOML appended, e.g. a `[uif]` section) and
    /// starts the agent; waits until its control socket answers.
    pub fn start(dir: &Path, extra: &str) -> AgentProc {
        Self::start_with_env(dir, extra, &[])
    }

    /// Like [`start`](Self::start), with extra environment variables.
    pub fn start_with_env(dir: &Path, extra: &str, env: &[(&str, &str)]) -> AgentProc {
        let state = dir.join("state");
        let socket = dir.join("ctl.sock");
        let config = dir.join("agent.toml");
        let text = format!(
            "host = \"unix:{}\"\nstate_dir = \"{}\"\ncontrol_socket = \"{}\"\nlogin_timeout_secs = 5\n{extra}\n",
            TestHost::socket_path(dir).display(),
            state.display(),
            socket.display()
        );
        std::fs::write(&config, text).unwrap();
        let mut a = AgentProc {
            dir: dir.to_path_buf(),
            config,
            socket,
            state,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
        };
        a.spawn();
        a
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .unwrap();
        let child = Command::new(agent_bin())
            .args(["run", "--config"])
            .arg(&self.config)
            .env("UVE_LOG", "debug")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let sock = self.socket.clone();
        wait_for("agent control socket", LONG, || {
            std::os::unix::net::UnixStream::connect(&sock)
                .ok()
                .map(|_| ())
        });
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(agent_bin())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs a verb and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}{}\n--- agent log ---\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn status(&self) -> serde_json::Value {
        let out = self.ok(&["status", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["status"].clone()
    }

    pub fn wait_connected(&self) {
        wait_for("agent connected", LONG, || {
            (self.status()["connected"] == serde_json::Value::Bool(true)).then_some(())
        });
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// SIGKILL, no cleanup.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for exit; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        // SAFETY: signalling our own child by pid.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let start = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st.code();
            }
            if start.elapsed() > LONG {
                let _ = c.kill();
                panic!("agent did not exit after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
    }
}
