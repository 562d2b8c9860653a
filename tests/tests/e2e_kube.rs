//! The Kubernetes API path end to end: a one-node cluster, the in-repo test API server
//! listening inside the node's network namespace, and `kproxy run --kubeconfig` (no
//! `--manifests`) watching it through kube-rs.
//!
//! 1. The seed Service (NodePort mysvc 10.96.100.208:8080 -> 80, nodePort 30001) with pod-a
//!    and pod-b, and a ClusterIP `web2` (10.96.50.50:80 -> pod-c:8081), are served from the
//!    API's initial list.
//! 2. An EndpointSlice change is followed within 2 s.
//! 3. The API server goes away for a few seconds while a client keeps requesting: nothing
//!    fails (the agent serves the last state); the slice is changed while it is down; after
//!    the restart the change is served within 3 s.
//! 4. With the server away, web2 and its slice are deleted and mysvc's slice changed, then
//!    the history is compacted: the watches' resume gets 410 Gone, the agent relists, web2
//!    stops being served and mysvc follows the new slice.
//! 5. A compaction while watching, then a change: relist, converged.
//!
//! `api_away_for_minutes_keeps_serving`: the API server away for 150 s
//! (`KPROXY_API_OUTAGE_SECS`) under continuous nodePort traffic: nothing fails, /healthz
//! stays 200, and the change made meanwhile is served within seconds of the return.

use std::{
    collections::BTreeSet,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use kproxy_tests::{
    apiserver::{Resource, TestApiServer},
    harness::{
        Cluster, fixtures, kproxy_bin,
        manifests::{EndpointSlice, Object, Protocol, Service, render, seed},
        probe::show,
        sys::epoch_ms,
    },
};

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");
const WEB2_IP: &str = "10.96.50.50";

fn mysvc_slice(c: &Cluster, pods: &[&str]) -> String {
    render(&[seed::mysvc_slice(pods.iter().map(|p| c.endpoint(p))).into()])
}

fn web2(c: &Cluster) -> Vec<Object> {
    vec![
        Service::cluster_ip("web2", WEB2_IP)
            .port("http", Protocol::Tcp, 80, 8081, None)
            .into(),
        EndpointSlice::for_service("web2")
            .port("http", Protocol::Tcp, 8081)
            .endpoints([c.endpoint("pod-c")])
            .into(),
    ]
}

/// Starts `kproxy run` on node1 with the harness's arguments, `--manifests` replaced by
/// `--kubeconfig`. Returns the log path.
fn start_api_agent(c: &mut Cluster, kubeconfig: &Path) -> std::path::PathBuf {
    start_api_agent_idx(c, kubeconfig).1
}

/// `start_api_agent`, also returning the process index for `Cluster::stop_extra`.
fn start_api_agent_idx(c: &mut Cluster, kubeconfig: &Path) -> (usize, std::path::PathBuf) {
    let mut argv = vec![kproxy_bin().unwrap().display().to_string()];
    let mut args = c.agent_args(1);
    if let Some(i) = args.iter().position(|a| a == "--manifests") {
        args.drain(i..i + 2);
    }
    argv.extend(args);
    argv.push("--kubeconfig".into());
    argv.push(kubeconfig.display().to_string());
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let place = c.node(1);
    let idx = c.spawn(&place, "kproxy node1 (API)", &argv).unwrap();
    (idx, c.tmp_dir().join(format!("extra-{idx}.log")))
}

/// Waits (30 s at most) for node1's agent to answer /healthz with 200; how long it took.
fn wait_agent_healthy(c: &Cluster, log: &Path) -> Duration {
    let start = Instant::now();
    while c.healthz(1) != 200 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the agent did not become healthy\n{}",
            log_tail(log)
        );
        thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(120);
    format!("---- agent log ----\n{}\n----", lines[from..].join("\n"))
}

/// Curls `url` from `place` until `streak` answers in a row come from `want` only.
/// Returns how long it took.
fn wait_served_by(
    c: &Cluster,
    place: &kproxy_tests::harness::Place,
    url: &str,
    want: &[&str],
    timeout: Duration,
    log: &Path,
) -> Duration {
    let start = Instant::now();
    let mut streak = 0;
    let mut seen = Vec::new();
    while start.elapsed() < timeout {
        let r = c.curl(place, url);
        if r.pod().is_some_and(|p| want.contains(&p)) {
            streak += 1;
            if streak >= 6 {
                return start.elapsed();
            }
        } else {
            streak = 0;
            seen.push(r.to_string());
            thread::sleep(Duration::from_millis(50));
        }
    }
    panic!(
        "{url} not served by {want:?} only within {timeout:?}; other answers: {:#?}\n{}",
        &seen[seen.len().saturating_sub(10)..],
        log_tail(log)
    );
}

#[test]
fn api_source_end_to_end() {
    let mut c = fixtures::one_node(TESTPOD).expect("building the cluster");
    let netns = format!("/var/run/netns/{}", c.node_netns(1));
    let mut api = TestApiServer::in_netns(&netns).expect("starting the API server in node1");
    let mut objects = c.node_objects();
    objects.push(seed::mysvc().into());
    objects.push(seed::mysvc_slice([c.endpoint("pod-a"), c.endpoint("pod-b")]).into());
    objects.extend(web2(&c));
    api.apply_yaml(&render(&objects)).unwrap();
    let kubeconfig = c.tmp_dir().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    println!("API server {} in {netns}", api.url());

    let log = start_api_agent(&mut c, &kubeconfig);
    println!("healthy after {:?}", wait_agent_healthy(&c, &log));

    // 1. Initial list served.
    let client = c.client();
    let pod_z = c.pod("pod-z");
    let np_url = format!("http://{}:{}/", c.node_ip(1), seed::MYSVC_NODEPORT);
    let cip_url = format!("http://{}:{}/", seed::MYSVC_IP, seed::MYSVC_PORT);
    let web2_url = format!("http://{WEB2_IP}:80/");
    let mut seen = BTreeSet::new();
    for _ in 0..16 {
        for (place, url) in [(&client, &np_url), (&pod_z, &cip_url)] {
            let r = c.curl(place, url);
            assert!(r.ok(), "{url}: {r}\n{}", log_tail(&log));
            seen.insert(r.pod().unwrap_or("").to_owned());
        }
    }
    assert_eq!(
        seen,
        ["pod-a".to_owned(), "pod-b".to_owned()].into(),
        "initial endpoints"
    );
    let r = c.curl(&pod_z, &web2_url);
    // nginx on 8081 answers `pod-c:8081 <client>`.
    assert_eq!(r.pod(), Some("pod-c:8081"), "web2: {r}");

    // 2. An endpoint change.
    api.apply_yaml(&mysvc_slice(&c, &["pod-a", "pod-c"]))
        .unwrap();
    let took = wait_served_by(
        &c,
        &client,
        &np_url,
        &["pod-a", "pod-c"],
        Duration::from_secs(5),
        &log,
    );
    println!("endpoint change served within {took:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");

    // The API source's events feed kube-proxy's change metrics and programming latency.
    let out = c
        .node(1)
        .output(&["curl", "-s", "-m", "3", "http://127.0.0.1:10249/metrics"])
        .expect("scraping the metrics");
    let metrics = String::from_utf8_lossy(&out.stdout).into_owned();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from the metrics:\n{metrics}"))
    };
    assert!(value("kubeproxy_sync_proxy_rules_service_changes_total") >= 2.0);
    assert!(value("kubeproxy_sync_proxy_rules_endpoint_changes_total") >= 3.0);
    assert!(value("kubeproxy_network_programming_duration_seconds_count") >= 1.0);

    // 3. The API server away while traffic flows; a change made meanwhile.
    let asker = c.nodeport_asker(200);
    assert!(
        asker
            .wait_line(Duration::from_secs(5), |l| l.seq >= 10)
            .is_some(),
        "the client did not start"
    );
    let t_down = epoch_ms();
    api.stop();
    thread::sleep(Duration::from_secs(2));
    api.apply_yaml(&mysvc_slice(&c, &["pod-b", "pod-c"]))
        .unwrap();
    thread::sleep(Duration::from_secs(2));
    let t_up = epoch_ms();
    api.start().unwrap();
    let lines = asker.finish(Duration::from_secs(60)).expect("the client");
    let timeline = show(&lines);
    assert!(lines.len() >= 190, "{timeline}");
    let failed: Vec<String> = lines
        .iter()
        .filter(|l| !l.is_ok())
        .map(|l| l.to_string())
        .collect();
    assert!(
        failed.is_empty(),
        "requests failed around the outage ({t_down}..{t_up}): {failed:#?}\n{timeline}"
    );
    let Some(first_b) = lines.iter().find(|l| l.pod() == Some("pod-b")) else {
        panic!(
            "the change made during the outage was never served\n{timeline}\n{}",
            log_tail(&log)
        );
    };
    assert!(
        first_b.ts_ms >= t_up,
        "pod-b answered before the API server came back\n{timeline}"
    );
    let latency = first_b.ts_ms - t_up;
    let a_after = lines
        .iter()
        .filter(|l| l.ts_ms > first_b.ts_ms && l.pod() == Some("pod-a"))
        .count();
    println!(
        "outage {} ms, {} requests, none failed; change served {latency} ms after the restart",
        t_up - t_down,
        lines.len()
    );
    assert!(latency <= 3000, "took {latency} ms\n{}", log_tail(&log));
    assert_eq!(a_after, 0, "pod-a answered after the change\n{timeline}");

    // 4. Changes in a gap the history no longer covers: 410 Gone, relist.
    let expired_before = api.stats().expired;
    let lists_before = api.stats().lists(Resource::EndpointSlices);
    api.stop();
    api.delete("Service", "default", "web2").unwrap();
    api.delete("EndpointSlice", "default", "web2-abc12")
        .unwrap();
    api.apply_yaml(&mysvc_slice(&c, &["pod-a"])).unwrap();
    api.compact();
    api.start().unwrap();
    let took = wait_served_by(
        &c,
        &client,
        &np_url,
        &["pod-a"],
        Duration::from_secs(5),
        &log,
    );
    println!("relist after 410 served within {took:?} of the restart");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    let s = api.stats();
    assert!(s.expired > expired_before, "no 410 was sent: {s:?}");
    assert!(s.lists(Resource::EndpointSlices) > lists_before, "{s:?}");
    // web2 is gone: its cluster IP is not translated any more.
    let r = c.curl(&pod_z, &web2_url);
    assert!(
        !r.ok(),
        "web2 still served after it was deleted: {r}\n{}",
        log_tail(&log)
    );

    // 5. Compaction while watching, then a change.
    api.compact();
    api.apply_yaml(&mysvc_slice(&c, &["pod-b"])).unwrap();
    let took = wait_served_by(
        &c,
        &client,
        &np_url,
        &["pod-b"],
        Duration::from_secs(5),
        &log,
    );
    println!("change after a compaction served within {took:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(
        c.curl(&pod_z, &cip_url).pod() == Some("pod-b"),
        "cluster IP after the relist"
    );
}

/// The server's socket lives in the given network namespace (reachable there, not here),
/// and a restart rebinds the same port there.
#[test]
fn api_server_listens_in_a_netns() {
    kproxy_tests::harness::sys::require_root().unwrap();
    let ns = kproxy_tests::harness::sys::NetNs::create(&format!(
        "{}api",
        kproxy_tests::harness::sys::unique_id()
    ))
    .unwrap();
    let mut api = TestApiServer::in_netns(ns.path()).unwrap();
    api.apply_yaml(&render(&[seed::mysvc().into()])).unwrap();
    let get = |url: &str| {
        std::process::Command::new("ip")
            .args(["netns", "exec", ns.name(), "curl", "-sS", "--max-time", "2"])
            .arg(url)
            .output()
            .unwrap()
    };
    let url = format!("{}/api/v1/services", api.url());
    let out = get(&url);
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && body.contains("\"ServiceList\"") && body.contains("mysvc"),
        "{body} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::net::TcpStream::connect(api.addr()).is_err(),
        "reachable outside the namespace"
    );
    let port = api.addr().port();
    api.restart(Duration::from_millis(100)).unwrap();
    assert_eq!(api.addr().port(), port);
    let out = get(&format!(
        "{url}?watch=true&resourceVersion=1&timeoutSeconds=1"
    ));
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(body.contains("\"ERROR\"") && body.contains("410"), "{body}");
}

/// Issue 5: the agent restarted (killed) while the API server is down serves the pinned
/// state: the new agent must not flush or rewrite the maps before it has an initial list, so
/// the Services programmed before keep working (nodePort under continuous traffic, cluster
/// IPs from a pod); when the API server comes back it converges, including a change made
/// while it was away.
#[test]
fn agent_restarted_while_the_api_is_down_serves_the_pinned_state() {
    let mut c = fixtures::one_node(TESTPOD).expect("building the cluster");
    let netns = format!("/var/run/netns/{}", c.node_netns(1));
    let mut api = TestApiServer::in_netns(&netns).expect("starting the API server in node1");
    let mut objects = c.node_objects();
    objects.push(seed::mysvc().into());
    objects.push(seed::mysvc_slice([c.endpoint("pod-a"), c.endpoint("pod-b")]).into());
    objects.extend(web2(&c));
    api.apply_yaml(&render(&objects)).unwrap();
    let kubeconfig = c.tmp_dir().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();

    let (first, log1) = start_api_agent_idx(&mut c, &kubeconfig);
    wait_agent_healthy(&c, &log1);
    let client = c.client();
    let pod_z = c.pod("pod-z");
    let np_url = format!("http://{}:{}/", c.node_ip(1), seed::MYSVC_NODEPORT);
    let cip_url = format!("http://{}:{}/", seed::MYSVC_IP, seed::MYSVC_PORT);
    let web2_url = format!("http://{WEB2_IP}:80/");
    wait_served_by(
        &c,
        &client,
        &np_url,
        &["pod-a", "pod-b"],
        Duration::from_secs(5),
        &log1,
    );

    // Traffic throughout; the API server goes away, then the agent is killed and restarted.
    let asker = c.nodeport_asker(300);
    assert!(
        asker
            .wait_line(Duration::from_secs(5), |l| l.seq >= 10)
            .is_some(),
        "the client did not start"
    );
    let t_down = epoch_ms();
    api.stop();
    c.stop_extra(first);
    let (_, log2) = start_api_agent_idx(&mut c, &kubeconfig);
    thread::sleep(Duration::from_secs(3));
    // The new agent runs, has not programmed anything, and everything is still served.
    let text = std::fs::read_to_string(&log2).unwrap_or_default();
    assert!(
        text.contains("kproxy started") && !text.contains("sync programmed"),
        "the new agent should run and wait for the API before programming\n{}",
        log_tail(&log2)
    );
    let mut seen = BTreeSet::new();
    // 20 tries: each new connection picks one of the two at random (a miss: 2^-19).
    for _ in 0..20 {
        let r = c.curl(&pod_z, &cip_url);
        assert!(
            r.ok(),
            "cluster IP while the API is down: {r}\n{}",
            log_tail(&log2)
        );
        seen.insert(r.pod().unwrap_or("").to_owned());
        let r = c.curl(&pod_z, &web2_url);
        assert_eq!(
            r.pod(),
            Some("pod-c:8081"),
            "web2 while the API is down: {r}"
        );
    }
    assert_eq!(seen, ["pod-a".to_owned(), "pod-b".to_owned()].into());

    // A change made while the API server is away, served once it is back.
    api.apply_yaml(&mysvc_slice(&c, &["pod-b", "pod-c"]))
        .unwrap();
    thread::sleep(Duration::from_secs(1));
    let t_up = epoch_ms();
    api.start().unwrap();
    let took = wait_served_by(
        &c,
        &client,
        &np_url,
        &["pod-b", "pod-c"],
        Duration::from_secs(10),
        &log2,
    );
    let lines = asker.finish(Duration::from_secs(60)).expect("the client");
    let timeline = show(&lines);
    let failed: Vec<String> = lines
        .iter()
        .filter(|l| !l.is_ok())
        .map(|l| l.to_string())
        .collect();
    println!(
        "API down {} ms, agent restarted meanwhile; {} requests, {} failed; the change made during the outage served {took:?} after the API came back",
        t_up - t_down,
        lines.len(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "requests failed while the API was down and the agent restarted: {failed:#?}\n{timeline}\n{}",
        log_tail(&log2)
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let r = c.curl(&pod_z, &web2_url);
    assert_eq!(
        r.pod(),
        Some("pod-c:8081"),
        "web2 after the API came back: {r}"
    );
}

/// How long `api_away_for_minutes_keeps_serving` keeps the API server away
/// (`KPROXY_API_OUTAGE_SECS`, default 150).
fn outage_secs() -> u64 {
    std::env::var("KPROXY_API_OUTAGE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150)
}

/// The API server away for minutes while a client keeps requesting the nodePort: no request
/// fails, /healthz stays 200 (a liveness probe must not restart the agent for an outage it
/// rides out), and a change made during the outage is served within seconds of the return
/// (the reconnect delay is capped; kube-rs's default backoff would have grown to tens of
/// seconds by then).
#[test]
fn api_away_for_minutes_keeps_serving() {
    let outage = Duration::from_secs(outage_secs());
    let mut c = fixtures::one_node(TESTPOD).expect("building the cluster");
    let netns = format!("/var/run/netns/{}", c.node_netns(1));
    let mut api = TestApiServer::in_netns(&netns).expect("starting the API server in node1");
    let mut objects = c.node_objects();
    objects.push(seed::mysvc().into());
    objects.push(seed::mysvc_slice([c.endpoint("pod-a")]).into());
    api.apply_yaml(&render(&objects)).unwrap();
    let kubeconfig = c.tmp_dir().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let log = start_api_agent(&mut c, &kubeconfig);
    wait_agent_healthy(&c, &log);
    let client = c.client();
    let np_url = format!("http://{}:{}/", c.node_ip(1), seed::MYSVC_NODEPORT);
    wait_served_by(
        &c,
        &client,
        &np_url,
        &["pod-a"],
        Duration::from_secs(10),
        &log,
    );

    // ~20 requests a second for the outage and 15 s around it.
    let count = (outage.as_secs() as u32 + 15) * 20;
    let asker = c.nodeport_asker(count);
    assert!(
        asker
            .wait_line(Duration::from_secs(5), |l| l.seq >= 10)
            .is_some(),
        "the client did not start"
    );
    let t_down = epoch_ms();
    api.stop();
    let down_since = Instant::now();
    let mut changed = false;
    let mut unhealthy = Vec::new();
    while down_since.elapsed() < outage {
        let status = c.healthz(1);
        if status != 200 {
            unhealthy.push((down_since.elapsed(), status));
        }
        if !changed && down_since.elapsed() > outage / 2 {
            // Made while the agent cannot see it.
            api.apply_yaml(&mysvc_slice(&c, &["pod-b"])).unwrap();
            changed = true;
        }
        thread::sleep(Duration::from_secs(5));
    }
    let t_up = epoch_ms();
    api.start().unwrap();
    let lines = asker
        .finish(outage + Duration::from_secs(120))
        .expect("the client");
    let timeline = show(&lines);
    let failed: Vec<String> = lines
        .iter()
        .filter(|l| !l.is_ok())
        .map(|l| l.to_string())
        .collect();
    assert!(
        failed.is_empty(),
        "requests failed around the outage ({t_down}..{t_up}): {failed:#?}\n{}",
        log_tail(&log)
    );
    assert!(
        unhealthy.is_empty(),
        "/healthz was not 200 during the outage: {unhealthy:?}"
    );
    let served_before_down = lines.iter().filter(|l| l.ts_ms < t_down).count();
    let served_during = lines
        .iter()
        .filter(|l| l.ts_ms >= t_down && l.ts_ms < t_up)
        .count();
    assert!(
        served_before_down > 0 && served_during as u64 >= outage.as_secs() * 5,
        "too few requests ran during the outage ({served_during})\n{timeline}"
    );
    let Some(first_b) = lines.iter().find(|l| l.pod() == Some("pod-b")) else {
        panic!(
            "the change made during the outage was never served\n{}",
            log_tail(&log)
        );
    };
    assert!(
        first_b.ts_ms >= t_up,
        "pod-b answered before the API server came back"
    );
    let latency = first_b.ts_ms - t_up;
    println!(
        "API away {} ms: {} requests ({served_during} during the outage), none failed, /healthz 200 throughout; the change made during the outage served {latency} ms after the return",
        t_up - t_down,
        lines.len()
    );
    assert!(latency <= 5000, "took {latency} ms\n{}", log_tail(&log));
}
