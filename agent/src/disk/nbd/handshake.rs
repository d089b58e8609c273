//! The fixed-newstyle handshake: the greeting, the client's flags, then
//! options until one starts transmission (`NBD_OPT_GO` or
//! `NBD_OPT_EXPORT_NAME`) or the client aborts. Bounded: at most
//! [`MAX_OPTIONS`] options of at most [`MAX_OPTION_LEN`] bytes each (the
//! caller bounds the time). Options this server does not implement
//! (structured replies, meta contexts, TLS) are answered "unsupported", so
//! clients fall back to simple replies.

use std::io::{Read, Write};

use super::NbdError;
use super::wire::{self, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, NBDMAGIC, info, opt, rep};

/// Options one handshake may send before the server gives up.
pub const MAX_OPTIONS: usize = 64;
/// Largest option payload read (an export name is at most 4 KiB).
pub const MAX_OPTION_LEN: u32 = 8 * 1024;

/// What the client is offered.
pub struct Offer<'a> {
    /// The export's name (the empty name means it too).
    pub name: &'a str,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`wire::tflag`).
    pub flags: u16,
    /// Largest read or write payload served.
    pub max_payload: u32,
}

/// How the handshake ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Transmission starts.
    Transmit,
    /// The client sent `NBD_OPT_ABORT`.
    Aborted,
}

fn read_u32(r: &mut impl Read) -> Result<u32, NbdError> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> Result<u64, NbdError> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

impl Offer<'_> {
    fn names(&self, asked: &[u8]) -> bool {
        asked.is_empty() || asked == self.name.as_bytes()
    }

    fn export_info(&self) -> Vec<u8> {
        let mut d = Vec::with_capacity(12);
        d.extend_from_slice(&info::EXPORT.to_be_bytes());
        d.extend_from_slice(&self.size.to_be_bytes());
        d.extend_from_slice(&self.flags.to_be_bytes());
        d
    }

    fn block_size_info(&self) -> Vec<u8> {
        let mut d = Vec::with_capacity(14);
        d.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        // Any alignment is served; 4 KiB is the filesystem's block.
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&4096u32.to_be_bytes());
        d.extend_from_slice(&self.max_payload.to_be_bytes());
        d
    }
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO`: answers it; `Ok(true)` when the export
/// was described (so `GO` starts transmission).
fn info_or_go(
    s: &mut (impl Read + Write),
    offer: &Offer,
    option: u32,
    data: &[u8],
) -> Result<bool, NbdError> {
    let parsed = (|| {
        let name_len = usize::try_from(u32::from_be_bytes(data.get(..4)?.try_into().ok()?)).ok()?;
        let name = data.get(4..4 + name_len)?;
        let at = 4 + name_len;
        let n = usize::from(u16::from_be_bytes(data.get(at..at + 2)?.try_into().ok()?));
        (data.len() == at + 2 + 2 * n).then_some(name)
    })();
    let Some(name) = parsed else {
        wire::option_reply(s, option, rep::ERR_INVALID, b"malformed INFO/GO request")?;
        return Ok(false);
    };
    if !offer.names(name) {
        let msg = format!("no export named {:?}", String::from_utf8_lossy(name));
        wire::option_reply(s, option, rep::ERR_UNKNOWN, msg.as_bytes())?;
        return Ok(false);
    }
    wire::option_reply(s, option, rep::INFO, &offer.export_info())?;
    wire::option_reply(s, option, rep::INFO, &offer.block_size_info())?;
    wire::option_reply(s, option, rep::ACK, &[])?;
    Ok(true)
}

/// Runs the handshake on `s` for `offer`.
pub fn negotiate(s: &mut (impl Read + Write), offer: &Offer) -> Result<Outcome, NbdError> {
    let mut greeting = [0u8; 18];
    greeting[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    greeting[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    greeting[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&greeting)?;
    let client = read_u32(s)?;
    if client & u32::from(FLAG_FIXED_NEWSTYLE) == 0 || client & !3 != 0 {
        return Err(NbdError::Protocol(format!(
            "client flags {client:#x}: fixed newstyle is required and no other flag is known"
        )));
    }
    let no_zeroes = client & u32::from(FLAG_NO_ZEROES) != 0;
    for _ in 0..MAX_OPTIONS {
        let magic = read_u64(s)?;
        if magic != IHAVEOPT {
            return Err(NbdError::Protocol(format!("option magic {magic:#x}")));
        }
        let option = read_u32(s)?;
        let len = read_u32(s)?;
        if len > MAX_OPTION_LEN {
            return Err(NbdError::Protocol(format!(
                "option {option} of {len} bytes (at most {MAX_OPTION_LEN})"
            )));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        match option {
            opt::EXPORT_NAME => {
                if !offer.names(&data) {
                    return Err(NbdError::Protocol(format!(
                        "no export named {:?}",
                        String::from_utf8_lossy(&data)
                    )));
                }
                let mut reply = Vec::with_capacity(10 + 124);
                reply.extend_from_slice(&offer.size.to_be_bytes());
                reply.extend_from_slice(&offer.flags.to_be_bytes());
                if !no_zeroes {
                    reply.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&reply)?;
                return Ok(Outcome::Transmit);
            }
            opt::ABORT => {
                // The client may already have gone; the answer is a courtesy.
                let _ = wire::option_reply(s, option, rep::ACK, &[]);
                return Ok(Outcome::Aborted);
            }
            opt::LIST if data.is_empty() => {
                let name = offer.name.as_bytes();
                let mut d = Vec::with_capacity(4 + name.len());
                let name_len = u32::try_from(name.len()).unwrap_or(u32::MAX);
                d.extend_from_slice(&name_len.to_be_bytes());
                d.extend_from_slice(name);
                wire::option_reply(s, option, rep::SERVER, &d)?;
                wire::option_reply(s, option, rep::ACK, &[])?;
            }
            opt::LIST => wire::option_reply(s, option, rep::ERR_INVALID, b"LIST takes no data")?,
            opt::INFO => {
                info_or_go(s, offer, option, &data)?;
            }
            opt::GO => {
                if info_or_go(s, offer, option, &data)? {
                    return Ok(Outcome::Transmit);
                }
            }
            _ => wire::option_reply(s, option, rep::ERR_UNSUP, b"not supported by uve-agent")?,
        }
    }
    Err(NbdError::Protocol(format!(
        "more than {MAX_OPTIONS} options in one handshake"
    )))
}
