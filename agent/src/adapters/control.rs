//! The local control socket: one JSON object per line in each direction,
//! one request per connection. Used by the CLI verbs of this binary (and so
//! by the PAM hook), display managers and UAs.
//!
//! Every connection is authorised by its caller's uid, read from the
//! kernel (`SO_PEERCRED`), never from the request: root may do everything;
//! the user of a session (for example its UA) may log it out, report its
//! disconnect, ask `monitor-check` about it and see it in `status`; anyone
//! else is refused with the rule that refused them. The socket's file mode
//! (`control_socket_mode`, default 0600) is a second fence, no longer the
//! only one. Connections are admitted by uid ([`super::admission`]: root
//! always, any other uid a few at once); a request line must arrive within
//! [`REQUEST_LIMIT`], and the answer be taken within [`ANSWER_LIMIT`].
//!
//! Request: `{"op":"login","user":"alice","session":"s1","ua":null}`,
//! `{"op":"logout","session":"s1"}`, `{"op":"disconnect","session":"s1",
//! "reason":"..."}`, `{"op":"status"}`, `{"op":"monitor-check",
//! "session":"s1","user":"bob"}`, `{"op":"preserved-list"}`,
//! `{"op":"preserved-export","id":"…","to":"/abs/path"}`,
//! `{"op":"preserved-push","id":"…","keep":false}`,
//! `{"op":"preserved-delete","id":"…"}`. Response: `{"ok":true,
//! "message":"...", "outcome":"committed"|"spooled"|..., "allowed":bool,
//! "status":{...}, "preserved":[...]}`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use uve_protocol::names::{SessionId, UaName, UserName};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::Backend;
use super::admission::Admission;
use crate::flush::FlushOutcome;
use crate::lifecycle::{Ended, LoginReport};
pub use crate::lifecycle::{SessionStatus, StatusReport, UaStatus};
use crate::stores::preserve::PreservedCopy;

/// Longest request line accepted.
const MAX_LINE: u64 = 64 * 1024;

/// How long a client may take to send its request line.
pub const REQUEST_LIMIT: Duration = Duration::from_secs(10);

/// How long writing the answer may take (a client that stops reading).
pub const ANSWER_LIMIT: Duration = Duration::from_secs(10);

/// A request from a local client.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum ControlRequest {
    /// Open a session; answered when the UIF is ready.
    Login {
        /// The user as typed at the login prompt or as the directory spells
        /// them (`alice`, `CORP\\alice`, `alice@corp.example`): the agent
        /// makes the store name (see `Lifecycle::identify`).
        user: String,
        /// Session id.
        session: SessionId,
        /// UA to start and supervise.
        #[serde(default)]
        ua: Option<UaName>,
    },
    /// End a session; answered when committed or spooled.
    Logout {
        /// Session id.
        session: SessionId,
    },
    /// Report an unexpected disconnect of a session.
    Disconnect {
        /// Session id.
        session: SessionId,
        /// Why.
        reason: String,
    },
    /// The agent's state.
    Status,
    /// May `user` monitor `session`?
    MonitorCheck {
        /// Session id.
        session: SessionId,
        /// The would-be monitor.
        user: UserName,
    },
    /// The preserved copies of refused updates.
    PreservedList,
    /// Copy a preserved copy's bytes to a new file.
    PreservedExport {
        /// The copy.
        id: String,
        /// Absolute path of the new file (never replaced if it exists).
        to: PathBuf,
    },
    /// Send a preserved copy to the host as a conflict version.
    PreservedPush {
        /// The copy.
        id: String,
        /// Keep the copy after the host took it.
        #[serde(default)]
        keep: bool,
    },
    /// Delete a preserved copy.
    PreservedDelete {
        /// The copy.
        id: String,
    },
}

/// Why a caller may not make a request: each variant is a rule, and its
/// message says it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// A session action by someone other than the session's user.
    #[error(
        "uid {uid} may act only on its own sessions, and {session} is not one of them (root may act on any)"
    )]
    NotYourSession {
        /// The caller.
        uid: u32,
        /// The session.
        session: SessionId,
    },
    /// A login by someone other than root.
    #[error("only root opens sessions (the PAM hook runs as root); uid {uid} may not")]
    LoginNeedsRoot {
        /// The caller.
        uid: u32,
    },
    /// Preserved copies handled by someone other than root.
    #[error("only root handles preserved copies; uid {uid} may not")]
    PreservedNeedsRoot {
        /// The caller.
        uid: u32,
    },
}

/// The answer to a [`ControlRequest`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ControlResponse {
    /// Success.
    pub ok: bool,
    /// Human-readable result or error.
    pub message: String,
    /// For logout, disconnect and preserved-push: what became of the
    /// user's bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    /// For logout and disconnect: a session-table write that failed while
    /// the session ended (the outcome stands; see agent/README.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    /// For login: what it did (how the UIF was attached, which version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login: Option<LoginReport>,
    /// For monitor-check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed: Option<bool>,
    /// For status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<StatusReport>,
    /// For preserved-list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preserved: Option<Vec<PreservedCopy>>,
}

/// What a flush did with the user's bytes, as the control protocol says
/// it (see agent/README.md, "The user's bytes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The new head version.
    Committed,
    /// Kept as a conflict version beside the head.
    Conflict,
    /// Durable in the spool; delivered later.
    Spooled,
    /// Refused for good by the host; the bytes are preserved.
    Refused,
    /// A live checkpoint was not taken.
    NotTaken,
    /// Nothing to flush.
    Nothing,
    /// Unchanged since its base version.
    Unchanged,
}

impl Outcome {
    /// The outcome of `o`, and whether it counts as success.
    pub fn of(o: &FlushOutcome) -> (Outcome, bool) {
        match o {
            FlushOutcome::Committed(_) => (Outcome::Committed, true),
            FlushOutcome::Conflict { .. } => (Outcome::Conflict, true),
            FlushOutcome::Spooled(_) => (Outcome::Spooled, true),
            FlushOutcome::Nothing(_) => (Outcome::Nothing, true),
            FlushOutcome::Unchanged(_) => (Outcome::Unchanged, true),
            FlushOutcome::Refused { .. } => (Outcome::Refused, false),
            FlushOutcome::NotTaken(_) => (Outcome::NotTaken, false),
        }
    }
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

/// What control requests are answered from.
pub struct Control {
    /// The lifecycle, the grants and the task tracker.
    pub backend: Backend,
    /// The connections each uid holds.
    pub admission: Arc<Admission>,
}

impl Control {
    /// Accepts control connections until `stop` is cancelled, each
    /// admitted by its caller's uid ([`Admission`]).
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::UnixListener,
        stop: tokio_util::sync::CancellationToken,
    ) {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = stop.cancelled() => return,
            };
            match accepted {
                Ok((stream, _)) => {
                    let caller = match stream.peer_cred() {
                        Ok(c) => Caller { uid: c.uid() },
                        Err(e) => {
                            tracing::warn!("control client without credentials, refused: {e}");
                            continue;
                        }
                    };
                    let slot = match self.admission.admit(caller.uid) {
                        Ok(slot) => slot,
                        Err(why) => {
                            tracing::warn!(uid = caller.uid, "control connection refused: {why}");
                            // A fresh socket's buffer takes the line at once;
                            // nothing waits on a client that does not read.
                            if let Ok(mut bytes) = serde_json::to_vec(&failure(why)) {
                                bytes.push(b'\n');
                                let _ = stream.try_write(&bytes);
                            }
                            continue;
                        }
                    };
                    let me = self.clone();
                    self.backend.tasks.spawn(async move {
                        me.client(stream, caller).await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    tracing::warn!("control accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// Who is calling, as the kernel says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// The caller's effective uid.
    pub uid: u32,
}

impl Caller {
    /// True for root.
    pub fn is_root(self) -> bool {
        self.uid == 0
    }
}

impl Control {
    /// Serves one admitted connection of `caller`: one request, one
    /// answer.
    async fn client(&self, stream: UnixStream, caller: Caller) {
        let (r, mut w) = stream.into_split();
        let mut line = String::new();
        let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(r, MAX_LINE));
        let read = tokio::time::timeout(REQUEST_LIMIT, reader.read_line(&mut line)).await;
        let response = match read {
            Err(_) => failure(format!("no request within {REQUEST_LIMIT:?}")),
            Ok(Ok(0)) => return,
            Ok(Ok(_)) => match serde_json::from_str::<ControlRequest>(line.trim()) {
                Ok(req) => match self.authorise(caller, &req) {
                    Ok(()) => self.handle(caller, req).await,
                    Err(why) => {
                        tracing::warn!(uid = caller.uid, "control request refused: {why}");
                        failure(format!("permission denied: {why}"))
                    }
                },
                Err(e) => failure(format!("bad request: {e}")),
            },
            Ok(Err(e)) => failure(format!("cannot read request: {e}")),
        };
        if let Ok(mut bytes) = serde_json::to_vec(&response) {
            bytes.push(b'\n');
            if tokio::time::timeout(ANSWER_LIMIT, w.write_all(&bytes))
                .await
                .is_err()
            {
                tracing::warn!(
                    uid = caller.uid,
                    "control client did not take its answer within {ANSWER_LIMIT:?}"
                );
            }
        }
    }

    /// `user`'s uid on this VM (their entry's, never the `uif.owner`
    /// override), if any.
    fn uid_of(&self, user: &str) -> Option<u32> {
        self.backend.lifecycle.uid_of(user)
    }

    /// True if `caller` is the user of `session`.
    fn owns_session(&self, caller: Caller, session: &str) -> bool {
        let user = self.backend.lifecycle.session(session).map(|s| s.user);
        user.is_some_and(|u| self.uid_of(&u) == Some(caller.uid))
    }

    /// The one check at the top of every request: may `caller` make it?
    pub fn authorise(&self, caller: Caller, req: &ControlRequest) -> Result<(), Denied> {
        if caller.is_root() {
            return Ok(());
        }
        let uid = caller.uid;
        match req {
            ControlRequest::Status => Ok(()),
            ControlRequest::Logout { session }
            | ControlRequest::Disconnect { session, .. }
            | ControlRequest::MonitorCheck { session, .. } => {
                if self.owns_session(caller, session) {
                    Ok(())
                } else {
                    Err(Denied::NotYourSession {
                        uid,
                        session: session.clone(),
                    })
                }
            }
            ControlRequest::Login { .. } => Err(Denied::LoginNeedsRoot { uid }),
            ControlRequest::PreservedList
            | ControlRequest::PreservedExport { .. }
            | ControlRequest::PreservedPush { .. }
            | ControlRequest::PreservedDelete { .. } => Err(Denied::PreservedNeedsRoot { uid }),
        }
    }

    /// Serves one request of an authorised caller (see [`authorise`]).
    pub async fn handle(&self, caller: Caller, req: ControlRequest) -> ControlResponse {
        match req {
            ControlRequest::Login { user, session, ua } => {
                match self
                    .backend
                    .lifecycle
                    .login(&user, &session, ua.as_ref())
                    .await
                {
                    Ok(report) => ControlResponse {
                        message: report.to_string(),
                        login: Some(report),
                        ..success(String::new())
                    },
                    Err(e) => failure(e.to_string()),
                }
            }
            ControlRequest::Logout { session } => {
                match self.backend.lifecycle.logout(&session).await {
                    Ok(e) => ended(e),
                    Err(e) => failure(e.to_string()),
                }
            }
            ControlRequest::Disconnect { session, reason } => {
                match self.backend.lifecycle.disconnect(&session, &reason).await {
                    Ok(e) => ended(e),
                    Err(e) => failure(e.to_string()),
                }
            }
            ControlRequest::MonitorCheck { session, user } => {
                let allowed = self.backend.grants.allowed(&session, &user);
                ControlResponse {
                    allowed: Some(allowed),
                    ..success(if allowed { "allowed" } else { "not allowed" }.into())
                }
            }
            ControlRequest::Status => ControlResponse {
                status: Some(self.report(caller)),
                ..success("ok".into())
            },
            ControlRequest::PreservedList => {
                let list = self.backend.lifecycle.preserved();
                ControlResponse {
                    preserved: Some(list.clone()),
                    ..success(format!("{} preserved copies", list.len()))
                }
            }
            ControlRequest::PreservedExport { id, to } => {
                if !to.is_absolute() {
                    return failure(format!("{} is not an absolute path", to.display()));
                }
                match self.backend.lifecycle.export_preserved(&id, &to).await {
                    Ok(n) => success(format!(
                        "exported preserved copy {id} ({n} bytes) to {}",
                        to.display()
                    )),
                    Err(e) => failure(format!("cannot export preserved copy {id}: {e}")),
                }
            }
            ControlRequest::PreservedPush { id, keep } => {
                match self.backend.lifecycle.push_preserved(&id, keep).await {
                    Ok(o) => flushed(o),
                    Err(e) => failure(e.to_string()),
                }
            }
            ControlRequest::PreservedDelete { id } => {
                match self.backend.lifecycle.delete_preserved(&id).await {
                    Ok(()) => success(format!("deleted preserved copy {id}")),
                    Err(e) => failure(format!("cannot delete preserved copy {id}: {e}")),
                }
            }
        }
    }

    /// The status `caller` may see: everything for root, only their own
    /// sessions and UIF for anyone else (nothing VM-wide).
    fn report(&self, caller: Caller) -> StatusReport {
        let visible = |user: &str| caller.is_root() || self.uid_of(user) == Some(caller.uid);
        let mut report = self.backend.lifecycle.status(visible, caller.is_root());
        if let Some(vm) = &mut report.vm {
            vm.monitor_grants = self.backend.grants.count();
            vm.control_refused = self.admission.refused();
        }
        report
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
    let (kind, ok) = Outcome::of(&outcome);
    ControlResponse {
        ok,
        message: outcome.to_string(),
        outcome: Some(kind),
        ..ControlResponse::default()
    }
}

/// The answer to a logout or disconnect: the flush's outcome, with a
/// session-table error beside it in `warning` (and in the message).
fn ended(e: Ended) -> ControlResponse {
    ControlResponse {
        message: e.to_string(),
        warning: e.table.map(|t| t.to_string()),
        ..flushed(e.outcome)
    }
}

fn success(message: String) -> ControlResponse {
    ControlResponse {
        ok: true,
        message,
        ..ControlResponse::default()
    }
}
