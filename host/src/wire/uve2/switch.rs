//! User ↔ VM assignment changes and the VM switch hand-over: when the VM
//! holding a user's lease loses the user, it is asked to release them
//! (`UserRelease`), and the next retrieve waits for that (see
//! `handover`). A VM that does not answer makes the retrieve proceed with
//! the last committed head and `handover_timed_out`. Either way the VM's
//! lease is then revoked: what it sends later lands as a conflict version.

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::task::JoinHandle;

use serde::{Deserialize, Serialize};
use uve_protocol::message::{Request, Response};
use uve_protocol::names::UserName;

use crate::host::Host;
use crate::state::events::Event;
use crate::state::handover::HandoverOutcome;
use crate::state::registry::RegistryError;

/// Result of an assignment change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignOutcome {
    /// The user.
    pub user: String,
    /// The VM now assigned (None after unassign).
    pub vm: Option<String>,
    /// The VM assigned before.
    pub previous: Option<String>,
    /// The VM asked to release the user, if any.
    pub release_requested_from: Option<String>,
}

/// Assigns `user` to `vm`.
pub async fn assign(
    host: &Arc<Host>,
    user: &UserName,
    vm: &str,
) -> Result<AssignOutcome, RegistryError> {
    let previous = host.registry().assign(user, vm)?.durable().await?;
    let released = release_holder(host, user, Some(vm)).map(|(from, _)| from);
    host.emit(Event::Assigned {
        user: user.to_string(),
        vm: vm.to_string(),
        previous: previous.clone(),
        release_requested_from: released.clone(),
    });
    Ok(AssignOutcome {
        user: user.to_string(),
        vm: Some(vm.to_string()),
        previous,
        release_requested_from: released,
    })
}

/// Removes `user`'s assignment.
pub async fn unassign(host: &Arc<Host>, user: &UserName) -> Result<AssignOutcome, RegistryError> {
    unassign_and_release(host, user)
        .await
        .map(|(outcome, _)| outcome)
}

/// [`unassign`], and the wait for the release it asked for (if any).
async fn unassign_and_release(
    host: &Arc<Host>,
    user: &UserName,
) -> Result<(AssignOutcome, Option<JoinHandle<()>>), RegistryError> {
    let previous = host.registry().unassign(user)?.durable().await?;
    let (released, wait) = match release_holder(host, user, None) {
        Some((from, wait)) => (Some(from), wait),
        None => (None, None),
    };
    host.emit(Event::Unassigned {
        user: user.to_string(),
        previous: previous.clone(),
        release_requested_from: released.clone(),
    });
    let outcome = AssignOutcome {
        user: user.to_string(),
        vm: None,
        previous: Some(previous),
        release_requested_from: released,
    };
    Ok((outcome, wait))
}

/// Before `vm` is removed: unassigns the users assigned to it and asks it
/// to release every user whose lease it holds, as [`unassign`] does, and
/// waits until it has answered or `handover_timeout_ms` has passed (its
/// leases are revoked either way). Returns the users it was asked to
/// release.
pub async fn release_all(host: &Arc<Host>, vm: &str) -> Vec<String> {
    let mut users: BTreeSet<String> = host
        .registry()
        .assignments()
        .into_iter()
        .filter(|(_, v)| v == vm)
        .map(|(u, _)| u)
        .collect();
    users.extend(host.leases().users_held_by(vm));
    let mut asked = Vec::new();
    let mut waits = Vec::new();
    for name in users {
        let Ok(user) = UserName::new(name) else {
            continue;
        };
        let (from, wait) = if host.registry().assignment(&user).as_deref() == Some(vm) {
            match unassign_and_release(host, &user).await {
                Ok((outcome, wait)) => (outcome.release_requested_from, wait),
                Err(_) => (None, None),
            }
        } else {
            match release_holder(host, &user, None) {
                Some((from, wait)) => (Some(from), wait),
                None => (None, None),
            }
        };
        if from.as_deref() == Some(vm) {
            asked.push(user.to_string());
        }
        waits.extend(wait);
    }
    for wait in waits {
        let _ = wait.await;
    }
    asked
}

/// Revokes `vm`'s lease on `user` now (in memory); the handle tells when
/// the lease file holds it.
fn revoke(host: &Arc<Host>, user: &str, vm: &str) -> JoinHandle<()> {
    let staged = host.leases().revoke(user, vm);
    let (user, vm) = (user.to_string(), vm.to_string());
    tokio::spawn(async move {
        match staged.durable().await {
            Ok(true) => tracing::info!(user, vm, "lease revoked: the user was moved away"),
            Ok(false) => {}
            Err(e) => tracing::error!(user, vm, "lease revocation not written: {e}"),
        }
    })
}

/// If a VM other than `new_vm` holds `user`'s lease, revokes it: at once
/// if the VM is not connected, else once it has answered `UserRelease` (or
/// not, within `handover_timeout_ms`), recording the hand-over. Returns the
/// VM asked to release, and the task that waits for its answer.
fn release_holder(
    host: &Arc<Host>,
    user: &UserName,
    new_vm: Option<&str>,
) -> Option<(String, Option<JoinHandle<()>>)> {
    let holder = host.leases().get(user)?.vm;
    if holder.is_empty() || Some(holder.as_str()) == new_vm {
        return None;
    }
    let Some(conn) = host.conns().get(&holder) else {
        let revoked = revoke(host, user, &holder);
        // The holder is gone. If it was lost with a session of the user
        // open, its last changes may be missing (or still in its spool):
        // the next retrieve says so instead of waiting for nobody.
        if host.sessions().take_lost(&holder, user) {
            host.handovers().start(user).finish(HandoverOutcome::Failed);
            host.emit(Event::HandoverFailed {
                user: user.to_string(),
                vm: holder,
                reason: "previous VM was lost with the user's session open".into(),
            });
        }
        drop(revoked);
        return None;
    };
    let ticket = host.handovers().start(user);
    let deadline_ms = u32::try_from(host.config().handover_timeout_ms).unwrap_or(u32::MAX);
    let (host, user, from) = (host.clone(), user.clone(), holder.clone());
    let wait = tokio::spawn(async move {
        let req = Request::UserRelease {
            user: user.clone(),
            deadline_ms,
        };
        let answer = conn
            .handle
            .request_timeout(req, Host::ms(u64::from(deadline_ms)))
            .await;
        // Its flush (if any) is committed by now; what comes later is late.
        let _ = revoke(&host, &user, &from).await;
        match answer {
            Ok(Response::Released { committed }) => {
                ticket.finish(HandoverOutcome::Released);
                host.emit(Event::UserReleased {
                    user: user.into(),
                    vm: from,
                    committed,
                });
            }
            other => {
                ticket.finish(HandoverOutcome::Failed);
                let why = match other {
                    Ok(r) => format!("unexpected answer {r:?}"),
                    Err(e) => e.to_string(),
                };
                host.emit(Event::HandoverFailed {
                    user: user.into(),
                    vm: from,
                    reason: why,
                });
            }
        }
    });
    Some((holder, Some(wait)))
}
