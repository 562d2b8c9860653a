//! SCTP port rewrites. SCTP's CRC32c covers the ports but not the addresses (no
//! pseudo-header): an address rewrite leaves it alone, a port rewrite updates it in place
//! with the length's factor from `SCTP_CRC_SHIFT` (the math is in `proxy_common::crc32c`).
//!
//! A zero CRC is left as is. Linux sends SCTP whose CRC the device (or
//! `skb_crc32c_csum_help` before it) computes later (CHECKSUM_PARTIAL) with the field zeroed,
//! and that computation runs over the field, so it must stay zero; our rewritten ports are
//! covered then. This is the case on tc egress for replies of a local backend, and for
//! packets that never left the host. A computed CRC of 0 (one in 2^32) leaves with a wrong
//! CRC and is retransmitted.

use proxy_common::crc32c::{crc4_raw, mul_mod};

use crate::{
    ctx::{NetCtx, PktErr},
    maps::SCTP_CRC_SHIFT,
    parse::{L4_OFF_SPORT, Pkt4},
};

/// The CRC32c factor of the packet's SCTP length, if the agent wrote it.
#[inline(always)]
pub fn sctp4_crc_shift(pkt: &Pkt4) -> Option<u32> {
    // The parser guarantees l4_off + 12 <= l3_off + tot_len.
    let ihl = (pkt.l4_off - pkt.l3_off) as u32;
    let len = u32::from(pkt.tot_len).wrapping_sub(ihl);
    let shift = *SCTP_CRC_SHIFT.get(len)?;
    (shift != 0).then_some(shift)
}

/// The two ports (be, as in the packet) as `u32::from_le_bytes` of their 4 bytes.
#[inline(always)]
fn sctp_ports_le(sport: u16, dport: u16) -> u32 {
    let [s0, s1] = sport.to_ne_bytes();
    let [d0, d1] = dport.to_ne_bytes();
    u32::from_le_bytes([s0, s1, d0, d1])
}

/// Rewrites the ports of `pkt` to `sport`/`dport` (be) and updates its CRC32c for them
/// (`shift` from [`sctp4_crc_shift`]), and records them in `pkt`. A wrong CRC stays wrong.
#[inline(always)]
pub fn sctp4_store_ports<C: NetCtx>(
    ctx: &C,
    pkt: &mut Pkt4,
    sport: u16,
    dport: u16,
    shift: u32,
) -> Result<(), PktErr> {
    let old = sctp_ports_le(pkt.sport, pkt.dport);
    let new = sctp_ports_le(sport, dport);
    // Little-endian in the packet (RFC 9260 appendix B).
    let csum = u32::from_le_bytes(ctx.load::<[u8; 4]>(pkt.l4_csum.off)?);
    if csum != 0 {
        let csum = csum ^ kproxy_sctp_crc_delta(old ^ new, shift);
        ctx.store_rcsum(pkt.l4_csum.off, csum.to_le_bytes())?;
    }
    ctx.store_rcsum(pkt.l4_off + L4_OFF_SPORT, new.to_le_bytes())?;
    pkt.sport = sport;
    pkt.dport = dport;
    Ok(())
}

/// The change of SCTP's CRC32c when the packet's first 4 bytes change by `diff_le`, for the
/// length whose factor is `shift` (`proxy_common::crc32c::sctp_crc_update` without the
/// xor). A global BPF function (exported, never inlined): the verifier checks its ~1,000
/// straight-line instructions once, on their own, instead of on every path that rewrites SCTP
/// ports. Its stack frame stays small: it adds to its callers' within the 512-byte limit.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn kproxy_sctp_crc_delta(diff_le: u32, shift: u32) -> u32 {
    mul_mod(shift, crc4_raw(diff_le))
}
