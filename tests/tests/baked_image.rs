//! Packaging end to end: a Debian bookworm guest image built the way an
//! operator builds one (`debootstrap` → `packaging/bake-image.sh` installs
//! the real `uve-agent` .deb, enables its unit, writes
//! `/etc/uve/agent.toml`; `mkfs.ext4 -d` turns it into a disk without any
//! mount), booted under QEMU (TCG) with **systemd as init** and a real
//! virtio-vsock device. The agent must come up by itself from its unit,
//! connect to the real `uve-host` on this machine, and serve a login /
//! logout round trip that commits a new version on the host.
//!
//! The image also carries the `uve-host` package, so its hardened unit is
//! started by a real systemd (inside the guest) and must be active with an
//! answering API. For the test only, the static `e2e-guest` command server
//! is baked in with its own unit (`UVE_E2E_GUEST=1`).
//!
//! Slow-ish (a systemd boot under TCG, ~1 min; debootstrap once, cached
//! under `target/e2e-cache/rootfs`). Needs root, debootstrap, e2fsprogs and
//! `packaging/build-debs.sh`'s packages; skipped without them unless
//! `E2E_REQUIRE=1`. Run it: `cargo nextest run -p uve-e2e -E
//! 'binary(baked_image)'`; its run directory (`/tmp/uve-e2e-*`, kept on
//! failure) holds `bake.log`, `console.log` (kernel + systemd + journal),
//! `host.log`.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use uve_e2e::baked::{bake_image, boot_with_systemd};
use uve_e2e::host::HostDaemon;
use uve_e2e::ingredients::Ingredients;
use uve_e2e::poll::wait_for;
use uve_e2e::rootdisk::BakeIngredients;
use uve_e2e::scenario::RunDir;
use uve_e2e::vm::Vm;

/// The configuration the bake writes (the defaults, spelled out, plus a
/// marker value the test reads back from the guest).
const AGENT_CONFIG: &str = r#"# written by bake-image.sh --config (baked_image test)
host = "vsock:2:7075"
login_timeout_secs = 45
[uif]
mode = "file"
path = "/var/lib/uve-agent/uif/{user}.img"
"#;

use uve_protocol::testdata::noise;

fn s(p: &Path) -> String {
    p.display().to_string()
}

const NAME: &str = "baked_debian_image_boots_agent_by_systemd_and_round_trips";

#[test]
fn baked_debian_image_boots_agent_by_systemd_and_round_trips() {
    let Some(ing) = Ingredients::require(NAME) else {
        return;
    };
    let Some(bake) = BakeIngredients::require(&ing, NAME) else {
        return;
    };
    let run = RunDir::new(NAME);
    let dir = run.path();

    let (disk, initrd) = bake_image(&ing, &bake, dir, NAME, AGENT_CONFIG, &[]);
    let (host, vm_dir, v1, v1_head) = host_with_alice_imported(&ing, dir);
    let vm = boot_with_systemd(&ing, &host, "vm-baked", &vm_dir, &initrd, &disk);

    agent_unit_under_systemd(&vm);
    host_unit_under_systemd(&vm);
    agent_reload_keeps_it_running(&vm);
    host_unit_listens_on_af_vsock(&vm);
    log_security_and_failed_units(&vm);

    login_logout_round_trip(&host, &vm, dir, &v1, v1_head);
    agent_stops_through_its_unit(&host, &vm);
    drop(vm);
}

/// The real host, listening for the VM before it boots; alice assigned to
/// `vm-baked` with a 1 MiB `v1` imported. Returns the host, the VM's
/// directory, `v1` and its head version.
fn host_with_alice_imported(ing: &Ingredients, dir: &Path) -> (HostDaemon, PathBuf, Vec<u8>, u64) {
    let host = HostDaemon::start(ing, dir, "").expect("host");
    let vm_dir = dir.join("vm");
    std::fs::create_dir_all(&vm_dir).unwrap();
    host.ok(&[
        "vm",
        "add",
        "vm-baked",
        "--uds-path",
        &s(&vm_dir.join("v.sock")),
    ]);
    host.ok(&["assign", "alice", "vm-baked"]);
    let v1 = noise(1 << 20, 7);
    let import = dir.join("alice-v1.img");
    std::fs::write(&import, &v1).unwrap();
    host.ok(&["import", "alice", &s(&import)]);
    let v1_head = host.ok(&["versions", "alice"])["head"]
        .as_u64()
        .expect("head");
    (host, vm_dir, v1, v1_head)
}

/// What systemd did with the packaged agent unit: enabled, active, its
/// main process is the agent, ordered before the login services; the vsock
/// transport loaded; the baked configuration and PAM hook in place; the
/// agent connected.
fn agent_unit_under_systemd(vm: &Vm) {
    assert_eq!(
        vm.ok("systemctl is-enabled uve-agent.service").trim(),
        "enabled"
    );
    assert_eq!(
        vm.ok("systemctl is-active uve-agent.service").trim(),
        "active"
    );
    assert_eq!(
        vm.ok("systemctl show -p ExecMainPID --value uve-agent.service")
            .trim(),
        vm.ok("pidof uve-agent").trim(),
        "the running agent is the unit's main process"
    );
    let before = vm.ok("systemctl show -p Before --value uve-agent.service");
    for unit in ["systemd-user-sessions.service", "display-manager.service"] {
        assert!(
            before.contains(unit),
            "uve-agent not ordered before {unit}: {before}"
        );
    }
    assert!(
        vm.ok("cat /proc/modules")
            .contains("vmw_vsock_virtio_transport "),
        "vsock transport not loaded"
    );
    assert!(
        vm.ok("cat /usr/lib/modules-load.d/uve-agent.conf")
            .contains("vmw_vsock_virtio_transport")
    );
    assert!(
        vm.ok("cat /etc/uve/agent.toml")
            .contains("login_timeout_secs = 45"),
        "bake did not write /etc/uve/agent.toml"
    );
    assert!(
        vm.ok("readlink -f /usr/lib/uve/uve-pam-hook").trim()
            == "/usr/share/uve-agent/uve-pam-hook"
    );
    let status = vm.ok("uve-agent status");
    assert!(
        status.contains("connected") && !status.contains("NOT connected"),
        "uve-agent status: {status}"
    );
}

/// The hardened uve-host unit under a real systemd: active, its API
/// answers; both packaged units pass `systemd-analyze verify`.
fn host_unit_under_systemd(vm: &Vm) {
    let host_ok = wait_for(Duration::from_secs(60), || {
        vm.sh("systemctl is-active uve-host.service").1.trim() == "active"
    });
    assert!(
        host_ok,
        "uve-host.service (hardened) not active in the guest:\n{}",
        vm.sh("systemctl status uve-host.service; journalctl -b -u uve-host --no-pager | tail -30")
            .1
    );
    assert_eq!(vm.sh("uvectl vm list").0, 0, "uvectl in the guest");
    // The packaged units pass systemd's own checks (binaries installed).
    let (code, out) = vm.sh("systemd-analyze verify uve-host.service uve-agent.service");
    assert_eq!(code, 0, "systemd-analyze verify:\n{out}");
}

/// ExecReload (SIGHUP: configuration reload) keeps the agent running: same
/// PID, unit active.
fn agent_reload_keeps_it_running(vm: &Vm) {
    let pid = vm.ok("pidof uve-agent");
    vm.ok("systemctl reload uve-agent.service");
    assert_eq!(
        vm.ok("systemctl is-active uve-agent.service").trim(),
        "active"
    );
    assert_eq!(vm.ok("pidof uve-agent"), pid, "reload restarted the agent");
}

/// The AF_VSOCK listener (vsock_listen, for --cid VMs) under the same
/// hardening: the guest kernel has a vsock transport, so the bind is real.
fn host_unit_listens_on_af_vsock(vm: &Vm) {
    vm.put("/etc/uve/host.toml", b"vsock_listen = true\n");
    vm.ok("systemctl restart uve-host.service");
    assert_eq!(
        vm.ok("systemctl is-active uve-host.service").trim(),
        "active"
    );
    // The unit is active once the daemon sent READY=1, after logging the
    // line; journald reads the service's stderr asynchronously, so the line
    // can reach the journal a moment later: poll for it.
    assert!(
        wait_for(Duration::from_secs(60), || {
            vm.sh("journalctl -b -u uve-host.service --no-pager -o cat")
                .1
                .contains("listening on AF_VSOCK")
        }),
        "uve-host did not listen on AF_VSOCK under its unit"
    );
}

/// Logs (no assertion) `systemd-analyze security` of uve-host and the
/// guest's failed units.
fn log_security_and_failed_units(vm: &Vm) {
    let (_, security) = vm.sh("systemd-analyze security uve-host.service --no-pager | tail -1");
    eprintln!(
        "{NAME}: in-guest systemd-analyze security uve-host: {}",
        security.trim()
    );
    eprintln!(
        "{NAME}: failed units in the guest: {}",
        vm.sh("systemctl --failed --no-legend --plain | cut -d' ' -f1 | tr '\\n' ' '")
            .1
            .trim()
    );
}

/// Login → retrieve, modify, logout → update committed on the host.
fn login_logout_round_trip(host: &HostDaemon, vm: &Vm, dir: &Path, v1: &[u8], v1_head: u64) {
    let t = Instant::now();
    vm.ok("id alice >/dev/null 2>&1 || useradd -m alice");
    vm.ok("uve-agent login --user alice --session s1");
    let img = "/var/lib/uve-agent/uif/alice.img";
    assert_eq!(
        vm.get(img).expect("UIF in the guest"),
        v1,
        "retrieved UIF differs"
    );
    let mut v2 = v1.to_vec();
    v2[4096..8192].copy_from_slice(&noise(4096, 8));
    vm.put(img, &v2);
    vm.ok("uve-agent logout --session s1");
    let v2_head = host.ok(&["versions", "alice"])["head"]
        .as_u64()
        .expect("head");
    assert!(v2_head > v1_head, "logout committed no new version");
    assert_eq!(
        host.export("alice", v2_head, dir),
        v2,
        "the host's new version differs from what the guest wrote"
    );
    eprintln!("{NAME}: login/logout round trip: {:?}", t.elapsed());
}

/// A clean shutdown stops the agent through its unit: the host sees it
/// go, the unit is inactive.
fn agent_stops_through_its_unit(host: &HostDaemon, vm: &Vm) {
    vm.ok("systemctl stop uve-agent.service");
    let gone = wait_for(Duration::from_secs(30), || {
        host.ok(&["vm", "show", "vm-baked"])["connected"] == Value::Bool(false)
    });
    assert!(gone, "host still sees the agent after systemctl stop");
    assert!(
        vm.sh("systemctl is-active uve-agent.service").1.trim() == "inactive",
        "uve-agent not inactive after stop"
    );
}
