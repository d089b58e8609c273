//! The agent's link to the host, as the rest of the agent sees it: a
//! cloneable [`HostLink`] for requests (bounded by the host's in-flight
//! limit), the [`Connected`] state of the current connection, and the
//! [`LinkWatch`] that publishes it. Depends only on the protocol: dialling
//! lives in `conn`, what the link carries in the layers above.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use uve_protocol::link::{LinkError, LinkHandle};
use uve_protocol::message::{Request, Response, Welcome};

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
    /// Wraps a started link with the host's in-flight limit.
    pub fn new(link: LinkHandle, max_inflight: u32, protocol: u16) -> HostLink {
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
        uve_protocol::link::within(limit, self.request(body)).await
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

/// The agent's view of its connection: the current one, if any, and a
/// watch that changes at every connect and disconnect.
pub struct LinkWatch {
    tx: watch::Sender<Option<Connected>>,
}

impl Default for LinkWatch {
    fn default() -> Self {
        LinkWatch {
            tx: watch::channel(None).0,
        }
    }
}

impl LinkWatch {
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

    /// Publishes a new connection, or none.
    pub fn publish(&self, c: Option<Connected>) {
        self.tx.send_replace(c);
    }
}

/// A host to test against: a real link over an in-memory stream whose far
/// end answers every request with a function of it.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio_util::codec::FramedRead;
    use uve_protocol::FrameCodec;
    use uve_protocol::defs::{DEFAULT_MAX_FRAME, PROTOCOL_MAX};
    use uve_protocol::link::{self, Incoming, LinkConfig};
    use uve_protocol::message::{Limits, Request, Response, Welcome};

    use super::{Connected, HostLink};

    /// A connection whose host answers `request` with `answer(request)`.
    pub fn fake_host(answer: impl Fn(Request) -> Response + Send + Sync + 'static) -> Connected {
        let (a, b) = tokio::io::duplex(4 << 20);
        let config = || LinkConfig::new(Duration::from_secs(30), DEFAULT_MAX_FRAME);
        let (ar, aw) = tokio::io::split(a);
        let (agent, agent_incoming) =
            link::spawn(FramedRead::new(ar, FrameCodec::default()), aw, config());
        let (br, bw) = tokio::io::split(b);
        let (host, mut incoming) =
            link::spawn(FramedRead::new(br, FrameCodec::default()), bw, config());
        let answer = Arc::new(answer);
        tokio::spawn(async move {
            let _keep = (host, agent_incoming);
            while let Some(Incoming { request, responder }) = incoming.recv().await {
                let _ = responder.send(answer(request)).await;
            }
        });
        let welcome = Welcome {
            protocol: PROTOCOL_MAX,
            host_version: "fake".into(),
            vm_id: "vm-test".into(),
            heartbeat_ms: 30_000,
            max_frame: DEFAULT_MAX_FRAME,
            limits: Limits {
                max_inflight: 32,
                max_uif_size: 1 << 34,
                max_chunk: uve_protocol::defs::MAX_CHUNK,
            },
        };
        Connected {
            link: HostLink::new(agent, 32, PROTOCOL_MAX),
            welcome,
            generation: 1,
        }
    }
}
