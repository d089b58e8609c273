//! How `uvectl` shows answers: decoded into the API's types, then lists as
//! tables (`table`), objects as pretty JSON, errors as `uvectl: STATUS (code): text`
//! on stderr; with `--json` the raw answer as it came. Also the exit code
//! of each status.

use hyper::StatusCode;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use uve_host::api::client::Answer;
use uve_host::api::types::{ErrorBody, UserDetail, VersionList};

use crate::table::{self, Row};

/// Exit code of an answer's status: 0 ok, 3 not found, 4 conflict, 5 VM
/// not connected, 1 anything else.
pub fn exit_for(status: StatusCode) -> u8 {
    match status.as_u16() {
        200..=299 => 0,
        404 => 3,
        409 => 4,
        503 => 5,
        _ => 1,
    }
}

/// Shows an answer whose success body is a `T`: `render` gets the decoded
/// value (or `--json` prints the body as it is). Returns the exit code.
pub fn answer<T: DeserializeOwned>(a: &Answer, raw: bool, render: impl FnOnce(&T)) -> u8 {
    let code = exit_for(a.status);
    if code != 0 {
        return error(a, raw);
    }
    if raw {
        println!("{}", a.json());
        return 0;
    }
    match a.decode::<T>() {
        Ok(t) => {
            render(&t);
            0
        }
        Err(e) => {
            eprintln!(
                "uvectl: unexpected answer ({e}): {}",
                String::from_utf8_lossy(&a.body)
            );
            1
        }
    }
}

/// Shows an answer without a body (`204`): nothing, or `null` with `--json`.
pub fn done(a: &Answer, raw: bool) -> u8 {
    if exit_for(a.status) != 0 {
        return error(a, raw);
    }
    if raw {
        println!("{}", a.json());
    }
    0
}

/// Prints an error answer on stderr (and its JSON on stdout with
/// `--json`); returns the exit code of its status.
pub fn error(a: &Answer, raw: bool) -> u8 {
    let (code, message) = match a.decode::<ErrorBody>() {
        Ok(e) => (e.error.as_str(), e.message),
        Err(_) => ("error", String::from_utf8_lossy(&a.body).into_owned()),
    };
    eprintln!("uvectl: {} ({code}): {message}", a.status);
    if raw {
        println!("{}", a.json());
    }
    exit_for(a.status)
}

/// Pretty JSON of an object answer.
pub fn object<T: Serialize>(t: &T) {
    let v = serde_json::to_value(t).unwrap_or(Value::Null);
    if !v.is_null() {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    }
}

/// A table of a list answer (`table`: identifier first, local times,
/// sizes in binary units).
pub fn rows<T: Row>(rows: &[T]) {
    for line in table::render(rows) {
        println!("{line}");
    }
}

/// `versions USER`: the head, then one row per retained version.
pub fn versions(v: &VersionList) {
    match v.head {
        Some(h) => println!("head: {h}"),
        None => println!("head: null"),
    }
    rows(&v.versions);
}

/// `user show USER`: who, where, and what they hold against the quota.
pub fn user_detail(u: &UserDetail) {
    let h = &u.holdings;
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".to_string());
    println!("user:        {}", u.user);
    println!("head:        {}", opt(u.head.map(|v| v.to_string())));
    println!("assigned to: {}", opt(u.assigned_to.clone()));
    println!(
        "lease:       {}",
        opt(u
            .lease
            .as_ref()
            .map(|l| format!("{} (epoch {})", l.vm, l.epoch)))
    );
    let quota = match h.quota_override {
        Some(_) => format!("{} (override)", table::human_size(h.quota_bytes)),
        None => table::human_size(h.quota_bytes),
    };
    println!(
        "held:        {} of {quota} (head and history, unique bytes)",
        table::human_size(h.held_bytes)
    );
    println!("in flight:   {}", table::human_size(u.in_flight_bytes));
    println!(
        "conflicts:   up to {} per writer",
        table::human_size(h.conflict_quota_bytes)
    );
    for c in &h.conflicts {
        println!(
            "  {}: {} in {} version(s)",
            c.origin,
            table::human_size(c.held_bytes),
            c.versions
        );
    }
}
