//! What only the userspace relay has to prove (the behaviour shared with every mode is in
//! e2e_modes):
//! - applies are incremental: a change to one Service leaves the relayed connections of the
//!   others alone, and a removed backend's relayed connections are closed;
//! - sessionAffinity ClientIP and loadBalancerSourceRanges from the DesiredState;
//! - a listener that cannot bind is reported loudly (an error naming the frontend, the
//!   sync error metric, /healthz) while everything else is served, and is bound once the
//!   address is free again.

mod semantics_common;

use std::time::Duration;

use kproxy_tests::harness::{
    Cluster,
    faults::{KeepAlive, start_echo_server},
    fixtures,
    manifests::seed,
    probe::{self, show, tally},
    sys,
};
use semantics_common::{Ep, route_via, slice, write};

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");

fn userspace_cluster() -> Cluster {
    let mut c = fixtures::one_node(TESTPOD).expect("building the cluster");
    c.set_proxy_mode("userspace");
    fixtures::write_seed(&c, &["pod-a", "pod-b"], &["pod-a", "pod-b"]).expect("manifests");
    c
}

fn cluster_ip_service(name: &str, ip: &str, port: u16, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {ip}\n{extra}  ports:\n  - {{name: tcp, protocol: TCP, port: {port}, targetPort: {port}}}\n"
    )
}

fn echo_services(c: &Cluster, echo1: &[&str]) {
    let tcp = [("tcp", "TCP", 9000)];
    let eps: Vec<Ep> = echo1.iter().map(|p| Ep::of(c, p)).collect();
    write(
        c,
        "echo.yaml",
        &[
            cluster_ip_service("echo1", "10.96.110.1", 9000, ""),
            slice("echo1-1", "echo1", &tcp, &eps),
            cluster_ip_service("echo2", "10.96.110.2", 9000, ""),
            slice("echo2-1", "echo2", &tcp, &[Ep::of(c, "pod-b")]),
        ],
    );
}

/// Two long-lived relayed connections (echo1 -> pod-a, echo2 -> pod-b). Changing mysvc
/// disturbs neither; moving echo1 from pod-a to pod-c closes echo1's connection (its backend
/// was removed) and leaves echo2's alone.
#[test]
fn apply_is_incremental_and_closes_connections_of_removed_backends() {
    let mut c = userspace_cluster();
    for pod in ["pod-a", "pod-b", "pod-c"] {
        let r = start_echo_server(&mut c, pod, 9000);
        c.ok(r);
    }
    echo_services(&c, &["pod-a"]);
    let r = c.start_agent_ready(1);
    c.ok(r);
    let pod_z = c.pod(fixtures::CLIENT_POD);
    let k1 = c.ok(KeepAlive::start(
        &c,
        &pod_z,
        "10.96.110.1:9000",
        Duration::from_millis(100),
    ));
    let k2 = c.ok(KeepAlive::start(
        &c,
        &pod_z,
        "10.96.110.2:9000",
        Duration::from_millis(100),
    ));
    for (k, pod) in [(&k1, "pod-a"), (&k2, "pod-b")] {
        if k.asker
            .wait_line(Duration::from_secs(5), |l| l.is_ok())
            .is_none_or(|l| l.pod() != Some(pod))
        {
            c.fail(format!("no echo from {pod}:\n{}", show(&k.asker.peek())));
        }
    }

    // Another Service changes: both connections carry on.
    fixtures::write_mysvc(&c, &["pod-c"]).expect("manifests");
    semantics_common::wait_served(
        &c,
        &c.client(),
        &format!("http://{}:{}/", c.node_ip(1), seed::MYSVC_NODEPORT),
        "mysvc moved to pod-c",
        |r| r.pod() == Some("pod-c"),
    );
    std::thread::sleep(Duration::from_millis(500));
    for k in [&k1, &k2] {
        let lines = k.asker.peek();
        c.check(lines.len() >= 5 && lines.iter().all(|l| l.is_ok()), || {
            format!(
                "a change to mysvc must not disturb echo connections:\n{}",
                show(&lines)
            )
        });
    }

    // echo1's backend goes: its connection is closed, echo2's is not.
    echo_services(&c, &["pod-c"]);
    let closed = k1.asker.wait_line(Duration::from_secs(10), |l| !l.is_ok());
    c.check(closed.is_some(), || {
        format!(
            "echo1's connection to the removed pod-a should be closed:\n{}",
            show(&k1.asker.peek())
        )
    });
    std::thread::sleep(Duration::from_millis(500));
    let l2 = c.ok(k2.finish());
    c.check(l2.len() >= 10 && l2.iter().all(|l| l.is_ok()), || {
        format!("echo2's connection must carry on:\n{}", show(&l2))
    });
    let l1 = k1.asker.peek();
    c.check(
        l1.iter().all(|l| !l.is_ok() || l.pod() == Some("pod-a")),
        || format!("echo1's connection only ever reached pod-a:\n{}", show(&l1)),
    );
    // New connections to echo1 reach pod-c.
    let r = c.ask(
        &pod_z,
        &["tcp-ask", "10.96.110.1:9000", "--count", "1"],
        Duration::from_secs(5),
    );
    c.check(r.len() == 1 && r[0].is_ok(), || {
        format!("a new connection to echo1: {}", show(&r))
    });
}

/// sessionAffinity ClientIP: every request of one client goes to one pod. A LoadBalancer
/// Service's source ranges: the client inside them is served, outside them it is refused
/// (both at the LoadBalancer IP and at the nodePort).
#[test]
fn affinity_and_source_ranges() {
    let mut c = userspace_cluster();
    let http = [("http", "TCP", 80)];
    let both = [Ep::of(&c, "pod-a"), Ep::of(&c, "pod-b")];
    let lb = |name: &str, ip: &str, np: u16, lb_ip: &str, range: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  type: LoadBalancer\n  clusterIP: {ip}\n  loadBalancerSourceRanges: [{range}]\n  ports:\n  - {{name: http, protocol: TCP, port: 80, targetPort: 80, nodePort: {np}}}\nstatus:\n  loadBalancer:\n    ingress: [{{ip: {lb_ip}}}]\n"
        )
    };
    write(
        &c,
        "policy.yaml",
        &[
            cluster_ip_service(
                "sticky",
                "10.96.120.1",
                80,
                "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}\n",
            ),
            slice("sticky-1", "sticky", &[("tcp", "TCP", 80)], &both),
            lb(
                "allowed",
                "10.96.120.2",
                30120,
                "203.0.113.10",
                "198.18.0.0/24",
            ),
            slice("allowed-1", "allowed", &http, &both),
            lb(
                "denied",
                "10.96.120.3",
                30121,
                "203.0.113.11",
                "192.0.2.0/24",
            ),
            slice("denied-1", "denied", &http, &both),
        ],
    );
    route_via(&c, &c.client(), "203.0.113.0/24", c.node_ip(1));
    let r = c.start_agent_ready(1);
    c.ok(r);

    for place in [c.pod(fixtures::CLIENT_POD), c.node(1)] {
        let r = c.ok(probe::curl_n(
            &place,
            "http://10.96.120.1/",
            16,
            Duration::from_secs(3),
        ));
        let t = tally(&r);
        println!("{} -> sticky: {t:?}", place.label);
        c.check(r.iter().all(|x| x.ok()) && t.len() == 1, || {
            format!("{}: ClientIP affinity keeps one pod: {t:?}", place.label)
        });
    }

    let client = c.client();
    for url in ["http://203.0.113.10/", "http://198.18.0.1:30120/"] {
        let r = c.ok(probe::curl_n(&client, url, 6, Duration::from_secs(3)));
        c.check(r.iter().all(|x| x.ok()), || {
            format!("the client is inside the source ranges of {url}: {r:#?}")
        });
    }
    for url in ["http://203.0.113.11/", "http://198.18.0.1:30121/"] {
        let r = c.curl(&client, url);
        c.check(!r.ok() && r.elapsed < Duration::from_secs(1), || {
            format!("the client is outside the source ranges of {url}: refused at once: {r}")
        });
    }
}

fn metric(c: &Cluster, name: &str) -> Option<f64> {
    let out = c
        .node(1)
        .output(&[
            "curl",
            "-s",
            "--max-time",
            "2",
            "http://127.0.0.1:10249/metrics",
        ])
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

/// A process holds 198.18.0.1:30053/UDP (the dns nodePort) before the agent starts: the
/// agent says which frontend it cannot serve and why, counts a sync error, and /healthz
/// fails, while the other frontends are served. Once the address is free the relay binds it.
#[test]
fn a_listener_that_cannot_bind_is_reported_and_retried() {
    let mut c = userspace_cluster();
    let node = c.node(1);
    let dns_nodeport = format!("{}:{}", c.node_ip(1), seed::DNS_NODEPORT);
    let testpod = c.testpod();
    let r = c.spawn(
        &node,
        "squatter",
        &[&testpod, "udp-serve", "squatter", &dns_nodeport],
    );
    let squatter = c.ok(r);
    std::thread::sleep(Duration::from_millis(300));
    let r = c.start_agent(1);
    c.ok(r);

    let reported = sys::wait_for(Duration::from_secs(15), Duration::from_millis(200), || {
        c.agent_log(1)
            .lines()
            .find(|l| l.contains("cannot listen on") && l.contains(&dns_nodeport))
            .map(str::to_string)
    });
    let Some(line) = reported else {
        c.fail("no error naming the frontend that cannot listen");
    };
    println!("agent: {line}");
    c.check(line.contains("default/dns"), || {
        format!("the error should name the Service: {line}")
    });
    c.check(
        metric(&c, "kproxy_sync_errors_total").is_some_and(|v| v >= 1.0),
        || "kproxy_sync_errors_total should count the failure".into(),
    );
    c.check(c.healthz(1) != 200, || {
        "/healthz must not report healthy while a frontend cannot be served".into()
    });
    // Everything else is served meanwhile.
    let r = c.ok(probe::curl_n(
        &c.client(),
        &format!("http://{}:{}/", c.node_ip(1), seed::MYSVC_NODEPORT),
        4,
        Duration::from_secs(3),
    ));
    c.check(r.iter().all(|x| x.ok()), || {
        format!("mysvc's nodePort must be served meanwhile: {r:#?}")
    });

    // The squatter goes: the retry binds the address and the node becomes healthy.
    c.stop_extra(squatter);
    let healthy = sys::wait_for(Duration::from_secs(20), Duration::from_millis(200), || {
        (c.healthz(1) == 200).then_some(())
    });
    c.check(healthy.is_some(), || {
        "the agent should recover once the address is free".into()
    });
    let lines = c.ask(
        &c.client(),
        &[
            "udp-ask",
            &dns_nodeport,
            "--count",
            "4",
            "--timeout-ms",
            "1000",
        ],
        Duration::from_secs(10),
    );
    c.check(lines.len() == 4 && lines.iter().all(|l| l.is_ok()), || {
        format!("the dns nodePort after recovery:\n{}", show(&lines))
    });
}

/// Something deletes the relay interface under the running agent: the agent says so and
/// puts the service addresses back, and the cluster IP is served again without any change
/// to the Services.
#[test]
fn a_deleted_relay_interface_is_restored() {
    let mut c = userspace_cluster();
    let r = c.start_agent_ready(1);
    c.ok(r);
    let cip = format!("http://{}:{}/", seed::MYSVC_IP, seed::MYSVC_PORT);
    let pod_z = c.pod(fixtures::CLIENT_POD);
    c.check(c.curl(&pod_z, &cip).ok(), || "cluster IP before".into());
    let out = c
        .node(1)
        .output(&["ip", "link", "del", "kproxy0"])
        .expect("ip link del");
    c.check(out.status.success(), || {
        format!(
            "ip link del kproxy0: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let back = sys::wait_for(Duration::from_secs(10), Duration::from_millis(100), || {
        c.curl(&pod_z, &cip).ok().then_some(())
    });
    c.check(back.is_some(), || {
        "the cluster IP should be served again once the agent restores kproxy0".into()
    });
    c.check(c.agent_log(1).contains("lost service addresses"), || {
        "the agent should say it restored the addresses".into()
    });
}
