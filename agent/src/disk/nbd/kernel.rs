//! The kernel front end: hands one end of a socket pair to the Linux `nbd`
//! driver through its generic-netlink family (`nbd`), so that a
//! `/dev/nbdN` appears whose requests this agent serves on the other end
//! (transmission only: the kernel does no handshake). Netlink rather than
//! the old ioctls: `NBD_CMD_CONNECT` with no index takes a free device
//! (no fixed `nbds_max`), a dead-connection timeout keeps the device (and
//! the mounted home) alive while a restarted agent re-attaches with
//! `NBD_CMD_RECONFIGURE`, and `DESTROY_ON_DISCONNECT` frees it at the end.
//!
//! Hand-written (three messages) rather than a netlink crate: the agent
//! needs the family lookup, connect, reconfigure and disconnect, nothing
//! of routing or multicast.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    socket,
};

use super::wire::tflag;

const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NLA_F_NESTED: u16 = 1 << 15;

const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_DISCONNECT: u8 = 2;
const NBD_CMD_RECONFIGURE: u8 = 3;
const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_CLIENT_FLAGS: u16 = 6;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;
const NBD_CFLAG_DESTROY_ON_DISCONNECT: u64 = 1;

/// How the kernel is asked to use a served device.
#[derive(Debug, Clone, Copy)]
pub struct Attach {
    /// Device size in bytes.
    pub size: u64,
    /// Logical block size (4096: the filesystem's).
    pub block_size: u64,
    /// Transmission flags, as the NBD server advertises them.
    pub flags: u16,
    /// A request unanswered for this long fails (0: the kernel's default).
    pub request_timeout: Duration,
    /// After the agent's end of the socket closes, the device waits this
    /// long for a re-attach before failing I/O.
    pub dead_conn_timeout: Duration,
}

/// A netlink or kernel error.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The netlink socket failed.
    #[error("netlink: {0}")]
    Io(#[from] io::Error),
    /// The kernel refused the request.
    #[error("the nbd driver refused {what}: {errno}")]
    Refused {
        /// The request.
        what: &'static str,
        /// Its error.
        errno: nix::errno::Errno,
    },
    /// The `nbd` module is not loaded (no netlink family `nbd`).
    #[error("the kernel has no nbd driver (modprobe nbd): {0}")]
    NoDriver(nix::errno::Errno),
    /// An answer this code does not understand.
    #[error("netlink answer malformed: {0}")]
    Malformed(&'static str),
}

fn errno(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// A generic-netlink message under construction.
struct Msg {
    buf: Vec<u8>,
    /// Start offsets of the nested attributes still open.
    nests: Vec<usize>,
}

impl Msg {
    fn new(family: u16, cmd: u8, version: u8) -> Msg {
        let mut buf = vec![0u8; 16];
        buf[4..6].copy_from_slice(&family.to_ne_bytes());
        buf[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        buf.extend_from_slice(&[cmd, version, 0, 0]);
        Msg {
            buf,
            nests: Vec::new(),
        }
    }

    fn attr(&mut self, kind: u16, data: &[u8]) -> &mut Self {
        let len = u16::try_from(4 + data.len()).unwrap_or(u16::MAX);
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
        self
    }

    fn u32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.attr(kind, &v.to_ne_bytes())
    }

    fn u64(&mut self, kind: u16, v: u64) -> &mut Self {
        self.attr(kind, &v.to_ne_bytes())
    }

    fn open(&mut self, kind: u16) -> &mut Self {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&[0, 0]);
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self
    }

    fn close(&mut self) -> &mut Self {
        if let Some(at) = self.nests.pop() {
            let len = u16::try_from(self.buf.len() - at).unwrap_or(u16::MAX);
            self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        }
        self
    }

    fn finish(&mut self, seq: u32) -> &[u8] {
        let len = u32::try_from(self.buf.len()).unwrap_or(u32::MAX);
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        &self.buf
    }
}

/// The attributes of one generic-netlink payload: (type, data).
fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([b[0], b[1]]));
        let kind = u16::from_ne_bytes([b[2], b[3]]) & !NLA_F_NESTED;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((kind, &b[4..len]));
        b = &b[len.next_multiple_of(4).min(b.len())..];
    }
    out
}

/// A generic-netlink socket.
struct Genl {
    fd: OwnedFd,
    seq: u32,
}

impl Genl {
    fn open() -> Result<Genl, KernelError> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkGeneric,
        )
        .map_err(errno)?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(errno)?;
        Ok(Genl { fd, seq: 0 })
    }

    /// Sends `msg` and reads the answers up to its ACK or error; returns
    /// the generic-netlink payloads (after the 4-byte genl header) of the
    /// data answers.
    fn call(&mut self, msg: &mut Msg, what: &'static str) -> Result<Vec<Vec<u8>>, KernelError> {
        self.seq += 1;
        let seq = self.seq;
        send(self.fd.as_raw_fd(), msg.finish(seq), MsgFlags::empty()).map_err(errno)?;
        let mut data = Vec::new();
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(errno)?;
            let mut b = &buf[..n];
            while b.len() >= 16 {
                let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
                let kind = u16::from_ne_bytes([b[4], b[5]]);
                let got_seq = u32::from_ne_bytes([b[8], b[9], b[10], b[11]]);
                if len < 16 || len > b.len() {
                    return Err(KernelError::Malformed("message length"));
                }
                let body = &b[16..len];
                if got_seq == seq {
                    if kind == NLMSG_ERROR {
                        let code = body
                            .get(..4)
                            .map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                            .ok_or(KernelError::Malformed("error message"))?;
                        if code == 0 {
                            return Ok(data);
                        }
                        return Err(KernelError::Refused {
                            what,
                            errno: nix::errno::Errno::from_raw(-code),
                        });
                    }
                    data.push(body.get(4..).unwrap_or_default().to_vec());
                }
                b = &b[len.next_multiple_of(4).min(b.len())..];
            }
        }
    }

    /// The id of the `nbd` family.
    fn nbd_family(&mut self) -> Result<u16, KernelError> {
        let mut m = Msg::new(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1);
        m.attr(CTRL_ATTR_FAMILY_NAME, b"nbd\0");
        let answers = match self.call(&mut m, "the family lookup") {
            Ok(a) => a,
            Err(KernelError::Refused { errno, .. }) => return Err(KernelError::NoDriver(errno)),
            Err(e) => return Err(e),
        };
        answers
            .iter()
            .flat_map(|a| attrs(a))
            .find(|(k, d)| *k == CTRL_ATTR_FAMILY_ID && d.len() >= 2)
            .map(|(_, d)| u16::from_ne_bytes([d[0], d[1]]))
            .ok_or(KernelError::Malformed("no family id"))
    }
}

fn secs(d: Duration) -> u64 {
    d.as_secs().max(u64::from(!d.is_zero()))
}

/// Asks the kernel for a free `/dev/nbdN` served over `socket` (the
/// kernel's end of a socket pair, already past any handshake); returns N.
pub fn connect(socket: &OwnedFd, a: &Attach) -> Result<u32, KernelError> {
    let mut nl = Genl::open()?;
    let family = nl.nbd_family()?;
    let mut m = Msg::new(family, NBD_CMD_CONNECT, 1);
    m.u64(NBD_ATTR_SIZE_BYTES, a.size)
        .u64(NBD_ATTR_BLOCK_SIZE_BYTES, a.block_size)
        .u64(NBD_ATTR_SERVER_FLAGS, u64::from(a.flags | tflag::HAS_FLAGS))
        .u64(NBD_ATTR_CLIENT_FLAGS, NBD_CFLAG_DESTROY_ON_DISCONNECT)
        .u64(NBD_ATTR_DEAD_CONN_TIMEOUT, secs(a.dead_conn_timeout));
    if !a.request_timeout.is_zero() {
        m.u64(NBD_ATTR_TIMEOUT, secs(a.request_timeout));
    }
    sockets(&mut m, socket);
    let answers = nl.call(&mut m, "NBD_CMD_CONNECT")?;
    answers
        .iter()
        .flat_map(|a| attrs(a))
        .find(|(k, d)| *k == NBD_ATTR_INDEX && d.len() >= 4)
        .map(|(_, d)| u32::from_ne_bytes([d[0], d[1], d[2], d[3]]))
        .ok_or(KernelError::Malformed("NBD_CMD_CONNECT answered no index"))
}

fn sockets(m: &mut Msg, socket: &OwnedFd) {
    let fd = u32::try_from(socket.as_raw_fd()).unwrap_or(u32::MAX);
    m.open(NBD_ATTR_SOCKETS)
        .open(NBD_SOCK_ITEM)
        .u32(NBD_SOCK_FD, fd)
        .close()
        .close();
}

/// Gives `/dev/nbd<index>` a new connection (after the agent restarted:
/// the old one died with the old process).
pub fn reconfigure(index: u32, socket: &OwnedFd) -> Result<(), KernelError> {
    let mut nl = Genl::open()?;
    let family = nl.nbd_family()?;
    let mut m = Msg::new(family, NBD_CMD_RECONFIGURE, 1);
    m.u32(NBD_ATTR_INDEX, index);
    sockets(&mut m, socket);
    nl.call(&mut m, "NBD_CMD_RECONFIGURE").map(drop)
}

/// Disconnects `/dev/nbd<index>` (it is destroyed once closed).
pub fn disconnect(index: u32) -> Result<(), KernelError> {
    let mut nl = Genl::open()?;
    let family = nl.nbd_family()?;
    let mut m = Msg::new(family, NBD_CMD_DISCONNECT, 1);
    m.u32(NBD_ATTR_INDEX, index);
    nl.call(&mut m, "NBD_CMD_DISCONNECT").map(drop)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn nested_attributes_are_sized_and_read_back() {
        let mut m = Msg::new(33, NBD_CMD_CONNECT, 1);
        m.u64(NBD_ATTR_SIZE_BYTES, 1 << 30)
            .open(NBD_ATTR_SOCKETS)
            .open(NBD_SOCK_ITEM)
            .u32(NBD_SOCK_FD, 7)
            .close()
            .close();
        let b = m.finish(5).to_vec();
        assert_eq!(
            u32::from_ne_bytes(b[..4].try_into().unwrap()) as usize,
            b.len()
        );
        let top = attrs(&b[20..]);
        assert_eq!(top.len(), 2);
        assert_eq!(
            top[0],
            (NBD_ATTR_SIZE_BYTES, &(1u64 << 30).to_ne_bytes()[..])
        );
        assert_eq!(top[1].0, NBD_ATTR_SOCKETS);
        let item = attrs(top[1].1);
        assert_eq!(item[0].0, NBD_SOCK_ITEM);
        assert_eq!(
            attrs(item[0].1),
            vec![(NBD_SOCK_FD, &7u32.to_ne_bytes()[..])]
        );
    }
}
