//! Node-wide settings the agent writes once per sync.

/// Source ports used when a flow must be SNATed to the node (backend on another node).
/// Kept above the kernel's default ephemeral range (32768-60999) and the nodePort range.
pub const SNAT_PORT_MIN: u16 = 61_000;
pub const SNAT_PORT_MAX: u16 = 65_535;

/// Set once the agent has programmed its first full sync; until then the programs translate
/// nothing (an empty map must not make every service refuse).
pub const CFG_FLAG_READY: u32 = 1 << 0;
/// Send forwarded packets with `bpf_fib_lookup` + `XDP_TX`/redirect instead of passing them
/// to the kernel's stack.
pub const CFG_FLAG_XDP_FIB_FORWARD: u32 = 1 << 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Lb4Config {
    /// CFG_FLAG_*.
    pub flags: u32,
    pub snat_port_min: u16,
    pub snat_port_max: u16,
}

#[cfg(feature = "user")]
// SAFETY: plain `repr(C)` data without padding.
unsafe impl aya::Pod for Lb4Config {}

const _: () = assert!(core::mem::size_of::<Lb4Config>() == 8);
