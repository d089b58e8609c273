//! The request-and-answer commands of `uvectl`: each builds its route's
//! request from the API's types, sends it and shows the typed answer.
//! Streaming transfers (import, export, events) are in `transfer`.

use hyper::Method;
use serde::Serialize;
use uve_host::api::client::{self, ApiClient, ReqBody};
use uve_host::api::types::{
    AssignBody, AssignOutcome, Assignments, DeployQuery, GcQuery, GcReport, Imported, MonitorBody,
    MonitorGranted, MonitorRevokeQuery, MonitorRevoked, NewVm, Pong, RollbackBody, RolledBack,
    SessionAction, SessionActionDone, SessionRec, SessionsQuery, UaCurrent, UaDeleteQuery,
    UaDeleted, UaDeployed, UserRow, VmDetail, VmInfo, VmRemoveQuery, VmStatus,
};
use uve_host::api::types::{QuotaBody, ScrubQuery, ScrubReport, VersionDeleted};
use uve_host::args::uvectl::{MonitorCmd, UaCmd, UserCmd, VmCmd};

use crate::output::{self, answer, object, rows};

/// Everything but RFC 3986 unreserved characters is escaped in a segment.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes a path segment.
pub fn seg(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

/// `path` with the query `q` (nothing appended when `q` has no fields).
pub fn with_query<Q: Serialize>(path: &str, q: &Q) -> anyhow::Result<String> {
    let qs = serde_urlencoded::to_string(q)?;
    Ok(if qs.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{qs}")
    })
}

/// `uvectl vm ...`.
pub async fn vm(c: &ApiClient, cmd: VmCmd, raw: bool) -> anyhow::Result<u8> {
    Ok(match cmd {
        VmCmd::List => answer(&c.get("/v1/vms").await?, raw, |v: &Vec<VmInfo>| rows(v)),
        VmCmd::Add {
            id,
            cid,
            uds_path,
            port,
            unix,
        } => {
            let spec = NewVm {
                id,
                cid,
                uds_path,
                port,
                unix,
            };
            let a = c.call(Method::POST, "/v1/vms", client::json(&spec)).await?;
            answer(&a, raw, object::<VmInfo>)
        }
        VmCmd::Show { id } => {
            let a = c.get(&format!("/v1/vms/{}", seg(&id))).await?;
            answer(&a, raw, object::<VmDetail>)
        }
        VmCmd::Rm { id, force } => {
            let path = format!("/v1/vms/{}", seg(&id));
            let path = with_query(&path, &VmRemoveQuery { force })?;
            output::done(&c.call(Method::DELETE, &path, client::empty()).await?, raw)
        }
        VmCmd::Status { id } => {
            let a = c.get(&format!("/v1/vms/{}/status", seg(&id))).await?;
            answer(&a, raw, object::<VmStatus>)
        }
        VmCmd::Ping { id } => {
            let path = format!("/v1/vms/{}/ping", seg(&id));
            let a = c.call(Method::POST, &path, client::empty()).await?;
            answer(&a, raw, object::<Pong>)
        }
    })
}

/// `uvectl assign USER VM`.
pub async fn assign(c: &ApiClient, user: &str, vm: String, raw: bool) -> anyhow::Result<u8> {
    let path = format!("/v1/assignments/{}", seg(user));
    let body = client::json(&AssignBody { vm });
    let a = c.call(Method::PUT, &path, body).await?;
    Ok(answer(&a, raw, object::<AssignOutcome>))
}

/// `uvectl unassign USER`.
pub async fn unassign(c: &ApiClient, user: &str, raw: bool) -> anyhow::Result<u8> {
    let path = format!("/v1/assignments/{}", seg(user));
    let a = c.call(Method::DELETE, &path, client::empty()).await?;
    Ok(answer(&a, raw, object::<AssignOutcome>))
}

/// `uvectl assignments`.
pub async fn assignments(c: &ApiClient, raw: bool) -> anyhow::Result<u8> {
    let a = c.get("/v1/assignments").await?;
    Ok(answer(&a, raw, object::<Assignments>))
}

/// `uvectl sessions [--vm ID]`.
pub async fn sessions(c: &ApiClient, vm: Option<String>, raw: bool) -> anyhow::Result<u8> {
    let path = with_query("/v1/sessions", &SessionsQuery { vm })?;
    let a = c.get(&path).await?;
    Ok(answer(&a, raw, |s: &Vec<SessionRec>| rows(s)))
}

/// `uvectl users`.
pub async fn users(c: &ApiClient, raw: bool) -> anyhow::Result<u8> {
    let a = c.get("/v1/users").await?;
    Ok(answer(&a, raw, |u: &Vec<UserRow>| rows(u)))
}

/// `uvectl user ...`.
pub async fn user(c: &ApiClient, cmd: UserCmd, raw: bool) -> anyhow::Result<u8> {
    Ok(match cmd {
        UserCmd::Show { user } => {
            let a = c.get(&format!("/v1/users/{}", seg(&user))).await?;
            answer(&a, raw, output::user_detail)
        }
        UserCmd::RmVersion { user, version } => {
            let path = format!("/v1/users/{}/versions/{version}", seg(&user));
            let a = c.call(Method::DELETE, &path, client::empty()).await?;
            answer(&a, raw, object::<VersionDeleted>)
        }
        UserCmd::Quota { user, bytes } => {
            let path = format!("/v1/users/{}/quota", seg(&user));
            let body = client::json(&QuotaBody {
                quota_bytes: bytes.0,
            });
            let a = c.call(Method::PUT, &path, body).await?;
            answer(&a, raw, output::user_detail)
        }
    })
}

/// `uvectl versions USER`.
pub async fn versions(c: &ApiClient, user: &str, raw: bool) -> anyhow::Result<u8> {
    let a = c.get(&format!("/v1/users/{}/versions", seg(user))).await?;
    Ok(answer(&a, raw, output::versions))
}

/// `uvectl rollback USER V`.
pub async fn rollback(c: &ApiClient, user: &str, version: u64, raw: bool) -> anyhow::Result<u8> {
    let path = format!("/v1/users/{}/rollback", seg(user));
    let body = client::json(&RollbackBody { version });
    let a = c.call(Method::POST, &path, body).await?;
    Ok(answer(&a, raw, object::<RolledBack>))
}

/// `uvectl gc [--grace-secs N]`.
pub async fn gc(c: &ApiClient, grace_secs: Option<u64>, raw: bool) -> anyhow::Result<u8> {
    let path = with_query("/v1/gc", &GcQuery { grace_secs })?;
    let a = c.call(Method::POST, &path, client::empty()).await?;
    Ok(answer(&a, raw, object::<GcReport>))
}

/// `uvectl scrub [--mib-per-sec N]`.
pub async fn scrub(c: &ApiClient, mib_per_sec: Option<u64>, raw: bool) -> anyhow::Result<u8> {
    let path = with_query("/v1/scrub", &ScrubQuery { mib_per_sec })?;
    let a = c.call(Method::POST, &path, client::empty()).await?;
    Ok(answer(&a, raw, object::<ScrubReport>))
}

/// Shows the answer of an import (the body was streamed by `transfer`).
pub fn imported(a: &client::Answer, raw: bool) -> u8 {
    answer(a, raw, object::<Imported>)
}

/// `uvectl ua ...`.
pub async fn ua(c: &ApiClient, cmd: UaCmd, raw: bool) -> anyhow::Result<u8> {
    Ok(match cmd {
        UaCmd::Deploy {
            vm,
            bundle,
            name,
            version,
            entry,
            update,
        } => {
            let q = DeployQuery {
                name,
                version,
                entry,
                update,
            };
            let path = with_query(&format!("/v1/vms/{}/ua", seg(&vm)), &q)?;
            let body: ReqBody = client::file(&bundle).await?;
            let a = c.call(Method::POST, &path, body).await?;
            answer(&a, raw, object::<UaDeployed>)
        }
        UaCmd::Rollback { vm, name } => {
            let path = format!("/v1/vms/{}/ua/{}/rollback", seg(&vm), seg(&name));
            let a = c.call(Method::POST, &path, client::empty()).await?;
            answer(&a, raw, object::<UaCurrent>)
        }
        UaCmd::Rm { vm, name, force } => {
            let path = format!("/v1/vms/{}/ua/{}", seg(&vm), seg(&name));
            let path = with_query(&path, &UaDeleteQuery { force })?;
            let a = c.call(Method::DELETE, &path, client::empty()).await?;
            answer(&a, raw, object::<UaDeleted>)
        }
    })
}

/// `uvectl suspend|resume VM SESSION`.
pub async fn session_action(
    c: &ApiClient,
    vm: &str,
    session: &str,
    action: SessionAction,
    raw: bool,
) -> anyhow::Result<u8> {
    let path = format!(
        "/v1/vms/{}/sessions/{}/{}",
        seg(vm),
        seg(session),
        action.as_str()
    );
    let a = c.call(Method::POST, &path, client::empty()).await?;
    Ok(answer(&a, raw, object::<SessionActionDone>))
}

/// `uvectl monitor ...`.
pub async fn monitor(c: &ApiClient, cmd: MonitorCmd, raw: bool) -> anyhow::Result<u8> {
    Ok(match cmd {
        MonitorCmd::Grant {
            vm,
            session,
            monitor,
            ttl_secs,
        } => {
            let body = MonitorBody {
                session,
                monitor,
                ttl_secs,
            };
            let path = format!("/v1/vms/{}/monitor", seg(&vm));
            let a = c.call(Method::POST, &path, client::json(&body)).await?;
            answer(&a, raw, object::<MonitorGranted>)
        }
        MonitorCmd::Revoke {
            vm,
            session,
            monitor,
        } => {
            let q = MonitorRevokeQuery {
                session: Some(session),
                monitor: Some(monitor),
            };
            let path = with_query(&format!("/v1/vms/{}/monitor", seg(&vm)), &q)?;
            let a = c.call(Method::DELETE, &path, client::empty()).await?;
            answer(&a, raw, object::<MonitorRevoked>)
        }
    })
}
