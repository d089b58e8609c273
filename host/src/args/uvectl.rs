//! The command line of `uvectl` (clap): every command, its arguments and
//! their help text. The binary is `src/bin/uvectl/`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// `uvectl [--socket PATH] [--json] <command>`.
#[derive(Parser)]
#[command(name = "uvectl", version, about = "Control a uve-host daemon", long_about = None)]
pub struct Cli {
    /// API socket (default: $UVE_HOST_SOCKET, else $UVE_HOST_DATA_DIR/api.sock,
    /// else /var/lib/uve-host/api.sock — the daemon's default).
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    /// Print the raw JSON answer instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Cmd,
}

/// The commands.
#[derive(Subcommand)]
pub enum Cmd {
    /// VMs: list, add, show, rm, status, ping.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Assign a user to a VM (a VM switch asks the old VM to release the user).
    Assign {
        /// User.
        user: String,
        /// VM id.
        vm: String,
    },
    /// Remove a user's assignment.
    Unassign {
        /// User.
        user: String,
    },
    /// List assignments.
    Assignments,
    /// List open sessions.
    Sessions {
        /// Only this VM.
        #[arg(long)]
        vm: Option<String>,
    },
    /// List users with a UIF.
    Users,
    /// A user's quota: show what they hold, delete an old version, set the quota.
    #[command(subcommand)]
    User(UserCmd),
    /// List a user's versions.
    Versions {
        /// User.
        user: String,
    },
    /// Import a UIF file as the user's new head.
    Import {
        /// User.
        user: String,
        /// UIF file.
        file: PathBuf,
    },
    /// Export a version's bytes.
    Export {
        /// User.
        user: String,
        /// Version.
        version: u64,
        /// Output file (default: stdout).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Make a copy of an old version the head.
    Rollback {
        /// User.
        user: String,
        /// Version to restore.
        version: u64,
    },
    /// Garbage-collect unreferenced chunks.
    Gc {
        /// Spare unreferenced chunks younger than this (default: daemon's).
        #[arg(long)]
        grace_secs: Option<u64>,
    },
    /// Read every chunk of the store and check it against its hash; a
    /// damaged chunk is moved to corrupt/ and the versions that refer to it
    /// are listed.
    Scrub {
        /// Read at most this fast, MiB/s (default: daemon's; 0 = no limit).
        #[arg(long)]
        mib_per_sec: Option<u64>,
    },
    /// Print events (JSON lines): those retained in memory and in the
    /// durable journal (which keeps the ones an operator must act on across
    /// floods and restarts), in order.
    Events {
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// Keep following new events.
        #[arg(long)]
        follow: bool,
    },
    /// Print Prometheus metrics.
    Metrics,
    /// User agents on a VM: deploy, rollback, rm.
    #[command(subcommand)]
    Ua(UaCmd),
    /// Suspend a session.
    Suspend {
        /// VM id.
        vm: String,
        /// Session id.
        session: String,
    },
    /// Resume a session.
    Resume {
        /// VM id.
        vm: String,
        /// Session id.
        session: String,
    },
    /// Monitoring grants: grant, revoke.
    #[command(subcommand)]
    Monitor(MonitorCmd),
}

/// `uvectl user ...`.
#[derive(Subcommand)]
pub enum UserCmd {
    /// Head, assignment, lease, and what the user holds against the quota
    /// (unique bytes of head and history, each writer's conflict versions,
    /// uploads in flight).
    Show {
        /// User.
        user: String,
    },
    /// Delete a retained version that is not the head (its chunks go at the
    /// next GC unless another version holds them).
    RmVersion {
        /// User.
        user: String,
        /// Version.
        version: u64,
    },
    /// Set the user's quota (unique bytes of head and history), e.g. 20GiB,
    /// 512MiB or 1000000; `default` clears the override.
    Quota {
        /// User.
        user: String,
        /// Bytes (suffixes KiB, MiB, GiB, TiB), or `default`.
        #[arg(value_parser = parse_quota)]
        bytes: QuotaArg,
    },
}

/// A quota given on the command line: bytes, or the host's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaArg(pub Option<u64>);

/// Parses `20GiB`, `512MiB`, `1000000` or `default`.
pub fn parse_quota(s: &str) -> Result<QuotaArg, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("default") {
        return Ok(QuotaArg(None));
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size: bytes, or a number with KiB, MiB, GiB, TiB"))?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        "T" | "TiB" => 40,
        other => return Err(format!("unknown unit {other:?}: use KiB, MiB, GiB or TiB")),
    };
    n.checked_mul(1u64 << shift)
        .map(|b| QuotaArg(Some(b)))
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// `uvectl vm ...`.
#[derive(Subcommand)]
pub enum VmCmd {
    /// List VMs.
    List,
    /// Register a VM (exactly one of --cid, --uds-path, --unix).
    Add {
        /// VM id.
        id: String,
        /// AF_VSOCK CID.
        #[arg(long)]
        cid: Option<u32>,
        /// Hybrid-vsock socket of the VMM (host listens on <uds-path>_<port>).
        #[arg(long)]
        uds_path: Option<PathBuf>,
        /// Hybrid-vsock guest port (default 7075).
        #[arg(long)]
        port: Option<u32>,
        /// Plain Unix listen path.
        #[arg(long)]
        unix: Option<PathBuf>,
    },
    /// Show a VM (connection, sessions, assigned users).
    Show {
        /// VM id.
        id: String,
    },
    /// Unregister a VM: its users are unassigned and it is asked to
    /// release them first (waits up to handover_timeout_ms).
    Rm {
        /// VM id.
        id: String,
        /// Remove at once, without asking the VM to release its users
        /// (their unsent changes can only arrive later as conflicts).
        #[arg(long)]
        force: bool,
    },
    /// Ask the VM's agent for its status.
    Status {
        /// VM id.
        id: String,
    },
    /// Round trip to the VM's agent.
    Ping {
        /// VM id.
        id: String,
    },
}

/// `uvectl ua ...`.
#[derive(Subcommand)]
pub enum UaCmd {
    /// Deploy (or --update) a UA from a tar bundle.
    Deploy {
        /// VM id.
        vm: String,
        /// Bundle (uncompressed tar).
        bundle: PathBuf,
        /// UA name.
        #[arg(long)]
        name: String,
        /// UA version.
        #[arg(long)]
        version: String,
        /// Entry command (whitespace-separated argv).
        #[arg(long, default_value = "")]
        entry: String,
        /// Update an existing UA.
        #[arg(long)]
        update: bool,
    },
    /// Switch a UA back to its previous version.
    Rollback {
        /// VM id.
        vm: String,
        /// UA name.
        name: String,
    },
    /// Delete a UA.
    Rm {
        /// VM id.
        vm: String,
        /// UA name.
        name: String,
        /// Stop sessions using it.
        #[arg(long)]
        force: bool,
    },
}

/// `uvectl monitor ...`.
#[derive(Subcommand)]
pub enum MonitorCmd {
    /// Allow MONITOR to monitor SESSION.
    Grant {
        /// VM id.
        vm: String,
        /// Session id.
        session: String,
        /// Monitoring user.
        monitor: String,
        /// Validity in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
    },
    /// Withdraw a grant.
    Revoke {
        /// VM id.
        vm: String,
        /// Session id.
        session: String,
        /// Monitoring user.
        monitor: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_parse_in_binary_units() {
        assert_eq!(parse_quota("20GiB"), Ok(QuotaArg(Some(20 << 30))));
        assert_eq!(parse_quota("512M"), Ok(QuotaArg(Some(512 << 20))));
        assert_eq!(parse_quota("1000"), Ok(QuotaArg(Some(1000))));
        assert_eq!(parse_quota("default"), Ok(QuotaArg(None)));
        assert!(parse_quota("12 parsecs").is_err());
        assert!(parse_quota("GiB").is_err());
        assert!(parse_quota("99999999999TiB").is_err());
    }
}
