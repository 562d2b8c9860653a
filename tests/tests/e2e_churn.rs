//! Scenario 4: endpoint churn under load. While clients keep requesting (an outside client
//! via the nodePort, a pod via the cluster IP), pod-b is killed and the EndpointSlice is
//! rewritten with pod-c instead of pod-b. Once the change is seen (the first pod-c answer)
//! no request may fail or reach pod-b, and pod-c must get traffic.

use std::time::Duration;

use kproxy_tests::harness::{
    AskLine, fixtures,
    manifests::seed,
    probe::{Asker, show},
};

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");

fn tcp_asker(
    c: &kproxy_tests::harness::Cluster,
    place: &kproxy_tests::harness::Place,
    target: &str,
) -> Asker {
    // 100 requests, one every 50 ms (5 s), each a new connection.
    c.ask_start(
        place,
        &[
            "tcp-ask",
            target,
            "--http",
            "--count",
            "100",
            "--interval-ms",
            "50",
            "--timeout-ms",
            "1000",
        ],
    )
}

/// Checks one client's timeline; returns a summary line.
fn check_timeline(label: &str, lines: &[AskLine], t_rename: u64, t_kill: u64) -> String {
    let timeline = show(lines);
    assert!(
        lines.len() >= 90,
        "{label}: expected ~100 results, got {}:\n{timeline}",
        lines.len()
    );
    let before: Vec<&AskLine> = lines.iter().filter(|l| l.ts_ms < t_kill).collect();
    assert!(
        before
            .iter()
            .all(|l| matches!(l.pod(), Some("pod-a" | "pod-b"))),
        "{label}: before the change only pod-a and pod-b should answer:\n{timeline}"
    );
    let Some(first_c) = lines.iter().find(|l| l.pod() == Some("pod-c")) else {
        panic!(
            "{label}: pod-c never answered after the slice was rewritten at {t_rename}:\n{timeline}"
        );
    };
    let latency = first_c.ts_ms as i64 - t_rename as i64;
    let after: Vec<&AskLine> = lines.iter().filter(|l| l.ts_ms >= first_c.ts_ms).collect();
    let failed_after: Vec<String> = after
        .iter()
        .filter(|l| !l.is_ok())
        .map(|l| l.to_string())
        .collect();
    let b_after = after.iter().filter(|l| l.pod() == Some("pod-b")).count();
    let window_failures = lines
        .iter()
        .filter(|l| l.ts_ms >= t_kill && l.ts_ms < first_c.ts_ms && !l.is_ok())
        .count();
    let summary = format!(
        "{label}: rename -> first pod-c answer {latency} ms; {window_failures} failed requests between the kill and \
         then; after it: {} requests, {} failed, {} answered by pod-b, {} by pod-a, {} by pod-c",
        after.len(),
        failed_after.len(),
        b_after,
        after.iter().filter(|l| l.pod() == Some("pod-a")).count(),
        after.iter().filter(|l| l.pod() == Some("pod-c")).count(),
    );
    println!("{summary}");
    assert!(
        latency <= 2000,
        "{label}: the change took {latency} ms to be seen (want <= 2 s):\n{timeline}"
    );
    assert!(
        failed_after.is_empty() && b_after == 0,
        "{summary}\nfailures after the change: {failed_after:#?}\n{timeline}"
    );
    assert!(
        after.iter().any(|l| l.pod() == Some("pod-a")),
        "{summary}\n{timeline}"
    );
    summary
}

#[test]
fn killed_pod_is_replaced_under_load() {
    let mut c = fixtures::one_node(TESTPOD).expect("building the cluster");
    fixtures::write_seed(&c, &["pod-a", "pod-b"], &["pod-a", "pod-b"]).unwrap();
    c.start_agent_ready(1).expect("starting the agent");

    let outside = tcp_asker(
        &c,
        &c.client(),
        &format!("{}:{}", c.node_ip(1), seed::MYSVC_NODEPORT),
    );
    let inside = tcp_asker(
        &c,
        &c.pod("pod-z"),
        &format!("{}:{}", seed::MYSVC_IP, seed::MYSVC_PORT),
    );
    // Let both run against pod-a/pod-b for a while.
    let warm = |a: &Asker| {
        a.wait_line(Duration::from_secs(5), |l| l.seq >= 15)
            .is_some()
    };
    assert!(
        warm(&outside) && warm(&inside),
        "the clients did not start:\n{}{}",
        show(&outside.peek()),
        show(&inside.peek())
    );

    let t_kill = kproxy_tests::harness::sys::epoch_ms();
    c.kill_pod("pod-b").unwrap();
    let t_rename = fixtures::write_mysvc(&c, &["pod-a", "pod-c"]).unwrap();
    println!("pod-b killed at {t_kill}, slice renamed at {t_rename}");

    let outside = outside
        .finish(Duration::from_secs(60))
        .expect("outside client");
    let inside = inside.finish(Duration::from_secs(60)).expect("pod client");
    check_timeline("client -> node1:30001", &outside, t_rename, t_kill);
    check_timeline("pod-z -> 10.96.100.208:8080", &inside, t_rename, t_kill);
    assert!(c.agent_running(1), "the agent exited");
}
