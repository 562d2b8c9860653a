//! Socket-level load balancing over IPv6 (cgroup/connect6, sendmsg6, recvmsg6,
//! getpeername6), the twin of `sock.rs`.
//!
//! An IPv6 socket may also talk IPv4 through a v4-mapped address (`::ffff:a.b.c.d`): for
//! connect() the kernel runs only the *6 hooks on such an address (the IPv4 connect path it
//! then takes runs no connect4 hook), so these hooks translate v4-mapped destinations with
//! the IPv4 maps and hand back a v4-mapped backend, as Cilium's `sock6_xlate_v4_in_v6` does.
//! (UDP sendmsg to a v4-mapped address is handed to the IPv4 stack before the sendmsg6 hook
//! and meets sendmsg4 there.)

use core::ptr::{addr_of, addr_of_mut};

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_ANY, bpf_sock_addr},
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use proxy_common::{
    sock::{Sock4RevKey, Sock4RevValue},
    sock6::{Sock6RevKey, Sock6RevValue},
    stats::{STAT_SOCK_NO_BACKEND, STAT_SOCK_REV_XLATE, STAT_SOCK_SOURCE_RANGE_DENIED},
};

use crate::{
    affinity::lb4_affinity_select_by_netns,
    affinity6::lb6_affinity_select_by_netns,
    ct::ct4_now,
    lb::{lb4_config, lb4_lookup_service},
    lb6::lb6_lookup_service,
    maps::{SOCK4_REV, SOCK6_REV},
    parse::{IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP},
    sock::SockErr,
    src_range::lb4_src_range_node_ok,
    stats::{stat_inc, svc_stat_add},
};

/// Verdicts of cgroup sock_addr programs.
const SYS_PROCEED: i32 = 1;
const SYS_REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// The third be word of a v4-mapped address (`::ffff:0:0/96`), as it sits in memory.
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// What a forward translation chose: the backend address (be words) and port (be).
struct Chosen {
    address: [u32; 4],
    port: u16,
}

#[inline(always)]
fn sock6_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: plain helper call on the program's own context.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// Reads `user_ip6` one 4-byte word at a time (the access size the verifier allows on every
/// kernel for this context field).
#[inline(always)]
fn sock6_read_addr(sa: *mut bpf_sock_addr) -> [u32; 4] {
    // SAFETY: the context pointer is valid for the program's run; user_ip6 is readable.
    unsafe {
        let p = addr_of!((*sa).user_ip6) as *const u32;
        [
            core::ptr::read_volatile(p),
            core::ptr::read_volatile(p.add(1)),
            core::ptr::read_volatile(p.add(2)),
            core::ptr::read_volatile(p.add(3)),
        ]
    }
}

/// Writes `user_ip6` and `user_port` (writable in all four *6 hooks).
#[inline(always)]
fn sock6_write_addr(sa: *mut bpf_sock_addr, address: [u32; 4], port: u16) {
    // SAFETY: as `sock6_read_addr`; these fields are writable in the *6 sock_addr hooks.
    unsafe {
        let p = addr_of_mut!((*sa).user_ip6) as *mut u32;
        core::ptr::write_volatile(p, address[0]);
        core::ptr::write_volatile(p.add(1), address[1]);
        core::ptr::write_volatile(p.add(2), address[2]);
        core::ptr::write_volatile(p.add(3), address[3]);
        (*sa).user_port = u32::from(port);
    }
}

#[inline(always)]
fn is_v4_mapped(a: &[u32; 4]) -> bool {
    a[0] == 0 && a[1] == 0 && a[2] == V4_MAPPED_WORD
}

/// Refuses the call (ECONNREFUSED): the service has no endpoints.
#[inline(always)]
fn sock6_refuse(refused_stat: u32) -> Result<i32, SockErr> {
    // SAFETY: plain helper call (cgroup programs, kernel >= 5.18).
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    stat_inc(refused_stat);
    Ok(SYS_REJECT)
}

/// connect6/sendmsg6: translates an IPv6 service destination (or a v4-mapped IPv4 one) to a
/// backend; no endpoints -> ECONNREFUSED. Counts like `sock4_xlate_fwd`.
#[inline(always)]
pub fn sock6_xlate_fwd(
    ctx: &SockAddrContext,
    xlate_stat: u32,
    refused_stat: u32,
) -> Result<i32, SockErr> {
    if lb4_config().is_none() {
        return Ok(SYS_PROCEED);
    }
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the program's run; these fields are readable.
    let (proto, dport) = unsafe { ((*sa).protocol as u8, (*sa).user_port as u16) };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_SCTP {
        return Ok(SYS_PROCEED);
    }
    let daddr = sock6_read_addr(sa);
    let cookie = sock6_cookie(ctx);
    // SAFETY: plain helper call on the program's own context (kernel >= 5.7).
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let chosen = if is_v4_mapped(&daddr) {
        sock6_xlate_fwd_v4_mapped(cookie, netns, daddr[3], dport, proto, refused_stat)?
    } else {
        sock6_xlate_fwd_v6(cookie, netns, daddr, dport, proto, refused_stat)?
    };
    match chosen {
        Ok(c) => {
            sock6_write_addr(sa, c.address, c.port);
            stat_inc(xlate_stat);
            Ok(SYS_PROCEED)
        }
        Err(verdict) => Ok(verdict),
    }
}

/// The IPv6 frontend case: `Ok(backend)`, or `Err(verdict)` to return untranslated. Applies
/// source ranges for connections made on the node and session affinity by network namespace,
/// as the IPv4 hooks do.
#[inline(always)]
fn sock6_xlate_fwd_v6(
    cookie: u64,
    netns: u64,
    daddr: [u32; 4],
    dport: u16,
    proto: u8,
    refused_stat: u32,
) -> Result<Result<Chosen, i32>, SockErr> {
    let Some((key, svc)) = lb6_lookup_service(daddr, dport, proto) else {
        return Ok(Err(SYS_PROCEED));
    };
    if !lb4_src_range_node_ok(&svc) {
        stat_inc(STAT_SOCK_SOURCE_RANGE_DENIED);
        return Ok(Err(SYS_REJECT));
    }
    if svc.count == 0 {
        return sock6_refuse(refused_stat).map(Err);
    }
    let Some((_, backend)) = lb6_affinity_select_by_netns(&key, &svc, netns, ct4_now()) else {
        stat_inc(STAT_SOCK_NO_BACKEND);
        return Ok(Err(SYS_PROCEED));
    };
    let rev_key = Sock6RevKey {
        cookie,
        address: backend.address,
        port: backend.port,
        _pad: [0; 3],
    };
    let rev = Sock6RevValue {
        address: daddr,
        port: dport,
        rev_nat_index: svc.rev_nat_index,
    };
    // As for IPv4: a missing reverse entry only shows the backend to recvfrom().
    let _ = SOCK6_REV.insert(&rev_key, &rev, u64::from(BPF_ANY));
    // Per-frontend counters are keyed by the IPv4 reverse-NAT index space: not counted here.
    Ok(Ok(Chosen {
        address: backend.address,
        port: backend.port,
    }))
}

/// The v4-mapped case: the IPv4 frontend `daddr4` through the IPv4 maps, with what
/// `sock4_xlate_fwd` applies (source ranges for connections made on the node, session
/// affinity by network namespace), the backend handed back v4-mapped; the reverse entry goes
/// to SOCK4_REV like a plain IPv4 socket's.
#[inline(always)]
fn sock6_xlate_fwd_v4_mapped(
    cookie: u64,
    netns: u64,
    daddr4: u32,
    dport: u16,
    proto: u8,
    refused_stat: u32,
) -> Result<Result<Chosen, i32>, SockErr> {
    let Some((key, svc)) = lb4_lookup_service(daddr4, dport, proto) else {
        return Ok(Err(SYS_PROCEED));
    };
    if !lb4_src_range_node_ok(&svc) {
        stat_inc(STAT_SOCK_SOURCE_RANGE_DENIED);
        return Ok(Err(SYS_REJECT));
    }
    if svc.count == 0 {
        return sock6_refuse(refused_stat).map(Err);
    }
    let Some((_, backend)) = lb4_affinity_select_by_netns(&key, &svc, netns, ct4_now()) else {
        stat_inc(STAT_SOCK_NO_BACKEND);
        return Ok(Err(SYS_PROCEED));
    };
    let rev_key = Sock4RevKey {
        cookie,
        address: backend.address,
        port: backend.port,
        _pad: 0,
    };
    let rev = Sock4RevValue {
        address: daddr4,
        port: dport,
        rev_nat_index: svc.rev_nat_index,
    };
    let _ = SOCK4_REV.insert(&rev_key, &rev, u64::from(BPF_ANY));
    svc_stat_add(svc.rev_nat_index, 0, 0, 1);
    Ok(Ok(Chosen {
        address: [0, 0, V4_MAPPED_WORD, backend.address],
        port: backend.port,
    }))
}

/// recvmsg6/getpeername6: shows the frontend instead of the backend the socket talks to
/// (v4-mapped peers through SOCK4_REV).
#[inline(always)]
pub fn sock6_xlate_rev(ctx: &SockAddrContext) -> Result<i32, SockErr> {
    if lb4_config().is_none() {
        return Ok(SYS_PROCEED);
    }
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: see `sock6_xlate_fwd`.
    let port = unsafe { (*sa).user_port as u16 };
    let addr = sock6_read_addr(sa);
    let cookie = sock6_cookie(ctx);
    if is_v4_mapped(&addr) {
        let key = Sock4RevKey {
            cookie,
            address: addr[3],
            port,
            _pad: 0,
        };
        // SAFETY: the value is copied out at once.
        let Some(rev) = (unsafe { SOCK4_REV.get(&key).copied() }) else {
            return Ok(SYS_PROCEED);
        };
        sock6_write_addr(sa, [0, 0, V4_MAPPED_WORD, rev.address], rev.port);
    } else {
        let key = Sock6RevKey {
            cookie,
            address: addr,
            port,
            _pad: [0; 3],
        };
        // SAFETY: the value is copied out at once.
        let Some(rev) = (unsafe { SOCK6_REV.get(&key).copied() }) else {
            return Ok(SYS_PROCEED);
        };
        sock6_write_addr(sa, rev.address, rev.port);
    }
    stat_inc(STAT_SOCK_REV_XLATE);
    Ok(SYS_PROCEED)
}
