//! Fuzzes block deltas (`uve_protocol::delta`), the code the host runs on a
//! VM's `BlockSignatures` and `ChunkDelta` and the agent on the answer:
//!
//! - a delta made from real data rebuilds the chunk exactly (the digests of
//!   the base bytes, `diff` against them, `apply` to the base) and carries
//!   only blocks that changed, within the frame size `ChunkDelta` promises;
//! - hostile blocks (any index, length or order) never panic: `apply`
//!   refuses them exactly when `check` does, and otherwise changes only the
//!   blocks it was given;
//! - hostile digests (a host's answer) never panic `diff`, and what it
//!   makes of them is a valid delta;
//! - `BaseIndex::covering` and `assemble` cut any range out of any base
//!   manifest, a base chunk of the wrong length included, and never panic;
//! - no case allocates more than a few chunks' worth of memory.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use uve_protocol::defs::{DELTA_BLOCK, MAX_CHUNK};
use uve_protocol::delta::{
    self, BaseIndex, DELTA_FIXED_WIRE, DeltaError, block_count, block_digests, blocks,
    blocks_wire_size,
};
use uve_protocol::manifest::{ChunkRef, Hash, Manifest};
use uve_protocol::message::{BlockDigest, ChunkDelta, DeltaBlock, Frame, Request};
use uve_protocol::testdata::noise;
use uve_protocol_fuzz::alloc;

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

/// Offsets stay below this: a chunk's offset is inside its UIF, whose
/// size `max_uif_size` bounds far below `u64::MAX`.
const MAX_OFFSET: u64 = 1 << 48;

#[derive(Arbitrary, Debug)]
struct Case {
    /// The chunk's offset in the file.
    offset: u64,
    /// Length of the base bytes (up to one past `MAX_CHUNK`) and their seed.
    len: u32,
    seed: u64,
    /// Writes that turn the base bytes into the new chunk: where, what.
    writes: Vec<(u32, Vec<u8>)>,
    /// Blocks a hostile agent sends: index, length, fill byte.
    hostile_blocks: Vec<(u16, u16, u8)>,
    /// Digests a hostile host answers.
    hostile_digests: Vec<BlockDigest>,
    /// A base manifest's chunk lengths, a range to cut out of it, and a
    /// base chunk the store returns one byte short.
    base_lens: Vec<u16>,
    range: (u32, u32),
    short: Option<u8>,
}

fuzz_target!(|data: &[u8]| {
    let Ok(case) = Case::arbitrary(&mut arbitrary::Unstructured::new(data)) else {
        return;
    };
    let before = alloc::reset_peak();
    run(&case);
    let grew = alloc::peak().saturating_sub(before);
    let bound = 16 * MAX_CHUNK as usize + 4 * data.len();
    assert!(
        grew <= bound,
        "a case allocated {grew} bytes (bound {bound})"
    );
});

fn run(case: &Case) {
    let offset = case.offset % MAX_OFFSET;
    let len = case.len as usize % (MAX_CHUNK as usize + 2);
    let base = noise(len, case.seed);
    let digests = block_digests(offset, &base);
    assert_eq!(digests.len(), block_count(offset, len));
    let new = written(&base, &case.writes);
    if len > MAX_CHUNK as usize {
        assert_eq!(
            delta::apply(offset, &base, &[]),
            Err(DeltaError::TooLarge(len))
        );
        return;
    }
    real_delta(offset, &base, &new, &digests);
    hostile_blocks(offset, &base, &case.hostile_blocks);
    hostile_digests(offset, &base, &new, &case.hostile_digests);
    cut_base(&case.base_lens, case.range, case.short, case.seed);
}

/// `base` with `writes` applied (each clipped to fit).
fn written(base: &[u8], writes: &[(u32, Vec<u8>)]) -> Vec<u8> {
    let mut new = base.to_vec();
    if new.is_empty() {
        return new;
    }
    for (at, bytes) in writes {
        let at = *at as usize % new.len();
        let n = bytes.len().min(new.len() - at);
        new[at..at + n].copy_from_slice(&bytes[..n]);
    }
    new
}

/// A delta of real data rebuilds `new` exactly and sends only changed blocks.
fn real_delta(offset: u64, base: &[u8], new: &[u8], digests: &[BlockDigest]) {
    let sent = delta::diff(offset, new, digests).expect("digests of the chunk's own shape");
    delta::check(offset, new.len(), &sent).expect("a delta diff made is well formed");
    assert_eq!(delta::apply(offset, base, &sent).expect("apply"), new);
    let ranges: Vec<_> = blocks(offset, new.len()).collect();
    let mut sent_at = sent.iter().map(|b| usize::from(b.index)).peekable();
    for (i, r) in ranges.iter().enumerate() {
        let changed = base[r.clone()] != new[r.clone()];
        let was_sent = sent_at.next_if_eq(&i).is_some();
        assert_eq!(was_sent, changed, "block {i} sent iff it changed");
    }
    assert!(
        sent_at.next().is_none(),
        "blocks in increasing order, each once"
    );
    let frame = Frame::Request {
        id: u64::MAX,
        body: Request::ChunkDelta(ChunkDelta {
            upload: u64::MAX,
            index: u32::MAX,
            hash: Hash::of(new),
            blocks: sent.clone(),
        }),
    };
    let wire = postcard::to_stdvec(&frame).expect("encode").len() + 4;
    assert!(
        wire <= DELTA_FIXED_WIRE + blocks_wire_size(&sent),
        "{wire} bytes on the wire"
    );
}

/// Any blocks: `apply` refuses exactly what `check` refuses, and changes
/// only the blocks it was given.
fn hostile_blocks(offset: u64, base: &[u8], spec: &[(u16, u16, u8)]) {
    let sent: Vec<DeltaBlock> = spec
        .iter()
        .take(80)
        .map(|&(index, len, fill)| DeltaBlock {
            index,
            data: vec![fill; usize::from(len) % (2 * DELTA_BLOCK as usize + 1)],
        })
        .collect();
    let checked = delta::check(offset, base.len(), &sent);
    match delta::apply(offset, base, &sent) {
        Err(e) => assert_eq!(checked, Err(e)),
        Ok(out) => {
            assert!(checked.is_ok());
            assert_eq!(out.len(), base.len());
            let mut given = sent.iter().peekable();
            for (i, r) in blocks(offset, base.len()).enumerate() {
                match given.next_if(|b| usize::from(b.index) == i) {
                    Some(b) => assert_eq!(out[r], b.data[..]),
                    None => assert_eq!(out[r.clone()], base[r]),
                }
            }
        }
    }
}

/// A host's digests of any shape: `diff` answers `None` unless they have
/// one digest per block, and otherwise a delta that applies.
fn hostile_digests(offset: u64, base: &[u8], new: &[u8], digests: &[BlockDigest]) {
    match delta::diff(offset, new, digests) {
        None => assert_ne!(digests.len(), block_count(offset, new.len())),
        Some(sent) => {
            delta::check(offset, new.len(), &sent).expect("well formed");
            delta::apply(offset, base, &sent).expect("applies");
        }
    }
}

/// Any range of any base manifest: `covering` names the chunks over it in
/// order, and `assemble` cuts exactly those bytes out of them, or answers
/// `None` when a chunk comes back with the wrong length.
fn cut_base(lens: &[u16], range: (u32, u32), short: Option<u8>, seed: u64) {
    let lens: Vec<usize> = lens
        .iter()
        .take(24)
        .map(|l| usize::from(*l) % 16_384 + 1)
        .collect();
    let file = noise(lens.iter().sum(), seed ^ 0x5eed);
    let mut chunks = Vec::new();
    let mut at = 0;
    for &l in &lens {
        chunks.push(ChunkRef {
            hash: Hash::of(&file[at..at + l]),
            len: u32::try_from(l).expect("small"),
        });
        at += l;
    }
    let index = BaseIndex::new(&Manifest::from_chunks(chunks.clone()));
    let from = u64::from(range.0) % (file.len() as u64 + 2);
    let len = range.1 % (MAX_CHUNK + 2);
    let end = from + u64::from(len);
    let Some(parts) = index.covering(from, len) else {
        assert!(
            len == 0 || end > file.len() as u64,
            "range {from}+{len} is inside"
        );
        return;
    };
    assert!(len > 0 && end <= file.len() as u64);
    assert!(parts.first().is_some_and(|p| p.start <= from));
    assert!(
        parts
            .windows(2)
            .all(|w| w[0].start + u64::from(w[0].chunk.len) == w[1].start)
    );
    assert!(
        parts
            .last()
            .is_some_and(|p| p.start + u64::from(p.chunk.len) >= end)
    );
    let short = short.map(|s| chunks[usize::from(s) % chunks.len()].hash);
    let read = |c: &ChunkRef| -> Result<Vec<u8>, ()> {
        let start = offset_of(&chunks, c);
        let mut bytes = file[start..start + c.len as usize].to_vec();
        if short == Some(c.hash) {
            bytes.pop();
        }
        Ok(bytes)
    };
    let got = delta::assemble(from, len as usize, &parts, read).expect("reads never fail here");
    let short_read = parts.iter().any(|p| Some(p.chunk.hash) == short);
    match got {
        Some(bytes) => {
            assert!(!short_read, "a short base chunk is noticed");
            assert_eq!(bytes, file[from as usize..end as usize]);
        }
        None => assert!(short_read, "an intact base is cut"),
    }
}

/// The offset of `c` in the file `chunks` make up (the store reads by
/// hash: the first chunk with that hash).
fn offset_of(chunks: &[ChunkRef], c: &ChunkRef) -> usize {
    let mut at = 0;
    for x in chunks {
        if x.hash == c.hash {
            return at;
        }
        at += x.len as usize;
    }
    panic!("assemble asked for a chunk the manifest does not list");
}
