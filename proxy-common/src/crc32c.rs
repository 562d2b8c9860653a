//! SCTP's CRC32c (RFC 9260 appendix B) after a port rewrite, without reading the packet.
//!
//! A CRC is linear over GF(2): for two messages of the same length, `crc(a) ^ crc(b)` is the
//! raw CRC (zero initial value, no final xor: those cancel) of `a ^ b`. The ports are the
//! first 4 bytes of an SCTP packet, so a port rewrite changes the CRC by the raw CRC of the
//! 4-byte difference followed by `len - 4` zero bytes, which is the raw CRC of the 4 bytes
//! times x^(8 * (len - 4)) modulo the polynomial (zlib's `crc32_combine` idea).
//!
//! The length-dependent factor is what costs: computing it per packet was too much for the
//! verifier. Userspace computes it once per SCTP length ([`sctp_crc_shift_table_next`]) into
//! the array map `maps::SCTP_CRC_SHIFT`, indexed by the SCTP length; the programs then do a
//! lookup, [`crc4_raw`] and one [`mul_mod`] (a few hundred straight-line instructions).
//!
//! Values are in the CRC's reflected bit order (x^0 is bit 31); SCTP stores the final CRC
//! little-endian (`u32::from_le_bytes` of the 4 checksum bytes).

/// CRC32c (Castagnoli) polynomial, reflected.
pub const POLY: u32 = 0x82f6_3b78;

/// x^0 (the polynomial 1) in the reflected representation.
pub const X0: u32 = 1 << 31;

/// x^8: the factor one more byte of zeros multiplies a CRC by.
pub const X8: u32 = 1 << (31 - 8);

/// Repeats its statements 32 times. The CRC steps are unrolled by hand: LLVM keeps a loop of
/// 32 (or unrolls it only in part), and a loop costs the verifier a state per iteration.
macro_rules! rep32 {
    ($($t:tt)*) => {
        rep2! { rep2! { rep2! { rep2! { rep2! { $($t)* } } } } }
    };
}

macro_rules! rep2 {
    ($($t:tt)*) => {
        $($t)*
        $($t)*
    };
}

/// `table[bit & 1]`, loaded from memory. The usual branch-free select (`-(bit & 1) & value`,
/// or `(x << k) >> 63` arithmetic, then `& value`) leaves the verifier a register in [-1, 0]
/// ANDed with a constant, which this kernel's verifier (6.18) splits into two states, one per
/// value: 2^32 paths for 32 such steps. A volatile load from a 2-entry table is an opaque
/// scalar to it instead.
#[inline(always)]
fn pick(table: &[u32; 2], bit: u32) -> u32 {
    // SAFETY: `bit & 1` is 0 or 1, inside the table.
    unsafe { core::ptr::read_volatile(table.as_ptr().add((bit & 1) as usize)) }
}

/// `a * b` modulo the polynomial: straight-line code with no branch.
#[allow(unused_assignments, reason = "the last step's `b *= x` is not needed")]
#[inline(always)]
pub fn mul_mod(a: u32, mut b: u32) -> u32 {
    let masks = [0, u32::MAX];
    let reduce = [0, POLY];
    // `a` goes through memory too: LLVM would otherwise compute its 32 shifted bits up front
    // and spill them, past the BPF stack limit.
    let mut a_cell = a;
    let mut p = 0;
    rep32! {
        // p += b if the coefficient of x^i in `a` (bit 31 - i) is set; then b *= x.
        // SAFETY: a plain local.
        let a = unsafe { core::ptr::read_volatile(&a_cell) };
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(&mut a_cell, a << 1) };
        p ^= b & pick(&masks, a >> 31);
        b = (b >> 1) ^ pick(&reduce, b);
    }
    p
}

/// The raw CRC (zero initial value, no final xor) of 4 bytes, given as `u32::from_le_bytes`
/// of them (the reflected CRC consumes the first byte first, from its low bit).
#[inline(always)]
pub fn crc4_raw(le: u32) -> u32 {
    let reduce = [0, POLY];
    let mut crc = le;
    rep32! {
        crc = (crc >> 1) ^ pick(&reduce, crc);
    }
    crc
}

/// The SCTP length the first table entry that [`sctp_crc_shift_table_next`] starts from
/// belongs to: a packet of 4 bytes (the ports alone) has factor x^0.
pub const SHIFT_TABLE_FIRST_LEN: u32 = 4;

/// The factor of the SCTP length `len + 1` from the factor of `len` (`len` >= 4): userspace
/// fills the table entry by entry with this, starting from [`X0`] at
/// [`SHIFT_TABLE_FIRST_LEN`]. Entries below 4 stay 0 (no SCTP packet is that short).
#[inline(always)]
pub fn sctp_crc_shift_table_next(factor: u32) -> u32 {
    mul_mod(factor, X8)
}

/// The SCTP checksum (`u32::from_le_bytes` of its 4 bytes) after the first 4 bytes of the
/// packet changed by `diff_le` (`u32::from_le_bytes` of `old ^ new`, the ports as they sit in
/// the packet); `shift` is the table entry of the packet's SCTP length. A checksum that was
/// wrong stays wrong by the same amount.
#[inline(always)]
pub fn sctp_crc_update(csum: u32, diff_le: u32, shift: u32) -> u32 {
    csum ^ mul_mod(shift, crc4_raw(diff_le))
}

// Tested in proxy-userspace (`dataplane::ebpf::sctp_crc`): against a brute-force CRC of
// zero-padded data, the RFC 3720 vectors and recomputations.
