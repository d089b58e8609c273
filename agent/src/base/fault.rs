//! Fault injection for the test suites: `UVE_AGENT_FAULTS` names points in
//! the agent where the next N passes fail as a real failure there would,
//! e.g. `UVE_AGENT_FAULTS="upload-read=2"`: the next two reads of a chunk
//! being uploaded fail with `EIO`. Read once at the first check; unset (as
//! in production) every point passes. Points: `upload-read`.

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
