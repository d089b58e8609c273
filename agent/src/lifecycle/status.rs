//! What the agent shows of itself: the local status (`uve-agent status`,
//! filtered by who asks) and the status the host asks for (UVE-2
//! `AgentStatus`).

use serde::{Deserialize, Serialize};
use uve_protocol::message::{AgentStatus, SessionInfo, UaInfo};
use uve_protocol::names::{SessionId, UaName, UserName};

use super::Lifecycle;

/// The agent's state as shown by `uve-agent status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StatusReport {
    /// Connected to the host.
    pub connected: bool,
    /// The VM id the host assigned, when connected.
    pub vm_id: Option<String>,
    /// Host endpoint.
    pub host: String,
    /// Open sessions.
    pub sessions: Vec<SessionStatus>,
    /// Users with an attached UIF.
    pub attached: Vec<UserName>,
    /// What concerns the whole VM: shown to root only (`None`, and absent
    /// from the JSON, for anyone else).
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmWide>,
}

/// The VM-wide part of [`StatusReport`] (root only).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VmWide {
    /// Deployed UAs.
    pub uas: Vec<UaStatus>,
    /// Updates in the offline spool.
    pub spooled_updates: usize,
    /// Disconnect notices not yet acknowledged.
    pub pending_notices: usize,
    /// Live monitoring grants (filled in by the control socket, which
    /// holds them).
    pub monitor_grants: usize,
    /// Preserved copies of refused updates, and the bytes they hold.
    #[serde(default)]
    pub preserved: usize,
    /// Bytes held by preserved copies.
    #[serde(default)]
    pub preserved_bytes: u64,
    /// Refused updates held in place (over the preserved area's budget):
    /// their users' logins on this VM are refused until root resolves
    /// them. Not counted in `preserved`.
    #[serde(default)]
    pub held: usize,
    /// Control connections refused by the per-uid budget since the agent
    /// started (filled in by the control socket).
    #[serde(default)]
    pub control_refused: u64,
}

/// One session in [`StatusReport`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionStatus {
    /// Session id.
    pub session: SessionId,
    /// User.
    pub user: UserName,
    /// UA.
    pub ua: Option<UaName>,
    /// Supervised UA pid.
    pub pid: Option<i32>,
    /// Suspended.
    pub suspended: bool,
}

/// One deployed UA in [`StatusReport`]: what the host is told of it
/// (its name, the version `current` points at, the one kept for
/// rollback).
pub type UaStatus = UaInfo;

impl Lifecycle {
    /// The uid of `user` on this VM: their user-database entry's, as it
    /// was at login; `None` without one (no UIF attached, or a user the
    /// database does not know). Never the `uif.owner` override, which may
    /// map every user to one uid: the override decides who owns the
    /// files, not who may act on a user's sessions.
    pub fn uid_of(&self, user: &str) -> Option<u32> {
        self.table.uif(user).and_then(|r| r.account).map(|a| a.uid)
    }

    /// The local status, showing only the sessions and UIFs of users for
    /// whom `visible` is true, and the VM-wide figures if `vm_wide`.
    pub fn status(&self, visible: impl Fn(&str) -> bool, vm_wide: bool) -> StatusReport {
        let conn = self.link.current();
        let table = self.table.snapshot();
        let preserved = if vm_wide {
            self.flusher.preserved().list()
        } else {
            Vec::new()
        };
        StatusReport {
            connected: conn.is_some(),
            vm_id: conn.map(|c| c.welcome.vm_id),
            host: self.config.get().host.clone(),
            sessions: table
                .sessions
                .values()
                .filter(|s| visible(&s.user))
                .map(|s| SessionStatus {
                    session: s.session.clone(),
                    user: s.user.clone(),
                    ua: s.ua.clone(),
                    pid: self.supervisor.pid(&s.session),
                    suspended: self.supervisor.is_suspended(&s.session),
                })
                .collect(),
            attached: table.uifs.keys().filter(|u| visible(u)).cloned().collect(),
            vm: vm_wide.then(|| VmWide {
                uas: self.uas.list(),
                spooled_updates: self.flusher.pending_updates(),
                pending_notices: self.notices.count(),
                monitor_grants: 0,
                preserved: preserved.iter().filter(|c| c.held.is_none()).count(),
                preserved_bytes: preserved
                    .iter()
                    .filter(|c| c.held.is_none())
                    .map(|c| c.size)
                    .sum(),
                held: preserved.iter().filter(|c| c.held.is_some()).count(),
                control_refused: 0,
            }),
        }
    }

    /// The agent's status as sent to the host.
    pub fn agent_status(&self) -> AgentStatus {
        let sessions = self
            .table
            .sessions()
            .into_iter()
            .map(|s| SessionInfo {
                suspended: self.supervisor.is_suspended(&s.session),
                session: s.session,
                user: s.user,
                ua: s.ua,
            })
            .collect();
        AgentStatus {
            sessions,
            uas: self.uas.list(),
            spooled_updates: u32::try_from(self.flusher.pending_updates()).unwrap_or(u32::MAX),
        }
    }
}
