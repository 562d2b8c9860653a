//! Scenario 5: UDP. The DNS-like service `dns` (10.96.0.10:53/UDP -> 5353, nodePort 30053)
//! via the cluster IP from a pod and via the nodePort from an outside client; and stale UDP
//! flows: a connected client in a pod and a fixed-source-port client outside keep querying
//! while the backend they use is removed from the slice and then stopped. They must move to
//! the remaining backend quickly and never be blackholed.

use std::time::Duration;

use kproxy_tests::harness::{
    AskLine, Cluster, Outcome, Place, fixtures,
    probe::{Asker, show},
    sys,
};

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");

fn seeded() -> Cluster {
    let mut c = fixtures::one_node(TESTPOD).expect("building the cluster");
    fixtures::write_seed(&c, &["pod-a", "pod-b"], &["pod-a", "pod-b"]).unwrap();
    c.start_agent_ready(1).expect("starting the agent");
    c
}

fn peer(l: &AskLine) -> &str {
    match &l.outcome {
        Outcome::Ok { peer, .. } => peer,
        _ => "",
    }
}

/// `n` single queries, each from a new socket (so each may pick another backend).
fn single_queries(c: &Cluster, place: &Place, target: &str, n: usize) -> Vec<AskLine> {
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

#[test]
fn udp_via_cluster_ip_and_nodeport() {
    let c = seeded();
    let pod_z_ip = c.pod_ip("pod-z").to_string();

    // From a pod via the cluster IP: answers appear to come from the service address.
    let lines = single_queries(&c, &c.pod("pod-z"), "10.96.0.10:53", 12);
    let all = show(&lines);
    assert_eq!(lines.len(), 12, "{all}");
    for l in &lines {
        assert!(l.is_ok(), "pod-z -> 10.96.0.10:53 unanswered:\n{all}");
        assert_eq!(
            peer(l),
            "10.96.0.10:53",
            "the reply must appear to come from the service:\n{all}"
        );
        assert!(
            l.seen_source()
                .unwrap_or("")
                .starts_with(&format!("{pod_z_ip}:")),
            "the backend should see pod-z's IP:\n{all}"
        );
    }
    assert!(
        lines.iter().any(|l| l.pod() == Some("pod-a"))
            && lines.iter().any(|l| l.pod() == Some("pod-b")),
        "both backends should answer:\n{all}"
    );

    // A connected socket keeps one backend.
    let lines = c.ask(
        &c.pod("pod-z"),
        &[
            "udp-ask",
            "10.96.0.10:53",
            "--connected",
            "--count",
            "5",
            "--interval-ms",
            "20",
        ],
        Duration::from_secs(10),
    );
    let all = show(&lines);
    assert!(
        lines.len() == 5
            && lines
                .iter()
                .all(|l| l.is_ok() && peer(l) == "10.96.0.10:53"),
        "{all}"
    );
    assert!(
        lines.iter().all(|l| l.pod() == lines[0].pod()),
        "a connected socket should stay on one backend:\n{all}"
    );

    // From outside via the nodePort: replies come from node1:30053, the pod sees the client.
    let lines = single_queries(&c, &c.client(), "198.18.0.1:30053", 12);
    let all = show(&lines);
    assert_eq!(lines.len(), 12, "{all}");
    for l in &lines {
        assert!(l.is_ok(), "client -> 198.18.0.1:30053 unanswered:\n{all}");
        assert_eq!(
            peer(l),
            "198.18.0.1:30053",
            "the reply must come from the nodePort:\n{all}"
        );
        assert!(
            l.seen_source().unwrap_or("").starts_with("198.18.0.100:"),
            "the backend should see the client's IP:\n{all}"
        );
    }
    assert!(
        lines.iter().any(|l| l.pod() == Some("pod-a"))
            && lines.iter().any(|l| l.pod() == Some("pod-b")),
        "both backends should answer:\n{all}"
    );
}

/// Removes the backend `asker` uses from the dns slice, waits until fresh clients no longer
/// get it, stops its udp-serve, and checks the asker's timeline.
fn remove_used_backend(
    mut c: Cluster,
    asker: Asker,
    fresh: &Place,
    target: &str,
    connected: bool,
    label: &str,
) {
    let Some(first) = asker.wait_line(Duration::from_secs(5), |l| l.is_ok()) else {
        panic!("{label}: no answer at all:\n{}", show(&asker.peek()));
    };
    let used = first.pod().unwrap().to_string();
    let other = if used == "pod-a" { "pod-b" } else { "pod-a" };
    // Let it run on `used` for a bit.
    std::thread::sleep(Duration::from_millis(300));

    // 1. The endpoint goes from the slice (like a pod being deleted)...
    let t_rename = fixtures::write_dns(&c, &[other]).unwrap();
    // ...and the change is applied: fresh sockets only get the remaining backend.
    let mut streak = 0;
    let applied = sys::wait_for(Duration::from_secs(5), Duration::from_millis(20), || {
        let l = c.ask(
            fresh,
            &["udp-ask", target, "--timeout-ms", "500"],
            Duration::from_secs(5),
        );
        streak = if l.len() == 1 && l[0].pod() == Some(other) {
            streak + 1
        } else {
            0
        };
        (streak >= 5).then(sys::epoch_ms)
    });
    let Some(t_applied) = applied else {
        panic!("{label}: fresh queries still reach {used} 5 s after the slice change")
    };
    // 2. ...then the old backend's process is gone.
    let t_stop = sys::epoch_ms();
    c.stop_udp_serve(&used).unwrap();
    println!(
        "{label}: using {used}; slice renamed at {t_rename}, applied by {t_applied} (+{} ms), {used}'s server stopped at {t_stop}",
        t_applied - t_rename
    );

    let lines = asker.finish(Duration::from_secs(60)).expect(label);
    let all = show(&lines);
    // A query sent just before the stop may be lost with the server (not the proxy's fault).
    let judged: Vec<&AskLine> = lines
        .iter()
        .filter(|l| l.ts_ms >= t_rename && !(l.ts_ms + 350 > t_stop && l.ts_ms < t_stop))
        .collect();
    let errors = judged
        .iter()
        .filter(|l| matches!(l.outcome, Outcome::Error { .. }))
        .count();
    let timeouts = judged
        .iter()
        .filter(|l| l.outcome == Outcome::Timeout)
        .count();
    let late: Vec<&&AskLine> = judged.iter().filter(|l| l.ts_ms >= t_stop + 1000).collect();
    let first_other = lines
        .iter()
        .find(|l| l.ts_ms >= t_stop && l.pod() == Some(other))
        .map(|l| l.ts_ms as i64 - t_stop as i64);
    println!(
        "{label}: after the rename: {errors} errors, {timeouts} timeouts; first answer by {other} {first_other:?} ms after the stop"
    );
    let max_errors = if connected { 1 } else { 0 };
    assert!(
        errors <= max_errors,
        "{label}: {errors} errors after the rename (want <= {max_errors}):\n{all}"
    );
    assert!(
        timeouts <= 1,
        "{label}: {timeouts} unanswered queries after the rename (a blackhole):\n{all}"
    );
    assert!(
        late.len() >= 10,
        "{label}: the client stopped too early:\n{all}"
    );
    assert!(
        late.iter().all(|l| l.pod() == Some(other)),
        "{label}: 1 s after {used} stopped every query must be answered by {other}:\n{all}"
    );
    assert!(c.agent_running(1), "the agent exited");
}

/// A connected UDP socket in a pod (like a DNS client) moves to the remaining backend after at
/// most one error.
#[test]
fn connected_udp_client_moves_off_removed_backend() {
    let c = seeded();
    let pod_z = c.pod("pod-z");
    let asker = c.ask_start(
        &pod_z,
        &[
            "udp-ask",
            "10.96.0.10:53",
            "--connected",
            "--count",
            "140",
            "--interval-ms",
            "50",
            "--timeout-ms",
            "300",
        ],
    );
    remove_used_backend(
        c,
        asker,
        &pod_z,
        "10.96.0.10:53",
        true,
        "connected pod-z -> 10.96.0.10:53",
    );
}

/// An outside client with a fixed source port (one 5-tuple for every query) moves to the
/// remaining backend: no stale flow entry blackholes it.
#[test]
fn fixed_port_outside_udp_client_moves_off_removed_backend() {
    let c = seeded();
    let client = c.client();
    let asker = c.ask_start(
        &client,
        &[
            "udp-ask",
            "198.18.0.1:30053",
            "--sport",
            "40000",
            "--count",
            "140",
            "--interval-ms",
            "50",
            "--timeout-ms",
            "300",
        ],
    );
    if let Some(l) = asker.wait_line(Duration::from_secs(5), |l| l.is_ok()) {
        assert_eq!(
            l.seen_source(),
            Some("198.18.0.100:40000"),
            "the backend should see the client's address and port: {l}"
        );
    }
    remove_used_backend(
        c,
        asker,
        &client,
        "198.18.0.1:30053",
        false,
        "client :40000 -> 198.18.0.1:30053",
    );
}
