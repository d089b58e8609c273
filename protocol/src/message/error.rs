//! Typed errors on the wire: [`WireError`] and its [`ErrorCode`], and
//! which codes are worth retrying.

use serde::{Deserialize, Serialize};

/// A typed error with a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct WireError {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// Explanation for logs and operators.
    pub message: String,
}

impl WireError {
    /// Builds an error from a code and any displayable message.
    pub fn new(code: ErrorCode, message: impl std::fmt::Display) -> Self {
        WireError {
            code,
            message: message.to_string(),
        }
    }
}

impl From<crate::names::NameError> for WireError {
    fn from(e: crate::names::NameError) -> Self {
        WireError::new(ErrorCode::InvalidName, e)
    }
}

impl ErrorCode {
    /// True if the same request may succeed when retried later unchanged:
    /// the peer was busy, slow, shutting down or failed internally. Every
    /// other code is the peer's final answer to that request (a refusal
    /// no retry fixes). Both daemons classify with this one rule; the
    /// agent keeps an update it cannot deliver in its spool on a transient
    /// code and sets its bytes aside on a final one.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ErrorCode::Busy | ErrorCode::Timeout | ErrorCode::ShuttingDown | ErrorCode::Internal
        )
    }
}

/// Error codes. Appended only, like every enum here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// Malformed or out-of-order request.
    BadRequest,
    /// The request is not served by this side / this version.
    Unsupported,
    /// A name failed validation.
    InvalidName,
    /// The user is not assigned to this VM.
    NotAssigned,
    /// No such user, version, session, UA, upload or chunk.
    NotFound,
    /// A size exceeds a limit.
    TooLarge,
    /// The user's quota would be exceeded.
    QuotaExceeded,
    /// Chunk bytes do not match their hash.
    BadChunk,
    /// A whole-file or bundle digest does not match.
    BadDigest,
    /// Protocol version ranges do not overlap.
    VersionMismatch,
    /// The VM is not registered with the host.
    UnknownVm,
    /// The VM already has a live connection.
    AlreadyConnected,
    /// Too many requests / resources busy; retry later.
    Busy,
    /// A deadline passed.
    Timeout,
    /// The UA still has live sessions (delete without force).
    UaInUse,
    /// The UA bundle is unsafe or malformed (path traversal, symlink escape).
    BundleRejected,
    /// The host or agent is shutting down.
    ShuttingDown,
    /// Unexpected internal failure (details in the message and the logs).
    Internal,
}
