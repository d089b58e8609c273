//! Suspend through the cgroup v2 freezer, in the baked Debian image under
//! systemd (which boots on the unified hierarchy): the packaged
//! `uve-agent.service` has `Delegate=yes`, the agent moves itself into the
//! leaf `<unit>/supervisor` and runs a session's UA, started at login, in
//! `<unit>/ua/<session>`. `uvectl suspend` (host API → UVE-2 → agent)
//! freezes that cgroup: its `cgroup.events` says `frozen 1`, the UA stops
//! making progress, and it is frozen, not SIGSTOPped. `uvectl resume` thaws
//! it (`frozen 0`) and it makes progress again. `systemctl restart
//! uve-agent` while the UA is frozen leaves it frozen; the new agent adopts
//! it with its cgroup, knows it is suspended and thaws it. Logout stops the
//! UA and removes its cgroup.
//!
//! One bake (debootstrap cached) and one systemd boot under TCG, ~2 min.
//! Needs what `baked_image` needs; skipped without it unless
//! `E2E_REQUIRE=1`. Run it: `cargo nextest run -p uve-e2e -E
//! 'test(cgroup2)'`; its run directory (`/tmp/uve-e2e-*`, kept on failure)
//! holds `bake.log`, `console.log` and `host.log`.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use uve_e2e::baked::{bake_image, boot_with_systemd, ua_bundle};
use uve_e2e::host::HostDaemon;
use uve_e2e::ingredients::Ingredients;
use uve_e2e::poll::wait_for;
use uve_e2e::rootdisk::BakeIngredients;
use uve_e2e::scenario::RunDir;
use uve_e2e::vm::Vm;

const NAME: &str = "baked_image_cgroup2_freezer_suspends_and_resumes_a_ua";
const VM: &str = "vm-cg2";

const AGENT_CONFIG: &str = r#"# written by bake-image.sh --config (baked_cgroup2 test)
host = "vsock:2:7075"
login_timeout_secs = 45
[uif]
mode = "file"
path = "/var/lib/uve-agent/uif/{user}.img"
"#;

/// The UA's progress counter, written by the UA (as alice).
const TICKS: &str = "/tmp/desk-ticks";
/// Where the UA writes the pid of a child that left its process group.
const STRAGGLER: &str = "/tmp/desk-straggler";
/// The UA: starts a child in a session of its own (outside the UA's
/// process group, still in its cgroup), then counts, five times a second,
/// with a child process per tick.
const UA_SCRIPT: &str = "setsid sleep 600 &\necho $! > /tmp/desk-straggler\ni=0\nwhile :; do i=$((i+1)); echo $i > /tmp/desk-ticks.tmp && mv /tmp/desk-ticks.tmp /tmp/desk-ticks; sleep 0.2; done";

#[test]
fn baked_image_cgroup2_freezer_suspends_and_resumes_a_ua() {
    let Some(ing) = Ingredients::require(NAME) else {
        return;
    };
    let Some(bake) = BakeIngredients::require(&ing, NAME) else {
        return;
    };
    let run = RunDir::new(NAME);
    let dir = run.path();
    let t = Instant::now();
    let (disk, initrd) = bake_image(&ing, &bake, dir, NAME, AGENT_CONFIG, &[]);
    let host = HostDaemon::start(&ing, dir, "").expect("host");
    let vm_dir = dir.join("vm");
    std::fs::create_dir_all(&vm_dir).unwrap();
    host.add_vm(VM, &vm_dir.join("v.sock"));
    host.ok(&["assign", "alice", VM]);
    let tar = ua_bundle(dir, "desk", "1.0", UA_SCRIPT);
    let vm = boot_with_systemd(&ing, &host, VM, &vm_dir, &initrd, &disk);
    host.ok(&[
        "ua",
        "deploy",
        VM,
        &tar,
        "--name",
        "desk",
        "--version",
        "1.0",
        "--entry",
        "bin/desk.sh",
    ]);

    let unit = agent_in_its_leaf(&vm);
    let cg = format!("/sys/fs/cgroup{unit}/ua/s1");
    let (pid, straggler) = ua_started_at_login(&vm, &unit);
    eprintln!("{NAME}: baked, booted, UA running: {:?}", t.elapsed());

    suspend_freezes(&host, &vm, &cg, pid);
    resume_thaws(&host, &vm, &cg);
    restart_while_frozen(&host, &vm, &unit, pid);
    logout_ends_the_cgroup(&vm, &cg, &[pid, straggler]);
    // What the agent and systemd said about it (logged, for the record).
    eprintln!(
        "{NAME}: the unit's journal on cgroups:\n{}",
        vm.sh("journalctl -b -u uve-agent.service --no-pager -o cat | grep -iE 'cgroup|leaf|left-over'")
            .1
    );
    eprintln!("{NAME}: total {:?}", t.elapsed());
}

/// `uve-agent login --ua desk` as alice: the UA runs as her in its own
/// cgroup beside the agent's leaf and makes progress. Returns the UA's pid
/// and its straggler's.
fn ua_started_at_login(vm: &Vm, unit: &str) -> (u32, u32) {
    vm.ok("id alice >/dev/null 2>&1 || useradd -m alice");
    vm.ok("uve-agent login --user alice --session s1 --ua desk");
    let pid = ua_pid(vm);
    assert_eq!(
        vm.ok(&format!("cat /proc/{pid}/cgroup")).trim(),
        format!("0::{unit}/ua/s1"),
        "the UA is not in its own cgroup beside the agent's leaf"
    );
    assert_eq!(
        vm.ok(&format!("stat -c %U /proc/{pid}")).trim(),
        "alice",
        "the UA runs as alice"
    );
    assert!(
        wait_for(Duration::from_secs(30), || ticks(vm) >= 3),
        "the UA made no progress"
    );
    (pid, straggler_in_the_cgroup(vm, unit, pid))
}

/// An agent restart while the UA is frozen: the UA stays in its cgroup,
/// frozen; the new agent moves into its leaf again, adopts the UA with its
/// cgroup, knows it is suspended, and thaws it.
fn restart_while_frozen(host: &HostDaemon, vm: &Vm, unit: &str, pid: u32) {
    let cg = format!("/sys/fs/cgroup{unit}/ua/s1");
    suspend_freezes(host, vm, &cg, pid);
    let since = host.last_seq();
    vm.ok("systemctl restart uve-agent.service");
    host.wait_event(since, "vm_connected", Duration::from_secs(90), |e| {
        e["vm"] == VM
    });
    assert_eq!(agent_in_its_leaf(vm), unit);
    assert_eq!(ua_pid(vm), pid, "the restarted agent adopted another UA");
    assert_eq!(frozen(vm, &cg), "frozen 1", "thawed by the restart");
    assert!(
        vm.ok("uve-agent status").contains("SUSPENDED"),
        "the adopted UA is not known as suspended"
    );
    resume_thaws(host, vm, &cg);
}

/// Logout ends every process in the UA's cgroup (`pids`: the UA and its
/// child outside its process group) and removes the cgroup.
fn logout_ends_the_cgroup(vm: &Vm, cg: &str, pids: &[u32]) {
    vm.ok("uve-agent logout --session s1");
    let gone = wait_for(Duration::from_secs(10), || {
        vm.sh(&format!("test -d {cg}")).0 != 0
    });
    assert!(
        gone,
        "the UA's cgroup outlived its logout: {}",
        vm.sh(&format!("cat {cg}/cgroup.procs")).1
    );
    for p in pids {
        assert_ne!(
            vm.sh(&format!("test -d /proc/{p}")).0,
            0,
            "process {p} of the UA's cgroup outlived the logout"
        );
    }
}

/// The agent's unit is delegated and the agent sits in the leaf
/// `supervisor` of its cgroup, the unit's root holding no process; returns
/// the unit's cgroup (`/system.slice/uve-agent.service`).
fn agent_in_its_leaf(vm: &Vm) -> String {
    assert_eq!(
        vm.ok("systemctl show -p Delegate --value uve-agent.service")
            .trim(),
        "yes"
    );
    let unit = vm
        .ok("systemctl show -p ControlGroup --value uve-agent.service")
        .trim()
        .to_string();
    assert!(unit.ends_with("/uve-agent.service"), "{unit}");
    let pid = vm.ok("systemctl show -p MainPID --value uve-agent.service");
    assert_eq!(
        vm.ok(&format!("cat /proc/{}/cgroup", pid.trim())).trim(),
        format!("0::{unit}/supervisor"),
        "the agent did not move into its leaf"
    );
    assert_eq!(
        vm.ok(&format!("cat /sys/fs/cgroup{unit}/cgroup.procs"))
            .trim(),
        "",
        "processes in the delegated unit's root"
    );
    unit
}

/// The UA's child in a session of its own: in the UA's cgroup, not in its
/// process group. Returns its pid.
fn straggler_in_the_cgroup(vm: &Vm, unit: &str, ua: u32) -> u32 {
    let pid: u32 =
        String::from_utf8_lossy(&vm.get(STRAGGLER).expect("the UA wrote no straggler pid"))
            .trim()
            .parse()
            .expect("straggler pid");
    assert_eq!(
        vm.ok(&format!("cat /proc/{pid}/cgroup")).trim(),
        format!("0::{unit}/ua/s1")
    );
    let pgid = |p: u32| vm.ok(&format!("cut -d')' -f2 /proc/{p}/stat | cut -d' ' -f4"));
    assert_ne!(
        pgid(pid),
        pgid(ua),
        "the straggler is in the UA's process group"
    );
    pid
}

/// The pid of session s1's UA, from `uve-agent status`.
fn ua_pid(vm: &Vm) -> u32 {
    let status = vm.ok("uve-agent status");
    status
        .split_whitespace()
        .find_map(|w| w.strip_prefix("pid="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no UA pid in `uve-agent status`:\n{status}"))
}

/// The UA's counter (0 before its first write).
fn ticks(vm: &Vm) -> u64 {
    vm.get(TICKS)
        .and_then(|b| String::from_utf8_lossy(&b).trim().parse().ok())
        .unwrap_or(0)
}

/// `frozen` of cgroup `cg`'s `cgroup.events`.
fn frozen(vm: &Vm, cg: &str) -> String {
    let events = vm.ok(&format!("cat {cg}/cgroup.events"));
    events
        .lines()
        .find(|l| l.starts_with("frozen "))
        .unwrap_or_else(|| panic!("no frozen line in {cg}/cgroup.events:\n{events}"))
        .to_string()
}

/// `uvectl suspend`: the cgroup is frozen by the time the host answers,
/// the UA makes no progress, and it was frozen, not stopped by a signal.
fn suspend_freezes(host: &HostDaemon, vm: &Vm, cg: &str, pid: u32) {
    let since = host.last_seq();
    host.ok(&["suspend", VM, "s1"]);
    assert_eq!(frozen(vm, cg), "frozen 1");
    assert_eq!(vm.ok(&format!("cat {cg}/cgroup.freeze")).trim(), "1");
    host.wait_event(since, "session_suspended", Duration::from_secs(10), |e| {
        e["session"] == "s1"
    });
    assert!(vm.ok("uve-agent status").contains("SUSPENDED"));
    let state = vm.ok(&format!("grep State: /proc/{pid}/status"));
    assert!(
        !state.contains("stopped"),
        "SIGSTOPped, not frozen: {state}"
    );
    let at = ticks(vm);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(ticks(vm), at, "the UA made progress while frozen");
}

/// `uvectl resume`: the cgroup is thawed and the UA makes progress again.
fn resume_thaws(host: &HostDaemon, vm: &Vm, cg: &str) {
    host.ok(&["resume", VM, "s1"]);
    assert_eq!(frozen(vm, cg), "frozen 0");
    assert!(!vm.ok("uve-agent status").contains("SUSPENDED"));
    let at = ticks(vm);
    assert!(
        wait_for(Duration::from_secs(20), || ticks(vm) >= at + 3),
        "the UA made no progress after resume"
    );
}
