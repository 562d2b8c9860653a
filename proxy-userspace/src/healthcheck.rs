//! `healthCheckNodePort`: the per-service health checks kube-proxy serves for Services with
//! `externalTrafficPolicy: Local` (kube-proxy's `pkg/proxy/healthcheck/service_health.go`).
//!
//! A cloud load balancer probes `<node address>:<healthCheckNodePort>` on every node and only
//! sends traffic to the nodes that answer 200, i.e. those with a local ready endpoint; the
//! others answer 503. The body is kube-proxy's:
//!
//! ```json
//! {"service": {"namespace": "default", "name": "web"}, "localEndpoints": 1, "serviceProxyHealthy": true}
//! ```
//!
//! The agent calls [`HealthChecks::update`] after each successful sync; listeners are opened
//! and closed as services gain or lose their health check port, and the counts they answer
//! with are replaced in place.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{Arc, Mutex, atomic::Ordering},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
    task::JoinHandle,
};

use crate::{
    desired::NodeContext,
    health::Status,
    model::{Model, NamespacedName, ServiceType},
};

/// What one health check port answers for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub service: NamespacedName,
    /// Local endpoints that are ready (terminating ones do not count, as in kube-proxy:
    /// e2e "should fail health check node port if there are only terminating endpoints").
    pub local_endpoints: usize,
}

/// The health checks the node must serve: healthCheckNodePort -> service and its local ready
/// endpoint count. Only NodePort and LoadBalancer services with `externalTrafficPolicy:
/// Local` and a `healthCheckNodePort`. When two services claim one port (the API server
/// forbids it; manifests may not), the first by name keeps it.
pub fn desired_health_checks(model: &Model, node: &NodeContext) -> BTreeMap<u16, HealthCheck> {
    let mut out: BTreeMap<u16, HealthCheck> = BTreeMap::new();
    let mut seen: BTreeSet<NamespacedName> = BTreeSet::new();
    for (spn, info) in model.services().iter() {
        let Some(port) = info.health_check_node_port else {
            continue;
        };
        if !info.external_policy_local() || info.service_type == ServiceType::ClusterIp {
            continue;
        }
        let name = NamespacedName::new(&spn.namespace, &spn.name);
        if seen.contains(&name) {
            continue;
        }
        seen.insert(name.clone());
        if let Some(other) = out.get(&port) {
            tracing::warn!(
                "healthCheckNodePort {port} of {name} is already used by {}; not served for {name}",
                other.service
            );
            continue;
        }
        let local: BTreeSet<Ipv4Addr> = model
            .endpoints()
            .get(&name)
            .iter()
            .filter(|ep| ep.ready && ep.is_local(&node.node_name))
            .map(|ep| ep.address)
            .collect();
        out.insert(
            port,
            HealthCheck {
                service: name,
                local_endpoints: local.len(),
            },
        );
    }
    out
}

/// The HTTP status and JSON body kube-proxy answers with.
pub fn response(check: &HealthCheck, proxy_healthy: bool) -> (u16, String) {
    let code = if check.local_endpoints > 0 && proxy_healthy {
        200
    } else {
        503
    };
    // kube-proxy's field order; names are JSON-escaped.
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    let body = format!(
        "{{\"service\": {{\"namespace\": {}, \"name\": {}}}, \"localEndpoints\": {}, \"serviceProxyHealthy\": {proxy_healthy}}}",
        quote(&check.service.namespace),
        quote(&check.service.name),
        check.local_endpoints,
    );
    (code, format!("{body}\n"))
}

type Shared = Arc<Mutex<BTreeMap<u16, HealthCheck>>>;

/// The health check listeners of this node.
pub struct HealthChecks {
    /// Whether the proxy is healthy (`serviceProxyHealthy`): its first sync is programmed.
    status: Arc<Status>,
    checks: Shared,
    listeners: BTreeMap<SocketAddrV4, JoinHandle<()>>,
    /// A port could not be bound: the next update tries again.
    bind_failed: bool,
}

impl HealthChecks {
    pub fn new(status: Arc<Status>) -> Self {
        Self {
            status,
            checks: Arc::default(),
            listeners: BTreeMap::new(),
            bind_failed: false,
        }
    }

    /// Whether an update can change anything after a partial sync of the `changed`
    /// services: one of them has or had a health check, or a bind is to be retried (this
    /// spares a scan of every service per endpoint change).
    pub fn needs_update(&self, model: &Model, changed: &BTreeSet<NamespacedName>) -> bool {
        if self.bind_failed {
            return true;
        }
        let served = self
            .checks
            .lock()
            .map(|c| c.values().any(|h| changed.contains(&h.service)))
            .unwrap_or(true);
        served
            || changed.iter().any(|name| {
                model.services().service(name).is_some_and(|ports| {
                    ports
                        .values()
                        .any(|info| info.health_check_node_port.is_some())
                })
            })
    }

    /// The addresses listened on now.
    pub fn listening(&self) -> Vec<SocketAddrV4> {
        self.listeners.keys().copied().collect()
    }

    /// Serves the health checks of the model's current services on each of the node's
    /// nodePort addresses: opens listeners for new ports, closes those of ports no longer
    /// wanted, and updates the counts the others answer with. Must run inside a tokio
    /// runtime. A port that cannot be bound is logged and tried again on the next update.
    pub fn update(&mut self, model: &Model, node: &NodeContext) {
        let wanted = desired_health_checks(model, node);
        let addrs: BTreeSet<SocketAddrV4> = wanted
            .keys()
            .flat_map(|port| {
                node.nodeport_addresses
                    .iter()
                    .map(move |a| SocketAddrV4::new(*a, *port))
            })
            .collect();
        if let Ok(mut c) = self.checks.lock() {
            *c = wanted;
        }
        self.listeners.retain(|addr, task| {
            let keep = addrs.contains(addr);
            if !keep {
                task.abort();
                tracing::info!(%addr, "health check node port closed");
            }
            keep
        });
        self.bind_failed = false;
        for addr in addrs {
            if self.listeners.contains_key(&addr) {
                continue;
            }
            match bind(addr) {
                Ok(listener) => {
                    tracing::info!(%addr, "health check node port open");
                    let task = tokio::spawn(serve(
                        listener,
                        addr.port(),
                        self.checks.clone(),
                        self.status.clone(),
                    ));
                    self.listeners.insert(addr, task);
                }
                Err(e) => {
                    self.bind_failed = true;
                    tracing::error!(%addr, "cannot listen for a health check node port: {e}");
                }
            }
        }
    }
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        for task in self.listeners.values() {
            task.abort();
        }
    }
}

/// Binds at once (the port is open when `update` returns); std sets SO_REUSEADDR, so a port
/// closed a moment ago can be bound again.
fn bind(addr: SocketAddrV4) -> std::io::Result<TcpListener> {
    let l = std::net::TcpListener::bind(SocketAddr::V4(addr))?;
    l.set_nonblocking(true)?;
    TcpListener::from_std(l)
}

async fn serve(listener: TcpListener, port: u16, checks: Shared, status: Arc<Status>) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let checks = checks.clone();
        let status = status.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            // Any request on any path gets the answer (kube-proxy serves "/" and below).
            if !matches!(
                tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut buf)).await,
                Ok(Ok(n)) if n > 0
            ) {
                return;
            }
            let check = checks.lock().ok().and_then(|c| c.get(&port).cloned());
            let Some(check) = check else {
                return; // closed in the meantime
            };
            let (code, body) = response(&check, status.synced.load(Ordering::Relaxed));
            let reason = if code == 200 {
                "OK"
            } else {
                "Service Unavailable"
            };
            let resp = format!(
                "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nX-Load-Balancing-Endpoint-Weight: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                check.local_endpoints,
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::{
        model::testutil::{service, simple_slice},
        source::K8sObject,
    };

    fn local_service(name: &str, type_: &str, hc: u16) -> K8sObject {
        K8sObject::Service(Box::new(service(&format!(
            "metadata: {{name: {name}}}\nspec:\n  type: {type_}\n  clusterIP: 10.96.0.{}\n  externalTrafficPolicy: Local\n  healthCheckNodePort: {hc}\n  ports:\n  - {{name: http, port: 80, targetPort: 80, nodePort: {}}}\n",
            hc % 200,
            hc - 1000
        ))))
    }

    fn node(name: &str) -> NodeContext {
        NodeContext {
            node_name: name.into(),
            nodeport_addresses: vec![Ipv4Addr::LOCALHOST],
            zone: None,
            ..Default::default()
        }
    }

    #[test]
    fn counts_local_ready_endpoints_of_local_policy_services() {
        let mut model = Model::new();
        let cluster_policy = K8sObject::Service(Box::new(service(
            "metadata: {name: plain}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.99\n  healthCheckNodePort: 32999\n  ports:\n  - {name: http, port: 80, targetPort: 80, nodePort: 30999}\n",
        )));
        model.replace_all(vec![
            local_service("web", "LoadBalancer", 32001),
            local_service("api", "NodePort", 32002),
            cluster_policy,
            K8sObject::EndpointSlice(Box::new(simple_slice(
                "web-1",
                "web",
                80,
                &[
                    ("10.0.1.1", "n1", true, true, false),
                    ("10.0.1.2", "n1", false, true, true), // terminating: not counted
                    ("10.0.2.1", "n2", true, true, false),
                ],
            ))),
            K8sObject::EndpointSlice(Box::new(simple_slice(
                "api-1",
                "api",
                80,
                &[("10.0.2.2", "n2", true, true, false)],
            ))),
        ]);
        let n1 = desired_health_checks(&model, &node("n1"));
        assert_eq!(n1.keys().copied().collect::<Vec<_>>(), vec![32001, 32002]);
        assert_eq!(n1[&32001].service, NamespacedName::new("default", "web"));
        assert_eq!(n1[&32001].local_endpoints, 1);
        assert_eq!(n1[&32002].local_endpoints, 0);
        let n2 = desired_health_checks(&model, &node("n2"));
        assert_eq!(n2[&32001].local_endpoints, 1);
        assert_eq!(n2[&32002].local_endpoints, 1);
        let n3 = desired_health_checks(&model, &node("n3"));
        assert!(n3.values().all(|c| c.local_endpoints == 0));
    }

    #[test]
    fn kube_proxy_response_format() {
        let check = HealthCheck {
            service: NamespacedName::new("ns", "web"),
            local_endpoints: 2,
        };
        let (code, body) = response(&check, true);
        assert_eq!(code, 200);
        assert!(
            body.starts_with(
                "{\"service\": {\"namespace\": \"ns\", \"name\": \"web\"}, \"localEndpoints\": 2"
            ),
            "{body}"
        );
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"service": {"namespace": "ns", "name": "web"}, "localEndpoints": 2, "serviceProxyHealthy": true})
        );
        assert_eq!(response(&check, false).0, 503);
        let none = HealthCheck {
            local_endpoints: 0,
            ..check
        };
        assert_eq!(response(&none, true).0, 503);
    }

    async fn get(addr: SocketAddrV4) -> std::io::Result<(u16, String)> {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        let code = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = out.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
        Ok((code, body.to_string()))
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[tokio::test]
    async fn listeners_follow_the_model() {
        let port = free_port();
        let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
        let status = Arc::new(Status::default());
        status.synced.store(true, Ordering::Relaxed);
        let mut hc = HealthChecks::new(status);
        let mut model = Model::new();
        let svc = local_service("web", "LoadBalancer", port);
        let slice = |node: &str| {
            K8sObject::EndpointSlice(Box::new(simple_slice(
                "web-1",
                "web",
                80,
                &[("10.0.1.1", node, true, true, false)],
            )))
        };
        model.replace_all(vec![svc.clone(), slice("n1")]);
        hc.update(&model, &node("n1"));
        assert_eq!(hc.listening(), vec![addr]);
        let (code, body) = get(addr).await.unwrap();
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["localEndpoints"], 1);
        assert_eq!(v["service"]["name"], "web");

        // The endpoint moves to another node: same listener, now 503.
        model.replace_all(vec![svc.clone(), slice("n2")]);
        hc.update(&model, &node("n1"));
        let (code, body) = get(addr).await.unwrap();
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("\"localEndpoints\": 0"), "{body}");

        // The service is gone: the port is closed.
        model.replace_all(Vec::new());
        hc.update(&model, &node("n1"));
        assert!(hc.listening().is_empty());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(get(addr).await.is_err(), "the port is still open");

        // And it can be opened again at once.
        model.replace_all(vec![svc, slice("n1")]);
        hc.update(&model, &node("n1"));
        assert_eq!(get(addr).await.unwrap().0, 200);
    }
}
