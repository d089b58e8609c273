//! Kernel AF_VSOCK through `tokio-vsock`. Only ever bound or dialled inside
//! guests or on real hypervisors: the development machines' own vsock
//! device belongs to their infrastructure, so tests here cover address
//! handling only (see the parent module's tests).

use std::time::Duration;

use tokio_vsock::{VsockAddr, VsockListener, VsockStream};

use super::{BoxStream, Listener, Peer, TransportError};

pub(super) fn bind(cid: u32, port: u32) -> Result<Listener, TransportError> {
    VsockListener::bind(VsockAddr::new(cid, port))
        .map(Listener::Vsock)
        .map_err(|e| TransportError::io(format!("bind vsock {cid}:{port}"), e))
}

pub(super) async fn accept(l: &VsockListener) -> Result<(BoxStream, Peer), TransportError> {
    let (s, addr) = l
        .accept()
        .await
        .map_err(|e| TransportError::io("accept on vsock", e))?;
    Ok((Box::new(s), Peer::Vsock { cid: addr.cid() }))
}

pub(super) async fn connect(
    cid: u32,
    port: u32,
    limit: Duration,
) -> Result<BoxStream, TransportError> {
    let s = tokio::time::timeout(limit, VsockStream::connect(VsockAddr::new(cid, port)))
        .await
        .map_err(|_| TransportError::Timeout {
            step: "vsock connect",
            limit,
        })?
        .map_err(|e| TransportError::io(format!("connect vsock {cid}:{port}"), e))?;
    Ok(Box::new(s))
}
