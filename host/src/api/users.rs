//! UIF administration: list versions, import, export, rollback, GC.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use uve_protocol::chunker::chunk_stream;
use uve_protocol::message::Version;

use super::ApiState;
use super::extract::{ApiJson, ApiPath, ApiQuery};
use super::spool::spool;
use super::types::{
    GcQuery, GcReport, ImportQuery, Imported, RollbackBody, RolledBack, ScrubQuery, ScrubReport,
    UserRow, VersionList,
};
use super::{ApiError, ApiResult, name};
use crate::state::events::Event;
use crate::store::CommitOutcome;
use uve_protocol::names::UserName;

/// `GET /v1/users`: users with a store entry, their head and assignment.
pub async fn list(State(d): State<Arc<ApiState>>) -> ApiResult<Json<Vec<UserRow>>> {
    let users = d
        .host
        .store_call(|s| {
            let mut out = Vec::new();
            for u in s.users()? {
                let head = s.head(&u)?;
                out.push((u, head));
            }
            Ok(out)
        })
        .await?;
    let rows = users
        .into_iter()
        .map(|(user, head)| UserRow {
            assigned_to: d.host.registry().assignment(&user),
            lease: d.host.leases().get(&user),
            user,
            head,
        })
        .collect();
    Ok(Json(rows))
}

/// `GET /v1/users/{user}/versions`.
pub async fn versions(
    State(d): State<Arc<ApiState>>,
    ApiPath(user): ApiPath<String>,
) -> ApiResult<Json<VersionList>> {
    let user: UserName = name(&user)?;
    let (head, versions) = d
        .host
        .store_call(move |s| Ok((s.head(&user)?, s.versions(&user)?)))
        .await?;
    Ok(Json(VersionList { head, versions }))
}

/// `POST /v1/users/{user}/import[?empty=true]`: the raw body is the UIF;
/// it becomes the new head (an operator import is authoritative; a VM's
/// later update based on the old head lands as a conflict version). An
/// empty body is refused unless `empty=true` says it means an empty UIF.
pub async fn import(
    State(d): State<Arc<ApiState>>,
    ApiPath(user): ApiPath<String>,
    ApiQuery(q): ApiQuery<ImportQuery>,
    body: Body,
) -> ApiResult<Json<Imported>> {
    let user: UserName = name(&user)?;
    let host = d.host.clone();
    let limit = host
        .config()
        .max_import
        .unwrap_or(host.config().max_uif_size);
    let spooled = spool(body, host.tmp(), limit).await?;
    if spooled.size == 0 && !q.empty {
        return Err(ApiError::bad_request(
            "the body is empty: an import needs the UIF's bytes \
             (add ?empty=true to import an empty UIF)",
        ));
    }
    let path = spooled.path.clone();
    let gate = host.leases().gate(&user);
    let _user_gate = gate.lock().await;
    let _commit = host.commit_guard();
    let u = user.clone();
    let (outcome, manifest) = host
        .store_call(move |s| {
            let file = std::fs::File::open(&path)
                .map_err(|e| crate::store::StoreError::io("open spooled import", e))?;
            let mut pins = Vec::new();
            let m = chunk_stream(std::io::BufReader::new(file), |c, bytes| {
                pins.push(s.pin(&[c.hash]));
                s.put_chunk(&c.hash, bytes).map_err(std::io::Error::other)
            })
            .map_err(|e| crate::store::StoreError::io("chunk import", e))?;
            let head = s.head(&u)?;
            let outcome = s.commit(&u, &m, head, true, "import")?;
            drop(pins);
            Ok((outcome, m))
        })
        .await?;
    drop(spooled);
    let version = match outcome {
        CommitOutcome::Committed(v) | CommitOutcome::Redelivered(v) => v,
        CommitOutcome::Conflict { kept_as, .. } => kept_as,
    };
    crate::state::metrics::add(&host.metrics().commits, 1);
    host.emit(Event::Import {
        user: user.to_string(),
        version,
        size: manifest.header.size,
        chunks: manifest.header.chunk_count,
    });
    Ok(Json(Imported {
        user: user.into(),
        version,
        size: manifest.header.size,
        digest: manifest.header.digest.to_hex(),
        chunks: manifest.header.chunk_count,
    }))
}

/// `GET /v1/users/{user}/versions/{v}/export`: streams the UIF bytes,
/// one chunk in memory at a time.
pub async fn export(
    State(d): State<Arc<ApiState>>,
    ApiPath((user, v)): ApiPath<(String, Version)>,
) -> ApiResult<Response> {
    let user: UserName = name(&user)?;
    let u = user.clone();
    let manifest = d.host.store_call(move |s| s.manifest(&u, v)).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let store = d.host.store().clone();
    let header = manifest.header;
    tokio::task::spawn_blocking(move || {
        for c in &manifest.chunks {
            let item = store
                .read_chunk(&c.hash)
                .map(Bytes::from)
                .map_err(std::io::Error::other);
            let failed = item.is_err();
            if tx.blocking_send(item).is_err() || failed {
                return;
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, header.size.to_string()),
            (
                header::HeaderName::from_static("x-uve-digest"),
                header.digest.to_hex(),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// `POST /v1/users/{user}/rollback`: a copy of `version` becomes the head.
pub async fn rollback(
    State(d): State<Arc<ApiState>>,
    ApiPath(user): ApiPath<String>,
    ApiJson(body): ApiJson<RollbackBody>,
) -> ApiResult<Json<RolledBack>> {
    let user: UserName = name(&user)?;
    let host = d.host.clone();
    let gate = host.leases().gate(&user);
    let _user_gate = gate.lock().await;
    let _commit = host.commit_guard();
    let u = user.clone();
    let to = body.version;
    let head = host.store_call(move |s| s.rollback(&u, to)).await?;
    host.emit(Event::Rollback {
        user: user.to_string(),
        from_version: to,
        version: head,
    });
    Ok(Json(RolledBack {
        user: user.into(),
        version: head,
        copied_from: to,
    }))
}

/// `POST /v1/scrub[?mib_per_sec=]`: reads every chunk of the store and
/// checks it (see `UifStore::scrub`); answers when it is done.
pub async fn scrub(
    State(d): State<Arc<ApiState>>,
    ApiQuery(q): ApiQuery<ScrubQuery>,
) -> ApiResult<Json<ScrubReport>> {
    let report = d.host.scrub(q.mib_per_sec).await?;
    Ok(Json(report))
}

/// `POST /v1/gc[?grace_secs=]`.
pub async fn gc(
    State(d): State<Arc<ApiState>>,
    ApiQuery(q): ApiQuery<GcQuery>,
) -> ApiResult<Json<GcReport>> {
    let grace = Duration::from_secs(q.grace_secs.unwrap_or(d.host.config().gc_grace_secs));
    let report = d.host.store_call(move |s| s.gc(grace)).await?;
    d.host.emit(Event::Gc(report));
    Ok(Json(report))
}
