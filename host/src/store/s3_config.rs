//! The S3 store's settings (`[s3]` in `host.toml`): part of the store
//! layer, so the configuration depends on the store and never the other
//! way round. Present with or without the `s3` feature, like the
//! configuration that holds it.

use serde::Deserialize;

/// Where the S3 store lives and how to reach it (`[s3]` in `host.toml`).
/// Unset fields fall back to the usual AWS environment variables
/// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
/// `AWS_REGION`/`AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Config {
    /// Endpoint URL, e.g. `https://s3.dc1.example:443` or
    /// `http://127.0.0.1:7480`. Default: AWS for the region.
    pub endpoint: Option<String>,
    /// Region. Default: from the environment, else `us-east-1`.
    pub region: Option<String>,
    /// Bucket (must exist). Required.
    pub bucket: String,
    /// Key prefix inside the bucket, so several stores can share a bucket.
    /// Default: none.
    pub prefix: String,
    /// Access key id. Default: from the environment.
    pub access_key_id: Option<String>,
    /// Secret access key. Default: from the environment.
    pub secret_access_key: Option<String>,
    /// Session token. Default: from the environment.
    pub session_token: Option<String>,
    /// Allow plain HTTP. Default: true exactly when `endpoint` is `http://`.
    pub allow_http: Option<bool>,
    /// S3 requests one store operation runs at once (existence checks,
    /// GC). Default 32.
    pub concurrency: Option<usize>,
}
