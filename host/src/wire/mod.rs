//! The agents' side of the host: [`server`] accepts connections on every
//! listener, handshakes and binds each to the VM its listener names;
//! [`conns`] keeps each VM's live link; [`dispatch`] hands a VM's requests
//! to the UVE-5 handlers ([`uve5`]); [`uve2`] sends the host's requests to
//! an agent, the VM switch among them.

pub mod conns;
pub mod dispatch;
pub mod server;
pub mod uve2;
pub mod uve5;
