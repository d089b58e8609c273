//! Supervised UAs: the agent starts a session's UA entry command as the
//! session's user (setgid/setuid, own process group, and its own cgroup v2
//! when `/sys/fs/cgroup` is a writable cgroup2 mount), watches it, and turns
//! an exit that was not asked for into an unexpected disconnect. Suspend and
//! resume freeze/thaw the cgroup, or send SIGSTOP/SIGCONT to the process
//! group, and wait until the kernel reports the new state.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::agent::Agent;
use crate::session::SessionRecord;

/// How long a stopped UA gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long suspend/resume wait for the kernel to confirm.
const STATE_WAIT: Duration = Duration::from_secs(5);
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Why a UA could not be started or controlled.
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    /// The UA is not deployed.
    #[error("UA {0} is not deployed")]
    NotDeployed(String),
    /// The session's user has no passwd entry.
    #[error("user {0} is not in /etc/passwd")]
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

/// The supervised processes, by session.
#[derive(Default)]
pub struct Supervisor {
    procs: Mutex<HashMap<String, Proc>>,
}

impl Supervisor {
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, Proc>) -> T) -> T {
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
}

/// Creates `/sys/fs/cgroup/uve-agent/<session>` if cgroup v2 is writable.
fn make_cgroup(session: &str) -> Option<PathBuf> {
    let root = Path::new(CGROUP_ROOT);
    if !root.join("cgroup.controllers").exists() {
        return None;
    }
    let dir = root.join("uve-agent").join(session);
    std::fs::create_dir_all(&dir).ok()?;
    dir.join("cgroup.procs").exists().then_some(dir)
}

/// Starts UA `ua` for `rec` and watches it.
pub fn start(agent: &Arc<Agent>, rec: &SessionRecord, ua: &str) -> Result<i32, SuperviseError> {
    let (dir, entry) = agent
        .uas
        .current(ua)
        .ok_or_else(|| SuperviseError::NotDeployed(ua.into()))?;
    let (prog, args) = entry
        .split_first()
        .ok_or_else(|| SuperviseError::NotDeployed(ua.into()))?;
    let prog_path = if Path::new(prog).is_absolute() {
        PathBuf::from(prog)
    } else {
        dir.join(prog)
    };
    let root = unsafe_free_getuid() == 0;
    let pw = crate::passwd::lookup(&rec.user);
    if root && pw.is_none() {
        return Err(SuperviseError::UnknownUser(rec.user.clone()));
    }
    let home = pw
        .as_ref()
        .map(|p| p.home.clone())
        .filter(|h| h.is_dir())
        .unwrap_or_else(|| PathBuf::from("/"));
    let mut cmd = tokio::process::Command::new(&prog_path);
    cmd.args(args)
        .current_dir(&home)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", &home)
        .env("USER", &rec.user)
        .env("LOGNAME", &rec.user)
        .env("UVE_SESSION", &rec.session)
        .env("UVE_USER", &rec.user)
        .env("UVE_UA", ua)
        .env("UVE_UA_DIR", &dir)
        .env("UVE_AGENT_SOCKET", &agent.config().control_socket)
        .stdin(std::process::Stdio::null())
        .process_group(0);
    if let (true, Some(p)) = (root, &pw) {
        cmd.gid(p.gid).uid(p.uid);
    }
    let cgroup = if root {
        make_cgroup(&rec.session)
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
        let fd = f.as_raw_fd();
        // SAFETY: the closure runs in the forked child before exec and only
        // calls write(2), which is async-signal-safe; `fd` stays open in the
        // child until exec (close-on-exec). Writing "0" moves the writer
        // into the cgroup, so the UA and all its children start inside it.
        unsafe {
            cmd.pre_exec(move || {
                let _ = libc::write(fd, b"0".as_ptr().cast(), 1);
                Ok(())
            });
        }
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
    agent.supervisor.with(|p| {
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
    tracing::info!(session = %rec.session, ua, pid, "UA started");
    if let Some(start) = start_time(pid) {
        agent.with_table(|t| {
            if let Some(r) = t.sessions.get_mut(&rec.session) {
                r.ua_process = Some((pid, start));
            }
        });
    }
    let a = agent.clone();
    let session = rec.session.clone();
    tokio::spawn(async move {
        let reason = match child.wait().await {
            Ok(s) => format!("UA exited: {s}"),
            Err(e) => format!("UA wait failed: {e}"),
        };
        on_exit(a, session, reason).await;
    });
    Ok(pid)
}

/// After an agent restart: keeps watching UAs that survived it (they are
/// no longer our children, so their exit is polled), and reports sessions
/// whose UA died meanwhile as disconnected.
pub fn adopt(agent: &Arc<Agent>) {
    for rec in agent.snapshot().sessions.into_values() {
        let Some((pid, start)) = rec.ua_process else {
            continue;
        };
        let a = agent.clone();
        let session = rec.session.clone();
        if !alive(pid, start) {
            tokio::spawn(on_exit(
                a,
                session,
                "UA exited while the agent was not running".into(),
            ));
            continue;
        }
        let cgroup = Path::new(CGROUP_ROOT).join("uve-agent").join(&session);
        let cgroup = cgroup.join("cgroup.procs").exists().then_some(cgroup);
        agent.supervisor.with(|p| {
            p.insert(
                session.clone(),
                Proc {
                    pid,
                    cgroup,
                    suspended: group_stopped(pid) == Some(true),
                    stopping: false,
                    exited: Arc::new(tokio::sync::Notify::new()),
                },
            )
        });
        tracing::info!(session, pid, "watching UA that survived an agent restart");
        tokio::spawn(async move {
            while alive(pid, start) {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            on_exit(
                a,
                session,
                "UA exited (exit status unknown after an agent restart)".into(),
            )
            .await;
        });
    }
}

/// Handles a UA's end: forget it, and unless it was stopped on purpose,
/// report the session as unexpectedly disconnected.
async fn on_exit(agent: Arc<Agent>, session: String, reason: String) {
    let proc_ = agent.supervisor.with(|p| p.remove(&session));
    if let Some(p) = &proc_ {
        p.exited.notify_waiters();
        if let Some(cg) = &p.cgroup {
            let _ = std::fs::remove_dir(cg);
        }
        if p.stopping {
            return;
        }
    }
    if !agent.snapshot().sessions.contains_key(&session) {
        return;
    }
    tracing::warn!(session, "{reason} without logout");
    if let Err(e) = crate::lifecycle::disconnect(&agent, &session, &reason).await {
        tracing::error!(session, "cannot handle UA exit: {e}");
    }
}

/// The process's start time (clock ticks after boot), from /proc.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// True if `pid` is the same process (same start time) and not a zombie.
fn alive(pid: i32, start: u64) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return false;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.first() != Some(&"Z") && f.get(19).and_then(|s| s.parse().ok()) == Some(start)
}

fn unsafe_free_getuid() -> u32 {
    // SAFETY: getuid(2) has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

fn kill_group(pid: i32, sig: i32) {
    // SAFETY: kill(2) with a negative pid signals the process group `pid`,
    // which the UA leads (process_group(0)); it touches no memory.
    unsafe {
        libc::kill(-pid, sig);
    }
}

/// Stops a session's UA (SIGTERM, then SIGKILL after a grace period) and
/// waits for it; its exit is not reported as a disconnect.
pub async fn stop(agent: &Agent, session: &str) {
    let Some((pid, cgroup, exited)) = agent.supervisor.with(|p| {
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
    kill_group(pid, libc::SIGCONT);
    kill_group(pid, libc::SIGTERM);
    if tokio::time::timeout(STOP_GRACE, wait.as_mut())
        .await
        .is_err()
    {
        if let Some(cg) = &cgroup {
            let _ = std::fs::write(cg.join("cgroup.kill"), "1");
        }
        kill_group(pid, libc::SIGKILL);
        let _ = tokio::time::timeout(STOP_GRACE, wait).await;
    }
}

/// Freezes (`true`) or thaws (`false`) a session's processes and waits for
/// the kernel to confirm.
pub async fn set_suspended(
    agent: &Agent,
    session: &str,
    freeze: bool,
) -> Result<(), SuperviseError> {
    let (pid, cgroup) = agent
        .supervisor
        .with(|p| p.get(session).map(|x| (x.pid, x.cgroup.clone())))
        .ok_or_else(|| SuperviseError::NotSupervised(session.into()))?;
    match &cgroup {
        Some(cg) => {
            std::fs::write(cg.join("cgroup.freeze"), if freeze { "1" } else { "0" })
                .map_err(|e| SuperviseError::State(format!("cgroup.freeze: {e}")))?;
        }
        None => kill_group(pid, if freeze { libc::SIGSTOP } else { libc::SIGCONT }),
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
    agent.supervisor.with(|p| {
        if let Some(x) = p.get_mut(session) {
            x.suspended = freeze;
        }
    });
    Ok(())
}

fn cgroup_frozen(cg: &Path) -> Option<bool> {
    let text = std::fs::read_to_string(cg.join("cgroup.events")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("frozen "))
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
