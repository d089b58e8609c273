//! Prometheus counters of the daemon, rendered as text for `GET /metrics`.
//! Plain atomics: the hot paths (chunk transfer) only add.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use uve_protocol::link::LinkStats;

/// Daemon counters.
#[derive(Default)]
pub struct Metrics {
    /// Agent connections open now.
    pub connections: AtomicU64,
    /// Agent connections accepted since start.
    pub connections_total: AtomicU64,
    /// UIF and bundle bytes received from agents.
    pub bytes_in: AtomicU64,
    /// UIF and bundle bytes sent to agents.
    pub bytes_out: AtomicU64,
    /// Retrieve grants.
    pub retrieves: AtomicU64,
    /// Versions committed as head.
    pub commits: AtomicU64,
    /// Uploads kept as conflict versions.
    pub conflicts: AtomicU64,
    /// Chunks served to agents.
    pub chunks_fetched: AtomicU64,
    /// Chunks received from agents.
    pub chunks_uploaded: AtomicU64,
    /// Of those, chunks received as block deltas against base bytes.
    pub chunk_deltas: AtomicU64,
    /// Unexpected session disconnects reported (agent or host).
    pub unexpected_disconnects: AtomicU64,
    /// Updates refused for good (quota, not assigned, too large, ...).
    pub updates_refused: AtomicU64,
    /// Connections closed at accept: their VM's (or the host's) handshake
    /// places were all taken.
    pub handshakes_refused: AtomicU64,
    /// Handshakes refused because no VM is registered for the peer (its
    /// vsock CID, or its listener): a guest whose CID changed (libvirt's
    /// `auto='yes'`) and was not registered again shows up here.
    pub unknown_peers_refused: AtomicU64,
    /// Bulk store jobs refused because their VM had `bulk_queue_per_vm`
    /// queued (answered `Busy`).
    pub bulk_queue_refused: AtomicU64,
    /// Connections cut off because the VM stopped reading.
    pub stalled_cut_off: AtomicU64,
    /// Uploads dropped after `upload_idle_ms` without a request.
    pub uploads_expired: AtomicU64,
    /// Bytes staged by open uploads (gauge).
    pub staged_bytes: AtomicU64,
    /// Staged bytes of uploads that ended without a commit, deleted.
    pub staged_reclaimed_bytes: AtomicU64,
    /// Chunks refused by a staging budget.
    pub staging_refused: AtomicU64,
    /// Of those, by `max_staged_bytes_per_vm`.
    pub staged_per_vm_refused: AtomicU64,
    /// Of those, by `max_staged_bytes_per_user`.
    pub staged_per_user_refused: AtomicU64,
    /// Of those, by `max_staged_bytes`.
    pub staged_all_refused: AtomicU64,
    /// Of those, by the free-space floor (`store_min_free_bytes`).
    pub staging_free_space_refused: AtomicU64,
    /// Of those, because the VM was over its share while free space was
    /// low (`staging_shares`).
    pub staging_share_refused: AtomicU64,
    /// One share of the staging room, as last measured (gauge).
    pub staging_share_bytes: AtomicU64,
    /// Free bytes of the staging filesystem, as last measured (gauge).
    pub staging_free_bytes: AtomicU64,
    /// Updates refused by `conflict_updates_per_hour`.
    pub conflict_updates_refused: AtomicU64,
    /// Control requests a VM made past `max_control_requests_per_sec`
    /// (each waited before it was read).
    pub control_requests_throttled: AtomicU64,
    /// Lease holders' updates refused over the user's quota.
    pub quota_refused: AtomicU64,
    /// Chunks of heavily staging VMs read late while a light VM worked
    /// (`heavy_staging_bytes_per_sec`).
    pub heavy_staging_throttled: AtomicU64,
    /// Chunk fetches of heavily fetching VMs read late while a light VM
    /// worked (`heavy_fetch_bytes_per_sec`).
    pub heavy_fetch_throttled: AtomicU64,
    /// Chunk files read and checked by scrubs.
    pub chunks_scrubbed: AtomicU64,
    /// Chunk files a scrub found corrupt (moved to `corrupt/`).
    pub chunks_corrupt: AtomicU64,
    /// Conflict versions refused over their writer's bound.
    pub conflict_quota_refused: AtomicU64,
    /// `UnexpectedDisconnect` notices refused by `notices_per_minute`.
    pub notices_refused: AtomicU64,
    /// New sessions refused by `session_starts_per_minute`.
    pub session_starts_refused: AtomicU64,
    /// New sessions refused by `max_sessions_per_vm`.
    pub sessions_refused: AtomicU64,
    /// `UnexpectedDisconnect` notices refused because the VM has no
    /// business with the user (`NotAssigned`).
    pub notices_not_ours: AtomicU64,
    /// Notice ids forgotten by a VM's de-duplication memory
    /// (`notice_ids_per_vm`).
    pub notice_ids_forgotten: AtomicU64,
    /// `UpdateBegin`s refused by `max_uploads_per_vm`.
    pub uploads_refused: AtomicU64,
    /// Connections closed because the VM announced a frame over `max_frame`.
    pub frames_too_large: AtomicU64,
    /// Requests that waited for a `max_inflight` slot of their connection.
    pub inflight_waits: AtomicU64,
    /// Waits of the VMs' links for their byte budgets
    /// (`link_inbound_bytes`, `link_outbound_bytes`).
    pub link: Arc<LinkStats>,
    per_user: Mutex<BTreeMap<String, (u64, u64)>>,
}

/// Adds `n` to a counter.
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// The daemon-wide metrics: name, type, help text, counter.
#[allow(clippy::type_complexity)]
const ROWS: [(&str, &str, &str, fn(&Metrics) -> &AtomicU64); 45] = [
    ("uve_connections", "gauge", "Agent connections open", |m| {
        &m.connections
    }),
    (
        "uve_connections_total",
        "counter",
        "Agent connections accepted",
        |m| &m.connections_total,
    ),
    (
        "uve_bytes_in_total",
        "counter",
        "UIF bytes received from agents",
        |m| &m.bytes_in,
    ),
    (
        "uve_bytes_out_total",
        "counter",
        "UIF and bundle bytes sent to agents",
        |m| &m.bytes_out,
    ),
    (
        "uve_retrieves_total",
        "counter",
        "UIF retrieve grants",
        |m| &m.retrieves,
    ),
    (
        "uve_commits_total",
        "counter",
        "Versions committed as head",
        |m| &m.commits,
    ),
    (
        "uve_conflicts_total",
        "counter",
        "Uploads kept as conflict versions",
        |m| &m.conflicts,
    ),
    (
        "uve_chunks_fetched_total",
        "counter",
        "Chunks served to agents",
        |m| &m.chunks_fetched,
    ),
    (
        "uve_chunks_uploaded_total",
        "counter",
        "Chunks received from agents",
        |m| &m.chunks_uploaded,
    ),
    (
        "uve_chunk_deltas_total",
        "counter",
        "Chunks received as block deltas against the base version (also in uve_chunks_uploaded_total)",
        |m| &m.chunk_deltas,
    ),
    (
        "uve_unexpected_disconnects_total",
        "counter",
        "Unexpected session disconnects",
        |m| &m.unexpected_disconnects,
    ),
    (
        "uve_updates_refused_total",
        "counter",
        "Updates refused for good (the agent keeps their bytes as a preserved copy)",
        |m| &m.updates_refused,
    ),
    (
        "uve_handshakes_refused_total",
        "counter",
        "Connections closed at accept because their VM's handshake places (max_handshakes_per_vm) or all (max_handshakes) were taken",
        |m| &m.handshakes_refused,
    ),
    (
        "uve_unknown_peers_refused_total",
        "counter",
        "Handshakes refused because no VM is registered for the peer (e.g. a vsock CID that changed and was not registered again)",
        |m| &m.unknown_peers_refused,
    ),
    (
        "uve_bulk_queue_refused_total",
        "counter",
        "Bulk store jobs (chunk fetches, uploads) refused because their VM had bulk_queue_per_vm queued; answered Busy",
        |m| &m.bulk_queue_refused,
    ),
    (
        "uve_uploads_expired_total",
        "counter",
        "Uploads dropped after upload_idle_ms without a request",
        |m| &m.uploads_expired,
    ),
    (
        "uve_staged_bytes",
        "gauge",
        "Bytes open uploads have staged (stored, not yet committed)",
        |m| &m.staged_bytes,
    ),
    (
        "uve_staged_reclaimed_bytes_total",
        "counter",
        "Staged bytes of uploads that ended without a commit (aborted, expired, connection closed), deleted",
        |m| &m.staged_reclaimed_bytes,
    ),
    (
        "uve_staging_refused_total",
        "counter",
        "Chunks refused because a staging budget (max_staged_bytes_per_vm, _per_user, max_staged_bytes, store_min_free_bytes, staging_shares, the upload's announced size) was reached",
        |m| &m.staging_refused,
    ),
    (
        "uve_staged_per_vm_refused_total",
        "counter",
        "Chunks refused because their VM had max_staged_bytes_per_vm staged",
        |m| &m.staged_per_vm_refused,
    ),
    (
        "uve_staged_per_user_refused_total",
        "counter",
        "Chunks refused because their user had max_staged_bytes_per_user staged",
        |m| &m.staged_per_user_refused,
    ),
    (
        "uve_staged_all_refused_total",
        "counter",
        "Chunks refused because all uploads had max_staged_bytes staged",
        |m| &m.staged_all_refused,
    ),
    (
        "uve_staging_free_space_refused_total",
        "counter",
        "Chunks refused because the staging filesystem was down to store_min_free_bytes",
        |m| &m.staging_free_space_refused,
    ),
    (
        "uve_staging_share_refused_total",
        "counter",
        "Chunks refused because their VM was over its share of the staging room (staging_shares) while less than a share was free above store_min_free_bytes",
        |m| &m.staging_share_refused,
    ),
    (
        "uve_staging_share_bytes",
        "gauge",
        "One share of the staging room (free space above store_min_free_bytes plus staged bytes, divided by staging_shares), as last measured",
        |m| &m.staging_share_bytes,
    ),
    (
        "uve_staging_free_bytes",
        "gauge",
        "Free bytes of the filesystem where uploads stage, as last measured",
        |m| &m.staging_free_bytes,
    ),
    (
        "uve_conflict_updates_refused_total",
        "counter",
        "Updates refused because a VM without the user's current lease reached conflict_updates_per_hour",
        |m| &m.conflict_updates_refused,
    ),
    (
        "uve_control_requests_throttled_total",
        "counter",
        "Control requests read late because their VM passed max_control_requests_per_sec",
        |m| &m.control_requests_throttled,
    ),
    (
        "uve_heavy_staging_throttled_total",
        "counter",
        "Chunks read late because their VM staged heavily while another VM had bulk work (heavy_staging_bytes_per_sec)",
        |m| &m.heavy_staging_throttled,
    ),
    (
        "uve_heavy_fetch_throttled_total",
        "counter",
        "Chunk fetches read late because their VM fetched heavily while another VM had bulk work (heavy_fetch_bytes_per_sec)",
        |m| &m.heavy_fetch_throttled,
    ),
    (
        "uve_chunks_scrubbed_total",
        "counter",
        "Chunk files read and checked against their hash by scrubs",
        |m| &m.chunks_scrubbed,
    ),
    (
        "uve_chunks_corrupt_total",
        "counter",
        "Chunk files a scrub found not to match their hash (moved to corrupt/)",
        |m| &m.chunks_corrupt,
    ),
    (
        "uve_quota_refused_total",
        "counter",
        "Updates refused because the user would hold more unique bytes (head, history, own uploads in flight) than the quota",
        |m| &m.quota_refused,
    ),
    (
        "uve_conflict_quota_refused_total",
        "counter",
        "Conflict versions refused because their writer's conflict versions of the user would exceed conflict_quota_bytes",
        |m| &m.conflict_quota_refused,
    ),
    (
        "uve_stalled_cut_off_total",
        "counter",
        "Connections cut off because the VM took no frame within write_deadline_ms (it stopped reading)",
        |m| &m.stalled_cut_off,
    ),
    (
        "uve_notices_refused_total",
        "counter",
        "UnexpectedDisconnect notices answered Busy because their VM reached notices_per_minute (the agent retries)",
        |m| &m.notices_refused,
    ),
    (
        "uve_session_starts_refused_total",
        "counter",
        "New sessions answered Busy because their VM reached session_starts_per_minute (the agent announces them again)",
        |m| &m.session_starts_refused,
    ),
    (
        "uve_sessions_refused_total",
        "counter",
        "New sessions refused because their VM had max_sessions_per_vm open",
        |m| &m.sessions_refused,
    ),
    (
        "uve_notices_not_ours_total",
        "counter",
        "UnexpectedDisconnect notices refused because the VM has no session of that user and never served them",
        |m| &m.notices_not_ours,
    ),
    (
        "uve_notice_ids_forgotten_total",
        "counter",
        "Disconnect-notice ids forgotten by their VM's de-duplication memory (notice_ids_per_vm)",
        |m| &m.notice_ids_forgotten,
    ),
    (
        "uve_uploads_refused_total",
        "counter",
        "UpdateBegin refused because the connection had max_uploads_per_vm uploads open",
        |m| &m.uploads_refused,
    ),
    (
        "uve_frames_too_large_total",
        "counter",
        "Connections closed because the VM announced a frame larger than max_frame",
        |m| &m.frames_too_large,
    ),
    (
        "uve_inflight_waits_total",
        "counter",
        "Requests that waited for one of their connection's max_inflight slots (backpressure)",
        |m| &m.inflight_waits,
    ),
    (
        "uve_link_inbound_waits_total",
        "counter",
        "Times a VM's link stopped reading because its unanswered requests reached link_inbound_bytes (backpressure)",
        |m| &m.link.inbound_waits,
    ),
    (
        "uve_link_outbound_waits_total",
        "counter",
        "Times an answer to a VM waited because its queued answers reached link_outbound_bytes (backpressure)",
        |m| &m.link.outbound_waits,
    ),
];

impl Metrics {
    /// Counts a chunk served to `user`'s VM.
    pub fn chunk_fetched(&self, user: &str, bytes: u64) {
        add(&self.chunks_fetched, 1);
        add(&self.bytes_out, bytes);
        self.count_user(user, |(fetched, _)| fetched);
    }

    /// Counts a chunk received for `user`.
    pub fn chunk_uploaded(&self, user: &str, bytes: u64) {
        add(&self.chunks_uploaded, 1);
        add(&self.bytes_in, bytes);
        self.count_user(user, |(_, uploaded)| uploaded);
    }

    /// Adds one to a counter of `user`'s, chosen by `which` from the
    /// chunks fetched and uploaded.
    fn count_user(&self, user: &str, which: fn(&mut (u64, u64)) -> &mut u64) {
        let mut per_user = self.per_user.lock().unwrap_or_else(PoisonError::into_inner);
        *which(per_user.entry(user.to_string()).or_default()) += 1;
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, kind, help, counter) in ROWS {
            let v = counter(self).load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
        let per_user = self.per_user.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = writeln!(
            out,
            "# HELP uve_user_chunks_fetched_total Chunks served per user\n# TYPE uve_user_chunks_fetched_total counter"
        );
        for (user, (f, _)) in per_user.iter() {
            let _ = writeln!(out, "uve_user_chunks_fetched_total{{user=\"{user}\"}} {f}");
        }
        let _ = writeln!(
            out,
            "# HELP uve_user_chunks_uploaded_total Chunks received per user\n# TYPE uve_user_chunks_uploaded_total counter"
        );
        for (user, (_, u)) in per_user.iter() {
            let _ = writeln!(out, "uve_user_chunks_uploaded_total{{user=\"{user}\"}} {u}");
        }
        out
    }
}
