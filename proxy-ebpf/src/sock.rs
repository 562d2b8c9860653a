//! Socket-level load balancing (cgroup/connect4, sendmsg4, recvmsg4, getpeername4): the
//! destination is rewritten once per connect()/sendto(), so packets never need NAT.
//!
//! UDP sendto() on an unconnected socket selects a backend afresh on every call (random, like
//! connect()); each selection records its SOCK4_REV entry so replies from any of the backends
//! show the frontend to recvfrom(). Stateless, and a removed backend is left at once.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_ANY, bpf_sock_addr},
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use proxy_common::{
    sock::{Sock4RevKey, Sock4RevValue},
    stats::{STAT_SOCK_NO_BACKEND, STAT_SOCK_REV_XLATE, STAT_SOCK_SOURCE_RANGE_DENIED},
};

use crate::{
    affinity::lb4_affinity_select_by_netns,
    ct::ct4_now,
    lb::{lb4_config, lb4_lookup_service},
    maps::SOCK4_REV,
    parse::{IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP},
    src_range::lb4_src_range_node_ok,
    stats::{stat_inc, svc_stat_add},
};

/// Verdicts of cgroup sock_addr programs.
const SYS_PROCEED: i32 = 1;
const SYS_REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// What the translation of one sock_addr call decided.
pub struct SockErr;

#[inline(always)]
fn sock4_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: plain helper call on the program's own context.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// The socket's network namespace: the session-affinity client at socket level.
#[inline(always)]
fn sock4_netns(ctx: &SockAddrContext) -> u64 {
    // SAFETY: plain helper call on the program's own context (kernel >= 5.7).
    unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
}

#[inline(always)]
fn sock4_rev_key(cookie: u64, address: u32, port: u16) -> Sock4RevKey {
    Sock4RevKey {
        cookie,
        address,
        port,
        _pad: 0,
    }
}

/// connect4/sendmsg4: translates a service destination to a backend. Services without
/// endpoints make the call fail with ECONNREFUSED. Counts `xlate_stat` or `refused_stat`
/// (the hook's `STAT_*`), and a translation as a connection of the frontend.
#[inline(always)]
pub fn sock4_xlate_fwd(
    ctx: &SockAddrContext,
    xlate_stat: u32,
    refused_stat: u32,
) -> Result<i32, SockErr> {
    if lb4_config().is_none() {
        return Ok(SYS_PROCEED);
    }
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the program's run; these fields are readable.
    let (proto, daddr, dport) = unsafe { ((*sa).protocol, (*sa).user_ip4, (*sa).user_port) };
    let proto = proto as u8;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_SCTP {
        return Ok(SYS_PROCEED);
    }
    // user_port is the be16 port in the low half of a u32.
    let dport = dport as u16;
    let Some((key, svc)) = lb4_lookup_service(daddr, dport, proto) else {
        return Ok(SYS_PROCEED);
    };
    if !lb4_src_range_node_ok(&svc) {
        // The default errno of a rejecting sock_addr program: EPERM, as a firewall gives.
        stat_inc(STAT_SOCK_SOURCE_RANGE_DENIED);
        return Ok(SYS_REJECT);
    }
    if svc.count == 0 {
        // SAFETY: plain helper call (cgroup programs, kernel >= 5.18).
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        stat_inc(refused_stat);
        return Ok(SYS_REJECT);
    }
    let Some((_, backend)) = lb4_affinity_select_by_netns(&key, &svc, sock4_netns(ctx), ct4_now())
    else {
        stat_inc(STAT_SOCK_NO_BACKEND);
        return Ok(SYS_PROCEED);
    };
    let rev_key = sock4_rev_key(sock4_cookie(ctx), backend.address, backend.port);
    let rev = Sock4RevValue {
        address: daddr,
        port: dport,
        rev_nat_index: svc.rev_nat_index,
    };
    // Without the reverse entry recvfrom()/getpeername() would show the backend: still
    // better than failing the connect, so the insert result is not checked.
    let _ = SOCK4_REV.insert(rev_key, rev, u64::from(BPF_ANY));
    // SAFETY: user_ip4/user_port are writable in connect4/sendmsg4.
    unsafe {
        (*sa).user_ip4 = backend.address;
        (*sa).user_port = u32::from(backend.port);
    }
    stat_inc(xlate_stat);
    svc_stat_add(svc.rev_nat_index, 0, 0, 1);
    Ok(SYS_PROCEED)
}

/// recvmsg4/getpeername4: shows the frontend instead of the backend the socket talks to.
#[inline(always)]
pub fn sock4_xlate_rev(ctx: &SockAddrContext) -> Result<i32, SockErr> {
    if lb4_config().is_none() {
        return Ok(SYS_PROCEED);
    }
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: see `sock4_xlate_fwd`.
    let (addr, port) = unsafe { ((*sa).user_ip4, (*sa).user_port as u16) };
    let key = sock4_rev_key(sock4_cookie(ctx), addr, port);
    // SAFETY: the value is copied out at once.
    let Some(rev) = (unsafe { SOCK4_REV.get(key).copied() }) else {
        return Ok(SYS_PROCEED);
    };
    // SAFETY: user_ip4/user_port are writable in recvmsg4/getpeername4.
    unsafe {
        (*sa).user_ip4 = rev.address;
        (*sa).user_port = u32::from(rev.port);
    }
    stat_inc(STAT_SOCK_REV_XLATE);
    Ok(SYS_PROCEED)
}
