//! IPv6 service lookup and backend selection: the twins of `lb4_*` in `lb.rs`, over the
//! `LB6_*` maps (same slot layout, see `proxy_common::lb6`).

use aya_ebpf::helpers::bpf_get_prandom_u32;
use proxy_common::lb6::{Lb6Backend, Lb6Key, Lb6Service};

use crate::maps::{LB6_BACKENDS, LB6_NODEPORT_ADDRS, LB6_SERVICES};

/// How many slots `lb6_select_backend` probes before giving up (as `LB4_SELECT_PROBES`).
const LB6_SELECT_PROBES: u32 = 16;

#[inline(always)]
fn lb6_lookup_master(key: &Lb6Key) -> Option<Lb6Service> {
    // SAFETY: the value is copied out at once.
    unsafe { LB6_SERVICES.get(key).copied() }
}

/// Finds the frontend `daddr:dport/proto` (all be): the exact key, then the nodePort
/// wildcard (`::`) when `daddr` is one of the node's IPv6 nodePort addresses.
#[inline(always)]
pub fn lb6_lookup_service(daddr: [u32; 4], dport: u16, proto: u8) -> Option<(Lb6Key, Lb6Service)> {
    let key = Lb6Key::new(daddr, dport, proto, 0);
    if let Some(svc) = lb6_lookup_master(&key) {
        return Some((key, svc));
    }
    // SAFETY: only presence is checked.
    unsafe { LB6_NODEPORT_ADDRS.get(&daddr) }?;
    let key = Lb6Key::new([0; 4], dport, proto, 0);
    lb6_lookup_master(&key).map(|svc| (key, svc))
}

/// The backend `id` if it exists and still belongs to the service port `rev_nat_index`.
#[inline(always)]
pub fn lb6_lookup_backend(id: u32, rev_nat_index: u16) -> Option<Lb6Backend> {
    // SAFETY: the value is copied out at once.
    let backend = unsafe { LB6_BACKENDS.get(&id).copied() }?;
    if backend.rev_nat_index != rev_nat_index {
        return None;
    }
    Some(backend)
}

/// Picks a random backend slot of the frontend `key`, probing the next slots when one is
/// missing or stale (the agent may be rewriting the service). `None`: nothing to translate to.
#[inline(always)]
pub fn lb6_select_backend(key: &Lb6Key, svc: &Lb6Service) -> Option<(u32, Lb6Backend)> {
    if svc.count == 0 {
        return None;
    }
    let count = u32::from(svc.count);
    // SAFETY: plain helper call.
    let start = unsafe { bpf_get_prandom_u32() } % count;
    for i in 0..LB6_SELECT_PROBES {
        if i >= count {
            break;
        }
        let slot = ((start + i) % count) as u16 + 1;
        let slot_key = Lb6Key::new(key.address, key.dport, key.proto, slot);
        let Some(slot_svc) = lb6_lookup_master(&slot_key) else {
            continue;
        };
        if let Some(backend) = lb6_lookup_backend(slot_svc.backend_id, svc.rev_nat_index) {
            return Some((slot_svc.backend_id, backend));
        }
    }
    None
}
