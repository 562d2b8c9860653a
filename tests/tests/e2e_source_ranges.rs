//! `loadBalancerSourceRanges` end to end, the same scenario in every mode that implements it
//! (`ebpf`, `nftables`, `iptables`), on one node with two pods behind a LoadBalancer Service
//! whose ingress IP the outside client routes via node1:
//! - a client address inside the ranges reaches the LoadBalancer IP and the nodePort; one
//!   outside them does not (dropped: the connection times out, nothing answers);
//! - the cluster IP keeps working from a pod and from the node's host;
//! - in-node connections to the LoadBalancer IP follow kube-proxy's rule: allowed when a node
//!   address is inside the ranges, not otherwise;
//! - changing the ranges takes effect, and removing them opens the Service to everyone.

mod semantics_common;

use std::time::{Duration, Instant};

use kproxy_tests::harness::{Cluster, Place, PodSpec, fixtures::CLIENT_POD, probe::CurlResult};
use semantics_common::*;

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");
const CLUSTER_IP: &str = "10.96.103.10";
const NODE_PORT: u16 = 30103;
/// Not any node's address: routed to node1 by the client (and by the node's host).
const LB_IP: &str = "198.18.1.30";
/// The harness's client address, and a second one added to the client.
const CLIENT_IN: &str = "198.18.0.100";
const CLIENT_OUT: &str = "198.18.0.101";

fn lb_service(ranges: Option<&[&str]>) -> String {
    let mut s = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: guarded, namespace: default}}\nspec:\n  type: LoadBalancer\n  clusterIP: {CLUSTER_IP}\n  clusterIPs: [{CLUSTER_IP}]\n  selector: {{app: guarded}}\n  ports:\n  - {{name: http, protocol: TCP, port: 80, targetPort: 80, nodePort: {NODE_PORT}}}\n"
    );
    if let Some(ranges) = ranges {
        s.push_str(&format!(
            "  loadBalancerSourceRanges: [{}]\n",
            ranges.join(", ")
        ));
    }
    s.push_str(&format!(
        "status:\n  loadBalancer:\n    ingress:\n    - {{ip: {LB_IP}}}\n"
    ));
    s
}

fn write_guarded(c: &Cluster, ranges: Option<&[&str]>) {
    let eps = [Ep::of(c, "pod-a"), Ep::of(c, "pod-b")];
    write(
        c,
        "guarded.yaml",
        &[
            lb_service(ranges),
            slice("guarded-1", "guarded", &[("http", "TCP", 80)], &eps),
        ],
    );
}

fn cluster(mode: &str) -> Cluster {
    let mut c = Cluster::builder()
        .proxy_mode(mode)
        .nodes(1)
        .testpod(TESTPOD)
        .pod(PodSpec::new("pod-a", 1).http_ports(&[80]))
        .pod(PodSpec::new("pod-b", 1).http_ports(&[80]))
        .pod(PodSpec::new(CLIENT_POD, 1).http_ports(&[]))
        .build()
        .expect("building the cluster");
    write_guarded(&c, Some(&["198.18.0.100/32"]));
    let client = c.client();
    route_via(&c, &client, "198.18.1.0/24", c.node_ip(1));
    let cns = client.netns.as_ref().expect("client netns");
    c.ok(cns.ip(&["addr", "add", &format!("{CLIENT_OUT}/24"), "dev", "eth0"]));
    // The node's host needs routes for netfilter to DNAT its connect()s (the eBPF socket
    // hook translates before routing; harmless there).
    let node = c.node(1);
    let ns = node.netns.as_ref().expect("node netns");
    c.ok(ns.ip(&["route", "add", "10.96.0.0/12", "dev", "eth0"]));
    c.ok(ns.ip(&["route", "add", "198.18.1.0/24", "dev", "eth0"]));
    c.start_agent_ready(1).expect("starting the agent");
    c
}

fn curl_from(place: &Place, src: Option<&str>, url: &str) -> CurlResult {
    let mut argv = vec![
        "curl",
        "-sS",
        "--max-time",
        "1.5",
        "--connect-timeout",
        "1.5",
    ];
    if let Some(src) = src {
        argv.extend(["--interface", src]);
    }
    argv.push(url);
    let start = Instant::now();
    let out = place
        .output_timeout(&argv, Duration::from_secs(8))
        .expect("running curl");
    CurlResult {
        exit: out.status.code().unwrap_or(-1),
        body: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: start.elapsed(),
    }
}

/// Waits (10 s) until `url` from `place`/`src` is answered by a pod of the Service.
fn wait_allowed(c: &Cluster, place: &Place, src: Option<&str>, url: &str, what: &str) {
    let mut last = None;
    let ok = wait_until(Duration::from_secs(10), || {
        let r = curl_from(place, src, url);
        let good = r.ok() && matches!(r.pod(), Some("pod-a" | "pod-b"));
        last = Some(r);
        good
    });
    c.check(ok, || {
        format!(
            "{} {what}: {} ({src:?}) -> {url} should be served: {}",
            c.proxy_mode(),
            place.label,
            last.map(|r| r.to_string()).unwrap_or_default()
        )
    });
    // And keeps being served.
    for _ in 0..4 {
        let r = curl_from(place, src, url);
        c.check(r.ok(), || format!("{} {what}: {r}", c.proxy_mode()));
    }
}

/// Waits (10 s) until `url` from `place`/`src` is not answered, then checks it stays so.
/// `dropped`: the failure must be a timeout (the packet was dropped), not a refusal.
fn wait_denied(
    c: &Cluster,
    place: &Place,
    src: Option<&str>,
    url: &str,
    dropped: bool,
    what: &str,
) {
    let mut last = None;
    let ok = wait_until(Duration::from_secs(10), || {
        let r = curl_from(place, src, url);
        let denied = !r.ok();
        last = Some(r);
        denied
    });
    c.check(ok, || {
        format!(
            "{} {what}: {} ({src:?}) -> {url} should not be served: {}",
            c.proxy_mode(),
            place.label,
            last.map(|r| r.to_string()).unwrap_or_default()
        )
    });
    for _ in 0..2 {
        let r = curl_from(place, src, url);
        c.check(!r.ok() && (!dropped || r.exit == 28), || {
            format!(
                "{} {what}: {} ({src:?}) -> {url} should be {}: {r}",
                c.proxy_mode(),
                place.label,
                if dropped {
                    "dropped (timeout)"
                } else {
                    "denied"
                }
            )
        });
    }
}

/// `kproxy_datapath_events_total{reason="drop_source_range"}` of node1's agent.
fn drop_count(c: &Cluster) -> f64 {
    let series = "kproxy_datapath_events_total{reason=\"drop_source_range\"}";
    c.metrics(1)
        .get(series)
        .copied()
        .unwrap_or_else(|| panic!("no {series} in the metrics"))
}

fn scenario(mode: &str) {
    let c = cluster(mode);
    let client = c.client();
    let host = c.node(1);
    let pod = c.pod(CLIENT_POD);
    let lb = format!("http://{LB_IP}/");
    let np = format!("http://{}:{NODE_PORT}/", c.node_ip(1));
    let cip = format!("http://{CLUSTER_IP}/");

    // Ranges [198.18.0.100/32]: only the client's first address.
    wait_allowed(&c, &client, Some(CLIENT_IN), &lb, "inside -> LB IP");
    wait_allowed(&c, &client, Some(CLIENT_IN), &np, "inside -> nodePort");
    // The kernel modes drop; the userspace relay has accepted the connection already and
    // resets it.
    let dropped = mode != "userspace";
    wait_denied(
        &c,
        &client,
        Some(CLIENT_OUT),
        &lb,
        dropped,
        "outside -> LB IP",
    );
    wait_denied(
        &c,
        &client,
        Some(CLIENT_OUT),
        &np,
        dropped,
        "outside -> nodePort",
    );
    if mode == "ebpf" {
        // The drops are counted by reason.
        let drops = drop_count(&c);
        c.check(drops >= 4.0, || {
            format!(
                "kproxy_datapath_events_total{{reason=\"drop_source_range\"}} = {drops}, want >= 4"
            )
        });
        println!("ebpf: {drops} packets dropped by source ranges so far");
    }
    // The cluster IP is not restricted.
    wait_allowed(&c, &pod, None, &cip, "pod -> cluster IP");
    wait_allowed(&c, &host, None, &cip, "host -> cluster IP");
    // The node's address (198.18.0.1) is outside: in-node connections to the LB IP are not
    // served (eBPF refuses connect() with EPERM; the rule modes drop).
    wait_denied(&c, &host, None, &lb, false, "host -> LB IP, node outside");
    wait_denied(&c, &pod, None, &lb, false, "pod -> LB IP, node outside");

    // Widened to the whole client network, which holds the node: both client addresses and
    // the node's host are served.
    write_guarded(&c, Some(&["198.18.0.0/24"]));
    wait_allowed(
        &c,
        &client,
        Some(CLIENT_OUT),
        &lb,
        "second address -> LB IP, widened",
    );
    wait_allowed(
        &c,
        &client,
        Some(CLIENT_OUT),
        &np,
        "second address -> nodePort, widened",
    );
    wait_allowed(
        &c,
        &client,
        Some(CLIENT_IN),
        &lb,
        "first address -> LB IP, widened",
    );
    wait_allowed(&c, &host, None, &lb, "host -> LB IP, node inside");

    // Moved elsewhere: the client's addresses lose access.
    write_guarded(&c, Some(&["203.0.113.0/24"]));
    wait_denied(
        &c,
        &client,
        Some(CLIENT_IN),
        &lb,
        dropped,
        "first address -> LB IP, moved",
    );
    wait_denied(
        &c,
        &client,
        Some(CLIENT_IN),
        &np,
        dropped,
        "first address -> nodePort, moved",
    );
    wait_allowed(&c, &pod, None, &cip, "pod -> cluster IP, ranges moved");

    // No ranges: everyone.
    write_guarded(&c, None);
    wait_allowed(&c, &client, Some(CLIENT_OUT), &lb, "no ranges -> LB IP");
    wait_allowed(&c, &client, Some(CLIENT_IN), &np, "no ranges -> nodePort");
    println!("{mode}: source ranges enforced, changed and lifted as expected");
}

#[test]
fn source_ranges_ebpf() {
    scenario("ebpf");
}

#[test]
fn source_ranges_nftables() {
    scenario("nftables");
}

#[test]
fn source_ranges_iptables() {
    scenario("iptables");
}

#[test]
fn source_ranges_userspace() {
    scenario("userspace");
}
