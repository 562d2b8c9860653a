//! Service semantics, a Service changing under the agent converges without leftovers
//! (checked in what is programmed, `kproxy list services -o json`, and in what clients see):
//! NodePort -> ClusterIP releases the nodePort (refused afterwards); a port change moves the
//! frontend; a protocol change (TCP -> UDP) leaves no TCP frontend; deleting the Service
//! releases every frontend and backend.

mod semantics_common;

use std::time::Duration;

use kproxy_tests::harness::{Cluster, Place, PodSpec};
use semantics_common::*;

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");

fn service(ty: &str, port: u16, protocol: &str, target: u16) -> String {
    let np = if ty == "NodePort" {
        ", nodePort: 30108"
    } else {
        ""
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: life, namespace: default}}\nspec:\n  type: {ty}\n  clusterIP: 10.96.106.10\n  selector: {{app: life}}\n  ports:\n  - {{name: p, protocol: {protocol}, port: {port}, targetPort: {target}{np}}}\n"
    )
}

fn udp_answer(c: &Cluster, place: &Place, target: &str) -> Option<String> {
    let l = c.ask(
        place,
        &["udp-ask", target, "--timeout-ms", "700"],
        Duration::from_secs(5),
    );
    l.first().and_then(|l| l.pod()).map(String::from)
}

#[test]
fn type_port_and_protocol_changes_and_delete_leave_nothing_behind() {
    let mut c = Cluster::builder()
        .nodes(1)
        .testpod(TESTPOD)
        .pod(PodSpec::new("pod-a", 1).http_ports(&[80]).udp(5353))
        .pod(PodSpec::new("pod-z", 1).http_ports(&[]))
        .build()
        .expect("building the cluster");
    let ep = [Ep::of(&c, "pod-a")];
    let write_svc = |c: &Cluster, svc: String, ports: &[(&str, &str, u16)]| {
        write(c, "life.yaml", &[svc, slice("life-1", "life", ports, &ep)]);
    };
    let tcp80 = [("p", "TCP", 80)];
    // Another file stays, so removing life.yaml leaves a valid, non-empty set.
    c.ok(c.write_manifests("nodes.yaml", &c.node_objects()));
    write_svc(&c, service("NodePort", 80, "TCP", 80), &tcp80);
    c.start_agent_ready(1).unwrap();
    let pod_z = c.pod("pod-z");
    let client = c.client();
    wait_served(&c, &client, "http://198.18.0.1:30108/", "NodePort", |r| {
        r.pod() == Some("pod-a")
    });
    let fe = frontends(&c, 1);
    assert_eq!(
        fe,
        ["0.0.0.0:30108/TCP (nodePort)", "10.96.106.10:80/TCP"],
        "NodePort service"
    );

    // NodePort -> ClusterIP: the nodePort is released and refused; the cluster IP stays.
    write_svc(&c, service("ClusterIP", 80, "TCP", 80), &tcp80);
    wait_frontends(&c, 1, "NodePort -> ClusterIP", |fe| {
        fe == ["10.96.106.10:80/TCP"]
    });
    assert_refused(
        &c,
        &client,
        "http://198.18.0.1:30108/",
        "released nodePort",
        3,
    );
    wait_served(&c, &pod_z, "http://10.96.106.10/", "cluster IP", |r| {
        r.pod() == Some("pod-a")
    });

    // Back to NodePort with port 80 -> 8080: the old port is gone, the new one served.
    write_svc(&c, service("NodePort", 8080, "TCP", 80), &tcp80);
    wait_frontends(&c, 1, "port 80 -> 8080", |fe| {
        fe == ["0.0.0.0:30108/TCP (nodePort)", "10.96.106.10:8080/TCP"]
    });
    wait_served(&c, &pod_z, "http://10.96.106.10:8080/", "new port", |r| {
        r.pod() == Some("pod-a")
    });
    wait_served(
        &c,
        &client,
        "http://198.18.0.1:30108/",
        "nodePort again",
        |r| r.pod() == Some("pod-a"),
    );
    let r = curl(&pod_z, "http://10.96.106.10:80/");
    c.check(!r.ok(), || format!("the old port 80 is still served: {r}"));

    // TCP -> UDP on the same port: only UDP frontends are left, and UDP is answered.
    write_svc(
        &c,
        service("NodePort", 8080, "UDP", 5353),
        &[("p", "UDP", 5353)],
    );
    wait_frontends(&c, 1, "TCP -> UDP", |fe| {
        fe == ["0.0.0.0:30108/UDP (nodePort)", "10.96.106.10:8080/UDP"]
    });
    let ok = wait_until(Duration::from_secs(10), || {
        udp_answer(&c, &pod_z, "10.96.106.10:8080").as_deref() == Some("pod-a")
    });
    c.check(ok, || {
        "UDP 10.96.106.10:8080 is not answered by pod-a".into()
    });
    let ok = wait_until(Duration::from_secs(10), || {
        udp_answer(&c, &client, "198.18.0.1:30108").as_deref() == Some("pod-a")
    });
    c.check(ok, || "UDP nodePort 30108 is not answered by pod-a".into());
    let r = curl(&pod_z, "http://10.96.106.10:8080/");
    c.check(!r.ok(), || format!("TCP 8080 is still served: {r}"));
    assert_refused(
        &c,
        &client,
        "http://198.18.0.1:30108/",
        "TCP nodePort after UDP",
        2,
    );

    // Deleted: nothing is left programmed.
    c.ok(c.remove_manifest("life.yaml"));
    wait_frontends(&c, 1, "deleted", |fe| fe.is_empty());
    let v = list_services(&c, 1);
    c.check(v.as_array().is_some_and(Vec::is_empty), || {
        format!("list services after delete: {v:#}")
    });
    let ok = wait_until(Duration::from_secs(10), || {
        udp_answer(&c, &pod_z, "10.96.106.10:8080").is_none()
    });
    c.check(ok, || "the deleted service still answers UDP".into());
    assert_refused(
        &c,
        &client,
        "http://198.18.0.1:30108/",
        "deleted nodePort",
        2,
    );
}
