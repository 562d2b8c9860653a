//! The service/endpoint model, after kube-proxy's `pkg/proxy`: change trackers fed by a source
//! (manifest files now, API watchers later), applied to a `ServicePortMap` and an
//! `EndpointsMap`, from which `desired::build` derives what the dataplane serves.
//!
//! Data flows one way: source -> trackers -> maps -> `desired::build` -> dataplane.

pub mod endpoints;
pub mod family;
pub mod service;
pub mod small_map;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv6Addr,
};

use k8s_openapi::{
    api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use tracing::debug;

pub use self::{
    endpoints::{EndpointInfo, EndpointPort, EndpointsChangeTracker, EndpointsMap},
    family::IpFamilyAddr,
    service::{
        Cidr, ServiceChangeTracker, ServicePortInfo, ServicePortMap, ServiceType, SessionAffinity,
        TargetPort, TrafficPolicy,
    },
};
use crate::{
    desired::{self, DesiredState, NodeContext},
    source::{K8sObject, ObjectKey},
};

/// The namespace all namespaced objects without `metadata.namespace` are in.
pub const DEFAULT_NAMESPACE: &str = "default";

/// `namespace/name` of an object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamespacedName {
    pub namespace: String,
    pub name: String,
}

impl NamespacedName {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    /// From object metadata; an unset or empty namespace is `default`.
    pub fn of(meta: &ObjectMeta) -> Self {
        Self {
            namespace: meta
                .namespace
                .as_deref()
                .filter(|s| !s.is_empty())
                .unwrap_or(DEFAULT_NAMESPACE)
                .to_owned(),
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

impl fmt::Display for NamespacedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A pending change of one tracked item: its state before the first unapplied change
/// (`previous`, kept) and after the latest one (`current`, overwritten).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change<T> {
    pub previous: T,
    pub current: T,
}

/// What an apply changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelChanges {
    /// Services whose ports or endpoints changed.
    pub services: BTreeSet<NamespacedName>,
    /// Nodes added, changed or removed.
    pub nodes: BTreeSet<String>,
}

impl ModelChanges {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.nodes.is_empty()
    }
}

/// The Node label topology hints are matched against.
pub const LABEL_TOPOLOGY_ZONE: &str = "topology.kubernetes.io/zone";

/// The model the agent keeps: trackers, maps, nodes.
#[derive(Debug, Default)]
pub struct Model {
    services: ServicePortMap,
    endpoints: EndpointsMap,
    service_changes: ServiceChangeTracker,
    endpoint_changes: EndpointsChangeTracker,
    /// The IPv6 twins: slices with `addressType: IPv6`, merged per service.
    endpoints6: EndpointsMap<Ipv6Addr>,
    endpoint_changes6: EndpointsChangeTracker<Ipv6Addr>,
    nodes: BTreeMap<String, Node>,
    node_changes: BTreeSet<String>,
    /// The last full set given to `replace_all`: a digest per object.
    objects: BTreeMap<ObjectKey, u64>,
}

impl Model {
    pub fn new() -> Self {
        Self::default()
    }

    /// For sources that deliver the whole set each time (manifest files): feeds the trackers
    /// with the difference from the previous set (by kind/namespace/name), then applies it.
    /// Duplicate keys: the first object wins. Only a digest of each object is kept between
    /// calls (the trackers keep what they need of it).
    pub fn replace_all(&mut self, objects: impl IntoIterator<Item = K8sObject>) -> ModelChanges {
        let mut next: BTreeMap<ObjectKey, u64> = BTreeMap::new();
        for obj in objects {
            let std::collections::btree_map::Entry::Vacant(slot) = next.entry(obj.key()) else {
                continue;
            };
            let digest = obj.digest();
            if self.objects.get(slot.key()) != Some(&digest) {
                let old = self
                    .objects
                    .contains_key(slot.key())
                    .then(|| slot.key().tombstone());
                self.on_object(old.as_ref(), Some(&obj));
            }
            slot.insert(digest);
        }
        let previous = std::mem::take(&mut self.objects);
        for key in previous.keys() {
            if !next.contains_key(key) {
                self.on_object(Some(&key.tombstone()), None);
            }
        }
        self.objects = next;
        self.apply_pending()
    }

    fn on_object(&mut self, old: Option<&K8sObject>, new: Option<&K8sObject>) {
        match (old, new) {
            (Some(K8sObject::Service(o)), Some(K8sObject::Service(n))) => {
                self.on_service(Some(o), Some(n));
            }
            (Some(K8sObject::Service(o)), None) => {
                self.on_service(Some(o), None);
            }
            (None, Some(K8sObject::Service(n))) => {
                self.on_service(None, Some(n));
            }
            (Some(K8sObject::EndpointSlice(o)), Some(K8sObject::EndpointSlice(n))) => {
                self.on_endpoint_slice(Some(o), Some(n));
            }
            (Some(K8sObject::EndpointSlice(o)), None) => {
                self.on_endpoint_slice(Some(o), None);
            }
            (None, Some(K8sObject::EndpointSlice(n))) => {
                self.on_endpoint_slice(None, Some(n));
            }
            (Some(K8sObject::Node(o)), Some(K8sObject::Node(n))) => {
                self.on_node(Some(o), Some(n));
            }
            (Some(K8sObject::Node(o)), None) => {
                self.on_node(Some(o), None);
            }
            (None, Some(K8sObject::Node(n))) => {
                self.on_node(None, Some(n));
            }
            // Keys include the kind, so old and new are always of one kind.
            _ => {}
        }
    }

    /// A Service was added (`None, Some`), updated or deleted (`Some, None`). Returns whether
    /// changes are pending (apply them with `apply_pending`).
    /// Only the name of `old` is read: the ports it had are those last applied.
    pub fn on_service(&mut self, old: Option<&Service>, new: Option<&Service>) -> bool {
        let Some(name) = new.or(old).map(|s| NamespacedName::of(&s.metadata)) else {
            return self.has_pending();
        };
        self.service_changes.update(&self.services, name, new)
    }

    /// An EndpointSlice was added, updated or deleted. Returns whether changes are pending.
    pub fn on_endpoint_slice(
        &mut self,
        old: Option<&EndpointSlice>,
        new: Option<&EndpointSlice>,
    ) -> bool {
        // Each family's tracker takes the slices of its addressType and ignores the others.
        let v4 = self.endpoint_changes.update(old, new);
        let v6 = self.endpoint_changes6.update(old, new);
        v4 || v6
    }

    /// A Node was added, updated or deleted. Returns whether changes are pending.
    pub fn on_node(&mut self, old: Option<&Node>, new: Option<&Node>) -> bool {
        if let Some(name) = new
            .or(old)
            .and_then(|n| n.metadata.name.clone())
            .filter(|n| !n.is_empty())
        {
            let changed = match new {
                Some(n) => self.nodes.get(&name) != Some(n),
                None => self.nodes.contains_key(&name),
            };
            if changed {
                match new {
                    Some(n) => self.nodes.insert(name.clone(), n.clone()),
                    None => self.nodes.remove(&name),
                };
                self.node_changes.insert(name);
            }
        }
        self.has_pending()
    }

    pub fn has_pending(&self) -> bool {
        !self.service_changes.is_empty()
            || !self.endpoint_changes.is_empty()
            || !self.endpoint_changes6.is_empty()
            || !self.node_changes.is_empty()
    }

    /// Applies the trackers' pending changes to the maps.
    pub fn apply_pending(&mut self) -> ModelChanges {
        let mut services = self.services.apply(&mut self.service_changes);
        let mut endpoint_services = self.endpoints.apply(&mut self.endpoint_changes);
        endpoint_services.extend(self.endpoints6.apply(&mut self.endpoint_changes6));
        for name in &endpoint_services {
            if self.services.service(name).is_none() {
                debug!("EndpointSlices of Service {name} changed; the Service is not known (yet)");
            }
        }
        services.extend(endpoint_services);
        ModelChanges {
            services,
            nodes: std::mem::take(&mut self.node_changes),
        }
    }

    /// What the node must serve, from the applied state (pending changes not included).
    pub fn desired(&self, node: &NodeContext) -> DesiredState {
        let mut desired = desired::build(&self.services, &self.endpoints, node);
        desired::build6(&mut desired, &self.services, &self.endpoints6, node);
        desired
    }

    pub fn services(&self) -> &ServicePortMap {
        &self.services
    }

    pub fn endpoints(&self) -> &EndpointsMap {
        &self.endpoints
    }

    /// The IPv6 endpoints (EndpointSlices with `addressType: IPv6`).
    pub fn endpoints6(&self) -> &EndpointsMap<Ipv6Addr> {
        &self.endpoints6
    }

    /// The `topology.kubernetes.io/zone` label of the Node `name`, if known and set.
    pub fn node_zone(&self, name: &str) -> Option<String> {
        self.nodes
            .get(name)?
            .metadata
            .labels
            .as_ref()?
            .get(LABEL_TOPOLOGY_ZONE)
            .filter(|z| !z.is_empty())
            .cloned()
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name)
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

    pub fn service(yaml: &str) -> Service {
        serde_yaml::from_str(&format!("apiVersion: v1\nkind: Service\n{yaml}"))
            .expect("test Service parses")
    }

    pub fn slice(yaml: &str) -> EndpointSlice {
        serde_yaml::from_str(&format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n{yaml}"
        ))
        .expect("test EndpointSlice parses")
    }

    /// A ClusterIP service `ns/name` with one TCP port.
    pub fn simple_service(name: &str, ip: &str, port: u16, target: &str) -> Service {
        service(&format!(
            "metadata: {{name: {name}}}\nspec:\n  clusterIP: {ip}\n  ports:\n  - {{name: http, port: {port}, targetPort: {target}}}\n"
        ))
    }

    /// A slice of service `svc` (namespace default) with endpoints `(ip, node, ready, serving,
    /// terminating)` and one port `http` = `port`.
    pub fn simple_slice(
        name: &str,
        svc: &str,
        port: u16,
        eps: &[(&str, &str, bool, bool, bool)],
    ) -> EndpointSlice {
        let mut y = format!(
            "metadata:\n  name: {name}\n  labels: {{kubernetes.io/service-name: {svc}}}\naddressType: IPv4\nports:\n- {{name: http, port: {port}, protocol: TCP}}\nendpoints:\n"
        );
        if eps.is_empty() {
            y.push_str("  []\n");
        }
        for (ip, node, ready, serving, terminating) in eps {
            y.push_str(&format!(
                "- addresses: [{ip}]\n  nodeName: {node}\n  conditions: {{ready: {ready}, serving: {serving}, terminating: {terminating}}}\n"
            ));
        }
        slice(&y)
    }
}

#[cfg(test)]
mod tests {
    use super::{testutil::*, *};
    use crate::desired::FrontendKind;
    use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
    use std::net::Ipv4Addr;

    #[test]
    fn replace_all_feeds_differences() {
        let mut model = Model::new();
        let svc = simple_service("web", "10.96.0.10", 80, "8080");
        let sl = simple_slice(
            "web-1",
            "web",
            8080,
            &[("10.0.0.1", "n1", true, true, false)],
        );
        // The slice may come before its service: fine, used once the service appears.
        let ch = model.replace_all(vec![K8sObject::EndpointSlice(Box::new(sl.clone()))]);
        assert_eq!(ch.services, [NamespacedName::new("default", "web")].into());
        assert!(model.desired(&NodeContext::default()).frontends.is_empty());

        let ch = model.replace_all(vec![
            K8sObject::EndpointSlice(Box::new(sl.clone())),
            K8sObject::Service(Box::new(svc.clone())),
        ]);
        assert_eq!(ch.services, [NamespacedName::new("default", "web")].into());
        let d = model.desired(&NodeContext::default());
        assert_eq!(d.frontends.len(), 1);
        assert_eq!(d.frontends[0].kind, FrontendKind::ClusterIp);
        assert_eq!(d.frontends[0].backends.len(), 1);

        // Same set again: nothing changes.
        let ch = model.replace_all(vec![
            K8sObject::Service(Box::new(svc.clone())),
            K8sObject::EndpointSlice(Box::new(sl.clone())),
        ]);
        assert!(ch.is_empty());

        // Slice deleted: the frontend stays, with no backends.
        let ch = model.replace_all(vec![K8sObject::Service(Box::new(svc))]);
        assert_eq!(ch.services.len(), 1);
        let d = model.desired(&NodeContext::default());
        assert!(d.frontends[0].backends.is_empty());

        // Everything deleted.
        model.replace_all(Vec::new());
        assert!(model.desired(&NodeContext::default()).frontends.is_empty());
        assert!(model.services().is_empty());
    }

    #[test]
    fn on_handlers_batch_until_apply() {
        let mut model = Model::new();
        let svc = simple_service("web", "10.96.0.10", 80, "8080");
        assert!(model.on_service(None, Some(&svc)));
        assert!(model.desired(&NodeContext::default()).frontends.is_empty());
        // Added then deleted before a sync: no change at all.
        assert!(!model.on_service(Some(&svc), None));
        assert!(model.apply_pending().is_empty());

        let node: Node = serde_yaml::from_str("apiVersion: v1\nkind: Node\nmetadata: {name: n1}\n")
            .expect("node");
        assert!(model.on_node(None, Some(&node)));
        let ch = model.apply_pending();
        assert_eq!(ch.nodes, ["n1".to_owned()].into());
        assert!(model.node("n1").is_some());
        assert!(!model.on_node(Some(&node), Some(&node)));
    }

    fn slice6(name: &str, svc: &str, eps: &[(&str, &str, bool)]) -> EndpointSlice {
        let mut y = format!(
            "metadata:\n  name: {name}\n  labels: {{kubernetes.io/service-name: {svc}}}\naddressType: IPv6\nports:\n- {{name: http, port: 8080, protocol: TCP}}\nendpoints:\n"
        );
        for (ip, node, ready) in eps {
            y.push_str(&format!(
                "- addresses: ['{ip}']\n  nodeName: {node}\n  conditions: {{ready: {ready}}}\n"
            ));
        }
        slice(&y)
    }

    fn slice_obj(s: EndpointSlice) -> K8sObject {
        K8sObject::EndpointSlice(Box::new(s))
    }

    fn service_obj(s: Service) -> K8sObject {
        K8sObject::Service(Box::new(s))
    }

    #[test]
    fn dual_stack_service_gets_frontends_in_both_families() {
        let svc = service(
            "metadata: {name: web}\nspec:\n  type: NodePort\n  clusterIPs: [10.96.0.10, 'fd00:10:96::10']\n  ipFamilies: [IPv4, IPv6]\n  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]\n",
        );
        let v4 = simple_slice(
            "web-v4",
            "web",
            8080,
            &[("10.0.0.1", "n1", true, true, false)],
        );
        // Two IPv6 slices; one endpoint listed in both (moving between slices) is kept once.
        let a = slice6(
            "web-v6a",
            "web",
            &[
                ("fd00:10:244:1::5", "n1", true),
                ("fd00:10:244:2::6", "n2", true),
            ],
        );
        let b = slice6(
            "web-v6b",
            "web",
            &[
                ("fd00:10:244:2::6", "n2", true),
                ("fd00:10:244:2::7", "n2", false),
            ],
        );
        let mut model = Model::new();
        let ch = model.replace_all(vec![
            service_obj(svc.clone()),
            slice_obj(v4.clone()),
            slice_obj(a.clone()),
            slice_obj(b.clone()),
        ]);
        assert_eq!(ch.services, [NamespacedName::new("default", "web")].into());
        let node = NodeContext {
            node_name: "n1".into(),
            nodeport_addresses6: vec!["fd00:198:18::1".parse().unwrap()],
            ..Default::default()
        };
        let d = model.desired(&node);
        // IPv4: cluster IP and nodePort over the IPv4 endpoint only.
        assert_eq!(d.frontends.len(), 2);
        assert!(
            d.frontends
                .iter()
                .all(|f| f.backends.len() == 1
                    && f.backends[0].address == Ipv4Addr::new(10, 0, 0, 1))
        );
        // IPv6: cluster IP and nodePort (::) over the two ready IPv6 endpoints.
        let kinds: Vec<(FrontendKind, String)> = d
            .frontends6
            .iter()
            .map(|f| (f.kind, f.address.to_string()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (FrontendKind::NodePort, "::".into()),
                (FrontendKind::ClusterIp, "fd00:10:96::10".into())
            ]
        );
        let backends: Vec<(String, u16, bool)> = d.frontends6[1]
            .backends
            .iter()
            .map(|b| (b.address.to_string(), b.port, b.is_local))
            .collect();
        assert_eq!(
            backends,
            vec![
                ("fd00:10:244:1::5".into(), 8080, true),
                ("fd00:10:244:2::6".into(), 8080, false)
            ]
        );
        assert_eq!(d.nodeport_addresses6, node.nodeport_addresses6);

        // The IPv6 slices go: the IPv6 frontends stay without backends (refused), IPv4 unchanged.
        let ch = model.replace_all(vec![service_obj(svc.clone()), slice_obj(v4.clone())]);
        assert_eq!(ch.services.len(), 1);
        let d2 = model.desired(&node);
        assert_eq!(d2.frontends, d.frontends);
        assert!(d2.frontends6.iter().all(|f| f.backends.is_empty()));
        assert!(model.endpoints6().is_empty());
    }

    #[test]
    fn ipv6_only_service_has_no_ipv4_frontends() {
        let svc = service(
            "metadata: {name: v6}\nspec:\n  type: LoadBalancer\n  clusterIP: 'fd00:10:96::20'\n  externalIPs: ['2001:db8::1']\n  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30081}]\nstatus: {loadBalancer: {ingress: [{ip: '2001:db8::2'}]}}\n",
        );
        let mut model = Model::new();
        model.replace_all(vec![
            service_obj(svc),
            slice_obj(slice6("v6-a", "v6", &[("fd00:10:244:1::5", "n1", true)])),
        ]);
        let d = model.desired(&NodeContext::default());
        assert!(d.frontends.is_empty(), "{:?}", d.frontends);
        let kinds: Vec<FrontendKind> = d.frontends6.iter().map(|f| f.kind).collect();
        assert_eq!(kinds.len(), 4, "{kinds:?}");
        for k in [
            FrontendKind::ClusterIp,
            FrontendKind::NodePort,
            FrontendKind::ExternalIp,
            FrontendKind::LoadBalancer,
        ] {
            assert!(kinds.contains(&k), "{k:?} in {kinds:?}");
        }
        assert!(d.frontends6.iter().all(|f| f.backends.len() == 1));
    }

    #[test]
    fn ipv6_frontends_guarded_by_source_ranges_carry_their_ipv6_ranges() {
        let svc = service(
            "metadata: {name: v6}\nspec:\n  type: LoadBalancer\n  clusterIP: 'fd00:10:96::20'\n  loadBalancerSourceRanges: ['2001:db8:1::/48', 10.0.0.0/8]\n  ports: [{name: http, port: 80, nodePort: 30081}]\nstatus: {loadBalancer: {ingress: [{ip: '2001:db8::2'}]}}\n",
        );
        let mut model = Model::new();
        model.replace_all(vec![service_obj(svc)]);
        let d = model.desired(&NodeContext::default());
        let ranges =
            vec![crate::desired::Ipv6Cidr::new("2001:db8:1::".parse().unwrap(), 48).unwrap()];
        let got: Vec<(FrontendKind, Option<Vec<crate::desired::Ipv6Cidr>>)> = d
            .frontends6
            .iter()
            .map(|f| (f.kind, f.source_ranges.clone()))
            .collect();
        assert_eq!(got.len(), 3, "{got:?}");
        for (kind, want) in [
            (FrontendKind::ClusterIp, None),
            (FrontendKind::NodePort, Some(ranges.clone())),
            (FrontendKind::LoadBalancer, Some(ranges.clone())),
        ] {
            assert!(
                got.contains(&(kind, want.clone())),
                "{kind:?} {want:?} in {got:?}"
            );
        }
    }

    #[test]
    fn ipv4_slices_and_ipv6_slices_feed_their_own_family() {
        let mut model = Model::new();
        assert!(
            model.on_endpoint_slice(None, Some(&slice6("x", "web", &[("fd00::1", "n1", true)])))
        );
        model.apply_pending();
        assert!(model.endpoints().is_empty());
        assert_eq!(model.endpoints6().len(), 1);
        // An IPv4 address in an IPv6 slice is invalid (the slice is skipped).
        assert!(!model.on_endpoint_slice(
            None,
            Some(&slice6("y", "web2", &[("10.0.0.1", "n1", true)]))
        ));
    }
}
