//! A real `uve-agent` process on this machine, playing a VM: it dials the
//! host's hybrid-vsock path `<uds>_7075` directly (what the VMM would do for
//! a guest), keeps its state and control socket in a directory of its own,
//! and is driven through its CLI verbs. Killed (by PID) on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::vm::wait_for;

/// A running agent.
pub struct AgentProc {
    bin: PathBuf,
    /// Its directory (state, control socket, config, log).
    pub dir: PathBuf,
    config: PathBuf,
    /// Its log file.
    pub log: PathBuf,
    child: Option<Child>,
}

impl AgentProc {
    /// Starts an agent dialing `host_endpoint` (e.g. `unix:/x/v.sock_7075`),
    /// with `uif_section` as the `[uif]` table of its configuration.
    pub fn start(
        bin: &Path,
        dir: &Path,
        host_endpoint: &str,
        uif_section: &str,
    ) -> Result<Self, String> {
        Self::start_with(bin, dir, host_endpoint, "", uif_section)
    }

    /// Like [`start`](Self::start), with `top_level` lines (e.g.
    /// `on_retrieve_failure = "temporary"`) before the `[uif]` table.
    pub fn start_with(
        bin: &Path,
        dir: &Path,
        host_endpoint: &str,
        top_level: &str,
        uif_section: &str,
    ) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("agent dir: {e}"))?;
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "host = \"{host_endpoint}\"\nstate_dir = \"{state}\"\ncontrol_socket = \"{sock}\"\n{top_level}\n\n[uif]\n{uif_section}\n",
                state = dir.join("state").display(),
                sock = dir.join("control.sock").display(),
            ),
        )
        .map_err(|e| format!("agent config: {e}"))?;
        let mut a = AgentProc {
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            config,
            log: dir.join("agent.log"),
            child: None,
        };
        a.spawn()?;
        Ok(a)
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("agent log: {e}"))?;
        let err = log.try_clone().map_err(|e| format!("agent log: {e}"))?;
        let child = Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .arg("run")
            .env("UVE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("start uve-agent: {e}"))?;
        self.child = Some(child);
        let sock = self.dir.join("control.sock");
        if !wait_for(Duration::from_secs(20), || sock.exists()) {
            return Err(format!(
                "uve-agent control socket never appeared; log:\n{}",
                self.log_text()
            ));
        }
        Ok(())
    }

    /// Runs a CLI verb against this agent; returns exit code and output.
    pub fn cli(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output();
        match out {
            Ok(o) => {
                let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
                s.push_str(&String::from_utf8_lossy(&o.stderr));
                (o.status.code().unwrap_or(-1), s)
            }
            Err(e) => (-1, e.to_string()),
        }
    }

    /// Runs a CLI verb that must succeed.
    pub fn ok(&self, args: &[&str]) -> String {
        let (code, out) = self.cli(args);
        assert_eq!(
            code,
            0,
            "uve-agent {args:?} exited {code}:\n{out}\nagent log:\n{}",
            self.log_text()
        );
        out
    }

    /// The agent's PID (while running).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The agent log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the agent (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
    }
}
