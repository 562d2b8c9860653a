//! A bounded soak (issue 5): continuous traffic and endpoint churn, pods replaced over and
//! over, for `KPROXY_SOAK_SECS` seconds (default 120).
//!
//! mysvc's two endpoints rotate through pod-a, pod-b and pod-c: each churn event starts the
//! next pod's server, puts it in the EndpointSlice in place of the oldest one, and kills the
//! old pod's server once its removal is programmed and its connections have drained (a pod
//! replaced with graceful termination, as a rollout does). Meanwhile a client
//! asks the nodePort (XDP path) and pod-z the cluster IP (socket path), each every 50 ms.
//!
//! Asserted: no request fails (every request goes to a ready endpoint; one in flight when
//! its pod is replaced finishes there, as removed TCP backends drain for a few seconds); the
//! agent's RSS after warm-up does not grow beyond a tolerance; at the end the maps hold
//! exactly the desired backends; the conntrack map stays bounded (entries of replaced backends are swept, with
//! the sweep made frequent for the test). The figures are printed.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use kproxy_tests::harness::{
    Cluster, fixtures, kproxy_bin,
    probe::{AskLine, show},
};

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");
const PODS: [&str; 3] = ["pod-a", "pod-b", "pod-c"];
const INTERVAL_MS: u64 = 50;
const CHURN_EVERY: Duration = Duration::from_secs(3);
/// How long removed TCP backends stay for connections in flight (the agent's drain).
/// Shorter than the churn interval: a replaced pod has stopped before it is added again.
const DRAIN_SECS: u64 = 1;
/// Allowed RSS growth after warm-up.
const RSS_SLACK_KIB: u64 = 8 * 1024;

fn soak_secs() -> u64 {
    std::env::var("KPROXY_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Entries in node 1's CT4 map (`bpftool -j map dump`).
fn ct_entries(c: &Cluster) -> usize {
    let pin = c.node_bpf_root(1).join("KP_CT4_V1");
    let out = c
        .node(1)
        .output(&[
            "bpftool",
            "-j",
            "map",
            "dump",
            "pinned",
            pin.to_str().unwrap(),
        ])
        .unwrap();
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v.as_array().map(Vec::len))
        .unwrap_or(usize::MAX)
}

/// `kproxy list <what> -o json` on node 1.
fn list(c: &Cluster, what: &str) -> Vec<serde_json::Value> {
    let bin = kproxy_bin().unwrap();
    let root = c.node_bpf_root(1);
    let out = c
        .node(1)
        .output(&[
            bin.to_str().unwrap(),
            "list",
            what,
            "--bpf-root",
            root.to_str().unwrap(),
            "-o",
            "json",
        ])
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("kproxy list {what}: {e}"))
}

fn asker_args(target: &str, count: u64) -> Vec<String> {
    [
        "tcp-ask",
        target,
        "--http",
        "--count",
        &count.to_string(),
        "--interval-ms",
        &INTERVAL_MS.to_string(),
        "--timeout-ms",
        "2000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn failures(lines: &[AskLine]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| !l.is_ok())
        .map(|l| l.to_string())
        .collect()
}

#[test]
fn soak_traffic_and_endpoint_churn() {
    let secs = soak_secs();
    // SAFETY: set before any thread of this test binary starts the agent; the agent inherits
    // it. A short idle timeout and a frequent sweep make the CT bound visible within minutes.
    unsafe {
        std::env::set_var("KPROXY_CT_GC_INTERVAL_SECS", "5");
        std::env::set_var("KPROXY_CT_TCP_IDLE_SECS", "20");
        std::env::set_var("KPROXY_TCP_DRAIN_SECS", DRAIN_SECS.to_string());
    }
    let mut c = fixtures::one_node(TESTPOD).expect("building the cluster");
    let mut live: Vec<&str> = vec!["pod-a", "pod-b"];
    fixtures::write_seed(&c, &live, &["pod-a", "pod-b"]).unwrap();
    let r = c.kill_pod("pod-c");
    c.ok(r);
    c.start_agent_ready(1).unwrap();
    let pid = c.agent_pid(1).expect("the agent's pid");

    let count = secs * 1000 / INTERVAL_MS;
    let np_args = asker_args("198.18.0.1:30001", count);
    let cip_args = asker_args("10.96.100.208:8080", count);
    let np_args: Vec<&str> = np_args.iter().map(String::as_str).collect();
    let cip_args: Vec<&str> = cip_args.iter().map(String::as_str).collect();
    let nodeport = c.ask_start(&c.client(), &np_args);
    let clusterip = c.ask_start(&c.pod("pod-z"), &cip_args);

    let start = Instant::now();
    let warm_up = Duration::from_secs((secs / 6).clamp(5, 30));
    let mut rss_start = None;
    let mut churn = 0u32;
    let mut sync_lag = Duration::ZERO;
    let mut pending_kills: Vec<(Instant, &str)> = Vec::new();
    let mut ct_samples = Vec::new();
    let mut next_churn = start + CHURN_EVERY;
    let end = start + Duration::from_secs(secs);
    while Instant::now() < end {
        let now = Instant::now();
        for (_, pod) in pending_kills.iter().filter(|(at, _)| *at <= now) {
            assert!(
                !live.contains(pod),
                "{pod} is live again before it was stopped"
            );
            let r = c.kill_pod(pod);
            c.ok(r);
        }
        pending_kills.retain(|(at, _)| *at > now);
        if rss_start.is_none() && start.elapsed() >= warm_up {
            rss_start = Some(rss_kib(pid));
        }
        if Instant::now() >= next_churn && Instant::now() + Duration::from_secs(2) < end {
            // Replace the oldest live pod by the stopped one.
            let Some(new) = PODS
                .iter()
                .copied()
                .find(|p| !live.contains(p) && !pending_kills.iter().any(|(_, k)| k == p))
            else {
                // The last replaced pod has not stopped yet: churn on the next round.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            };
            let old = live.remove(0);
            let r = c.start_nginx(new);
            c.ok(r);
            live.push(new);
            fixtures::write_mysvc(&c, &live).unwrap();
            // The old pod goes once the agent has programmed its removal (as the kubelet
            // stops a container after the endpoint is gone), however loaded the machine is.
            let old_ip = c.pod_ip(old).to_string();
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(10) {
                let programmed = list(&c, "services")
                    .iter()
                    .filter(|s| s["port"] == 30001)
                    .all(|s| {
                        s["backends"]
                            .as_array()
                            .is_some_and(|b| b.iter().all(|b| b["address"] != old_ip.as_str()))
                    });
                if programmed {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            sync_lag = sync_lag.max(t.elapsed());
            // Graceful termination: the old pod stops once connections to it have drained.
            pending_kills.push((Instant::now() + Duration::from_secs(DRAIN_SECS + 1), old));
            churn += 1;
            next_churn = Instant::now() + CHURN_EVERY;
            if churn.is_multiple_of(5) {
                ct_samples.push((start.elapsed().as_secs(), ct_entries(&c)));
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let rss_end = rss_kib(pid);
    let rss_start = rss_start.unwrap_or(rss_end);
    let timeout = Duration::from_secs(secs + 60);
    let np_lines = nodeport.finish(timeout).expect("the nodePort client");
    let cip_lines = clusterip.finish(timeout).expect("the cluster IP client");
    let np_failed = failures(&np_lines);
    let cip_failed = failures(&cip_lines);
    let ct_end = ct_entries(&c);

    // The maps hold exactly the desired backends once the last replaced one has drained.
    std::thread::sleep(Duration::from_secs(DRAIN_SECS + 2));
    let want: BTreeSet<String> = live.iter().map(|p| c.pod_ip(p).to_string()).collect();
    let services = list(&c, "services");
    let mysvc: Vec<&serde_json::Value> = services
        .iter()
        .filter(|s| s["port"] == 8080 || s["port"] == 30001)
        .collect();
    let mut wrong = Vec::new();
    for s in &mysvc {
        let have: BTreeSet<String> = s["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| b["address"].as_str().map(str::to_owned))
            .collect();
        if have != want {
            wrong.push(format!("{}: {have:?}", s["frontend"]));
        }
    }
    let backends = list(&c, "backends");
    let stale: Vec<String> = backends
        .iter()
        // mysvc's backends (TCP 80); the dns Service keeps pod-a and pod-b throughout.
        .filter(|b| b["port"] == 80 && b["protocol"] == "TCP")
        .filter_map(|b| b["address"].as_str())
        .filter(|a| {
            PODS.iter()
                .any(|p| c.pod_ip(p).to_string() == *a && !live.contains(p))
        })
        .map(str::to_owned)
        .collect();

    println!(
        "soak {secs} s: {} requests ({} nodePort, {} cluster IP), {} failed; {churn} churn events (pods replaced); agent RSS {rss_start} KiB after {warm_up:?} warm-up -> {rss_end} KiB at the end; CT entries over time {ct_samples:?}, {ct_end} at the end; slowest change to programmed {sync_lag:?}",
        np_lines.len() + cip_lines.len(),
        np_lines.len(),
        cip_lines.len(),
        np_failed.len() + cip_failed.len(),
    );
    c.check(np_failed.is_empty() && cip_failed.is_empty(), || {
        format!(
            "requests failed during churn: nodePort {np_failed:#?} cluster IP {cip_failed:#?}\n{}",
            show(&np_lines[np_lines.len().saturating_sub(40)..])
        )
    });
    c.check(np_lines.len() as u64 >= count * 9 / 10, || {
        format!("only {} nodePort requests of {count}", np_lines.len())
    });
    c.check(churn as u64 >= secs / 4, || {
        format!("only {churn} churn events")
    });
    c.check(rss_end <= rss_start + RSS_SLACK_KIB, || {
        format!("agent RSS grew from {rss_start} KiB to {rss_end} KiB")
    });
    c.check(mysvc.len() >= 2 && wrong.is_empty(), || {
        format!(
            "frontends with other backends than {want:?}: {wrong:?} ({} mysvc frontends)",
            mysvc.len()
        )
    });
    let in_map: BTreeSet<String> = backends
        .iter()
        .filter(|b| b["port"] == 80 && b["protocol"] == "TCP")
        .filter_map(|b| b["address"].as_str().map(str::to_owned))
        .collect();
    c.check(in_map == want, || {
        format!("mysvc backends in the map {in_map:?}, want {want:?}")
    });
    c.check(stale.is_empty(), || {
        format!("backends of replaced pods left: {stale:?}")
    });
    // Bounded: at most what the last idle timeout + sweep interval of traffic can hold
    // (20/s per client through XDP; the socket path keeps no CT entries), far below the
    // number of connections made.
    let bound = (1000 / INTERVAL_MS as usize) * (20 + 5 + 10);
    c.check(ct_end <= bound, || {
        format!(
            "{ct_end} CT entries at the end (bound {bound}; {} nodePort connections made)",
            np_lines.len()
        )
    });
}
