//! This node's pods from the Kubernetes API, kept current.
//!
//! kube-runtime's watcher does the protocol: a paged list, then a watch from the list's
//! resource version with bookmarks, resuming from the last version seen, and a new list when
//! the server answers `410 Gone`. [`NodePods`] is the state it feeds, pure; [`watch_node`]
//! is the task that pumps the events in and publishes a new [`PodIndex`] on every change.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::GetParams;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::watch;

use super::pods::{LocalPod, PodIndex};

/// The pods of this node as the events so far tell, and whether a first list completed.
#[derive(Debug, Default)]
pub struct NodePods {
    /// By uid: the pod and the number of the event that last set it, so that where two pods
    /// claim one address the later one wins.
    pods: BTreeMap<String, (u64, LocalPod)>,
    /// Pods of a list in progress; they replace `pods` when it completes.
    listing: Option<BTreeMap<String, (u64, LocalPod)>>,
    events: u64,
    synced: bool,
}

impl NodePods {
    /// Takes one event; whether the index changed.
    pub fn apply(&mut self, event: watcher::Event<Pod>) -> bool {
        self.events += 1;
        let n = self.events;
        match event {
            watcher::Event::Init => {
                self.listing = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(pod) => {
                if let (Some(listing), Some(local)) = (&mut self.listing, LocalPod::from_api(&pod))
                {
                    listing.insert(local.uid.clone(), (n, local));
                }
                false
            }
            watcher::Event::InitDone => {
                // Pods missing from the list are gone, whatever the watch said before.
                self.pods = self.listing.take().unwrap_or_default();
                self.synced = true;
                true
            }
            watcher::Event::Apply(pod) => {
                let uid = uid_of(&pod);
                let before = self.pods.get(&uid).map(|(_, p)| p.clone());
                match LocalPod::from_api(&pod) {
                    // The same pod with the same identity and addresses: a status tick.
                    Some(local) if before.as_ref() == Some(&local) => false,
                    Some(local) => {
                        self.pods.insert(uid, (n, local));
                        true
                    }
                    // Finished, or not given an address yet: nothing to capture.
                    None => self.pods.remove(&uid).is_some(),
                }
            }
            watcher::Event::Delete(pod) => self.pods.remove(&uid_of(&pod)).is_some(),
        }
    }

    /// Whether a first list completed: before that, the agent knows no pod.
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    pub fn index(&self) -> PodIndex {
        let mut pods: Vec<&(u64, LocalPod)> = self.pods.values().collect();
        pods.sort_by_key(|(n, _)| *n);
        PodIndex::new(pods.into_iter().map(|(_, p)| p.clone()))
    }
}

fn uid_of(pod: &Pod) -> String {
    pod.metadata
        .uid
        .clone()
        .or_else(|| pod.metadata.name.clone())
        .unwrap_or_default()
}

/// What the watch did, for `/stats` and the metrics.
#[derive(Debug, Default)]
pub struct WatchCounters {
    /// Events taken from the API.
    pub events: AtomicU64,
    /// Lists completed: the first, and each after a `410 Gone` or a broken watch.
    pub lists: AtomicU64,
    /// Errors of the list or the watch; each is retried after a backoff.
    pub errors: AtomicU64,
}

/// Watches the pods of `node` through `client` and publishes the index on every change,
/// until every receiver of `publish` is gone. Errors are logged, counted and retried with
/// kube-runtime's default backoff.
pub async fn watch_node(
    client: Client,
    node: String,
    publish: watch::Sender<Arc<PodIndex>>,
    counters: Arc<WatchCounters>,
) {
    let api: Api<Pod> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut events = watcher(api, config).default_backoff().boxed();
    let mut pods = NodePods::default();
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => {
                counters.events.fetch_add(1, Ordering::Relaxed);
                if matches!(event, watcher::Event::InitDone) {
                    counters.lists.fetch_add(1, Ordering::Relaxed);
                }
                if pods.apply(event) {
                    let index = pods.index();
                    tracing::debug!(pods = index.len(), "the node's pods changed");
                    if publish.send(Arc::new(index)).is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "watching the node's pods");
            }
        }
    }
}

/// The watch of this node's pods, running on the runtime it was started on.
pub struct PodWatch {
    pods: watch::Receiver<Arc<PodIndex>>,
    counters: Arc<WatchCounters>,
    task: tokio::task::JoinHandle<()>,
}

/// A client of the API server, as kube's `Client::try_default` makes it: `$KUBECONFIG`,
/// `~/.kube/config`, or the pod's service account.
pub async fn connect() -> Result<Client, kube::Error> {
    Client::try_default().await
}

impl PodWatch {
    /// Starts watching the pods of `node` through `client`.
    pub fn start(client: Client, node: &str) -> Self {
        let (publish, pods) = watch::channel(Arc::default());
        let counters = Arc::new(WatchCounters::default());
        let task = tokio::spawn(watch_node(
            client,
            node.to_owned(),
            publish,
            counters.clone(),
        ));
        Self {
            pods,
            counters,
            task,
        }
    }

    /// Resolves with the pods when they change.
    pub async fn changed(&mut self) -> Arc<PodIndex> {
        if self.pods.changed().await.is_err() {
            // The task ended (it does not, while this holds the receiver): nothing changes.
            std::future::pending::<()>().await;
        }
        self.pods.borrow_and_update().clone()
    }

    pub fn counters(&self) -> &Arc<WatchCounters> {
        &self.counters
    }
}

impl Drop for PodWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The number of ready agents of a DaemonSet, for a cluster budget's share.
pub struct DaemonSetWatch {
    ready: watch::Receiver<Option<u32>>,
    task: tokio::task::JoinHandle<()>,
}

/// How often the DaemonSet's status is read. Agents come and go at the pace of nodes, so a
/// GET now and then (served from the API server's cache) follows them closely enough, at a
/// cost the API server does not notice even with thousands of nodes.
pub const DAEMONSET_POLL: std::time::Duration = std::time::Duration::from_secs(5);

impl DaemonSetWatch {
    /// Starts reading the status of the DaemonSet `name` in `namespace` every
    /// [`DAEMONSET_POLL`]; the agent's Role allows a `get` of that name alone.
    pub fn start(client: Client, namespace: &str, name: &str) -> Self {
        let (publish, ready) = watch::channel(None);
        let api: Api<DaemonSet> = Api::namespaced(client, namespace);
        let name = name.to_owned();
        let task = tokio::spawn(async move {
            let mut every = tokio::time::interval(DAEMONSET_POLL);
            loop {
                every.tick().await;
                let daemonset = match api.get_with(&name, &GetParams::any()).await {
                    Ok(daemonset) => daemonset,
                    Err(e) => {
                        tracing::warn!(error = %e, daemonset = %name, "reading the agents' DaemonSet");
                        continue;
                    }
                };
                let ready = daemonset.status.map_or(0, |s| s.number_ready);
                let ready = u32::try_from(ready).unwrap_or(0);
                if *publish.borrow() != Some(ready) && publish.send(Some(ready)).is_err() {
                    return;
                }
            }
        });
        Self { ready, task }
    }

    /// Resolves with the number of ready agents when it changes.
    pub async fn changed(&mut self) -> u32 {
        loop {
            if self.ready.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            if let Some(ready) = *self.ready.borrow_and_update() {
                return ready;
            }
        }
    }
}

impl Drop for DaemonSetWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use watcher::Event;

    fn pod(uid: &str, ip: &str, phase: &str) -> Pod {
        let json = serde_json::json!({
            "metadata": {"name": uid, "namespace": "shop", "uid": uid, "labels": {"app": "orders"}},
            "spec": {"containers": [{"name": "app"}]},
            "status": {"phase": phase, "podIP": ip, "podIPs": [{"ip": ip}]}
        });
        match serde_json::from_value(json) {
            Ok(pod) => pod,
            Err(e) => panic!("pod: {e}"),
        }
    }

    fn names(pods: &NodePods) -> Vec<String> {
        pods.index().pods().map(|p| p.name.clone()).collect()
    }

    #[test]
    fn a_list_replaces_what_was_known() {
        let mut pods = NodePods::default();
        assert!(!pods.is_synced());
        assert!(!pods.apply(Event::Init));
        assert!(!pods.apply(Event::InitApply(pod("a", "198.18.1.1", "Running"))));
        assert!(!pods.apply(Event::InitApply(pod("b", "198.18.1.2", "Running"))));
        assert!(names(&pods).is_empty(), "nothing before the list completes");
        assert!(pods.apply(Event::InitDone));
        assert!(pods.is_synced());
        assert_eq!(names(&pods), ["a", "b"]);
        // A relist (after 410 Gone) that no longer has `a`: it went while the watch was down.
        pods.apply(Event::Init);
        pods.apply(Event::InitApply(pod("b", "198.18.1.2", "Running")));
        assert_eq!(
            names(&pods),
            ["a", "b"],
            "the old set holds until the list completes"
        );
        pods.apply(Event::InitDone);
        assert_eq!(names(&pods), ["b"]);
    }

    #[test]
    fn changes_and_status_ticks() {
        let mut pods = NodePods::default();
        pods.apply(Event::Init);
        pods.apply(Event::InitDone);
        assert!(pods.apply(Event::Apply(pod("a", "198.18.1.1", "Running"))));
        assert!(
            !pods.apply(Event::Apply(pod("a", "198.18.1.1", "Running"))),
            "the same pod again changes nothing"
        );
        assert!(
            pods.apply(Event::Apply(pod("a", "198.18.1.9", "Running"))),
            "a new address"
        );
        assert!(
            pods.apply(Event::Apply(pod("a", "198.18.1.9", "Succeeded"))),
            "finished"
        );
        assert!(names(&pods).is_empty());
        assert!(!pods.apply(Event::Delete(pod("a", "198.18.1.9", "Succeeded"))));
        assert!(pods.apply(Event::Apply(pod("c", "198.18.1.3", "Running"))));
        assert!(pods.apply(Event::Delete(pod("c", "198.18.1.3", "Running"))));
        assert!(names(&pods).is_empty());
    }

    #[test]
    fn a_reused_address_belongs_to_the_pod_seen_last() {
        let mut pods = NodePods::default();
        pods.apply(Event::Init);
        pods.apply(Event::InitDone);
        pods.apply(Event::Apply(pod("new", "198.18.1.1", "Running")));
        pods.apply(Event::Apply(pod("old", "198.18.1.1", "Running")));
        pods.apply(Event::Apply(pod("new", "198.18.1.1", "Running")));
        let index = pods.index();
        let server = index.server("198.18.1.1:80".parse().expect("addr"));
        // `new` did not change, so its event number is its first; `old` came after it.
        assert_eq!(server.map(|p| p.name.as_str()), Some("old"));
    }
}
