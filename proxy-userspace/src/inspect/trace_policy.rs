//! The part of `kproxy trace` that depends on per-service policies the datapath applies on top
//! of the frontend lookup: `loadBalancerSourceRanges` (a packet from outside the ranges is
//! dropped, before conntrack) and `sessionAffinity: ClientIP` (a new flow of a client with a
//! live affinity entry goes to that entry's backend instead of a random one).

use std::net::Ipv4Addr;

use proxy_common::{
    affinity::{AFFINITY_CLIENT_ADDR, Lb4AffinityKey, Lb4AffinityValue},
    lb::{
        BACKEND_FLAG_LOCAL, Lb4Service, SVC_FLAG_AFFINITY, SVC_FLAG_EXTERNAL,
        SVC_FLAG_SOURCE_RANGES, SVC_FLAG_SOURCE_RANGES_DENY_NODE,
    },
};

use super::{
    maps::{LbSnapshot, addr, port},
    trace::{Candidate, Source, Trace},
};
use crate::dataplane::ebpf::writer::SrcRange;

/// Whether `a` is inside the range `(index, be network, prefix)`.
fn range_contains(r: &SrcRange, a: Ipv4Addr) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(r.2)).unwrap_or(0);
    u32::from(a) & mask == u32::from(addr(r.1)) & mask
}

fn range_label(r: &SrcRange) -> String {
    format!("{}/{}", addr(r.1), r.2)
}

/// Adds the source-range and affinity decisions to `t` (made by [`super::trace::trace`]).
pub fn apply(
    t: &mut Trace,
    snap: &LbSnapshot,
    src: Source,
    affinity: &[(Lb4AffinityKey, Lb4AffinityValue)],
    ranges: &[SrcRange],
    now_ns: u64,
) {
    let Some(index) = t.rev_nat_index else {
        return;
    };
    let Some((_, svc)) = snap
        .masters()
        .into_iter()
        .find(|(_, m)| m.rev_nat_index == index)
    else {
        return;
    };
    if !source_ranges(t, &svc, src, ranges) {
        return;
    }
    session_affinity(t, snap, &svc, src, affinity, now_ns);
}

/// Returns false when the flow is dropped.
fn source_ranges(t: &mut Trace, svc: &Lb4Service, src: Source, ranges: &[SrcRange]) -> bool {
    if svc.flags & SVC_FLAG_SOURCE_RANGES == 0 || svc.flags & SVC_FLAG_EXTERNAL == 0 {
        return true;
    }
    let mine: Vec<&SrcRange> = ranges.iter().filter(|r| r.0 == svc.rev_nat_index).collect();
    let labels: Vec<String> = mine.iter().map(|r| range_label(r)).collect();
    let node = if svc.flags & SVC_FLAG_SOURCE_RANGES_DENY_NODE != 0 {
        "refused (no node address is in them)"
    } else {
        "allowed (a node address is in them)"
    };
    if let Some(r) = mine.iter().find(|r| range_contains(r, src.address)) {
        t.reasons.push(format!(
            "{} is inside the loadBalancerSourceRanges ({}), in {}; connect() on this node is {node}",
            src.address,
            labels.join(", "),
            range_label(r)
        ));
        return true;
    }
    t.verdict = "dropped";
    t.backend = None;
    t.snat = None;
    t.candidates.clear();
    t.reasons.push(format!(
        "{} is outside the loadBalancerSourceRanges ({}): its packets entering the node are \
         dropped (before conntrack); connect() on this node is {node}",
        src.address,
        if labels.is_empty() {
            "none: nobody".to_string()
        } else {
            labels.join(", ")
        }
    ));
    false
}

fn session_affinity(
    t: &mut Trace,
    snap: &LbSnapshot,
    svc: &Lb4Service,
    src: Source,
    affinity: &[(Lb4AffinityKey, Lb4AffinityValue)],
    now_ns: u64,
) {
    if svc.flags & SVC_FLAG_AFFINITY == 0 {
        return;
    }
    let timeout = svc.backend_id;
    if t.verdict == "conntrack" {
        t.reasons.push(format!(
            "sessionAffinity ClientIP ({timeout}s) only steers new flows; this one has its backend"
        ));
        return;
    }
    if t.verdict != "random" {
        return;
    }
    let key = Lb4AffinityKey::new(
        u64::from(u32::from_ne_bytes(src.address.octets())),
        svc.rev_nat_index,
        AFFINITY_CLIENT_ADDR,
    );
    let entry = affinity.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    let live = entry.and_then(|v| {
        let age = now_ns.saturating_sub(v.last_used_ns);
        let b = snap
            .backends
            .get(&v.backend_id)
            .filter(|b| b.rev_nat_index == svc.rev_nat_index)?;
        (age <= u64::from(timeout) * 1_000_000_000).then_some((v.backend_id, *b, age))
    });
    let Some((id, b, age)) = live else {
        t.reasons.push(format!(
            "sessionAffinity ClientIP: no live entry for {} (from outside the node; pods and \
             host processes are keyed by network namespace), so the random pick is remembered \
             for {timeout}s",
            src.address
        ));
        return;
    };
    t.verdict = "affinity";
    t.backend = Some(Candidate {
        id,
        address: std::net::IpAddr::V4(addr(b.address)),
        port: port(b.port),
        locality: if b.flags & BACKEND_FLAG_LOCAL != 0 {
            "local"
        } else {
            "remote"
        },
        probability: 1.0,
    });
    t.candidates.clear();
    t.reasons.push(format!(
        "sessionAffinity ClientIP: {} got backend {}:{} (id {id}) {:.1}s ago (timeout \
         {timeout}s), so a new flow goes there again",
        src.address,
        addr(b.address),
        port(b.port),
        age as f64 / 1e9
    ));
}

#[cfg(test)]
mod tests {
    use proxy_common::{
        config::{CFG_FLAG_READY, Lb4Config},
        lb::{Lb4Backend, Lb4Key, SVC_FLAG_NODEPORT},
    };

    use super::*;
    use crate::inspect::trace::{Destination, trace};

    const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

    fn be(a: Ipv4Addr) -> u32 {
        u32::from_ne_bytes(a.octets())
    }

    /// nodePort 30001/TCP (rev-NAT 3) with affinity 60 s and source ranges, backends 1 and 2.
    fn snapshot() -> LbSnapshot {
        let mut s = LbSnapshot {
            config: Some(Lb4Config {
                flags: CFG_FLAG_READY,
                snat_port_min: 61000,
                snat_port_max: 65535,
            }),
            ..LbSnapshot::default()
        };
        s.nodeport_addrs.insert(NODE);
        let flags =
            SVC_FLAG_NODEPORT | SVC_FLAG_EXTERNAL | SVC_FLAG_AFFINITY | SVC_FLAG_SOURCE_RANGES;
        let key = Lb4Key::new(0, 30001u16.to_be(), 6, 0);
        let svc = |backend_id, count| Lb4Service {
            backend_id,
            count,
            rev_nat_index: 3,
            flags,
            _pad: 0,
        };
        s.services.insert(key, svc(60, 2));
        for id in [1u32, 2] {
            s.services.insert(
                Lb4Key {
                    backend_slot: id as u16,
                    ..key
                },
                svc(id, 0),
            );
            s.backends.insert(
                id,
                Lb4Backend {
                    address: be(Ipv4Addr::new(10, 244, 1, 10 + id as u8)),
                    port: 80u16.to_be(),
                    proto: 6,
                    flags: BACKEND_FLAG_LOCAL,
                    rev_nat_index: 3,
                    _pad: 0,
                },
            );
        }
        s
    }

    fn run(src: Ipv4Addr, affinity: &[(Lb4AffinityKey, Lb4AffinityValue)]) -> Trace {
        let snap = snapshot();
        let src = Source {
            address: src,
            port: Some(40000),
        };
        let dst = Destination {
            address: NODE,
            port: 30001,
            proto: 6,
        };
        let now = 100_000_000_000;
        let mut t = trace(&snap, &[], src, dst, now);
        let ranges = [(3, be(Ipv4Addr::new(198, 18, 0, 0)), 24), (4, 0, 0)];
        apply(&mut t, &snap, src, affinity, &ranges, now);
        t
    }

    #[test]
    fn outside_the_ranges_is_dropped() {
        let t = run(Ipv4Addr::new(203, 0, 113, 5), &[]);
        assert_eq!(t.verdict, "dropped");
        assert!(t.candidates.is_empty());
        assert!(super::super::trace::render(&t).contains("dropped"), "{t:?}");
    }

    #[test]
    fn a_live_affinity_entry_decides_a_new_flow() {
        let client = Ipv4Addr::new(198, 18, 0, 100);
        let key = Lb4AffinityKey::new(u64::from(be(client)), 3, AFFINITY_CLIENT_ADDR);
        let live = Lb4AffinityValue {
            last_used_ns: 90_000_000_000,
            backend_id: 2,
            _pad: 0,
        };
        let t = run(client, &[(key, live)]);
        assert_eq!(t.verdict, "affinity", "{t:?}");
        assert_eq!(t.backend.as_ref().map(|b| b.id), Some(2));
        let expired = Lb4AffinityValue {
            last_used_ns: 30_000_000_000,
            ..live
        };
        assert_eq!(run(client, &[(key, expired)]).verdict, "random");
        let gone = Lb4AffinityValue {
            backend_id: 7,
            ..live
        };
        assert_eq!(run(client, &[(key, gone)]).verdict, "random");
    }
}
