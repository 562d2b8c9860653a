//! One scenario list for every proxy mode: each scenario is a function taking the mode, and
//! [`scenarios!`] turns the list into one `#[test]` per (scenario, mode), named
//! `<scenario>::<mode>` (run one mode with `-- ::userspace`, one scenario with
//! `-- hairpin::`).
//!
//! What a mode cannot do is marked in the list itself (`except mode: "why"`), never
//! skipped: the test of that pair still runs and asserts what the mode does instead (e.g.
//! the userspace relay's backends see the node's address, not the client's).

mod semantics_common;

use std::time::Duration;

use kproxy_tests::harness::{
    AskLine, Cluster, Outcome, Place, PodSpec, fixtures,
    manifests::seed,
    probe::{self, CurlResult, show, tally},
    sys,
};
use semantics_common::{Ep, route_via, slice, write};

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");

/// The mode a test runs in, and why the scenario does not apply to it (if it does not).
#[derive(Clone, Copy, Debug)]
struct Mode {
    name: &'static str,
    /// `Some(reason)`: the mode cannot do what the scenario checks; the scenario asserts the
    /// documented alternative behaviour instead.
    not_applicable: Option<&'static str>,
}

impl Mode {
    fn new(name: &'static str, exceptions: &[(&'static str, &'static str)]) -> Mode {
        let not_applicable = exceptions
            .iter()
            .find(|(m, _)| *m == name)
            .map(|(_, why)| *why);
        if let Some(why) = not_applicable {
            println!("{name}: not applicable, checking the documented behaviour instead: {why}");
        }
        Mode {
            name,
            not_applicable,
        }
    }

    fn applies(&self) -> bool {
        self.not_applicable.is_none()
    }
}

macro_rules! scenarios {
    ($( $scenario:ident $(, except $($mode:ident : $why:expr),+ )? ; )*) => {
        $(
            mod $scenario {
                #[allow(unused_imports, reason = "the reasons may name the module's constants")]
                use super::*;
                const EXCEPTIONS: &[(&str, &str)] = &[$($((stringify!($mode), $why)),+)?];
                #[test]
                fn ebpf() {
                    super::$scenario(super::Mode::new("ebpf", EXCEPTIONS));
                }
                #[test]
                fn nftables() {
                    super::$scenario(super::Mode::new("nftables", EXCEPTIONS));
                }
                #[test]
                fn iptables() {
                    super::$scenario(super::Mode::new("iptables", EXCEPTIONS));
                }
                #[test]
                fn userspace() {
                    super::$scenario(super::Mode::new("userspace", EXCEPTIONS));
                }
            }
        )*
    };
}

const NO_SOURCE_IP: &str =
    "the relay opens its own connection to the pod, which sees the node's address";

// The list: every scenario, for every mode.
scenarios! {
    nodeport_balanced_over_pods;
    client_source_ip_preserved, except userspace: NO_SOURCE_IP;
    cluster_ip_from_pod_and_node;
    hairpin;
    no_endpoints_refused_at_once;
    udp_cluster_ip_and_nodeport;
    endpoint_churn;
    cross_node_backend;
    external_and_load_balancer_ips;
    external_traffic_policy_local, except userspace: NO_SOURCE_IP;
    localhost_nodeport,
        except nftables: "no route_localnet: the kernel does not route 127.0.0.1 to a pod",
               iptables: "no route_localnet: the kernel does not route 127.0.0.1 to a pod";
    cleanup_leaves_nothing;
}

// ---- helpers ----

fn nodeport_url(c: &Cluster, node: u8) -> String {
    format!("http://{}:{}/", c.node_ip(node), seed::MYSVC_NODEPORT)
}

fn cluster_ip_url() -> String {
    format!("http://{}:{}/", seed::MYSVC_IP, seed::MYSVC_PORT)
}

/// Starts node `n`'s agent in the cluster's mode, waits for /healthz, and checks the log
/// names the mode.
fn start(c: &mut Cluster, n: u8) {
    c.start_agent_ready(n)
        .unwrap_or_else(|e| c.fail(format!("{e:#}")));
    let mode = c.proxy_mode().to_string();
    let chosen = format!("proxy mode {mode} chosen");
    c.check(c.agent_log(n).contains(&chosen), || {
        format!("node{n}'s agent should say {chosen:?}")
    });
}

/// A real node has a default route; the harness's node has none, and a host process's
/// connect() to a cluster IP needs a route before the rule modes' output hook can DNAT it.
fn route_service_range(c: &Cluster, n: u8) {
    let out = c
        .node(n)
        .output(&["ip", "route", "add", "10.96.0.0/12", "dev", "eth0"])
        .expect("ip route");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The seed cluster (pod-a, pod-b, pod-c, client pod pod-z on node1; mysvc and dns on pod-a
/// and pod-b) with node1's agent running in `mode`.
fn seeded(mode: Mode) -> Cluster {
    let mut c = fixtures::one_node(TESTPOD).expect("building the cluster");
    c.set_proxy_mode(mode.name);
    fixtures::write_seed(&c, &["pod-a", "pod-b"], &["pod-a", "pod-b"]).expect("manifests");
    route_service_range(&c, 1);
    start(&mut c, 1);
    c
}

fn curl_n(c: &Cluster, place: &Place, url: &str, n: usize) -> Vec<CurlResult> {
    let r = c.ok(probe::curl_n(place, url, n, Duration::from_secs(3)));
    println!("{} -> {url}: {:?}", place.label, tally(&r));
    r
}

/// Every request answered, by exactly the pods `want`.
#[track_caller]
fn assert_pods(c: &Cluster, results: &[CurlResult], want: &[&str], what: &str) {
    let failed: Vec<String> = results
        .iter()
        .filter(|r| !r.ok())
        .map(|r| r.to_string())
        .collect();
    c.check(failed.is_empty(), || {
        format!("{what}: failures: {failed:#?}")
    });
    let t = tally(results);
    let got: Vec<&str> = t.keys().map(String::as_str).collect();
    c.check(got == want, || {
        format!("{what}: answered by {t:?}, want {want:?}")
    });
}

/// Every request answered, each by one of the pods `allowed` (for a few requests, where
/// asking for every pod would fail by chance).
#[track_caller]
fn assert_served_by(c: &Cluster, results: &[CurlResult], allowed: &[&str], what: &str) {
    c.check(
        results
            .iter()
            .all(|r| r.pod().is_some_and(|p| allowed.contains(&p))),
        || format!("{what}: every request should be answered by one of {allowed:?}: {results:#?}"),
    );
}

/// Waits (up to 10 s) until a request to `url` is refused within a second.
fn assert_refused_soon(c: &Cluster, place: &Place, url: &str, what: &str) {
    let mut last = None;
    let refused = sys::wait_for(Duration::from_secs(10), Duration::from_millis(100), || {
        let r = c.ok(probe::curl(place, url, Duration::from_secs(3)));
        let ok = r.refused() && r.elapsed < Duration::from_secs(1);
        last = Some(r);
        ok.then_some(())
    });
    c.check(refused.is_some(), || {
        format!("{what}: {url} should be refused at once: {last:?}")
    });
}

/// `n` single UDP queries to `target`, each from a new socket.
fn udp_queries(c: &Cluster, place: &Place, target: &str, n: usize) -> Vec<AskLine> {
    (0..n)
        .flat_map(|_| {
            c.ask(
                place,
                &["udp-ask", target, "--timeout-ms", "1000"],
                Duration::from_secs(5),
            )
        })
        .collect()
}

fn reply_peer(l: &AskLine) -> &str {
    match &l.outcome {
        Outcome::Ok { peer, .. } => peer,
        _ => "",
    }
}

// ---- the scenarios ----

/// An outside client's requests to node1's nodePort are spread over both pods.
fn nodeport_balanced_over_pods(mode: Mode) {
    let c = seeded(mode);
    let r = curl_n(&c, &c.client(), &nodeport_url(&c, 1), 20);
    assert_pods(&c, &r, &["pod-a", "pod-b"], "client -> nodePort");
}

/// The pod sees the client's own address, through the nodePort (local endpoints need no
/// SNAT) and through the cluster IP from a pod. Not applicable: the pod sees the node.
fn client_source_ip_preserved(mode: Mode) {
    let c = seeded(mode);
    let client_ip = c.client_ip().to_string();
    let pod_z_ip = c.pod_ip(fixtures::CLIENT_POD).to_string();
    let r = curl_n(&c, &c.client(), &nodeport_url(&c, 1), 16);
    assert_pods(&c, &r, &["pod-a", "pod-b"], "client -> nodePort");
    let r_pod = curl_n(&c, &c.pod(fixtures::CLIENT_POD), &cluster_ip_url(), 16);
    assert_pods(&c, &r_pod, &["pod-a", "pod-b"], "pod-z -> cluster IP");
    for (results, source) in [(&r, &client_ip), (&r_pod, &pod_z_ip)] {
        for x in results.iter() {
            let seen = x.seen_source().unwrap_or("");
            if mode.applies() {
                c.check(seen == source.as_str(), || {
                    format!("the pod should see {source}: {x}")
                });
            } else {
                // The documented limitation: the source is one of node1's own addresses.
                let node_addrs = [c.node_ip(1).to_string(), "169.254.1.1".to_string()];
                c.check(
                    seen != source.as_str() && node_addrs.iter().any(|a| a == seen),
                    || format!("the pod should see one of node1's addresses {node_addrs:?}: {x}"),
                );
            }
        }
    }
}

/// The cluster IP from a pod and from a process on the node's host.
fn cluster_ip_from_pod_and_node(mode: Mode) {
    let c = seeded(mode);
    let r = curl_n(&c, &c.pod(fixtures::CLIENT_POD), &cluster_ip_url(), 16);
    assert_pods(&c, &r, &["pod-a", "pod-b"], "pod-z -> cluster IP");
    let r = curl_n(&c, &c.node(1), &cluster_ip_url(), 16);
    assert_pods(&c, &r, &["pod-a", "pod-b"], "node1 -> cluster IP");
}

/// A pod reaches its own Service and gets answers from itself as well as from the other pod.
fn hairpin(mode: Mode) {
    let c = seeded(mode);
    let r = curl_n(&c, &c.pod("pod-a"), &cluster_ip_url(), 20);
    assert_pods(&c, &r, &["pod-a", "pod-b"], "pod-a -> cluster IP (hairpin)");
}

/// Without endpoints, TCP through the nodePort and the cluster IP is refused at once
/// (not left to time out), from outside, from a pod and from the node.
fn no_endpoints_refused_at_once(mode: Mode) {
    let c = seeded(mode);
    fixtures::write_mysvc(&c, &[]).expect("manifests");
    assert_refused_soon(&c, &c.client(), &nodeport_url(&c, 1), "client -> nodePort");
    assert_refused_soon(
        &c,
        &c.pod(fixtures::CLIENT_POD),
        &cluster_ip_url(),
        "pod-z -> cluster IP",
    );
    assert_refused_soon(&c, &c.node(1), &cluster_ip_url(), "node1 -> cluster IP");
    // Endpoints back: served again.
    fixtures::write_mysvc(&c, &["pod-c"]).expect("manifests");
    let back = sys::wait_for(Duration::from_secs(10), Duration::from_millis(100), || {
        let r = c.ok(probe::curl(
            &c.client(),
            &nodeport_url(&c, 1),
            Duration::from_secs(2),
        ));
        (r.pod() == Some("pod-c")).then_some(())
    });
    c.check(back.is_some(), || {
        "an endpoint came back but the nodePort is not served".into()
    });
}

/// UDP through the cluster IP from a pod and through the nodePort from outside: answered
/// by both backends, the replies coming from the address the client asked.
fn udp_cluster_ip_and_nodeport(mode: Mode) {
    let c = seeded(mode);
    let dns = format!("{}:{}", seed::DNS_IP, seed::DNS_PORT);
    let dns_nodeport = format!("{}:{}", c.node_ip(1), seed::DNS_NODEPORT);
    for (place, target) in [
        (c.pod(fixtures::CLIENT_POD), &dns),
        (c.client(), &dns_nodeport),
    ] {
        let lines = udp_queries(&c, &place, target, 16);
        let all = show(&lines);
        c.check(
            lines.len() == 16
                && lines
                    .iter()
                    .all(|l| l.is_ok() && reply_peer(l) == target.as_str()),
            || {
                format!(
                    "{} -> {target}: every query answered from {target}:\n{all}",
                    place.label
                )
            },
        );
        c.check(
            lines.iter().any(|l| l.pod() == Some("pod-a"))
                && lines.iter().any(|l| l.pod() == Some("pod-b")),
            || {
                format!(
                    "{} -> {target}: both backends should answer:\n{all}",
                    place.label
                )
            },
        );
    }
}

/// pod-b leaves the slices (its servers keep running, so a request that still reached it
/// would be answered and seen) and pod-c joins. While clients keep asking (TCP through the
/// nodePort, UDP from one fixed source port), once pod-c answers no request may reach pod-b
/// or fail, and the UDP flow leaves pod-b.
fn endpoint_churn(mode: Mode) {
    let c = seeded(mode);
    let nodeport = format!("{}:{}", c.node_ip(1), seed::MYSVC_NODEPORT);
    let dns_nodeport = format!("{}:{}", c.node_ip(1), seed::DNS_NODEPORT);
    let tcp = c.ask_start(
        &c.client(),
        &[
            "tcp-ask",
            &nodeport,
            "--http",
            "--count",
            "80",
            "--interval-ms",
            "50",
            "--timeout-ms",
            "1000",
        ],
    );
    let udp = c.ask_start(
        &c.client(),
        &[
            "udp-ask",
            &dns_nodeport,
            "--sport",
            "40000",
            "--count",
            "80",
            "--interval-ms",
            "50",
            "--timeout-ms",
            "300",
        ],
    );
    if tcp
        .wait_line(Duration::from_secs(5), |l| l.is_ok())
        .is_none()
    {
        c.fail(format!("no TCP answer at all:\n{}", show(&tcp.peek())));
    }
    std::thread::sleep(Duration::from_millis(500));
    let t_change =
        fixtures::write_seed(&c, &["pod-a", "pod-c"], &["pod-a", "pod-c"]).expect("manifests");
    let tcp = tcp.finish(Duration::from_secs(60)).expect("tcp-ask");
    let udp = udp.finish(Duration::from_secs(60)).expect("udp-ask");
    let (tcp_all, udp_all) = (show(&tcp), show(&udp));
    let Some(first_c) = tcp.iter().find(|l| l.pod() == Some("pod-c")) else {
        c.fail(format!(
            "pod-c never answered after the change at {t_change}:\n{tcp_all}"
        ));
    };
    println!(
        "{}: first answer by pod-c {} ms after the slice change",
        mode.name,
        first_c.ts_ms as i64 - t_change as i64
    );
    let after: Vec<&AskLine> = tcp.iter().filter(|l| l.ts_ms >= first_c.ts_ms).collect();
    c.check(
        after.iter().all(|l| matches!(l.pod(), Some("pod-a" | "pod-c"))),
        || format!("after pod-c's first answer every TCP request must be answered by pod-a or pod-c:\n{tcp_all}"),
    );
    // The UDP flow's first query after the change may still be in flight to pod-b.
    let udp_after: Vec<&AskLine> = udp
        .iter()
        .filter(|l| l.ts_ms >= first_c.ts_ms + 300)
        .collect();
    c.check(udp_after.len() >= 10, || {
        format!("the UDP client stopped too early:\n{udp_all}")
    });
    c.check(
        udp_after
            .iter()
            .all(|l| matches!(l.pod(), Some("pod-a" | "pod-c"))),
        || format!("the fixed-port UDP flow must leave pod-b and be answered:\n{udp_all}"),
    );
}

/// A Service whose only endpoint is on node2, reached through node1's nodePort from
/// outside and through the cluster IP from a pod on node1.
fn cross_node_backend(mode: Mode) {
    let mut c = Cluster::builder()
        .nodes(2)
        .testpod(TESTPOD)
        .proxy_mode(mode.name)
        .pod(PodSpec::new("pod-z", 1).http_ports(&[]))
        .pod(PodSpec::new("pod-r", 2))
        .build()
        .expect("building the cluster");
    write(
        &c,
        "remote.yaml",
        &[
            "apiVersion: v1\nkind: Service\nmetadata: {name: remote, namespace: default}\nspec:\n  type: NodePort\n  clusterIP: 10.96.100.50\n  ports:\n  - {name: http, protocol: TCP, port: 8080, targetPort: 80, nodePort: 30002}\n".into(),
            slice("remote-1", "remote", &[("http", "TCP", 80)], &[Ep::of(&c, "pod-r")]),
        ],
    );
    start(&mut c, 1);
    start(&mut c, 2);
    let r = curl_n(&c, &c.client(), "http://198.18.0.1:30002/", 10);
    assert_pods(
        &c,
        &r,
        &["pod-r"],
        "client -> node1:30002 (endpoint on node2)",
    );
    let r = curl_n(&c, &c.pod("pod-z"), "http://10.96.100.50:8080/", 6);
    assert_pods(
        &c,
        &r,
        &["pod-r"],
        "pod-z on node1 -> cluster IP (endpoint on node2)",
    );
}

/// A LoadBalancer Service's ingress IP and an external IP, from the outside client (which
/// routes them to node1), balanced over both pods.
fn external_and_load_balancer_ips(mode: Mode) {
    let mut c = fixtures::one_node(TESTPOD).expect("building the cluster");
    c.set_proxy_mode(mode.name);
    let http = [("http", "TCP", 80)];
    write(
        &c,
        "lb.yaml",
        &[
            "apiVersion: v1\nkind: Service\nmetadata: {name: lb, namespace: default}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.104.10\n  externalIPs: [203.0.113.21]\n  ports:\n  - {name: http, protocol: TCP, port: 80, targetPort: 80, nodePort: 30140}\nstatus:\n  loadBalancer:\n    ingress: [{ip: 203.0.113.20}]\n".into(),
            slice("lb-1", "lb", &http, &[Ep::of(&c, "pod-a"), Ep::of(&c, "pod-b")]),
        ],
    );
    route_via(&c, &c.client(), "203.0.113.0/24", c.node_ip(1));
    start(&mut c, 1);
    for url in ["http://203.0.113.20/", "http://203.0.113.21/"] {
        let r = curl_n(&c, &c.client(), url, 16);
        assert_pods(&c, &r, &["pod-a", "pod-b"], &format!("client -> {url}"));
    }
}

/// externalTrafficPolicy: Local on two nodes: each node's nodePort reaches only its own
/// pod, with the client's address kept (not applicable: the node's address); a node without
/// a local endpoint does not serve the nodePort at all.
fn external_traffic_policy_local(mode: Mode) {
    let mut c = Cluster::builder()
        .nodes(2)
        .testpod(TESTPOD)
        .proxy_mode(mode.name)
        .pod(PodSpec::new("pod-a", 1))
        .pod(PodSpec::new("pod-b", 2))
        .build()
        .expect("building the cluster");
    let svc = |name: &str, ip: &str, np: u16| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  type: NodePort\n  clusterIP: {ip}\n  externalTrafficPolicy: Local\n  ports:\n  - {{name: http, protocol: TCP, port: 80, targetPort: 80, nodePort: {np}}}\n"
        )
    };
    let http = [("http", "TCP", 80)];
    write(
        &c,
        "etp.yaml",
        &[
            svc("etp", "10.96.103.10", 30104),
            slice(
                "etp-1",
                "etp",
                &http,
                &[Ep::of(&c, "pod-a"), Ep::of(&c, "pod-b")],
            ),
            svc("etp-one", "10.96.103.11", 30105),
            slice("etp-one-1", "etp-one", &http, &[Ep::of(&c, "pod-a")]),
        ],
    );
    start(&mut c, 1);
    start(&mut c, 2);
    let client_ip = c.client_ip().to_string();
    for (node, pod) in [(1u8, "pod-a"), (2, "pod-b")] {
        let url = format!("http://{}:30104/", c.node_ip(node));
        let r = curl_n(&c, &c.client(), &url, 10);
        assert_pods(&c, &r, &[pod], &format!("ETP=Local: client -> node{node}"));
        for x in &r {
            let seen = x.seen_source().unwrap_or("");
            if mode.applies() {
                c.check(seen == client_ip, || {
                    format!("{pod} should see the client: {x}")
                });
            } else {
                c.check(seen != client_ip, || {
                    format!("{pod} cannot see the client: {x}")
                });
            }
        }
    }
    let r = c.ok(probe::curl(
        &c.client(),
        "http://198.18.0.2:30105/",
        Duration::from_secs(2),
    ));
    c.check(!r.ok(), || {
        format!("ETP=Local: node2 has no local endpoint and must not serve 30105: {r}")
    });
}

/// `localhost:<nodePort>` on the node. Not applicable: refused (nothing serves it).
fn localhost_nodeport(mode: Mode) {
    let c = seeded(mode);
    let url = format!("http://127.0.0.1:{}/", seed::MYSVC_NODEPORT);
    if mode.applies() {
        let r = curl_n(&c, &c.node(1), &url, 16);
        assert_pods(&c, &r, &["pod-a", "pod-b"], "node1 -> localhost:nodePort");
    } else {
        let r = c.ok(probe::curl(&c.node(1), &url, Duration::from_secs(2)));
        c.check(!r.ok(), || {
            format!("localhost:nodePort is not served in {}: {r}", mode.name)
        });
    }
}

/// After the agent stops, `kproxy cleanup` leaves nothing of any mode in the node: no
/// nftables table, no iptables chains, no relay interface, no pins, no XDP program.
fn cleanup_leaves_nothing(mode: Mode) {
    let mut c = seeded(mode);
    let r = curl_n(&c, &c.client(), &nodeport_url(&c, 1), 4);
    assert_served_by(&c, &r, &["pod-a", "pod-b"], "client -> nodePort");
    c.stop_agent(1);
    for round in 1..=2 {
        let out = c.agent_cleanup(1).expect("kproxy cleanup");
        c.check(out.status.success(), || {
            format!(
                "kproxy cleanup (round {round}): {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    }
    assert_nothing_left(&c, 1, mode.name);
}

/// Nothing of any mode is installed in node `n`.
fn assert_nothing_left(c: &Cluster, n: u8, what: &str) {
    let node = c.node(n);
    let text = |argv: &[&str]| {
        let out = node.output(argv).expect("running a tool in the node");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let nft = text(&["nft", "list", "ruleset"]);
    c.check(!nft.contains("kproxy"), || {
        format!("{what}: nftables left behind:\n{nft}")
    });
    let ipt = text(&["iptables-save"]);
    c.check(!ipt.contains("KPROXY-"), || {
        format!("{what}: iptables chains left behind:\n{ipt}")
    });
    let links = text(&["ip", "-d", "link", "show"]);
    c.check(
        !links.contains("kproxy0") && !links.contains("prog/xdp"),
        || format!("{what}: an interface or XDP program left behind:\n{links}"),
    );
    let pins: Vec<_> = walk(&c.node_bpf_root(n));
    c.check(pins.is_empty(), || {
        format!("{what}: pins left behind: {pins:?}")
    });
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .flat_map(|e| {
            let p = e.path();
            if p.is_dir() { walk(&p) } else { vec![p] }
        })
        .collect()
}

/// Outside the matrix: switching modes between runs leaves nothing of the previous mode.
/// Each run serves the nodePort; after the last one and a cleanup nothing is left.
#[test]
fn switching_modes_between_runs_leaves_nothing_behind() {
    let mut c = fixtures::one_node(TESTPOD).expect("building the cluster");
    fixtures::write_seed(&c, &["pod-a", "pod-b"], &["pod-a", "pod-b"]).expect("manifests");
    route_service_range(&c, 1);
    let order = [
        "userspace",
        "nftables",
        "userspace",
        "iptables",
        "ebpf",
        "userspace",
    ];
    for (i, mode) in order.iter().enumerate() {
        c.set_proxy_mode(mode);
        start(&mut c, 1);
        let r = curl_n(&c, &c.client(), &nodeport_url(&c, 1), 6);
        assert_served_by(&c, &r, &["pod-a", "pod-b"], &format!("run {i} ({mode})"));
        let node = c.node(1);
        let text = |argv: &[&str]| {
            let out = node.output(argv).expect("running a tool in the node");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let nft = text(&["nft", "list", "table", "ip", "kproxy"]);
        c.check(nft.contains("kproxy") == (*mode == "nftables"), || {
            format!("run {i} ({mode}): the nftables table exists only in nftables mode:\n{nft}")
        });
        let ipt = text(&["iptables-save"]);
        c.check(ipt.contains("KPROXY-") == (*mode == "iptables"), || {
            format!("run {i} ({mode}): KPROXY- chains exist only in iptables mode")
        });
        let links = text(&["ip", "link", "show"]);
        c.check(links.contains("kproxy0") == (*mode == "userspace"), || {
            format!("run {i} ({mode}): kproxy0 exists only in userspace mode:\n{links}")
        });
        let pins = walk(&c.node_bpf_root(1));
        c.check(pins.is_empty() != (*mode == "ebpf"), || {
            format!("run {i} ({mode}): pins exist only in ebpf mode: {pins:?}")
        });
        c.stop_agent(1);
    }
    c.ok(c.agent_cleanup(1));
    assert_nothing_left(&c, 1, "after the last run");
}
