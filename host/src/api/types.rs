//! The management API's contract: the request bodies, queries and answers
//! of every route, shared by the handlers (which answer `Json<T>` of these)
//! and `uvectl` (which sends and decodes them). host/API.md describes them
//! and host/openapi.json is their OpenAPI 3 document; a change here is a
//! change of the wire form, pinned by `tests::answers_keep_their_wire_form`.
//!
//! Domain types answered as they are (a VM's spec, sessions, versions,
//! leases, GC reports, assignment outcomes) are re-exported from here, so
//! this module names the whole contract.

#[cfg(test)]
pub(crate) mod golden;

use std::collections::BTreeMap;
use std::path::PathBuf;

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use uve_protocol::message::{AgentStatus, SessionInfo, UaInfo, Version};

pub use crate::state::conns::ConnSummary;
pub use crate::state::events::Recorded as EventLine;
pub use crate::state::leases::{Granted, UserLease};
pub use crate::state::registry::VmSpec;
pub use crate::state::sessions::SessionRec;
pub use crate::store::{
    DamagedVersion, GcReport, Holdings, OriginHoldings, ScrubReport, VersionInfo, VersionKind,
};
pub use crate::wire::uve2::switch::AssignOutcome;

/// The machine-readable code of an error answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiErrorCode {
    /// Malformed request (400).
    BadRequest,
    /// A name failed validation (400).
    InvalidName,
    /// No such VM, user, version, UA or session (404).
    NotFound,
    /// Already exists, or in use (409).
    Conflict,
    /// A body exceeds its limit (413).
    TooLarge,
    /// The user's quota would be exceeded (413).
    QuotaExceeded,
    /// The agent refused the request (422).
    AgentRefused,
    /// The agent failed or answered nonsense (502).
    AgentError,
    /// The S3 store cannot be reached (502).
    StoreUnavailable,
    /// The VM has no live connection (503).
    VmNotConnected,
    /// A user's head kept changing under a commit (503).
    Contended,
    /// The agent did not answer in time (504).
    Timeout,
    /// Anything else (500).
    Internal,
    /// The path does not serve this method (405; the `Allow` header says
    /// which it serves).
    MethodNotAllowed,
    /// A JSON body sent without `content-type: application/json` (415).
    UnsupportedMediaType,
}

impl ApiErrorCode {
    /// The codes of the handlers' answers (the domain's errors and a
    /// malformed request); [`ROUTING`](Self::ROUTING) has the rest.
    pub const ALL: [ApiErrorCode; 13] = [
        Self::BadRequest,
        Self::InvalidName,
        Self::NotFound,
        Self::Conflict,
        Self::TooLarge,
        Self::QuotaExceeded,
        Self::AgentRefused,
        Self::AgentError,
        Self::StoreUnavailable,
        Self::VmNotConnected,
        Self::Contended,
        Self::Timeout,
        Self::Internal,
    ];

    /// The codes of a request no handler takes: a method its path does
    /// not serve, a JSON body of another content type.
    pub const ROUTING: [ApiErrorCode; 2] = [Self::MethodNotAllowed, Self::UnsupportedMediaType];

    /// Every code: [`ALL`](Self::ALL), then [`ROUTING`](Self::ROUTING).
    pub fn every() -> impl Iterator<Item = ApiErrorCode> {
        Self::ALL.into_iter().chain(Self::ROUTING)
    }

    /// The code as written on the wire (`not_found`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::InvalidName => "invalid_name",
            Self::NotFound => "not_found",
            Self::Conflict => "conflict",
            Self::TooLarge => "too_large",
            Self::QuotaExceeded => "quota_exceeded",
            Self::AgentRefused => "agent_refused",
            Self::AgentError => "agent_error",
            Self::StoreUnavailable => "store_unavailable",
            Self::VmNotConnected => "vm_not_connected",
            Self::Contended => "contended",
            Self::Timeout => "timeout",
            Self::Internal => "internal",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::UnsupportedMediaType => "unsupported_media_type",
        }
    }

    /// The HTTP status answered with this code.
    pub fn status(self) -> StatusCode {
        match self {
            Self::BadRequest | Self::InvalidName => StatusCode::BAD_REQUEST,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::Conflict => StatusCode::CONFLICT,
            Self::TooLarge | Self::QuotaExceeded => StatusCode::PAYLOAD_TOO_LARGE,
            Self::AgentRefused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::AgentError | Self::StoreUnavailable => StatusCode::BAD_GATEWAY,
            Self::VmNotConnected | Self::Contended => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        }
    }
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What kind of error.
    pub error: ApiErrorCode,
    /// Human-readable text.
    pub message: String,
}

// ---- VMs, assignments, sessions -------------------------------------------

/// Body of `POST /v1/vms`: the id and exactly one transport.
pub type NewVm = VmSpec;

/// A VM in `GET /v1/vms` and the answer of `POST /v1/vms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// VM id.
    pub id: String,
    /// AF_VSOCK context id.
    pub cid: Option<u32>,
    /// Hybrid-vsock socket of the VMM.
    pub uds_path: Option<PathBuf>,
    /// Hybrid-vsock guest port.
    pub port: Option<u32>,
    /// Plain Unix listen path.
    pub unix: Option<PathBuf>,
    /// The Unix socket the host listens on (`null` for vsock).
    pub listen_path: Option<PathBuf>,
    /// Whether its agent is connected.
    pub connected: bool,
    /// The live connection.
    pub connection: Option<ConnSummary>,
}

/// `GET /v1/vms/{id}`: the VM, its open sessions and assigned users.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDetail {
    /// The VM.
    #[serde(flatten)]
    pub vm: VmInfo,
    /// Sessions open on it.
    pub sessions: Vec<SessionRec>,
    /// Users assigned to it.
    pub assigned_users: Vec<String>,
}

/// `GET /v1/assignments`: user → VM.
pub type Assignments = BTreeMap<String, String>;

/// Body of `PUT /v1/assignments/{user}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssignBody {
    /// The VM to assign the user to.
    pub vm: String,
}

/// Query of `GET /v1/sessions`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionsQuery {
    /// Only this VM's sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
}

// ---- UIF administration ---------------------------------------------------

/// A row of `GET /v1/users`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRow {
    /// The user.
    pub user: String,
    /// Their head version.
    pub head: Option<Version>,
    /// The VM they are assigned to.
    pub assigned_to: Option<String>,
    /// Their writer lease.
    pub lease: Option<UserLease>,
}

/// `GET /v1/users/{user}/versions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionList {
    /// The head version.
    pub head: Option<Version>,
    /// Retained versions, committed and conflict.
    pub versions: Vec<VersionInfo>,
}

/// Query of `POST /v1/users/{user}/import`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportQuery {
    /// Accept an empty body as an empty UIF. Without it an empty body is
    /// refused (`bad_request`): HTTP cannot tell a request that forgot its
    /// body from one that means an empty UIF, so the client says which.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub empty: bool,
}

/// Answer of `POST /v1/users/{user}/import`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Imported {
    /// The user.
    pub user: String,
    /// The version stored.
    pub version: Version,
    /// Size in bytes.
    pub size: u64,
    /// Manifest digest, hex.
    pub digest: String,
    /// Number of chunks.
    pub chunks: u32,
}

/// Body of `POST /v1/users/{user}/rollback`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackBody {
    /// The version to restore.
    pub version: Version,
}

/// Answer of `POST /v1/users/{user}/rollback`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolledBack {
    /// The user.
    pub user: String,
    /// The new head (a copy).
    pub version: Version,
    /// The version copied.
    pub copied_from: Version,
}

/// `GET /v1/users/{user}`: the user, where they are, and what they hold
/// against the quota.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserDetail {
    /// The user.
    pub user: String,
    /// Their head version.
    pub head: Option<Version>,
    /// The VM they are assigned to.
    pub assigned_to: Option<String>,
    /// Their writer lease.
    pub lease: Option<UserLease>,
    /// What their versions hold (unique bytes), the quota and its
    /// override, and each writer's conflict versions.
    #[serde(flatten)]
    pub holdings: Holdings,
    /// Bytes their own uploads in flight add (charged to the quota until
    /// they commit or go).
    pub in_flight_bytes: u64,
}

/// Body of `PUT /v1/users/{user}/quota`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaBody {
    /// The user's quota in bytes (unique bytes of head and history);
    /// `null` clears the override (the host's `user_quota_bytes` applies).
    /// Required: a body without it is refused, not read as `null`.
    #[serde(deserialize_with = "required_nullable")]
    pub quota_bytes: Option<u64>,
}

/// A field that must be present and may be `null` (serde otherwise reads
/// a missing `Option` field as `None`).
fn required_nullable<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Option::<u64>::deserialize(d)
}

/// Answer of `DELETE /v1/users/{user}/versions/{v}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionDeleted {
    /// The user.
    pub user: String,
    /// The version deleted (its chunks go at the next GC unless another
    /// version holds them).
    pub version: Version,
}

/// Query of `POST /v1/gc`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcQuery {
    /// Spare unreferenced chunks younger than this (default: configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_secs: Option<u64>,
}

/// Query of `POST /v1/scrub`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubQuery {
    /// Read at most this fast, MiB/s (default: `scrub_mib_per_sec`; 0 = no
    /// limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mib_per_sec: Option<u64>,
}

/// Query of `GET /v1/events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventsQuery {
    /// Only events after this sequence number.
    #[serde(default)]
    pub since: u64,
    /// Keep streaming new events (default `true`).
    #[serde(default = "yes")]
    pub follow: bool,
}

fn yes() -> bool {
    true
}

// ---- UVE-2, answered by the VM's agent -------------------------------------

/// Query of `POST /v1/vms/{id}/ua` (the body is the tar bundle).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployQuery {
    /// UA name.
    pub name: String,
    /// UA version.
    pub version: String,
    /// Entry command, whitespace-separated argv.
    #[serde(default)]
    pub entry: String,
    /// Update an existing UA.
    #[serde(default)]
    pub update: bool,
}

/// Answer of `POST /v1/vms/{id}/ua`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UaDeployed {
    /// The VM.
    pub vm: String,
    /// UA name.
    pub name: String,
    /// The version now current.
    pub current: String,
    /// Bundle size in bytes.
    pub size: u64,
    /// Bundle BLAKE3 digest, hex.
    pub digest: String,
}

/// Answer of `POST /v1/vms/{id}/ua/{name}/rollback`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UaCurrent {
    /// The VM.
    pub vm: String,
    /// UA name.
    pub name: String,
    /// The version now current.
    pub current: String,
}

/// Query of `DELETE /v1/vms/{id}/ua/{name}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UaDeleteQuery {
    /// Stop the sessions using it (`true` or `1`; anything else is false).
    #[serde(default, with = "flag")]
    pub force: bool,
}

/// Query of `DELETE /v1/vms/{id}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRemoveQuery {
    /// Remove at once, without asking the VM to release its users first
    /// (`true` or `1`; anything else is false).
    #[serde(default, with = "flag")]
    pub force: bool,
}

/// Answer of `DELETE /v1/vms/{id}/ua/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UaDeleted {
    /// The VM.
    pub vm: String,
    /// UA name.
    pub name: String,
    /// Sessions stopped because of `force`.
    pub stopped_sessions: Vec<String>,
}

/// The `{action}` of `POST /v1/vms/{id}/sessions/{session}/{action}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionAction {
    /// Suspend the session.
    Suspend,
    /// Resume it.
    Resume,
}

impl SessionAction {
    /// The path segment.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Suspend => "suspend",
            Self::Resume => "resume",
        }
    }

    /// Parses the path segment.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Suspend, Self::Resume]
            .into_iter()
            .find(|a| a.as_str() == s)
    }
}

/// Answer of a session suspend or resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionActionDone {
    /// The VM.
    pub vm: String,
    /// Session id.
    pub session: String,
    /// What was done.
    pub action: SessionAction,
}

/// Body of `POST /v1/vms/{id}/monitor`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorBody {
    /// Session id.
    pub session: String,
    /// Monitoring user.
    pub monitor: String,
    /// Validity in seconds (default 3600).
    #[serde(default = "default_ttl")]
    pub ttl_secs: u64,
}

fn default_ttl() -> u64 {
    3600
}

/// Answer of `POST /v1/vms/{id}/monitor`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorGranted {
    /// The VM.
    pub vm: String,
    /// Session id.
    pub session: String,
    /// Monitoring user.
    pub monitor: String,
    /// When the grant expires (Unix ms).
    pub expires: u64,
}

/// Query of `DELETE /v1/vms/{id}/monitor` (both are required; a missing
/// one is answered `bad_request`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorRevokeQuery {
    /// Session id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// Monitoring user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor: Option<String>,
}

/// Answer of `DELETE /v1/vms/{id}/monitor`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorRevoked {
    /// The VM.
    pub vm: String,
    /// Session id.
    pub session: String,
    /// Monitoring user.
    pub monitor: String,
    /// Always `true`.
    pub revoked: bool,
}

/// Answer of `GET /v1/vms/{id}/status`: the agent's view of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    /// The VM.
    pub vm: String,
    /// Sessions the agent has open.
    pub sessions: Vec<AgentSession>,
    /// UAs deployed on it.
    pub uas: Vec<AgentUa>,
    /// Updates waiting in its offline spool.
    pub spooled_updates: u32,
}

/// A session as the agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentSession {
    /// Session id.
    pub session: String,
    /// Its user.
    pub user: String,
    /// Its UA.
    pub ua: Option<String>,
    /// Whether it is suspended.
    pub suspended: bool,
}

/// A UA as the agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentUa {
    /// UA name.
    pub name: String,
    /// The version `current` points at.
    pub current: String,
    /// The version kept for rollback.
    pub previous: Option<String>,
}

impl VmStatus {
    /// The API form of an agent's `AgentStatus`.
    pub fn new(vm: String, s: AgentStatus) -> Self {
        let session = |x: SessionInfo| AgentSession {
            session: x.session.into(),
            user: x.user.into(),
            ua: x.ua.map(String::from),
            suspended: x.suspended,
        };
        let ua = |u: UaInfo| AgentUa {
            name: u.name.into(),
            current: u.current.into(),
            previous: u.previous.map(String::from),
        };
        VmStatus {
            vm,
            sessions: s.sessions.into_iter().map(session).collect(),
            uas: s.uas.into_iter().map(ua).collect(),
            spooled_updates: s.spooled_updates,
        }
    }
}

/// Answer of `POST /v1/vms/{id}/ping`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    /// The VM.
    pub vm: String,
    /// Always `true`.
    pub pong: bool,
}

/// A query flag written `true`/`false` and read leniently: `true` or `1`
/// is true, anything else false (what `?force=` always accepted).
mod flag {
    use serde::{Deserialize, Deserializer, Serializer};

    #[allow(clippy::trivially_copy_pass_by_ref)] // serde's `with` signature
    pub(super) fn serialize<S: Serializer>(b: &bool, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bool(*b)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        let s = String::deserialize(d)?;
        Ok(s == "true" || s == "1")
    }
}
