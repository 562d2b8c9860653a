//! Service lookup and backend selection (Cilium's slot layout, see `proxy_common::lb`).

use aya_ebpf::helpers::bpf_get_prandom_u32;
use proxy_common::{
    config::{CFG_FLAG_READY, Lb4Config},
    lb::{Lb4Backend, Lb4Key, Lb4Service},
    maglev::{MAGLEV_ROW_LEN, MaglevKey, lb4_flow_hash},
};

use crate::maps::{
    LB4_BACKENDS, LB4_CONFIG, LB4_MAGLEV, LB4_NODEPORT_ADDRS, LB4_SERVICES, MAGLEV_CONFIG,
};

/// How many slots `lb4_select_backend` probes, from a random one onwards, before giving up
/// (a slot or backend may be missing for a moment while the agent rewrites a service).
const LB4_SELECT_PROBES: u32 = 16;

/// The node-wide settings, or `None` until the agent marked them ready: until then nothing is
/// translated.
#[inline(always)]
pub fn lb4_config() -> Option<Lb4Config> {
    let cfg = *LB4_CONFIG.get(0)?;
    if cfg.flags & CFG_FLAG_READY == 0 {
        return None;
    }
    Some(cfg)
}

#[inline(always)]
fn lb4_lookup_master(key: &Lb4Key) -> Option<Lb4Service> {
    // SAFETY: the value is copied out at once.
    unsafe { LB4_SERVICES.get(key).copied() }
}

/// Finds the frontend `daddr:dport/proto` (all be): first the exact key; then, when `daddr`
/// is one of the node's nodePort addresses, the nodePort wildcard (address 0). Returns the
/// master key that matched (its address is the one the backend slots are keyed by).
#[inline(always)]
pub fn lb4_lookup_service(daddr: u32, dport: u16, proto: u8) -> Option<(Lb4Key, Lb4Service)> {
    let key = Lb4Key::new(daddr, dport, proto, 0);
    if let Some(svc) = lb4_lookup_master(&key) {
        return Some((key, svc));
    }
    // SAFETY: only presence is checked.
    unsafe { LB4_NODEPORT_ADDRS.get(daddr) }?;
    let key = Lb4Key::new(0, dport, proto, 0);
    lb4_lookup_master(&key).map(|svc| (key, svc))
}

/// The backend `id` if it exists and still belongs to the service port `rev_nat_index`.
#[inline(always)]
pub fn lb4_lookup_backend(id: u32, rev_nat_index: u16) -> Option<Lb4Backend> {
    // SAFETY: the value is copied out at once.
    let backend = unsafe { LB4_BACKENDS.get(id).copied() }?;
    if backend.rev_nat_index != rev_nat_index {
        return None;
    }
    Some(backend)
}

/// Picks a random backend slot of the frontend `key` (a master key from
/// [`lb4_lookup_service`]); if that slot or its backend is missing or stale, the next slots
/// (up to [`LB4_SELECT_PROBES`]). `None` when the service has no endpoints or no valid
/// backend was found: the caller then translates nothing.
#[inline(always)]
pub fn lb4_select_backend(key: &Lb4Key, svc: &Lb4Service) -> Option<(u32, Lb4Backend)> {
    if svc.count == 0 {
        return None;
    }
    let count = u32::from(svc.count);
    // SAFETY: plain helper call.
    let start = unsafe { bpf_get_prandom_u32() } % count;
    for i in 0..LB4_SELECT_PROBES {
        if i >= count {
            break;
        }
        let slot = ((start + i) % count) as u16 + 1;
        let slot_key = Lb4Key::new(key.address, key.dport, key.proto, slot);
        let Some(slot_svc) = lb4_lookup_master(&slot_key) else {
            continue;
        };
        if let Some(backend) = lb4_lookup_backend(slot_svc.backend_id, svc.rev_nat_index) {
            return Some((slot_svc.backend_id, backend));
        }
    }
    None
}

/// The backend the frontend's Maglev table gives this flow (addresses and ports be; `key` is
/// the master key from [`lb4_lookup_service`]). `None` when Maglev is off, the frontend has
/// no table (yet), or the entry names a backend that is gone or belongs elsewhere: the caller
/// then falls back to [`lb4_select_backend`].
#[inline(always)]
pub fn lb4_select_backend_maglev(
    key: &Lb4Key,
    svc: &Lb4Service,
    saddr: u32,
    sport: u16,
) -> Option<(u32, Lb4Backend)> {
    let m = MAGLEV_CONFIG.get(0)?.table_size;
    if m == 0 {
        return None;
    }
    let pos = lb4_flow_hash(saddr, key.address, sport, key.dport, key.proto) % m;
    let row_key = MaglevKey {
        rev_nat_index: svc.rev_nat_index,
        row: (pos / MAGLEV_ROW_LEN as u32) as u16,
    };
    // SAFETY: one u32 is copied out of the value at once.
    let row = unsafe { LB4_MAGLEV.get(&row_key) }?;
    // LLVM knows `pos % ROW_LEN < ROW_LEN` and drops the bounds check, but the verifier
    // cannot follow a modulo by a constant: launder the offset so the check stays.
    let offset = (pos % MAGLEV_ROW_LEN as u32) as usize;
    // SAFETY: reads back the local just written.
    let offset = unsafe { core::ptr::read_volatile(&offset) };
    let id = *row.backend_ids.get(offset)?;
    if id == 0 {
        return None;
    }
    lb4_lookup_backend(id, svc.rev_nat_index).map(|backend| (id, backend))
}
