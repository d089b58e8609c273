//! User Image Files in the guest: retrieving a version from the host
//! ([`retrieve`]), uploading a new version ([`update`]) and making the UIF
//! appear to the user ([`materialise`], a directory-mode home packed by
//! [`home_pack`]). The bytes they keep between runs
//! live in the stores beneath: the chunk cache, the spool and the
//! preserved copies ([`crate::stores`]).

pub mod disk_home;
pub mod home_pack;
pub mod materialise;
pub mod retrieve;
pub mod update;

use std::path::Path;

use uve_protocol::link::LinkError;
use uve_protocol::message::WireError;

/// Why a UIF operation failed.
#[derive(Debug, thiserror::Error)]
pub enum UifError {
    /// No connection to the host.
    #[error("the host is not reachable")]
    NotConnected,
    /// The request failed on the link or the host refused it.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The host sent something inconsistent.
    #[error("host sent inconsistent data: {0}")]
    Protocol(String),
    /// A local file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The error.
        source: std::io::Error,
    },
    /// The attach or detach hook failed.
    #[error("hook failed: {0}")]
    Hook(String),
    /// The host no longer knows the upload this link opened: it expired it
    /// (idle too long). The update is started again.
    #[error("the host expired upload {0}")]
    UploadExpired(u64),
    /// The UIF file no longer matches the manifest it was chunked into
    /// (it is still attached and was written to since).
    #[error("the UIF file changed after it was chunked")]
    Changed,
    /// Packing or unpacking a home directory failed.
    #[error(transparent)]
    Archive(#[from] crate::base::archive::ArchiveError),
    /// A profile disk could not be made, checked, served, mounted or
    /// unmounted (disk mode).
    #[error("profile disk: {0}")]
    Disk(String),
    /// A task of the agent's own failed (panicked or was cancelled).
    #[error("agent task failed: {0}")]
    Task(String),
}

impl UifError {
    /// Wraps an i/o error with context.
    pub fn io(context: impl std::fmt::Display, source: std::io::Error) -> Self {
        UifError::Io {
            context: context.to_string(),
            source,
        }
    }

    /// Wraps an i/o error about `path`.
    pub fn at(what: &str, path: &Path, source: std::io::Error) -> Self {
        UifError::io(format!("{what} {}", path.display()), source)
    }

    /// The host's final refusal, if that is why the operation failed
    /// (see [`uve_protocol::message::ErrorCode::is_transient`]).
    pub fn refusal(&self) -> Option<&WireError> {
        match self {
            UifError::Link(e) => e.refusal(),
            _ => None,
        }
    }

    /// True unless the host refused for good: a broken link, a busy host,
    /// a local i/o error or a failed task may all go away, so the update
    /// stays in the spool and is retried.
    pub fn is_transient(&self) -> bool {
        self.refusal().is_none()
    }
}

/// A UIF operation of one user that failed.
#[derive(Debug, thiserror::Error)]
#[error("UIF of {user}: {source}")]
pub struct UserUifError {
    /// Whose UIF.
    pub user: String,
    /// What failed.
    pub source: UifError,
}

/// For `map_err`: a [`UifError`] as a failure of `user`'s UIF.
pub fn uif_err(user: &str) -> impl FnOnce(UifError) -> UserUifError + '_ {
    move |source| UserUifError {
        user: user.to_string(),
        source,
    }
}

/// Runs blocking file work off the runtime thread, so heartbeats keep
/// flowing while a multi-GiB file is hashed or packed.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, UifError> + Send + 'static,
) -> Result<T, UifError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| UifError::Task(format!("blocking task: {e}")))?
}
