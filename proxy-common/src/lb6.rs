//! IPv6 service frontends, backend slots, backends and reverse-NAT entries: the twins of
//! [`crate::lb`], with the same slot layout, flags and write order. Addresses are four be
//! words (`[u32; 4]`, the layout of `bpf_sock_addr.user_ip6`), so the socket hooks copy them
//! without byte shuffling.

pub use crate::lb::Lb4Service as Lb6Service;

/// Frontend key. A nodePort is keyed with the address `::` (any IPv6 nodePort address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lb6Key {
    /// be words
    pub address: [u32; 4],
    /// be
    pub dport: u16,
    /// 0 = master entry, 1..=count = backend slots.
    pub backend_slot: u16,
    /// IPPROTO_TCP / IPPROTO_UDP / IPPROTO_SCTP.
    pub proto: u8,
    /// Reserved for traffic-policy scopes; 0 today.
    pub scope: u8,
    pub _pad: [u8; 2],
}

impl Lb6Key {
    pub const fn new(address_be: [u32; 4], dport_be: u16, proto: u8, backend_slot: u16) -> Self {
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

/// A backend of one IPv6 service port (ids allocated as for IPv4, in their own space).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lb6Backend {
    /// be words
    pub address: [u32; 4],
    /// be
    pub port: u16,
    pub proto: u8,
    /// `crate::lb::BACKEND_FLAG_*`.
    pub flags: u8,
    /// The service port this backend belongs to (an index of the IPv6 reverse-NAT map).
    pub rev_nat_index: u16,
    pub _pad: u16,
}

/// The frontend that replies must appear to come from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lb6RevNat {
    /// be words
    pub address: [u32; 4],
    /// be
    pub port: u16,
    pub _pad: u16,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `repr(C)` data with explicit padding; every bit pattern is valid.
    unsafe impl aya::Pod for super::Lb6Key {}
    unsafe impl aya::Pod for super::Lb6Backend {}
    unsafe impl aya::Pod for super::Lb6RevNat {}
}

const _: () = assert!(core::mem::size_of::<Lb6Key>() == 24);
const _: () = assert!(core::mem::size_of::<Lb6Backend>() == 24);
const _: () = assert!(core::mem::size_of::<Lb6RevNat>() == 20);
