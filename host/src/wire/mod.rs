//! The agents' side of the host: [`server`] accepts connections on every
//! listener, handshakes and binds each to the VM its listener names
//! (keeping each VM's live link in `state::conns`); [`dispatch`] hands a VM's requests
//! to the UVE-5 handlers ([`uve5`]); [`uve2`] sends the host's requests to
//! an agent, the VM switch among them.

pub mod dispatch;
pub mod server;
pub mod uve2;
pub mod uve5;
