//! Conntrack hygiene (issue 5): the agent's sweep of the device programs' CT4/NAT4_REV maps.
//! With `KPROXY_CT_UDP_IDLE_SECS=2` and a sweep every second, an idle UDP nodePort flow's
//! entries disappear within seconds while TCP flows (closed ones kept for an hour here)
//! stay, and the entries
//! of TCP flows whose backend was removed from the service are deleted at the next sweep.
//!
//! Its own test binary: the settings are environment variables of the agent, inherited from
//! this process.

use std::{collections::BTreeSet, time::Duration};

use kproxy_tests::harness::{Cluster, fixtures, probe, sys};
use serde_json::Value;

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");

fn conntrack(c: &Cluster) -> Value {
    c.ok(kproxy_tests::harness::faults::kproxy_json(
        c,
        1,
        &["list", "conntrack"],
    ))
}

/// (protocol, client, backend) of every flow.
fn flows(ct: &Value) -> BTreeSet<(String, String, String)> {
    ct["flows"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| {
            (
                f["protocol"].as_str().unwrap_or_default().to_string(),
                f["client"].as_str().unwrap_or_default().to_string(),
                f["backend"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Reply translations going to `client` (`ADDR:PORT`).
fn replies_to(ct: &Value, client: &str) -> usize {
    ct["replies"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["new_to"].as_str() == Some(client))
        .count()
}

#[test]
fn idle_udp_flows_and_flows_to_removed_backends_are_swept() {
    // SAFETY: set before any other thread of this test binary exists (one test here).
    unsafe {
        std::env::set_var("KPROXY_CT_UDP_IDLE_SECS", "2");
        std::env::set_var("KPROXY_CT_GC_INTERVAL_SECS", "1");
        // The curl connections below close at once; keep closed TCP entries for the length
        // of this test (their expiry is e2e_ct_expiry's subject).
        std::env::set_var("KPROXY_CT_TCP_CLOSE_SECS", "3600");
    }
    let mut c = fixtures::one_node(TESTPOD).expect("building the cluster");
    fixtures::write_seed(&c, &["pod-a", "pod-b"], &["pod-a", "pod-b"]).unwrap();
    c.start_agent_ready(1).unwrap();
    c.check(c.agent_log(1).contains("udp_idle_s=2"), || {
        "the agent did not take KPROXY_CT_UDP_IDLE_SECS".into()
    });

    // TCP flows to both backends (new connections from the client; each a CT entry).
    let r = probe::curl_n(
        &c.client(),
        "http://198.18.0.1:30001/",
        16,
        Duration::from_secs(2),
    )
    .unwrap();
    let t = probe::tally(&r);
    c.check(t.len() == 2 && r.iter().all(|x| x.ok()), || {
        format!("both backends should answer: {t:?}")
    });
    // A UDP flow from a fixed port.
    let lines = c.ask(
        &c.client(),
        &[
            "udp-ask",
            "198.18.0.1:30053",
            "--sport",
            "40099",
            "--count",
            "3",
        ],
        Duration::from_secs(10),
    );
    c.check(lines.len() == 3 && lines.iter().all(|l| l.is_ok()), || {
        probe::show(&lines)
    });
    let udp_client = "198.18.0.100:40099";
    let ct = conntrack(&c);
    let before = flows(&ct);
    println!("flows before: {before:?}");
    c.check(
        before
            .iter()
            .any(|(p, cl, _)| p == "UDP" && cl == udp_client),
        || format!("no CT entry for the UDP flow: {ct:#}"),
    );
    let tcp_before: Vec<_> = before.iter().filter(|(p, ..)| p == "TCP").collect();
    c.check(tcp_before.len() >= 2, || {
        format!("no CT entries for the TCP flows: {ct:#}")
    });

    // The idle UDP flow goes (forward and reply entries); the TCP flows stay.
    let gone = sys::wait_for(Duration::from_secs(10), Duration::from_millis(200), || {
        let ct = conntrack(&c);
        let f = flows(&ct);
        (!f.iter().any(|(_, cl, _)| cl == udp_client) && replies_to(&ct, udp_client) == 0)
            .then_some(f)
    });
    let Some(after) = gone else {
        c.fail(format!(
            "the idle UDP flow's entries were not swept: {:#}",
            conntrack(&c)
        ));
    };
    let tcp_after: Vec<_> = after.iter().filter(|(p, ..)| p == "TCP").collect();
    c.check(tcp_after == tcp_before, || {
        format!(
            "TCP flows should outlive the UDP timeout: before {tcp_before:?} after {tcp_after:?}"
        )
    });

    // pod-b leaves mysvc: its flows' CT entries go at the next sweep, pod-a's stay.
    let pod_b = format!("{}:80", c.pod_ip("pod-b"));
    fixtures::write_mysvc(&c, &["pod-a"]).unwrap();
    let swept = sys::wait_for(Duration::from_secs(10), Duration::from_millis(200), || {
        let f = flows(&conntrack(&c));
        (!f.iter().any(|(_, _, b)| *b == pod_b)).then_some(f)
    });
    let Some(after) = swept else {
        c.fail(format!(
            "CT entries of the removed backend {pod_b} were not swept: {:#}",
            conntrack(&c)
        ));
    };
    let kept: Vec<_> = tcp_before
        .iter()
        .filter(|(_, _, b)| *b != pod_b)
        .copied()
        .collect();
    c.check(
        !kept.is_empty() && kept.iter().all(|f| after.contains(*f)),
        || format!("flows to pod-a should stay: {kept:?} vs {after:?}"),
    );
    c.check(c.agent_log(1).contains("ct_stale_backend="), || {
        "no sweep logged".into()
    });
}
