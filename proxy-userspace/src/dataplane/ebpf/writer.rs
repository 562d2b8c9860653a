//! Writes a [`DesiredState`] into the load-balancing maps, changing only what differs.
//!
//! Order (Cilium's): backends -> backend slots -> reverse NAT -> Maglev table rows ->
//! frontend master entries (with `count`) -> removed masters -> removed slots -> removed
//! reverse NAT -> removed Maglev rows -> removed backends. Each step is one batched map
//! update where the kernel allows it (`LbMaps::put_*_batch`). Source ranges are added before
//! the master entries that enable them and removed after. A frontend that shrinks gets its
//! lower `count` before its surplus slots go, and a backend is deleted only after no slot
//! names it, so a reader never follows a slot to nothing. The writer is idempotent; after an
//! error it re-reads the maps (a full sync) instead of trusting its record. Removed TCP
//! backends may drain: they leave every slot at once but stay in the backends map for a
//! while, so connections in flight finish.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, Instant},
};

use proxy_common::{
    lb::{
        BACKEND_FLAG_LOCAL, Lb4Backend, Lb4Key, Lb4RevNat, Lb4Service, SVC_FLAG_AFFINITY,
        SVC_FLAG_CLUSTER_IP, SVC_FLAG_EXTERNAL, SVC_FLAG_NODEPORT, SVC_FLAG_SOURCE_RANGES,
        SVC_FLAG_SOURCE_RANGES_DENY_NODE,
    },
    maglev::{MAGLEV_ROW_LEN, MaglevKey, MaglevRow},
    maps as names,
};

use super::{maglev, maps::LbMaps};
use crate::{
    dataplane::ApplyStats,
    desired::{DesiredState, Frontend, FrontendKind, Protocol},
};

/// A backend address that no frontend uses any more.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RemovedBackend {
    pub address: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Debug, Default)]
pub struct ApplyOutcome {
    pub stats: ApplyStats,
    /// Backend addresses gone from every frontend (their flows must move elsewhere).
    pub removed_backends: Vec<RemovedBackend>,
    /// Reverse-NAT indexes whose session affinity ended (affinity turned off or the frontend
    /// removed): their affinity entries are no longer used and can be deleted.
    pub affinity_released: Vec<u16>,
}

/// One `loadBalancerSourceRanges` entry: (reverse-NAT index, be network address, prefix
/// length).
pub type SrcRange = (u16, u32, u8);

/// Map capacities the writer respects (the kernel maps' `max_entries`).
#[derive(Clone, Copy, Debug)]
pub struct Capacity {
    pub services: usize,
    pub backends: usize,
    pub maglev_rows: usize,
}

impl Default for Capacity {
    fn default() -> Self {
        Self {
            services: names::LB4_SERVICES_MAX as usize,
            backends: names::LB4_BACKENDS_MAX as usize,
            maglev_rows: names::MAGLEV_MAX as usize,
        }
    }
}

/// A frontend's last computed Maglev table: recomputed only when its size or its backends
/// (ids and identities) change. Rows are shared with the writer's record, so comparing an
/// unchanged row is a pointer comparison.
struct MaglevCached {
    table_size: u32,
    members: Vec<(u32, [u8; 6])>,
    rows: Vec<Arc<MaglevRow>>,
}

/// What the maps hold, as far as the writer knows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Contents {
    services: BTreeMap<Lb4Key, Lb4Service>,
    backends: BTreeMap<u32, Lb4Backend>,
    rev_nat: BTreeMap<u16, Lb4RevNat>,
    maglev: BTreeMap<MaglevKey, Arc<MaglevRow>>,
    nodeport: BTreeSet<u32>,
    src_ranges: BTreeSet<SrcRange>,
}

impl Contents {
    fn read(maps: &impl LbMaps) -> anyhow::Result<Self> {
        Ok(Self {
            services: maps.services()?.into_iter().collect(),
            backends: maps.backends()?.into_iter().collect(),
            rev_nat: maps.rev_nats()?.into_iter().collect(),
            maglev: maps
                .maglev_rows()?
                .into_iter()
                .map(|(k, v)| (k, Arc::new(v)))
                .collect(),
            nodeport: maps.nodeport_addresses()?.into_iter().collect(),
            src_ranges: maps.src_ranges()?.into_iter().collect(),
        })
    }
}

/// The target under construction: plain vectors (one push per entry), turned into ordered
/// maps in bulk at the end, which is several times cheaper than inserting into a BTreeMap
/// one by one at 10k Services.
#[derive(Default)]
struct Building {
    services: Vec<(Lb4Key, Lb4Service)>,
    backends: Vec<(u32, Lb4Backend)>,
    rev_nat: Vec<(u16, Lb4RevNat)>,
    maglev: Vec<(MaglevKey, Arc<MaglevRow>)>,
    src_ranges: Vec<SrcRange>,
}

impl Building {
    fn finish(self, nodeport: BTreeSet<u32>) -> Contents {
        Contents {
            services: self.services.into_iter().collect(),
            backends: self.backends.into_iter().collect(),
            rev_nat: self.rev_nat.into_iter().collect(),
            maglev: self.maglev.into_iter().collect(),
            nodeport,
            src_ranges: self.src_ranges.into_iter().collect(),
        }
    }
}

/// The frontends already in the maps, then the new ones: when a map is full, a new frontend
/// is the one refused, never one that is serving.
pub(super) fn programmed_first<F>(frontends: &[F], programmed: impl Fn(&F) -> bool) -> Vec<&F> {
    let (mut first, new): (Vec<&F>, Vec<&F>) = frontends.iter().partition(|f| programmed(f));
    first.extend(new);
    first
}

pub struct MapWriter<M> {
    maps: M,
    /// None after an error or before the first apply: re-read the maps.
    known: Option<Contents>,
    capacity: Capacity,
    /// Maglev table size for external frontends; None = random selection only.
    maglev_table_size: Option<u32>,
    maglev_cache: HashMap<u16, MaglevCached>,
    /// How long a removed TCP backend stays in the backends map (no longer in any slot, so
    /// no new flow picks it) so that connections in flight to it finish instead of being
    /// moved to another backend mid-stream (which answers them with a reset). Zero: removed
    /// at once. UDP backends are always removed at once (their flows must move).
    tcp_drain: Duration,
    /// Removed TCP backends still in the map, by id, with when they were removed.
    draining: BTreeMap<u32, Instant>,
}

fn be_addr(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

fn addr_from_be(v: u32) -> Ipv4Addr {
    Ipv4Addr::from(v.to_ne_bytes())
}

pub(super) fn protocol_from_number(n: u8) -> Option<Protocol> {
    [Protocol::Tcp, Protocol::Udp, Protocol::Sctp]
        .into_iter()
        .find(|p| p.number() == n)
}

pub(super) fn kind_flags(kind: FrontendKind) -> u16 {
    match kind {
        FrontendKind::ClusterIp => SVC_FLAG_CLUSTER_IP,
        FrontendKind::NodePort => SVC_FLAG_NODEPORT | SVC_FLAG_EXTERNAL,
        FrontendKind::ExternalIp | FrontendKind::LoadBalancer => SVC_FLAG_EXTERNAL,
    }
}

/// The frontend's `SVC_FLAG_*`. `node_addresses`: this node's addresses; connections made on
/// the node pass source ranges when one of them is inside (kube-proxy's rule).
fn frontend_flags(f: &Frontend, node_addresses: &[Ipv4Addr]) -> u16 {
    let mut flags = kind_flags(f.kind);
    if f.affinity_timeout.is_some() {
        flags |= SVC_FLAG_AFFINITY;
    }
    if let Some(ranges) = &f.source_ranges {
        flags |= SVC_FLAG_SOURCE_RANGES;
        let node_inside = ranges
            .iter()
            .any(|r| node_addresses.iter().any(|a| r.contains(*a)));
        if !node_inside {
            flags |= SVC_FLAG_SOURCE_RANGES_DENY_NODE;
        }
    }
    flags
}

/// Hands out the lowest numbers not in use, never one the maps still hold.
pub(super) struct Allocator<T> {
    used: BTreeSet<T>,
    cursor: T,
    max: T,
}

impl<T: Copy + Ord + From<u8> + std::ops::Add<Output = T>> Allocator<T> {
    pub(super) fn new(used: BTreeSet<T>, max: T) -> Self {
        Self {
            used,
            cursor: T::from(1),
            max,
        }
    }

    pub(super) fn next(&mut self) -> Option<T> {
        while self.used.contains(&self.cursor) {
            if self.cursor >= self.max {
                return None;
            }
            self.cursor = self.cursor + T::from(1);
        }
        let v = self.cursor;
        self.used.insert(v);
        Some(v)
    }
}

impl<M: LbMaps> MapWriter<M> {
    pub fn new(maps: M) -> Self {
        Self::with_capacity(maps, Capacity::default())
    }

    pub fn with_capacity(maps: M, capacity: Capacity) -> Self {
        Self {
            maps,
            known: None,
            capacity,
            maglev_table_size: None,
            maglev_cache: HashMap::new(),
            tcp_drain: Duration::ZERO,
            draining: BTreeMap::new(),
        }
    }

    /// Keeps removed TCP backends for `drain` (see the field); the default is zero.
    pub fn with_tcp_drain(mut self, drain: Duration) -> Self {
        self.tcp_drain = drain;
        self
    }

    /// Whether a draining backend's time is up (an apply would remove it).
    pub fn drain_due(&self, now: Instant) -> bool {
        self.draining
            .values()
            .any(|since| now.duration_since(*since) >= self.tcp_drain)
    }

    /// Builds Maglev tables of `table_size` (a validated prime) for external frontends, or
    /// none (`None`: the datapath selects at random).
    pub fn set_maglev(&mut self, table_size: Option<u32>) {
        self.maglev_table_size = table_size;
        self.maglev_cache.clear();
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    /// Makes the maps hold exactly `desired` (minus frontends that do not fit, which are
    /// reported in `stats.rejected`).
    pub fn apply(&mut self, desired: &DesiredState, full: bool) -> anyhow::Result<ApplyOutcome> {
        let known = match self.known.take() {
            Some(k) if !full => k,
            _ => Contents::read(&self.maps)?,
        };
        let mut outcome = ApplyOutcome::default();
        let target = self.target(desired, &known, &mut outcome.stats.rejected);
        let mut known = known;
        let result = self.write(&target, &mut known, &mut outcome);
        // Keep the record only when every write succeeded; otherwise re-read next time.
        if result.is_ok() {
            self.known = Some(known);
        }
        result.map(|()| outcome)
    }

    /// Computes the map contents for `desired`, keeping the reverse-NAT indexes and backend
    /// ids that the maps already use for the same frontends and backends.
    fn target(
        &mut self,
        desired: &DesiredState,
        known: &Contents,
        rejected: &mut Vec<String>,
    ) -> Contents {
        let mut index_of: HashMap<Lb4Key, u16> = HashMap::new();
        for (k, v) in &known.services {
            if k.backend_slot == 0 {
                index_of.insert(*k, v.rev_nat_index);
            }
        }
        let mut used_indexes: BTreeSet<u16> = known.rev_nat.keys().copied().collect();
        used_indexes.extend(index_of.values().copied());
        used_indexes.insert(0);
        let mut indexes = Allocator::new(used_indexes, u16::MAX);

        let mut id_of: HashMap<(u16, u32, u16, u8), u32> =
            HashMap::with_capacity(known.backends.len());
        for (id, b) in &known.backends {
            id_of.insert((b.rev_nat_index, b.address, b.port, b.proto), *id);
        }
        let mut used_ids: BTreeSet<u32> = known.backends.keys().copied().collect();
        used_ids.insert(0);
        let mut ids = Allocator::new(used_ids, u32::MAX);

        let mut target = Building::default();
        let mut members = Vec::new();
        let programmed = |f: &Frontend| {
            index_of.contains_key(&Lb4Key::new(
                be_addr(f.address),
                f.port.to_be(),
                f.protocol.number(),
                0,
            ))
        };
        for f in programmed_first(&desired.frontends, programmed) {
            let full = if target.services.len() + 1 + f.backends.len() > self.capacity.services {
                Some((names::LB4_SERVICES, self.capacity.services))
            } else if target.backends.len() + f.backends.len() > self.capacity.backends {
                Some((names::LB4_BACKENDS, self.capacity.backends))
            } else {
                None
            };
            if let Some((map, entries)) = full {
                rejected.push(format!(
                    "service {} frontend {}:{}/{}: not programmed: map {map} is full ({entries} entries)",
                    f.service,
                    f.address,
                    f.port,
                    f.protocol.as_str(),
                ));
                continue;
            }
            let master_key =
                Lb4Key::new(be_addr(f.address), f.port.to_be(), f.protocol.number(), 0);
            let Some(index) = index_of
                .get(&master_key)
                .copied()
                .or_else(|| indexes.next())
            else {
                rejected.push(format!(
                    "service {}: not programmed: no free reverse-NAT index",
                    f.service
                ));
                continue;
            };
            members.clear();
            let flags = frontend_flags(f, &desired.nodeport_addresses);
            self.target_frontend(
                f,
                master_key,
                index,
                flags,
                &id_of,
                &mut ids,
                &mut target,
                &mut members,
            );
            self.target_maglev(f, index, &mut members, &mut target);
        }
        let live: std::collections::HashSet<u16> = target.rev_nat.iter().map(|(i, _)| *i).collect();
        self.maglev_cache.retain(|index, _| live.contains(index));
        target.finish(
            desired
                .nodeport_addresses
                .iter()
                .map(|a| be_addr(*a))
                .collect(),
        )
    }

    /// Adds the frontend's backends, slots, reverse NAT and master entry to `target`, and its
    /// backends' (id, Maglev identity) to `members`.
    #[allow(clippy::too_many_arguments)]
    fn target_frontend(
        &self,
        f: &Frontend,
        master_key: Lb4Key,
        index: u16,
        flags: u16,
        id_of: &HashMap<(u16, u32, u16, u8), u32>,
        ids: &mut Allocator<u32>,
        target: &mut Building,
        members: &mut Vec<(u32, [u8; 6])>,
    ) {
        let proto = f.protocol.number();
        let mut slots = 0u16;
        for b in &f.backends {
            let identity = (index, be_addr(b.address), b.port.to_be(), proto);
            let Some(id) = id_of.get(&identity).copied().or_else(|| ids.next()) else {
                continue;
            };
            target.backends.push((
                id,
                Lb4Backend {
                    address: identity.1,
                    port: identity.2,
                    proto,
                    flags: if b.is_local { BACKEND_FLAG_LOCAL } else { 0 },
                    rev_nat_index: index,
                    _pad: 0,
                },
            ));
            members.push((id, maglev::backend_identity(b.address, b.port)));
            slots += 1;
            target.services.push((
                Lb4Key {
                    backend_slot: slots,
                    ..master_key
                },
                Lb4Service {
                    backend_id: id,
                    count: 0,
                    rev_nat_index: index,
                    flags,
                    _pad: 0,
                },
            ));
        }
        target.rev_nat.push((
            index,
            Lb4RevNat {
                address: master_key.address,
                port: master_key.dport,
                _pad: 0,
            },
        ));
        for r in f.source_ranges.iter().flatten() {
            target
                .src_ranges
                .push((index, be_addr(r.address), r.prefix_len));
        }
        target.services.push((
            master_key,
            Lb4Service {
                // The master's unused backend id carries the affinity timeout (Cilium's trick).
                backend_id: f.affinity_timeout.unwrap_or(0),
                count: slots,
                rev_nat_index: index,
                flags,
                _pad: 0,
            },
        ));
    }

    /// The Maglev table rows of an external frontend (from the cache when its backends did not
    /// change). Frontends whose rows do not fit are served by random selection.
    fn target_maglev(
        &mut self,
        f: &Frontend,
        index: u16,
        members: &mut Vec<(u32, [u8; 6])>,
        target: &mut Building,
    ) {
        let Some(m) = self.maglev_table_size else {
            return;
        };
        if f.kind == FrontendKind::ClusterIp || members.is_empty() {
            return;
        }
        members.sort_unstable();
        let rows = proxy_common::maglev::maglev_rows(m) as usize;
        if target.maglev.len() + rows > self.capacity.maglev_rows {
            tracing::warn!(
                service = %f.service,
                "map {} is full: frontend {}:{} balances at random",
                names::MAGLEV,
                f.address,
                f.port
            );
            return;
        }
        let fresh = match self.maglev_cache.get(&index) {
            Some(c) => c.table_size != m || c.members != *members,
            None => true,
        };
        if fresh {
            let identities: Vec<[u8; 6]> = members.iter().map(|(_, i)| *i).collect();
            let table = maglev::table(&identities, m);
            let rows = table
                .chunks(MAGLEV_ROW_LEN)
                .map(|chunk| {
                    let mut row = MaglevRow {
                        backend_ids: [0; MAGLEV_ROW_LEN],
                    };
                    for (slot, &member) in row.backend_ids.iter_mut().zip(chunk) {
                        *slot = members[member as usize].0;
                    }
                    Arc::new(row)
                })
                .collect();
            self.maglev_cache.insert(
                index,
                MaglevCached {
                    table_size: m,
                    members: std::mem::take(members),
                    rows,
                },
            );
        }
        if let Some(cached) = self.maglev_cache.get(&index) {
            for (row, value) in cached.rows.iter().enumerate() {
                let key = MaglevKey {
                    rev_nat_index: index,
                    row: row as u16,
                };
                target.maglev.push((key, value.clone()));
            }
        }
    }

    fn write(
        &mut self,
        target: &Contents,
        known: &mut Contents,
        outcome: &mut ApplyOutcome,
    ) -> anyhow::Result<()> {
        let maps = &mut self.maps;
        let stats = &mut outcome.stats;
        let now = Instant::now();
        // A draining backend that is wanted again is simply kept.
        self.draining
            .retain(|id, _| !target.backends.contains_key(id));
        // Computed before the masters are rewritten.
        outcome.affinity_released = affinity_released(&known.services, &target.services);
        // Every difference first, in one ordered pass per map (both sides are sorted by key).
        let (services, mut stale_services) = diff(&target.services, &known.services);
        let (backends, mut stale_backends) = diff(&target.backends, &known.backends);
        let (rev_nats, stale_rev_nats) = diff(&target.rev_nat, &known.rev_nat);
        let (rows, stale_rows) = diff(&target.maglev, &known.maglev);
        let (slots, masters): (Vec<_>, Vec<_>) =
            services.into_iter().partition(|(k, _)| k.backend_slot != 0);
        let capacity = self.capacity;
        let added = (services_added(&slots, &masters, known), backends.len());
        let freed_backends = make_room(
            maps,
            known,
            target,
            added,
            capacity,
            (&mut stale_services, &mut stale_backends),
            stats,
        )?;
        self.draining
            .retain(|id, _| known.backends.contains_key(id));

        maps.put_backends(&backends)?;
        stats.writes += record(&mut known.backends, backends);
        maps.put_services(&slots)?;
        stats.writes += record(&mut known.services, slots);
        maps.put_rev_nats(&rev_nats)?;
        stats.writes += record(&mut known.rev_nat, rev_nats);
        maps.put_maglev_rows(&rows)?;
        stats.writes += record(&mut known.maglev, rows);
        // Source ranges before the masters whose flag enables them.
        let new_ranges: Vec<SrcRange> = target
            .src_ranges
            .difference(&known.src_ranges)
            .copied()
            .collect();
        for r in new_ranges {
            maps.put_src_range(r)?;
            known.src_ranges.insert(r);
            stats.writes += 1;
        }
        // The master entries (with `count`) last: a frontend becomes visible, or grows, only
        // once everything it points to is in place.
        maps.put_services(&masters)?;
        stats.writes += record(&mut known.services, masters);

        let (stale_masters, stale_slots): (Vec<Lb4Key>, Vec<Lb4Key>) = stale_services
            .into_iter()
            .partition(|k| k.backend_slot == 0);
        for k in stale_masters.into_iter().chain(stale_slots) {
            maps.del_service(k)?;
            known.services.remove(&k);
            stats.deletes += 1;
        }
        for i in stale_rev_nats {
            maps.del_rev_nat(i)?;
            known.rev_nat.remove(&i);
            stats.deletes += 1;
        }
        for k in stale_rows {
            maps.del_maglev_row(k)?;
            known.maglev.remove(&k);
            stats.deletes += 1;
        }
        // Source ranges after the masters no longer enable them.
        let stale_ranges: Vec<SrcRange> = known
            .src_ranges
            .difference(&target.src_ranges)
            .copied()
            .collect();
        for r in stale_ranges {
            maps.del_src_range(r)?;
            known.src_ranges.remove(&r);
            stats.deletes += 1;
        }
        // Built only when a backend goes (a scan of every backend).
        let still_used: BTreeSet<(u32, u16, u8)> =
            if stale_backends.is_empty() && freed_backends.is_empty() {
                BTreeSet::new()
            } else {
                target
                    .backends
                    .values()
                    .map(|b| (b.address, b.port, b.proto))
                    .collect()
            };
        let mut removed = BTreeSet::new();
        for id in stale_backends {
            let Some(&b) = known.backends.get(&id) else {
                continue;
            };
            if b.proto == Protocol::Tcp.number() && !self.tcp_drain.is_zero() {
                let since = *self.draining.entry(id).or_insert(now);
                if now.duration_since(since) < self.tcp_drain {
                    continue;
                }
            }
            self.draining.remove(&id);
            known.backends.remove(&id);
            if let Err(e) = maps.del_backend(id) {
                known.backends.insert(id, b);
                return Err(e);
            }
            stats.deletes += 1;
            if !still_used.contains(&(b.address, b.port, b.proto)) {
                removed.extend(removed_backend(&b));
            }
        }
        for b in freed_backends {
            if !still_used.contains(&(b.address, b.port, b.proto)) {
                removed.extend(removed_backend(&b));
            }
        }
        outcome.removed_backends = removed.into_iter().collect();
        for a in &target.nodeport {
            if !known.nodeport.contains(a) {
                maps.put_nodeport_address(*a)?;
                known.nodeport.insert(*a);
                stats.writes += 1;
            }
        }
        let stale: Vec<u32> = known
            .nodeport
            .difference(&target.nodeport)
            .copied()
            .collect();
        for a in stale {
            maps.del_nodeport_address(a)?;
            known.nodeport.remove(&a);
            stats.deletes += 1;
        }
        Ok(())
    }
}

/// The entries of `target` that `known` lacks or holds with another value, and the keys of
/// `known` that `target` lacks: one merge pass over the two ordered maps (no lookups).
#[allow(clippy::type_complexity)]
/// The address, port and protocol of a backend that left the maps.
fn removed_backend(b: &Lb4Backend) -> Option<RemovedBackend> {
    Some(RemovedBackend {
        address: addr_from_be(b.address),
        port: u16::from_be(b.port),
        protocol: protocol_from_number(b.proto)?,
    })
}

/// How many of `slots` and `masters` are keys the services map does not hold yet.
fn services_added(
    slots: &[(Lb4Key, Lb4Service)],
    masters: &[(Lb4Key, Lb4Service)],
    known: &Contents,
) -> usize {
    slots
        .iter()
        .chain(masters)
        .filter(|(k, _)| !known.services.contains_key(k))
        .count()
}

/// The writer adds before it deletes (so nothing in use disappears first). When the maps
/// are full that fails: the additions would not fit beside what they replace. Then the
/// frontends that are going away entirely are deleted first (master, then slots, then their
/// backends, draining or not), since after this sync they serve nothing anyway. Removes what
/// it deleted from the stale lists; returns the backends it deleted.
#[allow(clippy::too_many_arguments)]
fn make_room(
    maps: &mut impl LbMaps,
    known: &mut Contents,
    target: &Contents,
    (services_added, backends_added): (usize, usize),
    capacity: Capacity,
    (stale_services, stale_backends): (&mut Vec<Lb4Key>, &mut Vec<u32>),
    stats: &mut ApplyStats,
) -> anyhow::Result<Vec<Lb4Backend>> {
    let services_tight = known.services.len() + services_added > capacity.services;
    let backends_tight = known.backends.len() + backends_added > capacity.backends;
    let mut freed = Vec::new();
    if !services_tight && !backends_tight {
        return Ok(freed);
    }
    let gone = |k: &Lb4Key| {
        !target.services.contains_key(&Lb4Key {
            backend_slot: 0,
            ..*k
        })
    };
    let (mut early, late): (Vec<Lb4Key>, Vec<Lb4Key>) =
        stale_services.iter().partition(|k| gone(k));
    *stale_services = late;
    let gone_indexes: BTreeSet<u16> = early
        .iter()
        .filter_map(|k| known.services.get(k).map(|v| v.rev_nat_index))
        .collect();
    // Masters first: the frontend stops being served before its slots go.
    early.sort_by_key(|k| k.backend_slot != 0);
    for k in early {
        maps.del_service(k)?;
        known.services.remove(&k);
        stats.deletes += 1;
    }
    if backends_tight {
        let (early, late): (Vec<u32>, Vec<u32>) = stale_backends.iter().partition(|id| {
            known
                .backends
                .get(id)
                .is_some_and(|b| gone_indexes.contains(&b.rev_nat_index))
        });
        *stale_backends = late;
        for id in early {
            maps.del_backend(id)?;
            freed.extend(known.backends.remove(&id));
            stats.deletes += 1;
        }
    }
    Ok(freed)
}

fn diff<K: Ord + Copy, V: PartialEq + Clone>(
    target: &BTreeMap<K, V>,
    known: &BTreeMap<K, V>,
) -> (Vec<(K, V)>, Vec<K>) {
    use std::cmp::Ordering;
    let (mut changed, mut stale) = (Vec::new(), Vec::new());
    let mut t = target.iter().peekable();
    let mut k = known.iter().peekable();
    loop {
        match (t.peek(), k.peek()) {
            (None, None) => break,
            (Some((tk, tv)), None) => {
                changed.push((**tk, (*tv).clone()));
                t.next();
            }
            (None, Some((kk, _))) => {
                stale.push(**kk);
                k.next();
            }
            (Some((tk, tv)), Some((kk, kv))) => match tk.cmp(kk) {
                Ordering::Less => {
                    changed.push((**tk, (*tv).clone()));
                    t.next();
                }
                Ordering::Greater => {
                    stale.push(**kk);
                    k.next();
                }
                Ordering::Equal => {
                    if tv != kv {
                        changed.push((**tk, (*tv).clone()));
                    }
                    t.next();
                    k.next();
                }
            },
        }
    }
    (changed, stale)
}

/// Records written entries in the writer's view of the maps; returns how many.
fn record<K: Ord, V>(known: &mut BTreeMap<K, V>, written: Vec<(K, V)>) -> usize {
    let n = written.len();
    known.extend(written);
    n
}

/// Reverse-NAT indexes of masters that have affinity in `known` but not in `target` (gone, or
/// affinity turned off), computed before the masters are rewritten.
fn affinity_released(
    known: &BTreeMap<Lb4Key, Lb4Service>,
    target: &BTreeMap<Lb4Key, Lb4Service>,
) -> Vec<u16> {
    let has_affinity = |v: &Lb4Service| v.flags & SVC_FLAG_AFFINITY != 0;
    let kept: BTreeSet<u16> = target
        .iter()
        .filter(|(k, v)| k.backend_slot == 0 && has_affinity(v))
        .map(|(_, v)| v.rev_nat_index)
        .collect();
    let released: BTreeSet<u16> = known
        .iter()
        .filter(|(k, v)| k.backend_slot == 0 && has_affinity(v))
        .map(|(_, v)| v.rev_nat_index)
        .filter(|i| !kept.contains(i))
        .collect();
    released.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        dataplane::ebpf::maps::{MemoryMaps, Op},
        desired::{Backend, ServicePortName},
    };

    fn frontend(ip: &str, port: u16, proto: Protocol, backends: &[(&str, u16)]) -> Frontend {
        Frontend {
            service: ServicePortName {
                namespace: "default".into(),
                name: format!("svc-{port}"),
                port: String::new(),
                protocol: proto,
            },
            kind: if ip == "0.0.0.0" {
                FrontendKind::NodePort
            } else {
                FrontendKind::ClusterIp
            },
            address: ip.parse().unwrap(),
            port,
            protocol: proto,
            backends: backends
                .iter()
                .map(|(a, p)| Backend {
                    address: a.parse().unwrap(),
                    port: *p,
                    is_local: true,
                })
                .collect(),
            affinity_timeout: None,
            source_ranges: None,
        }
    }

    fn state(frontends: Vec<Frontend>) -> DesiredState {
        DesiredState {
            frontends,
            nodeport_addresses: vec!["198.18.0.1".parse().unwrap()],
            ..DesiredState::default()
        }
    }

    fn seed() -> DesiredState {
        state(vec![
            frontend(
                "0.0.0.0",
                30001,
                Protocol::Tcp,
                &[("10.244.1.10", 80), ("10.244.1.11", 80)],
            ),
            frontend(
                "10.96.100.208",
                8080,
                Protocol::Tcp,
                &[("10.244.1.10", 80), ("10.244.1.11", 80)],
            ),
        ])
    }

    fn position(ops: &[Op], pred: impl Fn(&Op) -> bool) -> usize {
        ops.iter().position(pred).expect("operation missing")
    }

    fn master_of(maps: &MemoryMaps, ip: &str, port: u16) -> Lb4Service {
        let ip: Ipv4Addr = ip.parse().unwrap();
        maps.services[&Lb4Key::new(be_addr(ip), port.to_be(), 6, 0)]
    }

    #[test]
    fn fresh_apply_writes_backends_then_slots_then_masters() {
        let mut w = MapWriter::new(MemoryMaps::default());
        let out = w.apply(&seed(), false).unwrap();
        let ops = &w.maps().ops;
        let last_backend = ops
            .iter()
            .rposition(|o| matches!(o, Op::PutBackend(..)))
            .unwrap();
        let first_slot = position(
            ops,
            |o| matches!(o, Op::PutService(k, _) if k.backend_slot > 0),
        );
        let first_master = position(
            ops,
            |o| matches!(o, Op::PutService(k, _) if k.backend_slot == 0),
        );
        let first_rev = position(ops, |o| matches!(o, Op::PutRevNat(..)));
        assert!(last_backend < first_slot && first_slot < first_rev && first_rev < first_master);
        assert_eq!(master_of(w.maps(), "10.96.100.208", 8080).count, 2);
        assert_eq!(master_of(w.maps(), "0.0.0.0", 30001).count, 2);
        // Backend ids are per service port: 2 frontends x 2 backends.
        assert_eq!(w.maps().backends.len(), 4);
        assert_eq!(out.stats.deletes, 0);
        assert!(out.removed_backends.is_empty());
    }

    fn cidr(a: &str, len: u8) -> crate::desired::Ipv4Cidr {
        crate::desired::Ipv4Cidr::new(a.parse().unwrap(), len).unwrap()
    }

    #[test]
    fn affinity_timeout_rides_in_the_master_and_is_released_when_turned_off() {
        let mut w = MapWriter::new(MemoryMaps::default());
        let mut desired = seed();
        desired.frontends[0].affinity_timeout = Some(7);
        let out = w.apply(&desired, false).unwrap();
        let m = master_of(w.maps(), "0.0.0.0", 30001);
        assert_eq!(
            (m.flags & SVC_FLAG_AFFINITY, m.backend_id),
            (SVC_FLAG_AFFINITY, 7)
        );
        assert_eq!(
            master_of(w.maps(), "10.96.100.208", 8080).flags & SVC_FLAG_AFFINITY,
            0
        );
        assert!(out.affinity_released.is_empty());
        // Slots still carry backend ids, not the timeout.
        let slot = w.maps().services[&Lb4Key {
            backend_slot: 1,
            ..Lb4Key::new(0, 30001u16.to_be(), 6, 0)
        }];
        assert!(w.maps().backends.contains_key(&slot.backend_id));
        desired.frontends[0].affinity_timeout = None;
        let out = w.apply(&desired, false).unwrap();
        assert_eq!(out.affinity_released, vec![m.rev_nat_index]);
        let m = master_of(w.maps(), "0.0.0.0", 30001);
        assert_eq!((m.flags & SVC_FLAG_AFFINITY, m.backend_id), (0, 0));
        // A deleted frontend with affinity releases its index too.
        desired.frontends[0].affinity_timeout = Some(7);
        w.apply(&desired, false).unwrap();
        desired.frontends.remove(0);
        let out = w.apply(&desired, false).unwrap();
        assert_eq!(out.affinity_released, vec![m.rev_nat_index]);
    }

    #[test]
    fn source_ranges_are_written_before_the_flag_and_removed_after() {
        let mut w = MapWriter::new(MemoryMaps::default());
        w.apply(&seed(), false).unwrap();
        let mut desired = seed();
        // The node (198.18.0.1) is outside: connections made on the node are refused too.
        desired.frontends[0].source_ranges = Some(vec![cidr("192.0.2.0", 24)]);
        w.maps_mut().ops.clear();
        w.apply(&desired, false).unwrap();
        let m = master_of(w.maps(), "0.0.0.0", 30001);
        assert_eq!(
            m.flags & (SVC_FLAG_SOURCE_RANGES | SVC_FLAG_SOURCE_RANGES_DENY_NODE),
            SVC_FLAG_SOURCE_RANGES | SVC_FLAG_SOURCE_RANGES_DENY_NODE
        );
        let want: SrcRange = (m.rev_nat_index, be_addr("192.0.2.0".parse().unwrap()), 24);
        let ops = &w.maps().ops;
        assert!(
            position(ops, |o| *o == Op::PutSrcRange(want))
                < position(
                    ops,
                    |o| matches!(o, Op::PutService(k, _) if k.backend_slot == 0)
                )
        );
        // Node inside a range: in-node connections pass.
        desired.frontends[0].source_ranges =
            Some(vec![cidr("192.0.2.0", 24), cidr("198.18.0.0", 16)]);
        w.apply(&desired, false).unwrap();
        let m = master_of(w.maps(), "0.0.0.0", 30001);
        assert_eq!(m.flags & SVC_FLAG_SOURCE_RANGES_DENY_NODE, 0);
        assert_eq!(w.maps().src_ranges.len(), 2);
        // Ranges gone: the flag is cleared before the entries are deleted.
        desired.frontends[0].source_ranges = None;
        w.maps_mut().ops.clear();
        w.apply(&desired, false).unwrap();
        let ops = &w.maps().ops;
        assert!(
            position(
                ops,
                |o| matches!(o, Op::PutService(k, _) if k.backend_slot == 0)
            ) < position(ops, |o| matches!(o, Op::DelSrcRange(..)))
        );
        assert!(w.maps().src_ranges.is_empty());
        assert_eq!(
            master_of(w.maps(), "0.0.0.0", 30001).flags & SVC_FLAG_SOURCE_RANGES,
            0
        );
    }

    #[test]
    fn second_apply_of_the_same_state_writes_nothing() {
        let mut w = MapWriter::new(MemoryMaps::default());
        w.apply(&seed(), false).unwrap();
        let n = w.maps().ops.len();
        let out = w.apply(&seed(), true).unwrap();
        assert_eq!(w.maps().ops.len(), n);
        assert_eq!(out.stats, ApplyStats::default());
    }

    #[test]
    fn a_new_writer_adopts_pinned_contents_without_rewriting() {
        let mut w = MapWriter::new(MemoryMaps::default());
        w.apply(&seed(), false).unwrap();
        let before = w.maps().services.clone();
        let mut maps = std::mem::take(w.maps_mut());
        maps.ops.clear();
        let mut restarted = MapWriter::new(maps);
        restarted.apply(&seed(), false).unwrap();
        assert!(
            restarted.maps().ops.is_empty(),
            "{:?}",
            restarted.maps().ops
        );
        assert_eq!(restarted.maps().services, before);
    }

    #[test]
    fn replacing_a_backend_deletes_the_old_one_last() {
        let mut w = MapWriter::new(MemoryMaps::default());
        w.apply(&seed(), false).unwrap();
        w.maps_mut().ops.clear();
        let churned = state(vec![
            frontend(
                "0.0.0.0",
                30001,
                Protocol::Tcp,
                &[("10.244.1.10", 80), ("10.244.1.12", 80)],
            ),
            frontend(
                "10.96.100.208",
                8080,
                Protocol::Tcp,
                &[("10.244.1.10", 80), ("10.244.1.12", 80)],
            ),
        ]);
        let out = w.apply(&churned, false).unwrap();
        let ops = &w.maps().ops;
        let last_put = ops
            .iter()
            .rposition(|o| matches!(o, Op::PutService(..)))
            .unwrap();
        let first_del = position(ops, |o| matches!(o, Op::DelBackend(_)));
        assert!(last_put < first_del, "{ops:?}");
        assert_eq!(
            out.removed_backends,
            vec![RemovedBackend {
                address: "10.244.1.11".parse().unwrap(),
                port: 80,
                protocol: Protocol::Tcp
            }]
        );
        let gone = be_addr("10.244.1.11".parse().unwrap());
        assert!(w.maps().backends.values().all(|b| b.address != gone));
    }

    #[test]
    fn a_removed_tcp_backend_drains_before_it_goes() {
        let mut w =
            MapWriter::new(MemoryMaps::default()).with_tcp_drain(Duration::from_millis(200));
        w.apply(&seed(), false).unwrap();
        let churned = state(vec![frontend(
            "10.96.100.208",
            8080,
            Protocol::Tcp,
            &[("10.244.1.10", 80), ("10.244.1.12", 80)],
        )]);
        let gone = be_addr("10.244.1.11".parse().unwrap());
        let slots_name = |w: &MapWriter<MemoryMaps>, addr: u32| {
            w.maps().services.iter().any(|(k, v)| {
                k.backend_slot != 0
                    && w.maps()
                        .backends
                        .get(&v.backend_id)
                        .is_some_and(|b| b.address == addr)
            })
        };
        let out = w.apply(&churned, false).unwrap();
        assert!(
            out.removed_backends.is_empty(),
            "{:?}",
            out.removed_backends
        );
        // No slot names it (no new flow picks it), but flows in flight still find it.
        assert!(!slots_name(&w, gone));
        assert!(w.maps().backends.values().any(|b| b.address == gone));
        assert!(!w.drain_due(Instant::now()));
        std::thread::sleep(Duration::from_millis(250));
        assert!(w.drain_due(Instant::now()));
        let out = w.apply(&churned, false).unwrap();
        assert_eq!(out.removed_backends.len(), 1);
        assert!(w.maps().backends.values().all(|b| b.address != gone));
        assert!(!w.drain_due(Instant::now()));
    }

    #[test]
    fn shrinking_lowers_count_before_removing_slots() {
        let mut w = MapWriter::new(MemoryMaps::default());
        w.apply(&seed(), false).unwrap();
        w.maps_mut().ops.clear();
        let shrunk = state(vec![
            frontend("0.0.0.0", 30001, Protocol::Tcp, &[("10.244.1.10", 80)]),
            frontend("10.96.100.208", 8080, Protocol::Tcp, &[]),
        ]);
        w.apply(&shrunk, false).unwrap();
        let ops = &w.maps().ops;
        let master = position(
            ops,
            |o| matches!(o, Op::PutService(k, v) if k.backend_slot == 0 && v.count == 0),
        );
        let slot_del = position(
            ops,
            |o| matches!(o, Op::DelService(k) if k.backend_slot > 0),
        );
        assert!(master < slot_del, "{ops:?}");
        assert_eq!(master_of(w.maps(), "10.96.100.208", 8080).count, 0);
        assert_eq!(w.maps().services.len(), 3);
    }

    #[test]
    fn deleting_a_frontend_removes_master_before_slots_and_everything_it_held() {
        let mut w = MapWriter::new(MemoryMaps::default());
        w.apply(&seed(), false).unwrap();
        w.maps_mut().ops.clear();
        w.apply(&state(vec![]), false).unwrap();
        let ops = &w.maps().ops;
        let master = position(
            ops,
            |o| matches!(o, Op::DelService(k) if k.backend_slot == 0),
        );
        let slot = position(
            ops,
            |o| matches!(o, Op::DelService(k) if k.backend_slot > 0),
        );
        assert!(master < slot);
        let m = w.maps();
        assert!(m.services.is_empty() && m.backends.is_empty() && m.rev_nat.is_empty());
    }

    #[test]
    fn a_failed_write_is_repaired_by_the_next_apply() {
        let mut w = MapWriter::new(MemoryMaps::default());
        w.maps_mut().fail_at = Some(3);
        assert!(w.apply(&seed(), false).is_err());
        w.apply(&seed(), false).unwrap();
        let mut clean = MapWriter::new(MemoryMaps::default());
        clean.apply(&seed(), false).unwrap();
        assert_eq!(w.maps().services, clean.maps().services);
        assert_eq!(w.maps().backends, clean.maps().backends);
    }

    #[test]
    fn frontends_that_do_not_fit_are_rejected_by_name_and_the_rest_served() {
        let capacity = Capacity {
            services: 4,
            backends: 100,
            ..Capacity::default()
        };
        let mut w = MapWriter::with_capacity(MemoryMaps::default(), capacity);
        let out = w.apply(&seed(), false).unwrap();
        assert_eq!(out.stats.rejected.len(), 1);
        assert!(
            out.stats.rejected[0].contains("default/svc-8080"),
            "{:?}",
            out.stats.rejected
        );
        assert!(out.stats.rejected[0].contains("KP_LB4_SVC_V1"));
        assert_eq!(master_of(w.maps(), "0.0.0.0", 30001).count, 2);
    }

    #[test]
    fn a_full_map_refuses_the_new_frontend_not_one_that_is_serving() {
        let capacity = Capacity {
            services: 5,
            backends: 100,
            ..Capacity::default()
        };
        let mut w = MapWriter::with_capacity(MemoryMaps::default(), capacity);
        // 10.96.100.208:8080 (3 entries) is serving.
        let serving = frontend(
            "10.96.100.208",
            8080,
            Protocol::Tcp,
            &[("10.244.1.10", 80), ("10.244.1.11", 80)],
        );
        w.apply(&state(vec![serving.clone()]), false).unwrap();
        // Two new frontends of 3 and 2 entries; the first sorts before the serving one and
        // would take its room if frontends were placed in key order.
        let mut newcomer = frontend(
            "10.96.0.5",
            80,
            Protocol::Tcp,
            &[("10.244.1.20", 80), ("10.244.1.21", 80)],
        );
        newcomer.service.name = "newcomer".into();
        let small = frontend("10.96.200.1", 80, Protocol::Tcp, &[("10.244.1.30", 80)]);
        let out = w
            .apply(&state(vec![newcomer, serving, small]), false)
            .unwrap();
        assert_eq!(master_of(w.maps(), "10.96.100.208", 8080).count, 2);
        assert_eq!(out.stats.rejected.len(), 1, "{:?}", out.stats.rejected);
        assert!(
            out.stats.rejected[0].contains("default/newcomer"),
            "{:?}",
            out.stats.rejected
        );
        assert_eq!(master_of(w.maps(), "10.96.200.1", 80).count, 1);
        // A full sync (maps re-read) keeps the same choice.
        let again = w
            .apply(
                &state(vec![
                    frontend(
                        "10.96.0.5",
                        80,
                        Protocol::Tcp,
                        &[("10.244.1.20", 80), ("10.244.1.21", 80)],
                    ),
                    frontend(
                        "10.96.100.208",
                        8080,
                        Protocol::Tcp,
                        &[("10.244.1.10", 80), ("10.244.1.11", 80)],
                    ),
                    frontend("10.96.200.1", 80, Protocol::Tcp, &[("10.244.1.30", 80)]),
                ]),
                true,
            )
            .unwrap();
        assert_eq!(again.stats.rejected.len(), 1, "{:?}", again.stats.rejected);
        assert!(again.stats.rejected[0].contains("10.96.0.5:80"));
    }

    #[test]
    fn a_full_backends_map_rejects_by_name_too() {
        let capacity = Capacity {
            services: 100,
            backends: 3,
            ..Capacity::default()
        };
        let mut w = MapWriter::with_capacity(MemoryMaps::default(), capacity);
        let out = w.apply(&seed(), false).unwrap();
        assert_eq!(out.stats.rejected.len(), 1, "{:?}", out.stats.rejected);
        assert!(out.stats.rejected[0].contains("KP_LB4_BE_V1 is full (3 entries)"));
        assert_eq!(w.maps().backends.len(), 2);
    }

    #[test]
    fn same_port_different_protocols_are_distinct_frontends() {
        let mut w = MapWriter::new(MemoryMaps::default());
        let s = state(vec![
            frontend("10.96.0.10", 53, Protocol::Tcp, &[("10.244.1.10", 53)]),
            frontend("10.96.0.10", 53, Protocol::Udp, &[("10.244.1.10", 53)]),
        ]);
        w.apply(&s, false).unwrap();
        let masters: Vec<_> = w
            .maps()
            .services
            .iter()
            .filter(|(k, _)| k.backend_slot == 0)
            .collect();
        assert_eq!(masters.len(), 2);
        assert_ne!(masters[0].1.rev_nat_index, masters[1].1.rev_nat_index);
        let udp_only = state(vec![frontend(
            "10.96.0.10",
            53,
            Protocol::Udp,
            &[("10.244.1.10", 53)],
        )]);
        let out = w.apply(&udp_only, false).unwrap();
        assert_eq!(out.removed_backends[0].protocol, Protocol::Tcp);
    }

    fn maglev_rows_of(maps: &MemoryMaps, index: u16) -> Vec<u32> {
        maps.maglev
            .iter()
            .filter(|(k, _)| k.rev_nat_index == index)
            .flat_map(|(_, r)| r.backend_ids)
            .collect()
    }

    #[test]
    fn maglev_tables_only_for_external_frontends_written_before_masters() {
        let mut w = MapWriter::new(MemoryMaps::default());
        w.set_maglev(Some(251));
        w.apply(&seed(), false).unwrap();
        let np = master_of(w.maps(), "0.0.0.0", 30001);
        let cip = master_of(w.maps(), "10.96.100.208", 8080);
        let table = maglev_rows_of(w.maps(), np.rev_nat_index);
        assert_eq!(table.len(), 1000, "one row of 1000 for M = 251");
        let used: BTreeSet<u32> = table[..251].iter().copied().collect();
        let ids: BTreeSet<u32> = w
            .maps()
            .backends
            .iter()
            .filter(|(_, b)| b.rev_nat_index == np.rev_nat_index)
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(
            used, ids,
            "every table entry names one of the frontend's backends"
        );
        assert!(table[251..].iter().all(|&id| id == 0));
        assert!(maglev_rows_of(w.maps(), cip.rev_nat_index).is_empty());
        let ops = &w.maps().ops;
        let row = position(ops, |o| matches!(o, Op::PutMaglevRow(_)));
        let master = position(
            ops,
            |o| matches!(o, Op::PutService(k, _) if k.backend_slot == 0),
        );
        assert!(row < master, "{ops:?}");
        // Unchanged backends: nothing rewritten.
        let n = w.maps().ops.len();
        w.apply(&seed(), false).unwrap();
        assert_eq!(w.maps().ops.len(), n);
        // Frontend gone: its rows go too.
        w.apply(&state(vec![]), false).unwrap();
        assert!(w.maps().maglev.is_empty());
    }

    #[test]
    fn two_writers_with_the_same_backends_pick_the_same_backend_addresses() {
        let backends = [
            ("10.244.1.10", 80),
            ("10.244.1.11", 80),
            ("10.244.2.12", 80),
        ];
        let mut a = MapWriter::new(MemoryMaps::default());
        a.set_maglev(Some(251));
        a.apply(
            &state(vec![frontend("0.0.0.0", 30001, Protocol::Tcp, &backends)]),
            false,
        )
        .unwrap();
        // The second "node" knows other frontends first, so its ids and indexes differ.
        let mut b = MapWriter::new(MemoryMaps::default());
        b.set_maglev(Some(251));
        let mut reversed = backends;
        reversed.reverse();
        b.apply(
            &state(vec![
                frontend("10.96.0.1", 443, Protocol::Tcp, &[("10.244.9.9", 6443)]),
                frontend("0.0.0.0", 30001, Protocol::Tcp, &reversed),
            ]),
            false,
        )
        .unwrap();
        let addr_table = |w: &MapWriter<MemoryMaps>| -> Vec<(u32, u16)> {
            let idx = master_of(w.maps(), "0.0.0.0", 30001).rev_nat_index;
            maglev_rows_of(w.maps(), idx)[..251]
                .iter()
                .map(|id| {
                    let be = w.maps().backends[id];
                    (be.address, be.port)
                })
                .collect()
        };
        assert_ne!(
            master_of(a.maps(), "0.0.0.0", 30001).rev_nat_index,
            master_of(b.maps(), "0.0.0.0", 30001).rev_nat_index
        );
        assert_eq!(addr_table(&a), addr_table(&b));
    }
}
