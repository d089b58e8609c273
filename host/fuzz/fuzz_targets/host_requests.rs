//! Fuzzes the host's handling of one VM's requests. Each case builds a
//! fresh in-memory host (the rig: a `MemStore`, one VM under test and its
//! neighbours), connects a hostile agent to it through the real server
//! path (handshake, link, dispatcher, UVE-5 handlers), sends batches of
//! requests an agent could send (retrieve, manifest pages, chunk fetches,
//! update begin, pages, chunk uploads, block signatures and deltas,
//! commits, aborts, session notices, pings, requests only the host may
//! send, and raw bytes), then closes the connection. The requests are made
//! from what the agent has learnt so far (leases, pages, upload ids), with
//! lies the input chooses, so that cases reach the deep paths.
//!
//! Beyond "no panic", it asserts:
//!
//! - every request sent is answered exactly once, on its id, with a frame
//!   that decodes and the answer kind of its request;
//! - no answer is `Internal` unless the store failed (on purpose) in that
//!   batch;
//! - the trust boundary: `vm1` gets no grant, page or chunk of a user not
//!   assigned to it, never a byte of bob's, and only chunks of pages it
//!   was served; a commit becomes head only under the lease `vm1` holds
//!   now, on a base it was granted or committed since;
//! - what the host answers is what the store holds (grants, pages,
//!   missing chunks, block signatures of the upload's own base, committed
//!   manifests);
//! - once the connection is over, nothing it staged or pinned is left,
//!   no task still holds the host, its sessions are gone, the store is
//!   whole, and the case never held more than a bounded amount of memory.
#![no_main]

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use uve_host::store::UifStore;
use uve_host_fuzz::peer::{Answer, Outgoing, Peer, ended};
use uve_host_fuzz::{Cut, Knobs, MIN_FREE, Rig, VM, Who, alloc, runtime, seed};
use uve_protocol::defs::MAX_TEXT_LEN;
use uve_protocol::delta::{self, block_count, block_digests};
use uve_protocol::manifest::{ChunkRef, Hash, Manifest, ManifestHeader, chunks_per_page};
use uve_protocol::message::{
    BlockDigest, ChunkDelta, DeltaBlock, DisconnectNotice, ErrorCode, Hello, Request, Response,
    UpdateBegin, UpdateCause, Version,
};
use uve_protocol::names::{SessionId, UaName, UserName};
use uve_protocol::testdata::noise;

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

/// The most a case may make the process hold at once, beyond what it held
/// before: link budgets, staged bytes and the store's copies of them are
/// all a few MiB under the rig's limits.
const MEMORY_BOUND: usize = 64 << 20;

#[derive(Arbitrary, Debug)]
struct Case {
    setup: Setup,
    batches: Vec<Vec<Op>>,
    goodbye: bool,
}

#[derive(Arbitrary, Debug)]
struct Setup {
    protocol_2: bool,
    bad_hello: bool,
    bulk_threads: bool,
    quota: u8,
    staging: u8,
    max_uploads: u8,
    max_inflight: u8,
    capacity: Option<u8>,
    conflict: u8,
    short_idle: bool,
    keep: u8,
}

/// A version, as the agent names it.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Pick {
    Head,
    Granted,
    Number(u8),
    Nothing,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum ChunkPick {
    Served(u8),
    Known(u8),
    Any([u8; 32]),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum LeasePick {
    Granted,
    Stale,
    Zero,
    Any(u64),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum UploadPick {
    Last,
    Nth(u8),
    Any(u64),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum PagePick {
    Next,
    Again,
    Any(u32),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum HeaderLie {
    None,
    Size(i8),
    Count(i8),
    Digest,
    Huge,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum ListLie {
    None,
    LenPlus(u8),
    LenMinus(u8),
    Swap(u8, u8),
    Drop(u8),
    Dup(u8),
    Tiny(u8),
    Known(u8, u8),
    Hash(u8),
    Empty,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum DataLie {
    None,
    Flip(u16),
    Short,
    Long,
    Other(u8),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum DeltaLie {
    None,
    Flip(u8),
    Index,
    Hash,
    OutOfRange,
    Short,
    Repeat,
}

/// The content of an update, from its base's bytes.
#[derive(Arbitrary, Debug, Clone)]
enum Draft {
    Same,
    Edit {
        writes: Vec<(u8, u8)>,
        append: u8,
        cuts: Vec<u8>,
    },
    Fresh {
        kib: u8,
        seed: u8,
        cuts: Vec<u8>,
    },
    Empty,
}

#[derive(Arbitrary, Debug, Clone)]
enum Op {
    Retrieve {
        user: Who,
        session: u8,
    },
    ManifestPage {
        user: Who,
        version: Pick,
        page: u8,
    },
    Fetch {
        user: Who,
        chunk: ChunkPick,
    },
    Begin {
        user: Who,
        session: u8,
        base: Pick,
        lease: LeasePick,
        draft: Draft,
        lie: HeaderLie,
        cause: u8,
    },
    List {
        upload: UploadPick,
        page: PagePick,
        lie: ListLie,
    },
    Upload {
        upload: UploadPick,
        chunk: u8,
        lie: DataLie,
    },
    Signatures {
        upload: UploadPick,
        chunks: Vec<u8>,
        all_missing: bool,
    },
    Delta {
        upload: UploadPick,
        chunk: u8,
        lie: DeltaLie,
    },
    Commit {
        upload: UploadPick,
    },
    Abort {
        upload: UploadPick,
    },
    Started {
        session: u8,
        user: Who,
        ua: bool,
    },
    Ended {
        session: u8,
    },
    Disconnect {
        id: u8,
        session: u8,
        user: Who,
        long_reason: bool,
    },
    Ping {
        nonce: u64,
    },
    HostBound(u8),
    Raw(Vec<u8>),
    FailStore(u8),
}

/// An upload the host accepted, as the agent knows it.
struct UploadModel {
    id: u64,
    user: Who,
    draft: Cut,
    base: Option<Version>,
    lease: u64,
    header: ManifestHeader,
    /// Chunks of the pages the host accepted, in order.
    sent: Vec<ChunkRef>,
    next_page: u32,
    listed: HashSet<Hash>,
    /// Positions in `sent` the host reported missing.
    missing: Vec<usize>,
    stored: HashSet<Hash>,
    signed: HashSet<usize>,
    signatures: HashMap<usize, Vec<BlockDigest>>,
}

impl UploadModel {
    fn bytes_of(&self, hash: &Hash) -> Option<&[u8]> {
        let i = self
            .draft
            .manifest
            .chunks
            .iter()
            .position(|c| c.hash == *hash)?;
        Some(self.draft.chunk(i))
    }

    fn start(&self, i: usize) -> u64 {
        self.sent[..i].iter().map(|c| u64::from(c.len)).sum()
    }

    fn awaited(&self, i: usize) -> bool {
        self.missing.contains(&i) && !self.stored.contains(&self.sent[i].hash)
    }
}

/// What the agent knows.
#[derive(Default)]
struct Model {
    protocol: u16,
    max_frame: u32,
    /// The lease `vm1` was last granted on each user.
    lease: HashMap<Who, u64>,
    /// Epochs granted so far, and the highest granted before this batch.
    epochs: HashSet<u64>,
    epoch_floor: u64,
    /// The version granted on this connection per user (the host keeps the
    /// last grant only), and what the grant was based on.
    granted: HashMap<Who, Option<Version>>,
    /// Versions committed since the last grant, per user.
    committed: HashMap<Who, Vec<Version>>,
    /// Chunks listed in pages served since the last grant, per user.
    served: HashMap<Who, Vec<Hash>>,
    /// What a fetch of the current batch may get: the chunks served before
    /// it, or by a page of it (its requests run in any order, so a fetch
    /// may run before a grant of the batch that ends what was served, or
    /// after a page of the batch that comes later in the list).
    may_fetch: HashMap<Who, HashSet<Hash>>,
    /// Contents of versions the agent knows.
    contents: HashMap<(Who, Version), Cut>,
    uploads: Vec<UploadModel>,
    seen_uploads: HashSet<u64>,
    /// Every chunk hash the agent has come across legitimately.
    known: Vec<Hash>,
    /// A raw request changed the host's state: what the agent knows may
    /// be out of date.
    tainted: bool,
}

/// What a sent request needs for its answer to be checked.
enum Pending {
    Retrieve(Who),
    Page {
        who: Who,
        version: Version,
        page: u32,
    },
    Fetch {
        who: Who,
        hash: Hash,
    },
    Begin {
        who: Who,
        draft: Cut,
        base: Option<Version>,
        lease: u64,
        header: ManifestHeader,
        huge: bool,
    },
    List {
        upload: Option<u64>,
        page: u32,
        chunks: Vec<ChunkRef>,
    },
    Upload {
        upload: Option<u64>,
        hash: Hash,
        data_hash: Hash,
        len: usize,
    },
    Signatures {
        upload: Option<u64>,
        indices: Vec<u32>,
    },
    Delta {
        upload: Option<u64>,
        index: u32,
        hash: Hash,
    },
    Commit(Option<u64>),
    Abort(Option<u64>),
    Started(Who),
    Quiet,
    Disconnect {
        who: Who,
        long: bool,
    },
    Ping(u64),
    HostBound,
    Raw {
        bad_name: bool,
        stateful: bool,
    },
}

fuzz_target!(|data: &[u8]| {
    let Ok(case) = Case::arbitrary(&mut Unstructured::new(data)) else {
        return;
    };
    uve_host_fuzz::print_case(&case);
    let before = alloc::reset_peak();
    runtime().block_on(run(case));
    let grew = alloc::peak().saturating_sub(before);
    assert!(grew <= MEMORY_BOUND, "a case held {grew} bytes at once");
});

fn knobs(s: &Setup) -> Knobs {
    let seeded = seed().store.held().chunk_bytes;
    Knobs {
        bulk_threads: usize::from(s.bulk_threads),
        quota: [1 << 20, 160 << 10, 64 << 10][usize::from(s.quota % 3)],
        staged_per_vm: [1 << 20, 200 << 10, 48 << 10][usize::from(s.staging % 3)],
        staged_total: if s.staging & 4 == 0 {
            2 << 20
        } else {
            150 << 10
        },
        max_uploads: 1 + usize::from(s.max_uploads % 4),
        max_inflight: 1 + u32::from(s.max_inflight % 8),
        capacity: s
            .capacity
            .map(|c| seeded + MIN_FREE + u64::from(c) * 16 * 1024),
        conflict_per_hour: [0, 12, 24][usize::from(s.conflict % 3)],
        upload_idle_ms: if s.short_idle { 20 } else { 120_000 },
        history_keep: 1 + usize::from(s.keep % 4),
    }
}

async fn run(case: Case) {
    let knobs = knobs(&case.setup);
    let rig = Rig::new(&knobs);
    let hello = Hello {
        protocol_min: if case.setup.bad_hello { 9 } else { 1 },
        protocol_max: if case.setup.protocol_2 { 2 } else { 1 },
        agent_version: "fuzz".into(),
        boot_id: [7; 16],
        capabilities: 0,
        max_frame: uve_protocol::defs::DEFAULT_MAX_FRAME,
    };
    let (peer, served) = Peer::connect(&rig.host, VM, hello).await;
    match peer {
        Err(e) => assert!(case.setup.bad_hello, "handshake refused: {e}"),
        Ok(mut peer) => {
            assert!(
                !case.setup.bad_hello,
                "a version nobody speaks was welcomed"
            );
            let mut model = Model {
                protocol: peer.welcome.protocol,
                max_frame: peer.welcome.max_frame,
                known: seed()
                    .alice
                    .values()
                    .flat_map(|c| c.manifest.chunks.iter().map(|c| c.hash))
                    .collect(),
                ..Model::default()
            };
            for batch in &case.batches {
                if peer.ending {
                    break;
                }
                exchange(&rig, &mut peer, &mut model, batch).await;
            }
            peer.close(case.goodbye).await;
        }
    }
    assert!(ended(served).await, "the only connection was admitted");
    rig.settle(Duration::from_secs(20)).await;
    let host = &rig.host;
    assert!(
        host.sessions().list(Some(VM)).is_empty(),
        "sessions outlived the connection"
    );
    assert!(
        host.conns().get(VM).is_none(),
        "the connection is still listed"
    );
    let open = host
        .metrics()
        .connections
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(open, 0, "connections gauge");
    assert!(
        host.events().since(0).0.len() <= 256,
        "the event ring is bounded"
    );
}

/// Sends one batch and checks every answer against the model.
async fn exchange(rig: &Rig, peer: &mut Peer, model: &mut Model, batch: &[Op]) {
    let mut out = Vec::new();
    let mut pending = Vec::new();
    let mut fail = 0;
    for op in batch.iter().take(16) {
        if let Op::FailStore(n) = op {
            fail = u32::from(n % 4) + 1;
            continue;
        }
        let (o, p) = request(rig, model, op);
        out.push(o);
        pending.push(p);
    }
    // Requests of one batch run concurrently, in an order the agent cannot
    // know: after a batch with two that change what the model tracks, the
    // model may be wrong, and only checks that need no model remain.
    let stateful = batch.iter().filter(|op| changes_model(op)).count();
    model.tainted |= stateful > 1;
    model.epoch_floor = model.epochs.iter().copied().max().unwrap_or(0);
    let failed_before = rig.store.failures();
    rig.store.fail_next(fail);
    let answers = peer.exchange(&out).await;
    rig.store.fail_next(0);
    model.may_fetch = model
        .served
        .iter()
        .map(|(w, s)| (*w, s.iter().copied().collect()))
        .collect();
    for (p, a) in pending.iter().zip(&answers) {
        if let (Pending::Page { who, .. }, Answer::Got(Response::ManifestPage(refs))) = (p, a) {
            let may = model.may_fetch.entry(*who).or_default();
            may.extend(refs.iter().map(|c| c.hash));
        }
    }
    let store_failed = rig.store.failures() != failed_before;
    let alone = out.len() == 1 && !store_failed;
    for ((p, a), o) in pending.into_iter().zip(answers).zip(&out) {
        let r = match a {
            Answer::Got(r) => r,
            Answer::NotSent => continue,
            Answer::Unanswered => {
                assert!(peer.ending, "{o:?} unanswered");
                continue;
            }
        };
        if let Response::Error(e) = &r {
            assert!(
                e.code != ErrorCode::Internal || store_failed,
                "Internal without a store failure: {e} (request {o:?})"
            );
        }
        check(rig, model, p, r, alone, o);
    }
}

/// True if the answer to `op` changes what the model tracks (grants,
/// pages served, uploads).
fn changes_model(op: &Op) -> bool {
    !matches!(
        op,
        Op::Fetch { .. }
            | Op::Started { .. }
            | Op::Ended { .. }
            | Op::Disconnect { .. }
            | Op::Ping { .. }
            | Op::HostBound(_)
            | Op::FailStore(_)
    )
}

fn session(n: u8) -> SessionId {
    SessionId::new(format!("s{}", n % 4)).expect("valid session id")
}

fn user(w: Who) -> UserName {
    UserName::new(w.name()).expect("valid user name")
}

fn version_of(rig: &Rig, model: &Model, who: Who, pick: Pick) -> Option<Version> {
    match pick {
        Pick::Head => rig.store.head(who.name()).ok().flatten(),
        Pick::Granted => model.granted.get(&who).copied().flatten(),
        Pick::Number(n) => Some(Version::from(n % 6)),
        Pick::Nothing => None,
    }
}

/// The upload id to send, and its place in the model if the agent knows it.
fn upload_of(model: &Model, pick: UploadPick) -> (u64, Option<usize>) {
    match pick {
        _ if model.uploads.is_empty() => (1, None),
        UploadPick::Last => (
            model.uploads[model.uploads.len() - 1].id,
            Some(model.uploads.len() - 1),
        ),
        UploadPick::Nth(n) => {
            let i = usize::from(n) % model.uploads.len();
            (model.uploads[i].id, Some(i))
        }
        UploadPick::Any(id) => (id, model.uploads.iter().position(|u| u.id == id)),
    }
}

/// The id of the upload at `at` in the model, if any.
fn known(model: &Model, at: Option<usize>) -> Option<u64> {
    at.map(|i| model.uploads[i].id)
}

/// The model of upload `id`; `None` if it is gone from the model.
fn model_of(model: &mut Model, id: Option<u64>) -> Option<&mut UploadModel> {
    let id = id?;
    model.uploads.iter_mut().find(|u| u.id == id)
}

/// The content of a new version made from `base` as `draft` says.
fn draft_from(base: Option<&Cut>, draft: &Draft) -> Cut {
    let base_bytes = base.map(|c| c.bytes.to_vec()).unwrap_or_default();
    match draft {
        Draft::Same => Cut::new(base_bytes, &[]),
        Draft::Empty => Cut::new(Vec::new(), &[]),
        Draft::Edit {
            writes,
            append,
            cuts,
        } => {
            let mut bytes = base_bytes;
            for (block, seed) in writes.iter().take(8) {
                if bytes.is_empty() {
                    break;
                }
                let at = usize::from(*block) * 4096 % bytes.len();
                let n = 4096.min(bytes.len() - at);
                bytes[at..at + n].copy_from_slice(&noise(n, u64::from(*seed) + 100));
            }
            bytes.extend_from_slice(&noise(usize::from(append % 48) * 1024, u64::from(*append)));
            Cut::new(bytes, cuts)
        }
        Draft::Fresh { kib, seed, cuts } => Cut::new(
            noise(
                usize::from(kib % 160) * 1024 + usize::from(*kib),
                u64::from(*seed) + 1000,
            ),
            cuts,
        ),
    }
}

fn chosen_chunk(u: &UploadModel, pick: u8) -> Option<usize> {
    if !u.missing.is_empty() {
        return Some(u.missing[usize::from(pick) % u.missing.len()]);
    }
    (!u.sent.is_empty()).then(|| usize::from(pick) % u.sent.len())
}

#[allow(clippy::too_many_lines)]
fn request(rig: &Rig, model: &mut Model, op: &Op) -> (Outgoing, Pending) {
    let req = |r: Request| Outgoing::Request(r);
    match op {
        Op::Retrieve {
            user: who,
            session: s,
        } => (
            req(Request::UifRetrieve {
                user: user(*who),
                session: session(*s),
            }),
            Pending::Retrieve(*who),
        ),
        Op::ManifestPage {
            user: who,
            version,
            page,
        } => {
            let version = version_of(rig, model, *who, *version).unwrap_or(0);
            let page = u32::from(*page % 3);
            (
                req(Request::ManifestPage {
                    user: user(*who),
                    version,
                    page,
                }),
                Pending::Page {
                    who: *who,
                    version,
                    page,
                },
            )
        }
        Op::Fetch { user: who, chunk } => {
            let hash = match chunk {
                ChunkPick::Served(n) => model
                    .served
                    .get(who)
                    .filter(|s| !s.is_empty())
                    .map_or(Hash([0; 32]), |s| s[usize::from(*n) % s.len()]),
                ChunkPick::Known(n) if !model.known.is_empty() => {
                    model.known[usize::from(*n) % model.known.len()]
                }
                ChunkPick::Known(_) => Hash([1; 32]),
                ChunkPick::Any(h) => Hash(*h),
            };
            (
                req(Request::ChunkFetch {
                    user: user(*who),
                    hash,
                }),
                Pending::Fetch { who: *who, hash },
            )
        }
        Op::Begin {
            user: who,
            session: s,
            base,
            lease,
            draft,
            lie,
            cause,
        } => {
            let base = version_of(rig, model, *who, *base);
            let base_cut = base.and_then(|v| {
                model.contents.get(&(*who, v)).or(if *who == Who::Alice {
                    seed().alice.get(&v)
                } else {
                    None
                })
            });
            let draft = draft_from(base_cut, draft);
            let granted = model.lease.get(who).copied().unwrap_or(0);
            let lease = match lease {
                LeasePick::Granted => granted,
                LeasePick::Stale => granted.saturating_sub(1),
                LeasePick::Zero => 0,
                LeasePick::Any(n) => *n,
            };
            let mut header = draft.manifest.header;
            match lie {
                HeaderLie::None => {}
                HeaderLie::Size(d) => {
                    header.size = header.size.saturating_add_signed(i64::from(*d))
                }
                HeaderLie::Count(d) => {
                    header.chunk_count = header.chunk_count.saturating_add_signed(i32::from(*d));
                }
                HeaderLie::Digest => header.digest = Hash([9; 32]),
                HeaderLie::Huge => header.size = u64::MAX - u64::from(header.chunk_count),
            }
            let causes = [
                UpdateCause::Logout,
                UpdateCause::Release,
                UpdateCause::Checkpoint,
                UpdateCause::Shutdown,
                UpdateCause::Disconnect,
                UpdateCause::Spooled,
            ];
            (
                req(Request::UpdateBegin(UpdateBegin {
                    user: user(*who),
                    session: session(*s),
                    base,
                    lease,
                    header,
                    cause: causes[usize::from(*cause) % causes.len()],
                })),
                Pending::Begin {
                    who: *who,
                    draft,
                    base,
                    lease,
                    header,
                    huge: matches!(lie, HeaderLie::Huge),
                },
            )
        }
        Op::List { upload, page, lie } => {
            let (id, at) = upload_of(model, *upload);
            let per = chunks_per_page(model.max_frame) as usize;
            let (page, mut chunks) = match at.map(|i| &model.uploads[i]) {
                None => (0, Vec::new()),
                Some(u) => {
                    let page = match page {
                        PagePick::Next => u.next_page,
                        PagePick::Again => u.next_page.saturating_sub(1),
                        PagePick::Any(p) => *p,
                    };
                    let all = &u.draft.manifest.chunks;
                    let from = (page as usize).saturating_mul(per).min(all.len());
                    (page, all[from..(from + per).min(all.len())].to_vec())
                }
            };
            lie_about(&mut chunks, *lie, &model.known);
            (
                req(Request::UpdatePage {
                    upload: id,
                    page,
                    chunks: chunks.clone(),
                }),
                Pending::List {
                    upload: known(model, at),
                    page,
                    chunks,
                },
            )
        }
        Op::Upload { upload, chunk, lie } => {
            let (id, at) = upload_of(model, *upload);
            let (hash, mut data) = match at.map(|i| &model.uploads[i]) {
                Some(u) => match chosen_chunk(u, *chunk) {
                    Some(i) => {
                        let h = u.sent[i].hash;
                        (
                            h,
                            u.bytes_of(&h)
                                .map(<[u8]>::to_vec)
                                .unwrap_or_else(|| vec![0; u.sent[i].len as usize]),
                        )
                    }
                    None => (Hash([2; 32]), vec![1, 2, 3]),
                },
                None => (Hash([2; 32]), vec![1, 2, 3]),
            };
            match lie {
                DataLie::None => {}
                DataLie::Flip(at) if !data.is_empty() => {
                    let i = usize::from(*at) % data.len();
                    data[i] ^= 0x55;
                }
                DataLie::Flip(_) => {}
                DataLie::Short => {
                    data.pop();
                }
                DataLie::Long => data.push(0),
                DataLie::Other(n) => {
                    if let Some(u) = at.map(|i| &model.uploads[i]) {
                        let k = usize::from(*n) % u.draft.manifest.chunks.len().max(1);
                        if k < u.draft.manifest.chunks.len() {
                            data = u.draft.chunk(k).to_vec();
                        }
                    }
                }
            }
            let pending = Pending::Upload {
                upload: known(model, at),
                hash,
                data_hash: Hash::of(&data),
                len: data.len(),
            };
            (
                req(Request::ChunkUpload {
                    upload: id,
                    hash,
                    data,
                }),
                pending,
            )
        }
        Op::Signatures {
            upload,
            chunks,
            all_missing,
        } => {
            let (id, at) = upload_of(model, *upload);
            let indices: Vec<u32> = match at.map(|i| &model.uploads[i]) {
                Some(u) if *all_missing => u
                    .missing
                    .iter()
                    .filter(|i| u.awaited(**i))
                    .map(|i| u32::try_from(*i).unwrap_or(u32::MAX))
                    .collect(),
                _ => chunks.iter().take(140).map(|c| u32::from(*c)).collect(),
            };
            (
                req(Request::BlockSignatures {
                    upload: id,
                    chunks: indices.clone(),
                }),
                Pending::Signatures {
                    upload: known(model, at),
                    indices,
                },
            )
        }
        Op::Delta { upload, chunk, lie } => {
            let (id, at) = upload_of(model, *upload);
            let d = at
                .map(|i| &model.uploads[i])
                .and_then(|u| delta_for(u, *chunk, *lie));
            let d = d.unwrap_or(ChunkDelta {
                upload: id,
                index: u32::from(*chunk),
                hash: Hash([3; 32]),
                blocks: Vec::new(),
            });
            let pending = Pending::Delta {
                upload: known(model, at),
                index: d.index,
                hash: d.hash,
            };
            (
                req(Request::ChunkDelta(ChunkDelta { upload: id, ..d })),
                pending,
            )
        }
        Op::Commit { upload } => {
            let (id, at) = upload_of(model, *upload);
            (
                req(Request::UpdateCommit { upload: id }),
                Pending::Commit(known(model, at)),
            )
        }
        Op::Abort { upload } => {
            let (id, at) = upload_of(model, *upload);
            (
                req(Request::UpdateAbort { upload: id }),
                Pending::Abort(known(model, at)),
            )
        }
        Op::Started {
            session: s,
            user: who,
            ua,
        } => (
            req(Request::SessionStarted {
                session: session(*s),
                user: user(*who),
                ua: ua.then(|| UaName::new("desktop").expect("valid UA name")),
            }),
            Pending::Started(*who),
        ),
        Op::Ended { session: s } => (
            req(Request::SessionEnded {
                session: session(*s),
            }),
            Pending::Quiet,
        ),
        Op::Disconnect {
            id,
            session: s,
            user: who,
            long_reason,
        } => {
            let reason = if *long_reason {
                "x".repeat(MAX_TEXT_LEN + 1)
            } else {
                "killed".to_string()
            };
            (
                req(Request::UnexpectedDisconnect(DisconnectNotice {
                    id: u64::from(*id),
                    session: session(*s),
                    user: user(*who),
                    ua: None,
                    reason,
                    at: 1,
                })),
                Pending::Disconnect {
                    who: *who,
                    long: *long_reason,
                },
            )
        }
        Op::Ping { nonce } => (req(Request::Ping { nonce: *nonce }), Pending::Ping(*nonce)),
        Op::HostBound(n) => {
            let r = match n % 4 {
                0 => Request::UserRelease {
                    user: user(Who::Alice),
                    deadline_ms: 1,
                },
                1 => Request::AgentStatus,
                2 => Request::SessionSuspend {
                    session: session(0),
                },
                _ => Request::UaCommit { transfer: 1 },
            };
            (req(r), Pending::HostBound)
        }
        Op::Raw(bytes) => {
            let mut f = postcard::to_stdvec(&(3u32, 0u64)).expect("encode header");
            f.extend_from_slice(bytes);
            let decoded = uve_protocol::codec::decode_body(&f);
            let bad_name = matches!(
                decoded,
                Err(uve_protocol::codec::FrameError::BadName { .. })
            );
            let stateful = matches!(
                decoded,
                Ok(uve_protocol::message::Frame::Request { body, .. })
                    if !matches!(body, Request::Ping { .. })
            );
            (
                Outgoing::Raw(bytes.clone()),
                Pending::Raw { bad_name, stateful },
            )
        }
        Op::FailStore(_) => unreachable!("handled by the batch"),
    }
}

/// Makes a page's chunk list lie as `lie` says.
fn lie_about(chunks: &mut Vec<ChunkRef>, lie: ListLie, known: &[Hash]) {
    let n = chunks.len();
    let at = |i: u8| usize::from(i) % n.max(1);
    match lie {
        ListLie::None => {}
        _ if n == 0 => {}
        ListLie::LenPlus(i) => chunks[at(i)].len += 1,
        ListLie::LenMinus(i) => chunks[at(i)].len = chunks[at(i)].len.saturating_sub(1),
        ListLie::Swap(a, b) => chunks.swap(at(a), at(b)),
        ListLie::Drop(i) => {
            chunks.remove(at(i));
        }
        ListLie::Dup(i) => {
            let c = chunks[at(i)];
            chunks.insert(at(i), c);
        }
        ListLie::Tiny(i) => chunks[at(i)].len = 1,
        ListLie::Known(i, k) if !known.is_empty() => {
            chunks[at(i)].hash = known[usize::from(k) % known.len()];
        }
        ListLie::Known(..) => {}
        ListLie::Hash(i) => chunks[at(i)].hash.0[0] ^= 1,
        ListLie::Empty => chunks.clear(),
    }
}

/// A `ChunkDelta` for a chunk of `u`, against the digests the host sent
/// (or, unknown, digests that match nothing: every block is sent).
fn delta_for(u: &UploadModel, pick: u8, lie: DeltaLie) -> Option<ChunkDelta> {
    let i = chosen_chunk(u, pick)?;
    let c = u.sent[i];
    let at = u.start(i);
    let new = u.bytes_of(&c.hash)?;
    let digests = u
        .signatures
        .get(&i)
        .cloned()
        .unwrap_or_else(|| vec![[0; 16]; block_count(at, new.len())]);
    let mut blocks = delta::diff(at, new, &digests).unwrap_or_default();
    let mut d = ChunkDelta {
        upload: u.id,
        index: u32::try_from(i).unwrap_or(u32::MAX),
        hash: c.hash,
        blocks: Vec::new(),
    };
    match lie {
        DeltaLie::None => {}
        DeltaLie::Flip(k) if !blocks.is_empty() => {
            let n = blocks.len();
            if let Some(b) = blocks[usize::from(k) % n].data.first_mut() {
                *b ^= 1;
            }
        }
        DeltaLie::Flip(_) => {}
        DeltaLie::Index => d.index += 1,
        DeltaLie::Hash => d.hash.0[0] ^= 1,
        DeltaLie::OutOfRange => blocks.push(DeltaBlock {
            index: 999,
            data: vec![0; 4096],
        }),
        DeltaLie::Short => {
            if let Some(b) = blocks.first_mut() {
                b.data.pop();
            }
        }
        DeltaLie::Repeat => {
            if let Some(b) = blocks.first().cloned() {
                blocks.push(b);
            }
        }
    }
    d.blocks = blocks;
    Some(d)
}

impl Pending {
    fn kind(&self) -> &'static str {
        match self {
            Pending::Retrieve(_) => "retrieve",
            Pending::Page { .. } => "page",
            Pending::Fetch { .. } => "fetch",
            Pending::Begin { .. } => "begin",
            Pending::List { .. } => "list",
            Pending::Upload { .. } => "upload",
            Pending::Signatures { .. } => "signatures",
            Pending::Delta { .. } => "delta",
            Pending::Commit(_) => "commit",
            Pending::Abort(_) => "abort",
            Pending::Started(_) => "started",
            Pending::Quiet => "ended",
            Pending::Disconnect { .. } => "disconnect",
            Pending::Ping(_) => "ping",
            Pending::HostBound => "host-bound",
            Pending::Raw { .. } => "raw",
        }
    }
}

/// The answer has the kind its request calls for.
fn shape_ok(p: &Pending, r: &Response) -> bool {
    matches!(
        (p, r),
        (_, Response::Error(_))
            | (Pending::Retrieve(_), Response::Retrieve(_))
            | (Pending::Page { .. }, Response::ManifestPage(_))
            | (Pending::Fetch { .. }, Response::Chunk(_))
            | (Pending::Begin { .. }, Response::UpdateAccepted { .. })
            | (Pending::List { .. }, Response::Missing(_))
            | (
                Pending::Upload { .. }
                    | Pending::Delta { .. }
                    | Pending::Abort(_)
                    | Pending::Started(_)
                    | Pending::Quiet
                    | Pending::Disconnect { .. },
                Response::Ok
            )
            | (Pending::Signatures { .. }, Response::BlockSignatures(_))
            | (
                Pending::Commit(_),
                Response::Committed { .. } | Response::Conflict { .. }
            )
            | (Pending::Ping(_), Response::Pong { .. })
            | (Pending::Raw { .. }, _)
    )
}

/// Checks one answer and learns from it. `alone`: it was the only request
/// of its batch and the store did not fail, so the store's state now is
/// the state the host answered from. Checks against what the agent knows
/// are skipped once a raw request may have changed the host's state
/// behind the model's back (`tainted`).
#[allow(clippy::too_many_lines)]
fn check(rig: &Rig, model: &mut Model, p: Pending, r: Response, alone: bool, o: &Outgoing) {
    assert!(shape_ok(&p, &r), "{r:?} answers {o:?}");
    uve_host_fuzz::stats::count(&r, &p.kind());
    let store: &dyn UifStore = rig.store.as_ref();
    let bob_only = &seed().bob_only;
    let exact = alone && !model.tainted;
    match p {
        Pending::Retrieve(who) => {
            let Response::Retrieve(g) = r else { return };
            assert!(who.on_vm(), "{} granted to {VM}", who.name());
            assert!(g.lease > model.epoch_floor, "lease epochs increase");
            assert!(
                model.epochs.insert(g.lease),
                "lease epoch {} granted twice",
                g.lease
            );
            if alone {
                assert_eq!(
                    g.version,
                    store.head(who.name()).expect("head"),
                    "the grant is the head"
                );
                if let Some(v) = g.version {
                    let m = store.manifest(who.name(), v).expect("head manifest");
                    assert_eq!(g.header, Some(m.header));
                }
            }
            model.lease.insert(who, g.lease);
            model.granted.insert(who, g.version);
            model.served.insert(who, Vec::new());
            model.committed.insert(who, Vec::new());
        }
        Pending::Page { who, version, page } => {
            let Response::ManifestPage(refs) = r else {
                return;
            };
            assert!(who.on_vm(), "a page of {} served to {VM}", who.name());
            assert!(
                refs.iter().all(|c| !bob_only.contains(&c.hash)),
                "bob's chunk listed to {VM}"
            );
            if !model.tainted {
                assert_eq!(
                    model.granted.get(&who),
                    Some(&Some(version)),
                    "only the granted version is served"
                );
            }
            if let Ok(m) = store.manifest(who.name(), version) {
                let want = m.page(page, model.max_frame).expect("the page exists");
                assert_eq!(refs, want, "the page is the store's");
            }
            let served = model.served.entry(who).or_default();
            for c in refs {
                served.push(c.hash);
                model.known.push(c.hash);
            }
        }
        Pending::Fetch { who, hash } => {
            let allowed = who.on_vm() && model.served.get(&who).is_some_and(|s| s.contains(&hash));
            let may = model.may_fetch.get(&who).is_some_and(|s| s.contains(&hash));
            match r {
                Response::Chunk(data) => {
                    assert!(who.on_vm(), "a chunk of {} sent to {VM}", who.name());
                    assert!(
                        may || model.tainted,
                        "chunk {hash} of {} fetched without being served",
                        who.name()
                    );
                    assert!(!bob_only.contains(&hash), "bob's bytes sent to {VM}");
                    assert_eq!(Hash::of(&data), hash, "the bytes are the chunk asked for");
                }
                Response::Error(e) => assert!(
                    !(allowed && exact) || e.code == ErrorCode::Busy,
                    "a served chunk refused: {e}"
                ),
                _ => {}
            }
        }
        Pending::Begin {
            who,
            draft,
            base,
            lease,
            header,
            huge,
        } => {
            let Response::UpdateAccepted { upload } = r else {
                return;
            };
            assert!(
                who.may_update(),
                "an update of {} opened by {VM}",
                who.name()
            );
            assert!(!huge, "a UIF of {} bytes accepted", header.size);
            assert!(
                model.seen_uploads.insert(upload),
                "upload id {upload} given twice"
            );
            model.uploads.push(UploadModel {
                id: upload,
                user: who,
                draft,
                base,
                lease,
                header,
                sent: Vec::new(),
                next_page: 0,
                listed: HashSet::new(),
                missing: Vec::new(),
                stored: HashSet::new(),
                signed: HashSet::new(),
                signatures: HashMap::new(),
            });
        }
        Pending::List {
            upload,
            page,
            chunks,
        } => {
            let Response::Missing(missing) = r else {
                return;
            };
            assert!(
                missing.windows(2).all(|w| w[0] < w[1]),
                "missing indices increase"
            );
            assert!(
                missing.iter().all(|i| (*i as usize) < chunks.len()),
                "missing indices are in the page"
            );
            let tainted = model.tainted;
            let Some(u) = model_of(model, upload) else {
                assert!(
                    tainted,
                    "a page of an upload the agent never opened was accepted"
                );
                return;
            };
            if !tainted {
                assert_eq!(page, u.next_page, "pages are accepted in order");
            }
            let mut listed = u.listed.clone();
            for (i, c) in chunks.iter().enumerate() {
                let first = listed.insert(c.hash);
                let reported = missing.contains(&u32::try_from(i).unwrap_or(u32::MAX));
                if !exact {
                    continue;
                }
                // The base version's chunks are stored chunks (nothing is
                // collected during a case), so "present" is "stored".
                let stored = store.has_chunk(&c.hash).expect("has_chunk");
                if reported {
                    assert!(first && !stored, "chunk {i} ({}) reported missing", c.hash);
                } else if first {
                    assert!(
                        stored,
                        "chunk {i} ({}), which the store lacks, not reported missing",
                        c.hash
                    );
                }
            }
            let first = u.sent.len();
            u.listed = listed;
            u.missing
                .extend(missing.iter().map(|i| first + *i as usize));
            u.sent.extend_from_slice(&chunks);
            u.next_page += 1;
            if !tainted {
                assert!(
                    u.sent.len() <= u.header.chunk_count as usize,
                    "more chunks listed than announced"
                );
                let bytes: u64 = u.sent.iter().map(|c| u64::from(c.len)).sum();
                assert!(bytes <= u.header.size, "more bytes listed than announced");
            }
        }
        Pending::Upload {
            upload,
            hash,
            data_hash,
            len,
        } => {
            if r != Response::Ok {
                return;
            }
            let tainted = model.tainted;
            let Some(u) = model_of(model, upload) else {
                assert!(
                    tainted,
                    "a chunk of an upload the agent never opened was accepted"
                );
                return;
            };
            if !tainted {
                assert!(
                    u.sent
                        .iter()
                        .any(|c| c.hash == hash && c.len as usize == len),
                    "a chunk not listed was accepted"
                );
                // A chunk staged already is not written again, so a resend's
                // bytes are not looked at.
                assert!(
                    data_hash == hash || u.stored.contains(&hash),
                    "bytes stored under another hash"
                );
            }
            u.stored.insert(hash);
        }
        Pending::Signatures { upload, indices } => {
            let Response::BlockSignatures(sigs) = r else {
                return;
            };
            assert_eq!(model.protocol, 2, "block signatures on protocol 1");
            assert_eq!(sigs.len(), indices.len(), "one answer per chunk asked");
            let tainted = model.tainted;
            let contents = &model.contents;
            let Some(u) = model.uploads.iter_mut().find(|u| Some(u.id) == upload) else {
                assert!(tainted, "signatures for an upload the agent never opened");
                return;
            };
            if tainted {
                return;
            }
            for (i, sig) in indices.iter().zip(sigs) {
                let i = *i as usize;
                if exact {
                    assert!(
                        u.awaited(i),
                        "signatures of chunk {i}, which was not awaited"
                    );
                    assert!(!u.signed.contains(&i), "chunk {i} signed twice");
                }
                u.signed.insert(i);
                let Some(sig) = sig else { continue };
                let (at, len) = (u.start(i), u.sent[i].len as usize);
                assert_eq!(sig.len(), block_count(at, len), "one digest per block");
                let base = u.base.and_then(|b| {
                    contents.get(&(u.user, b)).or(if u.user == Who::Alice {
                        seed().alice.get(&b)
                    } else {
                        None
                    })
                });
                if let Some(base) = base {
                    let from = usize::try_from(at).expect("small");
                    let end = (from + len).min(base.bytes.len());
                    let want = block_digests(at, &base.bytes[from.min(end)..end]);
                    assert_eq!(sig, want, "the digests are of the upload's own base bytes");
                }
                u.signatures.insert(i, sig);
            }
        }
        Pending::Delta {
            upload,
            index,
            hash,
        } => {
            if r != Response::Ok {
                return;
            }
            assert_eq!(model.protocol, 2, "a delta on protocol 1");
            let tainted = model.tainted;
            let Some(u) = model_of(model, upload) else {
                assert!(tainted, "a delta for an upload the agent never opened");
                return;
            };
            let i = index as usize;
            if exact {
                assert!(
                    u.awaited(i) && u.sent[i].hash == hash,
                    "a delta for a chunk not awaited"
                );
            }
            u.stored.insert(hash);
        }
        Pending::Commit(upload) => {
            let (version, head) = match r {
                Response::Committed { version } => (version, true),
                Response::Conflict { kept_as, .. } => (kept_as, false),
                _ => return,
            };
            let Some(at) = upload.and_then(|id| model.uploads.iter().position(|u| u.id == id))
            else {
                assert!(
                    model.tainted,
                    "a commit of an upload the agent never opened"
                );
                return;
            };
            let u = model.uploads.remove(at);
            if model.tainted {
                return;
            }
            let m = Manifest {
                header: u.header,
                chunks: u.sent.clone(),
            };
            m.validate()
                .expect("a committed manifest is the one announced");
            if head {
                assert_eq!(
                    model.lease.get(&u.user),
                    Some(&u.lease),
                    "committed as head without the current lease"
                );
                let granted = model.granted.get(&u.user).copied();
                let since = model
                    .committed
                    .get(&u.user)
                    .is_some_and(|c| u.base.is_some_and(|b| c.contains(&b)));
                assert!(
                    granted == Some(u.base) || since,
                    "committed on base {:?}; granted {granted:?}",
                    u.base
                );
                model.committed.entry(u.user).or_default().push(version);
                if alone {
                    assert_eq!(store.head(u.user.name()).expect("head"), Some(version));
                }
            }
            if alone {
                let stored = store
                    .manifest(u.user.name(), version)
                    .expect("the new version is retained");
                assert_eq!(stored, m, "the store holds the manifest that was sent");
            }
            if m == u.draft.manifest {
                model.contents.insert((u.user, version), u.draft);
            }
        }
        Pending::Abort(upload) => {
            if r == Response::Ok
                && let Some(at) =
                    upload.and_then(|id| model.uploads.iter().position(|u| u.id == id))
            {
                model.uploads.remove(at);
            }
        }
        Pending::Started(who) => {
            if r == Response::Ok {
                assert!(
                    who.on_vm(),
                    "a session of {} accepted from {VM}",
                    who.name()
                );
            }
        }
        Pending::Quiet => {}
        Pending::Disconnect { who, long } => {
            if r == Response::Ok {
                assert!(!long, "a reason over {MAX_TEXT_LEN} bytes accepted");
                assert!(
                    who.may_update(),
                    "a notice for {} accepted from {VM}",
                    who.name()
                );
            }
        }
        Pending::Ping(nonce) => assert_eq!(r, Response::Pong { nonce }, "ping answered"),
        Pending::HostBound => {
            let Response::Error(e) = r else {
                panic!("{o:?}, a request for the agent, answered {r:?}");
            };
            assert_eq!(e.code, ErrorCode::Unsupported);
        }
        Pending::Raw { bad_name, stateful } => {
            if bad_name {
                assert!(
                    matches!(&r, Response::Error(e) if e.code == ErrorCode::InvalidName),
                    "an invalid name answered {r:?}"
                );
            }
            if stateful && !matches!(r, Response::Error(_)) {
                model.tainted = true;
            }
        }
    }
}
