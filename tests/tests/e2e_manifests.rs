//! Scenarios 8 and 9: what the agent does with its manifests: bad input is reported and
//! skipped, replaced files are applied quickly.

use std::time::{Duration, Instant};

use kproxy_tests::harness::{
    fixtures,
    manifests::{EndpointSlice, Object, Protocol, Service, seed},
    probe::{self, tally},
    sys,
};

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");

const BAD_SYNTAX: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: broken\n  namespace: default\nspec:\n  ports: [ {port: 80, \n    - this is not yaml: [\n";

const BAD_OBJECTS: &str = "\
apiVersion: v1
kind: Frobnicator
metadata:
  name: frob
  namespace: default
spec: {}
---
apiVersion: v1
kind: Service
metadata:
  name: noip
  namespace: default
spec:
  type: ClusterIP
  selector:
    app: noip
  ports:
  - name: http
    protocol: TCP
    port: 8081
    targetPort: 80
---
apiVersion: v1
kind: Service
metadata:
  name: badport
  namespace: default
spec:
  type: NodePort
  clusterIP: 10.96.100.77
  selector:
    app: badport
  ports:
  - name: http
    protocol: TCP
    port: 70000
    targetPort: 80
    nodePort: 99999
";

/// Scenario 8: malformed YAML, an unknown kind, a Service without clusterIP and one with
/// ports out of range, next to a good service: the good one is served, the agent keeps
/// running, and its log names the files and what was wrong.
#[test]
fn bad_manifests_are_reported_and_skipped() {
    let mut c = fixtures::one_node(TESTPOD).expect("building the cluster");
    fixtures::write_seed(&c, &["pod-a", "pod-b"], &["pod-a", "pod-b"]).unwrap();
    c.write_manifest_text("bad-syntax.yaml", BAD_SYNTAX)
        .unwrap();
    c.write_manifest_text("bad-objects.yaml", BAD_OBJECTS)
        .unwrap();
    c.start_agent_ready(1)
        .expect("the agent should start and sync despite bad files");

    let check_served = |c: &kproxy_tests::harness::Cluster, what: &str| {
        let url = format!("http://{}:{}/", c.node_ip(1), seed::MYSVC_NODEPORT);
        let r = probe::curl_n(&c.client(), &url, 6, Duration::from_secs(3)).unwrap();
        assert!(
            r.iter().all(|r| r.ok()),
            "{what}: the good service via nodePort: {:?}",
            r.iter().map(|r| r.to_string()).collect::<Vec<_>>()
        );
        let url = format!("http://{}:{}/", seed::MYSVC_IP, seed::MYSVC_PORT);
        let r = probe::curl_n(&c.pod("pod-z"), &url, 6, Duration::from_secs(3)).unwrap();
        assert!(
            r.iter().all(|r| r.ok()),
            "{what}: the good service via cluster IP: {:?}",
            r.iter().map(|r| r.to_string()).collect::<Vec<_>>()
        );
    };
    check_served(&c, "with bad files at start");

    // A bad file appearing while running.
    c.write_manifest_text("bad-later.yaml", "kind: [unclosed\n  - {\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        c.agent_running(1),
        "the agent exited after a bad file appeared"
    );
    check_served(&c, "after a bad file appeared");
    assert_eq!(c.healthz(1), 200, "the agent should stay healthy");

    let log = c.agent_log(1);
    // An unknown kind is not an error (manifest dirs hold Deployments, ConfigMaps, ...): the
    // agent may mention it only at debug level, so it is reported here, not required.
    println!(
        "unknown kind mentioned in the log: {}",
        log.contains("Frobnicator")
    );
    let mut missing = Vec::new();
    // The files, the objects, and the reasons (the missing clusterIP, the bad port).
    for needle in [
        "bad-syntax.yaml",
        "bad-objects.yaml",
        "bad-later.yaml",
        "noip",
        "clusterIP",
        "badport",
        "70000",
    ] {
        if !log.contains(needle) {
            missing.push(needle);
        }
    }
    assert!(
        missing.is_empty(),
        "the agent's log should name the bad files and reasons; missing {missing:?}\n---- log ----\n{log}"
    );
}

/// Scenario 9: a manifest file replaced by rename (port 8080 -> 9090, targetPort 80 -> 8081,
/// nodePort 30001 -> 30002) is applied within a second or two, and the old ports go.
#[test]
fn renamed_manifest_changes_ports_quickly() {
    let mut c = fixtures::one_node(TESTPOD).expect("building the cluster");
    fixtures::write_seed(&c, &["pod-a", "pod-b"], &["pod-a", "pod-b"]).unwrap();
    c.start_agent_ready(1).expect("starting the agent");
    let r = c.curl(&c.client(), "http://198.18.0.1:30001/");
    assert!(r.ok(), "before the change: {r}");

    let svc = Service::node_port("mysvc", seed::MYSVC_IP)
        .selector("web")
        .port("http", Protocol::Tcp, 9090, 8081, Some(30002));
    let slice = EndpointSlice::for_service("mysvc")
        .port("http", Protocol::Tcp, 8081)
        .endpoints([c.endpoint("pod-a"), c.endpoint("pod-b")]);
    let objs: Vec<Object> = vec![svc.into(), slice.into()];
    let t0 = c.write_manifests("mysvc.yaml", &objs).unwrap();
    let start = Instant::now();
    let pod_z = c.pod("pod-z");
    let mut answered = None;
    while start.elapsed() < Duration::from_secs(5) {
        let r = probe::curl(
            &pod_z,
            "http://10.96.100.208:9090/",
            Duration::from_millis(500),
        )
        .unwrap();
        if r.pod().is_some_and(|p| p.ends_with(":8081")) {
            answered = Some(sys::epoch_ms());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let Some(t1) = answered else {
        panic!("10.96.100.208:9090 was not served within 5 s of the rename")
    };
    println!("rename -> first answer on the new port: {} ms", t1 - t0);
    assert!(
        t1 - t0 <= 2000,
        "the change took {} ms (want <= 2 s)",
        t1 - t0
    );

    let results = probe::curl_n(
        &c.client(),
        "http://198.18.0.1:30002/",
        12,
        Duration::from_secs(3),
    )
    .unwrap();
    let t = tally(&results);
    println!("client -> node1:30002: {t:?}");
    assert!(
        results.iter().all(|r| r.ok()),
        "new nodePort: {:?}",
        results.iter().map(|r| r.to_string()).collect::<Vec<_>>()
    );
    assert!(
        t.keys().all(|k| k == "pod-a:8081" || k == "pod-b:8081"),
        "answers must come from the new targetPort: {t:?}"
    );

    let r = c.curl(&c.client(), "http://198.18.0.1:30001/");
    assert!(
        !r.ok(),
        "the old nodePort 30001 must no longer be served: {r}"
    );
    let r = probe::curl(&pod_z, "http://10.96.100.208:8080/", Duration::from_secs(2)).unwrap();
    assert!(!r.ok(), "the old port 8080 must no longer be served: {r}");
}
