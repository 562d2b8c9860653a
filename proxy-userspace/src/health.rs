//! `/healthz`, `/livez` and `/metrics` over plain HTTP/1.1, like kube-proxy's.
//!
//! Metrics carry kube-proxy's names where the meaning is the same
//! (`kubeproxy_sync_proxy_rules_*`, `kubeproxy_network_programming_duration_seconds`) and
//! `kproxy_*` for the rest (map fill levels and the datapath's per-CPU counters, read from the
//! pinned maps at scrape time).

use std::{
    collections::{BTreeMap, HashSet},
    fmt::Write as _,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use proxy_common::lb::{Lb4Key, Lb4Service};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

use crate::{
    desired::{DesiredState, FrontendKind, Protocol, ServicePortName},
    desired_cache::FrontendChanges,
    model::{Model, NamespacedName},
    source::{K8sObject, ObjectKey, ObjectKind},
};

/// kube-proxy's `SyncProxyRulesLatency` buckets: 1 ms doubling to ~16 s.
const SYNC_BUCKETS: [f64; 15] = [
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096,
    8.192, 16.384,
];
/// Change seen -> programmed: a millisecond here, up to kube-proxy's minutes.
const PROGRAMMING_BUCKETS: [f64; 18] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

/// A Prometheus histogram: cumulative counts per bucket, sum and count.
#[derive(Clone, Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, v: f64) {
        for (b, c) in self.bounds.iter().zip(self.counts.iter_mut()) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

/// Service ports with a `Local` traffic policy whose frontends got no backend although the
/// service has endpoints elsewhere (kube-proxy's `no_local_endpoints_total`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NoLocalEndpoints {
    pub internal: u64,
    pub external: u64,
}

/// Counts, per traffic policy, the service ports that have endpoints but none this node may
/// use because the policy is `Local` and none is local.
pub fn no_local_endpoints(model: &Model, desired: &DesiredState) -> NoLocalEndpoints {
    // One pass over the frontends (not one per service port: that is quadratic at scale).
    let empty: HashSet<(&ServicePortName, bool)> = desired
        .frontends
        .iter()
        .filter(|f| f.backends.is_empty())
        .map(|f| (&f.service, f.kind == FrontendKind::ClusterIp))
        .collect();
    let mut n = NoLocalEndpoints::default();
    for (spn, info) in model.services().iter() {
        let (internal, external) = (info.internal_policy_local(), info.external_policy_local());
        if !internal && !external {
            continue;
        }
        let has_endpoints = !model
            .endpoints()
            .get(&NamespacedName::new(&spn.namespace, &spn.name))
            .is_empty();
        if !has_endpoints {
            continue;
        }
        if internal && empty.contains(&(spn, true)) {
            n.internal += 1;
        }
        if external && empty.contains(&(spn, false)) {
            n.external += 1;
        }
    }
    n
}

/// What the agent reports about itself.
pub struct Status {
    /// The first full sync has been programmed.
    pub synced: AtomicBool,
    pub mode: Mutex<String>,
    /// Where the maps are pinned: their fill levels are read at scrape time.
    pub bpf_root: Mutex<Option<PathBuf>>,
    pub last_sync_unix: Mutex<f64>,
    sync_durations: Mutex<Histogram>,
    programming_durations: Mutex<Histogram>,
    /// When the oldest change not yet programmed was seen.
    pending_since: Mutex<Option<Instant>>,
    /// Since when every sync has failed (None: the last one succeeded).
    failing_since: Mutex<Option<Instant>>,
    /// The last full object set (sources that deliver whole sets), to count changes by kind.
    objects: Mutex<BTreeMap<ObjectKey, u64>>,
    pub sync_errors: AtomicU64,
    /// Frontends the last sync could not program (a map full, no free index).
    pub frontends_rejected: AtomicU64,
    pub service_changes: AtomicU64,
    pub endpoint_changes: AtomicU64,
    pub frontends: AtomicU64,
    pub backends: AtomicU64,
    no_local: Mutex<NoLocalEndpoints>,
    /// Frontend (master key) -> `namespace/name:port/PROTO`, from the last programmed
    /// DesiredState: labels the per-frontend counters, which the datapath keys by reverse-NAT
    /// index (found through the master entries at scrape time).
    service_of: Mutex<BTreeMap<Lb4Key, String>>,
}

impl Default for Status {
    fn default() -> Self {
        Self {
            synced: AtomicBool::new(false),
            mode: Mutex::default(),
            bpf_root: Mutex::default(),
            last_sync_unix: Mutex::new(0.0),
            sync_durations: Mutex::new(Histogram::new(&SYNC_BUCKETS)),
            programming_durations: Mutex::new(Histogram::new(&PROGRAMMING_BUCKETS)),
            pending_since: Mutex::default(),
            failing_since: Mutex::default(),
            objects: Mutex::default(),
            sync_errors: AtomicU64::new(0),
            frontends_rejected: AtomicU64::new(0),
            service_changes: AtomicU64::new(0),
            endpoint_changes: AtomicU64::new(0),
            frontends: AtomicU64::new(0),
            backends: AtomicU64::new(0),
            no_local: Mutex::default(),
            service_of: Mutex::default(),
        }
    }
}

pub fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// How long syncs may keep failing before /healthz reports the node unhealthy.
pub const SYNC_FAILING_UNHEALTHY: Duration = Duration::from_secs(10);

impl Status {
    /// One object of `kind` was added, changed or deleted (event-driven sources).
    pub fn count_change(&self, kind: ObjectKind) {
        match kind {
            ObjectKind::Service => self.service_changes.fetch_add(1, Ordering::Relaxed),
            ObjectKind::EndpointSlice => self.endpoint_changes.fetch_add(1, Ordering::Relaxed),
            ObjectKind::Node => 0,
        };
        if let Ok(mut p) = self.pending_since.lock() {
            p.get_or_insert_with(Instant::now);
        }
    }

    /// A source delivered its whole object set again: counts the objects added, changed or
    /// deleted since the last set, by kind.
    pub fn observe_objects(&self, objects: &[K8sObject]) {
        let Ok(mut last) = self.objects.lock() else {
            return;
        };
        // A digest per object, not a copy: at 10,000 Services a copy was ~100 MiB.
        let mut next: BTreeMap<ObjectKey, u64> = BTreeMap::new();
        for o in objects {
            next.entry(o.key()).or_insert_with(|| o.digest());
        }
        let mut changed: Vec<ObjectKind> = last
            .keys()
            .filter(|k| !next.contains_key(*k))
            .map(|k| k.kind)
            .collect();
        changed.extend(
            next.iter()
                .filter(|(k, v)| last.get(*k) != Some(*v))
                .map(|(k, _)| k.kind),
        );
        *last = next;
        drop(last);
        for kind in changed {
            self.count_change(kind);
        }
    }

    /// A sync programmed `desired` in `took`. Returns the network programming latency: how
    /// long ago the oldest change it programmed was seen (None: nothing was pending).
    pub fn record_sync(
        &self,
        took: Duration,
        desired: &DesiredState,
        no_local: NoLocalEndpoints,
    ) -> Option<Duration> {
        self.record_sync_of(took, desired, no_local, None)
    }

    /// `record_sync` after a partial sync, in which only the frontends on the `changed` keys
    /// differ (their labels alone are updated).
    pub fn record_partial_sync(
        &self,
        took: Duration,
        desired: &DesiredState,
        no_local: NoLocalEndpoints,
        changed: &FrontendChanges,
    ) -> Option<Duration> {
        self.record_sync_of(took, desired, no_local, Some(changed))
    }

    fn record_sync_of(
        &self,
        took: Duration,
        desired: &DesiredState,
        no_local: NoLocalEndpoints,
        changed: Option<&FrontendChanges>,
    ) -> Option<Duration> {
        // First: the latency ends when the dataplane was written, not after the bookkeeping.
        let programmed = self
            .pending_since
            .lock()
            .ok()
            .and_then(|mut p| p.take())
            .map(|seen| seen.elapsed());
        if let Some(latency) = programmed
            && let Ok(mut h) = self.programming_durations.lock()
        {
            h.observe(latency.as_secs_f64());
        }
        if let Ok(mut f) = self.failing_since.lock() {
            *f = None;
        }
        if let Ok(mut h) = self.sync_durations.lock() {
            h.observe(took.as_secs_f64());
        }
        if let Ok(mut t) = self.last_sync_unix.lock() {
            *t = now_unix();
        }
        self.frontends
            .store(desired.frontends.len() as u64, Ordering::Relaxed);
        self.backends.store(
            desired
                .frontends
                .iter()
                .map(|f| f.backends.len() as u64)
                .sum(),
            Ordering::Relaxed,
        );
        if let Ok(mut n) = self.no_local.lock() {
            *n = no_local;
        }
        let master_key = |(address, port, protocol): (std::net::Ipv4Addr, u16, Protocol)| {
            Lb4Key::new(
                u32::from_ne_bytes(address.octets()),
                port.to_be(),
                protocol.number(),
                0,
            )
        };
        if let Ok(mut m) = self.service_of.lock() {
            match changed {
                None => {
                    *m = desired
                        .frontends
                        .iter()
                        .map(|f| (master_key(f.key()), f.service.to_string()))
                        .collect();
                }
                Some(changed) => {
                    for key in &changed.keys {
                        match desired.frontends.binary_search_by(|f| f.key().cmp(key)) {
                            Ok(i) => {
                                m.insert(
                                    master_key(*key),
                                    desired.frontends[i].service.to_string(),
                                );
                            }
                            Err(_) => {
                                m.remove(&master_key(*key));
                            }
                        }
                    }
                }
            }
        }
        programmed
    }

    /// A sync failed (it is retried as a full sync).
    pub fn record_sync_error(&self) {
        self.sync_errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut f) = self.failing_since.lock() {
            f.get_or_insert_with(Instant::now);
        }
    }

    /// How long every sync has been failing (zero when the last one succeeded).
    pub fn sync_failing_for(&self) -> Duration {
        self.failing_since
            .lock()
            .ok()
            .and_then(|f| *f)
            .map(|t| t.elapsed())
            .unwrap_or_default()
    }

    fn healthz(&self) -> (u16, String) {
        let last = self.last_sync_unix.lock().map(|t| *t).unwrap_or_default();
        let failing = self.sync_failing_for();
        let body = format!(
            "{{\"lastUpdated\": {last:.3}, \"currentTime\": {:.3}, \"nodeEligible\": true, \"syncFailingSeconds\": {:.1}}}\n",
            now_unix(),
            failing.as_secs_f64()
        );
        // The chosen mode stopped working: say so where node health is checked, instead of
        // silently serving a stale dataplane.
        if failing > SYNC_FAILING_UNHEALTHY {
            return (503, body);
        }
        if self.synced.load(Ordering::Relaxed) {
            (200, body)
        } else {
            (503, body)
        }
    }

    /// Prometheus text exposition (format 0.0.4).
    pub fn metrics(&self) -> String {
        let mut out = String::new();
        if let Ok(h) = self.sync_durations.lock() {
            h.write(
                &mut out,
                "kubeproxy_sync_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds",
            );
        }
        if let Ok(h) = self.programming_durations.lock() {
            h.write(
                &mut out,
                "kubeproxy_network_programming_duration_seconds",
                "In Cluster Network Programming Latency in seconds (from a change being seen to it being programmed)",
            );
        }
        let mut single = |name: &str, ty: &str, help: &str, value: f64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {ty}\n{name} {value}"
            );
        };
        let last = self.last_sync_unix.lock().map(|t| *t).unwrap_or_default();
        if last > 0.0 {
            single(
                "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                "gauge",
                "The last time proxy rules were successfully synced",
                last,
            );
        }
        single(
            "kubeproxy_sync_proxy_rules_service_changes_total",
            "counter",
            "Cumulative proxy rules Service changes",
            self.service_changes.load(Ordering::Relaxed) as f64,
        );
        single(
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            "counter",
            "Cumulative proxy rules Endpoint changes",
            self.endpoint_changes.load(Ordering::Relaxed) as f64,
        );
        single(
            "kproxy_sync_errors_total",
            "counter",
            "Syncs that failed and were retried as full syncs",
            self.sync_errors.load(Ordering::Relaxed) as f64,
        );
        single(
            "kproxy_frontends_rejected",
            "gauge",
            "Frontends the last sync could not program (a map full, no free index; each is logged by name)",
            self.frontends_rejected.load(Ordering::Relaxed) as f64,
        );
        single(
            "kproxy_sync_failing_seconds",
            "gauge",
            "How long every sync has been failing (0 when the last one succeeded)",
            self.sync_failing_for().as_secs_f64(),
        );
        single(
            "kproxy_synced",
            "gauge",
            "1 once the first full sync is programmed",
            if self.synced.load(Ordering::Relaxed) {
                1.0
            } else {
                0.0
            },
        );
        single(
            "kproxy_frontends",
            "gauge",
            "Service frontends programmed",
            self.frontends.load(Ordering::Relaxed) as f64,
        );
        single(
            "kproxy_backends",
            "gauge",
            "Backends programmed (over all frontends)",
            self.backends.load(Ordering::Relaxed) as f64,
        );
        let no_local = self.no_local.lock().map(|n| *n).unwrap_or_default();
        let name = "kubeproxy_sync_proxy_rules_no_local_endpoints_total";
        let _ = writeln!(
            out,
            "# HELP {name} Number of services with a Local traffic policy and no endpoints\n# TYPE {name} gauge\n{name}{{traffic_policy=\"internal\"}} {}\n{name}{{traffic_policy=\"external\"}} {}",
            no_local.internal, no_local.external
        );
        let mode = self.mode.lock().map(|m| m.clone()).unwrap_or_default();
        if !mode.is_empty() {
            let _ = writeln!(
                out,
                "# HELP kproxy_proxy_mode The dataplane in use\n# TYPE kproxy_proxy_mode gauge\nkproxy_proxy_mode{{mode=\"{mode}\"}} 1"
            );
        }
        let root = self.bpf_root.lock().ok().and_then(|r| r.clone());
        if let Some(root) = root {
            write_map_fill(&mut out, &crate::inspect::maps::fill_levels(&root));
            let service_of = self
                .service_of
                .lock()
                .map(|m| m.clone())
                .unwrap_or_default();
            write_datapath(&mut out, &root, &service_of);
        }
        out
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One frontend's counters with its labels.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct FrontendSeries {
    service: String,
    frontend: String,
    packets: u64,
    bytes: u64,
    connections: u64,
}

/// Every programmed frontend (master entries of the services map) with its counters (zero
/// before its first traffic), labelled from `service_of`.
fn frontend_series(
    masters: impl IntoIterator<Item = (Lb4Key, Lb4Service)>,
    stats: &BTreeMap<u16, crate::inspect::maps::FrontendStats>,
    service_of: &BTreeMap<Lb4Key, String>,
) -> Vec<FrontendSeries> {
    use crate::inspect::maps::{addr, port, proto_name};
    let mut rows: Vec<FrontendSeries> = masters
        .into_iter()
        .filter(|(k, _)| k.backend_slot == 0)
        .map(|(k, v)| {
            let s = stats.get(&v.rev_nat_index).copied().unwrap_or_default();
            FrontendSeries {
                service: service_of.get(&k).cloned().unwrap_or_default(),
                frontend: format!(
                    "{}:{}/{}",
                    addr(k.address),
                    port(k.dport),
                    proto_name(k.proto)
                ),
                packets: s.packets,
                bytes: s.bytes,
                connections: s.connections,
            }
        })
        .collect();
    rows.sort();
    rows
}

/// `kproxy_datapath_events_total{reason}` and `kproxy_service_{packets,bytes,connections}_total`
/// from the per-CPU counter maps (summed over the CPUs). Unreadable maps are left out.
fn write_datapath(out: &mut String, root: &std::path::Path, service_of: &BTreeMap<Lb4Key, String>) {
    use crate::inspect::maps::{read_events, read_hash, read_svc_stats};
    if let Ok(events) = read_events(root) {
        let name = "kproxy_datapath_events_total";
        let _ = writeln!(
            out,
            "# HELP {name} What the datapath did with a packet or socket call, by reason (translations, and why traffic was passed untranslated)\n# TYPE {name} counter"
        );
        for e in &events {
            let _ = writeln!(out, "{name}{{reason=\"{}\"}} {}", e.reason, e.count);
        }
    }
    let Ok(stats) = read_svc_stats(root) else {
        return;
    };
    let Ok(masters) = read_hash::<Lb4Key, Lb4Service>(root, proxy_common::maps::LB4_SERVICES)
    else {
        return;
    };
    let rows = frontend_series(masters, &stats, service_of);
    if rows.is_empty() {
        return;
    }
    type Field = fn(&FrontendSeries) -> u64;
    let metrics: [(&str, &str, Field); 3] = [
        (
            "kproxy_service_packets_total",
            "Packets the device programs translated for a frontend (both directions; socket-level traffic is not seen per packet)",
            |r| r.packets,
        ),
        (
            "kproxy_service_bytes_total",
            "IPv4 bytes of the packets counted in kproxy_service_packets_total",
            |r| r.bytes,
        ),
        (
            "kproxy_service_connections_total",
            "Connections to a frontend: socket-level connect()/sendmsg() translations and new flows of the device programs",
            |r| r.connections,
        ),
    ];
    for (name, help, field) in metrics {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for r in &rows {
            let _ = writeln!(
                out,
                "{name}{{service=\"{}\",frontend=\"{}\"}} {}",
                label_value(&r.service),
                label_value(&r.frontend),
                field(r)
            );
        }
    }
}

fn write_map_fill(out: &mut String, fills: &[crate::inspect::maps::MapFill]) {
    let readable: Vec<_> = fills.iter().filter(|f| f.error.is_none()).collect();
    if readable.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "# HELP kproxy_bpf_map_entries Entries in a pinned map (conntrack included)\n# TYPE kproxy_bpf_map_entries gauge"
    );
    for f in &readable {
        let _ = writeln!(
            out,
            "kproxy_bpf_map_entries{{map=\"{}\"}} {}",
            f.name, f.entries
        );
    }
    let _ = writeln!(
        out,
        "# HELP kproxy_bpf_map_max_entries Capacity of a pinned map\n# TYPE kproxy_bpf_map_max_entries gauge"
    );
    for f in &readable {
        let _ = writeln!(
            out,
            "kproxy_bpf_map_max_entries{{map=\"{}\"}} {}",
            f.name, f.max_entries
        );
    }
    // Cilium's "map pressure": how full a map is. For the LRU conntrack maps, 1 means new
    // flows evict the least recently used ones (kproxy_datapath_events_total has
    // conntrack_created, conntrack_lost_midflow and conntrack_insert_failed).
    let _ = writeln!(
        out,
        "# HELP kproxy_bpf_map_pressure Entries / capacity of a pinned map (0..1)\n# TYPE kproxy_bpf_map_pressure gauge"
    );
    for f in &readable {
        let _ = writeln!(
            out,
            "kproxy_bpf_map_pressure{{map=\"{}\"}} {}",
            f.name,
            f.ratio()
        );
    }
}

/// The health and metrics endpoints answer GET (and HEAD) only.
fn is_read_only(method: &str) -> bool {
    matches!(method, "GET" | "HEAD")
}

/// Serves `/healthz` and `/livez` (health address) or `/metrics` (metrics address) until the
/// process ends. A bind failure is logged, not fatal: the dataplane matters more.
pub async fn serve(addr: SocketAddr, status: Arc<Status>, metrics: bool) {
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%addr, "cannot listen for {}: {e}", if metrics { "metrics" } else { "health checks" });
            return;
        }
    };
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let status = status.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let n =
                match tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut buf))
                    .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
            let req = String::from_utf8_lossy(&buf[..n]);
            let mut words = req.split_whitespace();
            let method = words.next().unwrap_or("");
            let path = words.next().unwrap_or("/");
            if !is_read_only(method) {
                // The endpoints only report: nothing may change state through them.
                let body = "method not allowed: use GET\n";
                let resp = format!(
                    "HTTP/1.1 405 Method Not Allowed\r\nAllow: GET, HEAD\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(resp.as_bytes()).await;
                return;
            }
            let (code, ctype, body) = match (metrics, path) {
                (false, "/healthz") => {
                    let (c, b) = status.healthz();
                    (c, "application/json", b)
                }
                (false, "/livez") => (
                    200,
                    "application/json",
                    "{\"status\": \"ok\"}\n".to_string(),
                ),
                (true, "/metrics") => {
                    // Counting map entries walks the maps: keep it off the async workers.
                    let s = status.clone();
                    let text = tokio::task::spawn_blocking(move || s.metrics())
                        .await
                        .unwrap_or_default();
                    (200, "text/plain; version=0.0.4", text)
                }
                _ => (404, "text/plain", "not found\n".to_string()),
            };
            let reason = match code {
                200 => "OK",
                503 => "Service Unavailable",
                _ => "Not Found",
            };
            let resp = format!(
                "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testutil::{simple_service, simple_slice};

    /// Every line is a comment (`# HELP`/`# TYPE`) or `name{labels} value`.
    pub fn assert_valid_exposition(text: &str) {
        for line in text.lines() {
            if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect(line);
            assert!(value.parse::<f64>().is_ok(), "bad value in {line:?}");
            let name = series.split('{').next().unwrap();
            assert!(
                !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "bad name in {line:?}"
            );
            if let Some(labels) = series.strip_prefix(name) {
                assert!(
                    labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
                    "bad labels in {line:?}"
                );
            }
        }
    }

    #[test]
    fn histogram_is_cumulative() {
        let mut h = Histogram::new(&SYNC_BUCKETS);
        for v in [0.0005, 0.003, 0.003, 100.0] {
            h.observe(v);
        }
        let mut out = String::new();
        h.write(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.001\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.004\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"16.384\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_count 4\n"), "{out}");
        assert_valid_exposition(&out);
    }

    #[test]
    fn changes_are_counted_by_kind_and_programming_is_timed() {
        let status = Status::default();
        let svc = simple_service("web", "10.96.0.10", 80, "8080");
        let sl = simple_slice(
            "web-1",
            "web",
            8080,
            &[("10.0.0.1", "n1", true, true, false)],
        );
        let objs = vec![
            K8sObject::Service(Box::new(svc.clone())),
            K8sObject::EndpointSlice(Box::new(sl)),
        ];
        status.observe_objects(&objs);
        status.observe_objects(&objs);
        assert_eq!(status.service_changes.load(Ordering::Relaxed), 1);
        assert_eq!(status.endpoint_changes.load(Ordering::Relaxed), 1);
        // The slice is deleted.
        status.observe_objects(&[K8sObject::Service(Box::new(svc))]);
        assert_eq!(status.endpoint_changes.load(Ordering::Relaxed), 2);

        let mut model = Model::new();
        model.replace_all(objs);
        let desired = model.desired(&Default::default());
        status.synced.store(true, Ordering::Relaxed);
        status.record_sync(
            Duration::from_millis(3),
            &desired,
            no_local_endpoints(&model, &desired),
        );
        assert_eq!(status.programming_durations.lock().unwrap().count(), 1);
        // Nothing pending: a later sync is not a programming latency.
        status.record_sync(
            Duration::from_millis(3),
            &desired,
            NoLocalEndpoints::default(),
        );
        assert_eq!(status.programming_durations.lock().unwrap().count(), 1);
        assert_eq!(status.sync_durations.lock().unwrap().count(), 2);

        let text = status.metrics();
        assert_valid_exposition(&text);
        for name in [
            "kubeproxy_sync_proxy_rules_duration_seconds_count 2",
            "kubeproxy_network_programming_duration_seconds_count 1",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds ",
            "kubeproxy_sync_proxy_rules_service_changes_total 1",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total 2",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"internal\"} 0",
            "kproxy_frontends 1",
            "kproxy_backends 1",
        ] {
            assert!(text.contains(name), "{name:?} missing in\n{text}");
        }
    }

    #[test]
    fn frontend_series_are_labelled_from_the_last_desired_state() {
        let np = Lb4Key::new(0, 30001u16.to_be(), 6, 0);
        let cip = Lb4Key::new(u32::from_ne_bytes([10, 96, 0, 10]), 80u16.to_be(), 17, 0);
        let master = |idx| Lb4Service {
            backend_id: 0,
            count: 1,
            rev_nat_index: idx,
            flags: 0,
            _pad: 0,
        };
        let slot = Lb4Key {
            backend_slot: 1,
            ..np
        };
        let mut stats = BTreeMap::new();
        stats.insert(
            4,
            crate::inspect::maps::FrontendStats {
                packets: 10,
                bytes: 600,
                connections: 2,
            },
        );
        let mut service_of = BTreeMap::new();
        service_of.insert(np, "default/web:http/TCP".to_string());
        let rows = frontend_series(
            [(np, master(4)), (slot, master(4)), (cip, master(5))],
            &stats,
            &service_of,
        );
        assert_eq!(
            rows,
            vec![
                FrontendSeries {
                    service: String::new(),
                    frontend: "10.96.0.10:80/UDP".into(),
                    packets: 0,
                    bytes: 0,
                    connections: 0,
                },
                FrontendSeries {
                    service: "default/web:http/TCP".into(),
                    frontend: "0.0.0.0:30001/TCP".into(),
                    packets: 10,
                    bytes: 600,
                    connections: 2,
                },
            ]
        );
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn the_last_sync_names_the_frontends() {
        let status = Status::default();
        let svc = simple_service("web", "10.96.0.10", 80, "8080");
        let mut model = Model::new();
        model.replace_all(vec![K8sObject::Service(Box::new(svc))]);
        let desired = model.desired(&Default::default());
        status.record_sync(
            Duration::from_millis(1),
            &desired,
            NoLocalEndpoints::default(),
        );
        let names = status.service_of.lock().unwrap().clone();
        let key = Lb4Key::new(u32::from_ne_bytes([10, 96, 0, 10]), 80u16.to_be(), 6, 0);
        assert_eq!(
            names.get(&key).map(String::as_str),
            Some(desired.frontends[0].service.to_string().as_str()),
            "{names:?}"
        );
    }

    #[test]
    fn local_policy_without_local_endpoints_is_counted() {
        let svc = crate::model::testutil::service(
            "metadata: {name: web}\nspec:\n  clusterIP: 10.96.0.10\n  internalTrafficPolicy: Local\n  ports:\n  - {name: http, port: 80, targetPort: 8080}\n",
        );
        let sl = simple_slice(
            "web-1",
            "web",
            8080,
            &[("10.0.0.1", "other-node", true, true, false)],
        );
        let mut model = Model::new();
        model.replace_all(vec![
            K8sObject::Service(Box::new(svc)),
            K8sObject::EndpointSlice(Box::new(sl)),
        ]);
        let node = crate::desired::NodeContext {
            node_name: "n1".into(),
            nodeport_addresses: vec![],
            zone: None,
            ..Default::default()
        };
        let desired = model.desired(&node);
        assert_eq!(
            no_local_endpoints(&model, &desired),
            NoLocalEndpoints {
                internal: 1,
                external: 0
            }
        );
    }

    #[test]
    fn healthz_fails_when_syncs_keep_failing() {
        let status = Status::default();
        status.synced.store(true, Ordering::Relaxed);
        assert_eq!(status.healthz().0, 200);
        status.record_sync_error();
        // A failure that has just started is retried before the node is declared unhealthy.
        assert_eq!(status.healthz().0, 200);
        if let Ok(mut f) = status.failing_since.lock() {
            *f = Instant::now().checked_sub(SYNC_FAILING_UNHEALTHY + Duration::from_secs(1));
        }
        let (code, body) = status.healthz();
        assert_eq!(code, 503, "{body}");
        assert!(status.metrics().contains("kproxy_sync_failing_seconds 11"));
        status.record_sync(
            Duration::from_millis(1),
            &DesiredState::default(),
            NoLocalEndpoints::default(),
        );
        assert_eq!(status.healthz().0, 200);
    }
}
