//! Directory-mode unpack and pack against a hostile user: a real process
//! running as the home's unprivileged owner (uid 54321) keeps swapping the
//! directories and files under `.<name>.uve-new`, the home and
//! `.<name>.uve-old` for symlinks into a root-owned sentinel tree outside
//! the home, and tries to hard-link the sentinel's root-only secret, while
//! the agent unpacks (login) and packs (logout). Nothing outside the home
//! may change, and the secret may never reach the host.
//!
//! The racer is this test binary re-executed as uid 54321 (the
//! `racer_process` entry, a no-op in a normal run).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation,
    missing_docs
)]

mod common;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{AgentProc, TestHost, start_agent};

/// The unprivileged owner of the home (not in /etc/passwd: `uif.owner`).
const UID: u32 = 54321;
/// Distinctive bytes of the root-only secret outside the home.
const SECRET: &[u8] = b"UVE-SENTINEL-SECRET-9f1c2e7a4b3d";
/// Login/logout rounds raced.
const ROUNDS: usize = 3;
/// The racer gives up after this long even if nobody stops it.
const RACER_LIMIT: Duration = Duration::from_secs(90);

/// Mode, owner and content (or link target) of every path under `root`,
/// read without following symlinks.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (u32, u32, u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        let content = if m.file_type().is_symlink() {
            std::fs::read_link(&p)
                .unwrap()
                .into_os_string()
                .into_encoded_bytes()
        } else if m.is_file() {
            std::fs::read(&p).unwrap()
        } else {
            let mut names: Vec<OsString> = std::fs::read_dir(&p)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            for n in &names {
                todo.push(p.join(n));
            }
            names.join(std::ffi::OsStr::new("/")).into_encoded_bytes()
        };
        out.insert(p, (m.mode(), m.uid(), m.gid(), content));
    }
    out
}

/// The sentinel tree: root-owned directories, files of known modes, and a
/// root-only secret.
fn make_sentinel(outside: &Path) -> PathBuf {
    let etc = outside.join("etc");
    std::fs::create_dir_all(etc.join("sub")).unwrap();
    std::fs::write(etc.join("hosts"), b"127.0.0.1 localhost\n").unwrap();
    std::fs::write(etc.join("sub/conf"), b"setting = 1\n").unwrap();
    let secret = etc.join("shadow");
    std::fs::write(&secret, SECRET).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    for d in [outside, &etc, &etc.join("sub")] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    secret
}

/// A home of 30 directories x 4 subdirectories x 25 small files (plus a
/// file per directory), directories mode 0777 so a chmod that followed a
/// swapped-in symlink would show on the sentinel.
fn big_home_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: String, kind: tar::EntryType, mode: u32, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, path, data).unwrap();
    };
    for d in 0..30 {
        add(format!("d{d:02}"), tar::EntryType::Directory, 0o777, b"");
        add(
            format!("d{d:02}/top.txt"),
            tar::EntryType::Regular,
            0o644,
            format!("top {d}\n").as_bytes(),
        );
        for e in 0..4 {
            add(
                format!("d{d:02}/e{e}"),
                tar::EntryType::Directory,
                0o777,
                b"",
            );
            for f in 0..25 {
                add(
                    format!("d{d:02}/e{e}/f{f:02}"),
                    tar::EntryType::Regular,
                    0o644,
                    format!("file {d} {e} {f}\n").as_bytes(),
                );
            }
        }
    }
    b.into_inner().unwrap()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn racing_owner_cannot_reach_outside_the_home() {
    if common::skip_unless_root("racing_owner_cannot_reach_outside_the_home") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    traversable_homes(dir.path());
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let secret = make_sentinel(&outside);
    let before = snapshot(&outside);

    let host = TestHost::start(dir.path());
    host.with(|h| h.seed("alice", &big_home_tar()));
    let cfg = format!(
        "[uif]\nmode = \"directory\"\nhome = \"{}/home/{{user}}\"\nowner = \"{UID}:{UID}\"\n",
        dir.path().display()
    );
    let agent = start_agent(dir.path(), &cfg);
    agent.wait_connected();

    let home = dir.path().join("home/alice");
    let stop = dir.path().join("stop-racer");
    let mut racer = start_racer(&home, &outside, &secret, &stop);
    let results = log_in_and_out(&agent, &home, &secret);
    std::fs::write(&stop, b"").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while racer.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = racer.kill();
    let racer_status = racer.wait().unwrap();

    for (what, ok, out) in &results {
        eprintln!(
            "{what}: ok={ok} {}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // Nothing outside the home changed.
    let after = snapshot(&outside);
    for (p, v) in &before {
        assert_eq!(after.get(p), Some(v), "sentinel {} changed", p.display());
    }
    assert_eq!(
        before.len(),
        after.len(),
        "entries appeared in the sentinel"
    );
    secret_never_reached_the_host(&host);
    // A hostile owner only hurts their own home: every login and logout
    // still worked.
    for (what, ok, out) in &results {
        assert!(
            ok,
            "{what} failed: {}{}\n--- agent log ---\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            agent.log_tail()
        );
    }
    assert!(racer_status.success() || racer_status.code().is_none());
}

/// The racer must reach the homes: the test dir is traversable, the
/// parent of the homes is root's.
fn traversable_homes(dir: &Path) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir(dir.join("home")).unwrap();
    std::fs::set_permissions(dir.join("home"), std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// This test binary's `racer_process`, as the home's owner.
fn start_racer(home: &Path, outside: &Path, secret: &Path, stop: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "racer_process",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env_clear()
        .env("UVE_RACER_HOME", home)
        .env("UVE_RACER_TARGET", outside.join("etc"))
        .env("UVE_RACER_SECRET", secret)
        .env("UVE_RACER_STOP", stop)
        .uid(UID)
        .gid(UID)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

/// `ROUNDS` logins and logouts of alice (the first with a hard link to
/// the secret planted in the home); what each said.
fn log_in_and_out(
    agent: &AgentProc,
    home: &Path,
    secret: &Path,
) -> Vec<(String, bool, std::process::Output)> {
    let mut results = Vec::new();
    for round in 0..ROUNDS {
        let session = format!("r{round}");
        let login = agent.cli(&["login", "--user", "alice", "--session", &session]);
        results.push((format!("login {round}"), login.status.success(), login));
        if round == 0 && home.is_dir() {
            // What the user could do with protected_hardlinks=0: a hard
            // link to the secret inside the home.
            let _ = std::fs::hard_link(secret, home.join("planted-shadow"));
        }
        let logout = agent.cli(&["logout", "--session", &session]);
        results.push((format!("logout {round}"), logout.status.success(), logout));
    }
    results
}

/// The secret never reached the host, in any version.
fn secret_never_reached_the_host(host: &TestHost) {
    let versions: Vec<Vec<u8>> = host.with(|h| {
        let mut vs: Vec<_> = h
            .versions
            .keys()
            .filter(|(u, _)| u == "alice")
            .map(|(_, v)| *v)
            .collect();
        vs.sort();
        vs.into_iter()
            .filter_map(|v| h.version_bytes("alice", v))
            .collect()
    });
    assert!(versions.len() > 1, "no logout committed");
    for (i, bytes) in versions.iter().enumerate() {
        assert!(!contains(bytes, SECRET), "version #{i} holds the secret");
    }
}

/// Names in `dir`, sorted; empty if it cannot be listed.
fn sorted_names(dir: &Path) -> Vec<OsString> {
    let mut names: Vec<OsString> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

fn is_real_dir(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir())
}

fn aside(p: &Path) -> PathBuf {
    let mut a = p.as_os_str().to_os_string();
    a.push(".r");
    PathBuf::from(a)
}

/// Replaces the directory `p` by a symlink to `target` for good (the
/// directory stays as `<p>.r`).
fn swap_for_good(p: &Path, target: &Path) {
    if std::fs::rename(p, aside(p)).is_ok() {
        let _ = std::os::unix::fs::symlink(target, p);
    }
}

/// Puts symlinks in place of all `paths` (each with its target), holds
/// them for a moment, then restores the originals.
fn flicker(paths: &[(PathBuf, &Path)]) {
    let mut swapped = Vec::new();
    for (p, target) in paths {
        if std::fs::rename(p, aside(p)).is_ok() {
            let _ = std::os::unix::fs::symlink(target, p);
            swapped.push(p);
        }
    }
    std::thread::sleep(Duration::from_millis(1));
    for p in swapped {
        let _ = std::fs::remove_file(p);
        let _ = std::fs::rename(aside(p), p);
    }
}

/// Entry of the racer child (see the module header); does nothing unless
/// started by [`racing_owner_cannot_reach_outside_the_home`]. In the
/// staging directory it swaps the subdirectories of every finished top
/// directory (a later one exists) for symlinks, for good; in the home and
/// the moved-aside home it keeps swapping directories and files for
/// symlinks and back, many at a time; and it keeps trying to hard-link
/// the secret.
#[test]
fn racer_process() {
    let Some(home) = std::env::var_os("UVE_RACER_HOME").map(PathBuf::from) else {
        return;
    };
    let var = |k: &str| PathBuf::from(std::env::var_os(k).unwrap());
    let (target, secret, stop) = (
        var("UVE_RACER_TARGET"),
        var("UVE_RACER_SECRET"),
        var("UVE_RACER_STOP"),
    );
    // SAFETY: getuid has no preconditions.
    assert_ne!(unsafe { libc::getuid() }, 0, "the racer must not be root");
    let sibling = |suffix: &str| {
        let mut s = std::ffi::OsString::from(".");
        s.push(home.file_name().unwrap());
        s.push(suffix);
        home.with_file_name(s)
    };
    let (new, old) = (sibling(".uve-new"), sibling(".uve-old"));
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < RACER_LIMIT && !stop.exists() {
        n += 1;
        for base in [&new, &home] {
            let _ = std::fs::hard_link(&secret, base.join(format!("hl{}", n % 4)));
        }
        // A top directory is finished once a later one exists.
        let top = sorted_names(&new);
        for w in top.windows(2) {
            for sub in sorted_names(&new.join(&w[0])) {
                let p = new.join(&w[0]).join(sub);
                if is_real_dir(&p) {
                    swap_for_good(&p, &target);
                }
            }
        }
        // The home and the moved-aside home: first every second-level
        // entry at once (directories to the sentinel, files to the
        // secret), then every top directory.
        for base in [&home, &old] {
            let tops: Vec<PathBuf> = sorted_names(base)
                .iter()
                .map(|n| base.join(n))
                .filter(|p| is_real_dir(p))
                .collect();
            let mut inner = Vec::new();
            for t in &tops {
                for n in sorted_names(t) {
                    let p = t.join(n);
                    let to = if is_real_dir(&p) { &target } else { &secret };
                    inner.push((p, to.as_path()));
                }
            }
            flicker(&inner);
            let outer: Vec<_> = tops.into_iter().map(|p| (p, target.as_path())).collect();
            flicker(&outer);
        }
        std::thread::yield_now();
    }
}
