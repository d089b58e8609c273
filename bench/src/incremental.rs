//! Incremental update and warm login: our update of a UIF with small
//! changes vs `rsync` (daemon on loopback, default delta algorithm, with
//! `--fsync`) doing the same update of the same files in the same run; and
//! a warm login (the VM's cache holds the previous version) vs the cold
//! one. Bytes are counted on the wire (a proxy between agent and host sees
//! every frame); rsync's come from its `--stats`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::Row;
use crate::data::{self, Edit};
use crate::rig::{Rig, Wire};

/// An rsync daemon on 127.0.0.1, killed on drop.
struct Rsyncd {
    child: Child,
    port: u16,
    module: PathBuf,
}

impl Rsyncd {
    fn start(dir: &Path) -> Result<Self, String> {
        let module = dir.join("rsync-module");
        std::fs::create_dir_all(&module).map_err(|e| e.to_string())?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let conf = dir.join("rsyncd.conf");
        std::fs::write(
            &conf,
            format!(
                "use chroot = false\nlog file = {}/rsyncd.log\n[m]\npath = {}\nread only = false\nuid = root\ngid = root\n",
                dir.display(),
                module.display()
            ),
        )
        .map_err(|e| e.to_string())?;
        let child = Command::new("rsync")
            .args(["--daemon", "--no-detach", "--address=127.0.0.1"])
            .arg(format!("--port={port}"))
            .arg(format!("--config={}", conf.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("rsync --daemon: {e} (is rsync installed?)"))?;
        let up = uve_e2e::poll::wait_for(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        if !up {
            return Err("rsync daemon did not start".into());
        }
        Ok(Rsyncd {
            child,
            port,
            module,
        })
    }

    /// Pushes `src` over the module's `uif.img`; returns (time, bytes sent
    /// by the client, bytes received by the client).
    fn push(&self, src: &Path) -> Result<(Duration, u64, u64), String> {
        let t = Instant::now();
        let out = Command::new("rsync")
            .args(["--stats", "--fsync", "--no-whole-file", "--ignore-times"])
            .arg(src)
            .arg(format!("rsync://127.0.0.1:{}/m/uif.img", self.port))
            .output()
            .map_err(|e| e.to_string())?;
        let took = t.elapsed();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(format!(
                "rsync failed: {}{}",
                text,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let num = |key: &str| -> u64 {
            text.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l[key.len()..].split_whitespace().next())
                .map(|v| v.replace(',', ""))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Ok((took, num("Total bytes sent:"), num("Total bytes received:")))
    }
}

impl Drop for Rsyncd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pct(part: u64, whole: usize) -> f64 {
    part as f64 * 100.0 / whole as f64
}

/// What every edit round measures against: the base version and the cold
/// login that fetched it.
struct Baseline<'a> {
    rig: &'a Rig,
    wire: &'a Wire,
    work: &'a Path,
    size: usize,
    base: Vec<u8>,
    base_file: PathBuf,
    cold: Duration,
    cold_bytes: u64,
}

/// Imports a `size`-byte base version and logs in cold; returns the baseline
/// and its row.
fn cold_login<'a>(
    rig: &'a Rig,
    wire: &'a Wire,
    work: &'a Path,
    size: usize,
) -> (Baseline<'a>, Row) {
    let base = data::random(size, 21);
    let base_file = work.join("inc-base.img");
    data::write_file(&base_file, &base).expect("base");
    rig.import("u-inc", &base_file);

    let (_, d0) = wire.get();
    let cold = rig.login("u-inc", "i0");
    let (_, d1) = wire.get();
    let cold_bytes = d1 - d0;
    rig.logout_unchanged("i0");
    let row = Row::info(
        format!("cold login {} MiB: time / bytes on the wire", size >> 20),
        cold,
        cold_bytes,
    );
    let baseline = Baseline {
        rig,
        wire,
        work,
        size,
        base,
        base_file,
        cold,
        cold_bytes,
    };
    (baseline, row)
}

/// Our update of `base` to `variant` (written to `vfile`) in session `i{n}`,
/// and rsync's of the same files; pushes their rows.
fn update_round(
    b: &Baseline<'_>,
    rsyncd: Option<&Rsyncd>,
    n: usize,
    edit: &Edit,
    variant: &[u8],
    vfile: &Path,
    rows: &mut Vec<Row>,
) {
    let (rig, wire, size) = (b.rig, b.wire, b.size);
    // Our update: the agent holds `base`, the user changed it to `variant`.
    let s = format!("i{n}");
    rig.login("u-inc", &s);
    data::write_file(&rig.uif("u-inc"), variant).expect("write UIF");
    let (u0, _) = wire.get();
    let ours = rig.logout(&s);
    let (u1, _) = wire.get();
    let our_bytes = u1 - u0;

    // rsync: the daemon holds `base`, the client pushes `variant`.
    let theirs = rsyncd.map(|r| {
        std::fs::copy(&b.base_file, r.module.join("uif.img")).expect("reset rsync copy");
        r.push(vfile).expect("rsync push")
    });
    let label = edit.label();
    match theirs {
        Some((t, sent, _)) => {
            rows.push(Row::new(
                format!("update, {label}: time (s)"),
                ours.as_secs_f64(),
                "rsync daemon, loopback",
                t.as_secs_f64(),
                false,
            ));
            rows.push(Row::new(
                format!("update, {label}: % of UIF sent"),
                pct(our_bytes, size),
                "rsync daemon, loopback",
                pct(sent, size),
                false,
            ));
        }
        None => rows.push(Row::info(
            format!("update, {label}: time / bytes"),
            ours,
            our_bytes,
        )),
    }
    eprintln!("  update {label}: {ours:?}, {our_bytes} B up; rsync {theirs:?}");
}

/// Warm login in session `w{n}`: the host's head goes back to `base`
/// (changed elsewhere); the agent's cache holds the variant. Pushes its rows.
fn warm_round(b: &Baseline<'_>, n: usize, edit: &Edit, rows: &mut Vec<Row>) {
    let (rig, wire, size) = (b.rig, b.wire, b.size);
    let label = edit.label();
    rig.host
        .ok(&["import", "u-inc", &b.base_file.display().to_string()]);
    let s = format!("w{n}");
    let (_, d0) = wire.get();
    let warm = rig.login("u-inc", &s);
    let (_, d1) = wire.get();
    assert!(
        std::fs::read(rig.uif("u-inc")).expect("read UIF") == b.base,
        "warm login did not restore the base version"
    );
    rig.logout_unchanged(&s);
    rows.push(Row::new(
        format!("warm login after {label}: time (s)"),
        warm.as_secs_f64(),
        "cold login",
        b.cold.as_secs_f64(),
        false,
    ));
    rows.push(Row::new(
        format!("warm login after {label}: % of UIF fetched"),
        pct(d1 - d0, size),
        "cold login",
        pct(b.cold_bytes, size),
        false,
    ));
}

/// Runs the incremental and warm-login benchmarks on a `size`-byte UIF.
pub fn run(rig: &Rig, work: &Path, size: usize) -> Vec<Row> {
    let wire = rig
        .wire
        .as_ref()
        .expect("incremental benchmark needs the counting proxy");
    let (b, cold_row) = cold_login(rig, wire, work, size);
    let mut rows = vec![cold_row];

    let rsyncd = match Rsyncd::start(work) {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("  rsync baseline skipped: {e}");
            None
        }
    };
    for (i, edit) in [
        Edit::Scattered { block: 64 * 1024 },
        Edit::Scattered { block: 4096 },
        Edit::Insert { len: 4096 },
    ]
    .into_iter()
    .enumerate()
    {
        let variant = edit.apply(&b.base, 100 + i as u64);
        let vfile = b.work.join("inc-variant.img");
        data::write_file(&vfile, &variant).expect("variant");
        update_round(
            &b,
            rsyncd.as_ref(),
            i + 1,
            &edit,
            &variant,
            &vfile,
            &mut rows,
        );
        warm_round(&b, i + 1, &edit, &mut rows);
    }
    let _ = std::fs::remove_file(work.join("inc-variant.img"));
    rows
}
