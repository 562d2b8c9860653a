//! The benchmark's results: a table for the terminal, markdown for BENCHMARKS.md, JSON, and
//! SVG plots.

use std::{fmt::Write as _, fs, path::Path};

use anyhow::Result;
use serde::Serialize;

use super::{
    change_latency::{self, ChangeLatency},
    prog_cost::ProgCost,
    svg,
};

#[derive(Clone, Debug, Default, Serialize)]
pub struct ScaleResult {
    pub services: usize,
    pub endpoints: usize,
    /// The agent's first sync (desired state built + dataplane written), from its log.
    pub first_sync_ms: f64,
    /// Agent start -> /healthz 200 (loading programs, reading the manifests, first sync).
    pub healthy_wall_ms: f64,
    /// The sync that applied one changed endpoint, from the agent's log.
    pub change_sync_ms: f64,
    /// Manifest written -> sync logged (includes re-reading every manifest file).
    pub change_wall_ms: f64,
    pub rss_mib: Option<f64>,
    pub bpf_map_mib: Option<f64>,
    /// connect() to a cluster IP (median, p99 µs) with these Services programmed.
    pub latency_us: Option<(f64, f64)>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ModeResult {
    pub mode: String,
    pub error: Option<String>,
    pub udp_pps: Option<f64>,
    /// Whole-machine busy CPU ns per delivered packet (sender and sink included).
    pub cpu_ns_per_pkt: Option<f64>,
    pub tcp_gbps: Option<f64>,
    pub conn_per_sec: Option<f64>,
    /// (median, p99) of connect() to a cluster IP with the base set (~10 Services).
    pub latency_small_us: Option<(f64, f64)>,
    pub latency_scale_services: usize,
    pub latency_scale_us: Option<(f64, f64)>,
    /// New TCP connections/s to the cluster IP with `latency_scale_services` programmed
    /// (iptables' rule walk runs for every new connection).
    pub conn_per_sec_scale: Option<f64>,
    pub scale: Vec<ScaleResult>,
}

impl ModeResult {
    pub fn new(mode: &str) -> Self {
        Self {
            mode: mode.into(),
            ..Default::default()
        }
    }

    pub fn failed(mode: &str, error: &str) -> Self {
        Self {
            mode: mode.into(),
            error: Some(error.into()),
            ..Default::default()
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub quick: bool,
    pub machine: String,
    pub total_secs: f64,
    pub baseline: Option<ModeResult>,
    pub modes: Vec<ModeResult>,
    pub prog_run: Vec<ProgCost>,
    pub maglev_table_ms: f64,
    /// Single-endpoint changes at scale through the API source (event -> map written).
    pub change_latency: Vec<ChangeLatency>,
}

impl Report {
    pub fn new(quick: bool) -> Self {
        Self {
            quick,
            ..Default::default()
        }
    }

    fn mode(&self, name: &str) -> Option<&ModeResult> {
        self.modes
            .iter()
            .find(|m| m.mode == name && m.error.is_none())
    }

    /// `f(a) / f(b)` when both exist.
    fn ratio(&self, a: &str, b: &str, f: impl Fn(&ModeResult) -> Option<f64>) -> Option<f64> {
        let x = f(self.mode(a)?)?;
        let y = f(self.mode(b)?)?;
        (y > 0.0).then_some(x / y)
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.digits$}"))
}

fn lat(v: Option<(f64, f64)>) -> String {
    v.map_or_else(|| "n/a".into(), |(m, p)| format!("{m:.0} / {p:.0}"))
}

fn rows(r: &Report) -> Vec<&ModeResult> {
    r.baseline.iter().chain(r.modes.iter()).collect()
}

/// The plain-text table printed at the end of a run.
pub fn table(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<20} {:>12} {:>12} {:>9} {:>10} {:>14} {:>16} {:>12}",
        "mode",
        "UDP pkt/s",
        "CPU ns/pkt",
        "TCP Gb/s",
        "conn/s",
        "lat small us",
        "lat scale us",
        "conn/s scale"
    );
    for m in rows(r) {
        if let Some(e) = &m.error {
            let _ = writeln!(s, "{:<20} failed: {e}", m.mode);
            continue;
        }
        let _ = writeln!(
            s,
            "{:<20} {:>12} {:>12} {:>9} {:>10} {:>14} {:>16} {:>12}",
            m.mode,
            opt(m.udp_pps, 0),
            opt(m.cpu_ns_per_pkt, 0),
            opt(m.tcp_gbps, 2),
            opt(m.conn_per_sec, 0),
            lat(m.latency_small_us),
            lat(m.latency_scale_us),
            opt(m.conn_per_sec_scale, 0),
        );
    }
    for m in &r.modes {
        for sc in &m.scale {
            let _ = writeln!(
                s,
                "{:<10} {:>6} svc: first sync {:>8.1} ms (healthy {:>8.0} ms), one endpoint change {:>7.1} ms (wall {:>6.0} ms), RSS {} MiB, BPF maps {} MiB",
                m.mode,
                sc.services,
                sc.first_sync_ms,
                sc.healthy_wall_ms,
                sc.change_sync_ms,
                sc.change_wall_ms,
                opt(sc.rss_mib, 1),
                opt(sc.bpf_map_mib, 1)
            );
        }
    }
    for p in &r.prog_run {
        let _ = writeln!(
            s,
            "XDP program, {:>6} services: {:.0} ns/packet (BPF_PROG_TEST_RUN x{}); map writer alone: from empty {:.1} ms, one endpoint change {:.2} ms (partial {:.3} ms)",
            p.services,
            p.ns_per_packet,
            p.repeat,
            p.writer_full_ms,
            p.writer_change_ms,
            p.writer_partial_ms
        );
    }
    for c in &r.change_latency {
        let _ = writeln!(s, "{}", change_latency::summary(c));
    }
    s
}

/// Reads one number of a mode's results.
type Metric = fn(&ModeResult) -> Option<f64>;

/// Markdown for BENCHMARKS.md's data section: ratios first, then every number.
pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let flavour = if r.quick { "`--quick`" } else { "full" };
    let _ = writeln!(
        s,
        "_Generated by `cargo xtask bench` ({flavour} run, {:.0} s) on: {}._\n",
        r.total_secs, r.machine
    );
    let _ = writeln!(s, "### Ratios\n");
    let _ = writeln!(s, "| comparison | ratio |\n|---|---|");
    let pairs: [(&str, &str, &str, Metric); 7] = [
        (
            "UDP nodePort rate, ebpf / iptables",
            "ebpf",
            "iptables",
            |m| m.udp_pps,
        ),
        (
            "UDP nodePort rate, ebpf / nftables",
            "ebpf",
            "nftables",
            |m| m.udp_pps,
        ),
        (
            "TCP nodePort throughput, ebpf / iptables",
            "ebpf",
            "iptables",
            |m| m.tcp_gbps,
        ),
        (
            "new connections/s to a cluster IP, ebpf / iptables",
            "ebpf",
            "iptables",
            |m| m.conn_per_sec,
        ),
        (
            "new connections/s to a cluster IP with N Services (see below), ebpf / iptables",
            "ebpf",
            "iptables",
            |m| m.conn_per_sec_scale,
        ),
        ("CPU per packet, iptables / ebpf", "iptables", "ebpf", |m| {
            m.cpu_ns_per_pkt
        }),
        (
            "first-connection latency at scale (median), ebpf / iptables",
            "ebpf",
            "iptables",
            |m| m.latency_scale_us.map(|v| v.0),
        ),
    ];
    for (what, a, b, f) in pairs {
        let _ = writeln!(s, "| {what} | {} |", opt(r.ratio(a, b, f), 2));
    }
    if let (Some(base), Some(e)) = (&r.baseline, r.mode("ebpf")) {
        let ratio = match (e.cpu_ns_per_pkt, base.cpu_ns_per_pkt) {
            (Some(x), Some(y)) if y > 0.0 => Some(x / y),
            _ => None,
        };
        let _ = writeln!(
            s,
            "| CPU per packet, ebpf nodePort / no proxy (pod IP) | {} |",
            opt(ratio, 2)
        );
    }
    if let Some(e) = r.mode("ebpf") {
        let ratio = match (e.latency_scale_us, e.latency_small_us) {
            (Some(x), Some(y)) if y.0 > 0.0 => Some(x.0 / y.0),
            _ => None,
        };
        let _ = writeln!(
            s,
            "| ebpf first-connection latency, {} Services / ~10 Services (median) | {} |",
            e.latency_scale_services,
            opt(ratio, 2)
        );
    }
    if let (Some(a), Some(b)) = (r.prog_run.first(), r.prog_run.last()) {
        let _ = writeln!(
            s,
            "| XDP program cost, {} / {} Services | {:.2} |",
            b.services,
            a.services,
            b.ns_per_packet / a.ns_per_packet.max(1.0)
        );
    }
    let _ = writeln!(s, "\n### Data path per mode\n");
    let _ = writeln!(
        s,
        "| mode | UDP nodePort delivered pkt/s | CPU ns per delivered pkt (whole machine) | TCP nodePort Gbit/s (iperf3) | new TCP conn/s to a cluster IP | connect() to a cluster IP, ~10 Services, median / p99 µs | same with N Services | new TCP conn/s with N Services | N |\n|---|---|---|---|---|---|---|---|---|"
    );
    for m in rows(r) {
        if let Some(e) = &m.error {
            let _ = writeln!(
                s,
                "| {} | failed: {} | | | | | | | |",
                m.mode,
                // The first line only: the rest is the agent's log, in the JSON.
                e.lines().next().unwrap_or_default().replace('|', "/")
            );
            continue;
        }
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            m.mode,
            opt(m.udp_pps, 0),
            opt(m.cpu_ns_per_pkt, 0),
            opt(m.tcp_gbps, 2),
            opt(m.conn_per_sec, 0),
            lat(m.latency_small_us),
            lat(m.latency_scale_us),
            opt(m.conn_per_sec_scale, 0),
            m.latency_scale_services
        );
    }
    let _ = writeln!(s, "\n### Control plane per mode\n");
    let _ = writeln!(
        s,
        "| mode | Services x endpoints | first sync (ms) | agent start to healthy (ms) | one endpoint change: sync (ms) | change: file written to sync logged (ms) | agent RSS (MiB) | BPF map memlock (MiB) | connect() to a cluster IP at this size, median / p99 µs |\n|---|---|---|---|---|---|---|---|---|"
    );
    for m in &r.modes {
        for sc in &m.scale {
            let _ = writeln!(
                s,
                "| {} | {} x 10 | {:.1} | {:.0} | {:.1} | {:.0} | {} | {} | {} |",
                m.mode,
                sc.services,
                sc.first_sync_ms,
                sc.healthy_wall_ms,
                sc.change_sync_ms,
                sc.change_wall_ms,
                opt(sc.rss_mib, 1),
                opt(sc.bpf_map_mib, 1),
                lat(sc.latency_us)
            );
        }
    }
    let _ = writeln!(s, "\n### XDP program cost (BPF_PROG_TEST_RUN)\n");
    let _ = writeln!(
        s,
        "| Services | backends | ns per packet | repeat | map writer alone: all maps from empty (ms) | map writer alone: one endpoint change, whole diff (ms) | same, partial apply (ms) |\n|---|---|---|---|---|---|---|"
    );
    for p in &r.prog_run {
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {} | {:.1} | {:.2} | {:.3} |",
            p.services,
            p.backends,
            p.ns_per_packet,
            p.repeat,
            p.writer_full_ms,
            p.writer_change_ms,
            p.writer_partial_ms
        );
    }
    if !r.change_latency.is_empty() {
        let _ = writeln!(
            s,
            "\n### One endpoint change at scale, through the Kubernetes API source\n\nThe agent watches the in-repo test API server (kube-rs); single-endpoint EndpointSlice changes, one after another. event -> written: the agent's `event_to_written_ms` (change received to dataplane written, min-sync-period included); sync: its `took_ms`; API write -> log: wall time from the API server's write to the sync log line (includes watch delivery and 2 ms log polling).\n"
        );
        let _ = writeln!(
            s,
            "| mode | Services x endpoints | changes (partial syncs) | event -> written p50 / p99 / max (ms) | sync p50 / p99 (ms) | API write -> log p50 / p99 (ms) | first sync (ms) | agent RSS after first sync / at end (MiB) |\n|---|---|---|---|---|---|---|---|"
        );
        for c in &r.change_latency {
            let _ = writeln!(
                s,
                "| {} | {} x {} | {} ({}) | {:.2} / {:.2} / {:.2} | {:.2} / {:.2} | {:.1} / {:.1} | {:.0} | {} / {} |",
                c.mode,
                c.services,
                c.endpoints / c.services.max(1),
                c.changes,
                c.partial_syncs,
                c.event_to_written_p50_ms,
                c.event_to_written_p99_ms,
                c.event_to_written_max_ms,
                c.sync_p50_ms,
                c.sync_p99_ms,
                c.api_to_log_p50_ms,
                c.api_to_log_p99_ms,
                c.first_sync_ms,
                opt(c.rss_first_mib, 0),
                opt(c.rss_end_mib, 0),
            );
        }
    }
    let _ = writeln!(
        s,
        "\nMaglev table (M = 16381, 10 backends) computed in userspace in {:.2} ms.",
        r.maglev_table_ms
    );
    let _ = writeln!(
        s,
        "\n![rate per mode](bench-results/rate.svg) ![program cost](bench-results/prog_cost.svg) ![programming time](bench-results/programming.svg)"
    );
    s
}

const DATA_START: &str = "<!-- bench-data:start -->";
const DATA_END: &str = "<!-- bench-data:end -->";

/// Replaces the generated part of BENCHMARKS.md (between the bench-data markers) with this
/// run's markdown; the hand-written text around it stays.
pub fn update_benchmarks_md(r: &Report, path: &Path) -> Result<()> {
    let text = fs::read_to_string(path)?;
    let (Some(a), Some(b)) = (text.find(DATA_START), text.find(DATA_END)) else {
        anyhow::bail!(
            "{} has no {DATA_START} ... {DATA_END} section",
            path.display()
        );
    };
    let updated = format!("{}{DATA_START}\n{}{}", &text[..a], markdown(r), &text[b..]);
    fs::write(path, updated)?;
    Ok(())
}

/// Writes results.json, BENCHMARKS-data.md and the SVG plots into `dir`.
pub fn write_all(r: &Report, dir: &Path) -> Result<()> {
    fs::write(dir.join("results.json"), serde_json::to_string_pretty(r)?)?;
    fs::write(dir.join("BENCHMARKS-data.md"), markdown(r))?;
    let bars: Vec<(String, f64)> = rows(r)
        .iter()
        .filter_map(|m| Some((m.mode.clone(), m.udp_pps?)))
        .collect();
    fs::write(
        dir.join("rate.svg"),
        svg::bar_chart(
            "UDP nodePort: delivered packets/s (small packets)",
            "pkt/s",
            &bars,
        ),
    )?;
    let cost: Vec<(f64, f64)> = r
        .prog_run
        .iter()
        .map(|p| (p.services as f64, p.ns_per_packet))
        .collect();
    fs::write(
        dir.join("prog_cost.svg"),
        svg::line_chart(
            "XDP program cost per packet vs Services",
            "Services",
            "ns/packet",
            &[("ebpf (XDP)".into(), cost)],
        ),
    )?;
    let series: Vec<(String, Vec<(f64, f64)>)> = r
        .modes
        .iter()
        .filter(|m| !m.scale.is_empty())
        .map(|m| {
            (
                m.mode.clone(),
                m.scale
                    .iter()
                    .map(|s| (s.services as f64, s.first_sync_ms))
                    .collect(),
            )
        })
        .collect();
    fs::write(
        dir.join("programming.svg"),
        svg::line_chart(
            "Programming from scratch (x 10 endpoints): first sync",
            "Services",
            "ms",
            &series,
        ),
    )?;
    Ok(())
}
