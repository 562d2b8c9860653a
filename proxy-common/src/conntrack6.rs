//! Connection tracking for IPv6 flows the device programs translate: the twins of
//! [`crate::conntrack`]'s types, with 128-bit addresses (four be words, as `lb6`). The TCP
//! state flags, timeouts and [`crate::conntrack::tcp_ct_state`] are shared with IPv4.

/// A flow tuple as it appears in a packet (forward: client -> frontend; reverse: the reply
/// as it reaches this node).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ct6Key {
    /// be words
    pub saddr: [u32; 4],
    /// be words
    pub daddr: [u32; 4],
    /// be
    pub sport: u16,
    /// be
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Forward state of a translated IPv6 flow (as [`crate::conntrack::Ct4Entry`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ct6Entry {
    /// be words: the backend's address when the flow was created.
    pub backend_addr: [u32; 4],
    /// be words: the source the flow was SNATed to (all zero when the backend is local).
    pub nat_saddr: [u32; 4],
    /// The backend id (`KP_LB6_BE_V1`).
    pub backend_id: u32,
    /// be
    pub backend_port: u16,
    pub rev_nat_index: u16,
    /// be
    pub nat_sport: u16,
    /// `crate::conntrack::CT_FLAG_*` (host order).
    pub flags: u16,
    pub _pad: u32,
    /// bpf_ktime_get_ns() of the last packet.
    pub last_seen_ns: u64,
}

/// How to rewrite an IPv6 reply so the client sees the frontend it talked to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nat6RevEntry {
    /// be words: the new source (the frontend).
    pub saddr: [u32; 4],
    /// be words: the new destination (the client).
    pub daddr: [u32; 4],
    /// be
    pub sport: u16,
    /// be
    pub dport: u16,
    /// The frontend's IPv6 reverse-NAT index.
    pub rev_nat_index: u16,
    pub _pad: u16,
    pub last_seen_ns: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `repr(C)` data with explicit padding.
    unsafe impl aya::Pod for super::Ct6Key {}
    unsafe impl aya::Pod for super::Ct6Entry {}
    unsafe impl aya::Pod for super::Nat6RevEntry {}
}

const _: () = assert!(core::mem::size_of::<Ct6Key>() == 40);
const _: () = assert!(core::mem::size_of::<Ct6Entry>() == 56);
const _: () = assert!(core::mem::size_of::<Nat6RevEntry>() == 48);
