//! Session notices from the agent: `SessionStarted`, `SessionEnded` (both
//! idempotent) and `UnexpectedDisconnect` (de-duplicated by `(vm, id)` so
//! at-least-once delivery yields exactly one event).

use uve_protocol::message::{DisconnectNotice, ErrorCode, Response, WireError};
use uve_protocol::names::{SessionId, UaName, UserName};

use super::{Handled, VmConnection, check_text};
use crate::state::events::{DisconnectSource, Event};
use crate::state::metrics;
use crate::state::sessions::MAX_SESSIONS_PER_VM;

/// `SessionStarted`.
pub fn started(
    conn: &VmConnection,
    session: &SessionId,
    user: &UserName,
    ua: Option<UaName>,
) -> Handled {
    conn.check_assigned(user)?;
    let ua = ua.map(String::from);
    let Some(new) = conn
        .host
        .sessions()
        .started(conn.vm(), session, user, ua.clone())
    else {
        return Err(WireError::new(
            ErrorCode::TooLarge,
            format!(
                "VM {} already has {MAX_SESSIONS_PER_VM} sessions open",
                conn.vm()
            ),
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
    if conn.host().sessions().first_notice(conn.vm(), n.id) {
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
