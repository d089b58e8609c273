//! The operator event kinds: one [`Event`] variant per `kind`, with the
//! fields of its JSON form (`GET /v1/events` adds `seq` and `at_ms`).
//! The JSON of every variant is pinned by `tests::every_kind_has_its_wire_form`;
//! host/API.md lists the kinds.

use serde::{Deserialize, Serialize};
use uve_protocol::message::{ErrorCode, UpdateCause, Version};

use crate::store::{GcReport, ScrubReport};

/// An operator event. Serialised as a JSON object whose `kind` names the
/// variant in snake case (`vm_lost`, `update_refused`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// A VM was registered (`POST /v1/vms`).
    VmRegistered {
        /// The VM.
        vm: String,
    },
    /// A VM was unregistered (`DELETE /v1/vms/{id}`).
    VmUnregistered {
        /// The VM.
        vm: String,
        /// Removed with `force`: its users were not asked to release
        /// first (their unsent changes arrive, if ever, as conflicts).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        forced: bool,
    },
    /// A VM's agent connected (handshake done).
    VmConnected {
        /// The VM.
        vm: String,
        /// Connection number (per daemon run).
        conn_id: u64,
        /// Agent software version from `Hello`.
        agent_version: String,
    },
    /// A VM's connection ended in order (`Goodbye`).
    VmDisconnected {
        /// The VM.
        vm: String,
        /// Connection number.
        conn_id: u64,
        /// How it ended.
        reason: String,
    },
    /// A VM's connection died without `Goodbye`.
    VmLost {
        /// The VM.
        vm: String,
        /// Connection number.
        conn_id: u64,
        /// How it ended.
        reason: String,
    },
    /// The agent reported a new session.
    SessionStarted {
        /// The VM.
        vm: String,
        /// Session id.
        session: String,
        /// Its user.
        user: String,
        /// Its UA (`null` if none).
        ua: Option<String>,
    },
    /// The agent reported a session's end.
    SessionEnded {
        /// The VM.
        vm: String,
        /// Session id.
        session: String,
        /// Its user.
        user: String,
        /// Its UA (`null` if none).
        ua: Option<String>,
    },
    /// A session ended without logout: reported by the agent (once per
    /// notice id) or by the host for each open session of a lost VM.
    UnexpectedDisconnect {
        /// The VM.
        vm: String,
        /// Session id.
        session: String,
        /// Its user.
        user: String,
        /// Its UA (`null` if none).
        ua: Option<String>,
        /// What happened.
        reason: String,
        /// When (Unix ms).
        at: u64,
        /// The agent's notice id; absent when the host reports it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// Who noticed.
        source: DisconnectSource,
    },
    /// A user's UIF was granted to a VM (login).
    Retrieve {
        /// The user.
        user: String,
        /// The VM.
        vm: String,
        /// The session asking.
        session: String,
        /// The head served (`null`: the user has no UIF yet).
        version: Option<Version>,
        /// The lease epoch granted.
        lease: u64,
        /// The previous VM did not release the user in time.
        handover_timed_out: bool,
    },
    /// An update became the user's head.
    Commit {
        /// What was sent.
        #[serde(flatten)]
        update: UpdateFields,
        /// The new head.
        version: Version,
    },
    /// An update's base or lease was stale: kept as a conflict version.
    Conflict {
        /// What was sent.
        #[serde(flatten)]
        update: UpdateFields,
        /// The conflict version.
        kept_as: Version,
        /// The head at the time.
        head: Option<Version>,
    },
    /// An update was refused for good (quota, size limit, not assigned, a
    /// malformed upload); the agent keeps the bytes as a preserved copy.
    UpdateRefused {
        /// The VM.
        vm: String,
        /// The user.
        user: String,
        /// The session.
        session: String,
        /// Why it was sent.
        #[serde(with = "cause_name")]
        cause: UpdateCause,
        /// The version it was based on.
        base: Option<Version>,
        /// Announced size in bytes.
        size: u64,
        /// The refusal's error code (`QuotaExceeded`, `NotAssigned`, ...).
        code: ErrorCode,
        /// The refusal's message.
        reason: String,
    },
    /// A VM reached one of its budgets (see host/API.md, *Budgets*); what
    /// it asked was refused or its connection cut off.
    BudgetExceeded {
        /// The VM.
        vm: String,
        /// The user, if the budget is about one.
        user: Option<String>,
        /// The budget, as named in host.toml (`max_staged_bytes_per_vm`, ...).
        budget: String,
        /// Its limit.
        limit: u64,
    },
    /// A user was assigned to a VM.
    Assigned {
        /// The user.
        user: String,
        /// The VM.
        vm: String,
        /// The VM assigned before.
        previous: Option<String>,
        /// The VM asked to release the user.
        release_requested_from: Option<String>,
    },
    /// A user's assignment was removed.
    Unassigned {
        /// The user.
        user: String,
        /// The VM assigned before.
        previous: String,
        /// The VM asked to release the user.
        release_requested_from: Option<String>,
    },
    /// A VM answered `UserRelease` after flushing.
    UserReleased {
        /// The user.
        user: String,
        /// The VM that released them.
        vm: String,
        /// The version the flush committed (`null`: none).
        committed: Option<Version>,
    },
    /// A VM switch hand-over failed (the old VM was lost or answered badly).
    HandoverFailed {
        /// The user.
        user: String,
        /// The previous VM.
        vm: String,
        /// Why.
        reason: String,
    },
    /// A retrieve stopped waiting for the previous VM's release.
    HandoverTimeout {
        /// The user.
        user: String,
        /// The VM retrieving.
        vm: String,
        /// The session retrieving.
        session: String,
    },
    /// An operator import (`POST /v1/users/{user}/import`).
    Import {
        /// The user.
        user: String,
        /// The version stored.
        version: Version,
        /// Size in bytes.
        size: u64,
        /// Number of chunks.
        chunks: u32,
    },
    /// An operator rollback (`POST /v1/users/{user}/rollback`).
    Rollback {
        /// The user.
        user: String,
        /// The version copied.
        from_version: Version,
        /// The new head (the copy).
        version: Version,
    },
    /// A garbage collection ran (API or periodic).
    Gc(GcReport),
    /// A scrub of the store ran (API or periodic); journalled when it
    /// found a corrupt chunk.
    Scrub(ScrubReport),
    /// A UA was deployed or updated on a VM.
    UaDeployed {
        /// The VM.
        vm: String,
        /// UA name.
        name: String,
        /// The version now current.
        version: String,
        /// It was an update of an existing UA.
        update: bool,
        /// Bundle size in bytes.
        size: u64,
    },
    /// A UA was switched back to its previous version.
    UaRolledBack {
        /// The VM.
        vm: String,
        /// UA name.
        name: String,
        /// The version now current.
        version: String,
    },
    /// A UA was deleted.
    UaDeleted {
        /// The VM.
        vm: String,
        /// UA name.
        name: String,
        /// Sessions stopped because of `force`.
        stopped_sessions: Vec<String>,
    },
    /// A session was suspended.
    SessionSuspended {
        /// The VM.
        vm: String,
        /// Session id.
        session: String,
    },
    /// A session was resumed.
    SessionResumed {
        /// The VM.
        vm: String,
        /// Session id.
        session: String,
    },
    /// A monitoring grant was given.
    MonitorGranted {
        /// The VM.
        vm: String,
        /// Session id.
        session: String,
        /// Monitoring user.
        monitor: String,
        /// When it expires (Unix ms).
        expires: u64,
    },
    /// A monitoring grant was withdrawn.
    MonitorRevoked {
        /// The VM.
        vm: String,
        /// Session id.
        session: String,
        /// Monitoring user.
        monitor: String,
    },
}

impl Event {
    /// The VM whose share of the ring and the journal this event takes
    /// (see [`super::fair`]): the VM it names in `vm` (for `commit` and
    /// `conflict` the VM that sent the update). Events that name no VM
    /// (`import`, `rollback`, `gc`, `unassigned`) share one of their own.
    pub fn vm(&self) -> Option<&str> {
        match self {
            Event::VmRegistered { vm }
            | Event::VmUnregistered { vm, .. }
            | Event::VmConnected { vm, .. }
            | Event::VmDisconnected { vm, .. }
            | Event::VmLost { vm, .. }
            | Event::SessionStarted { vm, .. }
            | Event::SessionEnded { vm, .. }
            | Event::UnexpectedDisconnect { vm, .. }
            | Event::Retrieve { vm, .. }
            | Event::UpdateRefused { vm, .. }
            | Event::BudgetExceeded { vm, .. }
            | Event::Assigned { vm, .. }
            | Event::UserReleased { vm, .. }
            | Event::HandoverFailed { vm, .. }
            | Event::HandoverTimeout { vm, .. }
            | Event::UaDeployed { vm, .. }
            | Event::UaRolledBack { vm, .. }
            | Event::UaDeleted { vm, .. }
            | Event::SessionSuspended { vm, .. }
            | Event::SessionResumed { vm, .. }
            | Event::MonitorGranted { vm, .. }
            | Event::MonitorRevoked { vm, .. } => Some(vm),
            Event::Commit { update, .. } | Event::Conflict { update, .. } => Some(&update.vm),
            Event::Unassigned { .. }
            | Event::Import { .. }
            | Event::Rollback { .. }
            | Event::Gc(_)
            | Event::Scrub(_) => None,
        }
    }

    /// True for the events an operator must act on, which the durable
    /// journal keeps across floods and restarts: `update_refused` (bytes
    /// preserved in a guest), `conflict`, `budget_exceeded`,
    /// `handover_failed`, `vm_lost`, `unexpected_disconnect`, and a
    /// `scrub` that found a corrupt chunk.
    pub fn journalled(&self) -> bool {
        if let Event::Scrub(r) = self {
            return r.corrupt > 0;
        }
        matches!(
            self,
            Event::UpdateRefused { .. }
                | Event::Conflict { .. }
                | Event::BudgetExceeded { .. }
                | Event::HandoverFailed { .. }
                | Event::VmLost { .. }
                | Event::UnexpectedDisconnect { .. }
        )
    }
}

/// The fields `commit` and `conflict` share: what the update was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateFields {
    /// The user.
    pub user: String,
    /// The VM that sent it.
    pub vm: String,
    /// The session.
    pub session: String,
    /// Why it was sent (`logout`, `release`, `checkpoint`, ...).
    #[serde(with = "cause_name")]
    pub cause: UpdateCause,
    /// The version it was based on.
    pub base: Option<Version>,
    /// Size in bytes.
    pub size: u64,
    /// Number of chunks.
    pub chunks: u32,
    /// Chunks this upload sent (the rest were present).
    pub chunks_uploaded: u64,
}

/// Who reported an unexpected disconnect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DisconnectSource {
    /// The agent's `UnexpectedDisconnect` notice.
    Agent,
    /// The host, for an open session of a VM whose connection was lost.
    Host,
}

/// [`UpdateCause`] as a lower-case word (`logout`, `spooled`, ...).
mod cause_name {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};
    use uve_protocol::message::UpdateCause;

    const ALL: [UpdateCause; 6] = [
        UpdateCause::Logout,
        UpdateCause::Release,
        UpdateCause::Checkpoint,
        UpdateCause::Shutdown,
        UpdateCause::Disconnect,
        UpdateCause::Spooled,
    ];

    fn word(c: UpdateCause) -> &'static str {
        match c {
            UpdateCause::Logout => "logout",
            UpdateCause::Release => "release",
            UpdateCause::Checkpoint => "checkpoint",
            UpdateCause::Shutdown => "shutdown",
            UpdateCause::Disconnect => "disconnect",
            UpdateCause::Spooled => "spooled",
        }
    }

    #[allow(clippy::trivially_copy_pass_by_ref)] // serde's `with` signature
    pub(super) fn serialize<S: Serializer>(c: &UpdateCause, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(word(*c))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<UpdateCause, D::Error> {
        let w = String::deserialize(d)?;
        ALL.into_iter()
            .find(|c| word(*c) == w)
            .ok_or_else(|| D::Error::custom(format!("unknown update cause {w:?}")))
    }
}
