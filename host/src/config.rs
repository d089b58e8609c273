//! Daemon configuration: a TOML file where every field is optional and has
//! a documented default, so `uve-host run` with no file works.
//!
//! Precedence: `--data-dir` / `UVE_HOST_DATA_DIR` > file > default.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use uve_protocol::defs::{DEFAULT_HEARTBEAT_MS, DEFAULT_MAX_FRAME, DEFAULT_PORT};

/// The `[s3]` section (defined by the store layer).
pub use crate::store::S3Config;
use crate::store::StorePolicy;

/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/uve-host";

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("read config {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("parse config {path}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: toml::de::Error,
    },
}

/// The daemon configuration. Field docs state the defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Data directory (store, registry, leases). Default `/var/lib/uve-host`.
    pub data_dir: PathBuf,
    /// Management API socket. Default `<data_dir>/api.sock`.
    pub api_socket: Option<PathBuf>,
    /// Listen on kernel AF_VSOCK (QEMU/vhost-vsock). Default `false`.
    pub vsock_listen: bool,
    /// AF_VSOCK port, and the guest port of hybrid-vsock listeners
    /// (`<uds_path>_<port>`) unless a VM sets its own. Default 7075.
    pub port: u32,
    /// Heartbeat interval proposed to agents, ms. Default 5000.
    pub heartbeat_ms: u32,
    /// Frame limit proposed to agents, bytes. Default 1 MiB.
    pub max_frame: u32,
    /// Requests an agent may have open at once. Default 32.
    pub max_inflight: u32,
    /// Control requests (all but chunk transfers) one VM may make per
    /// second, a second's worth as burst; past it the host stops reading
    /// from that VM until the bucket refills. 0 = no limit. Default 500.
    pub max_control_requests_per_sec: u32,
    /// Bytes of one VM's requests read and not yet answered; at this the
    /// host stops reading from that VM until answers free some. Default 2 MiB.
    pub link_inbound_bytes: usize,
    /// Bytes of answers queued for one VM and not yet written; at this its
    /// handlers wait. Default 2 MiB.
    pub link_outbound_bytes: usize,
    /// A VM that takes no frame for this long (it stopped reading) is cut
    /// off, ms. Default 3 × `heartbeat_ms`.
    pub write_deadline_ms: Option<u64>,
    /// Test-only: admit VMs on CID 1, the host's own vsock loopback.
    /// Default `false` (CIDs 0, 1, 2 and 4294967295 are refused).
    pub allow_local_cid: bool,
    /// Connections of one VM that may be in the handshake at once; more are
    /// closed at accept. Default 4.
    pub max_handshakes_per_vm: usize,
    /// Connections of all VMs (and unknown peers) that may be in the
    /// handshake at once; more are closed at accept. Default 256.
    pub max_handshakes: usize,
    /// Largest UIF accepted, bytes. Default 64 GiB.
    pub max_uif_size: u64,
    /// Largest chunk count of one UIF. Default 1,048,576.
    pub max_chunks: u32,
    /// Per-user quota: unique bytes of a user's head and history together
    /// (each chunk counted once), plus the user's own uploads in flight.
    /// `PUT /v1/users/{user}/quota` overrides it per user. Default =
    /// `max_uif_size`.
    pub user_quota_bytes: Option<u64>,
    /// Unique bytes the conflict versions of one writer (a VM that lost the
    /// lease) may hold per user; past it the conflict is refused, never the
    /// lease holder's update. Default = the user's quota.
    pub conflict_quota_bytes: Option<u64>,
    /// Drop a user's oldest history (never the head) to fit a new head in
    /// the quota instead of refusing the update. Default `false`.
    pub quota_prunes_history: bool,
    /// Uploads one connection may have open at once. Default 4.
    pub max_uploads_per_vm: usize,
    /// An upload no request names for this long is dropped (its slot and
    /// pins freed; a later request for it gets `NotFound`), ms. Default 120000.
    pub upload_idle_ms: u64,
    /// Bytes one VM's open uploads may have staged (stored, not yet
    /// committed); more chunks get `Busy`. Default: one share of the
    /// staging room (`staging_shares`), never below `max_uif_size`.
    pub max_staged_bytes_per_vm: Option<u64>,
    /// Bytes the open uploads of one user may have staged. Default: one
    /// share of the staging room, never below `max_uif_size`.
    pub max_staged_bytes_per_user: Option<u64>,
    /// Bytes all uploads may have staged at once. Default 256 GiB.
    pub max_staged_bytes: u64,
    /// Chunks are staged only while the filesystem where uploads stage
    /// (`<data_dir>/store`, with either store) keeps this much free beyond
    /// them, so commits and other VMs' writes find room. Default 2 GiB.
    pub store_min_free_bytes: u64,
    /// The staging room (the staging filesystem's free space beyond
    /// `store_min_free_bytes`, plus what is staged) is divided into this
    /// many shares: the default per-VM and per-user budgets are one share,
    /// and when less than a share is left above the floor, a VM over its
    /// share gets `Busy` while the others still stage. Default 8.
    pub staging_shares: u64,
    /// Bytes a second the VMs staging heavily (more than about 5.5 MB/s
    /// lately) may stage together while another VM has bulk work; 0 = no
    /// limit. Default 64 MiB.
    pub heavy_staging_bytes_per_sec: u64,
    /// Bytes a second the VMs fetching chunks heavily (more than about
    /// 22 MB/s lately, counted at 64 KiB a chunk) may fetch together
    /// while another VM has bulk work; 0 = no limit. Default 128 MiB.
    pub heavy_fetch_bytes_per_sec: u64,
    /// Test-only: the staging filesystem is taken to be this large and to
    /// hold nothing but staged chunks (free = this − staged) instead of
    /// asking it. Default: none (the real figure).
    pub test_staging_free_bytes: Option<u64>,
    /// Committed versions kept per user. Default 10.
    pub history_keep: usize,
    /// Conflict versions kept per user and origin (the writer: one VM's
    /// conflicts never evict another's). Default 10.
    pub conflict_keep: usize,
    /// Updates per hour a VM without a user's current lease may open for
    /// that user (they can only become conflict versions); burst a twelfth
    /// of it. 0 = no limit. Default 60.
    pub conflict_updates_per_hour: u32,
    /// Conflict versions older than this are pruned, seconds. Default 30 days.
    pub conflict_max_age_secs: u64,
    /// Unreferenced chunks younger than this survive GC, seconds. Default 3600.
    pub gc_grace_secs: u64,
    /// Interval of the automatic GC, seconds; 0 disables it. Default 86400.
    pub gc_interval_secs: u64,
    /// Interval of the automatic scrub of the local store (every chunk
    /// read and checked against its hash), seconds; 0 disables it.
    /// Default 604800 (a week).
    pub scrub_interval_secs: u64,
    /// How fast a scrub reads, MiB/s; 0 = no limit. Default 64.
    pub scrub_mib_per_sec: u64,
    /// How long a retrieve waits for the previous VM's release, ms. Default 30000.
    pub handover_timeout_ms: u64,
    /// Time limit of UVE-2 requests to agents, ms. Default 30000.
    pub uve2_timeout_ms: u64,
    /// Time limit of each handshake step, ms. Default 10000.
    pub handshake_timeout_ms: u64,
    /// How long shutdown waits for in-flight commits, ms. Default 30000.
    pub shutdown_grace_ms: u64,
    /// Events kept in memory for `GET /v1/events?since=` (each VM its
    /// fair share). Default 4096.
    pub event_ring: usize,
    /// Events an operator must act on (`update_refused`, `conflict`,
    /// `budget_exceeded`, `handover_failed`, `vm_lost`,
    /// `unexpected_disconnect`) kept in the durable journal
    /// `<data_dir>/events.jsonl` (each VM its fair share). Default 8192.
    pub event_journal: usize,
    /// Journalled events older than this are dropped, seconds; 0 = no age
    /// limit. Default 90 days.
    pub event_journal_max_age_secs: u64,
    /// A VM reaching a budget gets at most one `budget_exceeded` event per
    /// budget in this interval, seconds (the metric counts every refusal).
    /// Default 60.
    pub budget_event_interval_secs: u64,
    /// `UnexpectedDisconnect` notices one VM may send per minute (burst: as
    /// many at once); more are answered `Busy` and the agent retries from
    /// its journal. 0 = no limit. Default 120.
    pub notices_per_minute: u32,
    /// New sessions one VM may report per minute (`SessionStarted`; burst:
    /// as many at once); more are answered `Busy` and the agent announces
    /// them again. 0 = no limit. Default 120.
    pub session_starts_per_minute: u32,
    /// Sessions one VM may have open at once; a `SessionStarted` beyond is
    /// refused (`TooLarge`). Default 256.
    pub max_sessions_per_vm: usize,
    /// Disconnect-notice ids remembered per VM to de-duplicate redeliveries
    /// (the oldest is forgotten). Default 4096.
    pub notice_ids_per_vm: usize,
    /// Bulk store jobs (chunk reads and writes) one VM may have queued;
    /// more are answered `Busy`. Default 512.
    pub bulk_queue_per_vm: usize,
    /// Largest UA bundle accepted by the API, bytes. Default 1 GiB.
    pub max_ua_bundle: u64,
    /// Largest UIF accepted by `POST .../import`, bytes. Default = `max_uif_size`.
    pub max_import: Option<u64>,
    /// Runtime worker threads. Default 2.
    pub worker_threads: usize,
    /// The UIF store on S3-compatible object storage shared by several
    /// hosts. Default: none (the local store under `data_dir/store`).
    pub s3: Option<S3Config>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            api_socket: None,
            vsock_listen: false,
            port: DEFAULT_PORT,
            heartbeat_ms: DEFAULT_HEARTBEAT_MS,
            max_frame: DEFAULT_MAX_FRAME,
            max_inflight: 32,
            max_control_requests_per_sec: 500,
            link_inbound_bytes: uve_protocol::link::DEFAULT_MAX_INBOUND_BYTES,
            link_outbound_bytes: uve_protocol::link::DEFAULT_MAX_OUTBOUND_BYTES,
            write_deadline_ms: None,
            allow_local_cid: false,
            max_handshakes_per_vm: 4,
            max_handshakes: 256,
            max_uif_size: 64 << 30,
            max_chunks: 1 << 20,
            user_quota_bytes: None,
            conflict_quota_bytes: None,
            quota_prunes_history: false,
            max_uploads_per_vm: 4,
            upload_idle_ms: 120_000,
            max_staged_bytes_per_vm: None,
            max_staged_bytes_per_user: None,
            max_staged_bytes: 256 << 30,
            store_min_free_bytes: 2 << 30,
            staging_shares: 8,
            heavy_staging_bytes_per_sec: 64 << 20,
            heavy_fetch_bytes_per_sec: 128 << 20,
            test_staging_free_bytes: None,
            history_keep: 10,
            conflict_keep: 10,
            conflict_updates_per_hour: 60,
            conflict_max_age_secs: 30 * 24 * 3600,
            gc_grace_secs: 3600,
            gc_interval_secs: 86_400,
            scrub_interval_secs: 604_800,
            scrub_mib_per_sec: 64,
            handover_timeout_ms: 30_000,
            uve2_timeout_ms: 30_000,
            handshake_timeout_ms: 10_000,
            shutdown_grace_ms: 30_000,
            event_ring: 4096,
            event_journal: 8192,
            event_journal_max_age_secs: 90 * 24 * 3600,
            budget_event_interval_secs: 60,
            notices_per_minute: 120,
            session_starts_per_minute: 120,
            max_sessions_per_vm: 256,
            notice_ids_per_vm: 4096,
            bulk_queue_per_vm: 512,
            max_ua_bundle: 1 << 30,
            max_import: None,
            worker_threads: 2,
            s3: None,
        }
    }
}

impl Config {
    /// Loads `path` (if given) over the defaults.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source,
        })
    }

    /// Parses TOML text over the defaults.
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// The API socket path.
    pub fn api_socket(&self) -> PathBuf {
        self.api_socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join("api.sock"))
    }

    /// The store's retention and quota policy.
    pub fn store_policy(&self) -> StorePolicy {
        StorePolicy {
            history_keep: self.history_keep,
            conflict_keep: self.conflict_keep,
            conflict_max_age: Duration::from_secs(self.conflict_max_age_secs),
            quota_bytes: self.user_quota_bytes.unwrap_or(self.max_uif_size),
            conflict_quota_bytes: self.conflict_quota_bytes,
            quota_prunes_history: self.quota_prunes_history,
        }
    }

    /// The staged-byte budgets.
    pub fn staging_limits(&self) -> crate::budgets::staging::StagingLimits {
        use crate::budgets::staging::room::Cap;
        let cap = |configured: Option<u64>| {
            configured.map_or(
                Cap::Share {
                    at_least: self.max_uif_size,
                },
                Cap::Fixed,
            )
        };
        crate::budgets::staging::StagingLimits {
            per_vm: cap(self.max_staged_bytes_per_vm),
            per_user: cap(self.max_staged_bytes_per_user),
            total: self.max_staged_bytes,
            min_free: self.store_min_free_bytes,
            shares: self.staging_shares.max(1),
            heavy_per_sec: self.heavy_staging_bytes_per_sec,
            simulated_free: self.test_staging_free_bytes,
        }
    }

    /// The link budgets of one VM connection at the negotiated heartbeat
    /// and frame limit.
    pub fn link_config(&self, heartbeat_ms: u32, max_frame: u32) -> uve_protocol::link::LinkConfig {
        let heartbeat = Self::ms(u64::from(heartbeat_ms));
        let mut c = uve_protocol::link::LinkConfig::new(heartbeat, max_frame);
        c.max_inbound_bytes = self.link_inbound_bytes;
        c.max_outbound_bytes = self.link_outbound_bytes;
        if let Some(ms) = self.write_deadline_ms {
            c.write_deadline = Self::ms(ms.max(1));
        }
        c
    }

    /// Milliseconds as a duration (helper for the `*_ms` fields).
    pub fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn empty_file_gives_defaults_and_vsock_is_off() {
        let c = Config::parse("").unwrap();
        assert!(!c.vsock_listen);
        assert_eq!(c.port, 7075);
        assert_eq!(c.api_socket(), PathBuf::from("/var/lib/uve-host/api.sock"));
        assert_eq!(c.store_policy().quota_bytes, 64 << 30);
    }

    #[test]
    fn fields_override_and_unknown_fields_are_refused() {
        let c = Config::parse(
            "data_dir = \"/tmp/x\"\nvsock_listen = true\nport = 9000\nhistory_keep = 3\n",
        )
        .unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        assert!(c.vsock_listen);
        assert_eq!(c.port, 9000);
        assert_eq!(c.history_keep, 3);
        assert_eq!(c.api_socket(), PathBuf::from("/tmp/x/api.sock"));
        assert!(Config::parse("no_such_field = 1").is_err());
    }
}
