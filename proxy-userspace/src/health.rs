//! `/healthz`, `/livez` and `/metrics` over plain HTTP/1.1, like kube-proxy's.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

/// What the agent reports about itself.
#[derive(Default)]
pub struct Status {
    /// The first full sync has been programmed.
    pub synced: AtomicBool,
    pub mode: Mutex<String>,
    pub last_sync_unix: Mutex<f64>,
    pub sync_durations: Mutex<Vec<f64>>,
    pub sync_errors: AtomicU64,
    pub service_changes: AtomicU64,
    pub endpoint_changes: AtomicU64,
    pub frontends: AtomicU64,
    pub backends: AtomicU64,
}

pub fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

impl Status {
    pub fn record_sync(&self, seconds: f64) {
        if let Ok(mut v) = self.sync_durations.lock() {
            v.push(seconds);
            if v.len() > 1024 {
                v.drain(..512);
            }
        }
        if let Ok(mut t) = self.last_sync_unix.lock() {
            *t = now_unix();
        }
    }

    fn healthz(&self) -> (u16, String) {
        let last = self.last_sync_unix.lock().map(|t| *t).unwrap_or_default();
        let body = format!(
            "{{\"lastUpdated\": {last:.3}, \"currentTime\": {:.3}, \"nodeEligible\": true}}\n",
            now_unix()
        );
        if self.synced.load(Ordering::Relaxed) {
            (200, body)
        } else {
            (503, body)
        }
    }

    /// Prometheus text exposition, with kube-proxy's metric names where the meaning is the same.
    pub fn metrics(&self) -> String {
        let mut out = String::new();
        let durations = self
            .sync_durations
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default();
        let buckets = [
            0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048,
        ];
        let _ = writeln!(
            out,
            "# HELP kubeproxy_sync_proxy_rules_duration_seconds SyncProxyRules latency in seconds"
        );
        let _ = writeln!(
            out,
            "# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram"
        );
        for b in buckets {
            let n = durations.iter().filter(|d| **d <= b).count();
            let _ = writeln!(
                out,
                "kubeproxy_sync_proxy_rules_duration_seconds_bucket{{le=\"{b}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{{le=\"+Inf\"}} {}",
            durations.len()
        );
        let _ = writeln!(
            out,
            "kubeproxy_sync_proxy_rules_duration_seconds_sum {}",
            durations.iter().sum::<f64>()
        );
        let _ = writeln!(
            out,
            "kubeproxy_sync_proxy_rules_duration_seconds_count {}",
            durations.len()
        );
        let last = self.last_sync_unix.lock().map(|t| *t).unwrap_or_default();
        let gauges = [
            (
                "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                "gauge",
                "The last time proxy rules were successfully synced",
                last,
            ),
            (
                "kubeproxy_sync_proxy_rules_service_changes_total",
                "counter",
                "Cumulative proxy rules Service changes",
                self.service_changes.load(Ordering::Relaxed) as f64,
            ),
            (
                "kubeproxy_sync_proxy_rules_endpoint_changes_total",
                "counter",
                "Cumulative proxy rules Endpoint changes",
                self.endpoint_changes.load(Ordering::Relaxed) as f64,
            ),
            (
                "kproxy_sync_errors_total",
                "counter",
                "Syncs that failed and were retried as full syncs",
                self.sync_errors.load(Ordering::Relaxed) as f64,
            ),
            (
                "kproxy_frontends",
                "gauge",
                "Service frontends programmed",
                self.frontends.load(Ordering::Relaxed) as f64,
            ),
            (
                "kproxy_backends",
                "gauge",
                "Backends programmed (over all frontends)",
                self.backends.load(Ordering::Relaxed) as f64,
            ),
        ];
        for (name, ty, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {ty}\n{name} {v}");
        }
        let mode = self.mode.lock().map(|m| m.clone()).unwrap_or_default();
        let _ = writeln!(
            out,
            "# HELP kproxy_proxy_mode The dataplane in use\n# TYPE kproxy_proxy_mode gauge\nkproxy_proxy_mode{{mode=\"{mode}\"}} 1"
        );
        out
    }
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
            let path = req.split_whitespace().nth(1).unwrap_or("/");
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
                (true, "/metrics") => (200, "text/plain; version=0.0.4", status.metrics()),
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
