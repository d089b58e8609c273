//! Unit tests of the lifecycles against the rig's fake host.
#![allow(clippy::unwrap_used)]
use uve_protocol::message::Request;

use super::*;
use crate::flush::FlushOutcome;
use crate::testing::{COMMITTED, Rig, name};

#[tokio::test]
async fn login_then_logout_commits_and_announces_both() {
    let rig = Rig::new();
    let lc = &rig.lifecycle;
    let said = lc.login("eve", &name("e1"), None).await.unwrap();
    assert_eq!(said.to_string(), "new user: empty UIF");
    assert_eq!(said.uif, Attached::NewUser);
    assert_eq!(std::fs::read(rig.uif("eve")).unwrap(), b"");
    assert!(lc.table.session("e1").is_some() && lc.table.uif("eve").is_some());
    let again = lc.login("eve", &name("e1"), None).await.unwrap();
    assert!(again.to_string().contains("already open"), "{again}");
    assert_eq!(again.uif, Attached::SessionAlreadyOpen);
    assert!(matches!(
        lc.login("fay", &name("e1"), None).await,
        Err(LifecycleError::SessionTaken(_))
    ));
    std::fs::write(rig.uif("eve"), b"eve's notes").unwrap();
    let out = lc.logout(&name("e1")).await.unwrap().outcome;
    assert_eq!(out, FlushOutcome::Committed(COMMITTED));
    assert!(lc.table.session("e1").is_none() && lc.table.uif("eve").is_none());
    assert_eq!(
        rig.count(|r| matches!(r, Request::SessionStarted { .. })),
        1
    );
    assert_eq!(rig.count(|r| matches!(r, Request::SessionEnded { .. })), 1);
    assert!(lc.table.ended_unsent().is_empty(), "acknowledged");
}

#[tokio::test]
async fn the_last_session_of_a_user_flushes_and_a_disconnect_is_journalled() {
    let rig = Rig::new();
    let lc = &rig.lifecycle;
    lc.login("gus", &name("g1"), None).await.unwrap();
    let second = lc.login("gus", &name("g2"), None).await.unwrap();
    assert!(second.to_string().contains("already attached"), "{second}");
    assert_eq!(second.uif, Attached::AlreadyAttached);
    std::fs::write(rig.uif("gus"), b"gus").unwrap();
    let first = lc.logout(&name("g1")).await.unwrap().outcome;
    assert!(matches!(first, FlushOutcome::Nothing(_)), "{first:?}");
    let out = lc
        .disconnect(&name("g2"), "display died")
        .await
        .unwrap()
        .outcome;
    assert_eq!(out, FlushOutcome::Committed(COMMITTED));
    let notices = lc.notices.list();
    assert_eq!(notices.len(), 1);
    assert_eq!(notices[0].session, "g2");
    assert_eq!(notices[0].reason, "display died");
}

#[tokio::test]
async fn a_login_fails_while_an_earlier_update_of_the_user_is_pending() {
    let rig = Rig::new();
    let lc = &rig.lifecycle;
    rig.login_and_write("hal", "h1", b"hal's work").await;
    rig.refuse_updates(Some(uve_protocol::ErrorCode::Busy));
    let out = lc.logout(&name("h1")).await.unwrap().outcome;
    assert!(matches!(out, FlushOutcome::Spooled(_)), "{out:?}");
    let err = lc.login("hal", &name("h2"), None).await.unwrap_err();
    assert!(matches!(err, LifecycleError::PendingUpdate(_)), "{err}");
    assert_eq!(std::fs::read(rig.uif("hal")).unwrap(), b"hal's work");
    rig.refuse_updates(None);
    let said = lc.login("hal", &name("h3"), None).await.unwrap();
    assert!(said.to_string().contains("new user"), "{said}");
}

#[tokio::test]
async fn a_checkpoint_commits_while_the_uif_stays_attached() {
    let rig = Rig::new();
    let lc = &rig.lifecycle;
    rig.login_and_write("ivy", "i1", b"ivy, mid-session").await;
    lc.checkpoint().await;
    let rec = lc.table.uif("ivy").unwrap();
    assert_eq!(rec.base, Some(COMMITTED), "rebased on the checkpoint");
    assert_eq!(
        lc.flusher.pending_updates(),
        0,
        "a live checkpoint is not spooled"
    );
    // Nothing changed since: the logout uploads nothing.
    let out = lc.logout(&name("i1")).await.unwrap().outcome;
    assert_eq!(out, FlushOutcome::Unchanged(Some(COMMITTED)));
}

#[tokio::test]
async fn a_logout_whose_table_write_fails_still_commits_and_the_disk_catches_up() {
    let rig = Rig::new();
    let lc = rig.lifecycle.clone();
    rig.login_and_write("jo", "j1", b"jo's work").await;
    // The table cannot be written while the session ends: its path is a
    // directory.
    let path = crate::stores::session::Table::path(rig.state());
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    std::fs::write(path.join("x"), b"x").unwrap();
    let ended = lc.logout(&name("j1")).await.unwrap();
    assert_eq!(ended.outcome, FlushOutcome::Committed(COMMITTED));
    assert!(ended.table.is_some(), "the table error reaches the caller");
    assert!(
        ended.to_string().contains("repaired at the next start"),
        "{ended}"
    );
    assert!(lc.table.session("j1").is_none() && lc.table.uif("jo").is_none());
    // Once the disk takes writes again, the outbox's retry writes the
    // table as memory has it.
    std::fs::remove_dir_all(&path).unwrap();
    assert!(lc.table.write_if_behind().await.unwrap());
    let on_disk = crate::stores::session::SessionTable::load(rig.state());
    assert!(on_disk.session("j1").is_none() && on_disk.uif("jo").is_none());
    assert!(!lc.table.write_if_behind().await.unwrap(), "nothing behind");
}

#[tokio::test]
async fn a_restart_flushes_and_detaches_a_uif_no_session_holds() {
    let mut rig = Rig::new();
    rig.login_and_write("kim", "k1", b"kim's work").await;
    // What a restart finds after a logout whose table writes never
    // reached the disk, the session's end excepted: the UIF attached, no
    // session open.
    let path = crate::stores::session::Table::path(rig.state());
    let mut table: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    table["sessions"] = serde_json::json!({});
    std::fs::write(&path, serde_json::to_vec(&table).unwrap()).unwrap();
    rig.restart();
    let lc = rig.lifecycle.clone();
    assert!(lc.table.uif("kim").is_some() && lc.table.sessions_of("kim").is_empty());
    lc.recover_at_start().await;
    lc.tasks.close();
    lc.tasks.wait().await;
    let on_disk = crate::stores::session::SessionTable::load(rig.state());
    assert!(on_disk.uif("kim").is_none(), "detached, durably");
    let commits = rig.count(|r| matches!(r, Request::UpdateCommit { .. }));
    assert_eq!(commits, 1, "kim's work was sent");
    assert_eq!(std::fs::read(rig.uif("kim")).unwrap(), b"kim's work");
}

/// `rig`'s configuration with `f` applied, put in force.
fn reconfigure(rig: &Rig, f: impl FnOnce(&mut crate::config::Config)) {
    let mut cfg = (*rig.lifecycle.config()).clone();
    f(&mut cfg);
    rig.lifecycle.reload(cfg);
}

/// `out` is a refusal whose bytes were set aside as a preserved copy.
fn assert_preserved(out: &FlushOutcome) {
    assert!(
        matches!(
            out,
            FlushOutcome::Refused {
                kept: crate::flush::Kept::Preserved(_),
                ..
            }
        ),
        "{out:?}"
    );
}

#[tokio::test]
async fn a_refusal_over_the_users_share_is_held_in_place_and_no_login_overwrites_it() {
    use crate::flush::Kept;
    use uve_protocol::testdata::noise;
    let rig = Rig::new();
    let lc = &rig.lifecycle;
    reconfigure(&rig, |c| c.preserved_per_user_mib = 1);
    rig.refuse_updates(Some(uve_protocol::ErrorCode::QuotaExceeded));
    // The first refused update fits kim's 1 MiB share: set aside.
    rig.login_and_write("kim", "k1", &noise(600_000, 1)).await;
    let out = lc.logout(&name("k1")).await.unwrap().outcome;
    assert_preserved(&out);
    // The second does not: held at the UIF path, the logout says so.
    let second = noise(600_000, 2);
    rig.login_and_write("kim", "k2", &second).await;
    let out = lc.logout(&name("k2")).await.unwrap().outcome;
    let said = out.to_string();
    let FlushOutcome::Refused {
        kept: Kept::Held(held),
        ..
    } = out
    else {
        panic!("not held: {out:?}");
    };
    assert!(
        said.contains("HELD") && said.contains("preserved push"),
        "{said}"
    );
    assert_eq!(held.bytes, rig.uif("kim"));
    assert!(held.held.as_deref().unwrap().contains("share"), "{held:?}");
    assert_eq!(std::fs::read(rig.uif("kim")).unwrap(), second);
    assert_eq!(lc.flusher.spooled_for("kim"), 0, "not retried for ever");
    // No login of kim may retrieve over the held bytes.
    let err = lc.login("kim", &name("k3"), None).await.unwrap_err();
    assert!(matches!(err, LifecycleError::Held(_)), "{err}");
    assert!(err.to_string().contains(&held.id), "{err}");
    assert_eq!(std::fs::read(rig.uif("kim")).unwrap(), second);
    // Another user's refusal still fits their own share.
    rig.login_and_write("lou", "l1", &noise(600_000, 3)).await;
    let out = lc.logout(&name("l1")).await.unwrap().outcome;
    assert_preserved(&out);
    // Root fixes the cause and pushes the held copy: kim logs in again.
    rig.refuse_updates(None);
    let uploads = rig.count(|r| matches!(r, Request::UpdateBegin(_)));
    let pushed = lc.push_preserved(&held.id, false).await.unwrap();
    assert_eq!(pushed, FlushOutcome::Committed(COMMITTED));
    assert_eq!(
        rig.count(|r| matches!(r, Request::UpdateBegin(_))),
        uploads + 1
    );
    assert!(lc.flusher.preserved().held_for("kim").unwrap().is_none());
    lc.login("kim", &name("k4"), None).await.unwrap();
}

#[tokio::test]
async fn a_held_update_of_a_user_the_database_does_not_know_keeps_its_archive() {
    use crate::flush::Kept;
    let rig = Rig::new();
    let lc = &rig.lifecycle;
    let homes = rig.state().parent().unwrap().join("homes");
    std::fs::create_dir_all(&homes).unwrap();
    reconfigure(&rig, |c| {
        c.uif.mode = crate::config::UifMode::Directory;
        c.uif.home = format!("{}/{{user}}", homes.display());
        c.preserved_per_user_mib = 1;
    });
    rig.refuse_updates(Some(uve_protocol::ErrorCode::QuotaExceeded));
    lc.login("max", &name("m1"), None).await.unwrap();
    let work = uve_protocol::testdata::noise(2_000_000, 4);
    std::fs::write(homes.join("max/thesis.odt"), &work).unwrap();
    let out = lc.logout(&name("m1")).await.unwrap().outcome;
    let FlushOutcome::Refused {
        kept: Kept::Held(held),
        ..
    } = out
    else {
        panic!("not held: {out:?}");
    };
    // Nothing proves this home is the one packed (no entry in the user
    // database, so no owner to check): the archive itself is held.
    let archive = lc.config().uif_path("max");
    assert_eq!(held.bytes, archive);
    assert!(archive.exists());
    let err = lc.login("max", &name("m2"), None).await.unwrap_err();
    assert!(matches!(err, LifecycleError::Held(_)), "{err}");
    assert_eq!(std::fs::read(homes.join("max/thesis.odt")).unwrap(), work);
    rig.refuse_updates(None);
    let pushed = lc.push_preserved(&held.id, false).await.unwrap();
    assert_eq!(pushed, FlushOutcome::Committed(COMMITTED));
    assert!(lc.flusher.preserved().list().is_empty());
    lc.login("max", &name("m3"), None).await.unwrap();
}

#[tokio::test]
async fn a_refusal_held_while_a_login_delivers_the_spool_stops_that_login() {
    use uve_protocol::testdata::noise;
    let rig = Rig::new();
    let lc = &rig.lifecycle;
    reconfigure(&rig, |c| c.preserved_per_user_mib = 1);
    // Spooled while the host is busy.
    let work = noise(2_000_000, 5);
    rig.login_and_write("ola", "o1", &work).await;
    rig.refuse_updates(Some(uve_protocol::ErrorCode::Busy));
    let out = lc.logout(&name("o1")).await.unwrap().outcome;
    assert!(matches!(out, FlushOutcome::Spooled(_)), "{out:?}");
    // The next login delivers it first: refused for good, over ola's
    // share, so held at the very path the retrieve would write.
    rig.refuse_updates(Some(uve_protocol::ErrorCode::QuotaExceeded));
    let err = lc.login("ola", &name("o2"), None).await.unwrap_err();
    assert!(matches!(err, LifecycleError::Held(_)), "{err}");
    assert_eq!(
        std::fs::read(rig.uif("ola")).unwrap(),
        work,
        "not retrieved over"
    );
}

#[tokio::test]
async fn working_copies_of_logged_out_users_are_trimmed_to_the_cache_budget_lru_first() {
    use uve_protocol::testdata::noise;
    let rig = Rig::new();
    let lc = &rig.lifecycle;
    reconfigure(&rig, |c| c.cache_mib = 1);
    // ned's update stays spooled (the host is busy for it): never evicted.
    rig.login_and_write("ned", "n1", &noise(600_000, 1)).await;
    rig.refuse_updates(Some(uve_protocol::ErrorCode::Busy));
    let out = lc.logout(&name("n1")).await.unwrap().outcome;
    assert!(matches!(out, FlushOutcome::Spooled(_)), "{out:?}");
    rig.refuse_updates(None);
    // opal stays logged in: never evicted.
    rig.login_and_write("opal", "o1", &noise(600_000, 2)).await;
    for (i, user) in ["pia", "quin", "ray"].into_iter().enumerate() {
        let session = format!("{user}1");
        rig.login_and_write(user, &session, &noise(400_000, 3 + i as u64))
            .await;
        let out = lc.logout(&name(&session)).await.unwrap().outcome;
        assert_eq!(out, FlushOutcome::Committed(COMMITTED));
    }
    // After ray's logout the three copies (1.2 MB) were over the 1 MiB
    // budget: pia's, the least recently used, went with her manifest, and
    // that was enough.
    let manifest = |u: &str| crate::stores::cache::manifest_path(rig.state(), u).exists();
    assert!(!rig.uif("pia").exists() && !manifest("pia"));
    assert!(rig.uif("quin").exists() && manifest("quin"));
    assert!(rig.uif("ray").exists());
    assert!(rig.uif("ned").exists(), "a spooled update's file stays");
    assert!(rig.uif("opal").exists(), "an attached UIF stays");
    // pia's next login is cold, and works.
    let said = lc.login("pia", &name("pia2"), None).await.unwrap();
    assert!(said.to_string().contains("new user"), "{said}");
}

#[tokio::test]
async fn a_logout_retried_after_an_agent_restart_reports_the_earlier_end() {
    let mut rig = Rig::new();
    rig.login_and_write("sid", "s1", b"sid's work").await;
    let first = rig.lifecycle.logout(&name("s1")).await.unwrap();
    assert_eq!(first.outcome, FlushOutcome::Committed(COMMITTED));
    // The answer never reached the PAM hook: the agent died and came back.
    rig.restart();
    let again = rig.lifecycle.logout(&name("s1")).await.unwrap();
    assert!(again.earlier, "{again}");
    assert_eq!(again.outcome, FlushOutcome::Committed(COMMITTED));
    assert!(
        again.to_string().starts_with("already ended earlier"),
        "{again}"
    );
    // A session that never was is still no open session.
    let err = rig.lifecycle.logout(&name("s9")).await.unwrap_err();
    assert!(matches!(err, LifecycleError::NoSuchSession(_)), "{err}");
}
