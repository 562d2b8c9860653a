//! Packet parsing: Ethernet -> IPv4 (IHL honoured, fragments skipped) -> TCP/UDP/SCTP ports.
//! Every read is bounds-checked by [`NetCtx::load`]; fields are compared as raw integers. What
//! is not translated says why, as a `STAT_*` reason.

use proxy_common::stats::{STAT_PASS_FRAGMENT, STAT_PASS_MALFORMED, STAT_PASS_OTHER_PROTO};

use crate::ctx::{L4Csum, NetCtx, PktErr};

pub const ETH_HLEN: usize = 14;
/// be16 0x0800 as loaded natively from the packet.
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;

/// Offsets inside the IPv4 header.
pub const IP_OFF_TOT_LEN: usize = 2;
pub const IP_OFF_FRAG: usize = 6;
pub const IP_OFF_TTL: usize = 8;
pub const IP_OFF_PROTO: usize = 9;
pub const IP_OFF_CSUM: usize = 10;
pub const IP_OFF_SADDR: usize = 12;
pub const IP_OFF_DADDR: usize = 16;
pub const IP_HLEN_MIN: usize = 20;
/// Offsets inside the TCP/UDP/SCTP header.
pub const L4_OFF_SPORT: usize = 0;
pub const L4_OFF_DPORT: usize = 2;
const TCP_OFF_FLAGS: usize = 13;
const TCP_OFF_CSUM: usize = 16;
const TCP_HLEN: usize = 20;
const UDP_OFF_CSUM: usize = 6;
const UDP_HLEN: usize = 8;
/// SCTP common header: ports, verification tag, CRC32c.
pub const SCTP_OFF_CSUM: usize = 8;
const SCTP_HLEN: usize = 12;
/// More-fragments flag and fragment offset (host order).
pub const IP_MF_OFFSET_MASK: u16 = 0x3fff;
/// Fragment offset alone (host order): non-zero means "not the first fragment".
pub const IP_OFFSET_MASK: u16 = 0x1fff;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The IPv4 header of a packet that is not a fragment and holds every byte its total length
/// claims. Addresses are "be" (as in the packet); offsets are absolute from the start of the
/// Ethernet header.
#[derive(Clone, Copy)]
pub struct Ip4 {
    pub l3_off: usize,
    pub l4_off: usize,
    /// be
    pub saddr: u32,
    /// be
    pub daddr: u32,
    pub proto: u8,
    pub tos: u8,
    pub ttl: u8,
    /// host order: the IPv4 total length (>= the header length).
    pub tot_len: u16,
}

impl Ip4 {
    #[inline(always)]
    pub fn l3_csum_off(&self) -> usize {
        self.l3_off + IP_OFF_CSUM
    }

    /// Absolute offset one past the last byte of the IPv4 packet.
    #[inline(always)]
    pub fn end(&self) -> usize {
        self.l3_off + usize::from(self.tot_len)
    }
}

/// An IPv4 TCP/UDP/SCTP packet that is not a fragment. Addresses and ports are "be" (as in
/// the packet); offsets are absolute from the start of the Ethernet header.
#[derive(Clone, Copy)]
pub struct Pkt4 {
    pub l3_off: usize,
    pub l4_off: usize,
    /// be
    pub saddr: u32,
    /// be
    pub daddr: u32,
    /// be
    pub sport: u16,
    /// be
    pub dport: u16,
    pub proto: u8,
    pub tos: u8,
    pub ttl: u8,
    /// TCP only: the flags byte (FIN, SYN, RST, PSH, ACK, ...); 0 otherwise.
    pub tcp_flags: u8,
    /// host order: the IPv4 total length.
    pub tot_len: u16,
    pub l4_csum: L4Csum,
}

impl Pkt4 {
    #[inline(always)]
    pub fn l3_csum_off(&self) -> usize {
        self.l3_off + IP_OFF_CSUM
    }
}

#[inline(always)]
fn malformed(_: PktErr) -> u32 {
    STAT_PASS_MALFORMED
}

/// Parses the Ethernet and IPv4 headers; `Err(reason)` (a `STAT_PASS_*`) means "not a packet
/// we translate" (pass it untouched).
#[inline(always)]
pub fn ip4_parse<C: NetCtx>(ctx: &C) -> Result<Ip4, u32> {
    let ethertype: u16 = ctx.load(12).map_err(malformed)?;
    if ethertype != ETH_P_IP_BE {
        return Err(STAT_PASS_OTHER_PROTO);
    }
    let l3_off = ETH_HLEN;
    let ver_ihl: u8 = ctx.load(l3_off).map_err(malformed)?;
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    if ver_ihl >> 4 != 4 || ihl < IP_HLEN_MIN {
        return Err(STAT_PASS_MALFORMED);
    }
    // Fixed-offset fields first: the verifier does not carry a bounds check made at the
    // variable offset `ihl` over to constant offsets.
    let frag = u16::from_be(ctx.load::<u16>(l3_off + IP_OFF_FRAG).map_err(malformed)?);
    let tot_len = u16::from_be(
        ctx.load::<u16>(l3_off + IP_OFF_TOT_LEN)
            .map_err(malformed)?,
    );
    let ip = Ip4 {
        l3_off,
        l4_off: l3_off + ihl,
        saddr: ctx.load(l3_off + IP_OFF_SADDR).map_err(malformed)?,
        daddr: ctx.load(l3_off + IP_OFF_DADDR).map_err(malformed)?,
        proto: ctx.load(l3_off + IP_OFF_PROTO).map_err(malformed)?,
        tos: ctx.load(l3_off + 1).map_err(malformed)?,
        ttl: ctx.load(l3_off + IP_OFF_TTL).map_err(malformed)?,
        tot_len,
    };
    // The whole header, options included, must be present.
    ctx.load::<u8>(l3_off + ihl - 1).map_err(malformed)?;
    if frag & IP_MF_OFFSET_MASK != 0 {
        return Err(STAT_PASS_FRAGMENT);
    }
    // The packet must hold all the bytes its IPv4 header claims (a truncated packet is never
    // translated).
    if usize::from(tot_len) < ihl || l3_off + usize::from(tot_len) > ctx.pkt_len() {
        return Err(STAT_PASS_MALFORMED);
    }
    Ok(ip)
}

/// The fixed header length and checksum offset of a transport we translate.
#[inline(always)]
pub fn l4_layout(proto: u8) -> Option<(usize, usize)> {
    if proto == IPPROTO_TCP {
        Some((TCP_HLEN, TCP_OFF_CSUM))
    } else if proto == IPPROTO_UDP {
        Some((UDP_HLEN, UDP_OFF_CSUM))
    } else if proto == IPPROTO_SCTP {
        Some((SCTP_HLEN, SCTP_OFF_CSUM))
    } else {
        None
    }
}

/// Parses the TCP/UDP/SCTP header after `ip`.
#[inline(always)]
pub fn l4_parse<C: NetCtx>(ctx: &C, ip: &Ip4) -> Result<Pkt4, u32> {
    let Some((hlen, csum_off)) = l4_layout(ip.proto) else {
        return Err(STAT_PASS_OTHER_PROTO);
    };
    let l4_off = ip.l4_off;
    // Smaller offsets first, each checked by its own load: a later, larger check must not
    // make LLVM drop the earlier ones (the verifier only trusts a check made on the same
    // variable-offset pointer as the access).
    let sport = ctx.load(l4_off + L4_OFF_SPORT).map_err(malformed)?;
    let dport = ctx.load(l4_off + L4_OFF_DPORT).map_err(malformed)?;
    let tcp_flags = if ip.proto == IPPROTO_TCP {
        ctx.load(l4_off + TCP_OFF_FLAGS).map_err(malformed)?
    } else {
        0
    };
    // The whole fixed L4 header must be present, inside the IPv4 total length.
    ctx.load::<u8>(l4_off + hlen - 1).map_err(malformed)?;
    if l4_off + hlen > ip.end() {
        return Err(STAT_PASS_MALFORMED);
    }
    Ok(Pkt4 {
        l3_off: ip.l3_off,
        l4_off,
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport,
        dport,
        proto: ip.proto,
        tos: ip.tos,
        ttl: ip.ttl,
        tcp_flags,
        tot_len: ip.tot_len,
        l4_csum: L4Csum {
            off: l4_off + csum_off,
            proto: ip.proto,
        },
    })
}
