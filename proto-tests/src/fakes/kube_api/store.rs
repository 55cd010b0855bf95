//! The change log: every change to a pod, numbered by one global resourceVersion as etcd
//! numbers its revisions. Watches replay it, paged lists read their snapshot from it, and
//! compaction is a mark in it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use super::{GetAnswer, KubePod};

/// The resourceVersion before the first change. A real cluster is far past 1, and clients
/// must treat the value as opaque; a large start catches one that counts from 1.
pub(super) const FIRST_RESOURCE_VERSION: u64 = 1000;

/// A stored pod at one resourceVersion.
#[derive(Debug)]
pub(super) struct Stored {
    pub(super) pod: KubePod,
    pub(super) resource_version: u64,
    /// Seconds since the epoch; kept across updates.
    pub(super) created: i64,
}

/// One entry of the change log.
#[derive(Clone, Debug)]
pub(super) struct Change {
    pub(super) resource_version: u64,
    pub(super) before: Option<Arc<Stored>>,
    pub(super) after: Option<Arc<Stored>>,
    /// False for a pod added with `add_pod_unannounced`: no watch ever delivers it.
    pub(super) announced: bool,
    /// When open watches may deliver it (`set_watch_delay`).
    deliver_at: Instant,
}

#[derive(Debug)]
pub(super) struct Store {
    /// The latest resourceVersion: that of the last change.
    pub(super) resource_version: u64,
    /// The current pods by key.
    pub(super) pods: BTreeMap<String, Arc<Stored>>,
    /// Every change, in resourceVersion order. Never trimmed (a test makes few changes), so
    /// open watches keep every event; compaction only moves `compacted`.
    changes: Vec<Change>,
    /// Watches and list continuations from before this resourceVersion get `410 Gone`.
    pub(super) compacted: u64,
    pub(super) watch_delay: Duration,
    /// How long a single-pod GET takes to answer (`set_get_delay`).
    pub(super) get_delay: Duration,
    /// How a single-pod GET is answered (`set_get_answer`).
    pub(super) get_answer: GetAnswer,
    /// Namespaces: a cluster's own, and every namespace a pod was added to (they outlive
    /// their pods, as namespaces do).
    pub(super) namespaces: BTreeMap<String, Namespace>,
    /// The nodes; their writes take resourceVersions from the same sequence.
    pub(super) nodes: super::nodes::Nodes,
}

/// A namespace: its creation's resourceVersion and time.
#[derive(Debug)]
pub(super) struct Namespace {
    pub(super) resource_version: u64,
    pub(super) created: i64,
}

/// The namespaces every cluster has.
const SYSTEM_NAMESPACES: [&str; 4] = ["default", "kube-node-lease", "kube-public", "kube-system"];

impl Store {
    pub(super) fn new() -> Store {
        let namespace = || Namespace {
            resource_version: FIRST_RESOURCE_VERSION,
            created: unix_now(),
        };
        Store {
            resource_version: FIRST_RESOURCE_VERSION,
            pods: BTreeMap::new(),
            changes: Vec::new(),
            compacted: 0,
            watch_delay: Duration::ZERO,
            get_delay: Duration::ZERO,
            get_answer: GetAnswer::Pod,
            namespaces: SYSTEM_NAMESPACES
                .iter()
                .map(|ns| (ns.to_string(), namespace()))
                .collect(),
            nodes: super::nodes::Nodes::default(),
        }
    }

    /// Record a change of the pod at `key` to `after` (`None`: deleted).
    pub(super) fn change(&mut self, key: String, after: Option<KubePod>, announced: bool) {
        self.resource_version += 1;
        let resource_version = self.resource_version;
        let before = self.pods.get(&key).cloned();
        let after = after.map(|pod| {
            Arc::new(Stored {
                pod,
                resource_version,
                created: before.as_ref().map_or_else(unix_now, |b| b.created),
            })
        });
        match &after {
            Some(stored) => {
                self.namespaces
                    .entry(stored.pod.namespace.clone())
                    .or_insert(Namespace {
                        resource_version,
                        created: stored.created,
                    });
                self.pods.insert(key, stored.clone())
            }
            None => self.pods.remove(&key),
        };
        let delay = if announced {
            self.watch_delay
        } else {
            Duration::ZERO
        };
        self.changes.push(Change {
            resource_version,
            before,
            after,
            announced,
            deliver_at: Instant::now() + delay,
        });
    }

    /// The pods as they were at `resource_version` (not older than `compacted`).
    pub(super) fn snapshot_at(&self, resource_version: u64) -> BTreeMap<String, Arc<Stored>> {
        if resource_version >= self.resource_version {
            return self.pods.clone();
        }
        let mut pods = BTreeMap::new();
        for change in self
            .changes
            .iter()
            .take_while(|c| c.resource_version <= resource_version)
        {
            match (&change.after, &change.before) {
                (Some(after), _) => pods.insert(after.pod.key(), after.clone()),
                (None, Some(before)) => pods.remove(&before.pod.key()),
                (None, None) => None,
            };
        }
        pods
    }

    /// The changes after `cursor` that a watch may deliver at `now`, in order, and the
    /// resourceVersion a bookmark may carry: every change up to it is delivered once `due` is.
    pub(super) fn due_after(
        &self,
        cursor: u64,
        now: Instant,
    ) -> (Vec<Change>, Option<Instant>, u64) {
        let start = self
            .changes
            .partition_point(|c| c.resource_version <= cursor);
        let mut due = Vec::new();
        for change in &self.changes[start..] {
            if change.deliver_at > now {
                return (due, Some(change.deliver_at), change.resource_version - 1);
            }
            due.push(change.clone());
        }
        (due, None, self.resource_version)
    }
}

pub(super) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fakes::kube_api::test_pod;

    #[test]
    fn the_change_log_gives_snapshots_and_delayed_deliveries() {
        let mut store = Store::new();
        let start = store.resource_version;
        store.change("a/x".to_owned(), Some(test_pod("a", "x", "n")), true);
        store.change("a/y".to_owned(), Some(test_pod("a", "y", "n")), false);
        store.change("a/x".to_owned(), None, true);
        assert!(store.namespaces.contains_key("a"));
        let keys = |rv| store.snapshot_at(rv).into_keys().collect::<Vec<_>>();
        assert_eq!(keys(start), Vec::<String>::new());
        assert_eq!(keys(start + 1), ["a/x"]);
        assert_eq!(keys(start + 2), ["a/x", "a/y"]);
        assert_eq!(keys(start + 3), ["a/y"]);

        let now = Instant::now();
        let (due, next, bookmark) = store.due_after(start + 1, now);
        assert_eq!(
            due.iter().map(|c| c.resource_version).collect::<Vec<_>>(),
            [start + 2, start + 3]
        );
        assert_eq!((next, bookmark), (None, start + 3));

        store.watch_delay = Duration::from_secs(60);
        store.change("a/z".to_owned(), Some(test_pod("a", "z", "n")), true);
        let (due, next, bookmark) = store.due_after(start + 3, now);
        assert!(due.is_empty());
        assert!(next.is_some());
        assert_eq!(bookmark, start + 3, "no bookmark past an undelivered event");
        let (due, _, bookmark) = store.due_after(start + 3, now + Duration::from_secs(61));
        assert_eq!(due.len(), 1);
        assert_eq!(bookmark, start + 4);
    }
}
