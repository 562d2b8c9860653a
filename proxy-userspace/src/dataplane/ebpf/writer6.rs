//! Writes the IPv6 frontends of a [`DesiredState`] (`frontends6`, `nodeport_addresses6`)
//! into the IPv6 maps, changing only what differs: the twin of `writer.rs`, in the same
//! (Cilium's) order and with the same idempotence. Backends -> slots -> reverse NAT ->
//! masters with `count` -> removed masters -> removed slots -> removed reverse NAT -> removed
//! backends; after an error the maps are re-read.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv6Addr,
};

use proxy_common::{
    lb::BACKEND_FLAG_LOCAL,
    lb6::{Lb6Backend, Lb6Key, Lb6RevNat, Lb6Service},
    maps as names,
};

use super::{
    maps6::{Lb6Maps, addr_from_words, be_words},
    writer::{Allocator, kind_flags, protocol_from_number},
};
use crate::{
    dataplane::ApplyStats,
    desired::{DesiredState, Frontend6, Protocol},
};

/// An IPv6 backend address that no frontend uses any more.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RemovedBackend6 {
    pub address: Ipv6Addr,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Debug, Default)]
pub struct ApplyOutcome6 {
    pub stats: ApplyStats,
    pub removed_backends: Vec<RemovedBackend6>,
}

/// What the IPv6 maps hold, as far as the writer knows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Contents6 {
    services: BTreeMap<Lb6Key, Lb6Service>,
    backends: BTreeMap<u32, Lb6Backend>,
    rev_nat: BTreeMap<u16, Lb6RevNat>,
    nodeport: BTreeSet<[u32; 4]>,
}

impl Contents6 {
    fn read(maps: &impl Lb6Maps) -> anyhow::Result<Self> {
        Ok(Self {
            services: maps.services()?.into_iter().collect(),
            backends: maps.backends()?.into_iter().collect(),
            rev_nat: maps.rev_nats()?.into_iter().collect(),
            nodeport: maps.nodeport_addresses()?.into_iter().collect(),
        })
    }
}

/// Backend identity within a service port: (rev-NAT index, address, port be, proto).
type BackendIdentity = (u16, [u32; 4], u16, u8);

pub struct MapWriter6<M> {
    maps: M,
    known: Option<Contents6>,
    capacity_services: usize,
    capacity_backends: usize,
}

impl<M: Lb6Maps> MapWriter6<M> {
    pub fn new(maps: M) -> Self {
        Self::with_capacity(
            maps,
            (
                names::LB6_SERVICES_MAX as usize,
                names::LB6_BACKENDS_MAX as usize,
            ),
        )
    }

    /// A writer for maps of (services, backends) entries.
    pub fn with_capacity(maps: M, (services, backends): (usize, usize)) -> Self {
        Self {
            maps,
            known: None,
            capacity_services: services,
            capacity_backends: backends,
        }
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    /// Makes the IPv6 maps hold exactly `desired.frontends6` (minus frontends that do not
    /// fit, reported in `stats.rejected`).
    pub fn apply(&mut self, desired: &DesiredState, full: bool) -> anyhow::Result<ApplyOutcome6> {
        let mut known = match self.known.take() {
            Some(k) if !full => k,
            _ => Contents6::read(&self.maps)?,
        };
        let mut outcome = ApplyOutcome6::default();
        let target = self.target(desired, &known, &mut outcome.stats.rejected);
        let capacity = (self.capacity_services, self.capacity_backends);
        let result = write(&mut self.maps, &target, &mut known, capacity, &mut outcome);
        if result.is_ok() {
            self.known = Some(known);
        }
        result.map(|()| outcome)
    }

    fn target(
        &self,
        desired: &DesiredState,
        known: &Contents6,
        rejected: &mut Vec<String>,
    ) -> Contents6 {
        let index_of: HashMap<Lb6Key, u16> = known
            .services
            .iter()
            .filter(|(k, _)| k.backend_slot == 0)
            .map(|(k, v)| (*k, v.rev_nat_index))
            .collect();
        let mut used_indexes: BTreeSet<u16> = known.rev_nat.keys().copied().collect();
        used_indexes.extend(index_of.values().copied());
        used_indexes.insert(0);
        let mut indexes = Allocator::new(used_indexes, u16::MAX);
        let id_of: HashMap<BackendIdentity, u32> = known
            .backends
            .iter()
            .map(|(id, b)| ((b.rev_nat_index, b.address, b.port, b.proto), *id))
            .collect();
        let mut used_ids: BTreeSet<u32> = known.backends.keys().copied().collect();
        used_ids.insert(0);
        let mut ids = Allocator::new(used_ids, u32::MAX);

        let mut target = Contents6::default();
        let programmed = |f: &Frontend6| index_of.contains_key(&master_key(f));
        for f in super::writer::programmed_first(&desired.frontends6, programmed) {
            let full = if target.services.len() + 1 + f.backends.len() > self.capacity_services {
                Some((names::LB6_SERVICES, self.capacity_services))
            } else if target.backends.len() + f.backends.len() > self.capacity_backends {
                Some((names::LB6_BACKENDS, self.capacity_backends))
            } else {
                None
            };
            if let Some((map, entries)) = full {
                rejected.push(format!(
                    "service {} frontend [{}]:{}/{}: not programmed: map {map} is full ({entries} entries)",
                    f.service,
                    f.address,
                    f.port,
                    f.protocol.as_str(),
                ));
                continue;
            }
            let master_key = master_key(f);
            let Some(index) = index_of
                .get(&master_key)
                .copied()
                .or_else(|| indexes.next())
            else {
                rejected.push(format!(
                    "service {}: not programmed: no free IPv6 reverse-NAT index",
                    f.service
                ));
                continue;
            };
            target_frontend(f, master_key, index, &id_of, &mut ids, &mut target);
        }
        target.nodeport = desired
            .nodeport_addresses6
            .iter()
            .map(|a| be_words(*a))
            .collect();
        target
    }
}

/// The frontend's master entry key (slot 0).
fn master_key(f: &Frontend6) -> Lb6Key {
    Lb6Key::new(be_words(f.address), f.port.to_be(), f.protocol.number(), 0)
}

fn target_frontend(
    f: &Frontend6,
    master_key: Lb6Key,
    index: u16,
    id_of: &HashMap<BackendIdentity, u32>,
    ids: &mut Allocator<u32>,
    target: &mut Contents6,
) {
    let flags = kind_flags(f.kind);
    let proto = f.protocol.number();
    let mut slots = 0u16;
    for b in &f.backends {
        let identity = (index, be_words(b.address), b.port.to_be(), proto);
        let Some(id) = id_of.get(&identity).copied().or_else(|| ids.next()) else {
            continue;
        };
        target.backends.insert(
            id,
            Lb6Backend {
                address: identity.1,
                port: identity.2,
                proto,
                flags: if b.is_local { BACKEND_FLAG_LOCAL } else { 0 },
                rev_nat_index: index,
                _pad: 0,
            },
        );
        slots += 1;
        target.services.insert(
            Lb6Key {
                backend_slot: slots,
                ..master_key
            },
            Lb6Service {
                backend_id: id,
                count: 0,
                rev_nat_index: index,
                flags,
                _pad: 0,
            },
        );
    }
    target.rev_nat.insert(
        index,
        Lb6RevNat {
            address: master_key.address,
            port: master_key.dport,
            _pad: 0,
        },
    );
    target.services.insert(
        master_key,
        Lb6Service {
            backend_id: 0,
            count: slots,
            rev_nat_index: index,
            flags,
            _pad: 0,
        },
    );
}

/// As the IPv4 writer's `make_room`: when the additions would not fit beside what they
/// replace, the frontends going away entirely are deleted first (masters, slots, then their
/// backends). Returns the backends it deleted.
fn make_room(
    maps: &mut impl Lb6Maps,
    target: &Contents6,
    known: &mut Contents6,
    (services_max, backends_max): (usize, usize),
    stats: &mut ApplyStats,
) -> anyhow::Result<Vec<Lb6Backend>> {
    let services_added = target
        .services
        .keys()
        .filter(|k| !known.services.contains_key(k))
        .count();
    let backends_added = target
        .backends
        .keys()
        .filter(|id| !known.backends.contains_key(id))
        .count();
    let mut freed = Vec::new();
    if known.services.len() + services_added <= services_max
        && known.backends.len() + backends_added <= backends_max
    {
        return Ok(freed);
    }
    let gone = |k: &Lb6Key| {
        !target.services.contains_key(&Lb6Key {
            backend_slot: 0,
            ..*k
        })
    };
    let mut early: Vec<Lb6Key> = known.services.keys().filter(|k| gone(k)).copied().collect();
    let gone_indexes: BTreeSet<u16> = early
        .iter()
        .filter_map(|k| known.services.get(k).map(|v| v.rev_nat_index))
        .collect();
    early.sort_by_key(|k| k.backend_slot != 0);
    for k in early {
        maps.del_service(k)?;
        known.services.remove(&k);
        stats.deletes += 1;
    }
    let early: Vec<u32> = known
        .backends
        .iter()
        .filter(|(id, b)| {
            !target.backends.contains_key(id) && gone_indexes.contains(&b.rev_nat_index)
        })
        .map(|(id, _)| *id)
        .collect();
    for id in early {
        maps.del_backend(id)?;
        freed.extend(known.backends.remove(&id));
        stats.deletes += 1;
    }
    Ok(freed)
}

fn write(
    maps: &mut impl Lb6Maps,
    target: &Contents6,
    known: &mut Contents6,
    capacity: (usize, usize),
    outcome: &mut ApplyOutcome6,
) -> anyhow::Result<()> {
    let stats = &mut outcome.stats;
    let freed = make_room(maps, target, known, capacity, stats)?;
    for (id, b) in &target.backends {
        if known.backends.get(id) != Some(b) {
            maps.put_backend(*id, *b)?;
            known.backends.insert(*id, *b);
            stats.writes += 1;
        }
    }
    for slots_first in [true, false] {
        for (k, v) in &target.services {
            if (k.backend_slot != 0) == slots_first && known.services.get(k) != Some(v) {
                maps.put_service(*k, *v)?;
                known.services.insert(*k, *v);
                stats.writes += 1;
            }
        }
        if slots_first {
            for (i, r) in &target.rev_nat {
                if known.rev_nat.get(i) != Some(r) {
                    maps.put_rev_nat(*i, *r)?;
                    known.rev_nat.insert(*i, *r);
                    stats.writes += 1;
                }
            }
        }
    }
    for masters_first in [true, false] {
        let stale: Vec<Lb6Key> = known
            .services
            .keys()
            .filter(|k| (k.backend_slot == 0) == masters_first && !target.services.contains_key(k))
            .copied()
            .collect();
        for k in stale {
            maps.del_service(k)?;
            known.services.remove(&k);
            stats.deletes += 1;
        }
    }
    let stale: Vec<u16> = known
        .rev_nat
        .keys()
        .filter(|i| !target.rev_nat.contains_key(i))
        .copied()
        .collect();
    for i in stale {
        maps.del_rev_nat(i)?;
        known.rev_nat.remove(&i);
        stats.deletes += 1;
    }
    let still_used: BTreeSet<([u32; 4], u16, u8)> = target
        .backends
        .values()
        .map(|b| (b.address, b.port, b.proto))
        .collect();
    let stale: Vec<(u32, Lb6Backend)> = known
        .backends
        .iter()
        .filter(|(id, _)| !target.backends.contains_key(id))
        .map(|(id, b)| (*id, *b))
        .collect();
    for (id, _) in &stale {
        maps.del_backend(*id)?;
        known.backends.remove(id);
        stats.deletes += 1;
    }
    let mut removed = BTreeSet::new();
    for b in stale.into_iter().map(|(_, b)| b).chain(freed) {
        if !still_used.contains(&(b.address, b.port, b.proto)) {
            if let Some(protocol) = protocol_from_number(b.proto) {
                removed.insert(RemovedBackend6 {
                    address: addr_from_words(b.address),
                    port: u16::from_be(b.port),
                    protocol,
                });
            }
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
    let stale: Vec<[u32; 4]> = known
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        dataplane::ebpf::maps6::{MemoryMaps6, Op6},
        desired::{Backend6, FrontendKind, ServicePortName},
    };

    fn fe(addr: &str, port: u16, backends: &[(&str, u16)]) -> Frontend6 {
        Frontend6 {
            service: ServicePortName {
                namespace: "default".into(),
                name: "web".into(),
                port: "http".into(),
                protocol: Protocol::Tcp,
            },
            kind: FrontendKind::ClusterIp,
            address: addr.parse().unwrap(),
            port,
            protocol: Protocol::Tcp,
            backends: backends
                .iter()
                .map(|(a, p)| Backend6 {
                    address: a.parse().unwrap(),
                    port: *p,
                    is_local: true,
                })
                .collect(),
            affinity_timeout: None,
            source_ranges: None,
        }
    }

    fn state(frontends6: Vec<Frontend6>) -> DesiredState {
        DesiredState {
            frontends6,
            nodeport_addresses6: vec!["fd00:198:18::1".parse().unwrap()],
            ..DesiredState::default()
        }
    }

    #[test]
    fn words_round_trip_in_network_order() {
        let a: Ipv6Addr = "fd00:10:96::1".parse().unwrap();
        let w = be_words(a);
        assert_eq!(w[0].to_ne_bytes(), [0xfd, 0x00, 0x00, 0x10]);
        assert_eq!(addr_from_words(w), a);
    }

    #[test]
    fn a_full_map_frees_the_room_of_removed_frontends_before_adding() {
        let mut w = MapWriter6::with_capacity(MemoryMaps6::default(), (4, 2));
        let old = state(vec![fe(
            "fd00:10:96::a",
            80,
            &[("fd00:10:244:1::5", 8080), ("fd00:10:244:1::6", 8080)],
        )]);
        w.apply(&old, false).unwrap();
        let done = w.maps().ops.len();
        let new = state(vec![fe(
            "fd00:10:96::b",
            80,
            &[("fd00:10:244:1::7", 8080), ("fd00:10:244:1::8", 8080)],
        )]);
        let out = w.apply(&new, false).unwrap();
        assert!(out.stats.rejected.is_empty(), "{:?}", out.stats.rejected);
        let ops = &w.maps().ops[done..];
        let first_put = ops
            .iter()
            .position(|op| matches!(op, Op6::PutService(..) | Op6::PutBackend(..)))
            .unwrap();
        let deletes_before: Vec<&Op6> = ops[..first_put].iter().collect();
        // The old master, its two slots and its two backends go before anything is added.
        assert_eq!(deletes_before.len(), 5, "{ops:?}");
        assert!(matches!(deletes_before[0], Op6::DelService(k) if k.backend_slot == 0));
        assert_eq!(out.removed_backends.len(), 2);
        // Not tight: the usual order (add, then delete).
        let mut roomy = MapWriter6::new(MemoryMaps6::default());
        roomy.apply(&old, false).unwrap();
        let done = roomy.maps().ops.len();
        roomy.apply(&new, false).unwrap();
        assert!(matches!(roomy.maps().ops[done], Op6::PutBackend(..)));
    }

    #[test]
    fn writes_in_order_idempotently_and_shrinks_safely() {
        let mut w = MapWriter6::new(MemoryMaps6::default());
        let two = state(vec![fe(
            "fd00:10:96::a",
            80,
            &[("fd00:10:244:1::5", 8080), ("fd00:10:244:1::6", 8080)],
        )]);
        let out = w.apply(&two, false).unwrap();
        assert_eq!(out.stats.writes, 2 + 2 + 1 + 1 + 1); // backends, slots, rev-NAT, master, nodeport
        // Order: backends before slots before rev-NAT before the master.
        let kinds: Vec<u8> = w
            .maps()
            .ops
            .iter()
            .map(|op| match op {
                Op6::PutBackend(..) => 0,
                Op6::PutService(k, _) if k.backend_slot != 0 => 1,
                Op6::PutRevNat(..) => 2,
                Op6::PutService(..) => 3,
                _ => 4,
            })
            .collect();
        assert_eq!(kinds, vec![0, 0, 1, 1, 2, 3, 4]);
        let master = w
            .maps()
            .services
            .iter()
            .find(|(k, _)| k.backend_slot == 0)
            .map(|(_, v)| *v)
            .unwrap();
        assert_eq!(master.count, 2);

        // Same state again, even re-read from the maps: nothing written.
        assert_eq!(w.apply(&two, false).unwrap().stats.writes, 0);
        assert_eq!(w.apply(&two, true).unwrap().stats.writes, 0);

        // One backend leaves: the master's count drops before its slot goes, then the backend.
        let n = w.maps().ops.len();
        let one = state(vec![fe("fd00:10:96::a", 80, &[("fd00:10:244:1::6", 8080)])]);
        let out = w.apply(&one, false).unwrap();
        assert_eq!(out.removed_backends.len(), 1);
        assert_eq!(
            out.removed_backends[0].address,
            "fd00:10:244:1::5".parse::<Ipv6Addr>().unwrap()
        );
        let ops = &w.maps().ops[n..];
        let master_put = ops
            .iter()
            .position(|o| matches!(o, Op6::PutService(k, v) if k.backend_slot == 0 && v.count == 1))
            .unwrap();
        let slot_del = ops
            .iter()
            .position(|o| matches!(o, Op6::DelService(k) if k.backend_slot == 2))
            .unwrap();
        let be_del = ops
            .iter()
            .position(|o| matches!(o, Op6::DelBackend(_)))
            .unwrap();
        assert!(master_put < slot_del && slot_del < be_del, "{ops:?}");

        // Everything goes.
        w.apply(&DesiredState::default(), false).unwrap();
        let m = w.maps();
        assert!(
            m.services.is_empty()
                && m.backends.is_empty()
                && m.rev_nat.is_empty()
                && m.nodeport.is_empty()
        );
    }
}
