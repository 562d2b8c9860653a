//! Endpoints: EndpointSlices merged per service into the `EndpointsMap`, and the
//! `EndpointsChangeTracker` (kube-proxy's `endpointschangetracker.go` and
//! `endpointslicecache.go`).

use std::{
    collections::{BTreeMap, BTreeSet, btree_map::Entry},
    net::Ipv4Addr,
    sync::Arc,
};

use super::family::IpFamilyAddr;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use tracing::{debug, warn};

use super::{
    Change, NamespacedName,
    service::{LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME, parse_protocol, valid_port},
    small_map::SmallMap,
};
use crate::desired::Protocol;

/// The label naming an EndpointSlice's Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";

/// One named port of an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointPort {
    /// `None`: the slice's port has no number, meaning "all ports"; the service port's
    /// numeric targetPort is used.
    pub port: Option<u16>,
    pub protocol: Protocol,
}

/// One endpoint of a service (kube-proxy's `BaseEndpointInfo`), of the IP family `A`
/// (IPv4 unless named).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointInfo<A = Ipv4Addr> {
    pub address: A,
    /// Port name -> port, from the slice's `ports`. `None` when the slice had no ports list:
    /// the service port's numeric targetPort applies. Shared by the endpoints of a slice
    /// (one map per slice, not per endpoint: 100,000 endpoints would each hold a copy).
    pub ports: Option<Arc<SmallMap<String, EndpointPort>>>,
    /// `conditions.ready`; unset counts as true.
    pub ready: bool,
    /// `conditions.serving`; unset counts as true.
    pub serving: bool,
    /// `conditions.terminating`; unset counts as false.
    pub terminating: bool,
    /// Shared by the endpoints of a slice on the same node.
    pub node_name: Option<Arc<str>>,
    /// Shared by the endpoints of a slice in the same zone.
    pub zone: Option<Arc<str>>,
    /// Topology hints, boxed: most endpoints have none, and 100,000 endpoints each holding
    /// two empty sets inline would cost ~5 MiB.
    pub hints: Option<Box<EndpointHints>>,
}

/// An endpoint's `hints`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointHints {
    /// `hints.forZones[].name`: the zones whose nodes should use this endpoint (set by the
    /// EndpointSlice controller for `trafficDistribution: PreferClose` / topology-aware hints).
    pub zones: BTreeSet<String>,
    /// `hints.forNodes[].name` (`trafficDistribution: PreferSameNode`).
    pub nodes: BTreeSet<String>,
}

static NO_HINTS: BTreeSet<String> = BTreeSet::new();

impl<A> EndpointInfo<A> {
    /// Whether the endpoint runs on the node named `node`.
    pub fn is_local(&self, node: &str) -> bool {
        self.node_name.as_deref() == Some(node)
    }

    /// `hints.forZones[].name` (empty without hints).
    pub fn zone_hints(&self) -> &BTreeSet<String> {
        self.hints.as_ref().map_or(&NO_HINTS, |h| &h.zones)
    }

    /// `hints.forNodes[].name` (empty without hints).
    pub fn node_hints(&self) -> &BTreeSet<String> {
        self.hints.as_ref().map_or(&NO_HINTS, |h| &h.nodes)
    }
}

/// The usable content of one EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceInfo<A = Ipv4Addr> {
    pub service: NamespacedName,
    /// Sorted by address (stably: an address listed twice keeps the slice's order). Shared
    /// with the service's merged list when the slice is the service's only one and lists
    /// each address once: the usual case, where a second copy of every endpoint would
    /// double the model's memory.
    pub endpoints: Endpoints<A>,
}

/// A list of endpoints, shared between the slice cache and the endpoints map.
pub type Endpoints<A = Ipv4Addr> = Arc<[EndpointInfo<A>]>;

/// What an EndpointSlice means to the proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SliceConversion<A = Ipv4Addr> {
    Serve(SliceInfo<A>),
    /// Not for kproxy and not an error (another family's or FQDN address type, headless,
    /// another proxy's).
    Ignored(String),
    Invalid(String),
}

/// The slice's own namespace/name.
pub fn slice_name(slice: &EndpointSlice) -> NamespacedName {
    NamespacedName::of(&slice.metadata)
}

/// The Service a slice belongs to, from its `kubernetes.io/service-name` label.
pub fn slice_service(slice: &EndpointSlice) -> Option<NamespacedName> {
    let own = slice_name(slice);
    let svc = slice
        .metadata
        .labels
        .as_ref()?
        .get(LABEL_SERVICE_NAME)
        .filter(|s| !s.is_empty())?;
    Some(NamespacedName::new(&own.namespace, svc))
}

/// Validates an IPv4 slice and extracts its endpoints. Pure: logs nothing.
pub fn convert_slice(slice: &EndpointSlice) -> SliceConversion {
    convert_slice_as::<Ipv4Addr>(slice)
}

/// Validates a slice of the family `A` and extracts its endpoints; slices of another
/// `addressType` are ignored (the other family's tracker takes them). Pure: logs nothing.
pub fn convert_slice_as<A: IpFamilyAddr>(slice: &EndpointSlice) -> SliceConversion<A> {
    if slice_name(slice).name.is_empty() {
        return SliceConversion::Invalid("has no metadata.name".into());
    }
    if let Some(labels) = &slice.metadata.labels {
        if let Some(proxy) = labels.get(LABEL_SERVICE_PROXY_NAME) {
            return SliceConversion::Ignored(format!(
                "labelled {LABEL_SERVICE_PROXY_NAME}={proxy}: served by another proxy"
            ));
        }
        if labels.contains_key(LABEL_HEADLESS) {
            return SliceConversion::Ignored(format!("labelled {LABEL_HEADLESS}"));
        }
    }
    let Some(service) = slice_service(slice) else {
        return SliceConversion::Invalid(format!("has no label {LABEL_SERVICE_NAME}"));
    };
    if slice.address_type != A::ADDRESS_TYPE {
        return SliceConversion::Ignored(format!(
            "addressType {:?} is not {}",
            slice.address_type,
            A::ADDRESS_TYPE
        ));
    }
    let ports = match &slice.ports {
        None => None,
        Some(list) if list.is_empty() => None,
        Some(list) => {
            let mut ports = SmallMap::new();
            for (i, p) in list.iter().enumerate() {
                let protocol = parse_protocol(p.protocol.as_deref())
                    .ok_or_else(|| format!("ports[{i}].protocol {:?} is unknown", p.protocol));
                let protocol = match protocol {
                    Ok(p) => p,
                    Err(e) => return SliceConversion::Invalid(e),
                };
                let port = match p.port {
                    None => None,
                    Some(n) => match valid_port(n, &format!("ports[{i}].port")) {
                        Ok(n) => Some(n),
                        Err(e) => return SliceConversion::Invalid(e),
                    },
                };
                let name = p.name.clone().unwrap_or_default();
                if ports
                    .insert(name.clone(), EndpointPort { port, protocol })
                    .is_some()
                {
                    return SliceConversion::Invalid(format!(
                        "ports[{i}].name {name:?} is used twice"
                    ));
                }
            }
            ports.shrink_to_fit();
            Some(Arc::new(ports))
        }
    };
    let mut endpoints = Vec::with_capacity(slice.endpoints.len());
    let (mut nodes, mut zones): (Vec<Arc<str>>, Vec<Arc<str>>) = (Vec::new(), Vec::new());
    for (i, ep) in slice.endpoints.iter().enumerate() {
        // Kubernetes uses the first address only (the others are reserved for the future).
        let Some(addr) = ep.addresses.first() else {
            return SliceConversion::Invalid(format!("endpoints[{i}] has no addresses"));
        };
        let Ok(address) = addr.parse::<A>() else {
            return SliceConversion::Invalid(format!(
                "endpoints[{i}].addresses[0] {addr:?} is not an {} address",
                A::ADDRESS_TYPE
            ));
        };
        let cond = ep.conditions.as_ref();
        endpoints.push(EndpointInfo {
            address,
            ports: ports.clone(),
            ready: cond.and_then(|c| c.ready).unwrap_or(true),
            serving: cond.and_then(|c| c.serving).unwrap_or(true),
            terminating: cond.and_then(|c| c.terminating).unwrap_or(false),
            node_name: ep
                .node_name
                .as_deref()
                .filter(|s| !s.is_empty())
                .map(|n| shared_name(&mut nodes, n)),
            zone: ep
                .zone
                .as_deref()
                .filter(|s| !s.is_empty())
                .map(|z| shared_name(&mut zones, z)),
            hints: endpoint_hints(ep.hints.as_ref()),
        });
    }
    endpoints.sort_by_key(|e| e.address);
    SliceConversion::Serve(SliceInfo {
        service,
        endpoints: endpoints.into(),
    })
}

/// An endpoint's hints, without empty names; `None` when there are none.
fn endpoint_hints(
    hints: Option<&k8s_openapi::api::discovery::v1::EndpointHints>,
) -> Option<Box<EndpointHints>> {
    let h = hints?;
    let names = |list: Option<Vec<String>>| -> BTreeSet<String> {
        list.into_iter()
            .flatten()
            .filter(|n| !n.is_empty())
            .collect()
    };
    let out = EndpointHints {
        zones: names(
            h.for_zones
                .as_ref()
                .map(|z| z.iter().map(|z| z.name.clone()).collect()),
        ),
        nodes: names(
            h.for_nodes
                .as_ref()
                .map(|n| n.iter().map(|n| n.name.clone()).collect()),
        ),
    };
    (!out.zones.is_empty() || !out.nodes.is_empty()).then(|| Box::new(out))
}

/// One `Arc<str>` per distinct name in a slice (a slice's endpoints sit on a few nodes).
fn shared_name(seen: &mut Vec<Arc<str>>, name: &str) -> Arc<str> {
    if let Some(n) = seen.iter().find(|n| &***n == name) {
        return n.clone();
    }
    let n: Arc<str> = name.into();
    seen.push(n.clone());
    n
}

/// Whether a slice's endpoints are already what `merge_slices` makes of it alone.
fn in_merged_form<A: Ord>(endpoints: &[EndpointInfo<A>]) -> bool {
    endpoints.windows(2).all(|w| w[0].address < w[1].address)
}

/// Merges a service's slices (in slice name order) into one endpoint list, sorted and
/// deduplicated by address. An endpoint listed twice (it moves between slices during updates)
/// keeps the first entry's conditions unless only a later one is ready; the named ports of
/// both entries are combined, the kept entry's winning on a name clash.
pub fn merge_slices<'a, A: IpFamilyAddr>(
    slices: impl IntoIterator<Item = &'a SliceInfo<A>>,
) -> Endpoints<A> {
    let mut slices = slices.into_iter().peekable();
    if let Some(first) = slices.next() {
        if slices.peek().is_none() && in_merged_form(&first.endpoints) {
            return first.endpoints.clone();
        }
        return merge_many(std::iter::once(first).chain(slices));
    }
    Endpoints::from([])
}

fn merge_many<'a, A: IpFamilyAddr>(
    slices: impl IntoIterator<Item = &'a SliceInfo<A>>,
) -> Endpoints<A> {
    let mut merged: BTreeMap<A, EndpointInfo<A>> = BTreeMap::new();
    for slice in slices {
        for ep in slice.endpoints.iter() {
            match merged.entry(ep.address) {
                Entry::Vacant(e) => {
                    e.insert(ep.clone());
                }
                Entry::Occupied(mut e) => {
                    let existing = e.get_mut();
                    let (mut keep, other) = if !existing.ready && ep.ready {
                        (ep.clone(), existing.clone())
                    } else {
                        (existing.clone(), ep.clone())
                    };
                    keep.ports = match (keep.ports.take(), other.ports) {
                        (None, None) => None,
                        (Some(p), None) | (None, Some(p)) => Some(p),
                        (Some(mut k), Some(o)) => {
                            let combined = Arc::make_mut(&mut k);
                            for (name, port) in o.iter() {
                                combined.get_or_insert(name.clone(), *port);
                            }
                            Some(k)
                        }
                    };
                    *existing = keep;
                }
            }
        }
    }
    merged.into_values().collect()
}

/// Pending endpoint changes (kube-proxy's `EndpointsChangeTracker` with its slice cache):
/// the slices seen so far, and per service the merged endpoints before the first unapplied
/// change and after the latest one. One tracker per IP family (`A`, IPv4 unless named):
/// each takes the slices of its `addressType`.
#[derive(Debug)]
pub struct EndpointsChangeTracker<A = Ipv4Addr> {
    /// Service -> slice name -> content, as of the latest update.
    slices: BTreeMap<NamespacedName, SmallMap<String, SliceInfo<A>>>,
    /// Slice namespace/name -> the service it is filed under.
    owners: BTreeMap<NamespacedName, NamespacedName>,
    items: BTreeMap<NamespacedName, Change<Endpoints<A>>>,
}

impl<A> Default for EndpointsChangeTracker<A> {
    fn default() -> Self {
        Self {
            slices: BTreeMap::new(),
            owners: BTreeMap::new(),
            items: BTreeMap::new(),
        }
    }
}

impl EndpointsChangeTracker {
    /// The IPv4 tracker.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<A: IpFamilyAddr> EndpointsChangeTracker<A> {
    /// Records an add (`None, Some`), update (`Some, Some`) or delete (`Some, None`) of a
    /// slice. The slice's earlier content is taken from the tracker's own cache, so a missed
    /// event can't leave stale endpoints. Returns whether any change is pending.
    pub fn update(
        &mut self,
        previous: Option<&EndpointSlice>,
        current: Option<&EndpointSlice>,
    ) -> bool {
        let Some(any) = current.or(previous) else {
            return !self.items.is_empty();
        };
        let key = slice_name(any);
        let info = current.and_then(|slice| match convert_slice_as::<A>(slice) {
            SliceConversion::Serve(info) => Some(info),
            // Mostly the other family's slices: not worth a line per event.
            SliceConversion::Ignored(_) if slice.address_type != A::ADDRESS_TYPE => None,
            SliceConversion::Ignored(why) => {
                debug!("EndpointSlice {key} ignored: {why}");
                None
            }
            SliceConversion::Invalid(why) => {
                warn!("EndpointSlice {key} skipped: {why}");
                None
            }
        });
        if let Some(owner) = self.owners.remove(&key) {
            self.modify(&owner, |slices| {
                slices.remove(&key.name);
            });
        }
        if let Some(info) = info {
            let owner = info.service.clone();
            self.owners.insert(key.clone(), owner.clone());
            self.modify(&owner, |slices| {
                slices.insert(key.name.clone(), info);
            });
        }
        !self.items.is_empty()
    }

    fn modify(
        &mut self,
        service: &NamespacedName,
        f: impl FnOnce(&mut SmallMap<String, SliceInfo<A>>),
    ) {
        let slices = self.slices.entry(service.clone()).or_default();
        let before = merge_slices(slices.values());
        f(slices);
        let after = merge_slices(slices.values());
        if slices.is_empty() {
            self.slices.remove(service);
        }
        match self.items.entry(service.clone()) {
            Entry::Occupied(mut e) => {
                e.get_mut().current = after;
                if e.get().previous == e.get().current {
                    e.remove();
                }
            }
            Entry::Vacant(e) => {
                if before != after {
                    e.insert(Change {
                        previous: before,
                        current: after,
                    });
                }
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The pending changes, in service name order.
    pub fn pending(&self) -> impl Iterator<Item = (&NamespacedName, &Change<Endpoints<A>>)> {
        self.items.iter()
    }

    fn take(&mut self) -> BTreeMap<NamespacedName, Change<Endpoints<A>>> {
        std::mem::take(&mut self.items)
    }
}

/// Service -> its endpoints merged from all its slices (kube-proxy's `EndpointsMap`, keyed by
/// service rather than service port: ports are resolved per endpoint by `desired::build`).
/// One per IP family (`A`, IPv4 unless named).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointsMap<A = Ipv4Addr> {
    services: BTreeMap<NamespacedName, Endpoints<A>>,
}

impl<A> Default for EndpointsMap<A> {
    fn default() -> Self {
        Self {
            services: BTreeMap::new(),
        }
    }
}

impl EndpointsMap {
    /// The IPv4 map.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<A: IpFamilyAddr> EndpointsMap<A> {
    /// Applies and clears the tracker's pending changes; returns the services whose
    /// endpoints changed.
    pub fn apply(&mut self, tracker: &mut EndpointsChangeTracker<A>) -> BTreeSet<NamespacedName> {
        let mut changed = BTreeSet::new();
        for (name, change) in tracker.take() {
            if change.current.is_empty() {
                self.services.remove(&name);
            } else {
                self.services.insert(name.clone(), change.current);
            }
            changed.insert(name);
        }
        changed
    }

    /// A service's endpoints, sorted by address; empty when it has none.
    pub fn get(&self, service: &NamespacedName) -> &[EndpointInfo<A>] {
        self.services.get(service).map_or(&[], |e| e)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&NamespacedName, &[EndpointInfo<A>])> {
        self.services.iter().map(|(k, v)| (k, &**v))
    }

    pub fn len(&self) -> usize {
        self.services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testutil::{simple_slice, slice};

    fn web() -> NamespacedName {
        NamespacedName::new("default", "web")
    }

    #[test]
    fn merges_slices_and_dedups_endpoints() {
        let mut tracker = EndpointsChangeTracker::new();
        let mut map = EndpointsMap::new();
        let a = simple_slice(
            "web-a",
            "web",
            8080,
            &[
                ("10.0.0.2", "n1", false, true, true),
                ("10.0.0.1", "n1", true, true, false),
            ],
        );
        // 10.0.0.2 moved to web-b and is ready there.
        let b = simple_slice(
            "web-b",
            "web",
            8080,
            &[
                ("10.0.0.2", "n2", true, true, false),
                ("10.0.0.3", "n2", true, true, false),
            ],
        );
        tracker.update(None, Some(&a));
        tracker.update(None, Some(&b));
        assert_eq!(map.apply(&mut tracker), [web()].into());
        let eps = map.get(&web());
        let addrs: Vec<String> = eps.iter().map(|e| e.address.to_string()).collect();
        assert_eq!(addrs, ["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
        let dup = &eps[1];
        assert!(dup.ready && !dup.terminating);
        assert_eq!(dup.node_name.as_deref(), Some("n2"));
        assert_eq!(
            dup.ports
                .as_ref()
                .and_then(|p| p.get("http"))
                .and_then(|p| p.port),
            Some(8080)
        );
        // Deleting one slice keeps the other's endpoints.
        tracker.update(Some(&a), None);
        map.apply(&mut tracker);
        assert_eq!(map.get(&web()).len(), 2);
        tracker.update(Some(&b), None);
        map.apply(&mut tracker);
        assert!(map.get(&web()).is_empty() && map.is_empty());
    }

    #[test]
    fn tracker_previous_current() {
        let v1 = simple_slice("web-a", "web", 80, &[("10.0.0.1", "n1", true, true, false)]);
        let v2 = simple_slice("web-a", "web", 81, &[("10.0.0.1", "n1", true, true, false)]);
        let mut tracker = EndpointsChangeTracker::new();
        let mut map = EndpointsMap::new();
        tracker.update(None, Some(&v1));
        map.apply(&mut tracker);
        assert!(tracker.update(Some(&v1), Some(&v2)));
        assert!(!tracker.update(Some(&v2), Some(&v1)));
        assert!(map.apply(&mut tracker).is_empty());
        // A missed delete event can't leave the old content: the tracker's cache is used.
        assert!(tracker.update(None, Some(&v2)));
        let (_, change) = tracker.pending().next().expect("change");
        assert_eq!(change.previous.len(), 1);
        let port = |eps: &Endpoints| {
            eps[0]
                .ports
                .as_ref()
                .and_then(|p| p.get("http"))
                .and_then(|p| p.port)
        };
        assert_eq!(port(&change.previous), Some(80));
        assert_eq!(port(&change.current), Some(81));
    }

    #[test]
    fn conversions() {
        let v6 = slice(
            "metadata: {name: x, labels: {kubernetes.io/service-name: web}}\naddressType: IPv6\nendpoints: []\n",
        );
        assert!(matches!(convert_slice(&v6), SliceConversion::Ignored(_)));
        let unlabelled = slice("metadata: {name: x}\naddressType: IPv4\nendpoints: []\n");
        assert!(
            matches!(convert_slice(&unlabelled), SliceConversion::Invalid(w) if w.contains(LABEL_SERVICE_NAME))
        );
        let bad = slice(
            "metadata: {name: x, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints: [{addresses: [300.1.1.1]}]\n",
        );
        assert!(
            matches!(convert_slice(&bad), SliceConversion::Invalid(w) if w.contains("300.1.1.1"))
        );
        // Unset conditions: ready and serving, not terminating; no ports list.
        let bare = slice(
            "metadata: {name: x, namespace: ns, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints: [{addresses: [10.1.1.1]}]\n",
        );
        let SliceConversion::Serve(info) = convert_slice(&bare) else {
            panic!("served");
        };
        assert_eq!(info.service, NamespacedName::new("ns", "web"));
        let ep = &info.endpoints[0];
        assert!(ep.ready && ep.serving && !ep.terminating && ep.ports.is_none());
    }
}
