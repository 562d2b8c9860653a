//! Packet parsing: Ethernet -> IPv4 (IHL honoured, fragments skipped) -> TCP/UDP ports.
//! Every read is bounds-checked by [`NetCtx::load`]; fields are compared as raw integers. What is not translated says why, as a `STAT_*` reason.

use proxy_common::stats::{STAT_PASS_FRAGMENT, STAT_PASS_MALFORMED, STAT_PASS_OTHER_PROTO};

use crate::ctx::{L4Csum, NetCtx, PktErr};

pub const ETH_HLEN: usize = 14;
/// be16 0x0800 as loaded natively from the packet.
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;

/// Offsets inside the IPv4 header.
pub const IP_OFF_TTL: usize = 8;
pub const IP_OFF_CSUM: usize = 10;
pub const IP_OFF_SADDR: usize = 12;
pub const IP_OFF_DADDR: usize = 16;
/// Offsets inside the TCP/UDP header.
pub const L4_OFF_SPORT: usize = 0;
pub const L4_OFF_DPORT: usize = 2;
const TCP_OFF_CSUM: usize = 16;
const TCP_HLEN: usize = 20;
const UDP_OFF_CSUM: usize = 6;
const UDP_HLEN: usize = 8;
/// More-fragments flag and fragment offset (host order).
const IP_MF_OFFSET_MASK: u16 = 0x3fff;

/// An IPv4 TCP/UDP packet that is not a fragment. Addresses and ports are "be" (as in the
/// packet); offsets are absolute from the start of the Ethernet header.
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

/// Parses the packet; `Err(reason)` (a `STAT_PASS_*`) means "not a packet we translate" (pass
/// it untouched).
#[inline(always)]
pub fn parse4<C: NetCtx>(ctx: &C) -> Result<Pkt4, u32> {
    let ethertype: u16 = ctx.load(12).map_err(malformed)?;
    if ethertype != ETH_P_IP_BE {
        return Err(STAT_PASS_OTHER_PROTO);
    }
    let l3_off = ETH_HLEN;
    let ver_ihl: u8 = ctx.load(l3_off).map_err(malformed)?;
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    if ver_ihl >> 4 != 4 || ihl < 20 {
        return Err(STAT_PASS_MALFORMED);
    }
    let frag = u16::from_be(ctx.load::<u16>(l3_off + 6).map_err(malformed)?);
    if frag & IP_MF_OFFSET_MASK != 0 {
        return Err(STAT_PASS_FRAGMENT);
    }
    let proto: u8 = ctx.load(l3_off + 9).map_err(malformed)?;
    let l4_off = l3_off + ihl;
    let (hlen, csum_off) = if proto == IPPROTO_TCP {
        (TCP_HLEN, TCP_OFF_CSUM)
    } else if proto == IPPROTO_UDP {
        (UDP_HLEN, UDP_OFF_CSUM)
    } else {
        return Err(STAT_PASS_OTHER_PROTO);
    };
    // The whole fixed L4 header must be present (this also covers the IPv4 options), and
    // the packet must hold all the bytes its IPv4 header claims (a truncated packet is never
    // translated).
    ctx.load::<u8>(l4_off + hlen - 1).map_err(malformed)?;
    let tot_len = u16::from_be(ctx.load::<u16>(l3_off + 2).map_err(malformed)?);
    if usize::from(tot_len) < ihl + hlen || l3_off + usize::from(tot_len) > ctx.pkt_len() {
        return Err(STAT_PASS_MALFORMED);
    }
    Ok(Pkt4 {
        l3_off,
        l4_off,
        saddr: ctx.load(l3_off + IP_OFF_SADDR).map_err(malformed)?,
        daddr: ctx.load(l3_off + IP_OFF_DADDR).map_err(malformed)?,
        sport: ctx.load(l4_off + L4_OFF_SPORT).map_err(malformed)?,
        dport: ctx.load(l4_off + L4_OFF_DPORT).map_err(malformed)?,
        proto,
        tos: ctx.load(l3_off + 1).map_err(malformed)?,
        ttl: ctx.load(l3_off + IP_OFF_TTL).map_err(malformed)?,
        tot_len,
        l4_csum: L4Csum {
            off: l4_off + csum_off,
            proto,
        },
    })
}
