//! Updates the real `uve-host` refuses for good — the user's quota, a UIF
//! over the size limit, a user not assigned to the VM — against the real
//! `uve-agent` over a hybrid-vsock Unix socket (no QEMU needed). In each
//! case the logout says plainly that the host refused and where the bytes
//! are, the host raises an `update_refused` event naming user, reason and
//! size, the next login leaves the preserved bytes alone, and once the
//! cause is fixed `uve-agent preserved push` lands them, byte-identical, as
//! a conflict version.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use uve_e2e::agent::{AgentProc, AgentSpec};
use uve_e2e::binaries::{self, Binaries};
use uve_e2e::host::HostDaemon;
use uve_protocol::testdata::noise;

const LIMIT: Duration = Duration::from_secs(30);

struct Rig {
    bins: Binaries,
    dir: tempfile::TempDir,
    host: HostDaemon,
    agent: AgentProc,
}

impl Rig {
    /// A host with `host_config`, one VM `vm-a` and its agent (with
    /// `agent_top` top-level configuration lines), connected.
    fn start(host_config: &str, agent_top: &str) -> Rig {
        let bins = binaries::release().expect("release binaries");
        let dir = tempfile::Builder::new()
            .prefix("uve-refusals-")
            .tempdir_in("/tmp")
            .unwrap();
        let host = HostDaemon::start_with(&bins.host, &bins.uvectl, dir.path(), host_config)
            .expect("start uve-host");
        let vm = dir.path().join("vm-a");
        std::fs::create_dir_all(&vm).unwrap();
        let uds = vm.join("v.sock").display().to_string();
        host.ok(&["vm", "add", "vm-a", "--uds-path", &uds]);
        let spec = AgentSpec::new(
            &bins.agent,
            &format!("unix:{}", vm.join("v.sock_7075").display()),
            &AgentSpec::uif(
                agent_top,
                &format!(
                    "mode = \"file\"\npath = \"{}/uif/{{user}}.img\"",
                    vm.display()
                ),
            ),
        );
        let agent = AgentProc::start(&vm, spec).expect("start uve-agent");
        let rig = Rig {
            bins,
            dir,
            host,
            agent,
        };
        rig.wait_connected();
        rig
    }

    fn wait_connected(&self) {
        assert!(
            self.host.wait_connected("vm-a", LIMIT),
            "agent did not connect; host log:\n{}",
            self.host.log_tail()
        );
    }

    fn img(&self, user: &str) -> PathBuf {
        self.dir.path().join(format!("vm-a/uif/{user}.img"))
    }

    /// Restarts the host on the same data with another configuration.
    fn reconfigure_host(&mut self, host_config: &str) {
        self.host.stop(true);
        self.host = HostDaemon::start_with(
            &self.bins.host,
            &self.bins.uvectl,
            self.dir.path(),
            host_config,
        )
        .expect("restart uve-host");
        self.wait_connected();
    }

    /// The agent's preserved copies.
    fn preserved(&self) -> Vec<serde_json::Value> {
        let out = self.agent.ok(&["preserved", "list", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["preserved"].as_array().cloned().unwrap_or_default()
    }
}

/// Logs `user` out and checks the refusal end to end: the answer, the
/// host's event, the preserved bytes. Returns the copy's id.
fn refused_logout(rig: &Rig, user: &str, session: &str, work: &[u8], code: &str) -> String {
    let since = rig.host.last_seq();
    let (exit, said) = rig.agent.said(&["logout", "--session", session]);
    assert_ne!(exit, 0, "a refused logout must fail: {said}");
    assert!(
        said.contains("REFUSED") && said.contains(code) && said.contains("nothing is lost"),
        "{said}"
    );
    let event = rig
        .host
        .wait_event(since, "update_refused", LIMIT, |e| e["user"] == user);
    assert_eq!(event["code"], code, "{event}");
    assert_eq!(event["vm"], "vm-a", "{event}");
    assert_eq!(event["size"], work.len() as u64, "{event}");
    assert!(
        event["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{event}"
    );
    let copy = rig
        .preserved()
        .into_iter()
        .find(|c| c["user"] == user)
        .unwrap_or_else(|| panic!("no preserved copy of {user}: {said}"));
    let id = copy["id"].as_str().unwrap().to_string();
    assert!(said.contains(&id), "the answer names the copy: {said}");
    let bytes = Path::new(copy["bytes"].as_str().unwrap()).to_path_buf();
    assert_eq!(
        std::fs::read(&bytes).unwrap(),
        work,
        "preserved byte-identical"
    );
    id
}

/// Pushes copy `id` and checks the host holds `work` as a conflict version.
fn push_lands_as_conflict(rig: &Rig, user: &str, id: &str, work: &[u8]) {
    let said = rig.agent.ok(&["preserved", "push", "--id", id]);
    assert!(said.contains("conflict version"), "{said}");
    let versions = rig.host.ok(&["versions", user]);
    let conflict = versions["versions"]
        .as_array()
        .or_else(|| versions.as_array())
        .and_then(|vs| vs.iter().rev().find(|v| v["kind"] == "conflict").cloned())
        .unwrap_or_else(|| panic!("no conflict version: {versions}"));
    let v = conflict["version"].as_u64().unwrap();
    assert_eq!(rig.host.export(user, v, rig.dir.path()), work);
    assert!(rig.preserved().iter().all(|c| c["id"] != id));
}

#[test]
fn quota_refusal_is_an_operator_event_and_the_bytes_come_back() {
    let mut rig = Rig::start("user_quota_bytes = 1048576", "");
    rig.host.ok(&["assign", "alice", "vm-a"]);
    let seed = noise(512 << 10, 21);
    let profile = rig.dir.path().join("alice.img");
    std::fs::write(&profile, &seed).unwrap();
    rig.host
        .ok(&["import", "alice", &profile.display().to_string()]);
    rig.agent
        .ok(&["login", "--user", "alice", "--session", "a1"]);
    let mut work = std::fs::read(rig.img("alice")).unwrap();
    assert_eq!(work, seed);
    work.extend(noise(2 << 20, 22));
    std::fs::write(rig.img("alice"), &work).unwrap();
    let id = refused_logout(&rig, "alice", "a1", &work, "QuotaExceeded");
    assert_eq!(rig.host.metric("uve_updates_refused_total"), 1);
    // Her next login gets version 1 back and says the newer bytes exist.
    let said = rig
        .agent
        .ok(&["login", "--user", "alice", "--session", "a2"]);
    assert!(
        said.contains("retrieved version 1") && said.contains(&id),
        "{said}"
    );
    assert_eq!(std::fs::read(rig.img("alice")).unwrap(), seed);
    rig.agent.ok(&["logout", "--session", "a2"]);
    // The operator raises the quota; the copy goes to the host.
    rig.reconfigure_host("user_quota_bytes = 8388608");
    push_lands_as_conflict(&rig, "alice", &id, &work);
}

#[test]
fn too_large_and_unassigned_refusals_keep_the_bytes() {
    let rig = Rig::start(
        "max_uif_size = 1048576",
        "on_retrieve_failure = \"temporary\"",
    );
    // Over the host's UIF size limit.
    rig.host.ok(&["assign", "bob", "vm-a"]);
    rig.agent.ok(&["login", "--user", "bob", "--session", "b1"]);
    let big = noise(1536 << 10, 31);
    std::fs::write(rig.img("bob"), &big).unwrap();
    let id = refused_logout(&rig, "bob", "b1", &big, "TooLarge");
    let said = rig.agent.ok(&["login", "--user", "bob", "--session", "b2"]);
    assert!(said.contains(&id), "{said}");
    rig.agent.ok(&["logout", "--session", "b2"]);
    // Not assigned to this VM: the login runs on a temporary UIF whose
    // update the host refuses — the work done on it is kept all the same.
    let said = rig
        .agent
        .ok(&["login", "--user", "carol", "--session", "c1"]);
    assert!(said.contains("TEMPORARY"), "{said}");
    let work = noise(300 << 10, 32);
    std::fs::write(rig.img("carol"), &work).unwrap();
    let id = refused_logout(&rig, "carol", "c1", &work, "NotAssigned");
    rig.host.ok(&["assign", "carol", "vm-a"]);
    push_lands_as_conflict(&rig, "carol", &id, &work);
}
