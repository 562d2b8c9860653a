//! The command line, named after kube-proxy's flags where the meaning is the same.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand, ValueEnum};

use crate::netdev::Ipv4Cidr;

#[derive(Debug, Parser)]
#[command(name = "kproxy", version, about = "An eBPF kube-proxy replacement")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent: watch Services and EndpointSlices and program the dataplane.
    Run(RunArgs),
    /// Remove everything kproxy installed under a bpf root (programs, links, pins) and exit.
    Cleanup(CleanupArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProxyMode {
    /// The best mode this host supports (today: eBPF).
    Auto,
    /// Socket-level load balancing on the cgroup, XDP/tc on the devices.
    Ebpf,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// A YAML file, or a directory of YAML files, holding v1 Service, discovery.k8s.io/v1
    /// EndpointSlice and v1 Node objects (multi-document). Re-read on change.
    #[arg(long, value_name = "PATH")]
    pub manifests: Option<PathBuf>,

    /// This node's name, matched against EndpointSlice endpoints' `nodeName`.
    /// Default: the host name.
    #[arg(long, value_name = "NAME")]
    pub hostname_override: Option<String>,

    #[arg(long, value_enum, default_value_t = ProxyMode::Auto)]
    pub proxy_mode: ProxyMode,

    /// The pod address range. Node addresses inside it (pod gateways) are not node devices.
    #[arg(long, value_name = "CIDR")]
    pub cluster_cidr: Option<Ipv4Cidr>,

    /// Node addresses that serve nodePorts, as CIDRs. Default: every address of this
    /// network namespace.
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',')]
    pub nodeport_addresses: Vec<Ipv4Cidr>,

    /// Interfaces that get the programs for traffic entering the node. Default: the
    /// interfaces holding node addresses (not loopback, not inside --cluster-cidr).
    #[arg(long, value_name = "IF,...", value_delimiter = ',')]
    pub devices: Vec<String>,

    /// The cgroup v2 directory whose processes get socket-level load balancing.
    /// Default: the cgroup2 mount.
    #[arg(long, value_name = "PATH")]
    pub cgroup_root: Option<PathBuf>,

    /// Where maps and program links are pinned (bpffs is mounted there if it is not one).
    #[arg(long, value_name = "PATH", default_value = "/sys/fs/bpf/kproxy")]
    pub bpf_root: PathBuf,

    /// `/healthz` (200 once the first full sync is programmed) and `/livez`.
    #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:10256")]
    pub healthz_bind_address: SocketAddr,

    /// Prometheus metrics on `/metrics`.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:10249")]
    pub metrics_bind_address: SocketAddr,

    /// Forward translated packets straight from XDP (`bpf_fib_lookup` + XDP_TX/redirect)
    /// instead of passing them to the kernel's stack.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub xdp_fib_forward: bool,
}

#[derive(Debug, clap::Args)]
pub struct CleanupArgs {
    /// The pin directory of the agent to clean up.
    #[arg(long, value_name = "PATH", default_value = "/sys/fs/bpf/kproxy")]
    pub bpf_root: PathBuf,
}
