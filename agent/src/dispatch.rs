//! The UVE-2 dispatcher: consumes the link's incoming requests and answers
//! each one from the domain modules. Requests that take long (UIF release,
//! UA install, suspend) run in their own task so heartbeats and other
//! requests keep flowing; bundle bytes are handled in order, inline.

use std::sync::Arc;

use tokio::sync::mpsc;
use uve_protocol::link::Incoming;
use uve_protocol::message::{AgentStatus, ErrorCode, Request, Response, SessionInfo, WireError};
use uve_protocol::names;

use crate::agent::Agent;

/// Serves incoming requests until the link ends.
pub async fn serve(agent: Arc<Agent>, mut incoming: mpsc::Receiver<Incoming>) {
    while let Some(Incoming { request, responder }) = incoming.recv().await {
        match request {
            // Order matters for bundle bytes: handle inline.
            Request::UaBegin(_) | Request::UaBundleData { .. } | Request::Ping { .. } => {
                let answer = handle(&agent, request).await;
                let _ = responder.send(answer).await;
            }
            other => {
                let agent = agent.clone();
                tokio::spawn(async move {
                    let answer = handle(&agent, other).await;
                    let _ = responder.send(answer).await;
                });
            }
        }
    }
}

fn error(code: ErrorCode, msg: impl std::fmt::Display) -> Response {
    Response::Error(WireError::new(code, msg))
}

fn name_ok(kind: &'static str, name: &str) -> Result<(), Response> {
    names::validate(kind, name).map_err(|e| error(ErrorCode::InvalidName, e))
}

/// Answers one request.
pub async fn handle(agent: &Arc<Agent>, request: Request) -> Response {
    match answer(agent, request).await {
        Ok(r) | Err(r) => r,
    }
}

async fn answer(agent: &Arc<Agent>, request: Request) -> Result<Response, Response> {
    Ok(match request {
        Request::Ping { nonce } => Response::Pong { nonce },
        Request::AgentStatus => Response::Status(status(agent)),
        Request::MonitorGrant {
            session,
            monitor,
            expires,
        } => {
            name_ok("session", &session)?;
            name_ok("monitor", &monitor)?;
            agent
                .grants
                .grant(&session, &monitor, expires)
                .map_err(|e| error(ErrorCode::Internal, e))?;
            Response::Ok
        }
        Request::MonitorRevoke { session, monitor } => {
            name_ok("session", &session)?;
            name_ok("monitor", &monitor)?;
            agent
                .grants
                .revoke(&session, &monitor)
                .map_err(|e| error(ErrorCode::Internal, e))?;
            Response::Ok
        }
        Request::UserRelease { user, deadline_ms } => {
            name_ok("user", &user)?;
            let limit = std::time::Duration::from_millis(u64::from(deadline_ms));
            let committed = tokio::time::timeout(limit, crate::lifecycle::release(agent, &user))
                .await
                .unwrap_or_else(|_| {
                    tracing::warn!(user, "release did not finish before the host's deadline");
                    agent.kick.notify_one();
                    None
                });
            Response::Released { committed }
        }
        Request::UaBegin(bundle) => {
            agent.uas.begin(bundle).map_err(Response::Error)?;
            Response::Ok
        }
        Request::UaBundleData {
            transfer,
            offset,
            data,
        } => {
            agent
                .uas
                .data(transfer, offset, &data)
                .map_err(Response::Error)?;
            Response::Ok
        }
        Request::UaCommit { transfer } => {
            let version = agent.uas.commit(transfer).await.map_err(Response::Error)?;
            tracing::info!(transfer, version, "UA deployed");
            Response::UaCurrent { version }
        }
        Request::UaRollback { name } => {
            let version = agent.uas.rollback(&name).map_err(Response::Error)?;
            tracing::info!(name, version, "UA rolled back");
            Response::UaCurrent { version }
        }
        Request::UaDelete { name, force } => {
            name_ok("UA", &name)?;
            let users = agent.snapshot().sessions_using(&name);
            if !users.is_empty() && !force {
                return Err(error(
                    ErrorCode::UaInUse,
                    format!("UA {name} serves sessions {}", users.join(", ")),
                ));
            }
            for s in &users {
                if let Err(e) = crate::lifecycle::logout(agent, s).await {
                    tracing::error!(session = %s, "stopping session for UA delete: {e}");
                }
            }
            agent.uas.remove(&name).map_err(Response::Error)?;
            Response::UaDeleted {
                stopped_sessions: users,
            }
        }
        Request::SessionSuspend { session } | Request::SessionResume { session }
            if !agent.snapshot().sessions.contains_key(&session) =>
        {
            return Err(error(ErrorCode::NotFound, format!("no session {session}")));
        }
        Request::SessionSuspend { session } => {
            crate::supervise::set_suspended(agent, &session, true)
                .await
                .map_err(|e| error(ErrorCode::BadRequest, e))?;
            Response::Ok
        }
        Request::SessionResume { session } => {
            crate::supervise::set_suspended(agent, &session, false)
                .await
                .map_err(|e| error(ErrorCode::BadRequest, e))?;
            Response::Ok
        }
        _ => {
            return Err(error(
                ErrorCode::Unsupported,
                "this request is served by the host",
            ));
        }
    })
}

/// The agent's status as sent to the host.
pub fn status(agent: &Agent) -> AgentStatus {
    let sessions = agent
        .snapshot()
        .sessions
        .into_values()
        .map(|s| SessionInfo {
            suspended: agent.supervisor.is_suspended(&s.session),
            session: s.session,
            user: s.user,
            ua: s.ua,
        })
        .collect();
    AgentStatus {
        sessions,
        uas: agent.uas.list(),
        spooled_updates: u32::try_from(agent.spool.count()).unwrap_or(u32::MAX),
    }
}
