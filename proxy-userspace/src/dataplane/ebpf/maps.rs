//! Access to the load-balancing maps: the pinned kernel maps, and an in-memory twin for
//! tests of the writer's order and idempotency.

use std::{
    net::Ipv4Addr,
    os::fd::{AsFd as _, OwnedFd},
    sync::Arc,
};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf, Pod,
    maps::{
        Array, HashMap, Map, MapData, PerCpuHashMap,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
};
use proxy_common::{
    affinity::{Lb4AffinityKey, Lb4AffinityValue},
    config::Lb4Config,
    lb::{Lb4Backend, Lb4Key, Lb4RevNat, Lb4Service},
    maglev::{MaglevConfig, MaglevKey, MaglevRow},
    maps as names,
    sock::{Sock4RevKey, Sock4RevValue},
    src_range::{Lb4SrcRangeKey, SRC_RANGE_INDEX_BITS},
    stats::SvcStats,
};

use super::writer::SrcRange;

/// The operations the map writer needs.
pub trait LbMaps {
    fn services(&self) -> anyhow::Result<Vec<(Lb4Key, Lb4Service)>>;
    fn backends(&self) -> anyhow::Result<Vec<(u32, Lb4Backend)>>;
    fn rev_nats(&self) -> anyhow::Result<Vec<(u16, Lb4RevNat)>>;
    fn nodeport_addresses(&self) -> anyhow::Result<Vec<u32>>;
    fn src_ranges(&self) -> anyhow::Result<Vec<SrcRange>>;

    fn put_service(&mut self, key: Lb4Key, value: Lb4Service) -> anyhow::Result<()>;
    fn del_service(&mut self, key: Lb4Key) -> anyhow::Result<()>;
    fn put_backend(&mut self, id: u32, value: Lb4Backend) -> anyhow::Result<()>;
    fn del_backend(&mut self, id: u32) -> anyhow::Result<()>;
    fn put_rev_nat(&mut self, index: u16, value: Lb4RevNat) -> anyhow::Result<()>;
    fn del_rev_nat(&mut self, index: u16) -> anyhow::Result<()>;
    fn put_nodeport_address(&mut self, address_be: u32) -> anyhow::Result<()>;
    fn del_nodeport_address(&mut self, address_be: u32) -> anyhow::Result<()>;

    fn maglev_rows(&self) -> anyhow::Result<Vec<(MaglevKey, MaglevRow)>>;
    fn put_maglev_row(&mut self, key: MaglevKey, row: &MaglevRow) -> anyhow::Result<()>;
    fn del_maglev_row(&mut self, key: MaglevKey) -> anyhow::Result<()>;

    // Many entries of one map at once; the order within one call does not matter (the
    // writer orders the calls). The kernel maps write them in batches.
    fn put_services(&mut self, entries: &[(Lb4Key, Lb4Service)]) -> anyhow::Result<()> {
        entries
            .iter()
            .try_for_each(|(k, v)| self.put_service(*k, *v))
    }
    fn put_backends(&mut self, entries: &[(u32, Lb4Backend)]) -> anyhow::Result<()> {
        entries
            .iter()
            .try_for_each(|(k, v)| self.put_backend(*k, *v))
    }
    fn put_rev_nats(&mut self, entries: &[(u16, Lb4RevNat)]) -> anyhow::Result<()> {
        entries
            .iter()
            .try_for_each(|(k, v)| self.put_rev_nat(*k, *v))
    }
    fn put_maglev_rows(&mut self, entries: &[(MaglevKey, Arc<MaglevRow>)]) -> anyhow::Result<()> {
        entries
            .iter()
            .try_for_each(|(k, v)| self.put_maglev_row(*k, v))
    }
    fn put_src_range(&mut self, range: SrcRange) -> anyhow::Result<()>;
    fn del_src_range(&mut self, range: SrcRange) -> anyhow::Result<()>;
}

/// The LPM key of a source range (see `proxy_common::src_range`).
pub fn src_range_key((index, address_be, prefix_len): SrcRange) -> LpmKey<Lb4SrcRangeKey> {
    LpmKey::new(
        SRC_RANGE_INDEX_BITS + u32::from(prefix_len),
        Lb4SrcRangeKey::new(index, address_be),
    )
}

/// The source range an LPM key describes.
pub fn src_range_of(key: &LpmKey<Lb4SrcRangeKey>) -> SrcRange {
    let data = key.data();
    let prefix = key
        .prefix_len()
        .saturating_sub(SRC_RANGE_INDEX_BITS)
        .min(32);
    (data.rev_nat_index, data.address, prefix as u8)
}

/// The pinned kernel maps.
pub struct PinnedMaps {
    services: HashMap<MapData, Lb4Key, Lb4Service>,
    backends: HashMap<MapData, u32, Lb4Backend>,
    rev_nat: HashMap<MapData, u16, Lb4RevNat>,
    nodeport_addrs: HashMap<MapData, u32, u32>,
    sock_rev: HashMap<MapData, Sock4RevKey, Sock4RevValue>,
    config: Array<MapData, Lb4Config>,
    /// The per-frontend counters: a frontend's entry goes with its reverse-NAT index, so a
    /// later frontend given the same index starts from zero.
    svc_stats: PerCpuHashMap<MapData, u16, SvcStats>,
    src_ranges: LpmTrie<MapData, Lb4SrcRangeKey, u8>,
    affinity: HashMap<MapData, Lb4AffinityKey, Lb4AffinityValue>,
    maglev: HashMap<MapData, MaglevKey, MaglevRow>,
    maglev_config: Array<MapData, MaglevConfig>,
    /// Descriptors for batched updates (aya 0.14 has no batch API).
    batch_fds: BatchFds,
    /// False once the kernel refused a batch (before 5.6): single updates from then on.
    batch_supported: bool,
}

struct BatchFds {
    services: OwnedFd,
    backends: OwnedFd,
    rev_nat: OwnedFd,
    maglev: OwnedFd,
}

/// A second descriptor of the map `name` (for raw batch calls), taken before aya wraps it.
fn dup_fd(ebpf: &Ebpf, name: &str) -> anyhow::Result<OwnedFd> {
    let map = ebpf
        .map(name)
        .ok_or_else(|| anyhow!("the eBPF object has no map {name}"))?;
    let Map::HashMap(data) = map else {
        anyhow::bail!("map {name} is not a hash map");
    };
    data.fd()
        .as_fd()
        .try_clone_to_owned()
        .with_context(|| format!("duplicating the descriptor of {name}"))
}

/// The `max_entries` the kernel map `name` was created with (an adopted pin keeps the size
/// of the agent that created it).
pub(super) fn max_entries(ebpf: &Ebpf, name: &str) -> anyhow::Result<usize> {
    let map = ebpf
        .map(name)
        .ok_or_else(|| anyhow!("the eBPF object has no map {name}"))?;
    let Map::HashMap(data) = map else {
        anyhow::bail!("map {name} is not a hash map");
    };
    Ok(data
        .info()
        .with_context(|| format!("reading the info of {name}"))?
        .max_entries() as usize)
}

/// Entries per BPF_MAP_UPDATE_BATCH call: bounds the staging buffers (rows are 4 KB).
const BATCH_MAX: usize = 1024;

/// Writes `entries` with BPF_MAP_UPDATE_BATCH. `Ok(false)` when the kernel does not support
/// batches for this map (nothing written: the caller writes one by one).
pub(super) fn update_batch<K: Pod, V: Pod>(
    fd: &OwnedFd,
    entries: &[(K, V)],
    name: &str,
) -> anyhow::Result<bool> {
    for chunk in entries.chunks(BATCH_MAX) {
        let keys: Vec<K> = chunk.iter().map(|(k, _)| *k).collect();
        let values: Vec<V> = chunk.iter().map(|(_, v)| *v).collect();
        // SAFETY: `keys` and `values` hold `chunk.len()` contiguous keys and values of the
        // map's key and value types (the same Pod types the kernel map was created with).
        let (done, result) = unsafe {
            super::bpf_sys::map_update_batch(
                fd.as_fd(),
                keys.as_ptr().cast(),
                values.as_ptr().cast(),
                chunk.len() as u32,
            )
        };
        if let Err(e) = result {
            let unsupported = matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP))
                || e.raw_os_error() == Some(524); // ENOTSUPP
            if unsupported && done == 0 && std::ptr::eq(chunk.as_ptr(), entries.as_ptr()) {
                return Ok(false);
            }
            return Err(anyhow::Error::new(e)).with_context(|| {
                format!("writing {name} (batch of {}, {done} written)", chunk.len())
            });
        }
    }
    Ok(true)
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &str,
) -> anyhow::Result<T> {
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("the eBPF object has no map {name}"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

impl PinnedMaps {
    /// The capacities of the kernel maps as created (see [`max_entries`]).
    pub fn capacity(ebpf: &Ebpf) -> anyhow::Result<super::writer::Capacity> {
        Ok(super::writer::Capacity {
            services: max_entries(ebpf, names::LB4_SERVICES)?,
            backends: max_entries(ebpf, names::LB4_BACKENDS)?,
            maglev_rows: max_entries(ebpf, names::MAGLEV)?,
        })
    }

    pub fn take(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        let batch_fds = BatchFds {
            services: dup_fd(ebpf, names::LB4_SERVICES)?,
            backends: dup_fd(ebpf, names::LB4_BACKENDS)?,
            rev_nat: dup_fd(ebpf, names::LB4_REVERSE_NAT)?,
            maglev: dup_fd(ebpf, names::MAGLEV)?,
        };
        Ok(Self {
            maglev: take(ebpf, names::MAGLEV)?,
            maglev_config: take(ebpf, names::MAGLEV_CONFIG)?,
            batch_fds,
            batch_supported: true,
            services: take(ebpf, names::LB4_SERVICES)?,
            backends: take(ebpf, names::LB4_BACKENDS)?,
            rev_nat: take(ebpf, names::LB4_REVERSE_NAT)?,
            nodeport_addrs: take(ebpf, names::LB4_NODEPORT_ADDRS)?,
            sock_rev: take(ebpf, names::SOCK4_REV)?,
            config: take(ebpf, names::LB4_CONFIG)?,
            svc_stats: take(ebpf, names::SVC_STATS)?,
            src_ranges: take(ebpf, names::LB4_SRC_RANGE)?,
            affinity: take(ebpf, names::LB4_AFFINITY)?,
        })
    }

    /// Deletes the session-affinity entries of the reverse-NAT indexes `released` (affinity
    /// turned off or the frontend gone). Returns how many went.
    pub fn clear_affinity(&mut self, released: &[u16]) -> anyhow::Result<usize> {
        let stale: Vec<Lb4AffinityKey> = self
            .affinity
            .keys()
            .filter_map(Result::ok)
            .filter(|k| released.contains(&k.rev_nat_index))
            .collect();
        for k in &stale {
            ignore_missing(self.affinity.remove(k), names::LB4_AFFINITY)?;
        }
        Ok(stale.len())
    }

    pub fn set_config(&mut self, config: Lb4Config) -> anyhow::Result<()> {
        self.config
            .set(0, config, 0)
            .with_context(|| format!("writing {}", names::LB4_CONFIG))
    }

    /// The Maglev table size the datapath uses (0 = random selection).
    pub fn set_maglev_config(&mut self, table_size: u32) -> anyhow::Result<()> {
        self.maglev_config
            .set(0, MaglevConfig { table_size }, 0)
            .with_context(|| format!("writing {}", names::MAGLEV_CONFIG))
    }

    /// `entries` in batches when the kernel supports it; `Ok(false)` if it does not.
    fn try_batch<K: Pod, V: Pod>(
        &mut self,
        fd: fn(&BatchFds) -> &OwnedFd,
        entries: &[(K, V)],
        name: &str,
    ) -> anyhow::Result<bool> {
        if !self.batch_supported || entries.len() < 2 {
            return Ok(false);
        }
        let done = update_batch(fd(&self.batch_fds), entries, name)?;
        if !done {
            tracing::info!("the kernel has no batched map updates: writing entries one by one");
            self.batch_supported = false;
        }
        Ok(done)
    }

    /// Whether the socket with this cookie was sent to `address:port` by the socket hooks.
    pub fn socket_was_translated(&self, cookie: u64, address: Ipv4Addr, port: u16) -> bool {
        let key = Sock4RevKey {
            cookie,
            address: u32::from_ne_bytes(address.octets()),
            port: port.to_be(),
            _pad: 0,
        };
        self.sock_rev.get(&key, 0).is_ok()
    }
}

fn collect<K: Copy, V: Copy>(
    iter: impl Iterator<Item = Result<(K, V), aya::maps::MapError>>,
    name: &str,
) -> anyhow::Result<Vec<(K, V)>> {
    iter.collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading {name}"))
}

impl LbMaps for PinnedMaps {
    fn services(&self) -> anyhow::Result<Vec<(Lb4Key, Lb4Service)>> {
        collect(self.services.iter(), names::LB4_SERVICES)
    }
    fn backends(&self) -> anyhow::Result<Vec<(u32, Lb4Backend)>> {
        collect(self.backends.iter(), names::LB4_BACKENDS)
    }
    fn rev_nats(&self) -> anyhow::Result<Vec<(u16, Lb4RevNat)>> {
        collect(self.rev_nat.iter(), names::LB4_REVERSE_NAT)
    }
    fn nodeport_addresses(&self) -> anyhow::Result<Vec<u32>> {
        Ok(
            collect(self.nodeport_addrs.iter(), names::LB4_NODEPORT_ADDRS)?
                .into_iter()
                .map(|(k, _)| k)
                .collect(),
        )
    }
    fn src_ranges(&self) -> anyhow::Result<Vec<SrcRange>> {
        let keys = self
            .src_ranges
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("reading {}", names::LB4_SRC_RANGE))?;
        Ok(keys.iter().map(src_range_of).collect())
    }
    fn put_src_range(&mut self, range: SrcRange) -> anyhow::Result<()> {
        self.src_ranges
            .insert(&src_range_key(range), 1, 0)
            .with_context(|| format!("writing {}", names::LB4_SRC_RANGE))
    }
    fn del_src_range(&mut self, range: SrcRange) -> anyhow::Result<()> {
        ignore_missing(
            self.src_ranges.remove(&src_range_key(range)),
            names::LB4_SRC_RANGE,
        )
    }
    fn put_service(&mut self, key: Lb4Key, value: Lb4Service) -> anyhow::Result<()> {
        self.services
            .insert(key, value, 0)
            .with_context(|| format!("writing {}", names::LB4_SERVICES))
    }
    fn del_service(&mut self, key: Lb4Key) -> anyhow::Result<()> {
        ignore_missing(self.services.remove(&key), names::LB4_SERVICES)
    }
    fn put_backend(&mut self, id: u32, value: Lb4Backend) -> anyhow::Result<()> {
        self.backends
            .insert(id, value, 0)
            .with_context(|| format!("writing {}", names::LB4_BACKENDS))
    }
    fn del_backend(&mut self, id: u32) -> anyhow::Result<()> {
        ignore_missing(self.backends.remove(&id), names::LB4_BACKENDS)
    }
    fn put_rev_nat(&mut self, index: u16, value: Lb4RevNat) -> anyhow::Result<()> {
        self.rev_nat
            .insert(index, value, 0)
            .with_context(|| format!("writing {}", names::LB4_REVERSE_NAT))
    }
    fn del_rev_nat(&mut self, index: u16) -> anyhow::Result<()> {
        ignore_missing(self.rev_nat.remove(&index), names::LB4_REVERSE_NAT)?;
        ignore_missing(self.svc_stats.remove(&index), names::SVC_STATS)
    }
    fn put_nodeport_address(&mut self, address_be: u32) -> anyhow::Result<()> {
        self.nodeport_addrs
            .insert(address_be, 1, 0)
            .with_context(|| format!("writing {}", names::LB4_NODEPORT_ADDRS))
    }
    fn del_nodeport_address(&mut self, address_be: u32) -> anyhow::Result<()> {
        ignore_missing(
            self.nodeport_addrs.remove(&address_be),
            names::LB4_NODEPORT_ADDRS,
        )
    }
    fn maglev_rows(&self) -> anyhow::Result<Vec<(MaglevKey, MaglevRow)>> {
        collect(self.maglev.iter(), names::MAGLEV)
    }
    fn put_maglev_row(&mut self, key: MaglevKey, row: &MaglevRow) -> anyhow::Result<()> {
        self.maglev
            .insert(key, row, 0)
            .with_context(|| format!("writing {}", names::MAGLEV))
    }
    fn del_maglev_row(&mut self, key: MaglevKey) -> anyhow::Result<()> {
        ignore_missing(self.maglev.remove(&key), names::MAGLEV)
    }
    fn put_services(&mut self, entries: &[(Lb4Key, Lb4Service)]) -> anyhow::Result<()> {
        if !self.try_batch(|f| &f.services, entries, names::LB4_SERVICES)? {
            entries
                .iter()
                .try_for_each(|(k, v)| self.put_service(*k, *v))?;
        }
        Ok(())
    }
    fn put_backends(&mut self, entries: &[(u32, Lb4Backend)]) -> anyhow::Result<()> {
        if !self.try_batch(|f| &f.backends, entries, names::LB4_BACKENDS)? {
            entries
                .iter()
                .try_for_each(|(k, v)| self.put_backend(*k, *v))?;
        }
        Ok(())
    }
    fn put_rev_nats(&mut self, entries: &[(u16, Lb4RevNat)]) -> anyhow::Result<()> {
        if !self.try_batch(|f| &f.rev_nat, entries, names::LB4_REVERSE_NAT)? {
            entries
                .iter()
                .try_for_each(|(k, v)| self.put_rev_nat(*k, *v))?;
        }
        Ok(())
    }
    fn put_maglev_rows(&mut self, entries: &[(MaglevKey, Arc<MaglevRow>)]) -> anyhow::Result<()> {
        let plain: Vec<(MaglevKey, MaglevRow)> = entries.iter().map(|(k, v)| (*k, **v)).collect();
        if !self.try_batch(|f| &f.maglev, &plain, names::MAGLEV)? {
            plain
                .iter()
                .try_for_each(|(k, v)| self.put_maglev_row(*k, v))?;
        }
        Ok(())
    }
}

/// Deleting what is already gone is success: the writer is idempotent.
fn ignore_missing(result: Result<(), aya::maps::MapError>, name: &str) -> anyhow::Result<()> {
    match result {
        Ok(()) => Ok(()),
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("deleting from {name}")),
    }
}

/// One write to the maps, as the in-memory twin records it.
#[cfg(test)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    PutService(Lb4Key, Lb4Service),
    DelService(Lb4Key),
    PutBackend(u32, Lb4Backend),
    DelBackend(u32),
    PutRevNat(u16, Lb4RevNat),
    DelRevNat(u16),
    PutNodeportAddress(u32),
    DelNodeportAddress(u32),
    PutMaglevRow(MaglevKey),
    DelMaglevRow(MaglevKey),
    PutSrcRange(SrcRange),
    DelSrcRange(SrcRange),
}

/// In-memory maps that record every operation, with an optional capacity for the services map.
#[cfg(test)]
#[derive(Default)]
pub struct MemoryMaps {
    pub services: std::collections::BTreeMap<Lb4Key, Lb4Service>,
    pub backends: std::collections::BTreeMap<u32, Lb4Backend>,
    pub rev_nat: std::collections::BTreeMap<u16, Lb4RevNat>,
    pub nodeport: std::collections::BTreeSet<u32>,
    pub maglev: std::collections::BTreeMap<MaglevKey, MaglevRow>,
    pub src_ranges: std::collections::BTreeSet<SrcRange>,
    pub ops: Vec<Op>,
    /// Fail the n-th write from now (for error-recovery tests).
    pub fail_at: Option<usize>,
}

#[cfg(test)]
impl MemoryMaps {
    fn step(&mut self, op: Op) -> anyhow::Result<()> {
        if let Some(n) = self.fail_at.as_mut() {
            if *n == 0 {
                self.fail_at = None;
                anyhow::bail!("injected failure at {op:?}");
            }
            *n -= 1;
        }
        self.ops.push(op);
        Ok(())
    }
}

#[cfg(test)]
impl LbMaps for MemoryMaps {
    fn services(&self) -> anyhow::Result<Vec<(Lb4Key, Lb4Service)>> {
        Ok(self.services.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn backends(&self) -> anyhow::Result<Vec<(u32, Lb4Backend)>> {
        Ok(self.backends.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn rev_nats(&self) -> anyhow::Result<Vec<(u16, Lb4RevNat)>> {
        Ok(self.rev_nat.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn nodeport_addresses(&self) -> anyhow::Result<Vec<u32>> {
        Ok(self.nodeport.iter().copied().collect())
    }
    fn src_ranges(&self) -> anyhow::Result<Vec<SrcRange>> {
        Ok(self.src_ranges.iter().copied().collect())
    }
    fn put_src_range(&mut self, range: SrcRange) -> anyhow::Result<()> {
        self.step(Op::PutSrcRange(range))?;
        self.src_ranges.insert(range);
        Ok(())
    }
    fn del_src_range(&mut self, range: SrcRange) -> anyhow::Result<()> {
        self.step(Op::DelSrcRange(range))?;
        self.src_ranges.remove(&range);
        Ok(())
    }
    fn put_service(&mut self, key: Lb4Key, value: Lb4Service) -> anyhow::Result<()> {
        self.step(Op::PutService(key, value))?;
        self.services.insert(key, value);
        Ok(())
    }
    fn del_service(&mut self, key: Lb4Key) -> anyhow::Result<()> {
        self.step(Op::DelService(key))?;
        self.services.remove(&key);
        Ok(())
    }
    fn put_backend(&mut self, id: u32, value: Lb4Backend) -> anyhow::Result<()> {
        self.step(Op::PutBackend(id, value))?;
        self.backends.insert(id, value);
        Ok(())
    }
    fn del_backend(&mut self, id: u32) -> anyhow::Result<()> {
        self.step(Op::DelBackend(id))?;
        self.backends.remove(&id);
        Ok(())
    }
    fn put_rev_nat(&mut self, index: u16, value: Lb4RevNat) -> anyhow::Result<()> {
        self.step(Op::PutRevNat(index, value))?;
        self.rev_nat.insert(index, value);
        Ok(())
    }
    fn del_rev_nat(&mut self, index: u16) -> anyhow::Result<()> {
        self.step(Op::DelRevNat(index))?;
        self.rev_nat.remove(&index);
        Ok(())
    }
    fn put_nodeport_address(&mut self, address_be: u32) -> anyhow::Result<()> {
        self.step(Op::PutNodeportAddress(address_be))?;
        self.nodeport.insert(address_be);
        Ok(())
    }
    fn del_nodeport_address(&mut self, address_be: u32) -> anyhow::Result<()> {
        self.step(Op::DelNodeportAddress(address_be))?;
        self.nodeport.remove(&address_be);
        Ok(())
    }
    fn maglev_rows(&self) -> anyhow::Result<Vec<(MaglevKey, MaglevRow)>> {
        Ok(self.maglev.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn put_maglev_row(&mut self, key: MaglevKey, row: &MaglevRow) -> anyhow::Result<()> {
        self.step(Op::PutMaglevRow(key))?;
        self.maglev.insert(key, *row);
        Ok(())
    }
    fn del_maglev_row(&mut self, key: MaglevKey) -> anyhow::Result<()> {
        self.step(Op::DelMaglevRow(key))?;
        self.maglev.remove(&key);
        Ok(())
    }
}
