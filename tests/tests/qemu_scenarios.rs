//! End-to-end scenarios: the real `uve-host` on this machine, the real
//! static `uve-agent` inside QEMU guests, connected by real virtio-vsock
//! (vhost-device-vsock, hybrid vsock on the host side). Each test boots its
//! guests once and runs several checks per boot; every assertion is on real
//! outcomes: UIF bytes in the guest and in the host store, versions, events
//! and counters of the host, and the agent's answers.
//!
//! Run one scenario: `cargo nextest run -p uve-e2e -E 'test(file_mode)'`.
//! Logs: each test prints its run directory (`/tmp/uve-e2e-*`, kept on
//! failure) holding `host.log`, `console.log` (guest console, agent log
//! included), `vhost.log` and `qemu.log`.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::cast_possible_truncation
)]

use std::path::Path;
use std::time::Duration;

use uve_e2e::host::HostDaemon;
use uve_e2e::ingredients::Ingredients;
use uve_e2e::initramfs::Initramfs;
use uve_e2e::poll::wait_for;
use uve_e2e::scenario::{AGENT_FILE_MODE, RunDir, begin, host_with_alice_imported, step};
use uve_e2e::vm::Vm;

const AGENT_DIR_MODE: &str = r#"
host = "vsock:2:7075"
[uif]
mode = "directory"
home = "/home/{user}"
"#;

use uve_protocol::testdata::noise;

/// The guest's file-mode UIF of alice.
const ALICE_IMG: &str = "/var/lib/uve-agent/uif/alice.img";

fn boot(ing: &Ingredients, run: &RunDir, name: &str, agent_config: &str) -> Vm {
    let dir = run.sub(name);
    let img = Initramfs::new(ing).expect("initramfs");
    img.file("etc/uve-agent.toml", agent_config.as_bytes())
        .expect("config");
    let initrd = img
        .build(&dir.join("initramfs.cpio.gz"))
        .expect("build initramfs");
    let mut vm = Vm::boot(ing, name, &dir, &initrd).expect("boot");
    let t = vm
        .wait_ready(Duration::from_secs(120))
        .expect("guest ready");
    eprintln!("{name}: guest ready after {t:?}");
    vm
}

fn wait_connected(host: &HostDaemon, vm: &str) {
    host.must_connect(vm, Duration::from_secs(60));
}

fn user_chunks_fetched(host: &HostDaemon, user: &str) -> u64 {
    host.metric(&format!("uve_user_chunks_fetched_total{{user=\"{user}\"}}"))
}

/// File mode on one VM: login → retrieve → modify → logout → update; a
/// second login fetches only changed chunks; the host restarts under the
/// running guest; monitoring; UA deploy/update/rollback/delete; a
/// supervised UA suspended, resumed and killed (unexpected disconnect);
/// finally the VM crashes with a session open.
#[test]
fn file_mode_lifecycle_on_one_vm() {
    let Some((ing, run, mut t)) = begin("file_mode_lifecycle_on_one_vm") else {
        return;
    };
    let (mut host, import, v1, v1_head) = host_with_alice_imported(&ing, &run, &run.sub("vm-a"));
    step("host up, alice imported", &mut t);

    let mut vm = boot(&ing, &run, "vm-a", AGENT_FILE_MODE);
    wait_connected(&host, "vm-a");
    step("boot + agent connected", &mut t);

    let cold = cold_login_retrieves(&host, &vm, &v1);
    step("login (cold retrieve)", &mut t);

    let v2 = logout_commits_update(&host, &vm, &run, &v1, v1_head);
    step("logout (update)", &mut t);

    let v3 = warm_login_fetches_changed_chunks(&host, &vm, &import, &v2, cold);
    step("warm login", &mut t);

    let v4 = host_restart_then_logout(&mut host, &vm, &run, &v3);
    step("host restart + logout", &mut t);

    monitoring_grant_expiry_revoke(&host, &vm);
    step("monitoring", &mut t);

    ua_deploy_update_rollback_delete(&host, &vm, &run);
    step("UA deploy/update/rollback/delete", &mut t);

    supervised_ua_suspend_resume(&host, &vm);
    step("suspend/resume", &mut t);

    ua_killed_is_unexpected_disconnect(&host, &vm, &run, &v4);
    step("UA killed → unexpected disconnect", &mut t);

    vm_crash_with_open_session(&host, &mut vm, &run);
    step("VM crash", &mut t);
}

/// Login → retrieve: the guest holds exactly the imported bytes, fetched
/// cold (at least 40 chunks). Returns the number of chunks fetched.
fn cold_login_retrieves(host: &HostDaemon, vm: &Vm, v1: &[u8]) -> u64 {
    let fetched0 = user_chunks_fetched(host, "alice");
    vm.ok("uve-agent login --user alice --session s1");
    assert_eq!(
        vm.get(ALICE_IMG).expect("UIF in guest"),
        v1,
        "retrieved UIF differs"
    );
    let cold = user_chunks_fetched(host, "alice") - fetched0;
    assert!(
        cold >= 40,
        "cold retrieve of 4 MiB fetched only {cold} chunks"
    );
    cold
}

/// Modify → logout → update: the store holds the guest's bytes as a new
/// head. Returns what the guest wrote (`v2`).
fn logout_commits_update(
    host: &HostDaemon,
    vm: &Vm,
    run: &RunDir,
    v1: &[u8],
    v1_head: u64,
) -> Vec<u8> {
    let mut v2 = v1.to_vec();
    v2[1 << 20..(1 << 20) + 65536].copy_from_slice(&noise(65536, 2));
    vm.put(ALICE_IMG, &v2);
    vm.ok("uve-agent logout --session s1");
    let v2_head = host.head("alice");
    assert!(v2_head > v1_head, "logout did not commit a new head");
    assert_eq!(
        host.export("alice", v2_head, run.path()),
        v2,
        "store differs from what the guest wrote"
    );
    v2
}

/// A second login on the same VM fetches only the changed chunks (1-4)
/// of a version imported behind the VM's back. Returns that version (`v3`).
fn warm_login_fetches_changed_chunks(
    host: &HostDaemon,
    vm: &Vm,
    import: &Path,
    v2: &[u8],
    cold: u64,
) -> Vec<u8> {
    let before = user_chunks_fetched(host, "alice");
    let mut v3 = v2.to_vec();
    v3[3 << 20..(3 << 20) + 4096].copy_from_slice(&noise(4096, 3));
    // Change the store behind the VM's back (import), so there is
    // something to fetch: 1-3 chunks around the 4 KiB edit.
    std::fs::write(import, &v3).unwrap();
    host.import("alice", import);
    vm.ok("uve-agent login --user alice --session s2");
    assert_eq!(vm.get(ALICE_IMG).expect("UIF"), v3);
    let warm = user_chunks_fetched(host, "alice") - before;
    assert!(
        (1..=4).contains(&warm),
        "warm login fetched {warm} chunks (cold: {cold})"
    );
    eprintln!("  warm login fetched {warm} chunks, cold {cold}");
    v3
}

/// Host restart while the guest runs: the agent reconnects by itself and
/// the next logout commits what the guest wrote. Returns that (`v4`).
fn host_restart_then_logout(host: &mut HostDaemon, vm: &Vm, run: &RunDir, v3: &[u8]) -> Vec<u8> {
    host.restart(true).expect("restart host");
    wait_connected(host, "vm-a");
    let mut v4 = v3.to_vec();
    v4[..4096].copy_from_slice(&noise(4096, 4));
    vm.put(ALICE_IMG, &v4);
    vm.ok("uve-agent logout --session s2");
    let v4_head = host.head("alice");
    assert_eq!(host.export("alice", v4_head, run.path()), v4);
    v4
}

/// The exit code of `uve-agent monitor-check` for `monitor` on session
/// `s3` (0: allowed).
fn monitor_check(vm: &Vm, monitor: &str) -> i32 {
    vm.sh(&format!(
        "uve-agent monitor-check --session s3 --user {monitor}"
    ))
    .0
}

/// Monitoring: no grant before one is given; a grant is visible to its
/// monitor only; revoke ends it; a short grant expires by itself.
fn monitoring_grant_expiry_revoke(host: &HostDaemon, vm: &Vm) {
    vm.ok("uve-agent login --user alice --session s3");
    assert_ne!(monitor_check(vm, "bob"), 0, "granted before any grant");
    // Visibility is checked on a grant valid for an hour (the default): a
    // 4 s grant could expire before a slow TCG guest on a loaded machine
    // answers the check, or at once if the guest clock runs ahead.
    host.ok(&["monitor", "grant", "vm-a", "s3", "bob"]);
    assert_eq!(monitor_check(vm, "bob"), 0, "grant not visible");
    assert_ne!(
        monitor_check(vm, "carol"),
        0,
        "grant leaked to another user"
    );
    host.ok(&["monitor", "revoke", "vm-a", "s3", "bob"]);
    assert_ne!(monitor_check(vm, "bob"), 0, "revoke not effective");
    // A short grant: the host turns the TTL into an expiry, and the agent
    // stops honouring the grant once its clock passes it.
    let asked = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let g = host.ok(&["monitor", "grant", "vm-a", "s3", "bob", "--ttl-secs", "4"]);
    let expires = g["expires"].as_u64().expect("expiry in the answer");
    assert!(expires >= asked + 4000, "{g}");
    assert!(
        wait_for(Duration::from_secs(20), || monitor_check(vm, "bob") != 0),
        "grant did not expire"
    );
    vm.ok("uve-agent logout --session s3");
}

/// A tarred `desk` UA bundle of `version` (a script counting into
/// `/tmp/desk-progress`) in the run directory; returns the tar's path.
fn desk_bundle(run: &RunDir, version: &str) -> String {
    uve_e2e::baked::ua_bundle(
        run.path(),
        "desk",
        version,
        "n=0\nwhile true; do n=$((n+1)); echo $n > /tmp/desk-progress; sleep 0.2; done",
    )
}

/// The version of the `desk` UA current in the guest, if any.
fn desk_version(vm: &Vm) -> Option<String> {
    vm.get("/var/lib/uve-agent/ua/desk/current/VERSION")
        .map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// UA deploy → update → rollback → delete, checked inside the guest; then
/// `desk` 3.0 is deployed for the supervised-UA steps.
fn ua_deploy_update_rollback_delete(host: &HostDaemon, vm: &Vm, run: &RunDir) {
    host.ok(&[
        "ua",
        "deploy",
        "vm-a",
        &desk_bundle(run, "1.0"),
        "--name",
        "desk",
        "--version",
        "1.0",
        "--entry",
        "bin/desk.sh",
    ]);
    assert_eq!(desk_version(vm).as_deref(), Some("1.0"));
    host.ok(&[
        "ua",
        "deploy",
        "vm-a",
        &desk_bundle(run, "2.0"),
        "--name",
        "desk",
        "--version",
        "2.0",
        "--entry",
        "bin/desk.sh",
        "--update",
    ]);
    assert_eq!(desk_version(vm).as_deref(), Some("2.0"));
    host.ok(&["ua", "rollback", "vm-a", "desk"]);
    assert_eq!(desk_version(vm).as_deref(), Some("1.0"));
    host.ok(&["ua", "rm", "vm-a", "desk"]);
    assert_eq!(desk_version(vm), None, "UA still present after delete");
    host.ok(&[
        "ua",
        "deploy",
        "vm-a",
        &desk_bundle(run, "3.0"),
        "--name",
        "desk",
        "--version",
        "3.0",
        "--entry",
        "bin/desk.sh",
    ]);
}

/// The `desk` UA's counter in the guest (0 before its first write).
fn desk_progress(vm: &Vm) -> u64 {
    vm.get("/tmp/desk-progress")
        .and_then(|b| String::from_utf8_lossy(&b).trim().parse().ok())
        .unwrap_or(0)
}

/// Supervised UA: a session with `desk` makes progress; suspend stops its
/// progress, resume continues it.
fn supervised_ua_suspend_resume(host: &HostDaemon, vm: &Vm) {
    vm.ok("uve-agent login --user alice --session s4 --ua desk");
    assert!(
        wait_for(Duration::from_secs(20), || desk_progress(vm) >= 3),
        "UA made no progress"
    );
    host.ok(&["suspend", "vm-a", "s4"]);
    let frozen = desk_progress(vm);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        desk_progress(vm) <= frozen + 1,
        "UA kept running while suspended ({frozen} → {})",
        desk_progress(vm)
    );
    host.ok(&["resume", "vm-a", "s4"]);
    let resumed = desk_progress(vm);
    assert!(
        wait_for(Duration::from_secs(20), || desk_progress(vm) >= resumed + 3),
        "UA did not resume"
    );
}

/// The UA dies without logout: an unexpected disconnect event, and the
/// session's changed UIF is flushed as a new head.
fn ua_killed_is_unexpected_disconnect(host: &HostDaemon, vm: &Vm, run: &RunDir, v4: &[u8]) {
    // The session changed its UIF, so the flush has a new version to commit
    // (an unchanged UIF is not committed again).
    let mut v5 = v4.to_vec();
    v5[2 << 20..(2 << 20) + 4096].copy_from_slice(&noise(4096, 5));
    vm.put(ALICE_IMG, &v5);
    let since = host.last_seq();
    let head_before = host.head("alice");
    vm.ok("kill -9 $(ps -o pid,args | grep [b]in/desk.sh | head -n 1 | awk '{print $1}')");
    let ev = host.wait_event(
        since,
        "unexpected_disconnect",
        Duration::from_secs(60),
        |e| e["session"] == "s4",
    );
    assert_eq!(ev["user"], "alice", "{ev}");
    assert_eq!(ev["ua"], "desk", "{ev}");
    assert!(ev["reason"].as_str().is_some_and(|r| !r.is_empty()), "{ev}");
    assert!(
        wait_for(Duration::from_secs(60), || host.head("alice") > head_before),
        "UIF not flushed after the UA died"
    );
    assert_eq!(
        host.export("alice", host.head("alice"), run.path()),
        v5,
        "flushed UIF differs from what the session wrote"
    );
}

/// The VM crashes with a session open: `vm_lost` and an unexpected
/// disconnect, and the committed head stays as it was.
fn vm_crash_with_open_session(host: &HostDaemon, vm: &mut Vm, run: &RunDir) {
    vm.ok("uve-agent login --user alice --session s5");
    let committed = host.head("alice");
    let committed_bytes = host.export("alice", committed, run.path());
    let since = host.last_seq();
    vm.crash();
    host.wait_event(since, "vm_lost", Duration::from_secs(30), |e| {
        e["vm"] == "vm-a"
    });
    host.wait_event(
        since,
        "unexpected_disconnect",
        Duration::from_secs(30),
        |e| e["session"] == "s5",
    );
    assert_eq!(host.head("alice"), committed, "head moved after the crash");
    assert_eq!(host.export("alice", committed, run.path()), committed_bytes);
}

/// Directory mode on two VMs: a home directory round trip, a VM switch
/// (the old VM flushes on `UserRelease`, the new one sees its data), and a
/// rogue guest that is refused while the host and the other VM keep working.
#[test]
fn directory_mode_switch_and_rogue_guest() {
    let Some((ing, run, mut t)) = begin("directory_mode_switch_and_rogue_guest") else {
        return;
    };
    let host = HostDaemon::start(&ing, run.path(), "").expect("host");
    for name in ["vm-a", "vm-b"] {
        host.add_vm(name, &run.sub(name).join("v.sock"));
    }
    host.ok(&["assign", "bob", "vm-a"]);
    let a = boot(&ing, &run, "vm-a", AGENT_DIR_MODE);
    let b = boot(&ing, &run, "vm-b", AGENT_DIR_MODE);
    wait_connected(&host, "vm-a");
    wait_connected(&host, "vm-b");
    step("two VMs up", &mut t);

    // --- first login (no UIF yet), write a home, logout → a version.
    a.ok("uve-agent login --user bob --session a1");
    a.ok("mkdir -p /home/bob/docs && echo 'hello from A' > /home/bob/docs/note.txt && chown -R 1001:1001 /home/bob");
    let blob = noise(300_000, 9);
    a.put("/home/bob/docs/blob.bin", &blob);
    a.ok("uve-agent logout --session a1");
    let v1 = host.head("bob");
    let tar = host.export("bob", v1, run.path());
    let out = run.sub("bob-v1");
    let tar_path = run.path().join("bob-v1.tar");
    std::fs::write(&tar_path, &tar).unwrap();
    let st = std::process::Command::new("tar")
        .arg("-xf")
        .arg(&tar_path)
        .arg("-C")
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success(), "exported UIF is not a tar archive");
    assert_eq!(
        std::fs::read_to_string(out.join("docs/note.txt")).unwrap(),
        "hello from A\n"
    );
    assert_eq!(std::fs::read(out.join("docs/blob.bin")).unwrap(), blob);
    step("directory round trip", &mut t);

    // --- VM switch: bob works on A, is assigned to B; A flushes on release.
    a.ok("uve-agent login --user bob --session a2");
    assert_eq!(a.ok("cat /home/bob/docs/note.txt"), "hello from A\n");
    a.ok("echo 'written on A before the switch' > /home/bob/docs/late.txt");
    let since = host.last_seq();
    host.ok(&["assign", "bob", "vm-b"]);
    host.wait_event(since, "user_released", Duration::from_secs(60), |e| {
        e["user"] == "bob"
    });
    b.ok("uve-agent login --user bob --session b1");
    assert_eq!(
        b.ok("cat /home/bob/docs/late.txt"),
        "written on A before the switch\n"
    );
    assert_eq!(b.get("/home/bob/docs/blob.bin").expect("blob on B"), blob);
    let owner = b.ok("stat -c %u:%g /home/bob/docs/late.txt");
    assert_eq!(owner.trim(), "1001:1001", "ownership not restored on B");
    step("VM switch", &mut t);

    // --- a rogue program on A (bob is no longer assigned there) is refused;
    // oversized and garbage frames only cost it its own connection.
    let (code, out) = a.sh("UVE_E2E_GUEST=1 e2e-guest rogue --user bob");
    assert_eq!(code, 0, "rogue guest not contained:\n{out}");
    assert_eq!(out.matches("contained:").count(), 3, "{out}");
    // The host and the other VM keep working.
    b.ok("echo after-rogue > /home/bob/after.txt");
    b.ok("uve-agent logout --session b1");
    let v_last = host.head("bob");
    let tar = host.export("bob", v_last, run.path());
    assert!(
        tar.windows(b"after-rogue".len())
            .any(|w| w == b"after-rogue"),
        "B's logout after the rogue probes did not commit"
    );
    // The rogue's connections came through A's socket, so the host bound
    // them to A and they displaced A's agent for a moment: it must be back.
    wait_connected(&host, "vm-a");
    step("rogue guest contained", &mut t);

    pack_child_runs_in_its_users_cgroup(&b);
    step("pack child in its user's cgroup", &mut t);
}

/// bob's pack child (at a logout on `vm`) runs in the agent's own cgroup
/// for bob (the guest's agent sits in the root cgroup: `/uve-agent-pack/<user>`),
/// not among the agent's processes; the cgroup goes when the pack ends.
fn pack_child_runs_in_its_users_cgroup(b: &Vm) {
    b.ok("uve-agent login --user bob --session b2");
    b.ok(
        "mkdir -p /home/bob/many && i=0; while [ $i -lt 3000 ]; do echo $i > /home/bob/many/f$i; \
         i=$((i+1)); done; chown -R 1001:1001 /home/bob",
    );
    // `pack-hom[e]`: the pattern does not match this shell's own command
    // line. The agent moves the child right after the spawn: the loop
    // looks until it is seen there (or the pack is over).
    let seen = b.ok(
        "(uve-agent logout --session b2 > /tmp/b2.out 2>&1 &); n=0; last=unseen; \
         while [ $n -lt 3000 ]; do \
         for f in $(grep -l 'pack-hom[e]' /proc/[0-9]*/cmdline 2>/dev/null); do \
         c=$(cat ${f%/cmdline}/cgroup 2>/dev/null); [ -n \"$c\" ] && last=$c; done; \
         [ \"$last\" = 0::/uve-agent-pack/bob ] && break; n=$((n+1)); done; echo $last | head -c 200",
    );
    assert_eq!(
        seen.trim(),
        "0::/uve-agent-pack/bob",
        "the pack child's cgroup"
    );
    assert!(
        wait_for(Duration::from_secs(120), || b
            .ok("cat /tmp/b2.out")
            .contains("committed")),
        "bob's logout did not commit: {}",
        b.ok("cat /tmp/b2.out")
    );
    b.ok("test ! -e /sys/fs/cgroup/uve-agent-pack/bob");
}
