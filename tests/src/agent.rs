//! A real `uve-agent` process on this machine, playing a VM: it dials a
//! host endpoint directly (what the VMM would do for a guest: the real
//! host's hybrid-vsock path `<uds>_7075`, or a [`crate::fake_host`]), keeps
//! its state, control socket, configuration and log in a directory of its
//! own, and is driven through its CLI verbs. Used by the agent's own
//! integration tests, the e2e suites without QEMU, the demo and the
//! benchmarks. Killed (by PID) on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::poll::{self, LONG};
use crate::process::{self, Daemon};

/// How many log lines a failure message quotes.
const LOG_TAIL: usize = 40;

/// What to start: the binary, the host it dials and its configuration.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    /// The `uve-agent` binary.
    pub bin: PathBuf,
    /// The host endpoint it dials (e.g. `unix:/x/v.sock_7075`).
    pub host: String,
    /// TOML after the keys the kit sets (`host`, `state_dir`,
    /// `control_socket`): top-level keys first, then tables like `[uif]`.
    pub config: String,
    /// Extra environment of the daemon (e.g. `UVE_AGENT_FAULTS`).
    pub env: Vec<(String, String)>,
    /// Its `UVE_LOG` filter.
    pub log_level: String,
}

impl AgentSpec {
    /// `bin` dialing `host` with `config`, no extra environment, logging
    /// at `info`.
    pub fn new(bin: &Path, host: &str, config: &str) -> Self {
        AgentSpec {
            bin: bin.to_path_buf(),
            host: host.into(),
            config: config.into(),
            env: Vec::new(),
            log_level: "info".into(),
        }
    }

    /// Configuration with `top_level` lines (e.g.
    /// `on_retrieve_failure = "temporary"`) and `uif_section` as the body
    /// of the `[uif]` table.
    pub fn uif(top_level: &str, uif_section: &str) -> String {
        format!("{top_level}\n\n[uif]\n{uif_section}\n")
    }
}

/// A running agent.
pub struct AgentProc {
    /// The binary it runs (also for the CLI verbs).
    pub bin: PathBuf,
    /// Its directory (state, control socket, config, log).
    pub dir: PathBuf,
    /// Its configuration file.
    pub config: PathBuf,
    /// Its control socket.
    pub socket: PathBuf,
    /// Its state directory.
    pub state: PathBuf,
    /// Its log file.
    pub log: PathBuf,
    /// Extra environment of the daemon, applied at every (re)start.
    pub env: Vec<(String, String)>,
    log_level: String,
    daemon: Daemon,
}

impl AgentProc {
    /// Writes the configuration of `spec` into `dir` and starts the agent;
    /// returns once its control socket answers.
    pub fn start(dir: &Path, spec: AgentSpec) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("agent dir: {e}"))?;
        let (state, socket, config) = (
            dir.join("state"),
            dir.join("control.sock"),
            dir.join("agent.toml"),
        );
        let text = format!(
            "host = \"{}\"\nstate_dir = \"{}\"\ncontrol_socket = \"{}\"\n{}\n",
            spec.host,
            state.display(),
            socket.display(),
            spec.config
        );
        std::fs::write(&config, text).map_err(|e| format!("agent config: {e}"))?;
        let mut a = AgentProc {
            bin: spec.bin,
            dir: dir.to_path_buf(),
            config,
            socket,
            state,
            log: dir.join("agent.log"),
            env: spec.env,
            log_level: spec.log_level,
            daemon: Daemon::default(),
        };
        a.spawn()?;
        Ok(a)
    }

    /// (Re)starts `uve-agent run` on the same directory and configuration;
    /// returns once its control socket answers.
    pub fn spawn(&mut self) -> Result<(), String> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--config")
            .arg(&self.config)
            .arg("run")
            .env("UVE_LOG", &self.log_level)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        self.daemon.spawn(&mut cmd, &self.log)?;
        let up = poll::wait_for(LONG, || {
            std::os::unix::net::UnixStream::connect(&self.socket).is_ok()
        });
        if up {
            Ok(())
        } else {
            Err(format!(
                "uve-agent control socket never answered; log:\n{}",
                self.log_tail()
            ))
        }
    }

    /// Runs a CLI verb against this agent's control socket.
    pub fn cli(&self, args: &[&str]) -> Output {
        match Command::new(&self.bin)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
        {
            Ok(out) => out,
            Err(e) => panic!("run {} {args:?}: {e}", self.bin.display()),
        }
    }

    /// Runs a CLI verb; returns its exit code and stdout followed by stderr.
    pub fn said(&self, args: &[&str]) -> (i32, String) {
        process::said(&self.cli(args), "")
    }

    /// Runs a CLI verb that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}{}\n--- agent log ---\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The `status` object of `uve-agent status --json`.
    pub fn status(&self) -> serde_json::Value {
        let out = self.ok(&["status", "--json"]);
        match serde_json::from_str::<serde_json::Value>(&out) {
            Ok(v) => v["status"].clone(),
            Err(e) => panic!("status --json is not JSON ({e}): {out}"),
        }
    }

    /// Waits until the agent reports a live host connection.
    pub fn wait_connected(&self) {
        poll::must("agent connected", LONG, || {
            (self.status()["connected"] == serde_json::Value::Bool(true)).then_some(())
        });
    }

    /// The open sessions of [`status`](Self::status) (panics if the
    /// status has no session list).
    pub fn sessions(&self) -> Vec<serde_json::Value> {
        match self.status()["sessions"].as_array() {
            Some(list) => list.clone(),
            None => panic!("status without a session list"),
        }
    }

    /// Waits until the agent's offline spool is empty.
    pub fn wait_spool_empty(&self) {
        poll::must("spool empty", LONG, || {
            (self.status()["spooled_updates"] == 0).then_some(())
        });
    }

    /// The agent's PID (while running).
    pub fn pid(&self) -> Option<u32> {
        self.daemon.pid()
    }

    /// The whole agent log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of the agent log.
    pub fn log_tail(&self) -> String {
        process::tail(&self.log, LOG_TAIL)
    }

    /// Kills the agent (SIGKILL), starts it again on the same state and
    /// waits until it is connected to the host.
    pub fn restart_connected(&mut self) {
        self.kill();
        if let Err(e) = self.spawn() {
            panic!("restart the agent: {e}");
        }
        self.wait_connected();
    }

    /// SIGKILL, no cleanup.
    pub fn kill(&mut self) {
        self.daemon.kill();
    }

    /// SIGTERM and wait for the exit; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        self.daemon.terminate()
    }
}
