//! Fault injection for the test suites: `UVE_AGENT_FAULTS` names points in
//! the agent where the next N passes fail as a real failure there would,
//! e.g. `UVE_AGENT_FAULTS="upload-read=2"`: the next two reads of a chunk
//! being uploaded fail with `EIO`. Read once at the first check; unset (as
//! in production) every point passes. Points: `upload-read`; and where
//! [`crash_at`] kills the agent (a crash test's instants of a logout):
//! `logout-ending` (the session is marked ending), `flush-journalled`
//! (the update is chunked and spooled), `flush-committed` (the host's
//! commit answer arrived, nothing of it recorded yet).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock, PoisonError};

fn points() -> &'static Mutex<HashMap<String, u32>> {
    static POINTS: OnceLock<Mutex<HashMap<String, u32>>> = OnceLock::new();
    POINTS.get_or_init(|| {
        let spec = std::env::var("UVE_AGENT_FAULTS").unwrap_or_default();
        let map = spec
            .split(',')
            .filter_map(|item| {
                let (name, n) = item.trim().split_once('=')?;
                Some((name.to_string(), n.parse().ok()?))
            })
            .collect();
        Mutex::new(map)
    })
}

/// True if point `name` is armed: it fails this time (and counts down).
pub fn hit(name: &str) -> bool {
    let mut map = points().lock().unwrap_or_else(PoisonError::into_inner);
    match map.get_mut(name) {
        Some(n) if *n > 0 => {
            *n -= 1;
            tracing::warn!(point = name, left = *n, "injected fault");
            true
        }
        _ => false,
    }
}

/// Kills the agent with SIGKILL when point `name` is armed: a crash at
/// exactly that instant, for the crash tests.
pub fn crash_at(name: &str) {
    if hit(name) {
        tracing::error!(point = name, "injected crash: SIGKILL");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
