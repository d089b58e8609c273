//! Hybrid vsock, as Firecracker, Cloud Hypervisor and rust-vmm's
//! vhost-device-vsock expose a guest's vsock on the host:
//!
//! - guest → host port P arrives on the Unix socket `<uds_path>_<P>`, which
//!   must already be listening ([`listen_path`]);
//! - host → guest: connect to `<uds_path>`, write `CONNECT <port>\n`, read
//!   one line `OK <n>\n` ([`connect`]). `<n>` differs between vendors (a
//!   host port for Firecracker, the guest port for vhost-device-vsock), so
//!   only the `OK ` prefix is checked. The line is read byte by byte so
//!   payload the guest sends right after it is never swallowed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::TransportError;

/// Longest acknowledgement line accepted from a muxer.
const MAX_ACK_LINE: usize = 64;

/// The host-side socket path on which guest connections to `port` arrive.
pub fn listen_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut s = uds_path.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Host-initiated connection to guest port `port` through the VMM's hybrid
/// vsock socket. Each step (connect, send, acknowledgement) is bounded by
/// `limit`.
pub async fn connect(
    uds_path: &Path,
    port: u32,
    limit: Duration,
) -> Result<UnixStream, TransportError> {
    let mut s = super::unix::connect(uds_path, limit).await?;
    let line = format!("CONNECT {port}\n");
    tokio::time::timeout(limit, s.write_all(line.as_bytes()))
        .await
        .map_err(|_| TransportError::Timeout {
            step: "hybrid CONNECT write",
            limit,
        })?
        .map_err(|e| TransportError::io("write CONNECT", e))?;
    let ack = tokio::time::timeout(limit, read_line(&mut s))
        .await
        .map_err(|_| TransportError::Timeout {
            step: "hybrid CONNECT acknowledgement",
            limit,
        })??;
    if !ack.starts_with("OK ") {
        return Err(TransportError::Refused(format!("muxer answered {ack:?}")));
    }
    Ok(s)
}

/// Reads one `\n`-terminated line, one byte at a time.
async fn read_line(s: &mut UnixStream) -> Result<String, TransportError> {
    let mut line = Vec::with_capacity(16);
    loop {
        let mut b = [0u8; 1];
        let n = s
            .read(&mut b)
            .await
            .map_err(|e| TransportError::io("read CONNECT acknowledgement", e))?;
        if n == 0 {
            return Err(TransportError::Refused(
                "muxer closed the connection (no listener on that guest port?)".into(),
            ));
        }
        if b[0] == b'\n' {
            break;
        }
        if line.len() >= MAX_ACK_LINE {
            return Err(TransportError::Refused(
                "acknowledgement line too long".into(),
            ));
        }
        line.push(b[0]);
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::tests::read_expect;
    use crate::transport::{Endpoint, Listener, Peer, dial};
    use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite};

    /// A minimal fake VMM muxer: accepts on `uds`, reads the CONNECT line and
    /// answers with `reply`, then (if `payload`) sends payload bytes in the
    /// same write as the ack and echoes what it reads.
    async fn fake_muxer(
        listener: tokio::net::UnixListener,
        reply: &'static str,
        payload: bool,
    ) -> Option<String> {
        let (s, _) = listener.accept().await.expect("accept");
        let mut r = tokio::io::BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).await.expect("read line");
        let mut s = r.into_inner();
        if reply.is_empty() {
            return Some(line);
        }
        let mut out = reply.as_bytes().to_vec();
        if payload {
            out.extend_from_slice(b"GUEST-FIRST");
        }
        s.write_all(&out).await.expect("write");
        let mut buf = [0u8; 4];
        if payload && s.read_exact(&mut buf).await.is_ok() {
            s.write_all(&buf).await.expect("echo");
        }
        Some(line)
    }

    #[test]
    fn listen_path_appends_port() {
        assert_eq!(
            listen_path(Path::new("/run/vm1/v.sock"), 7075),
            PathBuf::from("/run/vm1/v.sock_7075")
        );
    }

    /// A [`fake_muxer`] answering `reply` on `<dir>/<name>`: the socket
    /// path and the muxer's task.
    fn muxer(
        dir: &Path,
        name: &str,
        reply: &'static str,
        payload: bool,
    ) -> (PathBuf, tokio::task::JoinHandle<Option<String>>) {
        let uds = dir.join(name);
        let l = tokio::net::UnixListener::bind(&uds).expect("bind");
        (uds, tokio::spawn(fake_muxer(l, reply, payload)))
    }

    /// The muxer's payload arrives first, then `ping` is echoed back.
    async fn payload_then_echo(s: &mut (impl AsyncRead + AsyncWrite + Unpin), ping: &[u8]) {
        read_expect(s, b"GUEST-FIRST", "payload after OK line was swallowed").await;
        s.write_all(ping).await.expect("write");
        read_expect(s, ping, "echo").await;
    }

    #[tokio::test]
    async fn connect_sends_line_and_keeps_payload_after_ok() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (uds, mux) = muxer(dir.path(), "v.sock", "OK 1073741824\n", true);
        let mut s = connect(&uds, 52, Duration::from_secs(2))
            .await
            .expect("connect");
        payload_then_echo(&mut s, b"ping").await;
        assert_eq!(mux.await.expect("join").as_deref(), Some("CONNECT 52\n"));
    }

    #[tokio::test]
    async fn refused_when_muxer_closes_or_says_no() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (uds, mux) = muxer(dir.path(), "v.sock", "", false);
        let err = connect(&uds, 9, Duration::from_secs(2))
            .await
            .expect_err("closed");
        assert!(matches!(err, TransportError::Refused(_)), "{err}");
        mux.await.expect("join");

        let (uds2, mux) = muxer(dir.path(), "w.sock", "ERR no listener\n", false);
        let err = connect(&uds2, 9, Duration::from_secs(2))
            .await
            .expect_err("refused");
        assert!(err.to_string().contains("ERR no listener"), "{err}");
        mux.await.expect("join");
    }

    #[tokio::test]
    async fn silent_muxer_times_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let uds = dir.path().join("v.sock");
        let l = tokio::net::UnixListener::bind(&uds).expect("bind");
        let hold = tokio::spawn(async move {
            let (s, _) = l.accept().await.expect("accept");
            tokio::time::sleep(Duration::from_secs(3)).await;
            drop(s);
        });
        let err = connect(&uds, 9, Duration::from_millis(200))
            .await
            .expect_err("timeout");
        assert!(
            matches!(
                err,
                TransportError::Timeout {
                    step: "hybrid CONNECT acknowledgement",
                    ..
                }
            ),
            "{err}"
        );
        hold.abort();
    }

    #[tokio::test]
    async fn hybrid_dial_endpoint_goes_through_muxer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (uds, mux) = muxer(dir.path(), "v.sock", "OK 52\n", true);
        let ep: Endpoint = format!("hybrid:{}:52", uds.display())
            .parse()
            .expect("parse");
        let mut s = dial(&ep, Duration::from_secs(2)).await.expect("dial");
        payload_then_echo(&mut s, b"abcd").await;
        mux.await.expect("join");
    }

    /// Guest-initiated direction: the VMM connects to `<uds>_<port>`; the
    /// host's listener reports which socket the connection came through.
    #[tokio::test]
    async fn guest_initiated_connection_arrives_on_port_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let uds = dir.path().join("v.sock");
        let path = listen_path(&uds, 7075);
        let listener = Listener::bind(&Endpoint::Unix(path.clone())).expect("bind");
        let vmm = tokio::spawn({
            let path = path.clone();
            async move {
                let mut s = dial(&Endpoint::Unix(path), Duration::from_secs(2))
                    .await
                    .expect("dial");
                s.write_all(b"hello").await.expect("write");
            }
        });
        let (mut s, peer) = listener.accept().await.expect("accept");
        assert_eq!(peer, Peer::Unix { path: path.clone() });
        read_expect(&mut s, b"hello", "read").await;
        vmm.await.expect("join");
        drop(listener);
        assert!(!path.exists(), "listener must remove its socket file");
    }
}
