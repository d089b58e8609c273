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

use serde::{Deserialize, Serialize};

use crate::manifest::{ChunkRef, Hash, ManifestHeader};

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

/// Requests of both interfaces. UVE-5 ones are sent by the agent, UVE-2 ones
/// by the host; a peer answers a request meant for the other side with
/// [`ErrorCode::Unsupported`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    // ---- UVE-5, agent → host -------------------------------------------
    /// Login: the VM was selected for `user`; grant a lease and describe the
    /// head version.
    UifRetrieve {
        /// The user logging in.
        user: String,
        /// The session being opened.
        session: String,
    },
    /// One page of a version's chunk list (see `manifest::page_count`).
    ManifestPage {
        /// Whose UIF.
        user: String,
        /// Which version.
        version: Version,
        /// Page index, from 0.
        page: u32,
    },
    /// The bytes of one chunk of a version this VM retrieved.
    ChunkFetch {
        /// Whose UIF.
        user: String,
        /// The chunk.
        hash: Hash,
    },
    /// Start an update: announce the new version's header and what it is
    /// based on. The host answers with an upload id.
    UpdateBegin(UpdateBegin),
    /// One page of the new version's chunk list; the host answers with the
    /// indices (within this page) of chunks it lacks.
    UpdatePage {
        /// Upload id from `UpdateBegin`.
        upload: u64,
        /// Page index, from 0, sent in order.
        page: u32,
        /// The chunk refs of this page.
        chunks: Vec<ChunkRef>,
    },
    /// The bytes of a chunk the host said it lacks.
    ChunkUpload {
        /// Upload id.
        upload: u64,
        /// The chunk's hash (checked by the host).
        hash: Hash,
        /// The chunk's bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// All pages and missing chunks sent: commit if the head is still the
    /// base version and the lease is current, else keep as conflict version.
    UpdateCommit {
        /// Upload id.
        upload: u64,
    },
    /// Abandon an upload (the host discards what it staged).
    UpdateAbort {
        /// Upload id.
        upload: u64,
    },
    /// A session began on this VM.
    SessionStarted {
        /// Session id.
        session: String,
        /// The user.
        user: String,
        /// The UA serving it, if known.
        ua: Option<String>,
    },
    /// A session ended by logout.
    SessionEnded {
        /// Session id.
        session: String,
    },
    /// A session ended without logout. At-least-once; `id` makes it idempotent.
    UnexpectedDisconnect(DisconnectNotice),

    // ---- UVE-2, host → agent -------------------------------------------
    /// VM switch: flush and detach `user`'s UIF; answer when committed.
    UserRelease {
        /// The user moving away from this VM.
        user: String,
        /// How long the host will wait for the flush.
        deadline_ms: u32,
    },
    /// Authorise `monitor` to monitor `session` until `expires`.
    MonitorGrant {
        /// The monitored session.
        session: String,
        /// The monitoring user.
        monitor: String,
        /// Expiry (Unix ms).
        expires: UnixMillis,
    },
    /// Withdraw a monitoring grant.
    MonitorRevoke {
        /// The monitored session.
        session: String,
        /// The monitoring user.
        monitor: String,
    },
    /// Start deploying (or updating) a UA: the bundle follows in
    /// `UaBundleData` frames, then `UaCommit`.
    UaBegin(UaBundle),
    /// A piece of the bundle being transferred.
    UaBundleData {
        /// Transfer id from `UaBegin`.
        transfer: u64,
        /// Offset of `data` in the bundle.
        offset: u64,
        /// Bundle bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Bundle complete: verify, unpack, switch `current`.
    UaCommit {
        /// Transfer id.
        transfer: u64,
    },
    /// Switch a UA's `current` back to its previous version.
    UaRollback {
        /// UA name.
        name: String,
    },
    /// Delete a UA; refused while sessions use it unless `force`.
    UaDelete {
        /// UA name.
        name: String,
        /// Stop sessions using it first.
        force: bool,
    },
    /// Freeze a session's processes.
    SessionSuspend {
        /// Session id.
        session: String,
    },
    /// Thaw a session's processes.
    SessionResume {
        /// Session id.
        session: String,
    },
    /// Round-trip probe through the request path (unlike `Heartbeat`).
    Ping {
        /// Echoed in `Pong`.
        nonce: u64,
    },
    /// Ask the agent for its sessions and UAs.
    AgentStatus,

    // ---- UVE-5, agent → host, protocol 2 (`PROTOCOL_BLOCK_DELTA`) -------
    /// Block digests of the base bytes of some chunks of an upload. Each
    /// entry of `chunks` is an index into the new version's chunk list (of
    /// a chunk the host reported missing); its base is what the upload's
    /// base version holds at the same offset, over the same length. At most
    /// `MAX_SIGNATURE_BATCH` entries.
    BlockSignatures {
        /// Upload id from `UpdateBegin`.
        upload: u64,
        /// Indices into the new version's chunk list.
        chunks: Vec<u32>,
    },
    /// A chunk the host said it lacks, sent as its base bytes with some
    /// `DELTA_BLOCK`-sized, file-aligned blocks replaced.
    ChunkDelta(ChunkDelta),
}

/// A new chunk expressed as its base bytes (the base version's bytes at
/// the chunk's offset) plus the blocks that differ.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkDelta {
    /// Upload id.
    pub upload: u64,
    /// The chunk's index in the new version's chunk list.
    pub index: u32,
    /// The chunk's hash (must be the one listed at `index`; checked after
    /// rebuilding).
    pub hash: Hash,
    /// The blocks that replace the base's, in increasing block order.
    pub blocks: Vec<DeltaBlock>,
}

/// One replaced block of a [`ChunkDelta`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaBlock {
    /// Block number within the chunk: block `k` of a chunk at offset `s`
    /// covers the file bytes `[(s / DELTA_BLOCK + k) * DELTA_BLOCK, +DELTA_BLOCK)`
    /// clipped to the chunk.
    pub index: u16,
    /// The block's new bytes, exactly as many as its place in the chunk.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// Truncated BLAKE3 of one block (`BLOCK_DIGEST_LEN` bytes).
pub type BlockDigest = [u8; crate::defs::BLOCK_DIGEST_LEN];

/// Header of an update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateBegin {
    /// Whose UIF.
    pub user: String,
    /// The session it comes from (for events).
    pub session: String,
    /// The version this update was derived from; `None` when the session
    /// ran without a successful retrieve (it can then never replace an
    /// existing head: it lands as a conflict version).
    pub base: Option<Version>,
    /// Fencing token: the lease epoch granted at retrieve.
    pub lease: u64,
    /// The new version's header; the chunk list follows in `UpdatePage`s.
    pub header: ManifestHeader,
    /// Why: logout, release, checkpoint, shutdown, disconnect.
    pub cause: UpdateCause,
}

/// Why an update is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpdateCause {
    /// User logged out.
    Logout,
    /// Host asked the VM to release the user (VM switch).
    Release,
    /// Periodic checkpoint during a session.
    Checkpoint,
    /// Agent shutting down.
    Shutdown,
    /// Session ended unexpectedly.
    Disconnect,
    /// Delivered from the offline spool after reconnect.
    Spooled,
}

/// An unexpected session disconnect notification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisconnectNotice {
    /// Idempotency id, chosen by the agent, unique per notice.
    pub id: u64,
    /// The session.
    pub session: String,
    /// Its user.
    pub user: String,
    /// The UA that served it, if any.
    pub ua: Option<String>,
    /// What happened (exit status, signal, local report).
    pub reason: String,
    /// When it happened.
    pub at: UnixMillis,
}

/// Description of a UA bundle about to be transferred.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UaBundle {
    /// Transfer id chosen by the host.
    pub transfer: u64,
    /// UA name.
    pub name: String,
    /// UA version (becomes the directory name).
    pub version: String,
    /// Entry command (argv) relative to the unpacked bundle.
    pub entry: Vec<String>,
    /// BLAKE3 of the bundle archive.
    pub digest: Hash,
    /// Size of the bundle archive in bytes.
    pub size: u64,
    /// True for an update of an existing UA, false for a first deploy.
    pub update: bool,
}

/// Answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Done, nothing to report.
    Ok,
    /// Refused or failed.
    Error(WireError),
    /// Answer to `UifRetrieve`.
    Retrieve(RetrieveGrant),
    /// Answer to `ManifestPage`.
    ManifestPage(Vec<ChunkRef>),
    /// Answer to `ChunkFetch`.
    Chunk(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Answer to `UpdateBegin`.
    UpdateAccepted {
        /// Id for the following `UpdatePage`/`ChunkUpload`/`UpdateCommit`.
        upload: u64,
    },
    /// Answer to `UpdatePage`: indices within that page of missing chunks.
    Missing(Vec<u32>),
    /// Answer to `UpdateCommit`: the new head.
    Committed {
        /// The new head version.
        version: Version,
    },
    /// Answer to `UpdateCommit`: CAS failed; the upload is kept.
    Conflict {
        /// The version number the upload was kept under.
        kept_as: Version,
        /// The user's head at the time.
        head: Option<Version>,
    },
    /// Answer to `UserRelease`.
    Released {
        /// The version the flush committed (None: nothing to flush or
        /// the update landed as a conflict).
        committed: Option<Version>,
    },
    /// Answer to `Ping`.
    Pong {
        /// The ping's nonce.
        nonce: u64,
    },
    /// Answer to `AgentStatus`.
    Status(AgentStatus),
    /// Answer to `UaCommit` / `UaRollback`: the version now `current`.
    UaCurrent {
        /// Version now current.
        version: String,
    },
    /// Answer to `UaDelete`.
    UaDeleted {
        /// Sessions that were stopped because of `force`.
        stopped_sessions: Vec<String>,
    },
    /// Answer to `BlockSignatures` (protocol 2): one entry per requested
    /// chunk, in order: the digest of each block of the base bytes, or
    /// `None` where the chunk's range is not wholly inside the base version
    /// (or cannot be read): send that chunk whole.
    BlockSignatures(Vec<Option<Vec<BlockDigest>>>),
}

/// Answer to `UifRetrieve`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetrieveGrant {
    /// The head version, if the user has one.
    pub version: Option<Version>,
    /// Its header (size, digest, chunk count).
    pub header: Option<ManifestHeader>,
    /// Lease epoch to present in `UpdateBegin`.
    pub lease: u64,
    /// True if a previous VM was asked to release the user and did not
    /// commit in time: the head may miss that VM's last changes.
    pub handover_timed_out: bool,
}

/// The agent's view of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// Open sessions.
    pub sessions: Vec<SessionInfo>,
    /// Deployed UAs.
    pub uas: Vec<UaInfo>,
    /// Updates waiting in the offline spool.
    pub spooled_updates: u32,
}

/// One session as reported by the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// Session id.
    pub session: String,
    /// User.
    pub user: String,
    /// UA, if any.
    pub ua: Option<String>,
    /// Whether it is suspended.
    pub suspended: bool,
}

/// One UA as reported by the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UaInfo {
    /// UA name.
    pub name: String,
    /// Version `current` points at.
    pub current: String,
    /// Previous version kept for rollback.
    pub previous: Option<String>,
}

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
