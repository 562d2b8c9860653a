//! kproxy's userspace agent as a library, so tests and tools can use its parts.

/// The eBPF object built by build.rs.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kproxy"));

pub mod agent;
pub mod bpffs;
pub mod cli;
pub mod dataplane;
pub mod desired;
pub mod desired_cache;
pub mod health;
pub mod healthcheck;
pub mod inspect;
pub mod links;
pub mod mode;
pub mod netdev;
pub mod netlink;

pub mod model;
pub mod source;
