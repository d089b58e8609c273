//! Streaming content-defined chunking of a UIF: FastCDC (2020) boundaries,
//! a BLAKE3 hash per chunk and a BLAKE3 digest of the whole stream, in one
//! pass over the input with a fixed-size buffer (4 MiB), so a multi-GiB
//! image is chunked in bounded memory.
//!
//! Chunk sizes (min 16 KiB / avg 64 KiB / max 256 KiB) are a trade-off
//! measured with `examples/chunk_bench.rs`: smaller chunks find more shared
//! data after scattered edits but grow the manifest (36 B per chunk: 1 GiB
//! → ~16 k chunks → ~590 KB, one frame) and the per-chunk request overhead.
//! The numbers behind the choice are in the README's benchmark section.

use std::io::{self, Read};

use fastcdc::v2020::FastCDC;

use crate::defs::{AVG_CHUNK, MAX_CHUNK, MIN_CHUNK};
use crate::manifest::{ChunkRef, Hash, Manifest, ManifestHeader};

/// Size of the read buffer; must be at least twice `MAX_CHUNK`.
const BUF_SIZE: usize = 4 << 20;

/// FastCDC parameters. Every peer must chunk with the same parameters for
/// deduplication to work; correctness never depends on it (manifests list
/// explicit lengths).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkParams {
    /// Minimum chunk size.
    pub min: u32,
    /// Target average chunk size.
    pub avg: u32,
    /// Maximum chunk size.
    pub max: u32,
}

impl Default for ChunkParams {
    fn default() -> Self {
        ChunkParams {
            min: MIN_CHUNK,
            avg: AVG_CHUNK,
            max: MAX_CHUNK,
        }
    }
}

/// Reads a stream once and yields its chunks in order.
pub struct Chunker<R> {
    reader: R,
    params: ChunkParams,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
    whole: blake3::Hasher,
    size: u64,
    count: u32,
}

impl<R: Read> Chunker<R> {
    /// A chunker with the protocol's default parameters.
    pub fn new(reader: R) -> Self {
        Self::with_params(reader, ChunkParams::default())
    }

    /// A chunker with explicit parameters (tests and benchmarks).
    pub fn with_params(reader: R, params: ChunkParams) -> Self {
        let size = BUF_SIZE.max(params.max as usize * 2);
        Chunker {
            reader,
            params,
            buf: vec![0; size],
            start: 0,
            end: 0,
            eof: false,
            whole: blake3::Hasher::new(),
            size: 0,
            count: 0,
        }
    }

    /// The next chunk's ref and bytes, or `None` at end of stream.
    pub fn next_chunk(&mut self) -> io::Result<Option<(ChunkRef, &[u8])>> {
        loop {
            let window = &self.buf[self.start..self.end];
            if window.is_empty() {
                if self.eof {
                    return Ok(None);
                }
                self.refill()?;
                continue;
            }
            let cut = FastCDC::new(window, self.params.min, self.params.avg, self.params.max)
                .next()
                .map_or(window.len(), |c| c.length);
            // A cut at the window's end may only be an artefact of the
            // buffer boundary; emit it only when it cannot move.
            if cut < window.len() || cut >= self.params.max as usize || self.eof {
                let data = &self.buf[self.start..self.start + cut];
                self.start += cut;
                self.whole.update(data);
                self.size += cut as u64;
                self.count += 1;
                let len = u32::try_from(cut).map_err(|_| io::Error::other("chunk too large"))?;
                return Ok(Some((
                    ChunkRef {
                        hash: Hash::of(data),
                        len,
                    },
                    data,
                )));
            }
            self.refill()?;
        }
    }

    /// Moves the unconsumed window to the front and reads until the buffer
    /// is full or the stream ends.
    fn refill(&mut self) -> io::Result<()> {
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        while self.end < self.buf.len() {
            match self.reader.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The header of everything chunked so far (call after the last chunk).
    pub fn header(&self) -> ManifestHeader {
        ManifestHeader {
            size: self.size,
            digest: Hash(*self.whole.finalize().as_bytes()),
            chunk_count: self.count,
        }
    }
}

/// Chunks a whole stream, calling `each` with every chunk's ref and bytes,
/// and returns the complete manifest.
pub fn chunk_stream<R: Read>(
    reader: R,
    mut each: impl FnMut(&ChunkRef, &[u8]) -> io::Result<()>,
) -> io::Result<Manifest> {
    let mut chunker = Chunker::new(reader);
    let mut chunks = Vec::new();
    while let Some((chunk, data)) = chunker.next_chunk()? {
        each(&chunk, data)?;
        chunks.push(chunk);
    }
    Ok(Manifest {
        header: chunker.header(),
        chunks,
    })
}

/// Chunks a file and returns its manifest.
pub fn chunk_file(path: &std::path::Path) -> io::Result<Manifest> {
    chunk_stream(std::fs::File::open(path)?, |_, _| Ok(()))
}

/// True if `data` is the chunk `expected` describes (length and hash).
pub fn chunk_matches(expected: &ChunkRef, data: &[u8]) -> bool {
    data.len() == expected.len as usize && Hash::of(data) == expected.hash
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random bytes (xorshift), so tests need no RNG crate.
    pub(crate) fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// Reader returning at most `step` bytes per read, to exercise refills.
    struct Dribble<'a>(&'a [u8], usize);
    impl Read for Dribble<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = self.0.len().min(out.len()).min(self.1);
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn streaming_equals_whole_buffer_chunking() {
        let data = noise(11 << 20, 1);
        let p = ChunkParams::default();
        let expect: Vec<usize> = FastCDC::new(&data, p.min, p.avg, p.max)
            .map(|c| c.length)
            .collect();
        for step in [usize::MAX, 1 << 20, 65_537, 4096] {
            let mut got = Vec::new();
            let m = chunk_stream(Dribble(&data, step), |c, bytes| {
                assert!(chunk_matches(c, bytes));
                got.push(bytes.len());
                Ok(())
            })
            .expect("chunk");
            assert_eq!(got, expect, "step {step}");
            m.validate().expect("valid");
            assert_eq!(m.header.size, data.len() as u64);
            assert_eq!(m.header.digest, Hash::of(&data));
        }
    }

    #[test]
    fn empty_and_tiny_inputs() {
        let m = chunk_stream(&b""[..], |_, _| Ok(())).expect("chunk");
        assert_eq!(m.header.chunk_count, 0);
        assert_eq!(m.header.digest, Hash::of(b""));
        let m = chunk_stream(&b"hello"[..], |_, _| Ok(())).expect("chunk");
        assert_eq!(m.chunks.len(), 1);
        assert_eq!(m.chunks[0].len, 5);
    }

    #[test]
    fn a_local_edit_changes_few_chunks() {
        let mut data = noise(8 << 20, 2);
        let before = chunk_stream(&data[..], |_, _| Ok(())).expect("chunk");
        // insert 4 KiB near the start: every later offset shifts
        let ins = noise(4096, 3);
        data.splice(100_000..100_000, ins);
        let after = chunk_stream(&data[..], |_, _| Ok(())).expect("chunk");
        let old: std::collections::HashSet<_> = before.chunks.iter().map(|c| c.hash).collect();
        let new_chunks = after
            .chunks
            .iter()
            .filter(|c| !old.contains(&c.hash))
            .count();
        assert!(
            new_chunks <= 3,
            "{new_chunks} new chunks after one insertion"
        );
    }

    #[test]
    fn chunk_matches_checks_length_and_hash() {
        let data = b"some chunk";
        let c = ChunkRef {
            hash: Hash::of(data),
            len: 10,
        };
        assert!(chunk_matches(&c, data));
        assert!(!chunk_matches(&c, b"some chunK"));
        assert!(!chunk_matches(&ChunkRef { len: 9, ..c }, data));
    }
}
