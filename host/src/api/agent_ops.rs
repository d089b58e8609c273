//! UVE-2 operations on a VM's agent: UA deploy/update/rollback/delete,
//! session suspend/resume, monitoring grants, status and ping. Each returns
//! the agent's answer or a clear error (503 when the VM is not connected).

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use uve_protocol::message::{Request, Response};
use uve_protocol::names::{SessionId, UaName, UaVersion, UserName};

use super::ApiState;
use super::extract::{ApiJson, ApiPath, ApiQuery};
use super::spool::spool;
use super::types::{
    DeployQuery, MonitorBody, MonitorGranted, MonitorRevokeQuery, MonitorRevoked, Pong,
    SessionAction, SessionActionDone, UaCurrent, UaDeleteQuery, UaDeleted, UaDeployed, VmStatus,
};
use super::{ApiError, ApiResult, check_name, name};
use crate::state::events::Event;
use crate::store::now_ms;
use crate::wire::uve2::{self, UaDeploy, Uve2Error};

fn known_vm(d: &ApiState, id: &str) -> ApiResult<()> {
    check_name("VM", id)?;
    if d.host.registry().vm(id).is_some() {
        Ok(())
    } else {
        Err(ApiError::not_found(format!("no VM {id}")))
    }
}

fn unexpected(r: Response) -> ApiError {
    Uve2Error::Unexpected(format!("{r:?}")).into()
}

/// `POST /v1/vms/{id}/ua?name=&version=&entry=&update=`: raw body = tar bundle.
pub async fn deploy(
    State(d): State<Arc<ApiState>>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<DeployQuery>,
    body: Body,
) -> ApiResult<Json<UaDeployed>> {
    known_vm(&d, &id)?;
    let ua_name: UaName = name(&q.name)?;
    let version: UaVersion = name(&q.version)?;
    uve2::link(&d.host, &id)?;
    let bundle = spool(body, d.host.tmp(), d.host.config().max_ua_bundle).await?;
    let ua = UaDeploy {
        name: ua_name,
        version,
        entry: q.entry.split_whitespace().map(str::to_string).collect(),
        update: q.update,
    };
    let current =
        uve2::deploy_ua(&d.host, &id, ua, &bundle.path, bundle.size, bundle.digest).await?;
    d.host.emit(Event::UaDeployed {
        vm: id.clone(),
        name: q.name.clone(),
        version: current.to_string(),
        update: q.update,
        size: bundle.size,
    });
    Ok(Json(UaDeployed {
        vm: id,
        name: q.name,
        current: current.into(),
        size: bundle.size,
        digest: bundle.digest.to_hex(),
    }))
}

/// `POST /v1/vms/{id}/ua/{name}/rollback`.
pub async fn ua_rollback(
    State(d): State<Arc<ApiState>>,
    ApiPath((id, raw)): ApiPath<(String, String)>,
) -> ApiResult<Json<UaCurrent>> {
    known_vm(&d, &id)?;
    let ua: UaName = name(&raw)?;
    match uve2::call(&d.host, &id, Request::UaRollback { name: ua.clone() }).await? {
        Response::UaCurrent { version } => {
            d.host.emit(Event::UaRolledBack {
                vm: id.clone(),
                name: ua.to_string(),
                version: version.to_string(),
            });
            Ok(Json(UaCurrent {
                vm: id,
                name: ua.into(),
                current: version.into(),
            }))
        }
        other => Err(unexpected(other)),
    }
}

/// `DELETE /v1/vms/{id}/ua/{name}[?force=true]`.
pub async fn ua_delete(
    State(d): State<Arc<ApiState>>,
    ApiPath((id, raw)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<UaDeleteQuery>,
) -> ApiResult<Json<UaDeleted>> {
    known_vm(&d, &id)?;
    let ua: UaName = name(&raw)?;
    let req = Request::UaDelete {
        name: ua.clone(),
        force: q.force,
    };
    match uve2::call(&d.host, &id, req).await? {
        Response::UaDeleted { stopped_sessions } => {
            let stopped: Vec<String> = stopped_sessions.into_iter().map(String::from).collect();
            d.host.emit(Event::UaDeleted {
                vm: id.clone(),
                name: ua.to_string(),
                stopped_sessions: stopped.clone(),
            });
            Ok(Json(UaDeleted {
                vm: id,
                name: ua.into(),
                stopped_sessions: stopped,
            }))
        }
        other => Err(unexpected(other)),
    }
}

/// `POST /v1/vms/{id}/sessions/{session}/{suspend|resume}`.
pub async fn session_action(
    State(d): State<Arc<ApiState>>,
    ApiPath((id, session, action)): ApiPath<(String, String, String)>,
) -> ApiResult<Json<SessionActionDone>> {
    known_vm(&d, &id)?;
    let s: SessionId = name(&session)?;
    let Some(action) = SessionAction::parse(&action) else {
        return Err(ApiError::not_found("action must be suspend or resume"));
    };
    let req = match action {
        SessionAction::Suspend => Request::SessionSuspend { session: s },
        SessionAction::Resume => Request::SessionResume { session: s },
    };
    uve2::expect_ok(uve2::call(&d.host, &id, req).await?)?;
    let (vm, s) = (id.clone(), session.clone());
    d.host.emit(match action {
        SessionAction::Suspend => Event::SessionSuspended { vm, session: s },
        SessionAction::Resume => Event::SessionResumed { vm, session: s },
    });
    Ok(Json(SessionActionDone {
        vm: id,
        session,
        action,
    }))
}

/// `POST /v1/vms/{id}/monitor`.
pub async fn monitor_grant(
    State(d): State<Arc<ApiState>>,
    ApiPath(id): ApiPath<String>,
    ApiJson(b): ApiJson<MonitorBody>,
) -> ApiResult<Json<MonitorGranted>> {
    known_vm(&d, &id)?;
    let session: SessionId = name(&b.session)?;
    let monitor: UserName = name(&b.monitor)?;
    let expires = now_ms().saturating_add(b.ttl_secs.saturating_mul(1000));
    let req = Request::MonitorGrant {
        session,
        monitor,
        expires,
    };
    uve2::expect_ok(uve2::call(&d.host, &id, req).await?)?;
    d.host.emit(Event::MonitorGranted {
        vm: id.clone(),
        session: b.session.clone(),
        monitor: b.monitor.clone(),
        expires,
    });
    Ok(Json(MonitorGranted {
        vm: id,
        session: b.session,
        monitor: b.monitor,
        expires,
    }))
}

/// `DELETE /v1/vms/{id}/monitor?session=&monitor=`.
pub async fn monitor_revoke(
    State(d): State<Arc<ApiState>>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<MonitorRevokeQuery>,
) -> ApiResult<Json<MonitorRevoked>> {
    known_vm(&d, &id)?;
    let (Some(session), Some(monitor)) = (q.session, q.monitor) else {
        return Err(ApiError::bad_request("session and monitor are required"));
    };
    let req = Request::MonitorRevoke {
        session: name(&session)?,
        monitor: name(&monitor)?,
    };
    uve2::expect_ok(uve2::call(&d.host, &id, req).await?)?;
    d.host.emit(Event::MonitorRevoked {
        vm: id.clone(),
        session: session.clone(),
        monitor: monitor.clone(),
    });
    Ok(Json(MonitorRevoked {
        vm: id,
        session,
        monitor,
        revoked: true,
    }))
}

/// `GET /v1/vms/{id}/status`.
pub async fn status(
    State(d): State<Arc<ApiState>>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<VmStatus>> {
    known_vm(&d, &id)?;
    match uve2::call(&d.host, &id, Request::AgentStatus).await? {
        Response::Status(s) => Ok(Json(VmStatus::new(id, s))),
        other => Err(unexpected(other)),
    }
}

/// `POST /v1/vms/{id}/ping`.
pub async fn ping(
    State(d): State<Arc<ApiState>>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Pong>> {
    known_vm(&d, &id)?;
    let nonce = now_ms();
    match uve2::call(&d.host, &id, Request::Ping { nonce }).await? {
        Response::Pong { nonce: n } if n == nonce => Ok(Json(Pong { vm: id, pong: true })),
        other => Err(unexpected(other)),
    }
}
