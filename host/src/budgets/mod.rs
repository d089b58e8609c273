//! What one VM may make the host spend, each with its budget: connections
//! in the handshake ([`gate`]), bulk store work ([`bulk`]), staged upload
//! bytes ([`staging`]) and updates that can only become conflict versions
//! ([`conflict_rate`]).

pub mod bulk;
pub mod conflict_rate;
pub mod gate;
pub mod staging;
