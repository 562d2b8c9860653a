//! Session affinity (`sessionAffinity: ClientIP`, see `proxy_common::affinity`): a new flow or
//! socket of a client goes to the backend the client got last time from the same frontend,
//! while that pick is younger than the frontend's timeout and the backend still belongs to
//! the frontend; otherwise it is balanced as usual and the pick recorded.
//!
//! Races: two CPUs may record a first pick for one client at once; the last write wins and
//! later flows follow it (the earlier flow keeps its backend through conntrack).

use aya_ebpf::bindings::BPF_ANY;
use proxy_common::{
    affinity::{AFFINITY_CLIENT_ADDR, AFFINITY_CLIENT_NETNS, Lb4AffinityKey, Lb4AffinityValue},
    lb::{Lb4Backend, Lb4Key, Lb4Service, SVC_FLAG_AFFINITY},
    stats::STAT_AFFINITY_HIT,
};

use crate::{
    lb::{lb4_lookup_backend, lb4_select_backend},
    maps::LB4_AFFINITY,
    stats::stat_inc,
};

const NS_PER_SEC: u64 = 1_000_000_000;

/// The frontend's affinity timeout in ns (the master entry's `backend_id` holds it in
/// seconds), or `None` when the frontend has no session affinity.
#[inline(always)]
pub fn lb4_affinity_timeout_ns(svc: &Lb4Service) -> Option<u64> {
    if svc.flags & SVC_FLAG_AFFINITY == 0 {
        return None;
    }
    Some(u64::from(svc.backend_id) * NS_PER_SEC)
}

/// The backend `key`'s client got within `timeout_ns`, if it still belongs to the frontend;
/// refreshes the entry's time (the timeout counts from the client's last new flow, like
/// kube-proxy's `recent` match).
#[inline(always)]
fn lb4_affinity_backend_id(
    key: &Lb4AffinityKey,
    timeout_ns: u64,
    now: u64,
) -> Option<(u32, Lb4Backend)> {
    let ptr = LB4_AFFINITY.get_ptr_mut(key)?;
    // SAFETY: `ptr` points into the map value, valid for the program's run; plain loads and
    // a plain store of the time (a concurrent writer can at worst make us use its new pick).
    let value = unsafe { *ptr };
    // Another CPU may have stamped it after `now` was read: saturate to "just used".
    if now.saturating_sub(value.last_used_ns) > timeout_ns {
        return None;
    }
    // A removed backend (its id deleted) or an id that now names another service's backend
    // is never used: the caller reselects.
    let backend = lb4_lookup_backend(value.backend_id, key.rev_nat_index)?;
    // SAFETY: see above.
    unsafe { (*ptr).last_used_ns = now };
    Some((value.backend_id, backend))
}

/// Records that `key`'s client got `backend_id` at `now`.
#[inline(always)]
fn lb4_affinity_update(key: &Lb4AffinityKey, backend_id: u32, now: u64) {
    let value = Lb4AffinityValue {
        last_used_ns: now,
        backend_id,
        _pad: 0,
    };
    // An LRU insert fails only under memory pressure; the client then just picks afresh.
    let _ = LB4_AFFINITY.insert(key, &value, u64::from(BPF_ANY));
}

/// Selects the backend of a new flow or socket of the client (`client_id`, `client_kind`):
/// the affinity pick when there is a live one, else [`lb4_select_backend`] (recorded when the
/// frontend has affinity).
#[inline(always)]
fn lb4_affinity_select(
    key: &Lb4Key,
    svc: &Lb4Service,
    client_id: u64,
    client_kind: u8,
    now: u64,
) -> Option<(u32, Lb4Backend)> {
    let Some(timeout_ns) = lb4_affinity_timeout_ns(svc) else {
        return lb4_select_backend(key, svc);
    };
    let aff_key = Lb4AffinityKey::new(client_id, svc.rev_nat_index, client_kind);
    if let Some(found) = lb4_affinity_backend_id(&aff_key, timeout_ns, now) {
        stat_inc(STAT_AFFINITY_HIT);
        return Some(found);
    }
    let (id, backend) = lb4_select_backend(key, svc)?;
    lb4_affinity_update(&aff_key, id, now);
    Some((id, backend))
}

/// [`lb4_affinity_select`] for a packet from `saddr` (be): the device path.
#[inline(always)]
pub fn lb4_affinity_select_by_addr(
    key: &Lb4Key,
    svc: &Lb4Service,
    saddr: u32,
    now: u64,
) -> Option<(u32, Lb4Backend)> {
    lb4_affinity_select(key, svc, u64::from(saddr), AFFINITY_CLIENT_ADDR, now)
}

/// [`lb4_affinity_select`] for a socket in the network namespace `netns_cookie`: the socket
/// hooks, which run before a source address is chosen (Cilium keys these by netns too).
#[inline(always)]
pub fn lb4_affinity_select_by_netns(
    key: &Lb4Key,
    svc: &Lb4Service,
    netns_cookie: u64,
    now: u64,
) -> Option<(u32, Lb4Backend)> {
    lb4_affinity_select(key, svc, netns_cookie, AFFINITY_CLIENT_NETNS, now)
}
