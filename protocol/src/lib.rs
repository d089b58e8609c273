//! # uve-protocol
//!
//! Everything both ends of a uve connection must agree on, and nothing more:
//!
//! - [`message`]: the wire types of UVE-5 (guest → host) and UVE-2
//!   (host → guest), the handshake and the typed error codes;
//! - [`codec`]: `u32` little-endian length + postcard framing with a hard
//!   per-frame size limit;
//! - [`manifest`] and [`chunker`]: the content-addressed UIF model (FastCDC
//!   chunk boundaries, BLAKE3 hashes, paged manifests);
//! - [`delta`]: sub-chunk block deltas of an update (protocol 2):
//!   file-aligned blocks, digests, diff, rebuild, base ranges;
//! - [`names`]: validation of user, session and UA names received from peers;
//! - [`link`]: the multiplexed request/response connection loop shared by
//!   the host daemon and the guest agent (heartbeats, control/bulk priority);
//! - [`transport`]: AF_VSOCK, hybrid vsock and Unix socket listeners/dialers.
//!
//! Store policy, sessions and files of either daemon live in `uve-host` and
//! `uve-agent`, never here. The wire format is documented in `WIRE.md` and
//! pinned by golden byte vectors in `tests/golden.rs`.

pub mod chunker;
pub mod codec;
pub mod defs;
pub mod delta;
pub mod handshake;
pub mod link;
pub mod manifest;
pub mod message;
pub mod names;
pub mod testdata;
pub mod transport;

pub use codec::{FrameCodec, FrameError};
pub use manifest::{ChunkRef, Hash, Manifest, ManifestHeader};
pub use message::{ErrorCode, Frame, Request, Response, WireError};
