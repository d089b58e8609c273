//! VMs, assignments and sessions.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiResult, check_name};
use crate::daemon::Daemon;
use crate::events::Event;
use crate::registry::VmSpec;
use crate::switch;

fn vm_json(d: &Daemon, spec: &VmSpec) -> Value {
    let conn = d.host.conns.get(&spec.id).map(|c| c.summary);
    json!({
        "id": spec.id,
        "cid": spec.cid,
        "uds_path": spec.uds_path,
        "port": spec.port,
        "unix": spec.unix,
        "listen_path": spec.listen_path(d.host.config.port),
        "connected": conn.is_some(),
        "connection": conn,
    })
}

/// `GET /v1/vms`.
pub async fn list(State(d): State<Arc<Daemon>>) -> Json<Value> {
    let vms: Vec<Value> = d
        .host
        .registry
        .vms()
        .iter()
        .map(|s| vm_json(&d, s))
        .collect();
    Json(Value::Array(vms))
}

/// `POST /v1/vms`.
pub async fn create(
    State(d): State<Arc<Daemon>>,
    Json(spec): Json<VmSpec>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    d.host.registry.add_vm(spec.clone())?;
    if let Err(e) = d.listeners.start(&d.host, &spec) {
        let _ = d.host.registry.remove_vm(&spec.id);
        return Err(ApiError::bad_request(format!(
            "cannot listen for VM: {e:#}"
        )));
    }
    d.host.events.emit(Event::VmRegistered {
        vm: spec.id.clone(),
    });
    Ok((StatusCode::CREATED, Json(vm_json(&d, &spec))))
}

/// `GET /v1/vms/{id}`.
pub async fn show(State(d): State<Arc<Daemon>>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let spec = d
        .host
        .registry
        .vm(&id)
        .ok_or_else(|| ApiError::not_found(format!("no VM {id}")))?;
    let mut v = vm_json(&d, &spec);
    v["sessions"] = json!(d.host.sessions.list(Some(&id)));
    let users: Vec<String> = d
        .host
        .registry
        .assignments()
        .into_iter()
        .filter(|(_, vm)| *vm == id)
        .map(|(u, _)| u)
        .collect();
    v["assigned_users"] = json!(users);
    Ok(Json(v))
}

/// `DELETE /v1/vms/{id}`.
pub async fn remove(State(d): State<Arc<Daemon>>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    d.host.registry.remove_vm(&id)?;
    d.listeners.stop(&id);
    if let Some(c) = d.host.conns.get(&id) {
        c.handle.goodbye("VM unregistered").await;
    }
    d.host.events.emit(Event::VmUnregistered { vm: id });
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/assignments`.
pub async fn assignments(State(d): State<Arc<Daemon>>) -> Json<Value> {
    Json(json!(d.host.registry.assignments()))
}

/// Body of `PUT /v1/assignments/{user}`.
#[derive(Deserialize)]
pub struct AssignBody {
    vm: String,
}

/// `PUT /v1/assignments/{user}`.
pub async fn assign(
    State(d): State<Arc<Daemon>>,
    Path(user): Path<String>,
    Json(body): Json<AssignBody>,
) -> ApiResult<Json<Value>> {
    check_name("user", &user)?;
    Ok(Json(json!(switch::assign(&d.host, &user, &body.vm)?)))
}

/// `DELETE /v1/assignments/{user}`.
pub async fn unassign(
    State(d): State<Arc<Daemon>>,
    Path(user): Path<String>,
) -> ApiResult<Json<Value>> {
    check_name("user", &user)?;
    Ok(Json(json!(switch::unassign(&d.host, &user)?)))
}

/// `GET /v1/sessions[?vm=]`.
pub async fn sessions(
    State(d): State<Arc<Daemon>>,
    Query(q): Query<HashMap<String, String>>,
) -> Json<Value> {
    Json(json!(d.host.sessions.list(q.get("vm").map(String::as_str))))
}
