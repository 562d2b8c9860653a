//! Connection tracking (CT4) and reverse NAT (NAT4_REV) for flows the device programs
//! translate. Both maps are LRU: an entry lost to eviction is simply recreated (the forward
//! path re-claims its reverse entry on every packet).
//!
//! Races: two CPUs may create the same flow at once; the last CT write wins and both reverse
//! entries are claimed with BPF_NOEXIST, so a SNAT port is never given to two flows.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns},
};
use proxy_common::{
    config::{Lb4Config, SNAT_PORT_MAX, SNAT_PORT_MIN},
    conntrack::{
        CT_FLAG_FIN_FWD, CT_FLAG_FIN_REV, CT_FLAG_RST, CT_FLAG_SEEN_NON_SYN, CT_FLAG_TCP_STATE,
        Ct4Entry, Ct4Key, Nat4RevEntry, TcpCtState, tcp_ct_state,
    },
};

use crate::{
    maps::{CT4, NAT4_REV},
    parse::{IPPROTO_TCP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// SNAT ports tried after the preferred one: a random port and the ports following it.
const SNAT4_PROBES: u32 = 4;

#[inline(always)]
pub fn ct4_key(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> Ct4Key {
    Ct4Key {
        saddr,
        daddr,
        sport,
        dport,
        proto,
        _pad: [0; 3],
    }
}

/// CLOCK_MONOTONIC at tick resolution: every timeout it is compared with is in seconds, and
/// the coarse clock costs a fraction of reading the TSC on every packet (measured: ~20 % of
/// an established flow's XDP cost on this VM).
#[inline(always)]
pub fn ct4_now() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_coarse_ns() }
}

#[inline(always)]
pub fn ct4_lookup(key: &Ct4Key) -> Option<Ct4Entry> {
    // SAFETY: the value is copied out at once.
    unsafe { CT4.get(key).copied() }
}

/// The flow's CT4 entry in place, to refresh an established flow without a map update.
#[inline(always)]
pub fn ct4_lookup_ptr(key: &Ct4Key) -> Option<*mut Ct4Entry> {
    CT4.get_ptr_mut(key)
}

/// Whether two entries send the flow the same way (backend and SNAT), so an established
/// entry only needs its flags and last use refreshed.
#[inline(always)]
pub fn ct4_same_path(a: &Ct4Entry, b: &Ct4Entry) -> bool {
    a.backend_id == b.backend_id
        && a.backend_addr == b.backend_addr
        && a.backend_port == b.backend_port
        && a.rev_nat_index == b.rev_nat_index
        && a.nat_saddr == b.nat_saddr
        && a.nat_sport == b.nat_sport
}

/// Refreshes an entry in place: a map update would allocate a new LRU element on every
/// packet of an established flow (Cilium refreshes in place too). The flags are stored only
/// when they change, so a steady flow writes one field.
#[inline(always)]
pub fn ct4_refresh(ptr: *mut Ct4Entry, flags: u16, now: u64) {
    // SAFETY: `ptr` points into the map value (see `nat4_rev_lookup`): plain field stores.
    unsafe {
        if (*ptr).flags != flags {
            (*ptr).flags = flags;
        }
        (*ptr).last_seen_ns = now;
    }
}

/// Writes the entry; `false` if the kernel refused (an LRU insert only fails under memory
/// pressure: the flow is then re-created on its next packet).
#[inline(always)]
pub fn ct4_update(key: &Ct4Key, entry: &Ct4Entry) -> bool {
    CT4.insert(key, entry, u64::from(BPF_ANY)).is_ok()
}

/// Whether `tcp_flags` is a connection opening: SYN without ACK.
#[inline(always)]
pub fn tcp_is_syn(tcp_flags: u8) -> bool {
    tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// The CT_FLAG_* of a flow after a client packet with `tcp_flags` (`proto` TCP), given the
/// entry's flags (`None`: a new entry). A new SYN on a closed entry starts over (the client
/// reused the port: Cilium's "reopened"); an entry without state (older agent) counts as
/// established. Other protocols carry no flags.
#[inline(always)]
pub fn ct4_flags_fwd(old: Option<u16>, proto: u8, tcp_flags: u8) -> u16 {
    if proto != IPPROTO_TCP {
        return 0;
    }
    let syn = tcp_is_syn(tcp_flags);
    let mut flags = match old {
        None => CT_FLAG_TCP_STATE,
        Some(f) if f & CT_FLAG_TCP_STATE == 0 => CT_FLAG_TCP_STATE | CT_FLAG_SEEN_NON_SYN,
        Some(f) if syn && tcp_ct_state(f) == TcpCtState::Closed => CT_FLAG_TCP_STATE,
        Some(f) => f,
    };
    if !syn {
        flags |= CT_FLAG_SEEN_NON_SYN;
    }
    if tcp_flags & TCP_FIN != 0 {
        flags |= CT_FLAG_FIN_FWD;
    }
    if tcp_flags & TCP_RST != 0 {
        flags |= CT_FLAG_RST;
    }
    flags
}

/// Records a reply's FIN or RST in the flow's CT4 entry (found from its reverse entry `rev`:
/// the client and frontend), so the sweep gives the closed flow its short timeout. Replies
/// without those flags change nothing (no extra lookup on the hot path). A forward packet
/// on another CPU may write the entry over at the same moment and lose the flag: the flow
/// then keeps the established timeout, which is safe.
#[inline(always)]
pub fn ct4_note_reply(rev: &Nat4RevEntry, proto: u8, tcp_flags: u8) {
    if proto != IPPROTO_TCP || tcp_flags & (TCP_FIN | TCP_RST) == 0 {
        return;
    }
    let key = ct4_key(rev.daddr, rev.saddr, rev.dport, rev.sport, proto);
    let Some(ptr) = CT4.get_ptr_mut(&key) else {
        return;
    };
    let mut add = 0;
    if tcp_flags & TCP_FIN != 0 {
        add |= CT_FLAG_FIN_REV;
    }
    if tcp_flags & TCP_RST != 0 {
        add |= CT_FLAG_RST;
    }
    // SAFETY: `ptr` points into the map value; a plain read-modify-write of one field.
    unsafe {
        if (*ptr).flags & CT_FLAG_TCP_STATE != 0 {
            (*ptr).flags |= add;
        }
    }
}

/// The reverse entry for `key`, without refreshing it (an ICMP error is not flow activity).
#[inline(always)]
pub fn nat4_rev_peek(key: &Ct4Key) -> Option<Nat4RevEntry> {
    // SAFETY: the value is copied out at once.
    unsafe { NAT4_REV.get(key).copied() }
}

/// The reverse entry for `key`, with its `last_seen_ns` refreshed.
#[inline(always)]
pub fn nat4_rev_lookup(key: &Ct4Key, now: u64) -> Option<Nat4RevEntry> {
    let ptr = NAT4_REV.get_ptr_mut(key)?;
    // SAFETY: `ptr` points into the map value; the copy and the timestamp store are plain
    // loads/stores (a concurrent writer can at worst make us use a just-replaced entry).
    unsafe {
        (*ptr).last_seen_ns = now;
        Some(*ptr)
    }
}

#[inline(always)]
fn nat4_rev_same_flow(a: &Nat4RevEntry, b: &Nat4RevEntry) -> bool {
    a.saddr == b.saddr && a.sport == b.sport && a.daddr == b.daddr && a.dport == b.dport
}

/// Makes `key -> value` the reverse entry of this flow: succeeds if the entry is absent (and
/// is then created) or already describes the same flow (frontend and client equal).
#[inline(always)]
pub fn nat4_rev_claim(key: &Ct4Key, value: &Nat4RevEntry) -> bool {
    if let Some(ptr) = NAT4_REV.get_ptr_mut(key) {
        // SAFETY: see `nat4_rev_lookup`.
        unsafe {
            if !nat4_rev_same_flow(&*ptr, value) {
                return false;
            }
            (*ptr).last_seen_ns = value.last_seen_ns;
        }
        return true;
    }
    NAT4_REV.insert(key, value, u64::from(BPF_NOEXIST)).is_ok()
}

/// Writes the reverse entry unconditionally (last flow wins).
#[inline(always)]
pub fn nat4_rev_force(key: &Ct4Key, value: &Nat4RevEntry) -> bool {
    NAT4_REV.insert(key, value, u64::from(BPF_ANY)).is_ok()
}

/// The SNAT port range of `cfg` (host order), falling back to the shared defaults when the
/// agent left it empty or inverted.
#[inline(always)]
fn snat4_range(cfg: &Lb4Config) -> (u16, u16) {
    if cfg.snat_port_min == 0 || cfg.snat_port_min > cfg.snat_port_max {
        (SNAT_PORT_MIN, SNAT_PORT_MAX)
    } else {
        (cfg.snat_port_min, cfg.snat_port_max)
    }
}

/// Whether `port` (be) is one of the SNAT ports of `cfg`.
#[inline(always)]
pub fn snat4_port_in_range(cfg: &Lb4Config, port: u16) -> bool {
    let (min, max) = snat4_range(cfg);
    let port = u16::from_be(port);
    port >= min && port <= max
}

/// Finds a SNAT source port (be) for a flow to `backend:bport` from `node_addr`, claiming its
/// reverse entry `value`. Tries `preferred` (be; e.g. the port the flow had, or the client's)
/// if it is in range, then a random port and the few after it (wrapping in the range). `None` if every attempt collided.
#[inline(always)]
pub fn snat4_alloc_port(
    cfg: &Lb4Config,
    rev_key_base: &Ct4Key,
    value: &Nat4RevEntry,
    preferred: u16,
) -> Option<u16> {
    let (min, max) = snat4_range(cfg);
    let mut key = *rev_key_base;
    let pref = u16::from_be(preferred);
    if pref >= min && pref <= max {
        key.dport = preferred;
        if nat4_rev_claim(&key, value) {
            return Some(preferred);
        }
    }
    let span = u32::from(max - min) + 1;
    // SAFETY: plain helper call.
    let start = unsafe { bpf_get_prandom_u32() } % span;
    for i in 0..SNAT4_PROBES {
        let port = (u32::from(min) + (start + i) % span) as u16;
        key.dport = port.to_be();
        if nat4_rev_claim(&key, value) {
            return Some(key.dport);
        }
    }
    None
}
