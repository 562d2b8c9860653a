//! Conntrack expiry by TCP state, end to end: with a sweep every second and the default
//! timeouts (closed 10 s, established 6 h), the entry of a closed nodePort connection
//! (curl: FIN both ways) is gone shortly after the close timeout, while an idle established
//! connection's entry stays and the connection still works.
//!
//! Its own test binary: the sweep interval is an environment variable of the agent,
//! inherited from this process.

use std::{collections::BTreeSet, time::Duration};

use kproxy_tests::harness::{
    Cluster, fixtures,
    manifests::{EndpointSlice, Object, Protocol, Service},
    probe, sys,
};
use proxy_common::conntrack::CT_TIMEOUT_TCP_CLOSE_SECS;
use serde_json::Value;

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");
const ECHO_PORT: u16 = 7000;
const ECHO_NODE_PORT: u16 = 30700;
/// The idle connection sends its second line after this long: past the close timeout and
/// the time the closed entry takes to go.
const IDLE_GAP: Duration = Duration::from_secs(20);

/// (client, backend) of every TCP flow in CT4.
fn tcp_flows(c: &Cluster) -> BTreeSet<(String, String)> {
    let ct: Value = c.ok(kproxy_tests::harness::faults::kproxy_json(
        c,
        1,
        &["list", "conntrack"],
    ));
    ct["flows"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["protocol"].as_str() == Some("TCP"))
        .map(|f| {
            (
                f["client"].as_str().unwrap_or_default().to_string(),
                f["backend"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[test]
fn closed_connections_expire_and_idle_established_ones_stay() {
    // SAFETY: set before any other thread of this test binary exists (one test here).
    unsafe { std::env::set_var("KPROXY_CT_GC_INTERVAL_SECS", "1") };
    let mut c = fixtures::one_node(TESTPOD).expect("building the cluster");
    fixtures::write_seed(&c, &["pod-a"], &["pod-a"]).unwrap();
    let echo: Vec<Object> = vec![
        Service::node_port("echo", "10.96.100.70")
            .selector("echo")
            .port(
                "echo",
                Protocol::Tcp,
                ECHO_PORT,
                ECHO_PORT,
                Some(ECHO_NODE_PORT),
            )
            .into(),
        EndpointSlice::for_service("echo")
            .port("echo", Protocol::Tcp, ECHO_PORT)
            .endpoint(c.endpoint("pod-a"))
            .into(),
    ];
    c.write_manifests("echo.yaml", &echo).unwrap();
    kproxy_tests::harness::faults::start_echo_server(&mut c, "pod-a", ECHO_PORT).unwrap();
    c.start_agent_ready(1).unwrap();
    c.check(c.agent_log(1).contains("tcp_close_s=10"), || {
        "the agent does not log its close timeout".into()
    });

    // An idle established connection: one echoed line, then silence (the client holds it).
    let keep = kproxy_tests::harness::faults::KeepAlive::start(
        &c,
        &c.client(),
        &format!("{}:{ECHO_NODE_PORT}", c.node_ip(1)),
        IDLE_GAP,
    )
    .expect("the idle connection");
    let first = keep
        .asker
        .wait_line(Duration::from_secs(5), |l| l.is_ok())
        .unwrap_or_else(|| c.fail("the idle connection never got its first echo"));
    println!("idle connection: {first:?}");
    // A closed connection: curl closes after its request.
    let r = c.curl(&c.client(), &format!("http://{}:30001/", c.node_ip(1)));
    c.check(r.ok(), || format!("curl through the nodePort failed: {r}"));

    let echo_backend = format!("{}:{ECHO_PORT}", c.pod_ip("pod-a"));
    let http_backend = format!("{}:80", c.pod_ip("pod-a"));
    let before = tcp_flows(&c);
    println!("flows right after: {before:?}");
    let idle: Vec<_> = before
        .iter()
        .filter(|(_, b)| *b == echo_backend)
        .cloned()
        .collect();
    c.check(idle.len() == 1, || {
        format!("no single idle flow: {before:?}")
    });
    c.check(before.iter().any(|(_, b)| *b == http_backend), || {
        format!("the closed connection has no entry right after closing: {before:?}")
    });

    // Gone after the close timeout (plus a sweep or two), not before half of it.
    let closed_at = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(CT_TIMEOUT_TCP_CLOSE_SECS / 2));
    c.check(
        tcp_flows(&c).iter().any(|(_, b)| *b == http_backend),
        || "the closed connection's entry went before its timeout".into(),
    );
    let gone = sys::wait_for(
        Duration::from_secs(CT_TIMEOUT_TCP_CLOSE_SECS + 10),
        Duration::from_millis(250),
        || {
            let f = tcp_flows(&c);
            (!f.iter().any(|(_, b)| *b == http_backend)).then_some(f)
        },
    );
    let Some(after) = gone else {
        c.fail(format!(
            "the closed connection's entry outlived the close timeout: {:?}",
            tcp_flows(&c)
        ));
    };
    println!(
        "closed entry gone after {:?}; flows now {after:?}",
        closed_at.elapsed()
    );
    let idle_after: Vec<_> = after
        .iter()
        .filter(|(_, b)| *b == echo_backend)
        .cloned()
        .collect();
    c.check(idle_after == idle, || {
        format!("the idle established flow lost its entry: {idle:?} -> {idle_after:?}")
    });
    // After its idle gap the connection still reaches the same pod over the same entry.
    let second = keep
        .asker
        .wait_line(IDLE_GAP + Duration::from_secs(10), |l| l.seq == 1)
        .unwrap_or_else(|| c.fail("the idle connection sent no second line"));
    println!(
        "idle connection after {IDLE_GAP:?}: {}",
        probe::show(std::slice::from_ref(&second))
    );
    c.check(second.is_ok() && second.pod() == Some("pod-a"), || {
        format!("the idle connection broke: {second:?}")
    });
    c.check(
        tcp_flows(&c)
            .iter()
            .filter(|(_, b)| *b == echo_backend)
            .cloned()
            .collect::<Vec<_>>()
            == idle,
        || "the idle flow's entry changed".into(),
    );
}
