//! kproxy's kernel programs. Entry points only; the logic lives in the modules.
#![no_std]
#![no_main]
// Entry points keep the `match try_x(&ctx) { Ok(v) => v, Err(_) => default }` shape on
// purpose; TC_ACT_* are u32 in the bpfel bindings (the cast is not a no-op there).
#![allow(clippy::manual_unwrap_or, clippy::unnecessary_cast)]

mod affinity;
mod affinity6;
mod csum;
mod ct;
mod ct6;
mod ctx;
mod fwd;
mod icmp;
mod icmp6;
mod lb;
mod lb6;
mod maps;
mod nodeport;
mod nodeport6;
mod parse;
mod parse6;
mod sctp;
mod sock;
mod sock6;
mod src_range;
mod stats;

use aya_ebpf::{
    bindings::{TC_ACT_OK, xdp_action::XDP_PASS},
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use proxy_common::stats::{
    STAT_SOCK_CONNECT_NO_ENDPOINTS, STAT_SOCK_CONNECT_XLATE, STAT_SOCK_SENDMSG_NO_ENDPOINTS,
    STAT_SOCK_SENDMSG_XLATE, STAT_XLATE_ERROR,
};

#[cgroup_sock_addr(connect4)]
pub fn kproxy_sock4_connect(ctx: SockAddrContext) -> i32 {
    match sock::sock4_xlate_fwd(
        &ctx,
        STAT_SOCK_CONNECT_XLATE,
        STAT_SOCK_CONNECT_NO_ENDPOINTS,
    ) {
        Ok(v) => v,
        Err(_) => 1,
    }
}

#[cgroup_sock_addr(sendmsg4)]
pub fn kproxy_sock4_sendmsg(ctx: SockAddrContext) -> i32 {
    match sock::sock4_xlate_fwd(
        &ctx,
        STAT_SOCK_SENDMSG_XLATE,
        STAT_SOCK_SENDMSG_NO_ENDPOINTS,
    ) {
        Ok(v) => v,
        Err(_) => 1,
    }
}

#[cgroup_sock_addr(recvmsg4)]
pub fn kproxy_sock4_recvmsg(ctx: SockAddrContext) -> i32 {
    match sock::sock4_xlate_rev(&ctx) {
        Ok(v) => v,
        Err(_) => 1,
    }
}

#[cgroup_sock_addr(getpeername4)]
pub fn kproxy_sock4_getpeername(ctx: SockAddrContext) -> i32 {
    match sock::sock4_xlate_rev(&ctx) {
        Ok(v) => v,
        Err(_) => 1,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn kproxy_sock6_connect(ctx: SockAddrContext) -> i32 {
    match sock6::sock6_xlate_fwd(
        &ctx,
        STAT_SOCK_CONNECT_XLATE,
        STAT_SOCK_CONNECT_NO_ENDPOINTS,
    ) {
        Ok(v) => v,
        Err(_) => 1,
    }
}

#[cgroup_sock_addr(sendmsg6)]
pub fn kproxy_sock6_sendmsg(ctx: SockAddrContext) -> i32 {
    match sock6::sock6_xlate_fwd(
        &ctx,
        STAT_SOCK_SENDMSG_XLATE,
        STAT_SOCK_SENDMSG_NO_ENDPOINTS,
    ) {
        Ok(v) => v,
        Err(_) => 1,
    }
}

#[cgroup_sock_addr(recvmsg6)]
pub fn kproxy_sock6_recvmsg(ctx: SockAddrContext) -> i32 {
    match sock6::sock6_xlate_rev(&ctx) {
        Ok(v) => v,
        Err(_) => 1,
    }
}

#[cgroup_sock_addr(getpeername6)]
pub fn kproxy_sock6_getpeername(ctx: SockAddrContext) -> i32 {
    match sock6::sock6_xlate_rev(&ctx) {
        Ok(v) => v,
        Err(_) => 1,
    }
}

// The device programs fail only when a packet store fails midway through a translation
// (parsing problems are counted and passed as `Ok`): counted as a translation error.

#[xdp]
pub fn kproxy_xdp_ingress(ctx: XdpContext) -> u32 {
    match nodeport::nodeport_ingress(&ctx) {
        Ok(v) => v as u32,
        Err(_) => {
            stats::stat_inc(STAT_XLATE_ERROR);
            XDP_PASS
        }
    }
}

#[classifier]
pub fn kproxy_tc_ingress(ctx: TcContext) -> i32 {
    match nodeport::tc_nodeport_ingress(&ctx) {
        Ok(v) => v,
        Err(_) => {
            stats::stat_inc(STAT_XLATE_ERROR);
            TC_ACT_OK as i32
        }
    }
}

#[classifier]
pub fn kproxy_tc_egress(ctx: TcContext) -> i32 {
    match nodeport::tc_nodeport_egress(&ctx) {
        Ok(_) => TC_ACT_OK as i32,
        Err(_) => {
            stats::stat_inc(STAT_XLATE_ERROR);
            TC_ACT_OK as i32
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
