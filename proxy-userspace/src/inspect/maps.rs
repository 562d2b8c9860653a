//! Reading the maps pinned under a bpf root, straight from the kernel: the agent need not run.

use std::{
    collections::{BTreeMap, BTreeSet},
    hash::Hash,
    net::Ipv4Addr,
    path::Path,
};

use anyhow::{Context as _, bail};
use aya::{
    Pod,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, lpm_trie::LpmTrie},
};
use proxy_common::{
    affinity::{Lb4AffinityKey, Lb4AffinityValue, Lb6AffinityKey, Lb6AffinityValue},
    config::Lb4Config,
    conntrack::{Ct4Entry, Ct4Key, Nat4RevEntry},
    conntrack6::{Ct6Entry, Ct6Key, Nat6RevEntry},
    lb::{Lb4Backend, Lb4Key, Lb4RevNat, Lb4Service},
    lb6::{Lb6Backend, Lb6Key, Lb6RevNat, Lb6Service},
    maps as names,
    sock::{Sock4RevKey, Sock4RevValue},
    sock6::{Sock6RevKey, Sock6RevValue},
    src_range::{Lb4SrcRangeKey, Lb6SrcRangeKey},
    stats::{STAT_NAMES, SvcStats},
};
use serde::Serialize;

/// The address in a "be" field (network byte order as the packet carries it).
pub fn addr(be: u32) -> Ipv4Addr {
    Ipv4Addr::from(be.to_ne_bytes())
}

/// The port in a "be" field.
pub fn port(be: u16) -> u16 {
    u16::from_be(be)
}

/// "TCP", "UDP", "SCTP" or the protocol number.
pub fn proto_name(proto: u8) -> String {
    match proto {
        6 => "TCP".into(),
        17 => "UDP".into(),
        132 => "SCTP".into(),
        n => n.to_string(),
    }
}

/// Opens the map pinned at `<root>/<name>`.
pub fn open(root: &Path, name: &str) -> anyhow::Result<Map> {
    let path = root.join(name);
    if !path.exists() {
        bail!(
            "{} is not pinned: is --bpf-root right, and has an agent run with it?",
            path.display()
        );
    }
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    Map::from_map_data(data).with_context(|| format!("opening {}", path.display()))
}

/// Every entry of a pinned (LRU) hash map. Entries that vanish while we read are skipped; a
/// map that churns faster than we read may show an entry twice, so the keys are deduplicated.
pub fn read_hash<K: Pod + Eq + Hash, V: Pod>(
    root: &Path,
    name: &str,
) -> anyhow::Result<Vec<(K, V)>> {
    let map: HashMap<MapData, K, V> = HashMap::try_from(open(root, name)?)
        .with_context(|| format!("{name} has an unexpected type or layout"))?;
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for item in map.iter() {
        match item {
            Ok((k, v)) => {
                if seen.insert(k) {
                    out.push((k, v));
                }
            }
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e).with_context(|| format!("reading {name}")),
        }
    }
    Ok(out)
}

fn count_keys<K: Pod + Eq + Hash, V: Pod>(map: Map) -> Result<u64, MapError> {
    let map: HashMap<MapData, K, V> = HashMap::try_from(map)?;
    let mut seen = std::collections::HashSet::new();
    for k in map.keys() {
        match k {
            Ok(k) => {
                seen.insert(k);
            }
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(seen.len() as u64)
}

fn count_lpm_keys<K: Pod, V: Pod>(map: Map) -> Result<u64, MapError> {
    let map: LpmTrie<MapData, K, V> = LpmTrie::try_from(map)?;
    let mut n = 0;
    for k in map.keys() {
        match k {
            Ok(_) => n += 1,
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn count_percpu_keys<K: Pod + Eq + Hash, V: Pod>(map: Map) -> Result<u64, MapError> {
    let map: PerCpuHashMap<MapData, K, V> = PerCpuHashMap::try_from(map)?;
    let mut seen = std::collections::HashSet::new();
    for k in map.keys() {
        match k {
            Ok(k) => {
                seen.insert(k);
            }
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(seen.len() as u64)
}

/// How full one pinned map is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MapFill {
    pub name: String,
    /// The kernel's map id (changes when the map is recreated).
    pub id: Option<u32>,
    pub entries: u64,
    pub max_entries: u32,
    /// Why the map could not be read, if it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl MapFill {
    /// entries / max_entries, 0..=1.
    pub fn ratio(&self) -> f64 {
        if self.max_entries == 0 {
            return 0.0;
        }
        self.entries as f64 / f64::from(self.max_entries)
    }
}

/// Entries and capacity of every map kproxy pins under `root`.
pub fn fill_levels(root: &Path) -> Vec<MapFill> {
    names::ALL
        .iter()
        .map(|name| match fill_level(root, name) {
            Ok(f) => f,
            Err(e) => MapFill {
                name: (*name).to_string(),
                id: None,
                entries: 0,
                max_entries: 0,
                error: Some(format!("{e:#}")),
            },
        })
        .collect()
}

fn fill_level(root: &Path, name: &str) -> anyhow::Result<MapFill> {
    let map = open(root, name)?;
    let info = match &map {
        Map::HashMap(d)
        | Map::LruHashMap(d)
        | Map::Array(d)
        | Map::PerCpuArray(d)
        | Map::PerCpuHashMap(d)
        | Map::LpmTrie(d) => d.info()?,
        _ => bail!("{name} has an unexpected map type"),
    };
    let entries = match name {
        names::LB4_SERVICES => count_keys::<Lb4Key, Lb4Service>(map),
        names::LB4_BACKENDS => count_keys::<u32, Lb4Backend>(map),
        names::LB4_REVERSE_NAT => count_keys::<u16, Lb4RevNat>(map),
        names::LB4_NODEPORT_ADDRS => count_keys::<u32, u32>(map),
        names::CT4 => count_keys::<Ct4Key, Ct4Entry>(map),
        names::NAT4_REV => count_keys::<Ct4Key, Nat4RevEntry>(map),
        names::SOCK4_REV => count_keys::<Sock4RevKey, Sock4RevValue>(map),
        names::SVC_STATS => count_percpu_keys::<u16, SvcStats>(map),
        names::MAGLEV => {
            count_keys::<proxy_common::maglev::MaglevKey, proxy_common::maglev::MaglevRow>(map)
        }
        names::LB4_AFFINITY => count_keys::<Lb4AffinityKey, Lb4AffinityValue>(map),
        names::LB4_SRC_RANGE => count_lpm_keys::<Lb4SrcRangeKey, u8>(map),
        names::LB6_SERVICES => count_keys::<Lb6Key, Lb6Service>(map),
        names::LB6_BACKENDS => count_keys::<u32, Lb6Backend>(map),
        names::LB6_REVERSE_NAT => count_keys::<u16, Lb6RevNat>(map),
        names::LB6_NODEPORT_ADDRS => count_keys::<[u32; 4], u32>(map),
        names::SOCK6_REV => count_keys::<Sock6RevKey, Sock6RevValue>(map),
        names::CT6 => count_keys::<Ct6Key, Ct6Entry>(map),
        names::NAT6_REV => count_keys::<Ct6Key, Nat6RevEntry>(map),
        names::LB6_AFFINITY => count_keys::<Lb6AffinityKey, Lb6AffinityValue>(map),
        names::LB6_SRC_RANGE => count_lpm_keys::<Lb6SrcRangeKey, u8>(map),
        names::POD_DEVICES => count_keys::<u32, u32>(map),
        // An array always holds max_entries elements.
        _ if matches!(map, Map::Array(_) | Map::PerCpuArray(_)) => {
            Ok(u64::from(info.max_entries()))
        }
        _ => bail!("no entry counter for map {name}"),
    }
    .with_context(|| format!("counting the entries of {name}"))?;
    Ok(MapFill {
        name: name.to_string(),
        id: Some(info.id()),
        entries,
        max_entries: info.max_entries(),
        error: None,
    })
}

/// The load-balancing maps at one moment (each map read on its own: the agent may be writing
/// between two reads, in its safe order).
#[derive(Clone, Debug, Default)]
pub struct LbSnapshot {
    pub services: BTreeMap<Lb4Key, Lb4Service>,
    pub backends: BTreeMap<u32, Lb4Backend>,
    pub rev_nat: BTreeMap<u16, Lb4RevNat>,
    pub nodeport_addrs: BTreeSet<Ipv4Addr>,
    /// None when the config array could not be read.
    pub config: Option<Lb4Config>,
    /// Traffic counters by reverse-NAT index (empty when unreadable, e.g. pins of an agent
    /// that predates them).
    pub svc_stats: BTreeMap<u16, FrontendStats>,
}

impl LbSnapshot {
    pub fn read(root: &Path) -> anyhow::Result<Self> {
        let services = read_hash::<Lb4Key, Lb4Service>(root, names::LB4_SERVICES)?;
        let backends = read_hash::<u32, Lb4Backend>(root, names::LB4_BACKENDS)?;
        let rev_nat = read_hash::<u16, Lb4RevNat>(root, names::LB4_REVERSE_NAT)?;
        let npa = read_hash::<u32, u32>(root, names::LB4_NODEPORT_ADDRS)?;
        Ok(Self {
            services: services.into_iter().collect(),
            backends: backends.into_iter().collect(),
            rev_nat: rev_nat.into_iter().collect(),
            nodeport_addrs: npa.into_iter().map(|(k, _)| addr(k)).collect(),
            config: read_config(root).ok(),
            svc_stats: read_svc_stats(root).unwrap_or_default(),
        })
    }

    /// The master entry (slot 0) of a frontend.
    pub fn master(&self, address: Ipv4Addr, port: u16, proto: u8) -> Option<(Lb4Key, Lb4Service)> {
        let key = Lb4Key::new(u32::from_ne_bytes(address.octets()), port.to_be(), proto, 0);
        self.services.get(&key).map(|v| (key, *v))
    }

    /// Master entries, sorted by address, port and protocol.
    pub fn masters(&self) -> Vec<(Lb4Key, Lb4Service)> {
        let mut v: Vec<(Lb4Key, Lb4Service)> = self
            .services
            .iter()
            .filter(|(k, _)| k.backend_slot == 0)
            .map(|(k, v)| (*k, *v))
            .collect();
        v.sort_by_key(|(k, _)| (addr(k.address), port(k.dport), k.proto));
        v
    }

    /// The master key of the frontend with this reverse-NAT index.
    pub fn master_by_rev_nat(&self, index: u16) -> Option<Lb4Key> {
        self.services
            .iter()
            .find(|(k, v)| k.backend_slot == 0 && v.rev_nat_index == index)
            .map(|(k, _)| *k)
    }
}

/// One datapath event counter, summed over the CPUs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EventCount {
    /// `proxy_common::stats::STAT_NAMES`.
    pub reason: &'static str,
    pub count: u64,
}

/// The datapath's event counters (`KP_STATS_V1`), every known reason, summed over the CPUs.
pub fn read_events(root: &Path) -> anyhow::Result<Vec<EventCount>> {
    let map: PerCpuArray<MapData, u64> = PerCpuArray::try_from(open(root, names::STATS)?)
        .with_context(|| format!("{} has an unexpected type", names::STATS))?;
    STAT_NAMES
        .iter()
        .enumerate()
        .map(|(i, reason)| {
            let values = map
                .get(&(i as u32), 0)
                .with_context(|| format!("reading {}", names::STATS))?;
            Ok(EventCount {
                reason,
                count: values.iter().copied().fold(0u64, u64::wrapping_add),
            })
        })
        .collect()
}

/// Traffic counters of one frontend, summed over the CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FrontendStats {
    pub packets: u64,
    pub bytes: u64,
    pub connections: u64,
}

/// The per-frontend counters (`KP_SVC_STATS_V1`) by reverse-NAT index, summed over the CPUs.
/// Only frontends that have seen traffic have an entry.
pub fn read_svc_stats(root: &Path) -> anyhow::Result<BTreeMap<u16, FrontendStats>> {
    let map: PerCpuHashMap<MapData, u16, SvcStats> =
        PerCpuHashMap::try_from(open(root, names::SVC_STATS)?)
            .with_context(|| format!("{} has an unexpected type", names::SVC_STATS))?;
    let mut out = BTreeMap::new();
    for item in map.iter() {
        let (index, values) = match item {
            Ok(kv) => kv,
            Err(MapError::KeyNotFound) => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", names::SVC_STATS)),
        };
        let mut sum = FrontendStats::default();
        for v in values.iter() {
            sum.packets = sum.packets.wrapping_add(v.packets);
            sum.bytes = sum.bytes.wrapping_add(v.bytes);
            sum.connections = sum.connections.wrapping_add(v.connections);
        }
        out.insert(index, sum);
    }
    Ok(out)
}

pub fn read_config(root: &Path) -> anyhow::Result<Lb4Config> {
    let map: Array<MapData, Lb4Config> = Array::try_from(open(root, names::LB4_CONFIG)?)
        .with_context(|| format!("{} has an unexpected type", names::LB4_CONFIG))?;
    map.get(&0, 0)
        .with_context(|| format!("reading {}", names::LB4_CONFIG))
}

/// `address:port/PROTO` of a frontend key, with ` (nodePort)` for the nodePort wildcard.
pub fn frontend_label(key: &Lb4Key) -> String {
    let a = addr(key.address);
    let mut s = format!("{a}:{}/{}", port(key.dport), proto_name(key.proto));
    if a.is_unspecified() {
        s.push_str(" (nodePort)");
    }
    s
}

/// The loadBalancerSourceRanges entries pinned under `root`.
pub fn read_src_ranges(
    root: &Path,
) -> anyhow::Result<Vec<crate::dataplane::ebpf::writer::SrcRange>> {
    let map: LpmTrie<MapData, Lb4SrcRangeKey, u8> =
        LpmTrie::try_from(open(root, names::LB4_SRC_RANGE)?).with_context(|| {
            format!("{} has an unexpected type or layout", names::LB4_SRC_RANGE)
        })?;
    let mut out = Vec::new();
    for k in map.keys() {
        match k {
            Ok(k) => out.push(crate::dataplane::ebpf::maps::src_range_of(&k)),
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", names::LB4_SRC_RANGE)),
        }
    }
    Ok(out)
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns()`, which stamps conntrack entries.
pub fn monotonic_ns() -> u64 {
    // SAFETY: clock_gettime writes into `ts`, which we own.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return 0;
    }
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn be_fields_decode() {
        let a = Ipv4Addr::new(10, 96, 100, 208);
        assert_eq!(addr(u32::from_ne_bytes(a.octets())), a);
        assert_eq!(port(8080u16.to_be()), 8080);
        assert_eq!(proto_name(6), "TCP");
        assert_eq!(proto_name(47), "47");
        let k = Lb4Key::new(0, 30001u16.to_be(), 6, 0);
        assert_eq!(frontend_label(&k), "0.0.0.0:30001/TCP (nodePort)");
    }

    #[test]
    fn a_missing_pin_says_where_it_looked() {
        let dir = tempfile::tempdir().unwrap();
        let e = format!("{:#}", LbSnapshot::read(dir.path()).unwrap_err());
        assert!(e.contains("KP_LB4_SVC_V1 is not pinned"), "{e}");
        let fills = fill_levels(dir.path());
        assert_eq!(fills.len(), names::ALL.len());
        assert!(fills.iter().all(|f| f.error.is_some()));
    }
}
