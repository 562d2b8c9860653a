//! `loadBalancerSourceRanges` (see `proxy_common::src_range`): which sources may use a
//! frontend that has them.

use aya_ebpf::maps::lpm_trie::Key;
use proxy_common::{
    lb::{Lb4Service, SVC_FLAG_SOURCE_RANGES, SVC_FLAG_SOURCE_RANGES_DENY_NODE},
    lb6::Lb6Service,
    src_range::{Lb4SrcRangeKey, Lb6SrcRangeKey, SRC_RANGE_INDEX_BITS},
};

use crate::maps::{LB4_SRC_RANGE, LB6_SRC_RANGE};

/// Whether a packet from `saddr` (be) may use the frontend `svc`: always without source
/// ranges, else only from a source inside one of them.
#[inline(always)]
pub fn lb4_src_range_ok(svc: &Lb4Service, saddr: u32) -> bool {
    if svc.flags & SVC_FLAG_SOURCE_RANGES == 0 {
        return true;
    }
    let key = Key::new(
        SRC_RANGE_INDEX_BITS + 32,
        Lb4SrcRangeKey::new(svc.rev_nat_index, saddr),
    );
    LB4_SRC_RANGE.get(&key).is_some()
}

/// Whether connect()/sendmsg() on this node may use the frontend `svc`: the socket hooks see
/// no source address yet, so the agent decided from the node's own addresses.
#[inline(always)]
pub fn lb4_src_range_node_ok(svc: &Lb4Service) -> bool {
    svc.flags & SVC_FLAG_SOURCE_RANGES_DENY_NODE == 0
}

/// [`lb4_src_range_ok`] for an IPv6 frontend and a source `saddr` (be words).
#[inline(always)]
pub fn lb6_src_range_ok(svc: &Lb6Service, saddr: &[u32; 4]) -> bool {
    if svc.flags & SVC_FLAG_SOURCE_RANGES == 0 {
        return true;
    }
    let key = Key::new(
        SRC_RANGE_INDEX_BITS + 128,
        Lb6SrcRangeKey::new(svc.rev_nat_index, *saddr),
    );
    LB6_SRC_RANGE.get(&key).is_some()
}
