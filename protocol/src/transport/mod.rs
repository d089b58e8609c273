//! Transports: how a byte stream between agent and host comes to exist.
//!
//! One small surface for three kinds of socket:
//!
//! - **AF_VSOCK** (`vsock:<cid>:<port>`): QEMU/libvirt with vhost-vsock. The
//!   host learns the guest's CID from `accept`, and the hypervisor makes it
//!   unforgeable.
//! - **hybrid vsock** (Firecracker, Cloud Hypervisor, vhost-device-vsock):
//!   a guest connection to port P arrives on the host Unix socket
//!   `<uds_path>_<P>` (see [`hybrid::listen_path`]); a host connection to a
//!   guest goes through `<uds_path>` with a `CONNECT <port>` line
//!   ([`hybrid::connect`]).
//! - **Unix** (`unix:<path>`): plain Unix sockets for tests and local tools.
//!
//! [`Listener`] accepts connections and says which socket they came
//! through ([`Peer`]); the host maps that to a VM. [`dial`] opens a
//! connection to an [`Endpoint`].

pub mod hybrid;
mod unix;
mod vsock;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

pub use unix::bind_unix;

/// Any bidirectional byte stream a transport produces.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// A boxed connection of any transport.
pub type BoxStream = Box<dyn Stream>;

/// `VMADDR_CID_ANY`: bind on every CID.
pub const CID_ANY: u32 = u32::MAX;

/// Why a transport operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The address string is malformed.
    #[error("bad address {addr:?}: {why}")]
    BadAddress {
        /// The string given.
        addr: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A step did not complete in time.
    #[error("{step} timed out after {limit:?}")]
    Timeout {
        /// Which step.
        step: &'static str,
        /// The limit.
        limit: Duration,
    },
    /// The hybrid-vsock muxer refused the `CONNECT` (no guest listener).
    #[error("hybrid vsock CONNECT refused: {0}")]
    Refused(String),
    /// Socket error.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl TransportError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        TransportError::Io {
            context: context.into(),
            source,
        }
    }
}

/// An address to dial or listen on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// Kernel AF_VSOCK: `vsock:<cid>:<port>` (`cid` may be `host` = 2 or `any`).
    Vsock {
        /// Context id.
        cid: u32,
        /// Port.
        port: u32,
    },
    /// Plain Unix socket: `unix:<path>`.
    Unix(PathBuf),
    /// Host-initiated hybrid vsock: `hybrid:<uds_path>:<port>` — connect to
    /// the VMM's socket and ask for guest port `port`.
    Hybrid {
        /// The VMM's hybrid-vsock socket.
        uds_path: PathBuf,
        /// The guest port.
        port: u32,
    },
}

impl FromStr for Endpoint {
    type Err = TransportError;

    fn from_str(s: &str) -> Result<Self, TransportError> {
        let bad = |why| TransportError::BadAddress {
            addr: s.to_string(),
            why,
        };
        let (scheme, rest) = s
            .split_once(':')
            .ok_or_else(|| bad("expected <scheme>:<address>"))?;
        match scheme {
            "vsock" => {
                let (cid, port) = rest
                    .split_once(':')
                    .ok_or_else(|| bad("expected vsock:<cid>:<port>"))?;
                let cid = match cid {
                    "any" => CID_ANY,
                    "host" => crate::defs::HOST_CID,
                    n => n
                        .parse()
                        .map_err(|_| bad("cid is not a number, `host` or `any`"))?,
                };
                let port = port.parse().map_err(|_| bad("port is not a number"))?;
                Ok(Endpoint::Vsock { cid, port })
            }
            "unix" if !rest.is_empty() => Ok(Endpoint::Unix(PathBuf::from(rest))),
            "unix" => Err(bad("empty path")),
            "hybrid" => {
                let (path, port) = rest
                    .rsplit_once(':')
                    .ok_or_else(|| bad("expected hybrid:<uds_path>:<port>"))?;
                if path.is_empty() {
                    return Err(bad("empty path"));
                }
                let port = port.parse().map_err(|_| bad("port is not a number"))?;
                Ok(Endpoint::Hybrid {
                    uds_path: PathBuf::from(path),
                    port,
                })
            }
            _ => Err(bad("scheme must be vsock, unix or hybrid")),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Vsock { cid, port } if *cid == CID_ANY => write!(f, "vsock:any:{port}"),
            Endpoint::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Hybrid { uds_path, port } => {
                write!(f, "hybrid:{}:{port}", uds_path.display())
            }
        }
    }
}

/// Who is on the other end of an accepted connection, as far as the
/// hypervisor (not the guest) can tell.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Peer {
    /// An AF_VSOCK peer with this CID.
    Vsock {
        /// The guest's context id.
        cid: u32,
    },
    /// Arrived on this Unix socket path (a hybrid-vsock `<uds>_<port>` path
    /// or a plain test socket).
    Unix {
        /// The listening socket's path.
        path: PathBuf,
    },
}

/// A listening socket of any transport.
pub enum Listener {
    /// AF_VSOCK listener.
    Vsock(tokio_vsock::VsockListener),
    /// Unix socket listener (plain, or a hybrid-vsock `<uds>_<port>` path).
    Unix {
        /// The socket.
        listener: tokio::net::UnixListener,
        /// Its path.
        path: PathBuf,
    },
}

impl Listener {
    /// Binds a listener. `Endpoint::Hybrid` is a dial-only address; to
    /// accept guest connections of a hybrid-vsock VM, bind
    /// `Endpoint::Unix(hybrid::listen_path(uds_path, port))`.
    pub fn bind(endpoint: &Endpoint) -> Result<Self, TransportError> {
        match endpoint {
            Endpoint::Vsock { cid, port } => vsock::bind(*cid, *port),
            Endpoint::Unix(path) => Ok(Listener::Unix {
                listener: bind_unix(path)?,
                path: path.clone(),
            }),
            Endpoint::Hybrid { .. } => Err(TransportError::BadAddress {
                addr: endpoint.to_string(),
                why: "hybrid addresses are dialled; listen on unix:<uds_path>_<port>",
            }),
        }
    }

    /// Accepts one connection.
    pub async fn accept(&self) -> Result<(BoxStream, Peer), TransportError> {
        match self {
            Listener::Vsock(l) => vsock::accept(l).await,
            Listener::Unix { listener, path } => {
                let (s, _) = listener
                    .accept()
                    .await
                    .map_err(|e| TransportError::io(format!("accept on {}", path.display()), e))?;
                Ok((Box::new(s), Peer::Unix { path: path.clone() }))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Opens a connection to `endpoint`, every step bounded by `limit`.
pub async fn dial(endpoint: &Endpoint, limit: Duration) -> Result<BoxStream, TransportError> {
    match endpoint {
        Endpoint::Vsock { cid, port } => vsock::connect(*cid, *port, limit).await,
        Endpoint::Unix(path) => Ok(Box::new(unix::connect(path, limit).await?)),
        Endpoint::Hybrid { uds_path, port } => {
            Ok(Box::new(hybrid::connect(uds_path, *port, limit).await?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncRead, AsyncReadExt};

    /// Reads `want.len()` bytes from `s` and checks they are `want`
    /// (`what` names them in a failure).
    pub(super) async fn read_expect(s: &mut (impl AsyncRead + Unpin), want: &[u8], what: &str) {
        let mut got = vec![0u8; want.len()];
        s.read_exact(&mut got).await.expect(what);
        assert_eq!(got, want, "{what}");
    }

    #[test]
    fn parses_and_prints_addresses() {
        let cases = [
            ("vsock:2:7075", Endpoint::Vsock { cid: 2, port: 7075 }),
            ("vsock:host:7075", Endpoint::Vsock { cid: 2, port: 7075 }),
            (
                "vsock:any:7075",
                Endpoint::Vsock {
                    cid: CID_ANY,
                    port: 7075,
                },
            ),
            ("unix:/run/uve.sock", Endpoint::Unix("/run/uve.sock".into())),
            (
                "hybrid:/run/fc/v.sock:52",
                Endpoint::Hybrid {
                    uds_path: "/run/fc/v.sock".into(),
                    port: 52,
                },
            ),
        ];
        for (s, e) in cases {
            let parsed: Endpoint = s.parse().expect(s);
            assert_eq!(parsed, e, "{s}");
            let again: Endpoint = parsed.to_string().parse().expect("reparse");
            assert_eq!(again, e);
        }
    }

    #[test]
    fn refuses_malformed_addresses() {
        for s in [
            "",
            "7075",
            "tcp:1.2.3.4:5",
            "vsock:2",
            "vsock:x:1",
            "vsock:2:99999999999",
            "unix:",
            "hybrid:/p",
            "hybrid::5",
            "hybrid:/p:x",
        ] {
            let err = s.parse::<Endpoint>().expect_err(s);
            assert!(err.to_string().contains("bad address"), "{s}: {err}");
        }
    }

    #[test]
    fn hybrid_endpoints_cannot_be_bound() {
        let e = Endpoint::Hybrid {
            uds_path: "/tmp/x".into(),
            port: 1,
        };
        assert!(matches!(
            Listener::bind(&e),
            Err(TransportError::BadAddress { .. })
        ));
    }
}
