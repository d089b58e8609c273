//! The real Ceph RGW of the S3 store tests ([`uve_e2e::rgw::Rgw`]) and the
//! store configuration pointing at it.

pub use uve_e2e::rgw::Rgw;
use uve_host::config::{Config, S3Config};

/// Store configuration for keys under `prefix` of the RGW's test bucket,
/// read from the same `[s3]` section a `uve-host` process is given.
pub fn config(rgw: &Rgw, prefix: &str) -> S3Config {
    Config::parse(&rgw.toml(prefix))
        .expect("the RGW's [s3] section parses")
        .s3
        .expect("an [s3] section")
}
