//! The rig the host's fuzz targets share: a real [`Host`] in memory (a
//! [`MemStore`] forked from a seeded template, the registry and the lease
//! table kept in memory) that the targets drive through the real server
//! path or the real UVE-5 handlers.
//!
//! The world every case starts from:
//!
//! - `vm1`, the VM under test; `vm2`, another VM;
//! - `alice` (assigned to `vm1`; versions 1 and 2, the head);
//! - `dave` (assigned to `vm1`; no version yet);
//! - `carol` (assigned to `vm2`, which holds her lease; `vm1` held it
//!   before, so it may still send updates that become conflicts);
//! - `bob` (assigned to `vm2`; one version whose chunks `vm1` must never
//!   receive);
//! - `mallory`, a valid name nobody assigned.
//!
//! [`Rig::settle`] waits until everything a case started has ended, then
//! checks what must hold after any sequence of requests: nothing staged or
//! pinned is left, no task still holds the host, and the store is whole.

pub mod peer;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use uve_host::config::Config;
use uve_host::host::Host;
use uve_host::state::leases::Leases;
use uve_host::state::registry::{Registry, VmSpec};
use uve_host::store::{HeadRule, MemStore, NewVersion, StorePolicy, UifStore};
use uve_protocol::defs::{MAX_CHUNK, MIN_CHUNK};
use uve_protocol::manifest::{ChunkRef, Hash, Manifest};
use uve_protocol::message::Version;
use uve_protocol::testdata::noise;

pub use uve_protocol_fuzz::alloc;

/// The VM under test.
pub const VM: &str = "vm1";
/// The other VM.
pub const OTHER_VM: &str = "vm2";

/// The users of the rig, by what `vm1` may do for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, arbitrary::Arbitrary)]
pub enum Who {
    /// Assigned to `vm1`, with versions 1 and 2.
    Alice,
    /// Assigned to `vm1`, no version.
    Dave,
    /// Assigned to `vm2`; `vm1` held her lease before.
    Carol,
    /// Assigned to `vm2`; `vm1` never served him.
    Bob,
    /// Assigned to nobody.
    Mallory,
}

impl Who {
    /// The user name.
    pub fn name(self) -> &'static str {
        match self {
            Who::Alice => "alice",
            Who::Dave => "dave",
            Who::Carol => "carol",
            Who::Bob => "bob",
            Who::Mallory => "mallory",
        }
    }

    /// True if the user is assigned to `vm1`.
    pub fn on_vm(self) -> bool {
        matches!(self, Who::Alice | Who::Dave)
    }

    /// True if `vm1` may open an update for the user (assigned, or a past
    /// lease holder).
    pub fn may_update(self) -> bool {
        matches!(self, Who::Alice | Who::Dave | Who::Carol)
    }
}

/// A file's bytes cut into chunks: every chunk but the last at least
/// `MIN_CHUNK`, none over `MAX_CHUNK`.
#[derive(Debug, Clone)]
pub struct Cut {
    /// The bytes.
    pub bytes: Arc<Vec<u8>>,
    /// The manifest.
    pub manifest: Manifest,
    /// Offset of each chunk.
    pub starts: Vec<u64>,
}

impl Cut {
    /// Cuts `bytes` into chunks of `MIN_CHUNK + k KiB` for each `k` of
    /// `lens` in turn (32 KiB once they run out), the rest in the last.
    pub fn new(bytes: Vec<u8>, lens: &[u8]) -> Cut {
        let mut chunks = Vec::new();
        let mut starts = Vec::new();
        let mut at = 0usize;
        let mut next = lens.iter();
        while at < bytes.len() {
            let want = next.next().map_or(32 * 1024, |k| {
                MIN_CHUNK as usize + usize::from(*k % 64) * 1024
            });
            let rest = bytes.len() - at;
            let len = if rest <= MAX_CHUNK as usize && rest < want + MIN_CHUNK as usize {
                rest
            } else {
                want
            };
            chunks.push(ChunkRef {
                hash: Hash::of(&bytes[at..at + len]),
                len: u32::try_from(len).unwrap_or(MAX_CHUNK),
            });
            starts.push(at as u64);
            at += len;
        }
        Cut {
            bytes: Arc::new(bytes),
            manifest: Manifest::from_chunks(chunks),
            starts,
        }
    }

    /// The bytes of chunk `i`.
    pub fn chunk(&self, i: usize) -> &[u8] {
        let at = self.starts[i] as usize;
        &self.bytes[at..at + self.manifest.chunks[i].len as usize]
    }
}

/// The seeded world, built once per process.
pub struct Seed {
    /// The store every case forks.
    pub store: MemStore,
    /// Alice's versions, by number.
    pub alice: HashMap<Version, Cut>,
    /// Chunks of bob's version that no other version shares.
    pub bob_only: HashSet<Hash>,
}

/// The seeded world.
pub fn seed() -> &'static Seed {
    static SEED: OnceLock<Seed> = OnceLock::new();
    SEED.get_or_init(|| {
        let store = MemStore::new(StorePolicy::default());
        let v1 = Cut::new(noise(80 * 1024, 1), &[8, 4]);
        let mut edited = v1.bytes.to_vec();
        edited[20_480..24_576].copy_from_slice(&noise(4096, 2));
        edited.extend_from_slice(&noise(20 * 1024, 3));
        let v2 = Cut::new(edited, &[8, 4, 20]);
        let bob = Cut::new(noise(40 * 1024, 9), &[]);
        for cut in [&v1, &v2, &bob] {
            for i in 0..cut.manifest.chunks.len() {
                let c = cut.manifest.chunks[i];
                store.put_chunk(&c.hash, cut.chunk(i)).expect("seed chunk");
            }
        }
        let mut base = None;
        for (user, cut, origin) in [
            ("alice", &v1, "vm:vm1"),
            ("alice", &v2, "vm:vm1"),
            ("bob", &bob, "vm:vm2"),
        ] {
            let outcome = store
                .add_version(&NewVersion {
                    user,
                    manifest: &cut.manifest,
                    base: if user == "alice" { base } else { None },
                    origin,
                    rule: HeadRule::Always,
                })
                .expect("seed version");
            if user == "alice" {
                base = Some(match outcome {
                    uve_host::store::CommitOutcome::Committed(v)
                    | uve_host::store::CommitOutcome::Redelivered(v)
                    | uve_host::store::CommitOutcome::Conflict { kept_as: v, .. } => v,
                });
            }
        }
        let shared: HashSet<Hash> = [&v1, &v2]
            .iter()
            .flat_map(|c| c.manifest.chunks.iter().map(|c| c.hash))
            .collect();
        let bob_only = bob
            .manifest
            .chunks
            .iter()
            .map(|c| c.hash)
            .filter(|h| !shared.contains(h))
            .collect();
        Seed {
            store,
            alice: HashMap::from([(1, v1), (2, v2)]),
            bob_only,
        }
    })
}

/// The settings a case may vary.
#[derive(Debug, Clone, Copy)]
pub struct Knobs {
    /// Bulk threads of the store (0: chunk work on the runtime's blocking
    /// threads, which outlive a case; 1 starts one thread per case).
    pub bulk_threads: usize,
    /// Per-user quota, bytes.
    pub quota: u64,
    /// Staged bytes per VM and per user.
    pub staged_per_vm: u64,
    /// Staged bytes in all.
    pub staged_total: u64,
    /// Uploads one connection may have open.
    pub max_uploads: usize,
    /// Requests a connection may have in flight.
    pub max_inflight: u32,
    /// Size of the store's pretend filesystem (its free-space figure).
    pub capacity: Option<u64>,
    /// Updates per hour without the current lease.
    pub conflict_per_hour: u32,
    /// Idle time after which an upload expires, ms.
    pub upload_idle_ms: u64,
    /// Committed versions kept per user.
    pub history_keep: usize,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            bulk_threads: 0,
            quota: 1 << 20,
            staged_per_vm: 1 << 20,
            staged_total: 2 << 20,
            max_uploads: 4,
            max_inflight: 8,
            capacity: None,
            conflict_per_hour: 24,
            upload_idle_ms: 120_000,
            history_keep: 4,
        }
    }
}

/// Free bytes the store keeps when it has a capacity.
pub const MIN_FREE: u64 = 64 * 1024;

/// The host's configuration for `k`: small limits, so that budgets are
/// reached within a case; no timer fires within one (heartbeats, GC).
pub fn config(k: &Knobs) -> Config {
    Config {
        data_dir: "/nonexistent/uve-fuzz".into(),
        heartbeat_ms: 600_000,
        max_inflight: k.max_inflight,
        max_uif_size: 1 << 20,
        max_chunks: 64,
        user_quota_bytes: Some(k.quota),
        max_uploads_per_vm: k.max_uploads,
        upload_idle_ms: k.upload_idle_ms,
        max_staged_bytes_per_vm: Some(k.staged_per_vm),
        max_staged_bytes_per_user: Some(k.staged_per_vm),
        max_staged_bytes: k.staged_total,
        store_min_free_bytes: if k.capacity.is_some() { MIN_FREE } else { 0 },
        history_keep: k.history_keep,
        conflict_keep: 2,
        conflict_updates_per_hour: k.conflict_per_hour,
        gc_interval_secs: 0,
        scrub_interval_secs: 0,
        handover_timeout_ms: 1_000,
        event_ring: 256,
        ..Config::default()
    }
}

/// One case's host.
pub struct Rig {
    /// The host.
    pub host: Arc<Host>,
    /// Its store.
    pub store: Arc<MemStore>,
}

impl Rig {
    /// A host on a fork of the seeded store, with the rig's VMs, users and
    /// leases.
    pub fn new(k: &Knobs) -> Rig {
        let config = config(k);
        let mut store = seed()
            .store
            .fork(config.store_policy())
            .with_bulk_threads(k.bulk_threads);
        if let Some(c) = k.capacity {
            store = store.with_capacity(c);
        }
        let store = Arc::new(store);
        let registry = Registry::in_memory(config.port);
        for vm in [VM, OTHER_VM] {
            registry
                .add_vm(VmSpec {
                    id: vm.to_string(),
                    cid: None,
                    uds_path: None,
                    port: None,
                    unix: Some(format!("/nonexistent/{vm}.sock").into()),
                })
                .expect("register VM")
                .durable_blocking()
                .expect("in memory");
        }
        for (user, vm) in [
            ("alice", VM),
            ("dave", VM),
            ("carol", OTHER_VM),
            ("bob", OTHER_VM),
        ] {
            let assigned = registry.assign(user, vm).expect("assign");
            assigned.durable_blocking().expect("in memory");
        }
        let leases = Leases::in_memory();
        for (user, vm, base) in [
            ("carol", VM, None),
            ("carol", OTHER_VM, None),
            ("bob", OTHER_VM, Some(1)),
        ] {
            leases
                .grant(user, vm, base)
                .durable_blocking()
                .expect("in memory");
        }
        let host = Host::new(
            config,
            std::env::temp_dir(),
            store.clone(),
            registry,
            leases,
        );
        Rig {
            host: Arc::new(host),
            store,
        }
    }

    /// Waits (at most `limit`) until nothing a case started is left: no
    /// staged byte (budgets and store), no stage, no pin, and no task
    /// holding the host. Then checks that every retained version is whole.
    pub async fn settle(&self, limit: Duration) {
        let since = Instant::now();
        loop {
            let staged = self.host.staging().staged_bytes();
            let holders = Arc::strong_count(&self.host);
            // The store's count last: it walks every chunk.
            let held = (staged == 0 && holders == 1).then(|| self.store.held());
            if held.is_some_and(|h| h.stages == 0 && h.pinned == 0) {
                break;
            }
            let held = held.unwrap_or_else(|| self.store.held());
            assert!(
                since.elapsed() < limit,
                "still held {limit:?} after the case: {staged} bytes staged, {held:?}, \
                 {holders} holders of the host"
            );
            // The reclaimer thread may be what is awaited.
            std::thread::yield_now();
            tokio::task::yield_now().await;
            if since.elapsed() > Duration::from_millis(2) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        self.check_store();
    }

    /// Every user's head is a retained version, and every retained version
    /// is a valid manifest whose chunks are all stored.
    pub fn check_store(&self) {
        self.store.fail_next(0);
        let store: &dyn UifStore = self.store.as_ref();
        for user in store.users().expect("users") {
            let versions = store.versions(&user).expect("versions");
            let head = store.head(&user).expect("head");
            assert!(
                head.is_none_or(|h| versions.iter().any(|v| v.version == h)),
                "{user}'s head {head:?} is not retained"
            );
            for v in versions {
                let m = store.manifest(&user, v.version).expect("retained manifest");
                m.validate().expect("retained manifests are valid");
                assert_eq!(m.header.size, v.size);
                for c in &m.chunks {
                    assert!(
                        store.has_chunk(&c.hash).expect("has_chunk"),
                        "{user} v{} lists chunk {} the store lacks",
                        v.version,
                        c.hash
                    );
                }
            }
        }
    }
}

/// With `UVE_FUZZ_PRINT` set, prints the case decoded from the input (to
/// read a crash's case: run the target on its artifact).
pub fn print_case(case: &impl std::fmt::Debug) {
    static ON: OnceLock<bool> = OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("UVE_FUZZ_PRINT").is_some()) {
        eprintln!("{case:#?}");
    }
}

/// The runtime the targets run their cases on: one thread for every task
/// (cases are reproducible up to the store's blocking threads), timers on.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    })
}

pub mod stats {
    //! With `UVE_FUZZ_STATS` set, counts answers by request kind and
    //! outcome and prints the table every 20,000 answers: how deep the
    //! cases reach (commits, deltas) is what a corpus is judged by.

    use std::collections::BTreeMap;
    use std::sync::{Mutex, OnceLock};

    use uve_protocol::message::Response;

    static TABLE: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());

    fn on() -> bool {
        static ON: OnceLock<bool> = OnceLock::new();
        *ON.get_or_init(|| std::env::var_os("UVE_FUZZ_STATS").is_some())
    }

    /// Counts `answer` to a request of `kind`.
    pub fn count(answer: &Response, kind: &str) {
        if !on() {
            return;
        }
        let outcome = match answer {
            Response::Error(e) => format!("{:?}", e.code),
            Response::Committed { .. } => "committed".into(),
            Response::Conflict { .. } => "conflict".into(),
            Response::Missing(m) if !m.is_empty() => "missing".into(),
            Response::BlockSignatures(s) if s.iter().any(Option::is_some) => "digests".into(),
            _ => "ok".into(),
        };
        let mut t = TABLE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *t.entry(format!("{kind} {outcome}")).or_default() += 1;
        let total: u64 = t.values().sum();
        if total % 20_000 == 0 {
            eprintln!("--- answers: {t:?}");
        }
    }
}
