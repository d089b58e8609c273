//! VMs, assignments and sessions.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;

use super::ApiState;
use super::extract::{ApiJson, ApiPath, ApiQuery};
use super::types::{
    AssignBody, AssignOutcome, Assignments, NewVm, SessionRec, SessionsQuery, VmDetail, VmInfo,
    VmRemoveQuery,
};
use super::{ApiError, ApiResult, check_name, name};
use crate::state::events::Event;
use crate::state::registry::{RegistryError, VmSpec};
use crate::wire::uve2::switch;
use uve_protocol::names::UserName;

fn vm_info(d: &ApiState, spec: &VmSpec) -> VmInfo {
    let connection = d.host.conns().get(&spec.id).map(|c| c.summary);
    VmInfo {
        id: spec.id.clone(),
        cid: spec.cid,
        uds_path: spec.uds_path.clone(),
        port: spec.port,
        unix: spec.unix.clone(),
        listen_path: spec.listen_path(d.host.config().port),
        connected: connection.is_some(),
        connection,
    }
}

/// `GET /v1/vms`.
pub async fn list(State(d): State<Arc<ApiState>>) -> Json<Vec<VmInfo>> {
    let vms = d.host.registry().vms();
    Json(vms.iter().map(|s| vm_info(&d, s)).collect())
}

/// `POST /v1/vms`.
pub async fn create(
    State(d): State<Arc<ApiState>>,
    ApiJson(spec): ApiJson<NewVm>,
) -> ApiResult<(StatusCode, Json<VmInfo>)> {
    d.host
        .registry()
        .add_vm(spec.clone())?
        .durable()
        .await
        .map_err(RegistryError::from)?;
    if let Err(e) = d.listeners.start(&d.host, &spec) {
        if let Ok(removed) = d.host.registry().remove_vm(&spec.id) {
            let _ = removed.durable().await;
        }
        return Err(ApiError::bad_request(format!(
            "cannot listen for VM: {e:#}"
        )));
    }
    d.host.emit(Event::VmRegistered {
        vm: spec.id.clone(),
    });
    Ok((StatusCode::CREATED, Json(vm_info(&d, &spec))))
}

/// `GET /v1/vms/{id}`.
pub async fn show(
    State(d): State<Arc<ApiState>>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<VmDetail>> {
    check_name("VM", &id)?;
    let spec = d
        .host
        .registry()
        .vm(&id)
        .ok_or_else(|| ApiError::not_found(format!("no VM {id}")))?;
    let assigned_users = d
        .host
        .registry()
        .assignments()
        .into_iter()
        .filter(|(_, vm)| *vm == id)
        .map(|(u, _)| u)
        .collect();
    Ok(Json(VmDetail {
        vm: vm_info(&d, &spec),
        sessions: d.host.sessions().list(Some(&id)),
        assigned_users,
    }))
}

/// `DELETE /v1/vms/{id}`.
pub async fn remove(
    State(d): State<Arc<ApiState>>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<VmRemoveQuery>,
) -> ApiResult<StatusCode> {
    check_name("VM", &id)?;
    if d.host.registry().vm(&id).is_none() {
        return Err(RegistryError::NoSuchVm(id).into());
    }
    if !q.force {
        // As unassign does: the VM flushes and releases its users first
        // (bounded by handover_timeout_ms), so nothing of theirs is lost.
        let asked = switch::release_all(&d.host, &id).await;
        if !asked.is_empty() {
            tracing::info!(vm = id, users = ?asked, "asked to release its users before removal");
        }
    }
    d.host
        .registry()
        .remove_vm(&id)?
        .durable()
        .await
        .map_err(RegistryError::from)?;
    d.listeners.stop(&id);
    d.host.handshakes().forget(&id);
    d.host.forget_rates(&id);
    // A VM registered later under this id inherits no lease.
    if let Err(e) = d.host.leases().forget_vm(&id).durable().await {
        tracing::error!(
            vm = id,
            "the removed VM's leases not forgotten on disk: {e}"
        );
    }
    if let Some(c) = d.host.conns().get(&id) {
        c.handle.goodbye("VM unregistered").await;
    }
    d.host.emit(Event::VmUnregistered {
        vm: id,
        forced: q.force,
    });
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/assignments`.
pub async fn assignments(State(d): State<Arc<ApiState>>) -> Json<Assignments> {
    Json(d.host.registry().assignments())
}

/// `PUT /v1/assignments/{user}`.
pub async fn assign(
    State(d): State<Arc<ApiState>>,
    ApiPath(user): ApiPath<String>,
    ApiJson(body): ApiJson<AssignBody>,
) -> ApiResult<Json<AssignOutcome>> {
    let user: UserName = name(&user)?;
    check_name("VM", &body.vm)?;
    Ok(Json(switch::assign(&d.host, &user, &body.vm).await?))
}

/// `DELETE /v1/assignments/{user}`.
pub async fn unassign(
    State(d): State<Arc<ApiState>>,
    ApiPath(user): ApiPath<String>,
) -> ApiResult<Json<AssignOutcome>> {
    let user: UserName = name(&user)?;
    Ok(Json(switch::unassign(&d.host, &user).await?))
}

/// `GET /v1/sessions[?vm=]`.
pub async fn sessions(
    State(d): State<Arc<ApiState>>,
    ApiQuery(q): ApiQuery<SessionsQuery>,
) -> ApiResult<Json<Vec<SessionRec>>> {
    if let Some(vm) = &q.vm {
        check_name("VM", vm)?;
    }
    Ok(Json(d.host.sessions().list(q.vm.as_deref())))
}
