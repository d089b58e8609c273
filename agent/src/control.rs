//! The local control socket: one JSON object per line in each direction,
//! one request per connection. Used by the CLI verbs of this binary (and so
//! by the PAM hook), display managers and UAs. Access is controlled by the
//! socket's file mode (`control_socket_mode`, default 0600).
//!
//! Request: `{"op":"login","user":"alice","session":"s1","ua":null}`,
//! `{"op":"logout","session":"s1"}`, `{"op":"disconnect","session":"s1",
//! "reason":"..."}`, `{"op":"status"}`, `{"op":"monitor-check",
//! "session":"s1","user":"bob"}`. Response: `{"ok":true,"message":"...",
//! "outcome":"committed"|"spooled"|..., "allowed":bool, "status":{...}}`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::agent::Agent;
use crate::flush::FlushOutcome;
use crate::lifecycle;

/// Longest request line accepted.
const MAX_LINE: u64 = 64 * 1024;

/// A request from a local client.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum ControlRequest {
    /// Open a session; answered when the UIF is ready.
    Login {
        /// User.
        user: String,
        /// Session id.
        session: String,
        /// UA to start and supervise.
        #[serde(default)]
        ua: Option<String>,
    },
    /// End a session; answered when committed or spooled.
    Logout {
        /// Session id.
        session: String,
    },
    /// Report an unexpected disconnect of a session.
    Disconnect {
        /// Session id.
        session: String,
        /// Why.
        reason: String,
    },
    /// The agent's state.
    Status,
    /// May `user` monitor `session`?
    MonitorCheck {
        /// Session id.
        session: String,
        /// The would-be monitor.
        user: String,
    },
}

/// The answer to a [`ControlRequest`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ControlResponse {
    /// Success.
    pub ok: bool,
    /// Human-readable result or error.
    pub message: String,
    /// For logout/disconnect: committed, conflict, spooled, rejected, nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// For monitor-check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed: Option<bool>,
    /// For status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<StatusReport>,
}

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
    pub attached: Vec<String>,
    /// Deployed UAs: name, current, previous.
    pub uas: Vec<(String, String, Option<String>)>,
    /// Updates in the offline spool.
    pub spooled_updates: usize,
    /// Disconnect notices not yet acknowledged.
    pub pending_notices: usize,
    /// Live monitoring grants.
    pub monitor_grants: usize,
}

/// One session in [`StatusReport`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionStatus {
    /// Session id.
    pub session: String,
    /// User.
    pub user: String,
    /// UA.
    pub ua: Option<String>,
    /// Supervised UA pid.
    pub pid: Option<i32>,
    /// Suspended.
    pub suspended: bool,
}

/// Binds the control socket with the configured mode.
pub fn bind(path: &Path, mode: u32) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = uve_protocol::transport::bind_unix(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// Accepts control connections forever.
pub async fn serve(agent: Arc<Agent>, listener: tokio::net::UnixListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(client(agent.clone(), stream));
            }
            Err(e) => {
                tracing::warn!("control accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn client(agent: Arc<Agent>, stream: UnixStream) {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(r, MAX_LINE));
    let response = match reader.read_line(&mut line).await {
        Ok(0) => return,
        Ok(_) => match serde_json::from_str::<ControlRequest>(line.trim()) {
            Ok(req) => handle(&agent, req).await,
            Err(e) => failure(format!("bad request: {e}")),
        },
        Err(e) => failure(format!("cannot read request: {e}")),
    };
    if let Ok(mut bytes) = serde_json::to_vec(&response) {
        bytes.push(b'\n');
        let _ = w.write_all(&bytes).await;
    }
}

fn failure(message: String) -> ControlResponse {
    ControlResponse {
        ok: false,
        message,
        ..ControlResponse::default()
    }
}

fn flushed(outcome: FlushOutcome) -> ControlResponse {
    let (ok, kind) = match &outcome {
        FlushOutcome::Committed(_) => (true, "committed"),
        FlushOutcome::Conflict { .. } => (true, "conflict"),
        FlushOutcome::Spooled(_) => (true, "spooled"),
        FlushOutcome::Nothing(_) => (true, "nothing"),
        FlushOutcome::Unchanged(_) => (true, "unchanged"),
        FlushOutcome::Rejected(_) => (false, "rejected"),
    };
    ControlResponse {
        ok,
        message: outcome.to_string(),
        outcome: Some(kind.into()),
        ..ControlResponse::default()
    }
}

/// Serves one request.
pub async fn handle(agent: &Arc<Agent>, req: ControlRequest) -> ControlResponse {
    match req {
        ControlRequest::Login { user, session, ua } => {
            match lifecycle::login(agent, &user, &session, ua.as_deref()).await {
                Ok(message) => ControlResponse {
                    ok: true,
                    message,
                    ..ControlResponse::default()
                },
                Err(e) => failure(e.to_string()),
            }
        }
        ControlRequest::Logout { session } => match lifecycle::logout(agent, &session).await {
            Ok(o) => flushed(o),
            Err(e) => failure(e.to_string()),
        },
        ControlRequest::Disconnect { session, reason } => {
            match lifecycle::disconnect(agent, &session, &reason).await {
                Ok(o) => flushed(o),
                Err(e) => failure(e.to_string()),
            }
        }
        ControlRequest::MonitorCheck { session, user } => {
            let allowed = agent.grants.allowed(&session, &user);
            ControlResponse {
                ok: true,
                message: if allowed { "allowed" } else { "not allowed" }.into(),
                allowed: Some(allowed),
                ..ControlResponse::default()
            }
        }
        ControlRequest::Status => ControlResponse {
            ok: true,
            message: "ok".into(),
            status: Some(report(agent)),
            ..ControlResponse::default()
        },
    }
}

fn report(agent: &Agent) -> StatusReport {
    let conn = agent.conn.current();
    let table = agent.snapshot();
    StatusReport {
        connected: conn.is_some(),
        vm_id: conn.map(|c| c.welcome.vm_id),
        host: agent.config().host.clone(),
        sessions: table
            .sessions
            .values()
            .map(|s| SessionStatus {
                session: s.session.clone(),
                user: s.user.clone(),
                ua: s.ua.clone(),
                pid: agent.supervisor.pid(&s.session),
                suspended: agent.supervisor.is_suspended(&s.session),
            })
            .collect(),
        attached: table.uifs.keys().cloned().collect(),
        uas: agent
            .uas
            .list()
            .into_iter()
            .map(|u| (u.name, u.current, u.previous))
            .collect(),
        spooled_updates: agent.spool.count(),
        pending_notices: agent.notices.count(),
        monitor_grants: agent.grants.count(),
    }
}
