//! A real Ceph RGW for the S3 store tests: `tests/s3/rgw.sh` starts a
//! single-node Ceph (mon + osd + radosgw) on 127.0.0.1 in a temporary
//! folder with bucket `uve-test`; drop stops it by PID and removes the folder.
//! Without Ceph installed the tests say "skipped" unless `S3_REQUIRE=1`
//! (CI sets it), which turns a missing Ceph into a failure.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

use uve_host::config::S3Config;

/// A running single-node Ceph with RGW.
pub struct Rgw {
    dir: PathBuf,
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    /// Access key id.
    pub key: String,
    /// Secret key.
    pub secret: String,
    /// The test bucket.
    pub bucket: String,
}

fn script() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/s3/rgw.sh"))
}

impl Rgw {
    /// Starts Ceph; `None` (test skipped) when it is not installed and
    /// `S3_REQUIRE` is not `1`.
    pub fn start(label: &str) -> Option<Rgw> {
        let installed = ["radosgw", "ceph-mon", "ceph-osd"].iter().all(|b| {
            Command::new("sh")
                .args(["-c", &format!("command -v {b}")])
                .output()
                .is_ok_and(|o| o.status.success())
        });
        if !installed {
            assert!(
                std::env::var("S3_REQUIRE").as_deref() != Ok("1"),
                "S3_REQUIRE=1 but Ceph (radosgw ceph-mon ceph-osd) is not installed"
            );
            eprintln!("skipped: Ceph is not installed (apt install radosgw ceph-mon ceph-osd)");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("uve-rgw-{label}-{}", std::process::id()));
        let out = Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(&dir)
            .output()
            .expect("run rgw.sh");
        assert!(
            out.status.success(),
            "rgw.sh start failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let env: HashMap<String, String> = std::fs::read_to_string(dir.join("env"))
            .expect("rgw env file")
            .lines()
            .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Some(Rgw {
            endpoint: env["AWS_ENDPOINT_URL"].clone(),
            key: env["AWS_ACCESS_KEY_ID"].clone(),
            secret: env["AWS_SECRET_ACCESS_KEY"].clone(),
            bucket: env["UVE_S3_BUCKET"].clone(),
            dir,
        })
    }

    /// Store configuration for keys under `prefix`.
    pub fn config(&self, prefix: &str) -> S3Config {
        S3Config {
            endpoint: Some(self.endpoint.clone()),
            region: Some("us-east-1".into()),
            bucket: self.bucket.clone(),
            prefix: prefix.into(),
            access_key_id: Some(self.key.clone()),
            secret_access_key: Some(self.secret.clone()),
            ..S3Config::default()
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
    }
}
