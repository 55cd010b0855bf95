//! The baseline the agent is compared with: a minimal hyper HTTP/1.1 server on a runtime of
//! the agent's size, answering every request with a fixed body and the agent's headers.
//! Whatever the agent costs beyond this is its own work: routing, header checks, token
//! verification, the cache lookup, encoding, metrics.
//!
//! It runs as a separate process (the load tool re-executes itself with
//! `--serve-baseline <body file>`), like the agent, so both are measured the same way. It
//! prints its address on stdout and exits when its stdin closes, which happens when the load
//! tool exits, however it exits.

use std::io::Write as _;
use std::net::Ipv4Addr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::Response;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The line the baseline prints once it listens; its address follows.
pub const LISTENING_PREFIX: &str = "baseline listening on ";

/// The agent's success response: same body, same headers (hyper adds `content-length` and
/// `date` to both).
fn response(body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Serve `body` on 127.0.0.1 (port 0) until stdin closes.
pub fn run(body: Bytes) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(crate::agent_worker_threads())
        .enable_all()
        .build()?;
    std::thread::spawn(|| {
        // Returns at EOF (the load tool is gone) or on a read error: either way, stop.
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    runtime.block_on(async move {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let mut stdout = std::io::stdout();
        writeln!(stdout, "{LISTENING_PREFIX}{addr}")?;
        stdout.flush()?;
        // Held for as long as the server runs: dropping the sender would stop it.
        let (_stop, stop_rx) = watch::channel(false);
        crate::server::serve(listener, stop_rx, move |_req| {
            let body = body.clone();
            async move { response(body) }
        })
        .await;
        Ok(())
    })
}
