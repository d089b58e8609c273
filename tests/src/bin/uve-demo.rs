//! `uve-demo`: the newcomer's tour. Starts the real `uve-host` (embedded
//! defaults, data in a temporary directory) and two real `uve-agent`
//! processes playing VMs `vm-a` and `vm-b` over hybrid-vsock Unix sockets
//! (no QEMU needed), then walks user alice through login → retrieve → edit
//! → logout → update → switch to the other VM → unexpected disconnect,
//! printing each step and the store's versions. Leaves nothing running.
//!
//! `cargo run --release -p uve-e2e --bin uve-demo`

use std::path::Path;
use std::time::{Duration, Instant};

use uve_e2e::agent::{AgentProc, AgentSpec};
use uve_e2e::binaries::{self, Binaries};
use uve_e2e::host::HostDaemon;
use uve_e2e::poll::wait_for;

const UIF: &str = "mode = \"file\"\npath = \"{dir}/uif/{user}.img\"";

fn main() {
    if let Err(e) = run() {
        eprintln!("demo failed: {e}");
        std::process::exit(1);
    }
}

fn say(t0: Instant, what: &str) {
    println!("\n[{:>5.2}s] == {what}", t0.elapsed().as_secs_f64());
}

fn show(text: &str) {
    for line in text.trim_end().lines() {
        println!("          {line}");
    }
}

fn agent_for(bin: &Path, dir: &Path, name: &str) -> Result<AgentProc, String> {
    let vm_dir = dir.join(name);
    let uif = UIF.replace("{dir}", &vm_dir.display().to_string());
    let host = format!("unix:{}", vm_dir.join("v.sock_7075").display());
    AgentProc::start(
        &vm_dir,
        AgentSpec::new(bin, &host, &AgentSpec::uif("", &uif)),
    )
}

fn connected(host: &HostDaemon, vm: &str) -> bool {
    host.wait_connected(vm, Duration::from_secs(20))
}

fn run() -> Result<(), String> {
    let t0 = Instant::now();
    let bins = binaries::release()?;
    let tmp = tempfile::Builder::new()
        .prefix("uve-demo-")
        .tempdir_in("/tmp")
        .map_err(|e| e.to_string())?;
    let dir = tmp.path();

    let (host, a, b) = start_host_and_agents(t0, &bins, dir)?;
    let text = edit_on_vm_a(t0, &host, &a, dir)?;
    move_to_vm_b(t0, &host, &b, dir, &text)?;
    disconnect_on_vm_b(t0, &host, &b)?;

    say(t0, "done; stopping the agents and the host");
    drop(a);
    drop(b);
    drop(host);
    Ok(())
}

/// Starts the host, registers `vm-a` and `vm-b` and starts their agents,
/// waiting until both are connected.
fn start_host_and_agents(
    t0: Instant,
    bins: &Binaries,
    dir: &Path,
) -> Result<(HostDaemon, AgentProc, AgentProc), String> {
    say(
        t0,
        "start uve-host (local store, management API on a Unix socket)",
    );
    let host = HostDaemon::start_with(&bins.host, &bins.uvectl, dir, "")?;
    show(&format!("data directory {}", host.data.display()));

    say(
        t0,
        "register two VMs by their hybrid-vsock sockets; the host listens on <uds>_7075",
    );
    for vm in ["vm-a", "vm-b"] {
        let uds = dir.join(vm).join("v.sock");
        std::fs::create_dir_all(dir.join(vm)).map_err(|e| e.to_string())?;
        host.ok(&["vm", "add", vm, "--uds-path", &uds.display().to_string()]);
    }
    show(&host.uvectl_human(&["vm", "list"]));

    say(
        t0,
        "start one uve-agent per VM; each dials its VM's socket, as a guest would through the VMM",
    );
    let a = agent_for(&bins.agent, dir, "vm-a")?;
    let b = agent_for(&bins.agent, dir, "vm-b")?;
    if !connected(&host, "vm-a") || !connected(&host, "vm-b") {
        return Err(format!(
            "agents did not connect; host log:\n{}",
            host.log_tail()
        ));
    }
    show("vm-a and vm-b connected (Hello/Welcome handshake done)");
    Ok((host, a, b))
}

/// Alice's profile is imported, she logs in on vm-a, edits, logs out, logs
/// in again and keeps working; returns her UIF as she left it.
fn edit_on_vm_a(
    t0: Instant,
    host: &HostDaemon,
    a: &AgentProc,
    dir: &Path,
) -> Result<String, String> {
    say(
        t0,
        "the VMM assigns alice to vm-a; an operator imports her existing profile",
    );
    host.ok(&["assign", "alice", "vm-a"]);
    let profile = dir.join("alice-profile.txt");
    std::fs::write(&profile, "theme = dark\nwallpaper = mountains.jpg\n")
        .map_err(|e| e.to_string())?;
    host.ok(&["import", "alice", &profile.display().to_string()]);
    show(&host.uvectl_human(&["versions", "alice"]));

    say(t0, "alice logs in on vm-a: UVE-5 UIF retrieve");
    show(&a.ok(&["login", "--user", "alice", "--session", "a-1"]));
    let img_a = dir.join("vm-a/uif/alice.img");
    show(&std::fs::read_to_string(&img_a).map_err(|e| e.to_string())?);

    say(
        t0,
        "she changes a setting, then logs out: UVE-5 UIF update (compare-and-swap commit)",
    );
    let mut text = std::fs::read_to_string(&img_a).map_err(|e| e.to_string())?;
    text.push_str("font_size = 14   # changed on vm-a\n");
    std::fs::write(&img_a, &text).map_err(|e| e.to_string())?;
    show(&a.ok(&["logout", "--session", "a-1"]));
    show(&host.uvectl_human(&["versions", "alice"]));

    say(t0, "she logs in on vm-a again and keeps working");
    show(&a.ok(&["login", "--user", "alice", "--session", "a-2"]));
    text.push_str("last_document = report.odt   # still on vm-a\n");
    std::fs::write(&img_a, &text).map_err(|e| e.to_string())?;
    Ok(text)
}

/// The VMM moves alice to vm-b; her UIF there must be `text`.
fn move_to_vm_b(
    t0: Instant,
    host: &HostDaemon,
    b: &AgentProc,
    dir: &Path,
    text: &str,
) -> Result<(), String> {
    say(
        t0,
        "the VMM moves alice to vm-b: the host asks vm-a to release her (UVE-2 UserRelease)",
    );
    host.ok(&["assign", "alice", "vm-b"]);
    show(&b.ok(&["login", "--user", "alice", "--session", "b-1"]));
    show("vm-b sees everything she did on vm-a:");
    let on_b =
        std::fs::read_to_string(dir.join("vm-b/uif/alice.img")).map_err(|e| e.to_string())?;
    show(&on_b);
    if on_b != text {
        return Err(format!(
            "vm-b's UIF differs from what alice left on vm-a:\n{on_b}\nexpected:\n{text}"
        ));
    }
    Ok(())
}

/// Her session on vm-b ends without a logout; the host must record the
/// unexpected disconnect. Shows the events and her versions.
fn disconnect_on_vm_b(t0: Instant, host: &HostDaemon, b: &AgentProc) -> Result<(), String> {
    say(
        t0,
        "her remote display on vm-b dies without a logout: unexpected disconnect (UVE-5)",
    );
    show(&b.ok(&[
        "disconnect",
        "--session",
        "b-1",
        "--reason",
        "remote display crashed",
    ]));
    let flushed = wait_for(Duration::from_secs(20), || {
        host.uvectl(&["events"]).1.contains("unexpected_disconnect")
    });
    if !flushed {
        return Err("no unexpected_disconnect event".into());
    }

    say(t0, "the host's event stream and alice's versions");
    show(&host.uvectl_human(&["events"]));
    show(&host.uvectl_human(&["versions", "alice"]));
    Ok(())
}
