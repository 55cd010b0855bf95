//! A keep-alive HTTP/1.1 client for `GET /v1/credentials`: one hyper connection per
//! simulated client, requests built from prepared header values so the client spends as
//! little CPU as it can (on 2 cores it shares the machine with the server it measures).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderValue};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The agent's only route.
pub const CREDENTIALS_PATH: &str = "/v1/credentials";
/// Loopback connects in microseconds; this only bounds a wedged listen queue.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longer than the agent's own 5 s answer budget: a request that takes longer is a hang.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// `Retry-After` values beyond this are clamped: a load run is bounded in time.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("connecting to {0}: timed out")]
    ConnectTimeout(SocketAddr),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("no response within {REQUEST_TIMEOUT:?}")]
    Timeout,
    #[error("a token is not a valid header value")]
    BadToken,
}

/// One open connection.
pub type Connection = SendRequest<Empty<Bytes>>;

/// Where requests go, with the `Host` header the agent's allow-list accepts (its bound
/// address literal and port).
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    host: HeaderValue,
    uri: Uri,
}

impl Target {
    pub fn new(addr: SocketAddr) -> Target {
        // A socket address always renders as a valid header value and the path is a
        // constant; neither can fail, the fallbacks only keep this free of `expect`.
        let host = HeaderValue::from_str(&addr.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("127.0.0.1"));
        Target {
            addr,
            host,
            uri: Uri::from_static(CREDENTIALS_PATH),
        }
    }

    /// Open a keep-alive connection; its driver runs as a task until either side closes.
    pub async fn connect(&self) -> Result<Connection, ClientError> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.addr))
            .await
            .map_err(|_| ClientError::ConnectTimeout(self.addr))?
            .map_err(|e| ClientError::Connect(self.addr, e))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            // Ends with an error when the server closes the connection: expected at shutdown.
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// `GET /v1/credentials` with `token`, body read in full.
    pub async fn get(
        &self,
        conn: &mut Connection,
        token: &HeaderValue,
    ) -> Result<Reply, ClientError> {
        let exchange = async {
            conn.ready().await?;
            let mut req = Request::new(Empty::new());
            *req.uri_mut() = self.uri.clone();
            let headers = req.headers_mut();
            headers.insert(header::HOST, self.host.clone());
            headers.insert(header::AUTHORIZATION, token.clone());
            let resp = conn.send_request(req).await?;
            let status = resp.status();
            let retry_after = resp
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER));
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, ClientError>(Reply {
                status,
                retry_after,
                body,
            })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| ClientError::Timeout)?
    }
}

/// A response as the load tool needs it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    /// `Retry-After` in whole seconds, clamped to a few seconds.
    pub retry_after: Option<Duration>,
    pub body: Bytes,
}

/// Tokens as header values, ready to be cloned into requests (a clone is a reference count).
pub fn header_values(tokens: &[String]) -> Result<Vec<HeaderValue>, ClientError> {
    tokens
        .iter()
        .map(|t| HeaderValue::from_str(t).map_err(|_| ClientError::BadToken))
        .collect()
}
