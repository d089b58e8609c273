//! UIF retrieve (login): assignment check, bounded wait for a pending VM
//! switch hand-over, lease grant, then manifest pages and chunks — only
//! chunks listed in pages served on this connection may be fetched.

use std::sync::Arc;

use uve_protocol::manifest::Hash;
use uve_protocol::message::{ErrorCode, Response, RetrieveGrant, Version, WireError};

use uve_protocol::names::{SessionId, UserName};

use super::{Handled, VmConnection};
use crate::host::{Host, wire_store_error};
use crate::state::events::Event;
use crate::state::leases::LeaseError;
use crate::state::metrics;

/// `UifRetrieve`.
pub async fn grant(conn: &VmConnection, user: &UserName, session: &SessionId) -> Handled {
    conn.check_assigned(user)?;
    let host = conn.host();
    let limit = Host::ms(host.config().handover_timeout_ms);
    let timed_out = host.handovers().wait(user, limit).await == Some(true);
    if timed_out {
        host.emit(Event::HandoverTimeout {
            user: user.to_string(),
            vm: conn.vm().to_string(),
            session: session.to_string(),
        });
    }
    // The hand-over wait may have outlived the assignment.
    conn.check_assigned(user)?;
    let gate = host.leases().gate(user);
    let _gate = gate.lock().await;
    let u = user.to_string();
    let head = host
        .store_call(move |s| {
            let head = s.head(&u)?;
            let manifest = head.map(|v| s.manifest(&u, v)).transpose()?;
            Ok((head, manifest))
        })
        .await
        .map_err(|e| wire_store_error(&e))?;
    // Answered once the lease file holds the grant (written by the
    // table's writer on a blocking thread, not under the table's mutex).
    let lease = host
        .leases()
        .grant(user, conn.vm(), head.0)
        .durable()
        .await
        .map_err(|e| WireError::new(ErrorCode::Internal, LeaseError::from(e)))?;
    let (version, manifest) = head;
    let header = manifest.as_ref().map(|m| m.header);
    {
        let mut st = conn.state();
        // A new grant supersedes the previous one of this user on this
        // connection: only the current head's chunks stay fetchable, which
        // also bounds the per-connection bookkeeping.
        st.granted.remove(user);
        st.fetchable.remove(user);
        if let (Some(v), Some(m)) = (version, manifest) {
            st.granted.entry(user.clone()).or_default().insert(v);
            cache_manifest(&mut st, user, v, Arc::new(m));
        }
    }
    metrics::add(&host.metrics().retrieves, 1);
    host.emit(Event::Retrieve {
        user: user.to_string(),
        vm: conn.vm().to_string(),
        session: session.to_string(),
        version,
        lease,
        handover_timed_out: timed_out,
    });
    Ok(Response::Retrieve(RetrieveGrant {
        version,
        header,
        lease,
        handover_timed_out: timed_out,
    }))
}

fn cache_manifest(
    st: &mut super::ConnState,
    user: &UserName,
    v: Version,
    m: Arc<uve_protocol::Manifest>,
) {
    st.manifests
        .retain(|((u, ver), _)| !(u == user && *ver == v));
    st.manifests.push(((user.clone(), v), m));
    if st.manifests.len() > 4 {
        st.manifests.remove(0);
    }
}

/// `ManifestPage`: only for versions granted on this connection.
pub async fn page(conn: &VmConnection, user: &UserName, version: Version, page: u32) -> Handled {
    conn.check_assigned(user)?;
    let cached = {
        let st = conn.state();
        if !st.granted.get(user).is_some_and(|g| g.contains(&version)) {
            return Err(WireError::new(
                ErrorCode::NotFound,
                format!("version {version} of {user} was not granted on this connection"),
            ));
        }
        st.manifests
            .iter()
            .find(|((u, v), _)| u == user && *v == version)
            .map(|(_, m)| m.clone())
    };
    let manifest = match cached {
        Some(m) => m,
        None => {
            let u = user.to_string();
            let m = conn
                .host
                .store_call(move |s| s.manifest(&u, version))
                .await
                .map_err(|e| wire_store_error(&e))?;
            let m = Arc::new(m);
            cache_manifest(&mut conn.state(), user, version, m.clone());
            m
        }
    };
    let refs = manifest
        .page(page, conn.max_frame())
        .map_err(|e| WireError::new(ErrorCode::NotFound, e))?
        .to_vec();
    conn.state()
        .fetchable
        .entry(user.clone())
        .or_default()
        .extend(refs.iter().map(|c| c.hash));
    Ok(Response::ManifestPage(refs))
}

/// `ChunkFetch`: only chunks of pages served on this connection.
pub async fn fetch(conn: &VmConnection, user: &UserName, hash: Hash) -> Handled {
    conn.check_assigned(user)?;
    let allowed = conn
        .state()
        .fetchable
        .get(user)
        .is_some_and(|f| f.contains(&hash));
    if !allowed {
        return Err(WireError::new(
            ErrorCode::NotFound,
            format!("chunk {hash} is not part of a manifest served to this VM for {user}"),
        ));
    }
    let data = conn
        .host
        .store_call_bulk(conn.vm(), move |s| s.read_chunk(&hash))
        .await
        .map_err(|e| wire_store_error(&e))?;
    conn.host().metrics().chunk_fetched(user, data.len() as u64);
    Ok(Response::Chunk(data))
}
