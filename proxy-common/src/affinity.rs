//! Session affinity (`sessionAffinity: ClientIP`): which backend a client got from a frontend,
//! and when it last got it. Layout after Cilium's `lb4_affinity_key`/`lb_affinity_val`.
//!
//! The client is its source address on the device path (XDP/tc), and the network namespace
//! cookie at socket level (connect4/sendmsg4 run before the source address is chosen), so a
//! pod's or the host's connections stick together as one client.

/// `client_id` is a source address (be, in the low 4 bytes; the rest 0).
pub const AFFINITY_CLIENT_ADDR: u8 = 0;
/// `client_id` is a network namespace cookie (`bpf_get_netns_cookie`).
pub const AFFINITY_CLIENT_NETNS: u8 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Lb4AffinityKey {
    /// AFFINITY_CLIENT_ADDR: the be IPv4 source address widened to u64 (`u64::from(addr_be)`);
    /// AFFINITY_CLIENT_NETNS: the netns cookie.
    pub client_id: u64,
    /// The frontend (service port) the affinity belongs to.
    pub rev_nat_index: u16,
    /// AFFINITY_CLIENT_*.
    pub client_kind: u8,
    pub _pad: [u8; 5],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lb4AffinityValue {
    /// bpf_ktime_get_ns() when the client last got this backend (a new flow).
    pub last_used_ns: u64,
    /// The backend id (`KP_LB4_BE_V1`); the entry is ignored once the id is gone or belongs
    /// to another service port.
    pub backend_id: u32,
    pub _pad: u32,
}

impl Lb4AffinityKey {
    pub const fn new(client_id: u64, rev_nat_index: u16, client_kind: u8) -> Self {
        Self {
            client_id,
            rev_nat_index,
            client_kind,
            _pad: [0; 5],
        }
    }
}

/// The IPv6 twin of [`Lb4AffinityKey`] (map `KP_AFF6_V1`, values [`Lb6AffinityValue`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Lb6AffinityKey {
    /// AFFINITY_CLIENT_ADDR: the client's IPv6 source address (be words);
    /// AFFINITY_CLIENT_NETNS: the netns cookie in the first two words (native order), the
    /// rest 0.
    pub client: [u32; 4],
    /// The IPv6 frontend (its IPv6 reverse-NAT index).
    pub rev_nat_index: u16,
    /// AFFINITY_CLIENT_*.
    pub client_kind: u8,
    pub _pad: u8,
}

impl Lb6AffinityKey {
    pub const fn new(client: [u32; 4], rev_nat_index: u16, client_kind: u8) -> Self {
        Self {
            client,
            rev_nat_index,
            client_kind,
            _pad: 0,
        }
    }

    /// The key of a socket in the network namespace `cookie`.
    pub const fn netns(cookie: u64, rev_nat_index: u16) -> Self {
        let client = [cookie as u32, (cookie >> 32) as u32, 0, 0];
        Self::new(client, rev_nat_index, AFFINITY_CLIENT_NETNS)
    }
}

/// Same layout as IPv4's; the backend id is an IPv6 one (`KP_LB6_BE_V1`).
pub type Lb6AffinityValue = Lb4AffinityValue;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `repr(C)` data with explicit padding.
    unsafe impl aya::Pod for super::Lb6AffinityKey {}
    unsafe impl aya::Pod for super::Lb4AffinityKey {}
    unsafe impl aya::Pod for super::Lb4AffinityValue {}
}

const _: () = assert!(core::mem::size_of::<Lb4AffinityKey>() == 16);
const _: () = assert!(core::mem::size_of::<Lb4AffinityValue>() == 16);
const _: () = assert!(core::mem::size_of::<Lb6AffinityKey>() == 20);
