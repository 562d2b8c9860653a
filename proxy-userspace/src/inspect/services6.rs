//! The IPv6 frontends of the eBPF mode (`KP_LB6_*` maps, programmed for the socket hooks):
//! their rows in `kproxy list services`, and `kproxy trace` of an IPv6 destination, decided
//! as the socket hooks decide (the exact address, or a nodePort address of this node matched
//! to the `::` wildcard; then a random slot).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::Path,
};

use proxy_common::{
    lb::BACKEND_FLAG_LOCAL,
    lb6::{Lb6Backend, Lb6Key, Lb6Service},
    maps as names,
};

use super::{
    maps::{port, proto_name, read_hash},
    services::{ServiceEntry, SlotEntry, slot_label, type_flags},
    trace::{Candidate, Trace},
};
use crate::dataplane::ebpf::maps6::{addr_from_words, be_words};

/// The IPv6 load-balancing maps at one moment.
#[derive(Clone, Debug, Default)]
pub struct Lb6Snapshot {
    pub services: BTreeMap<Lb6Key, Lb6Service>,
    pub backends: BTreeMap<u32, Lb6Backend>,
    pub nodeport_addrs: BTreeSet<Ipv6Addr>,
}

impl Lb6Snapshot {
    pub fn read(root: &Path) -> anyhow::Result<Self> {
        let services = read_hash::<Lb6Key, Lb6Service>(root, names::LB6_SERVICES)?;
        let backends = read_hash::<u32, Lb6Backend>(root, names::LB6_BACKENDS)?;
        let npa = read_hash::<[u32; 4], u32>(root, names::LB6_NODEPORT_ADDRS)?;
        Ok(Self {
            services: services.into_iter().collect(),
            backends: backends.into_iter().collect(),
            nodeport_addrs: npa.into_iter().map(|(k, _)| addr_from_words(k)).collect(),
        })
    }

    /// The master entry (slot 0) of a frontend.
    fn master(&self, address: Ipv6Addr, port: u16, proto: u8) -> Option<(Lb6Key, Lb6Service)> {
        let key = Lb6Key::new(be_words(address), port.to_be(), proto, 0);
        self.services.get(&key).map(|v| (key, *v))
    }

    /// Master entries, sorted by address, port and protocol.
    fn masters(&self) -> Vec<(Lb6Key, Lb6Service)> {
        let mut v: Vec<(Lb6Key, Lb6Service)> = self
            .services
            .iter()
            .filter(|(k, _)| k.backend_slot == 0)
            .map(|(k, v)| (*k, *v))
            .collect();
        v.sort_by_key(|(k, _)| (addr_from_words(k.address), port(k.dport), k.proto));
        v
    }
}

/// `[address]:port/PROTO`, with ` (nodePort)` for the `::` wildcard.
fn frontend_label6(key: &Lb6Key) -> String {
    let a = addr_from_words(key.address);
    let mut s = format!("[{a}]:{}/{}", port(key.dport), proto_name(key.proto));
    if a.is_unspecified() {
        s.push_str(" (nodePort)");
    }
    s
}

/// The backend slots 1..=count of a frontend, resolved against the backends map.
fn slots6(snap: &Lb6Snapshot, key: &Lb6Key, master: &Lb6Service) -> Vec<SlotEntry> {
    (1..=master.count)
        .map(|slot| {
            let backend = snap
                .services
                .get(&Lb6Key {
                    backend_slot: slot,
                    ..*key
                })
                .map(|s| (s.backend_id, snap.backends.get(&s.backend_id)));
            let Some((id, Some(b))) = backend else {
                return SlotEntry {
                    slot,
                    id: backend.map_or(0, |(id, _)| id),
                    address: None,
                    port: None,
                    locality: "",
                    state: "missing",
                };
            };
            SlotEntry {
                slot,
                id,
                address: Some(IpAddr::V6(addr_from_words(b.address))),
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
            }
        })
        .collect()
}

/// One row per IPv6 frontend (no traffic counters: the IPv6 socket hooks keep none).
pub fn list6(snap: &Lb6Snapshot) -> Vec<ServiceEntry> {
    snap.masters()
        .iter()
        .map(|(k, v)| ServiceEntry {
            frontend: frontend_label6(k),
            family: "IPv6",
            address: IpAddr::V6(addr_from_words(k.address)),
            port: port(k.dport),
            protocol: proto_name(k.proto),
            types: type_flags(v.flags),
            rev_nat_index: v.rev_nat_index,
            backend_count: v.count,
            backends: slots6(snap, k, v),
            traffic: Default::default(),
        })
        .collect()
}

/// What the IPv6 socket hook does with a new connection from `src` to `dst`:port/`proto`.
pub fn trace6(snap: &Lb6Snapshot, src: IpAddr, dst: Ipv6Addr, dport: u16, proto: u8) -> Trace {
    let flow = format!(
        "{src} -> {}/{} (IPv6)",
        SocketAddr::new(IpAddr::V6(dst), dport),
        proto_name(proto)
    );
    let mut t = Trace {
        flow,
        frontend: None,
        matched: None,
        types: Vec::new(),
        rev_nat_index: None,
        verdict: "not-a-service",
        backend: None,
        snat: None,
        candidates: Vec::new(),
        reasons: Vec::new(),
    };
    let found = match snap.master(dst, dport, proto) {
        Some(m) => Some(("exact", m)),
        None if snap.nodeport_addrs.contains(&dst) => snap
            .master(Ipv6Addr::UNSPECIFIED, dport, proto)
            .map(|m| ("nodePort", m)),
        None => None,
    };
    let Some((matched, (key, master))) = found else {
        t.reasons.push(format!(
            "no IPv6 frontend [{dst}]:{dport}/{} (nor a nodePort of this node): the socket hook leaves the connection alone",
            proto_name(proto)
        ));
        return t;
    };
    t.frontend = Some(frontend_label6(&key));
    t.matched = Some(matched);
    t.types = type_flags(master.flags);
    t.rev_nat_index = Some(master.rev_nat_index);
    if matched == "nodePort" {
        t.reasons.push(format!(
            "[{dst}] is a nodePort address of this node: the [::]:{dport} wildcard frontend matches"
        ));
    }
    let slots = slots6(snap, &key, &master);
    let active: Vec<&SlotEntry> = slots.iter().filter(|s| s.state == "active").collect();
    if active.is_empty() {
        t.verdict = "no-endpoints";
        t.reasons
            .push("no endpoints: the socket hook refuses the connection (ECONNREFUSED)".into());
        return t;
    }
    t.verdict = "random";
    let p = 1.0 / active.len() as f64;
    for s in &active {
        if let (Some(IpAddr::V6(address)), Some(port)) = (s.address, s.port) {
            t.candidates.push(Candidate {
                id: s.id,
                address: IpAddr::V6(address),
                port,
                locality: s.locality,
                probability: p,
            });
        }
    }
    t.reasons.push(format!(
        "a new connection gets one of {} backend slots at random (connect-time translation): {}",
        active.len(),
        active
            .iter()
            .map(|s| slot_label(s))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    t
}

#[cfg(test)]
mod tests {
    use proxy_common::lb::{SVC_FLAG_CLUSTER_IP, SVC_FLAG_EXTERNAL, SVC_FLAG_NODEPORT};

    use super::*;
    use crate::inspect::{
        services::{render, tests::seed_snapshot},
        trace::{AnyDestination, AnySource},
    };

    fn ip(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    /// As the IPv6 writer programs it: cluster IP [fd00:10:96::a]:8080 over two pods (one
    /// local), nodePort 30080 over the local one, an empty cluster IP [fd00:10:96::b]:80.
    fn snapshot6() -> Lb6Snapshot {
        let mut s = Lb6Snapshot::default();
        let pods = [("fd00:10:244:1::a", true), ("fd00:10:244:2::b", false)];
        let fes = [
            (
                "fd00:10:96::a",
                8080u16,
                SVC_FLAG_CLUSTER_IP,
                1u16,
                &pods[..],
            ),
            (
                "::",
                30080,
                SVC_FLAG_NODEPORT | SVC_FLAG_EXTERNAL,
                2,
                &pods[..1],
            ),
            ("fd00:10:96::b", 80, SVC_FLAG_CLUSTER_IP, 3, &[][..]),
        ];
        let mut id = 0;
        for (addr, p, flags, rev, backends) in fes {
            let key = Lb6Key::new(be_words(ip(addr)), p.to_be(), 6, 0);
            s.services.insert(
                key,
                Lb6Service {
                    backend_id: 0,
                    count: backends.len() as u16,
                    rev_nat_index: rev,
                    flags,
                    _pad: 0,
                },
            );
            for (slot, (b, local)) in backends.iter().enumerate() {
                id += 1;
                s.services.insert(
                    Lb6Key {
                        backend_slot: slot as u16 + 1,
                        ..key
                    },
                    Lb6Service {
                        backend_id: id,
                        count: 0,
                        rev_nat_index: rev,
                        flags: 0,
                        _pad: 0,
                    },
                );
                s.backends.insert(
                    id,
                    Lb6Backend {
                        address: be_words(ip(b)),
                        port: 80u16.to_be(),
                        proto: 6,
                        flags: if *local { BACKEND_FLAG_LOCAL } else { 0 },
                        rev_nat_index: rev,
                        _pad: 0,
                    },
                );
            }
        }
        s.nodeport_addrs.insert(ip("fd00:198:18::1"));
        s
    }

    #[test]
    fn lists_ipv6_frontends_after_the_ipv4_ones() {
        let l = list6(&snapshot6());
        let labels: Vec<&str> = l.iter().map(|e| e.frontend.as_str()).collect();
        assert_eq!(
            labels,
            [
                "[::]:30080/TCP (nodePort)",
                "[fd00:10:96::a]:8080/TCP",
                "[fd00:10:96::b]:80/TCP"
            ]
        );
        assert!(l.iter().all(|e| e.family == "IPv6"));
        assert_eq!(l[1].backends.len(), 2);
        assert_eq!(l[1].backends[1].locality, "remote");
        assert_eq!(
            slot_label(&l[1].backends[0]),
            "[fd00:10:244:1::a]:80 (local, id 1)"
        );
        let mut all = crate::inspect::services::list(&seed_snapshot());
        all.extend(l);
        let out = render(&all);
        let (v4, v6) = out
            .split_once("IPv6 frontends:\n")
            .expect("an IPv6 section");
        assert!(v4.starts_with("IPv4 frontends:\n"), "{out}");
        assert!(v4.contains("10.96.100.208:8080/TCP"), "{out}");
        assert!(v6.contains("[fd00:10:96::a]:8080/TCP"), "{out}");
        assert!(v6.contains("(none: connections are refused)"), "{out}");
        // IPv4 only: the table as before, without section titles.
        let v4_only = render(&crate::inspect::services::list(&seed_snapshot()));
        assert!(v4_only.starts_with("FRONTEND"), "{v4_only}");
    }

    #[test]
    fn traces_ipv6_destinations_like_the_socket_hook() {
        let snap = snapshot6();
        let src = IpAddr::V6(ip("fd00:10:244:1::5"));
        let t = trace6(&snap, src, ip("fd00:10:96::a"), 8080, 6);
        assert_eq!(t.verdict, "random");
        assert_eq!(t.matched, Some("exact"));
        assert_eq!(t.candidates.len(), 2);
        assert!(
            t.candidates
                .iter()
                .all(|c| (c.probability - 0.5).abs() < 1e-9)
        );
        assert!(t.flow.contains("(IPv6)"), "{}", t.flow);
        let np = trace6(&snap, src, ip("fd00:198:18::1"), 30080, 6);
        assert_eq!(np.matched, Some("nodePort"));
        assert_eq!(np.frontend.as_deref(), Some("[::]:30080/TCP (nodePort)"));
        assert_eq!(np.candidates[0].address, IpAddr::V6(ip("fd00:10:244:1::a")));
        assert_eq!(
            trace6(&snap, src, ip("fd00:10:96::b"), 80, 6).verdict,
            "no-endpoints"
        );
        assert_eq!(
            trace6(&snap, src, ip("fd00:10:96::a"), 8080, 17).verdict,
            "not-a-service"
        );
        assert_eq!(
            trace6(&snap, src, ip("fd00:10:96::9"), 30080, 6).verdict,
            "not-a-service"
        );
        let text = crate::inspect::trace::render(&t);
        assert!(
            text.contains("[fd00:10:244:2::b]:80 (remote, id 2)"),
            "{text}"
        );
    }

    #[test]
    fn parses_sources_and_destinations_of_both_families() {
        assert_eq!(
            "[fd00:10:96::a]:53/udp".parse::<AnyDestination>(),
            Ok(AnyDestination::V6 {
                address: ip("fd00:10:96::a"),
                port: 53,
                proto: 17
            })
        );
        assert!(matches!(
            "10.96.0.10:53/udp".parse::<AnyDestination>(),
            Ok(AnyDestination::V4(_))
        ));
        assert!("fd00:10:96::a:53".parse::<AnyDestination>().is_err());
        assert_eq!(
            "fd00::1".parse::<AnySource>(),
            Ok(AnySource::V6(ip("fd00::1")))
        );
        assert_eq!(
            "[fd00::1]:4000".parse::<AnySource>(),
            Ok(AnySource::V6(ip("fd00::1")))
        );
        assert!(matches!(
            "198.18.0.1:4000".parse::<AnySource>(),
            Ok(AnySource::V4(_))
        ));
        assert!("nope".parse::<AnySource>().is_err());
    }
}
