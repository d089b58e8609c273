//! The operator's way out of a full quota: what a user holds
//! (`GET /v1/users/{user}`), deleting an old version
//! (`DELETE /v1/users/{user}/versions/{v}`, never the head) and the
//! per-user quota override (`PUT /v1/users/{user}/quota`). The refusal an
//! agent gets when over the quota names the `uvectl` verbs for them.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use uve_protocol::message::Version;
use uve_protocol::names::UserName;

use super::extract::{ApiJson, ApiPath};
use super::types::{QuotaBody, UserDetail, VersionDeleted};
use super::{ApiResult, ApiState, name};
use crate::store::UserEdit;

/// `GET /v1/users/{user}`: head, assignment, lease and what the user
/// holds (reads every retained manifest of the user).
pub async fn show(
    State(d): State<Arc<ApiState>>,
    ApiPath(user): ApiPath<String>,
) -> ApiResult<Json<UserDetail>> {
    let user: UserName = name(&user)?;
    let u = user.clone();
    let (head, holdings) = d
        .host
        .store_call(move |s| Ok((s.head(&u)?, s.holdings(&u)?)))
        .await?;
    Ok(Json(UserDetail {
        assigned_to: d.host.registry().assignment(&user),
        lease: d.host.leases().get(&user),
        in_flight_bytes: d.host.quota_charges().charged(&user),
        user: user.to_string(),
        head,
        holdings,
    }))
}

/// `DELETE /v1/users/{user}/versions/{v}`: deletes a retained version
/// that is not the head (409 `conflict` for the head); its chunks go at
/// the next GC unless another version holds them.
pub async fn delete_version(
    State(d): State<Arc<ApiState>>,
    ApiPath((user, version)): ApiPath<(String, Version)>,
) -> ApiResult<Json<VersionDeleted>> {
    let user: UserName = name(&user)?;
    let gate = d.host.leases().gate(&user);
    let _user_gate = gate.lock().await;
    let u = user.clone();
    d.host
        .store_call(move |s| s.edit_user(&u, UserEdit::DeleteVersion(version)))
        .await?;
    tracing::info!(%user, version, "version deleted by the operator");
    Ok(Json(VersionDeleted {
        user: user.to_string(),
        version,
    }))
}

/// `PUT /v1/users/{user}/quota`: sets or clears the user's quota override
/// (kept in the store with the user's versions, so every host sharing the
/// store applies it); answers what the user holds against it.
pub async fn set_quota(
    State(d): State<Arc<ApiState>>,
    ApiPath(user): ApiPath<String>,
    ApiJson(body): ApiJson<QuotaBody>,
) -> ApiResult<Json<UserDetail>> {
    let parsed: UserName = name(&user)?;
    let u = parsed.clone();
    let q = body.quota_bytes;
    d.host
        .store_call(move |s| s.edit_user(&u, UserEdit::SetQuota(q)))
        .await?;
    tracing::info!(user = %parsed, quota_bytes = ?q, "quota override set by the operator");
    show(State(d), ApiPath(user)).await
}
