//! `UpdateCommit`: checks the manifest, publishes the upload's stage, then
//! compare-and-swaps under the user's lease gate. The new version becomes
//! head only if the VM holds the user's current lease, the head is still
//! the update's base, and that base is one the lease was granted on or one
//! this VM committed under it since (checkpoints, spooled re-deliveries);
//! otherwise it is kept as a conflict version.

use std::sync::{Arc, PoisonError};

use uve_protocol::manifest::{Manifest, ManifestError};
use uve_protocol::message::{ErrorCode, Response, Version};

use super::{Upload, bad, get, quota_check, refused};
use crate::host::wire_store_error;
use crate::state::events::{Event, UpdateFields};
use crate::state::leases::Granted;
use crate::state::metrics;
use crate::store::{CommitOutcome, StoreResult, UifStore, VersionKind};
use crate::wire::uve5::{Handled, VmConnection};

/// `UpdateCommit`.
pub async fn commit(conn: &VmConnection, upload: u64) -> Handled {
    let up = get(conn, upload)?;
    commit_upload(conn, &up, upload)
        .await
        .inspect_err(|e| refused(conn, &up.begin, e))
}

async fn commit_upload(conn: &VmConnection, up: &Arc<Upload>, upload: u64) -> Handled {
    let _exclusive = up.gate.clone().write_owned().await;
    let host = conn.host().clone();
    let _commit = host.commit_guard();
    let (manifest, uploaded) = {
        let st = up.state.lock().unwrap_or_else(PoisonError::into_inner);
        let m = Manifest {
            header: up.begin.header,
            chunks: st.chunks.clone(),
        };
        (m, st.uploaded)
    };
    // Count, size, lengths and the manifest digest (which commits to every
    // chunk hash, hence every byte); the store checks every chunk is present.
    manifest.validate().map_err(|e| match e {
        ManifestError::Digest => bad(ErrorCode::BadDigest, e),
        e => bad(
            ErrorCode::BadRequest,
            format!("incomplete or inconsistent upload: {e}"),
        ),
    })?;
    let m = Arc::new(manifest);
    let b = &up.begin;
    // Staged chunks become stored chunks (durably) before the version that
    // refers to them; should the commit fail after this, they are
    // unreferenced and GC takes them after its grace.
    let (stage, hashes) = (up.stage.clone(), up.stage.hashes());
    host.store_call(move |s| s.publish(stage.id(), &hashes))
        .await
        .map_err(|e| wire_store_error(&e))?;
    up.stage.published();
    let gate = host.leases().gate(&b.user);
    let outcome = {
        let _user = gate.lock().await;
        let lease_ok = host.leases().is_current(&b.user, b.lease, conn.vm());
        let granted = host.leases().get(&b.user).and_then(|l| l.granted);
        let (user, base, origin, m) = (b.user.clone(), b.base, conn.origin(), m.clone());
        let (vm, lease) = (conn.vm().to_string(), b.lease);
        host.store_call(move |s| {
            let mut head_ok = lease_ok;
            if lease_ok && !base_granted(s, &user, base, &origin, granted)? {
                tracing::warn!(
                    vm,
                    %user,
                    lease,
                    "update based on v{base:?}, which lease {lease} was neither granted on nor committed under: kept as a conflict version"
                );
                head_ok = false;
            }
            s.commit(&user, &m, base, head_ok, &origin)
        })
        .await
        .map_err(|e| quota_check::refusal(conn, &e))?
    };
    conn.state().uploads.remove(&upload);
    quota_check::end_charge(up);
    let update = UpdateFields {
        user: b.user.to_string(),
        vm: conn.vm().to_string(),
        session: b.session.to_string(),
        cause: b.cause,
        base: b.base,
        size: m.header.size,
        chunks: m.header.chunk_count,
        chunks_uploaded: uploaded,
    };
    Ok(answer(conn, &b.user, update, outcome))
}

/// The answer to a decided commit, with its metric and event.
fn answer(
    conn: &VmConnection,
    user: &uve_protocol::names::UserName,
    update: UpdateFields,
    outcome: CommitOutcome,
) -> Response {
    let host = conn.host();
    match outcome {
        CommitOutcome::Committed(version) => {
            host.sessions().clear_lost(conn.vm(), user);
            metrics::add(&host.metrics().commits, 1);
            host.emit(Event::Commit { update, version });
            Response::Committed { version }
        }
        CommitOutcome::Redelivered(version) => {
            // Its commit was answered before (the agent lost the answer):
            // the same answer again, and no second event.
            tracing::info!(
                vm = conn.vm(),
                %user,
                version,
                "update re-delivered after its commit: answered as version {version}"
            );
            host.sessions().clear_lost(conn.vm(), user);
            Response::Committed { version }
        }
        CommitOutcome::Conflict { kept_as, head } => {
            metrics::add(&host.metrics().conflicts, 1);
            host.emit(Event::Conflict {
                update,
                kept_as,
                head,
            });
            Response::Conflict { kept_as, head }
        }
    }
}

/// True if an update under the current lease may be based on `base`: the
/// lease was granted on it, or `origin` committed it since the grant (a
/// lease recorded before grants were, `granted == None`, is trusted).
fn base_granted(
    s: &dyn UifStore,
    user: &str,
    base: Option<Version>,
    origin: &str,
    granted: Option<Granted>,
) -> StoreResult<bool> {
    let Some(g) = granted else {
        return Ok(true);
    };
    if g.base == base {
        return Ok(true);
    }
    let Some(base) = base else {
        return Ok(false);
    };
    Ok(s.versions(user)?.iter().any(|v| {
        v.version == base
            && v.kind == VersionKind::Committed
            && v.origin == origin
            && v.created_ms >= g.at_ms
    }))
}
