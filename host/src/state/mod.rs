//! The daemon's own state beside the store: the VM registry and
//! assignments ([`registry`]), writer leases ([`leases`]), the sessions the
//! agents report ([`sessions`]), operator events ([`events`]) and
//! Prometheus counters ([`metrics`]).

pub mod events;
pub mod leases;
pub mod metrics;
pub mod registry;
pub mod sessions;
