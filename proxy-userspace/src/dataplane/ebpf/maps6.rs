//! Access to the IPv6 load-balancing maps (the twins of `maps.rs`): the pinned kernel maps,
//! and an in-memory twin for tests of the IPv6 writer.

use std::net::Ipv6Addr;

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    maps::{HashMap, MapData},
};
use proxy_common::{
    lb6::{Lb6Backend, Lb6Key, Lb6RevNat, Lb6Service},
    maps as names,
    sock6::{Sock6RevKey, Sock6RevValue},
};

/// An IPv6 address as the maps hold it: four words whose bytes are in network order.
pub fn be_words(ip: Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

/// The inverse of [`be_words`].
pub fn addr_from_words(words: [u32; 4]) -> Ipv6Addr {
    let mut o = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    Ipv6Addr::from(o)
}

/// The operations the IPv6 map writer needs.
pub trait Lb6Maps {
    fn services(&self) -> anyhow::Result<Vec<(Lb6Key, Lb6Service)>>;
    fn backends(&self) -> anyhow::Result<Vec<(u32, Lb6Backend)>>;
    fn rev_nats(&self) -> anyhow::Result<Vec<(u16, Lb6RevNat)>>;
    fn nodeport_addresses(&self) -> anyhow::Result<Vec<[u32; 4]>>;

    fn put_service(&mut self, key: Lb6Key, value: Lb6Service) -> anyhow::Result<()>;
    fn del_service(&mut self, key: Lb6Key) -> anyhow::Result<()>;
    fn put_backend(&mut self, id: u32, value: Lb6Backend) -> anyhow::Result<()>;
    fn del_backend(&mut self, id: u32) -> anyhow::Result<()>;
    fn put_rev_nat(&mut self, index: u16, value: Lb6RevNat) -> anyhow::Result<()>;
    fn del_rev_nat(&mut self, index: u16) -> anyhow::Result<()>;
    fn put_nodeport_address(&mut self, address: [u32; 4]) -> anyhow::Result<()>;
    fn del_nodeport_address(&mut self, address: [u32; 4]) -> anyhow::Result<()>;
}

/// The pinned IPv6 kernel maps.
pub struct PinnedMaps6 {
    services: HashMap<MapData, Lb6Key, Lb6Service>,
    backends: HashMap<MapData, u32, Lb6Backend>,
    rev_nat: HashMap<MapData, u16, Lb6RevNat>,
    nodeport_addrs: HashMap<MapData, [u32; 4], u32>,
    sock_rev: HashMap<MapData, Sock6RevKey, Sock6RevValue>,
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

impl PinnedMaps6 {
    /// The capacities of the service and backend maps as created.
    pub fn capacity(ebpf: &Ebpf) -> anyhow::Result<(usize, usize)> {
        Ok((
            super::maps::max_entries(ebpf, names::LB6_SERVICES)?,
            super::maps::max_entries(ebpf, names::LB6_BACKENDS)?,
        ))
    }

    pub fn take(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        Ok(Self {
            services: take(ebpf, names::LB6_SERVICES)?,
            backends: take(ebpf, names::LB6_BACKENDS)?,
            rev_nat: take(ebpf, names::LB6_REVERSE_NAT)?,
            nodeport_addrs: take(ebpf, names::LB6_NODEPORT_ADDRS)?,
            sock_rev: take(ebpf, names::SOCK6_REV)?,
        })
    }

    /// Whether the socket with this cookie was sent to `[address]:port` by the socket hooks.
    pub fn socket_was_translated(&self, cookie: u64, address: Ipv6Addr, port: u16) -> bool {
        let key = Sock6RevKey {
            cookie,
            address: be_words(address),
            port: port.to_be(),
            _pad: [0; 3],
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

/// Deleting what is already gone is success: the writer is idempotent.
fn ignore_missing(result: Result<(), aya::maps::MapError>, name: &str) -> anyhow::Result<()> {
    match result {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("deleting from {name}")),
    }
}

impl Lb6Maps for PinnedMaps6 {
    fn services(&self) -> anyhow::Result<Vec<(Lb6Key, Lb6Service)>> {
        collect(self.services.iter(), names::LB6_SERVICES)
    }
    fn backends(&self) -> anyhow::Result<Vec<(u32, Lb6Backend)>> {
        collect(self.backends.iter(), names::LB6_BACKENDS)
    }
    fn rev_nats(&self) -> anyhow::Result<Vec<(u16, Lb6RevNat)>> {
        collect(self.rev_nat.iter(), names::LB6_REVERSE_NAT)
    }
    fn nodeport_addresses(&self) -> anyhow::Result<Vec<[u32; 4]>> {
        Ok(
            collect(self.nodeport_addrs.iter(), names::LB6_NODEPORT_ADDRS)?
                .into_iter()
                .map(|(k, _)| k)
                .collect(),
        )
    }
    fn put_service(&mut self, key: Lb6Key, value: Lb6Service) -> anyhow::Result<()> {
        self.services
            .insert(key, value, 0)
            .with_context(|| format!("writing {}", names::LB6_SERVICES))
    }
    fn del_service(&mut self, key: Lb6Key) -> anyhow::Result<()> {
        ignore_missing(self.services.remove(&key), names::LB6_SERVICES)
    }
    fn put_backend(&mut self, id: u32, value: Lb6Backend) -> anyhow::Result<()> {
        self.backends
            .insert(id, value, 0)
            .with_context(|| format!("writing {}", names::LB6_BACKENDS))
    }
    fn del_backend(&mut self, id: u32) -> anyhow::Result<()> {
        ignore_missing(self.backends.remove(&id), names::LB6_BACKENDS)
    }
    fn put_rev_nat(&mut self, index: u16, value: Lb6RevNat) -> anyhow::Result<()> {
        self.rev_nat
            .insert(index, value, 0)
            .with_context(|| format!("writing {}", names::LB6_REVERSE_NAT))
    }
    fn del_rev_nat(&mut self, index: u16) -> anyhow::Result<()> {
        ignore_missing(self.rev_nat.remove(&index), names::LB6_REVERSE_NAT)
    }
    fn put_nodeport_address(&mut self, address: [u32; 4]) -> anyhow::Result<()> {
        self.nodeport_addrs
            .insert(address, 1, 0)
            .with_context(|| format!("writing {}", names::LB6_NODEPORT_ADDRS))
    }
    fn del_nodeport_address(&mut self, address: [u32; 4]) -> anyhow::Result<()> {
        ignore_missing(
            self.nodeport_addrs.remove(&address),
            names::LB6_NODEPORT_ADDRS,
        )
    }
}

/// One write to the IPv6 maps, as the in-memory twin records it.
#[cfg(test)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op6 {
    PutService(Lb6Key, Lb6Service),
    DelService(Lb6Key),
    PutBackend(u32, Lb6Backend),
    DelBackend(u32),
    PutRevNat(u16, Lb6RevNat),
    DelRevNat(u16),
    PutNodeportAddress([u32; 4]),
    DelNodeportAddress([u32; 4]),
}

/// In-memory IPv6 maps that record every operation.
#[cfg(test)]
#[derive(Default)]
pub struct MemoryMaps6 {
    pub services: std::collections::BTreeMap<Lb6Key, Lb6Service>,
    pub backends: std::collections::BTreeMap<u32, Lb6Backend>,
    pub rev_nat: std::collections::BTreeMap<u16, Lb6RevNat>,
    pub nodeport: std::collections::BTreeSet<[u32; 4]>,
    pub ops: Vec<Op6>,
}

#[cfg(test)]
impl Lb6Maps for MemoryMaps6 {
    fn services(&self) -> anyhow::Result<Vec<(Lb6Key, Lb6Service)>> {
        Ok(self.services.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn backends(&self) -> anyhow::Result<Vec<(u32, Lb6Backend)>> {
        Ok(self.backends.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn rev_nats(&self) -> anyhow::Result<Vec<(u16, Lb6RevNat)>> {
        Ok(self.rev_nat.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn nodeport_addresses(&self) -> anyhow::Result<Vec<[u32; 4]>> {
        Ok(self.nodeport.iter().copied().collect())
    }
    fn put_service(&mut self, key: Lb6Key, value: Lb6Service) -> anyhow::Result<()> {
        self.ops.push(Op6::PutService(key, value));
        self.services.insert(key, value);
        Ok(())
    }
    fn del_service(&mut self, key: Lb6Key) -> anyhow::Result<()> {
        self.ops.push(Op6::DelService(key));
        self.services.remove(&key);
        Ok(())
    }
    fn put_backend(&mut self, id: u32, value: Lb6Backend) -> anyhow::Result<()> {
        self.ops.push(Op6::PutBackend(id, value));
        self.backends.insert(id, value);
        Ok(())
    }
    fn del_backend(&mut self, id: u32) -> anyhow::Result<()> {
        self.ops.push(Op6::DelBackend(id));
        self.backends.remove(&id);
        Ok(())
    }
    fn put_rev_nat(&mut self, index: u16, value: Lb6RevNat) -> anyhow::Result<()> {
        self.ops.push(Op6::PutRevNat(index, value));
        self.rev_nat.insert(index, value);
        Ok(())
    }
    fn del_rev_nat(&mut self, index: u16) -> anyhow::Result<()> {
        self.ops.push(Op6::DelRevNat(index));
        self.rev_nat.remove(&index);
        Ok(())
    }
    fn put_nodeport_address(&mut self, address: [u32; 4]) -> anyhow::Result<()> {
        self.ops.push(Op6::PutNodeportAddress(address));
        self.nodeport.insert(address);
        Ok(())
    }
    fn del_nodeport_address(&mut self, address: [u32; 4]) -> anyhow::Result<()> {
        self.ops.push(Op6::DelNodeportAddress(address));
        self.nodeport.remove(&address);
        Ok(())
    }
}
