//! A full service map, end to end (issue 5): with `--lb-map-max 16` the services map holds
//! 16 entries (a ClusterIP frontend with one endpoint takes two). Services that do not fit
//! are refused by name in the log and counted in `kproxy_frontends_rejected`; every Service
//! already serving keeps serving (even when a newcomer sorts before it); the agent stays
//! healthy; and the refused ones are programmed as soon as room is freed.

use std::{collections::BTreeMap, time::Duration};

use kproxy_tests::harness::{
    Cluster, fixtures,
    manifests::{EndpointSlice, Object, Protocol, Service},
    probe, sys,
};

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");
const MAP_MAX: &str = "16";
const PODS: [&str; 3] = ["pod-a", "pod-b", "pod-c"];

/// A ClusterIP service `name` on `ip:80` with `pod` as its one endpoint.
fn one_pod_service(c: &Cluster, name: &str, ip: &str, pod: &str) -> [Object; 2] {
    [
        Service::cluster_ip(name, ip)
            .port("http", Protocol::Tcp, 80, 80, None)
            .into(),
        EndpointSlice::for_service(name)
            .port("http", Protocol::Tcp, 80)
            .endpoint(c.endpoint(pod))
            .into(),
    ]
}

/// (name, cluster IP, pod) for `count` services named `<prefix>N` on `<net>.N`.
fn services(prefix: &str, net: &str, count: usize) -> Vec<(String, String, &'static str)> {
    (1..=count)
        .map(|i| {
            (
                format!("{prefix}{i}"),
                format!("{net}.{i}"),
                PODS[i % PODS.len()],
            )
        })
        .collect()
}

fn write(c: &Cluster, file: &str, svcs: &[(String, String, &'static str)]) {
    let objs: Vec<Object> = svcs
        .iter()
        .flat_map(|(name, ip, pod)| one_pod_service(c, name, ip, pod))
        .collect();
    c.write_manifests(file, &objs).unwrap();
}

/// Which pod answered `ip:80` from the client pod (None: no answer within a second).
fn answer(c: &Cluster, ip: &str) -> Option<String> {
    let r = probe::curl(
        &c.pod(fixtures::CLIENT_POD),
        &format!("http://{ip}/"),
        Duration::from_secs(1),
    )
    .unwrap();
    r.pod().map(str::to_string)
}

fn scrape(c: &Cluster) -> BTreeMap<String, f64> {
    c.metrics(1)
}

fn rejected(c: &Cluster) -> Option<f64> {
    scrape(c).get("kproxy_frontends_rejected").copied()
}

fn assert_all_answer(c: &Cluster, svcs: &[(String, String, &'static str)], when: &str) {
    for (name, ip, pod) in svcs {
        assert_eq!(
            answer(c, ip).as_deref(),
            Some(*pod),
            "{when}: {name} ({ip}) should be answered by {pod}"
        );
    }
}

#[test]
fn a_full_service_map_refuses_newcomers_by_name_and_keeps_what_serves() {
    let mut c = fixtures::one_node(TESTPOD).expect("building the cluster");
    // Five services (10 entries) serving first.
    let first = services("first-", "10.96.50", 5);
    write(&c, "first.yaml", &first);
    c.start_agent_with(1, &["--lb-map-max", MAP_MAX]).unwrap();
    c.wait_healthy(1, Duration::from_secs(60)).unwrap();
    assert_all_answer(&c, &first, "before the map filled up");

    // Six newcomers (12 entries) whose cluster IPs sort before the serving ones: three fit.
    let newcomers = services("newcomer-", "10.96.10", 6);
    write(&c, "newcomers.yaml", &newcomers);
    let settled = sys::wait_for(Duration::from_secs(20), Duration::from_millis(100), || {
        (rejected(&c) == Some(3.0)).then_some(())
    });
    let log = c.agent_log(1);
    assert!(
        settled.is_some(),
        "kproxy_frontends_rejected never reached 3 (now {:?}); log:\n{log}",
        rejected(&c)
    );
    assert_all_answer(&c, &first, "after newcomers overflowed the map");
    let (served, refused): (Vec<_>, Vec<_>) = newcomers
        .iter()
        .partition(|(_, ip, _)| answer(&c, ip).is_some());
    println!(
        "served: {:?}, refused: {:?}",
        served.iter().map(|s| &s.0).collect::<Vec<_>>(),
        refused.iter().map(|s| &s.0).collect::<Vec<_>>()
    );
    assert_eq!(served.len(), 3, "three newcomers fit in the room left");
    for (name, ip, _) in &refused {
        let named = log.lines().any(|l| {
            l.contains(&format!(
                "service default/{name}:http/TCP frontend {ip}:80/TCP"
            )) && l.contains("not programmed: map KP_LB4_SVC_V1 is full (16 entries)")
        });
        assert!(
            named,
            "no error naming {name} ({ip}) and the full map:\n{log}"
        );
    }
    for (name, _, _) in &served {
        assert!(
            !log.contains(&format!("service default/{name}:http/TCP frontend")),
            "{name} is served but was reported as refused"
        );
    }
    let pressure = scrape(&c)
        .get("kproxy_bpf_map_pressure{map=\"KP_LB4_SVC_V1\"}")
        .copied();
    assert_eq!(pressure, Some(1.0), "the services map is full");
    c.wait_healthy(1, Duration::from_secs(5))
        .expect("the agent stays healthy with a full map");

    // Three of the first services go: the refused newcomers are programmed.
    write(&c, "first.yaml", &first[..2]);
    let room = sys::wait_for(Duration::from_secs(20), Duration::from_millis(100), || {
        (rejected(&c) == Some(0.0)).then_some(())
    });
    assert!(
        room.is_some(),
        "refused frontends were not programmed once room was freed: {:?}",
        rejected(&c)
    );
    assert_all_answer(&c, &newcomers, "after room was freed");
    assert_all_answer(&c, &first[..2], "the first services that stayed");
    for (name, ip, _) in &first[2..] {
        assert_eq!(answer(&c, ip), None, "{name} was deleted but still answers");
    }
}
