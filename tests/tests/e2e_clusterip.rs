//! Scenario 2: a pod reaches the cluster IP; both pods answer, itself included (hairpin),
//! and the backends see the pod's own IP.

use std::time::Duration;

use kproxy_tests::harness::{
    fixtures,
    manifests::seed,
    probe::{self, tally},
};

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");

#[test]
fn pod_reaches_cluster_ip_including_itself() {
    let mut c = fixtures::one_node(TESTPOD).expect("building the cluster");
    fixtures::write_seed(&c, &["pod-a", "pod-b"], &["pod-a", "pod-b"]).unwrap();
    c.start_agent_ready(1).expect("starting the agent");

    let pod_a = c.pod("pod-a");
    let url = format!("http://{}:{}/", seed::MYSVC_IP, seed::MYSVC_PORT);
    let results = probe::curl_n(&pod_a, &url, 20, Duration::from_secs(3)).unwrap();
    let t = tally(&results);
    println!("pod-a -> {url}: {t:?}");
    let failed: Vec<String> = results
        .iter()
        .filter(|r| !r.ok())
        .map(|r| r.to_string())
        .collect();
    assert!(failed.is_empty(), "requests failed: {failed:#?}");
    assert!(
        t.contains_key("pod-a"),
        "pod-a never reached itself through the service (hairpin): {t:?}"
    );
    assert!(t.contains_key("pod-b"), "pod-b never answered: {t:?}");
    assert_eq!(t.len(), 2, "only pod-a and pod-b are endpoints: {t:?}");
    for r in &results {
        assert_eq!(
            r.seen_source(),
            Some("10.244.1.10"),
            "the backend should see pod-a's IP (no SNAT): {r}"
        );
    }

    // The application sees the service as its peer (getpeername), not the pod it reached.
    let lines = c.ask(
        &pod_a,
        &[
            "tcp-ask",
            &format!("{}:{}", seed::MYSVC_IP, seed::MYSVC_PORT),
            "--http",
            "--count",
            "4",
        ],
        Duration::from_secs(20),
    );
    assert_eq!(lines.len(), 4, "{lines:?}");
    for l in &lines {
        assert!(l.is_ok(), "tcp-ask from pod-a failed: {l}");
        assert!(
            matches!(&l.outcome, kproxy_tests::harness::Outcome::Ok { peer, .. } if peer == "10.96.100.208:8080"),
            "getpeername() should return the cluster IP: {l}"
        );
    }

    // The node's own nodePort from a pod.
    let url = format!("http://{}:{}/", c.node_ip(1), seed::MYSVC_NODEPORT);
    let results = probe::curl_n(&c.pod("pod-z"), &url, 8, Duration::from_secs(3)).unwrap();
    println!("pod-z -> {url}: {:?}", tally(&results));
    assert!(
        results.iter().all(|r| r.ok()),
        "pod-z -> node1:30001: {:?}",
        results.iter().map(|r| r.to_string()).collect::<Vec<_>>()
    );
}
