//! IPv6 packet parsing for the device programs: Ethernet -> IPv6 (fixed header only) ->
//! TCP/UDP/SCTP ports. A packet whose next header is an extension header (hop-by-hop,
//! routing, fragment, destination options, AH, ESP, mobility, HIP, shim6) is passed
//! untranslated and counted: its transport header is not where the fixed header ends, and
//! translating only some packets of a flow would be worse than translating none.

use proxy_common::stats::{STAT_PASS_FRAGMENT, STAT_PASS_MALFORMED, STAT_PASS_OTHER_PROTO};

use crate::{
    ctx::{L4Csum, NetCtx, PktErr},
    parse::{ETH_HLEN, IPPROTO_TCP, L4_OFF_DPORT, L4_OFF_SPORT, l4_layout},
};

/// be16 0x86dd as loaded natively from the packet.
const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();
/// The fixed IPv6 header.
pub const IP6_HLEN: usize = 40;
/// Where the IPv6 header and the transport header start (no extension headers are
/// translated, so both are fixed).
pub const IP6_L3_OFF: usize = ETH_HLEN;
pub const IP6_L4_OFF: usize = ETH_HLEN + IP6_HLEN;
/// Offsets inside the IPv6 header.
const IP6_OFF_PAYLOAD_LEN: usize = 4;
const IP6_OFF_NEXTHDR: usize = 6;
pub const IP6_OFF_HOP_LIMIT: usize = 7;
pub const IP6_OFF_SADDR: usize = 8;
pub const IP6_OFF_DADDR: usize = 24;
/// The fragment extension header.
const IPPROTO_FRAGMENT: u8 = 44;
/// TCP flags byte.
const TCP_OFF_FLAGS: usize = 13;

/// Whether the frame carries IPv6 (by its ethertype).
#[inline(always)]
pub fn eth_is_ip6<C: NetCtx>(ctx: &C) -> bool {
    matches!(ctx.load::<u16>(12), Ok(t) if t == ETH_P_IPV6_BE)
}

/// Extension headers (RFC 8200 and the IANA list): a transport header does not follow.
#[inline(always)]
fn ip6_is_ext_hdr(nexthdr: u8) -> bool {
    matches!(nexthdr, 0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140)
}

/// The fixed IPv6 header of a packet that holds every byte its payload length claims.
/// Addresses are be words; the header starts at [`IP6_L3_OFF`].
#[derive(Clone, Copy)]
pub struct Ip6 {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub proto: u8,
    pub hop_limit: u8,
    /// host order
    pub payload_len: u16,
}

/// An IPv6 TCP/UDP/SCTP packet (the IPv6 twin of `Pkt4`). Its headers sit at the constant
/// offsets [`IP6_L3_OFF`] and [`IP6_L4_OFF`] (the device path keeps this in a map value,
/// where an offset would be unbounded for the verifier).
#[derive(Clone, Copy)]
pub struct Pkt6 {
    /// be words
    pub saddr: [u32; 4],
    /// be words
    pub daddr: [u32; 4],
    /// be
    pub sport: u16,
    /// be
    pub dport: u16,
    pub proto: u8,
    pub hop_limit: u8,
    /// TCP only: the flags byte; 0 otherwise.
    pub tcp_flags: u8,
    /// host order: the IPv6 payload length.
    pub payload_len: u16,
}

/// The L4 checksum of a translated transport right after the fixed IPv6 header, at a
/// constant offset.
#[inline(always)]
pub fn ip6_l4_csum(proto: u8) -> Option<L4Csum> {
    let (_, csum_off) = l4_layout(proto)?;
    Some(L4Csum {
        off: IP6_L4_OFF + csum_off,
        proto,
    })
}

#[inline(always)]
fn malformed(_: PktErr) -> u32 {
    STAT_PASS_MALFORMED
}

/// Parses the Ethernet and fixed IPv6 headers; `Err(reason)` (a `STAT_PASS_*`) means "not a
/// packet we translate" (pass it untouched).
#[inline(always)]
pub fn ip6_parse<C: NetCtx>(ctx: &C) -> Result<Ip6, u32> {
    if !eth_is_ip6(ctx) {
        return Err(STAT_PASS_OTHER_PROTO);
    }
    let l3_off = IP6_L3_OFF;
    let ver: u8 = ctx.load(l3_off).map_err(malformed)?;
    if ver >> 4 != 6 {
        return Err(STAT_PASS_MALFORMED);
    }
    let payload_len = u16::from_be(
        ctx.load::<u16>(l3_off + IP6_OFF_PAYLOAD_LEN)
            .map_err(malformed)?,
    );
    let ip = Ip6 {
        saddr: ctx.load(l3_off + IP6_OFF_SADDR).map_err(malformed)?,
        daddr: ctx.load(l3_off + IP6_OFF_DADDR).map_err(malformed)?,
        proto: ctx.load(l3_off + IP6_OFF_NEXTHDR).map_err(malformed)?,
        hop_limit: ctx.load(l3_off + IP6_OFF_HOP_LIMIT).map_err(malformed)?,
        payload_len,
    };
    if ip.proto == IPPROTO_FRAGMENT {
        return Err(STAT_PASS_FRAGMENT);
    }
    if ip6_is_ext_hdr(ip.proto) {
        return Err(STAT_PASS_OTHER_PROTO);
    }
    // The packet must hold all the bytes its header claims (a truncated packet is never
    // translated; a jumbogram has payload length 0 and a hop-by-hop header, passed above).
    if IP6_L4_OFF + usize::from(payload_len) > ctx.pkt_len() {
        return Err(STAT_PASS_MALFORMED);
    }
    Ok(ip)
}

/// Parses the TCP/UDP/SCTP header right after the fixed IPv6 header.
#[inline(always)]
pub fn ip6_l4_parse<C: NetCtx>(ctx: &C, ip: &Ip6) -> Result<Pkt6, u32> {
    let Some((hlen, _)) = l4_layout(ip.proto) else {
        return Err(STAT_PASS_OTHER_PROTO);
    };
    // The L4 header sits at a constant offset (no options in the fixed header), so these
    // loads need no variable-offset care.
    let l4_off = IP6_L4_OFF;
    let sport = ctx.load(l4_off + L4_OFF_SPORT).map_err(malformed)?;
    let dport = ctx.load(l4_off + L4_OFF_DPORT).map_err(malformed)?;
    let tcp_flags = if ip.proto == IPPROTO_TCP {
        ctx.load(l4_off + TCP_OFF_FLAGS).map_err(malformed)?
    } else {
        0
    };
    ctx.load::<u8>(l4_off + hlen - 1).map_err(malformed)?;
    if hlen > usize::from(ip.payload_len) {
        return Err(STAT_PASS_MALFORMED);
    }
    Ok(Pkt6 {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport,
        dport,
        proto: ip.proto,
        hop_limit: ip.hop_limit,
        tcp_flags,
        payload_len: ip.payload_len,
    })
}
