//! UIF retrieve/update end to end: the real agent binary against the test
//! host, in file and directory mode, incremental fetches, and the offline
//! spool across a host outage and an agent SIGKILL.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation,
    missing_docs
)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{
    AgentProc, LONG, TestHost, connected_agent, host_in_tempdir, must, noise, start_agent, uif,
};
use uve_protocol::message::UpdateCause;

fn file_mode(dir: &std::path::Path) -> String {
    format!(
        "[uif]\nmode = \"file\"\npath = \"{0}/uif/{{user}}.img\"\nattach = [\"/bin/sh\", \"-c\", \"echo attach $UVE_USER {{path}} >> {0}/hooks.log\"]\ndetach = [\"/bin/sh\", \"-c\", \"echo detach $UVE_USER >> {0}/hooks.log\"]\n",
        dir.display()
    )
}

/// A test directory, its fake host and a file-mode agent whose attach and
/// detach hooks log to `hooks.log` ([`file_mode`]), connected.
fn hooked() -> (tempfile::TempDir, TestHost, AgentProc) {
    let (dir, host) = host_in_tempdir();
    let agent = connected_agent(dir.path(), &file_mode(dir.path()));
    (dir, host, agent)
}

#[test]
fn file_mode_round_trip_and_incremental_fetch() {
    let (dir, host) = host_in_tempdir();
    let original = noise(3 << 20, 7);
    let v1 = host.with(|h| h.seed("alice", &original));
    let agent = connected_agent(dir.path(), &file_mode(dir.path()));

    let out = agent.ok(&["login", "--user", "alice", "--session", "s1"]);
    assert!(out.contains(&format!("retrieved version {v1}")), "{out}");
    let img = uif(dir.path(), "alice");
    assert_eq!(std::fs::read(&img).unwrap(), original, "retrieved bytes");
    let total_chunks = host.with(|h| h.chunk_fetches);
    assert!(total_chunks > 10, "fetched {total_chunks} chunks");
    let hooks = std::fs::read_to_string(dir.path().join("hooks.log")).unwrap();
    assert!(
        hooks.contains(&format!("attach alice {}", img.display())),
        "{hooks}"
    );
    must("SessionStarted", LONG, || {
        host.with(|h| h.sessions_started.contains(&"s1".to_string()))
            .then_some(())
    });

    // The user changes a few bytes in the middle.
    let mut modified = original.clone();
    modified[1_500_000..1_500_100].copy_from_slice(&[0xAB; 100]);
    std::fs::write(&img, &modified).unwrap();
    let out = agent.ok(&["logout", "--session", "s1"]);
    assert!(out.contains("committed"), "{out}");
    let hooks = std::fs::read_to_string(dir.path().join("hooks.log")).unwrap();
    assert!(hooks.contains("detach alice"), "{hooks}");
    let (head, uploads) = host.with(|h| (h.head_bytes("alice").unwrap(), h.chunk_uploads));
    assert_eq!(head, modified, "committed bytes");
    assert!(
        uploads <= 3,
        "uploaded {uploads} chunks for a 100-byte change"
    );
    assert!(host.with(|h| h.sessions_ended.contains(&"s1".to_string())));
    let commit = host.last_commit();
    assert_eq!(commit.cause, UpdateCause::Logout);
    assert_eq!(commit.base, Some(v1));
    assert!(!commit.conflict);

    // Another VM (or an operator) changes a small part of the head: the
    // next login fetches only the changed chunks.
    let mut third = modified.clone();
    third[2_800_000..2_800_010].copy_from_slice(b"0123456789");
    let v3 = host.with(|h| h.seed("alice", &third));
    let before = host.with(|h| h.chunk_fetches);
    let out = agent.ok(&["login", "--user", "alice", "--session", "s2"]);
    assert!(out.contains(&format!("retrieved version {v3}")), "{out}");
    let fetched = host.with(|h| h.chunk_fetches) - before;
    assert!(
        (1..=3).contains(&fetched),
        "second login fetched {fetched} chunks (of {total_chunks})"
    );
    assert_eq!(std::fs::read(&img).unwrap(), third);
    agent.ok(&["logout", "--session", "s2"]);
}

#[test]
fn directory_mode_round_trip_with_owner_and_excludes() {
    let (dir, host) = host_in_tempdir();
    let root = common::is_root();
    // As root, unpack as `nobody` (from /etc/passwd); otherwise as ourselves.
    let (user, owner) = if root {
        ("nobody".to_string(), "passwd".to_string())
    } else {
        // SAFETY: getuid/getgid have no preconditions.
        let (u, g) = unsafe { (libc::getuid(), libc::getgid()) };
        ("carol".to_string(), format!("{u}:{g}"))
    };
    let cfg = format!(
        "[uif]\nmode = \"directory\"\nhome = \"{}/home/{{user}}\"\nowner = \"{owner}\"\nexclude = [\".cache\", \"*.tmp\"]\n",
        dir.path().display()
    );
    let agent = start_agent(dir.path(), &cfg);
    agent.wait_connected();
    let out = agent.ok(&["login", "--user", &user, "--session", "d1"]);
    assert!(out.contains("new user"), "{out}");
    let home = dir.path().join("home").join(&user);
    assert!(home.is_dir());
    let big = fill_home(&home);
    let out = agent.ok(&["logout", "--session", "d1"]);
    assert!(out.contains("committed"), "{out}");

    // The head is a tar of the home without the excluded paths.
    let tar = host.with(|h| h.head_bytes(&user).unwrap());
    assert_eq!(
        tar_names(&tar),
        [
            "docs",
            "docs/deep",
            "docs/deep/report.bin",
            "link",
            "notes.txt"
        ]
    );

    // Wipe the home; the next login restores it byte for byte. Beside it,
    // the home of a user whose valid name ends as the agent's working
    // names once did (`<user>.uve-old`) must survive the unpack.
    std::fs::remove_dir_all(&home).unwrap();
    let neighbour = dir.path().join("home").join(format!("{user}.uve-old"));
    std::fs::create_dir_all(&neighbour).unwrap();
    std::fs::write(neighbour.join("keep.txt"), b"not yours\n").unwrap();
    agent.ok(&["login", "--user", &user, "--session", "d2"]);
    home_restored(&home, &big, root);
    assert_eq!(
        std::fs::read(neighbour.join("keep.txt")).unwrap(),
        b"not yours\n",
        "the unpack touched another user's home"
    );
    std::fs::write(home.join("notes.txt"), b"milk bought\n").unwrap();
    agent.ok(&["logout", "--session", "d2"]);
    let tar = host.with(|h| h.head_bytes(&user).unwrap());
    let mut ar = tar::Archive::new(&tar[..]);
    let mut found = false;
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path().unwrap().to_string_lossy() == "notes.txt" {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut e, &mut s).unwrap();
            assert_eq!(s, "milk bought\n");
            found = true;
        }
    }
    assert!(found);
}

/// The pid of the first child of `parent` whose command line holds
/// `needle`, stopped with SIGSTOP (polled for up to 60 s) once it has made
/// itself non-dumpable (which it must); only one working in `cwd` if
/// given.
fn stop_child_in(
    parent: u32,
    needle: &'static str,
    cwd: Option<PathBuf>,
) -> std::thread::JoinHandle<Option<i32>> {
    std::thread::spawn(move || {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while std::time::Instant::now() < until {
            for e in std::fs::read_dir("/proc").unwrap().flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
                    continue;
                };
                let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                // `pid (comm) S ppid ...`: the state, then the parent.
                let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
                let ppid = stat
                    .rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                    .and_then(|p| p.parse::<u32>().ok());
                let ppid_ok = ppid == Some(parent)
                    && cwd.as_ref().is_none_or(|c| {
                        std::fs::read_link(e.path().join("cwd")).ok().as_ref() == Some(c)
                    });
                if ppid_ok && String::from_utf8_lossy(&cmd).contains(needle) {
                    // Once it has made itself non-dumpable, its /proc
                    // files belong to root, not to the user it runs as.
                    let owner = || std::fs::metadata(e.path().join("stat")).map(|m| m.uid());
                    while owner().is_ok_and(|uid| uid != 0) {
                        std::thread::yield_now();
                    }
                    assert_eq!(owner().ok(), Some(0), "the pack child stayed dumpable");
                    // SAFETY: kill has no memory preconditions.
                    unsafe { libc::kill(pid, libc::SIGSTOP) };
                    return Some(pid);
                }
            }
        }
        None
    })
}

#[test]
fn a_stopped_pack_child_is_killed_within_seconds_and_the_home_kept() {
    if common::skip_unless_root("a_stopped_pack_child_is_killed_within_seconds_and_the_home_kept") {
        return;
    }
    let (dir, host) = host_in_tempdir();
    let cfg = directory_cfg(dir.path(), "");
    let agent = start_agent(dir.path(), &cfg);
    agent.wait_connected();
    agent.ok(&["login", "--user", "nobody", "--session", "p1"]);
    let home = dir.path().join("home/nobody");
    many_files(&home);
    let stopper = stop_child_in(agent.pid().unwrap(), "pack-home", None);
    let out = agent.cli(&["logout", "--session", "p1"]);
    assert!(stopper.join().unwrap().is_some(), "no pack-home child seen");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("was stopped for more than"), "{said}");
    assert!(
        host.with(|h| h.head_bytes("nobody")).is_none(),
        "nothing committed"
    );
    assert_eq!(files_in(&home), 20_000, "the home is left as it was");
}

#[test]
fn four_stopped_pack_children_hold_no_thread_another_login_needs() {
    if common::skip_unless_root("four_stopped_pack_children_hold_no_thread_another_login_needs") {
        return;
    }
    let (dir, _host) = host_in_tempdir();
    let agent = start_agent(dir.path(), &directory_cfg(dir.path(), ""));
    agent.wait_connected();
    // As many users as the agent has blocking threads (4): each stops
    // the child that packs their home at logout.
    let users = ["daemon", "bin", "sys", "nobody"];
    let homes = dir.path().join("home");
    for user in users {
        agent.ok(&["login", "--user", user, "--session", &format!("{user}-1")]);
        many_files(&homes.join(user));
    }
    let logouts: Vec<Output> = std::thread::scope(|s| {
        let stoppers: Vec<_> = users
            .iter()
            .map(|u| stop_child_in(agent.pid().unwrap(), "pack-home", Some(homes.join(u))))
            .collect();
        let running: Vec<_> = users
            .iter()
            .map(|u| {
                let agent = &agent;
                s.spawn(move || agent.cli(&["logout", "--session", &format!("{u}-1")]))
            })
            .collect();
        let stopped: Vec<i32> = stoppers
            .into_iter()
            .map(|t| t.join().unwrap().expect("a pack-home child of each user"))
            .collect();
        // Another user's login needs the blocking threads (retrieve,
        // fsync): it goes through while all four children are still
        // stopped, none killed yet (that comes 5 s after each stop).
        agent.ok(&["login", "--user", "zed", "--session", "z1"]);
        for pid in &stopped {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rsplit_once(')')
                .map(|(_, r)| r.trim_start().chars().next());
            assert_eq!(
                state,
                Some(Some('T')),
                "pack child {pid} no longer stopped when the login finished: {stat}"
            );
        }
        running.into_iter().map(|t| t.join().unwrap()).collect()
    });
    for (user, out) in users.iter().zip(&logouts) {
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && said.contains("was stopped for more than"),
            "{user}: {said}"
        );
        assert_eq!(
            files_in(&homes.join(user)),
            20_000,
            "{user}'s home is left as it was"
        );
    }
    agent.ok(&["logout", "--session", "z1"]);
}

#[test]
fn a_refused_home_over_the_users_share_is_held_in_the_home_and_pushed_from_it() {
    if common::skip_unless_root(
        "a_refused_home_over_the_users_share_is_held_in_the_home_and_pushed_from_it",
    ) {
        return;
    }
    let (dir, host) = host_in_tempdir();
    let cfg = directory_cfg(dir.path(), "preserved_per_user_mib = 1\n");
    let agent = start_agent(dir.path(), &cfg);
    agent.wait_connected();
    agent.ok(&["login", "--user", "daemon", "--session", "h1"]);
    let home = dir.path().join("home/daemon");
    let work = noise(2 << 20, 31);
    std::fs::write(home.join("report.bin"), &work).unwrap();
    host.with(|h| h.refuse_updates = Some(uve_protocol::message::ErrorCode::QuotaExceeded));
    let out = agent.cli(&["logout", "--session", "h1"]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success() && said.contains("HELD"), "{said}");
    // The home, daemon's own and packed in this boot, holds the bytes; the
    // root-owned archive's space is given back.
    assert!(said.contains(home.to_str().unwrap()), "{said}");
    assert!(!dir.path().join("state/uif/daemon.tar").exists());
    assert_eq!(std::fs::read(home.join("report.bin")).unwrap(), work);
    let refused = agent.cli(&["login", "--user", "daemon", "--session", "h2"]);
    assert!(!refused.status.success());
    assert_eq!(std::fs::read(home.join("report.bin")).unwrap(), work);
    // Pushed once the cause is fixed: the home packed again, as daemon.
    host.with(|h| h.refuse_updates = None);
    let list = agent.ok(&["preserved", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let id = v["preserved"][0]["id"].as_str().unwrap().to_string();
    agent.ok(&["preserved", "push", "--id", &id]);
    let tar = host
        .with(|h| h.head_bytes("daemon"))
        .expect("the held home was not pushed");
    assert!(tar_names(&tar).contains(&"report.bin".to_string()));
    agent.ok(&["login", "--user", "daemon", "--session", "h3"]);
    assert_eq!(std::fs::read(home.join("report.bin")).unwrap(), work);
}

/// A directory-mode configuration with homes under `dir/home`, after the
/// top-level lines `top`.
fn directory_cfg(dir: &Path, top: &str) -> String {
    format!(
        "{top}[uif]\nmode = \"directory\"\nhome = \"{}/home/{{user}}\"\n",
        dir.display()
    )
}

/// 20,000 small files in `home` (20 MiB): a pack of it runs long enough
/// for a test to catch its child.
fn many_files(home: &Path) {
    for d in 0..100 {
        let sub = home.join(format!("d{d}"));
        std::fs::create_dir(&sub).unwrap();
        for f in 0..200 {
            std::fs::write(sub.join(format!("f{f}")), noise(2048, d * 1000 + f)).unwrap();
        }
    }
}

/// The files [`many_files`] made that are still in `home`.
fn files_in(home: &Path) -> usize {
    (0..100)
        .map(|d| {
            std::fs::read_dir(home.join(format!("d{d}")))
                .unwrap()
                .count()
        })
        .sum()
}

#[test]
fn one_users_stopped_pack_child_costs_no_other_user_the_shutdown_flush() {
    if common::skip_unless_root(
        "one_users_stopped_pack_child_costs_no_other_user_the_shutdown_flush",
    ) {
        return;
    }
    let (dir, host) = host_in_tempdir();
    // A shutdown budget shorter than the 5 s a stopped child is given:
    // only a flush that does not wait behind daemon's commits nobody's.
    let cfg = directory_cfg(dir.path(), "shutdown_flush_secs = 3\n");
    let mut agent = start_agent(dir.path(), &cfg);
    agent.wait_connected();
    // daemon comes first in name order, the order flushes once ran in.
    for (user, session) in [("daemon", "f1"), ("nobody", "f2")] {
        agent.ok(&["login", "--user", user, "--session", session]);
    }
    let homes = dir.path().join("home");
    many_files(&homes.join("daemon"));
    std::fs::write(homes.join("nobody/notes.txt"), b"nobody's work\n").unwrap();
    let stopper = stop_child_in(
        agent.pid().unwrap(),
        "pack-home",
        Some(homes.join("daemon")),
    );
    // The shutdown flush (SIGTERM): daemon's pack child is stopped.
    agent.terminate();
    assert!(
        stopper.join().unwrap().is_some(),
        "no pack-home child of daemon seen"
    );
    let tar = host
        .with(|h| h.head_bytes("nobody"))
        .expect("nobody's work was not committed");
    assert!(tar_names(&tar).contains(&"notes.txt".to_string()));
    assert!(host.with(|h| h.head_bytes("daemon")).is_none());
    assert_eq!(
        files_in(&homes.join("daemon")),
        20_000,
        "daemon's home is left as it was"
    );
}

/// A size-limited tmpfs mounted for a test, unmounted when dropped.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(at: PathBuf, mib: u64) -> SmallFs {
        std::fs::create_dir_all(&at).unwrap();
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0755"),
                "tmpfs",
            ])
            .arg(&at)
            .status()
            .unwrap();
        assert!(st.success(), "mount a tmpfs on {}", at.display());
        SmallFs(at)
    }

    fn used(&self) -> u64 {
        let st = nix::sys::statvfs::statvfs(&self.0).unwrap();
        (st.blocks() - st.blocks_free()) * st.fragment_size()
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_home_that_packs_past_the_state_floor_is_refused_and_leaves_nothing() {
    if common::skip_unless_root(
        "a_home_that_packs_past_the_state_floor_is_refused_and_leaves_nothing",
    ) {
        return;
    }
    let (dir, host) = host_in_tempdir();
    // The agent's state on a 96 MiB filesystem of its own, 32 MiB floor.
    let small = SmallFs::mount(dir.path().join("state"), 96);
    let cfg = directory_cfg(dir.path(), "state_floor_mib = 32\n");
    let agent = start_agent(dir.path(), &cfg);
    agent.wait_connected();
    agent.ok(&["login", "--user", "nobody", "--session", "b1"]);
    agent.ok(&["login", "--user", "daemon", "--session", "b2"]);
    // nobody's 70 GiB sparse file (costs nothing in the home).
    let home = dir.path().join("home/nobody");
    let big = std::fs::File::create(home.join("x")).unwrap();
    big.set_len(70 << 30).unwrap();
    std::fs::write(home.join("notes.txt"), b"keep me\n").unwrap();
    let before = small.used();
    let (code, said) = agent.said(&["logout", "--session", "b1"]);
    assert_ne!(code, 0, "{said}");
    assert!(
        said.contains("packs to more than the state filesystem can take"),
        "{said}"
    );
    assert!(
        small.used() <= before + (1 << 20),
        "the stopped pack left bytes in the state"
    );
    assert_eq!(std::fs::read(home.join("notes.txt")).unwrap(), b"keep me\n");
    assert_eq!(std::fs::metadata(home.join("x")).unwrap().len(), 70 << 30);
    // Another user's logout works afterwards.
    std::fs::write(dir.path().join("home/daemon/todo.txt"), b"daemon's work\n").unwrap();
    agent.ok(&["logout", "--session", "b2"]);
    assert!(host.with(|h| h.head_bytes("daemon")).is_some());
    drop(agent);
    drop(small);
}

/// Files, a symlink and excluded paths in `home`; returns the big file's
/// bytes.
fn fill_home(home: &std::path::Path) -> Vec<u8> {
    let big = noise(700_000, 3);
    std::fs::create_dir_all(home.join("docs/deep")).unwrap();
    std::fs::write(home.join("docs/deep/report.bin"), &big).unwrap();
    std::fs::write(home.join("notes.txt"), b"remember the milk\n").unwrap();
    std::os::unix::fs::symlink("docs/deep/report.bin", home.join("link")).unwrap();
    std::fs::create_dir_all(home.join(".cache")).unwrap();
    std::fs::write(home.join(".cache/junk"), b"junk").unwrap();
    std::fs::write(home.join("scratch.tmp"), b"tmp").unwrap();
    big
}

/// The entry names of a tar, sorted.
fn tar_names(tar: &[u8]) -> Vec<String> {
    let mut names: Vec<String> = tar::Archive::new(tar)
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// `home` holds what [`fill_home`] wrote, minus the excluded paths, owned
/// by `nobody` when the test runs as root.
fn home_restored(home: &std::path::Path, big: &[u8], root: bool) {
    assert_eq!(
        std::fs::read(home.join("docs/deep/report.bin")).unwrap(),
        big
    );
    assert_eq!(
        std::fs::read(home.join("notes.txt")).unwrap(),
        b"remember the milk\n"
    );
    assert_eq!(
        std::fs::read_link(home.join("link")).unwrap(),
        std::path::Path::new("docs/deep/report.bin")
    );
    assert!(!home.join(".cache").exists());
    if root {
        for p in ["", "docs", "docs/deep/report.bin", "notes.txt"] {
            let m = std::fs::symlink_metadata(home.join(p)).unwrap();
            assert_eq!((m.uid(), m.gid()), (65534, 65534), "owner of {p:?}");
        }
    }
}

/// Writes `bytes` into `img`, takes the host down and logs `session`
/// out: the update is spooled.
fn logout_spools(agent: &AgentProc, host: &TestHost, (img, bytes): (&Path, &[u8]), session: &str) {
    std::fs::write(img, bytes).unwrap();
    host.down();
    let out = agent.ok(&["logout", "--session", session]);
    assert!(out.contains("spooled"), "{out}");
}

#[test]
fn host_down_at_logout_spools_and_delivers_also_after_sigkill() {
    let (dir, host) = host_in_tempdir();
    let original = noise(1 << 20, 11);
    host.with(|h| h.seed("bob", &original));
    let mut agent = connected_agent(dir.path(), &file_mode(dir.path()));
    let img = uif(dir.path(), "bob");

    // 1. Host down at logout; it comes back while the agent runs.
    agent.ok(&["login", "--user", "bob", "--session", "a"]);
    let mut v2 = original.clone();
    v2[10..20].copy_from_slice(b"second....");
    logout_spools(&agent, &host, (&img, &v2), "a");
    assert_eq!(agent.status()["spooled_updates"], 1);
    host.up();
    host.wait_head("spooled update committed", "bob", &v2);
    let c = host.last_commit();
    assert_eq!(c.cause, UpdateCause::Spooled);
    assert!(!c.conflict, "spooled update should commit on its base");
    agent.wait_spool_empty();

    // 2. Host down at logout, agent SIGKILLed, restarted, host back.
    agent.ok(&["login", "--user", "bob", "--session", "b"]);
    assert_eq!(std::fs::read(&img).unwrap(), v2);
    let mut v3 = v2.clone();
    v3[500_000..500_010].copy_from_slice(b"third.....");
    logout_spools(&agent, &host, (&img, &v3), "b");
    agent.kill();
    agent.spawn().unwrap();
    assert_eq!(agent.status()["spooled_updates"], 1);
    let commits_before = host.with(|h| h.commits.len());
    host.up();
    host.wait_head("spooled update committed after restart", "bob", &v3);
    agent.wait_spool_empty();
    // Delivered exactly once.
    assert_eq!(host.with(|h| h.commits.len()), commits_before + 1);
    assert_eq!(agent.terminate(), Some(0));
}

#[test]
fn connection_reset_during_retrieve_is_retried_within_the_login() {
    let (dir, host) = host_in_tempdir();
    let data = noise(2 << 20, 33);
    host.with(|h| {
        h.seed("olga", &data);
        h.drop_on_fetch = true;
    });
    let agent = connected_agent(dir.path(), &file_mode(dir.path()));
    let out = agent.ok(&["login", "--user", "olga", "--session", "o1"]);
    assert!(out.contains("retrieved version"), "{out}");
    assert_eq!(host.with(|h| h.connections), 2, "reconnected once");
    assert_eq!(std::fs::read(uif(dir.path(), "olga")).unwrap(), data);
    // The partial file of the interrupted attempt is gone: the UIF
    // directory holds the UIF and nothing else.
    let names: Vec<String> = std::fs::read_dir(dir.path().join("uif"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["olga.img"]);
}

/// A larger UIF (64 MiB): prints timings and the agent's peak RSS. Ignored
/// by default (slow in debug builds); run with `--ignored --nocapture`,
/// ideally with `UVE_AGENT_BIN` pointing at the static release build.
#[test]
#[ignore]
fn large_uif_round_trip_reports_rss() {
    let (dir, host) = host_in_tempdir();
    let data = noise(64 << 20, 21);
    host.with(|h| h.seed("big", &data));
    let agent = connected_agent(dir.path(), &file_mode(dir.path()));
    let t = std::time::Instant::now();
    agent.ok(&["login", "--user", "big", "--session", "b1"]);
    let retrieve = t.elapsed();
    let img = uif(dir.path(), "big");
    assert_eq!(std::fs::read(&img).unwrap().len(), data.len());
    let mut changed = data.clone();
    for i in 0..changed.len() / 4096 {
        changed[i * 4096] ^= 0xff; // every chunk changes: a full upload
    }
    std::fs::write(&img, &changed).unwrap();
    let t = std::time::Instant::now();
    agent.ok(&["logout", "--session", "b1"]);
    let update = t.elapsed();
    assert!(host.with(|h| h.head_bytes("big").unwrap() == changed));
    let hwm = std::fs::read_to_string(format!("/proc/{}/status", agent.pid().unwrap()))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .map(str::to_string);
    eprintln!(
        "64 MiB: retrieve {retrieve:?}, full update {update:?}, agent {hwm:?} ({})",
        common::agent_bin().display()
    );
}

fn inode(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().ino()
}

/// Logs `user` in and out once with a small change, so the agent holds a
/// stamped copy of a committed version; returns that version's bytes.
fn settle_a_version(agent: &AgentProc, host: &TestHost, user: &str, data: &[u8]) -> Vec<u8> {
    host.with(|h| h.seed(user, data));
    let out = agent.ok(&["login", "--user", user, "--session", "warmup"]);
    assert!(!out.contains("patched in place"), "cold login: {out}");
    let img = agent.dir.join(format!("uif/{user}.img"));
    let mut mine = data.to_vec();
    mine[100..110].copy_from_slice(b"warming up");
    std::fs::write(&img, &mine).unwrap();
    let out = agent.ok(&["logout", "--session", "warmup"]);
    assert!(out.contains("committed as version"), "{out}");
    assert!(agent.state.join(format!("cache/{user}.stamp")).exists());
    mine
}

/// A [`hooked`] agent on which `user` settled a version of `size` noise
/// bytes (`seed`; see [`settle_a_version`]): the directory, the host, the
/// agent, `user`'s UIF and the settled bytes.
fn settled(
    user: &str,
    size: usize,
    seed: u64,
) -> (tempfile::TempDir, TestHost, AgentProc, PathBuf, Vec<u8>) {
    let (dir, host, agent) = hooked();
    let img = uif(dir.path(), user);
    let base = settle_a_version(&agent, &host, user, &noise(size, seed));
    (dir, host, agent, img, base)
}

/// Stores `next` as `user`'s head and logs `user` in to `session`: the
/// file is patched in place. Returns that version and the chunks fetched.
fn patched_login(
    agent: &AgentProc,
    host: &TestHost,
    (user, session): (&str, &str),
    next: &[u8],
) -> (u64, usize) {
    let v = host.with(|h| h.seed(user, next));
    let before = host.with(|h| h.chunk_fetches);
    let out = agent.ok(&["login", "--user", user, "--session", session]);
    assert!(out.contains(&format!("retrieved version {v}")), "{out}");
    assert!(out.contains("patched in place"), "{out}");
    (v, host.with(|h| h.chunk_fetches) - before)
}

/// The login that answered `out` did not patch `img`: the file holds
/// `next`, written as a new file (not inode `ino`).
fn assert_rewritten(out: &str, img: &Path, next: &[u8], ino: u64) {
    assert!(!out.contains("patched in place"), "{out}");
    assert_eq!(std::fs::read(img).unwrap(), next);
    assert_ne!(inode(img), ino, "rewritten as a new file");
}

/// `data` with `len` bytes overwritten at each of `places`.
fn scribble(data: &[u8], places: &[usize], len: usize, seed: u64) -> Vec<u8> {
    let mut out = data.to_vec();
    for (i, p) in places.iter().enumerate() {
        out[*p..*p + len].copy_from_slice(&noise(len, seed + i as u64));
    }
    out
}

#[test]
fn warm_login_patches_only_the_changed_chunks_in_place() {
    let (_dir, host, agent, img, base) = settled("pat", 4 << 20, 41);
    let ino = inode(&img);
    let total = base.len() / (64 << 10);

    // 1. Another VM changed three places: only their chunks are fetched
    //    and written; the file keeps its inode (patched, not replaced).
    let next = scribble(&base, &[300_000, 1_900_000, 3_500_000], 50, 1);
    let (_, fetched) = patched_login(&agent, &host, ("pat", "p1"), &next);
    assert!((3..=6).contains(&fetched), "fetched {fetched} of ~{total}");
    assert_eq!(std::fs::read(&img).unwrap(), next, "patched bytes");
    assert_eq!(inode(&img), ino, "patched in place");
    assert!(!agent.state.join("cache/pat.patching").exists());
    let mut mine = next.clone();
    mine[0] ^= 1;
    std::fs::write(&img, &mine).unwrap();
    agent.ok(&["logout", "--session", "p1"]);

    // 2. A shorter version whose two halves swapped places: every chunk
    //    is already in the file, most at another offset; they are moved,
    //    not fetched, and the file shrinks.
    let half = 1 << 20;
    let mut swapped = mine[2 * half..3 * half].to_vec();
    swapped.extend_from_slice(&mine[..2 * half]);
    let (v, fetched) = patched_login(&agent, &host, ("pat", "p2"), &swapped);
    let chunks = host.with(|h| h.versions[&("pat".to_string(), v)].chunks.len());
    assert!(
        fetched * 4 <= chunks,
        "fetched {fetched} of {chunks} chunks for a swap"
    );
    assert_eq!(std::fs::read(&img).unwrap(), swapped, "moved bytes");
    assert_eq!(inode(&img), ino);
    std::fs::write(&img, [&swapped[..], b"grown"].concat()).unwrap();
    agent.ok(&["logout", "--session", "p2"]);
}

/// After a block-aligned insertion or deletion (4 KiB inserted at 1 MiB,
/// 8 KiB removed at 5 MiB) the file is shifted in place (`fallocate`) and
/// only the chunks around the change are fetched, though the chunks after
/// it moved by more than the relocation budget; an insertion of 1,000
/// bytes (not whole blocks) still rewrites the file.
#[test]
fn a_block_aligned_insertion_or_deletion_shifts_the_file_in_place() {
    let (_dir, host, agent, img, base) = settled("ins", 24 << 20, 43);
    let ino = inode(&img);
    let mut next = base[..1 << 20].to_vec();
    next.extend_from_slice(&noise(4096, 44));
    next.extend_from_slice(&base[1 << 20..]);
    let (_, fetched) = patched_login(&agent, &host, ("ins", "i1"), &next);
    assert!(
        fetched <= 3,
        "fetched {fetched} chunks for a 4 KiB insertion"
    );
    assert!(std::fs::read(&img).unwrap() == next, "inserted bytes");
    assert_eq!(inode(&img), ino, "shifted in place");
    agent.ok(&["logout", "--session", "i1"]);

    let mut shorter = next[..5 << 20].to_vec();
    shorter.extend_from_slice(&next[(5 << 20) + 8192..]);
    let (_, fetched) = patched_login(&agent, &host, ("ins", "i2"), &shorter);
    assert!(
        fetched <= 3,
        "fetched {fetched} chunks for an 8 KiB deletion"
    );
    assert!(std::fs::read(&img).unwrap() == shorter, "collapsed bytes");
    assert_eq!(inode(&img), ino, "shifted in place");
    agent.ok(&["logout", "--session", "i2"]);

    let mut odd = noise(1000, 45);
    odd.extend_from_slice(&shorter);
    host.with(|h| h.seed("ins", &odd));
    let out = agent.ok(&["login", "--user", "ins", "--session", "i3"]);
    assert_rewritten(&out, &img, &odd, ino);
    agent.ok(&["logout", "--session", "i3"]);
}

#[test]
fn zero_blocks_are_never_fetched_and_stay_holes() {
    let (dir, host, agent) = hooked();
    let mut data = noise(4 << 20, 49);
    data[1 << 20..(5 << 19) + 300_000].fill(0);
    host.with(|h| h.seed("zoe", &data));
    let m = uve_protocol::chunker::chunk_stream(&data[..], |_, _| Ok(())).unwrap();
    let zero_blocks = m.chunks.iter().filter(|c| c.is_zero_block()).count();
    assert!(zero_blocks >= 2, "{zero_blocks} zero blocks in the seed");
    let others: std::collections::HashSet<_> = m
        .chunks
        .iter()
        .filter(|c| !c.is_zero_block())
        .map(|c| c.hash)
        .collect();
    agent.ok(&["login", "--user", "zoe", "--session", "z0"]);
    assert_eq!(
        host.with(|h| h.chunk_fetches),
        others.len(),
        "every chunk but the zero block fetched once"
    );
    let img = uif(dir.path(), "zoe");
    assert!(std::fs::read(&img).unwrap() == data, "retrieved bytes");
    let held = std::fs::metadata(&img).unwrap().blocks() * 512;
    let holes = (zero_blocks as u64) * u64::from(uve_protocol::manifest::ZERO_BLOCK.len);
    // st_blocks also counts the extent tree's blocks: 16 KiB of slack.
    assert!(
        held <= data.len() as u64 - holes + (16 << 10),
        "the {zero_blocks} zero blocks are holes: {held} bytes held of {}",
        data.len()
    );
    agent.ok(&["logout", "--session", "z0"]);
}

#[test]
fn a_patch_that_zeroes_a_region_leaves_no_old_bytes_there() {
    // Another VM zeroed 1 MiB in the middle: the new version's chunks
    // there are all zeroes, and the file still holds the old bytes at
    // those offsets. The patch must write (or punch) the zeroes.
    let (_dir, host, agent, img, base) = settled("zed", 4 << 20, 47);
    let ino = inode(&img);
    let mut next = base.clone();
    next[1 << 20..2 << 20].fill(0);
    patched_login(&agent, &host, ("zed", "z1"), &next);
    assert_eq!(inode(&img), ino, "patched in place");
    let now = std::fs::read(&img).unwrap();
    assert!(
        now == next,
        "the zeroed region reads as zeroes after the patch"
    );
    agent.ok(&["logout", "--session", "z1"]);
}

#[test]
fn a_file_changed_behind_the_agents_back_is_not_patched() {
    let (_dir, host, agent, img, base) = settled("tom", 2 << 20, 43);
    // Someone writes into the detached image: same size, one byte.
    let mut tampered = base.clone();
    tampered[1_000_000] ^= 0x55;
    std::fs::write(&img, &tampered).unwrap();
    let next = scribble(&base, &[1_500_000], 20, 2);
    host.with(|h| h.seed("tom", &next));
    let ino = inode(&img);
    let out = agent.ok(&["login", "--user", "tom", "--session", "t1"]);
    assert_rewritten(&out, &img, &next, ino);
}

#[test]
fn a_patch_interrupted_mid_way_is_followed_by_a_full_retrieve() {
    let (dir, host, agent, img, base) = settled("ida", 4 << 20, 47);
    let ino = inode(&img);
    // Six changed chunks; the connection drops after two were fetched (and
    // written into the file): the file is half patched. The login retries
    // on a new connection, finds the marker and rewrites the file whole.
    let places: Vec<usize> = (0..6).map(|i| 200_000 + i * 600_000).collect();
    let next = scribble(&base, &places, 30, 3);
    host.with(|h| {
        h.seed("ida", &next);
        h.drop_after_fetches = Some(2);
    });
    let out = agent.ok(&["login", "--user", "ida", "--session", "i1"]);
    assert_eq!(host.with(|h| h.connections), 2, "reconnected once");
    assert_rewritten(&out, &img, &next, ino);
    let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap();
    assert!(log.contains("interrupted while patching"), "{log}");
    assert!(!agent.state.join("cache/ida.patching").exists());
}

#[test]
fn a_patch_marker_left_by_a_crash_forces_a_full_retrieve() {
    let (_dir, host, mut agent, img, base) = settled("kim", 2 << 20, 53);
    // The agent dies while patching: the marker is what it leaves behind
    // (written durably before the first byte of the file is touched).
    agent.kill();
    std::fs::write(agent.state.join("cache/kim.patching"), b"crash").unwrap();
    agent.spawn().unwrap();
    agent.wait_connected();
    let next = scribble(&base, &[700_000], 20, 4);
    host.with(|h| h.seed("kim", &next));
    let ino = inode(&img);
    let out = agent.ok(&["login", "--user", "kim", "--session", "k1"]);
    assert_rewritten(&out, &img, &next, ino);
    assert!(!agent.state.join("cache/kim.patching").exists());
    // Known again: the next warm login patches.
    let mut mine = next.clone();
    mine[5] ^= 1;
    std::fs::write(&img, &mine).unwrap();
    agent.ok(&["logout", "--session", "k1"]);
    let again = scribble(&mine, &[1_200_000], 20, 5);
    host.with(|h| h.seed("kim", &again));
    let out = agent.ok(&["login", "--user", "kim", "--session", "k2"]);
    assert!(out.contains("patched in place"), "{out}");
    assert_eq!(std::fs::read(&img).unwrap(), again);
}

#[test]
fn a_verb_that_times_out_ends_its_wait_and_the_logout_still_commits() {
    let (dir, host) = host_in_tempdir();
    // The detach hook takes 3 s: longer than the verb's --timeout.
    let cfg = format!(
        "[uif]\nmode = \"file\"\npath = \"{0}/uif/{{user}}.img\"\ndetach = [\"/bin/sleep\", \"3\"]\n",
        dir.path().display()
    );
    let agent = connected_agent(dir.path(), &cfg);
    agent.ok(&["login", "--user", "tim", "--session", "t1"]);
    let mine = noise(300_000, 51);
    std::fs::write(uif(dir.path(), "tim"), &mine).unwrap();
    let out = agent.cli(&["--timeout", "1", "logout", "--session", "t1"]);
    assert_eq!(out.status.code(), Some(75), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no answer from the agent within 1s"));
    must("the logout's commit", LONG, || {
        host.with(|h| (h.head_bytes("tim") == Some(mine.clone())).then_some(()))
    });
    must("the session ended", LONG, || {
        (agent.status()["sessions"]
            .as_array()
            .is_some_and(Vec::is_empty))
        .then_some(())
    });
}

#[test]
fn an_expired_upload_is_started_again_then_spooled_never_preserved() {
    let (dir, host, agent) = hooked();
    let img = uif(dir.path(), "exa");
    // Expired twice: the third start commits.
    agent.ok(&["login", "--user", "exa", "--session", "x1"]);
    let first = noise(300_000, 52);
    std::fs::write(&img, &first).unwrap();
    host.with(|h| h.expire_uploads = 2);
    let out = agent.ok(&["logout", "--session", "x1"]);
    assert!(out.contains("committed as version"), "{out}");
    assert!(host.with(|h| h.head_bytes("exa")) == Some(first));
    // Expired at every start: spooled (not preserved), delivered later.
    agent.ok(&["login", "--user", "exa", "--session", "x2"]);
    let second = noise(300_000, 53);
    std::fs::write(&img, &second).unwrap();
    host.with(|h| h.expire_uploads = 3);
    let out = agent.ok(&["logout", "--session", "x2"]);
    assert!(out.contains("spooled"), "{out}");
    assert_eq!(agent.status()["preserved"], 0);
    must("the spooled update's commit", LONG, || {
        host.with(|h| (h.head_bytes("exa") == Some(second.clone())).then_some(()))
    });
}

#[test]
fn logout_of_an_unchanged_uif_commits_nothing() {
    let (dir, host, agent) = hooked();
    let data = noise(1 << 20, 59);
    let v1 = host.with(|h| h.seed("una", &data));
    agent.ok(&["login", "--user", "una", "--session", "u1"]);
    let before = host.with(|h| (h.commits.len(), h.chunk_uploads));
    let out = agent.ok(&["logout", "--session", "u1"]);
    assert!(
        out.contains(&format!("unchanged since version {v1}; nothing committed")),
        "{out}"
    );
    assert_eq!(host.with(|h| (h.commits.len(), h.chunk_uploads)), before);
    // The file was not written since the retrieve stamped it: not re-read.
    let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap();
    assert!(log.contains("not re-chunked"), "{log}");
    assert_eq!(host.with(|h| h.heads["una"]), v1);
    assert!(host.with(|h| h.sessions_ended.contains(&"u1".to_string())));
    assert_eq!(agent.status()["spooled_updates"], 0);

    // A changed file is committed as before, on the same base.
    agent.ok(&["login", "--user", "una", "--session", "u2"]);
    let img = uif(dir.path(), "una");
    let mut changed = data.clone();
    changed[7] ^= 1;
    std::fs::write(&img, &changed).unwrap();
    let out = agent.ok(&["logout", "--session", "u2"]);
    assert!(out.contains("committed as version"), "{out}");
    let c = host.last_commit();
    assert_eq!(c.base, Some(v1));
    assert_eq!(host.with(|h| h.head_bytes("una").unwrap()), changed);

    // A change undone before logout is no change.
    let v2 = host.with(|h| h.heads["una"]);
    agent.ok(&["login", "--user", "una", "--session", "u3"]);
    std::fs::write(&img, &data).unwrap();
    std::fs::write(&img, &changed).unwrap();
    let out = agent.ok(&["logout", "--session", "u3"]);
    assert!(
        out.contains(&format!("unchanged since version {v2}")),
        "{out}"
    );

    // A new user who leaves the empty UIF empty commits nothing either.
    let out = agent.ok(&["login", "--user", "neu", "--session", "n1"]);
    assert!(out.contains("new user"), "{out}");
    let out = agent.ok(&["logout", "--session", "n1"]);
    assert!(out.contains("unchanged (still the empty UIF)"), "{out}");
    assert!(host.with(|h| !h.heads.contains_key("neu")));
}

#[test]
fn a_spooled_update_whose_file_changed_since_is_sent_as_the_file_is_now() {
    let (dir, host, agent) = hooked();
    let img = uif(dir.path(), "sam");
    let v1 = noise(2 << 20, 61);
    host.with(|h| h.seed("sam", &v1));
    agent.ok(&["login", "--user", "sam", "--session", "s1"]);
    let v2 = scribble(&v1, &[900_000], 100, 6);
    logout_spools(&agent, &host, (&img, &v2), "s1");
    // While the update waits, the file is written again where the spooled
    // manifest says new bytes are: the stamp no longer matches, so the
    // bytes read for upload are hashed, found changed, and the file is
    // chunked and sent as it is now.
    let v3 = scribble(&v2, &[900_050], 10, 7);
    std::fs::write(&img, &v3).unwrap();
    host.up();
    host.wait_head("the file's current bytes committed", "sam", &v3);
    agent.wait_spool_empty();
}
