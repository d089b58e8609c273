//! A power loss right after "spooled": the guest's agent state (and the
//! file-mode UIF in it) lives on a persistent ext4 virtio disk attached
//! with QEMU's default cache mode, so killing QEMU loses exactly what the
//! guest had not written to that disk — a power loss as the guest sees it.
//!
//! With the host down, `uve-agent logout` answers "spooled": the agent has
//! fsynced the image, then journalled the update. QEMU is killed at once;
//! after the host and the VM come back (same disk, new kernel boot id) the
//! agent must deliver exactly the bytes the session wrote: as the head, or
//! (had the image been torn) only as a conflict version — never a third
//! content as the head.
//!
//! The guest's background writeback is switched off for the session, so
//! nothing but an explicit flush (the agent's fsync) brings the session's
//! writes to the disk before the power goes: without that fsync the image
//! on the disk is still the retrieved version, and the test fails.
//!
//! Run: `cargo nextest run -p uve-e2e -E 'test(power_loss)'`. The run
//! directory (`/tmp/uve-e2e-*`, kept on failure) holds `host.log`, the
//! disk image and per boot `console-boot1.log` / `console.log`.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use uve_e2e::host::HostDaemon;
use uve_e2e::ingredients::Ingredients;
use uve_e2e::initramfs::{EXT4_DISK_MODULES, Initramfs};
use uve_e2e::poll::wait_for;
use uve_e2e::scenario::{AGENT_FILE_MODE, RunDir, host_with_alice_imported, step};
use uve_e2e::vm::{BootOptions, DiskCache, Vm};
use uve_protocol::testdata::noise;

const NAME: &str = "file_mode_power_loss_after_spooled";

/// The agent's state directory: the mount point of the persistent disk.
const STATE: &str = "/var/lib/uve-agent";
const IMG: &str = "/var/lib/uve-agent/uif/alice.img";

/// What the agent logs when a spooled image no longer matches its manifest
/// after a restart (agent/src/flush/mod.rs, `resend_changed`).
const TORN: &str = "no longer matches what was spooled";

fn wait_connected(host: &HostDaemon, vm: &str) {
    host.must_connect(vm, Duration::from_secs(90));
}

/// Boots the guest on `disk` and checks the disk is the agent's state dir.
fn boot(ing: &Ingredients, dir: &Path, initrd: &Path, disk: &Path) -> Vm {
    let opts = BootOptions {
        disk: Some(disk.to_path_buf()),
        ..BootOptions::default()
    };
    let mut vm =
        Vm::boot_with_cache(ing, "vm-a", dir, initrd, &opts, DiskCache::QemuDefault).expect("boot");
    let t = vm
        .wait_ready(Duration::from_secs(120))
        .expect("guest ready");
    eprintln!("{NAME}: guest ready after {t:?}");
    let mounts = vm.ok("cat /proc/mounts");
    assert!(
        mounts
            .lines()
            .any(|l| l.starts_with(&format!("/dev/vda {STATE} ext4 "))),
        "/dev/vda is not mounted on {STATE}:\n{mounts}\nconsole:\n{}",
        vm.console_text()
    );
    vm
}

#[test]
fn file_mode_power_loss_after_spooled() {
    let Some(ing) = Ingredients::require(NAME) else {
        return;
    };
    let Some(mkfs) = Ingredients::require_tool(NAME, "mkfs.ext4", "e2fsprogs") else {
        return;
    };
    let run = RunDir::new(NAME);
    let started = Instant::now();
    let mut t = Instant::now();

    let disk = persistent_disk(&run, &mkfs);
    let vm_dir = run.sub("vm-a");
    let initrd = initramfs_mounting_the_disk(&ing, &vm_dir);
    let (mut host, _, v1, v1_head) = host_with_alice_imported(&ing, &run, &vm_dir);
    step("disk, initramfs, host up, alice imported", &mut t);

    let (mut vm, boot1) = boot1_login_retrieves(&ing, &vm_dir, &initrd, &disk, &host, &v1);
    step("boot 1 + login (retrieve)", &mut t);

    let v2 = host_down_write_logout_spooled_power_loss(&mut host, &mut vm);
    step("host down, write, logout (spooled), VM killed", &mut t);
    std::fs::write(vm_dir.join("console-boot1.log"), vm.console_text()).unwrap();
    drop(vm);

    let vm = host_back_boot2(&mut host, &ing, &vm_dir, &initrd, &disk, &boot1, v1_head);
    step("host back, boot 2, agent connected", &mut t);

    let spooled = Spooled {
        host: &host,
        vm: &vm,
        run: &run,
        retrieved: &v1,
        written: &v2,
        v1_head,
    };
    let console = spooled.delivered();
    step("spool delivered", &mut t);

    guest_checks(&vm, &v2, &console);
    step("guest checks", &mut t);
    eprintln!("{NAME}: total {:?}", started.elapsed());
}

/// The persistent disk: a 64 MiB ext4 image in the run directory.
fn persistent_disk(run: &RunDir, mkfs: &Path) -> PathBuf {
    let disk = run.path().join("state.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(64 << 20))
        .expect("disk image");
    let st = Command::new(mkfs)
        .args(["-q", "-F"])
        .arg(&disk)
        .status()
        .expect("run mkfs.ext4");
    assert!(st.success(), "mkfs.ext4 failed: {st}");
    disk
}

/// The guest image: ext4 modules, the disk mounted on the agent's state
/// directory before the agent starts, the file-mode configuration.
fn initramfs_mounting_the_disk(ing: &Ingredients, vm_dir: &Path) -> PathBuf {
    let mut img = Initramfs::new(ing).expect("initramfs");
    img.modules(EXT4_DISK_MODULES)
        .expect("ext4 modules")
        .mount_before_agent("/dev/vda", "ext4", STATE);
    img.file("etc/uve-agent.toml", AGENT_FILE_MODE.as_bytes())
        .expect("config");
    img.build(&vm_dir.join("initramfs.cpio.gz"))
        .expect("build initramfs")
}

/// Boot 1: login retrieves `v1` onto the persistent disk. Returns the VM
/// and its kernel boot id.
fn boot1_login_retrieves(
    ing: &Ingredients,
    vm_dir: &Path,
    initrd: &Path,
    disk: &Path,
    host: &HostDaemon,
    v1: &[u8],
) -> (Vm, String) {
    let vm = boot(ing, vm_dir, initrd, disk);
    wait_connected(host, "vm-a");
    let boot1 = vm.ok("cat /proc/sys/kernel/random/boot_id");
    vm.ok("uve-agent login --user alice --session s1");
    assert_eq!(vm.get(IMG).expect("UIF in guest"), v1, "retrieve differs");
    (vm, boot1)
}

/// The host goes away; the session rewrites the image in place without
/// syncing, logout answers "spooled", and the power goes at once (QEMU
/// killed: no shutdown, no sync). Returns what the session wrote (`v2`).
fn host_down_write_logout_spooled_power_loss(host: &mut HostDaemon, vm: &mut Vm) -> Vec<u8> {
    // The session rewrites the image in place without syncing (as a user's
    // program does), and only a flush brings it to the disk: no background
    // writeback in the guest from now on (the default 30 s expiry would
    // usually not strike before the crash either, but on a slow machine it
    // might, and hide a missing fsync).
    host.stop(true);
    vm.ok("echo 0 > /proc/sys/vm/dirty_writeback_centisecs && \
         echo 360000 > /proc/sys/vm/dirty_expire_centisecs && \
         echo 50 > /proc/sys/vm/dirty_background_ratio && \
         echo 80 > /proc/sys/vm/dirty_ratio");
    let v2 = noise(4 << 20, 2);
    vm.put("/tmp/alice-v2.img", &v2); // tmpfs: not on the disk
    vm.ok(&format!(
        "dd if=/tmp/alice-v2.img of={IMG} bs=65536 conv=notrunc 2>&1 && rm /tmp/alice-v2.img"
    ));
    let dirty = vm.ok("grep -E '^(Dirty|Writeback):' /proc/meminfo");
    eprintln!(
        "  guest page cache before logout: {}",
        dirty.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    let answer = vm.ok("uve-agent logout --session s1");
    eprintln!("  logout answered: {}", answer.trim());
    assert!(
        answer.contains("spooled"),
        "logout with the host down did not spool: {answer}"
    );
    // --- power loss: no shutdown, no sync.
    vm.crash();
    v2
}

/// The host back on the same data (its head unmoved); boot 2 on the same
/// disk, a new kernel boot id, the agent connected. Returns the VM.
fn host_back_boot2(
    host: &mut HostDaemon,
    ing: &Ingredients,
    vm_dir: &Path,
    initrd: &Path,
    disk: &Path,
    boot1: &str,
    v1_head: u64,
) -> Vm {
    host.restart(true).expect("host back");
    assert_eq!(host.head("alice"), v1_head, "head moved while down");
    let vm = boot(ing, vm_dir, initrd, disk);
    let boot2 = vm.ok("cat /proc/sys/kernel/random/boot_id");
    assert_ne!(boot1.trim(), boot2.trim(), "the VM did not reboot");
    wait_connected(host, "vm-a");
    vm
}

/// After boot 2: the update spooled before the power loss, and where to
/// look for it.
struct Spooled<'a> {
    host: &'a HostDaemon,
    vm: &'a Vm,
    run: &'a RunDir,
    /// `v1`, the version the session retrieved.
    retrieved: &'a [u8],
    /// `v2`, what the session wrote and the agent spooled.
    written: &'a [u8],
    /// The head before the session (`v1`'s version).
    v1_head: u64,
}

impl Spooled<'_> {
    /// Polls alice's versions until one other than `v1_head` holds exactly
    /// `v2`, the deadline passes, or one round after the agent's spool is
    /// empty; asserts on every round that the head is only ever `v1_head` or
    /// those bytes. Returns that version with its kind, if found, and whether
    /// the spool was seen empty.
    fn wait_for_spooled_version(&self) -> (Option<(u64, String)>, bool) {
        let (host, vm, run, v1, v2, v1_head) = (
            self.host,
            self.vm,
            self.run,
            self.retrieved,
            self.written,
            self.v1_head,
        );
        let mut bytes_of: BTreeMap<u64, bool> = BTreeMap::new(); // version -> holds v2
        let mut found: Option<(u64, String)> = None;
        let mut is_v2 = |host: &HostDaemon, v: u64| -> bool {
            *bytes_of.entry(v).or_insert_with(|| {
                let b = host.export("alice", v, run.path());
                eprintln!(
                    "  version {v}: {} bytes, {}",
                    b.len(),
                    if b == v2 {
                        "the spooled content"
                    } else if b == v1 {
                        "the retrieved version's bytes"
                    } else {
                        "other bytes"
                    }
                );
                b == v2
            })
        };
        // Until the deadline, or one round after the agent's spool is empty
        // (it removes an entry only once the host has taken it).
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut drained = false;
        loop {
            let vs = host.ok(&["versions", "alice"]);
            let h = vs["head"].as_u64().expect("head");
            assert!(
                h == v1_head || is_v2(host, h),
                "head {h} is neither the version from before the session ({v1_head}) \
                 nor the spooled content: {vs:#}"
            );
            for v in vs["versions"].as_array().expect("versions") {
                let n = v["version"].as_u64().expect("version number");
                if n != v1_head && is_v2(host, n) {
                    found = Some((n, v["kind"].as_str().unwrap_or("?").to_string()));
                }
            }
            if found.is_some() || drained || Instant::now() > deadline {
                break;
            }
            drained = vm.ok("uve-agent status").contains("spooled updates: 0");
            if !drained {
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        (found, drained)
    }

    /// The spool is delivered: a version holding exactly `v2` appears; the
    /// head is only ever `v1_head` or that version, which is otherwise a
    /// conflict version. Returns the guest console of boot 2.
    fn delivered(&self) -> String {
        let (host, vm, v1_head) = (self.host, self.vm, self.v1_head);
        let (found, drained) = self.wait_for_spooled_version();
        let console = vm.console_text();
        for l in console
            .lines()
            .filter(|l| l.contains("spooled update") || l.contains(TORN))
        {
            eprintln!("  agent (boot 2): {}", l.trim());
        }
        let Some((version, kind)) = found else {
            panic!(
                "no version of alice holds the spooled bytes ({}); \
                 versions: {:#}\nhost log tail:\n{}\nconsole (boot 2):\n{console}",
                if drained {
                    "the agent's spool is empty: it delivered something else"
                } else {
                    "deadline passed"
                },
                host.ok(&["versions", "alice"]),
                host.log_tail()
            );
        };
        let h = host.head("alice");
        assert!(h == v1_head || h == version, "head {h} is a third content");
        if h == version {
            eprintln!(
                "{NAME}: outcome: the spooled update was committed as the head (version {version}, {kind})"
            );
        } else {
            assert_eq!(kind, "conflict", "version {version} is not head but {kind}");
            eprintln!(
                "{NAME}: outcome: the spooled update was kept as conflict version {version}; head stays {v1_head}"
            );
        }
        console
    }
}

/// In the guest: the image on the disk survived whole, nothing was taken
/// for torn (boot 2's `console`), and the spool is empty.
fn guest_checks(vm: &Vm, v2: &[u8], console: &str) {
    assert!(
        vm.get(IMG).expect("UIF after the power loss") == v2,
        "the image on the disk is not what was spooled"
    );
    assert!(
        !console.contains(TORN),
        "the agent found the fsynced image torn:\n{console}"
    );
    assert!(
        wait_for(Duration::from_secs(30), || vm
            .ok("uve-agent status")
            .contains("spooled updates: 0")),
        "the spool is not empty: {}",
        vm.ok("uve-agent status")
    );
}
