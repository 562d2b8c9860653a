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
    /// CT_FLAG_*: the TCP state the datapath saw (host order). Entries written before the
    /// flags existed hold 0 and count as established.
    pub flags: u16,
    /// bpf_ktime_get_ns() of the last packet.
    pub last_seen_ns: u64,
}

/// The flags below describe the TCP state of the flow (the field was always 0 before, so its
/// layout did not change and no map version bump was needed).
pub const CT_FLAG_TCP_STATE: u16 = 1 << 0;
/// A packet other than a bare SYN came from the client: the handshake completed.
pub const CT_FLAG_SEEN_NON_SYN: u16 = 1 << 1;
/// The client sent a FIN.
pub const CT_FLAG_FIN_FWD: u16 = 1 << 2;
/// The backend sent a FIN.
pub const CT_FLAG_FIN_REV: u16 = 1 << 3;
/// Either side sent an RST.
pub const CT_FLAG_RST: u16 = 1 << 4;

/// Timeouts (idle time since the flow's last packet, either direction) by state. Cilium's
/// values for TCP; UDP as the kernel's conntrack for a UDP stream (120 s).
pub const CT_TIMEOUT_TCP_SYN_SECS: u64 = 60;
/// Longer than Linux's default TCP keepalive interval (2 h), so an idle connection with
/// keepalives never loses its backend.
pub const CT_TIMEOUT_TCP_ESTABLISHED_SECS: u64 = 6 * 3600;
pub const CT_TIMEOUT_TCP_CLOSE_SECS: u64 = 10;
pub const CT_TIMEOUT_UDP_SECS: u64 = 120;

/// What a CT4 entry's flags say about a TCP flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpCtState {
    /// Only the client's SYN(s) seen.
    SynSent,
    Established,
    /// RST seen, or FIN from both sides.
    Closed,
}

/// The TCP state `flags` (CT_FLAG_*) describe; entries without CT_FLAG_TCP_STATE (written by
/// an agent that did not track state) are established.
pub fn tcp_ct_state(flags: u16) -> TcpCtState {
    if flags & CT_FLAG_TCP_STATE == 0 {
        return TcpCtState::Established;
    }
    let both_fin = CT_FLAG_FIN_FWD | CT_FLAG_FIN_REV;
    if flags & CT_FLAG_RST != 0 || flags & both_fin == both_fin {
        TcpCtState::Closed
    } else if flags & CT_FLAG_SEEN_NON_SYN == 0 {
        TcpCtState::SynSent
    } else {
        TcpCtState::Established
    }
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
