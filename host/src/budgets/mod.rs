//! What one VM may make the host spend, each with its budget: connections
//! in the handshake ([`gate`]), bulk store work ([`bulk`]), staged upload
//! bytes ([`staging`]), updates that can only become conflict versions
//! ([`conflict_rate`]), the quota charge of uploads in flight
//! ([`quota_charges`]), control requests per second ([`request_rate`])
//! and notices and new sessions per minute ([`rate`]), the pace of VMs
//! moving bulk bytes heavily while others work ([`heavy`]); and how reaching
//! one is reported ([`report`]: a metric and a rate-limited
//! `budget_exceeded` event). Two mechanisms are shared: the token bucket
//! ([`bucket`]) and per-VM amounts that fade ([`fading`]).

pub mod bucket;
pub mod bulk;
pub mod conflict_rate;
pub mod fading;
pub mod gate;
pub mod heavy;
pub mod quota_charges;
pub mod rate;
pub mod report;
pub mod request_rate;
pub mod staging;
