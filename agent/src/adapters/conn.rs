//! The connection to the host: dial, handshake, start the link, publish it
//! on the [`LinkWatch`], wait for it to end, redial with jittered
//! exponential backoff (100 ms → 10 s) — forever, until shutdown. The
//! connection loop knows nothing of sessions or UIFs: each connection's
//! incoming requests are handed over a channel to whoever serves them (the
//! dispatcher), and domain code picks up the current [`HostLink`] from the
//! watch.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use uve_protocol::FrameCodec;
use uve_protocol::defs::{DEFAULT_MAX_FRAME, PROTOCOL_MAX, PROTOCOL_MIN};
use uve_protocol::handshake::{self, HandshakeError};
use uve_protocol::link::{self, Incoming, LinkConfig, LinkHandle};
use uve_protocol::message::{
    CAP_MONITOR, CAP_SUPERVISE, CAP_SUSPEND, CAP_UA_MANAGEMENT, CAP_UIF_DIRECTORY, CAP_UIF_FILE,
    Hello, Welcome,
};
use uve_protocol::transport::{self, Endpoint, TransportError};

use crate::config::SharedConfig;
use crate::link::{Connected, HostLink, LinkWatch};

/// Time limit of every dial and handshake step.
const STEP_LIMIT: Duration = Duration::from_secs(10);
/// First and largest reconnect delay.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

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
/// Each connection's incoming requests go to `serve`.
pub async fn run(
    config: &SharedConfig,
    boot_id: [u8; 16],
    watch: &LinkWatch,
    serve: mpsc::Sender<mpsc::Receiver<Incoming>>,
    stop: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    let mut generation = 0u64;
    let mut failures = 0u32;
    while !stop.is_cancelled() {
        let endpoint = match config.get().endpoint() {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("{e}");
                break;
            }
        };
        match connect_once(&endpoint, boot_id).await {
            Ok((link, incoming, welcome)) => {
                generation += 1;
                failures = 0;
                backoff = BACKOFF_MIN;
                tracing::info!(
                    %endpoint, vm = %welcome.vm_id, protocol = welcome.protocol,
                    "connected to host"
                );
                if serve.send(incoming).await.is_err() {
                    break;
                }
                watch.publish(Some(Connected {
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
                watch.publish(None);
            }
            Err(e) => {
                failures += 1;
                if failures <= 3 || failures.is_power_of_two() {
                    let hint = match e {
                        ConnError::Handshake(HandshakeError::Closed) => {
                            " (a host closes the connections of peers it has no VM registered for: is this VM's vsock CID registered?)"
                        }
                        _ => "",
                    };
                    tracing::warn!(%endpoint, failures, "cannot connect to host: {e}{hint}");
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
    watch.publish(None);
}

/// `d` scaled by a random factor in [0.5, 1.0].
fn jitter(d: Duration) -> Duration {
    let r = crate::base::fsutil::random_u64() % 1000;
    d.mul_f64(0.5 + (r as f64) / 2000.0)
}
