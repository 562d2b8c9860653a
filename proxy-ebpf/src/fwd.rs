//! Sending a FIB-forwarded packet out: into a local pod's namespace directly where the
//! context can (tc, to a device the agent marked), else through the context's own forward.

use proxy_common::{devices::POD_DEV_PEER, stats::STAT_FWD_REDIRECT_PEER};

use crate::{ctx::NetCtx, maps::POD_DEVICES, stats::stat_inc};

/// Sends the packet (Ethernet header and TTL already rewritten) to `ifindex`, the FIB's
/// egress device. A pod's veth (peer in the pod's namespace) gets it with
/// `bpf_redirect_peer` from tc: the pod's `eth0` receives it at once, without the host end's
/// transmit and the backlog queue that `bpf_redirect` goes through. Any other device, or an
/// XDP context, uses [`NetCtx::forward`].
#[inline(always)]
pub fn fwd_to_device<C: NetCtx>(ctx: &C, ifindex: u32) -> i32 {
    if C::CAN_REDIRECT_PEER && pod_dev_has_peer(ifindex) {
        stat_inc(STAT_FWD_REDIRECT_PEER);
        return ctx.redirect_peer(ifindex);
    }
    ctx.forward(ifindex)
}

/// Whether the agent marked `ifindex` as a device whose peer is in a pod's namespace.
#[inline(always)]
fn pod_dev_has_peer(ifindex: u32) -> bool {
    // SAFETY: the value is copied out at once.
    unsafe { POD_DEVICES.get(&ifindex) }.is_some_and(|flags| flags & POD_DEV_PEER != 0)
}
