//! How a link ends ([`LinkEnd`]), what exchanging a frame on it can fail
//! with ([`LinkError`]), and the one time bound both peers put on a
//! request ([`within`]).

use std::time::Duration;

use crate::codec::FrameError;
use crate::message::{ErrorCode, WireError};

/// Why a link ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEnd {
    /// The peer said goodbye (orderly).
    Goodbye(String),
    /// We closed it (goodbye sent or local shutdown).
    Local,
    /// The peer closed the connection without a goodbye.
    PeerClosed,
    /// Nothing heard from the peer for this long.
    DeadPeer(Duration),
    /// The peer sent a frame we could not accept; the reason is logged.
    BadFrame(String),
    /// The peer announced a frame larger than the negotiated limit.
    Oversize(String),
    /// Writing to the socket failed.
    WriteFailed(String),
    /// The peer took no frame for this long: it stopped reading.
    WriteStalled(Duration),
}

impl LinkEnd {
    /// True if the peer ended the connection on purpose.
    pub fn is_orderly(&self) -> bool {
        matches!(self, LinkEnd::Goodbye(_) | LinkEnd::Local)
    }
}

impl std::fmt::Display for LinkEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkEnd::Goodbye(r) => write!(f, "peer said goodbye: {r}"),
            LinkEnd::Local => f.write_str("closed locally"),
            LinkEnd::PeerClosed => f.write_str("peer closed the connection"),
            LinkEnd::DeadPeer(d) => write!(f, "peer silent for {d:?}"),
            LinkEnd::BadFrame(e) | LinkEnd::Oversize(e) => write!(f, "bad frame from peer: {e}"),
            LinkEnd::WriteFailed(e) => write!(f, "write failed: {e}"),
            LinkEnd::WriteStalled(d) => write!(f, "peer stopped reading: no frame taken in {d:?}"),
        }
    }
}

/// Why a request or response could not be exchanged.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The link is gone.
    #[error("link closed: {0}")]
    Closed(LinkEnd),
    /// No answer in time.
    #[error("no response within {0:?}")]
    Timeout(Duration),
    /// The frame could not be encoded (e.g. larger than the frame limit).
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The peer answered with an error.
    #[error("peer refused: {0}")]
    Remote(WireError),
}

impl LinkError {
    /// The wire error code if the peer refused, else `None`.
    pub fn remote_code(&self) -> Option<ErrorCode> {
        match self {
            LinkError::Remote(e) => Some(e.code),
            _ => None,
        }
    }

    /// The peer's final refusal, if that is what this is: a remote error
    /// whose code is not [transient](ErrorCode::is_transient). A closed
    /// link, a timeout or an unencodable frame says nothing about what the
    /// peer would answer, so a retry may succeed.
    pub fn refusal(&self) -> Option<&WireError> {
        match self {
            LinkError::Remote(e) if !e.code.is_transient() => Some(e),
            _ => None,
        }
    }
}

/// Awaits `fut` for at most `limit` (past it: [`LinkError::Timeout`]): how
/// both peers bound a request, queueing included.
pub async fn within<T>(
    limit: Duration,
    fut: impl Future<Output = Result<T, LinkError>>,
) -> Result<T, LinkError> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| LinkError::Timeout(limit))?
}
