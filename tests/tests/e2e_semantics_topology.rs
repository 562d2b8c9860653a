//! Service semantics, topology-aware routing on two nodes in two zones
//! (`trafficDistribution: PreferClose`; the EndpointSlice controller writes `hints.forZones`,
//! kube-proxy obeys them):
//! - each node's pods reach, through the cluster IP, only the endpoint hinted for their zone
//!   (the Node's `topology.kubernetes.io/zone` label);
//! - hints are ignored when one ready endpoint has none, or none is meant for the zone: all
//!   endpoints are used again (a zone is never left without endpoints);
//! - `externalTrafficPolicy: Local` is not narrowed by hints.

mod semantics_common;

use kproxy_tests::harness::{Cluster, PodSpec, node_ip, pod_cidr};
use semantics_common::*;

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");
const URL: &str = "http://10.96.104.10/";

fn node(n: u8, zone: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node{n}\n  labels: {{kubernetes.io/hostname: node{n}, topology.kubernetes.io/zone: {zone}}}\nspec: {{podCIDR: {c}, podCIDRs: [{c}]}}\nstatus:\n  addresses: [{{type: InternalIP, address: {ip}}}]\n",
        c = pod_cidr(n),
        ip = node_ip(n)
    )
}

/// The slice of `web` with one endpoint per (pod, node, zone hints).
fn hinted_slice(c: &Cluster, eps: &[(&str, &[&str])]) -> String {
    let mut s = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: default\n  labels: {kubernetes.io/service-name: web}\naddressType: IPv4\nports: [{name: http, protocol: TCP, port: 80}]\nendpoints:\n".to_string();
    for (pod, zones) in eps {
        let n = c.pod_node(pod);
        s.push_str(&format!(
            "- addresses: [{}]\n  nodeName: node{n}\n  zone: zone-{n}\n",
            c.pod_ip(pod)
        ));
        if !zones.is_empty() {
            let names: Vec<String> = zones.iter().map(|z| format!("{{name: {z}}}")).collect();
            s.push_str(&format!("  hints: {{forZones: [{}]}}\n", names.join(", ")));
        }
    }
    s
}

const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  type: ClusterIP\n  clusterIP: 10.96.104.10\n  trafficDistribution: PreferClose\n  selector: {app: web}\n  ports: [{name: http, protocol: TCP, port: 80, targetPort: 80}]\n";

#[test]
fn topology_hints_keep_traffic_in_the_zone() {
    let mut c = Cluster::builder()
        .nodes(2)
        .testpod(TESTPOD)
        .pod(PodSpec::new("pod-a", 1))
        .pod(PodSpec::new("pod-z", 1).http_ports(&[]))
        .pod(PodSpec::new("pod-b", 2))
        .pod(PodSpec::new("pod-y", 2).http_ports(&[]))
        .build()
        .expect("building the cluster");
    write(&c, "nodes.yaml", &[node(1, "zone-1"), node(2, "zone-2")]);
    let hinted = [("pod-a", &["zone-1"][..]), ("pod-b", &["zone-2"][..])];
    write(&c, "web.yaml", &[SERVICE.into(), hinted_slice(&c, &hinted)]);
    c.start_agent_ready(1).unwrap();
    c.start_agent_ready(2).unwrap();

    // Each zone's client reaches only its zone's endpoint.
    for (from, pod) in [("pod-z", "pod-a"), ("pod-y", "pod-b")] {
        let place = c.pod(from);
        wait_served(&c, &place, URL, "hinted cluster IP", |r| {
            r.pod() == Some(pod)
        });
        let a = answers(&c, &place, URL, 16);
        println!("{from} -> {URL} (hints): {:?}", pods(&a));
        c.check(a.iter().all(|(p, _)| p == pod), || {
            format!(
                "{from} must reach only {pod}, hinted for its zone: {:?}",
                pods(&a)
            )
        });
    }

    // One endpoint without hints: hints are ignored, both pods are used from both zones.
    let partial = [("pod-a", &["zone-1"][..]), ("pod-b", &[][..])];
    write(
        &c,
        "web.yaml",
        &[SERVICE.into(), hinted_slice(&c, &partial)],
    );
    for from in ["pod-z", "pod-y"] {
        let place = c.pod(from);
        let spread = wait_until(std::time::Duration::from_secs(10), || {
            pods(&answers(&c, &place, URL, 12)).len() == 2
        });
        c.check(spread, || {
            format!("{from}: with an endpoint lacking hints, both pods must answer")
        });
    }

    // Every endpoint hinted for zone-2 only: zone-1 has none meant for it, so it ignores the
    // hints rather than being left without endpoints; zone-2 keeps to them (both pods).
    let foreign = [("pod-a", &["zone-2"][..]), ("pod-b", &["zone-2"][..])];
    write(
        &c,
        "web.yaml",
        &[SERVICE.into(), hinted_slice(&c, &foreign)],
    );
    let place = c.pod("pod-z");
    let spread = wait_until(std::time::Duration::from_secs(10), || {
        pods(&answers(&c, &place, URL, 12)).len() == 2
    });
    c.check(spread, || {
        "zone-1 has no endpoint hinted for it: it must use all of them".to_string()
    });
}
