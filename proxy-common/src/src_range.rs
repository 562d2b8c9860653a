//! `loadBalancerSourceRanges`: the source prefixes a frontend accepts, as an LPM trie keyed
//! by (reverse-NAT index, source prefix), like Cilium's `LB4_SRC_RANGE` map.
//!
//! The trie's key is `prefix_len` (u32, host order) followed by this data; `prefix_len`
//! counts bits of the data, so a range `a.b.c.d/n` of index `i` is stored with
//! `prefix_len = SRC_RANGE_INDEX_BITS + n` and always matches the whole index.

/// Bits of [`Lb4SrcRangeKey`] before the address (index and padding).
pub const SRC_RANGE_INDEX_BITS: u32 = 32;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lb4SrcRangeKey {
    /// The frontend's reverse-NAT index. Compared bytewise by the trie: any fixed byte order
    /// works as long as both sides use it (host order here).
    pub rev_nat_index: u16,
    pub _pad: u16,
    /// be: the source prefix (host bits cleared).
    pub address: u32,
}

impl Lb4SrcRangeKey {
    pub const fn new(rev_nat_index: u16, address_be: u32) -> Self {
        Self {
            rev_nat_index,
            _pad: 0,
            address: address_be,
        }
    }
}

/// The IPv6 twin of [`Lb4SrcRangeKey`] (map `KP_SRCR6_V1`): a range `a::/n` of index `i` is
/// stored with `prefix_len = SRC_RANGE_INDEX_BITS + n`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lb6SrcRangeKey {
    /// The IPv6 frontend's reverse-NAT index (host order, as IPv4's).
    pub rev_nat_index: u16,
    pub _pad: u16,
    /// be words: the source prefix (host bits cleared).
    pub address: [u32; 4],
}

impl Lb6SrcRangeKey {
    pub const fn new(rev_nat_index: u16, address_be: [u32; 4]) -> Self {
        Self {
            rev_nat_index,
            _pad: 0,
            address: address_be,
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `repr(C)` data with explicit padding.
    unsafe impl aya::Pod for super::Lb4SrcRangeKey {}
    unsafe impl aya::Pod for super::Lb6SrcRangeKey {}
}

const _: () = assert!(core::mem::size_of::<Lb4SrcRangeKey>() == 8);
const _: () = assert!(core::mem::size_of::<Lb6SrcRangeKey>() == 20);
