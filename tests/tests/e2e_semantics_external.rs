//! Service semantics, external addresses: a LoadBalancer Service's
//! `status.loadBalancer.ingress[].ip` and a Service's `spec.externalIPs` are served to an
//! outside client that routes them via node1 (as the router in front of a cluster would),
//! balanced over the pods, with the client's address kept for local pods; dropping the
//! address from the Service stops serving it.

mod semantics_common;

use kproxy_tests::harness::{Cluster, PodSpec};
use semantics_common::*;

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");
/// Not any node's address: from the harness' own test range, routed to node1 by the client.
const LB_IP: &str = "198.18.1.10";
const EXTERNAL_IP: &str = "198.18.1.20";

fn lb_service(ingress: &[&str]) -> String {
    let mut s = "apiVersion: v1\nkind: Service\nmetadata: {name: web-lb, namespace: default}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.101.10\n  clusterIPs: [10.96.101.10]\n  selector: {app: web}\n  ports:\n  - {name: http, protocol: TCP, port: 80, targetPort: 80, nodePort: 30101}\nstatus:\n  loadBalancer:\n".to_string();
    if ingress.is_empty() {
        s.push_str("    {}\n");
    } else {
        s.push_str("    ingress:\n");
        for ip in ingress {
            s.push_str(&format!("    - {{ip: {ip}}}\n"));
        }
    }
    s
}

fn external_service(external_ips: &[&str]) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web-ext, namespace: default}}\nspec:\n  type: ClusterIP\n  clusterIP: 10.96.101.20\n  selector: {{app: web}}\n  externalIPs: [{}]\n  ports:\n  - {{name: http, protocol: TCP, port: 8080, targetPort: 80}}\n",
        external_ips.join(", ")
    )
}

#[test]
fn load_balancer_ingress_ip_and_external_ips_from_outside() {
    let mut c = Cluster::builder()
        .nodes(1)
        .testpod(TESTPOD)
        .pod(PodSpec::new("pod-a", 1))
        .pod(PodSpec::new("pod-b", 1))
        .build()
        .expect("building the cluster");
    let eps = [Ep::of(&c, "pod-a"), Ep::of(&c, "pod-b")];
    let write_all = |c: &Cluster, ingress: &[&str], external: &[&str]| {
        write(
            c,
            "services.yaml",
            &[
                lb_service(ingress),
                slice("web-lb-1", "web-lb", &[("http", "TCP", 80)], &eps),
                external_service(external),
                slice("web-ext-1", "web-ext", &[("http", "TCP", 80)], &eps),
            ],
        )
    };
    write_all(&c, &[LB_IP], &[EXTERNAL_IP]);
    c.start_agent_ready(1).unwrap();
    let client = c.client();
    route_via(&c, &client, "198.18.1.0/24", c.node_ip(1));

    for (url, what) in [
        (format!("http://{LB_IP}/"), "LoadBalancer ingress IP"),
        (format!("http://{EXTERNAL_IP}:8080/"), "external IP"),
    ] {
        wait_served(&c, &client, &url, what, |_| true);
        let a = answers(&c, &client, &url, 16);
        let by_pod = pods(&a);
        println!("client -> {url} ({what}): {by_pod:?}");
        c.check(
            by_pod.keys().all(|p| p == "pod-a" || p == "pod-b") && by_pod.len() == 2,
            || format!("{what}: both pods should answer, and only they: {by_pod:?}"),
        );
        c.check(a.iter().all(|(_, src)| src == "198.18.0.100"), || {
            format!("{what}: local pods should see the client's address: {a:?}")
        });
    }
    // The LoadBalancer Service's nodePort and cluster IP are served too.
    wait_served(&c, &client, "http://198.18.0.1:30101/", "nodePort", |_| {
        true
    });
    let fe = frontends(&c, 1);
    for want in [
        "198.18.1.10:80/TCP",
        "198.18.1.20:8080/TCP",
        "10.96.101.10:80/TCP",
        "10.96.101.20:8080/TCP",
    ] {
        c.check(fe.iter().any(|f| f == want), || {
            format!("no frontend {want}: {fe:#?}")
        });
    }

    // The load balancer releases its IP and the external IP is removed: neither is served
    // any more (nothing else on node1 answers for them), the cluster IPs still are.
    write_all(&c, &[], &[]);
    wait_not_served(&c, &client, &format!("http://{LB_IP}/"), "LB IP removed");
    wait_not_served(
        &c,
        &client,
        &format!("http://{EXTERNAL_IP}:8080/"),
        "external IP removed",
    );
    let fe = frontends(&c, 1);
    c.check(!fe.iter().any(|f| f.starts_with("198.18.1.")), || {
        format!("frontends of removed addresses are left: {fe:#?}")
    });
    let pod_url = "http://10.96.101.10:80/";
    let node = c.node(1);
    wait_served(
        &c,
        &node,
        pod_url,
        "cluster IP after the LB IP went",
        |_| true,
    );
}
