//! Transfer benchmark: cold retrieve and full update of one UIF between
//! the real binaries, next to a raw byte copy of the same file over the
//! same kind of socket into the same directory with the same fsync,
//! measured in the same run.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::Row;
use crate::data;
use crate::rig::Rig;
use crate::sys;

/// Copies `src` through a Unix socket into `dst` (fsynced), as a minimal
/// copy loop with 1 MiB buffers would; returns the wall time.
pub fn raw_copy(src: &Path, dst: &Path, sock: &Path) -> std::io::Result<Duration> {
    let _ = std::fs::remove_file(sock);
    let l = UnixListener::bind(sock)?;
    let dst = dst.to_path_buf();
    let t = Instant::now();
    let rx = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = l.accept()?;
        let mut f = std::fs::File::create(&dst)?;
        pump(&mut s, &mut f)?;
        f.sync_all()
    });
    let mut s = UnixStream::connect(sock)?;
    pump(&mut std::fs::File::open(src)?, &mut s)?;
    drop(s);
    rx.join()
        .map_err(|_| std::io::Error::other("copy thread panicked"))??;
    let _ = std::fs::remove_file(sock);
    Ok(t.elapsed())
}

/// Copies everything `from` holds into `to`, 1 MiB at a time.
fn pump(from: &mut impl Read, to: &mut impl Write) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        to.write_all(&buf[..n])?;
    }
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

/// The row of `what` moving `size` bytes in `ours`, in MB/s, next to the
/// raw copy of the same bytes in `raw`.
fn versus_raw_copy(what: &str, size: usize, ours: Duration, raw: Duration) -> Row {
    Row::new(
        format!("{what} {} MiB (MB/s)", size >> 20),
        mbps(size as u64, ours),
        "raw socket copy + fsync",
        mbps(size as u64, raw),
        true,
    )
}

/// Runs the transfer benchmark on a `size`-byte UIF; returns table rows
/// and the agent's peak RSS after the flush (KiB).
pub fn run(rig: &Rig, work: &Path, size: usize) -> (Vec<Row>, Option<u64>) {
    let mut rows = Vec::new();
    let src = work.join("uif-a.img");
    data::write_file(&src, &data::random(size, 11)).expect("write source");
    rig.import("u-transfer", &src);

    // Cold retrieve vs raw copy host → agent directory.
    let raw_down =
        raw_copy(&src, &work.join("vm/raw-down.img"), &work.join("raw.sock")).expect("raw copy");
    let out0 = rig.metric("uve_bytes_out_total");
    let cold = rig.login("u-transfer", "t1");
    let sent = rig.metric("uve_bytes_out_total") - out0;
    assert_eq!(
        std::fs::metadata(rig.uif("u-transfer"))
            .map(|m| m.len())
            .ok(),
        Some(size as u64)
    );
    rows.push(versus_raw_copy("cold retrieve", size, cold, raw_down));
    eprintln!("  cold retrieve: {cold:?} ({sent} chunk bytes); raw copy {raw_down:?}");

    // Full update (every chunk new) vs raw copy agent → host directory.
    let new = data::random(size, 12);
    data::write_file(&rig.uif("u-transfer"), &new).expect("rewrite UIF");
    let src_b = work.join("uif-b.img");
    data::write_file(&src_b, &new).expect("write copy source");
    let raw_up = raw_copy(
        &src_b,
        &work.join("host-data/raw-up.img"),
        &work.join("raw.sock"),
    )
    .expect("raw copy");
    let in0 = rig.metric("uve_bytes_in_total");
    let up = rig.logout("t1");
    let received = rig.metric("uve_bytes_in_total") - in0;
    let flush_hwm = rig.agent.pid().and_then(|p| sys::status_kib(p, "VmHWM"));
    rows.push(versus_raw_copy("full update", size, up, raw_up));
    eprintln!(
        "  full update: {up:?} ({received} chunk bytes); raw copy {raw_up:?}; agent VmHWM {flush_hwm:?} KiB"
    );
    let _ = std::fs::remove_file(work.join("vm/raw-down.img"));
    let _ = std::fs::remove_file(work.join("host-data/raw-up.img"));
    let _ = std::fs::remove_file(&src_b);
    (rows, flush_hwm)
}
