//! Deterministic pseudo-random bytes for tests, benchmarks and demos
//! (xorshift64), so no crate needs an RNG to make incompressible data that
//! chunks like a real UIF.

/// `len` pseudo-random bytes. The same `seed` always gives the same bytes;
/// different seeds (even neighbours) give unrelated streams.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = vec![0u8; len];
    for w in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
    }
    out
}

/// `data` with `count` 4 KiB blocks overwritten by fresh [`noise`], at
/// block-aligned offsets spread evenly over it (a little jitter so they do
/// not fall on a regular stride); distinct blocks while `count` is well
/// below `data.len() / 4096 / 8`.
pub fn scattered_writes(data: &[u8], count: usize, seed: u64) -> Vec<u8> {
    let mut out = data.to_vec();
    let blocks = data.len() / 4096;
    for i in 0..count {
        let b = (i * blocks / count + (i * 3) % 7) % blocks;
        out[b * 4096..(b + 1) * 4096].copy_from_slice(&noise(4096, seed + i as u64));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::noise;

    #[test]
    fn deterministic_distinct_and_not_trivially_compressible() {
        assert_eq!(noise(1000, 7), noise(1000, 7));
        assert_ne!(noise(1000, 10), noise(1000, 11));
        assert_eq!(noise(13, 3), noise(20, 3)[..13]);
        let data = noise(1 << 16, 1);
        let mut counts = [0u32; 256];
        for b in &data {
            counts[usize::from(*b)] += 1;
        }
        // Every byte value appears, none dominates (uniform ≈ 256 each).
        assert!(counts.iter().all(|c| (128..512).contains(c)), "{counts:?}");
    }
}
