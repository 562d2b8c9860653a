//! Map declarations. Every name, key/value type and capacity comes from `proxy_common`; the
//! `#[map(name = ...)]` attribute needs a literal, so each literal is checked against the
//! shared constant at compile time. All maps are pinned by name: the agent chooses the
//! directory (`EbpfLoader::map_pin_path`) and reuses the pins across restarts.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap},
};
use proxy_common::{
    affinity::{Lb4AffinityKey, Lb4AffinityValue, Lb6AffinityKey, Lb6AffinityValue},
    config::Lb4Config,
    conntrack::{Ct4Entry, Ct4Key, Nat4RevEntry},
    conntrack6::{Ct6Entry, Ct6Key, Nat6RevEntry},
    lb::{Lb4Backend, Lb4Key, Lb4RevNat, Lb4Service},
    lb6::{Lb6Backend, Lb6Key, Lb6RevNat, Lb6Service},
    maglev::{MaglevConfig, MaglevKey, MaglevRow},
    maps as names,
    sock::{Sock4RevKey, Sock4RevValue},
    sock6::{Sock6RevKey, Sock6RevValue},
    src_range::{Lb4SrcRangeKey, Lb6SrcRangeKey},
    stats::SvcStats,
};

const fn name_is(literal: &str, shared: &str) -> bool {
    let (a, b) = (literal.as_bytes(), shared.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

const _: () = assert!(name_is("KP_LB4_SVC_V1", names::LB4_SERVICES));
const _: () = assert!(name_is("KP_LB4_BE_V1", names::LB4_BACKENDS));
const _: () = assert!(name_is("KP_LB4_RNAT_V1", names::LB4_REVERSE_NAT));
const _: () = assert!(name_is("KP_LB4_NPA_V1", names::LB4_NODEPORT_ADDRS));
const _: () = assert!(name_is("KP_CT4_V1", names::CT4));
const _: () = assert!(name_is("KP_NAT4_REV_V1", names::NAT4_REV));
const _: () = assert!(name_is("KP_SOCK4_REV_V1", names::SOCK4_REV));
const _: () = assert!(name_is("KP_LB4_CFG_V1", names::LB4_CONFIG));
const _: () = assert!(name_is("KP_STATS_V1", names::STATS));
const _: () = assert!(name_is("KP_SVC_STATS_V1", names::SVC_STATS));
const _: () = assert!(name_is("KP_MAGLEV_V1", names::MAGLEV));
const _: () = assert!(name_is("KP_MAGLEV_CFG_V1", names::MAGLEV_CONFIG));
const _: () = assert!(name_is("KP_LB6_SVC_V1", names::LB6_SERVICES));
const _: () = assert!(name_is("KP_LB6_BE_V1", names::LB6_BACKENDS));
const _: () = assert!(name_is("KP_LB6_RNAT_V1", names::LB6_REVERSE_NAT));
const _: () = assert!(name_is("KP_LB6_NPA_V1", names::LB6_NODEPORT_ADDRS));
const _: () = assert!(name_is("KP_SOCK6_REV_V1", names::SOCK6_REV));
const _: () = assert!(name_is("KP_AFF4_V1", names::LB4_AFFINITY));
const _: () = assert!(name_is("KP_SRCR4_V1", names::LB4_SRC_RANGE));
const _: () = assert!(name_is("KP_CT6_V1", names::CT6));
const _: () = assert!(name_is("KP_NAT6_REV_V1", names::NAT6_REV));
const _: () = assert!(name_is("KP_AFF6_V1", names::LB6_AFFINITY));
const _: () = assert!(name_is("KP_SRCR6_V1", names::LB6_SRC_RANGE));
const _: () = assert!(name_is("KP_SCTP_CRC_V1", names::SCTP_CRC_SHIFT));
const _: () = assert!(name_is("KP_PODDEV_V1", names::POD_DEVICES));

#[map(name = "KP_LB4_SVC_V1")]
pub static LB4_SERVICES: HashMap<Lb4Key, Lb4Service> = HashMap::pinned(names::LB4_SERVICES_MAX, 0);

#[map(name = "KP_LB4_BE_V1")]
pub static LB4_BACKENDS: HashMap<u32, Lb4Backend> = HashMap::pinned(names::LB4_BACKENDS_MAX, 0);

/// Not read by the datapath today (flows carry their frontend in CT/NAT entries); declared so
/// the agent finds and pins it with the others.
#[map(name = "KP_LB4_RNAT_V1")]
pub static LB4_REVERSE_NAT: HashMap<u16, Lb4RevNat> =
    HashMap::pinned(names::LB4_REVERSE_NAT_MAX, 0);

/// be address -> flags (unused).
#[map(name = "KP_LB4_NPA_V1")]
pub static LB4_NODEPORT_ADDRS: HashMap<u32, u32> =
    HashMap::pinned(names::LB4_NODEPORT_ADDRS_MAX, 0);

#[map(name = "KP_CT4_V1")]
pub static CT4: LruHashMap<Ct4Key, Ct4Entry> = LruHashMap::pinned(names::CT4_MAX, 0);

#[map(name = "KP_NAT4_REV_V1")]
pub static NAT4_REV: LruHashMap<Ct4Key, Nat4RevEntry> = LruHashMap::pinned(names::NAT4_REV_MAX, 0);

#[map(name = "KP_SOCK4_REV_V1")]
pub static SOCK4_REV: LruHashMap<Sock4RevKey, Sock4RevValue> =
    LruHashMap::pinned(names::SOCK4_REV_MAX, 0);

#[map(name = "KP_LB4_CFG_V1")]
pub static LB4_CONFIG: Array<Lb4Config> = Array::pinned(1, 0);

/// Events by reason (`proxy_common::stats::STAT_*`), per CPU.
#[map(name = "KP_STATS_V1")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(names::STATS_MAX, 0);

/// Traffic per reverse-NAT index, per CPU; entries are created on first use.
#[map(name = "KP_SVC_STATS_V1")]
pub static SVC_STATS: PerCpuHashMap<u16, SvcStats> =
    PerCpuHashMap::pinned(names::SVC_STATS_MAX, BPF_F_NO_PREALLOC);

/// Maglev tables of external frontends, by rows (`proxy_common::maglev`).
#[map(name = "KP_MAGLEV_V1")]
pub static LB4_MAGLEV: HashMap<MaglevKey, MaglevRow> =
    HashMap::pinned(names::MAGLEV_MAX, BPF_F_NO_PREALLOC);

/// The Maglev table size (0 = random selection).
#[map(name = "KP_MAGLEV_CFG_V1")]
pub static MAGLEV_CONFIG: Array<MaglevConfig> = Array::pinned(1, 0);
#[map(name = "KP_LB6_SVC_V1")]
pub static LB6_SERVICES: HashMap<Lb6Key, Lb6Service> = HashMap::pinned(names::LB6_SERVICES_MAX, 0);

#[map(name = "KP_LB6_BE_V1")]
pub static LB6_BACKENDS: HashMap<u32, Lb6Backend> = HashMap::pinned(names::LB6_BACKENDS_MAX, 0);

/// Not read by the datapath today, like its IPv4 twin.
#[map(name = "KP_LB6_RNAT_V1")]
pub static LB6_REVERSE_NAT: HashMap<u16, Lb6RevNat> =
    HashMap::pinned(names::LB6_REVERSE_NAT_MAX, 0);

/// be address words -> flags (unused).
#[map(name = "KP_LB6_NPA_V1")]
pub static LB6_NODEPORT_ADDRS: HashMap<[u32; 4], u32> =
    HashMap::pinned(names::LB6_NODEPORT_ADDRS_MAX, 0);

#[map(name = "KP_SOCK6_REV_V1")]
pub static SOCK6_REV: LruHashMap<Sock6RevKey, Sock6RevValue> =
    LruHashMap::pinned(names::SOCK6_REV_MAX, 0);
/// Session affinity: (client, frontend) -> backend and last use.
#[map(name = "KP_AFF4_V1")]
pub static LB4_AFFINITY: LruHashMap<Lb4AffinityKey, Lb4AffinityValue> =
    LruHashMap::pinned(names::LB4_AFFINITY_MAX, 0);

/// loadBalancerSourceRanges: (frontend, source prefix) -> 1. `BPF_F_NO_PREALLOC` is added by
/// the constructor (the kernel requires it for LPM tries).
#[map(name = "KP_SRCR4_V1")]
pub static LB4_SRC_RANGE: LpmTrie<Lb4SrcRangeKey, u8> =
    LpmTrie::pinned(names::LB4_SRC_RANGE_MAX, 0);

#[map(name = "KP_CT6_V1")]
pub static CT6: LruHashMap<Ct6Key, Ct6Entry> = LruHashMap::pinned(names::CT6_MAX, 0);

#[map(name = "KP_NAT6_REV_V1")]
pub static NAT6_REV: LruHashMap<Ct6Key, Nat6RevEntry> = LruHashMap::pinned(names::NAT6_REV_MAX, 0);

/// IPv6 session affinity: (client, frontend) -> backend and last use.
#[map(name = "KP_AFF6_V1")]
pub static LB6_AFFINITY: LruHashMap<Lb6AffinityKey, Lb6AffinityValue> =
    LruHashMap::pinned(names::LB6_AFFINITY_MAX, 0);

/// IPv6 loadBalancerSourceRanges: (frontend, source prefix) -> 1.
#[map(name = "KP_SRCR6_V1")]
pub static LB6_SRC_RANGE: LpmTrie<Lb6SrcRangeKey, u8> =
    LpmTrie::pinned(names::LB6_SRC_RANGE_MAX, 0);
/// SCTP length -> the CRC32c factor of a port rewrite (`proxy_common::crc32c`), written by
/// the agent at load; 0 = not written.
#[map(name = "KP_SCTP_CRC_V1")]
pub static SCTP_CRC_SHIFT: Array<u32> = Array::pinned(names::SCTP_CRC_SHIFT_MAX, 0);

/// ifindex -> `proxy_common::devices::POD_DEV_*` flags, written by the agent.
#[map(name = "KP_PODDEV_V1")]
pub static POD_DEVICES: HashMap<u32, u32> = HashMap::pinned(names::POD_DEVICES_MAX, 0);
