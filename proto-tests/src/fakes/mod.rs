//! Wire-level fakes of the services the agent calls: real HTTP on loopback,
//! real JSON or XML, so the agent's own clients (the AWS SDK, its JWKS
//! fetcher) are exercised unmodified. [`moto`] runs a third-party emulator
//! instead, as a second opinion on the STS wire format. [`kube_api`] is
//! checked against `kubectl`, a real client of the API it fakes.

pub mod eks_auth;
pub mod jwks;
pub mod kube_api;
pub mod moto;
pub mod recorder;
pub mod sts;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::{AbortHandle, JoinSet};

/// A fake that hands out credentials, so checks such as
/// [`crate::assertions::only_issued`] work against either backend.
pub trait CredentialIssuer {
    /// Every credential issued so far, in order.
    fn issued_credentials(&self) -> Vec<eks_auth::IssuedCredentials>;
    /// Requests received so far.
    fn calls_received(&self) -> u64;
}

/// Stops a fake server (its accept loop and every open connection) when dropped.
#[derive(Debug)]
pub struct ServerGuard {
    accept_loop: AbortHandle,
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

/// Serve `handler` over HTTP/1.1 on `127.0.0.1:0` in a background task.
///
/// Connections live in a `JoinSet` owned by the accept loop, so aborting the
/// loop (dropping the guard) also ends requests that a fault made hang.
pub async fn serve_loopback<F, Fut>(handler: F) -> io::Result<(SocketAddr, ServerGuard)>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let mut connections = JoinSet::new();
        loop {
            while connections.try_join_next().is_some() {}
            let Ok((stream, _peer)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            connections.spawn(async move {
                let service = service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                // A peer that hangs up mid-exchange is not an error for a fake.
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok((
        addr,
        ServerGuard {
            accept_loop: task.abort_handle(),
        },
    ))
}

/// A response with a JSON body.
pub(crate) fn json_response(status: u16, body: &serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static response parts are valid")
}
