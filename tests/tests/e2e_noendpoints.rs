//! Scenario 6: a service without ready endpoints rejects connections at once (like
//! kube-proxy's REJECT): TCP to the cluster IP from a pod and to the nodePort from an outside
//! client is refused, not left to time out. What UDP clients see is printed (documented),
//! not asserted.

use std::time::Duration;

use kproxy_tests::harness::{
    Cluster, Place, fixtures,
    manifests::{Endpoint, Object, seed},
    probe::{self, show},
    sys,
};

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");
const CIP: &str = "10.96.100.208:8080";
const NODEPORT: &str = "198.18.0.1:30001";

fn write_slices(c: &Cluster, web: Vec<Endpoint>, dns: Vec<Endpoint>) -> u64 {
    let objs: Vec<Object> = vec![seed::mysvc().into(), seed::mysvc_slice(web).into()];
    c.write_manifests("mysvc.yaml", &objs).unwrap();
    let objs: Vec<Object> = vec![seed::dns().into(), seed::dns_slice(dns).into()];
    c.write_manifests("dns.yaml", &objs).unwrap()
}

fn tcp_once(c: &Cluster, place: &Place, target: &str) -> kproxy_tests::harness::AskLine {
    let l = c.ask(
        place,
        &["tcp-ask", target, "--timeout-ms", "2000"],
        Duration::from_secs(10),
    );
    assert_eq!(l.len(), 1, "{l:?}");
    l.into_iter().next().unwrap()
}

fn wait_served(place: &Place, target: &str) {
    let ok = sys::wait_for(Duration::from_secs(5), Duration::from_millis(50), || {
        probe::curl(place, &format!("http://{target}/"), Duration::from_secs(1))
            .unwrap()
            .ok()
            .then_some(())
    });
    assert!(
        ok.is_some(),
        "{} -> {target}: mysvc with endpoints is not served",
        place.label
    );
}

fn assert_refused(c: &Cluster, place: &Place, target: &str, variant: &str) {
    // Wait for the change to be applied: the first refusal.
    let applied = sys::wait_for(Duration::from_secs(5), Duration::from_millis(50), || {
        tcp_once(c, place, target)
            .is_errno("ECONNREFUSED")
            .then_some(())
    });
    assert!(
        applied.is_some(),
        "{variant}: {} -> {target} never got refused: {}",
        place.label,
        tcp_once(c, place, target)
    );
    for _ in 0..5 {
        let l = tcp_once(c, place, target);
        assert!(
            l.is_errno("ECONNREFUSED"),
            "{variant}: {} -> {target} should be refused (ECONNREFUSED): {l}",
            place.label
        );
        let r = probe::curl(place, &format!("http://{target}/"), Duration::from_secs(3)).unwrap();
        assert!(
            r.exit == 7 && r.elapsed < Duration::from_secs(1),
            "{variant}: curl from {} -> {target} should fail at once with exit 7 (refused): {r}",
            place.label
        );
    }
    // UDP: documented, not asserted.
    let udp_target = if target == CIP {
        "10.96.0.10:53"
    } else {
        "198.18.0.1:30053"
    };
    let mut args = vec!["udp-ask", udp_target, "--timeout-ms", "500", "--count", "2"];
    if target == CIP {
        args.push("--connected");
    }
    let l = c.ask(place, &args, Duration::from_secs(10));
    println!(
        "{variant}: UDP {} -> {udp_target} with no endpoints:\n{}",
        place.label,
        show(&l)
    );
}

/// Runs both variants (an empty slice; all endpoints ready: false) for one client.
fn refused_without_endpoints(client: fn(&Cluster) -> Place, target: &str) {
    let mut c = fixtures::one_node(TESTPOD).expect("building the cluster");
    let ready = |c: &Cluster| vec![c.endpoint("pod-a"), c.endpoint("pod-b")];
    write_slices(&c, ready(&c), ready(&c));
    c.start_agent_ready(1).expect("starting the agent");
    let place = client(&c);
    wait_served(&place, target);

    write_slices(&c, vec![], vec![]);
    assert_refused(&c, &place, target, "empty slice");

    // Back to normal, then all endpoints ready: false.
    write_slices(&c, ready(&c), ready(&c));
    wait_served(&place, target);
    let not_ready = |c: &Cluster| {
        vec![
            c.endpoint("pod-a").not_ready(),
            c.endpoint("pod-b").not_ready(),
        ]
    };
    write_slices(&c, not_ready(&c), not_ready(&c));
    assert_refused(&c, &place, target, "all endpoints not ready");
    assert!(c.agent_running(1), "the agent exited");
}

/// From a pod to the cluster IP.
#[test]
fn cluster_ip_without_endpoints_refuses_at_once() {
    refused_without_endpoints(|c| c.pod("pod-z"), CIP);
}

/// From the outside client to node1's nodePort.
#[test]
fn nodeport_without_endpoints_refuses_at_once() {
    refused_without_endpoints(|c| c.client(), NODEPORT);
}
