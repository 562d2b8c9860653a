//! Scenario 7: two nodes, each with its own agent (own bpf root and cgroup). A nodePort
//! service whose only endpoint is on node2 is reached through node1: node1 forwards to
//! node2's pod with node1's IP as the source (SNAT), and both agents serve side by side.

use std::time::Duration;

use kproxy_tests::harness::{
    Cluster, PodSpec,
    manifests::{EndpointSlice, Object, Protocol, Service, seed},
    probe::{self, CurlResult, tally},
};

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");

fn all_ok(results: &[CurlResult], what: &str) {
    let failed: Vec<String> = results
        .iter()
        .filter(|r| !r.ok())
        .map(|r| r.to_string())
        .collect();
    assert!(
        failed.is_empty(),
        "{what}: {} of {} failed: {failed:#?}",
        failed.len(),
        results.len()
    );
}

fn curls(
    c: &Cluster,
    place: &kproxy_tests::harness::Place,
    url: &str,
    n: usize,
) -> Vec<CurlResult> {
    let r = probe::curl_n(place, url, n, Duration::from_secs(3)).unwrap();
    println!("{} -> {url}: {:?}", place.label, tally(&r));
    let _ = c;
    r
}

#[test]
fn nodeport_to_a_pod_on_another_node() {
    let mut c = Cluster::builder()
        .nodes(2)
        .testpod(TESTPOD)
        .pod(PodSpec::new("pod-a", 1))
        .pod(PodSpec::new("pod-b", 1))
        .pod(PodSpec::new("pod-z", 1).http_ports(&[]))
        .pod(PodSpec::new("pod-r", 2))
        .build()
        .expect("building the cluster");
    let remote = Service::node_port("remote", "10.96.100.50").port(
        "http",
        Protocol::Tcp,
        8080,
        80,
        Some(30002),
    );
    let remote_slice = EndpointSlice::for_service("remote")
        .port("http", Protocol::Tcp, 80)
        .endpoint(c.endpoint("pod-r"));
    let objs: Vec<Object> = vec![
        seed::mysvc().into(),
        seed::mysvc_slice([c.endpoint("pod-a"), c.endpoint("pod-b")]).into(),
        remote.into(),
        remote_slice.into(),
    ];
    c.write_manifests("services.yaml", &objs).unwrap();
    c.start_agent(1).unwrap();
    c.start_agent(2).unwrap();
    c.wait_healthy(1, Duration::from_secs(30))
        .expect("node1's agent");
    c.wait_healthy(2, Duration::from_secs(30))
        .expect("node2's agent");

    let client = c.client();
    // Through node1 to node2's pod: the pod sees node1's IP.
    let r = curls(&c, &client, "http://198.18.0.1:30002/", 10);
    all_ok(&r, "client -> node1:30002 (endpoint on node2)");
    for x in &r {
        assert_eq!(
            x.body.trim(),
            "pod-r 198.18.0.1",
            "node2's pod should answer and see node1's IP (SNAT)"
        );
    }
    // node2 serves its own nodePort to its local pod without SNAT.
    let r = curls(&c, &client, "http://198.18.0.2:30002/", 6);
    all_ok(&r, "client -> node2:30002");
    for x in &r {
        assert_eq!(
            x.body.trim(),
            "pod-r 198.18.0.100",
            "a local endpoint sees the client's IP"
        );
    }
    // node1's local service still keeps the client's IP.
    let r = curls(&c, &client, "http://198.18.0.1:30001/", 10);
    all_ok(&r, "client -> node1:30001");
    assert!(
        r.iter().all(|x| x.seen_source() == Some("198.18.0.100")),
        "local endpoints see the client"
    );
    // node2 forwards mysvc to node1's pods with its own IP.
    let r = curls(&c, &client, "http://198.18.0.2:30001/", 10);
    all_ok(&r, "client -> node2:30001 (endpoints on node1)");
    assert!(
        r.iter().all(|x| x.seen_source() == Some("198.18.0.2")),
        "remote endpoints see node2's IP"
    );
    // A pod on node1 reaches the remote service's cluster IP; the pod IP is kept.
    let r = curls(&c, &c.pod("pod-z"), "http://10.96.100.50:8080/", 4);
    all_ok(&r, "pod-z -> 10.96.100.50:8080");
    let z = c.pod_ip("pod-z").to_string();
    assert!(
        r.iter().all(|x| x.seen_source() == Some(z.as_str())),
        "pod-r should see pod-z's IP"
    );

    // Stopping node2's agent does not disturb node1's.
    let code = c.stop_agent(2);
    println!("node2's agent exited with {code:?}");
    assert!(c.agent_running(1), "node1's agent exited");
    let r = curls(&c, &client, "http://198.18.0.1:30002/", 6);
    all_ok(&r, "client -> node1:30002 after node2's agent stopped");
    let r = curls(&c, &client, "http://198.18.0.1:30001/", 6);
    all_ok(&r, "client -> node1:30001 after node2's agent stopped");
    assert_eq!(c.healthz(1), 200);
}
