//! The tc ingress fast path for local backends (`--device-ingress tc`, `--tc-redirect-peer`):
//! nodePort packets for a pod on the node are delivered straight into the pod's namespace
//! with `bpf_redirect_peer`, counted as `fib_redirect_peer`. What the client and the pods see
//! must not change: the right pods answer over TCP, UDP and IPv6, a local pod sees the
//! client's own address, replies reach the client, and a remote backend's flow still goes out
//! of the node's device (SNATed) without the peer redirect.

use std::{collections::BTreeMap, collections::BTreeSet, time::Duration};

use kproxy_tests::harness::{
    Cluster, Outcome, PodSpec,
    cluster::{CLIENT_IP, CLIENT_IP6, node_ip, node_ip6},
    manifests::{EndpointSlice, Object, Protocol, seed},
    probe::{self, show},
    sys,
};

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");
const REDIRECT_PEER: &str = "kproxy_datapath_events_total{reason=\"fib_redirect_peer\"}";
const FIB_FORWARD: &str = "kproxy_datapath_events_total{reason=\"fib_forward\"}";

/// Two nodes; pod-a and pod-b (HTTP, UDP 5353) on node 1, pod-r on node 2; every address
/// dual-stack.
fn cluster() -> Cluster {
    Cluster::builder()
        .nodes(2)
        .testpod(TESTPOD)
        .dual_stack()
        .pod(PodSpec::new("pod-a", 1).udp(seed::DNS_TARGET_PORT))
        .pod(PodSpec::new("pod-b", 1).udp(seed::DNS_TARGET_PORT))
        .pod(PodSpec::new("pod-r", 2))
        .build()
        .expect("building the cluster")
}

/// A dual-stack NodePort Service `name` on port 80/TCP with `externalTrafficPolicy: policy`.
fn nodeport(name: &str, n: u8, node_port: u16, policy: &str) -> Object {
    Object::Raw(format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.100.{n}\n  clusterIPs: [10.96.100.{n}, 'fd00:10:96::{n}']\n  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  externalTrafficPolicy: {policy}\n  selector: {{app: {name}}}\n  ports:\n  - {{name: http, protocol: TCP, port: 8080, targetPort: 80, nodePort: {node_port}}}\n"
    ))
}

/// The Service's IPv4 and IPv6 slices over `pods`.
fn slices(c: &Cluster, name: &str, pods: &[&str]) -> [Object; 2] {
    [
        EndpointSlice::for_service(name)
            .port("http", Protocol::Tcp, 80)
            .endpoints(pods.iter().map(|p| c.endpoint(p)))
            .into(),
        EndpointSlice::for_service(name)
            .named(&format!("{name}-v6"))
            .ipv6()
            .port("http", Protocol::Tcp, 80)
            .endpoints(pods.iter().map(|p| c.endpoint6(p)))
            .into(),
    ]
}

/// `web` (Cluster, pod-a and pod-b) on 30001, `local` (Local, pod-a and pod-r) on 30003,
/// `remote` (Cluster, pod-r) on 30002, and `dns` (UDP 30053, pod-a and pod-b).
fn write_services(c: &Cluster) {
    let mut objs: Vec<Object> = vec![nodeport("web", 1, 30001, "Cluster")];
    objs.extend(slices(c, "web", &["pod-a", "pod-b"]));
    objs.push(nodeport("local", 3, 30003, "Local"));
    objs.extend(slices(c, "local", &["pod-a", "pod-r"]));
    objs.push(nodeport("remote", 2, 30002, "Cluster"));
    objs.extend(slices(c, "remote", &["pod-r"]));
    objs.push(seed::dns().into());
    objs.push(seed::dns_slice([c.endpoint("pod-a"), c.endpoint("pod-b")]).into());
    c.write_manifests("services.yaml", &objs).unwrap();
}

fn counter(m: &BTreeMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("{series} missing from the metrics"))
}

/// How much `series` grew from the scrape `before` to the scrape `after`.
fn grew(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, series: &str) -> f64 {
    counter(after, series) - counter(before, series)
}

fn wait_served(c: &Cluster, url: &str) {
    let client = c.client();
    let ok = sys::wait_for(Duration::from_secs(10), Duration::from_millis(50), || {
        probe::curl(&client, url, Duration::from_secs(1))
            .unwrap()
            .ok()
            .then_some(())
    });
    assert!(ok.is_some(), "client -> {url}: never served");
}

/// `n` requests from the client; asserts each was answered and that the pod saw `source`;
/// returns the pods that answered.
fn answered_by(c: &Cluster, url: &str, n: usize, source: &str) -> BTreeSet<String> {
    wait_served(c, url);
    let results = probe::curl_n(&c.client(), url, n, Duration::from_secs(3)).unwrap();
    let mut pods = BTreeSet::new();
    for r in &results {
        assert!(r.ok(), "client -> {url}: {r}");
        assert_eq!(r.seen_source(), Some(source), "client -> {url}: {r}");
        pods.insert(r.pod().unwrap().to_string());
    }
    pods
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// Single UDP queries from the client to node 1's `dns` nodePort: every one answered from the
/// nodePort by pod-a or pod-b, which saw the client's address.
fn udp_queries(c: &Cluster, n: usize) -> BTreeSet<String> {
    let target = format!("{}:{}", node_ip(1), seed::DNS_NODEPORT);
    let mut pods = BTreeSet::new();
    for _ in 0..n {
        let lines = c.ask(
            &c.client(),
            &["udp-ask", &target, "--timeout-ms", "1000"],
            Duration::from_secs(5),
        );
        let all = show(&lines);
        assert_eq!(lines.len(), 1, "{all}");
        let l = &lines[0];
        let Outcome::Ok { peer, .. } = &l.outcome else {
            panic!("client -> {target} unanswered:\n{all}");
        };
        assert_eq!(
            *peer, target,
            "the reply must come from the nodePort:\n{all}"
        );
        assert!(
            l.seen_source()
                .unwrap_or("")
                .starts_with(&format!("{CLIENT_IP}:")),
            "the pod should see the client's address:\n{all}"
        );
        pods.insert(l.pod().unwrap_or("").to_string());
    }
    pods
}

#[test]
fn tc_ingress_delivers_local_backends_into_the_pod() {
    let mut c = cluster();
    write_services(&c);
    c.start_agent_with(1, &["--device-ingress", "tc"])
        .expect("starting the agent");
    c.wait_healthy(1, Duration::from_secs(30))
        .expect("the agent gets healthy");
    let node1 = node_ip(1).to_string();
    let node1_6 = node_ip6(1).to_string();
    let client = CLIENT_IP.to_string();
    let client6 = CLIENT_IP6.to_string();
    let both = set(&["pod-a", "pod-b"]);

    // TCP to local backends, policy Cluster (no SNAT for a local backend) and Local.
    let before = c.metrics(1);
    let url = format!("http://{node1}:30001/");
    assert_eq!(answered_by(&c, &url, 20, &client), both, "{url}");
    let url = format!("http://{node1}:30003/");
    assert_eq!(
        answered_by(&c, &url, 10, &client),
        set(&["pod-a"]),
        "{url}: externalTrafficPolicy Local keeps node 1's pod only"
    );
    let after = c.metrics(1);
    let peer_tcp = grew(&before, &after, REDIRECT_PEER);
    // At least the SYN and the request of each of the 30 connections.
    assert!(
        peer_tcp >= 60.0,
        "fib_redirect_peer grew by {peer_tcp} for 30 TCP requests to local pods"
    );

    // UDP.
    let before = after;
    assert_eq!(udp_queries(&c, 12), both, "UDP to node 1's nodePort");
    let after = c.metrics(1);
    let peer_udp = grew(&before, &after, REDIRECT_PEER);
    assert!(
        peer_udp >= 12.0,
        "fib_redirect_peer grew by {peer_udp} for 12 UDP queries to local pods"
    );

    // IPv6, both policies.
    let before = after;
    let url = format!("http://[{node1_6}]:30001/");
    assert_eq!(answered_by(&c, &url, 10, &client6), both, "{url}");
    let url = format!("http://[{node1_6}]:30003/");
    assert_eq!(
        answered_by(&c, &url, 10, &client6),
        set(&["pod-a"]),
        "{url}"
    );
    let after = c.metrics(1);
    let peer6 = grew(&before, &after, REDIRECT_PEER);
    assert!(
        peer6 >= 40.0,
        "fib_redirect_peer grew by {peer6} for 20 IPv6 TCP requests to local pods"
    );

    // A remote backend: SNATed to node 1, sent out of eth0 (FIB-forwarded, not into a pod).
    let before = after;
    let url = format!("http://{node1}:30002/");
    assert_eq!(answered_by(&c, &url, 10, &node1), set(&["pod-r"]), "{url}");
    let after = c.metrics(1);
    let fwd = grew(&before, &after, FIB_FORWARD);
    let peer_remote = grew(&before, &after, REDIRECT_PEER);
    assert!(
        fwd >= 20.0,
        "fib_forward grew by {fwd} for 10 remote requests"
    );
    assert_eq!(
        peer_remote, 0.0,
        "a remote backend's flow must not be peer-redirected"
    );
}

/// `--tc-redirect-peer false`: the same traffic is served through `bpf_redirect` (to the
/// host end of the pod's veth), and the pinned device map an earlier agent filled is emptied.
#[test]
fn tc_redirect_peer_can_be_turned_off() {
    let mut c = cluster();
    write_services(&c);
    c.start_agent_with(1, &["--device-ingress", "tc"])
        .expect("starting the agent");
    c.wait_healthy(1, Duration::from_secs(30))
        .expect("the agent gets healthy");
    let url = format!("http://{}:30001/", node_ip(1));
    let client = CLIENT_IP.to_string();
    let before = c.metrics(1);
    answered_by(&c, &url, 5, &client);
    let after = c.metrics(1);
    assert!(counter(&after, REDIRECT_PEER) > counter(&before, REDIRECT_PEER));
    c.stop_agent(1);

    c.start_agent_with(
        1,
        &["--device-ingress", "tc", "--tc-redirect-peer", "false"],
    )
    .expect("restarting the agent");
    c.wait_healthy(1, Duration::from_secs(30))
        .expect("the agent gets healthy again");
    let before = c.metrics(1);
    assert_eq!(
        answered_by(&c, &url, 20, &client),
        set(&["pod-a", "pod-b"]),
        "{url} without the peer redirect"
    );
    let after = c.metrics(1);
    let fwd = grew(&before, &after, FIB_FORWARD);
    let peer = grew(&before, &after, REDIRECT_PEER);
    assert!(fwd >= 40.0, "fib_forward grew by {fwd} for 20 requests");
    assert_eq!(peer, 0.0, "peer redirects with --tc-redirect-peer false");
}
