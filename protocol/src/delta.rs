//! Sub-chunk block deltas (protocol 2, WIRE.md §8): a chunk the host lacks
//! is sent as the base version's chunk at the same offset with the same
//! length, with the [`DELTA_BLOCK`]-sized blocks that differ replaced.
//!
//! The agent keeps no old bytes, so the host tells it the digests of the
//! base chunk's blocks ([`block_digests`]); the agent sends the blocks
//! whose digest differs ([`diff`]); the host rebuilds the chunk
//! ([`apply`]) and stores it only if its full BLAKE3 is the announced hash.
//! [`BaseIndex`] is the pairing rule both ends apply to a base manifest.

use std::collections::HashMap;

use crate::defs::{BLOCK_DIGEST_LEN, DELTA_BLOCK, MAX_CHUNK};
use crate::manifest::{ChunkRef, Hash, Manifest};
use crate::message::{BlockDigest, DeltaBlock};

const BLOCK: usize = DELTA_BLOCK as usize;

/// Why a delta cannot be applied to its base chunk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    /// A block starts at or beyond the end of the chunk.
    #[error("block {index} is outside a chunk of {len} bytes")]
    BlockOutOfRange {
        /// The block number.
        index: u16,
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
    /// The base chunk is longer than any chunk may be.
    #[error("base chunk of {0} bytes exceeds MAX_CHUNK")]
    TooLarge(usize),
}

/// Number of delta blocks of a chunk of `len` bytes.
pub fn block_count(len: usize) -> usize {
    len.div_ceil(BLOCK)
}

/// The digest of one block: BLAKE3, truncated to [`BLOCK_DIGEST_LEN`] bytes.
pub fn block_digest(block: &[u8]) -> BlockDigest {
    let mut d = [0u8; BLOCK_DIGEST_LEN];
    d.copy_from_slice(&blake3::hash(block).as_bytes()[..BLOCK_DIGEST_LEN]);
    d
}

/// The digests of every block of `chunk`, in order.
pub fn block_digests(chunk: &[u8]) -> Vec<BlockDigest> {
    chunk.chunks(BLOCK).map(block_digest).collect()
}

/// The blocks of `chunk` whose digest differs from the base chunk's
/// (`base`, one digest per block). `None` if `base` does not have one
/// digest per block of `chunk` (not a same-length base).
pub fn diff(chunk: &[u8], base: &[BlockDigest]) -> Option<Vec<DeltaBlock>> {
    if base.len() != block_count(chunk.len()) {
        return None;
    }
    let mut out = Vec::new();
    for (i, (block, want)) in chunk.chunks(BLOCK).zip(base).enumerate() {
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
/// and request headers, upload id, two hashes, block count.
pub const DELTA_FIXED_WIRE: usize = 4 + 1 + 10 + 1 + 10 + 64 + 2;

/// Checks that `blocks` can replace blocks of a chunk of `len` bytes:
/// strictly increasing block numbers, each block inside the chunk and
/// exactly as long as its place in it. Needs no base bytes, so a malformed
/// delta is refused before the base chunk is read.
pub fn check(len: usize, blocks: &[DeltaBlock]) -> Result<(), DeltaError> {
    if len > MAX_CHUNK as usize {
        return Err(DeltaError::TooLarge(len));
    }
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
        let start = usize::from(b.index) * BLOCK;
        if start >= len {
            return Err(DeltaError::BlockOutOfRange {
                index: b.index,
                len,
            });
        }
        let want = (len - start).min(BLOCK);
        if b.data.len() != want {
            return Err(DeltaError::BlockLength {
                index: b.index,
                got: b.data.len(),
                want,
            });
        }
        prev = Some(b.index);
    }
    Ok(())
}

/// Rebuilds a chunk: `base` with `blocks` replaced (after [`check`]); the
/// result has the base's length.
pub fn apply(base: &[u8], blocks: &[DeltaBlock]) -> Result<Vec<u8>, DeltaError> {
    check(base.len(), blocks)?;
    let mut out = base.to_vec();
    for b in blocks {
        let start = usize::from(b.index) * BLOCK;
        if let Some(dst) = out.get_mut(start..start + b.data.len()) {
            dst.copy_from_slice(&b.data);
        }
    }
    Ok(out)
}

/// The chunks of an update's base version, indexed for the pairing rule:
/// a new chunk's base chunk is the base version's chunk that starts at the
/// same offset and has the same length (what an in-place write leaves
/// with content-defined chunking).
#[derive(Debug, Default)]
pub struct BaseIndex {
    starts: Vec<u64>,
    chunks: Vec<ChunkRef>,
    lens: HashMap<Hash, u32>,
}

impl BaseIndex {
    /// Indexes `manifest`.
    pub fn new(manifest: &Manifest) -> BaseIndex {
        let (mut starts, mut chunks) = (Vec::new(), Vec::new());
        let mut lens = HashMap::with_capacity(manifest.chunks.len());
        for (off, c) in manifest.offsets() {
            starts.push(off);
            chunks.push(*c);
            lens.insert(c.hash, c.len);
        }
        BaseIndex {
            starts,
            chunks,
            lens,
        }
    }

    /// True if the base version lists `hash`.
    pub fn contains(&self, hash: &Hash) -> bool {
        self.lens.contains_key(hash)
    }

    /// The length of chunk `hash` if the base version lists it.
    pub fn len_of(&self, hash: &Hash) -> Option<u32> {
        self.lens.get(hash).copied()
    }

    /// The base chunk paired with a new chunk of `len` bytes at `offset`.
    pub fn paired(&self, offset: u64, len: u32) -> Option<Hash> {
        let i = self.starts.binary_search(&offset).ok()?;
        let c = self.chunks.get(i)?;
        (c.len == len).then_some(c.hash)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::testdata::noise;

    #[test]
    fn diff_then_apply_rebuilds_the_chunk() {
        let base = noise(70_000, 1); // 18 blocks, the last one short
        let mut new = base.clone();
        new[5000] ^= 1; // block 1
        new[69_999] ^= 1; // last block (short)
        let blocks = diff(&new, &block_digests(&base)).unwrap();
        let idx: Vec<u16> = blocks.iter().map(|b| b.index).collect();
        assert_eq!(idx, vec![1, 17]);
        assert_eq!(blocks[1].data.len(), 70_000 - 17 * 4096);
        assert_eq!(apply(&base, &blocks).unwrap(), new);
        assert_eq!(apply(&base, &[]).unwrap(), base);
    }

    #[test]
    fn diff_refuses_a_base_of_another_length() {
        let base = noise(8192, 2);
        assert!(diff(&noise(12_288, 3), &block_digests(&base)).is_none());
    }

    #[test]
    fn apply_refuses_malformed_blocks() {
        let base = noise(10_000, 4); // blocks 0, 1 (4096) and 2 (1808)
        let b = |index: u16, len: usize| DeltaBlock {
            index,
            data: vec![7; len],
        };
        assert!(matches!(
            apply(&base, &[b(3, 1)]),
            Err(DeltaError::BlockOutOfRange { index: 3, .. })
        ));
        assert!(matches!(
            apply(&base, &[b(u16::MAX, 4096)]),
            Err(DeltaError::BlockOutOfRange { .. })
        ));
        assert!(matches!(
            apply(&base, &[b(0, 4095)]),
            Err(DeltaError::BlockLength { want: 4096, .. })
        ));
        assert!(matches!(
            apply(&base, &[b(2, 4096)]),
            Err(DeltaError::BlockLength { want: 1808, .. })
        ));
        assert!(matches!(
            apply(&base, &[b(1, 4096), b(1, 4096)]),
            Err(DeltaError::BlockOrder { .. })
        ));
        assert!(matches!(
            apply(&base, &[b(1, 4096), b(0, 4096)]),
            Err(DeltaError::BlockOrder { .. })
        ));
        assert!(matches!(
            apply(&vec![0; MAX_CHUNK as usize + 1], &[]),
            Err(DeltaError::TooLarge(_))
        ));
    }

    #[test]
    fn pairing_needs_same_offset_and_length() {
        let c = |b: u8, len: u32| ChunkRef {
            hash: Hash([b; 32]),
            len,
        };
        let m = Manifest::from_chunks(vec![c(1, 100), c(2, 200), c(3, 300)]);
        let ix = BaseIndex::new(&m);
        assert_eq!(ix.paired(100, 200), Some(Hash([2; 32])));
        assert_eq!(ix.paired(100, 201), None);
        assert_eq!(ix.paired(101, 200), None);
        assert_eq!(ix.paired(0, 100), Some(Hash([1; 32])));
        assert_eq!(ix.paired(600, 1), None);
        assert!(ix.contains(&Hash([3; 32])));
        assert_eq!(ix.len_of(&Hash([3; 32])), Some(300));
        assert!(!BaseIndex::default().contains(&Hash([3; 32])));
    }

    #[test]
    fn worst_signature_answer_fits_the_smallest_frame() {
        use crate::defs::{MAX_SIGNATURE_BATCH, MIN_MAX_FRAME};
        use crate::message::{BaseSignature, Frame, Response};
        let sig = BaseSignature {
            base: Hash([0xff; 32]),
            blocks: vec![[0xff; BLOCK_DIGEST_LEN]; block_count(MAX_CHUNK as usize)],
        };
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
                hash: Hash([1; 32]),
                base: Hash([2; 32]),
                blocks: blocks.clone(),
            }),
        };
        let n = postcard::to_stdvec(&f).unwrap().len() + 4;
        assert!(n <= DELTA_FIXED_WIRE + blocks_wire_size(&blocks), "{n}");
    }
}
