//! Datapath counters: events by reason (what the programs did with a call or a packet) and
//! traffic per frontend (by reverse-NAT index). Both maps are per-CPU, so the programs add
//! without atomics and userspace sums the CPUs' values.
//!
//! Reasons are plain `u32` indexes into [`crate::maps::STATS`]; [`STAT_NAMES`] gives the label
//! userspace exports. New reasons take the next free index (the map has room up to
//! [`crate::maps::STATS_MAX`]), so adding one is not a layout change.

/// connect4 sent a socket to a backend.
pub const STAT_SOCK_CONNECT_XLATE: u32 = 0;
/// connect4 refused a service without endpoints (ECONNREFUSED).
pub const STAT_SOCK_CONNECT_NO_ENDPOINTS: u32 = 1;
/// sendmsg4 sent a datagram to a backend.
pub const STAT_SOCK_SENDMSG_XLATE: u32 = 2;
/// sendmsg4 refused a service without endpoints (ECONNREFUSED).
pub const STAT_SOCK_SENDMSG_NO_ENDPOINTS: u32 = 3;
/// connect4/sendmsg4 found no valid backend in the probed slots (mid-update); the call
/// proceeds untranslated.
pub const STAT_SOCK_NO_BACKEND: u32 = 4;
/// recvmsg4/getpeername4 showed the frontend instead of the backend.
pub const STAT_SOCK_REV_XLATE: u32 = 5;
/// A device program translated a packet to a backend (nodePort, externalIP).
pub const STAT_FWD_XLATE: u32 = 6;
/// A device program reverse-translated a reply (ingress or egress).
pub const STAT_REV_XLATE: u32 = 7;
/// Ingress: an IPv4 TCP/UDP packet to no frontend, passed.
pub const STAT_PASS_NOT_SERVICE: u32 = 8;
/// Ingress: a packet to a frontend served at socket level only (a cluster IP), passed.
pub const STAT_PASS_INTERNAL: u32 = 9;
/// Ingress: a packet to a frontend without endpoints, passed.
pub const STAT_PASS_NO_ENDPOINTS: u32 = 10;
/// Ingress: no valid backend in the probed slots (mid-update), passed untranslated.
pub const STAT_PASS_NO_BACKEND: u32 = 11;
/// Ingress: an IPv4 fragment, passed.
pub const STAT_PASS_FRAGMENT: u32 = 12;
/// Ingress: a truncated or malformed IPv4/TCP/UDP packet, passed untranslated.
pub const STAT_PASS_MALFORMED: u32 = 13;
/// Ingress: not IPv4, or neither TCP, UDP, SCTP nor an ICMP error about a translated flow,
/// passed.
pub const STAT_PASS_OTHER_PROTO: u32 = 14;
/// Ingress: every SNAT port tried was taken; the packet passed untranslated.
pub const STAT_SNAT_EXHAUSTED: u32 = 15;
/// A flow's backend (from CT4) was missing or stale and a new one was selected.
pub const STAT_BACKEND_RESELECTED: u32 = 16;
/// A translated packet was sent out directly after a FIB lookup (XDP_TX/redirect).
pub const STAT_FIB_FORWARD: u32 = 17;
/// FIB forwarding is on but the lookup did not resolve; the packet went to the stack.
pub const STAT_FIB_FALLBACK: u32 = 18;
/// A translation failed midway (a packet store or a reverse-NAT write failed).
pub const STAT_XLATE_ERROR: u32 = 19;
/// Ingress: the agent has not programmed a first sync; nothing is translated.
pub const STAT_PASS_NOT_READY: u32 = 20;
/// Ingress: a packet to a frontend with loadBalancerSourceRanges from a source outside them,
/// dropped.
pub const STAT_DROP_SOURCE_RANGE: u32 = 21;
/// connect4/sendmsg4 refused a frontend whose loadBalancerSourceRanges exclude this node.
pub const STAT_SOCK_SOURCE_RANGE_DENIED: u32 = 22;
/// A new flow or socket went to the backend its client's session affinity names.
pub const STAT_AFFINITY_HIT: u32 = 23;

/// An ICMP error (destination unreachable, fragmentation needed, time exceeded) or ICMPv6
/// error (destination unreachable, packet too big, time exceeded) quoting a translated packet
/// was rewritten to quote what its addressee sent (ingress or egress).
pub const STAT_ICMP_ERROR_XLATE: u32 = 24;
/// A new CT4 entry was written (a new flow, or one whose entry was evicted or expired).
pub const STAT_CT_CREATED: u32 = 25;
/// A CT4 write failed (memory pressure): the packet was still translated, the flow may
/// change backend on its next packet.
pub const STAT_CT_INSERT_FAILED: u32 = 26;
/// A TCP packet other than a SYN to a frontend found no CT4 entry: its flow's state was
/// evicted (map full) or expired, and a backend was selected again.
pub const STAT_CT_LOST_MIDFLOW: u32 = 27;

/// Ingress: an SCTP packet whose translation changes a port (nodePort != targetPort, or a
/// SNAT port) found no CRC32c factor for its length in `maps::SCTP_CRC_SHIFT` (the agent
/// writes every length at load, so only a map left unwritten): passed untranslated, since
/// SCTP's CRC32c covers the ports.
pub const STAT_PASS_SCTP_NO_CRC_FACTOR: u32 = 28;

/// Ingress: an IPv6 SCTP packet whose translation would change a port: passed untranslated
/// (the IPv6 device path translates SCTP by address only).
pub const STAT_PASS_SCTP6_PORT_REWRITE: u32 = 29;

/// tc ingress: a FIB-forwarded packet went to a pod device the agent marked
/// (`crate::devices::POD_DEV_PEER`) and was delivered straight into the pod's namespace with
/// `bpf_redirect_peer` (also counted as [`STAT_FIB_FORWARD`]).
pub const STAT_FWD_REDIRECT_PEER: u32 = 30;

/// Number of reasons defined (indexes `0..STAT_REASONS`).
pub const STAT_REASONS: usize = 31;

/// The `reason` label of each index, for userspace.
pub const STAT_NAMES: [&str; STAT_REASONS] = [
    "sock_connect_translated",
    "sock_connect_no_endpoints",
    "sock_sendmsg_translated",
    "sock_sendmsg_no_endpoints",
    "sock_no_valid_backend",
    "sock_reverse_translated",
    "translated_forward",
    "translated_reply",
    "pass_not_service",
    "pass_cluster_ip",
    "pass_no_endpoints",
    "pass_no_valid_backend",
    "pass_fragment",
    "pass_malformed",
    "pass_other_protocol",
    "snat_port_exhausted",
    "backend_reselected",
    "fib_forward",
    "fib_fallback_to_stack",
    "translation_error",
    "pass_not_ready",
    "drop_source_range",
    "sock_source_range_denied",
    "affinity_hit",
    "translated_icmp_error",
    "conntrack_created",
    "conntrack_insert_failed",
    "conntrack_lost_midflow",
    "pass_sctp_no_crc_factor",
    "pass_sctp6_port_rewrite",
    "fib_redirect_peer",
];

/// Traffic of one frontend (one reverse-NAT index), per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcStats {
    /// Packets the device programs translated, both directions.
    pub packets: u64,
    /// Their IPv4 total lengths (L3 bytes), both directions.
    pub bytes: u64,
    /// connect()/addressed sendmsg() calls translated at socket level, plus flows the device
    /// programs created (a first packet with no CT4 entry).
    pub connections: u64,
}

#[cfg(feature = "user")]
// SAFETY: plain `repr(C)` data without padding.
unsafe impl aya::Pod for SvcStats {}

const _: () = assert!(core::mem::size_of::<SvcStats>() == 24);
const _: () = assert!(STAT_REASONS as u32 <= crate::maps::STATS_MAX);
const _: () = assert!(STAT_FWD_REDIRECT_PEER as usize + 1 == STAT_REASONS);
