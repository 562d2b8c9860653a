//! Connection tracking (CT6) and reverse NAT (NAT6_REV) for IPv6 flows the device programs
//! translate: the twins of `ct.rs`, with the same LRU semantics, races and TCP state flags
//! (`ct4_flags_fwd`, `tcp_ct_state` are family-independent and shared).

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_get_prandom_u32,
};
use proxy_common::{
    config::Lb4Config,
    conntrack::{CT_FLAG_FIN_REV, CT_FLAG_RST, CT_FLAG_TCP_STATE},
    conntrack6::{Ct6Entry, Ct6Key, Nat6RevEntry},
};

use crate::{
    ct::snat4_range,
    maps::{CT6, NAT6_REV},
    parse::{IPPROTO_TCP, TCP_FIN, TCP_RST},
};

/// SNAT ports tried after the preferred one (as IPv4's).
const SNAT6_PROBES: u32 = 4;

#[inline(always)]
pub fn ct6_key(saddr: &[u32; 4], daddr: &[u32; 4], sport: u16, dport: u16, proto: u8) -> Ct6Key {
    Ct6Key {
        saddr: *saddr,
        daddr: *daddr,
        sport,
        dport,
        proto,
        _pad: [0; 3],
    }
}

#[inline(always)]
pub fn ct6_lookup(key: &Ct6Key) -> Option<Ct6Entry> {
    // SAFETY: the value is copied out at once.
    unsafe { CT6.get(key).copied() }
}

/// Writes the entry; `false` if the kernel refused (memory pressure).
#[inline(always)]
pub fn ct6_update(key: &Ct6Key, entry: &Ct6Entry) -> bool {
    CT6.insert(key, entry, u64::from(BPF_ANY)).is_ok()
}

/// Records a reply's FIN or RST in the flow's CT6 entry (as `ct4_note_reply`).
#[inline(always)]
pub fn ct6_note_reply(rev: &Nat6RevEntry, proto: u8, tcp_flags: u8) {
    if proto != IPPROTO_TCP || tcp_flags & (TCP_FIN | TCP_RST) == 0 {
        return;
    }
    let key = ct6_key(&rev.daddr, &rev.saddr, rev.dport, rev.sport, proto);
    let Some(ptr) = CT6.get_ptr_mut(&key) else {
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

/// The reverse entry for `key`, without refreshing it (an ICMPv6 error is no sign of life).
#[inline(always)]
pub fn nat6_rev_peek(key: &Ct6Key) -> Option<Nat6RevEntry> {
    // SAFETY: the value is copied out at once.
    unsafe { NAT6_REV.get(key).copied() }
}

/// The reverse entry for `key`, with its `last_seen_ns` refreshed.
#[inline(always)]
pub fn nat6_rev_lookup(key: &Ct6Key, now: u64) -> Option<Nat6RevEntry> {
    let ptr = NAT6_REV.get_ptr_mut(key)?;
    // SAFETY: see `nat4_rev_lookup`.
    unsafe {
        (*ptr).last_seen_ns = now;
        Some(*ptr)
    }
}

#[inline(always)]
fn nat6_rev_same_flow(a: &Nat6RevEntry, b: &Nat6RevEntry) -> bool {
    a.saddr == b.saddr && a.sport == b.sport && a.daddr == b.daddr && a.dport == b.dport
}

/// Makes `key -> value` the reverse entry of this flow (as `nat4_rev_claim`).
#[inline(always)]
pub fn nat6_rev_claim(key: &Ct6Key, value: &Nat6RevEntry) -> bool {
    if let Some(ptr) = NAT6_REV.get_ptr_mut(key) {
        // SAFETY: see `nat4_rev_lookup`.
        unsafe {
            if !nat6_rev_same_flow(&*ptr, value) {
                return false;
            }
            (*ptr).last_seen_ns = value.last_seen_ns;
        }
        return true;
    }
    NAT6_REV.insert(key, value, u64::from(BPF_NOEXIST)).is_ok()
}

/// Writes the reverse entry unconditionally (last flow wins).
#[inline(always)]
pub fn nat6_rev_force(key: &Ct6Key, value: &Nat6RevEntry) -> bool {
    NAT6_REV.insert(key, value, u64::from(BPF_ANY)).is_ok()
}

/// Finds a SNAT source port (be) for a flow, claiming its reverse entry `value` under
/// `rev_key_base` with that port (as `snat4_alloc_port`, over the same port range).
#[inline(always)]
pub fn snat6_alloc_port(
    cfg: &Lb4Config,
    rev_key_base: &Ct6Key,
    value: &Nat6RevEntry,
    preferred: u16,
) -> Option<u16> {
    let (min, max) = snat4_range(cfg);
    let mut key = *rev_key_base;
    let pref = u16::from_be(preferred);
    if pref >= min && pref <= max {
        key.dport = preferred;
        if nat6_rev_claim(&key, value) {
            return Some(preferred);
        }
    }
    let span = u32::from(max - min) + 1;
    // SAFETY: plain helper call.
    let start = unsafe { bpf_get_prandom_u32() } % span;
    for i in 0..SNAT6_PROBES {
        let port = (u32::from(min) + (start + i) % span) as u16;
        key.dport = port.to_be();
        if nat6_rev_claim(&key, value) {
            return Some(key.dport);
        }
    }
    None
}
