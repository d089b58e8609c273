//! Nothing the user wrote is destroyed: updates the host refuses for good
//! are preserved before the next retrieve can touch their path, and are
//! recoverable byte-identical; local failures stay spooled and are
//! retried; spooled images are checked after a VM restart; notices are
//! clipped by bytes and a refused one blocks nothing; the control socket
//! serves each caller by its uid. Real agent binary, the test host of
//! `common` over a real Unix socket.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{
    AgentProc, LONG, TestHost, connected_agent, file_agent, file_cfg, host_in_tempdir, must, noise,
    start_agent, start_agent_with_env, uif,
};
use uve_protocol::message::ErrorCode;

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The preserved copies, as `preserved list --json` reports them.
fn preserved(agent: &AgentProc) -> Vec<serde_json::Value> {
    let out = agent.ok(&["preserved", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["preserved"].as_array().cloned().unwrap_or_default()
}

/// Logs `user` in, appends 2 MiB to the 512 KiB image, and logs out while
/// the host refuses the update with `refuse`; checks the answer and that
/// the bytes are preserved. Returns (what the user wrote, copy id, path).
fn refused_logout(
    dir: &Path,
    host: &TestHost,
    agent: &AgentProc,
    user: &str,
    refuse: impl FnOnce(&TestHost),
    code: &str,
) -> (Vec<u8>, String, PathBuf) {
    agent.ok(&["login", "--user", user, "--session", &format!("{user}-1")]);
    let img = dir.join(format!("uif/{user}.img"));
    let mut work = std::fs::read(&img).unwrap();
    work.extend(noise(2 << 20, 77));
    std::fs::write(&img, &work).unwrap();
    refuse(host);
    let out = agent.cli(&["logout", "--session", &format!("{user}-1")]);
    let said = text(&out);
    assert!(
        !out.status.success(),
        "a refused logout must not say ok: {said}"
    );
    assert!(said.contains("REFUSED") && said.contains(code), "{said}");
    assert!(
        said.contains("nothing is lost") && said.contains("preserved"),
        "{said}"
    );
    let copy = preserved(agent)
        .into_iter()
        .find(|c| c["user"] == user)
        .unwrap_or_else(|| panic!("no preserved copy of {user}: {said}"));
    assert_eq!(copy["code"], code);
    assert_eq!(copy["size"], work.len() as u64);
    let id = copy["id"].as_str().unwrap().to_string();
    assert!(said.contains(&id), "the answer names the copy: {said}");
    let path = PathBuf::from(copy["bytes"].as_str().unwrap());
    assert_eq!(
        std::fs::read(&path).unwrap(),
        work,
        "preserved byte-identical"
    );
    assert!(!img.exists(), "the UIF path is free for the next retrieve");
    (work, id, path)
}

#[test]
fn refused_updates_are_preserved_and_survive_the_next_login() {
    let (dir, host) = host_in_tempdir();
    let agent = file_agent(dir.path());
    type Refuse = fn(&TestHost);
    let cases: [(&str, &str, Refuse); 3] = [
        // Unassigned during the session.
        ("ann", "NotAssigned", |h| {
            h.with(|s| s.unassigned.insert("ann".into()));
        }),
        ("ben", "QuotaExceeded", |h| {
            h.with(|s| s.refuse_updates = Some(ErrorCode::QuotaExceeded));
        }),
        ("cat", "TooLarge", |h| {
            h.with(|s| s.refuse_updates = Some(ErrorCode::TooLarge));
        }),
    ];
    for (user, code, refuse) in cases {
        let seed = noise(512 << 10, 5);
        let v1 = host.with(|h| h.seed(user, &seed));
        let commits_before = host.with(|h| h.commits.len());
        let (work, id, path) = refused_logout(dir.path(), &host, &agent, user, refuse, code);
        assert_eq!(
            host.with(|h| h.commits.len()),
            commits_before,
            "nothing committed"
        );
        host.with(|h| {
            h.unassigned.clear();
            h.refuse_updates = None;
        });
        // The next login retrieves the head; the preserved bytes are
        // untouched and the answer says where they are.
        let said = agent.ok(&["login", "--user", user, "--session", &format!("{user}-2")]);
        assert!(said.contains(&format!("retrieved version {v1}")), "{said}");
        assert!(said.contains("NOTE") && said.contains(&id), "{said}");
        let img = dir.path().join(format!("uif/{user}.img"));
        assert_eq!(std::fs::read(&img).unwrap(), seed);
        assert_eq!(std::fs::read(&path).unwrap(), work);
        // Export: a byte-identical copy, never over an existing file.
        let out = dir.path().join(format!("{user}-export.img"));
        let export = [
            "preserved",
            "export",
            "--id",
            &id,
            "--to",
            out.to_str().unwrap(),
        ];
        agent.ok(&export);
        assert_eq!(std::fs::read(&out).unwrap(), work);
        let again = agent.cli(&export);
        assert!(!again.status.success());
        // Push: a conflict version holding exactly what the user wrote;
        // the head stays, the copy is gone once the host took it.
        let said = agent.ok(&["preserved", "push", "--id", &id]);
        assert!(said.contains("conflict version"), "{said}");
        let c = host.last_commit();
        assert!(c.conflict && c.user == user && c.base.is_none(), "{c:?}");
        assert_eq!(host.with(|h| h.version_bytes(user, c.version)), Some(work));
        assert_eq!(host.with(|h| h.heads.get(user).copied()), Some(v1));
        assert!(preserved(&agent).iter().all(|p| p["id"] != id.as_str()));
        assert!(!path.exists());
        let said = agent.ok(&["logout", "--session", &format!("{user}-2")]);
        assert!(said.contains("unchanged"), "{said}");
    }
}

#[test]
fn directory_mode_refusal_preserves_the_packed_home() {
    let (dir, host) = host_in_tempdir();
    let home = dir.path().join("home");
    let cfg = format!(
        "[uif]\nmode = \"directory\"\nhome = \"{}/{{user}}\"\n",
        home.display()
    );
    let agent = start_agent(dir.path(), &cfg);
    agent.wait_connected();
    agent.ok(&["login", "--user", "dora", "--session", "d1"]);
    let essay = noise(300_000, 12);
    std::fs::write(home.join("dora/essay.txt"), &essay).unwrap();
    host.with(|h| h.refuse_updates = Some(ErrorCode::QuotaExceeded));
    let out = agent.cli(&["logout", "--session", "d1"]);
    assert!(
        !out.status.success() && text(&out).contains("REFUSED"),
        "{}",
        text(&out)
    );
    host.with(|h| h.refuse_updates = None);
    let copy = preserved(&agent).pop().expect("a preserved copy");
    let path = PathBuf::from(copy["bytes"].as_str().unwrap());
    let tar = std::fs::read(&path).unwrap();
    assert!(
        tar.windows(essay.len()).any(|w| w == essay.as_slice()),
        "the packed home holds the file"
    );
    // The next login replaces the home (the user had no version): the
    // archive is untouched, and pushing it gives the host those bytes.
    agent.ok(&["login", "--user", "dora", "--session", "d2"]);
    assert!(!home.join("dora/essay.txt").exists());
    assert_eq!(std::fs::read(&path).unwrap(), tar);
    let id = copy["id"].as_str().unwrap();
    agent.ok(&["preserved", "push", "--id", id]);
    let c = host.last_commit();
    assert_eq!(host.with(|h| h.version_bytes("dora", c.version)), Some(tar));
}

#[test]
fn a_refusal_over_the_users_preserved_share_is_held_and_blocks_only_that_users_logins() {
    let (dir, host) = host_in_tempdir();
    let agent = connected_agent(
        dir.path(),
        &file_cfg(dir.path(), "preserved_per_user_mib = 1"),
    );
    let seed = noise(512 << 10, 5);
    let v1 = host.with(|h| h.seed("hana", &seed));
    agent.ok(&["login", "--user", "hana", "--session", "h1"]);
    let img = uif(dir.path(), "hana");
    let work = noise(2 << 20, 8);
    std::fs::write(&img, &work).unwrap();
    host.with(|h| h.refuse_updates = Some(ErrorCode::QuotaExceeded));
    let out = agent.cli(&["logout", "--session", "h1"]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("REFUSED")
            && said.contains("HELD")
            && said.contains("preserved_per_user_mib"),
        "{said}"
    );
    let copy = preserved(&agent).pop().expect("a held copy");
    assert_eq!(copy["bytes"].as_str().unwrap(), img.to_str().unwrap());
    assert!(copy["held"].as_str().unwrap().contains("share"), "{copy}");
    assert_eq!(agent.status()["held"], 1);
    assert_eq!(agent.status()["preserved"], 0);
    assert_eq!(std::fs::read(&img).unwrap(), work, "held where she left it");
    // Her next login is refused with the way out; her bytes stay.
    host.with(|h| h.refuse_updates = None);
    let out = agent.cli(&["login", "--user", "hana", "--session", "h2"]);
    let said = text(&out);
    let id = copy["id"].as_str().unwrap();
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("overwrite unsaved work") && said.contains(id),
        "{said}"
    );
    assert_eq!(std::fs::read(&img).unwrap(), work);
    // Other users are not held back.
    agent.ok(&["login", "--user", "ivo", "--session", "i1"]);
    agent.ok(&["logout", "--session", "i1"]);
    // Root pushes it once the cause is fixed: a conflict version with her
    // bytes, the head unchanged; then she logs in to the head.
    let said = agent.ok(&["preserved", "push", "--id", id]);
    assert!(said.contains("conflict version"), "{said}");
    let c = host.last_commit();
    assert!(c.conflict && c.user == "hana", "{c:?}");
    assert_eq!(
        host.with(|h| h.version_bytes("hana", c.version)),
        Some(work)
    );
    assert_eq!(agent.status()["held"], 0);
    let said = agent.ok(&["login", "--user", "hana", "--session", "h3"]);
    assert!(said.contains(&format!("retrieved version {v1}")), "{said}");
    assert_eq!(std::fs::read(&img).unwrap(), seed);
}

#[test]
fn a_local_read_error_during_upload_stays_spooled_and_is_retried() {
    let (dir, host) = host_in_tempdir();
    host.with(|h| h.seed("eve", &noise(300_000, 3)));
    let agent = start_agent_with_env(
        dir.path(),
        &file_cfg(dir.path(), ""),
        &[("UVE_AGENT_FAULTS", "upload-read=1")],
    );
    agent.wait_connected();
    agent.ok(&["login", "--user", "eve", "--session", "e1"]);
    let work = noise(400_000, 4);
    std::fs::write(uif(dir.path(), "eve"), &work).unwrap();
    let said = agent.ok(&["logout", "--session", "e1"]);
    assert!(
        said.contains("spooled") && said.contains("read chunk"),
        "{said}"
    );
    must("the spooled update delivered", LONG, || {
        (host.head("eve").as_deref() == Some(work.as_slice())).then_some(())
    });
    assert!(preserved(&agent).is_empty());
}

/// Rewrites the `boot` of every spool record, as if it was written during
/// another boot of the VM.
fn spooled_in_an_earlier_boot(state: &Path) {
    for e in std::fs::read_dir(state.join("spool")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "json") {
            let mut v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            assert!(v["boot"].is_string(), "spool records name their boot: {v}");
            v["boot"] = "an-earlier-boot".into();
            std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
        }
    }
}

#[test]
fn after_a_vm_restart_a_spooled_image_must_match_or_lands_only_as_a_conflict() {
    let (dir, host) = host_in_tempdir();
    let v_torn = host.with(|h| h.seed("finn", &noise(300_000, 8)));
    host.with(|h| h.seed("gus", &noise(300_000, 9)));
    let mut agent = file_agent(dir.path());
    let mut wrote = Vec::new();
    for (user, seed) in [("finn", 10), ("gus", 11)] {
        agent.ok(&["login", "--user", user, "--session", user]);
        let work = noise(300_000, seed);
        std::fs::write(dir.path().join(format!("uif/{user}.img")), &work).unwrap();
        wrote.push(work);
    }
    host.down();
    for user in ["finn", "gus"] {
        let said = agent.ok(&["logout", "--session", user]);
        assert!(said.contains("spooled"), "{said}");
    }
    agent.kill();
    spooled_in_an_earlier_boot(&agent.state);
    // finn's image was torn by the crash: part of it never reached the disk.
    let torn = {
        let mut t = wrote[0].clone();
        t[100_000..160_000].fill(0);
        t
    };
    std::fs::write(uif(dir.path(), "finn"), &torn).unwrap();
    agent.spawn().unwrap();
    host.up();
    must("both spooled updates delivered", LONG, || {
        host.with(|h| (h.commits.len() >= 2).then_some(()))
    });
    let (finn, gus) = host.with(|h| {
        let find = |u: &str| h.commits.iter().find(|c| c.user == u).cloned().unwrap();
        (find("finn"), find("gus"))
    });
    // The intact image was verified chunk by chunk and became the head.
    assert!(!gus.conflict, "{gus:?}");
    assert_eq!(host.head("gus"), Some(wrote[1].clone()));
    // The torn one never became the head: it is kept as a conflict version.
    assert!(finn.conflict && finn.base.is_none(), "{finn:?}");
    assert_eq!(host.with(|h| h.heads.get("finn").copied()), Some(v_torn));
    assert_eq!(
        host.with(|h| h.version_bytes("finn", finn.version)),
        Some(torn)
    );
}

#[test]
fn overlong_reasons_are_clipped_by_bytes_and_a_refused_notice_blocks_nothing() {
    let (dir, host) = host_in_tempdir();
    let agent = file_agent(dir.path());
    for s in ["n1", "n2", "n3"] {
        agent.ok(&["login", "--user", "nell", "--session", s]);
    }
    // 600 two-byte characters: 1200 bytes, over the wire's 1024.
    let long = "é".repeat(600);
    agent.ok(&["disconnect", "--session", "n1", "--reason", &long]);
    must("clipped notice delivered", LONG, || {
        host.with(|h| h.notice_sessions.iter().find(|n| n.1 == "n1").cloned())
    });
    let reason = host.with(|h| {
        h.notice_sessions
            .iter()
            .find(|n| n.1 == "n1")
            .unwrap()
            .2
            .clone()
    });
    assert!(reason.len() <= uve_protocol::defs::MAX_TEXT_LEN && long.starts_with(&reason));
    assert_eq!(reason.chars().count(), 512);
    // A notice the host refuses for good is dropped; the next one arrives.
    host.with(|h| h.refuse_notices = 1);
    agent.ok(&["disconnect", "--session", "n2", "--reason", "refused"]);
    agent.ok(&["disconnect", "--session", "n3", "--reason", "after it"]);
    must("the notice behind the refused one", LONG, || {
        host.with(|h| h.notice_sessions.iter().any(|n| n.1 == "n3").then_some(()))
    });
    must("no notice left pending", LONG, || {
        (agent.status()["pending_notices"] == 0).then_some(())
    });
    assert!(host.with(|h| h.notice_sessions.iter().all(|n| n.1 != "n2")));
}

/// Runs an agent verb as `uid` (its primary group the same number).
fn as_uid(agent: &AgentProc, uid: u32, args: &[&str]) -> Output {
    Command::new(common::agent_bin())
        .arg("--socket")
        .arg(&agent.socket)
        .args(args)
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap()
}

/// A file-mode agent (with `uif_extra` in its `[uif]` section) whose
/// control socket every user reaches: its mode is widened and only the
/// agent's checks stand between them and other users' sessions. Connected
/// to its fake host.
fn shared_socket_agent(uif_extra: &str) -> (tempfile::TempDir, TestHost, AgentProc) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let host = TestHost::start(dir.path());
    let cfg = file_cfg(dir.path(), "control_socket_mode = \"0666\"") + uif_extra;
    let agent = start_agent(dir.path(), &cfg);
    agent.wait_connected();
    (dir, host, agent)
}

/// `uid`'s status lists only its session `mine` and nothing VM-wide,
/// which root's shows.
fn status_shows_only_its_own(agent: &AgentProc, uid: u32, mine: &str) {
    // Its own status only.
    let out = as_uid(agent, uid, &["status", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sessions: Vec<&str> = v["status"]["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["session"].as_str().unwrap())
        .collect();
    assert_eq!(sessions, [mine]);
    // Nothing VM-wide: no UA list, spool, notice, grant or preserved count.
    for field in [
        "uas",
        "spooled_updates",
        "pending_notices",
        "monitor_grants",
        "preserved",
        "preserved_bytes",
        "held",
    ] {
        assert!(v["status"].get(field).is_none(), "{field} shown: {v}");
        assert!(
            agent.status().get(field).is_some(),
            "{field} hidden from root"
        );
    }
    let out = as_uid(agent, uid, &["status"]);
    assert!(text(&out).contains("shown to root only"), "{}", text(&out));
}

#[test]
fn the_control_socket_serves_each_caller_by_uid() {
    if common::skip_unless_root("the_control_socket_serves_each_caller_by_uid") {
        return;
    }
    let (_dir, _host, agent) = shared_socket_agent("");
    // Two users every Debian system has: nobody (65534) and daemon (1).
    agent.ok(&["login", "--user", "nobody", "--session", "sn"]);
    agent.ok(&["login", "--user", "daemon", "--session", "sd"]);
    let nobody = 65534;
    let denied = |out: &Output, rule: &str| {
        let said = text(out);
        assert!(!out.status.success(), "{said}");
        assert!(
            said.contains("permission denied") && said.contains(rule),
            "{said}"
        );
    };
    status_shows_only_its_own(&agent, nobody, "sn");
    // Another user's session: refused, naming the rule.
    let rule = "may act only on its own sessions";
    denied(
        &as_uid(&agent, nobody, &["logout", "--session", "sd"]),
        rule,
    );
    denied(
        &as_uid(
            &agent,
            nobody,
            &["disconnect", "--session", "sd", "--reason", "x"],
        ),
        rule,
    );
    denied(
        &as_uid(
            &agent,
            nobody,
            &["monitor-check", "--session", "sd", "--user", "m"],
        ),
        rule,
    );
    denied(
        &as_uid(
            &agent,
            nobody,
            &["login", "--user", "nobody", "--session", "sx"],
        ),
        "only root opens sessions",
    );
    denied(&as_uid(&agent, nobody, &["preserved", "list"]), "only root");
    // Its own session: monitor-check answers, logout works.
    let out = as_uid(
        &agent,
        nobody,
        &["monitor-check", "--session", "sn", "--user", "m"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("not allowed"), "{}", text(&out));
    let out = as_uid(&agent, nobody, &["logout", "--session", "sn"]);
    assert!(out.status.success(), "{}", text(&out));
    // Root may do everything.
    agent.ok(&["logout", "--session", "sd"]);
    assert!(agent.sessions().is_empty());
}

/// A client program run as another uid: opens 64 connections to the
/// agent's socket, sends nothing, prints how many were answered at once
/// with a refusal, then holds the rest open until stdin closes.
const HOLDER: &str = r#"
import select, socket, sys
held, refused = [], 0
for _ in range(64):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    held.append(s)
for s in held:
    if select.select([s], [], [], 1.0)[0] and b"at most" in s.recv(4096):
        refused += 1
print(refused, flush=True)
sys.stdin.read()
"#;

#[test]
fn one_uid_cannot_hold_the_control_socket() {
    if common::skip_unless_root("one_uid_cannot_hold_the_control_socket") {
        return;
    }
    let (_dir, _host, agent) = shared_socket_agent("");
    let mut holder = Command::new("/usr/bin/python3")
        .args(["-c", HOLDER])
        .arg(&agent.socket)
        .uid(65534)
        .gid(65534)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    // All but the uid's 4 slots were refused at once, naming the budget.
    assert_eq!(line.trim(), "60", "refused at once");
    // While nobody holds its 4 connections idle, root is served.
    agent.ok(&["login", "--user", "nobody", "--session", "h1"]);
    agent.ok(&["logout", "--session", "h1"]);
    assert_eq!(agent.status()["control_refused"], 60);
    drop(holder.stdin.take());
    holder.wait().unwrap();
}

#[test]
fn the_owner_override_grants_no_authority_over_other_sessions() {
    if common::skip_unless_root("the_owner_override_grants_no_authority_over_other_sessions") {
        return;
    }
    // Every user's files belong to 65534 (nobody): that gives nobody no
    // say over daemon's session.
    let (_dir, _host, agent) = shared_socket_agent("owner = \"65534:65534\"\n");
    agent.ok(&["login", "--user", "nobody", "--session", "on"]);
    agent.ok(&["login", "--user", "daemon", "--session", "od"]);
    let out = as_uid(&agent, 65534, &["logout", "--session", "od"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("may act only on its own sessions"),
        "{}",
        text(&out)
    );
    status_shows_only_its_own(&agent, 65534, "on");
    let out = as_uid(&agent, 65534, &["logout", "--session", "on"]);
    assert!(out.status.success(), "its own session: {}", text(&out));
    agent.ok(&["logout", "--session", "od"]);
}
