//! The real `uve-host` daemon for a scenario: started on a fresh data
//! directory, driven through `uvectl`, restartable on the same data, and
//! killed (by PID) on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::ingredients::Ingredients;
use crate::vm::wait_for;

/// A running host daemon.
pub struct HostDaemon {
    host_bin: PathBuf,
    uvectl: PathBuf,
    /// Data directory.
    pub data: PathBuf,
    /// Daemon log file.
    pub log: PathBuf,
    config: PathBuf,
    child: Option<Child>,
}

impl HostDaemon {
    /// Starts a daemon with `heartbeat_ms` and a short hand-over timeout,
    /// logging to `<dir>/host.log`.
    pub fn start(ing: &Ingredients, dir: &Path, extra_config: &str) -> Result<Self, String> {
        Self::start_with(&ing.host, &ing.uvectl, dir, extra_config)
    }

    /// Like [`start`](Self::start) with explicit binary paths.
    pub fn start_with(
        host_bin: &Path,
        uvectl: &Path,
        dir: &Path,
        extra_config: &str,
    ) -> Result<Self, String> {
        for bin in [host_bin, uvectl] {
            if !bin.exists() {
                return Err(format!(
                    "missing {}; build it (cargo build --release -p uve-host)",
                    bin.display()
                ));
            }
        }
        let data = dir.join("host-data");
        std::fs::create_dir_all(&data).map_err(|e| format!("data dir: {e}"))?;
        let config = dir.join("host.toml");
        std::fs::write(&config, {
            // Scenario defaults, unless `extra_config` sets the key itself;
            // top-level keys first, so `extra_config` may end in a table.
            let mut text = format!("data_dir = \"{}\"\n", data.display());
            for (key, line) in [
                ("heartbeat_ms", "heartbeat_ms = 1000"),
                ("handover_timeout_ms", "handover_timeout_ms = 15000"),
            ] {
                if !extra_config.contains(key) {
                    text.push_str(line);
                    text.push('\n');
                }
            }
            text.push_str(extra_config);
            text.push('\n');
            text
        })
        .map_err(|e| format!("config: {e}"))?;
        let mut h = HostDaemon {
            host_bin: host_bin.to_path_buf(),
            uvectl: uvectl.to_path_buf(),
            data,
            log: dir.join("host.log"),
            config,
            child: None,
        };
        h.spawn()?;
        Ok(h)
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("host log: {e}"))?;
        let err = log.try_clone().map_err(|e| format!("host log: {e}"))?;
        let child = Command::new(&self.host_bin)
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .env("UVE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("start uve-host: {e}"))?;
        self.child = Some(child);
        let sock = self.data.join("api.sock");
        if !wait_for(Duration::from_secs(20), || {
            sock.exists() && self.uvectl(&["vm", "list"]).0 == 0
        }) {
            return Err(format!("uve-host API not up; log:\n{}", self.log_text()));
        }
        Ok(())
    }

    /// Stops the daemon with SIGTERM (graceful) or SIGKILL, then waits.
    pub fn stop(&mut self, graceful: bool) {
        if let Some(mut c) = self.child.take() {
            if graceful {
                if let Ok(pid) = i32::try_from(c.id()) {
                    // SAFETY: kill(2) has no memory effects; the PID is our own
                    // child, not yet reaped, so it cannot name another process.
                    let _ = unsafe { libc::kill(pid, libc::SIGTERM) };
                }
                if !wait_for(Duration::from_secs(40), || {
                    matches!(c.try_wait(), Ok(Some(_)))
                }) {
                    let _ = c.kill();
                }
            } else {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }

    /// Restarts on the same data directory and configuration.
    pub fn restart(&mut self, graceful: bool) -> Result<(), String> {
        self.stop(graceful);
        self.spawn()
    }

    /// Runs `uvectl --json <args>`; returns exit code and stdout (stderr is
    /// appended after a marker when non-empty).
    pub fn uvectl(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(&self.uvectl)
            .arg("--socket")
            .arg(self.data.join("api.sock"))
            .arg("--json")
            .args(args)
            .output();
        match out {
            Ok(o) => {
                let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
                if !o.stderr.is_empty() {
                    s.push_str("\n--- stderr ---\n");
                    s.push_str(&String::from_utf8_lossy(&o.stderr));
                }
                (o.status.code().unwrap_or(-1), s)
            }
            Err(e) => (-1, e.to_string()),
        }
    }

    /// Runs `uvectl <args>` in its human (table) format.
    pub fn uvectl_human(&self, args: &[&str]) -> String {
        Command::new(&self.uvectl)
            .arg("--socket")
            .arg(self.data.join("api.sock"))
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_else(|e| e.to_string())
    }

    /// Runs a `uvectl` command that must succeed; returns its JSON output.
    pub fn ok(&self, args: &[&str]) -> serde_json::Value {
        let (code, out) = self.uvectl(args);
        assert_eq!(
            code,
            0,
            "uvectl {args:?} exited {code}:\n{out}\nhost log tail:\n{}",
            self.log_tail()
        );
        serde_json::from_str(out.trim()).unwrap_or(serde_json::Value::String(out))
    }

    /// Events after `since`, as JSON objects.
    pub fn events(&self, since: u64) -> Vec<serde_json::Value> {
        let (code, out) = self.uvectl(&["events", "--since", &since.to_string()]);
        assert_eq!(code, 0, "uvectl events: {out}");
        out.lines()
            .take_while(|l| !l.starts_with("--- stderr"))
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits until an event of `kind` after `since` satisfies `pred`.
    pub fn wait_event(
        &self,
        since: u64,
        kind: &str,
        limit: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let mut found = None;
        let ok = wait_for(limit, || {
            found = self
                .events(since)
                .into_iter()
                .find(|e| e["kind"] == kind && pred(e));
            found.is_some()
        });
        assert!(
            ok,
            "no `{kind}` event within {limit:?}; events: {:#?}\nhost log tail:\n{}",
            self.events(since),
            self.log_tail()
        );
        found.unwrap_or_default()
    }

    /// The highest event sequence number so far (0 if none).
    pub fn last_seq(&self) -> u64 {
        self.events(0)
            .iter()
            .filter_map(|e| e["seq"].as_u64())
            .max()
            .unwrap_or(0)
    }

    /// A Prometheus counter (first sample whose line starts with `name`).
    pub fn metric(&self, name: &str) -> u64 {
        let (code, out) = Command::new(&self.uvectl)
            .arg("--socket")
            .arg(self.data.join("api.sock"))
            .arg("metrics")
            .output()
            .map(|o| {
                (
                    o.status.code().unwrap_or(-1),
                    String::from_utf8_lossy(&o.stdout).into_owned(),
                )
            })
            .unwrap_or((-1, String::new()));
        assert_eq!(code, 0, "uvectl metrics failed");
        out.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    }

    /// Exports a version's bytes.
    pub fn export(&self, user: &str, version: u64, dir: &Path) -> Vec<u8> {
        let out = dir.join(format!("export-{user}-{version}"));
        let o = out.display().to_string();
        self.ok(&["export", user, &version.to_string(), "-o", &o]);
        std::fs::read(&out).unwrap_or_default()
    }

    /// The daemon's PID (while running).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The daemon's API socket.
    pub fn api_socket(&self) -> PathBuf {
        self.data.join("api.sock")
    }

    /// The daemon log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last 60 lines of the daemon log.
    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }
}

impl Drop for HostDaemon {
    fn drop(&mut self) {
        self.stop(false);
    }
}
