//! The example libvirt hook (`packaging/libvirt/qemu-hook`) against the
//! real `uve-host` and `uvectl` on this machine: the hook runs as libvirt
//! would run it (domain, operation, sub-operation, extra; the domain XML
//! on stdin) and the test reads the registry back through `uvectl`. CIDs
//! are only registered, never opened: the daemon runs without
//! `vsock_listen` (no AF_VSOCK socket on the build machine). No QEMU, no
//! libvirt needed.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use uve_e2e::binaries;
use uve_e2e::host::HostDaemon;

/// The hook, as shipped.
fn hook() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/libvirt/qemu-hook")
}

/// A domain named `name` whose vsock `<cid>` is `cid` (`None`: no vsock
/// device), as libvirt hands it to a hook.
fn domain_xml(name: &str, cid: Option<(&str, u32)>) -> String {
    let vsock = cid.map_or_else(String::new, |(auto, n)| {
        format!(
            "    <vsock model='virtio'>\n      <cid auto='{auto}' address='{n}'/>\n      \
             <alias name='vsock0'/>\n    </vsock>\n"
        )
    });
    format!(
        "<domain type='kvm' id='7'>\n  <name>{name}</name>\n  <memory unit='KiB'>1048576</memory>\n  \
         <devices>\n{vsock}  </devices>\n</domain>\n"
    )
}

struct Rig {
    host: HostDaemon,
    uvectl: PathBuf,
    state: PathBuf,
    _dir: tempfile::TempDir,
}

impl Rig {
    fn start() -> Rig {
        let bins = binaries::release().expect("release binaries");
        let dir = tempfile::Builder::new()
            .prefix("uve-libvirt-hook-")
            .tempdir_in("/tmp")
            .unwrap();
        let host = HostDaemon::start_with(&bins.host, &bins.uvectl, dir.path(), "")
            .expect("start uve-host");
        Rig {
            host,
            uvectl: bins.uvectl,
            state: dir.path().join("hook-state"),
            _dir: dir,
        }
    }

    /// Runs the hook for `domain` and `op` with `xml` on stdin; returns
    /// whether it succeeded and what it wrote to stderr.
    fn hook(&self, domain: &str, op: &str, xml: &str) -> (bool, String) {
        let mut child = Command::new("sh")
            .arg(hook())
            .args([domain, op, "begin", "-"])
            .env("UVECTL", &self.uvectl)
            .env("UVE_HOST_SOCKET", self.host.api_socket())
            .env("UVE_HOOK_STATE", &self.state)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the hook");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(xml.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn must_hook(&self, domain: &str, op: &str, xml: &str) {
        let (ok, err) = self.hook(domain, op, xml);
        assert!(ok, "hook {domain} {op} failed: {err}");
    }

    /// The CID `domain` is registered on (`None`: not registered).
    fn cid(&self, domain: &str) -> Option<u64> {
        let (code, out) = self.host.uvectl(&["vm", "show", domain]);
        if code == 3 {
            return None;
        }
        assert_eq!(code, 0, "{out}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        v["cid"].as_u64()
    }

    /// The VM `user` is assigned to.
    fn assigned(&self, user: &str) -> Option<String> {
        self.host.ok(&["assignments"])[user]
            .as_str()
            .map(str::to_string)
    }
}

/// An auto-CID domain: unregistered at `release` with its users kept,
/// registered on its new CID at `start` with them assigned again; a
/// domain that stopped without `release` is moved to its new CID too.
#[test]
fn libvirt_hook_follows_auto_cids_and_keeps_users() {
    let rig = Rig::start();
    rig.host.ok(&["vm", "add", "desk-a", "--cid", "3"]);
    rig.host.ok(&["assign", "alice", "desk-a"]);
    rig.host.ok(&["assign", "bob", "desk-a"]);

    // Started on the CID it is registered with: nothing changes.
    rig.must_hook("desk-a", "start", &domain_xml("desk-a", Some(("yes", 3))));
    assert_eq!(rig.cid("desk-a"), Some(3));
    // Operations the hook does not handle change nothing.
    rig.must_hook("desk-a", "started", &domain_xml("desk-a", Some(("yes", 3))));
    rig.must_hook("desk-a", "stopped", &domain_xml("desk-a", Some(("yes", 3))));
    assert_eq!(rig.cid("desk-a"), Some(3));

    // Stopped: no CID held, users kept by the hook.
    rig.must_hook("desk-a", "release", &domain_xml("desk-a", Some(("yes", 3))));
    assert_eq!(rig.cid("desk-a"), None);
    assert_eq!(rig.assigned("alice"), None);
    // Meanwhile bob is moved elsewhere by the operator.
    rig.host.ok(&["vm", "add", "desk-b", "--cid", "9"]);
    rig.host.ok(&["assign", "bob", "desk-b"]);

    // Started again on another CID: registered there, alice back, bob
    // left where the operator put him.
    rig.must_hook("desk-a", "start", &domain_xml("desk-a", Some(("yes", 4))));
    assert_eq!(rig.cid("desk-a"), Some(4));
    assert_eq!(rig.assigned("alice").as_deref(), Some("desk-a"));
    assert_eq!(rig.assigned("bob").as_deref(), Some("desk-b"));

    // Stopped without `release` (a crash of libvirtd), started on CID 5.
    rig.must_hook("desk-a", "start", &domain_xml("desk-a", Some(("yes", 5))));
    assert_eq!(rig.cid("desk-a"), Some(5));
    assert_eq!(rig.assigned("alice").as_deref(), Some("desk-a"));
}

/// No domain starts on a CID uve-host binds to another VM; domains
/// uve-host does not know, fixed-CID domains and domains without vsock
/// are left alone.
#[test]
fn libvirt_hook_refuses_a_cid_bound_to_another_vm() {
    let rig = Rig::start();
    rig.host.ok(&["vm", "add", "desk-a", "--cid", "3"]);
    rig.host.ok(&["assign", "alice", "desk-a"]);

    // desk-a stopped without `release`; libvirt gives CID 3 to another
    // domain, known to uve-host or not, fixed or automatic.
    for (name, auto) in [("guest-x", "yes"), ("guest-y", "no")] {
        let (ok, err) = rig.hook(name, "start", &domain_xml(name, Some((auto, 3))));
        assert!(!ok, "{name} started on desk-a's CID");
        assert!(err.contains("desk-a"), "{err}");
        assert_eq!(rig.cid(name), None);
    }
    assert_eq!(rig.cid("desk-a"), Some(3));
    assert_eq!(rig.assigned("alice").as_deref(), Some("desk-a"));

    // A domain uve-host does not know, on a free CID: not registered.
    rig.must_hook("guest-x", "start", &domain_xml("guest-x", Some(("yes", 8))));
    rig.must_hook(
        "guest-x",
        "release",
        &domain_xml("guest-x", Some(("yes", 8))),
    );
    rig.must_hook("guest-x", "start", &domain_xml("guest-x", Some(("yes", 9))));
    assert_eq!(rig.cid("guest-x"), None);
    // A fixed-CID VM keeps its registration when it stops.
    rig.host.ok(&["vm", "add", "desk-f", "--cid", "42"]);
    rig.must_hook("desk-f", "start", &domain_xml("desk-f", Some(("no", 42))));
    rig.must_hook("desk-f", "release", &domain_xml("desk-f", Some(("no", 42))));
    assert_eq!(rig.cid("desk-f"), Some(42));
    // No vsock device at all.
    rig.must_hook("plain", "start", &domain_xml("plain", None));
    assert_eq!(rig.cid("plain"), None);
}
