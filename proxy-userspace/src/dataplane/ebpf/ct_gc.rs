//! Conntrack hygiene: a periodic sweep of the device programs' CT4 and NAT4_REV maps.
//!
//! Both maps are LRU, so they never overflow, but without a sweep an idle flow's entries stay
//! until the map is full and evicts them, which also evicts live flows under pressure. The
//! sweep removes:
//!
//! - CT4 entries idle longer than their protocol's timeout (the flow's activity is the newer
//!   of the forward entry's and its reverse entry's `last_seen_ns`, so a flow with replies
//!   only is not idle);
//! - CT4 entries whose backend no longer exists (the id is gone, or now names another address,
//!   port or service): the datapath would reselect on the next packet anyway;
//! - NAT4_REV entries idle longer than the timeout that no kept CT4 entry uses.
//!
//! TCP entries expire by the state the datapath recorded in their flags (Cilium's timeouts):
//! only the client's SYN seen 60 s, established 6 h (longer than the default 2 h TCP
//! keepalive), closed (RST, or FIN from both sides) 10 s; entries without state (written by
//! an older agent) count as established. UDP and other protocols: 2 min idle.
//! `KPROXY_CT_TCP_SYN_SECS`, `KPROXY_CT_TCP_IDLE_SECS` (established),
//! `KPROXY_CT_TCP_CLOSE_SECS`, `KPROXY_CT_UDP_IDLE_SECS` and `KPROXY_CT_GC_INTERVAL_SECS`
//! override the defaults.
//!
//! Races: the maps are read in the order CT4, NAT4_REV, backends, so a backend a CT entry
//! named existed when the entry was read; and an entry is deleted only if it still holds
//! the value the decision was made on (a flow re-created in between is left alone).

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use aya::maps::{HashMap as BpfHashMap, MapData};
use proxy_common::{
    conntrack::{
        CT_TIMEOUT_TCP_CLOSE_SECS, CT_TIMEOUT_TCP_ESTABLISHED_SECS, CT_TIMEOUT_TCP_SYN_SECS,
        CT_TIMEOUT_UDP_SECS, Ct4Entry, Ct4Key, Nat4RevEntry, TcpCtState, tcp_ct_state,
    },
    lb::Lb4Backend,
    maps as names,
};

use crate::inspect::maps::{monotonic_ns, open, read_hash};

const PROTO_TCP: u8 = 6;

/// Idle timeouts and how often to sweep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtGcConfig {
    /// TCP, only the client's SYN seen.
    pub tcp_syn: Duration,
    /// TCP established (and entries without state).
    pub tcp_idle: Duration,
    /// TCP after an RST or a FIN from both sides.
    pub tcp_close: Duration,
    /// UDP and every protocol other than TCP.
    pub udp_idle: Duration,
    pub interval: Duration,
}

impl Default for CtGcConfig {
    fn default() -> Self {
        Self {
            tcp_syn: Duration::from_secs(CT_TIMEOUT_TCP_SYN_SECS),
            tcp_idle: Duration::from_secs(CT_TIMEOUT_TCP_ESTABLISHED_SECS),
            tcp_close: Duration::from_secs(CT_TIMEOUT_TCP_CLOSE_SECS),
            udp_idle: Duration::from_secs(CT_TIMEOUT_UDP_SECS),
            interval: Duration::from_secs(60),
        }
    }
}

fn env_secs(name: &str) -> Option<Duration> {
    let v = std::env::var(name).ok()?;
    match v.trim().parse::<u64>() {
        Ok(s) if s > 0 => Some(Duration::from_secs(s)),
        _ => {
            tracing::warn!("{name}={v:?} is not a positive number of seconds; ignored");
            None
        }
    }
}

impl CtGcConfig {
    /// The defaults, overridden by `KPROXY_CT_TCP_IDLE_SECS`, `KPROXY_CT_UDP_IDLE_SECS` and
    /// `KPROXY_CT_GC_INTERVAL_SECS`.
    pub fn from_env() -> Self {
        let d = Self::default();
        Self {
            tcp_syn: env_secs("KPROXY_CT_TCP_SYN_SECS").unwrap_or(d.tcp_syn),
            tcp_idle: env_secs("KPROXY_CT_TCP_IDLE_SECS").unwrap_or(d.tcp_idle),
            tcp_close: env_secs("KPROXY_CT_TCP_CLOSE_SECS").unwrap_or(d.tcp_close),
            udp_idle: env_secs("KPROXY_CT_UDP_IDLE_SECS").unwrap_or(d.udp_idle),
            interval: env_secs("KPROXY_CT_GC_INTERVAL_SECS").unwrap_or(d.interval),
        }
    }

    /// The idle timeout of an entry of `proto` with CT flags `flags`.
    pub(super) fn timeout_ns(&self, proto: u8, flags: u16) -> u64 {
        let d = if proto != PROTO_TCP {
            self.udp_idle
        } else {
            match tcp_ct_state(flags) {
                TcpCtState::SynSent => self.tcp_syn,
                TcpCtState::Established => self.tcp_idle,
                TcpCtState::Closed => self.tcp_close,
            }
        };
        d.as_nanos().min(u128::from(u64::MAX)) as u64
    }

    /// The timeout of a reverse entry no kept flow uses: the longest its protocol has.
    pub(super) fn orphan_ns(&self, proto: u8) -> u64 {
        let d = if proto == PROTO_TCP {
            self.tcp_idle
        } else {
            self.udp_idle
        };
        d.as_nanos().min(u128::from(u64::MAX)) as u64
    }
}

/// What one sweep deletes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// CT4 entries idle past their timeout.
    pub ct_expired: Vec<(Ct4Key, Ct4Entry)>,
    /// CT4 entries whose backend is gone or changed.
    pub ct_stale: Vec<(Ct4Key, Ct4Entry)>,
    /// NAT4_REV entries idle past their timeout and used by no kept flow.
    pub rev_expired: Vec<(Ct4Key, Nat4RevEntry)>,
}

impl Selection {
    pub fn is_empty(&self) -> bool {
        self.ct_expired.is_empty() && self.ct_stale.is_empty() && self.rev_expired.is_empty()
    }
}

/// The NAT4_REV key of a flow: its reply as it reaches the node (backend -> client, or
/// backend -> the node's SNAT address and port).
pub fn reverse_key(k: &Ct4Key, e: &Ct4Entry) -> Ct4Key {
    let (daddr, dport) = if e.nat_saddr != 0 {
        (e.nat_saddr, e.nat_sport)
    } else {
        (k.saddr, k.sport)
    };
    Ct4Key {
        saddr: e.backend_addr,
        daddr,
        sport: e.backend_port,
        dport,
        proto: k.proto,
        _pad: [0; 3],
    }
}

/// Whether the reverse entry `r` rewrites replies of the flow `k` (to its frontend and client).
fn reverse_belongs_to(r: &Nat4RevEntry, k: &Ct4Key) -> bool {
    r.saddr == k.daddr && r.sport == k.dport && r.daddr == k.saddr && r.dport == k.sport
}

/// Whether the datapath would still use `e`'s backend (mirrors `lb4_flow_reuse`).
fn backend_valid(e: &Ct4Entry, backends: &HashMap<u32, Lb4Backend>) -> bool {
    backends.get(&e.backend_id).is_some_and(|b| {
        b.address == e.backend_addr
            && b.port == e.backend_port
            && b.rev_nat_index == e.rev_nat_index
    })
}

/// Decides what a sweep at `now` (bpf_ktime_get_ns clock) deletes. Pure: tested in memory.
pub fn select(
    now: u64,
    cfg: &CtGcConfig,
    ct: &[(Ct4Key, Ct4Entry)],
    rev: &[(Ct4Key, Nat4RevEntry)],
    backends: &HashMap<u32, Lb4Backend>,
) -> Selection {
    let rev_by_key: HashMap<Ct4Key, &Nat4RevEntry> = rev.iter().map(|(k, v)| (*k, v)).collect();
    let mut used_rev: HashSet<Ct4Key> = HashSet::new();
    let mut out = Selection::default();
    for (k, e) in ct {
        if !backend_valid(e, backends) {
            out.ct_stale.push((*k, *e));
            continue;
        }
        let rk = reverse_key(k, e);
        let reply_seen = rev_by_key
            .get(&rk)
            .filter(|r| reverse_belongs_to(r, k))
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

/// Deletes `key` if it still maps to `seen`; returns whether it did.
fn delete_if_unchanged<V: aya::Pod + PartialEq>(
    map: &mut BpfHashMap<MapData, Ct4Key, V>,
    key: &Ct4Key,
    seen: &V,
) -> bool {
    match map.get(key, 0) {
        Ok(v) if v == *seen => map.remove(key).is_ok(),
        _ => false,
    }
}

/// What one sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepStats {
    pub ct_entries: usize,
    pub rev_entries: usize,
    pub ct_expired: usize,
    pub ct_stale: usize,
    pub rev_expired: usize,
}

/// One sweep of the maps pinned under `bpf_root`.
pub fn sweep(bpf_root: &Path, cfg: &CtGcConfig) -> anyhow::Result<SweepStats> {
    // Order matters: see the module docs.
    let ct = read_hash::<Ct4Key, Ct4Entry>(bpf_root, names::CT4)?;
    let rev = read_hash::<Ct4Key, Nat4RevEntry>(bpf_root, names::NAT4_REV)?;
    let backends: HashMap<u32, Lb4Backend> =
        read_hash::<u32, Lb4Backend>(bpf_root, names::LB4_BACKENDS)?
            .into_iter()
            .collect();
    let sel = select(monotonic_ns(), cfg, &ct, &rev, &backends);
    let mut stats = SweepStats {
        ct_entries: ct.len(),
        rev_entries: rev.len(),
        ..Default::default()
    };
    if sel.is_empty() {
        return Ok(stats);
    }
    let mut ct_map: BpfHashMap<MapData, Ct4Key, Ct4Entry> =
        BpfHashMap::try_from(open(bpf_root, names::CT4)?)
            .with_context(|| format!("{} has an unexpected type", names::CT4))?;
    for (k, e) in &sel.ct_expired {
        stats.ct_expired += usize::from(delete_if_unchanged(&mut ct_map, k, e));
    }
    for (k, e) in &sel.ct_stale {
        stats.ct_stale += usize::from(delete_if_unchanged(&mut ct_map, k, e));
    }
    let mut rev_map: BpfHashMap<MapData, Ct4Key, Nat4RevEntry> =
        BpfHashMap::try_from(open(bpf_root, names::NAT4_REV)?)
            .with_context(|| format!("{} has an unexpected type", names::NAT4_REV))?;
    for (k, r) in &sel.rev_expired {
        stats.rev_expired += usize::from(delete_if_unchanged(&mut rev_map, k, r));
    }
    Ok(stats)
}

/// Sweeps the maps under `bpf_root` every `interval` (from the environment) in a background
/// thread for the life of the agent.
pub fn spawn(bpf_root: PathBuf) {
    let cfg = CtGcConfig::from_env();
    let started = std::thread::Builder::new()
        .name("ct-gc".into())
        .spawn(move || {
            tracing::info!(
                tcp_syn_s = cfg.tcp_syn.as_secs(),
                tcp_idle_s = cfg.tcp_idle.as_secs(),
                tcp_close_s = cfg.tcp_close.as_secs(),
                udp_idle_s = cfg.udp_idle.as_secs(),
                interval_s = cfg.interval.as_secs(),
                "conntrack sweep enabled"
            );
            let mut failing = false;
            loop {
                std::thread::sleep(cfg.interval);
                match sweep(&bpf_root, &cfg).and_then(|v4| {
                    let v6 = super::ct_gc6::sweep6(&bpf_root, &cfg)?;
                    Ok(SweepStats {
                        ct_entries: v4.ct_entries + v6.ct_entries,
                        rev_entries: v4.rev_entries + v6.rev_entries,
                        ct_expired: v4.ct_expired + v6.ct_expired,
                        ct_stale: v4.ct_stale + v6.ct_stale,
                        rev_expired: v4.rev_expired + v6.rev_expired,
                    })
                }) {
                    Ok(s) => {
                        failing = false;
                        if s.ct_expired + s.ct_stale + s.rev_expired > 0 {
                            tracing::info!(
                                ct_expired = s.ct_expired,
                                ct_stale_backend = s.ct_stale,
                                rev_expired = s.rev_expired,
                                ct_entries = s.ct_entries,
                                rev_entries = s.rev_entries,
                                "conntrack sweep"
                            );
                        }
                    }
                    // Once per failure streak: the maps may be mid-cleanup.
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!("conntrack sweep failed: {e:#}");
                    }
                    Err(_) => {}
                }
            }
        });
    if let Err(e) = started {
        tracing::warn!("conntrack sweep not started: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;
    const CLIENT: u32 = u32::from_ne_bytes([198, 18, 0, 100]);
    const NODE: u32 = u32::from_ne_bytes([198, 18, 0, 1]);
    const POD_A: u32 = u32::from_ne_bytes([10, 244, 1, 10]);
    const POD_B: u32 = u32::from_ne_bytes([10, 244, 2, 10]);

    fn cfg() -> CtGcConfig {
        CtGcConfig {
            tcp_syn: Duration::from_secs(60),
            tcp_idle: Duration::from_secs(7200),
            tcp_close: Duration::from_secs(10),
            udp_idle: Duration::from_secs(120),
            interval: Duration::from_secs(60),
        }
    }

    fn backend(address: u32, rev_nat_index: u16) -> Lb4Backend {
        Lb4Backend {
            address,
            port: 80u16.to_be(),
            proto: 6,
            flags: 0,
            rev_nat_index,
            _pad: 0,
        }
    }

    fn key(sport: u16, proto: u8) -> Ct4Key {
        Ct4Key {
            saddr: CLIENT,
            daddr: NODE,
            sport: sport.to_be(),
            dport: 30001u16.to_be(),
            proto,
            _pad: [0; 3],
        }
    }

    /// A flow to `backend_id` (at `addr`), SNATed to the node when `snat`, last seen at `t`.
    fn flow(backend_id: u32, addr: u32, snat: bool, t: u64) -> Ct4Entry {
        Ct4Entry {
            backend_id,
            backend_addr: addr,
            backend_port: 80u16.to_be(),
            rev_nat_index: 1,
            nat_saddr: if snat { NODE } else { 0 },
            nat_sport: if snat { 40000u16.to_be() } else { 0 },
            flags: 0,
            last_seen_ns: t,
        }
    }

    fn rev_of(k: &Ct4Key, e: &Ct4Entry, t: u64) -> (Ct4Key, Nat4RevEntry) {
        // SAFETY: plain integers; all-zero is valid (and keeps this independent of padding).
        let mut r: Nat4RevEntry = unsafe { std::mem::zeroed() };
        r.saddr = k.daddr;
        r.daddr = k.saddr;
        r.sport = k.dport;
        r.dport = k.sport;
        r.last_seen_ns = t;
        (reverse_key(k, e), r)
    }

    fn backends() -> HashMap<u32, Lb4Backend> {
        HashMap::from([(1, backend(POD_A, 1)), (2, backend(POD_B, 1))])
    }

    #[test]
    fn reverse_key_local_and_snat() {
        let k = key(5000, 6);
        let local = reverse_key(&k, &flow(1, POD_A, false, 0));
        assert_eq!(
            (local.saddr, local.daddr, local.dport),
            (POD_A, CLIENT, 5000u16.to_be())
        );
        let snat = reverse_key(&k, &flow(2, POD_B, true, 0));
        assert_eq!(
            (snat.saddr, snat.daddr, snat.dport),
            (POD_B, NODE, 40000u16.to_be())
        );
        assert_eq!(snat.sport, 80u16.to_be());
    }

    #[test]
    fn fresh_flows_are_kept() {
        let now = 10_000 * S;
        let k1 = key(5000, 6);
        let e1 = flow(1, POD_A, false, now - 60 * S);
        let k2 = key(5001, 17);
        let e2 = flow(2, POD_B, true, now - 10 * S);
        let ct = vec![(k1, e1), (k2, e2)];
        let rev = vec![
            rev_of(&k1, &e1, now - 60 * S),
            rev_of(&k2, &e2, now - 10 * S),
        ];
        assert!(select(now, &cfg(), &ct, &rev, &backends()).is_empty());
    }

    #[test]
    fn idle_timeouts_per_protocol() {
        let now = 100_000 * S;
        // UDP idle 3 min: expired; TCP idle 3 min: kept; TCP idle 3 h: expired.
        let udp = (key(5000, 17), flow(1, POD_A, false, now - 180 * S));
        let tcp = (key(5001, 6), flow(1, POD_A, false, now - 180 * S));
        let tcp_old = (key(5002, 6), flow(2, POD_B, true, now - 3 * 3600 * S));
        let ct = vec![udp, tcp, tcp_old];
        let rev: Vec<_> = ct
            .iter()
            .map(|(k, e)| rev_of(k, e, e.last_seen_ns))
            .collect();
        let sel = select(now, &cfg(), &ct, &rev, &backends());
        assert_eq!(sel.ct_expired, vec![udp, tcp_old]);
        assert!(sel.ct_stale.is_empty());
        // The reverse entries of the expired flows go too; the kept flow's stays.
        assert_eq!(sel.rev_expired, vec![rev[0], rev[2]]);
    }

    #[test]
    fn tcp_timeouts_follow_the_state() {
        use proxy_common::conntrack::{
            CT_FLAG_FIN_FWD, CT_FLAG_FIN_REV, CT_FLAG_RST, CT_FLAG_SEEN_NON_SYN, CT_FLAG_TCP_STATE,
        };
        let now = 100_000 * S;
        let with = |sport: u16, flags: u16, idle: u64| {
            let mut e = flow(1, POD_A, false, now - idle * S);
            e.flags = flags;
            (key(sport, 6), e)
        };
        let est = CT_FLAG_TCP_STATE | CT_FLAG_SEEN_NON_SYN;
        let syn_old = with(5000, CT_FLAG_TCP_STATE, 61);
        let syn_young = with(5001, CT_FLAG_TCP_STATE, 30);
        let est_idle = with(5002, est, 3600);
        let closed_fin = with(5003, est | CT_FLAG_FIN_FWD | CT_FLAG_FIN_REV, 11);
        let half_closed = with(5004, est | CT_FLAG_FIN_FWD, 11);
        let reset = with(5005, est | CT_FLAG_RST, 11);
        let reset_young = with(5006, est | CT_FLAG_RST, 5);
        let legacy = with(5007, 0, 3600);
        let ct = vec![
            syn_old,
            syn_young,
            est_idle,
            closed_fin,
            half_closed,
            reset,
            reset_young,
            legacy,
        ];
        let rev: Vec<_> = ct
            .iter()
            .map(|(k, e)| rev_of(k, e, e.last_seen_ns))
            .collect();
        let sel = select(now, &cfg(), &ct, &rev, &backends());
        assert_eq!(sel.ct_expired, vec![syn_old, closed_fin, reset]);
    }

    #[test]
    fn replies_keep_a_flow_alive() {
        let now = 100_000 * S;
        let k = key(5000, 17);
        let e = flow(1, POD_A, false, now - 600 * S);
        // The backend keeps sending (replies refresh only the reverse entry).
        let rev = vec![rev_of(&k, &e, now - S)];
        let sel = select(now, &cfg(), &[(k, e)], &rev, &backends());
        assert!(sel.is_empty(), "{sel:?}");
        // A reverse entry at the same key but of another flow does not count.
        let mut other = rev[0];
        other.1.daddr = POD_B;
        let sel = select(now, &cfg(), &[(k, e)], &[other], &backends());
        assert_eq!(sel.ct_expired, vec![(k, e)]);
        // ...and as it is fresh itself, it stays.
        assert!(sel.rev_expired.is_empty());
    }

    #[test]
    fn idle_reverse_entry_of_a_live_flow_is_kept() {
        let now = 100_000 * S;
        // The forward entry is fresh while the reverse entry has seen nothing for long
        // (a flow without replies): the live flow keeps its reverse entry.
        let k = key(5000, 17);
        let e = flow(1, POD_A, false, now - S);
        let rev = vec![rev_of(&k, &e, now - 3600 * S)];
        assert!(select(now, &cfg(), &[(k, e)], &rev, &backends()).is_empty());
    }

    #[test]
    fn flows_to_removed_or_changed_backends_are_stale() {
        let now = 100_000 * S;
        let gone = (key(5000, 6), flow(7, POD_A, false, now));
        // Id 2 now names another address (the id was reused).
        let reused = (key(5001, 6), flow(2, POD_A, false, now));
        // Id 1 now belongs to another service.
        let mut moved = flow(1, POD_A, false, now);
        moved.rev_nat_index = 9;
        let moved = (key(5002, 6), moved);
        let ok = (key(5003, 6), flow(1, POD_A, false, now));
        let ct = vec![gone, reused, moved, ok];
        let rev: Vec<_> = ct.iter().map(|(k, e)| rev_of(k, e, now)).collect();
        let sel = select(now, &cfg(), &ct, &rev, &backends());
        assert_eq!(sel.ct_stale, vec![gone, reused, moved]);
        assert!(sel.ct_expired.is_empty());
        // Their reverse entries are fresh: they age out on their own.
        assert!(sel.rev_expired.is_empty());
    }

    #[test]
    fn orphan_reverse_entries_expire() {
        let now = 100_000 * S;
        let k = key(5000, 6);
        let e = flow(1, POD_A, true, now);
        let (rk, rv) = rev_of(&k, &e, now - 3 * 3600 * S);
        let sel = select(now, &cfg(), &[], &[(rk, rv)], &backends());
        assert_eq!(sel.rev_expired, vec![(rk, rv)]);
        // A young orphan stays.
        let (rk, rv) = rev_of(&k, &e, now - 60 * S);
        assert!(select(now, &cfg(), &[], &[(rk, rv)], &backends()).is_empty());
    }

    #[test]
    fn clock_skew_never_expires() {
        // An entry stamped after `now` (read order) is not idle.
        let now = 10 * S;
        let k = key(5000, 17);
        let e = flow(1, POD_A, false, now + S);
        let rev = vec![rev_of(&k, &e, now + S)];
        assert!(select(now, &cfg(), &[(k, e)], &rev, &backends()).is_empty());
    }
}
