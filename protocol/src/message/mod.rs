//! Wire types. One [`Frame`] per length-prefixed frame; requests in both
//! directions are multiplexed with per-direction request ids.
//!
//! **Versioning rule:** postcard encodes enum variants by index and structs
//! field by field, so the encoding of an existing variant or struct never
//! changes. New variants are only ever *appended* (to [`Frame`], [`Request`],
//! [`Response`], [`ErrorCode`], ...). A message that needs a new field
//! becomes a new variant. The protocol version negotiated in the handshake
//! tells a peer which variants the other understands; a peer never sends a
//! variant newer than the negotiated version. Golden byte vectors in
//! `tests/golden.rs` fail if an existing encoding changes.
//!
//! The module is split by direction of meaning: [`request`] (every request
//! and its payloads), [`response`] (answers and their payloads), [`error`]
//! (typed errors); this file holds the frame, the handshake messages and
//! the capability bits. Everything is re-exported here.

mod error;
mod request;
mod response;

pub use error::{ErrorCode, WireError};
pub use request::*;
pub use response::*;

use serde::{Deserialize, Serialize};

/// A user's UIF version number: per user, strictly increasing, never reused
/// (conflict versions get numbers too).
pub type Version = u64;

/// Milliseconds since the Unix epoch (UTC).
pub type UnixMillis = u64;

/// Capability bit: the agent can materialise UIFs as a file (+ hooks).
pub const CAP_UIF_FILE: u64 = 1 << 0;
/// Capability bit: the agent can materialise UIFs as a directory (tar).
pub const CAP_UIF_DIRECTORY: u64 = 1 << 1;
/// Capability bit: the agent can deploy/update/delete UAs.
pub const CAP_UA_MANAGEMENT: u64 = 1 << 2;
/// Capability bit: the agent supervises UA processes (disconnect detection).
pub const CAP_SUPERVISE: u64 = 1 << 3;
/// Capability bit: the agent can suspend/resume sessions.
pub const CAP_SUSPEND: u64 = 1 << 4;
/// Capability bit: the agent handles monitoring grants.
pub const CAP_MONITOR: u64 = 1 << 5;

/// One frame on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// First frame of a connection, agent → host.
    Hello(Hello),
    /// Host accepts the agent.
    Welcome(Welcome),
    /// Host refuses the agent; the host closes the connection after it.
    Reject(Reject),
    /// A request; `id` is chosen by the sender, unique among its open requests.
    Request {
        /// Sender-chosen id echoed in the response.
        id: u64,
        /// The request.
        body: Request,
    },
    /// The answer to the peer's request `id`.
    Response {
        /// The id of the request this answers.
        id: u64,
        /// The answer.
        body: Response,
    },
    /// Liveness probe, either direction; answered by `HeartbeatAck`.
    Heartbeat {
        /// Sequence number echoed in the ack.
        seq: u64,
    },
    /// Answer to `Heartbeat`.
    HeartbeatAck {
        /// The heartbeat's sequence number.
        seq: u64,
    },
    /// Orderly close: the sender will close the connection; sessions are not
    /// reported as unexpectedly disconnected because of it.
    Goodbye(Goodbye),
}

/// Agent's opening message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Oldest protocol version the agent speaks.
    pub protocol_min: u16,
    /// Newest protocol version the agent speaks.
    pub protocol_max: u16,
    /// Agent software version (informational).
    pub agent_version: String,
    /// Random id of this guest boot (the host can tell a reboot from a reconnect).
    pub boot_id: [u8; 16],
    /// `CAP_*` bits.
    pub capabilities: u64,
    /// Largest frame the agent is willing to receive.
    pub max_frame: u32,
}

/// Host's acceptance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The protocol version both will speak.
    pub protocol: u16,
    /// Host software version (informational).
    pub host_version: String,
    /// The VM id the host bound this connection to (from the hypervisor,
    /// never from the guest).
    pub vm_id: String,
    /// Heartbeat interval both sides use.
    pub heartbeat_ms: u32,
    /// Negotiated frame limit: min of both proposals.
    pub max_frame: u32,
    /// Further limits the agent must respect.
    pub limits: Limits,
}

/// Limits announced by the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Requests the agent may have open at once.
    pub max_inflight: u32,
    /// Largest UIF the host accepts, in bytes (per-user quota may be lower).
    pub max_uif_size: u64,
    /// Largest chunk either side may send.
    pub max_chunk: u32,
}

/// Host's refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reject {
    /// Machine-readable reason.
    pub code: ErrorCode,
    /// Human-readable explanation.
    pub reason: String,
}

/// Orderly close notice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Goodbye {
    /// Why the sender closes.
    pub reason: String,
}

impl Frame {
    /// Bulk frames (chunk and bundle bytes) go through the writer's bulk
    /// queue so they never delay control frames.
    pub fn is_bulk(&self) -> bool {
        matches!(
            self,
            Frame::Request {
                body: Request::ChunkUpload { .. }
                    | Request::ChunkDelta(_)
                    | Request::UaBundleData { .. },
                ..
            } | Frame::Response {
                body: Response::Chunk(_) | Response::BlockSignatures(_),
                ..
            }
        )
    }
}
