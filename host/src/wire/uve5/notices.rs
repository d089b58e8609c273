//! Session notices from the agent: `SessionStarted`, `SessionEnded` (both
//! idempotent) and `UnexpectedDisconnect` (de-duplicated by `(vm, id)` so
//! at-least-once delivery yields exactly one event).
//!
//! New sessions and disconnect notices are rate-bound per VM
//! (`session_starts_per_minute`, `notices_per_minute`): past the bound
//! they are answered `Busy`, which the agent retries (its notices stay
//! journalled, its sessions are announced again), so a flooding VM adds
//! events at that rate only and loses nothing it is owed. A repeat of a
//! known session or notice id costs nothing and is always answered.

use uve_protocol::message::{DisconnectNotice, ErrorCode, Response, WireError};
use uve_protocol::names::{SessionId, UaName, UserName};

use super::{Handled, VmConnection, check_text};
use crate::budgets::report::Budget;
use crate::state::events::{DisconnectSource, Event};
use crate::state::metrics;
use crate::state::sessions::NoticeSeen;

/// `Busy` for a VM over one of its per-minute rates, reported.
fn over_rate(conn: &VmConnection, budget: Budget, user: &str, per_minute: u32) -> WireError {
    conn.host()
        .refused(budget, conn.vm(), Some(user), u64::from(per_minute));
    WireError::new(
        ErrorCode::Busy,
        format!(
            "VM {} is over {} ({per_minute} per minute); try again later",
            conn.vm(),
            budget.name()
        ),
    )
}

/// `SessionStarted`.
pub fn started(
    conn: &VmConnection,
    session: &SessionId,
    user: &UserName,
    ua: Option<UaName>,
) -> Handled {
    conn.check_assigned(user)?;
    let host = conn.host();
    if !host.sessions().is_open(conn.vm(), session) && !host.session_rate().admit(conn.vm()) {
        let per_minute = host.session_rate().per_minute();
        return Err(over_rate(
            conn,
            Budget::SessionStartsPerMinute,
            user,
            per_minute,
        ));
    }
    let ua = ua.map(String::from);
    let Some(new) = host
        .sessions()
        .started(conn.vm(), session, user, ua.clone())
    else {
        let max = host.sessions().max_per_vm();
        host.refused(Budget::MaxSessionsPerVm, conn.vm(), Some(user), max as u64);
        return Err(WireError::new(
            ErrorCode::TooLarge,
            format!("VM {} already has {max} sessions open", conn.vm()),
        ));
    };
    if new {
        conn.host().emit(Event::SessionStarted {
            vm: conn.vm().to_string(),
            session: session.to_string(),
            user: user.to_string(),
            ua,
        });
    }
    Ok(Response::Ok)
}

/// `SessionEnded`.
pub fn ended(conn: &VmConnection, session: &SessionId) -> Handled {
    if let Some(s) = conn.host().sessions().ended(conn.vm(), session) {
        conn.host().emit(Event::SessionEnded {
            vm: conn.vm().to_string(),
            session: session.to_string(),
            user: s.user,
            ua: s.ua,
        });
    }
    Ok(Response::Ok)
}

/// Refuses a disconnect notice for a user this VM has no business with:
/// the session must be open on this VM for that user, or the user must be
/// assigned to it or have held a lease on it (a notice spooled across a
/// host restart or a VM switch).
fn check_ours(conn: &VmConnection, n: &DisconnectNotice) -> Result<(), WireError> {
    let host = conn.host();
    let session_user = host.sessions().user_of(conn.vm(), &n.session);
    let ours = match session_user {
        Some(u) => n.user == u.as_str(),
        None => {
            host.registry().assignment(&n.user).as_deref() == Some(conn.vm())
                || host.leases().held_by(&n.user, conn.vm())
        }
    };
    if ours {
        Ok(())
    } else {
        metrics::add(&host.metrics().notices_not_ours, 1);
        tracing::warn!(vm = conn.vm(), user = %n.user, session = %n.session, "disconnect notice for a user the VM has no business with, refused");
        Err(WireError::new(
            ErrorCode::NotAssigned,
            format!(
                "user {} has no session {} on VM {} and was never served by it",
                n.user,
                n.session,
                conn.vm()
            ),
        ))
    }
}

/// `UnexpectedDisconnect`.
pub fn disconnect(conn: &VmConnection, n: DisconnectNotice) -> Handled {
    check_text("reason", &n.reason)?;
    check_ours(conn, &n)?;
    let host = conn.host();
    if host.sessions().notice_seen(conn.vm(), n.id) {
        return Ok(Response::Ok);
    }
    if !host.notice_rate().admit(conn.vm()) {
        let per_minute = host.notice_rate().per_minute();
        return Err(over_rate(
            conn,
            Budget::NoticesPerMinute,
            &n.user,
            per_minute,
        ));
    }
    if let NoticeSeen::First { forgot } = host.sessions().first_notice(conn.vm(), n.id) {
        if forgot {
            metrics::add(&host.metrics().notice_ids_forgotten, 1);
        }
        conn.host().sessions().ended(conn.vm(), &n.session);
        metrics::add(&conn.host().metrics().unexpected_disconnects, 1);
        conn.host().emit(Event::UnexpectedDisconnect {
            vm: conn.vm().to_string(),
            session: n.session.into(),
            user: n.user.into(),
            ua: n.ua.map(String::from),
            reason: n.reason,
            at: n.at,
            id: Some(n.id),
            source: DisconnectSource::Agent,
        });
    }
    Ok(Response::Ok)
}
