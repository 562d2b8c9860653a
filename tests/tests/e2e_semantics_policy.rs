//! Service semantics, traffic policies on two nodes:
//! - `externalTrafficPolicy: Local`: a node's nodePort reaches only that node's pods, which
//!   see the real client address (no SNAT); a node without a local endpoint does not serve
//!   it (it does not forward to the other node). The cluster IP still reaches every pod.
//! - `internalTrafficPolicy: Local`: a pod reaching the cluster IP only gets its own node's
//!   endpoints; with none local it is not served.

mod semantics_common;

use kproxy_tests::harness::{Cluster, PodSpec};
use semantics_common::*;

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");

fn service(name: &str, ip: &str, node_port: Option<u16>, policy: &str) -> String {
    let (ty, np) = match node_port {
        Some(p) => ("NodePort", format!(", nodePort: {p}")),
        None => ("ClusterIP", String::new()),
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  type: {ty}\n  clusterIP: {ip}\n  selector: {{app: {name}}}\n  {policy}\n  ports:\n  - {{name: http, protocol: TCP, port: 80, targetPort: 80{np}}}\n"
    )
}

#[test]
fn external_and_internal_traffic_policy_local() {
    let mut c = Cluster::builder()
        .nodes(2)
        .testpod(TESTPOD)
        .pod(PodSpec::new("pod-a", 1))
        .pod(PodSpec::new("pod-z", 1).http_ports(&[]))
        .pod(PodSpec::new("pod-b", 2))
        .pod(PodSpec::new("pod-y", 2).http_ports(&[]))
        .build()
        .expect("building the cluster");
    let both = [Ep::of(&c, "pod-a"), Ep::of(&c, "pod-b")];
    let only_a = [Ep::of(&c, "pod-a")];
    let only_b = [Ep::of(&c, "pod-b")];
    let http = [("http", "TCP", 80)];
    let etp = "externalTrafficPolicy: Local";
    let itp = "internalTrafficPolicy: Local";
    write(
        &c,
        "policy.yaml",
        &[
            service("etp", "10.96.103.10", Some(30104), etp),
            slice("etp-1", "etp", &http, &both),
            service("etp-one", "10.96.103.11", Some(30105), etp),
            slice("etp-one-1", "etp-one", &http, &only_a),
            service("itp", "10.96.103.20", None, itp),
            slice("itp-1", "itp", &http, &both),
            service("itp-one", "10.96.103.21", None, itp),
            slice("itp-one-1", "itp-one", &http, &only_b),
        ],
    );
    c.start_agent_ready(1).unwrap();
    c.start_agent_ready(2).unwrap();
    let client = c.client();

    // ETP=Local: each node's nodePort reaches its own pod only, with the client's address.
    for (node, pod) in [(1u8, "pod-a"), (2, "pod-b")] {
        let url = format!("http://{}:30104/", c.node_ip(node));
        wait_served(&c, &client, &url, "ETP=Local nodePort", |_| true);
        let a = answers(&c, &client, &url, 12);
        println!("client -> {url}: {:?}", pods(&a));
        c.check(
            a.iter().all(|(p, src)| p == pod && src == "198.18.0.100"),
            || format!("ETP=Local: node{node}'s nodePort must reach only {pod}, which sees the client 198.18.0.100: {a:?}"),
        );
    }
    // A node without a local endpoint does not serve the nodePort.
    let url = "http://198.18.0.1:30105/";
    wait_served(&c, &client, url, "ETP=Local, endpoint on node1", |r| {
        r.pod() == Some("pod-a")
    });
    let r = curl(&client, "http://198.18.0.2:30105/");
    println!("client -> node2:30105 (ETP=Local, no local endpoint): {r}");
    c.check(!r.ok(), || {
        format!("ETP=Local: node2 has no local endpoint and must not serve 30105: {r}")
    });
    // ETP does not limit the cluster IP: a pod on node2 reaches both pods.
    let pod_y = c.pod("pod-y");
    let a = answers(&c, &pod_y, "http://10.96.103.10/", 16);
    c.check(pods(&a).len() == 2, || {
        format!("ETP=Local must not limit the cluster IP: {:?}", pods(&a))
    });

    // ITP=Local: each node's pods reach only their node's endpoint through the cluster IP.
    for (from, pod) in [("pod-z", "pod-a"), ("pod-y", "pod-b")] {
        let place = c.pod(from);
        let url = "http://10.96.103.20/";
        wait_served(&c, &place, url, "ITP=Local cluster IP", |_| true);
        let a = answers(&c, &place, url, 12);
        println!("{from} -> {url}: {:?}", pods(&a));
        let from_ip = c.pod_ip(from).to_string();
        c.check(a.iter().all(|(p, src)| p == pod && *src == from_ip), || {
            format!("ITP=Local: {from} must reach only {pod} (seeing {from_ip}): {a:?}")
        });
    }
    // With no endpoint on node1, a pod on node1 is not served; node2's pod is.
    let pod_z = c.pod("pod-z");
    wait_served(
        &c,
        &pod_y,
        "http://10.96.103.21/",
        "ITP=Local, local endpoint",
        |r| r.pod() == Some("pod-b"),
    );
    let r = curl(&pod_z, "http://10.96.103.21/");
    println!("pod-z -> 10.96.103.21 (ITP=Local, no endpoint on node1): {r}");
    c.check(!r.ok(), || {
        format!("ITP=Local: node1 has no endpoint of itp-one; pod-z must not be served: {r}")
    });
}
