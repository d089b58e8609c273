//! One QEMU guest with a real virtio-vsock device: `vhost-device-vsock`
//! (vhost-user backend, hybrid vsock on the host side) plus
//! `qemu-system-x86_64` under TCG, booting the Debian `vmlinux` with a
//! scenario initramfs. The guest's console goes to a file; every child is
//! killed (by PID) when the `Vm` is dropped.
//!
//! Host ↔ guest: the guest's agent dials CID 2 port 7075, which the backend
//! turns into a connection to `<run>/v.sock_7075` (where `uve-host`
//! listens); the harness reaches the guest command server with
//! `CONNECT 9000` on `<run>/v.sock`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::channel::{self, GUEST_PORT, OP_GET, OP_PUT, OP_SH};
use crate::ingredients::Ingredients;
use crate::poll::wait_for;
use crate::process::Daemon;

/// How [`Vm::boot_with`] starts QEMU; the default is what [`Vm::boot`] uses.
#[derive(Debug, Clone)]
pub struct BootOptions {
    /// Guest memory, MiB (default 256).
    pub memory_mib: u32,
    /// Kernel command line (default `console=ttyS0 quiet panic=-1`).
    pub append: String,
    /// A raw disk image attached as the first virtio disk (`/dev/vda`).
    pub disk: Option<PathBuf>,
}

impl Default for BootOptions {
    fn default() -> Self {
        BootOptions {
            memory_mib: 256,
            append: "console=ttyS0 quiet panic=-1".into(),
            disk: None,
        }
    }
}

/// How QEMU caches [`BootOptions::disk`] on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiskCache {
    /// `cache=unsafe`: the guest's flushes are ignored (fast; what
    /// [`Vm::boot_with`] uses for throw-away root disks).
    #[default]
    Unsafe,
    /// QEMU's default (`writeback`): writes go to the host page cache and
    /// the guest's flushes are honoured. Killing QEMU ([`Vm::crash`]) then
    /// loses exactly what the guest had not written to its disk yet — a
    /// power loss as the guest sees it.
    QemuDefault,
}

/// A running guest.
pub struct Vm {
    /// Scenario-visible name (also the uve VM id).
    pub name: String,
    /// Run directory (sockets, console log).
    pub dir: PathBuf,
    vhost: Daemon,
    qemu: Daemon,
    booted: Instant,
}

impl Vm {
    /// The hybrid-vsock socket of this VM (`uds_path` for uve-host).
    pub fn uds(&self) -> PathBuf {
        self.dir.join("v.sock")
    }

    /// Time since QEMU was started.
    pub fn since_boot(&self) -> Duration {
        self.booted.elapsed()
    }

    /// The guest console log.
    pub fn console(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// Starts the backend and QEMU. `dir` must be short (socket paths are
    /// limited to 108 bytes) and exist.
    pub fn boot(
        ing: &Ingredients,
        name: &str,
        dir: &Path,
        initramfs: &Path,
    ) -> Result<Self, String> {
        Self::boot_with(ing, name, dir, initramfs, &BootOptions::default())
    }

    /// Like [`boot`](Self::boot) with a root disk, another kernel command
    /// line or more memory (see [`BootOptions`]); a disk is attached with
    /// [`DiskCache::Unsafe`].
    pub fn boot_with(
        ing: &Ingredients,
        name: &str,
        dir: &Path,
        initramfs: &Path,
        opts: &BootOptions,
    ) -> Result<Self, String> {
        Self::boot_with_cache(ing, name, dir, initramfs, opts, DiskCache::Unsafe)
    }

    /// Like [`boot_with`](Self::boot_with), with the host-side cache mode
    /// of the disk. `dir` may be that of an earlier (crashed) boot: the
    /// guest then gets the same sockets, so a host keeps reaching it.
    pub fn boot_with_cache(
        ing: &Ingredients,
        name: &str,
        dir: &Path,
        initramfs: &Path,
        opts: &BootOptions,
        cache: DiskCache,
    ) -> Result<Self, String> {
        let vhu = dir.join("vhu.sock");
        let uds = dir.join("v.sock");
        // A killed backend leaves its socket behind: without this, the wait
        // below would not wait for the new one and QEMU could find nothing
        // listening.
        let _ = std::fs::remove_file(&vhu);
        let mut vm = Vm {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            vhost: Daemon::default(),
            qemu: Daemon::default(),
            booted: Instant::now(),
        };
        vm.vhost.spawn(
            Command::new(&ing.vhost).arg("--vm").arg(format!(
                "guest-cid=3,socket={},uds-path={}",
                vhu.display(),
                uds.display()
            )),
            &dir.join("vhost.log"),
        )?;
        if !wait_for(Duration::from_secs(20), || vhu.exists()) {
            return Err("vhost-device-vsock did not create its socket".into());
        }
        let mem = format!("{}M", opts.memory_mib);
        let mut qemu = Command::new(&ing.qemu);
        qemu.args([
            "-machine",
            "q35,memory-backend=mem",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-smp",
            "1",
            "-m",
            &mem,
        ])
        .args([
            "-object",
            &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
        ])
        .arg("-kernel")
        .arg(&ing.vmlinux)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", &opts.append]);
        if let Some(disk) = &opts.disk {
            let cache = match cache {
                DiskCache::Unsafe => ",cache=unsafe",
                DiskCache::QemuDefault => "",
            };
            qemu.arg("-drive").arg(format!(
                "file={},if=virtio,format=raw{cache}",
                disk.display()
            ));
        }
        qemu.args(["-nographic", "-nodefaults", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", vm.console().display()))
            .arg("-chardev")
            .arg(format!("socket,id=vhu,path={}", vhu.display()))
            .args(["-device", "vhost-user-vsock-pci,chardev=vhu"]);
        vm.qemu.spawn(&mut qemu, &dir.join("qemu.log"))?;
        vm.booted = Instant::now();
        Ok(vm)
    }

    /// Waits until the guest command server answers; returns the boot time.
    pub fn wait_ready(&mut self, limit: Duration) -> Result<Duration, String> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok((0, _)) = self.try_sh("true", Duration::from_secs(5)) {
                return Ok(self.booted.elapsed());
            }
            if let Some(status) = self.qemu.exited() {
                return Err(format!(
                    "qemu exited during boot ({status}); console:\n{}",
                    self.console_text()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "guest not ready after {limit:?}; console:\n{}",
                    self.console_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The console log so far.
    pub fn console_text(&self) -> String {
        std::fs::read_to_string(self.console()).unwrap_or_default()
    }

    fn connect(&self, limit: Duration) -> Result<UnixStream, String> {
        let mut s = UnixStream::connect(self.uds())
            .map_err(|e| format!("connect {}: {e}", self.uds().display()))?;
        s.set_read_timeout(Some(limit)).map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(limit))
            .map_err(|e| e.to_string())?;
        s.write_all(format!("CONNECT {GUEST_PORT}\n").as_bytes())
            .map_err(|e| e.to_string())?;
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while b[0] != b'\n' {
            let n = s
                .read(&mut b)
                .map_err(|e| format!("read CONNECT ack: {e}"))?;
            if n == 0 || line.len() > 64 {
                return Err("guest command server not reachable".into());
            }
            line.push(b[0]);
        }
        if !line.starts_with(b"OK ") {
            return Err(format!(
                "muxer answered {:?}",
                String::from_utf8_lossy(&line)
            ));
        }
        Ok(s)
    }

    fn request(&self, op: u8, fields: &[&[u8]], limit: Duration) -> Result<(i32, Vec<u8>), String> {
        let mut s = self.connect(limit)?;
        s.write_all(&[op]).map_err(|e| e.to_string())?;
        for f in fields {
            channel::put_field(&mut s, f).map_err(|e| e.to_string())?;
        }
        channel::get_response(&mut s).map_err(|e| format!("guest response: {e}"))
    }

    fn try_sh(&self, cmd: &str, limit: Duration) -> Result<(i32, String), String> {
        let (code, out) = self.request(OP_SH, &[cmd.as_bytes()], limit)?;
        Ok((code, String::from_utf8_lossy(&out).into_owned()))
    }

    /// Runs a shell command in the guest (stdout+stderr combined).
    pub fn sh(&self, cmd: &str) -> (i32, String) {
        self.try_sh(cmd, Duration::from_secs(120))
            .unwrap_or_else(|e| {
                panic!(
                    "{}: `{cmd}` failed to run: {e}\nconsole:\n{}",
                    self.name,
                    self.console_text()
                )
            })
    }

    /// Runs a shell command that must succeed; returns its output.
    pub fn ok(&self, cmd: &str) -> String {
        let (code, out) = self.sh(cmd);
        assert_eq!(
            code,
            0,
            "{}: `{cmd}` exited {code}:\n{out}\nconsole:\n{}",
            self.name,
            self.console_text()
        );
        out
    }

    /// Writes a file in the guest.
    pub fn put(&self, path: &str, data: &[u8]) {
        let (code, out) = self
            .request(OP_PUT, &[path.as_bytes(), data], Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("{}: put {path}: {e}", self.name));
        assert_eq!(
            code,
            0,
            "{}: put {path}: {}",
            self.name,
            String::from_utf8_lossy(&out)
        );
    }

    /// Reads a file from the guest (`None` if it does not exist).
    pub fn get(&self, path: &str) -> Option<Vec<u8>> {
        let (code, out) = self
            .request(OP_GET, &[path.as_bytes()], Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("{}: get {path}: {e}", self.name));
        (code == 0).then_some(out)
    }

    /// Kills QEMU with SIGKILL: a VM crash as the host sees it.
    pub fn crash(&mut self) {
        self.qemu.kill();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.qemu.kill();
        self.vhost.kill();
    }
}
