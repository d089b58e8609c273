//! The system under test: the real `uve-host` and one real `uve-agent`
//! playing VM `bench`, connected over the hybrid-vsock Unix socket path
//! (`<uds>_7075`), optionally through a byte-counting proxy so bytes on the
//! wire (frames, manifests, everything) can be reported exactly.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use uve_e2e::agent::{AgentProc, AgentSpec};
use uve_e2e::binaries::Binaries;
use uve_e2e::host::HostDaemon;

/// Counts bytes through a Unix-socket proxy (both directions).
#[derive(Default)]
pub struct Wire {
    /// Agent → host bytes.
    pub up: AtomicU64,
    /// Host → agent bytes.
    pub down: AtomicU64,
}

impl Wire {
    /// (up, down) so far.
    pub fn get(&self) -> (u64, u64) {
        (
            self.up.load(Ordering::Relaxed),
            self.down.load(Ordering::Relaxed),
        )
    }
}

fn pump(mut from: UnixStream, mut to: UnixStream, counter: Arc<Wire>, up: bool) {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        let c = if up { &counter.up } else { &counter.down };
        c.fetch_add(n as u64, Ordering::Relaxed);
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// Starts a counting proxy at `listen` forwarding to `upstream`.
fn proxy(listen: &Path, upstream: PathBuf) -> std::io::Result<Arc<Wire>> {
    let l = UnixListener::bind(listen)?;
    let wire = Arc::new(Wire::default());
    let w = wire.clone();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let Ok(u) = UnixStream::connect(&upstream) else {
                continue;
            };
            let (c2, u2) = match (c.try_clone(), u.try_clone()) {
                (Ok(a), Ok(b)) => (a, b),
                _ => continue,
            };
            let (wa, wb) = (w.clone(), w.clone());
            std::thread::spawn(move || pump(c, u, wa, true));
            std::thread::spawn(move || pump(u2, c2, wb, false));
        }
    });
    Ok(wire)
}

/// Host + agent.
pub struct Rig {
    /// The host daemon.
    pub host: HostDaemon,
    /// The agent.
    pub agent: AgentProc,
    /// Wire counters when started with a proxy.
    pub wire: Option<Arc<Wire>>,
    dir: PathBuf,
}

impl Rig {
    /// Starts host and agent under `dir` (which should be on the disk the
    /// baselines use too).
    pub fn start(bins: &Binaries, dir: &Path, counted: bool) -> Result<Rig, String> {
        Self::start_with(bins, dir, counted, "")
    }

    /// [`Rig::start`] with extra `host.toml` lines (e.g. an `[s3]` store).
    pub fn start_with(
        bins: &Binaries,
        dir: &Path,
        counted: bool,
        host_config: &str,
    ) -> Result<Rig, String> {
        let host = HostDaemon::start_with(
            &bins.host,
            &bins.uvectl,
            dir,
            &format!("heartbeat_ms = 2000\n{host_config}"),
        )?;
        let vm_dir = dir.join("vm");
        std::fs::create_dir_all(&vm_dir).map_err(|e| e.to_string())?;
        let uds = vm_dir.join("v.sock");
        host.ok(&[
            "vm",
            "add",
            "bench",
            "--uds-path",
            &uds.display().to_string(),
        ]);
        let listen = vm_dir.join("v.sock_7075");
        let (endpoint, wire) = if counted {
            let p = vm_dir.join("proxy.sock");
            let wire = proxy(&p, listen).map_err(|e| format!("proxy: {e}"))?;
            (format!("unix:{}", p.display()), Some(wire))
        } else {
            (format!("unix:{}", listen.display()), None)
        };
        let uif = format!(
            "mode = \"file\"\npath = \"{}/uif/{{user}}.img\"",
            vm_dir.display()
        );
        let spec = AgentSpec::new(&bins.agent, &endpoint, &AgentSpec::uif("", &uif));
        let agent = AgentProc::start(&vm_dir.join("agent"), spec)?;
        let ok = host.wait_connected("bench", Duration::from_secs(20));
        if !ok {
            return Err(format!(
                "agent did not connect; agent log:\n{}",
                agent.log_text()
            ));
        }
        Ok(Rig {
            host,
            agent,
            wire,
            dir: vm_dir,
        })
    }

    /// Where the agent materialises `user`'s UIF.
    pub fn uif(&self, user: &str) -> PathBuf {
        self.dir.join("uif").join(format!("{user}.img"))
    }

    /// Assigns `user` to the VM and imports `file` as its head.
    pub fn import(&self, user: &str, file: &Path) {
        self.host.ok(&["assign", user, "bench"]);
        self.host.ok(&["import", user, &file.display().to_string()]);
    }

    /// Timed `uve-agent login`.
    pub fn login(&self, user: &str, session: &str) -> Duration {
        let t = Instant::now();
        self.agent
            .ok(&["login", "--user", user, "--session", session]);
        t.elapsed()
    }

    /// Timed `uve-agent logout` that must commit a new version (the UIF
    /// was changed since the login).
    pub fn logout(&self, session: &str) -> Duration {
        self.logout_expecting(session, "committed as version")
    }

    /// Timed `uve-agent logout` of a UIF left as retrieved: nothing is
    /// committed.
    pub fn logout_unchanged(&self, session: &str) -> Duration {
        self.logout_expecting(session, "unchanged since version")
    }

    fn logout_expecting(&self, session: &str, outcome: &str) -> Duration {
        let t = Instant::now();
        let out = self.agent.ok(&["logout", "--session", session]);
        assert!(
            out.contains(outcome),
            "logout: expected {outcome:?}, got {out}"
        );
        t.elapsed()
    }

    /// A host counter.
    pub fn metric(&self, name: &str) -> u64 {
        self.host.metric(name)
    }
}
