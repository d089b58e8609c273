//! The management API: HTTP/JSON on a Unix socket (axum). Routes are
//! grouped by resource in the submodules; every handler maps domain errors
//! to a status and a JSON body `{"error": code, "message": text}`.
//! The contract is the types of `types`, documented in `host/API.md` and
//! `host/openapi.json`.

mod agent_ops;
pub mod client;
pub mod extract;
mod feed;
#[cfg(test)]
mod openapi_check;
mod quota;
pub mod routes;
mod spool;
pub mod types;
mod users;
mod vms;

use std::path::PathBuf;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::response::{IntoResponse, Response};
use tokio_util::sync::CancellationToken;
use uve_protocol::message::ErrorCode;

use self::types::{ApiErrorCode, ErrorBody};
use crate::host::Host;
use crate::state::registry::RegistryError;
use crate::store::StoreError;
use crate::wire::server::VmListeners;
use crate::wire::uve2::Uve2Error;

/// An API error: its code (which decides the status) and message,
/// answered as [`ErrorBody`].
#[derive(Debug)]
pub struct ApiError {
    code: ApiErrorCode,
    message: String,
}

impl ApiError {
    /// A new error.
    pub fn new(code: ApiErrorCode, message: impl std::fmt::Display) -> Self {
        ApiError {
            code,
            message: message.to_string(),
        }
    }

    /// 400.
    pub fn bad_request(message: impl std::fmt::Display) -> Self {
        Self::new(ApiErrorCode::BadRequest, message)
    }

    /// 404.
    pub fn not_found(message: impl std::fmt::Display) -> Self {
        Self::new(ApiErrorCode::NotFound, message)
    }

    /// 500.
    pub fn internal(message: impl std::fmt::Display) -> Self {
        Self::new(ApiErrorCode::Internal, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.code,
            message: self.message,
        };
        (self.code.status(), Json(body)).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::InvalidName(_) => Self::new(ApiErrorCode::InvalidName, e),
            StoreError::NoSuchVersion { .. } => Self::not_found(e),
            StoreError::MissingChunk(_)
            | StoreError::BadChunk(_)
            | StoreError::BadManifest(_)
            | StoreError::Unsupported(_) => Self::bad_request(e),
            StoreError::QuotaExceeded { .. } => Self::new(ApiErrorCode::QuotaExceeded, e),
            StoreError::HeadVersion { .. } => Self::new(ApiErrorCode::Conflict, e),
            StoreError::Contended { .. } | StoreError::Busy(_) => {
                Self::new(ApiErrorCode::Contended, e)
            }
            StoreError::Remote { .. } => Self::new(ApiErrorCode::StoreUnavailable, e),
            StoreError::Corrupt { .. } | StoreError::Io { .. } | StoreError::UnsafeStore(_) => {
                Self::internal(e)
            }
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match &e {
            RegistryError::InvalidName(_) => Self::new(ApiErrorCode::InvalidName, e),
            RegistryError::BadTransport
            | RegistryError::EmptyPath(_)
            | RegistryError::ReservedCid { .. } => Self::bad_request(e),
            RegistryError::Duplicate(_) => Self::new(ApiErrorCode::Conflict, e),
            RegistryError::NoSuchVm(_) | RegistryError::NotAssigned(_) => Self::not_found(e),
            RegistryError::Io(_) => Self::internal(e),
        }
    }
}

impl From<Uve2Error> for ApiError {
    fn from(e: Uve2Error) -> Self {
        match &e {
            Uve2Error::NotConnected(_) => Self::new(ApiErrorCode::VmNotConnected, e),
            Uve2Error::Timeout => Self::new(ApiErrorCode::Timeout, e),
            Uve2Error::Agent(w) => match w.code {
                ErrorCode::NotFound => Self::not_found(e),
                ErrorCode::UaInUse | ErrorCode::Busy => Self::new(ApiErrorCode::Conflict, e),
                ErrorCode::InvalidName
                | ErrorCode::BadRequest
                | ErrorCode::BundleRejected
                | ErrorCode::BadDigest => Self::new(ApiErrorCode::AgentRefused, e),
                _ => Self::new(ApiErrorCode::AgentError, e),
            },
            Uve2Error::Link(_) | Uve2Error::Unexpected(_) => Self::new(ApiErrorCode::AgentError, e),
            Uve2Error::Bundle(_) => Self::internal(e),
        }
    }
}

/// Result of a handler.
pub type ApiResult<T> = Result<T, ApiError>;

/// A name from a URL or body as its newtype (`UserName`, `SessionId`,
/// `UaName`, `UaVersion`): an invalid one is 400 `invalid_name`.
pub fn name<T>(raw: &str) -> ApiResult<T>
where
    T: for<'a> TryFrom<&'a str, Error = uve_protocol::names::NameError>,
{
    T::try_from(raw).map_err(|e| ApiError::new(ApiErrorCode::InvalidName, e))
}

/// Validates a name that has no newtype (a VM id) from a URL or body: an
/// invalid one is 400 `invalid_name`.
pub fn check_name(kind: &'static str, name: &str) -> ApiResult<()> {
    uve_protocol::names::validate(kind, name)
        .map_err(|e| ApiError::new(ApiErrorCode::InvalidName, e))
}

/// What the API handlers share: the host state and the listeners (the
/// daemon builds it; the handlers receive it as axum state).
pub struct ApiState {
    /// Shared state.
    pub host: Arc<Host>,
    /// Per-VM listeners.
    pub listeners: VmListeners,
}

/// The API router (the routes of [`routes::routes`]).
pub fn router(daemon: Arc<ApiState>) -> Router {
    routes::routes().into_router().with_state(daemon)
}

/// Binds the API's Unix socket at `path` (creating its directory).
pub fn bind(path: &std::path::Path) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = uve_protocol::transport::bind_unix(path)?;
    tracing::info!(path = %path.display(), "management API listening");
    Ok(listener)
}

/// Serves the API on `listener` (bound at `path`) until `stop` is cancelled.
pub async fn serve(
    daemon: Arc<ApiState>,
    listener: tokio::net::UnixListener,
    path: PathBuf,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let path = path.as_path();
    let app = router(daemon);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await?;
    let _ = std::fs::remove_file(path);
    Ok(())
}
