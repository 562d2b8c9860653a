//! ICMP errors about translated flows, so path-MTU discovery and "port unreachable" work
//! through a nodePort.
//!
//! An error (destination unreachable, including fragmentation needed, or time exceeded)
//! quotes the IPv4 header and the first 8 bytes of the packet that caused it. For a flow we
//! translated, that packet is the translated one (client -> backend, or node SNAT address ->
//! backend), which the client does not know: its kernel matches the quote against its
//! socket (client -> frontend) and ignores anything else, so a nodePort upload over a
//! smaller-MTU link stalls forever. Whoever sends the error (this node forwarding to a pod,
//! a router, or the backend itself) addresses it to the quoted packet's source, so the
//! flow's reverse entry (NAT4_REV, keyed by the reply direction) tells what to restore:
//!
//! - quoted source -> the client, quoted destination -> the frontend;
//! - outer destination -> the client (the node's SNAT address for a remote backend);
//! - outer source -> the frontend when the backend itself reports the error (port
//!   unreachable), so it looks like it came from the nodePort; a router or this node keeps
//!   its own address.
//!
//! Errors about a reply on its way to the client (a router on the client's side sends
//! "fragmentation needed" to the frontend address, quoting frontend -> client) are turned
//! around the same way, from the flow's CT4 entry: quoted backend -> client (or -> the
//! node's SNAT address), sent to the backend, so its TCP lowers its segment size.
//!
//! Checksums: the quoted IPv4 header checksum is updated with the quoted addresses, so the
//! sum over the quoted header does not change and the ICMP checksum needs no fix for them;
//! the ICMP checksum is fixed for the two quoted ports (RFC 1624 each). The quoted L4
//! checksum is left as the sender computed it: it may not even be quoted (a router quotes
//! only 8 bytes, the TCP checksum is at 16), and receivers do not verify it. (Cilium instead
//! adjusts the quoted L4 checksum for the ports so that the ICMP checksum stays; it fails
//! when that checksum is not quoted.) The outer header checksum is fixed for its addresses.
//! Every change is compensated by a checksum in the same packet, so a tc skb's
//! CHECKSUM_COMPLETE sum stays right too.

use crate::{
    csum::{csum_replace2, csum_replace4},
    ct::{ct4_key, ct4_lookup, nat4_rev_peek},
    ctx::{NetCtx, PktErr},
    parse::{
        IP_HLEN_MIN, IP_OFF_CSUM, IP_OFF_DADDR, IP_OFF_FRAG, IP_OFF_SADDR, IP_OFF_TTL,
        IP_OFFSET_MASK, Ip4, L4_OFF_DPORT, L4_OFF_SPORT, l4_layout,
    },
};

pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_HLEN: usize = 8;
const ICMP_OFF_CSUM: usize = 2;
/// Bytes of the quoted transport header every ICMP error carries (RFC 792): the ports are
/// in them.
const QUOTED_L4_MIN: usize = 8;

/// The packet an ICMP error quotes. Addresses and ports are "be"; offsets absolute.
struct Quoted4 {
    l3_off: usize,
    l4_off: usize,
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    proto: u8,
}

/// The TCP/UDP/SCTP packet quoted by the ICMP error in `ip`, if `ip` is such an error and
/// the quote holds an IPv4 header (options included) and the ports, inside the outer
/// packet's total length.
#[inline(always)]
fn icmp4_quoted<C: NetCtx>(ctx: &C, ip: &Ip4) -> Result<Option<Quoted4>, PktErr> {
    // Type and code together: a 1-byte check at a variable offset compiles to a `>=`
    // comparison the verifier draws no range from.
    let [icmp_type, _code]: [u8; 2] = ctx.load(ip.l4_off)?;
    if icmp_type != ICMP_DEST_UNREACH && icmp_type != ICMP_TIME_EXCEEDED {
        return Ok(None);
    }
    let l3_off = ip.l4_off + ICMP_HLEN;
    let [ver_ihl, _tos]: [u8; 2] = ctx.load(l3_off)?;
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    if ver_ihl >> 4 != 4 || ihl < IP_HLEN_MIN {
        return Ok(None);
    }
    // A non-first fragment carries no ports (MF alone is fine: the first fragment has them).
    let frag = u16::from_be(ctx.load::<u16>(l3_off + IP_OFF_FRAG)?);
    if frag & IP_OFFSET_MASK != 0 {
        return Ok(None);
    }
    let [_ttl, proto]: [u8; 2] = ctx.load(l3_off + IP_OFF_TTL)?;
    if l4_layout(proto).is_none() {
        return Ok(None);
    }
    let l4_off = l3_off + ihl;
    if l4_off + QUOTED_L4_MIN > ip.end() {
        return Ok(None);
    }
    Ok(Some(Quoted4 {
        l3_off,
        l4_off,
        saddr: ctx.load(l3_off + IP_OFF_SADDR)?,
        daddr: ctx.load(l3_off + IP_OFF_DADDR)?,
        sport: ctx.load(l4_off + L4_OFF_SPORT)?,
        dport: ctx.load(l4_off + L4_OFF_DPORT)?,
        proto,
    }))
}

/// Rewrites an ICMP error about a translated flow so its addressee recognises its own
/// packet in it: the client (errors about the translated request, see the module docs) or,
/// for errors about a reply on its way to the client (a router towards the client sends
/// "fragmentation needed" to the frontend), the backend. `Ok(false)`: not such an error
/// (or truncated): untouched.
#[inline(always)]
pub fn icmp4_err_xlate<C: NetCtx>(ctx: &C, ip: &Ip4) -> Result<bool, PktErr> {
    let q = match icmp4_quoted(ctx, ip) {
        Ok(Some(q)) => q,
        // A truncated error is simply not ours to fix.
        Ok(None) | Err(_) => return Ok(false),
    };
    // Errors go to the quoted packet's source; anything else is not about our flow.
    if ip.daddr != q.saddr {
        return Ok(false);
    }
    // About a request we translated: its reply direction is what NAT4_REV knows.
    let key = ct4_key(q.daddr, q.saddr, q.dport, q.sport, q.proto);
    if let Some(rev) = nat4_rev_peek(&key) {
        // Quoted: client -> frontend; to the client; from the frontend if the backend
        // itself reports.
        let from_backend = ip.saddr == q.daddr;
        let out_saddr = if from_backend { rev.saddr } else { ip.saddr };
        icmp4_rewrite(
            ctx, ip, &q, rev.daddr, rev.dport, rev.saddr, rev.sport, out_saddr, rev.daddr,
        )?;
        return Ok(true);
    }
    // About a reply we reverse-translated (frontend -> client): the flow's CT4 entry, keyed
    // by the client's packets, names the backend.
    let fwd = ct4_key(q.daddr, q.saddr, q.dport, q.sport, q.proto);
    let Some(ct) = ct4_lookup(&fwd) else {
        return Ok(false);
    };
    // The reply as the backend sent it: backend -> client, or -> the node's SNAT address.
    let (to, to_port) = if ct.nat_saddr != 0 {
        (ct.nat_saddr, ct.nat_sport)
    } else {
        (q.daddr, q.dport)
    };
    icmp4_rewrite(
        ctx,
        ip,
        &q,
        ct.backend_addr,
        ct.backend_port,
        to,
        to_port,
        ip.saddr,
        ct.backend_addr,
    )?;
    Ok(true)
}

/// Rewrites the quoted packet to `qsrc:qsport -> qdst:qdport` and the outer addresses to
/// `osrc -> odst` (all be), fixing the quoted IPv4 header checksum, the ICMP checksum (for
/// the ports) and the outer header checksum.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn icmp4_rewrite<C: NetCtx>(
    ctx: &C,
    ip: &Ip4,
    q: &Quoted4,
    qsrc: u32,
    qsport: u16,
    qdst: u32,
    qdport: u16,
    osrc: u32,
    odst: u32,
) -> Result<(), PktErr> {
    // The quoted IPv4 header: addresses and its own checksum (the sum over it is unchanged,
    // so the ICMP checksum needs nothing for these).
    let q_csum_off = q.l3_off + IP_OFF_CSUM;
    let mut q_check: u16 = ctx.load(q_csum_off)?;
    if qsrc != q.saddr {
        q_check = csum_replace4(q_check, q.saddr, qsrc);
        ctx.store_raw(q.l3_off + IP_OFF_SADDR, qsrc)?;
    }
    if qdst != q.daddr {
        q_check = csum_replace4(q_check, q.daddr, qdst);
        ctx.store_raw(q.l3_off + IP_OFF_DADDR, qdst)?;
    }
    ctx.store_raw(q_csum_off, q_check)?;

    // The quoted ports, covered by the ICMP checksum (no pseudo-header).
    let icmp_csum_off = ip.l4_off + ICMP_OFF_CSUM;
    let mut icmp_check: u16 = ctx.load(icmp_csum_off)?;
    if qsport != q.sport {
        icmp_check = csum_replace2(icmp_check, q.sport, qsport);
        ctx.store_raw(q.l4_off + L4_OFF_SPORT, qsport)?;
    }
    if qdport != q.dport {
        icmp_check = csum_replace2(icmp_check, q.dport, qdport);
        ctx.store_raw(q.l4_off + L4_OFF_DPORT, qdport)?;
    }
    ctx.store_raw(icmp_csum_off, icmp_check)?;

    // The outer header.
    let mut check: u16 = ctx.load(ip.l3_csum_off())?;
    if odst != ip.daddr {
        check = csum_replace4(check, ip.daddr, odst);
        ctx.store_raw(ip.l3_off + IP_OFF_DADDR, odst)?;
    }
    if osrc != ip.saddr {
        check = csum_replace4(check, ip.saddr, osrc);
        ctx.store_raw(ip.l3_off + IP_OFF_SADDR, osrc)?;
    }
    ctx.store_raw(ip.l3_csum_off(), check)
}
