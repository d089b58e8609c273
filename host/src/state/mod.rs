//! The daemon's own state beside the store: the VM registry and
//! assignments ([`registry`]), writer leases ([`leases`]), VM switch
//! hand-overs ([`handover`]), each VM's live agent link ([`conns`]), the
//! sessions the agents report ([`sessions`]), operator events ([`events`])
//! and Prometheus counters ([`metrics`]). The registry and the lease table
//! are written to disk by one writer each ([`table`]).

pub mod conns;
pub mod events;
pub mod handover;
pub mod leases;
pub mod metrics;
pub mod registry;
pub mod sessions;
pub mod table;
