//! Services: validation of a v1 Service into service ports, the `ServicePortMap` and the
//! `ServiceChangeTracker` (kube-proxy's `servicechangetracker.go` and `serviceport.go`).

use std::{
    collections::{BTreeMap, BTreeSet, btree_map::Entry},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use k8s_openapi::{api::core::v1::Service, apimachinery::pkg::util::intstr::IntOrString};
use tracing::{debug, info, warn};

use super::{Change, NamespacedName, small_map::SmallMap};
use crate::desired::{Protocol, ServicePortName};

/// Services carrying this label are handled by another proxy (KEP-2447, e2e "should implement
/// service.kubernetes.io/service-proxy-name").
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Set on headless Services' EndpointSlices; kube-proxy's informers exclude it.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";

/// `spec.sessionAffinityConfig.clientIP.timeoutSeconds` default (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: u32 = 10_800;
/// Largest allowed affinity timeout (1 day).
pub const MAX_AFFINITY_TIMEOUT_SECONDS: u32 = 86_400;

/// `spec.type`, without ExternalName (never proxied).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
}

/// `spec.externalTrafficPolicy` / `spec.internalTrafficPolicy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

/// `spec.sessionAffinity` with its timeout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SessionAffinity {
    #[default]
    None,
    ClientIp {
        timeout_seconds: u32,
    },
}

/// A service port's `targetPort`: a number, or a name resolved per endpoint through the
/// EndpointSlice's port names.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

/// One `spec.loadBalancerSourceRanges` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub address: IpAddr,
    pub prefix_len: u8,
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix_len)
    }
}

impl Cidr {
    /// Parses `a.b.c.d/n` or `x::y/n` (a bare address is a host route).
    pub fn parse(s: &str) -> Option<Cidr> {
        let s = s.trim();
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let address: IpAddr = addr.parse().ok()?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix_len = match len {
            Some(l) => l.parse::<u8>().ok().filter(|l| *l <= max)?,
            None => max,
        };
        Some(Cidr {
            address,
            prefix_len,
        })
    }
}

/// Everything kproxy knows about one service port (kube-proxy's `BaseServicePortInfo`).
/// Service-wide fields are repeated in each port, as kube-proxy does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortInfo {
    pub service_type: ServiceType,
    /// The service's IPv4 cluster IP (from `spec.clusterIPs`, whatever its position);
    /// `0.0.0.0` for IPv6-only services (see `ipv4`).
    pub cluster_ip: Ipv4Addr,
    /// Whether the service has the IPv4 family (an IPv4 entry in `spec.clusterIPs`). An
    /// IPv6-only service has none: nothing IPv4 (cluster IP, nodePort, external or
    /// LoadBalancer IPs) is served for it, as kube-proxy's IPv4 proxier ignores it.
    pub ipv4: bool,
    /// The service's IPv6 cluster IP, if it has the IPv6 family (dual-stack or IPv6-only).
    pub cluster_ip6: Option<Ipv6Addr>,
    pub port: u16,
    pub protocol: Protocol,
    /// Only for NodePort and LoadBalancer services that have one.
    pub node_port: Option<u16>,
    pub target_port: TargetPort,
    /// IPv4 `spec.externalIPs` (sorted, deduplicated).
    pub external_ips: Vec<Ipv4Addr>,
    /// IPv4 `status.loadBalancer.ingress[].ip` of LoadBalancer services, without those with
    /// `ipMode: Proxy` (KEP-1860: the load balancer delivers to the node, not to the VIP).
    pub load_balancer_ips: Vec<Ipv4Addr>,
    /// IPv6 `spec.externalIPs` (sorted, deduplicated).
    pub external_ips6: Vec<Ipv6Addr>,
    /// IPv6 LoadBalancer ingress IPs, as `load_balancer_ips`.
    pub load_balancer_ips6: Vec<Ipv6Addr>,
    /// The effective policy: Kubernetes ignores `Local` on ClusterIP services.
    pub external_traffic_policy: TrafficPolicy,
    pub internal_traffic_policy: TrafficPolicy,
    pub session_affinity: SessionAffinity,
    pub load_balancer_source_ranges: Vec<Cidr>,
    pub health_check_node_port: Option<u16>,
}

impl ServicePortInfo {
    pub fn external_policy_local(&self) -> bool {
        self.external_traffic_policy == TrafficPolicy::Local
    }

    pub fn internal_policy_local(&self) -> bool {
        self.internal_traffic_policy == TrafficPolicy::Local
    }

    /// The nodePort this port is served on, if its type serves node ports.
    pub fn served_node_port(&self) -> Option<u16> {
        match self.service_type {
            ServiceType::NodePort | ServiceType::LoadBalancer => self.node_port,
            ServiceType::ClusterIp => None,
        }
    }
}

/// The ports of one service, in `ServicePortName` order.
pub type ServicePorts = SmallMap<ServicePortName, ServicePortInfo>;

/// What a Service means to the proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceConversion {
    /// A service kproxy serves (in its IPv4 and/or IPv6 family).
    Serve(ServicePorts),
    /// Not for kproxy and not an error (ExternalName, headless, another proxy's).
    Ignored(String),
    /// Fails validation; the reason says why.
    Invalid(String),
}

/// The namespace/name of an object; namespace `default` when unset.
pub fn service_name(service: &Service) -> NamespacedName {
    NamespacedName::of(&service.metadata)
}

/// Validates a Service and turns it into its service ports (kube-proxy's
/// `serviceToServiceMap` plus the API server's validation kproxy can't rely on when it reads
/// manifests). Pure: logs nothing.
pub fn convert_service(service: &Service) -> ServiceConversion {
    match convert(service) {
        Ok(Ok(ports)) => ServiceConversion::Serve(ports),
        Ok(Err(ignored)) => ServiceConversion::Ignored(ignored),
        Err(invalid) => ServiceConversion::Invalid(invalid),
    }
}

type Conversion = Result<Result<ServicePorts, String>, String>;

fn convert(service: &Service) -> Conversion {
    let name = service_name(service);
    if name.name.is_empty() {
        return Err("has no metadata.name".into());
    }
    if let Some(labels) = &service.metadata.labels {
        if let Some(proxy) = labels.get(LABEL_SERVICE_PROXY_NAME) {
            return Ok(Err(format!(
                "labelled {LABEL_SERVICE_PROXY_NAME}={proxy}: served by another proxy"
            )));
        }
        if labels.contains_key(LABEL_HEADLESS) {
            return Ok(Err(format!("labelled {LABEL_HEADLESS}")));
        }
    }
    let Some(spec) = &service.spec else {
        return Err("has no spec".into());
    };
    let service_type = match spec.type_.as_deref() {
        None | Some("") | Some("ClusterIP") => ServiceType::ClusterIp,
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("ExternalName") => {
            return Ok(Err(
                "type ExternalName is resolved by DNS, not proxied".into()
            ));
        }
        Some(other) => return Err(format!("unknown spec.type {other:?}")),
    };

    // Cluster IPs: spec.clusterIPs (dual-stack) or spec.clusterIP; the primary must agree.
    let primary = spec.cluster_ip.as_deref().filter(|s| !s.is_empty());
    let listed: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .collect();
    if primary == Some("None") || listed.contains(&"None") {
        return Ok(Err("headless (clusterIP: None)".into()));
    }
    if let (Some(p), Some(first)) = (primary, listed.first()) {
        if p != *first {
            return Err(format!(
                "spec.clusterIP {p:?} differs from spec.clusterIPs[0] {first:?}"
            ));
        }
    }
    let cluster_ips: Vec<&str> = if listed.is_empty() {
        primary.into_iter().collect()
    } else {
        listed
    };
    if cluster_ips.is_empty() {
        return Err(
            "has no spec.clusterIP (kproxy reads manifests without an API server to allocate one)"
                .into(),
        );
    }
    let (cluster_ip4, cluster_ip6) =
        cluster_ips_by_family(&cluster_ips, spec.ip_families.as_deref())?;
    let ipv4 = cluster_ip4.is_some();
    let cluster_ip = cluster_ip4.unwrap_or(Ipv4Addr::UNSPECIFIED);

    let mut external_ips = Vec::new();
    let mut external_ips6 = Vec::new();
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(v4)) if !v4.is_unspecified() => external_ips.push(v4),
            Ok(IpAddr::V6(v6)) if usable_ipv6(v6) => external_ips6.push(v6),
            _ => return Err(format!("invalid spec.externalIPs[{i}] {ip:?}")),
        }
    }
    external_ips.sort_unstable();
    external_ips.dedup();
    external_ips6.sort_unstable();
    external_ips6.dedup();

    let mut load_balancer_ips = Vec::new();
    let mut load_balancer_ips6 = Vec::new();
    if service_type == ServiceType::LoadBalancer {
        let ingress = service
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for (i, ing) in ingress.into_iter().flatten().enumerate() {
            let Some(ip) = ing.ip.as_deref().filter(|s| !s.is_empty()) else {
                continue; // hostname-only ingress: nothing to serve on the node
            };
            match ip.parse::<IpAddr>() {
                Ok(IpAddr::V4(v4)) if !v4.is_unspecified() => {
                    if ing.ip_mode.as_deref() != Some("Proxy") {
                        load_balancer_ips.push(v4);
                    }
                }
                Ok(IpAddr::V6(v6)) if usable_ipv6(v6) => {
                    if ing.ip_mode.as_deref() != Some("Proxy") {
                        load_balancer_ips6.push(v6);
                    }
                }
                _ => {
                    return Err(format!(
                        "invalid status.loadBalancer.ingress[{i}].ip {ip:?}"
                    ));
                }
            }
        }
    }
    load_balancer_ips.sort_unstable();
    load_balancer_ips.dedup();
    load_balancer_ips6.sort_unstable();
    load_balancer_ips6.dedup();

    let external_traffic_policy = match parse_policy(
        spec.external_traffic_policy.as_deref(),
        "externalTrafficPolicy",
    )? {
        // Kubernetes' ExternalPolicyLocal: only NodePort and LoadBalancer services.
        TrafficPolicy::Local if service_type == ServiceType::ClusterIp => TrafficPolicy::Cluster,
        p => p,
    };
    let internal_traffic_policy = parse_policy(
        spec.internal_traffic_policy.as_deref(),
        "internalTrafficPolicy",
    )?;

    let session_affinity = match spec.session_affinity.as_deref() {
        None | Some("") | Some("None") => SessionAffinity::None,
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            let timeout_seconds = match timeout {
                None => DEFAULT_AFFINITY_TIMEOUT_SECONDS,
                Some(t) => match u32::try_from(t) {
                    Ok(t) if (1..=MAX_AFFINITY_TIMEOUT_SECONDS).contains(&t) => t,
                    _ => {
                        return Err(format!(
                            "sessionAffinityConfig.clientIP.timeoutSeconds {t} is not in 1..={MAX_AFFINITY_TIMEOUT_SECONDS}"
                        ));
                    }
                },
            };
            SessionAffinity::ClientIp { timeout_seconds }
        }
        Some(other) => return Err(format!("unknown spec.sessionAffinity {other:?}")),
    };

    let mut load_balancer_source_ranges = Vec::new();
    for (i, range) in spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
    {
        match Cidr::parse(range) {
            Some(c) => load_balancer_source_ranges.push(c),
            None => {
                return Err(format!(
                    "invalid spec.loadBalancerSourceRanges[{i}] {range:?}"
                ));
            }
        }
    }
    load_balancer_source_ranges.sort_unstable();
    load_balancer_source_ranges.dedup();

    let health_check_node_port = match spec.health_check_node_port {
        None | Some(0) => None,
        Some(p) => Some(valid_port(p, "spec.healthCheckNodePort")?),
    };

    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() {
        return Err("has no spec.ports".into());
    }
    let mut out = ServicePorts::new();
    let mut seen_port = BTreeSet::new();
    let mut seen_node_port = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let at = format!("spec.ports[{i}]");
        let port = valid_port(p.port, &format!("{at}.port"))?;
        let protocol = parse_protocol(p.protocol.as_deref())
            .ok_or_else(|| format!("{at}.protocol {:?} is unknown", p.protocol))?;
        let port_name = p.name.clone().unwrap_or_default();
        if port_name.is_empty() && ports.len() > 1 {
            return Err(format!(
                "{at}.name is required when a service has more than one port"
            ));
        }
        let node_port = match p.node_port {
            None => None,
            Some(n) => Some(valid_port(n, &format!("{at}.nodePort"))?),
        };
        let node_port = match service_type {
            ServiceType::ClusterIp => None,
            ServiceType::NodePort | ServiceType::LoadBalancer => node_port,
        };
        let target_port = match &p.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => {
                TargetPort::Number(valid_port(*n, &format!("{at}.targetPort"))?)
            }
            Some(IntOrString::String(s)) if s.is_empty() => TargetPort::Number(port),
            Some(IntOrString::String(s)) => {
                if s.parse::<i64>().is_ok() {
                    return Err(format!(
                        "{at}.targetPort {s:?} is a quoted number; write it without quotes"
                    ));
                }
                if !valid_port_name(s) {
                    return Err(format!("{at}.targetPort {s:?} is not a valid port name"));
                }
                TargetPort::Name(s.clone())
            }
        };
        if !seen_port.insert((port, protocol)) {
            return Err(format!(
                "{at}: port {port}/{} is listed twice",
                protocol.as_str()
            ));
        }
        if let Some(np) = node_port {
            if !seen_node_port.insert((np, protocol)) {
                return Err(format!(
                    "{at}: nodePort {np}/{} is listed twice",
                    protocol.as_str()
                ));
            }
        }
        let spn = ServicePortName {
            namespace: name.namespace.clone(),
            name: name.name.clone(),
            port: port_name.clone(),
            protocol,
        };
        let info = ServicePortInfo {
            service_type,
            cluster_ip,
            ipv4,
            cluster_ip6,
            port,
            protocol,
            node_port,
            target_port,
            external_ips: external_ips.clone(),
            load_balancer_ips: load_balancer_ips.clone(),
            external_ips6: external_ips6.clone(),
            load_balancer_ips6: load_balancer_ips6.clone(),
            external_traffic_policy,
            internal_traffic_policy,
            session_affinity,
            load_balancer_source_ranges: load_balancer_source_ranges.clone(),
            health_check_node_port,
        };
        if out.insert(spn, info).is_some()
            || out
                .keys()
                .any(|k| k.port == port_name && k.protocol != protocol)
        {
            return Err(format!("{at}.name {port_name:?} is used twice"));
        }
    }
    out.shrink_to_fit();
    Ok(Ok(out))
}

/// An IPv6 address a service can be served on: not `::`, not v4-mapped (`::ffff:a.b.c.d`
/// is an IPv4 destination to the kernel, which the IPv4 family serves).
fn usable_ipv6(ip: Ipv6Addr) -> bool {
    !ip.is_unspecified() && ip.to_ipv4_mapped().is_none()
}

/// Splits `spec.clusterIPs` into the IPv4 and the IPv6 cluster IP: at most one of each
/// (Kubernetes' dual-stack rule), consistent with `spec.ipFamilies` when that is set.
fn cluster_ips_by_family(
    cluster_ips: &[&str],
    ip_families: Option<&[String]>,
) -> Result<(Option<Ipv4Addr>, Option<Ipv6Addr>), String> {
    let (mut v4, mut v6) = (None, None);
    for ip in cluster_ips {
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) if !a.is_unspecified() => {
                if v4.replace(a).is_some() {
                    return Err(format!(
                        "spec.clusterIPs {cluster_ips:?} has two IPv4 addresses"
                    ));
                }
            }
            Ok(IpAddr::V6(a)) if usable_ipv6(a) => {
                if v6.replace(a).is_some() {
                    return Err(format!(
                        "spec.clusterIPs {cluster_ips:?} has two IPv6 addresses"
                    ));
                }
            }
            _ => return Err(format!("invalid clusterIP {ip:?}")),
        }
    }
    if let Some(families) = ip_families.filter(|f| !f.is_empty()) {
        if let Some(f) = families.iter().find(|f| *f != "IPv4" && *f != "IPv6") {
            return Err(format!("unknown spec.ipFamilies entry {f:?}"));
        }
        let listed = |f: &str| families.iter().any(|x| x == f);
        if (v4.is_some() && !listed("IPv4")) || (v6.is_some() && !listed("IPv6")) {
            return Err(format!(
                "spec.clusterIPs {cluster_ips:?} do not match spec.ipFamilies {families:?}"
            ));
        }
    }
    Ok((v4, v6))
}

fn parse_policy(value: Option<&str>, field: &str) -> Result<TrafficPolicy, String> {
    match value {
        None | Some("") | Some("Cluster") => Ok(TrafficPolicy::Cluster),
        Some("Local") => Ok(TrafficPolicy::Local),
        Some(other) => Err(format!("unknown spec.{field} {other:?}")),
    }
}

/// `TCP` (the default when unset), `UDP` or `SCTP`.
pub fn parse_protocol(value: Option<&str>) -> Option<Protocol> {
    match value {
        None | Some("") | Some("TCP") => Some(Protocol::Tcp),
        Some("UDP") => Some(Protocol::Udp),
        Some("SCTP") => Some(Protocol::Sctp),
        Some(_) => None,
    }
}

/// A port number in 1..=65535.
pub fn valid_port(value: i32, field: &str) -> Result<u16, String> {
    match u16::try_from(value) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!("{field} {value} is not in 1..=65535")),
    }
}

/// IANA_SVC_NAME: at most 15 lowercase letters, digits and '-', with a letter, no leading,
/// trailing or doubled '-'.
fn valid_port_name(s: &str) -> bool {
    s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

/// Finds services whose nodePorts collide with another service's: the API server would have
/// refused one of them. The nodePort stays with a service in `incumbents` (those already
/// served: a newcomer never takes a programmed nodePort away), else with the first by
/// namespace/name. Returns the losers with the reason, which names the keeper.
pub fn nodeport_conflicts<'a>(
    services: impl IntoIterator<Item = (&'a NamespacedName, &'a ServicePorts)>,
    incumbents: &BTreeSet<NamespacedName>,
) -> BTreeMap<NamespacedName, String> {
    let mut sorted: Vec<_> = services.into_iter().collect();
    sorted.sort_by_key(|(name, _)| (!incumbents.contains(*name), *name));
    let mut owners: BTreeMap<(u16, Protocol), &NamespacedName> = BTreeMap::new();
    let mut losers = BTreeMap::new();
    for (name, ports) in sorted {
        let used: BTreeSet<(u16, Protocol)> = ports
            .values()
            .filter_map(|p| p.served_node_port().map(|np| (np, p.protocol)))
            .collect();
        let conflict = used
            .iter()
            .find_map(|k| owners.get(k).filter(|o| **o != name).map(|o| (k, *o)));
        if let Some(((np, proto), owner)) = conflict {
            losers.insert(
                name.clone(),
                format!(
                    "nodePort {np}/{} is already used by Service {owner}",
                    proto.as_str()
                ),
            );
            continue;
        }
        for k in used {
            owners.insert(k, name);
        }
    }
    losers
}

fn to_ports(service: Option<&Service>, log: bool) -> ServicePorts {
    let Some(service) = service else {
        return ServicePorts::new();
    };
    match convert_service(service) {
        ServiceConversion::Serve(ports) => ports,
        ServiceConversion::Ignored(why) => {
            if log {
                debug!("Service {} ignored: {why}", service_name(service));
            }
            ServicePorts::new()
        }
        ServiceConversion::Invalid(why) => {
            if log {
                warn!("Service {} skipped: {why}", service_name(service));
            }
            ServicePorts::new()
        }
    }
}

/// Pending service changes (kube-proxy's `ServiceChangeTracker`): per service, the ports
/// before the first unapplied change and after the latest one.
#[derive(Debug, Default)]
pub struct ServiceChangeTracker {
    items: BTreeMap<NamespacedName, Change<ServicePorts>>,
}

impl ServiceChangeTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the Service `name` becoming `current` (`None`: deleted). The ports it had
    /// before are those `applied` holds for it (what the map was last given, served or not),
    /// so neither the caller nor a source has to keep the old object. Returns whether any
    /// change is pending.
    pub fn update(
        &mut self,
        applied: &ServicePortMap,
        name: NamespacedName,
        current: Option<&Service>,
    ) -> bool {
        let current_ports = to_ports(current, true);
        match self.items.entry(name) {
            Entry::Occupied(mut e) => {
                e.get_mut().current = current_ports;
                if e.get().previous == e.get().current {
                    e.remove();
                }
            }
            Entry::Vacant(e) => {
                let previous_ports = applied.ports_of(e.key()).cloned().unwrap_or_default();
                if previous_ports != current_ports {
                    e.insert(Change {
                        previous: previous_ports,
                        current: current_ports,
                    });
                }
            }
        }
        !self.items.is_empty()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The pending changes, in name order.
    pub fn pending(&self) -> impl Iterator<Item = (&NamespacedName, &Change<ServicePorts>)> {
        self.items.iter()
    }

    fn take(&mut self) -> BTreeMap<NamespacedName, Change<ServicePorts>> {
        std::mem::take(&mut self.items)
    }
}

/// Every served service port (kube-proxy's `ServicePortMap`), grouped by service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServicePortMap {
    services: BTreeMap<NamespacedName, ServicePorts>,
    /// Valid services not served because their nodePort collides with an earlier one.
    rejected: BTreeMap<NamespacedName, String>,
}

impl ServicePortMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies and clears the tracker's pending changes; returns the services that changed
    /// (including those whose nodePort conflict appeared or went away).
    pub fn apply(&mut self, tracker: &mut ServiceChangeTracker) -> BTreeSet<NamespacedName> {
        let mut changed = BTreeSet::new();
        if tracker.is_empty() {
            // Conflicts depend on the services alone: nothing to redo (an endpoint change
            // costs no scan of every service).
            return changed;
        }
        let incumbents: BTreeSet<NamespacedName> = self
            .services
            .keys()
            .filter(|name| !self.rejected.contains_key(*name))
            .cloned()
            .collect();
        for (name, change) in tracker.take() {
            if change.current.is_empty() {
                self.services.remove(&name);
            } else {
                self.services.insert(name.clone(), change.current);
            }
            changed.insert(name);
        }
        let rejected = nodeport_conflicts(&self.services, &incumbents);
        for (name, why) in &rejected {
            if self.rejected.get(name) != Some(why) || changed.contains(name) {
                warn!("Service {name} skipped: {why}");
                changed.insert(name.clone());
            }
        }
        for name in self.rejected.keys() {
            if !rejected.contains_key(name) {
                if self.services.contains_key(name) {
                    info!("Service {name}: its nodePort conflict is resolved; serving it");
                }
                changed.insert(name.clone());
            }
        }
        self.rejected = rejected;
        changed
    }

    /// The served service ports in `ServicePortName` order (rejected services left out).
    pub fn iter(&self) -> impl Iterator<Item = (&ServicePortName, &ServicePortInfo)> {
        self.services
            .iter()
            .filter(|(name, _)| !self.rejected.contains_key(*name))
            .flat_map(|(_, ports)| ports.iter())
    }

    pub fn get(&self, name: &ServicePortName) -> Option<&ServicePortInfo> {
        let svc = NamespacedName::new(&name.namespace, &name.name);
        if self.rejected.contains_key(&svc) {
            return None;
        }
        self.services.get(&svc)?.get(name)
    }

    /// The ports last applied for a service, whether it is served or rejected.
    fn ports_of(&self, name: &NamespacedName) -> Option<&ServicePorts> {
        self.services.get(name)
    }

    /// The ports of a served service.
    pub fn service(&self, name: &NamespacedName) -> Option<&ServicePorts> {
        if self.rejected.contains_key(name) {
            return None;
        }
        self.services.get(name)
    }

    /// Why a valid service is not served (its nodePort collides with another's).
    pub fn rejection(&self, name: &NamespacedName) -> Option<&str> {
        self.rejected.get(name).map(String::as_str)
    }

    /// Number of served service ports.
    pub fn len(&self) -> usize {
        self.iter().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testutil::service;

    fn invalid(yaml: &str) -> String {
        match convert_service(&service(yaml)) {
            ServiceConversion::Invalid(why) => why,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    fn ignored(yaml: &str) -> String {
        match convert_service(&service(yaml)) {
            ServiceConversion::Ignored(why) => why,
            other => panic!("expected Ignored, got {other:?}"),
        }
    }

    fn served(yaml: &str) -> ServicePorts {
        match convert_service(&service(yaml)) {
            ServiceConversion::Serve(p) => p,
            other => panic!("expected Serve, got {other:?}"),
        }
    }

    const META: &str = "metadata: {name: s, namespace: ns}\n";

    fn with_port(port: &str) -> String {
        format!("{META}spec:\n  type: NodePort\n  clusterIP: 10.0.0.1\n  ports:\n  - {port}\n")
    }

    #[test]
    fn full_service_port_info() {
        let ports = served(
            "metadata: {name: s}\n\
             spec:\n  type: LoadBalancer\n  clusterIP: 10.0.0.1\n  clusterIPs: [10.0.0.1, 'fd00::1']\n\
             \x20 externalIPs: [1.2.3.4, '2001:db8::1', 1.2.3.4]\n  externalTrafficPolicy: Local\n\
             \x20 internalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n\
             \x20 sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n\
             \x20 loadBalancerSourceRanges: [192.168.0.0/16, '2001:db8::/32']\n\
             \x20 ports:\n  - {name: http, port: 80, targetPort: web, nodePort: 30080}\n\
             \x20 - {name: dns, port: 53, protocol: UDP, nodePort: 30053}\n\
             status:\n  loadBalancer:\n    ingress:\n    - ip: 5.6.7.8\n    - hostname: lb.example\n    - {ip: 5.6.7.9, ipMode: Proxy}\n",
        );
        assert_eq!(ports.len(), 2);
        let (name, p) = ports
            .iter()
            .find(|(k, _)| k.port == "http")
            .expect("http port");
        assert_eq!(name.to_string(), "default/s:http/TCP");
        assert_eq!(p.service_type, ServiceType::LoadBalancer);
        assert_eq!(p.cluster_ip, Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(p.node_port, Some(30080));
        assert_eq!(p.target_port, TargetPort::Name("web".into()));
        assert_eq!(p.external_ips, vec![Ipv4Addr::new(1, 2, 3, 4)]);
        assert_eq!(p.load_balancer_ips, vec![Ipv4Addr::new(5, 6, 7, 8)]);
        assert!(p.external_policy_local() && p.internal_policy_local());
        assert_eq!(p.health_check_node_port, Some(32000));
        assert_eq!(
            p.session_affinity,
            SessionAffinity::ClientIp {
                timeout_seconds: 60
            }
        );
        assert_eq!(p.load_balancer_source_ranges.len(), 2);
        let dns = ports.values().find(|p| p.port == 53).expect("dns");
        assert_eq!(dns.protocol, Protocol::Udp);
        assert_eq!(dns.target_port, TargetPort::Number(53));
    }

    #[test]
    fn dual_stack_and_ipv6_only_services() {
        let ports = served(
            "metadata: {name: s}\nspec:\n  type: LoadBalancer\n  ipFamilies: [IPv6, IPv4]\n\
             \x20 clusterIP: 'fd00:10:96::a'\n  clusterIPs: ['fd00:10:96::a', 10.96.0.10]\n\
             \x20 externalIPs: ['2001:db8::2', 1.2.3.4, '2001:db8::1', '2001:db8::2']\n\
             \x20 ports: [{port: 80, nodePort: 30080}]\n\
             status: {loadBalancer: {ingress: [{ip: '2001:db8::9'}, {ip: 5.6.7.8}, {ip: '2001:db8::8', ipMode: Proxy}]}}\n",
        );
        let p = ports.values().next().expect("one port");
        assert!(p.ipv4);
        assert_eq!(p.cluster_ip, Ipv4Addr::new(10, 96, 0, 10));
        assert_eq!(p.cluster_ip6, Some("fd00:10:96::a".parse().unwrap()));
        assert_eq!(p.external_ips, vec![Ipv4Addr::new(1, 2, 3, 4)]);
        let v6 = |s: &[&str]| -> Vec<Ipv6Addr> { s.iter().map(|a| a.parse().unwrap()).collect() };
        assert_eq!(p.external_ips6, v6(&["2001:db8::1", "2001:db8::2"]));
        assert_eq!(p.load_balancer_ips, vec![Ipv4Addr::new(5, 6, 7, 8)]);
        assert_eq!(p.load_balancer_ips6, v6(&["2001:db8::9"]));

        // IPv6-only: served, without an IPv4 family.
        let ports =
            served("metadata: {name: s}\nspec: {clusterIP: 'fd00::1', ports: [{port: 80}]}\n");
        let p = ports.values().next().expect("one port");
        assert!(!p.ipv4);
        assert_eq!(p.cluster_ip6, Some("fd00::1".parse().unwrap()));

        for (yaml, why) in [
            ("clusterIPs: [10.0.0.1, 10.0.0.2]", "two IPv4 addresses"),
            ("clusterIPs: ['fd00::1', 'fd00::2']", "two IPv6 addresses"),
            (
                "clusterIPs: [10.0.0.1, 'fd00::1'], ipFamilies: [IPv4]",
                "do not match spec.ipFamilies",
            ),
            (
                "clusterIPs: [10.0.0.1], ipFamilies: [IPv5]",
                "unknown spec.ipFamilies",
            ),
            // A v4-mapped address is an IPv4 destination: not an IPv6 cluster IP.
            ("clusterIPs: ['::ffff:10.0.0.1']", "invalid clusterIP"),
            (
                "clusterIP: 10.0.0.1, externalIPs: ['::']",
                "invalid spec.externalIPs[0]",
            ),
        ] {
            let got = invalid(&format!("{META}spec: {{{yaml}, ports: [{{port: 80}}]}}\n"));
            assert!(got.contains(why), "{yaml}: {got}");
        }
    }

    #[test]
    fn ignored_services() {
        assert!(
            ignored("metadata: {name: s}\nspec: {type: ExternalName, externalName: example.com}\n")
                .contains("ExternalName")
        );
        assert!(
            ignored("metadata: {name: s}\nspec: {clusterIP: None, ports: [{port: 80}]}\n")
                .contains("headless")
        );
        assert!(ignored(
            "metadata: {name: s, labels: {service.kubernetes.io/service-proxy-name: other}}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}\n"
        )
        .contains("another proxy"));
        // Dual-stack with an IPv6 primary: its IPv4 address is served.
        let ports = served(
            "metadata: {name: s}\nspec: {clusterIP: 'fd00::1', clusterIPs: ['fd00::1', 10.0.0.7], ports: [{port: 80}]}\n",
        );
        assert_eq!(
            ports.values().next().map(|p| p.cluster_ip),
            Some(Ipv4Addr::new(10, 0, 0, 7))
        );
    }

    #[test]
    fn validation_errors() {
        for ty in ["ClusterIP", "NodePort", "LoadBalancer"] {
            let why = invalid(&format!(
                "{META}spec: {{type: {ty}, ports: [{{port: 80}}]}}\n"
            ));
            assert_eq!(
                why,
                "has no spec.clusterIP (kproxy reads manifests without an API server to allocate one)"
            );
        }
        assert!(
            invalid(&format!(
                "{META}spec: {{clusterIP: 10.0.0.300, ports: [{{port: 80}}]}}\n"
            ))
            .contains("invalid clusterIP \"10.0.0.300\"")
        );
        assert!(
            invalid(&format!(
                "{META}spec: {{clusterIP: 10.0.0.1, externalIPs: [nope], ports: [{{port: 80}}]}}\n"
            ))
            .contains("invalid spec.externalIPs[0] \"nope\"")
        );
        assert!(
            invalid(&format!(
                "{META}spec: {{type: Weird, clusterIP: 10.0.0.1}}\n"
            ))
            .contains("unknown spec.type")
        );
        assert!(
            invalid(&format!("{META}spec: {{clusterIP: 10.0.0.1}}\n")).contains("no spec.ports")
        );
        let cases = [
            ("{port: 0}", "spec.ports[0].port 0 is not in 1..=65535"),
            (
                "{port: 70000}",
                "spec.ports[0].port 70000 is not in 1..=65535",
            ),
            (
                "{port: 80, nodePort: 0}",
                "spec.ports[0].nodePort 0 is not in 1..=65535",
            ),
            (
                "{port: 80, nodePort: 65536}",
                "spec.ports[0].nodePort 65536 is not in 1..=65535",
            ),
            (
                "{port: 80, targetPort: 0}",
                "spec.ports[0].targetPort 0 is not in 1..=65535",
            ),
            (
                "{port: 80, targetPort: 99999}",
                "spec.ports[0].targetPort 99999 is not in 1..=65535",
            ),
            (
                "{port: 80, targetPort: 'Bad_Name'}",
                "is not a valid port name",
            ),
            ("{port: 80, targetPort: '8080'}", "quoted number"),
            (
                "{port: 80, protocol: ICMP}",
                "spec.ports[0].protocol Some(\"ICMP\") is unknown",
            ),
        ];
        for (port, want) in cases {
            let why = invalid(&with_port(port));
            assert!(why.contains(want), "{port}: {why:?} lacks {want:?}");
        }
        let dup = invalid(&format!(
            "{META}spec:\n  type: NodePort\n  clusterIP: 10.0.0.1\n  ports:\n  - {{name: a, port: 80, nodePort: 30000}}\n  - {{name: b, port: 81, nodePort: 30000}}\n"
        ));
        assert!(dup.contains("nodePort 30000/TCP is listed twice"), "{dup}");
        let unnamed = invalid(&format!(
            "{META}spec:\n  clusterIP: 10.0.0.1\n  ports:\n  - {{port: 80}}\n  - {{port: 81}}\n"
        ));
        assert!(unnamed.contains("name is required"), "{unnamed}");
        assert!(invalid(&format!(
            "{META}spec: {{clusterIP: 10.0.0.1, externalTrafficPolicy: Nope, ports: [{{port: 80}}]}}\n"
        ))
        .contains("externalTrafficPolicy"));
        assert!(invalid(&format!(
            "{META}spec: {{clusterIP: 10.0.0.1, loadBalancerSourceRanges: [10.0.0.0/33], ports: [{{port: 80}}]}}\n"
        ))
        .contains("loadBalancerSourceRanges[0]"));
        // The same nodePort on two protocols is fine (e2e: same port number, different protocols).
        served(&format!(
            "{META}spec:\n  type: NodePort\n  clusterIP: 10.0.0.1\n  ports:\n  - {{name: a, port: 80, nodePort: 30000}}\n  - {{name: b, port: 80, protocol: UDP, nodePort: 30000}}\n"
        ));
    }

    #[test]
    fn cluster_ip_type_ignores_node_port_and_local_etp() {
        let ports = served(&format!(
            "{META}spec: {{clusterIP: 10.0.0.1, externalTrafficPolicy: Local, ports: [{{port: 80, nodePort: 30000}}]}}\n"
        ));
        let p = ports.values().next().expect("port");
        assert_eq!(p.served_node_port(), None);
        assert!(!p.external_policy_local());
    }

    fn np_service(name: &str, node_port: u16) -> Service {
        service(&format!(
            "metadata: {{name: {name}}}\nspec: {{type: NodePort, clusterIP: 10.0.0.1, ports: [{{port: 80, nodePort: {node_port}}}]}}\n"
        ))
    }

    #[test]
    fn duplicate_node_port_loses_by_name_order() {
        let mut tracker = ServiceChangeTracker::new();
        let mut map = ServicePortMap::new();
        // Added in reverse order: the name order decides, not arrival.
        for (name, port) in [("b", 30000), ("a", 30000), ("c", 30001)] {
            tracker.update(&map, named(name), Some(&np_service(name, port)));
        }
        let changed = map.apply(&mut tracker);
        assert_eq!(changed.len(), 3);
        let b = NamespacedName::new("default", "b");
        assert_eq!(
            map.rejection(&b),
            Some("nodePort 30000/TCP is already used by Service default/a")
        );
        assert!(map.service(&b).is_none());
        assert_eq!(map.len(), 2);
        // a goes away: b is served, and reported as changed.
        tracker.update(&map, named("a"), None);
        let changed = map.apply(&mut tracker);
        assert!(changed.contains(&b));
        assert!(map.service(&b).is_some());
    }

    #[test]
    fn a_served_node_port_is_not_taken_by_a_newcomer() {
        let mut tracker = ServiceChangeTracker::new();
        let mut map = ServicePortMap::new();
        tracker.update(&map, named("z-old"), Some(&np_service("z-old", 30000)));
        map.apply(&mut tracker);
        // "a-new" sorts first but arrives later: the served one keeps the nodePort.
        tracker.update(&map, named("a-new"), Some(&np_service("a-new", 30000)));
        let changed = map.apply(&mut tracker);
        let newcomer = NamespacedName::new("default", "a-new");
        let old = NamespacedName::new("default", "z-old");
        assert!(changed.contains(&newcomer));
        assert_eq!(
            map.rejection(&newcomer),
            Some("nodePort 30000/TCP is already used by Service default/z-old")
        );
        assert!(map.service(&old).is_some());
        assert!(map.rejection(&old).is_none());
    }

    #[test]
    fn tracker_keeps_first_previous_and_drops_no_ops() {
        let v1 = np_service("a", 30000);
        let v2 = np_service("a", 30001);
        let v3 = np_service("a", 30002);
        let mut tracker = ServiceChangeTracker::new();
        let mut map = ServicePortMap::new();
        tracker.update(&map, named("a"), Some(&v1));
        map.apply(&mut tracker);
        // The previous ports come from what the map holds, not from an old object.
        assert!(tracker.update(&map, named("a"), Some(&v2)));
        assert!(tracker.update(&map, named("a"), Some(&v3)));
        let (_, change) = tracker.pending().next().expect("one change");
        let np = |ports: &ServicePorts| ports.values().next().and_then(|p| p.node_port);
        assert_eq!(np(&change.previous), Some(30000));
        assert_eq!(np(&change.current), Some(30002));
        // Back to the applied version: the change cancels out.
        assert!(!tracker.update(&map, named("a"), Some(&v1)));
        assert!(tracker.is_empty());
        // The same object again (a relist, a resync): no change.
        assert!(!tracker.update(&map, named("a"), Some(&v1)));
        // Add then delete: nothing.
        let b = np_service("b", 30005);
        assert!(tracker.update(&map, named("b"), Some(&b)));
        assert!(!tracker.update(&map, named("b"), None));
        // An invalid update of a served service is a removal.
        let bad = service("metadata: {name: a}\nspec: {type: NodePort, ports: [{port: 80}]}\n");
        assert!(tracker.update(&map, named("a"), Some(&bad)));
        map.apply(&mut tracker);
        assert!(map.is_empty());
    }

    fn named(name: &str) -> NamespacedName {
        NamespacedName::new("default", name)
    }
}
