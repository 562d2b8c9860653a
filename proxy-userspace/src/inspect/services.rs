//! `kproxy list services`: one row per frontend with its backend slots (IPv4, then IPv6
//! from the `KP_LB6_*` maps, see `services6.rs`).

use std::net::IpAddr;

use proxy_common::lb::{
    BACKEND_FLAG_LOCAL, Lb4Key, Lb4Service, SVC_FLAG_AFFINITY, SVC_FLAG_CLUSTER_IP,
    SVC_FLAG_EXTERNAL, SVC_FLAG_NODEPORT, SVC_FLAG_SOURCE_RANGES,
};
use serde::Serialize;

use super::{
    maps::{FrontendStats, LbSnapshot, addr, frontend_label, port, proto_name},
    table::Table,
};

/// One frontend as the datapath sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceEntry {
    /// `address:port/PROTO`, with ` (nodePort)` for the nodePort wildcard.
    pub frontend: String,
    /// `IPv4` or `IPv6`.
    pub family: &'static str,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: String,
    /// From the frontend flags: `ClusterIP`, `NodePort`, `External`, `ClientIPAffinity`,
    /// `SourceRanges`.
    pub types: Vec<&'static str>,
    pub rev_nat_index: u16,
    /// The master entry's slot count (0: no endpoints, connections are refused).
    pub backend_count: u16,
    pub backends: Vec<SlotEntry>,
    /// What the datapath counted for this frontend (zero until it sees traffic).
    pub traffic: FrontendStats,
}

/// One backend slot of a frontend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SlotEntry {
    pub slot: u16,
    pub id: u32,
    pub address: Option<IpAddr>,
    pub port: Option<u16>,
    /// `local` (on this node), `remote`, or empty when the backend is missing.
    pub locality: &'static str,
    /// `active`; `missing` (the slot names no backend or no slot entry exists); `stale` (the
    /// backend belongs to another frontend). The datapath skips the last two.
    pub state: &'static str,
}

pub fn type_flags(flags: u16) -> Vec<&'static str> {
    let mut v = Vec::new();
    if flags & SVC_FLAG_CLUSTER_IP != 0 {
        v.push("ClusterIP");
    }
    if flags & SVC_FLAG_NODEPORT != 0 {
        v.push("NodePort");
    }
    if flags & SVC_FLAG_EXTERNAL != 0 {
        v.push("External");
    }
    if flags & SVC_FLAG_AFFINITY != 0 {
        v.push("ClientIPAffinity");
    }
    if flags & SVC_FLAG_SOURCE_RANGES != 0 {
        v.push("SourceRanges");
    }
    v
}

/// The backend slots 1..=count of a frontend, resolved against the backends map.
pub fn slots(snap: &LbSnapshot, key: &Lb4Key, master: &Lb4Service) -> Vec<SlotEntry> {
    (1..=master.count)
        .map(|slot| {
            let slot_key = Lb4Key {
                backend_slot: slot,
                ..*key
            };
            let Some(s) = snap.services.get(&slot_key) else {
                return SlotEntry {
                    slot,
                    id: 0,
                    address: None,
                    port: None,
                    locality: "",
                    state: "missing",
                };
            };
            match snap.backends.get(&s.backend_id) {
                Some(b) => SlotEntry {
                    slot,
                    id: s.backend_id,
                    address: Some(IpAddr::V4(addr(b.address))),
                    port: Some(port(b.port)),
                    locality: if b.flags & BACKEND_FLAG_LOCAL != 0 {
                        "local"
                    } else {
                        "remote"
                    },
                    state: if b.rev_nat_index == master.rev_nat_index {
                        "active"
                    } else {
                        "stale"
                    },
                },
                None => SlotEntry {
                    slot,
                    id: s.backend_id,
                    address: None,
                    port: None,
                    locality: "",
                    state: "missing",
                },
            }
        })
        .collect()
}

pub fn list(snap: &LbSnapshot) -> Vec<ServiceEntry> {
    snap.masters()
        .iter()
        .map(|(k, v)| ServiceEntry {
            frontend: frontend_label(k),
            family: "IPv4",
            address: IpAddr::V4(addr(k.address)),
            port: port(k.dport),
            protocol: proto_name(k.proto),
            types: type_flags(v.flags),
            rev_nat_index: v.rev_nat_index,
            backend_count: v.count,
            backends: slots(snap, k, v),
            traffic: snap
                .svc_stats
                .get(&v.rev_nat_index)
                .copied()
                .unwrap_or_default(),
        })
        .collect()
}

/// `10.244.1.10:80 (local, id 3)` (`[fd00::a]:80 ...` for IPv6), or what is wrong with the
/// slot.
pub fn slot_label(s: &SlotEntry) -> String {
    match (s.address, s.port) {
        (Some(a), Some(p)) if s.state == "active" => {
            format!(
                "{} ({}, id {})",
                std::net::SocketAddr::new(a, p),
                s.locality,
                s.id
            )
        }
        (Some(a), Some(p)) => format!(
            "{} ({}, id {}, {})",
            std::net::SocketAddr::new(a, p),
            s.locality,
            s.id,
            s.state
        ),
        _ => format!("slot {}: backend id {} {}", s.slot, s.id, s.state),
    }
}

/// The IPv4 frontends as a table, then the IPv6 ones (if any) as a second one.
pub fn render(entries: &[ServiceEntry]) -> String {
    let (v4, v6): (Vec<ServiceEntry>, Vec<ServiceEntry>) =
        entries.iter().cloned().partition(|e| e.family == "IPv4");
    if v6.is_empty() {
        return render_family(&v4);
    }
    let six = format!("IPv6 frontends:\n{}", render_family(&v6));
    if v4.is_empty() {
        return six;
    }
    format!("IPv4 frontends:\n{}\n{six}", render_family(&v4))
}

fn render_family(entries: &[ServiceEntry]) -> String {
    let mut t = Table::new(&[
        "FRONTEND", "TYPE", "REV-NAT", "CONNS", "PACKETS", "BYTES", "BACKENDS",
    ]);
    for e in entries {
        let backends = if e.backends.is_empty() {
            "(none: connections are refused)".to_string()
        } else {
            e.backends
                .iter()
                .map(|s| format!("{} => {}", s.slot, slot_label(s)))
                .collect::<Vec<_>>()
                .join("\n")
        };
        t.row(vec![
            e.frontend.clone(),
            e.types.join(","),
            e.rev_nat_index.to_string(),
            e.traffic.connections.to_string(),
            e.traffic.packets.to_string(),
            e.traffic.bytes.to_string(),
            backends,
        ]);
    }
    if t.is_empty() {
        return "no service frontends are programmed\n".into();
    }
    t.render()
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::Ipv4Addr;

    use proxy_common::lb::{Lb4Backend, Lb4RevNat};

    use super::*;

    fn be(a: Ipv4Addr) -> u32 {
        u32::from_ne_bytes(a.octets())
    }

    /// The seed service as the writer programs it: clusterIP 10.96.100.208:8080 and nodePort
    /// 30001, both with backends 10.244.1.10:80 and 10.244.1.11:80 (local).
    pub fn seed_snapshot() -> LbSnapshot {
        let mut s = LbSnapshot::default();
        let pods = [Ipv4Addr::new(10, 244, 1, 10), Ipv4Addr::new(10, 244, 1, 11)];
        let fes = [
            (
                Ipv4Addr::new(10, 96, 100, 208),
                8080u16,
                SVC_FLAG_CLUSTER_IP,
                1u16,
            ),
            (
                Ipv4Addr::UNSPECIFIED,
                30001,
                SVC_FLAG_NODEPORT | SVC_FLAG_EXTERNAL,
                2,
            ),
        ];
        let mut id = 0;
        for (a, p, flags, idx) in fes {
            let key = Lb4Key::new(be(a), p.to_be(), 6, 0);
            for (i, pod) in pods.iter().enumerate() {
                id += 1;
                s.backends.insert(
                    id,
                    Lb4Backend {
                        address: be(*pod),
                        port: 80u16.to_be(),
                        proto: 6,
                        flags: BACKEND_FLAG_LOCAL,
                        rev_nat_index: idx,
                        _pad: 0,
                    },
                );
                s.services.insert(
                    Lb4Key {
                        backend_slot: i as u16 + 1,
                        ..key
                    },
                    Lb4Service {
                        backend_id: id,
                        count: 0,
                        rev_nat_index: idx,
                        flags,
                        _pad: 0,
                    },
                );
            }
            s.services.insert(
                key,
                Lb4Service {
                    backend_id: 0,
                    count: 2,
                    rev_nat_index: idx,
                    flags,
                    _pad: 0,
                },
            );
            s.rev_nat.insert(
                idx,
                Lb4RevNat {
                    address: key.address,
                    port: key.dport,
                    _pad: 0,
                },
            );
        }
        s.nodeport_addrs.insert(Ipv4Addr::new(198, 18, 0, 1));
        s
    }

    #[test]
    fn lists_frontends_with_their_backends() {
        let mut snap = seed_snapshot();
        let traffic = FrontendStats {
            packets: 12,
            bytes: 960,
            connections: 3,
        };
        snap.svc_stats.insert(2, traffic);
        let l = list(&snap);
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].frontend, "0.0.0.0:30001/TCP (nodePort)");
        assert_eq!(l[0].types, ["NodePort", "External"]);
        assert_eq!(l[0].traffic, traffic);
        assert_eq!(l[1].frontend, "10.96.100.208:8080/TCP");
        assert_eq!(l[1].backends.len(), 2);
        assert!(l[1].backends.iter().all(|b| b.state == "active"));
        assert_eq!(l[1].traffic, FrontendStats::default());
        let want = "\
FRONTEND                      TYPE               REV-NAT  CONNS  PACKETS  BYTES  BACKENDS
0.0.0.0:30001/TCP (nodePort)  NodePort,External  2        3      12       960    1 => 10.244.1.10:80 (local, id 3)
                                                                                 2 => 10.244.1.11:80 (local, id 4)
10.96.100.208:8080/TCP        ClusterIP          1        0      0        0      1 => 10.244.1.10:80 (local, id 1)
                                                                                 2 => 10.244.1.11:80 (local, id 2)
";
        assert_eq!(render(&l), want);
    }

    #[test]
    fn shows_missing_and_empty() {
        let mut snap = seed_snapshot();
        snap.backends.remove(&1);
        let key = Lb4Key::new(0, 30001u16.to_be(), 6, 0);
        snap.services.get_mut(&key).unwrap().count = 0;
        let l = list(&snap);
        assert!(l[0].backends.is_empty());
        assert_eq!(l[1].backends[0].state, "missing");
        let out = render(&l);
        assert!(out.contains("(none: connections are refused)"), "{out}");
        assert!(out.contains("slot 1: backend id 1 missing"), "{out}");
        assert_eq!(
            render(&[]),
            "no service frontends are programmed\n".to_string()
        );
    }
}
