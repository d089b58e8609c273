//! A real Debian guest disk for the packaging test: `debootstrap` (cached
//! under `target/e2e-cache/rootfs`, keyed by suite and package list) baked
//! with the uve packages by the operator's own script,
//! `packaging/bake-image.sh`, into an ext4 image made without mounting
//! anything (`mkfs.ext4 -d`). The guest boots our extracted Debian
//! `vmlinux` with a tiny busybox initramfs that loads the virtio block and
//! ext4 modules of the same kernel, mounts `/dev/vda` and hands over to
//! systemd (`switch_root … /sbin/init`); the image itself carries the same
//! kernel's modules so systemd-modules-load and udev work as on a real VM.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::ingredients::Ingredients;

/// Modules the initramfs loads, in dependency order (each `.ko`'s
/// `depends=`): the virtio PCI transport, the block driver, ext4 with its
/// checksum (crc32c is requested by name, so it is loaded explicitly).
const ROOT_MODULES: &[&str] = &[
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "drivers/block/virtio_blk.ko",
    "lib/crc16.ko",
    "crypto/crc32c_generic.ko",
    "fs/mbcache.ko",
    "fs/jbd2/jbd2.ko",
    "fs/ext4/ext4.ko",
];

/// What a baked image needs beyond [`Ingredients`]: root (chroot, file
/// ownership), debootstrap, mkfs.ext4 and the two .deb files built by
/// `packaging/build-debs.sh`.
#[derive(Debug, Clone)]
pub struct BakeIngredients {
    /// `packaging/bake-image.sh`.
    pub script: PathBuf,
    /// `target/debian/uve-agent.deb`.
    pub agent_deb: PathBuf,
    /// `target/debian/uve-host.deb`.
    pub host_deb: PathBuf,
    /// `target/e2e-cache/rootfs` (debootstrap tarballs).
    pub cache: PathBuf,
}

impl BakeIngredients {
    /// Finds everything, or says what is missing.
    pub fn find(ing: &Ingredients) -> Result<Self, String> {
        let mut missing = Vec::new();
        if !nix::unistd::geteuid().is_root() {
            missing.push("root (debootstrap and chroot)".to_string());
        }
        for tool in ["debootstrap", "mkfs.ext4"] {
            if !["/usr/sbin", "/sbin", "/usr/bin"]
                .iter()
                .any(|d| Path::new(d).join(tool).exists())
            {
                missing.push(format!("{tool} (apt-get install debootstrap e2fsprogs)"));
            }
        }
        let b = BakeIngredients {
            script: ing.repo.join("packaging/bake-image.sh"),
            agent_deb: ing.repo.join("target/debian/uve-agent.deb"),
            host_deb: ing.repo.join("target/debian/uve-host.deb"),
            cache: ing.repo.join("target/e2e-cache/rootfs"),
        };
        for p in [&b.agent_deb, &b.host_deb] {
            if !p.exists() {
                missing.push(format!("{} (packaging/build-debs.sh)", p.display()));
            }
        }
        if missing.is_empty() {
            Ok(b)
        } else {
            Err(format!("missing {}", missing.join(", ")))
        }
    }

    /// [`find`](Self::find), or `None` after printing why the scenario is
    /// skipped; with `E2E_REQUIRE=1` a missing piece panics instead.
    pub fn require(ing: &Ingredients, scenario: &str) -> Option<Self> {
        match Self::find(ing) {
            Ok(b) => Some(b),
            Err(why) if std::env::var("E2E_REQUIRE").as_deref() == Ok("1") => {
                panic!("{scenario}: E2E_REQUIRE=1 but {why}")
            }
            Err(why) => {
                eprintln!("skipped: {scenario}: {why}");
                None
            }
        }
    }

    /// Whether a debootstrap tarball is cached (the script keys them by
    /// suite and package list itself).
    pub fn rootfs_cached(&self) -> bool {
        std::fs::read_dir(&self.cache)
            .map(|d| {
                d.filter_map(Result::ok)
                    .any(|e| e.file_name().to_string_lossy().ends_with(".tar"))
            })
            .unwrap_or(false)
    }

    /// Runs `packaging/bake-image.sh --debootstrap` with `args` appended;
    /// its output goes to `<dir>/bake.log`. Returns how long it took.
    pub fn bake(&self, dir: &Path, args: &[String]) -> Result<Duration, String> {
        let t = Instant::now();
        let log = dir.join("bake.log");
        let out = std::fs::File::create(&log).map_err(|e| format!("bake log: {e}"))?;
        let err = out.try_clone().map_err(|e| format!("bake log: {e}"))?;
        let status = Command::new(&self.script)
            .arg("--debootstrap")
            .arg("--cache")
            .arg(&self.cache)
            .arg("--agent-deb")
            .arg(&self.agent_deb)
            .args(args)
            .stdout(out)
            .stderr(err)
            .status()
            .map_err(|e| format!("run {}: {e}", self.script.display()))?;
        if !status.success() {
            return Err(format!(
                "bake-image.sh failed ({status}):\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ));
        }
        Ok(t.elapsed())
    }
}

/// Builds the initramfs that mounts `/dev/vda` (ext4) and switches to its
/// `/sbin/init`, at `out` (cpio newc, gzip -1).
pub fn root_initramfs(ing: &Ingredients, out: &Path) -> Result<PathBuf, String> {
    let staging = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let root = staging.path();
    for d in ["bin", "dev", "proc", "sys", "newroot", "lib/modules"] {
        std::fs::create_dir_all(root.join(d)).map_err(|e| format!("{d}: {e}"))?;
    }
    std::fs::copy(&ing.busybox, root.join("bin/busybox")).map_err(|e| format!("busybox: {e}"))?;
    let mut names = Vec::new();
    for m in ROOT_MODULES {
        let name = Path::new(m)
            .file_name()
            .map_or_else(|| (*m).to_string(), |n| n.to_string_lossy().into_owned());
        std::fs::copy(ing.modules.join(m), root.join("lib/modules").join(&name))
            .map_err(|e| format!("{m}: {e}"))?;
        names.push(name);
    }
    let init = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         export PATH=/bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sys /sys\n\
         mount -t devtmpfs dev /dev\n\
         for m in {mods}; do insmod /lib/modules/$m || echo \"initramfs: insmod $m failed\"; done\n\
         i=0; while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done\n\
         if ! mount -t ext4 -o rw /dev/vda /newroot; then\n\
           echo 'initramfs: cannot mount /dev/vda'; poweroff -f\n\
         fi\n\
         for d in dev proc sys; do mount --move /$d /newroot/$d; done\n\
         echo 'initramfs: switching to /sbin/init'\n\
         exec switch_root /newroot /sbin/init\n",
        mods = names.join(" "),
    );
    let init_path = root.join("init");
    std::fs::write(&init_path, init).map_err(|e| format!("init: {e}"))?;
    {
        use std::os::unix::fs::PermissionsExt;
        for p in [init_path, root.join("bin/busybox")] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| format!("chmod: {e}"))?;
        }
    }
    let status = Command::new("sh")
        .arg("-c")
        .arg("find . | cpio -o -H newc --quiet | gzip -1 > \"$0\"")
        .arg(out)
        .current_dir(root)
        .status()
        .map_err(|e| format!("cpio: {e}"))?;
    if !status.success() {
        return Err(format!("cpio/gzip failed: {status}"));
    }
    Ok(out.to_path_buf())
}
