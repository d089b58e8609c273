//! Directory users in a baked Debian image: a user known to the guest
//! **only through NSS** (Debian's `libnss-extrausers`, a real non-files
//! NSS module standing in for SSSD or winbind: the same `getpwnam_r`
//! path, its own database under `/var/lib/extrausers/`) with a Windows
//! domain name, `CORP\alice`, logs in on two VMs baked from the same
//! image, where the directory gives her different uids (10001 on vm-a,
//! 20001 on vm-b, as per-VM id mapping does).
//!
//! What it shows: the .deb's agent resolves her through NSS (she is not in
//! `/etc/passwd`); her store name is `CORP~5calice`; directory mode
//! unpacks her home at the entry's home, owned by her uid on each VM; her
//! UA runs as that uid with her supplementary group; a directory that
//! cannot answer fails the login as transient, not "no such user".
//!
//! Two systemd boots under TCG (~1 min each) plus one bake (debootstrap
//! cached). Needs what `baked_image` needs, plus the `libnss-extrausers`
//! package that `tests/prepare.sh` downloads into `target/e2e-cache/debs`.
//! Run it: `cargo nextest run -p uve-e2e -E 'test(nss)'`.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Instant;

use uve_e2e::baked::{bake_image, boot_with_systemd, copy_disk, ua_bundle};
use uve_e2e::host::HostDaemon;
use uve_e2e::ingredients::Ingredients;
use uve_e2e::poll::wait_for;
use uve_e2e::rootdisk::BakeIngredients;
use uve_e2e::scenario::RunDir;
use uve_e2e::vm::Vm;

const NAME: &str = "baked_image_nss_directory_user_on_two_vms_with_different_uids";

/// How she logs in (PAM_USER), and her name in the store.
const SPELLING: &str = "CORP\\alice";
const STORE_NAME: &str = "CORP~5calice";
const HOME: &str = "/home/corp/alice";

/// Directory mode; the home is the entry's (the default `uif.home`).
const AGENT_CONFIG: &str = r#"# written by bake-image.sh --config (baked_nss test)
host = "vsock:2:7075"
login_timeout_secs = 45
[uif]
mode = "directory"
"#;

/// NSS asks the local files first, then extrausers (as `sss` would be).
const NSSWITCH: &str = "passwd:         files extrausers
group:          files extrausers
shadow:         files extrausers
hosts:          files
networks:       files
protocols:      db files
services:       db files
ethers:         db files
rpc:            db files
";

/// The UA: writes who it runs as into its home, then stays.
const UA_SCRIPT: &str = "{ id -u; id -g; id -G; printf '%s\\n' \"$USER\" \"$HOME\"; } > \"$HOME/.ua-id.tmp\" && mv \"$HOME/.ua-id.tmp\" \"$HOME/.ua-id\"\nexec sleep 600";

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn baked_image_nss_directory_user_on_two_vms_with_different_uids() {
    let Some(ing) = Ingredients::require(NAME) else {
        return;
    };
    let Some(bake) = BakeIngredients::require(&ing, NAME) else {
        return;
    };
    let Some(extrausers) = extrausers_deb(&ing) else {
        return;
    };
    let run = RunDir::new(NAME);
    let dir = run.path();
    let t = Instant::now();
    let nsswitch = dir.join("nsswitch.conf");
    std::fs::write(&nsswitch, NSSWITCH).unwrap();
    let extra = [
        "--deb".to_string(),
        s(&extrausers),
        "--copy-in".into(),
        s(&nsswitch),
        "/etc/nsswitch.conf".into(),
    ];
    let (disk_a, initrd) = bake_image(&ing, &bake, dir, NAME, AGENT_CONFIG, &extra);
    let disk_b = dir.join("disk-b.img");
    copy_disk(&disk_a, &disk_b);

    let host = HostDaemon::start(&ing, dir, "").expect("host");
    for vm in ["vm-a", "vm-b"] {
        let vm_dir = dir.join(vm);
        std::fs::create_dir_all(&vm_dir).unwrap();
        host.add_vm(vm, &vm_dir.join("v.sock"));
    }
    host.ok(&["assign", STORE_NAME, "vm-a"]);

    // vm-a: she is uid 10001.
    let vm = boot_with_systemd(&ing, &host, "vm-a", &dir.join("vm-a"), &initrd, &disk_a);
    directory_knows_her(&vm, 10001);
    deploy_ua(&host, dir, "vm-a");
    let login = vm.ok(&format!(
        "uve-agent login --user '{SPELLING}' --session s1 --ua desk"
    ));
    assert!(login.contains("new user"), "{login}");
    assert_owned_by(&vm, HOME, 10001);
    ua_runs_as_her(&vm, 10001);
    vm.put(&format!("{HOME}/notes.txt"), b"written on vm-a");
    vm.ok(&format!("chown 10001:10001 {HOME}/notes.txt"));
    vm.ok("uve-agent logout --session s1");
    let v1 = host.head(STORE_NAME);
    eprintln!("{NAME}: vm-a login, UA, logout: {:?}", t.elapsed());
    vm.ok("systemctl stop uve-agent.service");
    drop(vm);

    // vm-b, from the same golden image: she is uid 20001 here.
    host.ok(&["assign", STORE_NAME, "vm-b"]);
    let vm = boot_with_systemd(&ing, &host, "vm-b", &dir.join("vm-b"), &initrd, &disk_b);
    directory_knows_her(&vm, 20001);
    directory_offline_is_transient(&vm);
    let login = vm.ok(&format!("uve-agent login --user '{SPELLING}' --session s2"));
    assert!(
        login.contains(&format!("retrieved version {v1}")),
        "{login}"
    );
    assert_eq!(
        vm.get(&format!("{HOME}/notes.txt")).as_deref(),
        Some(&b"written on vm-a"[..]),
        "her file did not travel"
    );
    assert_owned_by(&vm, HOME, 20001);
    assert_owned_by(&vm, &format!("{HOME}/notes.txt"), 20001);
    vm.ok("uve-agent logout --session s2");
    eprintln!("{NAME}: total {:?}", t.elapsed());
}

/// `target/e2e-cache/debs/libnss-extrausers_*.deb`, or `None` after
/// saying why the scenario is skipped (a panic with `E2E_REQUIRE=1`).
fn extrausers_deb(ing: &Ingredients) -> Option<PathBuf> {
    let debs = ing.repo.join("target/e2e-cache/debs");
    let found = std::fs::read_dir(&debs).ok().and_then(|d| {
        d.filter_map(Result::ok).map(|e| e.path()).find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libnss-extrausers_"))
        })
    });
    if found.is_none() {
        let why = format!(
            "no libnss-extrausers package in {} (tests/prepare.sh)",
            debs.display()
        );
        assert!(
            std::env::var("E2E_REQUIRE").as_deref() != Ok("1"),
            "{NAME}: E2E_REQUIRE=1 but {why}"
        );
        eprintln!("skipped: {NAME}: {why}");
    }
    found
}

/// Writes her entry into the extrausers database with `uid` (and a
/// supplementary group, corp-devs 10500), and checks that only NSS knows
/// her: not `/etc/passwd`, but `getent`.
fn directory_knows_her(vm: &Vm, uid: u32) {
    vm.put(
        "/var/lib/extrausers/passwd",
        format!("{SPELLING}:x:{uid}:{uid}:Alice:{HOME}:/bin/sh\n").as_bytes(),
    );
    vm.put(
        "/var/lib/extrausers/group",
        format!("corp-users:x:{uid}:\ncorp-devs:x:10500:{SPELLING}\n").as_bytes(),
    );
    vm.ok("mkdir -p /home/corp && chmod 755 /home/corp");
    let (in_files, _) = vm.sh("grep -q alice /etc/passwd");
    assert_ne!(in_files, 0, "she must not be a local user");
    let entry = vm.ok(&format!("getent passwd '{SPELLING}'"));
    assert!(entry.contains(&format!(":{uid}:{uid}:")), "{entry}");
}

/// With the directory's database gone (as with SSSD unreachable and
/// nothing cached), the login fails and says the database is unavailable
/// and the failure transient, never "no such user"; nothing is attached.
fn directory_offline_is_transient(vm: &Vm) {
    vm.ok("mv /var/lib/extrausers/passwd /var/lib/extrausers/passwd.offline");
    let (code, out) = vm.sh(&format!(
        "uve-agent login --user '{SPELLING}' --session s-offline 2>&1"
    ));
    vm.ok("mv /var/lib/extrausers/passwd.offline /var/lib/extrausers/passwd");
    assert_ne!(
        code, 0,
        "a login with the directory offline succeeded: {out}"
    );
    assert!(
        out.contains("unavailable") && out.contains("transient"),
        "{out}"
    );
    assert!(!out.contains("no such user"), "{out}");
    let status = vm.ok("uve-agent status");
    assert!(!status.contains("s-offline"), "{status}");
}

/// Deploys the `desk` UA to `vm`.
fn deploy_ua(host: &HostDaemon, dir: &Path, vm: &str) {
    let tar = ua_bundle(dir, "desk", "1.0", UA_SCRIPT);
    host.ok(&[
        "ua",
        "deploy",
        vm,
        &tar,
        "--name",
        "desk",
        "--version",
        "1.0",
        "--entry",
        "bin/desk.sh",
    ]);
}

/// `path` belongs to `uid`:`uid` (her primary group has her uid's number).
fn assert_owned_by(vm: &Vm, path: &str, uid: u32) {
    let owner = vm.ok(&format!("stat -c %u:%g '{path}'"));
    assert_eq!(owner.trim(), format!("{uid}:{uid}"), "owner of {path}");
}

/// Her UA runs as her: uid, primary gid, the supplementary corp-devs
/// group, `USER` as the directory spells her, `HOME` her entry's.
fn ua_runs_as_her(vm: &Vm, uid: u32) {
    let file = format!("{HOME}/.ua-id");
    let wrote = wait_for(std::time::Duration::from_secs(60), || {
        vm.get(&file).is_some()
    });
    assert!(wrote, "the UA never wrote {file}");
    let text = String::from_utf8(vm.get(&file).unwrap()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.first(),
        Some(&uid.to_string().as_str()),
        "uid: {text}"
    );
    assert_eq!(lines.get(1), Some(&uid.to_string().as_str()), "gid: {text}");
    let mut groups: Vec<&str> = lines.get(2).unwrap_or(&"").split_whitespace().collect();
    groups.sort_unstable();
    let mut want = vec!["10500".to_string(), uid.to_string()];
    want.sort_unstable();
    assert_eq!(groups, want, "groups: {text}");
    assert_eq!(lines.get(3), Some(&SPELLING), "USER: {text}");
    assert_eq!(lines.get(4), Some(&HOME), "HOME: {text}");
}
