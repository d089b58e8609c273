//! The UIF manifest: the ordered list of content-addressed chunks that make
//! up one version of a User Image File, its total size and its whole-file
//! BLAKE3 digest, plus the paging rule used when a manifest does not fit in
//! one frame.

use serde::{Deserialize, Serialize};
use std::fmt;

use crate::defs::{CHUNK_REF_MAX_WIRE, DISK_BLOCK, MAX_CHUNK, PAGE_OVERHEAD};

/// A BLAKE3-256 hash (of a chunk, or of a whole UIF).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    /// Hashes `data` with BLAKE3.
    pub fn of(data: &[u8]) -> Self {
        Hash(*blake3::hash(data).as_bytes())
    }

    /// Lower-case hex, as used in file and object names.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        s
    }

    /// Parses 64 hex digits; `None` for anything else.
    pub fn from_hex(s: &str) -> Option<Self> {
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let hi = hex_val(pair[0])?;
            let lo = hex_val(pair[1])?;
            out[i] = (hi << 4) | lo;
        }
        Some(Hash(out))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// One chunk of a UIF: its BLAKE3 hash and length in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChunkRef {
    /// BLAKE3 hash of the chunk's bytes.
    pub hash: Hash,
    /// Length of the chunk in bytes (1..=`MAX_CHUNK`).
    pub len: u32,
}

/// The zero block: BLAKE3 of [`DISK_BLOCK`] zero bytes. Profile disks
/// are mostly zero blocks; every store holds this chunk from the moment
/// it opens and never collects it, so an agent never uploads it, and an
/// agent never fetches it (it leaves a hole, which reads as zeroes).
pub const ZERO_BLOCK: ChunkRef = ChunkRef {
    hash: Hash([
        134, 187, 43, 82, 26, 16, 97, 45, 90, 29, 56, 32, 79, 172, 79, 166, 50, 70, 109, 24, 102,
        20, 77, 138, 106, 126, 58, 252, 5, 12, 231, 174,
    ]),
    len: DISK_BLOCK,
};

impl ChunkRef {
    /// True for [`ZERO_BLOCK`].
    pub fn is_zero_block(&self) -> bool {
        *self == ZERO_BLOCK
    }
}

/// Domain-separation prefix of the manifest digest.
const DIGEST_CONTEXT: &[u8] = b"uve.uif.manifest.v1";

/// Incrementally computes the manifest digest and header while chunks are
/// produced: `BLAKE3(context || for each chunk: hash || len as u32 LE)`.
/// Because every chunk hash commits to the chunk's bytes and the lengths
/// commit to the boundaries, this digest identifies the whole byte stream
/// as strongly as a BLAKE3 over the bytes, at no extra hashing pass.
#[derive(Clone)]
pub struct DigestBuilder {
    hasher: blake3::Hasher,
    size: u64,
    count: u32,
}

impl Default for DigestBuilder {
    fn default() -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(DIGEST_CONTEXT);
        DigestBuilder {
            hasher,
            size: 0,
            count: 0,
        }
    }
}

impl DigestBuilder {
    /// Adds the next chunk.
    pub fn push(&mut self, chunk: &ChunkRef) {
        self.hasher.update(&chunk.hash.0);
        self.hasher.update(&chunk.len.to_le_bytes());
        self.size += u64::from(chunk.len);
        self.count = self.count.saturating_add(1);
    }

    /// The header of the chunks pushed so far.
    pub fn header(&self) -> ManifestHeader {
        ManifestHeader {
            size: self.size,
            digest: Hash(*self.hasher.finalize().as_bytes()),
            chunk_count: self.count,
        }
    }
}

/// The manifest digest of a chunk list (see [`DigestBuilder`]).
pub fn digest_of(chunks: &[ChunkRef]) -> Hash {
    let mut b = DigestBuilder::default();
    for c in chunks {
        b.push(c);
    }
    b.header().digest
}

/// Everything about a manifest except its chunk list: small enough to travel
/// in any frame; the chunk list follows in pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestHeader {
    /// Total size of the UIF in bytes (sum of chunk lengths).
    pub size: u64,
    /// Digest of the whole UIF: BLAKE3 over the chunk list (see
    /// [`DigestBuilder`]); verifies all pages and, with the chunk hashes,
    /// every byte.
    pub digest: Hash,
    /// Number of chunks.
    pub chunk_count: u32,
}

/// Why a manifest is inconsistent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// The header announces a different chunk count than the list holds.
    #[error("manifest announces {announced} chunks but lists {listed}")]
    ChunkCount {
        /// Count in the header.
        announced: u32,
        /// Count in the list.
        listed: usize,
    },
    /// The header announces a different size than the chunks add up to.
    #[error("manifest announces {announced} bytes but its chunks add up to {summed}")]
    Size {
        /// Size in the header.
        announced: u64,
        /// Sum of chunk lengths.
        summed: u64,
    },
    /// A chunk is empty or longer than `MAX_CHUNK`.
    #[error("chunk {index} has length {len}; allowed is 1..={MAX_CHUNK}")]
    ChunkLen {
        /// Index of the chunk.
        index: usize,
        /// Its announced length.
        len: u32,
    },
    /// The chunk list does not hash to the header's digest.
    #[error("manifest chunk list does not match its digest")]
    Digest,
    /// A page index is beyond the last page.
    #[error("page {page} requested, the manifest has {pages}")]
    NoSuchPage {
        /// Requested page.
        page: u32,
        /// Number of pages.
        pages: u32,
    },
}

/// A complete manifest: header plus the ordered chunk list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Size, digest and chunk count.
    pub header: ManifestHeader,
    /// The chunks in file order.
    pub chunks: Vec<ChunkRef>,
}

impl Manifest {
    /// Builds a manifest (header computed) from a chunk list.
    pub fn from_chunks(chunks: Vec<ChunkRef>) -> Self {
        let mut b = DigestBuilder::default();
        for c in &chunks {
            b.push(c);
        }
        Manifest {
            header: b.header(),
            chunks,
        }
    }

    /// Checks that header and chunk list agree (count, size, digest) and
    /// every length is legal.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.chunks.len() != self.header.chunk_count as usize {
            return Err(ManifestError::ChunkCount {
                announced: self.header.chunk_count,
                listed: self.chunks.len(),
            });
        }
        let mut summed = 0u64;
        for (index, c) in self.chunks.iter().enumerate() {
            if c.len == 0 || c.len > MAX_CHUNK {
                return Err(ManifestError::ChunkLen { index, len: c.len });
            }
            summed += u64::from(c.len);
        }
        if summed != self.header.size {
            return Err(ManifestError::Size {
                announced: self.header.size,
                summed,
            });
        }
        if digest_of(&self.chunks) != self.header.digest {
            return Err(ManifestError::Digest);
        }
        Ok(())
    }

    /// Number of pages this manifest has under the given frame limit.
    pub fn page_count(&self, max_frame: u32) -> u32 {
        page_count(self.header.chunk_count, max_frame)
    }

    /// The chunk refs of page `page` under the given frame limit.
    pub fn page(&self, page: u32, max_frame: u32) -> Result<&[ChunkRef], ManifestError> {
        let pages = self.page_count(max_frame);
        if page >= pages {
            return Err(ManifestError::NoSuchPage { page, pages });
        }
        let per = chunks_per_page(max_frame) as usize;
        let start = page as usize * per;
        let end = (start + per).min(self.chunks.len());
        Ok(&self.chunks[start..end])
    }

    /// Byte offset of every chunk in the file, in order.
    pub fn offsets(&self) -> impl Iterator<Item = (u64, &ChunkRef)> {
        self.chunks.iter().scan(0u64, |off, c| {
            let here = *off;
            *off += u64::from(c.len);
            Some((here, c))
        })
    }
}

/// How many chunk refs fit in one manifest page under `max_frame`.
pub fn chunks_per_page(max_frame: u32) -> u32 {
    (max_frame.saturating_sub(PAGE_OVERHEAD) / CHUNK_REF_MAX_WIRE).max(1)
}

/// Number of manifest pages for `chunk_count` chunks under `max_frame`.
/// An empty UIF still has one (empty) page, so a reader always asks once.
pub fn page_count(chunk_count: u32, max_frame: u32) -> u32 {
    chunk_count.div_ceil(chunks_per_page(max_frame)).max(1)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn the_zero_block_is_the_hash_of_a_disk_block_of_zeroes() {
        let zeroes = vec![0u8; DISK_BLOCK as usize];
        assert_eq!(ZERO_BLOCK.hash, Hash::of(&zeroes));
        assert!(ZERO_BLOCK.is_zero_block());
        let shorter = ChunkRef {
            hash: Hash::of(&zeroes[1..]),
            len: DISK_BLOCK - 1,
        };
        assert!(!shorter.is_zero_block());
    }
    use crate::defs::DEFAULT_MAX_FRAME;

    fn manifest(n: u32) -> Manifest {
        let chunks: Vec<ChunkRef> = (0..n)
            .map(|i| ChunkRef {
                hash: Hash::of(&i.to_le_bytes()),
                len: 1000 + i,
            })
            .collect();
        Manifest::from_chunks(chunks)
    }

    #[test]
    fn hex_round_trip() {
        let h = Hash::of(b"abc");
        assert_eq!(Hash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(Hash::from_hex("zz"), None);
        assert_eq!(Hash::from_hex(&"g".repeat(64)), None);
    }

    #[test]
    fn pages_cover_every_chunk_once_and_fit_a_frame() {
        let per = chunks_per_page(DEFAULT_MAX_FRAME);
        let m = manifest(per * 2 + 5);
        m.validate().expect("valid manifest");
        assert_eq!(m.page_count(DEFAULT_MAX_FRAME), 3);
        let mut all = Vec::new();
        for p in 0..3 {
            let page = m.page(p, DEFAULT_MAX_FRAME).expect("page");
            let bytes = postcard::to_stdvec(&page).expect("encode");
            assert!(bytes.len() as u32 + PAGE_OVERHEAD <= DEFAULT_MAX_FRAME);
            all.extend_from_slice(page);
        }
        assert_eq!(all, m.chunks);
        assert!(m.page(3, DEFAULT_MAX_FRAME).is_err());
    }

    #[test]
    fn empty_manifest_has_one_empty_page() {
        let m = manifest(0);
        assert_eq!(m.page_count(DEFAULT_MAX_FRAME), 1);
        assert!(m.page(0, DEFAULT_MAX_FRAME).expect("page 0").is_empty());
    }

    #[test]
    fn validate_catches_lies() {
        let mut m = manifest(3);
        m.header.size += 1;
        assert!(matches!(m.validate(), Err(ManifestError::Size { .. })));
        let mut m = manifest(3);
        m.header.chunk_count = 4;
        assert!(matches!(
            m.validate(),
            Err(ManifestError::ChunkCount { .. })
        ));
        let mut m = manifest(3);
        m.chunks[1].len = MAX_CHUNK + 1;
        m.header.size = m.chunks.iter().map(|c| u64::from(c.len)).sum();
        assert!(matches!(
            m.validate(),
            Err(ManifestError::ChunkLen { index: 1, .. })
        ));
    }
}
