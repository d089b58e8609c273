//! What the baked-image scenarios share: baking a Debian image the way an
//! operator does (`packaging/bake-image.sh` over a cached debootstrap, the
//! real .deb packages, an agent configuration, the test-only command
//! server), booting it with systemd as init until the agent its unit
//! started has connected, and a UA bundle to deploy.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::host::HostDaemon;
use crate::ingredients::Ingredients;
use crate::rootdisk::{BakeIngredients, root_initramfs};
use crate::vm::{BootOptions, Vm};

/// Test-only unit: the e2e command server on vsock port 9000.
const GUEST_UNIT: &str = "[Unit]
Description=uve e2e command server (test images only)
After=systemd-modules-load.service

[Service]
Environment=UVE_E2E_GUEST=1
ExecStart=/usr/local/bin/e2e-guest serve
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
";

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Bakes `dir/disk.img`: debootstrap (cached), the agent package, the
/// host package, `agent_config` as `/etc/uve/agent.toml`, the command
/// server, and `extra` arguments of bake-image.sh (more `--deb` packages,
/// `--copy-in` files). Then the initramfs that boots it. Returns both
/// paths. `name` prefixes the log lines.
pub fn bake_image(
    ing: &Ingredients,
    bake: &BakeIngredients,
    dir: &Path,
    name: &str,
    agent_config: &str,
    extra: &[String],
) -> (PathBuf, PathBuf) {
    let cached = bake.rootfs_cached();
    let write = |file: &str, text: &str| {
        std::fs::write(dir.join(file), text).unwrap_or_else(|e| panic!("write {file}: {e}"));
    };
    write("agent.toml", agent_config);
    write("uve-e2e-guest.service", GUEST_UNIT);
    let disk = dir.join("disk.img");
    let modules_root = ing
        .modules
        .ancestors()
        .nth(4)
        .unwrap_or_else(|| panic!("no kernel root above {}", ing.modules.display()));
    let mut args: Vec<String> = vec![
        "--rootfs".into(),
        s(&dir.join("rootfs")),
        "--deb".into(),
        s(&bake.host_deb),
        "--config".into(),
        s(&dir.join("agent.toml")),
        "--modules-from".into(),
        s(modules_root),
        "--copy-in".into(),
        s(&ing.guest),
        "/usr/local/bin/e2e-guest".into(),
        "--copy-in".into(),
        s(&dir.join("uve-e2e-guest.service")),
        "/etc/systemd/system/uve-e2e-guest.service".into(),
        "--enable".into(),
        "uve-e2e-guest.service".into(),
        "--disk".into(),
        s(&disk),
    ];
    args.extend(extra.iter().cloned());
    let took = bake
        .bake(dir, &args)
        .unwrap_or_else(|e| panic!("bake: {e}"));
    eprintln!(
        "{name}: image baked in {took:?} ({})",
        if cached {
            "debootstrap from cache"
        } else {
            "cold: debootstrap included"
        }
    );
    // The rootfs tree is no longer needed once it is in the disk image.
    let _ = std::fs::remove_dir_all(dir.join("rootfs"));
    let initrd = root_initramfs(ing, &dir.join("initramfs.cpio.gz"))
        .unwrap_or_else(|e| panic!("initramfs: {e}"));
    (disk, initrd)
}

/// A copy of a baked disk (sparse), for a second VM that starts from the
/// same golden image.
pub fn copy_disk(disk: &Path, to: &Path) {
    let ok = Command::new("cp")
        .arg("--sparse=always")
        .arg(disk)
        .arg(to)
        .status()
        .is_ok_and(|st| st.success());
    assert!(ok, "cp {} {}", disk.display(), to.display());
}

/// Boots `disk` as VM `id` (registered on the host with its socket in
/// `vm_dir`) with systemd as init; returns once the agent its unit started
/// has connected and the test command server answers.
pub fn boot_with_systemd(
    ing: &Ingredients,
    host: &HostDaemon,
    id: &str,
    vm_dir: &Path,
    initrd: &Path,
    disk: &Path,
) -> Vm {
    let opts = BootOptions {
        memory_mib: 512,
        append: "console=ttyS0 panic=-1 loglevel=4 systemd.journald.forward_to_console=1".into(),
        disk: Some(disk.to_path_buf()),
    };
    let mut vm =
        Vm::boot_with(ing, id, vm_dir, initrd, &opts).unwrap_or_else(|e| panic!("boot: {e}"));
    let connected = host.wait_connected(id, Duration::from_secs(240));
    assert!(
        connected,
        "{id}: the agent started by systemd never connected; host log:\n{}\nconsole:\n{}",
        host.log_tail(),
        vm.console_text()
    );
    eprintln!(
        "{id}: boot to agent connected (TCG, systemd): {:?}",
        vm.since_boot()
    );
    let ready = vm
        .wait_ready(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{id}: command server: {e}"));
    eprintln!("{id}: boot to command server ready: {ready:?}");
    vm
}

/// A tarred UA bundle in `dir`: `VERSION` holding `version` and the
/// executable `bin/<name>.sh` running `script` (with `/bin/sh`). Returns
/// the tar's path; deploy it with `--entry bin/<name>.sh`.
pub fn ua_bundle(dir: &Path, name: &str, version: &str, script: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let src = dir.join(format!("ua-{name}-{version}"));
    let bin = src.join("bin");
    let made = std::fs::create_dir_all(&bin)
        .and_then(|()| std::fs::write(src.join("VERSION"), version))
        .and_then(|()| {
            std::fs::write(
                bin.join(format!("{name}.sh")),
                format!("#!/bin/sh\n{script}\n"),
            )
        })
        .and_then(|()| {
            std::fs::set_permissions(
                bin.join(format!("{name}.sh")),
                std::fs::Permissions::from_mode(0o755),
            )
        });
    if let Err(e) = made {
        panic!("UA bundle in {}: {e}", src.display());
    }
    let tar = dir.join(format!("{name}-{version}.tar"));
    let ok = Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(&src)
        .args(["VERSION", "bin"])
        .status()
        .is_ok_and(|st| st.success());
    assert!(ok, "tar {}", tar.display());
    s(&tar)
}
