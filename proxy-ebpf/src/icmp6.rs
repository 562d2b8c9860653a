//! ICMPv6 errors about translated IPv6 flows: the twin of `icmp.rs`, so path-MTU discovery
//! (Packet Too Big), "port unreachable" and "time exceeded" work through an IPv6 nodePort.
//!
//! An ICMPv6 error (destination unreachable, packet too big, time exceeded) quotes as much
//! of the packet that caused it as fits in the minimum MTU: its IPv6 header and at least 8
//! bytes of its transport header (the ports). For a flow we translated, that packet is the
//! translated one, which the client does not know, so its kernel ignores the error (and an
//! upload over a smaller-MTU path stalls). Rewritten exactly as IPv4 does it:
//!
//! - about a request (quoted client or node SNAT address -> backend, found in NAT6_REV by
//!   the reply direction): the quote becomes client -> frontend, the error goes to the
//!   client, and comes from the frontend if the backend itself reports it;
//! - about a reply on its way to the client (quoted frontend -> client, sent to the frontend
//!   address by a router on the client's side, found in CT6): the quote becomes the reply as
//!   the backend sent it (backend -> client, or -> the node's SNAT address) and the error
//!   goes to the backend, so its TCP lowers its segment size.
//!
//! Packet Too Big's MTU (the 4 bytes after the checksum) is never touched.
//!
//! Only the fixed IPv6 header is handled, outside and quoted (as `parse6.rs`): every offset
//! is a constant. A quote with an extension header, or too short for the ports, is left
//! alone.
//!
//! Checksum: IPv6 has no header checksum, so the ICMPv6 checksum alone covers every change:
//! the outer addresses (through its pseudo header) and the quoted addresses and ports (its
//! payload). It is updated incrementally (RFC 1624) in software, for XDP and tc alike: every
//! change is compensated by it inside the packet, so a tc skb's CHECKSUM_COMPLETE sum stays
//! right (an ICMPv6 error is never CHECKSUM_PARTIAL: the kernel always computes it in full).
//! The quoted transport checksum is left as the sender computed it (receivers do not verify
//! it, and it may not be quoted), as IPv4 does.

use proxy_common::conntrack6::Ct6Key;

use crate::{
    csum::{csum_diff2, csum_diff4, csum_fold},
    ct6::{ct6_key, ct6_lookup, nat6_rev_peek},
    ctx::{NetCtx, PktErr},
    parse::{L4_OFF_DPORT, L4_OFF_SPORT, l4_layout},
    parse6::{IP6_HLEN, IP6_L3_OFF, IP6_L4_OFF, IP6_OFF_DADDR, IP6_OFF_SADDR, Pkt6},
};

pub const IPPROTO_ICMPV6: u8 = 58;
const ICMP6_DEST_UNREACH: u8 = 1;
const ICMP6_PKT_TOO_BIG: u8 = 2;
const ICMP6_TIME_EXCEEDED: u8 = 3;
/// Type, code, checksum and the 4-byte field (MTU, pointer or unused) before the quote.
const ICMP6_HLEN: usize = 8;
const ICMP6_CSUM_OFF: usize = IP6_L4_OFF + 2;
/// The quoted IPv6 header and its next-header field (absolute offsets).
const Q6_L3_OFF: usize = IP6_L4_OFF + ICMP6_HLEN;
const Q6_OFF_NEXTHDR: usize = 6;
/// The quoted transport header and the bytes of it every error carries (the ports).
const Q6_L4_OFF: usize = Q6_L3_OFF + IP6_HLEN;
const QUOTED_L4_MIN: usize = 8;

/// A packet's addresses (be words) and ports (be).
#[derive(Clone, Copy)]
pub struct Flow6 {
    saddr: [u32; 4],
    daddr: [u32; 4],
    sport: u16,
    dport: u16,
}

/// The ICMPv6 error path's working state, kept in the device path's per-CPU scratch value
/// (128-bit tuples on the BPF stack would crowd the 512 bytes, see `Scratch6`).
pub struct Icmp6Scratch {
    /// The quoted packet as it is.
    quoted: Flow6,
    quoted_proto: u8,
    /// What the quoted packet becomes.
    new_quoted: Flow6,
    /// The error's own addresses as they become (its ports unused).
    new_outer: Flow6,
    /// The lookup key (reverse NAT and conntrack use the same tuple).
    key: Ct6Key,
}

/// Whether `ip` (an ICMPv6 packet whose fixed header `ip6_parse` accepted, addresses and
/// payload length in `ip`) is an error about a flow we translated; if so rewrites it (see
/// the module docs). `Ok(false)`: not such an error, truncated, or not ours: untouched.
/// Not inlined: only ICMPv6 packets reach it, and it gets its own stack frame.
#[inline(never)]
pub fn icmp6_err_xlate<C: NetCtx>(
    ctx: &C,
    ip: &Pkt6,
    s: &mut Icmp6Scratch,
) -> Result<bool, PktErr> {
    if !icmp6_quoted(ctx, ip, s) {
        return Ok(false);
    }
    // Errors go to the quoted packet's source; anything else is not about our flow.
    if ip.daddr != s.quoted.saddr {
        return Ok(false);
    }
    if !icmp6_err_target(ip, s) {
        return Ok(false);
    }
    icmp6_rewrite(ctx, ip, s)?;
    Ok(true)
}

/// Reads the quoted TCP/UDP/SCTP packet into `s` if `ip` is an ICMPv6 error whose quote
/// holds a fixed IPv6 header straight followed by the ports, inside the outer payload.
#[inline(always)]
fn icmp6_quoted<C: NetCtx>(ctx: &C, ip: &Pkt6, s: &mut Icmp6Scratch) -> bool {
    let Ok(icmp_type) = ctx.load::<u8>(IP6_L4_OFF) else {
        return false;
    };
    if !matches!(
        icmp_type,
        ICMP6_DEST_UNREACH | ICMP6_PKT_TOO_BIG | ICMP6_TIME_EXCEEDED
    ) {
        return false;
    }
    // The outer payload (the whole ICMPv6 message) must hold the quote up to the ports.
    if Q6_L4_OFF + QUOTED_L4_MIN > IP6_L4_OFF + usize::from(ip.payload_len) {
        return false;
    }
    let Ok(ver) = ctx.load::<u8>(Q6_L3_OFF) else {
        return false;
    };
    let Ok(proto) = ctx.load::<u8>(Q6_L3_OFF + Q6_OFF_NEXTHDR) else {
        return false;
    };
    // Extension headers (fragments included) put the ports elsewhere: not handled.
    if ver >> 4 != 6 || l4_layout(proto).is_none() {
        return false;
    }
    let (Ok(saddr), Ok(daddr), Ok(sport), Ok(dport)) = (
        ctx.load::<[u32; 4]>(Q6_L3_OFF + IP6_OFF_SADDR),
        ctx.load::<[u32; 4]>(Q6_L3_OFF + IP6_OFF_DADDR),
        ctx.load::<u16>(Q6_L4_OFF + L4_OFF_SPORT),
        ctx.load::<u16>(Q6_L4_OFF + L4_OFF_DPORT),
    ) else {
        return false;
    };
    s.quoted = Flow6 {
        saddr,
        daddr,
        sport,
        dport,
    };
    s.quoted_proto = proto;
    true
}

/// Fills `s.new_quoted` and `s.new_outer` from the flow the quoted packet belongs to:
/// a request we translated (NAT6_REV) or a reply we reverse-translated (CT6). `false`: a
/// flow we know nothing about.
#[inline(always)]
fn icmp6_err_target(ip: &Pkt6, s: &mut Icmp6Scratch) -> bool {
    let q = s.quoted;
    // The reply direction of a quoted request, and the forward direction (the client's
    // packets) of a quoted reply: the same tuple.
    s.key = ct6_key(&q.daddr, &q.saddr, q.dport, q.sport, s.quoted_proto);
    if let Some(rev) = nat6_rev_peek(&s.key) {
        // Quoted: client -> frontend; to the client; from the frontend if the backend
        // itself reports (a router or this node keeps its own address).
        s.new_quoted = Flow6 {
            saddr: rev.daddr,
            daddr: rev.saddr,
            sport: rev.dport,
            dport: rev.sport,
        };
        s.new_outer.saddr = if ip.saddr == q.daddr {
            rev.saddr
        } else {
            ip.saddr
        };
        s.new_outer.daddr = rev.daddr;
        return true;
    }
    let Some(ct) = ct6_lookup(&s.key) else {
        return false;
    };
    // The reply as the backend sent it: backend -> client, or -> the node's SNAT address.
    s.new_quoted.saddr = ct.backend_addr;
    s.new_quoted.sport = ct.backend_port;
    if ct.nat_sport != 0 {
        s.new_quoted.daddr = ct.nat_saddr;
        s.new_quoted.dport = ct.nat_sport;
    } else {
        s.new_quoted.daddr = q.daddr;
        s.new_quoted.dport = q.dport;
    }
    s.new_outer.saddr = ip.saddr;
    s.new_outer.daddr = ct.backend_addr;
    true
}

/// Adds the change of a 128-bit address (`old` -> `new`, be words) to the partial sum.
#[inline(always)]
fn csum_diff16(mut sum: u32, old: &[u32; 4], new: &[u32; 4]) -> u32 {
    for i in 0..4 {
        sum = csum_diff4(sum, old[i], new[i]);
    }
    // Four words add at most 16 * 0xffff: folded back to 17 bits, the next call stays far
    // from a u32 overflow.
    (sum & 0xffff) + (sum >> 16)
}

/// Writes `s.new_quoted` into the quote and `s.new_outer`'s addresses into the outer
/// header, and fixes the ICMPv6 checksum for all of them (RFC 1624). Fields that do not
/// change are not written.
#[inline(always)]
fn icmp6_rewrite<C: NetCtx>(ctx: &C, ip: &Pkt6, s: &Icmp6Scratch) -> Result<(), PktErr> {
    let (q, nq, no) = (&s.quoted, &s.new_quoted, &s.new_outer);
    let check: u16 = ctx.load(ICMP6_CSUM_OFF)?;
    let mut sum = u32::from(!check);
    // The outer addresses, through the pseudo header.
    sum = csum_diff16(sum, &ip.saddr, &no.saddr);
    sum = csum_diff16(sum, &ip.daddr, &no.daddr);
    // The quoted addresses and ports, in the ICMPv6 payload.
    sum = csum_diff16(sum, &q.saddr, &nq.saddr);
    sum = csum_diff16(sum, &q.daddr, &nq.daddr);
    sum = csum_diff2(sum, q.sport, nq.sport);
    sum = csum_diff2(sum, q.dport, nq.dport);
    if no.saddr != ip.saddr {
        ctx.store_raw(IP6_L3_OFF + IP6_OFF_SADDR, no.saddr)?;
    }
    if no.daddr != ip.daddr {
        ctx.store_raw(IP6_L3_OFF + IP6_OFF_DADDR, no.daddr)?;
    }
    if nq.saddr != q.saddr {
        ctx.store_raw(Q6_L3_OFF + IP6_OFF_SADDR, nq.saddr)?;
    }
    if nq.daddr != q.daddr {
        ctx.store_raw(Q6_L3_OFF + IP6_OFF_DADDR, nq.daddr)?;
    }
    if nq.sport != q.sport {
        ctx.store_raw(Q6_L4_OFF + L4_OFF_SPORT, nq.sport)?;
    }
    if nq.dport != q.dport {
        ctx.store_raw(Q6_L4_OFF + L4_OFF_DPORT, nq.dport)?;
    }
    ctx.store_raw(ICMP6_CSUM_OFF, !csum_fold(sum))
}
