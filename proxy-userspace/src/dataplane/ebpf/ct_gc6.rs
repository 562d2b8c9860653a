//! The conntrack sweep of the IPv6 device path's CT6 and NAT6_REV maps: the same rules as
//! `ct_gc.rs` (idle past the protocol's timeout, backend gone or changed, orphaned reverse
//! entries), over the IPv6 types. Run by the same background thread, right after the IPv4
//! sweep.

use std::{
    collections::{HashMap, HashSet},
    path::Path,
};

use anyhow::Context as _;
use aya::maps::{HashMap as BpfHashMap, MapData};
use proxy_common::{
    conntrack6::{Ct6Entry, Ct6Key, Nat6RevEntry},
    lb6::Lb6Backend,
    maps as names,
};

use super::ct_gc::{CtGcConfig, SweepStats};
use crate::inspect::maps::{monotonic_ns, open, read_hash};

/// What one IPv6 sweep deletes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection6 {
    pub ct_expired: Vec<(Ct6Key, Ct6Entry)>,
    pub ct_stale: Vec<(Ct6Key, Ct6Entry)>,
    pub rev_expired: Vec<(Ct6Key, Nat6RevEntry)>,
}

/// The NAT6_REV key of a flow: its reply as it reaches the node.
pub fn reverse6_key(k: &Ct6Key, e: &Ct6Entry) -> Ct6Key {
    let (daddr, dport) = if e.nat_sport != 0 {
        (e.nat_saddr, e.nat_sport)
    } else {
        (k.saddr, k.sport)
    };
    Ct6Key {
        saddr: e.backend_addr,
        daddr,
        sport: e.backend_port,
        dport,
        proto: k.proto,
        _pad: [0; 3],
    }
}

fn reverse6_belongs_to(r: &Nat6RevEntry, k: &Ct6Key) -> bool {
    r.saddr == k.daddr && r.sport == k.dport && r.daddr == k.saddr && r.dport == k.sport
}

/// Whether the datapath would still use `e`'s backend (mirrors `lb6_flow_pick`).
fn backend6_valid(e: &Ct6Entry, backends: &HashMap<u32, Lb6Backend>) -> bool {
    backends.get(&e.backend_id).is_some_and(|b| {
        b.address == e.backend_addr
            && b.port == e.backend_port
            && b.rev_nat_index == e.rev_nat_index
    })
}

/// Decides what an IPv6 sweep at `now` deletes (as `ct_gc::select`). Pure.
pub fn select6(
    now: u64,
    cfg: &CtGcConfig,
    ct: &[(Ct6Key, Ct6Entry)],
    rev: &[(Ct6Key, Nat6RevEntry)],
    backends: &HashMap<u32, Lb6Backend>,
) -> Selection6 {
    let rev_by_key: HashMap<Ct6Key, &Nat6RevEntry> = rev.iter().map(|(k, v)| (*k, v)).collect();
    let mut used_rev: HashSet<Ct6Key> = HashSet::new();
    let mut out = Selection6::default();
    for (k, e) in ct {
        if !backend6_valid(e, backends) {
            out.ct_stale.push((*k, *e));
            continue;
        }
        let rk = reverse6_key(k, e);
        let reply_seen = rev_by_key
            .get(&rk)
            .filter(|r| reverse6_belongs_to(r, k))
            .map_or(0, |r| r.last_seen_ns);
        let last = e.last_seen_ns.max(reply_seen);
        if now.saturating_sub(last) > cfg.timeout_ns(k.proto, e.flags) {
            out.ct_expired.push((*k, *e));
        } else {
            used_rev.insert(rk);
        }
    }
    for (k, r) in rev {
        if !used_rev.contains(k) && now.saturating_sub(r.last_seen_ns) > cfg.orphan_ns(k.proto) {
            out.rev_expired.push((*k, *r));
        }
    }
    out
}

fn delete6_if_unchanged<V: aya::Pod + PartialEq>(
    map: &mut BpfHashMap<MapData, Ct6Key, V>,
    key: &Ct6Key,
    seen: &V,
) -> bool {
    match map.get(key, 0) {
        Ok(v) if v == *seen => map.remove(key).is_ok(),
        _ => false,
    }
}

fn open6<V: aya::Pod>(
    bpf_root: &Path,
    name: &str,
) -> anyhow::Result<BpfHashMap<MapData, Ct6Key, V>> {
    BpfHashMap::try_from(open(bpf_root, name)?)
        .with_context(|| format!("{name} has an unexpected type"))
}

/// One sweep of the IPv6 maps pinned under `bpf_root` (read in the IPv4 sweep's order).
pub fn sweep6(bpf_root: &Path, cfg: &CtGcConfig) -> anyhow::Result<SweepStats> {
    let ct = read_hash::<Ct6Key, Ct6Entry>(bpf_root, names::CT6)?;
    let rev = read_hash::<Ct6Key, Nat6RevEntry>(bpf_root, names::NAT6_REV)?;
    let backends: HashMap<u32, Lb6Backend> =
        read_hash::<u32, Lb6Backend>(bpf_root, names::LB6_BACKENDS)?
            .into_iter()
            .collect();
    let sel = select6(monotonic_ns(), cfg, &ct, &rev, &backends);
    let mut stats = SweepStats {
        ct_entries: ct.len(),
        rev_entries: rev.len(),
        ..Default::default()
    };
    if !sel.ct_expired.is_empty() || !sel.ct_stale.is_empty() {
        let mut ct_map = open6::<Ct6Entry>(bpf_root, names::CT6)?;
        for (k, e) in &sel.ct_expired {
            stats.ct_expired += usize::from(delete6_if_unchanged(&mut ct_map, k, e));
        }
        for (k, e) in &sel.ct_stale {
            stats.ct_stale += usize::from(delete6_if_unchanged(&mut ct_map, k, e));
        }
    }
    if !sel.rev_expired.is_empty() {
        let mut rev_map = open6::<Nat6RevEntry>(bpf_root, names::NAT6_REV)?;
        for (k, r) in &sel.rev_expired {
            stats.rev_expired += usize::from(delete6_if_unchanged(&mut rev_map, k, r));
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const S: u64 = 1_000_000_000;

    fn cfg() -> CtGcConfig {
        CtGcConfig {
            tcp_syn: Duration::from_secs(60),
            tcp_idle: Duration::from_secs(7200),
            tcp_close: Duration::from_secs(10),
            udp_idle: Duration::from_secs(120),
            interval: Duration::from_secs(60),
        }
    }

    /// An established UDP flow client -> frontend to a local backend `id`, last seen at `at`.
    fn flow(id: u32, at: u64) -> (Ct6Key, Ct6Entry, Nat6RevEntry) {
        let (client, frontend, backend) = ([1, 0, 0, 0x10], [1, 0, 0, 1], [2, 0, 0, 5]);
        let k = Ct6Key {
            saddr: client,
            daddr: frontend,
            sport: 40000u16.to_be(),
            dport: 30080u16.to_be(),
            proto: 17,
            _pad: [0; 3],
        };
        let e = Ct6Entry {
            backend_addr: backend,
            nat_saddr: [0; 4],
            backend_id: id,
            backend_port: 80u16.to_be(),
            rev_nat_index: 3,
            nat_sport: 0,
            flags: 0,
            _pad: 0,
            last_seen_ns: at,
        };
        let r = Nat6RevEntry {
            saddr: frontend,
            daddr: client,
            sport: k.dport,
            dport: k.sport,
            rev_nat_index: 3,
            _pad: 0,
            last_seen_ns: at,
        };
        (k, e, r)
    }

    fn backends(id: u32) -> HashMap<u32, Lb6Backend> {
        let b = Lb6Backend {
            address: [2, 0, 0, 5],
            port: 80u16.to_be(),
            proto: 17,
            flags: 0,
            rev_nat_index: 3,
            _pad: 0,
        };
        HashMap::from([(id, b)])
    }

    #[test]
    fn idle_flows_expire_with_their_reverse_entry_and_live_ones_stay() {
        let (k, e, r) = flow(7, 0);
        let rk = reverse6_key(&k, &e);
        let (ct, rev) = (vec![(k, e)], vec![(rk, r)]);
        let live = select6(100 * S, &cfg(), &ct, &rev, &backends(7));
        assert_eq!(live, Selection6::default(), "a flow seen 100 s ago is kept");
        let idle = select6(200 * S, &cfg(), &ct, &rev, &backends(7));
        assert_eq!(idle.ct_expired, ct);
        assert_eq!(idle.rev_expired, rev);
        let stale = select6(S, &cfg(), &ct, &rev, &backends(8));
        assert_eq!(
            stale.ct_stale, ct,
            "a flow whose backend id is gone is dropped"
        );
    }
}
