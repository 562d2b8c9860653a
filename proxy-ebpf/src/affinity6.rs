//! IPv6 session affinity: the twin of `affinity.rs` over `KP_AFF6_V1`, keyed by the client's
//! IPv6 source address on the device path and by network namespace at socket level.

use aya_ebpf::bindings::BPF_ANY;
use proxy_common::{
    affinity::{AFFINITY_CLIENT_ADDR, Lb6AffinityKey, Lb6AffinityValue},
    lb6::{Lb6Backend, Lb6Key, Lb6Service},
    stats::STAT_AFFINITY_HIT,
};

use crate::{
    affinity::lb4_affinity_timeout_ns,
    lb6::{lb6_lookup_backend, lb6_select_backend},
    maps::LB6_AFFINITY,
    stats::stat_inc,
};

/// The backend `key`'s client got within `timeout_ns`, if it still belongs to the frontend;
/// refreshes the entry's time (as `lb4_affinity_backend_id`).
#[inline(always)]
fn lb6_affinity_backend_id(
    key: &Lb6AffinityKey,
    timeout_ns: u64,
    now: u64,
) -> Option<(u32, Lb6Backend)> {
    let ptr = LB6_AFFINITY.get_ptr_mut(key)?;
    // SAFETY: `ptr` points into the map value, valid for the program's run; plain loads and
    // a plain store of the time.
    let value = unsafe { *ptr };
    if now.saturating_sub(value.last_used_ns) > timeout_ns {
        return None;
    }
    let backend = lb6_lookup_backend(value.backend_id, key.rev_nat_index)?;
    // SAFETY: see above.
    unsafe { (*ptr).last_used_ns = now };
    Some((value.backend_id, backend))
}

/// The affinity pick of `aff_key`'s client when there is a live one, else a random backend
/// (recorded when the frontend has affinity).
#[inline(always)]
fn lb6_affinity_select(
    key: &Lb6Key,
    svc: &Lb6Service,
    aff_key: &Lb6AffinityKey,
    now: u64,
) -> Option<(u32, Lb6Backend)> {
    let Some(timeout_ns) = lb4_affinity_timeout_ns(svc) else {
        return lb6_select_backend(key, svc);
    };
    if let Some(found) = lb6_affinity_backend_id(aff_key, timeout_ns, now) {
        stat_inc(STAT_AFFINITY_HIT);
        return Some(found);
    }
    let (id, backend) = lb6_select_backend(key, svc)?;
    let value = Lb6AffinityValue {
        last_used_ns: now,
        backend_id: id,
        _pad: 0,
    };
    // An LRU insert fails only under memory pressure; the client then just picks afresh.
    let _ = LB6_AFFINITY.insert(aff_key, &value, u64::from(BPF_ANY));
    Some((id, backend))
}

/// [`lb6_affinity_select`] for a packet from `saddr` (be words): the device path.
#[inline(always)]
pub fn lb6_affinity_select_by_addr(
    key: &Lb6Key,
    svc: &Lb6Service,
    saddr: &[u32; 4],
    now: u64,
) -> Option<(u32, Lb6Backend)> {
    let aff_key = Lb6AffinityKey::new(*saddr, svc.rev_nat_index, AFFINITY_CLIENT_ADDR);
    lb6_affinity_select(key, svc, &aff_key, now)
}

/// [`lb6_affinity_select`] for a socket in the network namespace `netns_cookie`.
#[inline(always)]
pub fn lb6_affinity_select_by_netns(
    key: &Lb6Key,
    svc: &Lb6Service,
    netns_cookie: u64,
    now: u64,
) -> Option<(u32, Lb6Backend)> {
    let aff_key = Lb6AffinityKey::netns(netns_cookie, svc.rev_nat_index);
    lb6_affinity_select(key, svc, &aff_key, now)
}
