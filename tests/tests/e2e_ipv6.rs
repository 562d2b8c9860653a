//! IPv6 and dual-stack Services on a dual-stack cluster (every address of the IPv4 harness
//! kept, IPv6 ones added). Asserted as a user sees it: which pod answered, the source it
//! saw, the peer getpeername() shows, refusals.

use std::{collections::BTreeSet, time::Duration};

use kproxy_tests::harness::{
    AskLine, Cluster, Place, PodSpec,
    manifests::{EndpointSlice, Object, Protocol, Service},
    probe::{self, show},
    sys,
};

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");
const CIP4: &str = "10.96.100.208";
const CIP6: &str = "fd00:10:96::208";
const PORT: u16 = 8080;

fn dual_stack_cluster(nodes: u8, pods: &[(&str, u8)]) -> Cluster {
    let mut b = Cluster::builder()
        .nodes(nodes)
        .testpod(TESTPOD)
        .dual_stack()
        .pod(PodSpec::new("pod-z", 1).http_ports(&[]));
    for (name, node) in pods {
        b = b.pod(PodSpec::new(name, *node));
    }
    b.build().expect("building the dual-stack cluster")
}

/// `web`: 8080 -> 80/TCP over the given IPv4 and IPv6 endpoints (separate slices).
fn write_web(c: &Cluster, svc: Service, v4: &[&str], v6: &[&str]) -> u64 {
    let mut objs: Vec<Object> = vec![svc.into()];
    if !v4.is_empty() {
        objs.push(
            EndpointSlice::for_service("web")
                .port("http", Protocol::Tcp, 80)
                .endpoints(v4.iter().map(|p| c.endpoint(p)))
                .into(),
        );
    }
    objs.push(
        EndpointSlice::for_service("web")
            .named("web-v6")
            .ipv6()
            .port("http", Protocol::Tcp, 80)
            .endpoints(v6.iter().map(|p| c.endpoint6(p)))
            .into(),
    );
    c.write_manifests("web.yaml", &objs).unwrap()
}

fn web_service() -> Service {
    Service::cluster_ip("web", CIP4).port("http", Protocol::Tcp, PORT, 80, None)
}

fn url6(ip: &str) -> String {
    format!("http://[{ip}]:{PORT}/")
}

/// Waits until `place` gets an answer from `url`.
fn wait_served(place: &Place, url: &str) {
    let ok = sys::wait_for(Duration::from_secs(10), Duration::from_millis(50), || {
        probe::curl(place, url, Duration::from_secs(1))
            .unwrap()
            .ok()
            .then_some(())
    });
    assert!(ok.is_some(), "{} -> {url}: never served", place.label);
}

/// `n` requests; returns the set of pods that answered and asserts every one did, with the
/// client's own address `source` seen by the pod (no SNAT).
fn answered_by(place: &Place, url: &str, n: usize, source: &str) -> BTreeSet<String> {
    let results = probe::curl_n(place, url, n, Duration::from_secs(3)).unwrap();
    let mut pods = BTreeSet::new();
    for r in &results {
        assert!(r.ok(), "{} -> {url}: {r}", place.label);
        assert_eq!(
            r.seen_source(),
            Some(source),
            "{} -> {url}: {r}",
            place.label
        );
        pods.insert(r.pod().unwrap().to_string());
    }
    pods
}

fn tcp_ask(c: &Cluster, place: &Place, target: &str, count: &str) -> Vec<AskLine> {
    c.ask(
        place,
        &[
            "tcp-ask",
            target,
            "--http",
            "--count",
            count,
            "--timeout-ms",
            "2000",
        ],
        Duration::from_secs(30),
    )
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// A dual-stack Service answers over its IPv6 cluster IP from a pod and from a host process
/// (backends on both nodes, the client's IPv6 address kept), getpeername() shows the
/// service, a v4-mapped destination goes through the IPv4 frontend, and IPv4 still works.
/// `kproxy cleanup` then removes the IPv6 maps and links with the rest.
#[test]
fn dual_stack_service_over_ipv6_and_ipv4() {
    let mut c = dual_stack_cluster(2, &[("pod-a", 1), ("pod-b", 2)]);
    write_web(
        &c,
        web_service().dual_stack(CIP6),
        &["pod-a", "pod-b"],
        &["pod-a", "pod-b"],
    );
    c.start_agent_ready(1).expect("starting the agent");
    let both = set(&["pod-a", "pod-b"]);

    let pod = c.pod("pod-z");
    let pod6 = c.pod_ip6("pod-z").to_string();
    wait_served(&pod, &url6(CIP6));
    assert_eq!(
        answered_by(&pod, &url6(CIP6), 20, &pod6),
        both,
        "pod over IPv6"
    );

    let host = c.node(1);
    let host6 = kproxy_tests::harness::cluster::node_ip6(1).to_string();
    assert_eq!(
        answered_by(&host, &url6(CIP6), 20, &host6),
        both,
        "host over IPv6"
    );

    // getpeername() on the translated IPv6 socket shows the service, not the pod.
    let target6 = format!("[{CIP6}]:{PORT}");
    for l in tcp_ask(&c, &pod, &target6, "4") {
        match &l.outcome {
            kproxy_tests::harness::Outcome::Ok { peer, .. } => {
                assert_eq!(peer, &target6, "getpeername on {l}")
            }
            _ => panic!("{target6}: {l}"),
        }
    }

    // IPv4 unchanged.
    let url4 = format!("http://{CIP4}:{PORT}/");
    let pod4 = c.pod_ip("pod-z").to_string();
    assert_eq!(answered_by(&pod, &url4, 20, &pod4), both, "pod over IPv4");

    // An IPv6 socket to the v4-mapped cluster IP: balanced by the IPv4 frontend, peer shown
    // v4-mapped.
    let mapped = format!("[::ffff:{CIP4}]:{PORT}");
    let lines = tcp_ask(&c, &pod, &mapped, "20");
    let pods: BTreeSet<String> = lines
        .iter()
        .filter_map(|l| l.pod().map(String::from))
        .collect();
    assert!(
        lines.iter().all(|l| l.is_ok()),
        "{mapped}:\n{}",
        show(&lines)
    );
    assert_eq!(pods, both, "{mapped}:\n{}", show(&lines));
    assert!(
        lines.iter().all(|l| matches!(&l.outcome, kproxy_tests::harness::Outcome::Ok { peer, .. } if *peer == mapped)),
        "{mapped}: getpeername should show the v4-mapped service:\n{}",
        show(&lines)
    );

    // Cleanup takes the IPv6 maps and links too.
    c.stop_agent(1);
    let out = c.agent_cleanup(1).expect("kproxy cleanup");
    assert!(out.status.success(), "cleanup: {out:?}");
    let root = c.node_bpf_root(1);
    assert!(
        !root.join("KP_LB6_SVC_V1").exists() && !root.join("links").exists(),
        "left behind in {}",
        root.display()
    );
    let r = probe::curl(&pod, &url6(CIP6), Duration::from_secs(2)).unwrap();
    assert!(!r.ok(), "{CIP6} still served after cleanup: {r}");
}

/// An IPv6-only Service: served over IPv6 (pod and host), refused at once without
/// endpoints, and following endpoint churn with no request to a removed pod afterwards.
#[test]
fn ipv6_only_service_refusal_and_churn() {
    let mut c = dual_stack_cluster(1, &[("pod-a", 1), ("pod-b", 1), ("pod-c", 1)]);
    let svc = || web_service().ipv6_only(CIP6);
    write_web(&c, svc(), &[], &["pod-a", "pod-b"]);
    c.start_agent_ready(1).expect("starting the agent");
    let pod = c.pod("pod-z");
    let pod6 = c.pod_ip6("pod-z").to_string();
    wait_served(&pod, &url6(CIP6));
    assert_eq!(
        answered_by(&pod, &url6(CIP6), 20, &pod6),
        set(&["pod-a", "pod-b"])
    );

    // No endpoints: refused at once (ECONNREFUSED from connect()), not a timeout.
    let target6 = format!("[{CIP6}]:{PORT}");
    write_web(&c, svc(), &[], &[]);
    let refused = sys::wait_for(Duration::from_secs(5), Duration::from_millis(50), || {
        tcp_ask(&c, &pod, &target6, "1")
            .first()
            .is_some_and(|l| l.is_errno("ECONNREFUSED"))
            .then_some(())
    });
    assert!(
        refused.is_some(),
        "{target6} never refused without endpoints"
    );
    let r = probe::curl(&pod, &url6(CIP6), Duration::from_secs(3)).unwrap();
    assert!(
        r.refused() && r.elapsed < Duration::from_secs(1),
        "should be refused at once: {r}"
    );

    // Churn: pod-a and pod-b back, then replaced by pod-c under load.
    write_web(&c, svc(), &[], &["pod-a", "pod-b"]);
    wait_served(&pod, &url6(CIP6));
    let asker = c.ask_start(
        &pod,
        &[
            "tcp-ask",
            &target6,
            "--http",
            "--count",
            "60",
            "--interval-ms",
            "50",
            "--timeout-ms",
            "1000",
        ],
    );
    assert!(
        asker
            .wait_line(Duration::from_secs(5), |l| l.seq >= 10)
            .is_some(),
        "client did not start"
    );
    let t_change = write_web(&c, svc(), &[], &["pod-c"]);
    let lines = asker.finish(Duration::from_secs(60)).expect("client");
    let timeline = show(&lines);
    let first_c = lines
        .iter()
        .find(|l| l.pod() == Some("pod-c"))
        .unwrap_or_else(|| panic!("pod-c never answered:\n{timeline}"));
    let after: Vec<&AskLine> = lines.iter().filter(|l| l.ts_ms >= first_c.ts_ms).collect();
    println!(
        "IPv6 churn: slice change -> first pod-c answer {} ms; {} requests after it",
        first_c.ts_ms as i64 - t_change as i64,
        after.len()
    );
    assert!(
        after.iter().all(|l| l.pod() == Some("pod-c")),
        "after the change only pod-c may answer (and none may fail):\n{timeline}"
    );
    assert!(
        lines.iter().all(|l| l.is_ok()),
        "no request may fail (pods a and b still run):\n{timeline}"
    );
    assert!(c.agent_running(1), "the agent exited");
}

/// In a rule mode (`table ip6 kproxy` / ip6tables chains): a dual-stack Service over its IPv6
/// cluster IP from a pod (backends on both nodes), refused without endpoints; switching to
/// the eBPF mode and back leaves nothing of the other, and `kproxy cleanup` removes the
/// IPv6 rules.
fn rule_mode_ipv6_cluster_ip(mode: &str, rules_present: fn(&Place) -> bool) {
    let mut c = dual_stack_cluster(2, &[("pod-a", 1), ("pod-b", 2)]);
    c.set_proxy_mode(mode);
    write_web(
        &c,
        web_service().dual_stack(CIP6),
        &["pod-a", "pod-b"],
        &["pod-a", "pod-b"],
    );
    c.start_agent_ready(1).expect("starting the agent");
    let pod = c.pod("pod-z");
    let pod6 = c.pod_ip6("pod-z").to_string();
    wait_served(&pod, &url6(CIP6));
    // No IPv6 cluster CIDR is known to the rule modes: traffic to an endpoint on another
    // node is masqueraded to the node (as IPv4 without --cluster-cidr); a local endpoint
    // sees the pod.
    let node6 = kproxy_tests::harness::cluster::node_ip6(1).to_string();
    let results = probe::curl_n(&pod, &url6(CIP6), 20, Duration::from_secs(3)).unwrap();
    let mut pods = BTreeSet::new();
    for r in &results {
        let want = match r.pod() {
            Some("pod-a") => &pod6,
            Some("pod-b") => &node6,
            _ => panic!("{mode}: {r}"),
        };
        assert_eq!(r.seen_source(), Some(want.as_str()), "{mode}: {r}");
        pods.insert(r.pod().unwrap().to_string());
    }
    assert_eq!(pods, set(&["pod-a", "pod-b"]), "{mode}: pod over IPv6");
    let url4 = format!("http://{CIP4}:{PORT}/");
    assert_eq!(
        answered_by(&pod, &url4, 10, &c.pod_ip("pod-z").to_string()),
        set(&["pod-a", "pod-b"]),
        "{mode}: pod over IPv4"
    );

    write_web(&c, web_service().dual_stack(CIP6), &["pod-a", "pod-b"], &[]);
    let refused = sys::wait_for(Duration::from_secs(5), Duration::from_millis(50), || {
        let r = probe::curl(&pod, &url6(CIP6), Duration::from_secs(2)).unwrap();
        r.refused().then_some(r)
    });
    let r = refused.unwrap_or_else(|| panic!("{mode}: {CIP6} never refused without endpoints"));
    assert!(
        r.elapsed < Duration::from_secs(1),
        "{mode}: refused at once: {r}"
    );

    let node = c.node(1);
    assert!(rules_present(&node), "{mode}: no IPv6 rules while running");

    // Switching to the eBPF mode removes the IPv6 rules and serves IPv6 at socket level.
    write_web(
        &c,
        web_service().dual_stack(CIP6),
        &["pod-a", "pod-b"],
        &["pod-a", "pod-b"],
    );
    c.stop_agent(1);
    c.set_proxy_mode("ebpf");
    c.start_agent_ready(1)
        .expect("starting the agent in eBPF mode");
    assert!(
        !rules_present(&node),
        "{mode}: IPv6 rules left after switching to ebpf"
    );
    assert_eq!(
        answered_by(&pod, &url6(CIP6), 10, &pod6),
        set(&["pod-a", "pod-b"]),
        "{mode} -> ebpf: pod over IPv6"
    );

    // And back, then `kproxy cleanup` removes them.
    c.stop_agent(1);
    c.set_proxy_mode(mode);
    c.start_agent_ready(1).expect("starting the agent again");
    wait_served(&pod, &url6(CIP6));
    assert!(
        rules_present(&node),
        "{mode}: no IPv6 rules after switching back"
    );
    c.stop_agent(1);
    let out = c.agent_cleanup(1).expect("kproxy cleanup");
    assert!(out.status.success(), "cleanup: {out:?}");
    assert!(
        !rules_present(&node),
        "{mode}: IPv6 rules left after cleanup"
    );
}

fn nft_ip6_table(node: &Place) -> bool {
    let out = node.output(&["nft", "list", "tables"]).unwrap();
    String::from_utf8_lossy(&out.stdout).contains("table ip6 kproxy")
}

#[test]
fn nftables_mode_ipv6_cluster_ip() {
    rule_mode_ipv6_cluster_ip("nftables", nft_ip6_table);
}

fn ip6tables_chains(node: &Place) -> bool {
    let out = node.output(&["ip6tables-save", "-t", "nat"]).unwrap();
    String::from_utf8_lossy(&out.stdout).contains(":KPROXY-SERVICES")
}

#[test]
fn iptables_mode_ipv6_cluster_ip() {
    rule_mode_ipv6_cluster_ip("iptables", ip6tables_chains);
}

/// UDP over IPv6 at socket level: a dual-stack DNS-like Service reached over its IPv6
/// cluster IP with unconnected (sendmsg6/recvmsg6 per datagram) and connected sockets
/// (connect6); replies show the service address, both pods answer.
#[test]
fn udp_over_ipv6_cluster_ip() {
    let mut c = dual_stack_cluster(1, &[("pod-a", 1), ("pod-b", 1)]);
    for p in ["pod-a", "pod-b"] {
        c.start_udp_serve6(p, 5353).expect("udp-serve on IPv6");
    }
    let svc = Service::cluster_ip("dns", "10.96.0.53")
        .dual_stack("fd00:10:96::53")
        .port("dns", Protocol::Udp, 53, 5353, None);
    let slice = EndpointSlice::for_service("dns")
        .named("dns-v6")
        .ipv6()
        .port("dns", Protocol::Udp, 5353)
        .endpoints(["pod-a", "pod-b"].map(|p| c.endpoint6(p)));
    c.write_manifests("dns.yaml", &[svc.into(), slice.into()])
        .unwrap();
    c.start_agent_ready(1).expect("starting the agent");
    let pod = c.pod("pod-z");
    let target = "[fd00:10:96::53]:53";
    for connected in [false, true] {
        let mut args = vec!["udp-ask", target, "--count", "20", "--timeout-ms", "1000"];
        if connected {
            args.push("--connected");
        }
        let lines = c.ask(&pod, &args, Duration::from_secs(60));
        let timeline = show(&lines);
        assert_eq!(lines.len(), 20, "{timeline}");
        for l in &lines {
            match &l.outcome {
                kproxy_tests::harness::Outcome::Ok { peer, .. } => {
                    assert_eq!(peer, target, "connected={connected}: reply source {l}")
                }
                _ => panic!("connected={connected}: {l}\n{timeline}"),
            }
        }
        let pods: BTreeSet<String> = lines
            .iter()
            .filter_map(|l| l.pod().map(String::from))
            .collect();
        // Unconnected: every datagram picks afresh. Connected: one socket, one backend.
        if connected {
            assert_eq!(
                pods.len(),
                1,
                "a connected socket keeps its backend:\n{timeline}"
            );
        } else {
            assert_eq!(pods, set(&["pod-a", "pod-b"]), "{timeline}");
        }
    }
}

/// IPv6 nodePorts: `[node IPv6]:nodePort` from a host process in the eBPF mode (socket
/// level), and from the outside client in every mode (the eBPF mode's XDP/tc path: local
/// endpoints see the client's own address).
#[test]
fn ipv6_nodeport() {
    let mut c = dual_stack_cluster(1, &[("pod-a", 1), ("pod-b", 1)]);
    let svc = Service::node_port("web", CIP4).dual_stack(CIP6).port(
        "http",
        Protocol::Tcp,
        PORT,
        80,
        Some(30080),
    );
    write_web(&c, svc, &["pod-a", "pod-b"], &["pod-a", "pod-b"]);
    let node6 = kproxy_tests::harness::cluster::node_ip6(1).to_string();
    let url = format!("http://[{node6}]:30080/");
    c.start_agent_ready(1).expect("starting the agent");
    let host = c.node(1);
    wait_served(&host, &url);
    let results = probe::curl_n(&host, &url, 20, Duration::from_secs(3)).unwrap();
    let pods: BTreeSet<String> = results
        .iter()
        .map(|r| {
            r.pod()
                .unwrap_or_else(|| panic!("host -> {url}: {r}"))
                .to_string()
        })
        .collect();
    assert_eq!(pods, set(&["pod-a", "pod-b"]), "ebpf: host -> {url}");
    let client = c.client();
    wait_served(&client, &url);
    let client6 = kproxy_tests::harness::cluster::CLIENT_IP6.to_string();
    assert_eq!(
        answered_by(&client, &url, 20, &client6),
        set(&["pod-a", "pod-b"]),
        "ebpf: client -> {url} (local endpoints see the client)"
    );

    for mode in ["nftables", "iptables"] {
        c.stop_agent(1);
        c.set_proxy_mode(mode);
        c.start_agent_ready(1).expect("starting the agent");
        let client = c.client();
        wait_served(&client, &url);
        let client6 = kproxy_tests::harness::cluster::CLIENT_IP6.to_string();
        assert_eq!(
            answered_by(&client, &url, 20, &client6),
            set(&["pod-a", "pod-b"]),
            "{mode}: client -> {url} (local endpoints see the client)"
        );
    }
}

/// A connected IPv6 UDP socket (a DNS client) moves off a backend removed from the slice:
/// the agent closes it (SOCK_DESTROY over AF_INET6 sock_diag), the client reconnects, and
/// from 1 s after the old server stopped every query is answered by the remaining pod.
#[test]
fn connected_udp6_client_moves_off_removed_backend() {
    let mut c = dual_stack_cluster(1, &[("pod-a", 1), ("pod-b", 1)]);
    for p in ["pod-a", "pod-b"] {
        c.start_udp_serve6(p, 5353).expect("udp-serve on IPv6");
    }
    let write = |c: &Cluster, pods: &[&str]| {
        let svc = Service::cluster_ip("dns", "10.96.0.53")
            .dual_stack("fd00:10:96::53")
            .port("dns", Protocol::Udp, 53, 5353, None);
        let slice = EndpointSlice::for_service("dns")
            .named("dns-v6")
            .ipv6()
            .port("dns", Protocol::Udp, 5353)
            .endpoints(pods.iter().map(|p| c.endpoint6(p)));
        c.write_manifests("dns.yaml", &[svc.into(), slice.into()])
            .unwrap()
    };
    write(&c, &["pod-a", "pod-b"]);
    c.start_agent_ready(1).expect("starting the agent");
    let pod = c.pod("pod-z");
    let target = "[fd00:10:96::53]:53";
    let asker = c.ask_start(
        &pod,
        &[
            "udp-ask",
            target,
            "--connected",
            "--count",
            "100",
            "--interval-ms",
            "50",
            "--timeout-ms",
            "300",
        ],
    );
    let first = asker
        .wait_line(Duration::from_secs(5), |l| l.is_ok())
        .unwrap_or_else(|| panic!("no answer:\n{}", show(&asker.peek())));
    let used = first.pod().unwrap().to_string();
    let other = if used == "pod-a" { "pod-b" } else { "pod-a" };
    std::thread::sleep(Duration::from_millis(300));
    write(&c, &[other]);
    // Applied once fresh queries only reach `other`.
    let applied = sys::wait_for(Duration::from_secs(5), Duration::from_millis(20), || {
        let l = c.ask(
            &pod,
            &["udp-ask", target, "--timeout-ms", "500"],
            Duration::from_secs(5),
        );
        (l.len() == 1 && l[0].pod() == Some(other)).then_some(())
    });
    assert!(applied.is_some(), "fresh queries still reach {used}");
    std::thread::sleep(Duration::from_millis(200));
    let t_stop = sys::epoch_ms();
    c.stop_udp_serve(&used).unwrap();
    let lines = asker.finish(Duration::from_secs(60)).expect("client");
    let all = show(&lines);
    let late: Vec<&AskLine> = lines.iter().filter(|l| l.ts_ms >= t_stop + 1000).collect();
    assert!(late.len() >= 10, "the client stopped too early:\n{all}");
    assert!(
        late.iter().all(|l| l.pod() == Some(other)),
        "1 s after {used} stopped every query must be answered by {other}:\n{all}"
    );
    assert!(
        c.agent_log(1).contains("closed connected IPv6 UDP sockets"),
        "the agent did not close the IPv6 socket"
    );
}

const EXTERNAL_IP6: &str = "fd00:203::21";

/// A dual-stack NodePort Service `name` (selector `app: <name>`) with
/// `externalTrafficPolicy: <policy>` and `extra` spec lines (e.g. external IPs).
fn dual_stack_nodeport(
    name: &str,
    cip: (&str, &str),
    node_port: u16,
    policy: &str,
    extra: &str,
) -> Object {
    let (cip4, cip6) = cip;
    Object::Raw(format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  type: NodePort\n  clusterIP: {cip4}\n  clusterIPs: [{cip4}, '{cip6}']\n  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  externalTrafficPolicy: {policy}\n  selector: {{app: {name}}}\n{extra}  ports:\n  - {{name: http, protocol: TCP, port: {PORT}, targetPort: 80, nodePort: {node_port}}}\n"
    ))
}

/// The eBPF mode's IPv6 XDP/tc path from outside the node, two nodes: the IPv6 nodePort of
/// a Service whose only endpoint runs on the other node is served through node 1 with SNAT
/// to node 1's IPv6 address (the pod sees it, and its reply comes back through node 1); with
/// `externalTrafficPolicy: Local` node 1's nodePort and an IPv6 external IP routed to node 1
/// reach only node 1's pod, which sees the client's own IPv6 address.
#[test]
fn ipv6_external_ip_and_nodeport_from_outside_ebpf() {
    let mut c = dual_stack_cluster(2, &[("pod-a", 1), ("pod-b", 2)]);
    let objs: Vec<Object> = vec![
        dual_stack_nodeport(
            "remote",
            ("10.96.100.30", "fd00:10:96::30"),
            30081,
            "Cluster",
            "",
        ),
        EndpointSlice::for_service("remote")
            .named("remote-v6")
            .ipv6()
            .port("http", Protocol::Tcp, 80)
            .endpoints([c.endpoint6("pod-b")])
            .into(),
        dual_stack_nodeport(
            "local",
            ("10.96.100.31", "fd00:10:96::31"),
            30082,
            "Local",
            &format!("  externalIPs: ['{EXTERNAL_IP6}']\n"),
        ),
        EndpointSlice::for_service("local")
            .named("local-v6")
            .ipv6()
            .port("http", Protocol::Tcp, 80)
            .endpoints([c.endpoint6("pod-a"), c.endpoint6("pod-b")])
            .into(),
    ];
    c.write_manifests("services.yaml", &objs).unwrap();
    c.start_agent_ready(1).expect("starting the agent");
    let client = c.client();
    let node1 = kproxy_tests::harness::cluster::node_ip6(1).to_string();
    let ns = client.netns.as_ref().expect("the client has a netns");
    ns.ip(&[
        "route",
        "add",
        &format!("{EXTERNAL_IP6}/128"),
        "via",
        &node1,
    ])
    .expect("client route to the external IP");

    // Remote endpoint, policy Cluster: SNAT to node 1, which the pod sees.
    let url = format!("http://[{node1}]:30081/");
    wait_served(&client, &url);
    assert_eq!(
        answered_by(&client, &url, 10, &node1),
        set(&["pod-b"]),
        "client -> {url}: the remote pod, SNATed to node 1"
    );

    // Policy Local: only node 1's pod, which sees the client.
    let client6 = kproxy_tests::harness::cluster::CLIENT_IP6.to_string();
    for url in [
        format!("http://[{node1}]:30082/"),
        format!("http://[{EXTERNAL_IP6}]:{PORT}/"),
    ] {
        wait_served(&client, &url);
        assert_eq!(
            answered_by(&client, &url, 20, &client6),
            set(&["pod-a"]),
            "client -> {url}: externalTrafficPolicy Local"
        );
    }
}

/// IPv6 session affinity in the eBPF mode: a pod's connections to an IPv6 cluster IP
/// (socket level, keyed by its network namespace) and the outside client's to an IPv6
/// nodePort (XDP, keyed by its address) each stick to one pod, where without affinity both
/// pods answer.
#[test]
fn ipv6_session_affinity_ebpf() {
    let mut c = dual_stack_cluster(1, &[("pod-a", 1), ("pod-b", 1)]);
    let objs: Vec<Object> = vec![
        dual_stack_nodeport(
            "sticky",
            ("10.96.100.40", "fd00:10:96::40"),
            30083,
            "Cluster",
            "  sessionAffinity: ClientIP\n",
        ),
        EndpointSlice::for_service("sticky")
            .named("sticky-v6")
            .ipv6()
            .port("http", Protocol::Tcp, 80)
            .endpoints([c.endpoint6("pod-a"), c.endpoint6("pod-b")])
            .into(),
    ];
    c.write_manifests("services.yaml", &objs).unwrap();
    c.start_agent_ready(1).expect("starting the agent");
    let node1 = kproxy_tests::harness::cluster::node_ip6(1).to_string();
    let client6 = kproxy_tests::harness::cluster::CLIENT_IP6.to_string();
    let pod6 = c.pod_ip6("pod-z").to_string();
    for (place, url, source) in [
        (
            c.pod("pod-z"),
            format!("http://[fd00:10:96::40]:{PORT}/"),
            pod6,
        ),
        (c.client(), format!("http://[{node1}]:30083/"), client6),
    ] {
        wait_served(&place, &url);
        let pods = answered_by(&place, &url, 20, &source);
        assert_eq!(
            pods.len(),
            1,
            "{} -> {url}: affinity broken: {pods:?}",
            place.label
        );
    }
}
