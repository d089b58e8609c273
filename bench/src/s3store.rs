//! The S3 store benchmark (`uve-bench s3`): cold retrieve and full update
//! of the same UIF through a `uve-host` whose store is a real Ceph RGW on
//! 127.0.0.1 (started with `tests/s3/rgw.sh`), next to the same through a
//! `uve-host` on the local store, in the same run. Not part of `all`: it
//! needs Ceph (`apt install radosgw ceph-mon ceph-osd uuid-runtime`).
//! A second baseline is the store alone: `S3Store::put_chunk` /
//! `read_chunk` of the same chunks from as many threads as the agent keeps
//! requests in flight, no protocol, no agent, no files.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use uve_e2e::rgw::Rgw;
use uve_host::config::{Config, S3Config};
use uve_host::store::{S3Store, StorePolicy, UifStore};
use uve_protocol::manifest::Hash;

use crate::rig::Rig;
use crate::{Row, data};

/// Store configuration for keys under `prefix` of the RGW's bucket (the
/// `[s3]` section the benchmark's `uve-host` is given).
fn config(rgw: &Rgw, prefix: &str) -> Result<S3Config, String> {
    Config::parse(&rgw.toml(prefix))
        .map_err(|e| format!("rgw [s3] section: {e}"))?
        .s3
        .ok_or_else(|| "no [s3] section".to_string())
}

/// Import, cold login (retrieve), then a full update of new bytes.
fn round(rig: &Rig, work: &Path, size: usize) -> (Duration, Duration) {
    let src = work.join("s3-a.img");
    data::write_file(&src, &data::random(size, 61)).expect("write source");
    rig.import("u-s3", &src);
    let _ = std::fs::remove_file(&src);
    let down = rig.login("u-s3", "s1");
    data::write_file(&rig.uif("u-s3"), &data::random(size, 62)).expect("rewrite UIF");
    let up = rig.logout("s1");
    (down, up)
}

/// Runs `f` on every item from `threads` threads; returns the wall time.
fn parallel<T: Sync>(items: &[T], threads: usize, f: impl Fn(&T) + Sync) -> Duration {
    let next = AtomicUsize::new(0);
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                while let Some(item) = items.get(next.fetch_add(1, Ordering::Relaxed)) {
                    f(item);
                }
            });
        }
    });
    t.elapsed()
}

/// The store alone: puts then reads of `size` bytes of chunks.
fn store_alone(rgw: &Rgw, size: usize) -> Result<(Duration, Duration), String> {
    let staging = tempfile::tempdir().map_err(|e| e.to_string())?;
    let store = S3Store::open(
        &config(rgw, "bench-raw")?,
        StorePolicy::default(),
        Duration::from_secs(3600),
        staging.path(),
    )
    .map_err(|e| e.to_string())?;
    let data = data::random(size, 63);
    let mut chunks: Vec<(Hash, Vec<u8>)> = Vec::new();
    uve_protocol::chunker::chunk_stream(&data[..], |c, b| {
        chunks.push((c.hash, b.to_vec()));
        Ok(())
    })
    .map_err(|e| e.to_string())?;
    let store = Arc::new(store);
    let put = parallel(&chunks, UPLOAD_PARALLEL, |(h, b)| {
        store.put_chunk(h, b).expect("put_chunk");
    });
    let get = parallel(&chunks, FETCH_PARALLEL, |(h, _)| {
        store.read_chunk(h).expect("read_chunk");
    });
    Ok((get, put))
}

/// Chunk uploads the agent keeps in flight (`agent/src/uif/update.rs`).
const UPLOAD_PARALLEL: usize = 8;
/// Chunk fetches the agent keeps in flight (`fetch_parallel` default).
const FETCH_PARALLEL: usize = 12;

fn mbps(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / 1e6 / t.as_secs_f64().max(1e-9)
}

/// Runs the S3-vs-local rounds on a `size`-byte UIF.
pub fn run(bins: &uve_e2e::binaries::Binaries, work: &Path, size: usize) -> Vec<Row> {
    let rgw = match Rgw::start(&work.join("ceph")) {
        Ok(r) => r,
        Err(e) => return vec![Row::text("S3 store", format!("skipped: {e}"), "", "")],
    };
    let local_dir = work.join("s3-local");
    let s3_dir = work.join("s3-rgw");
    for d in [&local_dir, &s3_dir] {
        std::fs::create_dir_all(d).expect("dir");
    }
    let local = Rig::start_with(bins, &local_dir, false, "").expect("local rig");
    let (ld, lu) = round(&local, &local_dir, size);
    drop(local);
    let s3 = Rig::start_with(bins, &s3_dir, false, &rgw.toml("bench")).expect("S3 rig");
    let (sd, su) = round(&s3, &s3_dir, size);
    eprintln!("  local: retrieve {ld:?}, update {lu:?}; RGW: retrieve {sd:?}, update {su:?}");
    let mib = size >> 20;
    let mut rows = vec![
        Row::new(
            format!("cold retrieve {mib} MiB, S3 store on Ceph RGW (MB/s)"),
            mbps(size, sd),
            "local store",
            mbps(size, ld),
            true,
        ),
        Row::new(
            format!("full update {mib} MiB, S3 store on Ceph RGW (MB/s)"),
            mbps(size, su),
            "local store",
            mbps(size, lu),
            true,
        ),
    ];
    match store_alone(&rgw, size) {
        Ok((get, put)) => {
            eprintln!("  S3Store alone: read {get:?}, put {put:?}");
            rows.push(Row::new(
                format!("cold retrieve {mib} MiB, S3 store on Ceph RGW (MB/s)"),
                mbps(size, sd),
                &format!("S3Store::read_chunk alone, {FETCH_PARALLEL} threads"),
                mbps(size, get),
                true,
            ));
            rows.push(Row::new(
                format!("full update {mib} MiB, S3 store on Ceph RGW (MB/s)"),
                mbps(size, su),
                &format!("S3Store::put_chunk alone, {UPLOAD_PARALLEL} threads"),
                mbps(size, put),
                true,
            ));
        }
        Err(e) => rows.push(Row::text("S3 store alone", format!("failed: {e}"), "", "")),
    }
    rows
}
