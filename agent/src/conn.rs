//! The connection to the host: dial, handshake, start the link, publish it
//! to the rest of the agent, wait for it to end, redial with jittered
//! exponential backoff (100 ms → 10 s) — forever, until shutdown. The
//! connection loop knows nothing of sessions or UIFs: incoming requests go
//! to [`crate::dispatch`], and domain code picks up the current
//! [`LinkHandle`] from [`Conn`].

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use uve_protocol::FrameCodec;
use uve_protocol::defs::{DEFAULT_MAX_FRAME, PROTOCOL_MAX, PROTOCOL_MIN};
use uve_protocol::handshake::{self, HandshakeError};
use uve_protocol::link::{self, Incoming, LinkConfig, LinkError, LinkHandle};
use uve_protocol::message::{
    CAP_MONITOR, CAP_SUPERVISE, CAP_SUSPEND, CAP_UA_MANAGEMENT, CAP_UIF_DIRECTORY, CAP_UIF_FILE,
    Hello, Request, Response, Welcome,
};
use uve_protocol::transport::{self, Endpoint, TransportError};

use crate::agent::Agent;

/// Time limit of every dial and handshake step.
const STEP_LIMIT: Duration = Duration::from_secs(10);
/// First and largest reconnect delay.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// The agent's handle for requests to the host: the link plus a
/// semaphore that keeps at most `Welcome.limits.max_inflight` of our
/// requests open at once (WIRE.md §3), however many tasks send.
#[derive(Clone)]
pub struct HostLink {
    link: LinkHandle,
    permits: Arc<tokio::sync::Semaphore>,
    protocol: u16,
}

impl HostLink {
    fn new(link: LinkHandle, max_inflight: u32, protocol: u16) -> HostLink {
        let n = usize::try_from(max_inflight).unwrap_or(1).clamp(1, 1024);
        HostLink {
            link,
            permits: Arc::new(tokio::sync::Semaphore::new(n)),
            protocol,
        }
    }

    /// The protocol version negotiated with the host: requests introduced
    /// after it must not be sent.
    pub fn protocol(&self) -> u16 {
        self.protocol
    }

    /// Sends a request and waits for the answer (see [`LinkHandle::request`]).
    pub async fn request(&self, body: Request) -> Result<Response, LinkError> {
        let _permit = self.permits.acquire().await;
        self.link.request(body).await
    }

    /// Like [`request`](Self::request), bounded in time (queueing included).
    pub async fn request_timeout(
        &self,
        body: Request,
        limit: Duration,
    ) -> Result<Response, LinkError> {
        tokio::time::timeout(limit, self.request(body))
            .await
            .map_err(|_| LinkError::Timeout(limit))?
    }

    /// True once the link has ended.
    pub fn is_closed(&self) -> bool {
        self.link.is_closed()
    }

    /// The negotiated frame limit.
    pub fn max_frame(&self) -> u32 {
        self.link.max_frame()
    }
}

/// A live, handshaken connection.
#[derive(Clone)]
pub struct Connected {
    /// Handle for requests to the host.
    pub link: HostLink,
    /// What the host said in `Welcome`.
    pub welcome: Welcome,
    /// Increases with every new connection.
    pub generation: u64,
}

/// Why one connection attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// Dialling failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The handshake failed.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
}

/// The agent's view of its connection.
pub struct Conn {
    tx: watch::Sender<Option<Connected>>,
}

impl Default for Conn {
    fn default() -> Self {
        Conn {
            tx: watch::channel(None).0,
        }
    }
}

impl Conn {
    /// The current connection, if any and still alive.
    pub fn current(&self) -> Option<Connected> {
        self.tx.borrow().clone().filter(|c| !c.link.is_closed())
    }

    /// Waits up to `limit` for a connection.
    pub async fn wait(&self, limit: Duration) -> Option<Connected> {
        let mut rx = self.tx.subscribe();
        let wait = async {
            loop {
                if let Some(c) = rx
                    .borrow_and_update()
                    .clone()
                    .filter(|c| !c.link.is_closed())
                {
                    return Some(c);
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        };
        tokio::time::timeout(limit, wait).await.ok().flatten()
    }

    /// Notified on every connect and disconnect.
    pub fn subscribe(&self) -> watch::Receiver<Option<Connected>> {
        self.tx.subscribe()
    }

    fn publish(&self, c: Option<Connected>) {
        self.tx.send_replace(c);
    }
}

/// The `Hello` this agent sends.
fn hello(boot_id: [u8; 16]) -> Hello {
    Hello {
        protocol_min: PROTOCOL_MIN,
        protocol_max: PROTOCOL_MAX,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        boot_id,
        capabilities: CAP_UIF_FILE
            | CAP_UIF_DIRECTORY
            | CAP_UA_MANAGEMENT
            | CAP_SUPERVISE
            | CAP_SUSPEND
            | CAP_MONITOR,
        max_frame: DEFAULT_MAX_FRAME,
    }
}

/// Dials `endpoint` once and completes the handshake.
pub async fn connect_once(
    endpoint: &Endpoint,
    boot_id: [u8; 16],
) -> Result<(LinkHandle, tokio::sync::mpsc::Receiver<Incoming>, Welcome), ConnError> {
    let stream = transport::dial(endpoint, STEP_LIMIT).await?;
    let (r, w) = tokio::io::split(stream);
    let mut reader = FramedRead::new(r, FrameCodec::default());
    let mut writer = FramedWrite::new(w, FrameCodec::default());
    let welcome = handshake::client(&mut reader, &mut writer, hello(boot_id), STEP_LIMIT).await?;
    let heartbeat = Duration::from_millis(u64::from(welcome.heartbeat_ms.max(100)));
    let (handle, incoming) = link::spawn(
        reader,
        writer.into_inner(),
        LinkConfig::new(heartbeat, welcome.max_frame),
    );
    Ok((handle, incoming, welcome))
}

/// Keeps the agent connected until `stop` is cancelled; then says goodbye.
pub async fn run(agent: Arc<Agent>, stop: CancellationToken) {
    let mut backoff = BACKOFF_MIN;
    let mut generation = 0u64;
    let mut failures = 0u32;
    while !stop.is_cancelled() {
        let endpoint = match agent.config().endpoint() {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("{e}");
                break;
            }
        };
        match connect_once(&endpoint, agent.boot_id).await {
            Ok((link, incoming, welcome)) => {
                generation += 1;
                failures = 0;
                backoff = BACKOFF_MIN;
                tracing::info!(
                    %endpoint, vm = %welcome.vm_id, protocol = welcome.protocol,
                    "connected to host"
                );
                tokio::spawn(crate::dispatch::serve(agent.clone(), incoming));
                agent.conn.publish(Some(Connected {
                    link: HostLink::new(
                        link.clone(),
                        welcome.limits.max_inflight,
                        welcome.protocol,
                    ),
                    welcome,
                    generation,
                }));
                tokio::select! {
                    end = link.closed() => tracing::warn!("connection to host ended: {end}"),
                    () = stop.cancelled() => {
                        link.goodbye("agent shutting down").await;
                    }
                }
                agent.conn.publish(None);
            }
            Err(e) => {
                failures += 1;
                if failures <= 3 || failures.is_power_of_two() {
                    tracing::warn!(%endpoint, failures, "cannot connect to host: {e}");
                }
            }
        }
        let delay = jitter(backoff);
        backoff = (backoff * 2).min(BACKOFF_MAX);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stop.cancelled() => {}
        }
    }
    agent.conn.publish(None);
}

/// `d` scaled by a random factor in [0.5, 1.0].
fn jitter(d: Duration) -> Duration {
    let r = crate::fsutil::random_u64() % 1000;
    d.mul_f64(0.5 + (r as f64) / 2000.0)
}
