//! `kproxy-bench`: every proxy mode side by side on one netns cluster (run through
//! `cargo xtask bench [--quick] [--out DIR]`; needs root). See BENCHMARKS.md for what each
//! number means. The same binary is also the load generator and the packet sink, run inside
//! the namespaces as `kproxy-bench udp-flood|udp-sink|connect-loop|connect-latency`.

use std::{
    fs,
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use kproxy_tests::bench::{
    change_latency, load, report,
    report::{ModeResult, Report, ScaleResult},
    sys_stats,
};
use kproxy_tests::harness::{
    Cluster, PodSpec, kproxy_bin,
    manifests::{Endpoint, EndpointSlice, Object, Protocol, Service},
};

const UDP_PORT: u16 = 9000;
const UDP_NODEPORT: u16 = 30900;
const IPERF_PORT: u16 = 5201;
const IPERF_NODEPORT: u16 = 30520;
const WEB_IP: &str = "10.96.50.1";
/// `kproxy cleanup` after a mode at scale: iptables-nft removes 10,000 Services' chains in
/// about a minute here; cut short, the next mode's agent would have to finish it before it
/// is healthy.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(600);

struct Settings {
    quick: bool,
    out: PathBuf,
    /// BENCHMARKS.md whose generated section this run replaces (`--update-benchmarks PATH`).
    benchmarks_md: Option<PathBuf>,
    flood_secs: u64,
    iperf_secs: u64,
    connect_secs: u64,
    latency_samples: usize,
    /// Services for the first-connection latency at scale.
    latency_scale: usize,
    /// Service counts for the programming-time runs.
    scales: Vec<usize>,
    prog_run_repeat: u32,
    /// Each throughput measurement is repeated this often; the best round counts (other
    /// load on the machine only ever lowers a round's result).
    rounds: usize,
    /// Single-endpoint changes at scale through the API source: (Services, changes).
    change_latency: (usize, usize),
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("udp-flood") => return load::udp_flood_main(&args[1..]),
        Some("udp-sink") => return load::udp_sink_main(&args[1..]),
        Some("connect-loop") => return load::connect_loop_main(&args[1..]),
        Some("connect-latency") => return load::connect_latency_main(&args[1..]),
        // The program cost and the map writer alone (e.g. under `perf record`).
        // Only the control-plane latency at scale (see `change_latency_main`).
        Some("change-latency") => return change_latency_main(&args[1..]),
        Some("prog-cost") => {
            for p in kproxy_tests::bench::prog_cost::measure(200_000)? {
                println!("{p:?}");
            }
            return Ok(());
        }
        // One mode's programming time at one size, alone: `scale <mode> <services>`.
        Some("scale") => return scale_main(&args[1..]),
        _ => {}
    }
    let quick = args.iter().any(|a| a == "--quick");
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("bench-results"));
    let benchmarks_md = args
        .iter()
        .position(|a| a == "--update-benchmarks")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    let settings = if quick {
        Settings {
            quick,
            out,
            benchmarks_md,
            flood_secs: 2,
            iperf_secs: 2,
            connect_secs: 2,
            latency_samples: 200,
            latency_scale: 1000,
            scales: vec![1000],
            prog_run_repeat: 200_000,
            rounds: 2,
            change_latency: (1000, 50),
        }
    } else {
        Settings {
            quick,
            out,
            benchmarks_md,
            flood_secs: 4,
            iperf_secs: 3,
            connect_secs: 3,
            latency_samples: 1000,
            latency_scale: 5000,
            scales: vec![1000, 10_000],
            prog_run_repeat: 2_000_000,
            rounds: 3,
            change_latency: (10_000, 200),
        }
    };
    fs::create_dir_all(&settings.out)?;
    let started = Instant::now();
    let mut report = Report::new(settings.quick);
    eprintln!("bench: per-packet program cost (BPF_PROG_TEST_RUN)");
    report.prog_run = kproxy_tests::bench::prog_cost::measure(settings.prog_run_repeat)
        .unwrap_or_else(|e| {
            eprintln!("bench: prog_run failed: {e:#}");
            Vec::new()
        });
    report.maglev_table_ms = kproxy_tests::bench::prog_cost::maglev_table_ms();
    let mut c = build_cluster()?;
    report.baseline = Some(run_baseline(&mut c, &settings)?);
    for mode in modes()? {
        eprintln!("bench: mode {mode}");
        match run_mode(&mut c, &settings, &mode) {
            Ok(r) => report.modes.push(r),
            Err(e) => {
                eprintln!("bench: mode {mode} failed: {e:#}\n{}", c.agent_log(1));
                report
                    .modes
                    .push(ModeResult::failed(&mode, &format!("{e:#}")));
            }
        }
        let _ = c.stop_agent(1);
        let _ = c.agent_cleanup(1);
    }
    let (n, changes) = settings.change_latency;
    eprintln!("bench: ebpf: {changes} endpoint changes at {n} Services through the API source");
    match change_latency::measure(&mut c, "ebpf", &[], n, 10, changes) {
        Ok(r) => {
            eprintln!("bench: {}", change_latency::summary(&r));
            report.change_latency.push(r);
        }
        Err(e) => eprintln!("bench: change latency: {e:#}"),
    }
    report.total_secs = started.elapsed().as_secs_f64();
    report.machine = sys_stats::machine_description();
    report::write_all(&report, &settings.out)?;
    if let Some(md) = &settings.benchmarks_md {
        report::update_benchmarks_md(&report, md)?;
        eprintln!("bench: updated the data section of {}", md.display());
    }
    print!("{}", report::table(&report));
    eprintln!(
        "bench: done in {:.0} s; results in {}",
        report.total_secs,
        settings.out.display()
    );
    Ok(())
}

/// `kproxy-bench change-latency [--services N] [--changes N] [--modes ebpf,nftables,...]
/// [--out DIR]`: only the control-plane measurement (default 10,000 Services, 200 changes,
/// ebpf), printed and written to DIR/change-latency.json.
fn change_latency_main(args: &[String]) -> Result<()> {
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let n: usize = value("--services").map_or(Ok(10_000), |v| v.parse())?;
    let changes: usize = value("--changes").map_or(Ok(200), |v| v.parse())?;
    let modes = value("--modes").unwrap_or_else(|| "ebpf".into());
    let out = PathBuf::from(value("--out").unwrap_or_else(|| "bench-results".into()));
    let mut c = Cluster::builder().nodes(2).build()?;
    let mut results = Vec::new();
    for mode in modes.split(',') {
        let (proxy_mode, extra) = agent_mode(mode);
        eprintln!("bench: {mode}: {changes} endpoint changes at {n} Services");
        match change_latency::measure(&mut c, proxy_mode, extra, n, 10, changes) {
            Ok(mut r) => {
                r.mode = mode.to_string();
                println!("{}", change_latency::summary(&r));
                results.push(r);
            }
            Err(e) => eprintln!("bench: {mode}: {e:#}"),
        }
    }
    fs::create_dir_all(&out)?;
    let path = out.join("change-latency.json");
    fs::write(&path, serde_json::to_string_pretty(&results)?)?;
    eprintln!("bench: written to {}", path.display());
    Ok(())
}

/// ebpf (XDP), ebpf-tc (the same with `--device-ingress tc`), ebpf-tc-nopeer (tc without the
/// `bpf_redirect_peer` fast path into local pods), nftables, iptables, and userspace when the
/// built kproxy has it.
fn modes() -> Result<Vec<String>> {
    let help = std::process::Command::new(kproxy_bin()?)
        .args(["run", "--help"])
        .output()?;
    let help = String::from_utf8_lossy(&help.stdout);
    let mut modes: Vec<String> = ["ebpf", "ebpf-tc", "ebpf-tc-nopeer", "nftables", "iptables"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if help.contains("userspace") {
        modes.push("userspace".into());
    }
    Ok(modes)
}

/// `kproxy-bench scale <mode> <services>...`: program_scale for one mode at each size, on a
/// fresh cluster, printing each result (for profiling one mode without the full bench).
fn scale_main(args: &[String]) -> Result<()> {
    let (Some(mode), sizes) = (args.first(), &args[args.len().min(1)..]) else {
        bail!("usage: kproxy-bench scale <mode> <services>...");
    };
    let sizes: Vec<usize> = sizes
        .iter()
        .map(|n| n.parse().with_context(|| format!("services: {n:?}")))
        .collect::<Result<_>>()?;
    let settings = Settings {
        quick: true,
        out: PathBuf::from("bench-results"),
        benchmarks_md: None,
        flood_secs: 0,
        iperf_secs: 0,
        connect_secs: 0,
        latency_samples: 200,
        latency_scale: 0,
        scales: sizes.clone(),
        prog_run_repeat: 0,
        rounds: 1,
        change_latency: (0, 0),
    };
    let mut c = build_cluster()?;
    write_base(&c)?;
    for n in sizes {
        match program_scale(&mut c, &settings, mode, n) {
            Ok(r) => println!("{r:?}"),
            Err(e) => eprintln!("bench: {mode} at {n} services: {e:#}\n{}", c.agent_log(1)),
        }
    }
    Ok(())
}

fn build_cluster() -> Result<Cluster> {
    let c = Cluster::builder()
        .nodes(2)
        .pod(PodSpec::new("pod-a", 1))
        .pod(PodSpec::new("pod-c", 1).http_ports(&[]))
        .pod(PodSpec::new("pod-b", 2))
        .build()?;
    // The client reaches pod IPs directly for the no-proxy baseline.
    let client = c.client();
    let node1 = c.node_ip(1).to_string();
    client.output(&["ip", "route", "replace", "10.244.1.0/24", "via", &node1])?;
    Ok(c)
}

fn bench_objects(c: &Cluster) -> Vec<Object> {
    let ep = || Endpoint::new(&c.pod_ip("pod-a").to_string(), "node1", "pod-a");
    vec![
        Service::node_port("bench-udp", "10.96.50.2")
            .selector("bench-udp")
            .port("u", Protocol::Udp, UDP_PORT, UDP_PORT, Some(UDP_NODEPORT))
            .into(),
        EndpointSlice::for_service("bench-udp")
            .port("u", Protocol::Udp, UDP_PORT)
            .endpoint(ep())
            .into(),
        Service::node_port("bench-tcp", "10.96.50.3")
            .selector("bench-tcp")
            .port(
                "t",
                Protocol::Tcp,
                IPERF_PORT,
                IPERF_PORT,
                Some(IPERF_NODEPORT),
            )
            .into(),
        EndpointSlice::for_service("bench-tcp")
            .port("t", Protocol::Tcp, IPERF_PORT)
            .endpoint(ep())
            .into(),
        Service::cluster_ip("bench-web", WEB_IP)
            .selector("bench-web")
            .port("http", Protocol::Tcp, 80, 80, None)
            .into(),
        EndpointSlice::for_service("bench-web")
            .port("http", Protocol::Tcp, 80)
            .endpoint(ep())
            .into(),
    ]
}

/// `n` ClusterIP Services with `eps` endpoints each (addresses that answer nothing: they
/// only fill the dataplane). `bump` changes one endpoint of the first Service.
fn filler_yaml(n: usize, eps: usize, bump: bool) -> String {
    let mut objects: Vec<Object> = Vec::with_capacity(2 * n);
    for i in 0..n {
        let name = format!("fill-{i}");
        // Half the fillers sort before the measured Service (WEB_IP) and half after: a
        // rule list in address order (iptables' KPROXY-SERVICES) is then walked halfway to
        // it, as on average in kube-proxy, whose order is random.
        let half = (i / 2) as u32 + 1;
        let ip = Ipv4Addr::from(if i % 2 == 0 {
            0x0a60_0000 + half // 10.96.0.0/16 up to 10.96.19.x: before 10.96.50.1
        } else {
            0x0a64_0000 + half
        });
        objects.push(
            Service::cluster_ip(&name, &ip.to_string())
                .port("http", Protocol::Tcp, 80, 8080, None)
                .into(),
        );
        let endpoints = (0..eps).map(|e| {
            let mut addr = 0x0af0_0000 + (i * eps + e) as u32 + 1;
            if bump && i == 0 && e == 0 {
                addr = 0x0aef_ffff;
            }
            Endpoint::new(
                &Ipv4Addr::from(addr).to_string(),
                "node2",
                &format!("f{i}-{e}"),
            )
        });
        objects.push(
            EndpointSlice::for_service(&name)
                .port("http", Protocol::Tcp, 8080)
                .endpoints(endpoints)
                .into(),
        );
    }
    kproxy_tests::harness::manifests::render(&objects)
}

fn write_base(c: &Cluster) -> Result<()> {
    let mut objects = c.node_objects();
    objects.extend(bench_objects(c));
    c.write_manifests("bench.yaml", &objects)?;
    Ok(())
}

fn start_servers(c: &mut Cluster) -> Result<()> {
    let a = c.pod("pod-a");
    let ip = c.pod_ip("pod-a").to_string();
    c.spawn(&a, "iperf3", &["iperf3", "-s", "-B", &ip, "-p", "5201"])?;
    std::thread::sleep(Duration::from_millis(300));
    Ok(())
}

fn run_baseline(c: &mut Cluster, s: &Settings) -> Result<ModeResult> {
    eprintln!("bench: no-proxy baseline (client straight to the pod IP)");
    start_servers(c)?;
    let pod = c.pod_ip("pod-a");
    let mut r = ModeResult::new("no proxy (pod IP)");
    let (rate, cpu) = best_udp_rate(c, pod, UDP_PORT, s)?;
    r.udp_pps = Some(rate);
    r.cpu_ns_per_pkt = cpu;
    r.tcp_gbps = best(s.rounds, || iperf(c, pod, IPERF_PORT, s.iperf_secs)).ok();
    Ok(r)
}

/// The agent's `--proxy-mode` and extra flags for a benchmark mode name.
fn agent_mode(mode: &str) -> (&str, &'static [&'static str]) {
    match mode {
        "ebpf-tc" => ("ebpf", &["--device-ingress", "tc"]),
        "ebpf-tc-nopeer" => (
            "ebpf",
            &["--device-ingress", "tc", "--tc-redirect-peer", "false"],
        ),
        other => (other, &[]),
    }
}

fn start_mode_agent(c: &mut Cluster, mode: &str) -> Result<()> {
    let (proxy_mode, extra) = agent_mode(mode);
    c.set_proxy_mode(proxy_mode);
    c.start_agent_with(1, extra)
}

fn run_mode(c: &mut Cluster, s: &Settings, mode: &str) -> Result<ModeResult> {
    let _ = c.remove_manifest("fill.yaml");
    write_base(c)?;
    start_mode_agent(c, mode)?;
    c.wait_healthy(1, Duration::from_secs(60))?;
    let node = c.node_ip(1);
    let mut r = ModeResult::new(mode);
    let (rate, cpu) = best_udp_rate(c, node, UDP_NODEPORT, s)?;
    r.udp_pps = Some(rate);
    r.cpu_ns_per_pkt = cpu;
    r.tcp_gbps = best(s.rounds, || iperf(c, node, IPERF_NODEPORT, s.iperf_secs))
        .map_err(|e| eprintln!("bench: iperf3 via {mode}: {e:#}"))
        .ok();
    r.conn_per_sec = best(s.rounds, || connect_rate(c, s.connect_secs))
        .map_err(|e| eprintln!("bench: connect rate via {mode}: {e:#}"))
        .ok();
    r.latency_small_us = connect_latency(c, s.latency_samples).ok();
    // Fillers up to the latency scale, then the latency again.
    let fill = filler_yaml(s.latency_scale, 10, false);
    let syncs = sync_lines(c);
    c.write_manifest_text("fill.yaml", &fill)?;
    wait_sync_after(c, syncs, Duration::from_secs(300))?;
    r.latency_scale_services = s.latency_scale;
    r.latency_scale_us = connect_latency(c, s.latency_samples).ok();
    r.conn_per_sec_scale = best(s.rounds, || connect_rate(c, s.connect_secs))
        .map_err(|e| eprintln!("bench: connect rate at scale via {mode}: {e:#}"))
        .ok();
    let _ = c.stop_agent(1);
    let _ = c.agent_cleanup_within(1, CLEANUP_TIMEOUT);
    // The control plane of ebpf-tc is ebpf's: measured once.
    let scales: &[usize] = if mode.starts_with("ebpf-tc") {
        &[]
    } else {
        &s.scales
    };
    for &n in scales {
        match program_scale(c, s, mode, n) {
            Ok(sr) => r.scale.push(sr),
            Err(e) => eprintln!("bench: {mode} at {n} services: {e:#}"),
        }
    }
    Ok(r)
}

/// Starts the agent from scratch with `n` Services x 10 endpoints already in the manifests,
/// then changes one endpoint.
fn program_scale(c: &mut Cluster, s: &Settings, mode: &str, n: usize) -> Result<ScaleResult> {
    eprintln!("bench: {mode}: programming {n} Services x 10 endpoints");
    c.write_manifest_text("fill.yaml", &filler_yaml(n, 10, false))?;
    let before = sync_lines(c);
    let t0 = Instant::now();
    start_mode_agent(c, mode)?;
    c.wait_healthy(1, Duration::from_secs(600))?;
    let wall = t0.elapsed();
    let first = took_ms(&c.agent_log(1), before).context("no first sync in the agent log")?;
    let pid = c.agent_pid(1).context("agent not running")?;
    let rss_mib = sys_stats::rss_mib(pid);
    let map_mib = sys_stats::bpf_map_memlock_mib(pid);
    let syncs = sync_lines(c);
    let t1 = Instant::now();
    c.write_manifest_text("fill.yaml", &filler_yaml(n, 10, true))?;
    wait_sync_after(c, syncs, Duration::from_secs(300))?;
    let change_wall = t1.elapsed();
    let change = took_ms(&c.agent_log(1), syncs).context("no sync after the change")?;
    let latency_us = connect_latency(c, s.latency_samples)
        .map_err(|e| eprintln!("bench: {mode}: latency at {n} services: {e:#}"))
        .ok();
    let _ = c.stop_agent(1);
    let _ = c.agent_cleanup_within(1, CLEANUP_TIMEOUT);
    let _ = c.remove_manifest("fill.yaml");
    Ok(ScaleResult {
        services: n,
        endpoints: n * 10,
        first_sync_ms: first,
        healthy_wall_ms: wall.as_secs_f64() * 1000.0,
        change_sync_ms: change,
        change_wall_ms: change_wall.as_secs_f64() * 1000.0,
        rss_mib,
        bpf_map_mib: map_mib,
        latency_us,
    })
}

/// The sync lines ("first sync programmed" / "synced") the agent of node 1 logged so far.
fn sync_lines(c: &Cluster) -> usize {
    all_took_ms(&c.agent_log(1)).len()
}

fn wait_sync_after(c: &Cluster, before: usize, timeout: Duration) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if sync_lines(c) > before {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("no sync within {timeout:?}")
}

fn all_took_ms(log: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains("first sync programmed") || l.contains(" synced"))
        .filter_map(|l| {
            let rest = &l[l.find("took_ms=")? + 8..];
            let num: String = rest
                .chars()
                .take_while(|ch| ch.is_ascii_digit() || *ch == '.')
                .collect();
            num.parse().ok()
        })
        .collect()
}

/// The `took_ms` of the `index`-th sync in the log.
fn took_ms(log: &str, index: usize) -> Option<f64> {
    all_took_ms(log).get(index).copied()
}

fn me() -> Result<String> {
    Ok(std::env::current_exe()?.display().to_string())
}

/// The highest of `rounds` results (an error only if every round failed).
fn best(rounds: usize, mut f: impl FnMut() -> Result<f64>) -> Result<f64> {
    let mut best: Option<f64> = None;
    let mut last_err = None;
    for _ in 0..rounds.max(1) {
        match f() {
            Ok(v) => best = Some(best.map_or(v, |b: f64| b.max(v))),
            Err(e) => last_err = Some(e),
        }
    }
    best.ok_or_else(|| last_err.unwrap_or_else(|| anyhow::anyhow!("no round ran")))
}

/// The round with the highest delivered rate, with that round's CPU cost.
fn best_udp_rate(
    c: &mut Cluster,
    dst: Ipv4Addr,
    port: u16,
    s: &Settings,
) -> Result<(f64, Option<f64>)> {
    let mut best: Option<(f64, Option<f64>)> = None;
    for _ in 0..s.rounds.max(1) {
        let round = udp_rate(c, dst, port, s.flood_secs)?;
        if best.is_none_or(|b| round.0 > b.0) {
            best = Some(round);
        }
    }
    best.context("no round ran")
}

/// UDP flood from the client to `dst:port`, counted at pod-a's sink. Returns delivered
/// packets/s and whole-machine CPU ns per delivered packet.
fn udp_rate(c: &mut Cluster, dst: Ipv4Addr, port: u16, secs: u64) -> Result<(f64, Option<f64>)> {
    let me = me()?;
    let pod = c.pod("pod-a");
    let sink_addr = format!("{}:{UDP_PORT}", c.pod_ip("pod-a"));
    let sink_secs = (secs + 2).to_string();
    let sink = pod.spawn_piped("udp-sink", &[&me, "udp-sink", &sink_addr, &sink_secs])?;
    std::thread::sleep(Duration::from_millis(300));
    let cpu0 = sys_stats::cpu_busy_seconds();
    let softirq0 = sys_stats::ksoftirqd_cpu_seconds();
    let target = format!("{dst}:{port}");
    let out = c.client().output_timeout(
        &[&me, "udp-flood", &target, &secs.to_string()],
        Duration::from_secs(secs + 20),
    )?;
    let cpu1 = sys_stats::cpu_busy_seconds();
    let softirq = sys_stats::ksoftirqd_cpu_seconds() - softirq0;
    let sent: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    let sink_out = sink.wait_output(Duration::from_secs(secs + 20))?;
    let got: u64 = String::from_utf8_lossy(&sink_out.stdout)
        .trim()
        .parse()
        .context("udp-sink printed no count")?;
    // The packet path's own cost, unaffected by other load on the machine (see
    // `load::self_cpu_seconds`), with the softirq work deferred to ksoftirqd meanwhile.
    let own = load::printed_cpu_seconds(&out.stderr)
        .zip(load::printed_cpu_seconds(&sink_out.stderr))
        .filter(|_| got > 0)
        .map(|(a, b)| format!("{:.0}", (a + b + softirq) * 1e9 / got as f64))
        .unwrap_or_else(|| "?".into());
    eprintln!(
        "bench:   UDP to {target}: sent {sent}, delivered {got}, sender+sink+ksoftirqd CPU ns/pkt {own}"
    );
    let rate = got as f64 / secs as f64;
    let cpu = match (cpu0, cpu1) {
        (Some(a), Some(b)) if got > 0 => Some((b - a) * 1e9 / got as f64),
        _ => None,
    };
    Ok((rate, cpu))
}

fn iperf(c: &Cluster, dst: Ipv4Addr, port: u16, secs: u64) -> Result<f64> {
    let out = c.client().output_timeout(
        &[
            "iperf3",
            "-c",
            &dst.to_string(),
            "-p",
            &port.to_string(),
            "-t",
            &secs.to_string(),
            "-J",
        ],
        Duration::from_secs(secs + 20),
    )?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stderr)))?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("iperf3 result missing: {}", v["error"]))?;
    Ok(bps / 1e9)
}

/// New TCP connections per second from pod-c to the cluster IP (nginx on pod-a).
fn connect_rate(c: &Cluster, secs: u64) -> Result<f64> {
    let me = me()?;
    let out = c.pod("pod-c").output_timeout(
        &[
            &me,
            "connect-loop",
            &format!("{WEB_IP}:80"),
            &secs.to_string(),
        ],
        Duration::from_secs(secs + 20),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let ok: f64 = text
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("connect-loop printed {text:?}"))?;
    Ok(ok / secs as f64)
}

/// Median and p99 of connect() to the cluster IP from pod-c, microseconds.
fn connect_latency(c: &Cluster, samples: usize) -> Result<(f64, f64)> {
    let me = me()?;
    let out = c.pod("pod-c").output_timeout(
        &[
            &me,
            "connect-latency",
            &format!("{WEB_IP}:80"),
            &samples.to_string(),
        ],
        Duration::from_secs(60),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<f64> = text
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect();
    if v.len() != 2 {
        bail!("connect-latency printed {text:?}");
    }
    Ok((v[0], v[1]))
}
