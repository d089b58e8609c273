//! A real Ceph RGW on 127.0.0.1 for the S3 store tests and benchmark:
//! `tests/s3/rgw.sh` starts a single-node Ceph (mon + osd + radosgw) in a
//! folder with the bucket `uve-test`; dropping the [`Rgw`] stops it by PID
//! (through the same script) and removes the folder. The daemons run in a
//! [`ProcessTree`], so they die with the test even if the script's stop
//! does not run (a panic before the `Rgw` exists, a killed test process).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::tree::ProcessTree;

/// A running single-node Ceph with RGW.
pub struct Rgw {
    dir: PathBuf,
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    /// Access key id.
    pub key: String,
    /// Secret access key.
    pub secret: String,
    /// The bucket the script created.
    pub bucket: String,
    /// The script and every daemon it started.
    tree: ProcessTree,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("s3/rgw.sh")
}

/// Whether the Ceph daemons the script needs are installed.
pub fn installed() -> bool {
    ["radosgw", "ceph-mon", "ceph-osd"].iter().all(|b| {
        Command::new("sh")
            .args(["-c", &format!("command -v {b}")])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

impl Rgw {
    /// Starts Ceph in `dir` (created by the script; removed on drop).
    pub fn start(dir: &Path) -> Result<Rgw, String> {
        let mut tree = ProcessTree::new("rgw");
        let mut cmd = Command::new("bash");
        cmd.arg(script())
            .arg("start")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        tree.adopt(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|e| format!("run {}: {e}", script().display()))?;
        tree.started(child.id());
        let out = child
            .wait_with_output()
            .map_err(|e| format!("run {}: {e}", script().display()))?;
        // From here on the folder may hold running daemons: stop them if
        // anything below fails.
        let mut rgw = Rgw {
            dir: dir.to_path_buf(),
            endpoint: String::new(),
            key: String::new(),
            secret: String::new(),
            bucket: String::new(),
            tree,
        };
        if !out.status.success() {
            return Err(format!(
                "rgw.sh start failed (is Ceph installed?):\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let env: HashMap<String, String> = std::fs::read_to_string(dir.join("env"))
            .map_err(|e| format!("rgw env file: {e}"))?
            .lines()
            .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let get = |k: &str| {
            env.get(k)
                .cloned()
                .ok_or_else(|| format!("rgw env file lacks {k}"))
        };
        rgw.endpoint = get("AWS_ENDPOINT_URL")?;
        rgw.key = get("AWS_ACCESS_KEY_ID")?;
        rgw.secret = get("AWS_SECRET_ACCESS_KEY")?;
        rgw.bucket = get("UVE_S3_BUCKET")?;
        Ok(rgw)
    }

    /// For tests: starts Ceph in a temporary folder named after `label`, or
    /// returns `None` (test skipped, with a message) when Ceph is not
    /// installed — unless `S3_REQUIRE=1` (CI), which makes that a failure.
    pub fn start_for_test(label: &str) -> Option<Rgw> {
        if !installed() {
            assert!(
                std::env::var("S3_REQUIRE").as_deref() != Ok("1"),
                "S3_REQUIRE=1 but Ceph (radosgw ceph-mon ceph-osd) is not installed"
            );
            eprintln!("skipped: Ceph is not installed (apt install radosgw ceph-mon ceph-osd)");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("uve-rgw-{label}-{}", std::process::id()));
        match Rgw::start(&dir) {
            Ok(rgw) => Some(rgw),
            Err(e) => panic!("{e}"),
        }
    }

    /// The `[s3]` section of a `host.toml` for keys under `prefix`.
    pub fn toml(&self, prefix: &str) -> String {
        format!(
            "[s3]\nendpoint = {:?}\nregion = \"us-east-1\"\nbucket = {:?}\nprefix = {:?}\n\
             access_key_id = {:?}\nsecret_access_key = {:?}\n",
            self.endpoint, self.bucket, prefix, self.key, self.secret
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
        // Whatever the script did not stop (or could not: a daemon that
        // hung) dies with the tree.
        self.tree.kill_all();
    }
}
