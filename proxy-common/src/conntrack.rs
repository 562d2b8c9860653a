//! Connection tracking for flows the device programs translate (nodePort, external IPs).

/// A flow tuple as it appears in a packet. Forward entries are keyed by the client's packet
/// (client -> frontend); reverse entries by the reply as it reaches this node
/// (backend -> client, or backend -> node SNAT address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ct4Key {
    /// be
    pub saddr: u32,
    /// be
    pub daddr: u32,
    /// be
    pub sport: u16,
    /// be
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Forward state of a translated flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ct4Entry {
    /// The backend chosen for this flow; it is reselected if the id vanishes or now names
    /// another backend.
    pub backend_id: u32,
    /// be: the backend's address and port when the flow was created.
    pub backend_addr: u32,
    pub backend_port: u16,
    pub rev_nat_index: u16,
    /// be: the source the flow was SNATed to (0 when the backend is local: no SNAT).
    pub nat_saddr: u32,
    pub nat_sport: u16,
    pub flags: u16,
    /// bpf_ktime_get_ns() of the last packet.
    pub last_seen_ns: u64,
}

/// How to rewrite a reply so the client sees the frontend it talked to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nat4RevEntry {
    /// be: the new source (the frontend).
    pub saddr: u32,
    /// be: the new destination (the client; unchanged when there was no SNAT).
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    /// The frontend's reverse-NAT index, for the per-frontend counters. This was padding
    /// before: entries written by an older agent carry 0 (no index) and are not counted.
    pub rev_nat_index: u16,
    pub _pad: u16,
    pub last_seen_ns: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `repr(C)` data with explicit padding.
    unsafe impl aya::Pod for super::Ct4Key {}
    unsafe impl aya::Pod for super::Ct4Entry {}
    unsafe impl aya::Pod for super::Nat4RevEntry {}
}

const _: () = assert!(core::mem::size_of::<Ct4Key>() == 16);
const _: () = assert!(core::mem::size_of::<Ct4Entry>() == 32);
const _: () = assert!(core::mem::size_of::<Nat4RevEntry>() == 24);
