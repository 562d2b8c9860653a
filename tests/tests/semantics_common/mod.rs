//! Shared by the `e2e_semantics_*` scenarios: Services and EndpointSlices written as YAML
//! with the fields the harness' builders do not have (LoadBalancer status, traffic policies,
//! named targetPorts, endpoint conditions), and probes that wait for a change to be served.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use kproxy_tests::harness::{Cluster, Place, kproxy_bin, probe};
use serde_json::Value;

/// One endpoint of a slice, with all three conditions.
#[derive(Clone, Debug)]
pub struct Ep {
    pub ip: String,
    pub node: String,
    pub pod: String,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl Ep {
    /// Pod `pod`'s endpoint, ready.
    pub fn of(c: &Cluster, pod: &str) -> Ep {
        Ep {
            ip: c.pod_ip(pod).to_string(),
            node: format!("node{}", c.pod_node(pod)),
            pod: pod.into(),
            ready: true,
            serving: true,
            terminating: false,
        }
    }

    pub fn conditions(mut self, ready: bool, serving: bool, terminating: bool) -> Ep {
        self.ready = ready;
        self.serving = serving;
        self.terminating = terminating;
        self
    }
}

/// An EndpointSlice of `service` (namespace default) with ports `(name, protocol, port)`.
pub fn slice(name: &str, service: &str, ports: &[(&str, &str, u16)], eps: &[Ep]) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nports:\n"
    );
    for (n, proto, port) in ports {
        let _ = writeln!(s, "- {{name: {n}, protocol: {proto}, port: {port}}}");
    }
    if eps.is_empty() {
        s.push_str("endpoints: []\n");
    } else {
        s.push_str("endpoints:\n");
    }
    for e in eps {
        let _ = writeln!(
            s,
            "- addresses: [{}]\n  conditions: {{ready: {}, serving: {}, terminating: {}}}\n  nodeName: {}\n  targetRef: {{kind: Pod, name: {}, namespace: default}}",
            e.ip, e.ready, e.serving, e.terminating, e.node, e.pod
        );
    }
    s
}

/// Writes these YAML documents as `<manifests>/<file>` (atomically).
pub fn write(c: &Cluster, file: &str, docs: &[String]) {
    let mut text = String::new();
    for d in docs {
        text.push_str("---\n");
        text.push_str(d);
        if !d.ends_with('\n') {
            text.push('\n');
        }
    }
    c.ok(c.write_manifest_text(file, &text));
}

/// Polls `f` every 100 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One curl at `place` (1.5 s max).
pub fn curl(place: &Place, url: &str) -> probe::CurlResult {
    probe::curl(place, url, Duration::from_millis(1500)).expect("running curl")
}

/// `n` curls at `place`; every one must succeed. Returns the answers' first two words
/// (`pod[:port]`, the source the pod saw).
pub fn answers(c: &Cluster, place: &Place, url: &str, n: usize) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for i in 0..n {
        let r = curl(place, url);
        c.check(r.ok(), || {
            format!("{} -> {url}: request {i} failed: {r}", place.label)
        });
        out.push((
            r.pod().unwrap_or_default().to_string(),
            r.seen_source().unwrap_or_default().to_string(),
        ));
    }
    out
}

/// How often each pod answered.
pub fn pods(answers: &[(String, String)]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for (p, _) in answers {
        *m.entry(p.clone()).or_insert(0) += 1;
    }
    m
}

/// Waits until `url` answers from `place` and the answer satisfies `pred`; fails the test
/// (with the agents' logs) otherwise.
pub fn wait_served(
    c: &Cluster,
    place: &Place,
    url: &str,
    what: &str,
    pred: impl Fn(&probe::CurlResult) -> bool,
) {
    let mut last = None;
    let ok = wait_until(Duration::from_secs(10), || {
        let r = curl(place, url);
        let good = r.ok() && pred(&r);
        last = Some(r);
        good
    });
    c.check(ok, || {
        format!(
            "{what}: {} -> {url} was not served as expected within 10 s; last: {}",
            place.label,
            last.map(|r| r.to_string()).unwrap_or_default()
        )
    });
}

/// Waits until `url` is not answered from `place` (refused, unreachable or timing out).
pub fn wait_not_served(c: &Cluster, place: &Place, url: &str, what: &str) {
    let mut last = None;
    let ok = wait_until(Duration::from_secs(10), || {
        let r = curl(place, url);
        let gone = !r.ok();
        last = Some(r);
        gone
    });
    c.check(ok, || {
        format!(
            "{what}: {} -> {url} is still answered after 10 s: {}",
            place.label,
            last.map(|r| r.to_string()).unwrap_or_default()
        )
    });
}

/// Asserts `url` is refused at once from `place` (connect fails with ECONNREFUSED, curl exit
/// 7 in well under a second), `tries` times.
pub fn assert_refused(c: &Cluster, place: &Place, url: &str, what: &str, tries: usize) {
    for _ in 0..tries {
        let r = curl(place, url);
        c.check(r.refused() && r.elapsed < Duration::from_secs(1), || {
            format!("{what}: {} -> {url} should be refused: {r}", place.label)
        });
    }
}

/// `kproxy list services -o json` read from node `n`'s pinned maps.
pub fn list_services(c: &Cluster, n: u8) -> Value {
    let bin = c.ok(kproxy_bin());
    let root = c.node_bpf_root(n);
    let argv = [
        bin.to_str().unwrap(),
        "list",
        "services",
        "--bpf-root",
        root.to_str().unwrap(),
        "-o",
        "json",
    ];
    let out = c.ok(c.node(n).output_timeout(&argv, Duration::from_secs(30)));
    let text = String::from_utf8_lossy(&out.stdout);
    c.check(out.status.success(), || {
        format!(
            "{argv:?}: {}\n{text}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| c.fail(format!("bad JSON ({e}):\n{text}")))
}

/// The frontend labels (`10.96.0.10:53/UDP`, `0.0.0.0:30001/TCP (nodePort)`) programmed on
/// node `n`, sorted.
pub fn frontends(c: &Cluster, n: u8) -> Vec<String> {
    let v = list_services(c, n);
    let mut labels: Vec<String> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["frontend"].as_str().map(String::from))
        .collect();
    labels.sort();
    labels
}

/// Waits until node `n`'s programmed frontends satisfy `pred`; fails otherwise.
pub fn wait_frontends(c: &Cluster, n: u8, what: &str, pred: impl Fn(&[String]) -> bool) {
    let mut last = Vec::new();
    let ok = wait_until(Duration::from_secs(10), || {
        last = frontends(c, n);
        pred(&last)
    });
    c.check(ok, || {
        format!("{what}: node{n}'s frontends did not converge within 10 s: {last:#?}")
    });
}

/// Adds a route for `cidr` via `via` in `place`'s netns (e.g. the client reaching a
/// LoadBalancer IP through node1, as a router in front of the cluster would).
pub fn route_via(c: &Cluster, place: &Place, cidr: &str, via: Ipv4Addr) {
    let ns = place.netns.as_ref().expect("a place with a netns");
    c.ok(ns.ip(&["route", "add", cidr, "via", &via.to_string()]));
}

/// `GET url` at `place`: the HTTP status (0 when nothing answered) and the body.
pub fn http_get(place: &Place, url: &str) -> (u16, String) {
    let out = place.output_timeout(
        &[
            "curl",
            "-sS",
            "--max-time",
            "1",
            "-w",
            "\n%{http_code}",
            url,
        ],
        Duration::from_secs(5),
    );
    let Ok(out) = out else {
        return (0, String::new());
    };
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    match text.rsplit_once('\n') {
        Some((body, code)) => (code.trim().parse().unwrap_or(0), body.to_string()),
        None => (text.trim().parse().unwrap_or(0), String::new()),
    }
}
