//! A fake **agent** protocol peer for the host's integration tests, the
//! benchmarks and the rogue guest's probes: dials a real `uve-host` (a VM's
//! Unix or hybrid-vsock path; from inside a guest, vsock),
//! handshakes, answers UVE-2 requests from an in-memory state (UA bundles,
//! suspended sessions, monitor grants, release by flush or by silence) and
//! drives UVE-5 flows against the host ([`retrieve`], [`update`],
//! [`begin_and_list`], [`update_with_deltas`]).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite};
use uve_protocol::codec::FrameCodec;
use uve_protocol::defs::{DEFAULT_MAX_FRAME, PROTOCOL_MAX, PROTOCOL_MIN};
use uve_protocol::handshake;
use uve_protocol::link::{self, Incoming, LinkConfig, LinkError, LinkHandle};
use uve_protocol::message::{Hello, Request, Response, RetrieveGrant, Version, Welcome};
use uve_protocol::names::{SessionId, UaName, UaVersion, UserName};
use uve_protocol::transport::{BoxStream, Endpoint, dial};

mod serve;
mod update;

pub use update::{
    DeltaUpdated, Listed, Updated, begin_and_list, manifest_of, retrieve, update,
    update_with_deltas,
};

/// Locks `m`, also after a panic elsewhere (the state stays inspectable).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
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
    /// How to answer a `UserRelease` of each user (default: never).
    pub release: HashMap<String, ReleaseMode>,
    /// user → (base, lease) from the last retrieve.
    pub leases: HashMap<String, (Option<Version>, u64)>,
    /// UA name → (current version, previous version).
    pub uas: HashMap<UaName, (UaVersion, Option<UaVersion>)>,
    /// `name/version` → the bundle bytes committed.
    pub bundles: HashMap<String, Vec<u8>>,
    /// Bundle transfers in progress.
    pub transfers: HashMap<u64, (uve_protocol::message::UaBundle, Vec<u8>)>,
    /// Suspended sessions.
    pub suspended: Vec<SessionId>,
    /// (session, monitor, expires) of the live monitor grants.
    pub monitors: Vec<(SessionId, UserName, u64)>,
    /// Every UVE-2 request received, its debug form clipped to 80 chars.
    pub requests: Vec<String>,
    /// Kept so an ignored request is never answered.
    pub parked: Vec<link::Responder>,
}

/// A link dialed and handshaken as an agent, its requests not yet served.
pub struct AgentLink {
    /// The link.
    pub handle: LinkHandle,
    /// What the host answered in the handshake.
    pub welcome: Welcome,
    /// The host's UVE-2 requests.
    pub incoming: mpsc::Receiver<Incoming>,
}

/// The `Hello` of a fake agent named `agent_version` speaking protocol
/// versions up to `protocol_max`.
pub fn hello(agent_version: &str, protocol_max: u16, boot_id: [u8; 16]) -> Hello {
    Hello {
        protocol_min: PROTOCOL_MIN,
        protocol_max,
        agent_version: agent_version.into(),
        boot_id,
        capabilities: 0,
        max_frame: DEFAULT_MAX_FRAME,
    }
}

/// The frames of a connection handshaken as an agent.
pub type Handshaken = (
    FramedRead<ReadHalf<BoxStream>, FrameCodec>,
    FramedWrite<WriteHalf<BoxStream>, FrameCodec>,
    Welcome,
);

/// Dials the Unix socket `path` and handshakes with `hello` (each step
/// within `limit`); the link is not started.
pub async fn dial_and_handshake(
    path: &Path,
    hello: Hello,
    limit: Duration,
) -> Result<Handshaken, String> {
    handshake_at(&Endpoint::Unix(path.to_path_buf()), hello, limit).await
}

/// Dials `endpoint` (a Unix socket on this machine; vsock only inside a
/// guest) and handshakes with `hello`, each step within `limit`; the link
/// is not started. The error says which step failed.
pub async fn handshake_at(
    endpoint: &Endpoint,
    hello: Hello,
    limit: Duration,
) -> Result<Handshaken, String> {
    let stream = dial(endpoint, limit)
        .await
        .map_err(|e| format!("dial: {e}"))?;
    let (r, w) = tokio::io::split(stream);
    let mut reader = FramedRead::new(r, FrameCodec::new(DEFAULT_MAX_FRAME));
    let mut writer = FramedWrite::new(w, FrameCodec::new(DEFAULT_MAX_FRAME));
    let welcome = handshake::client(&mut reader, &mut writer, hello, limit)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    Ok((reader, writer, welcome))
}

/// Starts the link of a handshaken connection, with the heartbeat and
/// frame limit the host offered.
pub fn start_link((reader, writer, welcome): Handshaken) -> AgentLink {
    let cfg = LinkConfig::new(
        Duration::from_millis(u64::from(welcome.heartbeat_ms)),
        welcome.max_frame,
    );
    let (handle, incoming) = link::spawn(reader, writer.into_inner(), cfg);
    AgentLink {
        handle,
        welcome,
        incoming,
    }
}

/// Dials the Unix socket `path`, handshakes with `hello` (each step within
/// `limit`) and starts the link.
pub async fn dial_as_agent(
    path: &Path,
    hello: Hello,
    limit: Duration,
) -> Result<AgentLink, String> {
    Ok(start_link(dial_and_handshake(path, hello, limit).await?))
}

/// A test agent connected to the host.
pub struct TestAgent {
    /// The link.
    pub handle: LinkHandle,
    /// What the host answered in the handshake.
    pub welcome: Welcome,
    /// What it has seen and holds.
    pub state: Arc<Mutex<AgentState>>,
}

impl TestAgent {
    /// Dials `path`, handshakes and starts the UVE-2 responder.
    pub async fn connect(path: &Path) -> Result<Self, String> {
        Self::connect_speaking(path, PROTOCOL_MAX).await
    }

    /// Like [`connect`](Self::connect), for an agent that speaks protocol
    /// versions up to `protocol_max` only (an old agent).
    pub async fn connect_speaking(path: &Path, protocol_max: u16) -> Result<Self, String> {
        let hello = hello("test-agent", protocol_max, [7; 16]);
        let link = dial_as_agent(path, hello, Duration::from_secs(5)).await?;
        let state = Arc::new(Mutex::new(AgentState::default()));
        tokio::spawn(serve::serve_uve2(
            link.handle.clone(),
            state.clone(),
            link.incoming,
        ));
        Ok(TestAgent {
            handle: link.handle,
            welcome: link.welcome,
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
                Err(_) => tokio::time::sleep(crate::poll::INTERVAL).await,
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
        let listed = begin_and_list(&self.handle, user, session, base, lease, data).await?;
        update(&self.handle, listed).await
    }

    /// Update based on what the last retrieve of `user` granted.
    pub async fn update_from_lease(&self, user: &str, data: &[u8]) -> Result<Updated, LinkError> {
        let (base, lease) = lock(&self.state)
            .leases
            .get(user)
            .copied()
            .unwrap_or((None, 0));
        let r = self.update(user, "s1", base, lease, data).await?;
        if let Response::Committed { version } = r.answer {
            lock(&self.state)
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
