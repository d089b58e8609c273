//! What one VM may make the host spend, each with its budget: connections
//! in the handshake ([`gate`]), bulk store work ([`bulk`]), staged upload
//! bytes ([`staging`]), updates that can only become conflict versions
//! ([`conflict_rate`]) and the quota charge of uploads in flight
//! ([`quota_charges`]).

pub mod bulk;
pub mod conflict_rate;
pub mod gate;
pub mod quota_charges;
pub mod staging;
