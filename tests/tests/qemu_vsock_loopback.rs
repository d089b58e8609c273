//! The kernel AF_VSOCK host path, for real: `uve-host` with
//! `vsock_listen = true` and a `uve-agent` dialing `vsock:1:7075` run in
//! one QEMU guest whose kernel has `vsock_loopback` loaded. Tests open
//! AF_VSOCK sockets only inside guests, so the host daemon runs there too
//! (the workspace's release `uve-host` and `uvectl`, see
//! `uve_e2e::guest_host`); the harness drives both through the guest
//! command server.
//!
//! **What loopback proves**: the daemon's AF_VSOCK listener (bound to any
//! CID, port 7075) accepts kernel vsock connections; the peer address
//! `accept` returns is what names the VM, looked up by CID in the
//! registry: with CID 1 unregistered (another VM registered on CID 42)
//! the connection is closed at accept, before the host reads a byte of
//! it, counted in `uve_unknown_peers_refused_total`, and never becomes a
//! VM connection; once a VM is registered on CID 1, the same agent is bound
//! to that VM and told its id; a login retrieves and a logout commits a
//! new version over that link; after the daemon is killed and started
//! again, the agent redials over AF_VSOCK and another round trip works.
//!
//! **What it cannot prove**: on loopback every peer has CID 1 (the
//! test-only `allow_local_cid = true` admits it), so two guests told
//! apart by their CIDs — the registry choosing one VM for CID 3 and
//! another for CID 4, each CID set by the hypervisor and unforgeable by
//! the guest — is not exercised; nor is a hypervisor's vhost-vsock device
//! (`/dev/vhost-vsock`, libvirt's `<vsock>`): that needs AF_VSOCK on this
//! machine, which the tests never open. The other QEMU scenarios reach
//! the host through hybrid vsock.
//!
//! Run it: `cargo nextest run -p uve-e2e -E 'test(vsock_loopback)'`. The
//! guest's console (agent log) is `<run>/vm-loop/console.log`; a failure
//! quotes the daemon's log from the guest.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use uve_e2e::guest_host::{self, GuestHost};
use uve_e2e::ingredients::Ingredients;
use uve_e2e::initramfs::Initramfs;
use uve_e2e::poll::wait_for;
use uve_e2e::scenario::{RunDir, begin, step};
use uve_e2e::vm::{BootOptions, Vm};

/// The agent dials CID 1 (the guest's own loopback), where the guest's
/// `uve-host` listens.
const AGENT_CONFIG: &str = r#"
host = "vsock:1:7075"
[uif]
mode = "directory"
home = "/home/{user}"
"#;

/// The guest's host daemon: kernel AF_VSOCK on, CID 1 admissible (test
/// only), and a free-space reserve that fits a guest's tmpfs.
const HOST_CONFIG: &str = "vsock_listen = true\n\
                           allow_local_cid = true\n\
                           store_min_free_bytes = 8388608";

/// The VM registered on CID 1.
const VM: &str = "vm-loop";

/// The guest's kernel module for CID 1 (after the base image's vsock
/// modules it depends on).
const LOOPBACK_MODULE: &str = "net/vmw_vsock/vsock_loopback.ko";

/// One guest, one boot: the AF_VSOCK listener, the refusal of an
/// unregistered CID, the binding of a registered one, a login/logout round
/// trip, the agent's redial after the daemon is killed and restarted, and
/// a round trip after that.
#[test]
fn kernel_vsock_loopback_listen_refuse_round_trip_restart() {
    let Some((ing, run, mut t)) = begin("kernel_vsock_loopback_listen_refuse_round_trip_restart")
    else {
        return;
    };
    let vm = boot(&ing, &run);
    let mut host = GuestHost::start(&vm).expect("uve-host in the guest");
    let log = host.log_text();
    assert!(
        log.contains("listening on AF_VSOCK") && log.contains("vsock:any:7075"),
        "no AF_VSOCK listener in the log:\n{log}"
    );
    step("boot + uve-host up in the guest", &mut t);

    unregistered_cid_is_refused(&host, &vm);
    step("unregistered CID 1 refused", &mut t);

    registered_cid_connects(&host, &vm);
    step("CID 1 registered → connected", &mut t);

    let v1 = round_trip(&host, &vm, &run, "s1", "first.txt", None);
    step("login/logout round trip", &mut t);

    agent_reconnects_after_host_restart(&mut host, &vm);
    step("uve-host killed and restarted → agent reconnected", &mut t);

    round_trip(&host, &vm, &run, "s2", "second.txt", Some(v1));
    step("round trip after the restart", &mut t);
}

/// Boots the guest: the base image plus `vsock_loopback`, the host daemon
/// and its configuration, and the agent's configuration (the agent is
/// started by the test, once the daemon listens).
fn boot(ing: &Ingredients, run: &RunDir) -> Vm {
    let dir = run.sub(VM);
    let mut img = Initramfs::new(ing).expect("initramfs");
    img.modules(&[LOOPBACK_MODULE]).expect("vsock_loopback.ko");
    img.start_agent(false);
    img.file("etc/uve-agent.toml", AGENT_CONFIG.as_bytes())
        .expect("agent config");
    guest_host::install(&mut img, ing, HOST_CONFIG).expect("uve-host in the image");
    let initrd = img
        .build(&dir.join("initramfs.cpio.gz"))
        .expect("build initramfs");
    let opts = BootOptions {
        memory_mib: 384,
        ..BootOptions::default()
    };
    let mut vm = Vm::boot_with(ing, VM, &dir, &initrd, &opts).expect("boot");
    let ready = vm
        .wait_ready(Duration::from_secs(120))
        .expect("guest ready");
    eprintln!("{VM}: guest ready after {ready:?}");
    let modules = vm.ok("cat /proc/modules");
    assert!(
        modules.lines().any(|l| l.starts_with("vsock_loopback ")),
        "vsock_loopback not loaded:\n{modules}"
    );
    vm
}

/// With another VM on CID 42 and none on CID 1, the agent's connection
/// from CID 1 is closed at accept, unread (no handshake place taken, no
/// `Hello` decoded), counted, and never becomes a VM connection.
fn unregistered_cid_is_refused(host: &GuestHost, vm: &Vm) {
    host.ok(&["vm", "add", "vm-other", "--cid", "42"]);
    let since = host.last_seq();
    vm.ok("UVE_LOG=info uve-agent run --config /etc/uve-agent.toml >/dev/ttyS0 2>&1 </dev/null &");
    assert!(
        wait_for(Duration::from_secs(60), || host
            .metric("uve_unknown_peers_refused_total")
            >= 1),
        "the host did not refuse CID 1; host log:\n{}",
        host.log_tail()
    );
    // The agent saw its connection end in the handshake (and redials).
    assert!(
        wait_for(Duration::from_secs(30), || vm
            .console_text()
            .contains("connection closed during handshake")),
        "the agent did not see its connection closed; console:\n{}",
        vm.console_text()
    );
    assert!(
        !host.log_text().contains("agent refused"),
        "the host read the unregistered peer's Hello; host log:\n{}",
        host.log_tail()
    );
    let events = host.events(since);
    assert!(
        !events.iter().any(|e| e["kind"] == "vm_connected"),
        "a refused peer became a VM connection: {events:#?}"
    );
    assert_eq!(host.metric("uve_connections_total"), 0);
    assert_eq!(host.metric("uve_connections"), 0);
    assert!(!host.is_connected("vm-other"), "CID 1 bound to CID 42's VM");
}

/// Registering `VM` on CID 1 lets the redialing agent in: the host binds
/// it to that VM (the agent is told the id) and no other.
fn registered_cid_connects(host: &GuestHost, vm: &Vm) {
    let since = host.last_seq();
    host.ok(&["vm", "add", VM, "--cid", "1"]);
    host.ok(&["assign", "bob", VM]);
    let ev = host.wait_event(since, "vm_connected", Duration::from_secs(60), |e| {
        e["vm"] == VM
    });
    assert!(
        ev["agent_version"].as_str().is_some_and(|v| !v.is_empty()),
        "{ev}"
    );
    assert!(host.is_connected(VM));
    assert!(!host.is_connected("vm-other"));
    assert_eq!(host.metric("uve_connections"), 1);
    assert!(
        wait_for(Duration::from_secs(10), || agent_connections(vm) == 1),
        "the agent was not told it is {VM}; console:\n{}",
        vm.console_text()
    );
}

/// The agent's log lines saying it connected to the host as `VM` over
/// `vsock:1:7075`.
fn agent_connections(vm: &Vm) -> usize {
    vm.console_text()
        .lines()
        .filter(|l| {
            l.contains("connected to host")
                && l.contains("vsock:1:7075")
                && l.contains(&format!("vm={VM}"))
        })
        .count()
}

/// The daemon is killed (SIGKILL: no goodbye) and started again on the
/// same data: the registry still binds CID 1 to `VM`, and the same agent
/// process redials over AF_VSOCK by itself.
fn agent_reconnects_after_host_restart(host: &mut GuestHost, vm: &Vm) {
    let before = agent_connections(vm);
    let agent = vm.ok("pidof uve-agent");
    let old_pid = host.pid();
    host.restart_after_kill().expect("restart uve-host");
    assert_ne!(host.pid(), old_pid, "no new daemon");
    // A new daemon numbers its events from 1 again.
    host.wait_event(0, "vm_connected", Duration::from_secs(60), |e| {
        e["vm"] == VM
    });
    assert!(host.is_connected(VM));
    assert!(
        wait_for(Duration::from_secs(10), || agent_connections(vm) > before),
        "the agent did not log a new connection; console:\n{}",
        vm.console_text()
    );
    assert_eq!(
        vm.ok("pidof uve-agent"),
        agent,
        "not the same agent process"
    );
}

/// Login (retrieving `base`, whose files must be there), a new file
/// `file`, logout: a commit of a new head by `VM` whose tar holds every
/// file written so far. Returns the new head.
fn round_trip(
    host: &GuestHost,
    vm: &Vm,
    run: &RunDir,
    session: &str,
    file: &str,
    base: Option<u64>,
) -> u64 {
    let since = host.last_seq();
    vm.ok(&format!("uve-agent login --user bob --session {session}"));
    let retrieve = host.wait_event(since, "retrieve", Duration::from_secs(30), |e| {
        e["session"] == session
    });
    assert_eq!(retrieve["vm"], VM, "{retrieve}");
    assert_eq!(retrieve["version"].as_u64(), base, "{retrieve}");
    if base.is_some() {
        assert_eq!(
            vm.ok("cat /home/bob/docs/first.txt"),
            "over AF_VSOCK: first.txt\n",
            "the retrieved home lacks the first round's file"
        );
    }
    vm.ok(&format!(
        "mkdir -p /home/bob/docs && echo 'over AF_VSOCK: {file}' > /home/bob/docs/{file} \
         && chown -R 1001:1001 /home/bob"
    ));
    vm.ok(&format!("uve-agent logout --session {session}"));
    let commit = host.wait_event(since, "commit", Duration::from_secs(30), |e| {
        e["session"] == session
    });
    assert_eq!(commit["vm"], VM, "{commit}");
    assert_eq!(commit["user"], "bob", "{commit}");
    assert_eq!(commit["base"].as_u64(), base, "{commit}");
    let head = host.head("bob");
    assert_eq!(commit["version"].as_u64(), Some(head), "{commit}");
    assert!(base.is_none_or(|b| head > b), "head {head} after {base:?}");

    let tar = host.export("bob", head);
    let out = run.sub(&format!("bob-v{head}"));
    let tar_path = run.path().join(format!("bob-v{head}.tar"));
    std::fs::write(&tar_path, &tar).unwrap();
    let st = std::process::Command::new("tar")
        .arg("-xf")
        .arg(&tar_path)
        .arg("-C")
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success(), "exported version {head} is not a tar archive");
    let mut files = vec!["first.txt"];
    if file != "first.txt" {
        files.push(file);
    }
    for f in files {
        assert_eq!(
            std::fs::read_to_string(out.join("docs").join(f)).unwrap_or_default(),
            format!("over AF_VSOCK: {f}\n"),
            "version {head} lacks docs/{f}"
        );
    }
    head
}
