//! Maglev consistent hashing for traffic entering the node (nodePort, externalIP, LoadBalancer).
//!
//! Each external frontend has a lookup table of `M` backend ids (M prime, the same on every
//! node). The agent computes it from the backends' identities (address:port) with the Maglev
//! paper's permutation, so every node that has the same backends picks the same backend for a
//! flow, and a backend change moves only about 1/N of the flows. The datapath hashes the flow
//! ([`lb4_flow_hash`]) and reads `table[hash % M]`.
//!
//! A table of 16381 ids is 64 KiB; kernel map values that large need high-order allocations,
//! so a table is stored as rows of [`MAGLEV_ROW_LEN`] ids (one map value each, under 4 KiB),
//! keyed by (reverse-NAT index, row). M is a runtime setting (`--maglev-table-size`) read
//! from [`crate::maps::MAGLEV_CONFIG`]; 0 there means "no Maglev" (random selection).

/// Backend ids per map value: 4000 bytes, so one value plus the kernel's element header fits
/// a 4 KiB slab object.
pub const MAGLEV_ROW_LEN: usize = 1000;

/// The default table size (Cilium's): ~160 backends per frontend at <= 1 % imbalance.
pub const MAGLEV_TABLE_SIZE_DEFAULT: u32 = 16_381;
/// Largest accepted table size (Cilium's upper bound).
pub const MAGLEV_TABLE_SIZE_MAX: u32 = 131_071;

/// Key of one row of a frontend's table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MaglevKey {
    /// The frontend's reverse-NAT index.
    pub rev_nat_index: u16,
    /// Row number: table positions `row * MAGLEV_ROW_LEN ..`.
    pub row: u16,
}

/// One row of a table: backend ids (host order); 0 = none (the datapath falls back to
/// random selection). The last row of a table is padded with zeros.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevRow {
    pub backend_ids: [u32; MAGLEV_ROW_LEN],
}

/// Rows a table of `m` entries takes.
pub const fn maglev_rows(m: u32) -> u32 {
    m.div_ceil(MAGLEV_ROW_LEN as u32)
}

/// The table settings, one entry of the config array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MaglevConfig {
    /// The table size M; 0 = Maglev off (random selection everywhere).
    pub table_size: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `repr(C)` data without padding; every bit pattern is valid.
    unsafe impl aya::Pod for super::MaglevKey {}
    unsafe impl aya::Pod for super::MaglevRow {}
    unsafe impl aya::Pod for super::MaglevConfig {}
}

const _: () = assert!(core::mem::size_of::<MaglevKey>() == 4);
const _: () = assert!(core::mem::size_of::<MaglevRow>() == 4 * MAGLEV_ROW_LEN);
const _: () = assert!(core::mem::size_of::<MaglevConfig>() == 4);

const JHASH_INITVAL: u32 = 0xdead_beef;

/// Bob Jenkins' final mix (the kernel's `__jhash_final`).
#[inline(always)]
const fn jhash_final(mut a: u32, mut b: u32, mut c: u32) -> u32 {
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(14));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(11));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(25));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(16));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(4));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(14));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(24));
    c
}

/// The kernel's `jhash_3words`.
#[inline(always)]
pub const fn jhash_3words(a: u32, b: u32, c: u32, initval: u32) -> u32 {
    let iv = JHASH_INITVAL.wrapping_add(initval).wrapping_add(3 << 2);
    jhash_final(a.wrapping_add(iv), b.wrapping_add(iv), c.wrapping_add(iv))
}

/// The flow hash that indexes a Maglev table. `frontend_be` is the frontend's key address
/// (0 for a nodePort), not the packet's destination, so that every node of a nodePort picks
/// the same backend for a client's flow. Addresses and ports as the packet carries them (be).
#[inline(always)]
pub const fn lb4_flow_hash(
    saddr_be: u32,
    frontend_be: u32,
    sport_be: u16,
    dport_be: u16,
    proto: u8,
) -> u32 {
    let ports = ((sport_be as u32) << 16) | dport_be as u32;
    jhash_3words(saddr_be, frontend_be ^ proto as u32, ports, 0)
}
