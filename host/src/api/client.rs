//! A minimal HTTP/1 client for the management API over its Unix socket,
//! used by `uvectl` and the integration tests. One connection per request
//! (the API is local and requests are few); bodies can be streamed both
//! ways so imports and exports of large UIFs stay in bounded memory.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::TryStreamExt;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

/// Why a request failed before an HTTP answer arrived.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Could not connect to the API socket.
    #[error("cannot connect to {path}: {source} (is uve-host running?)")]
    Connect {
        /// The socket.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// HTTP failure.
    #[error("HTTP: {0}")]
    Http(String),
    /// Reading a local file failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A request body.
pub type ReqBody = BoxBody<Bytes, std::io::Error>;

/// An API client bound to a socket path.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
}

/// A buffered answer.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: StatusCode,
    /// Body bytes.
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON (`Null` if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The body decoded as one of the API's types (`crate::api::types`).
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }
}

/// An empty body.
pub fn empty() -> ReqBody {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

/// A body from bytes.
pub fn bytes(b: impl Into<Bytes>) -> ReqBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// A JSON body (a `serde_json::Value` or one of the API's types).
pub fn json<T: serde::Serialize + ?Sized>(v: &T) -> ReqBody {
    bytes(serde_json::to_vec(v).unwrap_or_default())
}

/// A body streamed from a file.
pub async fn file(path: &Path) -> Result<ReqBody, ClientError> {
    file_counted(path, |_| {}).await
}

/// A body streamed from a file, calling `sent(n)` as each piece of `n`
/// bytes is handed to the connection (for progress display).
pub async fn file_counted(
    path: &Path,
    sent: impl Fn(u64) + Send + Sync + 'static,
) -> Result<ReqBody, ClientError> {
    let f = tokio::fs::File::open(path).await?;
    let stream = tokio_util::io::ReaderStream::new(f)
        .inspect_ok(move |b| sent(b.len() as u64))
        .map_ok(Frame::data);
    Ok(BodyExt::boxed(StreamBody::new(stream)))
}

impl ApiClient {
    /// A client for the API at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        ApiClient {
            socket: socket.into(),
        }
    }

    /// Sends a request and returns the status and the streaming body.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: ReqBody,
    ) -> Result<(StatusCode, Incoming), ClientError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Connect {
                    path: self.socket.display().to_string(),
                    source,
                })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "uve-host")
            .header("content-type", "application/json")
            .body(body)
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        Ok((resp.status(), resp.into_body()))
    }

    /// Sends a request and buffers the answer.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: ReqBody,
    ) -> Result<Answer, ClientError> {
        let (status, body) = self.send(method, path, body).await?;
        let body = body
            .collect()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?
            .to_bytes();
        Ok(Answer { status, body })
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Result<Answer, ClientError> {
        self.call(Method::GET, path, empty()).await
    }
}
