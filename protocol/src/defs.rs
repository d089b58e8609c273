//! Protocol constants: ports, versions, size limits and chunking parameters.
//! Kept in one place so the numbers both peers depend on are easy to audit.

/// The vsock CID of the host as seen from a guest (`VMADDR_CID_HOST`).
pub const HOST_CID: u32 = 2;

/// Well-known vsock port the host daemon listens on and the agent dials.
pub const DEFAULT_PORT: u32 = 7075;

/// Oldest protocol version this build speaks.
pub const PROTOCOL_MIN: u16 = 1;

/// Newest protocol version this build speaks.
pub const PROTOCOL_MAX: u16 = 2;

/// First protocol version with sub-chunk block deltas on update
/// (`BlockSignatures`, `ChunkDelta`; see [`crate::delta`]). Neither peer
/// sends them on a connection that negotiated an older version.
pub const PROTOCOL_BLOCK_DELTA: u16 = 2;

/// Block size of a chunk delta: a chunk is compared with its base bytes in
/// blocks of this many bytes, aligned to the file (a chunk's first and last
/// blocks may be shorter).
pub const DELTA_BLOCK: u32 = 4096;

/// Bytes of a block digest: BLAKE3 of the block, truncated. The host
/// checks the full BLAKE3 of every reconstructed chunk, so a digest only
/// has to make a missed change improbable, not impossible.
pub const BLOCK_DIGEST_LEN: usize = 16;

/// Most chunks one `BlockSignatures` request may ask about. The worst-case
/// answer (every chunk `MAX_CHUNK` long and unaligned, 65 digests each:
/// ~134 KB) fits in a frame of the smallest size a peer may negotiate
/// (`MIN_MAX_FRAME`).
pub const MAX_SIGNATURE_BATCH: u32 = 128;

/// Default (and proposed) maximum frame size: 1 MiB.
pub const DEFAULT_MAX_FRAME: u32 = 1 << 20;

/// No peer may negotiate a frame limit below this: a maximum-size chunk plus
/// its request header must always fit in one frame.
pub const MIN_MAX_FRAME: u32 = MAX_CHUNK + 16 * 1024;

/// Hard ceiling for a negotiated frame size (16 MiB). Anything larger would
/// let one peer make the other allocate too much per connection.
pub const MAX_MAX_FRAME: u32 = 16 << 20;

/// FastCDC minimum chunk size (see `chunker` for the measurement behind it).
pub const MIN_CHUNK: u32 = 16 * 1024;

/// FastCDC target average chunk size.
pub const AVG_CHUNK: u32 = 64 * 1024;

/// Block size of profile disks (`disk` mode), which are chunked in fixed
/// blocks rather than by content: a disk's blocks stay in place, and a
/// block's index is its offset ÷ this. Measured (bench/README.md, "Disk
/// blocks"): one session's changes to a 1 GiB ext4 disk touch 1.09× the
/// changed 4 KiB blocks at 64 KiB, 1.41× at 256 KiB and 2.51× at 1 MiB;
/// the block deltas send only the changed 4 KiB inside a block, so the
/// larger block costs little upload and lists 4× fewer entries (and
/// dirty bits) than 64 KiB. The largest a frame carries.
pub const DISK_BLOCK: u32 = MAX_CHUNK;

/// FastCDC maximum chunk size; also the largest chunk a peer may send.
pub const MAX_CHUNK: u32 = 256 * 1024;

/// Default heartbeat interval the host proposes in `Welcome`.
pub const DEFAULT_HEARTBEAT_MS: u32 = 5_000;

/// A peer silent for this many heartbeat intervals is considered dead.
pub const HEARTBEAT_MISSES: u32 = 3;

/// Longest user, session, UA or monitor name accepted on the wire.
pub const MAX_NAME_LEN: usize = 128;

/// Longest free-text field (reasons, messages) accepted on the wire, in
/// bytes (not characters).
pub const MAX_TEXT_LEN: usize = 1024;

/// `text` cut to at most [`MAX_TEXT_LEN`] bytes at a UTF-8 character
/// boundary: what a sender does with free text before it goes on the wire.
pub fn clip_text(text: &str) -> &str {
    let mut end = text.len().min(MAX_TEXT_LEN);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Serialized size of one [`crate::manifest::ChunkRef`] in the worst case
/// (32-byte hash + 5-byte varint length).
pub const CHUNK_REF_MAX_WIRE: u32 = 37;

/// Bytes reserved in a manifest page frame for everything but the chunk refs.
pub const PAGE_OVERHEAD: u32 = 4096;

/// Milliseconds since the Unix epoch, now: the unit of every wall-clock
/// timestamp either peer records (events, versions, spool and session
/// records). 0 if the clock is before 1970.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn clip_text_cuts_by_bytes_at_a_char_boundary() {
        let short = "display closed";
        assert_eq!(super::clip_text(short), short);
        // 'é' is two bytes: 600 of them are 1200 bytes, 1024 is between two.
        let long = "é".repeat(600);
        let clipped = super::clip_text(&long);
        assert_eq!(clipped.len(), super::MAX_TEXT_LEN);
        assert_eq!(clipped.chars().count(), 512);
        let odd = format!("x{long}");
        let clipped = super::clip_text(&odd);
        assert_eq!(clipped.len(), super::MAX_TEXT_LEN - 1);
        assert!(odd.starts_with(clipped));
    }
}
