//! The transmission phase: requests in, simple replies out, one at a time
//! and in order, against a [`BlockDevice`]. Memory is bounded by the one
//! payload buffer the caller hands in (the export's `max_payload`); the
//! serving path allocates nothing per request.
//!
//! Answers: a read or write past the end is `EINVAL` (read) or `ENOSPC`
//! (write, trim, write zeroes); a payload above the maximum is `EINVAL`
//! (a write's payload is read and dropped first, so the stream stays in
//! step); an unknown command or flag is `EINVAL`; a write to a read-only
//! export is `EPERM`; a failing disk is `EIO` (`ENOSPC` when the backing
//! filesystem is full). A wrong magic or a header cut short ends the
//! connection: the stream cannot be trusted after it.

use std::io::{self, Read, Write};

use super::NbdError;
use super::wire::{self, Incoming, Request, cflag, cmd, errno};
use crate::disk::device::BlockDevice;

/// How a connection's transmission ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The client sent `NBD_CMD_DISC`.
    Disconnected,
    /// The client closed the connection between two requests.
    Closed,
}

/// What one request's answer is.
enum Answer {
    /// Success; a read's data is in the buffer's first `n` bytes.
    Ok(usize),
    /// An error number.
    Err(u32),
}

fn io_errno(e: &io::Error) -> u32 {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        errno::ENOSPC
    } else {
        errno::EIO
    }
}

/// Is `[offset, offset + len)` inside a disk of `size` bytes?
fn inside(offset: u64, len: u64, size: u64) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= size)
}

/// Reads and drops `len` payload bytes through `buf`.
fn drain(s: &mut impl Read, mut len: u64, buf: &mut [u8]) -> io::Result<()> {
    while len > 0 {
        let n = usize::try_from(len).unwrap_or(usize::MAX).min(buf.len());
        s.read_exact(&mut buf[..n])?;
        len -= n as u64;
    }
    Ok(())
}

/// Serves requests on `s` until the client disconnects. `buf` is the
/// payload buffer; its length is the largest payload served.
pub fn serve(
    s: &mut (impl Read + Write),
    dev: &dyn BlockDevice,
    read_only: bool,
    buf: &mut [u8],
) -> Result<Ended, NbdError> {
    loop {
        let req = match wire::read_request(s)? {
            Incoming::Request(r) => r,
            Incoming::Closed => return Ok(Ended::Closed),
        };
        if req.command == cmd::DISC {
            return Ok(Ended::Disconnected);
        }
        let answer = answer(s, dev, read_only, buf, &req)?;
        match answer {
            Answer::Ok(n) => {
                s.write_all(&wire::simple_reply(0, req.cookie))?;
                if n > 0 {
                    s.write_all(&buf[..n])?;
                }
            }
            Answer::Err(e) => {
                tracing::debug!(?req, errno = e, "NBD request refused");
                s.write_all(&wire::simple_reply(e, req.cookie))?;
            }
        }
    }
}

/// Carries out one request (reading a write's payload from `s`).
fn answer(
    s: &mut impl Read,
    dev: &dyn BlockDevice,
    read_only: bool,
    buf: &mut [u8],
    req: &Request,
) -> Result<Answer, NbdError> {
    let len = u64::from(req.length);
    let fits = usize::try_from(req.length).is_ok_and(|n| n <= buf.len());
    let known_flags = match req.command {
        cmd::WRITE_ZEROES => cflag::FUA | cflag::NO_HOLE,
        _ => cflag::FUA,
    };
    if req.command == cmd::WRITE {
        // The payload comes whatever the answer: read it first.
        if !fits {
            drain(s, len, buf)?;
            return Ok(Answer::Err(errno::EINVAL));
        }
        s.read_exact(&mut buf[..req.length as usize])?;
    }
    if req.flags & !known_flags != 0 {
        return Ok(Answer::Err(errno::EINVAL));
    }
    let writes = matches!(req.command, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
    if writes && read_only {
        return Ok(Answer::Err(errno::EPERM));
    }
    if writes && (len == 0 || !inside(req.offset, len, dev.size())) {
        return Ok(Answer::Err(if len == 0 {
            errno::EINVAL
        } else {
            errno::ENOSPC
        }));
    }
    let done = match req.command {
        cmd::READ => {
            if len == 0 || !fits || !inside(req.offset, len, dev.size()) {
                return Ok(Answer::Err(errno::EINVAL));
            }
            let n = req.length as usize;
            return Ok(match dev.read_at(&mut buf[..n], req.offset) {
                Ok(()) => Answer::Ok(n),
                Err(e) => {
                    tracing::warn!(offset = req.offset, len, "NBD read failed: {e}");
                    Answer::Err(io_errno(&e))
                }
            });
        }
        cmd::WRITE => dev.write_at(&buf[..req.length as usize], req.offset),
        cmd::FLUSH => dev.flush(),
        cmd::TRIM => dev.discard(req.offset, len),
        cmd::WRITE_ZEROES => dev.write_zeroes(req.offset, len, req.flags & cflag::NO_HOLE != 0),
        _ => return Ok(Answer::Err(errno::EINVAL)),
    };
    let durable = match done {
        Ok(()) if req.flags & cflag::FUA != 0 && req.command != cmd::FLUSH => dev.flush(),
        other => other,
    };
    Ok(match durable {
        Ok(()) => Answer::Ok(0),
        Err(e) => {
            tracing::warn!(
                command = req.command,
                offset = req.offset,
                len,
                "NBD request failed: {e}"
            );
            Answer::Err(io_errno(&e))
        }
    })
}
