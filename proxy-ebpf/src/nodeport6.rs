//! IPv6 device programs: the twin of `nodeport.rs` for nodePorts on the node's IPv6
//! addresses, IPv6 external IPs and LoadBalancer IPs reached from outside the node. Same
//! semantics: reverse NAT of replies first, then translation of packets to an external
//! frontend (source ranges, conntrack, session affinity, SNAT to the frontend address for a
//! remote backend), optional FIB forwarding.
//!
//! ICMPv6 errors about translated flows (Packet Too Big, destination unreachable, time
//! exceeded) are rewritten on ingress and egress as IPv4's ICMP errors are (`icmp6.rs`),
//! counted as STAT_ICMP_ERROR_XLATE; other ICMPv6 passes (counted as another protocol on
//! ingress).
//!
//! Differences from IPv4, on purpose: backends are chosen at random (the Maglev tables are
//! keyed by the IPv4 reverse-NAT index space, which IPv6 indexes would collide with);
//! per-frontend traffic counters are not kept (same reason).

use core::mem::{size_of, zeroed};

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams},
    helpers::generated::bpf_fib_lookup,
    macros::map,
    maps::PerCpuArray,
};
use proxy_common::{
    config::{CFG_FLAG_XDP_FIB_FORWARD, Lb4Config},
    conntrack::{CT_FLAG_TCP_STATE, TcpCtState, tcp_ct_state},
    conntrack6::{Ct6Entry, Nat6RevEntry},
    lb::{BACKEND_FLAG_LOCAL, SVC_FLAG_EXTERNAL},
    lb6::{Lb6Backend, Lb6Key, Lb6Service},
    stats::{
        STAT_BACKEND_RESELECTED, STAT_CT_CREATED, STAT_CT_INSERT_FAILED, STAT_CT_LOST_MIDFLOW,
        STAT_DROP_SOURCE_RANGE, STAT_FIB_FALLBACK, STAT_FIB_FORWARD, STAT_FWD_XLATE,
        STAT_ICMP_ERROR_XLATE, STAT_PASS_INTERNAL, STAT_PASS_NO_BACKEND, STAT_PASS_NO_ENDPOINTS,
        STAT_PASS_NOT_READY, STAT_PASS_NOT_SERVICE, STAT_PASS_OTHER_PROTO,
        STAT_PASS_SCTP6_PORT_REWRITE, STAT_REV_XLATE, STAT_SNAT_EXHAUSTED, STAT_XLATE_ERROR,
    },
};

use crate::{
    affinity6::lb6_affinity_select_by_addr,
    ct::{ct4_flags_fwd, ct4_now, tcp_is_syn},
    ct6::{
        ct6_key, ct6_lookup, ct6_note_reply, ct6_update, nat6_rev_claim, nat6_rev_force,
        nat6_rev_lookup, snat6_alloc_port,
    },
    ctx::{NetCtx, PktErr},
    fwd::fwd_to_device,
    icmp6::{IPPROTO_ICMPV6, Icmp6Scratch, icmp6_err_xlate},
    lb::lb4_config,
    lb6::{lb6_lookup_backend, lb6_lookup_service},
    parse::{IPPROTO_SCTP, IPPROTO_TCP, L4_OFF_DPORT, L4_OFF_SPORT},
    parse6::{
        IP6_HLEN, IP6_L3_OFF, IP6_L4_OFF, IP6_OFF_DADDR, IP6_OFF_HOP_LIMIT, IP6_OFF_SADDR, Pkt6,
        ip6_l4_csum, ip6_l4_parse, ip6_parse,
    },
    src_range::lb6_src_range_ok,
    stats::stat_inc,
};

const AF_INET6: u8 = 10;

/// The IPv6 path's working state, in a per-CPU map value instead of the BPF stack: 128-bit
/// tuples copied through a few frames overflow the 512-byte stack (LLVM reuses little of
/// it), so every step takes what it needs from here and the call chain stays shallow.
pub struct Scratch6 {
    pkt: Pkt6,
    flow: Ct6Entry,
    pick: Flow6Pick,
    to: Tuple6,
    icmp: Icmp6Scratch,
}

/// One per CPU; a program runs to completion on its CPU, so the value is never shared.
#[map(name = "KP_SCRATCH6")]
static SCRATCH6: PerCpuArray<Scratch6> = PerCpuArray::with_max_entries(1, 0);

/// Ingress of an external device, IPv6 frames: as `nodeport4_ingress`. Not inlined (its
/// own BPF function and stack frame, see `nodeport_ingress`); each step below is its own
/// call from here, so the deepest chain is this frame plus one step.
#[inline(never)]
pub fn nodeport6_ingress<C: NetCtx>(ctx: &C) -> Result<i32, PktErr> {
    let Some(cfg) = lb4_config() else {
        stat_inc(STAT_PASS_NOT_READY);
        return Ok(C::PASS);
    };
    let Some(s) = SCRATCH6.get_ptr_mut(0) else {
        return Ok(C::PASS);
    };
    // SAFETY: the per-CPU value is valid for the program's run and used by this run only.
    let s = unsafe { &mut *s };
    let reason = pkt6_parse(ctx, &mut s.pkt);
    if reason == PARSED6_ICMP6 {
        // Errors from a remote backend or a router about a SNATed flow (to the node's
        // address), or about a reply (to the frontend); the stack forwards the rewritten
        // error.
        icmp6_err_xlate_counted(ctx, s, true)?;
        return Ok(C::PASS);
    }
    if reason != 0 {
        stat_inc(reason);
        return Ok(C::PASS);
    }
    let now = ct4_now();
    if nat6_rev_find(&s.pkt, now, &mut s.to) {
        nat6_rewrite(ctx, &mut s.pkt, &s.to)?;
        stat_inc(STAT_REV_XLATE);
        return nodeport6_forward(ctx, &cfg, &s.pkt);
    }
    let mut reason = lb6_xlate_ingress_flow(&s.pkt, now, &mut s.pick);
    if reason == STAT_FWD_XLATE {
        reason = lb6_flow_commit(&cfg, &s.pkt, &s.pick, now, &mut s.flow);
    }
    if reason == STAT_FWD_XLATE {
        reason = lb6_flow_target(&s.pkt, &s.flow, &mut s.to);
    }
    if reason == STAT_FWD_XLATE {
        nat6_rewrite(ctx, &mut s.pkt, &s.to)?;
    }
    stat_inc(reason);
    match reason {
        STAT_FWD_XLATE => nodeport6_forward(ctx, &cfg, &s.pkt),
        STAT_DROP_SOURCE_RANGE => Ok(C::DROP),
        _ => Ok(C::PASS),
    }
}

/// [`pkt6_parse`]'s answer for an ICMPv6 packet (not a `STAT_*` reason): its addresses,
/// payload length and protocol are in `pkt` (its ports are not), for [`icmp6_err_xlate`].
const PARSED6_ICMP6: u32 = u32::MAX;

/// Parses an IPv6 TCP/UDP/SCTP packet into `pkt`: 0, [`PARSED6_ICMP6`], or the
/// `STAT_PASS_*` reason it is not one we translate. Not inlined (see `Scratch6`).
#[inline(never)]
fn pkt6_parse<C: NetCtx>(ctx: &C, pkt: &mut Pkt6) -> u32 {
    let ip = match ip6_parse(ctx) {
        Ok(ip) => ip,
        Err(reason) => return reason,
    };
    if ip.proto == IPPROTO_ICMPV6 {
        pkt.saddr = ip.saddr;
        pkt.daddr = ip.daddr;
        pkt.payload_len = ip.payload_len;
        pkt.proto = ip.proto;
        return PARSED6_ICMP6;
    }
    match ip6_l4_parse(ctx, &ip) {
        Ok(p) => {
            *pkt = p;
            0
        }
        Err(reason) => reason,
    }
}

/// [`icmp6_err_xlate`] on the ICMPv6 packet in `s.pkt`, counted when it translated; other
/// ICMPv6 is counted as another protocol when `count_pass` (ingress counts every packet,
/// egress only translations).
#[inline(always)]
fn icmp6_err_xlate_counted<C: NetCtx>(
    ctx: &C,
    s: &mut Scratch6,
    count_pass: bool,
) -> Result<(), PktErr> {
    if icmp6_err_xlate(ctx, &s.pkt, &mut s.icmp)? {
        stat_inc(STAT_ICMP_ERROR_XLATE);
    } else if count_pass {
        stat_inc(STAT_PASS_OTHER_PROTO);
    }
    Ok(())
}

/// Egress of an external device, IPv6 frames: reverse NAT of replies from local backends.
/// Never drops; only translations are counted. Not inlined, as the ingress.
#[inline(never)]
pub fn nodeport6_egress<C: NetCtx>(ctx: &C) -> Result<i32, PktErr> {
    if lb4_config().is_none() {
        return Ok(C::PASS);
    }
    let Some(s) = SCRATCH6.get_ptr_mut(0) else {
        return Ok(C::PASS);
    };
    // SAFETY: see `nodeport6_ingress`.
    let s = unsafe { &mut *s };
    let reason = pkt6_parse(ctx, &mut s.pkt);
    if reason == PARSED6_ICMP6 {
        // Errors this node's stack or a local backend sends about a translated flow.
        icmp6_err_xlate_counted(ctx, s, false)?;
        return Ok(C::PASS);
    }
    if reason != 0 {
        return Ok(C::PASS);
    }
    if nat6_rev_find(&s.pkt, ct4_now(), &mut s.to) {
        nat6_rewrite(ctx, &mut s.pkt, &s.to)?;
        stat_inc(STAT_REV_XLATE);
    }
    Ok(C::PASS)
}

/// Whether the packet is a reply found in NAT6_REV; fills `to` with the tuple that makes it
/// come from the frontend and go to the client, and notes a FIN/RST in CT6. Not inlined.
#[inline(never)]
fn nat6_rev_find(pkt: &Pkt6, now: u64, to: &mut Tuple6) -> bool {
    let key = ct6_key(&pkt.saddr, &pkt.daddr, pkt.sport, pkt.dport, pkt.proto);
    let Some(rev) = nat6_rev_lookup(&key, now) else {
        return false;
    };
    to.saddr = rev.saddr;
    to.daddr = rev.daddr;
    to.sport = rev.sport;
    to.dport = rev.dport;
    ct6_note_reply(&rev, pkt.proto, pkt.tcp_flags);
    true
}

/// The tuple a forward packet of `flow` gets (SNAT source if any, the backend as
/// destination) into `to`: STAT_FWD_XLATE, or STAT_PASS_SCTP6_PORT_REWRITE for an SCTP packet
/// whose ports would change (its CRC covers them, see `sctp4_ports_kept`). Not inlined.
#[inline(never)]
fn lb6_flow_target(pkt: &Pkt6, flow: &Ct6Entry, to: &mut Tuple6) -> u32 {
    if flow.nat_sport != 0 {
        to.saddr = flow.nat_saddr;
        to.sport = flow.nat_sport;
    } else {
        to.saddr = pkt.saddr;
        to.sport = pkt.sport;
    }
    to.daddr = flow.backend_addr;
    to.dport = flow.backend_port;
    if !sctp6_ports_kept(pkt, to.sport, to.dport) {
        return STAT_PASS_SCTP6_PORT_REWRITE;
    }
    STAT_FWD_XLATE
}

/// Whether an SCTP packet keeps its ports (see `sctp4_ports_kept`); other protocols always
/// may change them.
#[inline(always)]
fn sctp6_ports_kept(pkt: &Pkt6, sport: u16, dport: u16) -> bool {
    pkt.proto != IPPROTO_SCTP || (sport == pkt.sport && dport == pkt.dport)
}

/// A packet's new addresses (be words) and ports (be).
struct Tuple6 {
    saddr: [u32; 4],
    daddr: [u32; 4],
    sport: u16,
    dport: u16,
}

/// Rewrites the packet's addresses and ports to `to` with L4 checksum fixes, skipping fields
/// that do not change, and records the new tuple in `pkt`. Not inlined (see `Scratch6`).
#[inline(never)]
fn nat6_rewrite<C: NetCtx>(ctx: &C, pkt: &mut Pkt6, to: &Tuple6) -> Result<(), PktErr> {
    if !sctp6_ports_kept(pkt, to.sport, to.dport) {
        return Err(PktErr);
    }
    // Offsets are constants derived here, not read back from `pkt`: values loaded from a map
    // are unbounded for the verifier, which refuses packet access at such offsets.
    let Some(l4_csum) = ip6_l4_csum(pkt.proto) else {
        return Err(PktErr);
    };
    if to.saddr != pkt.saddr {
        ctx.store_addr6(IP6_L3_OFF + IP6_OFF_SADDR, l4_csum, &pkt.saddr, &to.saddr)?;
        pkt.saddr = to.saddr;
    }
    if to.daddr != pkt.daddr {
        ctx.store_addr6(IP6_L3_OFF + IP6_OFF_DADDR, l4_csum, &pkt.daddr, &to.daddr)?;
        pkt.daddr = to.daddr;
    }
    if to.sport != pkt.sport {
        ctx.store_port(IP6_L4_OFF + L4_OFF_SPORT, l4_csum, pkt.sport, to.sport)?;
        pkt.sport = to.sport;
    }
    if to.dport != pkt.dport {
        ctx.store_port(IP6_L4_OFF + L4_OFF_DPORT, l4_csum, pkt.dport, to.dport)?;
        pkt.dport = to.dport;
    }
    Ok(())
}

/// The backend of a packet to an external IPv6 frontend (into `pick`: STAT_FWD_XLATE), or
/// the `STAT_*` reason it is not translated (not a frontend, internal, outside the source
/// ranges, no endpoints or backend). Not inlined (see `Scratch6`).
#[inline(never)]
fn lb6_xlate_ingress_flow(pkt: &Pkt6, now: u64, pick: &mut Flow6Pick) -> u32 {
    let Some((key, svc)) = lb6_lookup_service(pkt.daddr, pkt.dport, pkt.proto) else {
        return STAT_PASS_NOT_SERVICE;
    };
    if svc.flags & SVC_FLAG_EXTERNAL == 0 {
        return STAT_PASS_INTERNAL;
    }
    // Before conntrack, on every packet: a range removed stops established flows too.
    if !lb6_src_range_ok(&svc, &pkt.saddr) {
        return STAT_DROP_SOURCE_RANGE;
    }
    if svc.count == 0 {
        return STAT_PASS_NO_ENDPOINTS;
    }
    pick.had_ct = 0;
    pick.old_flags = 0;
    if !lb6_flow_pick(&key, &svc, pkt, now, pick) {
        return STAT_PASS_NO_BACKEND;
    }
    STAT_FWD_XLATE
}

/// The backend a packet's flow goes to, handed from [`lb6_flow_pick`] to [`lb6_flow_commit`].
/// Plain integers (no `Option`s): values undefined on some path must not reach the BPF stack,
/// where the verifier refuses to read them.
struct Flow6Pick {
    backend: Lb6Backend,
    backend_id: u32,
    rev_nat_index: u16,
    /// be: the SNAT port the flow had (0: none yet).
    preferred: u16,
    /// CT_FLAG_* of the existing entry (0 without one).
    old_flags: u16,
    /// 1 when the flow had a CT6 entry.
    had_ct: u8,
}

/// Whether a TCP SYN (without ACK) meets an entry whose connection has closed.
#[inline(always)]
fn lb6_flow_reopened(ct: &Ct6Entry, proto: u8, tcp_flags: u8) -> bool {
    proto == IPPROTO_TCP
        && tcp_is_syn(tcp_flags)
        && ct.flags & CT_FLAG_TCP_STATE != 0
        && tcp_ct_state(ct.flags) == TcpCtState::Closed
}

/// Fills `pick` with the flow's backend: the one in CT6 if still valid (same id, address,
/// port, frontend, and not a closed flow reopened by a SYN), else a fresh selection (session
/// affinity, else random). `false` when no backend was found.
#[inline(always)]
fn lb6_flow_pick(
    key: &Lb6Key,
    svc: &Lb6Service,
    pkt: &Pkt6,
    now: u64,
    pick: &mut Flow6Pick,
) -> bool {
    let ct_key = ct6_key(&pkt.saddr, &pkt.daddr, pkt.sport, pkt.dport, pkt.proto);
    pick.rev_nat_index = svc.rev_nat_index;
    let Some(ct) = ct6_lookup(&ct_key) else {
        if pkt.proto == IPPROTO_TCP && !tcp_is_syn(pkt.tcp_flags) {
            stat_inc(STAT_CT_LOST_MIDFLOW);
        }
        return lb6_flow_select(key, svc, &pkt.saddr, now, pick);
    };
    pick.had_ct = 1;
    pick.old_flags = ct.flags;
    if lb6_flow_reopened(&ct, pkt.proto, pkt.tcp_flags) {
        // A new connection that reused the client port picks afresh (see IPv4).
        return lb6_flow_select(key, svc, &pkt.saddr, now, pick);
    }
    if ct.rev_nat_index == svc.rev_nat_index {
        if let Some(backend) = lb6_lookup_backend(ct.backend_id, svc.rev_nat_index) {
            if backend.address == ct.backend_addr && backend.port == ct.backend_port {
                pick.backend = backend;
                pick.backend_id = ct.backend_id;
                pick.preferred = ct.nat_sport;
                return true;
            }
        }
    }
    stat_inc(STAT_BACKEND_RESELECTED);
    lb6_flow_select(key, svc, &pkt.saddr, now, pick)
}

/// A fresh backend for the client `saddr` into `pick`. Not inlined (see `Scratch6`).
#[inline(never)]
fn lb6_flow_select(
    key: &Lb6Key,
    svc: &Lb6Service,
    saddr: &[u32; 4],
    now: u64,
    pick: &mut Flow6Pick,
) -> bool {
    let Some((id, backend)) = lb6_affinity_select_by_addr(key, svc, saddr, now) else {
        return false;
    };
    pick.backend_id = id;
    pick.backend = backend;
    pick.preferred = 0;
    true
}

/// Claims the flow's reverse entry (and a SNAT port to the address the client reached, for a
/// remote backend, as IPv4 does) and writes CT6; the entry goes to `flow`. Returns
/// STAT_FWD_XLATE or the reason the packet is not translated. Not inlined.
#[inline(never)]
fn lb6_flow_commit(
    cfg: &Lb4Config,
    pkt: &Pkt6,
    pick: &Flow6Pick,
    now: u64,
    flow: &mut Ct6Entry,
) -> u32 {
    let backend = &pick.backend;
    let rev = Nat6RevEntry {
        saddr: pkt.daddr,
        daddr: pkt.saddr,
        sport: pkt.dport,
        dport: pkt.sport,
        rev_nat_index: pick.rev_nat_index,
        _pad: 0,
        last_seen_ns: now,
    };
    flow.nat_saddr = [0; 4];
    flow.nat_sport = 0;
    if backend.flags & BACKEND_FLAG_LOCAL != 0 {
        // No SNAT: the reply comes from the backend to the client itself.
        let rev_key = ct6_key(
            &backend.address,
            &pkt.saddr,
            backend.port,
            pkt.sport,
            pkt.proto,
        );
        if !nat6_rev_claim(&rev_key, &rev) && !nat6_rev_force(&rev_key, &rev) {
            return STAT_XLATE_ERROR;
        }
    } else {
        let preferred = if pick.preferred != 0 {
            pick.preferred
        } else {
            pkt.sport
        };
        let rev_base = ct6_key(&backend.address, &pkt.daddr, backend.port, 0, pkt.proto);
        let Some(port) = snat6_alloc_port(cfg, &rev_base, &rev, preferred) else {
            return STAT_SNAT_EXHAUSTED;
        };
        flow.nat_saddr = pkt.daddr;
        flow.nat_sport = port;
    }
    let old_flags = if pick.had_ct != 0 {
        Some(pick.old_flags)
    } else {
        None
    };
    flow.backend_addr = backend.address;
    flow.backend_id = pick.backend_id;
    flow.backend_port = backend.port;
    flow.rev_nat_index = pick.rev_nat_index;
    flow.flags = ct4_flags_fwd(old_flags, pkt.proto, pkt.tcp_flags);
    flow._pad = 0;
    flow.last_seen_ns = now;
    let ct_key = ct6_key(&pkt.saddr, &pkt.daddr, pkt.sport, pkt.dport, pkt.proto);
    if !ct6_update(&ct_key, flow) {
        stat_inc(STAT_CT_INSERT_FAILED);
    } else if pick.had_ct == 0 {
        stat_inc(STAT_CT_CREATED);
    }
    STAT_FWD_XLATE
}

/// With CFG_FLAG_XDP_FIB_FORWARD: as `nodeport_forward`, with an IPv6 FIB lookup and the hop
/// limit decremented (no header checksum to fix in IPv6). Not inlined (see `Scratch6`).
#[inline(never)]
fn nodeport6_forward<C: NetCtx>(ctx: &C, cfg: &Lb4Config, pkt: &Pkt6) -> Result<i32, PktErr> {
    if cfg.flags & CFG_FLAG_XDP_FIB_FORWARD == 0 {
        return Ok(C::PASS);
    }
    if pkt.hop_limit <= 1 {
        stat_inc(STAT_FIB_FALLBACK);
        return Ok(C::PASS);
    }
    // SAFETY: all-zero is a valid `bpf_fib_lookup` (plain integers and unions of them).
    let mut params: FibParams = unsafe { zeroed() };
    params.family = AF_INET6;
    params.l4_protocol = pkt.proto;
    params.sport = pkt.sport;
    params.dport = pkt.dport;
    params.__bindgen_anon_1.tot_len = pkt.payload_len.saturating_add(IP6_HLEN as u16);
    params.ifindex = ctx.ifindex();
    params.__bindgen_anon_3.ipv6_src = pkt.saddr;
    params.__bindgen_anon_4.ipv6_dst = pkt.daddr;
    // SAFETY: `params` is a valid, fully initialised struct of the size passed.
    let rc = unsafe { bpf_fib_lookup(ctx.raw(), &mut params, size_of::<FibParams>() as i32, 0) };
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) || !ctx.can_forward_to(params.ifindex) {
        stat_inc(STAT_FIB_FALLBACK);
        return Ok(C::PASS);
    }
    ctx.store_raw(IP6_L3_OFF + IP6_OFF_HOP_LIMIT, pkt.hop_limit - 1)?;
    ctx.store_eth(&params.dmac, &params.smac)?;
    stat_inc(STAT_FIB_FORWARD);
    Ok(fwd_to_device(ctx, params.ifindex))
}
