//! Hostile and malformed Kubernetes objects through `--manifests` (issue 5): each bad object
//! gets a clear error naming it and the reason, everything else is served, and nothing
//! already programmed is lost.
//!
//! - One EndpointSlice with 10,000 endpoints: programmed (the time it took is printed) and
//!   served through the cluster IP and the nodePort. The 10,000 addresses all live in pod-a
//!   (a local route for a /18 in its namespace, and an HTTP server there bound to any
//!   address), so every backend the dataplane picks answers.
//! - A file of bad objects next to good ones: a duplicate nodePort (the Service already
//!   serving it keeps it, the error names both), an invalid endpoint IP, an invalid clusterIP,
//!   ports 0 and 65536, an unknown protocol, an unknown kind and a malformed YAML document.
//! - A served Service edited into an invalid one keeps being served (its last good version)
//!   until the file is fixed.

use std::{
    thread,
    time::{Duration, Instant},
};

use kproxy_tests::harness::{
    Cluster, fixtures, kproxy_bin,
    manifests::{Endpoint, EndpointSlice, Object, Protocol, Service, seed},
    probe::{self, tally},
};

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");

const BIG_IP: &str = "10.96.70.70";
const BIG_NODEPORT: u16 = 30070;
const BIG_ENDPOINTS: u32 = 10_000;
/// The block pod-a answers for, besides its own address.
const BIG_BLOCK: &str = "10.245.0.0/18";
/// The port of the server answering on the whole block (nginx binds pod-a's own address).
const BIG_TARGET_PORT: u16 = 8090;

/// Addresses 10.245.0.1 .. for the big slice.
fn big_endpoint_ip(i: u32) -> String {
    let n = 1 + i;
    format!("10.245.{}.{}", n / 256, n % 256)
}

/// Makes pod-a answer `big-server` on port `BIG_TARGET_PORT` of every address of `BIG_BLOCK`:
/// a local route in its namespace, a route to its veth on the node, and a Python HTTP server
/// bound to any address.
fn pod_a_answers_for_the_block(c: &mut Cluster) {
    let node = c.node(1);
    let out = node
        .output(&["ip", "-o", "route", "get", &c.pod_ip("pod-a").to_string()])
        .unwrap();
    let route = String::from_utf8_lossy(&out.stdout).into_owned();
    let dev = route
        .split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)
        .unwrap_or_else(|| panic!("no device in {route:?}"))
        .to_owned();
    for (place, argv) in [
        (
            &node,
            vec!["ip", "route", "add", BIG_BLOCK, "dev", dev.as_str()],
        ),
        (
            &c.pod("pod-a"),
            vec!["ip", "route", "add", "local", BIG_BLOCK, "dev", "lo"],
        ),
    ] {
        let out = place.output(&argv).unwrap();
        assert!(
            out.status.success(),
            "{argv:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let www = c.tmp_dir().join("big-www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "big-server\n").unwrap();
    let port = BIG_TARGET_PORT.to_string();
    let pod_a = c.pod("pod-a");
    c.spawn(
        &pod_a,
        "big-server",
        &[
            "python3",
            "-m",
            "http.server",
            &port,
            "--bind",
            "0.0.0.0",
            "--directory",
            www.to_str().unwrap(),
        ],
    )
    .unwrap();
    let probe_url = format!("http://{}:{port}/", big_endpoint_ip(0));
    let up = kproxy_tests::harness::sys::wait_for(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || {
            probe::curl(&pod_a, &probe_url, Duration::from_secs(1))
                .ok()
                .filter(|r| r.pod() == Some("big-server"))
        },
    );
    assert!(up.is_some(), "the block's server in pod-a does not answer");
}

/// `kproxy list services -o json` on node 1, parsed.
fn list_services(c: &Cluster) -> Vec<serde_json::Value> {
    let bin = kproxy_bin().unwrap();
    let root = c.node_bpf_root(1);
    let out = c
        .node(1)
        .output_timeout(
            &[
                bin.to_str().unwrap(),
                "list",
                "services",
                "--bpf-root",
                root.to_str().unwrap(),
                "-o",
                "json",
            ],
            Duration::from_secs(60),
        )
        .unwrap();
    assert!(
        out.status.success(),
        "kproxy list services: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("kproxy list services -o json")
}

fn backend_count(services: &[serde_json::Value], address: &str, port: u16) -> Option<u64> {
    services
        .iter()
        .find(|s| s["address"] == address && s["port"] == port)
        .and_then(|s| s["backend_count"].as_u64())
}

/// The `took_ms` of the agent's sync lines that wrote at least `min_writes` entries.
fn big_sync_took_ms(log: &str, min_writes: u64) -> Option<f64> {
    log.lines()
        .rev()
        .filter(|l| l.contains("synced"))
        .find_map(|l| {
            let field = |name: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .map(|v| v.trim_matches(|c: char| !c.is_ascii_digit() && c != '.'))
                    .and_then(|v| v.parse::<f64>().ok())
            };
            let writes = field("writes=")?;
            (writes >= min_writes as f64)
                .then(|| field("took_ms="))
                .flatten()
        })
}

#[test]
fn slice_with_10000_endpoints_is_programmed_and_served() {
    let mut c = fixtures::one_node(TESTPOD).expect("building the cluster");
    fixtures::write_seed(&c, &["pod-a", "pod-b"], &["pod-a", "pod-b"]).unwrap();
    pod_a_answers_for_the_block(&mut c);
    c.start_agent_ready(1).unwrap();

    let svc = Service::node_port("big", BIG_IP).selector("big").port(
        "http",
        Protocol::Tcp,
        80,
        BIG_TARGET_PORT,
        Some(BIG_NODEPORT),
    );
    let slice = EndpointSlice::for_service("big")
        .port("http", Protocol::Tcp, BIG_TARGET_PORT)
        .endpoints(
            (0..BIG_ENDPOINTS).map(|i| Endpoint::new(&big_endpoint_ip(i), "node1", "pod-a")),
        );
    let objs: Vec<Object> = vec![svc.into(), slice.into()];
    let t0 = Instant::now();
    c.write_manifests("big.yaml", &objs).unwrap();
    let pod_z = c.pod("pod-z");
    let url = format!("http://{BIG_IP}:80/");
    let mut first = None;
    while t0.elapsed() < Duration::from_secs(60) {
        let r = probe::curl(&pod_z, &url, Duration::from_secs(1)).unwrap();
        if r.ok() {
            first = Some(t0.elapsed());
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let Some(first) = first else {
        c.fail(format!("{url} was not served within 60 s"));
    };
    let log = c.agent_log(1);
    let took = big_sync_took_ms(&log, u64::from(BIG_ENDPOINTS));
    println!(
        "10,000-endpoint slice: file written -> first answer {} ms; the sync that wrote it took {took:?} ms",
        first.as_millis()
    );
    c.check(took.is_some(), || {
        "no sync line with 10,000+ writes in the log".into()
    });

    let services = list_services(&c);
    let count = backend_count(&services, BIG_IP, 80);
    c.check(count == Some(u64::from(BIG_ENDPOINTS)), || {
        format!("{BIG_IP}:80 has {count:?} backends in the maps, want {BIG_ENDPOINTS}")
    });
    let np = backend_count(&services, "0.0.0.0", BIG_NODEPORT);
    c.check(np == Some(u64::from(BIG_ENDPOINTS)), || {
        format!("nodePort {BIG_NODEPORT} has {np:?} backends, want {BIG_ENDPOINTS}")
    });

    for (place, url) in [
        (&pod_z, url.clone()),
        (
            &c.client(),
            format!("http://{}:{BIG_NODEPORT}/", c.node_ip(1)),
        ),
    ] {
        let r = probe::curl_n(place, &url, 20, Duration::from_secs(3)).unwrap();
        let t = tally(&r);
        c.check(
            r.iter().all(|x| x.ok()) && t.keys().all(|k| k == "big-server"),
            || format!("{url} from {}: {t:?} {r:?}", place.label),
        );
    }
    // The rest is still served.
    let r = probe::curl_n(
        &c.client(),
        "http://198.18.0.1:30001/",
        8,
        Duration::from_secs(3),
    )
    .unwrap();
    c.check(r.iter().all(|x| x.ok()), || format!("mysvc: {r:?}"));
}

const HOSTILE: &str = "\
apiVersion: v1
kind: Service
metadata: {name: dup-np, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.71.1
  selector: {app: dup}
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8081, nodePort: 30001}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dup-np-1, namespace: default, labels: {kubernetes.io/service-name: dup-np}}
addressType: IPv4
ports: [{name: http, protocol: TCP, port: 8081}]
endpoints: [{addresses: [POD_C], nodeName: node1}]
---
apiVersion: v1
kind: Service
metadata: {name: badip, namespace: default}
spec:
  clusterIP: 10.96.71.2
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: badip-1, namespace: default, labels: {kubernetes.io/service-name: badip}}
addressType: IPv4
ports: [{name: http, protocol: TCP, port: 80}]
endpoints: [{addresses: [10.0.0.999], nodeName: node1}]
---
apiVersion: v1
kind: Service
metadata: {name: port-zero, namespace: default}
spec:
  clusterIP: 10.96.71.3
  ports: [{name: http, protocol: TCP, port: 0, targetPort: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: port-too-big, namespace: default}
spec:
  clusterIP: 10.96.71.4
  ports: [{name: http, protocol: TCP, port: 65536, targetPort: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: badproto, namespace: default}
spec:
  clusterIP: 10.96.71.5
  ports: [{name: http, protocol: TCPX, port: 80, targetPort: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: badcip, namespace: default}
spec:
  clusterIP: 10.96.300.1
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 80}]
---
apiVersion: v1
kind: Frobnicator
metadata: {name: frob, namespace: default}
---
apiVersion: v1
kind: Service
metadata: {name: [broken
  spec: {: :
---
apiVersion: v1
kind: Service
metadata: {name: goodnew, namespace: default}
spec:
  clusterIP: 10.96.71.9
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8081}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: goodnew-1, namespace: default, labels: {kubernetes.io/service-name: goodnew}}
addressType: IPv4
ports: [{name: http, protocol: TCP, port: 8081}]
endpoints: [{addresses: [POD_C], nodeName: node1}]
";

/// Curls `url` `n` times from `place`; all must succeed and come from `pods` only.
fn served_by(
    c: &Cluster,
    place: &kproxy_tests::harness::Place,
    url: &str,
    pods: &[&str],
    what: &str,
) {
    let r = probe::curl_n(place, url, 10, Duration::from_secs(3)).unwrap();
    let t = tally(&r);
    c.check(
        r.iter().all(|x| x.ok()) && t.keys().all(|k| pods.contains(&k.as_str())),
        || format!("{what}: {url} from {}: {t:?}", place.label),
    );
}

#[test]
fn hostile_objects_get_an_error_each_and_the_rest_is_served() {
    let mut c = fixtures::one_node(TESTPOD).expect("building the cluster");
    fixtures::write_seed(&c, &["pod-a", "pod-b"], &["pod-a", "pod-b"]).unwrap();
    c.start_agent_ready(1).unwrap();
    let client = c.client();
    let pod_z = c.pod("pod-z");
    let np_url = format!("http://{}:{}/", c.node_ip(1), seed::MYSVC_NODEPORT);
    let cip_url = format!("http://{}:{}/", seed::MYSVC_IP, seed::MYSVC_PORT);
    served_by(&c, &client, &np_url, &["pod-a", "pod-b"], "before");

    let pod_c = c.pod_ip("pod-c").to_string();
    let t0 = Instant::now();
    c.write_manifest_text("hostile.yaml", &HOSTILE.replace("POD_C", &pod_c))
        .unwrap();
    // The good Service in the same file is served.
    let mut served = false;
    while t0.elapsed() < Duration::from_secs(10) {
        if probe::curl(&pod_z, "http://10.96.71.9:80/", Duration::from_secs(1))
            .unwrap()
            .pod()
            == Some("pod-c:8081")
        {
            served = true;
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    c.check(served, || {
        "goodnew (next to the bad objects) was not served".into()
    });
    println!(
        "good object next to 8 bad ones served after {:?}",
        t0.elapsed()
    );
    thread::sleep(Duration::from_millis(500));
    c.check(c.healthz(1) == 200, || {
        "unhealthy after the bad objects".into()
    });

    // The duplicate nodePort: mysvc, which was serving it, keeps it.
    served_by(&c, &client, &np_url, &["pod-a", "pod-b"], "after dup-np");
    served_by(&c, &pod_z, &cip_url, &["pod-a", "pod-b"], "after dup-np");
    let r = probe::curl(&pod_z, "http://10.96.71.1:80/", Duration::from_secs(2)).unwrap();
    c.check(!r.ok(), || format!("dup-np must not be served: {r}"));

    let log = c.agent_log(1);
    let mut missing = Vec::new();
    // Each line must name the object and the reason.
    for (object, reason) in [
        (
            "Service default/dup-np",
            "nodePort 30001/TCP is already used by Service default/mysvc",
        ),
        ("EndpointSlice default/badip-1", "10.0.0.999"),
        ("Service default/port-zero", "port 0 is not in 1..=65535"),
        (
            "Service default/port-too-big",
            "port 65536 is not in 1..=65535",
        ),
        ("Service default/badproto", "TCPX"),
        ("Service default/badcip", "10.96.300.1"),
        ("Frobnicator default/frob", "not one kproxy reads"),
        ("hostile.yaml: document 10", "malformed YAML"),
    ] {
        let found = log
            .lines()
            .any(|l| l.contains(object) && l.contains(reason) && l.contains("hostile.yaml"));
        if !found {
            missing.push(format!("{object}: {reason}"));
        }
    }
    c.check(missing.is_empty(), || {
        format!("the log should name each bad object and its reason; missing {missing:#?}")
    });
    println!("8 bad objects reported, each with its object and reason");

    // A served Service edited into an invalid one: its last good version stays.
    let bad = seed::mysvc()
        .to_yaml()
        .replace(&format!("port: {}", seed::MYSVC_PORT), "port: 65536");
    assert!(bad.contains("65536"), "{bad}");
    let slice = Object::from(seed::mysvc_slice([
        c.endpoint("pod-a"),
        c.endpoint("pod-b"),
    ]));
    c.write_manifest_text("mysvc.yaml", &format!("{bad}---\n{}", slice.to_yaml()))
        .unwrap();
    let noticed = kproxy_tests::harness::sys::wait_for(
        Duration::from_secs(5),
        Duration::from_millis(50),
        || {
            c.agent_log(1)
                .contains("serving its last good version")
                .then_some(())
        },
    );
    c.check(noticed.is_some(), || "the bad edit was not reported".into());
    served_by(
        &c,
        &client,
        &np_url,
        &["pod-a", "pod-b"],
        "after the bad edit",
    );
    served_by(
        &c,
        &pod_z,
        &cip_url,
        &["pod-a", "pod-b"],
        "after the bad edit",
    );
    // Fixed (and changed): applied.
    fixtures::write_mysvc(&c, &["pod-b"]).unwrap();
    let t = Instant::now();
    loop {
        let r = probe::curl_n(&client, &np_url, 6, Duration::from_secs(2)).unwrap();
        if r.iter().all(|x| x.pod() == Some("pod-b")) {
            break;
        }
        c.check(t.elapsed() < Duration::from_secs(5), || {
            format!("the fixed file was not applied: {r:?}")
        });
        thread::sleep(Duration::from_millis(100));
    }
    let running = c.agent_running(1);
    c.check(running, || "the agent exited".into());
}
