//! Choosing the dataplane: `--proxy-mode auto` tries eBPF, then nftables, then iptables, then
//! the userspace relay, and
//! says in one line which mode it chose and why the better ones were not usable. Whatever
//! mode starts, the artifacts of the other modes are removed, so switching modes between runs
//! leaves nothing behind.

use anyhow::{Context as _, bail};

use crate::{
    cli::ProxyMode,
    dataplane::{
        Dataplane,
        ebpf::{EbpfDataplane, EbpfSettings, cleanup as ebpf_cleanup},
        iptables::{self, IptablesDataplane, IptablesSettings},
        nftables::{self, NftablesDataplane, NftablesSettings},
        userspace::{self, UserspaceDataplane},
    },
    netdev::Ipv4Cidr,
};

pub struct ModeInputs {
    pub ebpf: EbpfSettings,
    pub cluster_cidr: Option<Ipv4Cidr>,
}

fn start_ebpf(inputs: &ModeInputs) -> anyhow::Result<Box<dyn Dataplane>> {
    Ok(Box::new(
        EbpfDataplane::start(inputs.ebpf.clone()).context("starting the eBPF dataplane")?,
    ))
}

fn start_nftables(inputs: &ModeInputs) -> anyhow::Result<Box<dyn Dataplane>> {
    let mut settings = NftablesSettings::default();
    settings.render.cluster_cidr = inputs.cluster_cidr;
    Ok(Box::new(NftablesDataplane::new(settings)?))
}

fn start_iptables(inputs: &ModeInputs) -> anyhow::Result<Box<dyn Dataplane>> {
    let mut settings = IptablesSettings::default();
    settings.render.cluster_cidr = inputs.cluster_cidr;
    Ok(Box::new(IptablesDataplane::new(settings)?))
}

fn start_userspace(_: &ModeInputs) -> anyhow::Result<Box<dyn Dataplane>> {
    Ok(Box::new(
        UserspaceDataplane::new().context("starting the userspace relay")?,
    ))
}

/// Removes what the modes other than `keep` left behind (from an earlier run in another mode).
fn remove_other_modes(keep: &str, inputs: &ModeInputs) {
    if keep != "ebpf" {
        match ebpf_cleanup::cleanup(&inputs.ebpf.bpf_root) {
            Ok(n) if n > 0 => tracing::info!(pins = n, "removed the eBPF mode's programs and maps"),
            Ok(_) => {}
            Err(e) => tracing::warn!("removing the eBPF mode's pins: {e:#}"),
        }
    }
    if keep != "nftables" {
        match nftables::cleanup() {
            Ok(true) => tracing::info!("removed the nftables mode's table"),
            Ok(false) => {}
            Err(e) => tracing::debug!("nftables cleanup: {e:#}"),
        }
    }
    if keep != "iptables" {
        match iptables::cleanup() {
            Ok(n) if n > 0 => tracing::info!(chains = n, "removed the iptables mode's chains"),
            Ok(_) => {}
            Err(e) => tracing::debug!("iptables cleanup: {e:#}"),
        }
    }
    if keep != "userspace" {
        match userspace::cleanup() {
            Ok(true) => tracing::info!("removed the userspace mode's interface"),
            Ok(false) => {}
            Err(e) => tracing::warn!("removing the userspace mode's interface: {e:#}"),
        }
    }
}

/// Starts the dataplane for `mode`.
pub fn start(mode: ProxyMode, inputs: &ModeInputs) -> anyhow::Result<Box<dyn Dataplane>> {
    type Starter = fn(&ModeInputs) -> anyhow::Result<Box<dyn Dataplane>>;
    let candidates: &[(&str, Starter)] = match mode {
        ProxyMode::Ebpf => &[("ebpf", start_ebpf)],
        ProxyMode::Nftables => &[("nftables", start_nftables)],
        ProxyMode::Iptables => &[("iptables", start_iptables)],
        ProxyMode::Userspace => &[("userspace", start_userspace)],
        ProxyMode::Auto => &[
            ("ebpf", start_ebpf),
            ("nftables", start_nftables),
            ("iptables", start_iptables),
            ("userspace", start_userspace),
        ],
    };
    let mut refused: Vec<String> = Vec::new();
    for (name, starter) in candidates {
        match starter(inputs) {
            Ok(dp) => {
                remove_other_modes(name, inputs);
                if refused.is_empty() {
                    tracing::info!(mode = name, "proxy mode {name} chosen");
                } else {
                    tracing::warn!(
                        mode = name,
                        "proxy mode {name} chosen; better modes are not usable here: {}",
                        refused.join("; ")
                    );
                }
                return Ok(dp);
            }
            Err(e) => refused.push(format!("{name}: {e:#}")),
        }
    }
    bail!("no usable proxy mode: {}", refused.join("; "))
}

/// `kproxy cleanup`: removes what every mode installed (eBPF pins and links under
/// `bpf_root`, the nftables table, the iptables chains, the userspace mode's interface) in
/// this network namespace.
/// Idempotent; fails only if something that exists could not be removed.
pub fn cleanup_all(bpf_root: &std::path::Path) -> anyhow::Result<()> {
    let pins = ebpf_cleanup::cleanup(bpf_root)
        .with_context(|| format!("removing the pins under {}", bpf_root.display()))?;
    // A host without nft or iptables has nothing of those modes to remove.
    let table = nftables::cleanup().unwrap_or_else(|e| {
        tracing::debug!("nftables cleanup: {e:#}");
        false
    });
    let chains = iptables::cleanup().unwrap_or_else(|e| {
        tracing::debug!("iptables cleanup: {e:#}");
        0
    });
    let relay_interface =
        userspace::cleanup().context("removing the userspace mode's interface")?;
    tracing::info!(
        pins,
        nftables_cleaned = table,
        iptables_chains_removed = chains,
        relay_interface_removed = relay_interface,
        bpf_root = %bpf_root.display(),
        "cleanup done"
    );
    Ok(())
}
