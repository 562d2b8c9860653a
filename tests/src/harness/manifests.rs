//! A small description of the Kubernetes objects the agent reads (v1 Service,
//! discovery.k8s.io/v1 EndpointSlice, v1 Node), rendered as multi-document YAML.

use std::fmt::Write as _;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceType {
    ClusterIp,
    NodePort,
}

#[derive(Clone, Debug)]
pub struct ServicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub target_port: u16,
    pub node_port: Option<u16>,
}

#[derive(Clone, Debug)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub type_: ServiceType,
    /// None: the field is left out.
    pub cluster_ip: Option<String>,
    /// The IPv6 cluster IP: second in `clusterIPs` (dual-stack), or the only one when
    /// `cluster_ip` is None (IPv6-only).
    pub cluster_ip6: Option<String>,
    pub ports: Vec<ServicePort>,
    /// `app: <selector>`.
    pub selector: String,
}

impl Service {
    /// A `type: ClusterIP` service in namespace `default` selecting `app: <name>`.
    pub fn cluster_ip(name: &str, cluster_ip: &str) -> Service {
        Service {
            name: name.into(),
            namespace: "default".into(),
            type_: ServiceType::ClusterIp,
            cluster_ip: Some(cluster_ip.into()),
            cluster_ip6: None,
            ports: Vec::new(),
            selector: name.into(),
        }
    }

    /// A `type: NodePort` service.
    pub fn node_port(name: &str, cluster_ip: &str) -> Service {
        Service {
            type_: ServiceType::NodePort,
            ..Service::cluster_ip(name, cluster_ip)
        }
    }

    /// Makes the service dual-stack (IPv4 primary) with this IPv6 cluster IP.
    pub fn dual_stack(mut self, cluster_ip6: &str) -> Service {
        self.cluster_ip6 = Some(cluster_ip6.into());
        self
    }

    /// Makes the service IPv6-only with this cluster IP.
    pub fn ipv6_only(mut self, cluster_ip6: &str) -> Service {
        self.cluster_ip = None;
        self.cluster_ip6 = Some(cluster_ip6.into());
        self
    }

    pub fn selector(mut self, app: &str) -> Service {
        self.selector = app.into();
        self
    }

    /// Adds a port; `node_port` only matters for `NodePort` services.
    pub fn port(
        mut self,
        name: &str,
        protocol: Protocol,
        port: u16,
        target_port: u16,
        node_port: Option<u16>,
    ) -> Service {
        self.ports.push(ServicePort {
            name: name.into(),
            protocol,
            port,
            target_port,
            node_port,
        });
        self
    }

    pub fn to_yaml(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {}\n  namespace: {}",
            self.name, self.namespace
        );
        let _ = writeln!(s, "spec:");
        let _ = writeln!(
            s,
            "  type: {}",
            match self.type_ {
                ServiceType::ClusterIp => "ClusterIP",
                ServiceType::NodePort => "NodePort",
            }
        );
        match (&self.cluster_ip, &self.cluster_ip6) {
            (Some(ip), Some(ip6)) => {
                let _ = writeln!(
                    s,
                    "  clusterIP: {ip}\n  clusterIPs:\n  - {ip}\n  - '{ip6}'\n  ipFamilyPolicy: RequireDualStack\n  ipFamilies:\n  - IPv4\n  - IPv6"
                );
            }
            (None, Some(ip6)) => {
                let _ = writeln!(
                    s,
                    "  clusterIP: '{ip6}'\n  clusterIPs:\n  - '{ip6}'\n  ipFamilies:\n  - IPv6"
                );
            }
            (ip, None) => {
                if let Some(ip) = ip {
                    let _ = writeln!(s, "  clusterIP: {ip}\n  clusterIPs:\n  - {ip}");
                }
                let _ = writeln!(s, "  ipFamilies:\n  - IPv4");
            }
        }
        let _ = writeln!(s, "  selector:\n    app: {}", self.selector);
        let _ = writeln!(s, "  ports:");
        for p in &self.ports {
            let _ = writeln!(
                s,
                "  - name: {}\n    protocol: {}\n    port: {}\n    targetPort: {}",
                p.name,
                p.protocol.as_str(),
                p.port,
                p.target_port
            );
            if let (ServiceType::NodePort, Some(np)) = (self.type_, p.node_port) {
                let _ = writeln!(s, "    nodePort: {np}");
            }
        }
        s
    }
}

#[derive(Clone, Debug)]
pub struct Endpoint {
    pub ip: String,
    pub node_name: String,
    pub ready: bool,
    /// The pod's name (targetRef).
    pub pod: String,
}

impl Endpoint {
    pub fn new(ip: &str, node_name: &str, pod: &str) -> Endpoint {
        Endpoint {
            ip: ip.into(),
            node_name: node_name.into(),
            ready: true,
            pod: pod.into(),
        }
    }

    pub fn not_ready(mut self) -> Endpoint {
        self.ready = false;
        self
    }
}

#[derive(Clone, Debug)]
pub struct SlicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Clone, Debug)]
pub struct EndpointSlice {
    pub name: String,
    pub namespace: String,
    pub service: String,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<Endpoint>,
    /// `IPv4` (default) or `IPv6`.
    pub address_type: String,
}

impl EndpointSlice {
    /// A slice named `<service>-abc12` labelled `kubernetes.io/service-name: <service>`.
    pub fn for_service(service: &str) -> EndpointSlice {
        EndpointSlice {
            name: format!("{service}-abc12"),
            namespace: "default".into(),
            service: service.into(),
            ports: Vec::new(),
            endpoints: Vec::new(),
            address_type: "IPv4".into(),
        }
    }

    /// An `addressType: IPv6` slice (name it apart from the IPv4 one with `named`).
    pub fn ipv6(mut self) -> EndpointSlice {
        self.address_type = "IPv6".into();
        self
    }

    pub fn named(mut self, name: &str) -> EndpointSlice {
        self.name = name.into();
        self
    }

    pub fn port(mut self, name: &str, protocol: Protocol, port: u16) -> EndpointSlice {
        self.ports.push(SlicePort {
            name: name.into(),
            protocol,
            port,
        });
        self
    }

    pub fn endpoint(mut self, ep: Endpoint) -> EndpointSlice {
        self.endpoints.push(ep);
        self
    }

    pub fn endpoints(mut self, eps: impl IntoIterator<Item = Endpoint>) -> EndpointSlice {
        self.endpoints.extend(eps);
        self
    }

    pub fn to_yaml(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {}\n  namespace: {}\n  labels:\n    kubernetes.io/service-name: {}\n    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io\naddressType: {}",
            self.name, self.namespace, self.service, self.address_type
        );
        if self.ports.is_empty() {
            let _ = writeln!(s, "ports: []");
        } else {
            let _ = writeln!(s, "ports:");
            for p in &self.ports {
                let _ = writeln!(
                    s,
                    "- name: {}\n  protocol: {}\n  port: {}",
                    p.name,
                    p.protocol.as_str(),
                    p.port
                );
            }
        }
        if self.endpoints.is_empty() {
            let _ = writeln!(s, "endpoints: []");
        } else {
            let _ = writeln!(s, "endpoints:");
            for e in &self.endpoints {
                let _ = writeln!(
                    s,
                    "- addresses:\n  - {}\n  conditions:\n    ready: {}\n    serving: {}\n    terminating: false\n  nodeName: {}\n  targetRef:\n    kind: Pod\n    name: {}\n    namespace: {}",
                    yaml_address(&e.ip),
                    e.ready,
                    e.ready,
                    e.node_name,
                    e.pod,
                    self.namespace
                );
            }
        }
        s
    }
}

/// An address as a YAML scalar: IPv6 addresses quoted (a bare `fd00::1` is fine YAML, but
/// quoting keeps `::`-leading ones from being read as something else).
fn yaml_address(ip: &str) -> String {
    if ip.contains(':') {
        format!("'{ip}'")
    } else {
        ip.to_string()
    }
}

#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub internal_ip: String,
    pub pod_cidr: String,
}

impl Node {
    pub fn to_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {n}\n  labels:\n    kubernetes.io/hostname: {n}\nspec:\n  podCIDR: {c}\n  podCIDRs:\n  - {c}\nstatus:\n  addresses:\n  - type: InternalIP\n    address: {ip}\n  - type: Hostname\n    address: {n}\n",
            n = self.name,
            c = self.pod_cidr,
            ip = self.internal_ip
        )
    }
}

/// One document of a manifest file.
#[derive(Clone, Debug)]
pub enum Object {
    Service(Service),
    EndpointSlice(EndpointSlice),
    Node(Node),
    /// Literal YAML (for malformed or unusual input).
    Raw(String),
}

impl Object {
    pub fn to_yaml(&self) -> String {
        match self {
            Object::Service(s) => s.to_yaml(),
            Object::EndpointSlice(e) => e.to_yaml(),
            Object::Node(n) => n.to_yaml(),
            Object::Raw(r) => r.clone(),
        }
    }
}

impl From<Service> for Object {
    fn from(s: Service) -> Object {
        Object::Service(s)
    }
}

impl From<EndpointSlice> for Object {
    fn from(e: EndpointSlice) -> Object {
        Object::EndpointSlice(e)
    }
}

impl From<Node> for Object {
    fn from(n: Node) -> Object {
        Object::Node(n)
    }
}

/// Renders documents separated by `---`.
pub fn render(objects: &[Object]) -> String {
    let mut s = String::new();
    for o in objects {
        s.push_str("---\n");
        let y = o.to_yaml();
        s.push_str(&y);
        if !y.ends_with('\n') {
            s.push('\n');
        }
    }
    s
}

/// The seed services the scenarios use.
pub mod seed {
    use super::*;

    pub const MYSVC_IP: &str = "10.96.100.208";
    pub const MYSVC_PORT: u16 = 8080;
    pub const MYSVC_NODEPORT: u16 = 30001;
    pub const DNS_IP: &str = "10.96.0.10";
    pub const DNS_PORT: u16 = 53;
    pub const DNS_TARGET_PORT: u16 = 5353;
    pub const DNS_NODEPORT: u16 = 30053;

    /// `mysvc`: NodePort, 10.96.100.208:8080 -> 80/TCP, nodePort 30001, selector app: web.
    pub fn mysvc() -> Service {
        Service::node_port("mysvc", MYSVC_IP).selector("web").port(
            "http",
            Protocol::Tcp,
            MYSVC_PORT,
            80,
            Some(MYSVC_NODEPORT),
        )
    }

    /// `mysvc`'s slice with these endpoints (port 80/TCP named http).
    pub fn mysvc_slice(endpoints: impl IntoIterator<Item = Endpoint>) -> EndpointSlice {
        EndpointSlice::for_service("mysvc")
            .port("http", Protocol::Tcp, 80)
            .endpoints(endpoints)
    }

    /// `dns`: NodePort, 10.96.0.10:53/UDP -> 5353, nodePort 30053/UDP.
    pub fn dns() -> Service {
        Service::node_port("dns", DNS_IP).selector("dns").port(
            "dns",
            Protocol::Udp,
            DNS_PORT,
            DNS_TARGET_PORT,
            Some(DNS_NODEPORT),
        )
    }

    pub fn dns_slice(endpoints: impl IntoIterator<Item = Endpoint>) -> EndpointSlice {
        EndpointSlice::for_service("dns")
            .port("dns", Protocol::Udp, DNS_TARGET_PORT)
            .endpoints(endpoints)
    }
}
