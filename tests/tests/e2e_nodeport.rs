//! Scenarios 1 and 3: nodePort from an outside client, cluster IP and nodePort from a host
//! process on the node.

use std::time::Duration;

use kproxy_tests::harness::{
    Cluster, fixtures,
    manifests::seed,
    probe::{self, CurlResult, tally},
};

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");

fn seeded() -> Cluster {
    let mut c = fixtures::one_node(TESTPOD).expect("building the cluster");
    fixtures::write_seed(&c, &["pod-a", "pod-b"], &["pod-a", "pod-b"]).expect("writing manifests");
    c.start_agent_ready(1).expect("starting the agent");
    c
}

fn assert_both_pods(results: &[CurlResult], what: &str) {
    let t = tally(results);
    let failed: Vec<String> = results
        .iter()
        .filter(|r| !r.ok())
        .map(|r| r.to_string())
        .collect();
    assert!(
        failed.is_empty(),
        "{what}: {} of {} requests failed: {failed:#?}",
        failed.len(),
        results.len()
    );
    assert!(
        t.get("pod-a").copied().unwrap_or(0) > 0
            && t.get("pod-b").copied().unwrap_or(0) > 0
            && t.len() == 2,
        "{what}: expected answers from exactly pod-a and pod-b, got {t:?}"
    );
}

/// Scenario 1: an outside client reaches node1:30001, both pods answer, and the pods see the
/// client's own address (a local endpoint needs no SNAT).
#[test]
fn outside_client_reaches_nodeport_without_snat() {
    let c = seeded();
    let url = format!("http://{}:{}/", c.node_ip(1), seed::MYSVC_NODEPORT);
    let results = probe::curl_n(&c.client(), &url, 20, Duration::from_secs(3)).unwrap();
    println!("client -> {url}: {:?}", tally(&results));
    assert_both_pods(&results, "client -> node1:30001");
    for r in &results {
        assert_eq!(
            r.seen_source(),
            Some("198.18.0.100"),
            "the pod should see the client's IP: {r}"
        );
    }
}

/// Scenario 3: a host process on node1 reaches the cluster IP and node1's IP:30001.
#[test]
fn host_process_reaches_cluster_ip_and_nodeport() {
    let c = seeded();
    let node = c.node(1);
    let url = format!("http://{}:{}/", seed::MYSVC_IP, seed::MYSVC_PORT);
    let results = probe::curl_n(&node, &url, 16, Duration::from_secs(3)).unwrap();
    println!("node1 -> {url}: {:?}", tally(&results));
    assert_both_pods(&results, "node1 host process -> cluster IP");
    for r in &results {
        assert_eq!(
            r.seen_source(),
            Some("198.18.0.1"),
            "the pod should see the node's IP: {r}"
        );
    }

    let url = format!("http://{}:{}/", c.node_ip(1), seed::MYSVC_NODEPORT);
    let results = probe::curl_n(&node, &url, 16, Duration::from_secs(3)).unwrap();
    println!("node1 -> {url}: {:?}", tally(&results));
    assert_both_pods(&results, "node1 host process -> node1:30001");
}
