//! The tables `uvectl` prints for list answers. Each row type names its
//! columns in reading order, its identifier first; times are shown as the
//! local date and time (the `TZ` variable, else `/etc/localtime`, as
//! `date` does), sizes in binary units with one decimal. `--json` never
//! comes here: it prints the answer as it came.

use chrono::{Local, LocalResult, TimeZone};
use uve_host::api::types::{SessionRec, UserRow, VersionInfo, VersionKind, VmInfo};

/// One column of a table.
pub struct Column<T> {
    /// Its heading.
    pub head: &'static str,
    /// Right-aligned (numbers and sizes) rather than left-aligned.
    pub right: bool,
    /// The fields of the row's JSON form it shows (`a.b`: field `b` of
    /// the object `a`); the tests check that every field is shown.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fields: &'static [&'static str],
    /// The cell of one row.
    pub cell: fn(&T) -> String,
}

/// A type shown as a table row.
pub trait Row: Sized + 'static {
    /// Its columns, in the order they are printed.
    const COLUMNS: &'static [Column<Self>];
}

/// A cell with no value.
const NONE: &str = "-";

/// An optional value, or `-`.
fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| NONE.to_string(), |v| v.to_string())
}

/// `ms` (milliseconds since the Unix epoch) as the local date and time,
/// `2026-12-07 14:03:22`; a value no calendar holds is shown as it is.
pub fn local_time(ms: u64) -> String {
    let local = i64::try_from(ms)
        .ok()
        .map(|ms| Local.timestamp_millis_opt(ms));
    match local {
        Some(LocalResult::Single(t)) => t.format("%Y-%m-%d %H:%M:%S").to_string(),
        _ => ms.to_string(),
    }
}

/// A byte count in binary units with one decimal (`512 B`, `1.4 MiB`,
/// `3.0 GiB`), rounded to the nearest tenth in integers (never `1024.0
/// KiB`: that is `1.0 MiB`).
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let n = u128::from(n);
    let mut unit = 0;
    let mut div: u128 = 1024;
    // Tenths of the unit, rounded half up.
    let mut tenths = (n * 10 + div / 2) / div;
    while tenths >= 10 * 1024 && unit + 1 < UNITS.len() {
        unit += 1;
        div *= 1024;
        tenths = (n * 10 + div / 2) / div;
    }
    format!("{}.{} {}", tenths / 10, tenths % 10, UNITS[unit])
}

impl Row for VersionInfo {
    const COLUMNS: &'static [Column<Self>] = &[
        Column {
            head: "VERSION",
            right: false,
            fields: &["version"],
            cell: |v| v.version.to_string(),
        },
        Column {
            head: "KIND",
            right: false,
            fields: &["kind"],
            cell: |v| {
                match v.kind {
                    VersionKind::Committed => "committed",
                    VersionKind::Conflict => "conflict",
                }
                .to_string()
            },
        },
        Column {
            head: "CREATED",
            right: false,
            fields: &["created_ms"],
            cell: |v| local_time(v.created_ms),
        },
        Column {
            head: "SIZE",
            right: true,
            fields: &["size"],
            cell: |v| human_size(v.size),
        },
        Column {
            head: "CHUNKS",
            right: true,
            fields: &["chunk_count"],
            cell: |v| v.chunk_count.to_string(),
        },
        Column {
            head: "BASE",
            right: false,
            fields: &["base"],
            cell: |v| opt(v.base),
        },
        Column {
            head: "ORIGIN",
            right: false,
            fields: &["origin"],
            cell: |v| v.origin.clone(),
        },
        Column {
            head: "DIGEST",
            right: false,
            fields: &["digest"],
            cell: |v| v.digest.clone(),
        },
    ];
}

impl Row for VmInfo {
    const COLUMNS: &'static [Column<Self>] = &[
        Column {
            head: "ID",
            right: false,
            fields: &["id"],
            cell: |v| v.id.clone(),
        },
        Column {
            head: "CONNECTED",
            right: false,
            fields: &["connected"],
            cell: |v| if v.connected { "yes" } else { "no" }.to_string(),
        },
        Column {
            head: "SINCE",
            right: false,
            fields: &["connection.connected_ms"],
            cell: |v| opt(v.connection.as_ref().map(|c| local_time(c.connected_ms))),
        },
        Column {
            head: "AGENT",
            right: false,
            fields: &["connection.agent_version"],
            cell: |v| opt(v.connection.as_ref().map(|c| &c.agent_version)),
        },
        Column {
            head: "CID",
            right: false,
            fields: &["cid"],
            cell: |v| opt(v.cid),
        },
        Column {
            head: "UDS_PATH",
            right: false,
            fields: &["uds_path"],
            cell: |v| opt(v.uds_path.as_ref().map(|p| p.display())),
        },
        Column {
            head: "PORT",
            right: false,
            fields: &["port"],
            cell: |v| opt(v.port),
        },
        Column {
            head: "UNIX",
            right: false,
            fields: &["unix"],
            cell: |v| opt(v.unix.as_ref().map(|p| p.display())),
        },
        Column {
            head: "LISTEN_PATH",
            right: false,
            fields: &["listen_path"],
            cell: |v| opt(v.listen_path.as_ref().map(|p| p.display())),
        },
    ];
}

impl Row for SessionRec {
    const COLUMNS: &'static [Column<Self>] = &[
        Column {
            head: "VM",
            right: false,
            fields: &["vm"],
            cell: |s| s.vm.clone(),
        },
        Column {
            head: "SESSION",
            right: false,
            fields: &["session"],
            cell: |s| s.session.clone(),
        },
        Column {
            head: "USER",
            right: false,
            fields: &["user"],
            cell: |s| s.user.clone(),
        },
        Column {
            head: "UA",
            right: false,
            fields: &["ua"],
            cell: |s| opt(s.ua.as_ref()),
        },
        Column {
            head: "STARTED",
            right: false,
            fields: &["started_ms"],
            cell: |s| local_time(s.started_ms),
        },
    ];
}

impl Row for UserRow {
    const COLUMNS: &'static [Column<Self>] = &[
        Column {
            head: "USER",
            right: false,
            fields: &["user"],
            cell: |u| u.user.clone(),
        },
        Column {
            head: "HEAD",
            right: false,
            fields: &["head"],
            cell: |u| opt(u.head),
        },
        Column {
            head: "ASSIGNED_TO",
            right: false,
            fields: &["assigned_to"],
            cell: |u| opt(u.assigned_to.as_ref()),
        },
        Column {
            head: "LEASE",
            right: false,
            fields: &["lease.vm", "lease.epoch"],
            cell: |u| {
                opt(u
                    .lease
                    .as_ref()
                    .map(|l| format!("{} (epoch {})", l.vm, l.epoch)))
            },
        },
    ];
}

/// The lines of a table of `rows`: a heading line, then one line per row;
/// `(none)` alone for no rows. Columns are two spaces apart, lines carry
/// no trailing blanks.
pub fn render<T: Row>(rows: &[T]) -> Vec<String> {
    if rows.is_empty() {
        return vec!["(none)".into()];
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| T::COLUMNS.iter().map(|c| (c.cell)(r)).collect())
        .collect();
    let widths: Vec<usize> = T::COLUMNS
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|row| row[i].chars().count())
                .chain([c.head.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |row: Vec<&str>| {
        let parts: Vec<String> = row
            .iter()
            .zip(T::COLUMNS.iter().zip(&widths))
            .map(|(cell, (c, &w))| {
                if c.right {
                    format!("{cell:>w$}")
                } else {
                    format!("{cell:<w$}")
                }
            })
            .collect();
        parts.join("  ").trim_end().to_string()
    };
    let mut out = vec![line(T::COLUMNS.iter().map(|c| c.head).collect())];
    out.extend(
        cells
            .iter()
            .map(|row| line(row.iter().map(String::as_str).collect())),
    );
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::path::PathBuf;

    use serde::Serialize;
    use uve_host::api::types::{ConnSummary, UserLease};

    use super::*;

    fn version() -> VersionInfo {
        VersionInfo {
            version: 12,
            kind: VersionKind::Conflict,
            created_ms: 1_796_623_199_873,
            size: 1_500_000,
            digest: "ab".repeat(32),
            chunk_count: 16,
            base: Some(11),
            origin: "vm:desk-1".into(),
        }
    }

    fn vm() -> VmInfo {
        VmInfo {
            id: "desk-1".into(),
            cid: Some(3),
            uds_path: Some(PathBuf::from("/run/v.sock")),
            port: Some(7075),
            unix: Some(PathBuf::from("/run/u.sock")),
            listen_path: Some(PathBuf::from("/run/v.sock_7075")),
            connected: true,
            connection: Some(ConnSummary {
                conn_id: 4,
                agent_version: "0.1.0".into(),
                capabilities: 7,
                boot_id: "00".into(),
                protocol: 1,
                connected_ms: 1_796_623_199_000,
            }),
        }
    }

    fn session() -> SessionRec {
        SessionRec {
            vm: "desk-1".into(),
            session: "s1".into(),
            user: "alice".into(),
            ua: Some("desk".into()),
            started_ms: 1_796_623_199_000,
        }
    }

    fn user() -> UserRow {
        UserRow {
            user: "alice".into(),
            head: Some(12),
            assigned_to: Some("desk-1".into()),
            lease: Some(UserLease {
                epoch: 5,
                vm: "desk-1".into(),
                past: vec![],
                granted: None,
            }),
        }
    }

    /// Every field of the row's JSON form is shown by some column, and
    /// every field a column names exists: a field added to the API shows
    /// up here until it gets a column.
    fn shows_every_field<T: Row + Serialize>(row: &T) {
        let json = serde_json::to_value(row).unwrap();
        let named: Vec<&str> = T::COLUMNS
            .iter()
            .flat_map(|c| c.fields.iter().copied())
            .collect();
        for key in json.as_object().unwrap().keys() {
            assert!(
                named
                    .iter()
                    .any(|f| f == key || f.starts_with(&format!("{key}."))),
                "field {key} is in no column"
            );
        }
        for f in named {
            let found = f.split('.').try_fold(&json, |v, k| v.get(k));
            assert!(
                found.is_some_and(|v| !v.is_null()),
                "column field {f} is not in the row"
            );
        }
    }

    #[test]
    fn every_field_of_every_row_type_has_a_column() {
        shows_every_field(&version());
        shows_every_field(&vm());
        shows_every_field(&session());
        shows_every_field(&user());
    }

    fn heads<T: Row>() -> Vec<&'static str> {
        T::COLUMNS.iter().map(|c| c.head).collect()
    }

    #[test]
    fn columns_start_with_the_identifier_in_reading_order() {
        assert_eq!(
            heads::<VersionInfo>(),
            [
                "VERSION", "KIND", "CREATED", "SIZE", "CHUNKS", "BASE", "ORIGIN", "DIGEST"
            ]
        );
        assert_eq!(
            heads::<VmInfo>(),
            [
                "ID",
                "CONNECTED",
                "SINCE",
                "AGENT",
                "CID",
                "UDS_PATH",
                "PORT",
                "UNIX",
                "LISTEN_PATH"
            ]
        );
        assert_eq!(
            heads::<SessionRec>(),
            ["VM", "SESSION", "USER", "UA", "STARTED"]
        );
        assert_eq!(heads::<UserRow>(), ["USER", "HEAD", "ASSIGNED_TO", "LEASE"]);
    }

    #[test]
    fn sizes_in_binary_units_with_one_decimal() {
        for (n, s) in [
            (0, "0 B"),
            (1023, "1023 B"),
            (1024, "1.0 KiB"),
            (1536, "1.5 KiB"),
            (1_500_000, "1.4 MiB"),
            ((1 << 20) - 1, "1.0 MiB"),
            ((1 << 20) - 52, "1023.9 KiB"),
            (3 << 30, "3.0 GiB"),
            ((5 << 40) + (1 << 39), "5.5 TiB"),
            (u64::MAX, "16.0 EiB"),
        ] {
            assert_eq!(human_size(n), s, "{n}");
        }
    }

    #[test]
    fn rows_are_aligned_under_their_headings() {
        let mut second = version();
        second.version = 9;
        second.size = 512;
        second.base = None;
        second.kind = VersionKind::Committed;
        let lines = render(&[version(), second]);
        assert_eq!(lines.len(), 3);
        let created = local_time(1_796_623_199_873);
        let pad = " ".repeat(created.len() - "CREATED".len());
        assert_eq!(
            lines[0],
            format!("VERSION  KIND       CREATED{pad}     SIZE  CHUNKS  BASE  ORIGIN     DIGEST")
        );
        let digest = "ab".repeat(32);
        assert_eq!(
            lines[1],
            format!("12       conflict   {created}  1.4 MiB      16  11    vm:desk-1  {digest}")
        );
        assert_eq!(
            lines[2],
            format!("9        committed  {created}    512 B      16  -     vm:desk-1  {digest}")
        );
        assert_eq!(render::<UserRow>(&[]), ["(none)"]);
        assert_eq!(
            render(&[user()]),
            [
                "USER   HEAD  ASSIGNED_TO  LEASE",
                "alice  12    desk-1       desk-1 (epoch 5)"
            ]
        );
    }

    #[test]
    fn times_are_dates_and_times_of_the_second() {
        let t = local_time(1_796_623_199_873);
        let shape: String = t
            .chars()
            .map(|c| if c.is_ascii_digit() { '9' } else { c })
            .collect();
        assert_eq!(shape, "9999-99-99 99:99:99");
        assert_eq!(local_time(u64::MAX), u64::MAX.to_string());
    }
}
