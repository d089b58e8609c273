//! Fuzzes manifest pages: the page sequence of an upload as the host
//! assembles it (`UpdatePage`, then the chunks it reports missing, then
//! `UpdateCommit`), and the pages of the committed version read back
//! (`ManifestPage`). The handlers are the host's own, called on a
//! `VmConnection` whose negotiated frame holds only a few chunk refs, so
//! that a handful of chunks spans many pages (the paging rule is the same
//! at every frame size; `protocol::manifest` computes it).
//!
//! Each page's fate is predicted from the rules of `host/API.md` (in
//! order, no more chunks or bytes than announced, lengths in range, only
//! the last chunk below `MIN_CHUNK`, one length per hash) and compared
//! with the host's answer; an accepted page is answered with exactly the
//! new chunks the store lacks. The commit succeeds exactly when the
//! accepted pages make the announced manifest and every chunk is stored,
//! becomes head exactly when the lease and base allow it, and the store
//! then holds that manifest, which `ManifestPage` serves back page by
//! page. Nothing staged or pinned outlives the connection.
#![no_main]

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use uve_host::store::UifStore;
use uve_host::wire::uve5::{VmConnection, retrieve, update};
use uve_host_fuzz::{Knobs, Rig, VM, alloc, runtime, seed};
use uve_protocol::defs::{
    CHUNK_REF_MAX_WIRE, DEFAULT_MAX_FRAME, MAX_CHUNK, MIN_CHUNK, MIN_MAX_FRAME, PAGE_OVERHEAD,
};
use uve_protocol::manifest::{
    ChunkRef, Hash, Manifest, ManifestHeader, chunks_per_page, page_count,
};
use uve_protocol::message::{ErrorCode, Response, UpdateBegin, UpdateCause, Version, WireError};
use uve_protocol::names::{SessionId, UserName};
use uve_protocol::testdata::noise;

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

#[derive(Arbitrary, Debug)]
struct Case {
    /// Chunk refs one page holds (1 to 8).
    per_page: u8,
    /// Alice (who has versions) or dave (who has none).
    alice: bool,
    /// Retrieve first (the lease is current) or not.
    retrieve: bool,
    /// The base the update names: none, or a version number.
    base: Option<u8>,
    /// The new version's chunks.
    chunks: Vec<Spec>,
    header: HeaderLie,
    /// The pages sent; none: every page, in order.
    pages: Vec<PageOp>,
    /// Upload the chunks reported missing.
    upload: bool,
    commit: bool,
}

/// One chunk of the new version.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Spec {
    /// New bytes: `MIN_CHUNK` plus up to 8 KiB.
    Fresh { len: u8, seed: u8 },
    /// A chunk of alice's versions.
    Base(u8),
    /// The same as an earlier chunk of this list.
    Again(u8),
    /// A hash nobody has bytes for.
    Fake { len: u8, byte: u8 },
    /// New bytes shorter than `MIN_CHUNK` (legal only last).
    Tiny { len: u8, seed: u8 },
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum HeaderLie {
    None,
    Size(i8),
    Count(i8),
    Digest,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum PageOp {
    /// The next page, as it should be.
    Next,
    /// The next page, lying.
    Lie(Lie),
    /// Page `n` (as it should be) out of turn.
    At(u8),
    /// The page just accepted, again.
    Repeat,
    /// An empty page at `n`.
    Empty(u8),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Lie {
    LenPlus(u8),
    LenMinus(u8),
    Zero(u8),
    Huge(u8),
    Swap(u8, u8),
    Drop(u8),
    Dup(u8),
    Extra(u8),
    Hash(u8),
}

fuzz_target!(|data: &[u8]| {
    let Ok(case) = Case::arbitrary(&mut Unstructured::new(data)) else {
        return;
    };
    uve_host_fuzz::print_case(&case);
    let before = alloc::reset_peak();
    runtime().block_on(run(case));
    let grew = alloc::peak().saturating_sub(before);
    assert!(grew <= 32 << 20, "a case held {grew} bytes at once");
});

/// The new version's chunk list and the bytes the agent has for them.
fn chunk_list(specs: &[Spec]) -> (Vec<ChunkRef>, HashMap<Hash, Vec<u8>>) {
    let base: Vec<(ChunkRef, Vec<u8>)> = seed()
        .alice
        .values()
        .flat_map(|cut| {
            (0..cut.manifest.chunks.len())
                .map(move |i| (cut.manifest.chunks[i], cut.chunk(i).to_vec()))
        })
        .collect();
    let mut chunks: Vec<ChunkRef> = Vec::new();
    let mut bytes = HashMap::new();
    let mut add = |c: ChunkRef, data: Option<Vec<u8>>, chunks: &mut Vec<ChunkRef>| {
        if let Some(d) = data {
            bytes.insert(c.hash, d);
        }
        chunks.push(c);
    };
    for spec in specs.iter().take(40) {
        match *spec {
            Spec::Fresh { len, seed } => {
                let d = noise(
                    MIN_CHUNK as usize + usize::from(len) * 32,
                    u64::from(seed) + 7,
                );
                add(
                    ChunkRef {
                        hash: Hash::of(&d),
                        len: len_of(&d),
                    },
                    Some(d),
                    &mut chunks,
                );
            }
            Spec::Tiny { len, seed } => {
                let d = noise(usize::from(len) + 1, u64::from(seed) + 300);
                add(
                    ChunkRef {
                        hash: Hash::of(&d),
                        len: len_of(&d),
                    },
                    Some(d),
                    &mut chunks,
                );
            }
            Spec::Base(i) => {
                let (c, d) = &base[usize::from(i) % base.len()];
                add(*c, Some(d.clone()), &mut chunks);
            }
            Spec::Again(i) if !chunks.is_empty() => {
                let c = chunks[usize::from(i) % chunks.len()];
                add(c, None, &mut chunks);
            }
            Spec::Again(_) => {}
            Spec::Fake { len, byte } => add(
                ChunkRef {
                    hash: Hash([byte.wrapping_add(1); 32]),
                    len: MIN_CHUNK + u32::from(len),
                },
                None,
                &mut chunks,
            ),
        }
    }
    (chunks, bytes)
}

fn len_of(d: &[u8]) -> u32 {
    u32::try_from(d.len()).expect("chunks are small")
}

/// What the agent knows of its upload, and the rules a page must meet.
struct Upload {
    header: ManifestHeader,
    per: usize,
    next: u32,
    sent: Vec<ChunkRef>,
    lens: HashMap<Hash, u32>,
    missing: Vec<Hash>,
}

impl Upload {
    /// The code the host must refuse `chunks` as page `page` with, if any.
    fn refusal(&self, page: u32, chunks: &[ChunkRef]) -> Option<ErrorCode> {
        if page != self.next {
            return Some(ErrorCode::BadRequest);
        }
        if chunks.len() > self.per
            || self.sent.len() + chunks.len() > self.header.chunk_count as usize
        {
            return Some(ErrorCode::TooLarge);
        }
        let bytes: u64 = self
            .sent
            .iter()
            .chain(chunks)
            .map(|c| u64::from(c.len))
            .sum();
        if bytes > self.header.size {
            return Some(ErrorCode::TooLarge);
        }
        if chunks.iter().any(|c| c.len == 0 || c.len > MAX_CHUNK) {
            return Some(ErrorCode::BadRequest);
        }
        let last = u64::from(self.header.chunk_count).saturating_sub(1);
        let first = self.sent.len() as u64;
        if chunks
            .iter()
            .enumerate()
            .any(|(i, c)| c.len < MIN_CHUNK && first + i as u64 != last)
        {
            return Some(ErrorCode::BadRequest);
        }
        let mut lens = self.lens.clone();
        for c in chunks {
            if *lens.entry(c.hash).or_insert(c.len) != c.len {
                return Some(ErrorCode::BadRequest);
            }
        }
        None
    }
}

fn refused(h: Result<Response, WireError>) -> Option<ErrorCode> {
    h.err().map(|e| e.code)
}

async fn run(case: Case) {
    let rig = Rig::new(&Knobs::default());
    let per = 1 + u32::from(case.per_page % 8);
    let max_frame = PAGE_OVERHEAD + per * CHUNK_REF_MAX_WIRE;
    assert_eq!(chunks_per_page(max_frame), per);
    let conn = VmConnection::new(rig.host.clone(), VM.to_string(), 1, max_frame, 2);
    let who = if case.alice { "alice" } else { "dave" };
    let user = UserName::new(who).expect("valid");
    let session = SessionId::new("s1").expect("valid");
    let store: &dyn UifStore = rig.store.as_ref();
    let head = store.head(who).expect("head");
    let mut lease = 0;
    if case.retrieve {
        let Ok(Response::Retrieve(g)) = retrieve::grant(&conn, &user, &session).await else {
            panic!("retrieve refused");
        };
        assert_eq!(g.version, head);
        lease = g.lease;
    }
    let (chunks, bytes) = chunk_list(&case.chunks);
    let truth = Manifest::from_chunks(chunks.clone());
    paging_rule(&truth);
    let mut header = truth.header;
    match case.header {
        HeaderLie::None => {}
        HeaderLie::Size(d) => header.size = header.size.saturating_add_signed(i64::from(d)),
        HeaderLie::Count(d) => {
            header.chunk_count = header.chunk_count.saturating_add_signed(i32::from(d));
        }
        HeaderLie::Digest => header.digest.0[0] ^= 1,
    }
    let base = case.base.map(|b| Version::from(b % 4));
    let begun = update::begin(
        &conn,
        UpdateBegin {
            user: user.clone(),
            session: session.clone(),
            base,
            lease,
            header,
            cause: UpdateCause::Logout,
        },
    );
    let id = match begun {
        Ok(Response::UpdateAccepted { upload }) => upload,
        Ok(other) => panic!("UpdateBegin answered {other:?}"),
        Err(e) => {
            assert_eq!(
                Some(e.code),
                begin_refusal(&header),
                "UpdateBegin refused: {e}"
            );
            drop(conn);
            rig.settle(Duration::from_secs(20)).await;
            return;
        }
    };
    assert_eq!(
        begin_refusal(&header),
        None,
        "UpdateBegin of {header:?} accepted"
    );
    let mut up = Upload {
        header,
        per: per as usize,
        next: 0,
        sent: Vec::new(),
        lens: HashMap::new(),
        missing: Vec::new(),
    };
    let proper = |p: u32| -> Vec<ChunkRef> {
        let from = (p as usize).saturating_mul(per as usize).min(chunks.len());
        chunks[from..(from + per as usize).min(chunks.len())].to_vec()
    };
    let pages: Vec<PageOp> = if case.pages.is_empty() {
        vec![PageOp::Next; page_count(truth.header.chunk_count, max_frame) as usize]
    } else {
        case.pages.iter().take(64).copied().collect()
    };
    for op in pages {
        let (p, list) = match op {
            PageOp::Next => (up.next, proper(up.next)),
            PageOp::Lie(lie) => (up.next, lied(proper(up.next), lie)),
            PageOp::At(n) => (u32::from(n % 12), proper(u32::from(n % 12))),
            PageOp::Repeat => (up.next.saturating_sub(1), proper(up.next.saturating_sub(1))),
            PageOp::Empty(n) => (u32::from(n % 12), Vec::new()),
        };
        let want = up.refusal(p, &list);
        let answer = update::page(&conn, id, p, list.clone()).await;
        assert_eq!(
            refused(answer.clone()),
            want,
            "page {p} {list:?} answered {answer:?}"
        );
        let Ok(Response::Missing(missing)) = answer else {
            continue;
        };
        let mut expected = Vec::new();
        for (i, c) in list.iter().enumerate() {
            let new = up.lens.insert(c.hash, c.len).is_none();
            if new && !store.has_chunk(&c.hash).expect("has_chunk") {
                expected.push(u32::try_from(i).expect("small"));
                up.missing.push(c.hash);
            }
        }
        assert_eq!(
            missing, expected,
            "page {p}: exactly the new chunks the store lacks are missing"
        );
        up.sent.extend_from_slice(&list);
        up.next += 1;
    }
    let mut uploaded = HashSet::new();
    if case.upload {
        for h in up.missing.clone() {
            let Some(data) = bytes.get(&h) else { continue };
            let answer = update::chunk(&conn, id, h, data.clone()).await;
            if up.lens.get(&h) == Some(&len_of(data)) {
                assert_eq!(answer, Ok(Response::Ok), "a missing chunk's upload");
                uploaded.insert(h);
            } else {
                assert_eq!(
                    refused(answer),
                    Some(ErrorCode::BadChunk),
                    "bytes of another length"
                );
            }
        }
    }
    if case.commit {
        // Head exactly when the lease is current and the base is the head
        // it was granted on (nothing else commits here).
        let to_head = case.retrieve && base == head;
        commit(
            &rig,
            &conn,
            &up,
            &uploaded,
            id,
            (who, head, to_head),
            max_frame,
        )
        .await;
    }
    drop(conn);
    rig.settle(Duration::from_secs(20)).await;
}

/// Commits and checks the outcome against the rules, then reads the new
/// head back page by page.
async fn commit(
    rig: &Rig,
    conn: &VmConnection,
    up: &Upload,
    uploaded: &HashSet<Hash>,
    id: u64,
    (who, head, to_head): (&str, Option<Version>, bool),
    max_frame: u32,
) {
    let store: &dyn UifStore = rig.store.as_ref();
    let m = Manifest {
        header: up.header,
        chunks: up.sent.clone(),
    };
    let valid = m.validate();
    let complete = m
        .chunks
        .iter()
        .all(|c| uploaded.contains(&c.hash) || store.has_chunk(&c.hash).expect("has_chunk"));
    let answer = update::commit(conn, id).await;
    let version = match (&valid, complete, answer) {
        (Ok(()), true, Ok(Response::Committed { version })) => {
            assert!(to_head, "committed as head without the lease on its base");
            assert_eq!(store.head(who).expect("head"), Some(version));
            Some(version)
        }
        (Ok(()), true, Ok(Response::Conflict { kept_as, head: now })) => {
            assert_eq!(now, head, "the conflict names the head");
            assert!(
                !to_head,
                "an update under the lease, on the head, kept as a conflict"
            );
            assert_eq!(store.manifest(who, kept_as).expect("kept"), m);
            None
        }
        (Err(uve_protocol::manifest::ManifestError::Digest), _, Err(e)) => {
            assert_eq!(e.code, ErrorCode::BadDigest);
            None
        }
        (Err(_), _, Err(e)) | (Ok(()), false, Err(e)) => {
            assert_eq!(e.code, ErrorCode::BadRequest, "{e}");
            None
        }
        (valid, complete, answer) => {
            panic!(
                "commit of a manifest valid: {valid:?}, complete: {complete}, answered {answer:?}"
            )
        }
    };
    let Some(v) = version else { return };
    assert_eq!(
        store.manifest(who, v).expect("committed"),
        m,
        "the store holds the pages sent"
    );
    let user = UserName::new(who).expect("valid");
    let session = SessionId::new("s2").expect("valid");
    let Ok(Response::Retrieve(g)) = retrieve::grant(conn, &user, &session).await else {
        panic!("retrieve of the new head refused");
    };
    assert_eq!(g.version, Some(v));
    let pages = page_count(m.header.chunk_count, max_frame);
    let mut read = Vec::new();
    for p in 0..pages {
        let Ok(Response::ManifestPage(refs)) = retrieve::page(conn, &user, v, p).await else {
            panic!("page {p} of {pages} refused");
        };
        let wire = postcard::to_stdvec(&refs).expect("encode").len();
        assert!(
            wire as u32 + PAGE_OVERHEAD <= max_frame,
            "page {p} is {wire} bytes"
        );
        read.extend(refs);
    }
    assert_eq!(read, m.chunks, "the pages served are the pages sent");
    let past = retrieve::page(conn, &user, v, pages).await;
    assert!(
        past.is_err_and(|e| e.code == ErrorCode::NotFound),
        "a page past the end"
    );
}

/// The code `UpdateBegin` must refuse `h` with under the rig's limits
/// (1 MiB UIFs, quota and staging; 64 chunks), if any.
fn begin_refusal(h: &ManifestHeader) -> Option<ErrorCode> {
    let limit = 1 << 20;
    let (size, count) = (h.size, u64::from(h.chunk_count));
    if size > limit || count > 64 {
        Some(ErrorCode::TooLarge)
    } else if count > size || size > count * u64::from(MAX_CHUNK) {
        Some(ErrorCode::BadRequest)
    } else {
        None
    }
}

/// `chunks` lying as `lie` says.
fn lied(mut chunks: Vec<ChunkRef>, lie: Lie) -> Vec<ChunkRef> {
    let n = chunks.len();
    let at = |i: u8| usize::from(i) % n.max(1);
    if n == 0 {
        return chunks;
    }
    match lie {
        Lie::LenPlus(i) => chunks[at(i)].len += 1,
        Lie::LenMinus(i) => chunks[at(i)].len -= 1,
        Lie::Zero(i) => chunks[at(i)].len = 0,
        Lie::Huge(i) => chunks[at(i)].len = MAX_CHUNK + 1,
        Lie::Swap(a, b) => chunks.swap(at(a), at(b)),
        Lie::Drop(i) => {
            chunks.remove(at(i));
        }
        Lie::Dup(i) => {
            let c = chunks[at(i)];
            chunks.insert(at(i), c);
        }
        Lie::Extra(i) => chunks.push(ChunkRef {
            hash: Hash([i; 32]),
            len: MIN_CHUNK,
        }),
        Lie::Hash(i) => chunks[at(i)].hash.0[1] ^= 1,
    }
    chunks
}

/// `protocol::manifest`'s paging rule at every frame size a peer may
/// negotiate and at tiny ones: the pages partition the chunk list in order,
/// none holds more than a page's share, and there is always a first page.
fn paging_rule(m: &Manifest) {
    for max_frame in [
        PAGE_OVERHEAD,
        PAGE_OVERHEAD + 3 * CHUNK_REF_MAX_WIRE,
        MIN_MAX_FRAME,
        DEFAULT_MAX_FRAME,
    ] {
        let per = chunks_per_page(max_frame) as usize;
        let pages = m.page_count(max_frame);
        assert_eq!(pages as usize, m.chunks.len().div_ceil(per).max(1));
        let mut all = Vec::new();
        for p in 0..pages {
            let page = m.page(p, max_frame).expect("a page below the count");
            assert!(page.len() <= per);
            assert!(
                p + 1 == pages || page.len() == per,
                "only the last page is short"
            );
            all.extend_from_slice(page);
        }
        assert_eq!(all, m.chunks);
        assert!(m.page(pages, max_frame).is_err());
    }
}
