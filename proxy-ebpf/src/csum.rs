//! RFC 1624 incremental checksum updates (eqn. 3: HC' = ~(~HC + ~m + m')).
//!
//! All values are taken exactly as they sit in the packet (loaded natively from network-order
//! bytes): the one's complement sum is independent of byte order as long as the checksum and
//! the changed fields are read and written the same way.

/// Folds a 32-bit partial sum into 16 bits with end-around carry.
#[inline(always)]
pub fn csum_fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Adds the change `old -> new` of a 32-bit field to the partial sum `sum`.
#[inline(always)]
pub fn csum_diff4(sum: u32, old: u32, new: u32) -> u32 {
    let not_old = !old;
    sum + (not_old & 0xffff) + (not_old >> 16) + (new & 0xffff) + (new >> 16)
}

/// Adds the change `old -> new` of a 16-bit field to the partial sum `sum`.
#[inline(always)]
pub fn csum_diff2(sum: u32, old: u16, new: u16) -> u32 {
    sum + u32::from(!old) + u32::from(new)
}

/// The checksum `check` after a 32-bit field covered by it changed from `old` to `new`.
#[inline(always)]
pub fn csum_replace4(check: u16, old: u32, new: u32) -> u16 {
    !csum_fold(csum_diff4(u32::from(!check), old, new))
}

/// The checksum `check` after a 16-bit field covered by it changed from `old` to `new`.
#[inline(always)]
pub fn csum_replace2(check: u16, old: u16, new: u16) -> u16 {
    !csum_fold(csum_diff2(u32::from(!check), old, new))
}

/// Like [`csum_replace4`]/[`csum_replace2`] for a UDP checksum: 0 means "no checksum" and is
/// kept, and a computed 0 is sent as 0xffff (RFC 768).
#[inline(always)]
pub fn csum_udp_fixup(old_check: u16, new_check: u16) -> u16 {
    if old_check == 0 {
        0
    } else if new_check == 0 {
        0xffff
    } else {
        new_check
    }
}
