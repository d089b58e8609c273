//! systemd readiness (`sd_notify`): with `Type=notify`, systemd starts
//! units ordered after `uve-host.service` only once the daemon said
//! `READY=1`, which it does when every listener and the management API are
//! bound. Without `$NOTIFY_SOCKET` (not started by systemd) this does
//! nothing.

use std::os::unix::net::UnixDatagram;

/// Sends one notification (`READY=1`, `STOPPING=1`, `STATUS=...`) to the
/// service manager, if there is one. Failures are logged, never fatal.
pub fn notify(state: &str) {
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
        notify_to(&path, state);
    }
}

/// Sends `state` to the notification socket `path` (`@name` for the
/// abstract namespace).
pub fn notify_to(path: &std::ffi::OsStr, state: &str) {
    let sent = (|| -> std::io::Result<()> {
        let sock = UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            // Abstract socket namespace (systemd's usual choice).
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        } else {
            sock.send_to(state.as_bytes(), path)?;
        }
        Ok(())
    })();
    if let Err(e) = sent {
        tracing::warn!(error = %e, state, "sd_notify failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_reaches_a_notify_socket() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap_or_else(|e| panic!("bind: {e}"));
        notify_to(path.as_os_str(), "READY=1\nSTATUS=listening");
        let mut buf = [0u8; 64];
        let n = sock.recv(&mut buf).unwrap_or_else(|e| panic!("recv: {e}"));
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=listening");
    }
}
