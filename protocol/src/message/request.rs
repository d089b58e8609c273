//! Requests of both interfaces and their payloads (UVE-5 agent → host,
//! UVE-2 host → agent); see the versioning rule in [`super`].

use serde::{Deserialize, Serialize};

use super::{UnixMillis, Version};
use crate::manifest::{ChunkRef, Hash, ManifestHeader};
use crate::names::{SessionId, UaName, UaVersion, UserName};

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
        user: UserName,
        /// The session being opened.
        session: SessionId,
    },
    /// One page of a version's chunk list (see `manifest::page_count`).
    ManifestPage {
        /// Whose UIF.
        user: UserName,
        /// Which version.
        version: Version,
        /// Page index, from 0.
        page: u32,
    },
    /// The bytes of one chunk of a version this VM retrieved.
    ChunkFetch {
        /// Whose UIF.
        user: UserName,
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
        session: SessionId,
        /// The user.
        user: UserName,
        /// The UA serving it, if known.
        ua: Option<UaName>,
    },
    /// A session ended by logout.
    SessionEnded {
        /// Session id.
        session: SessionId,
    },
    /// A session ended without logout. At-least-once; `id` makes it idempotent.
    UnexpectedDisconnect(DisconnectNotice),

    // ---- UVE-2, host → agent -------------------------------------------
    /// VM switch: flush and detach `user`'s UIF; answer when committed.
    UserRelease {
        /// The user moving away from this VM.
        user: UserName,
        /// How long the host will wait for the flush.
        deadline_ms: u32,
    },
    /// Authorise `monitor` to monitor `session` until `expires`.
    MonitorGrant {
        /// The monitored session.
        session: SessionId,
        /// The monitoring user.
        monitor: UserName,
        /// Expiry (Unix ms).
        expires: UnixMillis,
    },
    /// Withdraw a monitoring grant.
    MonitorRevoke {
        /// The monitored session.
        session: SessionId,
        /// The monitoring user.
        monitor: UserName,
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
        name: UaName,
    },
    /// Delete a UA; refused while sessions use it unless `force`.
    UaDelete {
        /// UA name.
        name: UaName,
        /// Stop sessions using it first.
        force: bool,
    },
    /// Freeze a session's processes.
    SessionSuspend {
        /// Session id.
        session: SessionId,
    },
    /// Thaw a session's processes.
    SessionResume {
        /// Session id.
        session: SessionId,
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
    pub user: UserName,
    /// The session it comes from (for events).
    pub session: SessionId,
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
    pub session: SessionId,
    /// Its user.
    pub user: UserName,
    /// The UA that served it, if any.
    pub ua: Option<UaName>,
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
    pub name: UaName,
    /// UA version (becomes the directory name).
    pub version: UaVersion,
    /// Entry command (argv) relative to the unpacked bundle.
    pub entry: Vec<String>,
    /// BLAKE3 of the bundle archive.
    pub digest: Hash,
    /// Size of the bundle archive in bytes.
    pub size: u64,
    /// True for an update of an existing UA, false for a first deploy.
    pub update: bool,
}
