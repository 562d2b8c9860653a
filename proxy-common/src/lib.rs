//! Map keys, values and constants shared by the kernel programs (`proxy-ebpf`) and the
//! userspace agent (`proxy-userspace`).
//!
//! Rules for every type here: `#[repr(C)]`, explicit padding fields (padding bytes would be
//! uninitialised and make hash keys miss), no `bool`/`Option`/enums, and a size assertion.
//! Byte order is stated per field: "be" fields hold network byte order exactly as the
//! packet carries them; everything else is host order.
#![no_std]

pub mod affinity;
pub mod config;
pub mod conntrack;
pub mod conntrack6;
pub mod crc32c;
pub mod devices;
pub mod lb;
pub mod lb6;
pub mod maglev;
pub mod maps;
pub mod sock;
pub mod sock6;
pub mod src_range;
pub mod stats;
