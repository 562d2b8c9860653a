//! kproxy's Kubernetes API source (kube-rs watchers) against the in-repo test API server,
//! on loopback in the test process (no network namespaces, no root): initial sync, changes,
//! deletions, the API server going away and coming back, 410 Gone and relists.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use kproxy::{
    desired::{Frontend, FrontendKind, NodeContext},
    model::Model,
    source::kube::KubeSource,
};
use kproxy_tests::{
    apiserver::{Resource, TestApiServer},
    harness::manifests::{Endpoint, Node, Object, Service, render, seed},
};

const NODE: &str = "node1";

fn kubeconfig(server: &TestApiServer) -> PathBuf {
    let path = std::env::temp_dir().join(format!(
        "kproxy-kube-source-{}-{}.yaml",
        std::process::id(),
        server.addr().port()
    ));
    server.write_kubeconfig(&path).unwrap();
    path
}

fn ep(pod: &str, ip: &str) -> Endpoint {
    Endpoint::new(ip, NODE, pod)
}

fn yaml(objects: Vec<Object>) -> String {
    render(&objects)
}

fn node() -> Node {
    Node {
        name: NODE.into(),
        internal_ip: "198.18.0.11".into(),
        pod_cidr: "10.244.1.0/24".into(),
    }
}

/// mysvc with its slice, a second service `other` with its slice, and this node.
fn seed_server(server: &TestApiServer) {
    server
        .apply_yaml(&yaml(vec![
            seed::mysvc().into(),
            seed::mysvc_slice([ep("pod-a", "10.244.1.2"), ep("pod-b", "10.244.1.3")]).into(),
            Service::cluster_ip("other", "10.96.7.7")
                .port(
                    "http",
                    kproxy_tests::harness::manifests::Protocol::Tcp,
                    80,
                    8080,
                    None,
                )
                .into(),
            kproxy_tests::harness::manifests::EndpointSlice::for_service("other")
                .port(
                    "http",
                    kproxy_tests::harness::manifests::Protocol::Tcp,
                    8080,
                )
                .endpoints([ep("pod-c", "10.244.1.4")])
                .into(),
            node().into(),
        ]))
        .unwrap();
}

fn mysvc_slice(eps: &[(&str, &str)]) -> String {
    yaml(vec![
        seed::mysvc_slice(eps.iter().map(|(p, ip)| ep(p, ip))).into(),
    ])
}

struct Agent {
    source: KubeSource,
    model: Model,
}

impl Agent {
    async fn connect(server: &TestApiServer) -> Agent {
        let path = kubeconfig(server);
        let source = KubeSource::connect(Some(&path), NODE)
            .await
            .expect("connecting");
        // Read at connect; not needed any more.
        let _ = std::fs::remove_file(&path);
        Agent {
            source,
            model: Model::new(),
        }
    }

    /// Feeds the model until `cond` holds (checked after applying); panics after `timeout`.
    /// Returns how long it took.
    async fn until(
        &mut self,
        timeout: Duration,
        what: &str,
        cond: impl Fn(&Model, &KubeSource) -> bool,
    ) -> Duration {
        let start = Instant::now();
        loop {
            self.model.apply_pending();
            if cond(&self.model, &self.source) {
                return start.elapsed();
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                panic!(
                    "{what}: not reached within {timeout:?}; source {:?}; frontends {:#?}",
                    self.source,
                    self.frontends()
                );
            }
            match tokio::time::timeout(left, self.source.next(&mut self.model)).await {
                Ok(Ok(())) | Err(_) => {}
                Ok(Err(e)) => panic!("{what}: the source failed: {e:#}"),
            }
        }
    }

    fn frontends(&self) -> Vec<Frontend> {
        self.model
            .desired(&NodeContext {
                node_name: NODE.into(),
                nodeport_addresses: vec![Ipv4Addr::new(198, 18, 0, 11)],
                zone: None,
                ..Default::default()
            })
            .frontends
    }
}

/// The backends of mysvc's cluster IP frontend (None: no such frontend).
fn mysvc_backends(m: &Model) -> Option<Vec<String>> {
    let d = m.desired(&NodeContext {
        node_name: NODE.into(),
        nodeport_addresses: Vec::new(),
        zone: None,
        ..Default::default()
    });
    d.frontends
        .iter()
        .find(|f| {
            f.kind == FrontendKind::ClusterIp
                && f.address.to_string() == seed::MYSVC_IP
                && f.port == seed::MYSVC_PORT
        })
        .map(|f| {
            f.backends
                .iter()
                .map(|b| format!("{}:{}", b.address, b.port))
                .collect()
        })
}

fn has_service(m: &Model, name: &str) -> bool {
    m.services()
        .service(&kproxy::model::NamespacedName::new("default", name))
        .is_some()
}

#[tokio::test]
async fn initial_list_reaches_the_model() {
    let server = TestApiServer::new().unwrap();
    seed_server(&server);
    // Another node: not watched (field selector metadata.name=node1).
    let mut other = node();
    other.name = "node2".into();
    server.apply_yaml(&yaml(vec![other.into()])).unwrap();
    let mut a = Agent::connect(&server).await;
    let took = a
        .until(Duration::from_secs(10), "initial sync", |m, s| {
            s.initial_sync_done() && m.node(NODE).is_some()
        })
        .await;
    println!("initial sync in {took:?}");
    assert_eq!(
        mysvc_backends(&a.model),
        Some(vec!["10.244.1.2:80".into(), "10.244.1.3:80".into()])
    );
    let fe = a.frontends();
    // mysvc: cluster IP + nodePort; other: cluster IP.
    assert_eq!(fe.len(), 3, "{fe:#?}");
    let np = fe
        .iter()
        .find(|f| f.kind == FrontendKind::NodePort)
        .expect("the nodePort frontend");
    assert_eq!(np.port, seed::MYSVC_NODEPORT);
    assert_eq!(np.backends.len(), 2);
    let stats = a.source.stats();
    assert_eq!(
        (stats.services, stats.endpoint_slices, stats.nodes),
        (2, 2, 1)
    );
    let s = server.stats();
    assert!(s.lists(Resource::Services) >= 1 && s.lists(Resource::EndpointSlices) >= 1);
}

#[tokio::test]
async fn not_synced_until_both_lists_completed() {
    let server = TestApiServer::new().unwrap();
    seed_server(&server);
    server.set_failing(Resource::EndpointSlices, true);
    let mut a = Agent::connect(&server).await;
    a.until(Duration::from_secs(10), "services listed", |_, s| {
        s.stats().service_lists >= 1
    })
    .await;
    assert!(
        !a.source.initial_sync_done(),
        "synced without EndpointSlices"
    );
    // Keeps failing for a while: still not synced.
    let deadline = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < deadline {
        let _ = tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()),
            a.source.next(&mut a.model),
        )
        .await;
        assert!(!a.source.initial_sync_done());
    }
    assert!(server.stats().lists(Resource::EndpointSlices) == 0);
    server.set_failing(Resource::EndpointSlices, false);
    let took = a
        .until(Duration::from_secs(5), "synced once slices list", |_, s| {
            s.initial_sync_done()
        })
        .await;
    println!("synced {took:?} after the slices became available");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert_eq!(mysvc_backends(&a.model).map(|b| b.len()), Some(2));
}

#[tokio::test]
async fn changes_and_deletions_follow() {
    let server = TestApiServer::new().unwrap();
    seed_server(&server);
    let mut a = Agent::connect(&server).await;
    a.until(Duration::from_secs(10), "initial sync", |_, s| {
        s.initial_sync_done()
    })
    .await;

    server
        .apply_yaml(&mysvc_slice(&[
            ("pod-a", "10.244.1.2"),
            ("pod-d", "10.244.1.9"),
        ]))
        .unwrap();
    let took = a
        .until(Duration::from_secs(5), "slice change", |m, _| {
            mysvc_backends(m) == Some(vec!["10.244.1.2:80".into(), "10.244.1.9:80".into()])
        })
        .await;
    println!("slice change seen in {took:?}");
    assert!(took < Duration::from_millis(500), "took {took:?}");

    assert!(server.delete("Service", "default", "other").is_some());
    a.until(Duration::from_secs(5), "service deleted", |m, _| {
        !has_service(m, "other")
    })
    .await;
    assert!(
        !a.frontends()
            .iter()
            .any(|f| f.address == Ipv4Addr::new(10, 96, 7, 7)),
        "{:#?}",
        a.frontends()
    );

    // The slice deleted: mysvc stays, with no backends.
    server.delete("EndpointSlice", "default", "mysvc-abc12");
    a.until(Duration::from_secs(5), "slice deleted", |m, _| {
        mysvc_backends(m) == Some(Vec::new())
    })
    .await;
}

#[tokio::test]
async fn reconnects_after_the_server_comes_back() {
    let mut server = TestApiServer::new().unwrap();
    seed_server(&server);
    let mut a = Agent::connect(&server).await;
    a.until(Duration::from_secs(10), "initial sync", |_, s| {
        s.initial_sync_done()
    })
    .await;
    let lists_before = server.stats().lists(Resource::EndpointSlices);

    server.stop();
    // Down for 4 s: the source yields nothing, the model keeps its state.
    let down = Instant::now() + Duration::from_secs(4);
    while Instant::now() < down {
        let _ = tokio::time::timeout(
            down.saturating_duration_since(Instant::now()),
            a.source.next(&mut a.model),
        )
        .await;
        a.model.apply_pending();
    }
    assert_eq!(mysvc_backends(&a.model).map(|b| b.len()), Some(2));
    // Changed while down: a new service and a slice change.
    server
        .apply_yaml(&yaml(vec![
            Service::cluster_ip("late", "10.96.8.8")
                .port(
                    "http",
                    kproxy_tests::harness::manifests::Protocol::Tcp,
                    80,
                    80,
                    None,
                )
                .into(),
        ]))
        .unwrap();
    server
        .apply_yaml(&mysvc_slice(&[("pod-e", "10.244.1.10")]))
        .unwrap();
    server.start().unwrap();
    let restarted = Instant::now();
    a.until(Duration::from_secs(5), "changes made while down", |m, _| {
        has_service(m, "late") && mysvc_backends(m) == Some(vec!["10.244.1.10:80".into()])
    })
    .await;
    let took = restarted.elapsed();
    println!("reconnected and caught up {took:?} after the restart");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    // Resumed from the resourceVersion (history intact): no relist needed.
    assert_eq!(server.stats().lists(Resource::EndpointSlices), lists_before);
    assert_eq!(server.stats().expired, 0);

    // And it keeps following after the reconnect.
    server
        .apply_yaml(&mysvc_slice(&[("pod-f", "10.244.1.11")]))
        .unwrap();
    a.until(
        Duration::from_secs(3),
        "change after the restart",
        |m, _| mysvc_backends(m) == Some(vec!["10.244.1.11:80".into()]),
    )
    .await;
}

#[tokio::test]
async fn gone_410_relists_and_drops_what_was_deleted_in_the_gap() {
    let mut server = TestApiServer::new().unwrap();
    seed_server(&server);
    let mut a = Agent::connect(&server).await;
    a.until(Duration::from_secs(10), "initial sync", |_, s| {
        s.initial_sync_done()
    })
    .await;
    let lists = a.source.stats();

    // While the server is away: `other` and its slice deleted, mysvc's slice changed; then
    // the history is compacted, so resuming the watches is impossible.
    server.stop();
    server.delete("Service", "default", "other").unwrap();
    server
        .delete("EndpointSlice", "default", "other-abc12")
        .unwrap();
    server
        .apply_yaml(&mysvc_slice(&[("pod-g", "10.244.1.12")]))
        .unwrap();
    server.compact();
    server.start().unwrap();
    let restarted = Instant::now();
    a.until(Duration::from_secs(5), "relist converged", |m, _| {
        !has_service(m, "other") && mysvc_backends(m) == Some(vec!["10.244.1.12:80".into()])
    })
    .await;
    println!("relisted {:?} after the restart", restarted.elapsed());
    assert!(restarted.elapsed() < Duration::from_secs(3));
    assert!(server.stats().expired >= 2, "{:?}", server.stats());
    let now = a.source.stats();
    assert!(now.service_lists > lists.service_lists, "{now:?}");
    assert!(
        now.endpoint_slice_lists > lists.endpoint_slice_lists,
        "{now:?}"
    );
    assert_eq!((now.services, now.endpoint_slices), (1, 1));
}

#[tokio::test]
async fn compaction_while_watching_relists_at_once() {
    let server = TestApiServer::new().unwrap();
    seed_server(&server);
    let mut a = Agent::connect(&server).await;
    a.until(Duration::from_secs(10), "initial sync", |_, s| {
        s.initial_sync_done()
    })
    .await;
    let before = a.source.stats();
    // Compaction ends the open watches; their resume gets 410; the watchers relist.
    server.compact();
    server
        .apply_yaml(&mysvc_slice(&[("pod-h", "10.244.1.13")]))
        .unwrap();
    let took = a
        .until(Duration::from_secs(5), "change after compaction", |m, s| {
            mysvc_backends(m) == Some(vec!["10.244.1.13:80".into()])
                && s.stats().endpoint_slice_lists > before.endpoint_slice_lists
        })
        .await;
    println!("relisted and converged in {took:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(server.stats().expired >= 1);
}

/// Hostile objects through the API (issue 5), applied while the agent already serves mysvc:
/// each one is skipped on its own (a duplicate nodePort stays with mysvc, which served it
/// first), the valid objects next to them are served, and a 10,000-endpoint slice reaches
/// the model whole.
#[tokio::test]
async fn hostile_objects_are_skipped_each_and_the_rest_is_served() {
    use kproxy_tests::harness::manifests::{EndpointSlice, Protocol};
    let server = TestApiServer::new().unwrap();
    seed_server(&server);
    let mut a = Agent::connect(&server).await;
    a.until(Duration::from_secs(10), "initial sync", |m, s| {
        s.initial_sync_done() && has_service(m, "mysvc")
    })
    .await;

    let svc = |name: &str, spec: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec: {spec}\n---\n"
        )
    };
    let mut hostile = String::new();
    hostile += &svc(
        "dup-np",
        "{type: NodePort, clusterIP: 10.96.71.1, ports: [{name: http, protocol: TCP, port: 80, targetPort: 80, nodePort: 30001}]}",
    );
    hostile += &svc(
        "badip",
        "{clusterIP: 10.96.71.2, ports: [{name: http, protocol: TCP, port: 80, targetPort: 80}]}",
    );
    hostile += "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: badip-1, namespace: default, labels: {kubernetes.io/service-name: badip}}\naddressType: IPv4\nports: [{name: http, protocol: TCP, port: 80}]\nendpoints: [{addresses: [10.0.0.999]}]\n---\n";
    hostile += &svc(
        "port-zero",
        "{clusterIP: 10.96.71.3, ports: [{name: http, protocol: TCP, port: 0, targetPort: 80}]}",
    );
    hostile += &svc(
        "port-too-big",
        "{clusterIP: 10.96.71.4, ports: [{name: http, protocol: TCP, port: 65536, targetPort: 80}]}",
    );
    hostile += &svc(
        "badproto",
        "{clusterIP: 10.96.71.5, ports: [{name: http, protocol: TCPX, port: 80, targetPort: 80}]}",
    );
    hostile += &svc(
        "badcip",
        "{clusterIP: 10.96.300.1, ports: [{name: http, protocol: TCP, port: 80, targetPort: 80}]}",
    );
    hostile += &svc(
        "goodnew",
        "{clusterIP: 10.96.71.9, ports: [{name: http, protocol: TCP, port: 80, targetPort: 80}]}",
    );
    server.apply_yaml(&hostile).unwrap();
    a.until(Duration::from_secs(10), "goodnew served", |m, _| {
        has_service(m, "goodnew") && has_service(m, "badip")
    })
    .await;
    let m = &a.model;
    let dup = kproxy::model::NamespacedName::new("default", "dup-np");
    assert_eq!(
        m.services().rejection(&dup),
        Some("nodePort 30001/TCP is already used by Service default/mysvc")
    );
    assert!(!has_service(m, "dup-np"));
    for bad in ["port-zero", "port-too-big", "badproto", "badcip"] {
        assert!(!has_service(m, bad), "{bad} must not be served");
    }
    assert_eq!(
        mysvc_backends(m),
        Some(vec!["10.244.1.2:80".to_owned(), "10.244.1.3:80".to_owned()])
    );
    // The Service of the invalid slice is served without endpoints (refused, not a crash).
    let badip: Vec<_> = a
        .frontends()
        .into_iter()
        .filter(|f| f.address.to_string() == "10.96.71.2")
        .collect();
    assert!(
        badip.len() == 1 && badip[0].backends.is_empty(),
        "{badip:?}"
    );

    // 10,000 endpoints in one slice.
    let eps = (0..10_000u32).map(|i| {
        let n = i + 1;
        ep("pod-big", &format!("10.245.{}.{}", n / 256, n % 256))
    });
    let big = yaml(vec![
        Service::cluster_ip("big", "10.96.70.70")
            .port("http", Protocol::Tcp, 80, 8090, None)
            .into(),
        EndpointSlice::for_service("big")
            .port("http", Protocol::Tcp, 8090)
            .endpoints(eps)
            .into(),
    ]);
    let t = Instant::now();
    server.apply_yaml(&big).unwrap();
    let took = a
        .until(Duration::from_secs(30), "10,000 endpoints", |m, _| {
            m.desired(&NodeContext {
                node_name: NODE.into(),
                nodeport_addresses: Vec::new(),
                zone: None,
                ..Default::default()
            })
            .frontends
            .iter()
            .any(|f| f.address.to_string() == "10.96.70.70" && f.backends.len() == 10_000)
        })
        .await;
    println!(
        "API source: 10,000-endpoint slice applied -> in the model after {took:?} ({:?} including the apply)",
        t.elapsed()
    );
}
