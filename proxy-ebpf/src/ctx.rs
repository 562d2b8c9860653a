//! One small trait over the two device contexts (XDP and tc), so the nodePort logic is written
//! once. Reads use direct packet access with a bounds check per read; writes go through
//! [`NetCtx::store_addr`]/[`NetCtx::store_port`], which also fix the checksums: in software
//! (RFC 1624) for XDP, with `bpf_l3_csum_replace`/`bpf_l4_csum_replace` for tc (those keep
//! `skb->csum` right for CHECKSUM_COMPLETE and handle CHECKSUM_PARTIAL).

use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM, TC_ACT_OK, TC_ACT_SHOT,
        xdp_action,
    },
    helpers::generated::{bpf_redirect, bpf_redirect_peer},
    programs::{TcContext, XdpContext},
};

use crate::{
    csum::{csum_diff4, csum_fold, csum_replace2, csum_replace4, csum_udp_fixup},
    parse::{IPPROTO_SCTP, IPPROTO_UDP},
};

/// Where the L4 checksum lives and how to treat it.
#[derive(Clone, Copy)]
pub struct L4Csum {
    /// Absolute offset of the checksum field in the packet.
    pub off: usize,
    /// IPPROTO_*; UDP's checksum 0 means "none" and is kept; SCTP's CRC32c does not cover the
    /// addresses (its port changes are handled by `sctp::sctp4_store_ports`).
    pub proto: u8,
}

/// Ways a packet operation fails; any failure leaves the program with its safe default.
#[derive(Clone, Copy)]
pub struct PktErr;

pub trait NetCtx {
    /// Verdict that hands the packet to the kernel unchanged in path.
    const PASS: i32;
    /// Verdict that drops the packet.
    const DROP: i32;

    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    fn raw(&self) -> *mut c_void;
    /// The length of the whole packet from the Ethernet header (tc: including paged data).
    fn pkt_len(&self) -> usize;
    /// The device the packet arrived on (or leaves through, on egress).
    fn ifindex(&self) -> u32;

    /// Whether a translated packet may be sent straight out of `ifindex`. XDP sends only back
    /// out of the device it came in on (`XDP_TX`): an XDP redirect into a veth is dropped
    /// unless the peer runs XDP, which pods' veths do not; the stack forwards those instead.
    fn can_forward_to(&self, ifindex: u32) -> bool;

    /// Reads a `T` at `off`, or fails if the packet is shorter than `off + size_of::<T>()`.
    #[inline(always)]
    fn load<T: Copy>(&self, off: usize) -> Result<T, PktErr> {
        let start = self.data();
        let end = self.data_end();
        if start + off + size_of::<T>() > end {
            return Err(PktErr);
        }
        // SAFETY: bounds checked just above; packet data has no alignment guarantee.
        Ok(unsafe { ((start + off) as *const T).read_unaligned() })
    }

    /// Replaces the 32-bit address at `off` (`old` -> `new`, both as in the packet) and fixes
    /// the IPv4 header checksum at `l3_csum_off` and the L4 checksum (pseudo header).
    fn store_addr(
        &self,
        off: usize,
        l3_csum_off: usize,
        l4: L4Csum,
        old: u32,
        new: u32,
    ) -> Result<(), PktErr>;

    /// Replaces the 128-bit IPv6 address at `off` (`old` -> `new`, be words) and fixes the L4
    /// checksum over the pseudo header (IPv6 has no header checksum): an incremental update
    /// over the words that change.
    fn store_addr6(
        &self,
        off: usize,
        l4: L4Csum,
        old: &[u32; 4],
        new: &[u32; 4],
    ) -> Result<(), PktErr>;

    /// Writes `v` at `off` as is; the caller keeps every checksum right.
    fn store_raw<T: Copy>(&self, off: usize, v: T) -> Result<(), PktErr>;

    /// Writes `v` at `off` where no one's complement checksum compensates the change (SCTP's
    /// ports and CRC32c): tc also updates `skb->csum` (`BPF_F_RECOMPUTE_CSUM`), which a
    /// CHECKSUM_COMPLETE skb carries over the whole packet; XDP has no such sum.
    fn store_rcsum<T: Copy>(&self, off: usize, v: T) -> Result<(), PktErr>;

    /// Replaces the 16-bit port at `off` and fixes the L4 checksum (TCP/UDP only).
    fn store_port(&self, off: usize, l4: L4Csum, old: u16, new: u16) -> Result<(), PktErr>;

    /// Replaces a 16-bit word of the IPv4 header and fixes the header checksum.
    fn store_l3_u16(
        &self,
        off: usize,
        l3_csum_off: usize,
        old: u16,
        new: u16,
    ) -> Result<(), PktErr>;

    /// Writes the Ethernet destination and source addresses.
    fn store_eth(&self, dst: &[u8; 6], src: &[u8; 6]) -> Result<(), PktErr>;

    /// Sends the packet out of `ifindex` (after a successful FIB lookup).
    fn forward(&self, ifindex: u32) -> i32;

    /// Whether [`NetCtx::redirect_peer`] is available (tc ingress; XDP has no such helper).
    const CAN_REDIRECT_PEER: bool;

    /// Delivers the packet into the ingress of `ifindex`'s peer device (in another network
    /// namespace). Only for a device that has one: the kernel drops the packet otherwise.
    fn redirect_peer(&self, ifindex: u32) -> i32;
}

impl NetCtx for XdpContext {
    #[inline(always)]
    fn can_forward_to(&self, ifindex: u32) -> bool {
        ifindex == NetCtx::ifindex(self)
    }

    const PASS: i32 = xdp_action::XDP_PASS as i32;
    const DROP: i32 = xdp_action::XDP_DROP as i32;

    // Volatile reads of the packet bounds, for every access: LLVM then cannot prove one
    // bounds check redundant because of another (it drops checks implied by earlier ones,
    // and the verifier, which tracks ranges per pointer, rejects the unchecked access).
    #[inline(always)]
    fn data(&self) -> usize {
        // SAFETY: the context pointer is valid for the program's run.
        unsafe { core::ptr::read_volatile(&(*self.ctx).data) as usize }
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        // SAFETY: as above.
        unsafe { core::ptr::read_volatile(&(*self.ctx).data_end) as usize }
    }

    #[inline(always)]
    fn raw(&self) -> *mut c_void {
        self.as_ptr()
    }

    #[inline(always)]
    fn pkt_len(&self) -> usize {
        // Volatile reads: if LLVM knew this equals `data_end - data`, a length check made
        // with it (e.g. the IPv4 total length) would let LLVM drop later packet bounds
        // checks it implies, and the verifier cannot follow that reasoning.
        // SAFETY: the context pointer is valid for the program's run.
        unsafe {
            let md = self.ctx;
            let end = core::ptr::read_volatile(&(*md).data_end);
            let start = core::ptr::read_volatile(&(*md).data);
            end.wrapping_sub(start) as usize
        }
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.ingress_ifindex() as u32
    }

    #[inline(always)]
    fn store_addr(
        &self,
        off: usize,
        l3_csum_off: usize,
        l4: L4Csum,
        old: u32,
        new: u32,
    ) -> Result<(), PktErr> {
        let l3_check: u16 = self.load(l3_csum_off)?;
        self.load::<u32>(off)?;
        if l4.proto != IPPROTO_SCTP {
            let l4_check: u16 = self.load(l4.off)?;
            let mut l4_new = csum_replace4(l4_check, old, new);
            if l4.proto == IPPROTO_UDP {
                l4_new = csum_udp_fixup(l4_check, l4_new);
            }
            xdp_store(self, l4.off, l4_new)?;
        }
        xdp_store(self, l3_csum_off, csum_replace4(l3_check, old, new))?;
        xdp_store(self, off, new)
    }

    #[inline(always)]
    fn store_addr6(
        &self,
        off: usize,
        l4: L4Csum,
        old: &[u32; 4],
        new: &[u32; 4],
    ) -> Result<(), PktErr> {
        self.load::<[u32; 4]>(off)?;
        if l4.proto != IPPROTO_SCTP {
            let l4_check: u16 = self.load(l4.off)?;
            // Four 32-bit changes add at most 16 * 0xffff to the sum: no u32 overflow.
            let mut sum = u32::from(!l4_check);
            for i in 0..4 {
                sum = csum_diff4(sum, old[i], new[i]);
            }
            let mut l4_new = !csum_fold(sum);
            if l4.proto == IPPROTO_UDP {
                l4_new = csum_udp_fixup(l4_check, l4_new);
            }
            xdp_store(self, l4.off, l4_new)?;
        }
        xdp_store(self, off, *new)
    }

    #[inline(always)]
    fn store_raw<T: Copy>(&self, off: usize, v: T) -> Result<(), PktErr> {
        xdp_store(self, off, v)
    }

    #[inline(always)]
    fn store_rcsum<T: Copy>(&self, off: usize, v: T) -> Result<(), PktErr> {
        xdp_store(self, off, v)
    }

    #[inline(always)]
    fn store_port(&self, off: usize, l4: L4Csum, old: u16, new: u16) -> Result<(), PktErr> {
        let l4_check: u16 = self.load(l4.off)?;
        let mut l4_new = csum_replace2(l4_check, old, new);
        if l4.proto == IPPROTO_UDP {
            l4_new = csum_udp_fixup(l4_check, l4_new);
        }
        xdp_store(self, l4.off, l4_new)?;
        xdp_store(self, off, new)
    }

    #[inline(always)]
    fn store_l3_u16(
        &self,
        off: usize,
        l3_csum_off: usize,
        old: u16,
        new: u16,
    ) -> Result<(), PktErr> {
        let l3_check: u16 = self.load(l3_csum_off)?;
        xdp_store(self, l3_csum_off, csum_replace2(l3_check, old, new))?;
        xdp_store(self, off, new)
    }

    #[inline(always)]
    fn store_eth(&self, dst: &[u8; 6], src: &[u8; 6]) -> Result<(), PktErr> {
        xdp_store(self, 0, *dst)?;
        xdp_store(self, 6, *src)
    }

    #[inline(always)]
    fn forward(&self, ifindex: u32) -> i32 {
        if ifindex == NetCtx::ifindex(self) {
            xdp_action::XDP_TX as i32
        } else {
            // SAFETY: plain helper call; returns XDP_REDIRECT or XDP_ABORTED.
            unsafe { bpf_redirect(ifindex, 0) as i32 }
        }
    }

    const CAN_REDIRECT_PEER: bool = false;

    #[inline(always)]
    fn redirect_peer(&self, ifindex: u32) -> i32 {
        self.forward(ifindex)
    }
}

#[inline(always)]
fn xdp_store<T: Copy>(ctx: &XdpContext, off: usize, v: T) -> Result<(), PktErr> {
    let start = NetCtx::data(ctx);
    let end = NetCtx::data_end(ctx);
    if start + off + size_of::<T>() > end {
        return Err(PktErr);
    }
    // SAFETY: bounds checked just above.
    unsafe { ((start + off) as *mut T).write_unaligned(v) };
    Ok(())
}

impl NetCtx for TcContext {
    #[inline(always)]
    fn can_forward_to(&self, _ifindex: u32) -> bool {
        true
    }

    const PASS: i32 = TC_ACT_OK as i32;
    const DROP: i32 = TC_ACT_SHOT as i32;

    // Volatile for the same reason as XDP's.
    #[inline(always)]
    fn data(&self) -> usize {
        // SAFETY: the context pointer is valid for the program's run.
        unsafe { core::ptr::read_volatile(&(*self.skb.skb).data) as usize }
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        // SAFETY: as above.
        unsafe { core::ptr::read_volatile(&(*self.skb.skb).data_end) as usize }
    }

    #[inline(always)]
    fn raw(&self) -> *mut c_void {
        self.as_ptr()
    }

    #[inline(always)]
    fn pkt_len(&self) -> usize {
        self.len() as usize
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: the context pointer is valid for the program's run.
        unsafe { (*self.skb.skb).ifindex }
    }

    #[inline(always)]
    fn store_addr(
        &self,
        off: usize,
        l3_csum_off: usize,
        l4: L4Csum,
        old: u32,
        new: u32,
    ) -> Result<(), PktErr> {
        if l4.proto != IPPROTO_SCTP {
            let mut flags = u64::from(BPF_F_PSEUDO_HDR) | 4;
            if l4.proto == IPPROTO_UDP {
                flags |= u64::from(BPF_F_MARK_MANGLED_0);
            }
            self.l4_csum_replace(l4.off, u64::from(old), u64::from(new), flags)
                .map_err(|_| PktErr)?;
        }
        self.l3_csum_replace(l3_csum_off, u64::from(old), u64::from(new), 4)
            .map_err(|_| PktErr)?;
        self.store(off, &new, 0).map_err(|_| PktErr)
    }

    #[inline(always)]
    fn store_addr6(
        &self,
        off: usize,
        l4: L4Csum,
        old: &[u32; 4],
        new: &[u32; 4],
    ) -> Result<(), PktErr> {
        let mut flags = u64::from(BPF_F_PSEUDO_HDR) | 4;
        if l4.proto == IPPROTO_UDP {
            flags |= u64::from(BPF_F_MARK_MANGLED_0);
        }
        // Word by word: the checksum (unless SCTP, whose CRC does not cover addresses), then
        // the word itself.
        for i in 0..4 {
            let (o, n) = (old[i], new[i]);
            if o == n {
                continue;
            }
            if l4.proto != IPPROTO_SCTP {
                self.l4_csum_replace(l4.off, u64::from(o), u64::from(n), flags)
                    .map_err(|_| PktErr)?;
            }
            self.store(off + 4 * i, &n, 0).map_err(|_| PktErr)?;
        }
        Ok(())
    }

    #[inline(always)]
    fn store_raw<T: Copy>(&self, off: usize, v: T) -> Result<(), PktErr> {
        self.store(off, &v, 0).map_err(|_| PktErr)
    }

    #[inline(always)]
    fn store_rcsum<T: Copy>(&self, off: usize, v: T) -> Result<(), PktErr> {
        self.store(off, &v, u64::from(BPF_F_RECOMPUTE_CSUM))
            .map_err(|_| PktErr)
    }

    #[inline(always)]
    fn store_port(&self, off: usize, l4: L4Csum, old: u16, new: u16) -> Result<(), PktErr> {
        let mut flags = 2;
        if l4.proto == IPPROTO_UDP {
            flags |= u64::from(BPF_F_MARK_MANGLED_0);
        }
        self.l4_csum_replace(l4.off, u64::from(old), u64::from(new), flags)
            .map_err(|_| PktErr)?;
        self.store(off, &new, 0).map_err(|_| PktErr)
    }

    #[inline(always)]
    fn store_l3_u16(
        &self,
        off: usize,
        l3_csum_off: usize,
        old: u16,
        new: u16,
    ) -> Result<(), PktErr> {
        self.l3_csum_replace(l3_csum_off, u64::from(old), u64::from(new), 2)
            .map_err(|_| PktErr)?;
        self.store(off, &new, 0).map_err(|_| PktErr)
    }

    #[inline(always)]
    fn store_eth(&self, dst: &[u8; 6], src: &[u8; 6]) -> Result<(), PktErr> {
        self.store(0, dst, 0).map_err(|_| PktErr)?;
        self.store(6, src, 0).map_err(|_| PktErr)
    }

    #[inline(always)]
    fn forward(&self, ifindex: u32) -> i32 {
        // SAFETY: plain helper call; returns TC_ACT_REDIRECT or TC_ACT_SHOT.
        unsafe { bpf_redirect(ifindex, 0) as i32 }
    }

    const CAN_REDIRECT_PEER: bool = true;

    #[inline(always)]
    fn redirect_peer(&self, ifindex: u32) -> i32 {
        // SAFETY: plain helper call (kernel >= 5.10); returns TC_ACT_REDIRECT or TC_ACT_SHOT.
        unsafe { bpf_redirect_peer(ifindex, 0) as i32 }
    }
}
