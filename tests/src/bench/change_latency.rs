//! Control-plane latency at scale through the Kubernetes API path: `n` Services x 10
//! endpoints in the in-repo test API server, the agent watching it with kube-rs
//! (`--kubeconfig`), then single-endpoint changes one after another. For each change the
//! agent's own figures are read from its sync log line: `event_to_written_ms` (the change
//! received -> the dataplane written, min-sync-period included) and `took_ms` (the sync
//! itself); the wall time from the API write to that log line being seen is kept too (an
//! upper bound: it includes the watch delivery and this side's 2 ms polling of the log).

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use crate::{
    apiserver::TestApiServer,
    bench::sys_stats,
    harness::{
        Cluster, kproxy_bin,
        manifests::{Endpoint, EndpointSlice, Object, Protocol, Service, render},
    },
};

/// What one run measured (milliseconds unless named otherwise).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ChangeLatency {
    pub mode: String,
    pub services: usize,
    pub endpoints: usize,
    pub changes: usize,
    /// The agent's first sync (`took_ms`) and the wall time to it from the agent's start.
    pub first_sync_ms: f64,
    pub first_sync_wall_ms: f64,
    pub event_to_written_p50_ms: f64,
    pub event_to_written_p99_ms: f64,
    pub event_to_written_max_ms: f64,
    pub sync_p50_ms: f64,
    pub sync_p99_ms: f64,
    pub api_to_log_p50_ms: f64,
    pub api_to_log_p99_ms: f64,
    /// How many of the changes' syncs were partial (the rest whole).
    pub partial_syncs: usize,
    /// Agent RSS after the first sync and after the changes.
    pub rss_first_mib: Option<f64>,
    pub rss_end_mib: Option<f64>,
}

/// The cluster IP of filler Service `i` (10.100.0.0/16 upwards).
fn service_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0a64_0000 + i as u32 + 1)
}

/// Endpoint `e` of filler Service `i`, `generation` shifting the address of endpoint 0 (an
/// address that answers nothing: these only fill the dataplane).
fn endpoint_ip(i: usize, e: usize, eps: usize, generation: u32) -> Ipv4Addr {
    let base = 0x0af0_0000 + (i * eps + e) as u32 + 1;
    if e == 0 && generation > 0 {
        // 10.200.0.0/16 and up: never one of the base addresses.
        return Ipv4Addr::from(0x0ac8_0000 + ((i as u32) << 6) + generation % 64);
    }
    Ipv4Addr::from(base)
}

fn filler_slice(i: usize, eps: usize, generation: u32) -> Object {
    let name = format!("fill-{i}");
    let endpoints = (0..eps).map(|e| {
        Endpoint::new(
            &endpoint_ip(i, e, eps, generation).to_string(),
            "node2",
            &format!("f{i}-{e}"),
        )
    });
    EndpointSlice::for_service(&name)
        .port("http", Protocol::Tcp, 8080)
        .endpoints(endpoints)
        .into()
}

fn fillers(n: usize, eps: usize) -> String {
    let mut objects: Vec<Object> = Vec::with_capacity(2 * n);
    for i in 0..n {
        objects.push(
            Service::cluster_ip(&format!("fill-{i}"), &service_ip(i).to_string())
                .port("http", Protocol::Tcp, 80, 8080, None)
                .into(),
        );
        objects.push(filler_slice(i, eps, 0));
    }
    render(&objects)
}

/// A field `name=<number>` of a log line.
pub fn field(line: &str, name: &str) -> Option<f64> {
    let at = line.find(&format!(" {name}="))? + name.len() + 2;
    let num: String = line[at..]
        .chars()
        .take_while(|ch| ch.is_ascii_digit() || *ch == '.')
        .collect();
    num.parse().ok()
}

fn sync_lines(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("first sync programmed") || l.contains(" synced"))
        .map(str::to_owned)
        .collect()
}

/// Waits for more than `before` sync lines; returns the first new one.
fn next_sync_line(log: &Path, before: usize, timeout: Duration) -> Result<String> {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if let Some(l) = sync_lines(log).get(before) {
            return Ok(l.clone());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    bail!("no sync within {timeout:?}")
}

/// The value at quantile `q` (0..=1) of `v` (nearest rank).
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

/// The process that is the agent: `pid` itself, or its child when `pid` is a wrapper.
fn agent_process(pid: u32) -> u32 {
    let comm = |p: u32| std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
    if comm(pid).trim() == "kproxy" {
        return pid;
    }
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    children
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .find(|c| comm(*c).trim() == "kproxy")
        .unwrap_or(pid)
}

/// Runs the measurement on node 1 of `c` in `mode` (`extra`: more agent flags), with `n`
/// Services x `eps` endpoints and `changes` single-endpoint changes.
pub fn measure(
    c: &mut Cluster,
    mode: &str,
    extra: &[&str],
    n: usize,
    eps: usize,
    changes: usize,
) -> Result<ChangeLatency> {
    let netns = format!("/var/run/netns/{}", c.node_netns(1));
    let api = TestApiServer::in_netns(&netns).context("starting the test API server")?;
    api.apply_yaml(&render(&c.node_objects()))?;
    api.apply_yaml(&fillers(n, eps))?;
    let kubeconfig = c.tmp_dir().join(format!("kubeconfig-bench-{mode}"));
    api.write_kubeconfig(&kubeconfig)?;

    c.set_proxy_mode(mode);
    let mut argv = vec![kproxy_bin()?.display().to_string()];
    let mut args = c.agent_args(1);
    if let Some(i) = args.iter().position(|a| a == "--manifests") {
        args.drain(i..i + 2);
    }
    argv.extend(args);
    argv.extend(["--kubeconfig".to_string(), kubeconfig.display().to_string()]);
    argv.extend(extra.iter().map(|s| s.to_string()));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let place = c.node(1);
    let t0 = Instant::now();
    let idx = c.spawn(&place, &format!("kproxy node1 (API, {mode})"), &argv)?;
    let log: PathBuf = c.tmp_dir().join(format!("extra-{idx}.log"));
    let result = run_changes(c, &api, &log, idx, t0, mode, n, eps, changes);
    c.stop_extra(idx);
    let _ = c.agent_cleanup(1);
    result.map_err(|e| {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(20).collect();
        anyhow::anyhow!(
            "{e:#}\nagent log (last lines, newest first):\n{}",
            tail.join("\n")
        )
    })
}

#[allow(clippy::too_many_arguments)]
fn run_changes(
    c: &Cluster,
    api: &TestApiServer,
    log: &Path,
    idx: usize,
    t0: Instant,
    mode: &str,
    n: usize,
    eps: usize,
    changes: usize,
) -> Result<ChangeLatency> {
    let first = next_sync_line(log, 0, Duration::from_secs(600))?;
    let mut r = ChangeLatency {
        mode: mode.to_string(),
        services: n,
        endpoints: n * eps,
        changes,
        first_sync_wall_ms: t0.elapsed().as_secs_f64() * 1000.0,
        first_sync_ms: field(&first, "took_ms").context("first sync without took_ms")?,
        ..ChangeLatency::default()
    };
    let pid = c.extra_pid(idx).map(agent_process);
    // Let the first sync's bookkeeping and any follow-up sync settle.
    std::thread::sleep(Duration::from_millis(500));
    r.rss_first_mib = pid.and_then(sys_stats::rss_mib);
    let (mut e2w, mut took, mut wall) = (Vec::new(), Vec::new(), Vec::new());
    // A fixed walk over the Services (a multiplicative step), so runs are comparable.
    let mut i = 0usize;
    for k in 0..changes {
        i = (i + 7919) % n;
        let before = sync_lines(log).len();
        let sent = Instant::now();
        api.apply_yaml(&render(&[filler_slice(i, eps, k as u32 + 1)]))?;
        let line = next_sync_line(log, before, Duration::from_secs(60))
            .with_context(|| format!("change {k} (fill-{i})"))?;
        wall.push(sent.elapsed().as_secs_f64() * 1000.0);
        if let Some(v) = field(&line, "event_to_written_ms") {
            e2w.push(v);
        }
        if let Some(v) = field(&line, "took_ms") {
            took.push(v);
        }
        if line.contains("partial=true") {
            r.partial_syncs += 1;
        }
        // Changes arrive apart, as single changes do (not batched by min-sync-period).
        std::thread::sleep(Duration::from_millis(15));
    }
    r.rss_end_mib = pid.and_then(sys_stats::rss_mib);
    r.event_to_written_p50_ms = quantile(&e2w, 0.5);
    r.event_to_written_p99_ms = quantile(&e2w, 0.99);
    r.event_to_written_max_ms = quantile(&e2w, 1.0);
    r.sync_p50_ms = quantile(&took, 0.5);
    r.sync_p99_ms = quantile(&took, 0.99);
    r.api_to_log_p50_ms = quantile(&wall, 0.5);
    r.api_to_log_p99_ms = quantile(&wall, 0.99);
    Ok(r)
}

/// One line per run, for the console and the report.
pub fn summary(r: &ChangeLatency) -> String {
    format!(
        "{}: {} Services x {} endpoints: first sync {:.0} ms ({:.0} ms from start); {} single-endpoint changes ({} partial): event->written p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; sync p50 {:.2} ms, p99 {:.2} ms; API write->log line p50 {:.1} ms, p99 {:.1} ms; RSS {} -> {} MiB",
        r.mode,
        r.services,
        r.endpoints / r.services.max(1),
        r.first_sync_ms,
        r.first_sync_wall_ms,
        r.changes,
        r.partial_syncs,
        r.event_to_written_p50_ms,
        r.event_to_written_p99_ms,
        r.event_to_written_max_ms,
        r.sync_p50_ms,
        r.sync_p99_ms,
        r.api_to_log_p50_ms,
        r.api_to_log_p99_ms,
        r.rss_first_mib.map_or("?".into(), |v| format!("{v:.0}")),
        r.rss_end_mib.map_or("?".into(), |v| format!("{v:.0}")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_and_quantiles() {
        let l = "INFO kproxy::agent: synced frontends=3 partial=true took_ms=1.25 event_to_written_ms=3.5";
        assert_eq!(field(l, "took_ms"), Some(1.25));
        assert_eq!(field(l, "event_to_written_ms"), Some(3.5));
        assert_eq!(field(l, "written_ms"), None);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_ne!(endpoint_ip(3, 0, 10, 1), endpoint_ip(3, 0, 10, 0));
        assert_ne!(endpoint_ip(3, 0, 10, 1), endpoint_ip(3, 0, 10, 2));
    }
}
