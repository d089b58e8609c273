//! Disk mode end to end: the real `uve-host` on this machine, the real
//! static `uve-agent` in QEMU guests whose kernel has `nbd` and `ext4`
//! loaded. The agent makes the profile disk at the first login, serves it
//! to the kernel over NBD (netlink), mounts it as the home, and at logout
//! unmounts it and uploads the image; a second VM mounts the same files.
//! A disk that `e2fsck -p` cannot repair is refused, never mounted.
//!
//! Run: `cargo nextest run -p uve-e2e -E 'test(disk)'`.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use uve_e2e::host::HostDaemon;
use uve_e2e::ingredients::Ingredients;
use uve_e2e::initramfs::{EXT4_DISK_MODULES, Initramfs};
use uve_e2e::scenario::{RunDir, begin, step};
use uve_e2e::vm::Vm;
use uve_protocol::testdata::noise;

const AGENT_DISK_MODE: &str = r#"
host = "vsock:2:7075"
[uif]
mode = "disk"
[disk]
size_mib = 64
mount_options = "noatime"
"#;

/// e2fsprogs programs the agent runs in the guest.
const E2FSPROGS: &[&str] = &["mkfs.ext4", "e2fsck", "resize2fs"];

fn boot(ing: &Ingredients, run: &RunDir, name: &str) -> Vm {
    let dir = run.sub(name);
    let mut img = Initramfs::new(ing).expect("initramfs");
    img.modules(EXT4_DISK_MODULES)
        .expect("ext4 modules")
        .modules(&["drivers/block/nbd.ko"])
        .expect("nbd module");
    for tool in E2FSPROGS {
        let from = Ingredients::require_tool("disk", tool, "e2fsprogs").expect("e2fsprogs");
        img.dynamic_exec(&from, &format!("sbin/{tool}"))
            .expect(tool);
    }
    if let Ok(conf) = std::fs::read("/etc/mke2fs.conf") {
        img.file("etc/mke2fs.conf", &conf).expect("mke2fs.conf");
    }
    img.file("etc/uve-agent.toml", AGENT_DISK_MODE.as_bytes())
        .expect("config");
    let initrd = img
        .build(&dir.join("initramfs.cpio.gz"))
        .expect("build initramfs");
    let mut vm = Vm::boot(ing, name, &dir, &initrd).expect("boot");
    let t = vm
        .wait_ready(Duration::from_secs(120))
        .expect("guest ready");
    eprintln!("{name}: guest ready after {t:?}");
    vm
}

/// The line of `/proc/mounts` for `/home/alice`, if mounted.
fn home_mount(vm: &Vm) -> Option<String> {
    let (_, mounts) = vm.sh("cat /proc/mounts");
    mounts
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("/home/alice"))
        .map(str::to_string)
}

/// `debugfs -R "cat <path>"` on an image exported from the store.
fn debugfs_cat(image: &Path, path: &str) -> Vec<u8> {
    let debugfs = Ingredients::require_tool("disk", "debugfs", "e2fsprogs").expect("debugfs");
    let out = Command::new(debugfs)
        .args(["-R", &format!("cat {path}")])
        .arg(image)
        .output()
        .expect("debugfs");
    assert!(
        out.status.success(),
        "debugfs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn disk_mode_first_login_mounts_and_the_files_follow_the_user() {
    let Some((ing, run, mut t)) =
        begin("disk_mode_first_login_mounts_and_the_files_follow_the_user")
    else {
        return;
    };
    let host = HostDaemon::start(&ing, run.path(), "").expect("host");
    for name in ["vm-a", "vm-b"] {
        host.add_vm(name, &run.sub(name).join("v.sock"));
    }
    host.ok(&["assign", "alice", "vm-a"]);
    let a = boot(&ing, &run, "vm-a");
    host.must_connect("vm-a", Duration::from_secs(60));
    step("vm-a up", &mut t);

    first_login_makes_and_mounts_the_disk(&a);
    step("first login: disk made and mounted", &mut t);

    let (v1, blob) = logout_commits_a_clean_ext4(&host, &a, &run);
    step(
        "logout: unmounted, committed a clean ext4 with the files",
        &mut t,
    );

    // --- the user moves to vm-b: the same files, byte-identical.
    host.ok(&["assign", "alice", "vm-b"]);
    let b = boot(&ing, &run, "vm-b");
    host.must_connect("vm-b", Duration::from_secs(60));
    let login = b.ok("uve-agent login --user alice --session s2");
    assert!(home_mount(&b).is_some(), "vm-b did not mount the disk");
    // Only the distinct blocks that hold data are fetched: the zero
    // blocks (most of the disk) never cross the link.
    let v1_image = std::fs::read(run.path().join("alice-v1.disk")).unwrap();
    let data_blocks: std::collections::HashSet<&[u8]> = v1_image
        .chunks(256 << 10)
        .filter(|b| b.iter().any(|&x| x != 0))
        .collect();
    assert!(
        login.contains(&format!("({} chunks fetched", data_blocks.len())),
        "{} distinct data blocks in the disk: {login}",
        data_blocks.len()
    );
    // A second session of the same user shares the mount; ending it
    // leaves the first session's home mounted.
    b.ok("uve-agent login --user alice --session s2b");
    b.ok("uve-agent logout --session s2b");
    assert!(
        home_mount(&b).is_some(),
        "ending a second session unmounted the home"
    );
    assert_eq!(b.ok("cat /home/alice/docs/note.txt"), "hello from A\n");
    assert_eq!(
        b.get("/home/alice/docs/blob.bin").expect("blob on vm-b"),
        blob
    );
    b.ok("su alice -s /bin/sh -c 'echo and from B >> /home/alice/docs/note.txt'");
    step("vm-b: same files", &mut t);

    let image2 = agent_killed_mid_session_reattaches(&host, &b, &run, (v1, &blob));
    step(
        "agent killed mid-session: re-attached, logout commits",
        &mut t,
    );

    damaged_disk_and_no_room_are_refused(&host, &b, &run, &image2);
    step("damaged disk and no room: refused", &mut t);

    others_working_copies_make_room(&host, &b);
    step("no room: another user's working copy evicted", &mut t);
}

/// First login: a new ext4 disk, served over NBD, mounted as the home.
fn first_login_makes_and_mounts_the_disk(a: &Vm) {
    a.ok("uve-agent login --user alice --session s1");
    let line = home_mount(a).expect("/home/alice is not mounted after the first login");
    assert!(
        line.starts_with("/dev/nbd"),
        "home not on an NBD device: {line}"
    );
    assert!(line.contains(" ext4 "), "home is not ext4: {line}");
    for opt in ["nosuid", "nodev", "noatime"] {
        assert!(line.contains(opt), "home mounted without {opt}: {line}");
    }
    assert_eq!(a.ok("stat -c %u:%g /home/alice").trim(), "1000:1000");
}

/// The user writes; logout unmounts and commits the image, a clean ext4
/// holding the files. Returns the version and the blob written.
fn logout_commits_a_clean_ext4(host: &HostDaemon, a: &Vm, run: &RunDir) -> (u64, Vec<u8>) {
    a.ok("su alice -s /bin/sh -c 'mkdir /home/alice/docs && echo hello from A > /home/alice/docs/note.txt'");
    let blob = noise(700_000, 5);
    a.put("/home/alice/docs/blob.bin", &blob);
    a.ok("uve-agent logout --session s1");
    assert_eq!(
        home_mount(a),
        None,
        "the home is still mounted after logout"
    );
    let v1 = host.head("alice");
    let image = run.path().join("alice-v1.disk");
    std::fs::write(&image, host.export("alice", v1, run.path())).unwrap();
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 64 << 20);
    // Fixed 256 KiB blocks, not content-defined chunks.
    let list = host.ok(&["versions", "alice"]);
    let head = list["versions"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["version"].as_u64() == Some(v1)))
        .expect("the head in the version list");
    assert_eq!(head["chunk_count"].as_u64(), Some(256), "{head}");
    let fsck = Command::new(Ingredients::require_tool("disk", "e2fsck", "e2fsprogs").unwrap())
        .args(["-n", "-f"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "the committed disk is not a clean ext4: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    assert_eq!(debugfs_cat(&image, "/docs/note.txt"), b"hello from A\n");
    assert_eq!(debugfs_cat(&image, "/docs/blob.bin"), blob);
    (v1, blob)
}

/// The agent dies during the session: once a new agent serves the device
/// again the mount works (a write reaches the disk), and the logout
/// commits. Returns the committed image's path.
fn agent_killed_mid_session_reattaches(
    host: &HostDaemon,
    b: &Vm,
    run: &RunDir,
    (v1, blob): (u64, &[u8]),
) -> PathBuf {
    b.ok("kill -9 $(pidof uve-agent)");
    b.ok("uve-agent run --config /etc/uve-agent.toml >/dev/ttyS0 2>&1 </dev/null &");
    b.ok("n=0; until uve-agent status >/dev/null 2>&1; do n=$((n+1)); [ $n -lt 100 ] || exit 1; sleep 0.2; done");
    b.ok("su alice -s /bin/sh -c 'echo after the restart > /home/alice/docs/restart.txt' && sync");
    assert_eq!(
        b.ok("cat /home/alice/docs/restart.txt"),
        "after the restart\n"
    );
    assert_eq!(
        b.ok("cat /sys/block/nbd0/queue/max_sectors_kb").trim(),
        "4096"
    );
    b.ok("rm /home/alice/docs/blob.bin");
    b.ok("uve-agent logout --session s2");
    assert_eq!(
        home_mount(b),
        None,
        "the home is still mounted after logout"
    );
    let v2 = host.head("alice");
    assert!(v2 > v1, "vm-b's logout committed nothing");
    let image = run.path().join("alice-v2.disk");
    std::fs::write(&image, host.export("alice", v2, run.path())).unwrap();
    assert_eq!(
        debugfs_cat(&image, "/docs/note.txt"),
        b"hello from A\nand from B\n"
    );
    assert_eq!(
        debugfs_cat(&image, "/docs/restart.txt"),
        b"after the restart\n"
    );
    // The deleted blob's blocks were trimmed at logout: none of its bytes
    // is left in the committed image.
    let bytes = std::fs::read(&image).unwrap();
    let piece = &blob[4096..8192];
    assert!(
        !bytes.windows(piece.len()).step_by(4096).any(|w| w == piece),
        "the deleted file's blocks were not trimmed"
    );
    image
}

/// A damaged disk (the superblock overwritten: nothing `e2fsck -p` may
/// repair without asking) is refused and never mounted; so is a good
/// disk when the backing filesystem lacks the room asked for.
fn damaged_disk_and_no_room_are_refused(host: &HostDaemon, b: &Vm, run: &RunDir, good: &Path) {
    let mut bad = std::fs::read(good).unwrap();
    bad[1024..2048].fill(0xa5);
    let bad_path = run.path().join("alice-bad.disk");
    std::fs::write(&bad_path, &bad).unwrap();
    host.import("alice", &bad_path);
    let (code, out) = b.sh("uve-agent login --user alice --session s3");
    assert_ne!(code, 0, "a damaged disk was accepted: {out}");
    assert!(
        out.contains("e2fsck"),
        "the refusal does not say why: {out}"
    );
    assert_eq!(home_mount(b), None, "a damaged disk was mounted");

    host.import("alice", good);
    b.ok("echo 'reserve_mib = 1000000' >> /etc/uve-agent.toml && kill -HUP $(pidof uve-agent) && sleep 1");
    let (code, out) = b.sh("uve-agent login --user alice --session s4");
    assert_ne!(code, 0, "a disk was mounted without the reserve: {out}");
    assert!(
        out.contains("no room for the disk of alice"),
        "the refusal does not say why: {out}"
    );
    assert_eq!(home_mount(b), None, "a disk was mounted without room");
}

/// One number printed by a guest command.
fn number(vm: &Vm, cmd: &str) -> u64 {
    let out = vm.ok(cmd);
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{cmd}: {out}"))
}

/// Bytes free (for the agent, not only root) on the filesystem of `dir`.
fn free_bytes(vm: &Vm, dir: &str) -> u64 {
    let (_, fs) = vm.sh(&format!("stat -f -c '%a %S' {dir}"));
    let f: Vec<u64> = fs
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    assert_eq!(f.len(), 2, "stat -f: {fs}");
    f[0] * f[1]
}

/// The filesystem of the working copies lacks the room a new disk needs,
/// and alice's working copy (left by her refused login) would make it
/// (a ballast file takes the rest): bob's login removes it and mounts his
/// disk. Then carol's login finds only bob's attached disk, which is
/// never removed: refused. Last, the agent is stopped (SIGTERM, no
/// systemd: taken for a system shutdown): bob's disk is unmounted and
/// uploaded.
fn others_working_copies_make_room(host: &HostDaemon, b: &Vm) {
    let uif = "/var/lib/uve-agent/uif";
    assert!(
        b.sh(&format!("test -f {uif}/alice.disk")).0 == 0,
        "alice's working copy"
    );
    let held = number(b, &format!("stat -c %b {uif}/alice.disk")) * 512;
    let free = free_bytes(b, uif);
    // The disk fits only with half of alice's copy: the rest is ballast.
    let size: u64 = 16 << 20;
    let ballast = free - size + held / 2;
    b.ok(&format!(
        "head -c {ballast} /dev/zero > /var/lib/uve-agent/ballast && \
         sed -i -e '/^reserve_mib/d' -e 's/^size_mib = .*/size_mib = 16/' \
         /etc/uve-agent.toml && kill -HUP $(pidof uve-agent) && sleep 1"
    ));
    for user in ["bob", "carol"] {
        host.ok(&["assign", user, "vm-b"]);
    }
    let out = b.ok("uve-agent login --user bob --session e1");
    assert!(out.contains("new user"), "{out}");
    let (_, mounts) = b.sh("cat /proc/mounts");
    assert!(
        mounts.lines().any(|l| l.contains(" /home/bob ext4 ")),
        "bob's disk is not mounted: {mounts}"
    );
    assert_ne!(
        b.sh(&format!("test -e {uif}/alice.disk")).0,
        0,
        "alice's working copy was not removed"
    );
    // Short of room again, with bob's attached disk the only copy there.
    let free = free_bytes(b, uif);
    b.ok(&format!(
        "head -c {} /dev/zero > /var/lib/uve-agent/ballast2",
        free - size + (1 << 20)
    ));
    let (code, out) = b.sh("uve-agent login --user carol --session e2");
    assert_ne!(code, 0, "carol's disk fits only by removing bob's: {out}");
    assert!(out.contains("no room for the disk of carol"), "{out}");
    assert_eq!(
        b.sh(&format!("test -f {uif}/bob.disk")).0,
        0,
        "bob's attached disk was removed"
    );
    assert!(b.ok("cat /proc/mounts").contains(" /home/bob ext4 "));

    // The agent's stop at a shutdown releases bob's disk.
    b.ok("rm /var/lib/uve-agent/ballast* && echo from bob > /home/bob/note");
    b.ok("kill -TERM $(pidof uve-agent); for i in $(seq 100); do pidof uve-agent || break; sleep 0.2; done; ! pidof uve-agent");
    assert!(
        !b.ok("cat /proc/mounts").contains(" /home/bob "),
        "the agent's stop left bob's home mounted"
    );
    // bob's login was a new user's: a head now is the stop's upload.
    assert!(host.head("bob") > 0);
}
