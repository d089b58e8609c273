//! Benchmark data: pseudo-random UIFs (incompressible, not all zeros) and
//! the edits applied to them, all deterministic so runs are comparable.

use std::io::Write;
use std::path::Path;

/// xorshift64 generator.
pub struct Rng(u64);

impl Rng {
    /// Seeded generator (a zero seed is made odd).
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }

    /// Next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for w in buf.chunks_mut(8) {
            let b = self.next().to_le_bytes();
            w.copy_from_slice(&b[..w.len()]);
        }
    }
}

/// `len` random bytes.
pub fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng::new(seed).fill(&mut v);
    v
}

/// Writes `data` to `path` and fsyncs it.
pub fn write_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// How a UIF is changed between two versions.
#[derive(Debug, Clone, Copy)]
pub enum Edit {
    /// ~1 % of the bytes rewritten as `block`-sized writes at random,
    /// block-aligned offsets.
    Scattered {
        /// Size of each write.
        block: usize,
    },
    /// `len` bytes inserted at offset 1 MiB (shifts every later offset).
    Insert {
        /// Bytes inserted.
        len: usize,
    },
}

impl Edit {
    /// Short label for tables.
    pub fn label(&self) -> String {
        match self {
            Edit::Scattered { block } => format!("1% as scattered {} KiB writes", block / 1024),
            Edit::Insert { len } => format!("{} KiB inserted at 1 MiB", len / 1024),
        }
    }

    /// Applies the edit to a copy of `base`.
    pub fn apply(&self, base: &[u8], seed: u64) -> Vec<u8> {
        let mut rng = Rng::new(seed);
        match *self {
            Edit::Scattered { block } => {
                let mut out = base.to_vec();
                let blocks = base.len() / block;
                let edits = (base.len() / 100 / block).max(1);
                let mut buf = vec![0u8; block];
                for _ in 0..edits {
                    let at = (rng.next() as usize % blocks.max(1)) * block;
                    rng.fill(&mut buf);
                    let end = (at + block).min(out.len());
                    out[at..end].copy_from_slice(&buf[..end - at]);
                }
                out
            }
            Edit::Insert { len } => {
                let at = (1 << 20).min(base.len());
                let mut ins = vec![0u8; len];
                rng.fill(&mut ins);
                let mut out = Vec::with_capacity(base.len() + len);
                out.extend_from_slice(&base[..at]);
                out.extend_from_slice(&ins);
                out.extend_from_slice(&base[at..]);
                out
            }
        }
    }
}
