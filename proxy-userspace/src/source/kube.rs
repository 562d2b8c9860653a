//! The Kubernetes API source: kube-rs watchers on v1 Services, discovery.k8s.io/v1
//! EndpointSlices and this node's v1 Node, fed into the model's `on_*` handlers.
//!
//! - Each kind keeps the resourceVersion of every object it knows (not the object: the
//!   model's trackers keep what they need), so unchanged objects are not handed on. A relist
//!   (`Init`, `InitApply`..., `InitDone`, after a start, a 410 Gone or an interrupted list)
//!   hands on each listed object as it comes; at `InitDone` the objects known before and not
//!   re-listed are deleted, as kube-rs's watcher docs ask ("should be assumed to have been
//!   Deleted").
//! - `initial_sync_done` turns true once Services and EndpointSlices have both completed a
//!   list: a half-known cluster is never programmed. The Node is not waited for (a node need
//!   not be registered for kproxy to serve).
//! - The API server going away leaves the model as it is (the agent keeps serving the last
//!   state); the watchers retry with a backoff capped at [`RETRY_MAX`] (kube's default grows
//!   to 30 s) and resume from their resourceVersion, or relist after 410 Gone (kube-rs's
//!   watcher does that on its own: a 410 watch event resets it to a fresh list).
//! - Failures are logged at warn once, then at most every [`WARN_EVERY`] while they last,
//!   and the recovery once.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    marker::PhantomData,
    path::Path,
    pin::Pin,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use futures::{Stream, StreamExt, stream};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt,
        utils::Backoff,
        watcher::{self, Event},
    },
};
use tracing::{debug, info, warn};

use super::ObjectKind;
use crate::model::{Model, NamespacedName};

/// The first retry delay after a failed list or watch.
pub const RETRY_MIN: Duration = Duration::from_millis(100);
/// The largest retry delay: the API server coming back is noticed within about this long.
pub const RETRY_MAX: Duration = Duration::from_secs(1);
/// While a watcher keeps failing, a warning at most this often.
pub const WARN_EVERY: Duration = Duration::from_secs(30);
/// Server-side watch timeout. A connection that goes silent without closing is noticed
/// after this plus kube-rs's 5 s margin.
pub const WATCH_TIMEOUT_SECS: u32 = 60;
/// Connecting to the API server gives up after this long (and is retried).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Exponential backoff from [`RETRY_MIN`] doubling up to [`RETRY_MAX`], with ±20% jitter so
/// the nodes of a cluster do not retry in step. Never gives up; reset by any success.
#[derive(Debug, Clone)]
pub struct CappedBackoff {
    min: Duration,
    max: Duration,
    next: Duration,
    seed: u64,
}

impl CappedBackoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15)
            | 1;
        Self {
            min,
            max,
            next: min,
            seed,
        }
    }
}

impl Default for CappedBackoff {
    fn default() -> Self {
        Self::new(RETRY_MIN, RETRY_MAX)
    }
}

impl Iterator for CappedBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        // xorshift64: jitter only, no need for a real RNG.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        // 80%..120% of the base, then capped.
        let permille = 800 + (self.seed % 401);
        Some((base * permille as u32 / 1000).min(self.max))
    }
}

impl Backoff for CappedBackoff {
    fn reset(&mut self) {
        self.next = self.min;
    }
}

/// Rate-limited reporting of a failing watcher: the first failure, then one line every
/// `every` while failures go on, then the recovery.
#[derive(Debug)]
struct FailureLog {
    every: Duration,
    failing_since: Option<Instant>,
    failures: u64,
    suppressed: u64,
    last_warn: Option<Instant>,
}

impl FailureLog {
    fn new(every: Duration) -> Self {
        Self {
            every,
            failing_since: None,
            failures: 0,
            suppressed: 0,
            last_warn: None,
        }
    }

    /// Records a failure; returns whether to log it (and how many were not logged before it).
    fn failure(&mut self, now: Instant) -> Option<u64> {
        self.failing_since.get_or_insert(now);
        self.failures += 1;
        if self
            .last_warn
            .is_none_or(|t| now.duration_since(t) >= self.every)
        {
            self.last_warn = Some(now);
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }

    /// Records a success; returns `(failures, since)` when it ends a run of failures.
    fn success(&mut self) -> Option<(u64, Instant)> {
        let since = self.failing_since.take()?;
        let n = std::mem::take(&mut self.failures);
        self.suppressed = 0;
        self.last_warn = None;
        Some((n, since))
    }
}

/// What of a watched object the proxy never reads and keeping it costs: dropped before the
/// object is stored (at 100,000 endpoints, every endpoint's targetRef adds up).
trait DropUnused {
    fn drop_unused(&mut self) {}
}

impl DropUnused for Service {}

impl DropUnused for EndpointSlice {
    fn drop_unused(&mut self) {
        for ep in &mut self.endpoints {
            ep.target_ref = None;
            ep.hostname = None;
            ep.deprecated_topology = None;
        }
    }
}

impl DropUnused for Node {
    fn drop_unused(&mut self) {
        // Container images listed per node: large, and no concern of a proxy.
        if let Some(status) = self.status.as_mut() {
            status.images = None;
        }
    }
}

/// What the source remembers of an object between events: its `resourceVersion`, which the
/// API server changes with every write. Not the object itself: the model's trackers keep
/// what they need of it, and a second copy of 10,000 Services and their EndpointSlices
/// would be most of the agent's memory. Objects without one always count as changed (the
/// trackers drop no-op changes).
type Fingerprint = Option<String>;

fn fingerprint<K: kube::Resource>(obj: &K) -> Fingerprint {
    obj.meta().resource_version.clone()
}

/// An object standing for a deleted one: its name and namespace only, which is all the
/// model reads of a deleted object.
fn tombstone<K: kube::Resource + Default>(key: &NamespacedName, cluster_scoped: bool) -> K {
    let mut obj = K::default();
    let meta = obj.meta_mut();
    meta.name = Some(key.name.clone());
    if !cluster_scoped {
        meta.namespace = Some(key.namespace.clone());
    }
    obj
}

/// A list in progress: the keys it listed so far (whatever is known and not listed by
/// `InitDone` was deleted), and whether it changed anything yet.
#[derive(Default)]
struct Relist {
    listed: BTreeSet<NamespacedName>,
    changed: bool,
}

/// One watched kind: what is known of its objects, the relist in progress, sync state.
struct Tracked<K> {
    kind: ObjectKind,
    known: BTreeMap<NamespacedName, Fingerprint>,
    /// The list in progress (`Init` .. `InitDone`).
    relist: Option<Relist>,
    /// A list completed at least once.
    synced: bool,
    relists: u64,
    log: FailureLog,
    /// The kind's Rust type (only objects of it pass through, none is kept).
    object: PhantomData<fn(K)>,
}

impl<K> Tracked<K>
where
    K: kube::Resource + Clone + Default + DropUnused,
{
    fn new(kind: ObjectKind) -> Self {
        Self {
            kind,
            known: BTreeMap::new(),
            relist: None,
            synced: false,
            relists: 0,
            log: FailureLog::new(WARN_EVERY),
            object: PhantomData,
        }
    }

    fn key(obj: &K) -> NamespacedName {
        NamespacedName::of(obj.meta())
    }

    fn tombstone(&self, key: &NamespacedName) -> K {
        tombstone(key, self.kind == ObjectKind::Node)
    }

    /// Whether `obj` differs from what is known under its key.
    fn changed(&self, key: &NamespacedName, obj: &K) -> bool {
        match (self.known.get(key), fingerprint(obj)) {
            (Some(Some(known)), Some(new)) => *known != new,
            _ => true,
        }
    }

    /// Drops what the proxy never reads and a real cluster makes large (kube-rs's
    /// `strip_fields` idea): managedFields and kubectl's last-applied copy of the object.
    fn strip(obj: &mut K) {
        obj.drop_unused();
        let meta = obj.meta_mut();
        meta.managed_fields = None;
        if let Some(a) = meta.annotations.as_mut() {
            a.remove("kubectl.kubernetes.io/last-applied-configuration");
        }
    }

    /// Applies one watcher event, reporting each change as `(old, new)` to `on_change`
    /// (`old` of a deleted object is a tombstone carrying its name). Returns whether anything
    /// was reported or the kind became synced.
    fn handle(
        &mut self,
        event: Result<Event<K>, watcher::Error>,
        on_change: &mut dyn FnMut(Option<&K>, Option<&K>),
    ) -> bool {
        let event = match event {
            Ok(e) => e,
            Err(err) => {
                self.failure(&err);
                return false;
            }
        };
        if let Some((n, since)) = self.log.success() {
            info!(
                kind = self.kind.as_str(),
                failures = n,
                outage_ms = since.elapsed().as_millis() as u64,
                "API watch recovered"
            );
        }
        match event {
            Event::Init => {
                if self.relist.is_some() {
                    debug!(kind = self.kind.as_str(), "list restarted");
                }
                self.relist = Some(Relist::default());
                false
            }
            Event::InitApply(obj) => {
                // Handed on at once, not buffered until `InitDone`: 10,000 buffered objects
                // were the agent's peak memory, and their release left the heap in holes.
                // The agent programs nothing before the first list is done; during a later
                // relist each object is at its old or its new version, as during a watch.
                let key = Self::key(&obj);
                let relist = self.relist.get_or_insert_with(Relist::default);
                relist.listed.insert(key.clone());
                if self.apply(key, obj, on_change)
                    && let Some(r) = self.relist.as_mut()
                {
                    r.changed = true;
                }
                // The caller is woken once, at `InitDone`.
                false
            }
            Event::InitDone => {
                let Relist {
                    listed,
                    mut changed,
                } = self.relist.take().unwrap_or_default();
                let gone: Vec<NamespacedName> = self
                    .known
                    .keys()
                    .filter(|key| !listed.contains(*key))
                    .cloned()
                    .collect();
                for key in gone {
                    debug!(kind = self.kind.as_str(), %key, "gone in the relist");
                    self.known.remove(&key);
                    on_change(Some(&self.tombstone(&key)), None);
                    changed = true;
                }
                self.relists += 1;
                let first = !self.synced;
                self.synced = true;
                if first {
                    info!(
                        kind = self.kind.as_str(),
                        objects = self.known.len(),
                        "initial list done"
                    );
                } else {
                    debug!(
                        kind = self.kind.as_str(),
                        objects = self.known.len(),
                        changed,
                        "relist done"
                    );
                }
                changed || first
            }
            Event::Apply(obj) => self.apply(Self::key(&obj), obj, on_change),
            Event::Delete(obj) => {
                let key = Self::key(&obj);
                match self.known.remove(&key) {
                    Some(_) => {
                        on_change(Some(&self.tombstone(&key)), None);
                        true
                    }
                    None => false,
                }
            }
        }
    }

    /// An added or updated object: reported (stripped) unless its resourceVersion is the one
    /// known. Returns whether it was reported.
    fn apply(
        &mut self,
        key: NamespacedName,
        mut obj: K,
        on_change: &mut dyn FnMut(Option<&K>, Option<&K>),
    ) -> bool {
        if !self.changed(&key, &obj) {
            return false;
        }
        Self::strip(&mut obj);
        let old = self
            .known
            .insert(key.clone(), fingerprint(&obj))
            .map(|_| self.tombstone(&key));
        on_change(old.as_ref(), Some(&obj));
        true
    }

    fn failure(&mut self, err: &watcher::Error) {
        let gone = matches!(err, watcher::Error::WatchError(s) if s.code == 410);
        if gone {
            // Not an outage: the watcher relists at once.
            info!(
                kind = self.kind.as_str(),
                "watch expired (410 Gone): relisting"
            );
            return;
        }
        if let Some(suppressed) = self.log.failure(Instant::now()) {
            warn!(
                kind = self.kind.as_str(),
                failures = self.log.failures,
                not_logged = suppressed,
                retry_max_ms = RETRY_MAX.as_millis() as u64,
                "API watch failing (serving the last known state, retrying): {err}"
            );
        } else {
            debug!(kind = self.kind.as_str(), "API watch failing: {err}");
        }
    }
}

type WatchResult<K> = Result<Event<K>, watcher::Error>;

/// An event of one of the three watchers (boxed: the objects are large and of very
/// different sizes).
enum SourceEvent {
    Service(Box<WatchResult<Service>>),
    EndpointSlice(Box<WatchResult<EndpointSlice>>),
    Node(Box<WatchResult<Node>>),
}

type EventStream = Pin<Box<dyn Stream<Item = SourceEvent> + Send>>;

/// Counters for tests and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KubeSourceStats {
    /// Completed lists (the initial one included) per kind.
    pub service_lists: u64,
    pub endpoint_slice_lists: u64,
    pub node_lists: u64,
    /// Services, EndpointSlices and Nodes in the stores.
    pub services: usize,
    pub endpoint_slices: usize,
    pub nodes: usize,
}

/// Watches the API server; see the module docs.
pub struct KubeSource {
    events: EventStream,
    services: Tracked<Service>,
    slices: Tracked<EndpointSlice>,
    nodes: Tracked<Node>,
    server: String,
    /// Kinds of the changes handed to the model, not yet taken by the agent.
    changes: Vec<ObjectKind>,
}

impl fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeSource")
            .field("server", &self.server)
            .field("stats", &self.stats())
            .finish()
    }
}

/// The client configuration: `--kubeconfig` if given, else the in-cluster service account,
/// else the default kubeconfig (`$KUBECONFIG`, `~/.kube/config`).
pub async fn client_config(kubeconfig: Option<&Path>) -> anyhow::Result<Config> {
    let mut config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("loading kubeconfig {}", path.display()))?
        }
        None => match Config::incluster() {
            Ok(c) => c,
            Err(in_cluster) => Config::from_kubeconfig(&KubeConfigOptions::default())
                .await
                .with_context(|| {
                    format!(
                        "no API server configuration: not in a cluster ({in_cluster}) and no usable \
                         kubeconfig (pass --kubeconfig PATH or --manifests PATH)"
                    )
                })?,
        },
    };
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    Ok(config)
}

impl KubeSource {
    /// Builds the client (see [`client_config`]) and starts the watchers. Does not wait for
    /// the API server: while it cannot be reached, `next` simply yields nothing.
    pub async fn connect(kubeconfig: Option<&Path>, node_name: &str) -> anyhow::Result<Self> {
        let config = client_config(kubeconfig).await?;
        let server = config.cluster_url.to_string();
        let client = Client::try_from(config).context("building the API client")?;
        info!(%server, node = node_name, "watching the Kubernetes API");
        Ok(Self::with_client(client, node_name, server))
    }

    /// Starts the watchers on an existing client.
    pub fn with_client(client: Client, node_name: &str, server: String) -> Self {
        let config = watcher::Config::default().timeout(WATCH_TIMEOUT_SECS);
        let services = watcher::watcher(Api::<Service>::all(client.clone()), config.clone())
            .backoff(CappedBackoff::default())
            .map(|e| SourceEvent::Service(Box::new(e)));
        let slices = watcher::watcher(Api::<EndpointSlice>::all(client.clone()), config.clone())
            .backoff(CappedBackoff::default())
            .map(|e| SourceEvent::EndpointSlice(Box::new(e)));
        let nodes = watcher::watcher(
            Api::<Node>::all(client),
            config.fields(&format!("metadata.name={node_name}")),
        )
        .backoff(CappedBackoff::default())
        .map(|e| SourceEvent::Node(Box::new(e)));
        let events: EventStream = Box::pin(stream::select_all([
            services.boxed(),
            slices.boxed(),
            nodes.boxed(),
        ]));
        Self {
            events,
            services: Tracked::new(ObjectKind::Service),
            slices: Tracked::new(ObjectKind::EndpointSlice),
            nodes: Tracked::new(ObjectKind::Node),
            server,
            changes: Vec::new(),
        }
    }

    /// Waits for the next change and applies it (and nothing else) to the model's trackers
    /// through `on_service` / `on_endpoint_slice` / `on_node`; the caller applies them with
    /// `Model::apply_pending` (possibly batching several calls). Returns once something was
    /// handed to the model or the initial sync completed. While the API server is away this
    /// just waits.
    ///
    /// Cancel-safe: dropping the future (e.g. in `tokio::select!`) loses nothing; every event
    /// taken from the watchers has been applied to the model by then.
    pub async fn next(&mut self, model: &mut Model) -> anyhow::Result<()> {
        loop {
            let was_synced = self.initial_sync_done();
            let event = self.events.next().await.context("the API watchers ended")?;
            let changed = self.handle(event, model);
            if changed || (!was_synced && self.initial_sync_done()) {
                return Ok(());
            }
        }
    }

    fn handle(&mut self, event: SourceEvent, model: &mut Model) -> bool {
        let changes = &mut self.changes;
        match event {
            SourceEvent::Service(e) => self.services.handle(*e, &mut |o, n| {
                model.on_service(o, n);
                changes.push(ObjectKind::Service);
            }),
            SourceEvent::EndpointSlice(e) => self.slices.handle(*e, &mut |o, n| {
                model.on_endpoint_slice(o, n);
                changes.push(ObjectKind::EndpointSlice);
            }),
            SourceEvent::Node(e) => self.nodes.handle(*e, &mut |o, n| {
                model.on_node(o, n);
                changes.push(ObjectKind::Node);
            }),
        }
    }

    /// The kinds of the objects handed to the model since the last call, one entry per
    /// added, changed or deleted object (for the change metrics).
    pub fn take_changes(&mut self) -> Vec<ObjectKind> {
        std::mem::take(&mut self.changes)
    }

    /// Services and EndpointSlices have both completed their initial list: the model is a
    /// whole picture of the cluster and may be programmed.
    pub fn initial_sync_done(&self) -> bool {
        self.services.synced && self.slices.synced
    }

    /// The API server URL in use.
    pub fn server(&self) -> &str {
        &self.server
    }

    pub fn stats(&self) -> KubeSourceStats {
        KubeSourceStats {
            service_lists: self.services.relists,
            endpoint_slice_lists: self.slices.relists,
            node_lists: self.nodes.relists,
            services: self.services.known.len(),
            endpoint_slices: self.slices.known.len(),
            nodes: self.nodes.known.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;
    use crate::{desired::NodeContext, model::testutil::*};

    fn with_rv<K: kube::Resource>(mut obj: K, rv: &str) -> K {
        obj.meta_mut().resource_version = Some(rv.to_owned());
        obj
    }

    fn svc_handle(
        t: &mut Tracked<Service>,
        model: &mut Model,
        e: Result<Event<Service>, watcher::Error>,
    ) -> bool {
        t.handle(e, &mut |o, n| {
            model.on_service(o, n);
        })
    }

    #[test]
    fn relist_deletes_what_was_not_relisted() {
        let mut t = Tracked::<Service>::new(ObjectKind::Service);
        let mut model = Model::new();
        let a = with_rv(simple_service("a", "10.96.0.1", 80, "80"), "1");
        let b = with_rv(simple_service("b", "10.96.0.2", 80, "80"), "2");
        assert!(!svc_handle(&mut t, &mut model, Ok(Event::Init)));
        assert!(!svc_handle(
            &mut t,
            &mut model,
            Ok(Event::InitApply(a.clone()))
        ));
        assert!(!svc_handle(
            &mut t,
            &mut model,
            Ok(Event::InitApply(b.clone()))
        ));
        assert!(!t.synced, "not synced before InitDone");
        assert!(
            model.has_pending(),
            "listed objects reach the model as they come"
        );
        assert!(svc_handle(&mut t, &mut model, Ok(Event::InitDone)));
        assert!(t.synced);
        model.apply_pending();
        assert_eq!(model.desired(&NodeContext::default()).frontends.len(), 2);

        // Relist after a 410: b is gone, a changed.
        let a2 = with_rv(simple_service("a", "10.96.0.1", 81, "80"), "7");
        svc_handle(&mut t, &mut model, Ok(Event::Init));
        svc_handle(&mut t, &mut model, Ok(Event::InitApply(a2)));
        assert!(svc_handle(&mut t, &mut model, Ok(Event::InitDone)));
        let ch = model.apply_pending();
        assert_eq!(ch.services.len(), 2);
        let d = model.desired(&NodeContext::default());
        assert_eq!(d.frontends.len(), 1);
        assert_eq!(d.frontends[0].port, 81);

        // The same relist again: nothing to report.
        let a2 = with_rv(simple_service("a", "10.96.0.1", 81, "80"), "7");
        svc_handle(&mut t, &mut model, Ok(Event::Init));
        svc_handle(&mut t, &mut model, Ok(Event::InitApply(a2)));
        assert!(!svc_handle(&mut t, &mut model, Ok(Event::InitDone)));
        assert_eq!(t.relists, 3);
    }

    #[test]
    fn interrupted_list_restarts_clean() {
        let mut t = Tracked::<Service>::new(ObjectKind::Service);
        let mut model = Model::new();
        let a = with_rv(simple_service("a", "10.96.0.1", 80, "80"), "1");
        let b = with_rv(simple_service("b", "10.96.0.2", 80, "80"), "2");
        svc_handle(&mut t, &mut model, Ok(Event::Init));
        svc_handle(&mut t, &mut model, Ok(Event::InitApply(b)));
        svc_handle(&mut t, &mut model, Err(watcher::Error::NoResourceVersion));
        // The watcher starts over; b was deleted in between.
        svc_handle(&mut t, &mut model, Ok(Event::Init));
        svc_handle(&mut t, &mut model, Ok(Event::InitApply(a)));
        svc_handle(&mut t, &mut model, Ok(Event::InitDone));
        assert_eq!(t.known.len(), 1);
        model.apply_pending();
        assert_eq!(model.services().len(), 1);
    }

    #[test]
    fn apply_and_delete_by_name() {
        let mut t = Tracked::<Service>::new(ObjectKind::Service);
        let mut model = Model::new();
        svc_handle(&mut t, &mut model, Ok(Event::Init));
        svc_handle(&mut t, &mut model, Ok(Event::InitDone));
        let a = with_rv(simple_service("a", "10.96.0.1", 80, "80"), "3");
        assert!(svc_handle(&mut t, &mut model, Ok(Event::Apply(a.clone()))));
        assert!(!svc_handle(&mut t, &mut model, Ok(Event::Apply(a.clone()))));
        model.apply_pending();
        assert_eq!(model.services().len(), 1);
        // A delete of an unknown object is ignored; of a known one, is reported by name.
        let mut other = a.clone();
        other.metadata = ObjectMeta {
            name: Some("zzz".into()),
            ..Default::default()
        };
        assert!(!svc_handle(&mut t, &mut model, Ok(Event::Delete(other))));
        assert!(svc_handle(&mut t, &mut model, Ok(Event::Delete(a))));
        model.apply_pending();
        assert!(model.services().is_empty());
    }

    #[test]
    fn backoff_is_capped_and_resets() {
        let mut b = CappedBackoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<Duration> = (&mut b).take(12).collect();
        assert!(delays[0] >= Duration::from_millis(80) && delays[0] <= Duration::from_millis(120));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(1)));
        assert!(delays[8] >= Duration::from_millis(800));
        b.reset();
        assert!(b.next().unwrap() <= Duration::from_millis(120));
    }

    #[test]
    fn failure_log_is_rate_limited() {
        let mut log = FailureLog::new(Duration::from_secs(30));
        let t0 = Instant::now();
        assert_eq!(log.failure(t0), Some(0));
        for i in 1..30 {
            assert_eq!(log.failure(t0 + Duration::from_secs(i)), None);
        }
        assert_eq!(log.failure(t0 + Duration::from_secs(30)), Some(29));
        assert_eq!(log.success().map(|(n, _)| n), Some(31));
        assert_eq!(log.success(), None);
        assert_eq!(log.failure(t0 + Duration::from_secs(31)), Some(0));
    }
}
