//! Sub-chunk block deltas (protocol 2, WIRE.md §8.1): a chunk the host
//! lacks is sent as the bytes the upload's base version holds at the same
//! offset, with the blocks that differ replaced.
//!
//! Blocks are [`DELTA_BLOCK`]-sized and aligned to the **file**, not to the
//! chunk: block `k` of a chunk starting at offset `s` covers the file bytes
//! `[(s / B + k) * B, (s / B + k + 1) * B)` clipped to the chunk, so its first
//! and last blocks may be partial and an aligned 4 KiB write changes one
//! block. The base is a byte range of the base version (the chunks that
//! cover it), so a write that moved a chunk boundary still has a base.
//!
//! The agent keeps no old bytes, so the host tells it the digests of the
//! base range's blocks ([`block_digests`]); the agent sends the blocks whose
//! digest differs ([`diff`]); the host rebuilds the chunk ([`apply`]) and
//! stores it only if its full BLAKE3 is the announced hash. [`BaseIndex`]
//! finds the base chunks covering a range.

use std::collections::HashSet;
use std::ops::Range;

use crate::defs::{BLOCK_DIGEST_LEN, DELTA_BLOCK, MAX_CHUNK};
use crate::manifest::{ChunkRef, Hash, Manifest};
use crate::message::{BlockDigest, DeltaBlock};

const BLOCK: u64 = DELTA_BLOCK as u64;

/// Why a delta cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    /// A block starts at or beyond the end of the chunk.
    #[error("block {index} is outside a chunk of {len} bytes at offset {offset}")]
    BlockOutOfRange {
        /// The block number.
        index: u16,
        /// The chunk's offset in the file.
        offset: u64,
        /// The chunk's length.
        len: usize,
    },
    /// A block is not exactly as long as its place in the chunk.
    #[error("block {index} is {got} bytes, its place in the chunk holds {want}")]
    BlockLength {
        /// The block number.
        index: u16,
        /// Bytes sent.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// Blocks are not in strictly increasing order (or repeat).
    #[error("block {index} follows block {prev}: blocks must be in increasing order")]
    BlockOrder {
        /// The block number.
        index: u16,
        /// The block before it.
        prev: u16,
    },
    /// The chunk is longer than any chunk may be.
    #[error("chunk of {0} bytes exceeds MAX_CHUNK")]
    TooLarge(usize),
}

/// The blocks of a chunk of `len` bytes at file offset `offset`, as byte
/// ranges within the chunk, in order.
pub fn blocks(offset: u64, len: usize) -> impl Iterator<Item = Range<usize>> {
    let first = offset / BLOCK;
    let end = offset + len as u64;
    (first..).map_while(move |b| {
        let lo = (b * BLOCK).max(offset);
        let hi = ((b + 1) * BLOCK).min(end);
        if lo >= hi {
            return None;
        }
        let lo = usize::try_from(lo - offset).ok()?;
        let hi = usize::try_from(hi - offset).ok()?;
        Some(lo..hi)
    })
}

/// Number of blocks of a chunk of `len` bytes at file offset `offset`.
pub fn block_count(offset: u64, len: usize) -> usize {
    if len == 0 {
        return 0;
    }
    let end = offset + len as u64;
    usize::try_from(end.div_ceil(BLOCK) - offset / BLOCK).unwrap_or(usize::MAX)
}

/// The digest of one block: BLAKE3, truncated to [`BLOCK_DIGEST_LEN`] bytes.
pub fn block_digest(block: &[u8]) -> BlockDigest {
    let mut d = [0u8; BLOCK_DIGEST_LEN];
    d.copy_from_slice(&blake3::hash(block).as_bytes()[..BLOCK_DIGEST_LEN]);
    d
}

/// The digests of every block of `data`, the bytes at file offset
/// `offset`, in order.
pub fn block_digests(offset: u64, data: &[u8]) -> Vec<BlockDigest> {
    blocks(offset, data.len())
        .filter_map(|r| data.get(r).map(block_digest))
        .collect()
}

/// The blocks of `chunk` (at file offset `offset`) whose digest differs
/// from the base's (`base`, one digest per block). `None` if `base` does
/// not have one digest per block.
pub fn diff(offset: u64, chunk: &[u8], base: &[BlockDigest]) -> Option<Vec<DeltaBlock>> {
    if base.len() != block_count(offset, chunk.len()) {
        return None;
    }
    let mut out = Vec::new();
    for (i, (r, want)) in blocks(offset, chunk.len()).zip(base).enumerate() {
        let block = chunk.get(r)?;
        if block_digest(block) != *want {
            out.push(DeltaBlock {
                index: u16::try_from(i).ok()?,
                data: block.to_vec(),
            });
        }
    }
    Some(out)
}

/// An upper bound of the bytes `blocks` add to a `ChunkDelta` frame
/// beyond its fixed part ([`DELTA_FIXED_WIRE`]).
pub fn blocks_wire_size(blocks: &[DeltaBlock]) -> usize {
    // Per block: varint index (≤ 3 bytes) + varint length (≤ 2 bytes).
    blocks.iter().map(|b| b.data.len() + 5).sum()
}

/// Upper bound of a `ChunkDelta` request's bytes besides its blocks: frame
/// and request headers, upload id, chunk index, hash, block count.
pub const DELTA_FIXED_WIRE: usize = 4 + 1 + 10 + 1 + 10 + 5 + 32 + 2;

/// Checks that `blocks` can replace blocks of a chunk of `len` bytes at
/// file offset `offset`: strictly increasing block numbers, each block
/// inside the chunk and exactly as long as its place in it. Needs no base
/// bytes, so a malformed delta is refused before the base is read.
pub fn check(offset: u64, len: usize, blocks: &[DeltaBlock]) -> Result<(), DeltaError> {
    if len > MAX_CHUNK as usize {
        return Err(DeltaError::TooLarge(len));
    }
    let count = block_count(offset, len);
    let mut prev: Option<u16> = None;
    for b in blocks {
        if let Some(p) = prev
            && b.index <= p
        {
            return Err(DeltaError::BlockOrder {
                index: b.index,
                prev: p,
            });
        }
        let Some(r) = (usize::from(b.index) < count)
            .then(|| self::blocks(offset, len).nth(usize::from(b.index)))
            .flatten()
        else {
            return Err(DeltaError::BlockOutOfRange {
                index: b.index,
                offset,
                len,
            });
        };
        if b.data.len() != r.len() {
            return Err(DeltaError::BlockLength {
                index: b.index,
                got: b.data.len(),
                want: r.len(),
            });
        }
        prev = Some(b.index);
    }
    Ok(())
}

/// Rebuilds a chunk at file offset `offset`: `base` (the base version's
/// bytes there) with `blocks` replaced (after [`check`]).
pub fn apply(offset: u64, base: &[u8], blocks: &[DeltaBlock]) -> Result<Vec<u8>, DeltaError> {
    check(offset, base.len(), blocks)?;
    let mut out = base.to_vec();
    let ranges: Vec<Range<usize>> = self::blocks(offset, base.len()).collect();
    for b in blocks {
        if let Some(dst) = ranges
            .get(usize::from(b.index))
            .and_then(|r| out.get_mut(r.clone()))
        {
            dst.copy_from_slice(&b.data);
        }
    }
    Ok(out)
}

/// The chunks of an update's base version, indexed by offset: which chunks
/// are present, and which cover a byte range (the base of a delta).
#[derive(Debug, Default)]
pub struct BaseIndex {
    starts: Vec<u64>,
    chunks: Vec<ChunkRef>,
    hashes: HashSet<Hash>,
    size: u64,
}

/// A base chunk that covers part of a range: its hash and length, its
/// offset in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BasePart {
    /// The chunk.
    pub chunk: ChunkRef,
    /// Its offset in the base version.
    pub start: u64,
}

impl BaseIndex {
    /// Indexes `manifest`.
    pub fn new(manifest: &Manifest) -> BaseIndex {
        let (mut starts, mut chunks) = (Vec::new(), Vec::new());
        let mut hashes = HashSet::with_capacity(manifest.chunks.len());
        for (off, c) in manifest.offsets() {
            starts.push(off);
            chunks.push(*c);
            hashes.insert(c.hash);
        }
        BaseIndex {
            starts,
            chunks,
            hashes,
            size: manifest.header.size,
        }
    }

    /// True if the base version lists `hash`.
    pub fn contains(&self, hash: &Hash) -> bool {
        self.hashes.contains(hash)
    }

    /// The base chunks covering `[offset, offset + len)`, in order; `None`
    /// if the range is empty or not wholly inside the base version.
    pub fn covering(&self, offset: u64, len: u32) -> Option<Vec<BasePart>> {
        let end = offset.checked_add(u64::from(len))?;
        if len == 0 || end > self.size {
            return None;
        }
        let first = match self.starts.binary_search(&offset) {
            Ok(i) => i,
            Err(i) => i.checked_sub(1)?,
        };
        let mut out = Vec::new();
        for (start, chunk) in self
            .starts
            .get(first..)?
            .iter()
            .zip(self.chunks.get(first..)?)
        {
            if *start >= end {
                break;
            }
            out.push(BasePart {
                chunk: *chunk,
                start: *start,
            });
        }
        Some(out)
    }
}

/// Cuts `[offset, offset + len)` out of the bytes of `parts` (as returned by
/// [`BaseIndex::covering`]; `read` gives each part's bytes). `Ok(None)` if
/// a part's bytes do not have its length.
pub fn assemble<E>(
    offset: u64,
    len: usize,
    parts: &[BasePart],
    mut read: impl FnMut(&ChunkRef) -> Result<Vec<u8>, E>,
) -> Result<Option<Vec<u8>>, E> {
    let end = offset + len as u64;
    let mut out = Vec::with_capacity(len);
    for p in parts {
        let bytes = read(&p.chunk)?;
        if bytes.len() != p.chunk.len as usize {
            return Ok(None);
        }
        let lo = offset.max(p.start) - p.start;
        let hi = end.min(p.start + u64::from(p.chunk.len)) - p.start;
        let (Ok(lo), Ok(hi)) = (usize::try_from(lo), usize::try_from(hi)) else {
            return Ok(None);
        };
        let Some(piece) = bytes.get(lo..hi) else {
            return Ok(None);
        };
        out.extend_from_slice(piece);
    }
    Ok((out.len() == len).then_some(out))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

    use super::*;
    use crate::testdata::noise;

    #[test]
    fn blocks_are_aligned_to_the_file() {
        let r: Vec<_> = blocks(5000, 10_000).collect();
        // file blocks 1 (partial: 5000..8192), 2, 3 (partial: ..15000)
        assert_eq!(r, vec![0..3192, 3192..7288, 7288..10_000]);
        assert_eq!(block_count(5000, 10_000), 3);
        assert_eq!(block_count(8192, 4096), 1);
        assert_eq!(block_count(8191, 2), 2);
        assert_eq!(block_count(0, 0), 0);
        assert_eq!(blocks(8192, 4096).collect::<Vec<_>>(), vec![0..4096]);
    }

    #[test]
    fn diff_then_apply_rebuilds_the_chunk() {
        let base = noise(70_000, 1);
        let offset = 12_345;
        let mut new = base.clone();
        // One aligned 4 KiB write in the file: one block of the chunk.
        let at = (16_384 - offset) as usize;
        new[at..at + 4096].copy_from_slice(&noise(4096, 9));
        new[69_999] ^= 1; // last (partial) block
        let blocks = diff(offset, &new, &block_digests(offset, &base)).unwrap();
        let idx: Vec<u16> = blocks.iter().map(|b| b.index).collect();
        let last = block_count(offset, new.len()) as u16 - 1;
        assert_eq!(idx, vec![1, last]);
        assert_eq!(blocks[0].data.len(), 4096);
        assert_eq!(apply(offset, &base, &blocks).unwrap(), new);
        assert_eq!(apply(offset, &base, &[]).unwrap(), base);
    }

    #[test]
    fn diff_refuses_digests_of_another_shape() {
        let base = noise(8192, 2);
        assert!(diff(0, &noise(12_288, 3), &block_digests(0, &base)).is_none());
        assert!(diff(100, &base, &block_digests(0, &base)).is_none());
    }

    #[test]
    fn apply_refuses_malformed_blocks() {
        let base = noise(10_000, 4); // at offset 0: blocks 0, 1 (4096) and 2 (1808)
        let b = |index: u16, len: usize| DeltaBlock {
            index,
            data: vec![7; len],
        };
        assert!(matches!(
            apply(0, &base, &[b(3, 1)]),
            Err(DeltaError::BlockOutOfRange { index: 3, .. })
        ));
        assert!(matches!(
            apply(0, &base, &[b(u16::MAX, 4096)]),
            Err(DeltaError::BlockOutOfRange { .. })
        ));
        assert!(matches!(
            apply(0, &base, &[b(0, 4095)]),
            Err(DeltaError::BlockLength { want: 4096, .. })
        ));
        assert!(matches!(
            apply(0, &base, &[b(2, 4096)]),
            Err(DeltaError::BlockLength { want: 1808, .. })
        ));
        assert!(matches!(
            apply(100, &base, &[b(0, 4096)]),
            Err(DeltaError::BlockLength { want: 3996, .. })
        ));
        assert!(matches!(
            apply(0, &base, &[b(1, 4096), b(1, 4096)]),
            Err(DeltaError::BlockOrder { .. })
        ));
        assert!(matches!(
            apply(0, &base, &[b(1, 4096), b(0, 4096)]),
            Err(DeltaError::BlockOrder { .. })
        ));
        assert!(matches!(
            apply(0, &vec![0; MAX_CHUNK as usize + 1], &[]),
            Err(DeltaError::TooLarge(_))
        ));
    }

    #[test]
    fn covering_finds_the_base_chunks_of_a_range() {
        let c = |b: u8, len: u32| ChunkRef {
            hash: Hash([b; 32]),
            len,
        };
        let m = Manifest::from_chunks(vec![c(1, 100), c(2, 200), c(3, 300)]);
        let ix = BaseIndex::new(&m);
        let hashes = |o: u64, l: u32| {
            ix.covering(o, l).map(|v| {
                v.iter()
                    .map(|p| (p.chunk.hash.0[0], p.start))
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(hashes(100, 200), Some(vec![(2, 100)]));
        assert_eq!(hashes(0, 100), Some(vec![(1, 0)]));
        assert_eq!(hashes(50, 100), Some(vec![(1, 0), (2, 100)]));
        assert_eq!(hashes(99, 300), Some(vec![(1, 0), (2, 100), (3, 300)]));
        assert_eq!(hashes(550, 50), Some(vec![(3, 300)]));
        assert_eq!(hashes(550, 51), None, "past the base's end");
        assert_eq!(hashes(0, 0), None);
        assert!(ix.contains(&Hash([3; 32])));
        assert!(!BaseIndex::default().contains(&Hash([3; 32])));
        assert_eq!(BaseIndex::default().covering(0, 1), None);
    }

    #[test]
    fn assemble_cuts_the_range_out_of_its_chunks() {
        let data = noise(600, 5);
        let c = |from: usize, to: usize| ChunkRef {
            hash: Hash::of(&data[from..to]),
            len: (to - from) as u32,
        };
        let m = Manifest::from_chunks(vec![c(0, 100), c(100, 300), c(300, 600)]);
        let ix = BaseIndex::new(&m);
        let read = |r: &ChunkRef| -> Result<Vec<u8>, ()> {
            let (off, _) = m.offsets().find(|(_, x)| x.hash == r.hash).unwrap();
            Ok(data[off as usize..off as usize + r.len as usize].to_vec())
        };
        for (o, l) in [(0u64, 600u32), (50, 100), (99, 300), (300, 300), (599, 1)] {
            let parts = ix.covering(o, l).unwrap();
            let got = assemble(o, l as usize, &parts, read).unwrap().unwrap();
            assert_eq!(got, &data[o as usize..(o + u64::from(l)) as usize]);
        }
        let parts = ix.covering(0, 200).unwrap();
        let short = |_: &ChunkRef| -> Result<Vec<u8>, ()> { Ok(vec![0; 3]) };
        assert_eq!(assemble(0, 200, &parts, short).unwrap(), None);
    }

    #[test]
    fn worst_signature_answer_fits_the_smallest_frame() {
        use crate::defs::{MAX_SIGNATURE_BATCH, MIN_MAX_FRAME};
        use crate::message::{Frame, Response};
        let worst = block_count(1, MAX_CHUNK as usize);
        assert_eq!(worst, 65);
        let sig = vec![[0xff; BLOCK_DIGEST_LEN]; worst];
        let f = Frame::Response {
            id: u64::MAX,
            body: Response::BlockSignatures(vec![Some(sig); MAX_SIGNATURE_BATCH as usize]),
        };
        let n = postcard::to_stdvec(&f).unwrap().len();
        assert!(n + 4 <= MIN_MAX_FRAME as usize, "{n} bytes");
    }

    #[test]
    fn delta_wire_bound_holds() {
        use crate::message::{ChunkDelta, Frame, Request};
        let blocks = vec![
            DeltaBlock {
                index: 63,
                data: vec![1; 4096],
            },
            DeltaBlock {
                index: 64,
                data: vec![1; 100],
            },
        ];
        let f = Frame::Request {
            id: u64::MAX,
            body: Request::ChunkDelta(ChunkDelta {
                upload: u64::MAX,
                index: u32::MAX,
                hash: Hash([1; 32]),
                blocks: blocks.clone(),
            }),
        };
        let n = postcard::to_stdvec(&f).unwrap().len() + 4;
        assert!(n <= DELTA_FIXED_WIRE + blocks_wire_size(&blocks), "{n}");
    }
}
