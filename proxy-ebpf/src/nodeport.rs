//! Device programs: nodePort/externalIP translation on ingress (XDP or tc), reverse NAT of
//! replies on ingress and egress, and optional FIB forwarding. Written once over [`NetCtx`].

use core::mem::{size_of, zeroed};

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams},
    helpers::generated::bpf_fib_lookup,
    programs::TcContext,
};
use proxy_common::{
    config::{CFG_FLAG_XDP_FIB_FORWARD, Lb4Config},
    conntrack::{CT_FLAG_TCP_STATE, Ct4Entry, Nat4RevEntry, TcpCtState, tcp_ct_state},
    lb::{BACKEND_FLAG_LOCAL, Lb4Backend, Lb4Key, Lb4Service, SVC_FLAG_EXTERNAL},
    stats::{
        STAT_BACKEND_RESELECTED, STAT_CT_CREATED, STAT_CT_INSERT_FAILED, STAT_CT_LOST_MIDFLOW,
        STAT_DROP_SOURCE_RANGE, STAT_FIB_FALLBACK, STAT_FIB_FORWARD, STAT_FWD_XLATE,
        STAT_ICMP_ERROR_XLATE, STAT_PASS_INTERNAL, STAT_PASS_NO_BACKEND, STAT_PASS_NO_ENDPOINTS,
        STAT_PASS_NOT_READY, STAT_PASS_NOT_SERVICE, STAT_PASS_OTHER_PROTO,
        STAT_PASS_SCTP_NO_CRC_FACTOR, STAT_REV_XLATE, STAT_SNAT_EXHAUSTED, STAT_XLATE_ERROR,
    },
};

use crate::{
    affinity::{lb4_affinity_select_by_addr, lb4_affinity_timeout_ns},
    ct::{
        ct4_flags_fwd, ct4_key, ct4_lookup_ptr, ct4_note_reply, ct4_now, ct4_refresh,
        ct4_same_path, ct4_update, nat4_rev_claim, nat4_rev_force, nat4_rev_lookup,
        snat4_alloc_port, snat4_port_in_range, tcp_is_syn,
    },
    ctx::{NetCtx, PktErr},
    fwd::fwd_to_device,
    icmp::icmp4_err_xlate,
    lb::{
        lb4_config, lb4_lookup_backend, lb4_lookup_service, lb4_select_backend,
        lb4_select_backend_maglev,
    },
    nodeport6::{nodeport6_egress, nodeport6_ingress},
    parse::{
        ETH_HLEN, IP_OFF_DADDR, IP_OFF_SADDR, IP_OFF_TTL, IPPROTO_ICMP, IPPROTO_SCTP, IPPROTO_TCP,
        Ip4, L4_OFF_DPORT, L4_OFF_SPORT, Pkt4, ip4_parse, l4_parse,
    },
    parse6::eth_is_ip6,
    sctp::{sctp4_crc_shift, sctp4_store_ports},
    src_range::lb4_src_range_ok,
    stats::{stat_inc, svc_stat_add},
};

const AF_INET: u8 = 2;

/// Ingress of an external device, by family. Each family is its own BPF function (not
/// inlined): one inlined body for both would need more than the 512-byte BPF stack, while
/// separate calls each get their own frame.
#[inline(always)]
pub fn nodeport_ingress<C: NetCtx>(ctx: &C) -> Result<i32, PktErr> {
    if eth_is_ip6(ctx) {
        nodeport6_ingress(ctx)
    } else {
        nodeport4_ingress(ctx)
    }
}

/// Egress of an external device, by family (see [`nodeport_ingress`]).
#[inline(always)]
pub fn nodeport_egress<C: NetCtx>(ctx: &C) -> Result<i32, PktErr> {
    if eth_is_ip6(ctx) {
        nodeport6_egress(ctx)
    } else {
        nodeport4_egress(ctx)
    }
}

/// Ingress of an external device, IPv4: reverse NAT of replies, else nodePort/externalIP
/// translation; translated packets are forwarded per [`nodeport_forward`]. Every packet
/// counts one event: how it was translated, or why it was passed.
#[inline(never)]
fn nodeport4_ingress<C: NetCtx>(ctx: &C) -> Result<i32, PktErr> {
    let Some(cfg) = lb4_config() else {
        stat_inc(STAT_PASS_NOT_READY);
        return Ok(C::PASS);
    };
    let ip = match ip4_parse(ctx) {
        Ok(ip) => ip,
        Err(reason) => {
            stat_inc(reason);
            return Ok(C::PASS);
        }
    };
    if ip.proto == IPPROTO_ICMP {
        // Errors from a remote backend or a router about a SNATed flow (to the node's
        // address); the stack forwards the rewritten error to the client.
        icmp4_err_xlate_counted(ctx, &ip, true)?;
        return Ok(C::PASS);
    }
    let mut pkt = match l4_parse(ctx, &ip) {
        Ok(pkt) => pkt,
        Err(reason) => {
            stat_inc(reason);
            return Ok(C::PASS);
        }
    };
    let now = ct4_now();
    // On ingress, only replies SNATed to this node (to one of its SNAT ports) need the
    // reverse lookup: a local backend's replies are translated on the egress of the device
    // they leave by. Every other packet skips that lookup (a hash miss that cost a quarter
    // of an established flow's XDP time).
    if snat4_port_in_range(&cfg, pkt.dport) && nat4_rev_xlate(ctx, &mut pkt, now)? {
        return nodeport_forward(ctx, &cfg, &pkt);
    }
    match lb4_xlate_ingress(ctx, &cfg, &mut pkt, now)? {
        Ingress::Translated => nodeport_forward(ctx, &cfg, &pkt),
        Ingress::Pass => Ok(C::PASS),
        Ingress::Drop => Ok(C::DROP),
    }
}

/// What became of a packet that was not a reply.
enum Ingress {
    Translated,
    Pass,
    /// Refused by the frontend's loadBalancerSourceRanges.
    Drop,
}

/// Egress of an external device, IPv4: reverse NAT of replies from local backends. Never
/// drops. Only translations are counted here (the rest of the node's egress is none of ours).
#[inline(never)]
fn nodeport4_egress<C: NetCtx>(ctx: &C) -> Result<i32, PktErr> {
    if lb4_config().is_none() {
        return Ok(C::PASS);
    }
    let Ok(ip) = ip4_parse(ctx) else {
        return Ok(C::PASS);
    };
    if ip.proto == IPPROTO_ICMP {
        // Errors this node's stack or a local backend sends about a translated flow.
        icmp4_err_xlate_counted(ctx, &ip, false)?;
        return Ok(C::PASS);
    }
    let Ok(mut pkt) = l4_parse(ctx, &ip) else {
        return Ok(C::PASS);
    };
    nat4_rev_xlate(ctx, &mut pkt, ct4_now())?;
    Ok(C::PASS)
}

/// [`icmp4_err_xlate`], counted when it translated; other ICMP is counted as another
/// protocol when `count_pass` (ingress counts every packet, egress only translations).
#[inline(always)]
fn icmp4_err_xlate_counted<C: NetCtx>(ctx: &C, ip: &Ip4, count_pass: bool) -> Result<(), PktErr> {
    if icmp4_err_xlate(ctx, ip)? {
        stat_inc(STAT_ICMP_ERROR_XLATE);
    } else if count_pass {
        stat_inc(STAT_PASS_OTHER_PROTO);
    }
    Ok(())
}

/// Rewrites a reply found in NAT4_REV so it comes from the frontend and goes to the client.
#[inline(always)]
fn nat4_rev_xlate<C: NetCtx>(ctx: &C, pkt: &mut Pkt4, now: u64) -> Result<bool, PktErr> {
    let key = ct4_key(pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, pkt.proto);
    let Some(rev) = nat4_rev_lookup(&key, now) else {
        return Ok(false);
    };
    nat4_rewrite(ctx, pkt, rev.saddr, rev.sport, rev.daddr, rev.dport)?;
    ct4_note_reply(&rev, pkt.proto, pkt.tcp_flags);
    stat_inc(STAT_REV_XLATE);
    svc_stat_add(rev.rev_nat_index, 1, u64::from(pkt.tot_len), 0);
    Ok(true)
}

/// Rewrites the packet's addresses and ports (be) with checksum fixes, skipping fields that
/// do not change, and records the new tuple in `pkt`.
#[inline(always)]
fn nat4_rewrite<C: NetCtx>(
    ctx: &C,
    pkt: &mut Pkt4,
    saddr: u32,
    sport: u16,
    daddr: u32,
    dport: u16,
) -> Result<(), PktErr> {
    // Before any write: an SCTP port change needs its CRC32c factor.
    let sctp_shift = if sctp4_ports_change(pkt, sport, dport) {
        Some(sctp4_crc_shift(pkt).ok_or(PktErr)?)
    } else {
        None
    };
    let csum = pkt.l3_csum_off();
    if saddr != pkt.saddr {
        ctx.store_addr(
            pkt.l3_off + IP_OFF_SADDR,
            csum,
            pkt.l4_csum,
            pkt.saddr,
            saddr,
        )?;
        pkt.saddr = saddr;
    }
    if daddr != pkt.daddr {
        ctx.store_addr(
            pkt.l3_off + IP_OFF_DADDR,
            csum,
            pkt.l4_csum,
            pkt.daddr,
            daddr,
        )?;
        pkt.daddr = daddr;
    }
    if let Some(shift) = sctp_shift {
        return sctp4_store_ports(ctx, pkt, sport, dport, shift);
    }
    if sport != pkt.sport {
        ctx.store_port(pkt.l4_off + L4_OFF_SPORT, pkt.l4_csum, pkt.sport, sport)?;
        pkt.sport = sport;
    }
    if dport != pkt.dport {
        ctx.store_port(pkt.l4_off + L4_OFF_DPORT, pkt.l4_csum, pkt.dport, dport)?;
        pkt.dport = dport;
    }
    Ok(())
}

/// Whether `pkt` is SCTP and a port changes: its CRC32c covers the ports (not the
/// addresses), so the rewrite updates it ([`sctp4_store_ports`]).
#[inline(always)]
fn sctp4_ports_change(pkt: &Pkt4, sport: u16, dport: u16) -> bool {
    pkt.proto == IPPROTO_SCTP && (sport != pkt.sport || dport != pkt.dport)
}

/// Whether [`nat4_rewrite`] can change the ports of `pkt` to `sport`/`dport`: always, but an
/// SCTP port change needs its length's CRC32c factor (missing only if the agent never wrote
/// the table).
#[inline(always)]
fn sctp4_ports_ready(pkt: &Pkt4, sport: u16, dport: u16) -> bool {
    !sctp4_ports_change(pkt, sport, dport) || sctp4_crc_shift(pkt).is_some()
}

/// Translates a packet to an external frontend (nodePort, externalIP, LB ingress). Cluster
/// IPs and services without endpoints are left to the stack, sources outside a frontend's
/// loadBalancerSourceRanges dropped (with the reason counted).
#[inline(always)]
fn lb4_xlate_ingress<C: NetCtx>(
    ctx: &C,
    cfg: &Lb4Config,
    pkt: &mut Pkt4,
    now: u64,
) -> Result<Ingress, PktErr> {
    let reason = match lb4_xlate_ingress_flow(cfg, pkt, now) {
        Ok(flow) => {
            let (saddr, sport) = if flow.nat_saddr != 0 {
                (flow.nat_saddr, flow.nat_sport)
            } else {
                (pkt.saddr, pkt.sport)
            };
            if !sctp4_ports_ready(pkt, sport, flow.backend_port) {
                stat_inc(STAT_PASS_SCTP_NO_CRC_FACTOR);
                return Ok(Ingress::Pass);
            }
            // A failed store is counted by the entry point, as a translation error.
            nat4_rewrite(ctx, pkt, saddr, sport, flow.backend_addr, flow.backend_port)?;
            svc_stat_add(flow.rev_nat_index, 1, u64::from(pkt.tot_len), 0);
            STAT_FWD_XLATE
        }
        Err(reason) => reason,
    };
    stat_inc(reason);
    Ok(match reason {
        STAT_FWD_XLATE => Ingress::Translated,
        STAT_DROP_SOURCE_RANGE => Ingress::Drop,
        _ => Ingress::Pass,
    })
}

/// The flow a packet to an external frontend belongs to, or why it is not translated (a
/// `STAT_*` reason).
#[inline(always)]
fn lb4_xlate_ingress_flow(cfg: &Lb4Config, pkt: &Pkt4, now: u64) -> Result<Ct4Entry, u32> {
    let Some((key, svc)) = lb4_lookup_service(pkt.daddr, pkt.dport, pkt.proto) else {
        return Err(STAT_PASS_NOT_SERVICE);
    };
    if svc.flags & SVC_FLAG_EXTERNAL == 0 {
        return Err(STAT_PASS_INTERNAL);
    }
    // Checked on every packet, before conntrack: a range removed from the service stops its
    // established flows too.
    if !lb4_src_range_ok(&svc, pkt.saddr) {
        return Err(STAT_DROP_SOURCE_RANGE);
    }
    if svc.count == 0 {
        return Err(STAT_PASS_NO_ENDPOINTS);
    }
    lb4_flow_get(cfg, &key, &svc, pkt, now)
}

/// The backend of the flow `ct` (from CT4) if it is still valid (same id, address, port and
/// service), with the SNAT port it used.
#[inline(always)]
fn lb4_flow_reuse(svc: &Lb4Service, ct: &Ct4Entry) -> Option<(u32, Lb4Backend, u16)> {
    if ct.rev_nat_index != svc.rev_nat_index {
        return None;
    }
    let backend = lb4_lookup_backend(ct.backend_id, svc.rev_nat_index)?;
    if backend.address != ct.backend_addr || backend.port != ct.backend_port {
        return None;
    }
    Some((ct.backend_id, backend, ct.nat_sport))
}

/// Whether a TCP SYN (without ACK) meets an entry whose connection has closed.
#[inline(always)]
fn lb4_flow_reopened(ct: &Ct4Entry, proto: u8, tcp_flags: u8) -> bool {
    proto == IPPROTO_TCP
        && tcp_is_syn(tcp_flags)
        && ct.flags & CT_FLAG_TCP_STATE != 0
        && tcp_ct_state(ct.flags) == TcpCtState::Closed
}

/// The backend of a new flow: a frontend with session affinity follows its client's last
/// pick (and balances new clients at random); otherwise Maglev (the same backend on every
/// node), and random slots if its entry is missing or stale.
#[inline(always)]
fn lb4_select_new(
    key: &Lb4Key,
    svc: &Lb4Service,
    pkt: &Pkt4,
    now: u64,
) -> Option<(u32, Lb4Backend)> {
    if lb4_affinity_timeout_ns(svc).is_some() {
        return lb4_affinity_select_by_addr(key, svc, pkt.saddr, now);
    }
    lb4_select_backend_maglev(key, svc, pkt.saddr, pkt.sport)
        .or_else(|| lb4_select_backend(key, svc))
}

/// The CT entry for the packet's flow: the existing backend if still valid, else a fresh
/// selection; claims the reverse entry (and a SNAT port for a remote backend) and writes CT4.
/// Counts a new flow as a connection of the frontend, and a reselection; fails with the
/// `STAT_*` reason the packet is not translated.
#[inline(always)]
fn lb4_flow_get(
    cfg: &Lb4Config,
    key: &Lb4Key,
    svc: &Lb4Service,
    pkt: &Pkt4,
    now: u64,
) -> Result<Ct4Entry, u32> {
    let ct_key = ct4_key(pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, pkt.proto);
    let ct_ptr = ct4_lookup_ptr(&ct_key);
    // SAFETY: `ct_ptr` points into the map value; copied out at once.
    let ct = ct_ptr.map(|p| unsafe { *p });
    if ct.is_none() && pkt.proto == IPPROTO_TCP && !tcp_is_syn(pkt.tcp_flags) {
        // Mid-flow packet without state: evicted (map full) or expired.
        stat_inc(STAT_CT_LOST_MIDFLOW);
    }
    // A SYN on a closed entry is a new connection that reused the client port: it picks a
    // backend afresh, as Cilium does for a reopened flow, instead of following the old one
    // (which may be a removed backend still draining its established connections).
    let reopened = ct
        .as_ref()
        .is_some_and(|ct| lb4_flow_reopened(ct, pkt.proto, pkt.tcp_flags));
    let reuse = match &ct {
        Some(ct) if !reopened => lb4_flow_reuse(svc, ct),
        _ => None,
    };
    let (backend_id, backend, mut preferred) = match reuse {
        Some(found) => found,
        None => {
            let Some((id, backend)) = lb4_select_new(key, svc, pkt, now) else {
                return Err(STAT_PASS_NO_BACKEND);
            };
            if ct.is_some() && !reopened {
                stat_inc(STAT_BACKEND_RESELECTED);
            } else {
                svc_stat_add(svc.rev_nat_index, 0, 0, 1);
            }
            (id, backend, 0)
        }
    };
    let rev = Nat4RevEntry {
        saddr: pkt.daddr,
        daddr: pkt.saddr,
        sport: pkt.dport,
        dport: pkt.sport,
        rev_nat_index: svc.rev_nat_index,
        _pad: 0,
        last_seen_ns: now,
    };
    let (nat_saddr, nat_sport) = if backend.flags & BACKEND_FLAG_LOCAL != 0 {
        // No SNAT: the reply comes from the backend to the client itself. A clash means the
        // same client port talks to two frontends of one backend; the newest flow wins.
        let rev_key = ct4_key(
            backend.address,
            pkt.saddr,
            backend.port,
            pkt.sport,
            pkt.proto,
        );
        if !nat4_rev_claim(&rev_key, &rev) && !nat4_rev_force(&rev_key, &rev) {
            return Err(STAT_XLATE_ERROR);
        }
        (0, 0)
    } else {
        if preferred == 0 {
            preferred = pkt.sport;
        }
        let rev_base = ct4_key(backend.address, pkt.daddr, backend.port, 0, pkt.proto);
        let Some(port) = snat4_alloc_port(cfg, &rev_base, &rev, preferred) else {
            return Err(STAT_SNAT_EXHAUSTED);
        };
        (pkt.daddr, port)
    };
    let entry = Ct4Entry {
        backend_id,
        backend_addr: backend.address,
        backend_port: backend.port,
        rev_nat_index: svc.rev_nat_index,
        nat_saddr,
        nat_sport,
        flags: ct4_flags_fwd(ct.map(|c| c.flags), pkt.proto, pkt.tcp_flags),
        last_seen_ns: now,
    };
    match (ct_ptr, &ct) {
        (Some(ptr), Some(old)) if ct4_same_path(old, &entry) => {
            ct4_refresh(ptr, entry.flags, now);
        }
        _ => {
            if !ct4_update(&ct_key, &entry) {
                stat_inc(STAT_CT_INSERT_FAILED);
            } else if ct.is_none() {
                stat_inc(STAT_CT_CREATED);
            }
        }
    }
    Ok(entry)
}

/// With CFG_FLAG_XDP_FIB_FORWARD: route the translated packet with `bpf_fib_lookup`,
/// decrement the TTL, rewrite the Ethernet header and send it out directly (from tc, straight
/// into a local pod's namespace: [`fwd_to_device`]). Anything the FIB cannot resolve (no
/// neighbour yet, local destination, MTU) goes to the stack.
#[inline(always)]
fn nodeport_forward<C: NetCtx>(ctx: &C, cfg: &Lb4Config, pkt: &Pkt4) -> Result<i32, PktErr> {
    if cfg.flags & CFG_FLAG_XDP_FIB_FORWARD == 0 {
        return Ok(C::PASS);
    }
    if pkt.ttl <= 1 {
        stat_inc(STAT_FIB_FALLBACK);
        return Ok(C::PASS);
    }
    // SAFETY: all-zero is a valid `bpf_fib_lookup` (plain integers and unions of them).
    let mut params: FibParams = unsafe { zeroed() };
    params.family = AF_INET;
    params.l4_protocol = pkt.proto;
    params.sport = pkt.sport;
    params.dport = pkt.dport;
    params.__bindgen_anon_1.tot_len = pkt.tot_len;
    params.ifindex = ctx.ifindex();
    params.__bindgen_anon_2.tos = pkt.tos;
    params.__bindgen_anon_3.ipv4_src = pkt.saddr;
    params.__bindgen_anon_4.ipv4_dst = pkt.daddr;
    // SAFETY: `params` is a valid, fully initialised struct of the size passed.
    let rc = unsafe { bpf_fib_lookup(ctx.raw(), &mut params, size_of::<FibParams>() as i32, 0) };
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) || !ctx.can_forward_to(params.ifindex) {
        stat_inc(STAT_FIB_FALLBACK);
        return Ok(C::PASS);
    }
    let old = u16::from_ne_bytes([pkt.ttl, pkt.proto]);
    let new = u16::from_ne_bytes([pkt.ttl - 1, pkt.proto]);
    ctx.store_l3_u16(pkt.l3_off + IP_OFF_TTL, pkt.l3_csum_off(), old, new)?;
    ctx.store_eth(&params.dmac, &params.smac)?;
    stat_inc(STAT_FIB_FORWARD);
    Ok(fwd_to_device(ctx, params.ifindex))
}

/// Headers the tc programs read and write: Ethernet, IPv4 with options, TCP; or for an ICMP
/// error, the ICMP header, the quoted IPv4 header with options and 8 bytes of its L4 header
/// (an ICMPv6 error's fixed headers up to the quoted ports, 110 bytes, fit in this too).
const TC_PULL_LEN: u32 = (ETH_HLEN + 60 + 8 + 60 + 8) as u32;

/// Makes the headers linear for direct access (a GRO or paged skb may hold only part of
/// them in its head). A failed pull only means the parser sees a shorter packet.
#[inline(always)]
fn tc_pull_headers(ctx: &TcContext) {
    let want = ctx.len().min(TC_PULL_LEN);
    if ctx.data() + want as usize > ctx.data_end() {
        let _ = ctx.pull_data(want);
    }
}

#[inline(always)]
pub fn tc_nodeport_ingress(ctx: &TcContext) -> Result<i32, PktErr> {
    tc_pull_headers(ctx);
    nodeport_ingress(ctx)
}

#[inline(always)]
pub fn tc_nodeport_egress(ctx: &TcContext) -> Result<i32, PktErr> {
    tc_pull_headers(ctx);
    nodeport_egress(ctx)
}
