//! Builds a guest initramfs (cpio newc, gzip -1): busybox, the static agent
//! and guest helper, the virtio/vsock modules, an `/init` that loads them
//! and starts the command server and (optionally) the agent, plus any
//! scenario files. A scenario may add modules ([`Initramfs::modules`], e.g.
//! [`EXT4_DISK_MODULES`]) and filesystems that `/init` mounts before the
//! agent starts ([`Initramfs::mount_before_agent`]). Dynamically linked
//! programs of this machine (the release `uve-host` and `uvectl`) go in
//! with the shared libraries they load ([`Initramfs::dynamic_exec`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::ingredients::Ingredients;

/// Modules in load order (from each `.ko`'s `depends=`).
const MODULES: &[&str] = &[
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_mmio.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "net/vmw_vsock/vsock.ko",
    "net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
    "net/vmw_vsock/vmw_vsock_virtio_transport.ko",
];

/// What a persistent ext4 virtio disk (`/dev/vda`) needs, in load order
/// after [`MODULES`] (from each `.ko`'s `depends=` and `softdep=` in the
/// Debian 6.1 package: `jbd2` and `ext4` want `crypto-crc32c` first, which
/// also checksums the metadata of a default `mkfs.ext4`).
pub const EXT4_DISK_MODULES: &[&str] = &[
    "drivers/block/virtio_blk.ko",
    "crypto/crc32c_generic.ko",
    "lib/crc16.ko",
    "fs/mbcache.ko",
    "fs/jbd2/jbd2.ko",
    "fs/ext4/ext4.ko",
];

/// A guest image being assembled.
pub struct Initramfs {
    staging: tempfile::TempDir,
    start_agent: bool,
    modules_dir: PathBuf,
    /// Stems of the modules `/init` loads, in order.
    modules: Vec<String>,
    /// Shell lines `/init` runs after loading the modules, before the
    /// command server and the agent start.
    mounts: Vec<String>,
}

fn io_err(what: &str, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

impl Initramfs {
    /// Base image: busybox, agent, guest helper, modules, users.
    pub fn new(ing: &Ingredients) -> Result<Self, String> {
        let staging = tempfile::tempdir().map_err(|e| io_err("tempdir", e))?;
        let root = staging.path();
        for d in [
            "bin",
            "sbin",
            "lib/modules",
            "etc",
            "proc",
            "sys",
            "dev",
            "tmp",
            "run",
            "home",
            "var/lib",
        ] {
            std::fs::create_dir_all(root.join(d)).map_err(|e| io_err(d, e))?;
        }
        copy_exec(&ing.busybox, &root.join("bin/busybox"))?;
        copy_exec(&ing.agent, &root.join("bin/uve-agent"))?;
        copy_exec(&ing.guest, &root.join("bin/e2e-guest"))?;
        let mut img = Initramfs {
            staging,
            start_agent: true,
            modules_dir: ing.modules.clone(),
            modules: Vec::new(),
            mounts: Vec::new(),
        };
        img.modules(MODULES)?;
        img.file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000:Alice:/home/alice:/bin/sh\nbob:x:1001:1001:Bob:/home/bob:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        )?;
        img.file(
            "etc/group",
            b"root:x:0:\nalice:x:1000:\nbob:x:1001:\nnogroup:x:65534:\n",
        )?;
        Ok(img)
    }

    /// Adds a file (parent directories created).
    pub fn file(&self, path: &str, data: &[u8]) -> Result<&Self, String> {
        let p = self.staging.path().join(path);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io_err(path, e))?;
        }
        std::fs::write(&p, data).map_err(|e| io_err(path, e))?;
        Ok(self)
    }

    /// Adds the executable `from` as `to` (e.g. `bin/uve-host`) together
    /// with every shared library `ldd` says it loads (the dynamic loader
    /// included), each at the path it has on this machine. A release
    /// build of the workspace then runs in the guest exactly as built,
    /// without a second (static) build of it. A static `from` adds no
    /// library; a library `ldd` cannot find is an error.
    pub fn dynamic_exec(&mut self, from: &Path, to: &str) -> Result<&mut Self, String> {
        let out = Command::new("ldd")
            .arg(from)
            .output()
            .map_err(|e| io_err("ldd", e))?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            let static_exe = text.contains("not a dynamic executable")
                || String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable");
            if !static_exe {
                return Err(format!("ldd {}: {}", from.display(), out.status));
            }
        }
        for line in text.lines() {
            if line.contains("not found") {
                return Err(format!("ldd {}: {}", from.display(), line.trim()));
            }
            // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` or
            // `/lib64/ld-linux-x86-64.so.2 (0x…)`; `linux-vdso.so.1 (0x…)`
            // is the kernel's and has no file.
            let path = line
                .split("=>")
                .last()
                .and_then(|rest| rest.split_whitespace().next());
            if let Some(lib) = path
                && let Some(inside) = lib.strip_prefix('/')
            {
                copy_exec(Path::new(lib), &self.staging.path().join(inside))?;
            }
        }
        copy_exec(from, &self.staging.path().join(to))?;
        Ok(self)
    }

    /// Adds kernel modules (paths below the package's
    /// `lib/modules/<version>/kernel`), loaded in this order after those
    /// already added.
    pub fn modules(&mut self, list: &[&str]) -> Result<&mut Self, String> {
        for m in list {
            let path = Path::new(m);
            let (Some(name), Some(stem)) = (path.file_name(), path.file_stem()) else {
                return Err(format!("module {m}: no file name"));
            };
            let stem = stem.to_string_lossy().into_owned();
            if self.modules.contains(&stem) {
                continue;
            }
            std::fs::copy(
                self.modules_dir.join(m),
                self.staging.path().join("lib/modules").join(name),
            )
            .map_err(|e| io_err(m, e))?;
            self.modules.push(stem);
        }
        Ok(self)
    }

    /// Has `/init` mount `device` (waiting up to 10 s for its node) as
    /// `fstype` on `target` after loading the modules and before the agent
    /// starts. The console says `E2E: mounted <device>` or
    /// `E2E: mount <device> FAILED`; a scenario should check the mount
    /// (e.g. in `/proc/mounts`) before relying on it.
    pub fn mount_before_agent(&mut self, device: &str, fstype: &str, target: &str) -> &mut Self {
        self.mounts.push(format!(
            "n=0; while [ ! -b {device} ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done\n\
             mkdir -p {target}\n\
             if mount -t {fstype} {device} {target}; then echo 'E2E: mounted {device} on {target}'; \
             else echo 'E2E: mount {device} FAILED'; fi\n"
        ));
        self
    }

    /// Whether `/init` starts `uve-agent run` (default: yes).
    pub fn start_agent(&mut self, yes: bool) -> &mut Self {
        self.start_agent = yes;
        self
    }

    /// Writes `/init` and packs the image to `out`.
    pub fn build(&self, out: &Path) -> Result<PathBuf, String> {
        let agent = if self.start_agent {
            "uve-agent run --config /etc/uve-agent.toml >/dev/ttyS0 2>&1 &\n"
        } else {
            ""
        };
        let init = format!(
            "#!/bin/busybox sh\n\
             /bin/busybox --install -s /bin\n\
             export PATH=/bin:/sbin\n\
             mount -t proc proc /proc\n\
             mount -t sysfs sys /sys\n\
             mount -t devtmpfs dev /dev\n\
             mount -t tmpfs tmp /tmp\n\
             mount -t tmpfs run /run\n\
             mkdir -p /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup 2>/dev/null\n\
             for m in {mods}; do insmod /lib/modules/$m.ko 2>/dev/null; done\n\
             {mounts}\
             echo 'E2E: init done'\n\
             UVE_E2E_GUEST=1 /bin/e2e-guest serve >/dev/ttyS0 2>&1 &\n\
             export UVE_LOG=${{UVE_LOG:-info}}\n\
             {agent}\
             while true; do sleep 3600; done\n",
            mods = self.modules.join(" "),
            mounts = self.mounts.concat(),
        );
        self.file("init", init.as_bytes())?;
        set_exec(&self.staging.path().join("init"))?;
        let mut find = Command::new("sh")
            .arg("-c")
            .arg("find . | cpio -o -H newc --quiet | gzip -1")
            .current_dir(self.staging.path())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| io_err("cpio", e))?;
        let mut bytes = Vec::new();
        if let Some(mut o) = find.stdout.take() {
            std::io::Read::read_to_end(&mut o, &mut bytes).map_err(|e| io_err("cpio output", e))?;
        }
        let status = find.wait().map_err(|e| io_err("cpio", e))?;
        if !status.success() || bytes.is_empty() {
            return Err(format!("cpio/gzip failed: {status}"));
        }
        let mut f = std::fs::File::create(out).map_err(|e| io_err("initramfs", e))?;
        f.write_all(&bytes).map_err(|e| io_err("initramfs", e))?;
        Ok(out.to_path_buf())
    }
}

fn copy_exec(from: &Path, to: &Path) -> Result<(), String> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io_err(&parent.display().to_string(), e))?;
    }
    std::fs::copy(from, to).map_err(|e| io_err(&from.display().to_string(), e))?;
    set_exec(to)
}

fn set_exec(p: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| io_err("chmod", e))
}
