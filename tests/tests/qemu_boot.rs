//! Smoke test of the harness itself: a guest boots, loads the vsock
//! modules and answers on the command channel through real virtio-vsock.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::cast_possible_truncation
)]

use std::time::Duration;

use uve_e2e::ingredients::Ingredients;
use uve_e2e::initramfs::Initramfs;
use uve_e2e::vm::Vm;

#[test]
fn guest_boots_and_answers_over_virtio_vsock() {
    let Some(ing) = Ingredients::require("guest_boots_and_answers_over_virtio_vsock") else {
        return;
    };
    let dir = tempfile::Builder::new()
        .prefix("uve-e2e-")
        .tempdir_in("/tmp")
        .expect("run dir");
    let mut img = Initramfs::new(&ing).expect("initramfs");
    img.start_agent(false);
    let initrd = img
        .build(&dir.path().join("initramfs.cpio.gz"))
        .expect("build");
    let mut vm = Vm::boot(&ing, "vm-smoke", dir.path(), &initrd).expect("boot");
    let boot = vm.wait_ready(Duration::from_secs(90)).expect("ready");
    eprintln!("guest ready after {boot:?}");
    assert!(vm.ok("uname -r").starts_with("6.1."));
    assert!(
        vm.ok("cat /proc/modules")
            .contains("vmw_vsock_virtio_transport")
    );
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    vm.put("/tmp/blob", &data);
    assert_eq!(vm.get("/tmp/blob").expect("blob"), data);
    assert_eq!(vm.ok("wc -c < /tmp/blob").trim(), "3000000");
    assert_eq!(vm.get("/tmp/nope"), None);
    let (code, out) = vm.sh("exit 3");
    assert_eq!((code, out.as_str()), (3, ""));
}
