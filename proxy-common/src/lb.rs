//! Service frontends, backend slots, backends and reverse-NAT entries (IPv4).
//!
//! Layout follows Cilium's `lb4_key`/`lb4_service`: a frontend has a master entry at slot 0
//! whose `count` says how many backend slots (1..=count) follow. The writer fills backends,
//! then slots, then rev-NAT, then the master `count` last; it lowers `count` before removing
//! slots. The datapath treats `count == 0` as "no endpoints" and a missing backend as a cue to
//! reselect, so a half-written update never sends a packet to nowhere.

/// Frontend key. A nodePort is keyed with `address == 0` (any nodePort address of the node).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lb4Key {
    /// be
    pub address: u32,
    /// be
    pub dport: u16,
    /// 0 = master entry, 1..=count = backend slots.
    pub backend_slot: u16,
    /// IPPROTO_TCP / IPPROTO_UDP / IPPROTO_SCTP.
    pub proto: u8,
    /// Reserved for the external/internal scope of traffic policies; 0 today.
    pub scope: u8,
    pub _pad: [u8; 2],
}

impl Lb4Key {
    pub const fn new(address_be: u32, dport_be: u16, proto: u8, backend_slot: u16) -> Self {
        Self {
            address: address_be,
            dport: dport_be,
            backend_slot,
            proto,
            scope: 0,
            _pad: [0; 2],
        }
    }
}

/// The frontend is a nodePort (key address 0): served on every nodePort address.
pub const SVC_FLAG_NODEPORT: u16 = 1 << 0;
/// The frontend is reachable from outside the node (nodePort, externalIP, LoadBalancer
/// ingress): the device programs translate it. Cluster IPs are translated at socket level only.
pub const SVC_FLAG_EXTERNAL: u16 = 1 << 1;
/// The frontend is a cluster IP.
pub const SVC_FLAG_CLUSTER_IP: u16 = 1 << 2;
/// `sessionAffinity: ClientIP`: a client keeps the backend it got for the timeout the master
/// entry carries in its (otherwise unused) `backend_id`, in seconds (Cilium does the same).
pub const SVC_FLAG_AFFINITY: u16 = 1 << 3;
/// `loadBalancerSourceRanges`: packets entering the node are translated only from sources in
/// [`crate::maps::LB4_SRC_RANGE`] for this frontend's reverse-NAT index; others are dropped.
pub const SVC_FLAG_SOURCE_RANGES: u16 = 1 << 4;
/// With [`SVC_FLAG_SOURCE_RANGES`]: none of the node's addresses is in the ranges, so
/// connect()/sendmsg() from this node (pods and host, where the socket hooks see no source
/// address yet) are refused too (kube-proxy lets in-node traffic through exactly when the
/// node's IP is in a range).
pub const SVC_FLAG_SOURCE_RANGES_DENY_NODE: u16 = 1 << 5;

/// Master entry (slot 0) or backend slot (slot > 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lb4Service {
    /// Slot > 0: the backend's id. Slot 0: the affinity timeout in seconds with
    /// [`SVC_FLAG_AFFINITY`], else 0.
    pub backend_id: u32,
    /// Slot 0: the number of backend slots. Slot > 0: 0.
    pub count: u16,
    /// Index into the reverse-NAT map (identifies the service port).
    pub rev_nat_index: u16,
    /// SVC_FLAG_*.
    pub flags: u16,
    pub _pad: u16,
}

/// The backend runs on this node (its reply comes back through this node's stack).
pub const BACKEND_FLAG_LOCAL: u8 = 1 << 0;

/// A backend of one service port. Ids are allocated per (service port, address, port), so a
/// backend that leaves a service disappears from this map and flows pinned to it reselect.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lb4Backend {
    /// be
    pub address: u32,
    /// be
    pub port: u16,
    pub proto: u8,
    /// BACKEND_FLAG_*.
    pub flags: u8,
    /// The service port this backend belongs to.
    pub rev_nat_index: u16,
    pub _pad: u16,
}

/// The frontend that replies must appear to come from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lb4RevNat {
    /// be
    pub address: u32,
    /// be
    pub port: u16,
    pub _pad: u16,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `repr(C)` data with explicit padding; every bit pattern is valid.
    unsafe impl aya::Pod for super::Lb4Key {}
    unsafe impl aya::Pod for super::Lb4Service {}
    unsafe impl aya::Pod for super::Lb4Backend {}
    unsafe impl aya::Pod for super::Lb4RevNat {}
}

const _: () = assert!(core::mem::size_of::<Lb4Key>() == 12);
const _: () = assert!(core::mem::size_of::<Lb4Service>() == 12);
const _: () = assert!(core::mem::size_of::<Lb4Backend>() == 12);
const _: () = assert!(core::mem::size_of::<Lb4RevNat>() == 8);
