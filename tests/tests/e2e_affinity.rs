//! `sessionAffinity: ClientIP` end to end, the same scenarios in every mode that implements
//! it (`ebpf`, `nftables`, `iptables`), on one node with three pods:
//! - sticky: repeated connections of the outside client to the nodePort, of a pod and of the
//!   node's host to the cluster IP, each reach one pod; other client addresses (extra
//!   addresses on the client) are balanced over the pods and stick too; UDP exchanges of a pod
//!   (a new socket each) stick as well; removing the pinned
//!   pod's endpoint moves the client to a live pod without a failed request;
//! - switch: ClientIP -> None -> ClientIP takes effect both ways;
//! - timeout: with `timeoutSeconds: 2`, a client's connections stick within the timeout and
//!   are balanced again once it has passed.
//!
//! Clients: eBPF keys the outside client by source address (XDP) and in-node clients by
//! network namespace (socket hooks); the rule modes key every client by source address.

mod semantics_common;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use kproxy_tests::harness::{
    Cluster, Place, PodSpec, fixtures::CLIENT_POD, kproxy_bin, probe::CurlResult,
};
use semantics_common::*;

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");
const CLUSTER_IP: &str = "10.96.102.10";
const NODE_PORT: u16 = 30102;
const UDP_PORT: u16 = 5353;
const UDP_NODE_PORT: u16 = 30153;
const PODS: [&str; 3] = ["pod-a", "pod-b", "pod-c"];
/// Extra addresses of the outside client (the harness gives it 198.18.0.100).
const EXTRA_CLIENTS: [&str; 8] = [
    "198.18.0.101",
    "198.18.0.102",
    "198.18.0.103",
    "198.18.0.104",
    "198.18.0.105",
    "198.18.0.106",
    "198.18.0.107",
    "198.18.0.108",
];

/// The Service, with ClientIP affinity of `timeout` seconds, or none (`None`).
fn sticky_service(timeout: Option<u32>) -> String {
    let affinity = match timeout {
        Some(t) => format!(
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {t}}}}}\n"
        ),
        None => "  sessionAffinity: None\n".to_string(),
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: sticky, namespace: default}}\nspec:\n  type: NodePort\n  clusterIP: {CLUSTER_IP}\n  clusterIPs: [{CLUSTER_IP}]\n  selector: {{app: sticky}}\n{affinity}  ports:\n  - {{name: http, protocol: TCP, port: 80, targetPort: 80, nodePort: {NODE_PORT}}}\n  - {{name: dns, protocol: UDP, port: 53, targetPort: {UDP_PORT}, nodePort: {UDP_NODE_PORT}}}\n"
    )
}

fn write_sticky(c: &Cluster, timeout: u32, pods: &[&str]) {
    write_service(c, Some(timeout), pods);
}

fn write_service(c: &Cluster, timeout: Option<u32>, pods: &[&str]) {
    let eps: Vec<Ep> = pods.iter().map(|p| Ep::of(c, p)).collect();
    write(
        c,
        "sticky.yaml",
        &[
            sticky_service(timeout),
            slice(
                "sticky-1",
                "sticky",
                &[("http", "TCP", 80), ("dns", "UDP", UDP_PORT)],
                &eps,
            ),
        ],
    );
}

/// One node with pod-a/b/c behind the sticky Service, the agent in `mode` ready, routes for
/// the node's host, and the extra client addresses.
fn cluster(mode: &str, timeout: u32) -> Cluster {
    let mut c = Cluster::builder()
        .proxy_mode(mode)
        .nodes(1)
        .testpod(TESTPOD)
        .pod(web_pod("pod-a"))
        .pod(web_pod("pod-b"))
        .pod(web_pod("pod-c"))
        .pod(PodSpec::new(CLIENT_POD, 1).http_ports(&[]))
        .build()
        .expect("building the cluster");
    write_sticky(&c, timeout, &PODS);
    // A host process's connect() to a cluster IP needs a route before netfilter can DNAT it
    // (the eBPF socket hook needs none; harmless there).
    let node = c.node(1);
    let ns = node.netns.as_ref().expect("node netns");
    c.ok(ns.ip(&["route", "add", "10.96.0.0/12", "dev", "eth0"]));
    let client = c.client();
    let cns = client.netns.as_ref().expect("client netns");
    for a in EXTRA_CLIENTS {
        c.ok(cns.ip(&["addr", "add", &format!("{a}/24"), "dev", "eth0"]));
    }
    c.start_agent_ready(1).expect("starting the agent");
    c
}

fn web_pod(name: &str) -> PodSpec {
    PodSpec::new(name, 1).http_ports(&[80]).udp(UDP_PORT)
}

/// One curl from `place`, from the source address `src` when given.
fn curl_from(place: &Place, src: Option<&str>, url: &str) -> CurlResult {
    let mut argv = vec!["curl", "-sS", "--max-time", "2", "--connect-timeout", "2"];
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

/// `n` connections from `place` (source `src`); all must succeed. Returns the pods that
/// answered, in order.
fn picks(c: &Cluster, place: &Place, src: Option<&str>, url: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let r = curl_from(place, src, url);
            c.check(r.ok(), || {
                format!(
                    "{} ({src:?}) -> {url}: request {i} failed: {r}",
                    place.label
                )
            });
            r.pod().unwrap_or_default().to_string()
        })
        .collect()
}

/// `n` UDP exchanges (each from a new socket) from `place`; all must be answered. Returns the
/// pods that answered.
fn udp_picks(c: &Cluster, place: &Place, dst: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let l = c.ask(
                place,
                &["udp-ask", dst, "--timeout-ms", "1500"],
                Duration::from_secs(6),
            );
            c.check(l.len() == 1 && l[0].is_ok(), || {
                format!(
                    "{} -> {dst} (UDP) exchange {i} unanswered: {l:?}",
                    place.label
                )
            });
            let pod = l[0].pod().unwrap_or_default().to_string();
            c.check(PODS.contains(&pod.as_str()), || {
                format!("{dst} (UDP) answered by {pod:?}, not a pod of the Service: {l:?}")
            });
            pod
        })
        .collect()
}

/// Asserts every connection went to one pod; returns it.
fn assert_one_pod(c: &Cluster, picks: &[String], what: &str) -> String {
    let distinct: BTreeSet<&String> = picks.iter().collect();
    c.check(distinct.len() == 1, || {
        format!(
            "{} {what}: connections should all reach one pod: {picks:?}",
            c.proxy_mode()
        )
    });
    picks[0].clone()
}

fn nodeport_url(c: &Cluster) -> String {
    format!("http://{}:{NODE_PORT}/", c.node_ip(1))
}

fn cluster_ip_url() -> String {
    format!("http://{CLUSTER_IP}/")
}

fn sticky(mode: &str) {
    let c = cluster(mode, 3600);
    let client = c.client();
    let np = nodeport_url(&c);
    let cip = cluster_ip_url();
    wait_served(&c, &client, &np, "nodePort", |_| true);

    let pinned = assert_one_pod(&c, &picks(&c, &client, None, &np, 12), "client -> nodePort");
    println!("{mode}: client 198.18.0.100 -> nodePort pinned to {pinned}");
    let from_pod = picks(&c, &c.pod(CLIENT_POD), None, &cip, 12);
    assert_one_pod(&c, &from_pod, "pod-z -> cluster IP");
    let from_host = picks(&c, &c.node(1), None, &cip, 12);
    assert_one_pod(&c, &from_host, "node1 host -> cluster IP");
    // UDP: every datagram exchange from a new socket of pod-z reaches one pod.
    let udp = udp_picks(&c, &c.pod(CLIENT_POD), &format!("{CLUSTER_IP}:53"), 8);
    let udp_pod = assert_one_pod(&c, &udp, "pod-z -> cluster IP (UDP)");
    println!("{mode}: pod-z's UDP exchanges all answered by {udp_pod}");

    // Other clients: each sticks to its pod, and they do not all get the same one (with 3
    // pods and 9 clients in all, one pod for everyone has p = 3^-8).
    let mut by_client: BTreeMap<&str, String> = BTreeMap::new();
    by_client.insert("198.18.0.100", pinned.clone());
    for a in EXTRA_CLIENTS {
        let p = assert_one_pod(&c, &picks(&c, &client, Some(a), &np, 4), a);
        by_client.insert(a, p);
    }
    println!("{mode}: picks per client address: {by_client:?}");
    let distinct: BTreeSet<&String> = by_client.values().collect();
    c.check(distinct.len() > 1, || {
        format!("{mode}: 9 client addresses all went to one pod: {by_client:?}")
    });

    if mode == "ebpf" {
        check_list_affinity(&c, &pinned);
    }

    // The pinned pod leaves the Service (the pod keeps running): the client moves to a live
    // pod, and no request fails meanwhile.
    let rest: Vec<&str> = PODS.iter().copied().filter(|p| *p != pinned).collect();
    write_sticky(&c, 3600, &rest);
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = Vec::new();
    loop {
        let r = curl_from(&client, None, &np);
        c.check(r.ok(), || {
            format!("{mode}: a request failed while {pinned} left the Service: {r}")
        });
        let p = r.pod().unwrap_or_default().to_string();
        let moved = p != pinned;
        seen.push(p);
        if moved {
            break;
        }
        c.check(Instant::now() < deadline, || {
            format!("{mode}: the client still reaches the removed {pinned}: {seen:?}")
        });
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = picks(&c, &client, None, &np, 10);
    let new_pin = assert_one_pod(&c, &after, "client -> nodePort after the move");
    c.check(
        new_pin != pinned && rest.contains(&new_pin.as_str()),
        || format!("{mode}: moved to {new_pin}, want one of {rest:?}"),
    );
    println!("{mode}: after removing {pinned}'s endpoint the client moved to {new_pin} ({seen:?})");
}

/// `kproxy list affinity -o json` shows the client's live entry for the nodePort, naming the
/// pod that answered, and the in-node clients' netns entries for the cluster IP.
fn check_list_affinity(c: &Cluster, pinned: &str) {
    let bin = c.ok(kproxy_bin());
    let root = c.node_bpf_root(1);
    let argv = [
        bin.to_str().unwrap(),
        "list",
        "affinity",
        "--bpf-root",
        root.to_str().unwrap(),
        "-o",
        "json",
    ];
    let out = c.ok(c.node(1).output_timeout(&argv, Duration::from_secs(30)));
    let text = String::from_utf8_lossy(&out.stdout);
    c.check(out.status.success(), || format!("{argv:?}: {text}"));
    let v: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let entries = v["entries"].as_array().expect("entries");
    let pinned_ip = c.pod_ip(pinned).to_string();
    let mine = entries
        .iter()
        .find(|e| e["client"] == "198.18.0.100")
        .unwrap_or_else(|| panic!("no entry for the client: {text}"));
    assert_eq!(
        mine["frontend"],
        format!("0.0.0.0:{NODE_PORT}/TCP (nodePort)"),
        "{text}"
    );
    assert_eq!(mine["backend"], format!("{pinned_ip}:80"), "{text}");
    assert_eq!(mine["live"], true, "{text}");
    assert_eq!(mine["timeout_seconds"], 3600, "{text}");
    let netns = entries
        .iter()
        .filter(|e| e["client_kind"] == "netns")
        .filter(|e| e["frontend"] == format!("{CLUSTER_IP}:80/TCP"))
        .count();
    // pod-z's and the node host's namespaces.
    assert_eq!(netns, 2, "{text}");
    // trace agrees: a new flow of the client follows its affinity.
    let dst = format!("{}:{NODE_PORT}/tcp", c.node_ip(1));
    let argv = [
        bin.to_str().unwrap(),
        "trace",
        "198.18.0.100:1",
        &dst,
        "--bpf-root",
        root.to_str().unwrap(),
        "-o",
        "json",
    ];
    let out = c.ok(c.node(1).output_timeout(&argv, Duration::from_secs(30)));
    let text = String::from_utf8_lossy(&out.stdout);
    let t: serde_json::Value = serde_json::from_str(&text).expect("trace JSON");
    assert_eq!(t["verdict"], "affinity", "{text}");
    assert_eq!(t["backend"]["address"], pinned_ip, "{text}");
    println!("$ kproxy list affinity\n{}", {
        let argv: Vec<&str> = argv[..5].to_vec();
        let out = c.ok(c.node(1).output_timeout(&argv, Duration::from_secs(30)));
        String::from_utf8_lossy(&out.stdout).into_owned()
    });
}

fn timeout(mode: &str) {
    let c = cluster(mode, 2);
    let client = c.client();
    let np = nodeport_url(&c);
    wait_served(&c, &client, &np, "nodePort", |_| true);
    // Rounds of 3 quick connections: each round sticks to one pod; between rounds the 2 s
    // timeout passes, so rounds are balanced afresh (8 rounds on one pod: p = 3^-7).
    let mut rounds = Vec::new();
    for _ in 0..8 {
        let p = assert_one_pod(&c, &picks(&c, &client, None, &np, 3), "one round");
        rounds.push(p);
        std::thread::sleep(Duration::from_millis(3500));
    }
    println!("{mode}: pods per round (timeout 2 s, 3.5 s apart): {rounds:?}");
    let distinct: BTreeSet<&String> = rounds.iter().collect();
    c.check(distinct.len() > 1, || {
        format!("{mode}: the pick never changed after the timeout: {rounds:?}")
    });
}

/// Kubernetes' "should be able to switch session affinity": ClientIP -> None -> ClientIP,
/// via the nodePort and (from a pod) the cluster IP.
fn switch(mode: &str) {
    let c = cluster(mode, 3600);
    let client = c.client();
    let pod = c.pod(CLIENT_POD);
    let np = nodeport_url(&c);
    let cip = cluster_ip_url();
    wait_served(&c, &client, &np, "nodePort", |_| true);
    assert_one_pod(
        &c,
        &picks(&c, &client, None, &np, 8),
        "client -> nodePort, ClientIP",
    );
    assert_one_pod(
        &c,
        &picks(&c, &pod, None, &cip, 8),
        "pod-z -> cluster IP, ClientIP",
    );
    // Off: connections are balanced again (24 on one of 3 pods: p = 3^-23 per place).
    write_service(&c, None, &PODS);
    for (place, url, what) in [
        (&client, &np, "client -> nodePort"),
        (&pod, &cip, "pod-z -> cluster IP"),
    ] {
        let ok = wait_until(Duration::from_secs(10), || {
            let p = picks(&c, place, None, url, 24);
            p.iter().collect::<BTreeSet<_>>().len() > 1
        });
        c.check(ok, || {
            format!("{mode} {what}: still sticky after sessionAffinity: None")
        });
    }
    // On again: sticky again.
    write_service(&c, Some(3600), &PODS);
    for (place, url, what) in [
        (&client, &np, "client -> nodePort"),
        (&pod, &cip, "pod-z -> cluster IP"),
    ] {
        let ok = wait_until(Duration::from_secs(10), || {
            let p = picks(&c, place, None, url, 10);
            p.iter().collect::<BTreeSet<_>>().len() == 1
        });
        c.check(ok, || {
            format!("{mode} {what}: not sticky after ClientIP came back")
        });
        assert_one_pod(&c, &picks(&c, place, None, url, 10), what);
    }
    println!("{mode}: affinity switched ClientIP -> None -> ClientIP");
}

#[test]
fn affinity_switch_ebpf() {
    switch("ebpf");
}

#[test]
fn affinity_switch_nftables() {
    switch("nftables");
}

#[test]
fn affinity_switch_iptables() {
    switch("iptables");
}

#[test]
fn affinity_sticky_ebpf() {
    sticky("ebpf");
}

#[test]
fn affinity_sticky_nftables() {
    sticky("nftables");
}

#[test]
fn affinity_sticky_iptables() {
    sticky("iptables");
}

#[test]
fn affinity_timeout_ebpf() {
    timeout("ebpf");
}

#[test]
fn affinity_timeout_nftables() {
    timeout("nftables");
}

#[test]
fn affinity_timeout_iptables() {
    timeout("iptables");
}

#[test]
fn affinity_switch_userspace() {
    switch("userspace");
}

#[test]
fn affinity_sticky_userspace() {
    sticky("userspace");
}

#[test]
fn affinity_timeout_userspace() {
    timeout("userspace");
}
