//! IPv6 `sessionAffinity: ClientIP` and `loadBalancerSourceRanges` in every mode (`ebpf`:
//! socket hooks and the XDP path; `nftables`, `iptables`, `userspace`), one dual-stack node per mode with
//! three pods behind three dual-stack Services (IPv6 endpoint slices):
//! - `sticky6` (NodePort, ClientIP affinity): every IPv6 client address sticks to one pod,
//!   over the nodePort and the IPv6 cluster IP; different addresses spread;
//! - `plain6` (NodePort, no affinity): one client address spreads over the pods;
//! - `guarded6` (LoadBalancer with an IPv6 ingress IP and IPv6 source ranges): a client
//!   address inside reaches the LoadBalancer IP and the nodePort, one outside does not (XDP
//!   and the rule modes drop; the relay closes), the cluster IP stays open; in-node connections to
//!   the LoadBalancer IP follow kube-proxy's rule (allowed only when a node address is in
//!   range); widening the ranges lets the second client in.
//!
//! - `dns6` (NodePort, UDP): datagrams over the IPv6 cluster IP and nodePort are answered by
//!   the pods, from the address they were sent to.
//!
//! And `kproxy list services` / `kproxy trace` on an IPv6 Service of the eBPF mode.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use kproxy_tests::harness::{
    Cluster, Place, PodSpec,
    cluster::{CLIENT_IP6, node_ip6},
    manifests::{EndpointSlice, Protocol, Service},
    probe::CurlResult,
    sys,
};

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");
const PODS: [&str; 3] = ["pod-a", "pod-b", "pod-c"];
/// Not any node's address: the client routes it via node1.
const LB_IP6: &str = "fd00:198:51::30";
/// Second addresses of the client (the first, CLIENT_IP6, is ...::100).
const EXTRA_CLIENTS: [&str; 8] = [
    "fd00:198:18::101",
    "fd00:198:18::102",
    "fd00:198:18::103",
    "fd00:198:18::104",
    "fd00:198:18::105",
    "fd00:198:18::106",
    "fd00:198:18::107",
    "fd00:198:18::108",
];
const STICKY: (&str, &str, &str, u16) = ("sticky6", "10.96.110.1", "fd00:10:96::1:1", 30210);
const PLAIN: (&str, &str, &str, u16) = ("plain6", "10.96.110.2", "fd00:10:96::1:2", 30211);
const GUARDED: (&str, &str, &str, u16) = ("guarded6", "10.96.110.3", "fd00:10:96::1:3", 30212);
const DNS: (&str, &str, &str, u16) = ("dns6", "10.96.110.4", "fd00:10:96::1:4", 30213);
const DNS_TARGET_PORT: u16 = 5353;

/// A dual-stack NodePort Service `name` (80 -> 80/TCP) over the three pods' IPv6 addresses,
/// with `extra` spec lines, as LoadBalancer with `LB_IP6` when `lb`.
fn write_service(
    c: &Cluster,
    (name, cip4, cip6, node_port): (&str, &str, &str, u16),
    extra: &str,
    lb: bool,
) {
    let mut svc = Service::node_port(name, cip4)
        .dual_stack(cip6)
        .selector(name)
        .port("http", Protocol::Tcp, 80, 80, Some(node_port))
        .to_yaml()
        .replacen("spec:\n", &format!("spec:\n{extra}"), 1);
    if lb {
        svc = svc.replacen("  type: NodePort", "  type: LoadBalancer", 1);
        svc.push_str(&format!(
            "status:\n  loadBalancer:\n    ingress:\n    - ip: '{LB_IP6}'\n"
        ));
    }
    let slice = EndpointSlice::for_service(name)
        .named(&format!("{name}-v6"))
        .ipv6()
        .port("http", Protocol::Tcp, 80)
        .endpoints(PODS.iter().map(|p| c.endpoint6(p)))
        .to_yaml();
    c.write_manifest_text(&format!("{name}.yaml"), &format!("---\n{svc}---\n{slice}"))
        .expect("writing the manifests");
}

/// `dns6`: a dual-stack NodePort Service 53 -> 5353/UDP over the pods' IPv6 addresses.
fn write_dns(c: &Cluster) {
    let (name, cip4, cip6, node_port) = DNS;
    let svc = Service::node_port(name, cip4)
        .dual_stack(cip6)
        .selector(name)
        .port("dns", Protocol::Udp, 53, DNS_TARGET_PORT, Some(node_port));
    let slice = EndpointSlice::for_service(name)
        .named(&format!("{name}-v6"))
        .ipv6()
        .port("dns", Protocol::Udp, DNS_TARGET_PORT)
        .endpoints(PODS.iter().map(|p| c.endpoint6(p)));
    c.write_manifests(&format!("{name}.yaml"), &[svc.into(), slice.into()])
        .expect("writing the manifests");
}

fn write_guarded(c: &Cluster, ranges: &str) {
    write_service(
        c,
        GUARDED,
        &format!("  loadBalancerSourceRanges: [{ranges}]\n"),
        true,
    );
}

fn cluster(mode: &str) -> Cluster {
    let mut b = Cluster::builder()
        .proxy_mode(mode)
        .nodes(1)
        .testpod(TESTPOD)
        .dual_stack()
        .pod(PodSpec::new("pod-z", 1).http_ports(&[]));
    for p in PODS {
        b = b.pod(PodSpec::new(p, 1));
    }
    let mut c = b.build().expect("building the dual-stack cluster");
    write_service(
        &c,
        STICKY,
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 3600}}\n",
        false,
    );
    write_service(&c, PLAIN, "", false);
    write_guarded(&c, "'fd00:198:18::100/128'");
    for p in PODS {
        c.start_udp_serve6(p, DNS_TARGET_PORT)
            .expect("udp-serve on IPv6");
    }
    write_dns(&c);
    let client = c.client();
    let cns = client.netns.as_ref().expect("client netns");
    for a in EXTRA_CLIENTS {
        c.ok(cns.ip(&["addr", "add", &format!("{a}/64"), "dev", "eth0", "nodad"]));
    }
    let node1 = node_ip6(1).to_string();
    c.ok(cns.ip(&["-6", "route", "add", "fd00:198:51::/64", "via", &node1]));
    // The node's host needs routes for netfilter to DNAT its connect()s (the relay's
    // addresses are local; harmless there).
    let node = c.node(1);
    let ns = node.netns.as_ref().expect("node netns");
    c.ok(ns.ip(&["-6", "route", "add", "fd00:10:96::/108", "dev", "eth0"]));
    c.ok(ns.ip(&["-6", "route", "add", "fd00:198:51::/64", "dev", "eth0"]));
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

fn served_by_pod(r: &CurlResult) -> bool {
    r.ok() && r.pod().is_some_and(|p| PODS.contains(&p))
}

/// Waits (10 s) until `url` from `place`/`src` is answered by a pod of the Service.
fn wait_allowed(c: &Cluster, place: &Place, src: Option<&str>, url: &str, what: &str) {
    let mut last = None;
    let ok = sys::wait_for(Duration::from_secs(10), Duration::from_millis(100), || {
        let r = curl_from(place, src, url);
        let good = served_by_pod(&r);
        last = Some(r);
        good.then_some(())
    });
    c.check(ok.is_some(), || {
        format!(
            "{} {what}: {} ({src:?}) -> {url} should be served: {}",
            c.proxy_mode(),
            place.label,
            last.map(|r| r.to_string()).unwrap_or_default()
        )
    });
}

/// Waits (10 s) until `url` from `place`/`src` is not answered, then checks it stays so;
/// `dropped`: as a timeout (curl exit 28), not a refusal.
fn wait_denied(
    c: &Cluster,
    place: &Place,
    src: Option<&str>,
    url: &str,
    dropped: bool,
    what: &str,
) {
    let ok = sys::wait_for(Duration::from_secs(10), Duration::from_millis(100), || {
        (!curl_from(place, src, url).ok()).then_some(())
    });
    c.check(ok.is_some(), || {
        format!(
            "{} {what}: {} ({src:?}) -> {url} still served",
            c.proxy_mode(),
            place.label
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

/// `n` requests from `place`/`src`, all answered by a pod; the pods, in order.
fn picks(c: &Cluster, place: &Place, src: Option<&str>, url: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let r = curl_from(place, src, url);
            c.check(served_by_pod(&r), || {
                format!(
                    "{} {} ({src:?}) -> {url}: request {i} failed: {r}",
                    c.proxy_mode(),
                    place.label
                )
            });
            r.pod().unwrap_or_default().to_string()
        })
        .collect()
}

fn distinct(picks: &[String]) -> BTreeSet<&String> {
    picks.iter().collect()
}

fn nodeport_url(node_port: u16) -> String {
    format!("http://[{}]:{node_port}/", node_ip6(1))
}

/// ClientIP affinity over IPv6 sticks per client address (nodePort from outside, cluster IP
/// from a pod); without it one client spreads.
fn affinity(c: &Cluster) {
    let mode = c.proxy_mode().to_string();
    let client = c.client();
    let me = CLIENT_IP6.to_string();
    let np = nodeport_url(STICKY.3);
    wait_allowed(c, &client, Some(&me), &np, "client -> sticky nodePort");
    let first = picks(c, &client, Some(&me), &np, 12);
    c.check(distinct(&first).len() == 1, || {
        format!("{mode}: {CLIENT_IP6} -> {np} should stick to one pod: {first:?}")
    });
    println!(
        "{mode}: {CLIENT_IP6} -> sticky nodePort pinned to {}",
        first[0]
    );

    let pod = c.pod("pod-z");
    let cip = format!("http://[{}]/", STICKY.2);
    wait_allowed(c, &pod, None, &cip, "pod -> sticky cluster IP");
    let from_pod = picks(c, &pod, None, &cip, 8);
    c.check(distinct(&from_pod).len() == 1, || {
        format!("{mode}: pod-z -> {cip} should stick to one pod: {from_pod:?}")
    });

    let mut pinned = BTreeSet::new();
    for src in EXTRA_CLIENTS {
        let p = picks(c, &client, Some(src), &np, 3);
        c.check(distinct(&p).len() == 1, || {
            format!("{mode}: {src} -> {np} should stick to one pod: {p:?}")
        });
        pinned.insert(p[0].clone());
    }
    println!("{mode}: 8 more client addresses pinned to {pinned:?}");
    c.check(pinned.len() > 1, || {
        format!("{mode}: 8 client addresses all pinned to one pod: {pinned:?}")
    });

    let plain = nodeport_url(PLAIN.3);
    wait_allowed(c, &client, Some(&me), &plain, "client -> plain nodePort");
    let spread = picks(c, &client, Some(&me), &plain, 15);
    println!(
        "{mode}: without affinity one client reached {:?}",
        distinct(&spread)
    );
    c.check(distinct(&spread).len() > 1, || {
        format!("{mode}: without affinity {CLIENT_IP6} should spread: {spread:?}")
    });
}

/// loadBalancerSourceRanges over IPv6: inside vs outside, the cluster IP unrestricted, the
/// node's own connections, widened ranges.
fn source_ranges(c: &Cluster) {
    let mode = c.proxy_mode().to_string();
    let client = c.client();
    let host = c.node(1);
    let pod = c.pod("pod-z");
    let lb = format!("http://[{LB_IP6}]/");
    let np = nodeport_url(GUARDED.3);
    let cip = format!("http://[{}]/", GUARDED.2);
    let inside = CLIENT_IP6.to_string();
    let outside = EXTRA_CLIENTS[0];
    // The rule modes drop; the relay has accepted the connection already and closes it.
    let dropped = mode != "userspace";

    wait_allowed(c, &client, Some(&inside), &lb, "inside -> LB IP");
    wait_allowed(c, &client, Some(&inside), &np, "inside -> nodePort");
    wait_denied(c, &client, Some(outside), &lb, dropped, "outside -> LB IP");
    wait_denied(
        c,
        &client,
        Some(outside),
        &np,
        dropped,
        "outside -> nodePort",
    );
    wait_allowed(c, &pod, None, &cip, "pod -> cluster IP");
    // The node's addresses are outside: its own connections to the LB IP are not served.
    wait_denied(c, &host, None, &lb, false, "host -> LB IP, node outside");

    // Widened to the whole client network, which holds the node.
    write_guarded(c, "'fd00:198:18::/64'");
    wait_allowed(
        c,
        &client,
        Some(outside),
        &lb,
        "second address -> LB IP, widened",
    );
    wait_allowed(
        c,
        &client,
        Some(outside),
        &np,
        "second address -> nodePort, widened",
    );
    wait_allowed(c, &host, None, &lb, "host -> LB IP, node inside");
    write_guarded(c, "'fd00:198:18::100/128'");
    wait_denied(
        c,
        &client,
        Some(outside),
        &lb,
        dropped,
        "outside -> LB IP, narrowed again",
    );
    println!("{mode}: IPv6 source ranges enforced and changed as expected");
}

/// UDP over IPv6: the cluster IP from a pod, the nodePort from the client; every datagram
/// answered by a pod of the Service, from the address it was sent to.
fn udp(c: &Cluster) {
    let mode = c.proxy_mode().to_string();
    for (place, target) in [
        (c.pod("pod-z"), format!("[{}]:53", DNS.2)),
        (c.client(), format!("[{}]:{}", node_ip6(1), DNS.3)),
    ] {
        let lines = c.ask(
            &place,
            &["udp-ask", &target, "--count", "9", "--timeout-ms", "1500"],
            Duration::from_secs(60),
        );
        let timeline = kproxy_tests::harness::probe::show(&lines);
        c.check(lines.len() == 9, || {
            format!("{mode}: {target}:\n{timeline}")
        });
        let mut pods = BTreeSet::new();
        for l in &lines {
            match &l.outcome {
                kproxy_tests::harness::Outcome::Ok { peer, .. } if *peer == target => {}
                _ => c.fail(format!(
                    "{mode}: {} -> {target} (UDP): {l}\n{timeline}",
                    place.label
                )),
            }
            let pod = l.pod().unwrap_or_default().to_string();
            c.check(PODS.contains(&pod.as_str()), || {
                format!("{mode}: {target} answered by {pod:?}:\n{timeline}")
            });
            pods.insert(pod);
        }
        println!(
            "{mode}: {} -> {target} (UDP) answered by {pods:?}",
            place.label
        );
    }
}

fn scenario(mode: &str) {
    let c = cluster(mode);
    affinity(&c);
    source_ranges(&c);
    udp(&c);
}

#[test]
fn ipv6_affinity_and_source_ranges_nftables() {
    scenario("nftables");
}

#[test]
fn ipv6_affinity_and_source_ranges_iptables() {
    scenario("iptables");
}

#[test]
fn ipv6_affinity_and_source_ranges_userspace() {
    scenario("userspace");
}

/// `kproxy ARGS... --bpf-root <node1's> -o json` on node1, parsed.
fn kproxy_json(c: &Cluster, args: &[&str]) -> serde_json::Value {
    let bin = c.ok(kproxy_tests::harness::cluster::kproxy_bin());
    let root = c.node_bpf_root(1);
    let mut argv = vec![bin.to_str().unwrap()];
    argv.extend_from_slice(args);
    argv.extend(["--bpf-root", root.to_str().unwrap(), "-o", "json"]);
    let out = c.ok(c.node(1).output_timeout(&argv, Duration::from_secs(30)));
    let text = String::from_utf8_lossy(&out.stdout);
    c.check(out.status.success(), || {
        format!(
            "{argv:?}: {}\n{text}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| c.fail(format!("bad JSON ({e}):\n{text}")))
}

/// The eBPF mode's IPv6 frontends in `kproxy list services` (family IPv6, the pods' IPv6
/// addresses as backends) and `kproxy trace` of the IPv6 cluster IP and nodePort (the
/// socket hook's random pick among them).
#[test]
fn kproxy_list_and_trace_show_ipv6_services() {
    let mut b = Cluster::builder()
        .nodes(1)
        .testpod(TESTPOD)
        .dual_stack()
        .pod(PodSpec::new("pod-z", 1).http_ports(&[]));
    for p in PODS {
        b = b.pod(PodSpec::new(p, 1));
    }
    let mut c = b.build().expect("building the dual-stack cluster");
    write_service(&c, PLAIN, "", false);
    c.start_agent_ready(1).expect("starting the agent");
    let cip = format!("http://[{}]/", PLAIN.2);
    wait_allowed(&c, &c.pod("pod-z"), None, &cip, "pod -> cluster IP");
    let mut pods6: Vec<String> = PODS
        .iter()
        .map(|p| format!("[{}]:80", c.pod_ip6(p)))
        .collect();
    pods6.sort();

    let services = kproxy_json(&c, &["list", "services"]);
    let find = |label: &str| {
        services
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["frontend"] == label)
            .cloned()
            .unwrap_or_else(|| c.fail(format!("no frontend {label} in {services:#}")))
    };
    for label in [
        format!("[{}]:80/TCP", PLAIN.2),
        format!("[::]:{}/TCP (nodePort)", PLAIN.3),
    ] {
        let e = find(&label);
        assert_eq!(e["family"], "IPv6", "{e:#}");
        let mut backends: Vec<String> = e["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| format!("[{}]:{}", b["address"].as_str().unwrap(), b["port"]))
            .collect();
        backends.sort();
        assert_eq!(backends, pods6, "{label}: {e:#}");
    }
    // The IPv4 frontends are still there, as IPv4.
    let v4 = find(&format!("{}:80/TCP", PLAIN.1));
    assert_eq!(v4["family"], "IPv4", "{v4:#}");

    let client = CLIENT_IP6.to_string();
    for (dst, matched) in [
        (format!("[{}]:80/tcp", PLAIN.2), "exact"),
        (format!("[{}]:{}/tcp", node_ip6(1), PLAIN.3), "nodePort"),
    ] {
        let t = kproxy_json(&c, &["trace", &client, &dst]);
        assert_eq!(t["verdict"], "random", "{dst}: {t:#}");
        assert_eq!(t["match"], matched, "{dst}: {t:#}");
        let mut picks: Vec<String> = t["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| format!("[{}]:{}", b["address"].as_str().unwrap(), b["port"]))
            .collect();
        picks.sort();
        assert_eq!(picks, pods6, "{dst}: {t:#}");
    }
    let none = kproxy_json(&c, &["trace", &client, &format!("[{}]:81/tcp", PLAIN.2)]);
    assert_eq!(none["verdict"], "not-a-service", "{none:#}");
}

/// The eBPF mode: affinity by network namespace at socket level and by client address on
/// the XDP path; source ranges dropped by XDP and refused at socket level for the node.
#[test]
fn ipv6_affinity_and_source_ranges_ebpf() {
    scenario("ebpf");
}
