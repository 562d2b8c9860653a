//! Datapath counters (see `proxy_common::stats`). Both maps are per-CPU: plain adds, no
//! atomics. A failed lookup or insert loses a count, never a packet; so may a program
//! interrupted on the same CPU by another one (a socket hook by a softirq's XDP), which
//! per-CPU counters accept for not paying for atomics.

use aya_ebpf::bindings::BPF_NOEXIST;
use proxy_common::stats::SvcStats;

use crate::maps::{STATS, SVC_STATS};

/// Counts one event of `reason` (`STAT_*`).
#[inline(always)]
pub fn stat_inc(reason: u32) {
    if let Some(p) = STATS.get_ptr_mut(reason) {
        // SAFETY: `p` points at this CPU's slot of the array, valid for the program's run.
        unsafe { *p += 1 };
    }
}

/// Adds to the counters of the frontend `rev_nat_index` (0: unknown, not counted).
#[inline(always)]
pub fn svc_stat_add(rev_nat_index: u16, packets: u64, bytes: u64, connections: u64) {
    if rev_nat_index == 0 {
        return;
    }
    if svc_stat_add_existing(rev_nat_index, packets, bytes, connections) {
        return;
    }
    let first = SvcStats {
        packets,
        bytes,
        connections,
    };
    // A new element starts with this CPU's value and zero on the others. If another CPU
    // created it meanwhile, add to that one.
    if SVC_STATS
        .insert(rev_nat_index, first, u64::from(BPF_NOEXIST))
        .is_err()
    {
        svc_stat_add_existing(rev_nat_index, packets, bytes, connections);
    }
}

#[inline(always)]
fn svc_stat_add_existing(rev_nat_index: u16, packets: u64, bytes: u64, connections: u64) -> bool {
    let Some(p) = SVC_STATS.get_ptr_mut(rev_nat_index) else {
        return false;
    };
    // SAFETY: `p` points at this CPU's value of the element; elements are not preallocated,
    // so a concurrently deleted one is freed only after the program's RCU section.
    unsafe {
        (*p).packets += packets;
        (*p).bytes += bytes;
        (*p).connections += connections;
    }
    true
}
