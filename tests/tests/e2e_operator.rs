//! The operator commands against a running agent (and after it stopped): `kproxy list
//! services|backends|conntrack|affinity`, `kproxy trace`, `kproxy status`, and the metrics
//! endpoint scraped and parsed.

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use kproxy_tests::harness::{
    CLIENT_IP, Cluster, PodSpec, kproxy_bin,
    manifests::{Object, seed},
};
use serde_json::Value;

/// `kproxy <args> --bpf-root <node1's root>` in node1; stdout (panics on failure).
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
            "{argv:?} failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    stdout
}

fn kproxy_json(c: &Cluster, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend_from_slice(&["-o", "json"]);
    let text = kproxy(c, &a);
    serde_json::from_str(&text)
        .unwrap_or_else(|e| c.fail(format!("{args:?}: bad JSON ({e}):\n{text}")))
}

/// The frontend entry with this label in `list services -o json`.
fn frontend<'a>(services: &'a Value, label: &str) -> Option<&'a Value> {
    services
        .as_array()?
        .iter()
        .find(|s| s["frontend"].as_str() == Some(label))
}

fn backend_addrs(fe: &Value) -> Vec<String> {
    let mut v: Vec<String> = fe["backends"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| format!("{}:{}", b["address"].as_str().unwrap_or("?"), b["port"]))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Prometheus text format: every line a comment or `name{labels} value`; returns the samples.
fn parse_prometheus(c: &Cluster, text: &str) -> BTreeMap<String, f64> {
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            c.check(
                rest.starts_with(" HELP ") || rest.starts_with(" TYPE "),
                || format!("bad comment line {line:?}"),
            );
            if let Some(t) = rest.strip_prefix(" TYPE ") {
                let ty = t.split_whitespace().nth(1).unwrap_or("");
                c.check(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&ty),
                    || format!("bad TYPE in {line:?}"),
                );
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| c.fail(format!("no value in {line:?}")));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| c.fail(format!("bad value in {line:?}")));
        let name = series.split('{').next().unwrap();
        c.check(
            !name.is_empty()
                && !name.starts_with(|ch: char| ch.is_ascii_digit())
                && name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':'),
            || format!("bad metric name in {line:?}"),
        );
        let labels = &series[name.len()..];
        c.check(
            labels.is_empty()
                || (labels.starts_with('{')
                    && labels.ends_with('}')
                    && labels[1..labels.len() - 1].split(',').all(|kv| {
                        kv.split_once('=')
                            .is_some_and(|(_, v)| v.starts_with('"') && v.ends_with('"'))
                    })),
            || format!("bad labels in {line:?}"),
        );
        samples.insert(series.to_string(), value);
    }
    samples
}

fn get(c: &Cluster, m: &BTreeMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| c.fail(format!("metric {series} missing; have {:?}", m.keys())))
}

/// Checks list/trace/status against what the client saw; used with the agent running and
/// after it stopped.
fn check_commands(c: &Cluster, pods: &BTreeMap<String, Ipv4Addr>, sport: u16, answered: &str) {
    let all: Vec<String> = {
        let mut v: Vec<String> = pods.values().map(|ip| format!("{ip}:80")).collect();
        v.sort();
        v
    };
    // list services
    let services = kproxy_json(c, &["list", "services"]);
    let label = format!("{}:{}/TCP", seed::MYSVC_IP, seed::MYSVC_PORT);
    let cip = frontend(&services, &label)
        .unwrap_or_else(|| c.fail(format!("no frontend {label} in {services:#}")));
    assert_eq!(backend_addrs(cip), all, "{label}: {cip:#}");
    assert_eq!(cip["types"], serde_json::json!(["ClusterIP"]));
    let label = format!("0.0.0.0:{}/TCP (nodePort)", seed::MYSVC_NODEPORT);
    let np = frontend(&services, &label)
        .unwrap_or_else(|| c.fail(format!("no frontend {label} in {services:#}")));
    assert_eq!(backend_addrs(np), all, "{label}: {np:#}");
    assert_eq!(np["backend_count"], 2);
    assert!(
        np["backends"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["state"] == "active" && b["locality"] == "local"),
        "{np:#}"
    );
    let table = kproxy(c, &["list", "services"]);
    println!("$ kproxy list services\n{table}");
    assert!(
        table.contains("0.0.0.0:30001/TCP (nodePort)") && table.contains("10.96.100.208:8080/TCP"),
        "{table}"
    );

    // list backends
    let backends = kproxy_json(c, &["list", "backends"]);
    assert_eq!(backends.as_array().map(Vec::len), Some(4), "{backends:#}");
    println!(
        "$ kproxy list backends\n{}",
        kproxy(c, &["list", "backends"])
    );

    // list conntrack
    let client = format!("{CLIENT_IP}:{sport}");
    let answered_ip = pods[answered];
    let ct = kproxy_json(
        c,
        &["list", "conntrack", "--client", &CLIENT_IP.to_string()],
    );
    let flow = ct["flows"]
        .as_array()
        .and_then(|f| f.iter().find(|e| e["client"].as_str() == Some(&client)))
        .unwrap_or_else(|| c.fail(format!("no conntrack flow from {client}: {ct:#}")));
    assert_eq!(
        flow["frontend"],
        format!("{}:{}", c.node_ip(1), seed::MYSVC_NODEPORT)
    );
    assert_eq!(flow["backend"], format!("{answered_ip}:80"), "{flow:#}");
    assert!(
        flow["snat"].is_null(),
        "a local backend needs no SNAT: {flow:#}"
    );
    // Filters.
    let none = kproxy_json(c, &["list", "conntrack", "--client", "198.18.0.222"]);
    assert_eq!(none["flows"].as_array().map(Vec::len), Some(0), "{none:#}");
    let by_svc = kproxy_json(
        c,
        &[
            "list",
            "conntrack",
            "--service",
            &format!("0.0.0.0:{}", seed::MYSVC_NODEPORT),
            "--backend",
            &answered_ip.to_string(),
        ],
    );
    assert!(
        by_svc["flows"]
            .as_array()
            .is_some_and(|f| f.iter().any(|e| e["client"].as_str() == Some(&client))),
        "{by_svc:#}"
    );
    let table = kproxy(c, &["list", "conntrack"]);
    println!("$ kproxy list conntrack\n{table}");
    assert!(table.contains(&client), "{table}");

    // list affinity: no Service has affinity here, said plainly (with where the rule modes
    // keep theirs), exit 0.
    let aff = kproxy(c, &["list", "affinity"]);
    assert!(aff.contains("no session-affinity entries"), "{aff}");

    // trace: the exact tuple names the backend that answered.
    let dst = format!("{}:{}/tcp", c.node_ip(1), seed::MYSVC_NODEPORT);
    let t = kproxy_json(c, &["trace", &client, &dst]);
    assert_eq!(t["verdict"], "conntrack", "{t:#}");
    assert_eq!(t["match"], "nodePort", "{t:#}");
    assert_eq!(t["backend"]["address"], answered_ip.to_string(), "{t:#}");
    println!(
        "$ kproxy trace {client} {dst}\n{}",
        kproxy(c, &["trace", &client, &dst])
    );
    // Another source port: a new flow, either pod with probability 1/2.
    let other = kproxy_json(c, &["trace", &format!("{CLIENT_IP}:1"), &dst]);
    assert_eq!(other["verdict"], "random", "{other:#}");
    assert_eq!(
        other["candidates"].as_array().map(Vec::len),
        Some(2),
        "{other:#}"
    );
    let nosvc = kproxy_json(
        c,
        &["trace", &client, &format!("{}:30999/tcp", c.node_ip(1))],
    );
    assert_eq!(nosvc["verdict"], "not-a-service", "{nosvc:#}");
}

fn check_status(c: &Cluster, agent_running: bool) -> Value {
    let mut args = vec!["status"];
    let hz = format!("{}:10256", c.node_ip(1));
    if agent_running {
        args.extend_from_slice(&["--healthz-address", &hz]);
    }
    let s = kproxy_json(c, &args);
    assert_eq!(s["mode"], "ebpf", "{s:#}");
    assert_eq!(s["ready"], true, "{s:#}");
    let links = s["links"].as_array().cloned().unwrap_or_default();
    let hooks: Vec<String> = links
        .iter()
        .map(|l| {
            format!(
                "{} {}",
                l["hook"].as_str().unwrap_or(""),
                l["target"].as_str().unwrap_or("")
            )
        })
        .collect();
    for want in [
        "cgroup kproxy_sock4_connect",
        "cgroup kproxy_sock4_sendmsg",
        "cgroup kproxy_sock4_recvmsg",
        "cgroup kproxy_sock4_getpeername",
        "tc/egress eth0",
    ] {
        assert!(
            hooks.iter().any(|h| h == want),
            "link {want} missing: {hooks:?}"
        );
    }
    assert!(
        hooks
            .iter()
            .any(|h| h == "xdp eth0" || h == "tc/ingress eth0"),
        "no ingress link on eth0: {hooks:?}"
    );
    for l in &links {
        assert!(
            l["program_id"].as_u64().unwrap_or(0) > 0,
            "link without program: {l:#}"
        );
        assert!(
            l["program"]
                .as_str()
                .is_some_and(|p| p.starts_with("kproxy_")),
            "{l:#}"
        );
    }
    let maps: BTreeMap<String, (u64, u64)> = s["maps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_string(),
                (
                    m["entries"].as_u64().unwrap(),
                    m["max_entries"].as_u64().unwrap(),
                ),
            )
        })
        .collect();
    // 2 frontends x (master + 2 slots).
    assert_eq!(maps["KP_LB4_SVC_V1"].0, 6, "{maps:?}");
    assert_eq!(maps["KP_LB4_BE_V1"].0, 4, "{maps:?}");
    assert!(
        maps["KP_CT4_V1"].0 >= 1 && maps["KP_CT4_V1"].1 > 1000,
        "{maps:?}"
    );
    if agent_running {
        assert_eq!(s["agent"]["synced"], true, "{s:#}");
    }
    assert!(s["errors"].as_array().is_some_and(Vec::is_empty), "{s:#}");
    s
}

#[test]
fn operator_commands_and_metrics() {
    let mut c = Cluster::builder()
        .nodes(1)
        .pod(PodSpec::new("pod-a", 1))
        .pod(PodSpec::new("pod-b", 1))
        .build()
        .expect("building the cluster");
    let objs: Vec<Object> = vec![
        seed::mysvc().into(),
        seed::mysvc_slice([c.endpoint("pod-a"), c.endpoint("pod-b")]).into(),
    ];
    c.write_manifests("mysvc.yaml", &objs).expect("manifests");
    let started = c.start_agent_ready(1);
    c.ok(started);
    let pods: BTreeMap<String, Ipv4Addr> = ["pod-a", "pod-b"]
        .iter()
        .map(|p| (p.to_string(), c.pod_ip(p)))
        .collect();

    // One request from the outside client, from a known source port.
    let sport: u16 = 40123;
    let url = format!("http://{}:{}/", c.node_ip(1), seed::MYSVC_NODEPORT);
    let out = c
        .client()
        .output_timeout(
            &[
                "curl",
                "-sS",
                "--max-time",
                "3",
                "--local-port",
                &sport.to_string(),
                &url,
            ],
            Duration::from_secs(10),
        )
        .expect("curl");
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    c.check(out.status.success(), || {
        format!(
            "curl {url} failed: {body} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let answered = body.split_whitespace().next().unwrap_or("").to_string();
    assert!(pods.contains_key(&answered), "unexpected answer {body:?}");
    assert_eq!(
        body.split_whitespace().nth(1),
        Some("198.18.0.100"),
        "{body}"
    );
    println!("client {CLIENT_IP}:{sport} -> {url}: answered by {answered}");

    check_commands(&c, &pods, sport, &answered);
    let s = check_status(&c, true);
    println!("$ kproxy status (json)\n{s:#}");
    println!(
        "$ kproxy status --healthz-address\n{}",
        kproxy(
            &c,
            &[
                "status",
                "--healthz-address",
                &format!("{}:10256", c.node_ip(1))
            ]
        )
    );

    // Metrics, scraped inside node1 at the agent's default metrics address.
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
        format!(
            "scraping metrics failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let m = parse_prometheus(&c, &text);
    let syncs = get(&c, &m, "kubeproxy_sync_proxy_rules_duration_seconds_count");
    assert!(syncs >= 1.0, "{text}");
    assert_eq!(
        get(
            &c,
            &m,
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"+Inf\"}"
        ),
        syncs
    );
    let sum = get(&c, &m, "kubeproxy_sync_proxy_rules_duration_seconds_sum");
    assert!(
        sum > 0.0 && sum / syncs < 5.0,
        "sync durations: sum {sum} over {syncs}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let last = get(&c, &m, "kubeproxy_sync_proxy_rules_last_timestamp_seconds");
    assert!(
        last <= now + 1.0 && now - last < 600.0,
        "last sync {last}, now {now}"
    );
    let np = get(
        &c,
        &m,
        "kubeproxy_network_programming_duration_seconds_count",
    );
    assert!(np >= 1.0, "{text}");
    let np_sum = get(&c, &m, "kubeproxy_network_programming_duration_seconds_sum");
    assert!(np_sum / np < 30.0, "programming latency {np_sum}/{np}");
    assert!(get(&c, &m, "kubeproxy_sync_proxy_rules_service_changes_total") >= 1.0);
    assert!(get(&c, &m, "kubeproxy_sync_proxy_rules_endpoint_changes_total") >= 1.0);
    assert_eq!(
        get(
            &c,
            &m,
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"internal\"}"
        ),
        0.0
    );
    assert_eq!(get(&c, &m, "kproxy_frontends"), 2.0);
    assert_eq!(get(&c, &m, "kproxy_backends"), 4.0);
    assert_eq!(get(&c, &m, "kproxy_proxy_mode{mode=\"ebpf\"}"), 1.0);
    assert_eq!(
        get(&c, &m, "kproxy_bpf_map_entries{map=\"KP_LB4_SVC_V1\"}"),
        6.0
    );
    assert!(get(&c, &m, "kproxy_bpf_map_entries{map=\"KP_CT4_V1\"}") >= 1.0);
    assert_eq!(
        get(&c, &m, "kproxy_bpf_map_max_entries{map=\"KP_CT4_V1\"}"),
        262_144.0
    );
    println!(
        "metrics: {} samples, {syncs} syncs, programming {:.1} ms avg",
        m.len(),
        np_sum / np * 1000.0
    );

    // The agent stops; programs and maps stay pinned, and the commands still answer.
    c.stop_agent(1);
    check_commands(&c, &pods, sport, &answered);
    check_status(&c, false);
    println!("after the agent stopped:\n{}", kproxy(&c, &["status"]));
}

/// Completions and the man page come from the clap definitions.
#[test]
fn completions_and_man_page() {
    let bin = kproxy_bin().expect("kproxy binary");
    for (args, want) in [
        (&["completions", "bash"][..], "conntrack"),
        (&["completions", "zsh"][..], "#compdef kproxy"),
        (&["completions", "fish"][..], "complete -c kproxy"),
        (&["man"][..], ".TH kproxy"),
    ] {
        let out = std::process::Command::new(&bin)
            .args(args)
            .output()
            .expect("kproxy");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains(want), "{args:?} lacks {want:?}:\n{text}");
    }
}
