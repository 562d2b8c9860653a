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
/// Session affinity (LRU): [`crate::affinity::Lb4AffinityKey`] ->
/// [`crate::affinity::Lb4AffinityValue`].
pub const LB4_AFFINITY: &str = "KP_AFF4_V1";
/// loadBalancerSourceRanges (LPM trie): [`crate::src_range::Lb4SrcRangeKey`] -> `u8` (1).
pub const LB4_SRC_RANGE: &str = "KP_SRCR4_V1";

pub const LB4_SERVICES_MAX: u32 = 65_536;
pub const LB4_BACKENDS_MAX: u32 = 65_536;
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
pub const LB4_AFFINITY_MAX: u32 = 65_536;
pub const LB4_SRC_RANGE_MAX: u32 = 16_384;

/// Every map the agent pins, in the order a clean-up may remove them.
pub const ALL: [&str; 12] = [
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
    LB4_AFFINITY,
    LB4_SRC_RANGE,
];

/// Maps that are counters, not state: their fill level is not a capacity concern.
pub const COUNTERS: [&str; 2] = [STATS, SVC_STATS];
