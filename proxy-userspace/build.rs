//! Builds the eBPF crate for `bpfel-unknown-none` and leaves the object in OUT_DIR, where
//! `include_bytes_aligned!` embeds it into the kproxy binary.
//!
//! The eBPF build needs `-Z build-std=core`; on these machines only Debian's toolchain has the
//! library sources, registered with rustup as `debian-bpf` by `cargo xtask setup`.

use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let toolchain = std::env::var("KPROXY_EBPF_TOOLCHAIN").unwrap_or_else(|_| "debian-bpf".into());
    println!("cargo:rerun-if-env-changed=KPROXY_EBPF_TOOLCHAIN");
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../proxy-ebpf");
    aya_build::build_ebpf(
        [Package {
            name: "proxy-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
}
