//! `e2e-guest`: test helper that runs **inside QEMU guests only**.
//!
//! - `e2e-guest serve`: the command server of the end-to-end suite, on
//!   AF_VSOCK port 9000 (see `uve_e2e::channel`);
//! - `e2e-guest rogue --user U`: a hostile guest speaking the uve protocol
//!   to the host: asks for a user not assigned to its VM, sends an
//!   oversized frame header and garbage, and prints what the host did.
//!
//! It refuses to start unless `UVE_E2E_GUEST=1` is set (the guest's init
//! sets it), so it can never open an AF_VSOCK socket on a development
//! machine by accident.

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use uve_e2e::channel::{self, GUEST_PORT, OP_GET, OP_PUT, OP_SH};

fn main() {
    if std::env::var("UVE_E2E_GUEST").as_deref() != Ok("1") {
        eprintln!("e2e-guest runs only inside an e2e QEMU guest (UVE_E2E_GUEST=1)");
        std::process::exit(2);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.first().map(String::as_str) {
        Some("serve") => serve(),
        Some("rogue") => rogue(args.get(2).map_or("nobody-assigned", String::as_str)),
        _ => {
            eprintln!("usage: e2e-guest serve | rogue --user U");
            2
        }
    };
    std::process::exit(code);
}

fn serve() -> i32 {
    let listener =
        match vsock::VsockListener::bind(&vsock::VsockAddr::new(vsock::VMADDR_CID_ANY, GUEST_PORT))
        {
            Ok(l) => l,
            Err(e) => {
                eprintln!("e2e-guest: bind vsock port {GUEST_PORT}: {e}");
                return 1;
            }
        };
    println!("e2e-guest: listening on vsock port {GUEST_PORT}");
    for conn in listener.incoming() {
        match conn {
            Ok(s) => {
                std::thread::spawn(move || {
                    if let Err(e) = handle(s) {
                        eprintln!("e2e-guest: request failed: {e}");
                    }
                });
            }
            Err(e) => eprintln!("e2e-guest: accept: {e}"),
        }
    }
    0
}

fn handle(mut s: vsock::VsockStream) -> std::io::Result<()> {
    let mut op = [0u8; 1];
    s.read_exact(&mut op)?;
    match op[0] {
        OP_SH => {
            let cmd = String::from_utf8_lossy(&channel::get_field(&mut s)?).into_owned();
            let out = Command::new("/bin/sh")
                .arg("-c")
                .arg(format!("exec 2>&1; {cmd}"))
                .output();
            match out {
                Ok(o) => channel::put_response(&mut s, o.status.code().unwrap_or(128), &o.stdout),
                Err(e) => channel::put_response(&mut s, 127, e.to_string().as_bytes()),
            }
        }
        OP_PUT => {
            let path = String::from_utf8_lossy(&channel::get_field(&mut s)?).into_owned();
            let data = channel::get_field(&mut s)?;
            let written = std::fs::File::create(&path).and_then(|mut f| {
                f.write_all(&data)?;
                f.sync_all()
            });
            match written {
                Ok(()) => channel::put_response(&mut s, 0, b""),
                Err(e) => channel::put_response(&mut s, 1, e.to_string().as_bytes()),
            }
        }
        OP_GET => {
            let path = String::from_utf8_lossy(&channel::get_field(&mut s)?).into_owned();
            match std::fs::read(&path) {
                Ok(data) => channel::put_response(&mut s, 0, &data),
                Err(e) => channel::put_response(&mut s, 1, e.to_string().as_bytes()),
            }
        }
        other => channel::put_response(&mut s, 2, format!("unknown op {other}").as_bytes()),
    }
}

/// Each probe prints one `ROGUE <name> <outcome>` line; exit 0 if the host
/// contained every probe.
fn rogue(user: &str) -> i32 {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            return 1;
        }
    };
    rt.block_on(uve_e2e::rogue::run(user, Duration::from_secs(10)))
}
