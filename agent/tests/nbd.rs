//! The agent's NBD server against real, independent NBD clients from
//! Debian (`nbdinfo`, `nbdcopy` from libnbd; `qemu-io` from QEMU) over a
//! Unix socket, and against malformed requests written by hand from the
//! protocol. The working copy is a real sparse file, checked directly.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use uve_agent::disk::device::BlockDevice;
use uve_agent::disk::nbd::{Export, Server};
use uve_agent::disk::working_copy::WorkingCopy;
use uve_e2e::ingredients::Ingredients;

const SIZE: u64 = 64 << 20;

/// Fields drop in order: the server before its directory.
struct Rig {
    server: Server,
    image: PathBuf,
    _dir: tempfile::TempDir,
}

impl Rig {
    fn new(read_only: bool) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        let device: Arc<dyn BlockDevice> = Arc::new(WorkingCopy::create(&image, SIZE).unwrap());
        let export = Arc::new(Export {
            name: "home".into(),
            device,
            read_only,
        });
        let server = Server::listen(&dir.path().join("nbd.sock"), export).unwrap();
        Rig {
            _dir: dir,
            image,
            server,
        }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///home?socket={}", self.server.path().display())
    }

    fn image_bytes(&self, at: u64, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; len];
        std::fs::File::open(&self.image)
            .unwrap()
            .read_exact_at(&mut buf, at)
            .unwrap();
        buf
    }
}

fn tool(scenario: &str, name: &str, package: &str) -> Option<PathBuf> {
    Ingredients::require_tool(scenario, name, package)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

fn qemu_io(qemu_io: &Path, uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new(qemu_io);
    c.args(["-f", "raw"]);
    for k in cmds {
        c.args(["-c", k]);
    }
    c.arg(uri);
    let text = run(&mut c);
    assert!(!text.contains("failed"), "qemu-io {cmds:?}: {text}");
    text
}

#[test]
fn nbd_nbdinfo_sees_size_flags_and_block_sizes() {
    let Some(nbdinfo) = tool("nbd_nbdinfo", "nbdinfo", "libnbd-bin") else {
        return;
    };
    let rig = Rig::new(false);
    let text = run(Command::new(nbdinfo).arg(rig.uri()));
    for want in [
        "export-size: 67108864",
        "is_read_only: false",
        "can_flush: true",
        "can_fua: true",
        "can_trim: true",
        "can_zero: true",
        "can_multi_conn: true",
        "block_size_minimum: 1",
        "block_size_preferred: 4096",
        "block_size_maximum: 4194304",
    ] {
        assert!(text.contains(want), "nbdinfo lacks {want:?}:\n{text}");
    }
    let ro = Rig::new(true);
    let text = run(Command::new("nbdinfo").arg(ro.uri()));
    assert!(text.contains("is_read_only: true"), "{text}");
}

#[test]
fn nbd_qemu_io_write_read_fua_flush_trim_and_zeroes_reach_the_file() {
    let Some(q) = tool("nbd_qemu_io", "qemu-io", "qemu-utils") else {
        return;
    };
    let rig = Rig::new(false);
    let uri = rig.uri();
    // Patterns written and read back over one connection (a mismatch makes
    // qemu-io print "Pattern verification failed").
    qemu_io(
        &q,
        &uri,
        &[
            "write -P 0xab 4096 8192",
            "read -P 0xab 4096 8192",
            "write -f -P 0xcd 1048576 1048576",
            "flush",
            "write -P 0x11 8388608 2097152",
            "write -z 8454144 65536",
            "read -P 0 8454144 65536",
            "read -P 0x11 8388608 65536",
        ],
    );
    assert_eq!(rig.image_bytes(4096, 8192), vec![0xab; 8192]);
    assert_eq!(rig.image_bytes(1 << 20, 1 << 20), vec![0xcd; 1 << 20]);
    assert_eq!(rig.image_bytes(8454144, 65536), vec![0; 65536]);
    assert_eq!(rig.image_bytes(8454144 + 65536, 4096), vec![0x11; 4096]);

    // A trim gives its blocks back to the backing filesystem and the range
    // reads as zeroes, partial blocks included.
    let before = std::fs::metadata(&rig.image).unwrap().blocks();
    qemu_io(
        &q,
        &uri,
        &["discard 1048576 1048576", "discard 4096 1000", "flush"],
    );
    let after = std::fs::metadata(&rig.image).unwrap().blocks();
    assert!(
        after + 2 * 1024 <= before,
        "a 1 MiB trim freed only {} KiB",
        (before - after) / 2
    );
    assert_eq!(rig.image_bytes(1 << 20, 1 << 20), vec![0; 1 << 20]);
    assert_eq!(rig.image_bytes(4096, 1000), vec![0; 1000]);
    assert_eq!(rig.image_bytes(5096, 7192), vec![0xab; 7192]);
    qemu_io(
        &q,
        &uri,
        &["read -P 0 1048576 1048576", "read -P 0xab 5096 7192"],
    );
}

#[test]
fn nbd_unaligned_and_larger_than_maximum_requests_are_served() {
    let Some(q) = tool("nbd_unaligned", "qemu-io", "qemu-utils") else {
        return;
    };
    let rig = Rig::new(false);
    let uri = rig.uri();
    // qemu-io splits a 12 MiB request by the advertised 4 MiB maximum.
    qemu_io(
        &q,
        &uri,
        &[
            "write -P 0x5a 1000 3000",
            "read -P 0x5a 1000 3000",
            "write -P 0x77 20971521 12582912",
            "read -P 0x77 20971521 12582912",
            "read -P 0 0 1000",
        ],
    );
    assert_eq!(rig.image_bytes(1000, 3000), vec![0x5a; 3000]);
    assert_eq!(rig.image_bytes(20971521, 12582912), vec![0x77; 12582912]);
    assert_eq!(rig.image_bytes(4000, 96), vec![0; 96]);
}

#[test]
fn nbd_nbdcopy_round_trips_the_whole_export() {
    let Some(nbdcopy) = tool("nbd_nbdcopy", "nbdcopy", "libnbd-bin") else {
        return;
    };
    let rig = Rig::new(false);
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("in.img"), dir.path().join("out.img"));
    let mut data = vec![0u8; SIZE as usize];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for (i, b) in data.iter_mut().enumerate() {
        // Zero runs and data runs, so holes and data both travel.
        if (i >> 20) % 3 != 1 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
    std::fs::write(&src, &data).unwrap();
    run(Command::new(&nbdcopy).arg(&src).arg(rig.uri()));
    assert!(
        std::fs::read(&rig.image).unwrap() == data,
        "the working copy differs from what nbdcopy sent"
    );
    run(Command::new(&nbdcopy).arg(rig.uri()).arg(&dst));
    assert!(
        std::fs::read(&dst).unwrap() == data,
        "what nbdcopy read back differs"
    );
}

// ---- hand-written clients: what real clients never send ----

fn be32(s: &mut UnixStream) -> u32 {
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    u32::from_be_bytes(b)
}

/// Sends one option; returns the replies' (type, data) up to the first
/// that is not `NBD_REP_INFO`/`NBD_REP_SERVER`.
fn option(s: &mut UnixStream, opt: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
    let mut m = Vec::new();
    m.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m).unwrap();
    let mut replies = Vec::new();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        assert_eq!(h[..8], 0x0003_e889_0455_65a9u64.to_be_bytes());
        assert_eq!(h[8..12], opt.to_be_bytes());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        s.read_exact(&mut d).unwrap();
        replies.push((kind, d));
        if kind != 3 && kind != 2 {
            return replies;
        }
    }
}

fn go_request(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

/// Connects and runs the handshake up to transmission.
fn connect(rig: &Rig) -> UnixStream {
    let mut s = UnixStream::connect(rig.server.path()).unwrap();
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).unwrap();
    assert_eq!(&greet[..8], b"NBDMAGIC");
    assert_eq!(&greet[8..16], b"IHAVEOPT");
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let replies = option(&mut s, 7, &go_request("home"));
    assert_eq!(
        replies.last().unwrap().0,
        1,
        "GO not acknowledged: {replies:?}"
    );
    s
}

fn request(s: &mut UnixStream, flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) {
    let mut m = Vec::with_capacity(28);
    m.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&cmd.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    s.write_all(&m).unwrap();
}

/// Reads a simple reply; returns its error number.
fn reply(s: &mut UnixStream, cookie: u64) -> u32 {
    assert_eq!(be32(s), 0x6744_6698);
    let error = be32(s);
    let mut c = [0u8; 8];
    s.read_exact(&mut c).unwrap();
    assert_eq!(u64::from_be_bytes(c), cookie);
    error
}

fn closed(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

#[test]
fn nbd_malformed_requests_get_errors_and_the_stream_stays_in_step() {
    let rig = Rig::new(false);
    let mut s = connect(&rig);
    // Read past the end, zero length, unknown command, unknown flag.
    request(&mut s, 0, 0, 1, SIZE - 512, 1024);
    assert_eq!(reply(&mut s, 1), EINVAL);
    request(&mut s, 0, 0, 2, 0, 0);
    assert_eq!(reply(&mut s, 2), EINVAL);
    request(&mut s, 0, 99, 3, 0, 512);
    assert_eq!(reply(&mut s, 3), EINVAL);
    request(&mut s, 0x40, 0, 4, 0, 512);
    assert_eq!(reply(&mut s, 4), EINVAL);
    // NO_HOLE on a plain write, a read larger than the maximum.
    request(&mut s, 2, 1, 5, 0, 4);
    s.write_all(&[1, 2, 3, 4]).unwrap();
    assert_eq!(reply(&mut s, 5), EINVAL);
    request(&mut s, 0, 0, 6, 0, 8 << 20);
    assert_eq!(reply(&mut s, 6), EINVAL);
    // A write larger than the maximum: its payload is read and dropped,
    // then the next request is answered as usual.
    request(&mut s, 0, 1, 7, 0, 5 << 20);
    s.write_all(&vec![0xee; 5 << 20]).unwrap();
    assert_eq!(reply(&mut s, 7), EINVAL);
    // Writes, trims and zeroes past the end.
    request(&mut s, 0, 1, 8, SIZE - 2, 4);
    s.write_all(&[9; 4]).unwrap();
    assert_eq!(reply(&mut s, 8), ENOSPC);
    request(&mut s, 0, 4, 9, SIZE, 4096);
    assert_eq!(reply(&mut s, 9), ENOSPC);
    request(&mut s, 0, 6, 10, u64::MAX - 10, 4096);
    assert_eq!(reply(&mut s, 10), ENOSPC);
    // A good write and read on the same connection afterwards.
    request(&mut s, 1, 1, 11, 512, 4);
    s.write_all(&[7, 7, 7, 7]).unwrap();
    assert_eq!(reply(&mut s, 11), 0);
    request(&mut s, 0, 0, 12, 512, 4);
    assert_eq!(reply(&mut s, 12), 0);
    let mut got = [0u8; 4];
    s.read_exact(&mut got).unwrap();
    assert_eq!(got, [7; 4]);
    assert_eq!(
        rig.image_bytes(0, 516)[..512],
        [0u8; 512],
        "no dropped payload landed"
    );
    // A wrong magic ends the connection.
    s.write_all(&[0u8; 28]).unwrap();
    assert!(
        closed(&mut s),
        "the server kept a connection whose stream is out of step"
    );

    // A header cut short, then a disconnect and a request after it.
    let mut t = connect(&rig);
    t.write_all(&0x2560_9513u32.to_be_bytes()).unwrap();
    t.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(closed(&mut t));
    let mut u = connect(&rig);
    request(&mut u, 0, 2, 13, 0, 0);
    request(&mut u, 0, 0, 14, 0, 512);
    assert!(closed(&mut u), "a request after NBD_CMD_DISC was served");

    // The server still serves a new client, and the data is there.
    let mut v = connect(&rig);
    request(&mut v, 0, 0, 15, 512, 4);
    assert_eq!(reply(&mut v, 15), 0);
    v.read_exact(&mut got).unwrap();
    assert_eq!(got, [7; 4]);
}

#[test]
fn nbd_handshake_refuses_what_it_does_not_serve() {
    let rig = Rig::new(true);
    // No fixed newstyle: closed.
    let mut s = UnixStream::connect(rig.server.path()).unwrap();
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).unwrap();
    s.write_all(&0u32.to_be_bytes()).unwrap();
    assert!(closed(&mut s));

    let mut s = UnixStream::connect(rig.server.path()).unwrap();
    s.read_exact(&mut greet).unwrap();
    s.write_all(&1u32.to_be_bytes()).unwrap();
    // Structured replies and unknown options: unsupported.
    assert_eq!(option(&mut s, 8, &[])[0].0, (1 << 31) + 1);
    assert_eq!(option(&mut s, 4242, b"x")[0].0, (1 << 31) + 1);
    // A GO for another export: unknown; a malformed one: invalid.
    assert_eq!(option(&mut s, 7, &go_request("other"))[0].0, (1 << 31) + 6);
    assert_eq!(option(&mut s, 7, &[0, 0, 0, 9, b'h'])[0].0, (1 << 31) + 3);
    // LIST names the export; INFO describes it without starting.
    let list = option(&mut s, 3, &[]);
    assert_eq!(list[0], (2, [&4u32.to_be_bytes()[..], b"home"].concat()));
    let info = option(&mut s, 6, &go_request(""));
    assert_eq!(info.last().unwrap().0, 1);
    let export = &info[0].1;
    assert_eq!(export[..2], [0, 0]);
    assert_eq!(export[2..10], SIZE.to_be_bytes());
    let flags = u16::from_be_bytes([export[10], export[11]]);
    assert_eq!(flags & 2, 2, "a read-only export must say so");
    // An option too long to be real: closed.
    let mut m = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
    m.extend_from_slice(&7u32.to_be_bytes());
    m.extend_from_slice(&(1u32 << 20).to_be_bytes());
    s.write_all(&m).unwrap();
    assert!(closed(&mut s));

    // Writes to a read-only export: EPERM.
    let mut t = connect(&rig);
    request(&mut t, 0, 1, 1, 0, 4);
    t.write_all(&[1; 4]).unwrap();
    assert_eq!(reply(&mut t, 1), EPERM);
    request(&mut t, 0, 4, 2, 0, 4096);
    assert_eq!(reply(&mut t, 2), EPERM);
    request(&mut t, 0, 0, 3, 0, 4);
    assert_eq!(reply(&mut t, 3), 0);
    t.read_exact(&mut [0u8; 4]).unwrap();
}
