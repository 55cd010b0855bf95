//! The probe socket (`--probe-socket`): `/healthz` and `/readyz` of this process alone, and
//! `pod-identity-agent probe SOCKET PATH`, the kubelet's exec probe that asks it.
//!
//! Why not the probe port: the agent runs in the host network, and during an upgrade with
//! `--handoff-socket` two agents of one node share every port (the new one takes the old
//! one's listeners). A kubelet probe of `127.0.0.1:2703` is answered by whichever agent holds
//! that port: a new version that failed before taking over would look ready because the old
//! one answered, the rollout would delete the old pod, and the node would be left with no
//! agent. The probe socket lives in a per-pod `emptyDir`, so the exec probe of a container
//! reaches that container's own process, and nothing else.
//!
//! It keeps answering after a handoff (the old agent is then healthy but not ready) until the
//! agent stops: a failing liveness probe would restart the old container, and a restarted
//! agent would take the listeners back from the new one.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};

use crate::edge::admin;
use crate::lifecycle::readiness::Readiness;

/// Connections served at once: the kubelet runs three probes, each one connection.
const MAX_CONNECTIONS: usize = 8;
/// A prober that has not sent its request by then is disconnected.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// The whole exec probe, connect to answer: the agent answers from memory in microseconds,
/// so a second means it is stuck. Under the manifests' `timeoutSeconds: 2`, so the probe
/// says why it failed rather than being killed by the kubelet.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(1);
/// An answer is one short line.
const MAX_ANSWER_BYTES: usize = 4096;

/// Listen on `path` (mode 0600; a file left by an earlier process of this pod is replaced).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    crate::unix_socket::bind_owner_only(path)
}

/// Answer probes on `listener` until `stop` flips to true (or its sender is dropped).
pub async fn serve(
    listener: UnixListener,
    readiness: Arc<Readiness>,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT)
        .keep_alive(false)
        .max_buf_size(8192);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|s| *s) => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "probe socket accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Over the bound the connection is closed unanswered: the prober reports a failure,
        // which is right for an agent this busy on a socket only the kubelet uses.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let readiness = readiness.clone();
        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let answer =
                admin::probe(&readiness, req.uri().path()).unwrap_or_else(admin::not_found);
            async move { Ok::<_, std::convert::Infallible>(answer) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "probe connection ended with an error");
            }
        });
    }
}

/// What the agent answered.
#[derive(Debug)]
pub struct Answer {
    /// The HTTP status: 200 healthy or ready, 503 not ready.
    pub status: u16,
    /// Its one line: `ready`, or `not ready: <why>`.
    pub body: String,
}

/// Why no answer came.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Nothing listens there: the agent has not started, or has stopped.
    #[error("cannot connect to {0}: {1}")]
    Connect(String, std::io::Error),
    /// The agent did not answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The answer was not HTTP, or too long.
    #[error("the answer could not be read: {0}")]
    Answer(String),
}

/// `GET path` on the probe socket at `socket`, bounded by [`ASK_TIMEOUT`].
pub async fn ask(socket: &Path, path: &str) -> Result<Answer, ProbeError> {
    tokio::time::timeout(ASK_TIMEOUT, ask_unbounded(socket, path))
        .await
        .map_err(|_| ProbeError::Timeout(ASK_TIMEOUT))?
}

async fn ask_unbounded(socket: &Path, path: &str) -> Result<Answer, ProbeError> {
    let answer = |e: &dyn std::fmt::Display| ProbeError::Answer(e.to_string());
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| ProbeError::Connect(socket.display().to_string(), e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| answer(&e))?;
    let driver = tokio::spawn(conn);
    let request = Request::get(path)
        .header(hyper::header::HOST, "localhost")
        .body(Empty::<Bytes>::new())
        .map_err(|e| answer(&e))?;
    let response = sender.send_request(request).await.map_err(|e| answer(&e))?;
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|e| answer(&e))?
        .to_bytes();
    driver.abort();
    Ok(Answer {
        status,
        body: String::from_utf8_lossy(&body).trim_end().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn readiness() -> Arc<Readiness> {
        Arc::new(Readiness {
            listeners_bound: AtomicBool::new(true),
            keys: None,
            pods: None,
            handed_over: Arc::default(),
        })
    }

    #[tokio::test]
    async fn answers_for_its_own_process_until_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("probe.sock");
        let listener = bind(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let ready = readiness();
        let (stop, stopped) = watch::channel(false);
        let server = tokio::spawn(serve(listener, ready.clone(), stopped));

        let a = ask(&path, "/readyz").await.unwrap();
        assert_eq!((a.status, a.body.as_str()), (200, "ready"));
        ready.handed_over.store(true, Ordering::Release);
        let a = ask(&path, "/readyz").await.unwrap();
        assert_eq!(a.status, 503);
        assert!(a.body.starts_with("not ready: handed over"), "{}", a.body);
        let a = ask(&path, "/healthz").await.unwrap();
        assert_eq!(a.status, 200, "a handed-over agent is still alive");
        assert_eq!(ask(&path, "/metrics").await.unwrap().status, 404);

        stop.send_replace(true);
        server.await.unwrap();
        assert!(matches!(
            ask(&path, "/healthz").await,
            Err(ProbeError::Connect(..))
        ));
    }

    #[tokio::test]
    async fn a_socket_nobody_answers_on_time_is_a_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("probe.sock");
        // Bound but never accepted: the connection waits in the queue.
        let _listener = bind(&path).unwrap();
        let started = std::time::Instant::now();
        assert!(matches!(
            ask(&path, "/readyz").await,
            Err(ProbeError::Timeout(_))
        ));
        assert!(started.elapsed() < ASK_TIMEOUT * 3);
    }
}
