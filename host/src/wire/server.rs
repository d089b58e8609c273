//! Agent connections: accept loops per listener, the handshake, binding a
//! connection to the VM the *listener* names (peer CID or the socket path
//! it arrived on — never anything in `Hello`), starting the link and its
//! dispatcher, and reporting how the connection ended.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use uve_protocol::codec::FrameCodec;
use uve_protocol::defs::{DEFAULT_MAX_FRAME, MAX_CHUNK};
use uve_protocol::handshake::{HostOffer, answer, negotiate, read_hello};
use uve_protocol::link::{self, LinkEnd};
use uve_protocol::message::{ErrorCode, Hello, Limits, Reject, Welcome};
use uve_protocol::transport::{BoxStream, Endpoint, Listener, Peer};

use crate::budgets::gate::{Full, HandshakeTicket};
use crate::budgets::report::Budget;
use crate::host::Host;
use crate::state::conns::{ConnEntry, ConnSummary};
use crate::state::events::{DisconnectSource, Event};
use crate::state::metrics;
use crate::state::metrics::add;
use crate::state::registry::VmSpec;
use crate::store::now_ms;
use crate::wire::dispatch;
use crate::wire::uve5::VmConnection;

/// Accept loops of per-VM listeners, by VM id.
#[derive(Default)]
pub struct VmListeners {
    tasks: Mutex<HashMap<String, CancellationToken>>,
}

/// Which VM a listener serves.
#[derive(Clone)]
enum Binding {
    /// A per-VM Unix or hybrid-vsock socket.
    Vm(String),
    /// The shared AF_VSOCK listener: the peer CID names the VM.
    ByCid,
}

impl VmListeners {
    /// Starts listening for `spec`'s agent (Unix / hybrid VMs only; vsock
    /// VMs arrive on the shared vsock listener).
    pub fn start(&self, host: &Arc<Host>, spec: &VmSpec) -> anyhow::Result<Option<PathBuf>> {
        let Some(path) = spec.listen_path(host.config().port) else {
            return Ok(None);
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let listener = Listener::bind(&Endpoint::Unix(path.clone()))?;
        let token = host.shutdown().child_token();
        if let Some(old) = self
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(spec.id.clone(), token.clone())
        {
            old.cancel();
        }
        tracing::info!(vm = spec.id, path = %path.display(), "listening for agent");
        tokio::spawn(accept_loop(
            host.clone(),
            listener,
            Binding::Vm(spec.id.clone()),
            token,
        ));
        Ok(Some(path))
    }

    /// Stops `vm`'s listener (its socket file is removed).
    pub fn stop(&self, vm: &str) {
        if let Some(t) = self
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(vm)
        {
            t.cancel();
        }
    }
}

/// Starts the shared AF_VSOCK listener (only when configured).
pub fn start_vsock(host: &Arc<Host>) -> anyhow::Result<()> {
    let ep = Endpoint::Vsock {
        cid: uve_protocol::transport::CID_ANY,
        port: host.config().port,
    };
    let listener = Listener::bind(&ep)?;
    tracing::info!(%ep, "listening on AF_VSOCK");
    tokio::spawn(accept_loop(
        host.clone(),
        listener,
        Binding::ByCid,
        host.shutdown().child_token(),
    ));
    Ok(())
}

async fn accept_loop(
    host: Arc<Host>,
    listener: Listener,
    binding: Binding,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let vm = match (&binding, &peer) {
                    (Binding::Vm(id), _) => Some(id.clone()),
                    (Binding::ByCid, Peer::Vsock { cid }) => host.registry().vm_by_cid(*cid),
                    (Binding::ByCid, Peer::Unix { .. }) => None,
                };
                // A peer no VM is registered for (an unregistered CID) is
                // closed before it costs a handshake place or a read.
                let Some(vm) = vm else {
                    add(&host.metrics().unknown_peers_refused, 1);
                    tracing::debug!(
                        ?peer,
                        "no VM registered for this peer; connection closed unread"
                    );
                    continue;
                };
                if let Some((accepted, setup)) = admit(&host, vm, peer).await {
                    tokio::spawn(serve(host.clone(), stream, accepted, setup));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
    drop(listener);
}

/// Serves `stream` as a connection that arrived on `vm`'s own listener,
/// from the handshake to its end, as the accept loop serves each
/// connection it takes: a peer in this process (a test or fuzz harness
/// holding the other end of a pipe) goes through the same admission,
/// handshake, link, dispatcher and end-of-connection records as a guest.
/// Returns once the connection has ended; `false` if it was closed at
/// admission (every handshake place of the VM taken).
pub async fn serve_connection(host: Arc<Host>, vm: String, stream: BoxStream, peer: Peer) -> bool {
    let Some((accepted, setup)) = admit(&host, vm, peer).await else {
        return false;
    };
    serve(host, stream, accepted, setup).await;
    true
}

/// Takes a handshake place for a connection of `vm` and numbers it;
/// `None`, counted in `uve_handshakes_refused_total`, if every place is
/// taken.
async fn admit(
    host: &Arc<Host>,
    vm: String,
    peer: Peer,
) -> Option<(Accepted, tokio::sync::OwnedRwLockReadGuard<()>)> {
    let ticket = match host.handshakes().admit(&vm) {
        Ok(t) => t,
        Err(full) => {
            let (budget, limit) = match full {
                Full::Vm(n) => (Budget::MaxHandshakesPerVm, n),
                Full::Total(n) => (Budget::MaxHandshakes, n),
            };
            host.refused(budget, &vm, None, limit as u64);
            tracing::debug!(?peer, vm, "handshake places taken; connection closed");
            return None;
        }
    };
    // Numbered in accept order: the latest connection of a VM wins.
    let conn_id = host.conns().next_id();
    let setup = host.setup().clone().read_owned().await;
    Some((
        Accepted {
            vm,
            peer,
            conn_id,
            ticket,
        },
        setup,
    ))
}

/// A connection just accepted: whose it is, and its handshake place.
struct Accepted {
    vm: String,
    peer: Peer,
    conn_id: u64,
    ticket: HandshakeTicket,
}

/// Frames of a connection in its handshake.
type Framed = (
    FramedRead<tokio::io::ReadHalf<BoxStream>, FrameCodec>,
    FramedWrite<tokio::io::WriteHalf<BoxStream>, FrameCodec>,
);

/// Reads `Hello` and answers it: `Welcome` for a registered VM, `Reject`
/// otherwise. `None` if the connection ends here.
async fn handshake(
    host: &Host,
    stream: BoxStream,
    vm: &str,
    peer: &Peer,
) -> Option<(Framed, Hello, Welcome)> {
    let (r, w) = tokio::io::split(stream);
    let mut reader = FramedRead::new(r, FrameCodec::new(DEFAULT_MAX_FRAME));
    let mut writer = FramedWrite::new(w, FrameCodec::new(DEFAULT_MAX_FRAME));
    let limit = Host::ms(host.config().handshake_timeout_ms);
    let hello = match read_hello(&mut reader, limit).await {
        Ok(h) => h,
        Err(e) => {
            tracing::info!(?peer, error = %e, "handshake failed");
            return None;
        }
    };
    let verdict = if host.shutdown().is_cancelled() {
        Err(Reject {
            code: ErrorCode::ShuttingDown,
            reason: "host is shutting down".into(),
        })
    } else {
        negotiate(&hello, &offer(host, vm))
    };
    match answer(&mut reader, &mut writer, verdict, limit).await {
        Ok(welcome) => Some(((reader, writer), hello, welcome)),
        Err(e) => {
            tracing::info!(?peer, error = %e, "agent refused");
            None
        }
    }
}

/// One connection from handshake to end.
async fn serve(
    host: Arc<Host>,
    stream: BoxStream,
    accepted: Accepted,
    setup: tokio::sync::OwnedRwLockReadGuard<()>,
) {
    let Accepted {
        vm,
        peer,
        conn_id,
        ticket,
    } = accepted;
    let Some(((reader, writer), hello, welcome)) = handshake(&host, stream, &vm, &peer).await
    else {
        return;
    };
    drop(ticket);
    let config = host
        .config()
        .link_config(welcome.heartbeat_ms, welcome.max_frame);
    let stats = host.metrics().link.clone();
    let (handle, incoming) = link::spawn_counted(reader, writer.into_inner(), config, stats);
    let summary = summary(conn_id, &hello, welcome.protocol);
    let installed = host.conns().install(
        &vm,
        ConnEntry {
            summary: summary.clone(),
            handle: handle.clone(),
        },
    );
    drop(setup);
    if !installed {
        return;
    }
    if host.shutdown().is_cancelled() {
        handle.goodbye("host shutting down").await;
    }
    add(&host.metrics().connections_total, 1);
    add(&host.metrics().connections, 1);
    host.emit(Event::VmConnected {
        vm: vm.clone(),
        conn_id,
        agent_version: summary.agent_version.clone(),
    });
    let conn = Arc::new(VmConnection::new(
        host.clone(),
        vm.clone(),
        conn_id,
        welcome.max_frame,
        welcome.protocol,
    ));
    let dispatcher = tokio::spawn(dispatch::run(conn, incoming));
    let end = handle.closed().await;
    dispatcher.abort();
    match &end {
        LinkEnd::WriteStalled(d) => {
            let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
            host.refused(Budget::WriteDeadline, &vm, None, ms);
            tracing::warn!(vm, conn_id, %end, "VM cut off");
        }
        LinkEnd::Oversize(_) => {
            let max = u64::from(welcome.max_frame);
            host.refused(Budget::MaxFrame, &vm, None, max);
            tracing::warn!(vm, conn_id, %end, "VM cut off");
        }
        _ => {}
    }
    host.metrics()
        .connections
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    if !host.conns().remove_if(&vm, conn_id) {
        tracing::info!(vm, conn_id, %end, "replaced connection ended");
        return;
    }
    ended(&host, vm, conn_id, &end);
}

/// What the API shows of a new connection.
fn summary(conn_id: u64, hello: &Hello, protocol: u16) -> ConnSummary {
    ConnSummary {
        conn_id,
        agent_version: hello.agent_version.chars().take(128).collect(),
        capabilities: hello.capabilities,
        boot_id: hello.boot_id.iter().map(|b| format!("{b:02x}")).collect(),
        protocol,
        connected_ms: now_ms(),
    }
}

/// Records the end of a VM's current connection: `vm_disconnected` if it
/// was orderly, else an `unexpected_disconnect` for each session it had
/// open and `vm_lost`.
fn ended(host: &Host, vm: String, conn_id: u64, end: &LinkEnd) {
    let sessions = host.sessions().drain_vm(&vm, !end.is_orderly());
    if end.is_orderly() {
        host.emit(Event::VmDisconnected {
            vm,
            conn_id,
            reason: end.to_string(),
        });
        return;
    }
    for s in sessions {
        metrics::add(&host.metrics().unexpected_disconnects, 1);
        host.emit(Event::UnexpectedDisconnect {
            vm: vm.clone(),
            session: s.session,
            user: s.user,
            ua: s.ua,
            reason: format!("connection lost: {end}"),
            at: now_ms(),
            id: None,
            source: DisconnectSource::Host,
        });
    }
    host.emit(Event::VmLost {
        vm,
        conn_id,
        reason: end.to_string(),
    });
}

fn offer(host: &Host, vm: &str) -> HostOffer {
    let c = &host.config();
    HostOffer {
        host_version: env!("CARGO_PKG_VERSION").to_string(),
        vm_id: vm.to_string(),
        heartbeat_ms: c.heartbeat_ms,
        max_frame: c.max_frame,
        limits: Limits {
            max_inflight: c.max_inflight,
            max_uif_size: c.max_uif_size.min(c.user_quota_bytes.unwrap_or(u64::MAX)),
            max_chunk: MAX_CHUNK,
        },
    }
}
