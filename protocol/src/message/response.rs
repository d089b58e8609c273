//! Answers and their payloads; see the versioning rule in [`super`].

use serde::{Deserialize, Serialize};

use super::{BlockDigest, Version, WireError};
use crate::manifest::{ChunkRef, ManifestHeader};
use crate::names::{SessionId, UaName, UaVersion, UserName};

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
        version: UaVersion,
    },
    /// Answer to `UaDelete`.
    UaDeleted {
        /// Sessions that were stopped because of `force`.
        stopped_sessions: Vec<SessionId>,
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
    pub session: SessionId,
    /// User.
    pub user: UserName,
    /// UA, if any.
    pub ua: Option<UaName>,
    /// Whether it is suspended.
    pub suspended: bool,
}

/// One UA as reported by the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UaInfo {
    /// UA name.
    pub name: UaName,
    /// Version `current` points at.
    pub current: UaVersion,
    /// Previous version kept for rollback.
    pub previous: Option<UaVersion>,
}
