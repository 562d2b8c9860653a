//! Map names and capacities. A name carries a `_Vn` suffix that is bumped whenever the
//! layout of its key or value changes, so a new agent never reads an old layout from a pin.
//! Kernel map names are at most 15 bytes.

/// Service frontends and their backend slots: [`crate::lb::Lb4Key`] -> [`crate::lb::Lb4Service`].
pub const LB4_SERVICES: &str = "KP_LB4_SVC_V1";
/// Backends by id: `u32` -> [`crate::lb::Lb4Backend`].
pub const LB4_BACKENDS: &str = "KP_LB4_BE_V1";
/// Reverse NAT by index: `u16` -> [`crate::lb::Lb4RevNat`].
pub const LB4_REVERSE_NAT: &str = "KP_LB4_RNAT_V1";
/// Addresses of this node that accept nodePorts: `u32` (be) -> `u32` (flags, unused: 1).
pub const LB4_NODEPORT_ADDRS: &str = "KP_LB4_NPA_V1";
/// Connection tracking for translated packet flows (LRU).
pub const CT4: &str = "KP_CT4_V1";
/// Reverse translation of reply packets (LRU).
pub const NAT4_REV: &str = "KP_NAT4_REV_V1";
/// Socket-level reverse translation for `recvmsg4`/`getpeername4` (LRU).
pub const SOCK4_REV: &str = "KP_SOCK4_REV_V1";
/// Node-wide settings, one entry: [`crate::config::Lb4Config`].
pub const LB4_CONFIG: &str = "KP_LB4_CFG_V1";
/// Datapath events by reason (per-CPU array): `u32` (`crate::stats::STAT_*`) -> `u64`.
pub const STATS: &str = "KP_STATS_V1";
/// Traffic per frontend (per-CPU hash, allocated on first use): `u16` reverse-NAT index ->
/// [`crate::stats::SvcStats`].
pub const SVC_STATS: &str = "KP_SVC_STATS_V1";
/// Maglev tables of external frontends, by rows (hash, not preallocated):
/// [`crate::maglev::MaglevKey`] -> [`crate::maglev::MaglevRow`].
pub const MAGLEV: &str = "KP_MAGLEV_V1";
/// The Maglev table size, one entry: [`crate::maglev::MaglevConfig`].
pub const MAGLEV_CONFIG: &str = "KP_MAGLEV_CFG_V1";
/// IPv6 service frontends and slots: [`crate::lb6::Lb6Key`] -> [`crate::lb6::Lb6Service`].
pub const LB6_SERVICES: &str = "KP_LB6_SVC_V1";
/// IPv6 backends by id: `u32` -> [`crate::lb6::Lb6Backend`].
pub const LB6_BACKENDS: &str = "KP_LB6_BE_V1";
/// IPv6 reverse NAT by index: `u16` -> [`crate::lb6::Lb6RevNat`].
pub const LB6_REVERSE_NAT: &str = "KP_LB6_RNAT_V1";
/// IPv6 addresses of this node that accept nodePorts: `[u32; 4]` (be words) -> `u32` (1).
pub const LB6_NODEPORT_ADDRS: &str = "KP_LB6_NPA_V1";
/// Socket-level reverse translation for `recvmsg6`/`getpeername6` (LRU).
pub const SOCK6_REV: &str = "KP_SOCK6_REV_V1";
/// Session affinity (LRU): [`crate::affinity::Lb4AffinityKey`] ->
/// [`crate::affinity::Lb4AffinityValue`].
pub const LB4_AFFINITY: &str = "KP_AFF4_V1";
/// loadBalancerSourceRanges (LPM trie): [`crate::src_range::Lb4SrcRangeKey`] -> `u8` (1).
pub const LB4_SRC_RANGE: &str = "KP_SRCR4_V1";
/// Connection tracking for translated IPv6 packet flows (LRU):
/// [`crate::conntrack6::Ct6Key`] -> [`crate::conntrack6::Ct6Entry`].
pub const CT6: &str = "KP_CT6_V1";
/// Reverse translation of IPv6 reply packets (LRU):
/// [`crate::conntrack6::Ct6Key`] -> [`crate::conntrack6::Nat6RevEntry`].
pub const NAT6_REV: &str = "KP_NAT6_REV_V1";
/// IPv6 session affinity (LRU): [`crate::affinity::Lb6AffinityKey`] ->
/// [`crate::affinity::Lb6AffinityValue`].
pub const LB6_AFFINITY: &str = "KP_AFF6_V1";
/// IPv6 loadBalancerSourceRanges (LPM trie): [`crate::src_range::Lb6SrcRangeKey`] -> `u8`.
pub const LB6_SRC_RANGE: &str = "KP_SRCR6_V1";
/// SCTP's CRC32c factor by SCTP length (array, written once at load): `u32` length -> `u32`
/// x^(8 * (length - 4)) modulo the CRC32c polynomial (see [`crate::crc32c`]); 0 = unwritten.
pub const SCTP_CRC_SHIFT: &str = "KP_SCTP_CRC_V1";
/// This node's pod devices that have a peer in another namespace (veth, netkit), written by
/// the agent from the node's links: `u32` ifindex -> `u32` `crate::devices::POD_DEV_*` flags.
/// A device without an entry is forwarded to as before (`bpf_redirect`).
pub const POD_DEVICES: &str = "KP_PODDEV_V1";

/// 10,000 Services x 10 endpoints need 110,000 entries (a master and a slot per backend).
pub const LB4_SERVICES_MAX: u32 = 131_072;
/// 10,000 Services x 10 endpoints need 100,000 backends.
pub const LB4_BACKENDS_MAX: u32 = 131_072;
pub const LB4_REVERSE_NAT_MAX: u32 = 65_536;
pub const LB4_NODEPORT_ADDRS_MAX: u32 = 256;
pub const CT4_MAX: u32 = 262_144;
pub const NAT4_REV_MAX: u32 = 262_144;
pub const SOCK4_REV_MAX: u32 = 262_144;
/// Room for reasons added later without a layout change.
pub const STATS_MAX: u32 = 64;
/// One entry per reverse-NAT index in use. Not preallocated: a per-CPU map this size would
/// cost `65536 * 24 bytes` per CPU; entries appear when a frontend first sees traffic.
pub const SVC_STATS_MAX: u32 = LB4_REVERSE_NAT_MAX;
/// Rows of all Maglev tables: 17 rows per frontend at the default size, so ~15k external
/// frontends. Not preallocated (a row is 4 KiB), so only rows in use cost memory.
pub const MAGLEV_MAX: u32 = 262_144;
pub const LB6_SERVICES_MAX: u32 = 65_536;
pub const LB6_BACKENDS_MAX: u32 = 65_536;
pub const LB6_REVERSE_NAT_MAX: u32 = 65_536;
pub const LB6_NODEPORT_ADDRS_MAX: u32 = 256;
pub const SOCK6_REV_MAX: u32 = 262_144;
pub const LB4_AFFINITY_MAX: u32 = 65_536;
pub const LB4_SRC_RANGE_MAX: u32 = 16_384;
pub const CT6_MAX: u32 = 131_072;
pub const NAT6_REV_MAX: u32 = 131_072;
pub const LB6_AFFINITY_MAX: u32 = 65_536;
pub const LB6_SRC_RANGE_MAX: u32 = 16_384;

/// One entry per possible SCTP length inside an IPv4 packet (at most 65,535 - 20 bytes), so
/// every packet the parser accepts has its factor, GSO-sized ones included: 256 KiB.
pub const SCTP_CRC_SHIFT_MAX: u32 = 65_536;

/// Pod devices of one node (kubelet's max-pods is 110 by default, at most a few hundred).
pub const POD_DEVICES_MAX: u32 = 4_096;

/// Every map the agent pins, in the order a clean-up may remove them.
pub const ALL: [&str; 25] = [
    LB4_SERVICES,
    LB4_BACKENDS,
    LB4_REVERSE_NAT,
    LB4_NODEPORT_ADDRS,
    CT4,
    NAT4_REV,
    SOCK4_REV,
    LB4_CONFIG,
    STATS,
    SVC_STATS,
    MAGLEV,
    MAGLEV_CONFIG,
    LB6_SERVICES,
    LB6_BACKENDS,
    LB6_REVERSE_NAT,
    LB6_NODEPORT_ADDRS,
    SOCK6_REV,
    LB4_AFFINITY,
    LB4_SRC_RANGE,
    CT6,
    NAT6_REV,
    LB6_AFFINITY,
    LB6_SRC_RANGE,
    SCTP_CRC_SHIFT,
    POD_DEVICES,
];

/// Maps that hold settings written at load: arrays that are always "full".
pub const SETTINGS: [&str; 3] = [LB4_CONFIG, MAGLEV_CONFIG, SCTP_CRC_SHIFT];

/// Maps that are counters, not state: their fill level is not a capacity concern.
pub const COUNTERS: [&str; 2] = [STATS, SVC_STATS];
