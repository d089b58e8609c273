//! The S3 store benchmark (`uve-bench s3`): cold retrieve and full update
//! of the same UIF through a `uve-host` whose store is a real Ceph RGW on
//! 127.0.0.1 (started with `tests/s3/rgw.sh`), next to the same through a
//! `uve-host` on the local store, in the same run. Not part of `all`: it
//! needs Ceph (`apt install radosgw ceph-mon ceph-osd uuid-runtime`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::rig::Rig;
use crate::{Row, data};

/// A single-node Ceph RGW, stopped (by PID, via the script) on drop.
struct Rgw {
    dir: PathBuf,
    env: HashMap<String, String>,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/s3/rgw.sh")
}

impl Rgw {
    fn start(dir: &Path) -> Result<Rgw, String> {
        let out = Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(dir)
            .output()
            .map_err(|e| format!("run rgw.sh: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "rgw.sh start failed (is Ceph installed?): {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let env = std::fs::read_to_string(dir.join("env"))
            .map_err(|e| format!("rgw env: {e}"))?
            .lines()
            .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Ok(Rgw {
            dir: dir.to_path_buf(),
            env,
        })
    }

    fn toml(&self, prefix: &str) -> String {
        let get = |k: &str| self.env.get(k).cloned().unwrap_or_default();
        format!(
            "[s3]\nendpoint = {:?}\nbucket = {:?}\nprefix = {prefix:?}\nregion = \"us-east-1\"\n\
             access_key_id = {:?}\nsecret_access_key = {:?}\n",
            get("AWS_ENDPOINT_URL"),
            get("UVE_S3_BUCKET"),
            get("AWS_ACCESS_KEY_ID"),
            get("AWS_SECRET_ACCESS_KEY"),
        )
    }
}

impl Drop for Rgw {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
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
    vec![
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
    ]
}
