//! The real `uve-host` daemon as a child process: started on a data
//! directory with a configuration the kit writes, driven through `uvectl`,
//! restartable on the same data, and killed (by PID) on drop. The e2e
//! scenarios, the demo and the benchmarks use it as is; the host's own
//! integration tests add their API-client calls on top (the kit does not
//! link the host crate).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::ingredients::Ingredients;
use crate::poll;
use crate::process::{self, Daemon};

/// How many log lines a failure message quotes.
const LOG_TAIL: usize = 60;

/// How long the daemon may take to serve its API after a start.
pub const UP_LIMIT: Duration = Duration::from_secs(20);

/// Defaults of the e2e scenarios: a 1 s heartbeat and a short hand-over.
pub const SCENARIO_DEFAULTS: &[&str] = &["heartbeat_ms = 1000", "handover_timeout_ms = 15000"];

/// Where a daemon keeps its data, configuration and log, and what its
/// configuration holds.
#[derive(Debug, Clone)]
pub struct HostSpec {
    /// The `uve-host` binary.
    pub host_bin: PathBuf,
    /// The `uvectl` binary.
    pub uvectl: PathBuf,
    /// Data directory (`data_dir`; the API socket is `<data>/api.sock`).
    pub data: PathBuf,
    /// Configuration file the kit writes.
    pub config: PathBuf,
    /// Log file (stdout and stderr, appended).
    pub log: PathBuf,
    /// `key = value` lines written unless `extra` sets the key itself.
    pub defaults: Vec<String>,
    /// More configuration: top-level keys first, then any tables.
    pub extra: String,
}

impl HostSpec {
    /// A scenario host under `dir`: data in `<dir>/host-data`, config
    /// `<dir>/host.toml`, log `<dir>/host.log`, [`SCENARIO_DEFAULTS`].
    pub fn scenario(host_bin: &Path, uvectl: &Path, dir: &Path, extra: &str) -> Self {
        HostSpec {
            host_bin: host_bin.to_path_buf(),
            uvectl: uvectl.to_path_buf(),
            data: dir.join("host-data"),
            config: dir.join("host.toml"),
            log: dir.join("host.log"),
            defaults: SCENARIO_DEFAULTS.iter().map(|l| (*l).to_string()).collect(),
            extra: extra.into(),
        }
    }

    /// The configuration text: `data_dir`, the defaults `extra` leaves
    /// unset, then `extra`.
    pub fn config_text(&self) -> String {
        let mut text = format!("data_dir = \"{}\"\n", self.data.display());
        for line in &self.defaults {
            let key = line.split('=').next().unwrap_or_default().trim();
            if !self.extra.contains(key) {
                text.push_str(line);
                text.push('\n');
            }
        }
        text.push_str(&self.extra);
        text.push('\n');
        text
    }
}

/// A running host daemon.
pub struct HostDaemon {
    host_bin: PathBuf,
    uvectl: PathBuf,
    /// Data directory.
    pub data: PathBuf,
    /// Daemon log file.
    pub log: PathBuf,
    /// Its configuration file.
    pub config: PathBuf,
    daemon: Daemon,
}

impl HostDaemon {
    /// Starts a scenario daemon ([`HostSpec::scenario`]) of the cached
    /// ingredients under `dir`.
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
        let mut h = Self::prepare(&HostSpec::scenario(host_bin, uvectl, dir, extra_config))?;
        h.spawn()?;
        Ok(h)
    }

    /// Writes the configuration of `spec`; the daemon is not started yet
    /// ([`spawn`](Self::spawn) or [`spawn_detached`](Self::spawn_detached)).
    pub fn prepare(spec: &HostSpec) -> Result<Self, String> {
        for bin in [&spec.host_bin, &spec.uvectl] {
            if !bin.exists() {
                return Err(format!(
                    "missing {}; build it (cargo build --release -p uve-host)",
                    bin.display()
                ));
            }
        }
        std::fs::create_dir_all(&spec.data).map_err(|e| format!("data dir: {e}"))?;
        std::fs::write(&spec.config, spec.config_text()).map_err(|e| format!("config: {e}"))?;
        Ok(HostDaemon {
            host_bin: spec.host_bin.clone(),
            uvectl: spec.uvectl.clone(),
            data: spec.data.clone(),
            log: spec.log.clone(),
            config: spec.config.clone(),
            daemon: Daemon::default(),
        })
    }

    /// Starts the process without waiting for its API.
    pub fn spawn_detached(&mut self) -> Result<(), String> {
        let mut cmd = Command::new(&self.host_bin);
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config)
            .env("UVE_LOG", "info");
        self.daemon.spawn(&mut cmd, &self.log)
    }

    /// Starts the process and waits (up to [`UP_LIMIT`]) until `uvectl`
    /// gets an answer from its API.
    pub fn spawn(&mut self) -> Result<(), String> {
        self.spawn_detached()?;
        if poll::wait_for(UP_LIMIT, || self.is_up()) {
            Ok(())
        } else {
            Err(format!("uve-host API not up; log:\n{}", self.log_text()))
        }
    }

    /// Whether the API socket exists and answers `uvectl vm list`.
    pub fn is_up(&self) -> bool {
        self.api_socket().exists() && self.uvectl(&["vm", "list"]).0 == 0
    }

    /// Stops the daemon with SIGTERM (graceful) or SIGKILL, then waits.
    pub fn stop(&mut self, graceful: bool) {
        if graceful {
            let _ = self.daemon.terminate();
        } else {
            self.daemon.kill();
        }
    }

    /// SIGKILL, no cleanup.
    pub fn kill(&mut self) {
        self.daemon.kill();
    }

    /// SIGTERM and wait (SIGKILL after [`process::TERM_LIMIT`]); returns
    /// the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        self.daemon.terminate()
    }

    /// Restarts on the same data directory and configuration.
    pub fn restart(&mut self, graceful: bool) -> Result<(), String> {
        self.stop(graceful);
        self.spawn()
    }

    fn uvectl_cmd(&self) -> Command {
        let mut cmd = Command::new(&self.uvectl);
        cmd.arg("--socket").arg(self.api_socket());
        cmd
    }

    /// Runs `uvectl --json <args>`; returns exit code and stdout (stderr is
    /// appended after a marker when non-empty).
    pub fn uvectl(&self, args: &[&str]) -> (i32, String) {
        match self.uvectl_cmd().arg("--json").args(args).output() {
            Ok(o) => process::said(&o, "\n--- stderr ---\n"),
            Err(e) => (-1, e.to_string()),
        }
    }

    /// Runs `uvectl <args>` in its human (table) format.
    pub fn uvectl_human(&self, args: &[&str]) -> String {
        self.uvectl_cmd()
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_else(|e| e.to_string())
    }

    /// Runs `uvectl <args>` as given (no `--json` added): its exit status
    /// and output.
    pub fn uvectl_output(&self, args: &[&str]) -> std::io::Result<std::process::Output> {
        self.uvectl_cmd().args(args).output()
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

    /// Whether `uvectl vm show <vm>` reports the VM connected.
    pub fn is_connected(&self, vm: &str) -> bool {
        shows_connected(&self.uvectl(&["vm", "show", vm]).1)
    }

    /// Waits up to `limit` until [`is_connected`](Self::is_connected).
    pub fn wait_connected(&self, vm: &str, limit: Duration) -> bool {
        poll::wait_for(limit, || self.is_connected(vm))
    }

    /// Like [`wait_connected`](Self::wait_connected); panics, quoting the
    /// log, if `vm` is not connected within `limit`.
    pub fn must_connect(&self, vm: &str, limit: Duration) {
        assert!(
            self.wait_connected(vm, limit),
            "{vm} never connected; host log:\n{}",
            self.log_tail()
        );
    }

    /// Registers VM `vm` whose VMM socket is `uds` (`uvectl vm add`); the
    /// host then listens on `<uds>_7075`.
    pub fn add_vm(&self, vm: &str, uds: &Path) {
        self.ok(&["vm", "add", vm, "--uds-path", &uds.display().to_string()]);
    }

    /// Imports `file` as a new version of `user` (`uvectl import`).
    pub fn import(&self, user: &str, file: &Path) {
        self.ok(&["import", user, &file.display().to_string()]);
    }

    /// The head version of `user` (panics if there is none).
    pub fn head(&self, user: &str) -> u64 {
        match self.ok(&["versions", user])["head"].as_u64() {
            Some(v) => v,
            None => panic!("{user} has no head version"),
        }
    }

    /// Events after `since`, as JSON objects.
    pub fn events(&self, since: u64) -> Vec<serde_json::Value> {
        let (code, out) = self.uvectl(&["events", "--since", &since.to_string()]);
        assert_eq!(code, 0, "uvectl events: {out}");
        parse_events(&out)
    }

    /// Waits until an event of `kind` after `since` satisfies `pred`.
    pub fn wait_event(
        &self,
        since: u64,
        kind: &str,
        limit: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let found = poll::until(limit, || find_event(self.events(since), kind, &pred));
        match found {
            Some(e) => e,
            None => panic!(
                "no `{kind}` event within {limit:?}; events: {:#?}\nhost log tail:\n{}",
                self.events(since),
                self.log_tail()
            ),
        }
    }

    /// The highest event sequence number so far (0 if none).
    pub fn last_seq(&self) -> u64 {
        last_seq(&self.events(0))
    }

    /// A Prometheus counter (first sample whose line starts with `name`).
    pub fn metric(&self, name: &str) -> u64 {
        let (code, out) = self
            .uvectl_cmd()
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
        metric_in(&out, name)
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
        self.daemon.pid()
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
        process::tail(&self.log, LOG_TAIL)
    }
}

/// The events in what `uvectl --json events` printed: one JSON object a
/// line; anything after the kit's stderr marker is ignored.
pub fn parse_events(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .take_while(|l| !l.starts_with("--- stderr"))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The first event of `kind` among `events` that satisfies `pred`.
pub fn find_event(
    events: Vec<serde_json::Value>,
    kind: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Option<serde_json::Value> {
    events.into_iter().find(|e| e["kind"] == kind && pred(e))
}

/// The highest sequence number among `events` (0 if none).
pub fn last_seq(events: &[serde_json::Value]) -> u64 {
    events
        .iter()
        .filter_map(|e| e["seq"].as_u64())
        .max()
        .unwrap_or(0)
}

/// The value of the Prometheus sample `name` (the first line that starts
/// with `name` and a space) in what `uvectl metrics` printed; 0 if absent.
pub fn metric_in(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
}

/// Whether what `uvectl --json vm show` printed says the VM is connected.
pub fn shows_connected(out: &str) -> bool {
    out.contains("\"connected\":true")
}
