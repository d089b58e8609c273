//! The fake agent's answers to the host's UVE-2 requests: release (by
//! flushing or by silence), UA bundle transfers, rollback and delete,
//! session suspend/resume, monitor grants, status.

use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use uve_protocol::ErrorCode;
use uve_protocol::link::{Incoming, LinkHandle, Responder};
use uve_protocol::manifest::Hash;
use uve_protocol::message::{AgentStatus, Request, Response, SessionInfo, UaBundle, UaInfo};
use uve_protocol::names::{UaName, UserName};

use super::update::{Updated, begin_and_list, update};
use super::{AgentState, ReleaseMode, lock};
use crate::names;

fn err(code: ErrorCode, m: &str) -> Response {
    Response::Error(uve_protocol::WireError::new(code, m))
}

/// Answers every request on `rx` until the link closes.
pub(super) async fn serve_uve2(
    handle: LinkHandle,
    state: Arc<Mutex<AgentState>>,
    mut rx: mpsc::Receiver<Incoming>,
) {
    while let Some(Incoming { request, responder }) = rx.recv().await {
        lock(&state)
            .requests
            .push(format!("{request:?}").chars().take(80).collect());
        let answer = match request {
            Request::UserRelease { user, .. } => {
                release(&handle, &state, user, responder);
                continue;
            }
            Request::Ping { nonce } => Response::Pong { nonce },
            Request::UaBegin(b) => ua_begin(&mut lock(&state), b),
            Request::UaBundleData {
                transfer,
                offset,
                data,
            } => ua_data(&mut lock(&state), transfer, offset, &data),
            Request::UaCommit { transfer } => ua_commit(&mut lock(&state), transfer),
            Request::UaRollback { name } => ua_rollback(&mut lock(&state), name),
            Request::UaDelete { name, force } => ua_delete(&mut lock(&state), &name, force),
            other => sessions(&mut lock(&state), other),
        };
        let _ = responder.send(answer).await;
    }
}

/// A `UserRelease`: parked for good, or answered after a flush.
fn release(
    handle: &LinkHandle,
    state: &Arc<Mutex<AgentState>>,
    user: UserName,
    responder: Responder,
) {
    let mode = lock(state).release.get(user.as_str()).cloned();
    let data = match mode {
        None | Some(ReleaseMode::Ignore) => {
            lock(state).parked.push(responder);
            return;
        }
        Some(ReleaseMode::Flush(data)) => data,
    };
    let (handle, state) = (handle.clone(), state.clone());
    tokio::spawn(async move {
        let (base, lease) = lock(&state)
            .leases
            .get(user.as_str())
            .copied()
            .unwrap_or((None, 0));
        let r = async {
            let listed = begin_and_list(&handle, &user, "s1", base, lease, &data).await?;
            update(&handle, listed).await
        }
        .await;
        let committed = match r {
            Ok(Updated {
                answer: Response::Committed { version },
                ..
            }) => Some(version),
            _ => None,
        };
        let _ = responder.send(Response::Released { committed }).await;
    });
}

fn ua_begin(st: &mut AgentState, b: UaBundle) -> Response {
    st.transfers.insert(b.transfer, (b, Vec::new()));
    Response::Ok
}

fn ua_data(st: &mut AgentState, transfer: u64, offset: u64, data: &[u8]) -> Response {
    match st.transfers.get_mut(&transfer) {
        Some((_, buf)) if buf.len() as u64 == offset => {
            buf.extend_from_slice(data);
            Response::Ok
        }
        _ => err(ErrorCode::BadRequest, "bad transfer or offset"),
    }
}

fn ua_commit(st: &mut AgentState, transfer: u64) -> Response {
    match st.transfers.remove(&transfer) {
        Some((b, buf)) if Hash::of(&buf) == b.digest && buf.len() as u64 == b.size => {
            let prev = st.uas.get(&b.name).map(|(cur, _)| cur.clone());
            st.uas.insert(b.name.clone(), (b.version.clone(), prev));
            st.bundles.insert(format!("{}/{}", b.name, b.version), buf);
            Response::UaCurrent { version: b.version }
        }
        _ => err(ErrorCode::BadDigest, "bundle digest mismatch"),
    }
}

fn ua_rollback(st: &mut AgentState, name: UaName) -> Response {
    match st.uas.get(&name).cloned() {
        Some((cur, Some(prev))) => {
            st.uas.insert(name, (prev.clone(), Some(cur)));
            Response::UaCurrent { version: prev }
        }
        _ => err(ErrorCode::NotFound, "no previous version"),
    }
}

fn ua_delete(st: &mut AgentState, name: &str, force: bool) -> Response {
    if name == "busy" && !force {
        err(ErrorCode::UaInUse, "sessions use it")
    } else if st.uas.remove(name).is_some() {
        Response::UaDeleted {
            stopped_sessions: if force {
                vec![names::session("s1")]
            } else {
                vec![]
            },
        }
    } else {
        err(ErrorCode::NotFound, "no such UA")
    }
}

/// Session and monitor requests, status, and anything unsupported.
fn sessions(st: &mut AgentState, request: Request) -> Response {
    match request {
        Request::SessionSuspend { session } => {
            st.suspended.push(session);
            Response::Ok
        }
        Request::SessionResume { session } => {
            st.suspended.retain(|s| *s != session);
            Response::Ok
        }
        Request::MonitorGrant {
            session,
            monitor,
            expires,
        } => {
            st.monitors.push((session, monitor, expires));
            Response::Ok
        }
        Request::MonitorRevoke { session, monitor } => {
            st.monitors
                .retain(|(s, m, _)| !(*s == session && *m == monitor));
            Response::Ok
        }
        Request::AgentStatus => Response::Status(status(st)),
        _ => err(ErrorCode::BadRequest, "unsupported"),
    }
}

fn status(st: &AgentState) -> AgentStatus {
    AgentStatus {
        sessions: st
            .suspended
            .iter()
            .map(|s| SessionInfo {
                session: s.clone(),
                user: names::user("alice"),
                ua: None,
                suspended: true,
            })
            .collect(),
        uas: st
            .uas
            .iter()
            .map(|(n, (c, p))| UaInfo {
                name: n.clone(),
                current: c.clone(),
                previous: p.clone(),
            })
            .collect(),
        spooled_updates: 0,
    }
}
