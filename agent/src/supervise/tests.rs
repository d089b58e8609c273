//! Unit tests of the supervisor: real processes, real signals.
#![allow(clippy::unwrap_used)]
use super::*;
use crate::testing::Rig;

/// Deploys UA `name` (version 1) running `script` with /bin/sh.
fn deploy(rig: &Rig, name: &str, script: &str) {
    let dir = rig.state().join("ua").join(name);
    std::fs::create_dir_all(dir.join("1")).unwrap();
    std::os::unix::fs::symlink("1", dir.join("current")).unwrap();
    let argv = serde_json::to_vec(&["/bin/sh", "-c", script]).unwrap();
    std::fs::write(dir.join(".1.entry"), argv).unwrap();
}

fn record(session: &'static str) -> SessionRecord {
    SessionRecord {
        session: SessionId::literal(session),
        // In every passwd; the agent runs UAs as the session's user.
        user: uve_protocol::names::UserName::literal("root"),
        ua: Some(UaName::literal("desk")),
        started: 0,
        ua_process: None,
        ending: false,
    }
}

/// Starts UA `desk` for `session` (deployed by [`deploy`]).
fn start_desk(rig: &Rig, session: &'static str) -> Started {
    let lc = &rig.lifecycle;
    let sock = rig.dir.path().join("ctl.sock");
    lc.supervisor()
        .start(
            lc.uas(),
            &sock,
            &record(session),
            crate::base::accounts::lookup("root").ok().as_ref(),
            &UaName::literal("desk"),
        )
        .unwrap()
}

#[tokio::test]
async fn a_stopped_ua_is_not_reported_and_a_dying_one_is() {
    let mut rig = Rig::new();
    deploy(&rig, "desk", "exec sleep 30");
    let sup = rig.lifecycle.supervisor();
    let a = start_desk(&rig, "s1");
    assert!(a.start.is_some() && sup.pid("s1") == Some(a.pid));
    sup.stop("s1").await;
    assert!(sup.pid("s1").is_none(), "forgotten once it ended");
    // Started again and killed behind the agent's back: reported.
    let b = start_desk(&rig, "s2");
    kill_group(b.pid, Signal::SIGKILL);
    let exit = tokio::time::timeout(Duration::from_secs(20), rig.exits.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit.session, "s2", "only the unexpected end: {exit:?}");
    assert!(exit.reason.contains("UA exited"), "{exit:?}");
    assert!(
        rig.exits.try_recv().is_err(),
        "the stopped one was not reported"
    );
}

#[tokio::test]
async fn suspend_stops_the_process_group_and_resume_continues_it() {
    let rig = Rig::new();
    deploy(&rig, "desk", "exec sleep 30");
    let sup = rig.lifecycle.supervisor();
    let s = start_desk(&rig, "s1");
    sup.set_suspended("s1", true).await.unwrap();
    assert!(sup.is_suspended("s1"));
    assert_eq!(group_stopped(s.pid), Some(true));
    sup.set_suspended("s1", false).await.unwrap();
    // Resumed: no process of the group is stopped. (`group_stopped`
    // would also count one in uninterruptible sleep, 'D', as not
    // running user code, which a just-continued process under I/O
    // load may briefly be.)
    let states = group_states(s.pid);
    assert!(!states.is_empty(), "the UA is gone");
    assert!(!states.iter().any(|c| matches!(c, 'T' | 't')), "{states:?}");
    assert!(matches!(
        sup.set_suspended("nope", true).await,
        Err(SuperviseError::NotSupervised(_))
    ));
    sup.stop("s1").await;
}

#[tokio::test]
async fn adopting_a_dead_ua_reports_it() {
    let mut rig = Rig::new();
    let mut rec = record("s9");
    // A pid with the wrong start time is not the recorded process.
    rec.ua_process = Some(UaProcess {
        pid: i32::try_from(std::process::id()).unwrap(),
        start: 1,
    });
    rig.lifecycle.supervisor().adopt(vec![rec]);
    let exit = rig.exits.recv().await.unwrap();
    assert_eq!(exit.session, "s9");
    assert!(exit.reason.contains("not running"), "{exit:?}");
}

/// Run by root, a UA takes its user's identity whole: uid, primary gid,
/// and every supplementary group of the entry (what `initgroups` sets),
/// none of root's; its environment names the user as the system does.
#[tokio::test]
async fn a_ua_runs_as_its_user_with_every_group_of_theirs() {
    if !nix::unistd::getuid().is_root() {
        eprintln!("skipped: needs root to change identity");
        return;
    }
    let rig = Rig::new();
    let out = rig.dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::set_permissions(&out, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let script = format!(
        "{{ id -u; id -g; id -G; printf '%s\\n' \"$USER\"; }} > {0}/id.tmp && mv {0}/id.tmp {0}/id; exec sleep 30",
        out.display()
    );
    deploy(&rig, "desk", &script);
    let account = crate::base::accounts::Account {
        name: "CORP\\nobody".into(),
        uid: 65534,
        gid: 65534,
        groups: vec![65534, 100, 4242],
        home: "/nonexistent".into(),
    };
    let lc = &rig.lifecycle;
    let sock = rig.dir.path().join("ctl.sock");
    lc.supervisor()
        .start(
            lc.uas(),
            &sock,
            &record("s1"),
            Some(&account),
            &UaName::literal("desk"),
        )
        .unwrap();
    let id = out.join("id");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !id.exists() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = std::fs::read_to_string(&id).unwrap_or_default();
    lc.supervisor().stop("s1").await;
    assert!(!text.is_empty(), "the UA never wrote its identity");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.first(), Some(&"65534"), "uid: {text}");
    assert_eq!(lines.get(1), Some(&"65534"), "gid: {text}");
    let mut groups: Vec<&str> = lines.get(2).unwrap().split_whitespace().collect();
    groups.sort_unstable();
    assert_eq!(groups, ["100", "4242", "65534"], "groups: {text}");
    assert_eq!(lines.get(3), Some(&"CORP\\nobody"), "USER: {text}");
}
