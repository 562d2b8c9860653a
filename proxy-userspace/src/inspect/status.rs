//! `kproxy status`: what is installed under a bpf root (links, programs, maps and how full
//! they are), the datapath's settings, and, when asked, the agent's own view from `/healthz`.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::Path,
    time::Duration,
};

use aya::programs::{
    links::{FdLink, LinkType, PinnedLink},
    loaded_programs,
};
use proxy_common::config::{CFG_FLAG_READY, CFG_FLAG_XDP_FIB_FORWARD};
use serde::Serialize;

use super::{
    maps::{EventCount, LbSnapshot, MapFill, fill_levels, read_config, read_events},
    services,
    table::Table,
};
use crate::dataplane::ebpf::attach::{
    PROG_CONNECT4, PROG_CONNECT6, PROG_GETPEERNAME4, PROG_GETPEERNAME6, PROG_RECVMSG4,
    PROG_RECVMSG6, PROG_SENDMSG4, PROG_SENDMSG6, PROG_TC_EGRESS, PROG_TC_INGRESS, PROG_XDP,
    links_dir,
};

/// A map this full gets a warning.
const FULL_WARN_RATIO: f64 = 0.9;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LinkEntry {
    /// The pin's file name under `<bpf-root>/links`.
    pub pin: String,
    /// `cgroup`, `xdp`, `tc/ingress`, `tc/egress`.
    pub hook: String,
    /// The device, or the program name for cgroup hooks.
    pub target: String,
    pub link_id: Option<u32>,
    pub link_type: Option<String>,
    pub program_id: Option<u32>,
    pub program: Option<String>,
    /// Runs (packets, for the device programs) and run time of the program: only while
    /// `kernel.bpf_stats_enabled` is 1, when the kernel counts them.
    pub run_count: Option<u64>,
    pub run_time_ns: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AgentHealth {
    pub address: SocketAddr,
    pub http_status: Option<u16>,
    /// The agent has programmed its first full sync (/healthz 200).
    pub synced: Option<bool>,
    /// Unix time of its last successful sync.
    pub last_updated: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Status {
    /// `ebpf` when kproxy's maps are pinned there, `none` otherwise.
    pub mode: String,
    pub bpf_root: String,
    /// The datapath translates (the agent has programmed a first sync).
    pub ready: Option<bool>,
    pub xdp_fib_forward: Option<bool>,
    pub frontends: Option<usize>,
    pub backends: Option<usize>,
    pub nodeport_addresses: Vec<Ipv4Addr>,
    pub links: Vec<LinkEntry>,
    pub maps: Vec<MapFill>,
    /// The datapath's event counters by reason, summed over the CPUs (None: unreadable).
    pub events: Option<Vec<EventCount>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentHealth>,
    /// Problems found: missing pins, unreadable maps, detached links, half-written entries,
    /// nearly full maps, an unhealthy agent.
    pub errors: Vec<String>,
}

const PROGRAMS: [&str; 11] = [
    PROG_CONNECT4,
    PROG_SENDMSG4,
    PROG_RECVMSG4,
    PROG_GETPEERNAME4,
    PROG_CONNECT6,
    PROG_SENDMSG6,
    PROG_RECVMSG6,
    PROG_GETPEERNAME6,
    PROG_XDP,
    PROG_TC_INGRESS,
    PROG_TC_EGRESS,
];

/// `(hook, target)` from a link pin name (see `attach.rs`).
pub fn parse_pin_name(name: &str) -> (String, String) {
    if let Some(p) = name.strip_prefix("cgroup_") {
        return ("cgroup".into(), p.into());
    }
    for (prefix, hook) in [
        ("xdp@", "xdp"),
        ("tc_ingress@", "tc/ingress"),
        ("tc_egress@", "tc/egress"),
    ] {
        if let Some(dev) = name.strip_prefix(prefix) {
            return (hook.into(), dev.into());
        }
    }
    ("unknown".into(), name.into())
}

/// The kernel keeps 15 bytes of a program's name: give the full name when it is one of ours.
fn full_program_name(kernel: &str) -> String {
    PROGRAMS
        .iter()
        .find(|p| !kernel.is_empty() && p.starts_with(kernel))
        .map(|p| p.to_string())
        .unwrap_or_else(|| kernel.to_string())
}

fn link_type_name(t: LinkType) -> String {
    match t {
        LinkType::Cgroup => "cgroup".into(),
        LinkType::Xdp => "xdp".into(),
        LinkType::Tcx => "tcx".into(),
        LinkType::Netkit => "netkit".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

fn links(root: &Path, errors: &mut Vec<String>) -> Vec<LinkEntry> {
    let dir = links_dir(root);
    let Ok(rd) = std::fs::read_dir(&dir) else {
        errors.push(format!("no links pinned ({} is missing)", dir.display()));
        return Vec::new();
    };
    let mut names: Vec<String> = rd
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let programs: Vec<_> = loaded_programs().flatten().collect();
    // Run counts are only kept while kernel.bpf_stats_enabled is 1: a 0 otherwise would lie.
    let stats_enabled = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
        .is_ok_and(|s| s.trim() == "1");
    names
        .into_iter()
        .map(|name| {
            let (hook, target) = parse_pin_name(&name);
            let mut entry = LinkEntry {
                pin: name.clone(),
                hook,
                target,
                link_id: None,
                link_type: None,
                program_id: None,
                program: None,
                run_count: None,
                run_time_ns: None,
                error: None,
            };
            match PinnedLink::from_pin(dir.join(&name))
                .map(FdLink::from)
                .and_then(|l| l.info())
            {
                Ok(info) => {
                    entry.link_id = Some(info.id());
                    entry.link_type = info.link_type().ok().map(link_type_name);
                    entry.program_id = Some(info.program_id());
                    if let Some(p) = programs.iter().find(|p| p.id() == info.program_id()) {
                        entry.program = Some(full_program_name(p.name_as_str().unwrap_or("")));
                        if stats_enabled {
                            entry.run_count = Some(p.run_count());
                            entry.run_time_ns = Some(p.run_time().as_nanos() as u64);
                        }
                    }
                    if info.program_id() == 0 {
                        let e = format!("link {name} is pinned but its program is detached");
                        errors.push(e.clone());
                        entry.error = Some(e);
                    }
                }
                Err(e) => {
                    let e = format!("link {name}: {e}");
                    errors.push(e.clone());
                    entry.error = Some(e);
                }
            }
            entry
        })
        .collect()
}

/// `GET /healthz` of an agent.
pub fn agent_health(address: SocketAddr) -> AgentHealth {
    let mut h = AgentHealth {
        address,
        http_status: None,
        synced: None,
        last_updated: None,
        error: None,
    };
    let result = (|| -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: kproxy\r\nConnection: close\r\n\r\n")?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)?;
        Ok(buf)
    })();
    match result {
        Ok(resp) => {
            let code = resp
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse::<u16>().ok());
            h.http_status = code;
            h.synced = code.map(|c| c == 200);
            let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
            h.last_updated = serde_json::from_str::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v.get("lastUpdated").and_then(|t| t.as_f64()));
        }
        Err(e) => h.error = Some(format!("cannot reach the agent at {address}: {e}")),
    }
    h
}

pub fn collect(root: &Path, healthz: Option<SocketAddr>) -> Status {
    let mut errors = Vec::new();
    let maps = fill_levels(root);
    let pinned = maps.iter().any(|m| m.error.is_none());
    if !pinned {
        errors.push(format!(
            "no kproxy maps are pinned under {}: no agent has run with this --bpf-root, or it \
             was cleaned up",
            root.display()
        ));
    } else {
        for m in &maps {
            if let Some(e) = &m.error {
                errors.push(format!("map {}: {e}", m.name));
            } else if !proxy_common::maps::SETTINGS.contains(&m.name.as_str())
                && !proxy_common::maps::COUNTERS.contains(&m.name.as_str())
                && m.ratio() >= FULL_WARN_RATIO
            {
                errors.push(format!(
                    "map {} is {:.0}% full ({}/{})",
                    m.name,
                    m.ratio() * 100.0,
                    m.entries,
                    m.max_entries
                ));
            }
        }
    }
    let links = if pinned || links_dir(root).exists() {
        links(root, &mut errors)
    } else {
        Vec::new()
    };
    let config = read_config(root).ok();
    if let Some(c) = config
        && c.flags & CFG_FLAG_READY == 0
    {
        errors.push(
            "the datapath is not ready: the agent has not programmed a first sync, so \
             nothing is translated"
                .into(),
        );
    }
    let snap = if pinned {
        LbSnapshot::read(root).ok()
    } else {
        None
    };
    if let Some(s) = &snap {
        for e in services::list(s) {
            for slot in e.backends.iter().filter(|b| b.state != "active") {
                errors.push(format!(
                    "frontend {}: {}",
                    e.frontend,
                    services::slot_label(slot)
                ));
            }
        }
    }
    let events = if pinned { read_events(root).ok() } else { None };
    let agent = healthz.map(agent_health);
    if let Some(a) = &agent {
        if let Some(e) = &a.error {
            errors.push(e.clone());
        } else if a.synced == Some(false) {
            errors.push(format!(
                "the agent at {} reports it has not synced (/healthz {})",
                a.address,
                a.http_status.unwrap_or(0)
            ));
        }
    }
    Status {
        mode: if pinned { "ebpf" } else { "none" }.into(),
        bpf_root: root.display().to_string(),
        ready: config.map(|c| c.flags & CFG_FLAG_READY != 0),
        xdp_fib_forward: config.map(|c| c.flags & CFG_FLAG_XDP_FIB_FORWARD != 0),
        frontends: snap.as_ref().map(|s| s.masters().len()),
        backends: snap.as_ref().map(|s| s.backends.len()),
        nodeport_addresses: snap
            .as_ref()
            .map(|s| s.nodeport_addrs.iter().copied().collect())
            .unwrap_or_default(),
        links,
        maps,
        events,
        agent,
        errors,
    }
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let yes_no = |b: Option<bool>| match b {
        Some(true) => "yes",
        Some(false) => "no",
        None => "unknown",
    };
    out.push_str(&format!("Mode:               {}\n", s.mode));
    out.push_str(&format!("BPF root:           {}\n", s.bpf_root));
    out.push_str(&format!("Datapath ready:     {}\n", yes_no(s.ready)));
    out.push_str(&format!(
        "XDP FIB forwarding: {}\n",
        yes_no(s.xdp_fib_forward)
    ));
    out.push_str(&format!(
        "Frontends:          {} ({} backends)\n",
        opt(s.frontends),
        opt(s.backends)
    ));
    out.push_str(&format!(
        "NodePort addresses: {}\n",
        if s.nodeport_addresses.is_empty() {
            "-".into()
        } else {
            s.nodeport_addresses
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        }
    ));
    if let Some(a) = &s.agent {
        let state = match (&a.error, a.synced) {
            (Some(e), _) => e.clone(),
            (None, Some(true)) => format!(
                "synced (/healthz 200, last sync {})",
                a.last_updated
                    .map(|t| format!("{:.1}s ago", (crate::health::now_unix() - t).max(0.0)))
                    .unwrap_or_else(|| "unknown".into())
            ),
            (None, _) => format!("not synced (/healthz {})", opt(a.http_status)),
        };
        out.push_str(&format!("Agent:              {} {state}\n", a.address));
    }
    out.push_str("\nLinks:\n");
    if s.links.is_empty() {
        out.push_str("  (none pinned)\n");
    } else {
        let mut t = Table::new(&["HOOK", "TARGET", "LINK", "PROGRAM", "PROG ID", "RUNS"]);
        for l in &s.links {
            t.row(vec![
                l.hook.clone(),
                l.target.clone(),
                match (&l.link_type, l.link_id) {
                    (Some(ty), Some(id)) => format!("{ty} #{id}"),
                    _ => l.error.clone().unwrap_or_else(|| "-".into()),
                },
                opt(l.program.clone()),
                opt(l.program_id),
                opt(l.run_count),
            ]);
        }
        for line in t.render().lines() {
            out.push_str(&format!("  {line}\n"));
        }
    }
    out.push_str("\nMaps:\n");
    let mut t = Table::new(&["MAP", "ID", "ENTRIES", "MAX", "FILL"]);
    for m in &s.maps {
        if m.name == proxy_common::maps::STATS && m.error.is_none() {
            // A counter array is always "full": its fill says nothing.
            t.row(vec![
                m.name.clone(),
                opt(m.id),
                m.entries.to_string(),
                m.max_entries.to_string(),
                "-".into(),
            ]);
        } else if m.error.is_some() {
            t.row(vec![
                m.name.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "unreadable".into(),
            ]);
        } else {
            t.row(vec![
                m.name.clone(),
                opt(m.id),
                m.entries.to_string(),
                m.max_entries.to_string(),
                format!("{:.1}%", m.ratio() * 100.0),
            ]);
        }
    }
    for line in t.render().lines() {
        out.push_str(&format!("  {line}\n"));
    }
    out.push_str("\nDatapath events (since the maps were created):\n");
    match &s.events {
        None => out.push_str("  (unreadable)\n"),
        Some(events) => {
            let mut t = Table::new(&["REASON", "COUNT"]);
            for e in events.iter().filter(|e| e.count > 0) {
                t.row(vec![e.reason.to_string(), e.count.to_string()]);
            }
            if t.is_empty() {
                out.push_str("  none counted yet\n");
            } else {
                for line in t.render().lines() {
                    out.push_str(&format!("  {line}\n"));
                }
                let zero = events.iter().filter(|e| e.count == 0).count();
                if zero > 0 {
                    out.push_str(&format!("  ({zero} other reasons: 0)\n"));
                }
            }
        }
    }
    out.push_str("\nErrors:\n");
    if s.errors.is_empty() {
        out.push_str("  none\n");
    }
    for e in &s.errors {
        out.push_str(&format!("  - {e}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_tell_the_hook() {
        assert_eq!(
            parse_pin_name("cgroup_kproxy_sock4_connect"),
            ("cgroup".into(), "kproxy_sock4_connect".into())
        );
        assert_eq!(parse_pin_name("xdp@eth0"), ("xdp".into(), "eth0".into()));
        assert_eq!(
            parse_pin_name("tc_egress@eth0"),
            ("tc/egress".into(), "eth0".into())
        );
        assert_eq!(full_program_name("kproxy_sock4_co"), PROG_CONNECT4);
        assert_eq!(full_program_name("other"), "other");
    }

    #[test]
    fn an_empty_root_says_nothing_is_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let s = collect(dir.path(), None);
        assert_eq!(s.mode, "none");
        assert!(s.links.is_empty());
        assert!(
            s.errors[0].contains("no kproxy maps are pinned"),
            "{:?}",
            s.errors
        );
        let out = render(&s);
        assert!(out.contains("Mode:               none"), "{out}");
        assert!(out.contains("KP_CT4_V1"), "{out}");
    }
}
