//! The basic scenarios through the rule-based modes (`--proxy-mode nftables` and
//! `iptables`), on the one-node seed cluster, with one scenario list for both:
//! - nodePort from an outside client, both pods answer, the client's address is kept (local
//!   endpoints need no SNAT);
//! - cluster IP from a host process on the node and from a pod, and hairpin (a pod reaching
//!   itself through its Service);
//! - UDP via the cluster IP;
//! - endpoint churn (pod-b replaced by pod-c in the slice);
//! - no endpoints: refused at once (TCP reset) via the nodePort and the cluster IP;
//! - `kproxy cleanup` leaves no rules of the mode.
//!
//! Not covered here (by design of these modes): `localhost:nodePort`.

use std::time::Duration;

use kproxy_tests::harness::{
    Cluster, Place, fixtures, kproxy_bin,
    manifests::seed,
    probe::{self, CurlResult, tally},
    sys,
};

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");

/// Starts the agent of node1 in `mode` (the harness's default argv with the mode replaced)
/// and waits for /healthz.
fn start_agent(c: &mut Cluster, mode: &str) {
    let bin = kproxy_bin().expect("kproxy binary");
    let mut argv: Vec<String> = vec![bin.display().to_string()];
    let mut args = c.agent_args(1);
    let i = args
        .iter()
        .position(|a| a == "--proxy-mode")
        .expect("--proxy-mode in the agent's argv");
    args[i + 1] = mode.to_string();
    argv.extend(args);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let node = c.node(1);
    c.spawn(&node, &format!("kproxy node1 {mode}"), &argv)
        .expect("starting the agent");
    let healthy = sys::wait_for(Duration::from_secs(30), Duration::from_millis(100), || {
        (c.healthz(1) == 200).then_some(())
    });
    if healthy.is_none() {
        fail(c, format!("the {mode} agent never became healthy"));
    }
}

/// The log of the agent started by [`start_agent`] (the cluster's first extra process).
fn agent_log(c: &Cluster) -> String {
    let log = std::fs::read_to_string(c.tmp_dir().join("extra-0.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(150)..].join("\n")
}

#[track_caller]
fn fail(c: &Cluster, msg: impl std::fmt::Display) -> ! {
    panic!("{msg}\n---- agent log ----\n{}\n----", agent_log(c))
}

fn curl_n(place: &Place, url: &str, n: usize) -> Vec<CurlResult> {
    probe::curl_n(place, url, n, Duration::from_secs(3)).expect("curl")
}

fn assert_pods(results: &[CurlResult], want: &[&str], what: &str) {
    let failed: Vec<String> = results
        .iter()
        .filter(|r| !r.ok())
        .map(|r| r.to_string())
        .collect();
    assert!(failed.is_empty(), "{what}: failures: {failed:#?}");
    let t = tally(results);
    let got: Vec<&str> = t.keys().map(String::as_str).collect();
    assert_eq!(got, want, "{what}: answers {t:?}");
}

/// Waits until `url` from `place` is answered by exactly the pods `want` (in 20 requests).
fn wait_pods(c: &Cluster, place: &Place, url: &str, want: &[&str], what: &str) {
    let ok = sys::wait_for(Duration::from_secs(10), Duration::from_millis(200), || {
        let r = curl_n(place, url, 20);
        let t = tally(&r);
        (r.iter().all(|r| r.ok()) && t.keys().map(String::as_str).eq(want.iter().copied()))
            .then_some(())
    });
    if ok.is_none() {
        let r = curl_n(place, url, 20);
        fail(
            c,
            format!(
                "{what}: {url} never answered by exactly {want:?}: {:?} {:#?}",
                tally(&r),
                r.iter().filter(|r| !r.ok()).collect::<Vec<_>>()
            ),
        );
    }
}

fn scenarios(mode: &str) {
    let mut c = fixtures::one_node(TESTPOD).expect("building the cluster");
    fixtures::write_seed(&c, &["pod-a", "pod-b"], &["pod-a", "pod-b"]).expect("manifests");
    // A real node has a default route; the harness's node has none, and a host process's
    // connect() to a cluster IP needs a route before the nat output hook can DNAT it (the
    // eBPF mode's socket hook translates before routing and needs none).
    let out = c
        .node(1)
        .output(&["ip", "route", "add", "10.96.0.0/12", "dev", "eth0"])
        .expect("ip route");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    start_agent(&mut c, mode);
    let log = agent_log(&c);
    assert!(
        log.contains(&format!("proxy mode {mode} chosen")),
        "the agent should say it runs in {mode} mode:\n{log}"
    );

    let nodeport = format!("http://{}:{}/", c.node_ip(1), seed::MYSVC_NODEPORT);
    let cip = format!("http://{}:{}/", seed::MYSVC_IP, seed::MYSVC_PORT);

    // nodePort from outside: both pods, the client's own address seen.
    let r = curl_n(&c.client(), &nodeport, 20);
    assert_pods(&r, &["pod-a", "pod-b"], "client -> nodePort");
    for r in &r {
        assert_eq!(
            r.seen_source(),
            Some(c.client_ip().to_string().as_str()),
            "{mode}: the pod should see the client's address: {r}"
        );
    }
    // Cluster IP from the node's host, from a pod, and hairpin from pod-a.
    let r = curl_n(&c.node(1), &cip, 16);
    assert_pods(&r, &["pod-a", "pod-b"], "node1 -> cluster IP");
    let r = curl_n(&c.pod(fixtures::CLIENT_POD), &cip, 16);
    assert_pods(&r, &["pod-a", "pod-b"], "pod-z -> cluster IP");
    let r = curl_n(&c.pod("pod-a"), &cip, 16);
    assert_pods(&r, &["pod-a", "pod-b"], "pod-a -> cluster IP (hairpin)");

    // UDP via the cluster IP: answered, from the service address.
    let dns = format!("{}:{}", seed::DNS_IP, seed::DNS_PORT);
    for _ in 0..6 {
        let l = c.ask(
            &c.pod(fixtures::CLIENT_POD),
            &["udp-ask", &dns, "--timeout-ms", "1000"],
            Duration::from_secs(5),
        );
        assert!(
            l.len() == 1 && l[0].is_ok(),
            "{mode}: pod-z -> {dns} (UDP) unanswered: {}",
            probe::show(&l)
        );
    }

    // Churn: pod-b out, pod-c in.
    fixtures::write_mysvc(&c, &["pod-a", "pod-c"]).expect("manifests");
    wait_pods(
        &c,
        &c.client(),
        &nodeport,
        &["pod-a", "pod-c"],
        "after churn, client -> nodePort",
    );
    wait_pods(
        &c,
        &c.pod(fixtures::CLIENT_POD),
        &cip,
        &["pod-a", "pod-c"],
        "after churn, pod-z -> cluster IP",
    );

    // No endpoints: refused at once.
    fixtures::write_mysvc(&c, &[]).expect("manifests");
    for (place, url) in [
        (c.client(), nodeport.clone()),
        (c.pod(fixtures::CLIENT_POD), cip.clone()),
        (c.node(1), cip.clone()),
    ] {
        let refused = sys::wait_for(Duration::from_secs(10), Duration::from_millis(100), || {
            let r = probe::curl(&place, &url, Duration::from_secs(3)).expect("curl");
            (r.refused() && r.elapsed < Duration::from_secs(1)).then_some(())
        });
        if refused.is_none() {
            let r = probe::curl(&place, &url, Duration::from_secs(3)).expect("curl");
            fail(
                &c,
                format!(
                    "{mode}: {} -> {url} without endpoints should be refused at once: {r}",
                    place.label
                ),
            );
        }
    }

    // Cleanup: nothing of the mode is left in the node.
    drop_agent_and_cleanup(&mut c, mode);
}

fn drop_agent_and_cleanup(c: &mut Cluster, mode: &str) {
    // The agent was spawned as the first extra process.
    c.stop_extra(0);
    let out = c.agent_cleanup(1).expect("kproxy cleanup");
    assert!(
        out.status.success(),
        "kproxy cleanup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let node = c.node(1);
    let nft = node.output(&["nft", "list", "ruleset"]).expect("nft");
    let nft = String::from_utf8_lossy(&nft.stdout);
    assert!(
        !nft.contains("kproxy"),
        "{mode}: nftables left behind:\n{nft}"
    );
    let ipt = node.output(&["iptables-save"]).expect("iptables-save");
    let ipt = String::from_utf8_lossy(&ipt.stdout);
    assert!(
        !ipt.contains("KPROXY-"),
        "{mode}: iptables left behind:\n{ipt}"
    );
}

#[test]
fn nftables_mode_scenarios() {
    scenarios("nftables");
}

#[test]
fn iptables_mode_scenarios() {
    scenarios("iptables");
}
