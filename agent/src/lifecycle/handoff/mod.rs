//! Upgrades without a gap (`--handoff-socket`): a starting agent takes the running one's
//! listening sockets and state, and the running one stops.
//!
//! The listening sockets themselves pass from one process to the other, so their accept
//! queues never close: a connection that arrives while the agents change hands waits in the
//! queue and is accepted by one of them. The old agent keeps accepting until the new one says
//! it serves; if the new one dies or stalls before that, nothing has changed for the node.
//!
//! The state (cached credentials with their timing, the key set, the pod set) holds every
//! pod's credentials. It is only ever in memory and on the socket, never logged, and it goes
//! only to a peer of the agent's own uid, as the socket's peer credentials say (both ends
//! check). Each step is bounded in time at both ends.

mod wire;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::credentials::cache::{CredentialCache, ExportedEntry};
use crate::identity::keys::{ExportedKeys, KeyStore};
use crate::identity::pods::{ExportedPods, NodePods};
use crate::metrics::Metrics;
use wire::{Kind, WireError};

/// The state format this agent writes and reads. A state of another version is refused
/// whole (the listeners are still taken): it is never half read.
pub const STATE_VERSION: u32 = 1;
/// How long connecting to the old agent may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on a whole handoff, at either end. Two thousand entries take milliseconds.
const HANDOFF_TIMEOUT: Duration = Duration::from_secs(5);

/// What one agent passes to the next besides its listeners.
#[derive(Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct State {
    pub credentials: Vec<ExportedEntry>,
    pub keys: Option<ExportedKeys>,
    pub pods: Option<ExportedPods>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Hello {
    agent_version: String,
    state_version: u32,
}

/// One passed descriptor, as the `Listeners` frame describes it.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Described {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    address: Option<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    socket: Option<PathBuf>,
}

/// This process's effective uid, the only one a handoff peer may have.
fn own_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// The peer's uid, if it is not ours (or cannot be known).
fn foreign_peer(stream: &UnixStream) -> Option<String> {
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == own_uid() => None,
        Ok(cred) => Some(format!("uid {}", cred.uid())),
        Err(e) => Some(format!("peer credentials unknown: {e}")),
    }
}

/// What a starting agent took from the running one.
#[derive(Default)]
pub struct Inherited {
    tcp: HashMap<SocketAddr, std::net::TcpListener>,
    socket: Option<StdUnixListener>,
    /// The state, if one came that this agent reads.
    pub state: Option<State>,
    old: Option<UnixStream>,
    started: Option<Instant>,
    /// `taken`, `listeners_only`, `none` or `refused` (the `handoffs_taken` result).
    result: &'static str,
}

impl Inherited {
    /// The listener taken for `addr`, if the old agent had one there.
    pub fn listener(&mut self, addr: SocketAddr) -> Option<TcpListener> {
        let std = self.tcp.remove(&addr)?;
        match std
            .set_nonblocking(true)
            .and_then(|()| TcpListener::from_std(std))
        {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(address = %addr, error = %e, "a listener taken over could not be used; binding anew");
                None
            }
        }
    }

    /// Listeners were taken: the old agent's accept queues carry on here.
    pub fn took_listeners(&self) -> bool {
        self.started.is_some()
    }

    /// Serving now: tell the old agent to stop, close what was not used, and give back the
    /// handoff socket's listener if it came too.
    pub async fn confirm(mut self, metrics: &Metrics) -> Option<StdUnixListener> {
        for addr in self.tcp.keys() {
            tracing::info!(address = %addr, "a listener the earlier agent passed on is not one of ours; closed");
        }
        self.tcp.clear();
        if let Some(mut old) = self.old.take() {
            let told =
                tokio::time::timeout(HANDOFF_TIMEOUT, wire::send(&mut old, Kind::Taken, b"{}"))
                    .await;
            if !matches!(told, Ok(Ok(()))) {
                tracing::warn!("could not tell the earlier agent that this one serves; it stops on its own when its pod does");
            }
        }
        metrics.handoff_taken(self.result);
        if let Some(started) = self.started {
            metrics.handoff_duration("taken", started.elapsed().as_secs_f64());
        }
        self.socket.take()
    }
}

/// At start: take over from the agent listening on `path`, if one of our uid answers. Asks
/// for nothing of ours that could fail afterwards: whatever goes wrong, the old agent keeps
/// serving until [`Inherited::confirm`], and this one binds what it did not get.
pub async fn take_over(path: &Path) -> Inherited {
    let connected = tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(path)).await;
    let mut stream = match connected {
        Ok(Ok(s)) => s,
        Ok(Err(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            tracing::info!(socket = %path.display(), "no earlier agent to take over from; starting afresh");
            return Inherited {
                result: "none",
                ..Inherited::default()
            };
        }
        Ok(Err(e)) => {
            tracing::warn!(socket = %path.display(), error = %e, "could not reach an earlier agent; starting afresh");
            return Inherited {
                result: "none",
                ..Inherited::default()
            };
        }
        Err(_) => {
            tracing::warn!(socket = %path.display(), "the handoff socket did not accept in time; starting afresh");
            return Inherited {
                result: "none",
                ..Inherited::default()
            };
        }
    };
    if let Some(who) = foreign_peer(&stream) {
        tracing::warn!(socket = %path.display(), peer = %who, "the handoff socket belongs to another user; nothing taken");
        return Inherited {
            result: "refused",
            ..Inherited::default()
        };
    }
    let started = Instant::now();
    let mut inherited = Inherited {
        started: None,
        result: "refused",
        ..Inherited::default()
    };
    let outcome = tokio::time::timeout(HANDOFF_TIMEOUT, receive(&mut stream, &mut inherited)).await;
    let error = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some("timed out".into()),
    };
    if inherited.took_listeners() {
        inherited.started = Some(started);
        inherited.old = Some(stream);
    }
    match (&error, inherited.took_listeners(), &inherited.state) {
        (None, _, Some(_)) => inherited.result = "taken",
        (_, true, _) => inherited.result = "listeners_only",
        (_, false, _) => inherited.result = "refused",
    }
    if let Some(e) = error {
        tracing::warn!(socket = %path.display(), error = %e, listeners = inherited.tcp.len(),
            "handoff from the earlier agent did not complete; binding what was not taken, with no state");
    }
    inherited
}

/// The conversation from the new agent's side, up to the state.
async fn receive(stream: &mut UnixStream, into: &mut Inherited) -> Result<(), String> {
    let hello = serde_json::to_vec(&Hello {
        agent_version: env!("CARGO_PKG_VERSION").into(),
        state_version: STATE_VERSION,
    })
    .map_err(|e| e.to_string())?;
    wire::send(stream, Kind::Hello, &hello)
        .await
        .map_err(|e| e.to_string())?;
    let (payload, fds) = wire::recv_with_fds(stream, Kind::Listeners)
        .await
        .map_err(|e| e.to_string())?;
    let described: Vec<Described> =
        serde_json::from_slice(&payload).map_err(|e| format!("listeners frame: {e}"))?;
    if described.len() != fds.len() {
        return Err(format!(
            "listeners frame names {} sockets but {} came",
            described.len(),
            fds.len()
        ));
    }
    for (what, fd) in described.into_iter().zip(fds) {
        adopt(what, fd, into)?;
    }
    into.started = Some(Instant::now());
    let state = wire::recv(stream, Kind::State)
        .await
        .map_err(|e| e.to_string())?;
    into.state = read_state(&state);
    Ok(())
}

/// Take one passed descriptor, if it is what the frame says it is: a listening TCP socket
/// on its address, or a listening Unix socket.
fn adopt(what: Described, fd: OwnedFd, into: &mut Inherited) -> Result<(), String> {
    if !rustix::net::sockopt::socket_acceptconn(fd.as_fd()).unwrap_or(false) {
        return Err("a passed descriptor is not a listening socket".into());
    }
    match (what.address, what.socket) {
        (Some(addr), None) => {
            let listener = std::net::TcpListener::from(fd);
            match listener.local_addr() {
                Ok(real) if real == addr => {
                    into.tcp.insert(addr, listener);
                    Ok(())
                }
                _ => Err(format!("the socket passed for {addr} is not bound there")),
            }
        }
        (None, Some(_)) => {
            let listener = StdUnixListener::from(fd);
            if listener.local_addr().is_err() {
                return Err("the handoff socket passed is not a Unix socket".into());
            }
            into.socket = Some(listener);
            Ok(())
        }
        _ => Err("a listener is described by neither or both of address and socket".into()),
    }
}

/// The state, if it is of the version this agent reads and parses whole.
fn read_state(frame: &[u8]) -> Option<State> {
    let (version, json) = match frame {
        [a, b, c, d, rest @ ..] => (u32::from_be_bytes([*a, *b, *c, *d]), rest),
        _ => {
            tracing::warn!("the earlier agent's state frame is too short; starting with no state");
            return None;
        }
    };
    if version != STATE_VERSION {
        tracing::warn!(
            state_version = version,
            readable = STATE_VERSION,
            "the earlier agent's state is of a version this agent does not read; refused whole, starting with no state"
        );
        return None;
    }
    match serde_json::from_slice::<State>(json) {
        Ok(state) => Some(state),
        Err(e) => {
            // serde_json's message names a position and a field, never a value.
            tracing::warn!(error = %e, "the earlier agent's state does not parse; refused whole, starting with no state");
            None
        }
    }
}

/// One listener this agent offers to the next: a duplicate of its descriptor.
pub struct Offered {
    described: Described,
    fd: OwnedFd,
}

impl Offered {
    pub fn tcp(listener: &TcpListener) -> std::io::Result<Offered> {
        Ok(Offered {
            described: Described {
                address: Some(listener.local_addr()?),
                socket: None,
            },
            fd: listener.as_fd().try_clone_to_owned()?,
        })
    }

    fn socket(listener: &UnixListener, path: &Path) -> std::io::Result<Offered> {
        Ok(Offered {
            described: Described {
                address: None,
                socket: Some(path.to_owned()),
            },
            fd: listener.as_fd().try_clone_to_owned()?,
        })
    }
}

/// The running agent's side: what it hands over and how it stops afterwards.
pub struct Giver {
    pub path: PathBuf,
    pub offered: Vec<Offered>,
    pub cache: Arc<CredentialCache>,
    pub keys: Option<Arc<KeyStore>>,
    pub pods: Option<Arc<NodePods>>,
    pub metrics: Metrics,
    /// Flipped once handed over: every listener stops accepting and drains, every
    /// background task stops.
    pub stop: Arc<watch::Sender<bool>>,
    /// Set once handed over (readiness then says so).
    pub handed_over: Arc<std::sync::atomic::AtomicBool>,
}

/// Listen on `path` for the next agent: the listener taken over with the other sockets, or
/// a new one (a file left by a dead agent is replaced). Mode 0600.
pub fn listen(path: &Path, taken: Option<StdUnixListener>) -> std::io::Result<UnixListener> {
    if let Some(listener) = taken {
        let same = listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(Path::to_owned))
            .is_some_and(|p| p == path);
        if same && path.exists() {
            listener.set_nonblocking(true)?;
            return UnixListener::from_std(listener);
        }
    }
    crate::unix_socket::bind_owner_only(path)
}

impl Giver {
    /// Serve the next agent on `listener` until a handoff succeeds or `shutdown` fires. One
    /// peer at a time; a peer that fails or stalls changes nothing here.
    pub async fn run(mut self, listener: UnixListener, mut shutdown: watch::Receiver<bool>) {
        match Offered::socket(&listener, &self.path) {
            Ok(o) => self.offered.push(o),
            Err(e) => {
                tracing::warn!(error = %e, "the handoff socket cannot be passed on; the next agent binds its own")
            }
        }
        tracing::info!(socket = %self.path.display(), "listening for the next agent");
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = shutdown.wait_for(|s| *s) => return,
            };
            let mut stream = match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "handoff socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if let Some(who) = foreign_peer(&stream) {
                self.metrics.handoff_given("refused_peer");
                tracing::warn!(peer = %who, "a peer of another user connected to the handoff socket; disconnected with nothing sent");
                drop(stream);
                continue;
            }
            let started = Instant::now();
            match tokio::time::timeout(HANDOFF_TIMEOUT, self.give(&mut stream)).await {
                Ok(Ok(given)) => {
                    self.cache.retire();
                    self.handed_over
                        .store(true, std::sync::atomic::Ordering::Release);
                    self.stop.send_replace(true);
                    self.metrics.handoff_given("given");
                    self.metrics
                        .handoff_duration("given", started.elapsed().as_secs_f64());
                    tracing::info!(
                        credentials = given.credentials,
                        pods = given.pods,
                        state_bytes = given.bytes,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "handed over to the next agent; no longer accepting, finishing in-flight requests, then waiting for SIGTERM"
                    );
                    return;
                }
                Ok(Err(e)) => {
                    self.metrics.handoff_given("failed");
                    tracing::warn!(error = %e, "handoff to the next agent failed; still serving");
                }
                Err(_) => {
                    self.metrics.handoff_given("failed");
                    tracing::warn!("handoff to the next agent timed out; still serving");
                }
            }
        }
    }

    async fn give(&self, stream: &mut UnixStream) -> Result<Given, WireError> {
        let hello = wire::recv(stream, Kind::Hello).await?;
        if let Ok(hello) = serde_json::from_slice::<Hello>(&hello) {
            tracing::info!(peer_version = %hello.agent_version, peer_state_version = hello.state_version, "the next agent asks to take over");
        }
        let described: Vec<&Described> = self.offered.iter().map(|o| &o.described).collect();
        let payload = serde_json::to_vec(&described).map_err(std::io::Error::other)?;
        let fds: Vec<_> = self.offered.iter().map(|o| o.fd.as_fd()).collect();
        wire::send_with_fds(stream, Kind::Listeners, &payload, &fds).await?;
        let state = State {
            credentials: self.cache.export(),
            keys: self.keys.as_ref().and_then(|k| k.export()),
            pods: self.pods.as_ref().map(|p| p.export()),
        };
        let counts = Given {
            credentials: state.credentials.len(),
            pods: state.pods.as_ref().map_or(0, |p| p.live.len()),
            bytes: 0,
        };
        let mut frame = STATE_VERSION.to_be_bytes().to_vec();
        serde_json::to_writer(&mut frame, &state).map_err(std::io::Error::other)?;
        drop(state);
        wire::send(stream, Kind::State, &frame).await?;
        let bytes = frame.len();
        drop(frame);
        wire::recv(stream, Kind::Taken).await?;
        self.metrics
            .handoff_entries("given", "credentials", counts.credentials);
        self.metrics.handoff_entries("given", "pods", counts.pods);
        Ok(Given { bytes, ..counts })
    }
}

struct Given {
    credentials: usize,
    pods: usize,
    bytes: usize,
}

/// Take `state` into the components of a starting agent; says what was taken.
pub fn install(
    state: State,
    cache: &CredentialCache,
    keys: Option<&KeyStore>,
    pods: Option<&NodePods>,
    metrics: &Metrics,
) {
    let State {
        credentials,
        keys: exported_keys,
        pods: exported_pods,
    } = state;
    let mut keys_taken = 0;
    if let (Some(store), Some(exported)) = (keys, exported_keys) {
        match store.import(exported) {
            Ok(n) => keys_taken = n,
            Err(e) => {
                tracing::warn!(error = %e, "the earlier agent's key set does not load; loading from the source")
            }
        }
    }
    let (mut live, mut gone) = (0, 0);
    if let (Some(set), Some(exported)) = (pods, exported_pods) {
        match set.import(exported) {
            Some((l, g)) => (live, gone) = (l, g),
            None => tracing::warn!(
                "the earlier agent's pod set is another node's; listing this node's pods"
            ),
        }
    }
    let entries = cache.import(credentials);
    metrics.handoff_entries("taken", "credentials", entries);
    metrics.handoff_entries("taken", "keys", keys_taken);
    metrics.handoff_entries("taken", "pods", live);
    metrics.handoff_entries("taken", "gone_pods", gone);
    tracing::info!(
        credentials = entries,
        keys = keys_taken,
        pods = live,
        gone_pods = gone,
        "took over the earlier agent's state"
    );
}
