//! Service semantics, multi-port Services with named targetPorts (e2e "should serve multiport
//! endpoints from pods"): the port named `http` is 80 on pod-a and 8081 on pod-b, and each
//! request reaches the pod on the port its own EndpointSlice names; a second service port
//! (`admin` -> 9090 on both) is balanced independently, through the cluster IP from a pod and
//! through the nodePorts from outside.

mod semantics_common;

use kproxy_tests::harness::{Cluster, PodSpec};
use semantics_common::*;

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");

const SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: multi, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.102.10
  selector: {app: multi}
  ports:
  - {name: http, protocol: TCP, port: 80, targetPort: http, nodePort: 30102}
  - {name: admin, protocol: TCP, port: 9000, targetPort: admin, nodePort: 30103}
";

#[test]
fn named_target_ports_resolve_per_endpoint() {
    let mut c = Cluster::builder()
        .nodes(1)
        .testpod(TESTPOD)
        .pod(PodSpec::new("pod-a", 1).http_ports(&[80, 9090]))
        .pod(PodSpec::new("pod-b", 1).http_ports(&[8081, 9090]))
        .pod(PodSpec::new("pod-z", 1).http_ports(&[]))
        .build()
        .expect("building the cluster");
    // Two slices: the endpoints' port numbers differ, and a slice's ports apply to all of
    // its endpoints (as the EndpointSlice controller does).
    write(
        &c,
        "multi.yaml",
        &[
            SERVICE.to_string(),
            slice(
                "multi-a",
                "multi",
                &[("http", "TCP", 80), ("admin", "TCP", 9090)],
                &[Ep::of(&c, "pod-a")],
            ),
            slice(
                "multi-b",
                "multi",
                &[("http", "TCP", 8081), ("admin", "TCP", 9090)],
                &[Ep::of(&c, "pod-b")],
            ),
        ],
    );
    c.start_agent_ready(1).unwrap();

    let pod_z = c.pod("pod-z");
    let client = c.client();
    let cases = [
        (&pod_z, "http://10.96.102.10:80/", ["pod-a", "pod-b:8081"]),
        (
            &pod_z,
            "http://10.96.102.10:9000/",
            ["pod-a:9090", "pod-b:9090"],
        ),
        (&client, "http://198.18.0.1:30102/", ["pod-a", "pod-b:8081"]),
        (
            &client,
            "http://198.18.0.1:30103/",
            ["pod-a:9090", "pod-b:9090"],
        ),
    ];
    for (place, url, want) in cases {
        wait_served(&c, place, url, "multi-port service", |_| true);
        let a = answers(&c, place, url, 16);
        let by_pod = pods(&a);
        println!("{} -> {url}: {by_pod:?}", place.label);
        let got: Vec<&str> = by_pod.keys().map(String::as_str).collect();
        c.check(got == want, || {
            format!(
                "{} -> {url}: expected answers from exactly {want:?} (named targetPort resolved per endpoint), got {by_pod:?}",
                place.label
            )
        });
    }
}
