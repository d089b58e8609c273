//! The real `uve-host` inside a QEMU guest, driven by the real `uvectl`
//! inside the same guest through the guest command server: for the
//! kernel AF_VSOCK path, which a test may only open inside a guest (an
//! agent in the guest dials the host daemon there over `vsock_loopback`).
//!
//! The guest runs the workspace's release builds of both (the binaries
//! [`Ingredients`] finds), put into the initramfs with the shared
//! libraries they load ([`Initramfs::dynamic_exec`]), so no second build
//! is made for it. The daemon dies with the guest; the test kills and
//! restarts it by its PID in the guest. Its log is
//! [`GUEST_HOST_LOG`] in the guest. The parsing of `uvectl`'s answers is
//! the kit's ([`crate::host`]).

use std::time::Duration;

use crate::host::{self, HostSpec, SCENARIO_DEFAULTS};
use crate::ingredients::Ingredients;
use crate::initramfs::Initramfs;
use crate::poll;
use crate::process;
use crate::vm::Vm;

/// The daemon's data directory in the guest (its API socket is
/// `api.sock` in it).
pub const GUEST_HOST_DATA: &str = "/var/lib/uve-host";

/// The daemon's configuration file in the guest.
pub const GUEST_HOST_CONFIG: &str = "/etc/uve-host.toml";

/// The daemon's log in the guest (stdout and stderr, appended).
pub const GUEST_HOST_LOG: &str = "/var/log/uve-host.log";

/// How many log lines a failure message quotes.
const LOG_TAIL: usize = 60;

/// Puts `uve-host` and `uvectl` (release builds, with their libraries)
/// into `img` as `/bin/uve-host` and `/bin/uvectl`, and a configuration:
/// [`GUEST_HOST_DATA`], the scenario defaults ([`SCENARIO_DEFAULTS`])
/// and `extra` (top-level keys, then any tables). Nothing starts it: see
/// [`GuestHost::start`].
pub fn install(img: &mut Initramfs, ing: &Ingredients, extra: &str) -> Result<(), String> {
    img.dynamic_exec(&ing.host, "bin/uve-host")?;
    img.dynamic_exec(&ing.uvectl, "bin/uvectl")?;
    let spec = HostSpec {
        host_bin: ing.host.clone(),
        uvectl: ing.uvectl.clone(),
        data: GUEST_HOST_DATA.into(),
        config: GUEST_HOST_CONFIG.into(),
        log: GUEST_HOST_LOG.into(),
        defaults: SCENARIO_DEFAULTS.iter().map(|l| (*l).to_string()).collect(),
        extra: extra.into(),
    };
    img.file(
        GUEST_HOST_CONFIG.trim_start_matches('/'),
        spec.config_text().as_bytes(),
    )?;
    img.file("var/log/.keep", b"")?;
    Ok(())
}

/// A `uve-host` daemon running inside `vm` (installed by [`install`]).
pub struct GuestHost<'a> {
    vm: &'a Vm,
    pid: Option<u32>,
}

impl<'a> GuestHost<'a> {
    /// Starts the daemon in `vm` and waits (up to [`host::UP_LIMIT`]) until
    /// `uvectl` gets an answer from its API.
    pub fn start(vm: &'a Vm) -> Result<Self, String> {
        let mut h = GuestHost { vm, pid: None };
        h.spawn()?;
        Ok(h)
    }

    /// Starts the process (its output appended to [`GUEST_HOST_LOG`],
    /// ANSI colours off) and waits for its API.
    pub fn spawn(&mut self) -> Result<(), String> {
        let out = self.vm.ok(&format!(
            "UVE_LOG=info NO_COLOR=1 uve-host run --config {GUEST_HOST_CONFIG} \
             >>{GUEST_HOST_LOG} 2>&1 </dev/null & echo $!"
        ));
        let pid = out
            .trim()
            .parse()
            .map_err(|e| format!("uve-host's PID in the guest: {e}: {out:?}"))?;
        self.pid = Some(pid);
        if poll::wait_for(host::UP_LIMIT, || self.uvectl(&["vm", "list"]).0 == 0) {
            Ok(())
        } else {
            Err(format!(
                "uve-host API not up in {}; log:\n{}",
                self.vm.name,
                self.log_tail()
            ))
        }
    }

    /// The daemon's PID in the guest (while running).
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Kills the daemon with SIGKILL (a crash: no goodbye, no shutdown)
    /// and waits until it is gone (a zombie counts as gone: its sockets
    /// are closed).
    pub fn kill(&mut self) {
        let Some(pid) = self.pid.take() else { return };
        self.vm.ok(&format!("kill -9 {pid}"));
        let gone = poll::wait_for(Duration::from_secs(20), || {
            let (_, state) = self.vm.sh(&format!(
                "awk '{{print $3}}' /proc/{pid}/stat 2>/dev/null || true"
            ));
            matches!(state.trim(), "" | "Z")
        });
        assert!(gone, "uve-host (PID {pid}) in {} did not die", self.vm.name);
    }

    /// Kills the daemon ([`kill`](Self::kill)) and starts it again on the
    /// same data and configuration.
    pub fn restart_after_kill(&mut self) -> Result<(), String> {
        self.kill();
        self.spawn()
    }

    /// Runs `uvectl --json <args>` in the guest (arguments are quoted for
    /// the shell); returns its exit code and output (stderr merged).
    pub fn uvectl(&self, args: &[&str]) -> (i32, String) {
        self.run(true, args)
    }

    fn run(&self, json: bool, args: &[&str]) -> (i32, String) {
        let mut cmd = format!("uvectl --socket {GUEST_HOST_DATA}/api.sock");
        if json {
            cmd.push_str(" --json");
        }
        for a in args {
            cmd.push_str(" '");
            cmd.push_str(&a.replace('\'', r"'\''"));
            cmd.push('\'');
        }
        self.vm.sh(&cmd)
    }

    /// Runs a `uvectl` command that must succeed; returns its JSON output.
    pub fn ok(&self, args: &[&str]) -> serde_json::Value {
        let (code, out) = self.uvectl(args);
        assert_eq!(
            code,
            0,
            "uvectl {args:?} in {} exited {code}:\n{out}\nhost log tail:\n{}",
            self.vm.name,
            self.log_tail()
        );
        serde_json::from_str(out.trim()).unwrap_or(serde_json::Value::String(out))
    }

    /// Events after `since`, as JSON objects.
    pub fn events(&self, since: u64) -> Vec<serde_json::Value> {
        let (code, out) = self.uvectl(&["events", "--since", &since.to_string()]);
        assert_eq!(code, 0, "uvectl events: {out}");
        host::parse_events(&out)
    }

    /// The highest event sequence number so far (0 if none).
    pub fn last_seq(&self) -> u64 {
        host::last_seq(&self.events(0))
    }

    /// Waits until an event of `kind` after `since` satisfies `pred`.
    pub fn wait_event(
        &self,
        since: u64,
        kind: &str,
        limit: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let found = poll::until(limit, || host::find_event(self.events(since), kind, &pred));
        match found {
            Some(e) => e,
            None => panic!(
                "no `{kind}` event within {limit:?}; events: {:#?}\nhost log tail:\n{}",
                self.events(since),
                self.log_tail()
            ),
        }
    }

    /// A Prometheus counter or gauge (0 if absent).
    pub fn metric(&self, name: &str) -> u64 {
        let (code, out) = self.run(false, &["metrics"]);
        assert_eq!(code, 0, "uvectl metrics: {out}");
        host::metric_in(&out, name)
    }

    /// Whether `uvectl vm show <vm>` reports the VM connected.
    pub fn is_connected(&self, vm: &str) -> bool {
        host::shows_connected(&self.uvectl(&["vm", "show", vm]).1)
    }

    /// Panics, quoting the log, unless `vm` is connected within `limit`.
    pub fn must_connect(&self, vm: &str, limit: Duration) {
        assert!(
            poll::wait_for(limit, || self.is_connected(vm)),
            "{vm} never connected to the uve-host in {}; host log:\n{}",
            self.vm.name,
            self.log_tail()
        );
    }

    /// The head version of `user` (panics if there is none).
    pub fn head(&self, user: &str) -> u64 {
        match self.ok(&["versions", user])["head"].as_u64() {
            Some(v) => v,
            None => panic!("{user} has no head version"),
        }
    }

    /// Exports a version's bytes (through a file in the guest's `/tmp`).
    pub fn export(&self, user: &str, version: u64) -> Vec<u8> {
        let path = format!("/tmp/export-{user}-{version}");
        self.ok(&["export", user, &version.to_string(), "-o", &path]);
        match self.vm.get(&path) {
            Some(bytes) => bytes,
            None => panic!("export of {user} v{version} left no {path}"),
        }
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        self.vm
            .get(GUEST_HOST_LOG)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last lines of the daemon's log.
    pub fn log_tail(&self) -> String {
        process::tail_of(&self.log_text(), LOG_TAIL)
    }
}
