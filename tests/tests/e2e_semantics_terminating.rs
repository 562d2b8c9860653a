//! Service semantics, endpoint conditions (KEP-1669, e2e "should fallback to terminating
//! endpoints when there are no ready endpoints"): ready endpoints are preferred; when none
//! is ready, endpoints that are `serving` and `terminating` still get traffic (cluster IP
//! from a pod and nodePort from outside); when none is serving either, connections are
//! refused at once.

mod semantics_common;

use kproxy_tests::harness::{Cluster, PodSpec};
use semantics_common::*;

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");

const SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: term, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.104.10
  selector: {app: term}
  ports:
  - {name: http, protocol: TCP, port: 80, targetPort: 80, nodePort: 30106}
";

#[test]
fn terminating_endpoints_are_a_fallback() {
    let mut c = Cluster::builder()
        .nodes(1)
        .testpod(TESTPOD)
        .pod(PodSpec::new("pod-a", 1))
        .pod(PodSpec::new("pod-b", 1))
        .pod(PodSpec::new("pod-z", 1).http_ports(&[]))
        .build()
        .expect("building the cluster");
    let set = |c: &Cluster, a: (bool, bool, bool), b: (bool, bool, bool)| {
        write(
            c,
            "term.yaml",
            &[
                SERVICE.to_string(),
                slice(
                    "term-1",
                    "term",
                    &[("http", "TCP", 80)],
                    &[
                        Ep::of(c, "pod-a").conditions(a.0, a.1, a.2),
                        Ep::of(c, "pod-b").conditions(b.0, b.1, b.2),
                    ],
                ),
            ],
        )
    };
    let ready = (true, true, false);
    let terminating = (false, true, true);
    let gone = (false, false, true);
    let unready = (false, false, false);
    set(&c, ready, ready);
    c.start_agent_ready(1).unwrap();
    let pod_z = c.pod("pod-z");
    let client = c.client();
    let cip = "http://10.96.104.10/";
    let np = "http://198.18.0.1:30106/";

    // Every endpoint terminating but still serving (a rollout's last pods): still served,
    // by both.
    set(&c, terminating, terminating);
    for (place, url) in [(&pod_z, cip), (&client, np)] {
        wait_served(&c, place, url, "terminating fallback", |_| true);
        let a = answers(&c, place, url, 16);
        println!(
            "{} -> {url} (all terminating, serving): {:?}",
            place.label,
            pods(&a)
        );
        c.check(pods(&a).len() == 2, || {
            format!("serving terminating endpoints must both be used: {a:?}")
        });
    }

    // One ready endpoint: the terminating one gets no new connections. Wait for the sync that
    // applies it: a first answer from pod-a alone can be a pick made before it.
    let syncs = |c: &Cluster| c.agent_log(1).matches(" synced").count();
    let before = syncs(&c);
    set(&c, ready, terminating);
    let applied = (0..500).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(20));
        syncs(&c) > before
    });
    c.check(applied, || {
        "no sync after the change to one ready endpoint".to_string()
    });
    for (place, url) in [(&pod_z, cip), (&client, np)] {
        wait_served(&c, place, url, "ready preferred", |r| {
            r.pod() == Some("pod-a")
        });
        let a = answers(&c, place, url, 12);
        c.check(a.iter().all(|(p, _)| p == "pod-a"), || {
            format!("with a ready endpoint, terminating ones are not used: {a:?}")
        });
    }

    // Terminating and no longer serving, or not ready at all: refused.
    for (b, what) in [(gone, "serving: false"), (unready, "not ready")] {
        set(&c, gone, b);
        wait_not_served(&c, &pod_z, cip, what);
        assert_refused(&c, &pod_z, cip, what, 3);
        assert_refused(&c, &client, np, what, 3);
    }

    // And back: a ready endpoint is served again.
    set(&c, unready, ready);
    wait_served(&c, &pod_z, cip, "ready again", |r| r.pod() == Some("pod-b"));
}
