//! A full conntrack map degrades gracefully: with `--ct-max 256`, a flood of 3000 new UDP
//! flows to a nodePort fills CT4 (LRU: the least recently used flows are evicted); new
//! connections and flows keep being served, a long-lived TCP connection keeps working (its
//! evicted entry is recreated on its next packet, to the same backend here), and the
//! metrics show it: CT4 at its capacity (`kproxy_bpf_map_entries`, `kproxy_bpf_map_pressure`),
//! `conntrack_created` far past the capacity (so at least that many evictions), and the
//! mid-flow losses and failed inserts counted.

use std::{collections::BTreeMap, time::Duration};

use kproxy_tests::harness::{
    Cluster, faults, fixtures,
    manifests::{EndpointSlice, Object, Protocol, Service},
    probe,
};

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");
const CT_MAX: u32 = 256;
const FLOWS: usize = 3000;
const ECHO_PORT: u16 = 7000;
const ECHO_NODE_PORT: u16 = 30700;

/// `/metrics` of node1's agent as `series -> value`.
fn scrape(c: &Cluster) -> BTreeMap<String, f64> {
    c.metrics(1)
}

fn get(c: &Cluster, m: &BTreeMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| c.fail(format!("{series} missing from /metrics")))
}

fn event(reason: &str) -> String {
    format!("kproxy_datapath_events_total{{reason=\"{reason}\"}}")
}

#[test]
fn a_flooded_small_conntrack_map_keeps_serving_and_says_so() {
    let mut c = fixtures::one_node(TESTPOD).expect("building the cluster");
    fixtures::write_seed(&c, &["pod-a"], &["pod-a"]).unwrap();
    let echo: Vec<Object> = vec![
        Service::node_port("echo", "10.96.100.70")
            .selector("echo")
            .port(
                "echo",
                Protocol::Tcp,
                ECHO_PORT,
                ECHO_PORT,
                Some(ECHO_NODE_PORT),
            )
            .into(),
        EndpointSlice::for_service("echo")
            .port("echo", Protocol::Tcp, ECHO_PORT)
            .endpoint(c.endpoint("pod-a"))
            .into(),
    ];
    c.write_manifests("echo.yaml", &echo).unwrap();
    faults::start_echo_server(&mut c, "pod-a", ECHO_PORT).unwrap();
    c.start_agent_with(1, &["--ct-max", &CT_MAX.to_string()])
        .unwrap();
    c.wait_healthy(1, Duration::from_secs(30)).unwrap();

    // A long-lived connection, quiet during the flood.
    let keep = faults::KeepAlive::start(
        &c,
        &c.client(),
        &format!("{}:{ECHO_NODE_PORT}", c.node_ip(1)),
        Duration::from_secs(4),
    )
    .unwrap();
    c.check(
        keep.asker
            .wait_line(Duration::from_secs(5), |l| l.is_ok())
            .is_some(),
        || "the long-lived connection never worked".into(),
    );
    let before = scrape(&c);
    c.check(
        get(&c, &before, "kproxy_bpf_map_max_entries{map=\"KP_CT4_V1\"}") == f64::from(CT_MAX),
        || "--ct-max did not size CT4".into(),
    );

    // The flood: FLOWS datagrams from as many source ports to the UDP nodePort.
    let script = format!(
        "import socket\nfor i in range({FLOWS}):\n    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n    s.bind(('', 20000 + i))\n    s.sendto(b'flood', ('{}', 30053))\n    s.close()\n",
        c.node_ip(1)
    );
    let out = c
        .client()
        .output_timeout(&["python3", "-c", &script], Duration::from_secs(60))
        .expect("flooding");
    c.check(out.status.success(), || format!("flood failed: {out:?}"));
    std::thread::sleep(Duration::from_millis(500));
    let after = scrape(&c);
    let entries = get(&c, &after, "kproxy_bpf_map_entries{map=\"KP_CT4_V1\"}");
    let created = get(&c, &after, &event("conntrack_created"))
        - get(&c, &before, &event("conntrack_created"));
    println!("after {FLOWS} flows: CT4 holds {entries} of {CT_MAX}; {created} entries created");
    c.check(
        entries <= f64::from(CT_MAX) && entries >= f64::from(CT_MAX) / 2.0,
        || format!("CT4 should be full-ish: {entries} of {CT_MAX}"),
    );
    let pressure = get(&c, &after, "kproxy_bpf_map_pressure{map=\"KP_CT4_V1\"}");
    println!("CT4 pressure {pressure}");
    c.check(pressure > 0.5 && pressure <= 1.0, || {
        format!("kproxy_bpf_map_pressure of CT4 is {pressure}")
    });
    c.check(created >= FLOWS as f64, || {
        format!("conntrack_created grew by {created}, fewer than the {FLOWS} flows")
    });

    // New connections and flows are still served.
    let url = format!("http://{}:30001/", c.node_ip(1));
    let results = probe::curl_n(&c.client(), &url, 5, Duration::from_secs(3)).unwrap();
    c.check(results.iter().all(|r| r.ok()), || {
        format!("new connections failed after the flood: {results:?}")
    });
    let lines = c.ask(
        &c.client(),
        &[
            "udp-ask",
            &format!("{}:30053", c.node_ip(1)),
            "--count",
            "3",
        ],
        Duration::from_secs(10),
    );
    c.check(lines.len() == 3 && lines.iter().all(|l| l.is_ok()), || {
        format!(
            "a new UDP flow failed after the flood: {}",
            probe::show(&lines)
        )
    });
    // The long-lived connection survived the eviction of its entry.
    let next = keep
        .asker
        .wait_line(Duration::from_secs(10), |l| l.seq >= 2)
        .unwrap_or_else(|| c.fail("the long-lived connection went quiet"));
    c.check(next.is_ok(), || {
        format!("the long-lived connection broke: {next:?}")
    });
    let end = scrape(&c);
    let lost = get(&c, &end, &event("conntrack_lost_midflow"));
    let failed = get(&c, &end, &event("conntrack_insert_failed"));
    println!("conntrack_lost_midflow {lost}, conntrack_insert_failed {failed}");
}
