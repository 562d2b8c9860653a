//! The datapath counters end to end: requests through the nodePort (device programs) and the
//! cluster IP (socket hooks) show up in the scraped `kproxy_service_*_total` and
//! `kproxy_datapath_events_total` series, in `kproxy status` and in `kproxy list services`.

use std::{collections::BTreeMap, time::Duration};

use kproxy_tests::harness::{
    Cluster, fixtures, kproxy_bin,
    manifests::seed,
    probe::{self, tally},
};
use proxy_common::stats::STAT_NAMES;

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");
/// Requests per path.
const N: usize = 10;
const SERVICE: &str = "default/mysvc:http/TCP";

/// `/metrics` of node1's agent as `series -> value`.
fn scrape(c: &Cluster) -> BTreeMap<String, f64> {
    let out = c
        .node(1)
        .output_timeout(
            &[
                "curl",
                "-sS",
                "--max-time",
                "5",
                "http://127.0.0.1:10249/metrics",
            ],
            Duration::from_secs(10),
        )
        .expect("curl metrics");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    c.check(out.status.success() && !text.is_empty(), || {
        format!("scraping failed: {}", String::from_utf8_lossy(&out.stderr))
    });
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| c.fail(format!("bad line {l:?}")));
            let value = value
                .parse::<f64>()
                .unwrap_or_else(|_| c.fail(format!("bad value in {l:?}")));
            (series.to_string(), value)
        })
        .collect()
}

fn svc_series(name: &str, frontend: &str) -> String {
    format!("{name}{{service=\"{SERVICE}\",frontend=\"{frontend}\"}}")
}

fn event_series(reason: &str) -> String {
    format!("kproxy_datapath_events_total{{reason=\"{reason}\"}}")
}

/// How much `series` grew from `before` to `after` (a missing series fails the test).
fn grew(
    c: &Cluster,
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    series: &str,
) -> f64 {
    let get = |m: &BTreeMap<String, f64>| {
        *m.get(series).unwrap_or_else(|| {
            c.fail(format!(
                "{series} missing; kproxy_* series: {:?}",
                m.keys()
                    .filter(|k| k.starts_with("kproxy_"))
                    .collect::<Vec<_>>()
            ))
        })
    };
    get(after) - get(before)
}

/// `kproxy <args> --bpf-root <node1's root>` in node1; stdout.
fn kproxy(c: &Cluster, args: &[&str]) -> String {
    let bin = kproxy_bin().expect("kproxy binary");
    let root = c.node_bpf_root(1);
    let mut argv = vec![bin.to_str().unwrap()];
    argv.extend_from_slice(args);
    argv.extend_from_slice(&["--bpf-root", root.to_str().unwrap()]);
    let out = c
        .node(1)
        .output_timeout(&argv, Duration::from_secs(30))
        .expect("running kproxy");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    c.check(out.status.success(), || {
        format!(
            "{argv:?} failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    stdout
}

#[test]
fn requests_are_counted_per_service_and_by_reason() {
    let mut c = fixtures::one_node(TESTPOD).expect("building the cluster");
    fixtures::write_seed(&c, &["pod-a", "pod-b"], &["pod-a", "pod-b"]).expect("manifests");
    c.start_agent_ready(1).expect("starting the agent");

    let np = format!("0.0.0.0:{}/TCP", seed::MYSVC_NODEPORT);
    let cip = format!("{}:{}/TCP", seed::MYSVC_IP, seed::MYSVC_PORT);
    let before = scrape(&c);
    for reason in STAT_NAMES {
        c.check(before.contains_key(&event_series(reason)), || {
            format!("no {} series", event_series(reason))
        });
    }
    for fe in [&np, &cip] {
        for name in [
            "kproxy_service_packets_total",
            "kproxy_service_bytes_total",
            "kproxy_service_connections_total",
        ] {
            let s = svc_series(name, fe);
            c.check(before.contains_key(&s), || {
                format!("{s} missing before any traffic")
            });
        }
    }

    // N requests from the outside client through the nodePort (XDP/tc), N from a pod through
    // the cluster IP (connect4).
    let url = format!("http://{}:{}/", c.node_ip(1), seed::MYSVC_NODEPORT);
    let results = probe::curl_n(&c.client(), &url, N, Duration::from_secs(3)).unwrap();
    c.check(results.len() == N && results.iter().all(|r| r.ok()), || {
        format!("client -> {url}: {:?}", tally(&results))
    });
    let url = format!("http://{}:{}/", seed::MYSVC_IP, seed::MYSVC_PORT);
    let pod = c.pod(fixtures::CLIENT_POD);
    let results = probe::curl_n(&pod, &url, N, Duration::from_secs(3)).unwrap();
    c.check(results.len() == N && results.iter().all(|r| r.ok()), || {
        format!("pod-z -> {url}: {:?}", tally(&results))
    });

    let after = scrape(&c);
    let n = N as f64;
    let d = |series: &str| grew(&c, &before, &after, series);
    let np_packets = d(&svc_series("kproxy_service_packets_total", &np));
    let np_bytes = d(&svc_series("kproxy_service_bytes_total", &np));
    let np_conns = d(&svc_series("kproxy_service_connections_total", &np));
    let cip_packets = d(&svc_series("kproxy_service_packets_total", &cip));
    let cip_conns = d(&svc_series("kproxy_service_connections_total", &cip));
    println!(
        "nodePort {np}: +{np_packets} packets, +{np_bytes} bytes, +{np_conns} connections; \
         cluster IP {cip}: +{cip_packets} packets, +{cip_conns} connections"
    );
    // Each request is at least a SYN, a request and their replies.
    assert!(
        np_packets >= 4.0 * n,
        "nodePort packets grew by {np_packets}"
    );
    assert!(
        np_bytes >= 40.0 * np_packets,
        "nodePort bytes grew by {np_bytes}"
    );
    assert!(np_conns >= n, "nodePort connections grew by {np_conns}");
    // Socket-level translation: connections only, no per-packet work.
    assert!(cip_conns >= n, "cluster IP connections grew by {cip_conns}");
    assert_eq!(
        cip_packets, 0.0,
        "cluster IP traffic is not seen per packet"
    );
    let total = |name: &str| -> f64 {
        after
            .iter()
            .filter(|(k, _)| k.starts_with(name) && k.contains(&format!("service=\"{SERVICE}\"")))
            .map(|(_, v)| v)
            .sum()
    };
    assert!(total("kproxy_service_packets_total{") >= n);
    assert!(total("kproxy_service_connections_total{") >= 2.0 * n);

    let fwd = d(&event_series("translated_forward"));
    let rev = d(&event_series("translated_reply"));
    let connect = d(&event_series("sock_connect_translated"));
    println!(
        "events: +{fwd} translated_forward, +{rev} translated_reply, +{connect} sock_connect_translated"
    );
    assert!(fwd >= 2.0 * n && rev >= 2.0 * n, "fwd {fwd}, rev {rev}");
    assert!(connect >= n, "connect {connect}");
    assert!(
        fwd + rev <= np_packets,
        "per-frontend packets ({np_packets}) cover every device translation ({fwd} + {rev})"
    );

    // The same counters through the operator commands.
    let status = kproxy(&c, &["status"]);
    println!("$ kproxy status\n{status}");
    assert!(
        status.contains("Datapath events") && status.contains("translated_forward"),
        "{status}"
    );
    let list = kproxy(&c, &["list", "services", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&list).expect("list services JSON");
    let entry = v
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|e| e["frontend"] == format!("{np} (nodePort)").as_str())
        })
        .unwrap_or_else(|| c.fail(format!("no nodePort frontend in {v:#}")));
    assert!(
        entry["traffic"]["connections"].as_u64().unwrap_or(0) >= N as u64,
        "{entry:#}"
    );
    println!(
        "$ kproxy list services\n{}",
        kproxy(&c, &["list", "services"])
    );
}
