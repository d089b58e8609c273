//! UVE-2, the host side: requests the host sends to an agent through that
//! VM's link handle (user release, UA deploy/update/rollback/delete,
//! session suspend/resume, monitoring grants, status, ping). Each returns
//! the agent's real answer or a typed error.

pub mod switch;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::AsyncReadExt;
use uve_protocol::defs::MAX_CHUNK;
use uve_protocol::link::{LinkError, LinkHandle};
use uve_protocol::manifest::Hash;
use uve_protocol::message::{Request, Response, UaBundle, WireError};
use uve_protocol::names::{UaName, UaVersion};

use crate::host::Host;

static NEXT_TRANSFER: AtomicU64 = AtomicU64::new(1);

/// Why a UVE-2 request failed.
#[derive(Debug, thiserror::Error)]
pub enum Uve2Error {
    /// The VM has no live connection.
    #[error("VM {0} is not connected")]
    NotConnected(String),
    /// The agent refused or failed.
    #[error("agent refused: {0}")]
    Agent(WireError),
    /// No answer in time.
    #[error("agent did not answer within the time limit")]
    Timeout,
    /// The connection failed during the request.
    #[error("connection to the agent failed: {0}")]
    Link(String),
    /// The agent answered with something unexpected.
    #[error("unexpected answer from the agent: {0}")]
    Unexpected(String),
    /// Reading the bundle failed.
    #[error("bundle: {0}")]
    Bundle(String),
}

impl From<LinkError> for Uve2Error {
    fn from(e: LinkError) -> Self {
        match e {
            LinkError::Remote(w) => Uve2Error::Agent(w),
            LinkError::Timeout(_) => Uve2Error::Timeout,
            other => Uve2Error::Link(other.to_string()),
        }
    }
}

/// The link to `vm`'s agent.
pub fn link(host: &Host, vm: &str) -> Result<LinkHandle, Uve2Error> {
    host.conns()
        .get(vm)
        .map(|c| c.handle)
        .ok_or_else(|| Uve2Error::NotConnected(vm.to_string()))
}

/// Sends one request to `vm`'s agent, bounded by `uve2_timeout_ms`.
pub async fn call(host: &Host, vm: &str, request: Request) -> Result<Response, Uve2Error> {
    let handle = link(host, vm)?;
    let limit = Host::ms(host.config().uve2_timeout_ms);
    Ok(handle.request_timeout(request, limit).await?)
}

/// What to deploy.
#[derive(Debug, Clone)]
pub struct UaDeploy {
    /// UA name.
    pub name: UaName,
    /// UA version.
    pub version: UaVersion,
    /// Entry command.
    pub entry: Vec<String>,
    /// Update of an existing UA.
    pub update: bool,
}

/// Streams the bundle at `path` (`size` bytes, BLAKE3 `digest`) to `vm`'s
/// agent: `UaBegin`, `UaBundleData` in `MAX_CHUNK` pieces, `UaCommit`.
/// Returns the version the agent reports as current.
pub async fn deploy_ua(
    host: &Host,
    vm: &str,
    ua: UaDeploy,
    path: &Path,
    size: u64,
    digest: Hash,
) -> Result<UaVersion, Uve2Error> {
    let handle = link(host, vm)?;
    let limit = Host::ms(host.config().uve2_timeout_ms);
    let transfer = NEXT_TRANSFER.fetch_add(1, Ordering::Relaxed);
    let begin = UaBundle {
        transfer,
        name: ua.name,
        version: ua.version,
        entry: ua.entry,
        digest,
        size,
        update: ua.update,
    };
    expect_ok(
        handle
            .request_timeout(Request::UaBegin(begin), limit)
            .await?,
    )?;
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| Uve2Error::Bundle(e.to_string()))?;
    let mut offset = 0u64;
    let mut buf = vec![0u8; MAX_CHUNK as usize];
    loop {
        let n = read_full(&mut file, &mut buf).await?;
        if n == 0 {
            break;
        }
        let data = buf[..n].to_vec();
        let req = Request::UaBundleData {
            transfer,
            offset,
            data,
        };
        expect_ok(handle.request_timeout(req, limit).await?)?;
        offset += n as u64;
        crate::state::metrics::add(&host.metrics().bytes_out, n as u64);
    }
    match handle
        .request_timeout(Request::UaCommit { transfer }, limit)
        .await?
    {
        Response::UaCurrent { version } => Ok(version),
        other => Err(Uve2Error::Unexpected(format!("{other:?}"))),
    }
}

async fn read_full(file: &mut tokio::fs::File, buf: &mut [u8]) -> Result<usize, Uve2Error> {
    let mut n = 0;
    while n < buf.len() {
        let got = file
            .read(&mut buf[n..])
            .await
            .map_err(|e| Uve2Error::Bundle(e.to_string()))?;
        if got == 0 {
            break;
        }
        n += got;
    }
    Ok(n)
}

/// Maps any answer other than `Ok` to an error.
pub fn expect_ok(r: Response) -> Result<(), Uve2Error> {
    match r {
        Response::Ok => Ok(()),
        other => Err(Uve2Error::Unexpected(format!("{other:?}"))),
    }
}
