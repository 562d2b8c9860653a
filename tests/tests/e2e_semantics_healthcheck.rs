//! healthCheckNodePort (Services with `externalTrafficPolicy: Local`), served like
//! kube-proxy on `<node address>:<healthCheckNodePort>`: 200 with the local endpoint count on
//! the node that has a ready local endpoint, 503 on the other; the answers switch when the
//! endpoint moves; a node whose only local endpoint is terminating answers 503 while its
//! nodePort still serves it (e2e "should fail health check node port if there are only
//! terminating endpoints"); the port closes when the Service goes.

mod semantics_common;

use kproxy_tests::harness::{Cluster, PodSpec};
use semantics_common::*;
use serde_json::{Value, json};

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");

const SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: web-local, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.107.10
  selector: {app: web}
  externalTrafficPolicy: Local
  healthCheckNodePort: 32110
  ports:
  - {name: http, protocol: TCP, port: 80, targetPort: 80, nodePort: 30110}
";

fn check_url(n: u8) -> String {
    format!("http://198.18.0.{n}:32110/")
}

fn body_for(local: u64) -> Value {
    json!({
        "service": {"namespace": "default", "name": "web-local"},
        "localEndpoints": local,
        "serviceProxyHealthy": true,
    })
}

/// Waits until node `n`'s health check answers `code` with `localEndpoints: local`.
fn wait_health(c: &Cluster, n: u8, code: u16, local: u64, what: &str) {
    let client = c.client();
    let mut last = (0, String::new());
    let ok = wait_until(std::time::Duration::from_secs(10), || {
        last = http_get(&client, &check_url(n));
        last.0 == code && serde_json::from_str::<Value>(&last.1).is_ok_and(|v| v == body_for(local))
    });
    c.check(ok, || {
        format!(
            "{what}: node{n}'s health check should answer {code} with {}; last: {} {:?}",
            body_for(local),
            last.0,
            last.1
        )
    });
    println!("{what}: node{n} {} {}", last.0, last.1.trim());
}

#[test]
fn health_check_node_port_follows_local_endpoints() {
    let mut c = Cluster::builder()
        .nodes(2)
        .testpod(TESTPOD)
        .pod(PodSpec::new("pod-a", 1))
        .pod(PodSpec::new("pod-b", 2))
        .build()
        .expect("building the cluster");
    let http = [("http", "TCP", 80)];
    let set = |c: &Cluster, eps: &[Ep]| {
        write(
            c,
            "web.yaml",
            &[
                SERVICE.to_string(),
                slice("web-local-1", "web-local", &http, eps),
            ],
        )
    };
    c.ok(c.write_manifests("nodes.yaml", &c.node_objects()));
    set(&c, &[Ep::of(&c, "pod-a")]);
    c.start_agent_ready(1).unwrap();
    c.start_agent_ready(2).unwrap();

    wait_health(&c, 1, 200, 1, "endpoint on node1");
    wait_health(&c, 2, 503, 0, "endpoint on node1");

    // The endpoint moves to node2: the answers switch.
    set(&c, &[Ep::of(&c, "pod-b")]);
    wait_health(&c, 1, 503, 0, "endpoint moved to node2");
    wait_health(&c, 2, 200, 1, "endpoint moved to node2");

    // Two local endpoints are counted as two.
    set(&c, &[Ep::of(&c, "pod-a"), Ep::of(&c, "pod-b")]);
    wait_health(&c, 1, 200, 1, "one endpoint per node");
    wait_health(&c, 2, 200, 1, "one endpoint per node");

    // node2's only endpoint is terminating (still serving): the health check fails so the
    // load balancer drains node2, while node2's nodePort still serves its pod.
    set(
        &c,
        &[
            Ep::of(&c, "pod-a"),
            Ep::of(&c, "pod-b").conditions(false, true, true),
        ],
    );
    wait_health(&c, 2, 503, 0, "only a terminating endpoint on node2");
    wait_health(&c, 1, 200, 1, "only a terminating endpoint on node2");
    let client = c.client();
    wait_served(
        &c,
        &client,
        "http://198.18.0.2:30110/",
        "terminating endpoint still served",
        |r| r.pod() == Some("pod-b"),
    );

    // The Service is gone: the port is closed on both nodes.
    c.ok(c.remove_manifest("web.yaml"));
    for n in [1, 2] {
        let mut last = (0, String::new());
        let closed = wait_until(std::time::Duration::from_secs(10), || {
            last = http_get(&client, &check_url(n));
            last.0 == 0
        });
        c.check(closed, || {
            format!("node{n}'s health check port is still open: {last:?}")
        });
    }
}
