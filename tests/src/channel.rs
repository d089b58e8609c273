//! The command channel between the test harness (host side) and the
//! `e2e-guest` server inside a QEMU guest. One request per connection,
//! reached through the VMM's hybrid-vsock socket with `CONNECT <port>`.
//!
//! Request:  op u8, then op-specific fields, each `u32 LE length + bytes`.
//!   - `OP_SH`  (1): a shell command → exit code + combined stdout/stderr
//!   - `OP_PUT` (2): path, bytes     → exit code 0 once written and fsynced
//!   - `OP_GET` (3): path            → exit code 0 + bytes, or 1 if missing
//!
//! Response: exit code i32 LE, then `u32 LE length + output bytes`.

use std::io::{self, Read, Write};

/// Port the guest command server listens on.
pub const GUEST_PORT: u32 = 9000;
/// Run a shell command.
pub const OP_SH: u8 = 1;
/// Write a file.
pub const OP_PUT: u8 = 2;
/// Read a file.
pub const OP_GET: u8 = 3;
/// Largest field either side accepts (a UIF in a VM test is a few MiB).
pub const MAX_FIELD: u32 = 256 << 20;

/// Writes one length-prefixed field.
pub fn put_field(w: &mut impl Write, data: &[u8]) -> io::Result<()> {
    let len = u32::try_from(data.len()).map_err(|_| io::Error::other("field too large"))?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(data)
}

/// Reads one length-prefixed field (bounded by [`MAX_FIELD`]).
pub fn get_field(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len);
    if len > MAX_FIELD {
        return Err(io::Error::other(format!(
            "field of {len} bytes exceeds {MAX_FIELD}"
        )));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

/// Writes a response.
pub fn put_response(w: &mut impl Write, code: i32, output: &[u8]) -> io::Result<()> {
    w.write_all(&code.to_le_bytes())?;
    put_field(w, output)?;
    w.flush()
}

/// Reads a response.
pub fn get_response(r: &mut impl Read) -> io::Result<(i32, Vec<u8>)> {
    let mut code = [0u8; 4];
    r.read_exact(&mut code)?;
    Ok((i32::from_le_bytes(code), get_field(r)?))
}
