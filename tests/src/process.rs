//! Child processes of the test kit: the one place that starts a daemon
//! with its output appended to a log file, signals it, waits for it and
//! reaps it. [`crate::agent::AgentProc`] and [`crate::host::HostDaemon`]
//! are built on [`Daemon`], which owns a [`ProcessTree`]; the small `/proc` and privilege probes tests
//! share live here too.

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::poll;
use crate::tree::ProcessTree;

/// How long a daemon may take to exit after SIGTERM before it is killed.
pub const TERM_LIMIT: Duration = Duration::from_secs(40);

/// Opens `path` for appending (creating it): a daemon's log.
pub fn append_log(path: &Path) -> Result<File, String> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The last `n` lines of the text file at `path` (empty if unreadable).
pub fn tail(path: &Path, n: usize) -> String {
    tail_of(&std::fs::read_to_string(path).unwrap_or_default(), n)
}

/// The last `n` lines of `text`.
pub fn tail_of(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Exit code (-1 when killed by a signal) and stdout of `out`, with its
/// stderr appended after `marker` when there is any.
pub fn said(out: &Output, marker: &str) -> (i32, String) {
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.stderr.is_empty() {
        s.push_str(marker);
        s.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    (out.status.code().unwrap_or(-1), s)
}

/// A running child process whose stdout and stderr go to a log file.
/// Killed (SIGKILL, by PID) and reaped on drop, together with everything
/// it forked (its [`ProcessTree`]), even what outlived an earlier
/// [`kill`](Self::kill) of the daemon itself (a crash test's UA loops).
#[derive(Default)]
pub struct Daemon {
    child: Option<Child>,
    tree: Option<ProcessTree>,
}

impl Daemon {
    /// Starts `cmd` (stdin from /dev/null, output appended to `log`),
    /// replacing any child this daemon still held (which is killed).
    pub fn spawn(&mut self, cmd: &mut Command, log: &Path) -> Result<(), String> {
        self.kill();
        let out = append_log(log)?;
        let err = out
            .try_clone()
            .map_err(|e| format!("{}: {e}", log.display()))?;
        let tree = self.tree.get_or_insert_with(|| {
            let program = Path::new(cmd.get_program());
            ProcessTree::new(&program.file_name().unwrap_or_default().to_string_lossy())
        });
        tree.adopt(cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("start {:?}: {e}", cmd.get_program()))?;
        tree.started(child.id());
        self.child = Some(child);
        Ok(())
    }

    /// The PID while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the child has been started and not yet reaped.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// The exit status, if the child has exited (it stays reapable).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGKILL (no cleanup) and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits up to [`TERM_LIMIT`] for the exit; returns the
    /// exit code, or `None` if it was not running, died by a signal or had
    /// to be killed.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        if let Ok(pid) = i32::try_from(c.id()) {
            // Our own child, not yet reaped: the PID cannot name another process.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let exited = poll::wait_for(TERM_LIMIT, || matches!(c.try_wait(), Ok(Some(_))));
        if !exited {
            let _ = c.kill();
            let _ = c.wait();
            return None;
        }
        c.wait().ok()?.code()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        // Then the tree (a field, dropped after this): everything forked.
    }
}

/// A `/proc/<pid>/status` field in KiB (e.g. `VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    nix::unistd::getuid().is_root()
}

/// Says the calling test is skipped (returns true) when not root.
pub fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        false
    } else {
        eprintln!("SKIP {test}: needs root (setuid, chown)");
        true
    }
}
