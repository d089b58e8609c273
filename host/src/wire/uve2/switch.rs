//! User ↔ VM assignment changes and the VM switch hand-over: when the VM
//! holding a user's lease loses the user, it is asked to release them
//! (`UserRelease`), and the next retrieve waits for that (see
//! `handover`). A VM that does not answer makes the retrieve proceed with
//! the last committed head and `handover_timed_out`. Either way the VM's
//! lease is then revoked: what it sends later lands as a conflict version.

use std::sync::Arc;

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
pub fn assign(host: &Arc<Host>, user: &UserName, vm: &str) -> Result<AssignOutcome, RegistryError> {
    let previous = host.registry().assign(user, vm)?;
    let released = release_holder(host, user, Some(vm));
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
pub fn unassign(host: &Arc<Host>, user: &UserName) -> Result<AssignOutcome, RegistryError> {
    let previous = host.registry().unassign(user)?;
    let released = release_holder(host, user, None);
    host.emit(Event::Unassigned {
        user: user.to_string(),
        previous: previous.clone(),
        release_requested_from: released.clone(),
    });
    Ok(AssignOutcome {
        user: user.to_string(),
        vm: None,
        previous: Some(previous),
        release_requested_from: released,
    })
}

/// Revokes `vm`'s lease on `user` off the runtime threads (a durable
/// write of the lease file).
fn revoke(host: &Arc<Host>, user: &str, vm: &str) {
    let (h, user, vm) = (host.clone(), user.to_string(), vm.to_string());
    tokio::task::spawn_blocking(move || match h.leases().revoke(&user, &vm) {
        Ok(true) => tracing::info!(user, vm, "lease revoked: the user was moved away"),
        Ok(false) => {}
        Err(e) => tracing::error!(user, vm, "lease not revoked: {e}"),
    });
}

/// If a VM other than `new_vm` holds `user`'s lease, revokes it: at once
/// if the VM is not connected, else once it has answered `UserRelease` (or
/// not, within `handover_timeout_ms`), recording the hand-over. Returns the
/// VM asked to release.
fn release_holder(host: &Arc<Host>, user: &UserName, new_vm: Option<&str>) -> Option<String> {
    let holder = host.leases().get(user)?.vm;
    if holder.is_empty() || Some(holder.as_str()) == new_vm {
        return None;
    }
    let Some(conn) = host.conns().get(&holder) else {
        revoke(host, user, &holder);
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
        return None;
    };
    let ticket = host.handovers().start(user);
    let deadline_ms = u32::try_from(host.config().handover_timeout_ms).unwrap_or(u32::MAX);
    let (host, user, from) = (host.clone(), user.clone(), holder.clone());
    tokio::spawn(async move {
        let req = Request::UserRelease {
            user: user.clone(),
            deadline_ms,
        };
        let answer = conn
            .handle
            .request_timeout(req, Host::ms(u64::from(deadline_ms)))
            .await;
        // Its flush (if any) is committed by now; what comes later is late.
        revoke(&host, &user, &from);
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
    Some(holder)
}
