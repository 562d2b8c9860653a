//! The pure description of what the dataplane must serve, derived from the service model.
//! Every backend (eBPF maps, nftables, iptables, userspace relay) programs exactly this and
//! re-derives no Kubernetes semantics of its own.

use std::{
    collections::{BTreeMap, btree_map::Entry},
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
};

use tracing::{debug, warn};

use crate::model::{
    EndpointInfo, EndpointsMap, IpFamilyAddr, NamespacedName, ServicePortInfo, ServicePortMap,
    ServiceType, SessionAffinity, TargetPort,
};

/// L4 protocol of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The IP protocol number (IPPROTO_*).
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

/// Which kind of address a frontend is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendKind {
    ClusterIp,
    /// `address` is `0.0.0.0`: served on every nodePort address of the node.
    NodePort,
    ExternalIp,
    LoadBalancer,
}

/// `namespace/name:port-name` of a service port, for logs and stable ordering.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    /// The service port's `name` (may be empty for single-port services).
    pub port: String,
    pub protocol: Protocol,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        write!(f, "/{}", self.protocol.as_str())
    }
}

/// One endpoint a frontend balances over (IPv4 unless named, see [`Backend6`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend<A = Ipv4Addr> {
    pub address: A,
    /// The resolved target port (numeric, or a named targetPort resolved through the
    /// EndpointSlice's port names).
    pub port: u16,
    /// The endpoint's `nodeName` is this node.
    pub is_local: bool,
}

/// One address:port/protocol the node serves, with the backends it balances over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub service: ServicePortName,
    pub kind: FrontendKind,
    pub address: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    /// Sorted, deduplicated. Empty means "no endpoints": connections are refused.
    pub backends: Vec<Backend>,
    /// `sessionAffinity: ClientIP`: the timeout in seconds after which a client's pick is
    /// forgotten. `None`: every new flow picks freely.
    pub affinity_timeout: Option<u32>,
    /// `loadBalancerSourceRanges` of a LoadBalancer service, on its LoadBalancer and nodePort
    /// frontends (so the nodePort is no way around them). `None`: any source; `Some` lists
    /// the only IPv4 sources allowed (an empty list, e.g. when all ranges are IPv6, allows
    /// none).
    pub source_ranges: Option<Vec<Ipv4Cidr>>,
}

/// An IPv4 network: `address` has no bits set beyond `prefix_len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Cidr {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
}

impl Ipv4Cidr {
    /// The network of `address/prefix_len` (host bits cleared); `None` when `prefix_len > 32`.
    pub fn new(address: Ipv4Addr, prefix_len: u8) -> Option<Ipv4Cidr> {
        if prefix_len > 32 {
            return None;
        }
        let mask = u32::MAX
            .checked_shl(32 - u32::from(prefix_len))
            .unwrap_or(0);
        Some(Ipv4Cidr {
            address: Ipv4Addr::from(u32::from(address) & mask),
            prefix_len,
        })
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len))
            .unwrap_or(0);
        u32::from(ip) & mask == u32::from(self.address)
    }
}

/// An IPv6 network: `address` has no bits set beyond `prefix_len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv6Cidr {
    pub address: Ipv6Addr,
    pub prefix_len: u8,
}

impl Ipv6Cidr {
    /// The network of `address/prefix_len` (host bits cleared); `None` when `prefix_len > 128`.
    pub fn new(address: Ipv6Addr, prefix_len: u8) -> Option<Ipv6Cidr> {
        if prefix_len > 128 {
            return None;
        }
        Some(Ipv6Cidr {
            address: Ipv6Addr::from(u128::from(address) & Self::mask(prefix_len)),
            prefix_len,
        })
    }

    fn mask(prefix_len: u8) -> u128 {
        u128::MAX
            .checked_shl(128 - u32::from(prefix_len))
            .unwrap_or(0)
    }

    pub fn contains(&self, ip: Ipv6Addr) -> bool {
        u128::from(ip) & Self::mask(self.prefix_len) == u128::from(self.address)
    }
}

impl fmt::Display for Ipv6Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix_len)
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix_len)
    }
}

impl Frontend {
    /// The identity of the frontend in the dataplane (address, port, protocol).
    pub fn key(&self) -> (Ipv4Addr, u16, Protocol) {
        (self.address, self.port, self.protocol)
    }
}

/// An IPv6 backend.
pub type Backend6 = Backend<Ipv6Addr>;

/// One IPv6 address:port/protocol the node serves (the IPv6 twin of [`Frontend`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend6 {
    pub service: ServicePortName,
    /// `NodePort`: `address` is `::`, served on every IPv6 nodePort address of the node.
    pub kind: FrontendKind,
    pub address: Ipv6Addr,
    pub port: u16,
    pub protocol: Protocol,
    /// Sorted, deduplicated. Empty means "no endpoints": connections are refused.
    pub backends: Vec<Backend6>,
    /// As [`Frontend::affinity_timeout`].
    pub affinity_timeout: Option<u32>,
    /// As [`Frontend::source_ranges`], with the service's IPv6 ranges (an empty list, e.g.
    /// when all ranges are IPv4, allows no IPv6 source).
    pub source_ranges: Option<Vec<Ipv6Cidr>>,
}

impl Frontend6 {
    pub fn key(&self) -> (Ipv6Addr, u16, Protocol) {
        (self.address, self.port, self.protocol)
    }
}

/// Everything the node must serve. Frontends are sorted by key and unique per key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub frontends: Vec<Frontend>,
    /// Addresses of this node on which nodePorts are served.
    pub nodeport_addresses: Vec<Ipv4Addr>,
    /// The IPv6 frontends (dual-stack and IPv6-only services), sorted by key, unique per key.
    pub frontends6: Vec<Frontend6>,
    /// IPv6 addresses of this node on which nodePorts are served.
    pub nodeport_addresses6: Vec<Ipv6Addr>,
}

/// The node the agent runs on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// Endpoints whose `nodeName` equals it are local.
    pub node_name: String,
    /// Addresses of this node on which nodePorts are served.
    pub nodeport_addresses: Vec<Ipv4Addr>,
    /// IPv6 addresses of this node on which nodePorts are served.
    pub nodeport_addresses6: Vec<Ipv6Addr>,
    /// This Node's `topology.kubernetes.io/zone` label, for topology hints.
    pub zone: Option<String>,
}

/// The IPv4 `loadBalancerSourceRanges` of a LoadBalancer service port (`None` when it has
/// none, or is not a LoadBalancer: Kubernetes applies them to LoadBalancer services only).
fn source_ranges(info: &ServicePortInfo) -> Option<Vec<Ipv4Cidr>> {
    if info.service_type != ServiceType::LoadBalancer || info.load_balancer_source_ranges.is_empty()
    {
        return None;
    }
    let mut ranges: Vec<Ipv4Cidr> = info
        .load_balancer_source_ranges
        .iter()
        .filter_map(|c| match c.address {
            std::net::IpAddr::V4(a) => Ipv4Cidr::new(a, c.prefix_len),
            std::net::IpAddr::V6(_) => None,
        })
        .collect();
    ranges.sort_unstable();
    ranges.dedup();
    Some(ranges)
}

/// The IPv6 `loadBalancerSourceRanges` of a LoadBalancer service port (`source_ranges`' twin).
fn source_ranges6(info: &ServicePortInfo) -> Option<Vec<Ipv6Cidr>> {
    if info.service_type != ServiceType::LoadBalancer || info.load_balancer_source_ranges.is_empty()
    {
        return None;
    }
    let mut ranges: Vec<Ipv6Cidr> = info
        .load_balancer_source_ranges
        .iter()
        .filter_map(|c| match c.address {
            std::net::IpAddr::V6(a) => Ipv6Cidr::new(a, c.prefix_len),
            std::net::IpAddr::V4(_) => None,
        })
        .collect();
    ranges.sort_unstable();
    ranges.dedup();
    Some(ranges)
}

/// `sessionAffinity: ClientIP`'s timeout, if set.
fn affinity_timeout(info: &ServicePortInfo) -> Option<u32> {
    match info.session_affinity {
        SessionAffinity::None => None,
        SessionAffinity::ClientIp { timeout_seconds } => Some(timeout_seconds),
    }
}

/// Derives what the node serves from the service and endpoint maps, with Kubernetes'
/// semantics. Pure and deterministic: frontends sorted by key, backends sorted and
/// deduplicated.
///
/// - Each service port gets a ClusterIp frontend (clusterIP:port); NodePort and LoadBalancer
///   services with a nodePort a NodePort frontend (0.0.0.0:nodePort); each external IP an
///   ExternalIp frontend; each LoadBalancer ingress IP a LoadBalancer frontend.
/// - Backends: endpoints that have a port for the service port (the slice port with the
///   service port's name and protocol, which resolves named targetPorts per endpoint; the
///   numeric targetPort when the slice lists no ports) and are ready; when none is ready,
///   those serving and terminating (KEP-1669).
/// - internalTrafficPolicy: Local limits ClusterIp frontends, externalTrafficPolicy: Local
///   the others, to endpoints on this node, before that choice.
/// - Two service ports on one (address, port, protocol): the first by `ServicePortName`
///   order is kept, the conflict logged.
pub fn build(
    services: &ServicePortMap,
    endpoints: &EndpointsMap,
    node: &NodeContext,
) -> DesiredState {
    let mut frontends: BTreeMap<(Ipv4Addr, u16, Protocol), Frontend> = BTreeMap::new();
    let mut candidates = Vec::new();
    for (spn, info) in services.iter() {
        push_candidates(spn, info, endpoints, node, &mut candidates);
        for frontend in candidates.drain(..) {
            keep_first(&mut frontends, frontend);
        }
    }
    DesiredState {
        frontends: frontends.into_values().collect(),
        nodeport_addresses: sorted_unique(&node.nodeport_addresses),
        ..DesiredState::default()
    }
}

/// A frontend of either family, as far as choosing between frontends on one key goes.
pub trait KeyedFrontend {
    type Key: Copy + Ord + std::hash::Hash + fmt::Debug;
    fn frontend_key(&self) -> Self::Key;
    fn service_port(&self) -> &ServicePortName;
    /// `address:port/PROTO` for logs.
    fn describe(&self) -> String;
    fn frontend_kind(&self) -> FrontendKind;
}

impl KeyedFrontend for Frontend {
    type Key = (Ipv4Addr, u16, Protocol);
    fn frontend_key(&self) -> Self::Key {
        self.key()
    }
    fn service_port(&self) -> &ServicePortName {
        &self.service
    }
    fn describe(&self) -> String {
        format!("{}:{}/{}", self.address, self.port, self.protocol.as_str())
    }
    fn frontend_kind(&self) -> FrontendKind {
        self.kind
    }
}

impl KeyedFrontend for Frontend6 {
    type Key = (Ipv6Addr, u16, Protocol);
    fn frontend_key(&self) -> Self::Key {
        self.key()
    }
    fn service_port(&self) -> &ServicePortName {
        &self.service
    }
    fn describe(&self) -> String {
        format!(
            "[{}]:{}/{}",
            self.address,
            self.port,
            self.protocol.as_str()
        )
    }
    fn frontend_kind(&self) -> FrontendKind {
        self.kind
    }
}

/// Two service ports on one key: the first (by `ServicePortName` order) is kept.
pub(crate) fn warn_conflict<F: KeyedFrontend>(lost: &F, kept: &F) {
    warn!(
        "{:?} frontend {} of {} conflicts with the {:?} frontend of {}, which is kept",
        lost.frontend_kind(),
        lost.describe(),
        lost.service_port(),
        kept.frontend_kind(),
        kept.service_port()
    );
}

fn keep_first<F: KeyedFrontend>(frontends: &mut BTreeMap<F::Key, F>, frontend: F) {
    match frontends.entry(frontend.frontend_key()) {
        Entry::Vacant(e) => {
            e.insert(frontend);
        }
        Entry::Occupied(e) => warn_conflict(&frontend, e.get()),
    }
}

pub(crate) fn sorted_unique<A: Ord + Copy>(addresses: &[A]) -> Vec<A> {
    let mut v = addresses.to_vec();
    v.sort_unstable();
    v.dedup();
    v
}

/// Every IPv4 frontend one service port asks for, in order (ClusterIp, NodePort,
/// ExternalIp, LoadBalancer), before conflicts between keys are resolved.
pub(crate) fn push_candidates(
    spn: &ServicePortName,
    info: &ServicePortInfo,
    endpoints: &EndpointsMap,
    node: &NodeContext,
    out: &mut Vec<Frontend>,
) {
    if !info.ipv4 {
        return; // IPv6-only: see `build6`
    }
    let eps = endpoints.get(&NamespacedName::new(&spn.namespace, &spn.name));
    let internal = select_backends(eps, spn, info, node, info.internal_policy_local());
    let external = select_backends(eps, spn, info, node, info.external_policy_local());
    let affinity_timeout = affinity_timeout(info);
    let restricted = source_ranges(info);
    let mut add = |kind, address, port, backends: &Vec<Backend>| {
        let source_ranges = match kind {
            FrontendKind::LoadBalancer | FrontendKind::NodePort => restricted.clone(),
            FrontendKind::ClusterIp | FrontendKind::ExternalIp => None,
        };
        out.push(Frontend {
            service: spn.clone(),
            kind,
            address,
            port,
            protocol: spn.protocol,
            backends: backends.clone(),
            affinity_timeout,
            source_ranges,
        });
    };
    add(
        FrontendKind::ClusterIp,
        info.cluster_ip,
        info.port,
        &internal,
    );
    if let Some(node_port) = info.served_node_port() {
        add(
            FrontendKind::NodePort,
            Ipv4Addr::UNSPECIFIED,
            node_port,
            &external,
        );
    }
    for ip in &info.external_ips {
        add(FrontendKind::ExternalIp, *ip, info.port, &external);
    }
    if info.service_type == ServiceType::LoadBalancer {
        for ip in &info.load_balancer_ips {
            add(FrontendKind::LoadBalancer, *ip, info.port, &external);
        }
    }
}

/// `build`'s IPv6 twin: the IPv6 frontends of services that have the IPv6 family (an IPv6
/// cluster IP), over their IPv6 endpoints, with the same semantics (traffic policies,
/// terminating fallback, topology hints, first-wins conflicts). Fills `frontends6` and
/// `nodeport_addresses6` of `desired`.
pub fn build6(
    desired: &mut DesiredState,
    services: &ServicePortMap,
    endpoints: &EndpointsMap<Ipv6Addr>,
    node: &NodeContext,
) {
    let mut frontends: BTreeMap<(Ipv6Addr, u16, Protocol), Frontend6> = BTreeMap::new();
    let mut candidates = Vec::new();
    for (spn, info) in services.iter() {
        push_candidates6(spn, info, endpoints, node, &mut candidates);
        for frontend in candidates.drain(..) {
            keep_first(&mut frontends, frontend);
        }
    }
    desired.frontends6 = frontends.into_values().collect();
    desired.nodeport_addresses6 = sorted_unique(&node.nodeport_addresses6);
}

/// `push_candidates`' IPv6 twin.
pub(crate) fn push_candidates6(
    spn: &ServicePortName,
    info: &ServicePortInfo,
    endpoints: &EndpointsMap<Ipv6Addr>,
    node: &NodeContext,
    out: &mut Vec<Frontend6>,
) {
    let Some(cluster_ip) = info.cluster_ip6 else {
        return;
    };
    let eps = endpoints.get(&NamespacedName::new(&spn.namespace, &spn.name));
    let internal = select_backends(eps, spn, info, node, info.internal_policy_local());
    let external = select_backends(eps, spn, info, node, info.external_policy_local());
    let affinity_timeout = affinity_timeout(info);
    let restricted = source_ranges6(info);
    let mut add = |kind, address, port, backends: &Vec<Backend6>| {
        let source_ranges = match kind {
            FrontendKind::LoadBalancer | FrontendKind::NodePort => restricted.clone(),
            FrontendKind::ClusterIp | FrontendKind::ExternalIp => None,
        };
        out.push(Frontend6 {
            service: spn.clone(),
            kind,
            address,
            port,
            protocol: spn.protocol,
            backends: backends.clone(),
            affinity_timeout,
            source_ranges,
        });
    };
    add(FrontendKind::ClusterIp, cluster_ip, info.port, &internal);
    if let Some(node_port) = info.served_node_port() {
        add(
            FrontendKind::NodePort,
            Ipv6Addr::UNSPECIFIED,
            node_port,
            &external,
        );
    }
    for ip in &info.external_ips6 {
        add(FrontendKind::ExternalIp, *ip, info.port, &external);
    }
    if info.service_type == ServiceType::LoadBalancer {
        for ip in &info.load_balancer_ips6 {
            add(FrontendKind::LoadBalancer, *ip, info.port, &external);
        }
    }
}

/// The port an endpoint serves a service port on, if any.
fn endpoint_port<A>(
    ep: &EndpointInfo<A>,
    spn: &ServicePortName,
    info: &ServicePortInfo,
) -> Option<u16> {
    let numeric = match &info.target_port {
        TargetPort::Number(n) => Some(*n),
        TargetPort::Name(_) => None,
    };
    match &ep.ports {
        Some(ports) => {
            let port = ports
                .get(&spn.port)
                .filter(|p| p.protocol == spn.protocol)?;
            port.port.or(numeric)
        }
        None => numeric,
    }
}

/// Which topology hints narrow a service port's cluster-wide endpoints on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TopologyFilter {
    None,
    /// `hints.forNodes` (PreferSameNode).
    SameNode,
    /// `hints.forZones` (PreferClose, topology-aware routing).
    SameZone,
}

impl TopologyFilter {
    fn admits<A>(self, ep: &EndpointInfo<A>, node: &NodeContext) -> bool {
        match self {
            TopologyFilter::None => true,
            TopologyFilter::SameNode => ep.node_hints().contains(&node.node_name),
            TopologyFilter::SameZone => node
                .zone
                .as_ref()
                .is_some_and(|z| ep.zone_hints().contains(z)),
        }
    }
}

/// kube-proxy's `topologyModeFromHints`: hints are used only when every ready endpoint has
/// them and at least one is meant for this node (or its zone); otherwise they are ignored, so
/// that a half-hinted or foreign-zone-only slice never leaves the node without endpoints.
fn topology_from_hints<'a, A: 'a>(
    eps: impl Iterator<Item = &'a EndpointInfo<A>>,
    spn: &ServicePortName,
    node: &NodeContext,
) -> TopologyFilter {
    let (mut all_node_hints, mut for_this_node) = (true, false);
    let (mut all_zone_hints, mut for_this_zone) = (true, false);
    let mut any_ready = false;
    for ep in eps.filter(|ep| ep.ready) {
        any_ready = true;
        if ep.node_hints().is_empty() {
            all_node_hints = false;
        } else if ep.node_hints().contains(&node.node_name) {
            for_this_node = true;
        }
        if ep.zone_hints().is_empty() {
            all_zone_hints = false;
        } else if node
            .zone
            .as_ref()
            .is_some_and(|z| ep.zone_hints().contains(z))
        {
            for_this_zone = true;
        }
    }
    if !any_ready {
        return TopologyFilter::None;
    }
    if all_node_hints {
        if for_this_node {
            return TopologyFilter::SameNode;
        }
        debug!(
            "{spn}: ignoring same-node hints: none is for node {}",
            node.node_name
        );
    }
    if all_zone_hints {
        if for_this_zone {
            return TopologyFilter::SameZone;
        }
        match &node.zone {
            None => debug!("{spn}: ignoring topology hints: the Node has no zone label"),
            Some(z) => debug!("{spn}: ignoring topology hints: none is for zone {z}"),
        }
    }
    TopologyFilter::None
}

fn select_backends<A: IpFamilyAddr>(
    eps: &[EndpointInfo<A>],
    spn: &ServicePortName,
    info: &ServicePortInfo,
    node: &NodeContext,
    local_only: bool,
) -> Vec<Backend<A>> {
    let candidates: Vec<(&EndpointInfo<A>, u16)> = eps
        .iter()
        .filter(|ep| !local_only || ep.is_local(&node.node_name))
        .filter_map(|ep| endpoint_port(ep, spn, info).map(|port| (ep, port)))
        .collect();
    let to_backend = |(ep, port): &(&EndpointInfo<A>, u16)| Backend {
        address: ep.address,
        port: *port,
        is_local: ep.is_local(&node.node_name),
    };
    let topology = if local_only {
        TopologyFilter::None
    } else {
        topology_from_hints(candidates.iter().map(|(ep, _)| *ep), spn, node)
    };
    let mut backends: Vec<Backend<A>> = candidates
        .iter()
        .filter(|(ep, _)| ep.ready && topology.admits(ep, node))
        .map(to_backend)
        .collect();
    if backends.is_empty() {
        backends = candidates
            .iter()
            .filter(|(ep, _)| ep.serving && ep.terminating)
            .map(to_backend)
            .collect();
    }
    backends.sort_unstable();
    backends.dedup();
    backends
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

    use super::*;
    use crate::model::{
        EndpointsChangeTracker, ServiceChangeTracker,
        testutil::{service, simple_service, simple_slice, slice},
    };

    fn build_from(services: &[Service], slices: &[EndpointSlice], node: &str) -> DesiredState {
        build_in_zone(services, slices, node, None)
    }

    fn build_in_zone(
        services: &[Service],
        slices: &[EndpointSlice],
        node: &str,
        zone: Option<&str>,
    ) -> DesiredState {
        let mut st = ServiceChangeTracker::new();
        let mut et = EndpointsChangeTracker::new();
        let mut sm = ServicePortMap::new();
        let mut em = EndpointsMap::new();
        for s in services {
            st.update(&sm, crate::model::service::service_name(s), Some(s));
        }
        for s in slices {
            et.update(None, Some(s));
        }
        sm.apply(&mut st);
        em.apply(&mut et);
        build(
            &sm,
            &em,
            &NodeContext {
                node_name: node.into(),
                nodeport_addresses: vec![
                    Ipv4Addr::new(192, 168, 1, 2),
                    Ipv4Addr::new(192, 168, 1, 1),
                ],
                zone: zone.map(String::from),
                ..Default::default()
            },
        )
    }

    fn be(ip: &str, port: u16, is_local: bool) -> Backend {
        Backend {
            address: ip.parse().expect("ip"),
            port,
            is_local,
        }
    }

    #[test]
    fn service_without_endpoints_has_empty_backends() {
        let d = build_from(&[simple_service("web", "10.96.0.1", 80, "8080")], &[], "n1");
        assert_eq!(d.frontends.len(), 1);
        let f = &d.frontends[0];
        assert_eq!(f.key(), (Ipv4Addr::new(10, 96, 0, 1), 80, Protocol::Tcp));
        assert!(f.backends.is_empty());
        assert_eq!(
            d.nodeport_addresses,
            vec![Ipv4Addr::new(192, 168, 1, 1), Ipv4Addr::new(192, 168, 1, 2)]
        );
    }

    #[test]
    fn affinity_and_source_ranges_reach_the_right_frontends() {
        let svc = service(
            "metadata: {name: lb}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.7\n  externalIPs: [203.0.113.5]\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 30}}\n  loadBalancerSourceRanges: [10.1.2.3/16, 2001:db8::/32, 10.1.0.0/16]\n  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]\nstatus: {loadBalancer: {ingress: [{ip: 198.51.100.9}]}}\n",
        );
        let v6_only = service(
            "metadata: {name: v6}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.8\n  loadBalancerSourceRanges: [2001:db8::/32]\n  ports: [{port: 80, targetPort: 8080, nodePort: 30081}]\nstatus: {loadBalancer: {ingress: [{ip: 198.51.100.10}]}}\n",
        );
        let d = build_from(&[svc, v6_only], &[], "n1");
        let net = Ipv4Cidr::new(Ipv4Addr::new(10, 1, 0, 0), 16).unwrap();
        for f in &d.frontends {
            let lb = f.service.name == "lb";
            assert_eq!(f.affinity_timeout, lb.then_some(30), "{f:?}");
            let want = match (f.kind, lb) {
                (FrontendKind::ClusterIp | FrontendKind::ExternalIp, _) => None,
                (_, true) => Some(vec![net]),
                (_, false) => Some(vec![]),
            };
            assert_eq!(f.source_ranges, want, "{:?} of {}", f.kind, f.service);
        }
        assert_eq!(d.frontends.len(), 7);
        assert!(net.contains(Ipv4Addr::new(10, 1, 200, 1)));
        assert!(!net.contains(Ipv4Addr::new(10, 2, 0, 1)));
        assert!(
            Ipv4Cidr::new(Ipv4Addr::new(1, 2, 3, 4), 0)
                .unwrap()
                .contains(Ipv4Addr::BROADCAST)
        );
    }

    #[test]
    fn topology_hints_narrow_cluster_endpoints_only_when_complete_and_matching() {
        let svc = service(
            "metadata: {name: web}\nspec: {type: NodePort, clusterIP: 10.96.0.1, externalTrafficPolicy: Local, ports: [{port: 80, targetPort: 8080, nodePort: 30080}]}\n",
        );
        let hinted = |extra: &str| {
            slice(&format!(
                "metadata: {{name: web-a, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n- {{addresses: [10.0.0.1], nodeName: n1, zone: a, hints: {{forZones: [{{name: a}}]}}}}\n- {{addresses: [10.0.0.2], nodeName: n2, zone: b, hints: {{forZones: [{{name: b}}]}}}}\n{extra}"
            ))
        };
        let cluster_ip = |d: &DesiredState| -> Vec<Ipv4Addr> {
            d.frontends
                .iter()
                .find(|f| f.kind == FrontendKind::ClusterIp)
                .map(|f| f.backends.iter().map(|b| b.address).collect())
                .unwrap_or_default()
        };
        let a = Ipv4Addr::new(10, 0, 0, 1);
        let b = Ipv4Addr::new(10, 0, 0, 2);
        // Zone a on node n3: only the endpoint hinted for a.
        let d = build_in_zone(std::slice::from_ref(&svc), &[hinted("")], "n3", Some("a"));
        assert_eq!(cluster_ip(&d), vec![a]);
        // externalTrafficPolicy: Local frontends ignore hints (local endpoints only).
        let np = d
            .frontends
            .iter()
            .find(|f| f.kind == FrontendKind::NodePort);
        assert_eq!(np.map(|f| f.backends.len()), Some(0));
        // No endpoint for this zone, no zone label, or one endpoint without hints: ignored.
        for (zone, extra) in [
            (Some("c"), ""),
            (None, ""),
            (Some("a"), "- {addresses: [10.0.0.3], nodeName: n3}\n"),
        ] {
            let d = build_in_zone(std::slice::from_ref(&svc), &[hinted(extra)], "n3", zone);
            assert!(cluster_ip(&d).len() >= 2, "{zone:?} {extra:?}: {d:?}");
        }
        // A not-ready endpoint without hints does not disable them.
        let d = build_in_zone(
            std::slice::from_ref(&svc),
            &[hinted(
                "- {addresses: [10.0.0.3], conditions: {ready: false}}\n",
            )],
            "n3",
            Some("b"),
        );
        assert_eq!(cluster_ip(&d), vec![b]);
        // Same-node hints win over zone hints when every endpoint has them.
        let same_node = slice(
            "metadata: {name: web-a, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{port: 8080}]\nendpoints:\n- {addresses: [10.0.0.1], nodeName: n1, hints: {forZones: [{name: a}], forNodes: [{name: n1}]}}\n- {addresses: [10.0.0.2], nodeName: n2, hints: {forZones: [{name: a}], forNodes: [{name: n2}]}}\n",
        );
        let d = build_in_zone(&[svc], &[same_node], "n2", Some("a"));
        assert_eq!(cluster_ip(&d), vec![b]);
    }

    #[test]
    fn named_target_port_resolved_per_endpoint() {
        let svc = service(
            "metadata: {name: web}\nspec: {clusterIP: 10.96.0.1, ports: [{name: http, port: 80, targetPort: web}]}\n",
        );
        let a = simple_slice(
            "web-a",
            "web",
            8080,
            &[("10.0.0.1", "n1", true, true, false)],
        );
        let b = simple_slice(
            "web-b",
            "web",
            9090,
            &[("10.0.0.2", "n2", true, true, false)],
        );
        // A slice without the port name gives no backend for it.
        let c = slice(
            "metadata: {name: web-c, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: other, port: 7000}]\nendpoints: [{addresses: [10.0.0.3]}]\n",
        );
        // A named targetPort and a slice without ports: nothing to resolve it with.
        let d2 = slice(
            "metadata: {name: web-d, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints: [{addresses: [10.0.0.4]}]\n",
        );
        let d = build_from(&[svc], &[b, a, c, d2], "n1");
        assert_eq!(
            d.frontends[0].backends,
            vec![be("10.0.0.1", 8080, true), be("10.0.0.2", 9090, false)]
        );
    }

    #[test]
    fn numeric_target_port_used_when_slice_has_no_ports() {
        let svc = simple_service("web", "10.96.0.1", 80, "8080");
        let s = slice(
            "metadata: {name: web-a, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints: [{addresses: [10.0.0.1]}]\n",
        );
        let d = build_from(&[svc], &[s], "n1");
        assert_eq!(d.frontends[0].backends, vec![be("10.0.0.1", 8080, false)]);
    }

    #[test]
    fn terminating_fallback() {
        let svc = simple_service("web", "10.96.0.1", 80, "8080");
        let eps = [
            ("10.0.0.1", "n1", false, true, true),   // serving, terminating
            ("10.0.0.2", "n1", false, false, true),  // terminating, not serving
            ("10.0.0.3", "n1", false, false, false), // not ready
        ];
        let d = build_from(
            std::slice::from_ref(&svc),
            &[simple_slice("web-a", "web", 8080, &eps)],
            "n1",
        );
        assert_eq!(d.frontends[0].backends, vec![be("10.0.0.1", 8080, true)]);
        // With a ready endpoint, terminating ones are not used.
        let mut eps = eps.to_vec();
        eps.push(("10.0.0.4", "n2", true, true, false));
        let d = build_from(&[svc], &[simple_slice("web-a", "web", 8080, &eps)], "n1");
        assert_eq!(d.frontends[0].backends, vec![be("10.0.0.4", 8080, false)]);
    }

    #[test]
    fn frontends_and_traffic_policies() {
        let svc = service(
            "metadata: {name: lb}\n\
             spec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.9\n  externalIPs: [1.1.1.1]\n\
             \x20 externalTrafficPolicy: Local\n  internalTrafficPolicy: Cluster\n\
             \x20 ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]\n\
             status: {loadBalancer: {ingress: [{ip: 2.2.2.2}]}}\n",
        );
        let eps = [
            ("10.0.0.1", "n1", true, true, false),
            ("10.0.0.2", "n2", true, true, false),
            ("10.0.0.3", "n2", false, true, true),
        ];
        let d = build_from(&[svc], &[simple_slice("lb-a", "lb", 8080, &eps)], "n1");
        let kinds: Vec<(FrontendKind, String, u16)> = d
            .frontends
            .iter()
            .map(|f| (f.kind, f.address.to_string(), f.port))
            .collect();
        assert_eq!(
            kinds,
            [
                (FrontendKind::NodePort, "0.0.0.0".into(), 30080),
                (FrontendKind::ExternalIp, "1.1.1.1".into(), 80),
                (FrontendKind::LoadBalancer, "2.2.2.2".into(), 80),
                (FrontendKind::ClusterIp, "10.96.0.9".into(), 80),
            ]
        );
        let all = vec![be("10.0.0.1", 8080, true), be("10.0.0.2", 8080, false)];
        let local = vec![be("10.0.0.1", 8080, true)];
        for f in &d.frontends {
            let want = if f.kind == FrontendKind::ClusterIp {
                &all
            } else {
                &local
            };
            assert_eq!(&f.backends, want, "{:?}", f.kind);
        }
        // On n2, ETP Local uses n2's ready endpoint; on n3 there is none: no backends.
        let svc_itp = service(
            "metadata: {name: lb}\nspec: {clusterIP: 10.96.0.9, internalTrafficPolicy: Local, ports: [{name: http, port: 80, targetPort: 8080}]}\n",
        );
        let d = build_from(
            std::slice::from_ref(&svc_itp),
            &[simple_slice("lb-a", "lb", 8080, &eps)],
            "n2",
        );
        assert_eq!(d.frontends[0].backends, vec![be("10.0.0.2", 8080, true)]);
        let d = build_from(
            std::slice::from_ref(&svc_itp),
            &[simple_slice("lb-a", "lb", 8080, &eps)],
            "n3",
        );
        assert!(d.frontends[0].backends.is_empty());
        // The local fallback is per node: n2 has only a terminating endpoint left.
        let eps2 = [
            ("10.0.0.1", "n1", true, true, false),
            ("10.0.0.3", "n2", false, true, true),
        ];
        let d = build_from(&[svc_itp], &[simple_slice("lb-a", "lb", 8080, &eps2)], "n2");
        assert_eq!(d.frontends[0].backends, vec![be("10.0.0.3", 8080, true)]);
    }

    #[test]
    fn conflicting_frontends_keep_first_and_order_is_deterministic() {
        let a = simple_service("a", "10.96.0.1", 80, "8080");
        let b = simple_service("b", "10.96.0.1", 80, "9090");
        let c = simple_service("c", "10.96.0.0", 80, "80");
        let s = simple_slice("b-1", "b", 9090, &[("10.0.0.9", "n1", true, true, false)]);
        let d1 = build_from(
            &[b.clone(), c.clone(), a.clone()],
            std::slice::from_ref(&s),
            "n1",
        );
        let d2 = build_from(&[a, b, c], &[s], "n1");
        assert_eq!(d1, d2);
        assert_eq!(d1.frontends.len(), 2);
        assert_eq!(d1.frontends[0].service.name, "c");
        assert_eq!(d1.frontends[1].service.name, "a");
        assert!(d1.frontends[1].backends.is_empty());
    }
}
