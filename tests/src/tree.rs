//! Process trees the kit starts, and the guarantee that none outlives its
//! test.
//!
//! A daemon the kit starts forks: `uve-agent` starts UA loops in process
//! groups of their own, `rgw.sh` backgrounds `ceph-mon`, `ceph-osd` and
//! `radosgw`, QEMU has helper threads and children. Killing the PID the kit
//! spawned leaves all of those running. So every kit object that starts a
//! process owns a [`ProcessTree`]:
//!
//! - a **cgroup v2** of its own (`<cgroup2 mount>/uve-kit/<owner>-<n>`),
//!   which every process it starts enters before `exec` and every
//!   descendant inherits, whatever process group or session it makes;
//!   killed whole with `cgroup.kill`. Where no writable cgroup2 mount exists
//!   (not root), the tree falls back to:
//! - a **process group** per started process (`process_group(0)`), killed
//!   with `killpg`, which catches everything that did not make its own.
//! - a **record** in `<tmp>/uve-kit-<uid>/`, naming the owning test process
//!   (PID and start time), the cgroup and the process groups. Dropping the
//!   tree kills it and deletes the record. A test process that is killed
//!   (SIGKILL, a timeout) never drops anything, so the first tree made by
//!   any later test process sweeps the records whose owner is gone and
//!   kills what they name.
//!
//! `PR_SET_PDEATHSIG` is not used: it fires when the spawning *thread*
//! exits (a `spawn_blocking` thread ends after 10 s idle) and forked
//! daemons do not inherit it.

use std::fs;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::poll;

/// How long a killed tree may take to empty its cgroup.
const EMPTY_LIMIT: Duration = Duration::from_secs(10);

/// Numbers the trees of this test process (the cgroup and record names).
static NEXT: AtomicU32 = AtomicU32::new(0);

/// Sweeps the records of dead test processes once per test process.
static SWEEP: Once = Once::new();

/// A process's identity that survives PID reuse: its PID and its start
/// time in clock ticks since boot (`/proc/<pid>/stat`, field 22).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    pid: i32,
    start: u64,
}

impl Identity {
    fn of(pid: i32) -> Option<Identity> {
        Some(Identity {
            pid,
            start: stat_fields(pid)?.start,
        })
    }

    fn alive(self) -> bool {
        Identity::of(self.pid) == Some(self)
    }
}

/// What the kit reads of `/proc/<pid>/stat`.
struct Stat {
    pgid: i32,
    start: u64,
}

fn stat_fields(pid: i32) -> Option<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: the
    // fields after it start after its last ')'. Field 3 is then index 0.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        pgid: fields.get(2)?.parse().ok()?,
        start: fields.get(19)?.parse().ok()?,
    })
}

/// Every process on the machine with its process group and start time.
fn all_processes() -> Vec<(i32, Stat)> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| Some((pid, stat_fields(pid)?)))
        .collect()
}

/// SIGKILLs every process in a recorded group: one whose process group is
/// `pgid` and that started no earlier than the group's leader (so a group
/// id reused by an unrelated, older process is never hit).
fn kill_groups(groups: &[Identity]) {
    if groups.is_empty() {
        return;
    }
    for (pid, st) in all_processes() {
        if groups
            .iter()
            .any(|g| g.pid == st.pgid && st.start >= g.start)
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// Kills every process in `cgroup`, waits for it to empty and removes it.
fn kill_cgroup(cgroup: &Path) {
    if !cgroup.exists() {
        return;
    }
    if fs::write(cgroup.join("cgroup.kill"), "1").is_err() {
        // Kernels before 5.14 have no cgroup.kill: signal each member.
        for pid in cgroup_members(cgroup) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    poll::wait_for(EMPTY_LIMIT, || cgroup_members(cgroup).is_empty());
    let _ = fs::remove_dir(cgroup);
}

fn cgroup_members(cgroup: &Path) -> Vec<i32> {
    fs::read_to_string(cgroup.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// The first cgroup v2 mount point, from `/proc/self/mounts`.
fn cgroup2_mount() -> Option<PathBuf> {
    fs::read_to_string("/proc/self/mounts")
        .ok()?
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(2) == Some(&"cgroup2"))
        .and_then(|f| f.get(1).map(PathBuf::from))
}

/// Where the records of live trees are kept.
fn records_dir() -> PathBuf {
    std::env::temp_dir().join(format!("uve-kit-{}", nix::unistd::getuid()))
}

/// What a record names: the owning test process, the cgroup, the groups.
#[derive(Debug, Default)]
struct Record {
    owner: Option<Identity>,
    cgroup: Option<PathBuf>,
    groups: Vec<Identity>,
}

impl Record {
    fn text(&self) -> String {
        let mut s = String::new();
        if let Some(o) = self.owner {
            s.push_str(&format!("owner {} {}\n", o.pid, o.start));
        }
        if let Some(c) = &self.cgroup {
            s.push_str(&format!("cgroup {}\n", c.display()));
        }
        for g in &self.groups {
            s.push_str(&format!("group {} {}\n", g.pid, g.start));
        }
        s
    }

    fn parse(text: &str) -> Record {
        let mut r = Record::default();
        for line in text.lines() {
            let f: Vec<&str> = line.splitn(3, ' ').collect();
            let ident = || -> Option<Identity> {
                Some(Identity {
                    pid: f.get(1)?.parse().ok()?,
                    start: f.get(2)?.parse().ok()?,
                })
            };
            match f.first() {
                Some(&"owner") => r.owner = ident(),
                Some(&"group") => r.groups.extend(ident()),
                Some(&"cgroup") => r.cgroup = line.strip_prefix("cgroup ").map(PathBuf::from),
                _ => {}
            }
        }
        r
    }

    /// Kills what the record names.
    fn kill(&self) {
        if let Some(c) = &self.cgroup {
            kill_cgroup(c);
        }
        kill_groups(&self.groups);
    }
}

/// Kills what the records of dead test processes name, and deletes them.
/// Returns how many records were swept.
pub fn sweep() -> usize {
    let Ok(dir) = fs::read_dir(records_dir()) else {
        return 0;
    };
    let mut swept = 0;
    for entry in dir.flatten() {
        let path = entry.path();
        let Ok(text) = fs::read_to_string(&path) else {
            continue;
        };
        let rec = Record::parse(&text);
        // A record being written has no owner line yet only for an instant;
        // one without an owner is malformed either way: sweep it.
        if rec.owner.is_some_and(Identity::alive) {
            continue;
        }
        rec.kill();
        let _ = fs::remove_file(&path);
        swept += 1;
    }
    if swept > 0 {
        eprintln!("uve-e2e: swept {swept} process tree(s) left by killed test runs");
    }
    swept
}

/// The processes one kit object started, and everything they forked.
/// Killed whole on drop.
#[derive(Debug)]
pub struct ProcessTree {
    record: Record,
    path: PathBuf,
    /// `cgroup.procs` of the tree's cgroup, opened once, written by each
    /// child before `exec`.
    procs: Option<fs::File>,
}

impl ProcessTree {
    /// A new, empty tree named after `label` (for the cgroup's name). The
    /// first tree of a test process sweeps what killed runs left.
    pub fn new(label: &str) -> ProcessTree {
        SWEEP.call_once(|| {
            sweep();
        });
        let me = Identity::of(std::process::id().cast_signed());
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "{}-{}-{}",
            std::process::id(),
            n,
            label.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        );
        let cgroup = cgroup2_mount()
            .map(|m| m.join("uve-kit").join(&name))
            .filter(|c| fs::create_dir_all(c).is_ok());
        let procs = cgroup.as_ref().and_then(|c| {
            fs::OpenOptions::new()
                .write(true)
                .open(c.join("cgroup.procs"))
                .ok()
        });
        let tree = ProcessTree {
            record: Record {
                owner: me,
                cgroup,
                groups: Vec::new(),
            },
            path: records_dir().join(name),
            procs,
        };
        tree.save();
        tree
    }

    /// Whether the tree has a cgroup (else only process groups).
    pub fn has_cgroup(&self) -> bool {
        self.procs.is_some()
    }

    /// Makes `cmd`'s process the leader of a new process group and a
    /// member of the tree's cgroup, both before it runs a line of its own.
    pub fn adopt(&self, cmd: &mut Command) {
        cmd.process_group(0);
        if let Some(f) = &self.procs {
            let fd: RawFd = f.as_raw_fd();
            // SAFETY: the closure runs in the forked child before exec; it
            // only calls write(2) on a descriptor the parent keeps open for
            // the tree's lifetime, which is async-signal-safe and allocates
            // nothing. "0" names the writing process itself.
            unsafe {
                cmd.pre_exec(move || {
                    let fd = std::os::fd::BorrowedFd::borrow_raw(fd);
                    nix::unistd::write(fd, b"0")
                        .map(|_| ())
                        .map_err(std::io::Error::from)
                });
            }
        }
    }

    /// Records that `pid`, started from a command [`adopt`](Self::adopt)ed,
    /// runs: its process group is killed with the tree.
    pub fn started(&mut self, pid: u32) {
        if let Some(id) = Identity::of(pid.cast_signed()) {
            self.record.groups.push(id);
            self.save();
        }
    }

    /// Kills every process of the tree (the tree stays usable).
    pub fn kill_all(&mut self) {
        if let Some(c) = &self.record.cgroup {
            if fs::write(c.join("cgroup.kill"), "1").is_err() {
                for pid in cgroup_members(c) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            poll::wait_for(EMPTY_LIMIT, || cgroup_members(c).is_empty());
        }
        kill_groups(&self.record.groups);
        self.record.groups.clear();
        self.save();
    }

    /// The PIDs in the tree's cgroup (empty without one).
    pub fn members(&self) -> Vec<i32> {
        self.record
            .cgroup
            .as_deref()
            .map(cgroup_members)
            .unwrap_or_default()
    }

    fn save(&self) {
        let dir = records_dir();
        let _ = fs::create_dir_all(&dir);
        // Written whole to a temporary name, then renamed: a sweep never
        // reads half a record.
        let tmp = dir.join(format!(".{}.tmp", std::process::id()));
        let written = fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(self.record.text().as_bytes()))
            .is_ok();
        if written {
            let _ = fs::rename(&tmp, &self.path);
        }
    }
}

impl Drop for ProcessTree {
    fn drop(&mut self) {
        self.kill_all();
        drop(self.procs.take());
        if let Some(c) = &self.record.cgroup {
            kill_cgroup(c);
        }
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(tree: &mut ProcessTree, script: &str) -> std::process::Child {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        tree.adopt(&mut cmd);
        let child = cmd.spawn().expect("spawn sh");
        tree.started(child.id());
        child
    }

    /// The PIDs a shell wrote, one per line, once all `n` are there.
    fn pids_in(file: &Path, n: usize) -> Vec<i32> {
        let mut pids = Vec::new();
        poll::wait_for(Duration::from_secs(10), || {
            pids = fs::read_to_string(file)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.parse().ok())
                .collect();
            pids.len() >= n
        });
        pids
    }

    fn running(pid: i32) -> bool {
        // A zombie has exited; only a process that still runs counts.
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|t| {
                t.rfind(')')
                    .map(|i| !t[i + 1..].trim_start().starts_with('Z'))
            })
            .unwrap_or(false)
    }

    #[test]
    fn a_dropped_tree_kills_forks_in_their_own_groups() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("pids");
        let mut tree = ProcessTree::new("unit");
        // One loop in the shell's own process group and, where the tree has
        // a cgroup, one that escapes into a new session (so a new process
        // group), as a UA does: only a cgroup can catch that one.
        let looping = format!(
            "echo $$ >> {}; while true; do sleep 0.05; done",
            file.display()
        );
        let escaping = tree.has_cgroup();
        let script = if escaping {
            format!("setsid sh -c '{looping}' & sh -c '{looping}' & wait")
        } else {
            eprintln!("no writable cgroup2 here: only process groups are killed");
            format!("sh -c '{looping}' & wait")
        };
        let mut child = sh(&mut tree, &script);
        let n = if escaping { 2 } else { 1 };
        let pids = pids_in(&file, n);
        assert_eq!(pids.len(), n, "the loops started");
        assert!(pids.iter().all(|p| running(*p)));
        if escaping {
            let shell_group = child.id().cast_signed();
            assert!(
                pids.iter()
                    .any(|p| stat_fields(*p).is_some_and(|s| s.pgid != shell_group)),
                "one loop left the shell's process group"
            );
        }
        drop(tree);
        let _ = child.wait();
        let gone = poll::wait_for(Duration::from_secs(10), || {
            pids.iter().all(|p| !running(*p))
        });
        assert!(gone, "every loop died with the tree: {pids:?}");
    }

    #[test]
    fn a_record_of_a_dead_owner_is_swept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("pids");
        // A loop in its own group, recorded as if by a test process that
        // was killed: the owner is an identity that no longer runs.
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            &format!(
                "echo $$ >> {}; while true; do sleep 0.05; done",
                file.display()
            ),
        ])
        .process_group(0);
        let mut child = cmd.spawn().expect("spawn");
        let pid = child.id().cast_signed();
        assert_eq!(pids_in(&file, 1), vec![pid]);
        let rec = Record {
            owner: Some(Identity {
                pid: i32::MAX,
                start: 1,
            }),
            cgroup: None,
            groups: Identity::of(pid).into_iter().collect(),
        };
        let _ = fs::create_dir_all(records_dir());
        let path = records_dir().join(format!("dead-owner-{pid}"));
        fs::write(&path, rec.text()).expect("write record");
        assert!(sweep() >= 1);
        let _ = child.wait();
        assert!(!running(pid), "the swept loop is dead");
        assert!(!path.exists(), "the record is gone");
    }
}
