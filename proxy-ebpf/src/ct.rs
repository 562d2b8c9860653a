//! Connection tracking (CT4) and reverse NAT (NAT4_REV) for flows the device programs
//! translate. Both maps are LRU: an entry lost to eviction is simply recreated (the forward
//! path re-claims its reverse entry on every packet).
//!
//! Races: two CPUs may create the same flow at once; the last CT write wins and both reverse
//! entries are claimed with BPF_NOEXIST, so a SNAT port is never given to two flows.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
};
use proxy_common::{
    config::{Lb4Config, SNAT_PORT_MAX, SNAT_PORT_MIN},
    conntrack::{Ct4Entry, Ct4Key, Nat4RevEntry},
};

use crate::maps::{CT4, NAT4_REV};

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

#[inline(always)]
pub fn ct4_now() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
pub fn ct4_lookup(key: &Ct4Key) -> Option<Ct4Entry> {
    // SAFETY: the value is copied out at once.
    unsafe { CT4.get(key).copied() }
}

#[inline(always)]
pub fn ct4_update(key: &Ct4Key, entry: &Ct4Entry) {
    // An LRU insert only fails on memory pressure; the flow is then re-created next packet.
    let _ = CT4.insert(key, entry, u64::from(BPF_ANY));
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
