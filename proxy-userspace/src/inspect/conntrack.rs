//! `kproxy list conntrack`: the device programs' flows (CT4) and reply translations
//! (NAT4_REV). Socket-level load balancing keeps no per-flow state: connections to cluster
//! IPs from pods and host processes do not appear here.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use proxy_common::{
    conntrack::{Ct4Entry, Ct4Key, Nat4RevEntry},
    maps as names,
};
use serde::Serialize;

use super::{
    maps::{LbSnapshot, addr, frontend_label, monotonic_ns, port, proto_name, read_hash},
    table::Table,
};

/// One translated flow, keyed by the client's packet.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FlowEntry {
    pub protocol: String,
    pub client: SocketAddrV4,
    /// The address the client sent to (a node address for a nodePort).
    pub frontend: SocketAddrV4,
    /// The frontend entry the flow belongs to (through its reverse-NAT index), if it exists.
    pub service: Option<String>,
    pub rev_nat_index: u16,
    pub backend_id: u32,
    pub backend: SocketAddrV4,
    /// The source the flow was SNATed to (backends on other nodes); None: no SNAT.
    pub snat: Option<SocketAddrV4>,
    pub last_seen_ns: u64,
    /// Seconds since the last packet (by CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns).
    pub age_seconds: f64,
}

/// One reply translation, keyed by the reply as it reaches the node.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReplyEntry {
    pub protocol: String,
    /// The reply's source (the backend).
    pub from: SocketAddrV4,
    /// The reply's destination (the client, or the node's SNAT address and port).
    pub to: SocketAddrV4,
    /// What the reply is rewritten to: from the frontend...
    pub new_from: SocketAddrV4,
    /// ...to the client.
    pub new_to: SocketAddrV4,
    pub last_seen_ns: u64,
    pub age_seconds: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Conntrack {
    pub flows: Vec<FlowEntry>,
    pub replies: Vec<ReplyEntry>,
}

/// `--service`, `--backend`, `--client`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// A frontend as the client addressed it, or as the maps key it (`0.0.0.0:PORT` for a
    /// nodePort).
    pub service: Option<SocketAddrV4>,
    pub backend: Option<Ipv4Addr>,
    pub client: Option<Ipv4Addr>,
}

fn sock(a: u32, p: u16) -> SocketAddrV4 {
    SocketAddrV4::new(addr(a), port(p))
}

fn age(now: u64, last: u64) -> f64 {
    now.saturating_sub(last) as f64 / 1e9
}

pub fn flow(k: &Ct4Key, e: &Ct4Entry, snap: Option<&LbSnapshot>, now: u64) -> FlowEntry {
    FlowEntry {
        protocol: proto_name(k.proto),
        client: sock(k.saddr, k.sport),
        frontend: sock(k.daddr, k.dport),
        service: snap
            .and_then(|s| s.master_by_rev_nat(e.rev_nat_index))
            .map(|k| frontend_label(&k)),
        rev_nat_index: e.rev_nat_index,
        backend_id: e.backend_id,
        backend: sock(e.backend_addr, e.backend_port),
        snat: (e.nat_saddr != 0).then(|| sock(e.nat_saddr, e.nat_sport)),
        last_seen_ns: e.last_seen_ns,
        age_seconds: age(now, e.last_seen_ns),
    }
}

pub fn reply(k: &Ct4Key, e: &Nat4RevEntry, now: u64) -> ReplyEntry {
    ReplyEntry {
        protocol: proto_name(k.proto),
        from: sock(k.saddr, k.sport),
        to: sock(k.daddr, k.dport),
        new_from: sock(e.saddr, e.sport),
        new_to: sock(e.daddr, e.dport),
        last_seen_ns: e.last_seen_ns,
        age_seconds: age(now, e.last_seen_ns),
    }
}

impl Filter {
    fn service_matches(&self, frontend: SocketAddrV4, service: Option<&str>) -> bool {
        let Some(want) = self.service else {
            return true;
        };
        if want == frontend {
            return true;
        }
        // `0.0.0.0:30001` names the nodePort frontend whatever node address was used.
        let label = format!("{want}/");
        want.ip().is_unspecified() && want.port() == frontend.port()
            || service.is_some_and(|s| s.starts_with(&label))
    }

    pub fn flow(&self, f: &FlowEntry) -> bool {
        self.service_matches(f.frontend, f.service.as_deref())
            && self.backend.is_none_or(|b| *f.backend.ip() == b)
            && self.client.is_none_or(|c| *f.client.ip() == c)
    }

    pub fn reply(&self, r: &ReplyEntry) -> bool {
        self.service_matches(r.new_from, None)
            && self.backend.is_none_or(|b| *r.from.ip() == b)
            && self.client.is_none_or(|c| *r.new_to.ip() == c)
    }
}

pub fn read(root: &Path, filter: &Filter) -> anyhow::Result<Conntrack> {
    let snap = LbSnapshot::read(root).ok();
    let ct = read_hash::<Ct4Key, Ct4Entry>(root, names::CT4)?;
    let rev = read_hash::<Ct4Key, Nat4RevEntry>(root, names::NAT4_REV)?;
    let now = monotonic_ns();
    let mut out = Conntrack {
        flows: ct
            .iter()
            .map(|(k, e)| flow(k, e, snap.as_ref(), now))
            .filter(|f| filter.flow(f))
            .collect(),
        replies: rev
            .iter()
            .map(|(k, e)| reply(k, e, now))
            .filter(|r| filter.reply(r))
            .collect(),
    };
    out.flows
        .sort_by(|a, b| a.age_seconds.total_cmp(&b.age_seconds));
    out.replies
        .sort_by(|a, b| a.age_seconds.total_cmp(&b.age_seconds));
    Ok(out)
}

fn fmt_age(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{:.0}m{:02.0}s", (s / 60.0).floor(), s % 60.0)
    } else {
        format!("{:.1}h", s / 3600.0)
    }
}

pub fn render(ct: &Conntrack) -> String {
    let mut out = String::new();
    if ct.flows.is_empty() {
        out.push_str("CT4: no translated flows\n");
    } else {
        out.push_str(&format!("CT4 ({} flows):\n", ct.flows.len()));
        let mut t = Table::new(&[
            "PROTO", "CLIENT", "FRONTEND", "BACKEND", "SNAT", "SERVICE", "AGE",
        ]);
        for f in &ct.flows {
            t.row(vec![
                f.protocol.clone(),
                f.client.to_string(),
                f.frontend.to_string(),
                format!("{} (id {})", f.backend, f.backend_id),
                f.snat.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
                f.service
                    .clone()
                    .unwrap_or_else(|| format!("gone (rev-NAT {})", f.rev_nat_index)),
                fmt_age(f.age_seconds),
            ]);
        }
        out.push_str(&t.render());
    }
    out.push('\n');
    if ct.replies.is_empty() {
        out.push_str("NAT4_REV: no reply translations\n");
    } else {
        out.push_str(&format!(
            "NAT4_REV ({} reply translations):\n",
            ct.replies.len()
        ));
        let mut t = Table::new(&["PROTO", "REPLY", "REWRITTEN TO", "AGE"]);
        for r in &ct.replies {
            t.row(vec![
                r.protocol.clone(),
                format!("{} -> {}", r.from, r.to),
                format!("{} -> {}", r.new_from, r.new_to),
                fmt_age(r.age_seconds),
            ]);
        }
        out.push_str(&t.render());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inspect::services::tests::seed_snapshot;

    fn be(a: Ipv4Addr) -> u32 {
        u32::from_ne_bytes(a.octets())
    }

    fn sample() -> (Ct4Key, Ct4Entry) {
        let k = Ct4Key {
            saddr: be(Ipv4Addr::new(198, 18, 0, 100)),
            daddr: be(Ipv4Addr::new(198, 18, 0, 1)),
            sport: 40000u16.to_be(),
            dport: 30001u16.to_be(),
            proto: 6,
            _pad: [0; 3],
        };
        let e = Ct4Entry {
            backend_id: 3,
            backend_addr: be(Ipv4Addr::new(10, 244, 1, 10)),
            backend_port: 80u16.to_be(),
            rev_nat_index: 2,
            nat_saddr: 0,
            nat_sport: 0,
            flags: 0,
            last_seen_ns: 1_000_000_000,
        };
        (k, e)
    }

    #[test]
    fn flows_decode_and_filter() {
        let (k, e) = sample();
        let snap = seed_snapshot();
        let f = flow(&k, &e, Some(&snap), 3_500_000_000);
        assert_eq!(f.client.to_string(), "198.18.0.100:40000");
        assert_eq!(f.service.as_deref(), Some("0.0.0.0:30001/TCP (nodePort)"));
        assert!((f.age_seconds - 2.5).abs() < 1e-9);
        assert_eq!(f.snat, None);
        let pass = |flt: Filter| flt.flow(&f);
        assert!(pass(Filter::default()));
        assert!(pass(Filter {
            service: Some("198.18.0.1:30001".parse().unwrap()),
            ..Default::default()
        }));
        assert!(pass(Filter {
            service: Some("0.0.0.0:30001".parse().unwrap()),
            backend: Some(Ipv4Addr::new(10, 244, 1, 10)),
            client: Some(Ipv4Addr::new(198, 18, 0, 100)),
        }));
        assert!(!pass(Filter {
            service: Some("10.96.100.208:8080".parse().unwrap()),
            ..Default::default()
        }));
        assert!(!pass(Filter {
            client: Some(Ipv4Addr::new(198, 18, 0, 101)),
            ..Default::default()
        }));
        let out = render(&Conntrack {
            flows: vec![f],
            replies: vec![],
        });
        assert!(
            out.contains("198.18.0.100:40000  198.18.0.1:30001  10.244.1.10:80 (id 3)  -"),
            "{out}"
        );
        assert!(out.contains("NAT4_REV: no reply translations"), "{out}");
    }

    #[test]
    fn ages_read_well() {
        assert_eq!(fmt_age(2.54), "2.5s");
        assert_eq!(fmt_age(125.0), "2m05s");
        assert_eq!(fmt_age(7200.0), "2.0h");
    }
}
