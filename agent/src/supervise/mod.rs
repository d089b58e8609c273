//! Supervised UAs: the agent starts a session's UA entry command as the
//! session's user (setgid/setuid, own process group, and its own cgroup v2
//! where [`cgroup`] found one to use: `<unit>/ua/<session>` under the
//! agent's delegated systemd unit), watches it, and turns an exit that was
//! not asked for into an unexpected disconnect. Suspend and resume
//! freeze/thaw the cgroup (`cgroup.freeze`, confirmed by `frozen` in
//! `cgroup.events`), or send SIGSTOP/SIGCONT to the process group, and wait
//! until the kernel reports the new state.
//!
//! The supervisor knows processes, not sessions' meaning: a UA that ends
//! without being stopped is reported upward as a [`UaExited`] on a
//! channel; the lifecycle layer turns it into an unexpected disconnect.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use uve_protocol::names::{SessionId, UaName};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::base::accounts::Account;
use crate::stores::session::{SessionRecord, UaProcess};
use crate::stores::ua::UaStore;

/// How long a stopped UA gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long suspend/resume wait for the kernel to confirm.
const STATE_WAIT: Duration = Duration::from_secs(5);

pub mod cgroup;
pub use cgroup::Cgroups;

/// Why a UA could not be started or controlled.
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    /// The UA is not deployed.
    #[error("UA {0} is not deployed")]
    NotDeployed(String),
    /// The user database had no entry for the session's user at login.
    #[error("user {0} has no entry in the user database (NSS), so there is no uid to run a UA as")]
    UnknownUser(String),
    /// The entry command could not be started.
    #[error("cannot start {cmd}: {source}")]
    Spawn {
        /// The program.
        cmd: String,
        /// The error.
        source: std::io::Error,
    },
    /// The session has no supervised process.
    #[error("session {0} has no supervised processes")]
    NotSupervised(String),
    /// The kernel did not confirm the state change.
    #[error("{0}")]
    State(String),
}

struct Proc {
    pid: i32,
    cgroup: Option<PathBuf>,
    suspended: bool,
    stopping: bool,
    exited: Arc<tokio::sync::Notify>,
}

/// A supervised UA ended without being stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UaExited {
    /// Its session.
    pub session: SessionId,
    /// How it ended.
    pub reason: String,
}

type Procs = Arc<Mutex<HashMap<SessionId, Proc>>>;

/// The supervised processes, by session.
pub struct Supervisor {
    procs: Procs,
    cgroups: Cgroups,
    exits: mpsc::UnboundedSender<UaExited>,
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl Supervisor {
    /// A supervisor reporting exits on `exits`, putting UAs into cgroups
    /// where `cgroups` says; its watchers run on `tasks` and end when
    /// `stop` is cancelled (the UAs live on: an agent restart adopts them).
    pub fn new(
        exits: mpsc::UnboundedSender<UaExited>,
        cgroups: Cgroups,
        tasks: TaskTracker,
        stop: CancellationToken,
    ) -> Supervisor {
        Supervisor {
            procs: Procs::default(),
            cgroups,
            exits,
            tasks,
            stop,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<SessionId, Proc>) -> T) -> T {
        f(&mut self.procs.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// True if `session` is suspended.
    pub fn is_suspended(&self, session: &str) -> bool {
        self.with(|p| p.get(session).is_some_and(|x| x.suspended))
    }

    /// The UA's pid, if supervised.
    pub fn pid(&self, session: &str) -> Option<i32> {
        self.with(|p| p.get(session).map(|x| x.pid))
    }

    /// Watches `session`'s process until `ended` resolves with the reason
    /// (or the agent stops).
    fn watch(&self, session: SessionId, ended: impl Future<Output = String> + Send + 'static) {
        let (procs, exits, stop) = (self.procs.clone(), self.exits.clone(), self.stop.clone());
        self.tasks.spawn(async move {
            tokio::select! {
                reason = ended => exited(&procs, &exits, session, reason).await,
                () = stop.cancelled() => {}
            }
        });
    }
}

/// What [`Supervisor::start`] started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Started {
    /// The UA's pid.
    pub pid: i32,
    /// Its start time in clock ticks (to recognise it after a restart).
    pub start: Option<u64>,
}

impl Supervisor {
    /// Starts UA `ua` (from `uas`) for `rec` and watches it; the UA learns
    /// the control socket `socket` from its environment. Run by root, it
    /// runs as the user `account` describes (uid, gid, every group of
    /// theirs, home), and a user without an entry gets no UA.
    pub fn start(
        &self,
        uas: &UaStore,
        socket: &Path,
        rec: &SessionRecord,
        account: Option<&Account>,
        ua: &UaName,
    ) -> Result<Started, SuperviseError> {
        let (dir, entry) = uas
            .current(ua)
            .ok_or_else(|| SuperviseError::NotDeployed(ua.to_string()))?;
        let (prog, args) = entry
            .split_first()
            .ok_or_else(|| SuperviseError::NotDeployed(ua.to_string()))?;
        let prog_path = if Path::new(prog).is_absolute() {
            PathBuf::from(prog)
        } else {
            dir.join(prog)
        };
        let root = nix::unistd::getuid().is_root();
        if root && account.is_none() {
            return Err(SuperviseError::UnknownUser(rec.user.to_string()));
        }
        let mut cmd = ua_command(&prog_path, args, rec, account, ua, &dir, socket);
        let cgroup = if root {
            self.cgroups.create(&rec.session)
        } else {
            None
        };
        let procs_file = cgroup.as_ref().and_then(|d| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(d.join("cgroup.procs"))
                .ok()
        });
        if let Some(f) = &procs_file {
            start_in_cgroup(&mut cmd, f);
        }
        // After the cgroup move, which needs root.
        if let (true, Some(a)) = (root, account) {
            become_user(&mut cmd, a);
        }
        let mut child = cmd.spawn().map_err(|source| SuperviseError::Spawn {
            cmd: prog_path.display().to_string(),
            source,
        })?;
        drop(procs_file);
        let pid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| SuperviseError::State("spawned UA has no pid".into()))?;
        // Freezing an empty cgroup "succeeds" without stopping anything: use the
        // cgroup only if the UA really landed in it, else signals.
        let cgroup = cgroup.filter(|cg| {
            let inside = std::fs::read_to_string(cg.join("cgroup.procs"))
                .is_ok_and(|s| s.lines().any(|l| l.trim() == pid.to_string()));
            if !inside {
                tracing::warn!(session = %rec.session, "UA not in its cgroup; using signals");
                let _ = std::fs::remove_dir(cg);
            }
            inside
        });
        self.with(|p| {
            p.insert(
                rec.session.clone(),
                Proc {
                    pid,
                    cgroup,
                    suspended: false,
                    stopping: false,
                    exited: Arc::new(tokio::sync::Notify::new()),
                },
            )
        });
        tracing::info!(session = %rec.session, %ua, pid, "UA started");
        self.watch(rec.session.clone(), async move {
            match child.wait().await {
                Ok(s) => format!("UA exited: {s}"),
                Err(e) => format!("UA wait failed: {e}"),
            }
        });
        Ok(Started {
            pid,
            start: start_time(pid),
        })
    }
}

/// The UA's command: its entry argv, in its home, with a clean
/// environment naming the session, the user, the UA and the control
/// socket, in a process group of its own.
fn ua_command(
    prog: &Path,
    args: &[String],
    rec: &SessionRecord,
    account: Option<&Account>,
    ua: &str,
    dir: &Path,
    socket: &Path,
) -> tokio::process::Command {
    let home = account
        .map(|a| a.home.clone())
        .filter(|h| h.is_dir())
        .unwrap_or_else(|| PathBuf::from("/"));
    // The name the system knows the user by (`CORP\alice`), not the store's.
    let login_name = account.map_or(rec.user.as_str(), |a| a.name.as_str());
    let mut cmd = tokio::process::Command::new(prog);
    cmd.args(args)
        .current_dir(&home)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", &home)
        .env("USER", login_name)
        .env("LOGNAME", login_name)
        .env("UVE_SESSION", &rec.session)
        .env("UVE_USER", &rec.user)
        .env("UVE_UA", ua)
        .env("UVE_UA_DIR", dir)
        .env("UVE_AGENT_SOCKET", socket)
        .stdin(std::process::Stdio::null())
        .process_group(0);
    cmd
}

/// Makes the child move itself into the cgroup whose `cgroup.procs` is
/// open as `procs` before it execs, so the UA and all its children start
/// inside it.
fn start_in_cgroup(cmd: &mut tokio::process::Command, procs: &std::fs::File) {
    let fd = procs.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and only
    // calls write(2), which is async-signal-safe; `fd` stays open in the
    // child until exec (close-on-exec). Writing "0" moves the writer into
    // the cgroup.
    unsafe {
        cmd.pre_exec(move || {
            let _ = libc::write(fd, b"0".as_ptr().cast(), 1);
            Ok(())
        });
    }
}

/// Makes the child take the user's identity before it execs: every group
/// of theirs (what `initgroups(3)` sets), then their gid, then their uid.
/// A failure fails the spawn: a UA never runs with root's groups.
fn become_user(cmd: &mut tokio::process::Command, account: &Account) {
    let groups: Vec<libc::gid_t> = account.groups.clone();
    let (uid, gid) = (account.uid, account.gid);
    // SAFETY: the closure runs in the forked child before exec and only
    // calls setgroups(2), setgid(2) and setuid(2), async-signal-safe system
    // calls; `groups` was allocated before the fork and is only read.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

impl Supervisor {
    /// After an agent restart: keeps watching the UAs of `sessions` that
    /// survived it (they are no longer our children, so their exit is
    /// polled), and reports sessions whose UA died meanwhile.
    pub fn adopt(&self, sessions: Vec<SessionRecord>) {
        for rec in sessions {
            let Some(UaProcess { pid, start }) = rec.ua_process else {
                continue;
            };
            let session = rec.session.clone();
            if !alive(pid, start) {
                let _ = self.exits.send(UaExited {
                    session,
                    reason: "UA exited while the agent was not running".into(),
                });
                continue;
            }
            let cgroup = self.cgroups.of_ua(pid, &session);
            // Suspended the way it was suspended: frozen, or stopped.
            let suspended = match &cgroup {
                Some(cg) => cgroup_frozen(cg) == Some(true),
                None => group_stopped(pid) == Some(true),
            };
            self.with(|p| {
                p.insert(
                    session.clone(),
                    Proc {
                        pid,
                        cgroup,
                        suspended,
                        stopping: false,
                        exited: Arc::new(tokio::sync::Notify::new()),
                    },
                )
            });
            tracing::info!(%session, pid, "watching UA that survived an agent restart");
            self.watch(session, async move {
                while alive(pid, start) {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                "UA exited (exit status unknown after an agent restart)".to_string()
            });
        }
    }
}

/// A UA's end: forget it, end what it left in its cgroup and remove the
/// cgroup, and unless it was stopped on purpose, report it.
async fn exited(
    procs: &Procs,
    exits: &mpsc::UnboundedSender<UaExited>,
    session: SessionId,
    reason: String,
) {
    let proc_ = procs
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&session);
    if let Some(p) = &proc_ {
        if let Some(cg) = &p.cgroup {
            clear_cgroup(cg).await;
        }
        p.exited.notify_waiters();
        if p.stopping {
            return;
        }
    }
    let _ = exits.send(UaExited { session, reason });
}

/// Ends every process still in UA cgroup `cg` once its UA has ended (and
/// with it the session): processes that left the UA's process group are
/// still in its cgroup. Then removes the cgroup.
async fn clear_cgroup(cg: &Path) {
    if cgroup_event(cg, "populated") == Some(true) {
        if std::fs::write(cg.join("cgroup.kill"), "1").is_err() {
            // No cgroup.kill before Linux 5.14: one SIGKILL each.
            let pids = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default();
            for pid in pids.lines().filter_map(|l| l.trim().parse().ok()) {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        let deadline = tokio::time::Instant::now() + STOP_GRACE;
        while cgroup_event(cg, "populated") == Some(true) && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    if let Err(e) = std::fs::remove_dir(cg) {
        tracing::warn!(cgroup = %cg.display(), "cannot remove the UA's cgroup: {e}");
    }
}

/// A process's state letter and start time (clock ticks after boot), from
/// `/proc/<pid>/stat`; the fields after the parenthesised command name,
/// which may itself contain spaces and parentheses.
fn proc_stat(pid: i32) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.to_string();
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// The process's start time (clock ticks after boot).
fn start_time(pid: i32) -> Option<u64> {
    proc_stat(pid).map(|(_, start)| start)
}

/// True if `pid` is the same process (same start time) and not a zombie.
fn alive(pid: i32, start: u64) -> bool {
    proc_stat(pid).is_some_and(|(state, s)| state != "Z" && s == start)
}

/// Signals process group `pgid` (which the UA leads: `process_group(0)`).
fn kill_group(pgid: i32, sig: Signal) {
    let _ = killpg(Pid::from_raw(pgid), sig);
}

impl Supervisor {
    /// Stops a session's UA (SIGTERM, then SIGKILL after a grace period) and
    /// waits for it; its exit is not reported as a disconnect.
    pub async fn stop(&self, session: &str) {
        let Some((pid, cgroup, exited)) = self.with(|p| {
            p.get_mut(session).map(|x| {
                x.stopping = true;
                (x.pid, x.cgroup.clone(), x.exited.clone())
            })
        }) else {
            return;
        };
        let wait = exited.notified();
        tokio::pin!(wait);
        wait.as_mut().enable();
        if let Some(cg) = &cgroup {
            let _ = std::fs::write(cg.join("cgroup.freeze"), "0");
        }
        kill_group(pid, Signal::SIGCONT);
        kill_group(pid, Signal::SIGTERM);
        if tokio::time::timeout(STOP_GRACE, wait.as_mut())
            .await
            .is_err()
        {
            if let Some(cg) = &cgroup {
                let _ = std::fs::write(cg.join("cgroup.kill"), "1");
            }
            kill_group(pid, Signal::SIGKILL);
            let _ = tokio::time::timeout(STOP_GRACE, wait).await;
        }
    }

    /// Freezes (`true`) or thaws (`false`) a session's processes and waits for
    /// the kernel to confirm.
    pub async fn set_suspended(&self, session: &str, freeze: bool) -> Result<(), SuperviseError> {
        let (pid, cgroup) = self
            .with(|p| p.get(session).map(|x| (x.pid, x.cgroup.clone())))
            .ok_or_else(|| SuperviseError::NotSupervised(session.into()))?;
        match &cgroup {
            Some(cg) => {
                std::fs::write(cg.join("cgroup.freeze"), if freeze { "1" } else { "0" })
                    .map_err(|e| SuperviseError::State(format!("cgroup.freeze: {e}")))?;
            }
            None => kill_group(
                pid,
                if freeze {
                    Signal::SIGSTOP
                } else {
                    Signal::SIGCONT
                },
            ),
        }
        let deadline = tokio::time::Instant::now() + STATE_WAIT;
        loop {
            let reached = match &cgroup {
                Some(cg) => cgroup_frozen(cg) == Some(freeze),
                None => group_stopped(pid) == Some(freeze),
            };
            if reached {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(SuperviseError::State(format!(
                    "session {session} did not {} in time (process group {pid}: {:?})",
                    if freeze { "freeze" } else { "thaw" },
                    group_states(pid)
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.with(|p| {
            if let Some(x) = p.get_mut(session) {
                x.suspended = freeze;
            }
        });
        Ok(())
    }
}

/// Whether cgroup `cg` is frozen (its `cgroup.events` says `frozen 1`).
fn cgroup_frozen(cg: &Path) -> Option<bool> {
    cgroup_event(cg, "frozen")
}

/// A boolean key of cgroup `cg`'s `cgroup.events` (`populated`, `frozen`).
fn cgroup_event(cg: &Path, key: &str) -> Option<bool> {
    let text = std::fs::read_to_string(cg.join("cgroup.events")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
        .map(|v| v.trim() == "1")
}

/// The state letters of every process in process group `pgid`, from /proc.
fn group_states(pgid: i32) -> Vec<char> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|stat| {
            // Fields after the parenthesised command name (which may contain
            // spaces and parentheses): state, ppid, pgrp, ...
            let rest = stat.rsplit_once(')')?.1;
            let mut f = rest.split_whitespace();
            let state = f.next()?.chars().next()?;
            let _ppid = f.next()?;
            let pgrp: i32 = f.next()?.parse().ok()?;
            (pgrp == pgid).then_some(state)
        })
        .collect()
}

/// `Some(true)` when no process of the group can run user code: each is
/// stopped (`T`), or blocked in the kernel (`D`, e.g. a shell's vfork
/// parent whose child was stopped before exec) with the stop pending.
/// `Some(false)` when none is stopped. `None` while in between.
fn group_stopped(pgid: i32) -> Option<bool> {
    let states = group_states(pgid);
    if states.iter().all(|c| matches!(c, 'T' | 't' | 'D')) && !states.is_empty() {
        Some(true)
    } else if states.iter().all(|c| !matches!(c, 'T' | 't')) {
        Some(false)
    } else {
        None
    }
}

#[cfg(test)]
mod tests;
