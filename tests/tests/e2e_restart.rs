//! Restarts and upgrades keep traffic flowing (issue 5). With the seed services (mysvc
//! nodePort 30001 / 10.96.100.208:8080, dns 10.96.0.10:53 / nodePort 30053) plus `echo`
//! (10.96.100.209:9000 / nodePort 30009, a socat echo server in pod-a and pod-b: the pods'
//! nginx closes each connection after one answer, so it cannot hold a keep-alive connection),
//! these run throughout, one request every 100 ms each:
//!
//! - established TCP: the outside client -> node1:30009 (XDP + conntrack) and pod-z ->
//!   10.96.100.209:9000 (socket-level), one connection each, a line echoed per request;
//! - established UDP: pod-z's connected socket -> 10.96.0.10:53, and the outside client from
//!   the fixed source port 40053 -> node1:30053;
//! - new connections: a fresh TCP connection + HTTP request per 100 ms from the client to
//!   node1:30001 and from pod-z to 10.96.100.208:8080;
//!
//! while the agent is stopped with SIGTERM and restarted (2 s without agent), killed with
//! SIGKILL and restarted (2 s without agent), and restarted 5 times in a row. Every request
//! must be answered, established flows by the same backend throughout; after each restart
//! the device links (XDP, tc) are the same link ids (updated in place), the cgroup links are
//! pinned under the same names, the maps are the same map ids (adopted), and the new agent's
//! first sync wrote nothing (the maps already held the state).

use std::{collections::BTreeMap, thread, time::Duration};

use kproxy_tests::harness::{
    AskLine, Cluster,
    faults::{self, KeepAlive, Pinned},
    fixtures,
    manifests::{EndpointSlice, Object, Protocol, Service},
    probe::{Asker, show},
};

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");
const ECHO_IP: &str = "10.96.100.209";
const ECHO_PORT: u16 = 9000;
const ECHO_NODEPORT: u16 = 30009;
const QUICK_RESTARTS: usize = 5;

fn write_echo(c: &Cluster) {
    let svc = Service::node_port("echo", ECHO_IP).selector("echo").port(
        "echo",
        Protocol::Tcp,
        ECHO_PORT,
        ECHO_PORT,
        Some(ECHO_NODEPORT),
    );
    let slice = EndpointSlice::for_service("echo")
        .port("echo", Protocol::Tcp, ECHO_PORT)
        .endpoints([c.endpoint("pod-a"), c.endpoint("pod-b")]);
    c.write_manifests("echo.yaml", &[Object::from(svc), Object::from(slice)])
        .unwrap();
}

fn cluster() -> Cluster {
    let mut c = fixtures::one_node(TESTPOD).expect("building the cluster");
    fixtures::write_seed(&c, &["pod-a", "pod-b"], &["pod-a", "pod-b"]).unwrap();
    write_echo(&c);
    for pod in ["pod-a", "pod-b"] {
        let r = faults::start_echo_server(&mut c, pod, ECHO_PORT);
        c.ok(r);
    }
    c.start_agent_ready(1).expect("starting the agent");
    c
}

/// Every traffic source of the scenario.
struct Traffic {
    tcp_nodeport: KeepAlive,
    tcp_cluster_ip: KeepAlive,
    udp_connected: Asker,
    udp_fixed_port: Asker,
    new_nodeport: Asker,
    new_cluster_ip: Asker,
}

const FOREVER: &str = "1000000";

impl Traffic {
    fn start(c: &Cluster) -> Traffic {
        let every = Duration::from_millis(100);
        let client = c.client();
        let pod = c.pod("pod-z");
        let node = c.node_ip(1);
        let t = Traffic {
            tcp_nodeport: c.ok(KeepAlive::start(
                c,
                &client,
                &format!("{node}:{ECHO_NODEPORT}"),
                every,
            )),
            tcp_cluster_ip: c.ok(KeepAlive::start(
                c,
                &pod,
                &format!("{ECHO_IP}:{ECHO_PORT}"),
                every,
            )),
            udp_connected: c.ask_start(
                &pod,
                &[
                    "udp-ask",
                    "10.96.0.10:53",
                    "--connected",
                    "--count",
                    FOREVER,
                    "--interval-ms",
                    "100",
                    "--timeout-ms",
                    "1000",
                ],
            ),
            udp_fixed_port: c.ask_start(
                &client,
                &[
                    "udp-ask",
                    &format!("{node}:30053"),
                    "--sport",
                    "40053",
                    "--count",
                    FOREVER,
                    "--interval-ms",
                    "100",
                    "--timeout-ms",
                    "1000",
                ],
            ),
            new_nodeport: c.ask_start(
                &client,
                &[
                    "tcp-ask",
                    &format!("{node}:30001"),
                    "--http",
                    "--count",
                    FOREVER,
                    "--interval-ms",
                    "100",
                    "--timeout-ms",
                    "2000",
                ],
            ),
            new_cluster_ip: c.ask_start(
                &pod,
                &[
                    "tcp-ask",
                    "10.96.100.208:8080",
                    "--http",
                    "--count",
                    FOREVER,
                    "--interval-ms",
                    "100",
                    "--timeout-ms",
                    "2000",
                ],
            ),
        };
        // Every flow is established before the first restart.
        for (name, a) in t.askers() {
            if a.wait_line(Duration::from_secs(10), |l| l.seq >= 3)
                .is_none()
            {
                c.fail(format!("{name}: no traffic:\n{}", show(&a.peek())));
            }
        }
        t
    }

    fn askers(&self) -> [(&'static str, &Asker); 6] {
        [
            (
                "TCP client -> nodePort 30009 (one connection)",
                &self.tcp_nodeport.asker,
            ),
            (
                "TCP pod-z -> cluster IP :9000 (one connection)",
                &self.tcp_cluster_ip.asker,
            ),
            ("UDP pod-z connected -> 10.96.0.10:53", &self.udp_connected),
            (
                "UDP client sport 40053 -> nodePort 30053",
                &self.udp_fixed_port,
            ),
            (
                "new TCP connections client -> nodePort 30001",
                &self.new_nodeport,
            ),
            (
                "new TCP connections pod-z -> cluster IP :8080",
                &self.new_cluster_ip,
            ),
        ]
    }

    /// Stops the clients (the keep-alive ones close cleanly) and returns every line.
    fn finish(self, c: &Cluster) -> Vec<(&'static str, Vec<AskLine>, bool)> {
        let names = self.askers().map(|(n, _)| n);
        let mut out = Vec::new();
        for (name, ka) in [
            (names[0], self.tcp_nodeport),
            (names[1], self.tcp_cluster_ip),
        ] {
            let lines = match ka.finish() {
                Ok(l) => l,
                Err(e) => c.fail(format!("{name}: the connection broke: {e:#}")),
            };
            out.push((name, lines, true));
        }
        for (name, a, established) in [
            (names[2], self.udp_connected, true),
            (names[3], self.udp_fixed_port, true),
            (names[4], self.new_nodeport, false),
            (names[5], self.new_cluster_ip, false),
        ] {
            out.push((name, a.peek(), established));
            drop(a);
        }
        out
    }
}

/// Checks what `Pinned` says after a restart against the state before it.
fn check_pinned(c: &Cluster, before: &Pinned, label: &str) -> Pinned {
    let now = c.ok(faults::pinned(c, 1));
    c.check(now.device_links() == before.device_links(), || {
        format!(
            "{label}: the device links were not updated in place:\nbefore {:?}\nafter  {:?}",
            before.device_links(),
            now.device_links()
        )
    });
    let names = |p: &Pinned| p.links.keys().cloned().collect::<Vec<_>>();
    c.check(names(&now) == names(before), || {
        format!(
            "{label}: other link pins:\nbefore {:?}\nafter  {:?}",
            before.links, now.links
        )
    });
    // The device links now run the new agent's programs (what an upgrade relies on).
    for (pin, prog) in &now.programs {
        if !pin.contains("cgroup") {
            c.check(before.programs.get(pin) != Some(prog), || {
                format!("{label}: {pin} still runs the old program {prog}")
            });
        }
    }
    c.check(now.maps == before.maps, || {
        format!(
            "{label}: the maps were recreated, not adopted:\nbefore {:?}\nafter  {:?}",
            before.maps, now.maps
        )
    });
    now
}

/// The `first sync programmed` lines of the agent log, in order.
fn first_syncs(c: &Cluster) -> Vec<String> {
    c.agent_log(1)
        .lines()
        .filter(|l| l.contains("first sync programmed"))
        .map(String::from)
        .collect()
}

fn check_no_rewrite(c: &Cluster, starts: usize, label: &str) {
    let syncs = first_syncs(c);
    c.check(syncs.len() == starts, || {
        format!("{label}: expected {starts} first syncs in the log, found {syncs:?}")
    });
    let last = syncs.last().unwrap();
    c.check(
        last.contains("writes=0") && last.contains("deletes=0"),
        || format!("{label}: the restarted agent rewrote the maps: {last}"),
    );
}

#[test]
fn restarts_keep_established_flows_and_new_connections() {
    let mut c = cluster();
    let pinned0 = c.ok(faults::pinned(&c, 1));
    println!(
        "pinned links: {:?}\nmaps: {:?}",
        pinned0.links, pinned0.maps
    );
    c.check(
        pinned0.device_links().len() >= 2 && pinned0.links.len() >= 6,
        || format!("expected XDP/tc and 4 cgroup links: {:?}", pinned0.links),
    );
    let traffic = Traffic::start(&c);
    let mut starts = 1;
    let mut restarts = 0;
    thread::sleep(Duration::from_millis(500));

    // SIGTERM, 2 s without an agent, start.
    let code = c.stop_agent(1);
    c.check(code == Some(0), || {
        format!("SIGTERM: the agent exited with {code:?}")
    });
    thread::sleep(Duration::from_secs(2));
    c.start_agent_ready(1).unwrap();
    starts += 1;
    restarts += 1;
    let mut pinned = check_pinned(&c, &pinned0, "after SIGTERM + restart");
    check_no_rewrite(&c, starts, "after SIGTERM + restart");
    thread::sleep(Duration::from_millis(500));

    // SIGKILL, 2 s without an agent, start.
    faults::kill_agent(&mut c, 1).unwrap();
    thread::sleep(Duration::from_secs(2));
    c.start_agent_ready(1).unwrap();
    starts += 1;
    restarts += 1;
    pinned = check_pinned(&c, &pinned, "after SIGKILL + restart");
    check_no_rewrite(&c, starts, "after SIGKILL + restart");
    thread::sleep(Duration::from_millis(500));

    // Restarts in a row (alternating SIGTERM and SIGKILL).
    for i in 0..QUICK_RESTARTS {
        if i % 2 == 0 {
            c.stop_agent(1);
        } else {
            faults::kill_agent(&mut c, 1).unwrap();
        }
        c.start_agent_ready(1).unwrap();
        starts += 1;
        restarts += 1;
        let label = format!("after quick restart {}", i + 1);
        pinned = check_pinned(&c, &pinned, &label);
        check_no_rewrite(&c, starts, &label);
        thread::sleep(Duration::from_millis(300));
    }
    println!(
        "after {restarts} restarts: links {:?}, programs {:?}",
        pinned.links, pinned.programs
    );
    thread::sleep(Duration::from_secs(1));
    let results = traffic.finish(&c);

    let mut report = String::new();
    let mut failures = Vec::new();
    let mut kept = 0;
    let mut established_total = 0;
    for (name, lines, established) in &results {
        let ok = lines.iter().filter(|l| l.is_ok()).count();
        let bad: Vec<&AskLine> = lines.iter().filter(|l| !l.is_ok()).collect();
        let mut pods: BTreeMap<&str, usize> = BTreeMap::new();
        for l in lines {
            *pods.entry(l.pod().unwrap_or("<failed>")).or_default() += 1;
        }
        report.push_str(&format!(
            "  {name}: {} requests, {ok} answered, {} failed, answered by {pods:?}\n",
            lines.len(),
            bad.len()
        ));
        let backends = pods.keys().filter(|p| **p != "<failed>").count();
        if *established {
            established_total += 1;
            kept += usize::from(bad.is_empty() && backends == 1);
        }
        if !bad.is_empty() {
            failures.push(format!("{name}:\n{}", show(&lines[..])));
        }
        if *established && backends > 1 {
            failures.push(format!(
                "{name}: the established flow changed backend: {pods:?}\n{}",
                show(&lines[..])
            ));
        }
        if lines.len() < 50 {
            failures.push(format!("{name}: too few requests ({})", lines.len()));
        }
    }
    println!(
        "{restarts} restarts (1 SIGTERM, 1 SIGKILL, {QUICK_RESTARTS} in a row); established \
         flows kept: {kept} of {established_total} (TCP and UDP)\n{report}"
    );
    c.check(failures.is_empty(), || failures.join("\n"));
}
