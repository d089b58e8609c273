//! The UVE-2 dispatcher: consumes each connection's incoming requests and
//! answers each one from the layers below. Requests that take long (UIF
//! release, UA install, suspend) run as their own tasks, on the daemon's
//! tracker, so heartbeats and other requests keep flowing; bundle bytes
//! are handled in order, inline.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uve_protocol::link::Incoming;
use uve_protocol::message::{AgentStatus, ErrorCode, Request, Response, WireError};
use uve_protocol::names::UserName;

use super::Backend;

/// What the host's requests are answered from.
pub struct Dispatcher {
    /// The lifecycle, the grants and the task tracker.
    pub backend: Backend,
}

impl Dispatcher {
    /// Serves the requests of every connection `conns` hands over, until
    /// `stop` is cancelled.
    pub async fn run(
        self: Arc<Self>,
        mut conns: mpsc::Receiver<mpsc::Receiver<Incoming>>,
        stop: CancellationToken,
    ) {
        loop {
            tokio::select! {
                next = conns.recv() => match next {
                    Some(incoming) => {
                        self.backend.tasks.spawn(self.clone().serve(incoming, stop.clone()));
                    }
                    None => return,
                },
                () = stop.cancelled() => return,
            }
        }
    }

    /// Serves one connection's requests until the link ends.
    async fn serve(
        self: Arc<Self>,
        mut incoming: mpsc::Receiver<Incoming>,
        stop: CancellationToken,
    ) {
        loop {
            let next = tokio::select! {
                next = incoming.recv() => next,
                () = stop.cancelled() => None,
            };
            let Some(Incoming { request, responder }) = next else {
                return;
            };
            match request {
                // Order matters for bundle bytes: handle inline.
                Request::UaBegin(_) | Request::UaBundleData { .. } | Request::Ping { .. } => {
                    let answer = self.handle(request).await;
                    let _ = responder.send(answer).await;
                }
                other => {
                    let me = self.clone();
                    self.backend.tasks.spawn(async move {
                        let answer = me.handle(other).await;
                        let _ = responder.send(answer).await;
                    });
                }
            }
        }
    }

    /// Answers one request.
    pub async fn handle(&self, request: Request) -> Response {
        match self.answer(request).await {
            Ok(r) | Err(r) => r,
        }
    }

    async fn answer(&self, request: Request) -> Result<Response, Response> {
        match request {
            Request::Ping { nonce } => Ok(Response::Pong { nonce }),
            Request::AgentStatus => Ok(Response::Status(self.status())),
            Request::UserRelease { user, deadline_ms } => {
                Ok(self.release(&user, deadline_ms).await)
            }
            r @ (Request::MonitorGrant { .. } | Request::MonitorRevoke { .. }) => {
                self.monitor(r).await
            }
            r @ (Request::UaBegin(_)
            | Request::UaBundleData { .. }
            | Request::UaCommit { .. }
            | Request::UaRollback { .. }
            | Request::UaDelete { .. }) => self.ua(r).await,
            Request::SessionSuspend { session } => self.suspend(&session, true).await,
            Request::SessionResume { session } => self.suspend(&session, false).await,
            _ => Err(error(
                ErrorCode::Unsupported,
                "this request is served by the host",
            )),
        }
    }

    /// `UserRelease`: the VM switch, bounded by the host's deadline.
    async fn release(&self, user: &UserName, deadline_ms: u32) -> Response {
        let lc = &self.backend.lifecycle;
        let limit = std::time::Duration::from_millis(u64::from(deadline_ms));
        let committed = tokio::time::timeout(limit, lc.release(user))
            .await
            .unwrap_or_else(|_| {
                tracing::warn!(%user, "release did not finish before the host's deadline");
                lc.kick();
                None
            });
        Response::Released { committed }
    }

    /// `MonitorGrant`, `MonitorRevoke`.
    async fn monitor(&self, request: Request) -> Result<Response, Response> {
        let changed = match request {
            Request::MonitorGrant {
                session,
                monitor,
                expires,
            } => self.backend.grants.grant(&session, &monitor, expires).await,
            Request::MonitorRevoke { session, monitor } => {
                self.backend.grants.revoke(&session, &monitor).await
            }
            _ => return Err(error(ErrorCode::BadRequest, "not a monitoring request")),
        };
        changed.map_err(|e| error(ErrorCode::Internal, e))?;
        Ok(Response::Ok)
    }

    /// UA deploy, update, rollback, delete.
    async fn ua(&self, request: Request) -> Result<Response, Response> {
        let uas = self.backend.lifecycle.uas();
        Ok(match request {
            Request::UaBegin(bundle) => {
                uas.begin(bundle).map_err(Response::Error)?;
                Response::Ok
            }
            Request::UaBundleData {
                transfer,
                offset,
                data,
            } => {
                uas.data(transfer, offset, &data).map_err(Response::Error)?;
                Response::Ok
            }
            Request::UaCommit { transfer } => {
                let version = uas.commit(transfer).await.map_err(Response::Error)?;
                tracing::info!(transfer, %version, "UA deployed");
                Response::UaCurrent { version }
            }
            Request::UaRollback { name } => {
                let version = uas.rollback(&name).await.map_err(Response::Error)?;
                tracing::info!(%name, %version, "UA rolled back");
                Response::UaCurrent { version }
            }
            Request::UaDelete { name, force } => {
                let stopped_sessions = self
                    .backend
                    .lifecycle
                    .delete_ua(&name, force)
                    .await
                    .map_err(Response::Error)?;
                Response::UaDeleted { stopped_sessions }
            }
            _ => return Err(error(ErrorCode::BadRequest, "not a UA request")),
        })
    }

    /// `SessionSuspend` (`freeze`) and `SessionResume`.
    async fn suspend(&self, session: &str, freeze: bool) -> Result<Response, Response> {
        self.backend
            .lifecycle
            .suspend(session, freeze)
            .await
            .map_err(Response::Error)?;
        Ok(Response::Ok)
    }

    /// The agent's status as sent to the host.
    pub fn status(&self) -> AgentStatus {
        self.backend.lifecycle.agent_status()
    }
}

fn error(code: ErrorCode, msg: impl std::fmt::Display) -> Response {
    Response::Error(WireError::new(code, msg))
}
