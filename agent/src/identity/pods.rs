//! The pods of this node, as the Kubernetes API reports them, and the caller check built on
//! them.
//!
//! One `kube` watcher lists and watches `/api/v1/pods?fieldSelector=spec.nodeName=<node>`
//! (relists, `410 Gone` and backoff as `kube::runtime::watcher` does them) into a map from pod
//! UID to what a token and a caller of that pod must match: the pod's namespace, name and
//! service account (the token's other claims), and its `status.podIPs`, or, for a
//! `spec.hostNetwork` pod, one of the host's own addresses. A request costs one read-locked
//! hash lookup and a few string compares. A pod the watch has not delivered yet is read once with a GET, bounded in
//! rate and concurrency; a pod that is deleted or has terminated is remembered (bounded) so
//! its tokens are refused without asking the API server again, and the cache is told at once.
//! Pods are read as [`PodObject`]s, so one that does not parse is counted, remembered and
//! refused while the rest of its list is used.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use tokio::time::Instant;

use futures_util::StreamExt;
use kube::api::Api;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use tokio::sync::{watch, Semaphore};

use crate::defence::{self, Defence};
use crate::identity::kube_api::{error_text, LastContact};
use crate::identity::pod_object::{PodFields, PodObject};
use crate::limits::TokenBucket;
use crate::metrics::Metrics;
use crate::sync;

/// Pods remembered as gone (or malformed), so replays of their tokens cost no API call.
const MAX_GONE: usize = 16_384;
/// Live pods taken from an earlier agent at most: far above what a node runs (Kubernetes
/// supports 110 a node by default, a few hundred at most), so only a broken state reaches it.
const MAX_IMPORTED_PODS: usize = 65_536;
/// How long a gone pod is remembered. After that a replay costs one GET (and is refused).
const GONE_TTL: Duration = Duration::from_secs(3600);
/// Single-pod reads: at most this many at a time...
const LOOKUP_CONCURRENCY: usize = 4;
/// ...and at most this many per second on average, in bursts of `LOOKUP_BURST`.
const LOOKUP_RATE: f64 = 5.0;
const LOOKUP_BURST: f64 = 20.0;
/// A single-pod read that takes longer is given up. The request waiting for it is answered
/// by the edge deadline first (503); the read goes on so that the retry finds the pod.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a lookup waits for one of the [`LOOKUP_CONCURRENCY`] slots before it is refused
/// (503 `PodLookupLimited`).
const LOOKUP_QUEUE_WAIT: Duration = Duration::from_secs(2);
/// How long the host's interface addresses are reused before they are read again.
const HOST_ADDRS_TTL: Duration = Duration::from_secs(10);

/// Why a caller was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the agent has not yet listed this node's pods; retry shortly")]
    NotSynced,
    #[error("the token's pod is not a pod of this node")]
    UnknownPod,
    #[error("the token's pod has been deleted or has terminated")]
    PodGone,
    #[error("the request does not come from the token's pod")]
    CallerNotPod,
    #[error("a caller on the host's network may present only a hostNetwork pod's token")]
    HostNetworkOnly,
    #[error("too many pods to look up at once; retry shortly")]
    LookupLimited,
    #[error("the Kubernetes API server did not answer the pod lookup; retry shortly")]
    LookupFailed,
    #[error("the Kubernetes API server's description of the token's pod does not parse")]
    Malformed,
    #[error(
        "the token's namespace, service account or pod name is not that of the pod with its UID"
    )]
    Mismatch,
}

impl Refusal {
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::NotSynced => "PodsNotSynced",
            Refusal::UnknownPod => "UnknownPod",
            Refusal::PodGone => "PodNotRunning",
            Refusal::CallerNotPod => "CallerNotPod",
            Refusal::HostNetworkOnly => "HostNetworkOnly",
            Refusal::LookupLimited => "PodLookupLimited",
            Refusal::LookupFailed => "PodLookupFailed",
            Refusal::Malformed => "PodMalformed",
            Refusal::Mismatch => "PodMismatch",
        }
    }

    /// Refusals that go away by themselves: 503 with `Retry-After`, not 403.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Refusal::NotSynced | Refusal::LookupLimited | Refusal::LookupFailed
        )
    }
}

/// What a verified token says of its pod: all of it must be the live pod's, not the UID
/// alone, or a token signed for one identity with another pod's UID would pass as that pod.
#[derive(Debug, Clone, Copy)]
pub struct TokenPod<'a> {
    pub uid: &'a str,
    pub namespace: &'a str,
    pub service_account: &'a str,
    /// Absent from a token not bound to a pod by name, which then matches none.
    pub name: Option<&'a str>,
}

/// What a token and a caller of a live pod must match.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PodFacts {
    namespace: Box<str>,
    name: Box<str>,
    /// `spec.serviceAccountName`.
    service_account: Box<str>,
    ips: Box<[IpAddr]>,
    host_network: bool,
    /// When the agent learned of the pod (a relist keeps pods learned while it ran).
    since: Instant,
}

/// Pod UID -> what its caller must match.
type PodMap = HashMap<Box<str>, PodFacts>;

#[derive(Default)]
struct State {
    live: PodMap,
    /// UID -> when, and why, it was found not to be a live pod of this node.
    gone: HashMap<Box<str>, (Instant, Absent)>,
}

/// Why a UID is not a live pod of this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Absent {
    /// Deleted, or terminated (phase `Succeeded` or `Failed`).
    Ended,
    /// The API server has no such pod on this node (another node's, or none at all).
    NotHere,
    /// The API server's last word on the pod did not parse; a well-formed one replaces it.
    Malformed,
}

impl State {
    fn bury(&mut self, uid: &str, now: Instant, why: Absent) {
        self.live.remove(uid);
        if self.gone.len() >= MAX_GONE {
            self.gone
                .retain(|_, (at, _)| now.duration_since(*at) < GONE_TTL);
            if self.gone.len() >= MAX_GONE {
                if let Some(oldest) = self
                    .gone
                    .iter()
                    .min_by_key(|(_, (at, _))| *at)
                    .map(|(k, _)| k.clone())
                {
                    self.gone.remove(&oldest);
                }
            }
        }
        self.gone.insert(uid.into(), (now, why));
    }

    fn absent(&self, uid: &str, now: Instant) -> Option<Absent> {
        self.gone
            .get(uid)
            .filter(|(at, _)| now.duration_since(*at) < GONE_TTL)
            .map(|(_, why)| *why)
    }

    /// Its tokens are refused until a version that parses arrives; an ended pod stays
    /// ended. True if it was not known to be malformed already.
    fn mark_malformed(&mut self, uid: &str, now: Instant) -> bool {
        match self.absent(uid, now) {
            Some(Absent::Ended) => false,
            Some(Absent::Malformed) => {
                self.live.remove(uid);
                false
            }
            _ => {
                self.bury(uid, now, Absent::Malformed);
                true
            }
        }
    }

    /// A version of the pod that parses: live, unless it ended or was found elsewhere.
    fn revive(&mut self, uid: Box<str>, facts: PodFacts, now: Instant) {
        match self.absent(&uid, now) {
            None => {}
            Some(Absent::Malformed) => {
                self.gone.remove(&uid);
            }
            Some(Absent::Ended | Absent::NotHere) => return,
        }
        self.live.insert(uid, facts);
    }
}

/// The pod set as one agent passes it to the next in a handoff: every instant is an age at
/// the moment of export, so neither agent's clock leaks into the other's.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExportedPods {
    pub node: String,
    /// The first complete list had arrived.
    pub synced: bool,
    /// How long ago the API server last answered.
    pub last_contact_age_ms: Option<u64>,
    pub live: Vec<ExportedPod>,
    pub gone: Vec<ExportedGone>,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExportedPod {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
    pub age_ms: u64,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExportedGone {
    pub uid: String,
    pub why: Absent,
    pub age_ms: u64,
}

/// The instant `ms` milliseconds before `now` (or `now`, where the clock cannot go back so far).
fn ago(now: Instant, ms: u64) -> Instant {
    now.checked_sub(Duration::from_millis(ms)).unwrap_or(now)
}

fn age_ms(now: Instant, at: Instant) -> u64 {
    now.saturating_duration_since(at).as_millis() as u64
}

/// A list in progress: between the watcher's `Init` and `InitDone`.
struct Relist {
    started: Instant,
    pods: PodMap,
    /// UIDs of the listed pods that did not parse.
    malformed: Vec<Box<str>>,
}

impl PodFacts {
    /// The token names this pod, not only its UID.
    fn is_named_by(&self, token: &TokenPod<'_>) -> bool {
        *self.namespace == *token.namespace
            && *self.service_account == *token.service_account
            && token.name == Some(&*self.name)
    }
}

/// What the pod set says of a token's pod and a source address.
enum Seen {
    /// A live pod with this UID but another namespace, service account or name.
    Mismatch,
    Caller,
    HostNetworkPod,
    NotCaller,
    Absent(Absent),
    Unknown,
}

/// One single-pod read, shared by every request that waits for it: a spawned task, so a
/// request that gives up (the edge deadline) does not cancel it, and its answer still goes
/// into the pod set for the client's retry.
type Lookup = watch::Receiver<Option<Result<(), Refusal>>>;

/// Where the UID of every pod found gone is sent, once. The cache consumes it
/// (`CredentialCache::forget_gone`): the pod set knows nothing of the cache. Unbounded, because
/// a gone pod must never be dropped on the floor (its credentials would be refreshed on), and
/// its traffic is bounded by pod deletions on one node.
pub type GoneSender = tokio::sync::mpsc::UnboundedSender<Box<str>>;

/// The node's pods and the caller check.
pub struct NodePods {
    node: String,
    client: kube::Client,
    state: RwLock<State>,
    synced: AtomicBool,
    contact: Arc<LastContact>,
    gone: GoneSender,
    metrics: Metrics,
    lookup_budget: Mutex<TokenBucket>,
    lookup_slots: Semaphore,
    lookups_in_flight: Mutex<HashMap<Box<str>, Lookup>>,
    relist: Mutex<Option<Relist>>,
    host_addrs: Mutex<(Option<Instant>, Vec<IpAddr>)>,
}

impl NodePods {
    pub fn new(
        node: String,
        client: kube::Client,
        contact: Arc<LastContact>,
        metrics: Metrics,
        gone: GoneSender,
    ) -> Arc<NodePods> {
        Arc::new(NodePods {
            node,
            client,
            state: RwLock::default(),
            synced: AtomicBool::new(false),
            contact,
            gone,
            metrics,
            lookup_budget: Mutex::new(TokenBucket::new(LOOKUP_RATE, LOOKUP_BURST, Instant::now())),
            lookup_slots: Semaphore::new(LOOKUP_CONCURRENCY),
            lookups_in_flight: Mutex::default(),
            relist: Mutex::default(),
            host_addrs: Mutex::new((None, Vec::new())),
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        sync::read(&self.state)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        sync::write(&self.state)
    }

    /// True once the first complete list has arrived.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// The pod set for the next agent.
    pub fn export(&self) -> ExportedPods {
        let now = Instant::now();
        let state = self.read();
        ExportedPods {
            node: self.node.clone(),
            synced: self.is_synced(),
            last_contact_age_ms: self.contact.age().map(|a| a.as_millis() as u64),
            live: state
                .live
                .iter()
                .map(|(uid, f)| ExportedPod {
                    uid: uid.to_string(),
                    namespace: f.namespace.to_string(),
                    name: f.name.to_string(),
                    service_account: f.service_account.to_string(),
                    ips: f.ips.to_vec(),
                    host_network: f.host_network,
                    age_ms: age_ms(now, f.since),
                })
                .collect(),
            gone: state
                .gone
                .iter()
                .filter(|(_, (at, _))| now.duration_since(*at) < GONE_TTL)
                .map(|(uid, (at, why))| ExportedGone {
                    uid: uid.to_string(),
                    why: *why,
                    age_ms: age_ms(now, *at),
                })
                .collect(),
        }
    }

    /// Take the pod set an earlier agent passed on; in sync if it was. Returns the live and
    /// gone pods taken, or `None` for another node's set, which is not taken.
    pub fn import(&self, pods: ExportedPods) -> Option<(usize, usize)> {
        if pods.node != self.node {
            return None;
        }
        let now = Instant::now();
        let mut state = self.write();
        for p in pods.live.into_iter().take(MAX_IMPORTED_PODS) {
            let facts = PodFacts {
                namespace: p.namespace.into(),
                name: p.name.into(),
                service_account: p.service_account.into(),
                ips: p.ips.into_iter().map(|ip| ip.to_canonical()).collect(),
                host_network: p.host_network,
                since: ago(now, p.age_ms),
            };
            state.live.insert(p.uid.into(), facts);
        }
        for g in pods.gone.into_iter().take(MAX_GONE) {
            let at = ago(now, g.age_ms);
            if now.duration_since(at) < GONE_TTL {
                state.live.remove(g.uid.as_str());
                state.gone.insert(g.uid.into(), (at, g.why));
            }
        }
        let taken = (state.live.len(), state.gone.len());
        drop(state);
        if let Some(ms) = pods.last_contact_age_ms {
            self.contact.stamp_ago(Duration::from_millis(ms));
        }
        if pods.synced {
            self.synced.store(true, Ordering::Release);
        }
        Some(taken)
    }

    /// Pods of this node known to be running.
    pub fn live_count(&self) -> usize {
        self.read().live.len()
    }

    /// Seconds since the API server last answered, for the staleness gauge.
    pub fn staleness(&self) -> Option<Duration> {
        self.contact.age()
    }

    /// Serve a request with a token for `pod` from `peer`?
    pub async fn check(self: &Arc<Self>, pod: TokenPod<'_>, peer: IpAddr) -> Result<(), Refusal> {
        if !self.is_synced() {
            return Err(Refusal::NotSynced);
        }
        let peer = peer.to_canonical();
        let mut seen = self.seen(&pod, peer);
        if matches!(seen, Seen::Unknown) {
            let Some(name) = pod.name else {
                return Err(Refusal::UnknownPod);
            };
            self.look_up(pod.namespace, name, pod.uid).await?;
            seen = self.seen(&pod, peer);
        }
        match seen {
            Seen::Mismatch => Err(Refusal::Mismatch),
            Seen::Caller => Ok(()),
            Seen::HostNetworkPod if self.is_host_address(peer) => Ok(()),
            Seen::HostNetworkPod => Err(Refusal::CallerNotPod),
            Seen::NotCaller if self.is_host_address(peer) => Err(Refusal::HostNetworkOnly),
            Seen::NotCaller => Err(Refusal::CallerNotPod),
            Seen::Absent(Absent::Ended) => Err(Refusal::PodGone),
            Seen::Absent(Absent::Malformed) => Err(Refusal::Malformed),
            Seen::Absent(Absent::NotHere) | Seen::Unknown => Err(Refusal::UnknownPod),
        }
    }

    fn seen(&self, token: &TokenPod<'_>, peer: IpAddr) -> Seen {
        let uid = token.uid;
        let state = self.read();
        match state.live.get(uid) {
            Some(pod) if !pod.is_named_by(token) && defence::on(Defence::PodIdentityMatch) => {
                Seen::Mismatch
            }
            Some(pod) if pod.host_network => Seen::HostNetworkPod,
            Some(pod) if pod.ips.contains(&peer) => Seen::Caller,
            Some(_) => Seen::NotCaller,
            None => match state.absent(uid, Instant::now()) {
                Some(why) => Seen::Absent(why),
                None => Seen::Unknown,
            },
        }
    }

    /// One GET per unknown UID at a time, however many requests carry it.
    async fn look_up(
        self: &Arc<Self>,
        namespace: &str,
        name: &str,
        uid: &str,
    ) -> Result<(), Refusal> {
        let mut lookup = {
            let mut in_flight = sync::lock(&self.lookups_in_flight);
            match in_flight.get(uid) {
                Some(lookup) => lookup.clone(),
                None => {
                    let (tx, lookup) = watch::channel(None);
                    in_flight.insert(uid.into(), lookup.clone());
                    let this = self.clone();
                    let (namespace, name, uid) =
                        (namespace.to_owned(), name.to_owned(), uid.to_owned());
                    tokio::spawn(async move {
                        let result = this.fetch_pod(&namespace, &name, &uid).await;
                        sync::lock(&this.lookups_in_flight).remove(uid.as_str());
                        tx.send_replace(Some(result));
                    });
                    lookup
                }
            }
        };
        let result = match lookup.wait_for(Option::is_some).await {
            Ok(result) => result.unwrap_or(Err(Refusal::LookupFailed)),
            Err(_) => Err(Refusal::LookupFailed),
        };
        result
    }

    /// Read one pod; what it says goes into the pod set (live, or gone).
    async fn fetch_pod(&self, namespace: &str, name: &str, uid: &str) -> Result<(), Refusal> {
        let allowed = sync::lock(&self.lookup_budget)
            .try_take(Instant::now())
            .is_ok();
        if !allowed {
            self.metrics.pod_lookup("limited");
            return Err(Refusal::LookupLimited);
        }
        // Queue for a slot only briefly: a pod the API server is slow to describe must not
        // hold up the lookups queued behind it for longer than a client waits.
        let Ok(Ok(_slot)) =
            tokio::time::timeout(LOOKUP_QUEUE_WAIT, self.lookup_slots.acquire()).await
        else {
            self.metrics.pod_lookup("limited");
            return Err(Refusal::LookupLimited);
        };
        let api: Api<PodObject> = Api::namespaced(self.client.clone(), namespace);
        let pod = match tokio::time::timeout(LOOKUP_TIMEOUT, api.get_opt(name)).await {
            Ok(Ok(pod)) => pod,
            Ok(Err(e)) => {
                self.metrics.pod_lookup("error");
                tracing::warn!(namespace, pod = name, error = %error_text(&e), "pod lookup failed");
                return Err(Refusal::LookupFailed);
            }
            Err(_) => {
                self.metrics.pod_lookup("error");
                tracing::warn!(namespace, pod = name, "pod lookup timed out");
                return Err(Refusal::LookupFailed);
            }
        };
        let now = Instant::now();
        let fields = pod.as_ref().map(|p| (p.uid(), p.fields.as_ref()));
        let (result, absent) = match fields {
            None => ("not_found", Some(Absent::NotHere)),
            Some((found, _)) if found != Some(uid) => ("other_pod", Some(Absent::Ended)),
            Some((_, Err(why))) => {
                self.metrics.malformed_pod("get");
                log_malformed(namespace, name, "get", why);
                ("malformed", None)
            }
            Some((_, Ok(p)))
                if p.spec.as_ref().and_then(|s| s.node_name.as_deref())
                    != Some(self.node.as_str()) =>
            {
                ("other_node", Some(Absent::NotHere))
            }
            Some((_, Ok(p))) => match self.facts_of(p, now) {
                Some((found_uid, facts)) => {
                    self.write().revive(found_uid, facts, now);
                    ("found", None)
                }
                None => ("not_running", Some(Absent::Ended)),
            },
        };
        self.metrics.pod_lookup(result);
        if result == "malformed" {
            self.write().mark_malformed(uid, now);
        }
        if let Some(why) = absent {
            self.write().bury(uid, now, why);
        }
        tracing::info!(
            namespace,
            pod = name,
            result,
            "looked up a pod the watch had not delivered"
        );
        Ok(())
    }

    /// UID and caller facts of a pod of this node that has not terminated.
    fn facts_of(&self, pod: &PodFields, now: Instant) -> Option<(Box<str>, PodFacts)> {
        let uid = pod.metadata.uid.as_deref()?;
        let spec = pod.spec.as_ref()?;
        if spec.node_name.as_deref() != Some(self.node.as_str()) {
            return None;
        }
        let status = pod.status.as_ref();
        if matches!(
            status.and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        ) {
            return None;
        }
        let mut ips: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|p| p.ip.parse().ok())
            .collect();
        if ips.is_empty() {
            ips.extend(
                status
                    .and_then(|s| s.pod_ip.as_deref())
                    .and_then(|ip| ip.parse::<IpAddr>().ok()),
            );
        }
        let text = |s: Option<&String>| Box::<str>::from(s.map_or("", String::as_str));
        Some((
            uid.into(),
            PodFacts {
                namespace: text(pod.metadata.namespace.as_ref()),
                name: text(pod.metadata.name.as_ref()),
                service_account: text(spec.service_account_name.as_ref()),
                ips: ips.into_iter().map(|ip| ip.to_canonical()).collect(),
                host_network: spec.host_network.unwrap_or(false),
                since: now,
            },
        ))
    }

    fn is_host_address(&self, ip: IpAddr) -> bool {
        let mut cached = sync::lock(&self.host_addrs);
        let now = Instant::now();
        if cached
            .0
            .is_none_or(|at| now.duration_since(at) >= HOST_ADDRS_TTL)
        {
            *cached = (Some(now), host_addresses());
        }
        cached.1.contains(&ip)
    }

    /// Follow the node's pods until `shutdown` fires, each watch renewed after
    /// `watch_timeout` (`--pod-watch-timeout`).
    pub async fn run(
        self: Arc<Self>,
        watch_timeout: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let api: Api<PodObject> = Api::all(self.client.clone());
        let config = watcher::Config::default()
            .fields(&format!("spec.nodeName={}", self.node))
            .timeout(watch_timeout.as_secs().clamp(1, u64::from(u32::MAX)) as u32);
        let mut events = watcher::watcher(api, config).default_backoff().boxed();
        loop {
            let item = tokio::select! {
                item = events.next() => item,
                _ = shutdown.changed() => return,
            };
            match item {
                Some(Ok(event)) => self.apply(event),
                Some(Err(e)) => {
                    self.metrics.pod_watch_errors.inc();
                    tracing::warn!(error = %error_text(&e), synced = self.is_synced(), "pod watch error; retrying with backoff (the last known pods stay in force)");
                }
                None => return,
            }
        }
    }

    /// Take one event of the watcher (public for the benches and tests, which feed events
    /// without an API server).
    pub fn apply(&self, event: Event<PodObject>) {
        let now = Instant::now();
        let mut relist = sync::lock(&self.relist);
        match event {
            Event::Init => {
                *relist = Some(Relist {
                    started: now,
                    pods: HashMap::new(),
                    malformed: Vec::new(),
                })
            }
            Event::InitApply(pod) => {
                let Some(relist) = relist.as_mut() else {
                    return;
                };
                match &pod.fields {
                    Ok(fields) => {
                        if let Some((uid, facts)) = self.facts_of(fields, now) {
                            relist.pods.insert(uid, facts);
                        }
                    }
                    Err(why) => {
                        self.object_malformed(&pod, "list", why, true);
                        relist.malformed.extend(pod.uid().map(Box::from));
                    }
                }
            }
            Event::InitDone => {
                let Some(Relist {
                    started,
                    mut pods,
                    malformed,
                }) = relist.take()
                else {
                    return;
                };
                let mut gone = Vec::new();
                {
                    let mut state = self.write();
                    for (uid, facts) in state.live.drain() {
                        if pods.contains_key(&uid) || malformed.contains(&uid) {
                            continue;
                        }
                        if facts.since >= started {
                            // Read by a lookup while the list ran: newer than the list.
                            pods.insert(uid, facts);
                        } else {
                            gone.push(uid);
                        }
                    }
                    state.live = pods;
                    for uid in &gone {
                        state.bury(uid, now, Absent::Ended);
                    }
                    for uid in &malformed {
                        state.mark_malformed(uid, now);
                    }
                }
                let first = !self.synced.swap(true, Ordering::AcqRel);
                tracing::info!(
                    pods = self.live_count(),
                    gone = gone.len(),
                    first,
                    "listed this node's pods"
                );
                self.forget(&gone);
            }
            Event::Apply(pod) => match &pod.fields {
                Ok(fields) => match self.facts_of(fields, now) {
                    Some((uid, facts)) => self.write().revive(uid, facts, now),
                    None => self.pod_ended(&pod, now),
                },
                Err(why) => {
                    // Logged once per pod: a server that repeats it must not flood the log.
                    let new = pod
                        .uid()
                        .is_none_or(|uid| self.write().mark_malformed(uid, now));
                    self.object_malformed(&pod, "watch", why, new);
                }
            },
            Event::Delete(pod) => {
                if let Err(why) = &pod.fields {
                    self.object_malformed(&pod, "watch", why, true);
                }
                self.pod_ended(&pod, now)
            }
        }
    }

    fn object_malformed(&self, pod: &PodObject, source: &'static str, why: &str, log: bool) {
        self.metrics.malformed_pod(source);
        if log {
            let name = |n: Option<&str>| error_text(&n.unwrap_or_default());
            log_malformed(&name(pod.namespace()), &name(pod.name()), source, why);
        }
    }

    /// A pod of this node was deleted or has terminated. A deletion is believed from its
    /// UID alone, even when the rest of the object does not parse.
    fn pod_ended(&self, pod: &PodObject, now: Instant) {
        let Some(uid) = pod.uid() else {
            return;
        };
        if let Ok(fields) = &pod.fields {
            if fields.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(self.node.as_str())
            {
                return;
            }
        }
        {
            let mut state = self.write();
            if state.absent(uid, now) == Some(Absent::Ended) {
                return;
            }
            state.bury(uid, now, Absent::Ended);
        }
        tracing::info!(
            namespace = pod.namespace().unwrap_or_default(),
            pod = pod.name().unwrap_or_default(),
            "pod gone; its tokens are refused and its cached credentials dropped"
        );
        self.forget(&[uid.into()]);
    }

    fn forget(&self, uids: &[Box<str>]) {
        for uid in uids {
            // Closed only once the cache is gone, when nothing is left to forget.
            let _ = self.gone.send(uid.clone());
        }
    }
}

/// A pod that does not parse (`why`: bounded text).
fn log_malformed(namespace: &str, name: &str, source: &'static str, why: &str) {
    tracing::warn!(
        namespace,
        pod = name,
        source,
        error = why,
        "a pod from the Kubernetes API server does not parse; its tokens are refused until it does"
    );
}

/// The addresses of the host's interfaces (a hostNetwork caller's source is one of them).
fn host_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|a| {
            let sa = a.address?;
            if let Some(v4) = sa.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                sa.as_sockaddr_in6()
                    .map(|v6| IpAddr::V6(v6.ip()).to_canonical())
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, uid: &str, node: &str, ip: &str, phase: &str) -> PodObject {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns", "uid": uid},
            "spec": {"nodeName": node, "serviceAccountName": "sa", "containers": [{"name": "app"}]},
            "status": {"phase": phase, "podIP": ip, "podIPs": [{"ip": ip}]},
        }))
        .unwrap()
    }

    /// The UIDs a pod set said gone, as the cache would receive them.
    struct Gone(Mutex<(tokio::sync::mpsc::UnboundedReceiver<Box<str>>, Vec<String>)>);

    impl Gone {
        /// Every UID said gone so far.
        fn said(&self) -> Vec<String> {
            let mut inner = self.0.lock().unwrap();
            while let Ok(uid) = inner.0.try_recv() {
                inner.1.push(uid.into());
            }
            inner.1.clone()
        }
    }

    /// A pod set with no API server behind it, fed events by hand; and the UIDs it said gone.
    fn pods_without_api() -> (Arc<NodePods>, Gone) {
        let client =
            kube::Client::try_from(kube::Config::new("https://127.0.0.1:9".parse().unwrap()))
                .unwrap();
        let (said, gone) = tokio::sync::mpsc::unbounded_channel();
        let pods = NodePods::new(
            "node-a".into(),
            client,
            Arc::default(),
            Metrics::new(),
            said,
        );
        (pods, Gone(Mutex::new((gone, Vec::new()))))
    }

    fn list(pods: &NodePods, items: Vec<PodObject>) {
        pods.apply(Event::Init);
        for p in items {
            pods.apply(Event::InitApply(p));
        }
        pods.apply(Event::InitDone);
    }

    /// A running pod of node-a.
    fn running(name: &str, uid: &str, ip: &str) -> PodObject {
        pod(name, uid, "node-a", ip, "Running")
    }

    /// What a request with the token of pod `name` (`uid`, in `ns`, service account `sa`)
    /// from `ip` gets.
    async fn ask(pods: &Arc<NodePods>, name: &str, uid: &str, ip: &str) -> Result<(), Refusal> {
        let token = TokenPod {
            uid,
            namespace: "ns",
            service_account: "sa",
            name: Some(name),
        };
        pods.check(token, ip.parse().unwrap()).await
    }

    #[tokio::test]
    async fn a_relist_forgets_pods_that_vanished_and_keeps_the_rest() {
        let (pods, gone) = pods_without_api();
        let gone = || gone.said();
        assert_eq!(
            ask(&pods, "a", "u1", "10.0.0.1").await,
            Err(Refusal::NotSynced)
        );
        list(
            &pods,
            vec![
                running("a", "u1", "10.0.0.1"),
                running("b", "u2", "10.0.0.2"),
                pod("c", "u3", "node-a", "10.0.0.3", "Succeeded"),
                pod("d", "u4", "node-b", "10.0.0.4", "Running"),
            ],
        );
        assert!(pods.is_synced());
        assert_eq!(pods.live_count(), 2, "ended and foreign pods are not live");
        assert_eq!(ask(&pods, "a", "u1", "10.0.0.1").await, Ok(()));
        // The watch broke; the relist no longer has u2: it was deleted meanwhile.
        list(&pods, vec![running("a", "u1", "10.0.0.1")]);
        assert_eq!(gone(), ["u2"]);
        assert_eq!(
            ask(&pods, "b", "u2", "10.0.0.2").await,
            Err(Refusal::PodGone)
        );
        // A deletion event, then an IP reuse by a new pod.
        pods.apply(Event::Delete(running("a", "u1", "10.0.0.1")));
        pods.apply(Event::Apply(running("a", "u5", "10.0.0.1")));
        assert_eq!(
            ask(&pods, "a", "u1", "10.0.0.1").await,
            Err(Refusal::PodGone)
        );
        assert_eq!(ask(&pods, "a", "u5", "10.0.0.1").await, Ok(()));
        assert_eq!(
            ask(&pods, "a", "u5", "10.0.0.9").await,
            Err(Refusal::CallerNotPod)
        );
        // A late MODIFIED for a deleted pod does not bring it back.
        pods.apply(Event::Apply(running("a", "u1", "10.0.0.1")));
        assert_eq!(
            ask(&pods, "a", "u1", "10.0.0.1").await,
            Err(Refusal::PodGone)
        );
        assert_eq!(gone(), ["u2", "u1"]);
    }

    /// `running`, with `hostNetwork` a string: a pod that does not parse.
    fn malformed(name: &str, uid: &str, ip: &str) -> PodObject {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns", "uid": uid},
            "spec": {"nodeName": "node-a", "serviceAccountName": "sa", "hostNetwork": "yes"},
            "status": {"phase": "Running", "podIPs": [{"ip": ip}]},
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn a_malformed_pod_is_refused_until_it_parses_and_its_list_is_used() {
        let (pods, gone) = pods_without_api();
        list(
            &pods,
            vec![
                malformed("a", "u1", "10.0.0.1"),
                running("b", "u2", "10.0.0.2"),
            ],
        );
        assert!(pods.is_synced());
        assert_eq!(
            ask(&pods, "a", "u1", "10.0.0.1").await,
            Err(Refusal::Malformed)
        );
        assert_eq!(ask(&pods, "b", "u2", "10.0.0.2").await, Ok(()));
        // Mended by an event; broken again by a relist: refused, but not taken for gone.
        pods.apply(Event::Apply(running("a", "u1", "10.0.0.1")));
        assert_eq!(ask(&pods, "a", "u1", "10.0.0.1").await, Ok(()));
        list(
            &pods,
            vec![
                malformed("a", "u1", "10.0.0.1"),
                running("b", "u2", "10.0.0.2"),
            ],
        );
        assert_eq!(
            ask(&pods, "a", "u1", "10.0.0.1").await,
            Err(Refusal::Malformed)
        );
        assert!(gone.said().is_empty());
        // A deletion is believed from the UID, however the rest reads; it is final.
        pods.apply(Event::Delete(malformed("a", "u1", "10.0.0.1")));
        pods.apply(Event::Apply(running("a", "u1", "10.0.0.1")));
        assert_eq!(
            ask(&pods, "a", "u1", "10.0.0.1").await,
            Err(Refusal::PodGone)
        );
        assert_eq!(gone.said(), ["u1"]);
    }

    #[tokio::test]
    async fn a_token_must_name_the_pod_of_its_uid() {
        let (pods, _) = pods_without_api();
        list(&pods, vec![running("a", "u1", "10.0.0.1")]);
        let ip = "10.0.0.1".parse().unwrap();
        let token = TokenPod {
            uid: "u1",
            namespace: "ns",
            service_account: "sa",
            name: Some("a"),
        };
        assert_eq!(pods.check(token, ip).await, Ok(()));
        for other in [
            TokenPod {
                namespace: "other",
                ..token
            },
            TokenPod {
                service_account: "admin",
                ..token
            },
            TokenPod {
                name: Some("b"),
                ..token
            },
            TokenPod {
                name: None,
                ..token
            },
        ] {
            assert_eq!(
                pods.check(other, ip).await,
                Err(Refusal::Mismatch),
                "{other:?}"
            );
        }
    }

    #[test]
    fn host_addresses_include_loopback() {
        assert!(host_addresses().contains(&IpAddr::from([127, 0, 0, 1])));
        assert!(!host_addresses().contains(&IpAddr::from([127, 0, 0, 2])));
    }

    #[test]
    fn gone_pods_are_bounded_and_expire() {
        let mut state = State::default();
        let t0 = Instant::now();
        for i in 0..MAX_GONE + 10 {
            state.bury(
                &format!("uid-{i}"),
                t0 + Duration::from_millis(i as u64),
                Absent::Ended,
            );
        }
        assert!(state.gone.len() <= MAX_GONE);
        let last = format!("uid-{}", MAX_GONE + 9);
        assert_eq!(
            state.absent(&last, t0 + Duration::from_secs(1)),
            Some(Absent::Ended)
        );
        assert_eq!(
            state.absent(&last, t0 + GONE_TTL + Duration::from_secs(60)),
            None
        );
    }
}
