//! A fake **host** protocol peer for the agent's integration tests: a
//! small in-memory host speaking the real protocol over a real Unix socket
//! (`<dir>/v.sock_7075`, the hybrid-vsock naming) to a real `uve-agent`.
//! It keeps a chunk store and per-user head versions, counts what the
//! agent sends (chunk fetches, uploads, disconnect notices per id), can be
//! told to misbehave (drop the link, refuse, speak an old protocol) and
//! can send UVE-2 requests. It runs on its own thread and runtime so tests
//! are plain synchronous functions that poll with deadlines.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use uve_protocol::FrameCodec;
use uve_protocol::handshake::{self, HostOffer};
use uve_protocol::link::{self, Incoming, LinkConfig, LinkError, LinkHandle};
use uve_protocol::manifest::{ChunkRef, Hash, Manifest, ZERO_BLOCK};
use uve_protocol::message::{
    ErrorCode, Limits, Request, Response, UpdateBegin, UpdateCause, Version,
};
use uve_protocol::transport::bind_unix;

use crate::names::{self, Names};
use crate::poll::{self, LONG};

mod handle;

/// Heartbeat interval the fake host offers.
const HEARTBEAT_MS: u32 = uve_protocol::defs::DEFAULT_HEARTBEAT_MS;

/// Locks `m`, also after a panic elsewhere (the state stays inspectable).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One `UpdateCommit` the fake host decided.
#[derive(Debug, Clone)]
pub struct Commit {
    /// Whose UIF.
    pub user: String,
    /// The version it was stored as.
    pub version: Version,
    /// The base the agent named.
    pub base: Option<Version>,
    /// Why the agent sent it.
    pub cause: UpdateCause,
    /// Kept as a conflict version (not the new head).
    pub conflict: bool,
}

/// An update in progress.
struct Upload {
    begin: UpdateBegin,
    chunks: Vec<ChunkRef>,
    /// Offset of each listed chunk.
    starts: Vec<u64>,
    end: u64,
}

/// Everything the fake host stores, counts and is told to do.
#[derive(Default)]
pub struct HostState {
    /// Chunk store.
    pub chunks: HashMap<Hash, Vec<u8>>,
    /// user -> head version
    pub heads: HashMap<String, Version>,
    /// Every stored version's manifest.
    pub versions: HashMap<(String, Version), Manifest>,
    /// The last version number handed out.
    pub next_version: Version,
    /// user -> current lease (bumped by every retrieve).
    pub leases: HashMap<String, u64>,
    uploads: HashMap<u64, Upload>,
    next_upload: u64,
    /// Chunk fetches served.
    pub chunk_fetches: usize,
    /// Whole chunks uploaded.
    pub chunk_uploads: usize,
    /// Retrieves granted.
    pub retrieves: usize,
    /// notice id -> times delivered
    pub notices: BTreeMap<u64, usize>,
    /// (id, session, reason) of each notice, first delivery only.
    pub notice_sessions: Vec<(u64, String, String)>,
    /// `SessionStarted` sessions, in order.
    pub sessions_started: Vec<String>,
    /// `SessionEnded` sessions, in order.
    pub sessions_ended: Vec<String>,
    /// Every commit decided.
    pub commits: Vec<Commit>,
    /// Updates answered as the commit they repeat (no version stored).
    pub redelivered: usize,
    /// Connections handshaken.
    pub connections: usize,
    /// Users this VM is not assigned (retrieve and update refused).
    pub unassigned: HashSet<String>,
    /// Refuse this many next notices with Busy (tests retry).
    pub busy_notices: usize,
    /// Answer this many next `SessionStarted` with `Busy` (as the host does
    /// past `session_starts_per_minute`; the agent announces again).
    pub busy_session_starts: usize,
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
    /// Chunks received as block deltas.
    pub chunk_deltas: usize,
    /// Block bytes of the chunks received as deltas.
    pub delta_bytes: u64,
    /// `BlockSignatures` requests answered.
    pub signature_requests: usize,
    /// Forget this many next uploads at their next chunk upload, as
    /// uve-host does with an upload idle too long: the chunk is answered
    /// `NotFound`.
    pub expire_uploads: usize,
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

    /// The bytes of `user`'s version `v`.
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
        .unwrap_or_else(|e| panic!("chunk the seed of {user}: {e}"));
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

/// The fake host: its state, its listener and the agent's latest link.
pub struct TestHost {
    /// The directory holding its socket.
    pub dir: PathBuf,
    /// What it stores and counts (see also [`with`](Self::with)).
    pub state: Arc<Mutex<HostState>>,
    rt: tokio::runtime::Handle,
    link: Arc<Mutex<Option<LinkHandle>>>,
    stop: Mutex<Option<CancellationToken>>,
    _thread: std::thread::JoinHandle<()>,
}

impl TestHost {
    /// Where a fake host in `dir` listens: `<dir>/v.sock_7075`.
    pub fn socket_path(dir: &Path) -> PathBuf {
        dir.join("v.sock_7075")
    }

    /// The endpoint an agent dials to reach a fake host in `dir`.
    pub fn endpoint(dir: &Path) -> String {
        format!("unix:{}", Self::socket_path(dir).display())
    }

    /// Starts a fake host listening in `dir`.
    pub fn start(dir: &Path) -> TestHost {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => panic!("fake host runtime: {e}"),
            };
            let _ = tx.send(rt.handle().clone());
            rt.block_on(std::future::pending::<()>());
        });
        let Ok(rt) = rx.recv() else {
            panic!("the fake host's runtime thread died");
        };
        let host = TestHost {
            dir: dir.to_path_buf(),
            state: Arc::new(Mutex::new(HostState {
                // Every store holds the zero block (as uve-host's do).
                chunks: HashMap::from([(ZERO_BLOCK.hash, vec![0; ZERO_BLOCK.len as usize])]),
                ..HostState::default()
            })),
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
        *lock(&self.stop) = Some(stop.clone());
        let state = self.state.clone();
        let slot = self.link.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        self.rt.spawn(async move {
            let listener = match bind_unix(&path) {
                Ok(l) => l,
                Err(e) => panic!("fake host bind {}: {e}", path.display()),
            };
            let _ = tx.send(());
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
        assert!(rx.recv().is_ok(), "the fake host did not start listening");
    }

    /// Stops listening and drops the connection without a goodbye.
    pub fn down(&self) {
        if let Some(s) = lock(&self.stop).take() {
            s.cancel();
        }
        if let Some(l) = lock(&self.link).take() {
            l.close();
        }
        poll::must("host socket removed", LONG, || {
            (!Self::socket_path(&self.dir).exists()).then_some(())
        });
    }

    /// Runs `f` on the state, locked.
    pub fn with<T>(&self, f: impl FnOnce(&mut HostState) -> T) -> T {
        f(&mut lock(&self.state))
    }

    /// The latest commit decided (panics if there is none yet).
    pub fn last_commit(&self) -> Commit {
        match self.with(|h| h.commits.last().cloned()) {
            Some(c) => c,
            None => panic!("the fake host decided no commit yet"),
        }
    }

    /// `user`'s head bytes, if the user has a head.
    pub fn head(&self, user: &str) -> Option<Vec<u8>> {
        self.with(|h| h.head_bytes(user))
    }

    /// Waits until `user`'s head holds exactly `bytes`; panics naming
    /// `what` after [`LONG`].
    pub fn wait_head(&self, what: &str, user: &str, bytes: &[u8]) {
        poll::must(what, LONG, || {
            (self.head(user).as_deref() == Some(bytes)).then_some(())
        });
    }

    /// Waits until a disconnect notice of `session` arrived; returns its
    /// (id, session, reason). Panics naming `what` after [`LONG`].
    pub fn wait_notice(&self, what: &str, session: &str) -> (u64, String, String) {
        poll::must(what, LONG, || {
            self.with(|h| h.notice_sessions.iter().find(|n| n.1 == session).cloned())
        })
    }

    /// Whether an agent is connected now.
    pub fn connected(&self) -> bool {
        lock(&self.link).as_ref().is_some_and(|l| !l.is_closed())
    }

    /// Sends a UVE-2 request to the connected agent (waiting for one).
    pub fn request(&self, req: Request) -> Result<Response, LinkError> {
        self.request_with(|_| req)
    }

    /// Sends a UVE-2 request whose names may be invalid (built with
    /// `build` through [`Names`]) to the connected agent.
    pub fn request_with(
        &self,
        build: impl FnOnce(&mut Names) -> Request + Send + 'static,
    ) -> Result<Response, LinkError> {
        let link = poll::must("agent connection", LONG, || {
            lock(&self.link).clone().filter(|l| !l.is_closed())
        });
        let (tx, rx) = std::sync::mpsc::channel();
        self.rt.spawn(async move {
            let sent = names::send(&link, build);
            let _ = tx.send(link::within(Duration::from_secs(60), sent).await);
        });
        match rx.recv() {
            Ok(r) => r,
            Err(_) => panic!("the fake host's request task died"),
        }
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        if let Some(s) = lock(&self.stop).take() {
            s.cancel();
        }
    }
}

/// What the fake host offers in its handshake.
fn offer() -> HostOffer {
    HostOffer {
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
    }
}

/// Handshakes an accepted connection (capped at the state's
/// `protocol_max`) and starts its link.
async fn accept(
    s: tokio::net::UnixStream,
    state: &Mutex<HostState>,
) -> Option<(LinkHandle, tokio::sync::mpsc::Receiver<Incoming>)> {
    let (r, w) = s.into_split();
    let mut reader = FramedRead::new(r, FrameCodec::default());
    let mut writer = FramedWrite::new(w, FrameCodec::default());
    let limit = Duration::from_secs(5);
    let hello = handshake::read_hello(&mut reader, limit).await.ok()?;
    let cap = lock(state).protocol_max;
    let verdict = handshake::negotiate(&hello, &offer()).map(|mut w| {
        if let Some(max) = cap {
            w.protocol = w.protocol.min(max);
        }
        w
    });
    let welcome = handshake::answer(&mut reader, &mut writer, verdict, limit)
        .await
        .ok()?;
    let (link, incoming) = link::spawn(
        reader,
        writer.into_inner(),
        LinkConfig::new(
            Duration::from_millis(u64::from(HEARTBEAT_MS)),
            welcome.max_frame,
        ),
    );
    let mut st = lock(state);
    st.connections += 1;
    st.max_frame = welcome.max_frame;
    st.protocol = welcome.protocol;
    Some((link, incoming))
}

/// Whether the connection is to be dropped at `request` instead of
/// answering it (the `drop_on_*` and `drop_after_fetches` faults).
fn drop_before(st: &mut HostState, request: &Request) -> bool {
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
}

/// Whether the answer to `request` is to be lost (`drop_after_notice`).
fn lose_answer(st: &mut HostState, request: &Request) -> bool {
    let hit = st.drop_after_notice && matches!(request, Request::UnexpectedDisconnect(_));
    if hit {
        st.drop_after_notice = false;
    }
    hit
}

async fn serve_conn(
    s: tokio::net::UnixStream,
    state: Arc<Mutex<HostState>>,
    slot: Arc<Mutex<Option<LinkHandle>>>,
    stop: CancellationToken,
) {
    let Some((link, mut incoming)) = accept(s, &state).await else {
        return;
    };
    if let Some(old) = lock(&slot).replace(link.clone()) {
        old.close();
    }
    loop {
        tokio::select! {
            () = stop.cancelled() => { link.close(); break }
            item = incoming.recv() => {
                let Some(Incoming { request, responder }) = item else { break };
                if drop_before(&mut lock(&state), &request) {
                    std::mem::forget(responder);
                    link.close();
                    break;
                }
                let lose_ack = lose_answer(&mut lock(&state), &request);
                let answer = handle::handle(&state, request);
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
