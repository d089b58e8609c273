//! Chunking benchmark: chunk+hash throughput of the streaming chunker next
//! to plain BLAKE3 hashing of the same file in the same run (and `b3sum` /
//! `sha256sum` when installed), plus the study behind the FastCDC size
//! parameters: for each candidate, chunk count, manifest size and the share
//! of bytes an update must send after scattered edits and after an
//! insertion.
//!
//! The uve rows use `chunk_stream` (cut points on a second thread).
//!
//! `cargo run --release -p uve-protocol --example chunk_bench -- [SIZE_MIB]`
//! (default 1024; the parameter study uses min(SIZE, 256) MiB in memory).

// A benchmark program: failing loudly on a broken setup is what we want.
#![allow(clippy::expect_used, clippy::cast_possible_truncation)]

use std::collections::HashSet;
use std::io::{Read, Write};
use std::time::Instant;

use uve_protocol::chunker::{ChunkParams, Chunker, chunk_stream_with};
use uve_protocol::manifest::Hash;

use uve_protocol::testdata::noise;

fn mbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs
}

fn best_of<F: FnMut() -> u64>(runs: usize, mut f: F) -> (f64, u64) {
    let mut best = f64::MAX;
    let mut out = 0;
    for _ in 0..runs {
        let t = Instant::now();
        out = f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    (best, out)
}

fn plain_blake3(path: &std::path::Path) -> u64 {
    let mut f = std::fs::File::open(path).expect("open");
    let mut buf = vec![0u8; 4 << 20];
    let mut h = blake3::Hasher::new();
    let mut n = 0u64;
    loop {
        let r = f.read(&mut buf).expect("read");
        if r == 0 {
            break;
        }
        h.update(&buf[..r]);
        n += r as u64;
    }
    std::hint::black_box(h.finalize());
    n
}

fn chunk_file(path: &std::path::Path, params: ChunkParams) -> u64 {
    let f = std::fs::File::open(path).expect("open");
    chunk_stream_with(f, params, |_, _| Ok(()))
        .expect("chunk")
        .header
        .size
}

fn chunk_file_one_thread(path: &std::path::Path) -> u64 {
    let f = std::fs::File::open(path).expect("open");
    let mut c = Chunker::new(f);
    while c.next_chunk().expect("chunk").is_some() {}
    c.header().size
}

fn external(cmd: &str, path: &std::path::Path) -> Option<f64> {
    let t = Instant::now();
    let out = std::process::Command::new(cmd).arg(path).output().ok()?;
    out.status.success().then(|| t.elapsed().as_secs_f64())
}

fn cuts(data: &[u8], p: ChunkParams) -> Vec<(Hash, usize)> {
    let mut c = Chunker::with_params(data, p);
    let mut v = Vec::new();
    while let Some((r, _)) = c.next_chunk().expect("chunk") {
        v.push((r.hash, r.len as usize));
    }
    v
}

/// Bytes of `after` chunks whose hash is not among `before`'s chunks.
fn new_bytes(before: &[(Hash, usize)], after: &[(Hash, usize)]) -> usize {
    let old: HashSet<Hash> = before.iter().map(|c| c.0).collect();
    after
        .iter()
        .filter(|c| !old.contains(&c.0))
        .map(|c| c.1)
        .sum()
}

fn main() {
    let size_mib: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    let size = size_mib << 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("uif.img");
    write_noise_file(&path, size);
    throughput_table(&path, size, size_mib);
    size_study(size);
}

/// Writes `size` bytes of pseudo-random data to `path`, 64 MiB at a time,
/// and syncs it.
fn write_noise_file(path: &std::path::Path, size: usize) {
    let mut f = std::fs::File::create(path).expect("create");
    for i in 0..size.div_ceil(64 << 20) {
        let n = (size - i * (64 << 20)).min(64 << 20);
        f.write_all(&noise(n, i as u64 + 1)).expect("write");
    }
    f.sync_all().expect("sync");
}

/// The throughput table: plain BLAKE3, the chunker at three parameter sets,
/// the single-thread chunker, `b3sum` / `sha256sum` when installed.
fn throughput_table(path: &std::path::Path, size: usize, size_mib: usize) {
    println!(
        "# chunking throughput, {size_mib} MiB pseudo-random file (page cache warm), best of 3"
    );
    println!("{:<34} {:>10} {:>10}", "what", "MB/s", "vs blake3");
    let (t_b3, n) = best_of(3, || plain_blake3(path));
    let base = mbps(n, t_b3);
    println!(
        "{:<34} {:>10.0} {:>10.2}",
        "plain BLAKE3 (1 pass, 4 MiB reads)", base, 1.0
    );
    for (name, p) in [
        (
            "uve chunker 16/64/256 KiB (default)",
            ChunkParams::default(),
        ),
        (
            "uve chunker 8/32/128 KiB",
            ChunkParams {
                min: 8 << 10,
                avg: 32 << 10,
                max: 128 << 10,
            },
        ),
        (
            "uve chunker 32/128/512 KiB",
            ChunkParams {
                min: 32 << 10,
                avg: 128 << 10,
                max: 512 << 10,
            },
        ),
    ] {
        let (t, n) = best_of(3, || chunk_file(path, p));
        println!(
            "{:<34} {:>10.0} {:>10.2}",
            name,
            mbps(n, t),
            mbps(n, t) / base
        );
    }
    let (t, n) = best_of(3, || chunk_file_one_thread(path));
    println!(
        "{:<34} {:>10.0} {:>10.2}",
        "uve Chunker, single thread",
        mbps(n, t),
        mbps(n, t) / base
    );
    for cmd in ["b3sum", "sha256sum"] {
        match external(cmd, path) {
            Some(t) => println!(
                "{:<34} {:>10.0} {:>10.2}",
                cmd,
                mbps(size as u64, t),
                mbps(size as u64, t) / base
            ),
            None => println!("{cmd:<34} {:>10}", "n/a"),
        }
    }
}

/// The chunk size study on min(`size`, 256 MiB) in memory: chunk count,
/// manifest size and the bytes an update sends after scattered edits and
/// after an insertion, per parameter candidate.
fn size_study(size: usize) {
    let study = size.min(256 << 20);
    println!(
        "\n# chunk size study on {} MiB: bytes an update must send",
        study >> 20
    );
    println!(
        "# scattered: 1% of bytes rewritten as 4 KiB blocks at random offsets; insert: 4 KiB inserted at 1 MiB"
    );
    println!(
        "{:<16} {:>9} {:>12} {:>14} {:>14}",
        "min/avg/max KiB", "chunks", "manifest KB", "scattered 1%", "4K insert"
    );
    let data = noise(study, 99);
    let mut scattered = data.clone();
    let edits = study / 100 / 4096;
    let mut x = 12345u64;
    for _ in 0..edits {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x as usize % (study / 4096)) * 4096;
        scattered[off..off + 4096].copy_from_slice(&noise(4096, x));
    }
    let mut inserted = data.clone();
    inserted.splice(1 << 20..1 << 20, noise(4096, 7));
    for (min, avg, max) in [(4, 16, 64), (8, 32, 128), (16, 64, 256), (32, 128, 512)] {
        let p = ChunkParams {
            min: min << 10,
            avg: avg << 10,
            max: max << 10,
        };
        let before = cuts(&data, p);
        let s = new_bytes(&before, &cuts(&scattered, p));
        let i = new_bytes(&before, &cuts(&inserted, p));
        println!(
            "{:<16} {:>9} {:>12.0} {:>13.1}% {:>13.3}%",
            format!("{min}/{avg}/{max}"),
            before.len(),
            before.len() as f64 * 36.0 / 1000.0,
            s as f64 * 100.0 / study as f64,
            i as f64 * 100.0 / study as f64
        );
    }
}
