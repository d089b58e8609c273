//! Session notices from the agent: `SessionStarted`, `SessionEnded` (both
//! idempotent) and `UnexpectedDisconnect` (de-duplicated by `(vm, id)` so
//! at-least-once delivery yields exactly one event).

use uve_protocol::message::{DisconnectNotice, Response};

use super::{Handled, VmConnection, check_name, check_text};
use crate::events::{DisconnectSource, Event};
use crate::metrics;

/// `SessionStarted`.
pub fn started(conn: &VmConnection, session: &str, user: &str, ua: Option<String>) -> Handled {
    check_name("session", session)?;
    check_name("user", user)?;
    if let Some(ua) = &ua {
        check_name("UA", ua)?;
    }
    conn.check_assigned(user)?;
    if conn
        .host
        .sessions
        .started(&conn.vm, session, user, ua.clone())
    {
        conn.host.events.emit(Event::SessionStarted {
            vm: conn.vm.clone(),
            session: session.to_string(),
            user: user.to_string(),
            ua,
        });
    }
    Ok(Response::Ok)
}

/// `SessionEnded`.
pub fn ended(conn: &VmConnection, session: &str) -> Handled {
    check_name("session", session)?;
    if let Some(s) = conn.host.sessions.ended(&conn.vm, session) {
        conn.host.events.emit(Event::SessionEnded {
            vm: conn.vm.clone(),
            session: session.to_string(),
            user: s.user,
            ua: s.ua,
        });
    }
    Ok(Response::Ok)
}

/// `UnexpectedDisconnect`.
pub fn disconnect(conn: &VmConnection, n: DisconnectNotice) -> Handled {
    check_name("session", &n.session)?;
    check_name("user", &n.user)?;
    if let Some(ua) = &n.ua {
        check_name("UA", ua)?;
    }
    check_text("reason", &n.reason)?;
    if conn.host.sessions.first_notice(&conn.vm, n.id) {
        conn.host.sessions.ended(&conn.vm, &n.session);
        metrics::add(&conn.host.metrics.unexpected_disconnects, 1);
        conn.host.events.emit(Event::UnexpectedDisconnect {
            vm: conn.vm.clone(),
            session: n.session,
            user: n.user,
            ua: n.ua,
            reason: n.reason,
            at: n.at,
            id: Some(n.id),
            source: DisconnectSource::Agent,
        });
    }
    Ok(Response::Ok)
}
