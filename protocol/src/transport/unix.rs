//! Plain Unix sockets: binding over stale socket files safely, and dialling
//! with a time limit.

use std::path::Path;
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};

use super::TransportError;

/// Binds a Unix listener at `path`. A leftover socket file from a dead
/// process is replaced; a path with a live listener, or a path that is not
/// a socket, is refused (never deleted).
pub fn bind_unix(path: &Path) -> Result<UnixListener, TransportError> {
    match UnixListener::bind(path) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            use std::os::unix::fs::FileTypeExt;
            let meta = std::fs::symlink_metadata(path)
                .map_err(|e| TransportError::io(format!("stat {}", path.display()), e))?;
            if !meta.file_type().is_socket() {
                return Err(TransportError::io(
                    format!("{} exists and is not a socket", path.display()),
                    e,
                ));
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(TransportError::io(
                    format!("another process is listening on {}", path.display()),
                    e,
                ));
            }
            std::fs::remove_file(path)
                .map_err(|e| TransportError::io(format!("remove stale {}", path.display()), e))?;
            UnixListener::bind(path)
                .map_err(|e| TransportError::io(format!("bind {}", path.display()), e))
        }
        Err(e) => Err(TransportError::io(format!("bind {}", path.display()), e)),
    }
}

/// Connects to a Unix socket within `limit`.
pub async fn connect(path: &Path, limit: Duration) -> Result<UnixStream, TransportError> {
    tokio::time::timeout(limit, UnixStream::connect(path))
        .await
        .map_err(|_| TransportError::Timeout {
            step: "unix connect",
            limit,
        })?
        .map_err(|e| TransportError::io(format!("connect {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::tests::read_expect;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn stale_socket_is_replaced_live_one_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        let first = bind_unix(&path).expect("bind");
        // live listener: refused
        let err = bind_unix(&path).expect_err("live");
        assert!(
            err.to_string().contains("another process is listening"),
            "{err}"
        );
        drop(first); // tokio does not unlink: the file is now stale
        assert!(path.exists());
        let l = bind_unix(&path).expect("rebind over stale socket");
        let accept = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            s.write_all(b"hi").await.expect("write");
        });
        let mut c = connect(&path, Duration::from_secs(2))
            .await
            .expect("connect");
        read_expect(&mut c, b"hi", "read").await;
        accept.await.expect("join");
    }

    #[tokio::test]
    async fn regular_file_is_never_deleted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("important");
        std::fs::write(&path, b"data").expect("write");
        assert!(bind_unix(&path).is_err());
        assert_eq!(std::fs::read(&path).expect("still there"), b"data");
    }
}
