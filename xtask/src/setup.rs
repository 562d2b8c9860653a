//! `cargo xtask setup`: what a fresh machine needs, installed idempotently. Each step checks
//! first, so a machine that has everything is done in well under a second.

use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

use crate::run;

/// Debian's complete Rust toolchain (with library sources for -Z build-std), registered with
/// rustup under this name; rustup itself cannot download rust-src here.
pub const EBPF_TOOLCHAIN: &str = "debian-bpf";

/// Debian packages: the eBPF build toolchain, then what the tests and the demo run.
const PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "bpftool",
    "iproute2",
    "ethtool",
    "iptables",
    "nftables",
    "conntrack",
    "nginx-light",
    "curl",
    "socat",
    "iperf3",
];

fn quiet(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn missing_packages() -> Vec<&'static str> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${Package} ${Status}\n"])
        .args(PACKAGES)
        .output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !text
                .lines()
                .any(|l| l.starts_with(&format!("{p} ")) && l.ends_with("install ok installed"))
        })
        .collect()
}

pub fn setup() -> anyhow::Result<()> {
    let missing = missing_packages();
    if !missing.is_empty() {
        eprintln!(
            "xtask setup: installing Debian packages: {}",
            missing.join(" ")
        );
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }

    if !quiet(Command::new("bpf-linker").arg("--version")) {
        eprintln!("xtask setup: building bpf-linker against Debian's LLVM 22 (about a minute)");
        let path = std::env::var("PATH").unwrap_or_default();
        run(Command::new("cargo")
            .args(["install", "bpf-linker", "--version", "0.13.0"])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .env("PATH", format!("/usr/lib/llvm-22/bin:{path}")))?;
    }

    let toolchains = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("rustup is needed (it runs Debian's toolchain for the eBPF build)")?;
    let listed = String::from_utf8_lossy(&toolchains.stdout);
    if !listed.lines().any(|l| l.starts_with(EBPF_TOOLCHAIN)) {
        eprintln!(
            "xtask setup: registering Debian's Rust toolchain with rustup as {EBPF_TOOLCHAIN}"
        );
        run(Command::new("rustup").args(["toolchain", "link", EBPF_TOOLCHAIN, "/usr"]))?;
    }
    // deploy/ is validated against the Kubernetes schemas this PyPI package ships (offline).
    if !quiet(Command::new("python3").args(["-m", "kubernetes_validate", "--version"])) {
        eprintln!("xtask setup: installing kubernetes-validate (PyPI)");
        let pip = ["-m", "pip", "install", "-q", "kubernetes-validate"];
        if !quiet(Command::new("python3").args(pip)) {
            run(Command::new("python3")
                .args(pip)
                .arg("--break-system-packages"))?;
        }
    }
    if !std::path::Path::new("/usr/lib/rustlib/src/rust/library/core").exists() {
        bail!(
            "Debian's rust-web-src did not install the library sources under /usr/lib/rustlib/src"
        );
    }
    Ok(())
}
