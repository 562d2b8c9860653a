//! The command line, named after kube-proxy's flags where the meaning is the same.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
};

use clap::{Parser, Subcommand, ValueEnum};

use crate::{
    inspect::trace::{AnyDestination, AnySource},
    netdev::Ipv4Cidr,
};

#[derive(Debug, Parser)]
#[command(name = "kproxy", version, about = "An eBPF kube-proxy replacement")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size of `RunArgs` does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent: watch Services and EndpointSlices and program the dataplane.
    Run(RunArgs),
    /// Remove everything kproxy installed under a bpf root (programs, links, pins) and exit.
    Cleanup(CleanupArgs),
    /// List what the dataplane holds, read from the pinned maps (the agent need not run).
    #[command(subcommand)]
    List(ListCommand),
    /// Show what is installed under a bpf root: links and programs, map fill levels,
    /// readiness, problems found; with --healthz-address also the agent's own view.
    Status(StatusArgs),
    /// Tell which frontend a flow matches and which backend it gets, and why.
    ///
    /// Example: kproxy trace 198.18.0.100:40000 198.18.0.1:30001/tcp
    Trace(TraceArgs),
    /// Print a completion script for a shell (e.g. `kproxy completions bash > /etc/bash_completion.d/kproxy`).
    Completions(CompletionsArgs),
    /// Print the man page (roff) to stdout (e.g. `kproxy man | man -l -`).
    Man,
}

#[derive(Debug, Subcommand)]
pub enum ListCommand {
    /// Frontends (address:port/proto), their type flags, reverse-NAT index and backends.
    Services(InspectArgs),
    /// Backends by id, with the frontend each belongs to.
    Backends(InspectArgs),
    /// Flows translated by the device programs (CT4) and their reply translations (NAT4_REV).
    Conntrack(ConntrackArgs),
    /// Session-affinity entries of the eBPF mode: client (address or netns), frontend,
    /// backend, age, state (the rule modes keep theirs in netfilter: says where).
    Affinity(InspectArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns for humans.
    Table,
    /// JSON for scripts.
    Json,
}

/// What every inspection command takes.
#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// The pin directory of the agent to inspect (its `run --bpf-root`).
    #[arg(long, value_name = "PATH", default_value = "/sys/fs/bpf/kproxy")]
    pub bpf_root: PathBuf,

    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

#[derive(Debug, clap::Args)]
pub struct ConntrackArgs {
    #[command(flatten)]
    pub common: InspectArgs,

    /// Only flows to this frontend (as the client addressed it, or `0.0.0.0:NODEPORT` for a
    /// nodePort on any node address).
    #[arg(long, value_name = "ADDR:PORT")]
    pub service: Option<SocketAddrV4>,

    /// Only flows to this backend address.
    #[arg(long, value_name = "ADDR")]
    pub backend: Option<Ipv4Addr>,

    /// Only flows from this client address.
    #[arg(long, value_name = "ADDR")]
    pub client: Option<Ipv4Addr>,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub common: InspectArgs,

    /// Also ask the agent's `/healthz` at this address (its `--healthz-bind-address`)
    /// whether it considers itself synced.
    #[arg(long, value_name = "ADDR:PORT")]
    pub healthz_address: Option<SocketAddr>,
}

#[derive(Debug, clap::Args)]
pub struct TraceArgs {
    #[command(flatten)]
    pub common: InspectArgs,

    /// The client: ADDR[:PORT] (IPv6: ADDR or [ADDR]:PORT). With a port, an existing
    /// conntrack entry of that exact IPv4 flow is found.
    #[arg(value_name = "SRC")]
    pub src: AnySource,

    /// The destination: ADDR:PORT[/tcp|udp|sctp] (tcp if omitted); IPv6 as [ADDR]:PORT,
    /// traced through the IPv6 socket-level frontends.
    #[arg(value_name = "DST:PORT/PROTO")]
    pub dst: AnyDestination,
}

#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProxyMode {
    /// The best mode this host supports: eBPF, else nftables, else iptables, else userspace.
    Auto,
    /// Socket-level load balancing on the cgroup, XDP/tc on the devices.
    Ebpf,
    /// One nftables table with verdict maps (first-packet cost independent of the number of
    /// Services).
    Nftables,
    /// kube-proxy's iptables layout under `KPROXY-` chains.
    Iptables,
    /// The agent relays connections itself (service addresses on the `kproxy0` interface).
    /// The slowest mode, and backends see the node's address instead of the client's.
    Userspace,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// A YAML file, or a directory of YAML files, holding v1 Service, discovery.k8s.io/v1
    /// EndpointSlice and v1 Node objects (multi-document). Re-read on change.
    #[arg(long, value_name = "PATH")]
    pub manifests: Option<PathBuf>,

    /// A kubeconfig for the Kubernetes API source (used when --manifests is not given).
    /// Default: the in-cluster service account, else $KUBECONFIG / ~/.kube/config.
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,

    /// The shortest time between two syncs of the dataplane: changes arriving closer together
    /// are applied together.
    #[arg(long, value_name = "DURATION", default_value = "10ms", value_parser = parse_duration)]
    pub min_sync_period: std::time::Duration,

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

    /// `/healthz` (200 once the first full sync is programmed) and `/livez`. Localhost only
    /// unless set: pass `0.0.0.0:10256` for a load balancer's or the kubelet's checks.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:10256")]
    pub healthz_bind_address: SocketAddr,

    /// Prometheus metrics on `/metrics`.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:10249")]
    pub metrics_bind_address: SocketAddr,

    /// Forward translated packets straight from XDP (`bpf_fib_lookup` + XDP_TX/redirect)
    /// instead of passing them to the kernel's stack.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub xdp_fib_forward: bool,

    /// The eBPF mode's program on the devices' ingress: `xdp` (native XDP, tc where it cannot
    /// attach) or `tc` (always tc; e.g. on veth devices, where native XDP costs a copy per
    /// packet).
    #[arg(long, value_enum, default_value_t = DeviceIngress::Xdp)]
    pub device_ingress: DeviceIngress,

    /// With tc on a device's ingress: deliver translated packets for a pod on this node
    /// straight into the pod's network namespace (`bpf_redirect_peer` into its veth or netkit
    /// device, kernel >= 5.10), skipping the host end's transmit and the backlog queue. Off:
    /// `bpf_redirect` to the host end, as before. Needs `--xdp-fib-forward`.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub tc_redirect_peer: bool,

    /// How the eBPF mode picks a backend for traffic entering the node (nodePort, externalIP,
    /// LoadBalancer): `maglev` (consistent hashing: every node picks the same backend for a
    /// flow) or `random`. Socket-level load balancing is always random.
    #[arg(long, value_enum, default_value_t = LbAlgorithm::Maglev)]
    pub lb_algorithm: LbAlgorithm,

    /// Entries of each frontend's Maglev table: a prime (more entries, more even spread,
    /// 4 bytes each per external frontend).
    #[arg(long, value_name = "PRIME", default_value_t = proxy_common::maglev::MAGLEV_TABLE_SIZE_DEFAULT,
          value_parser = parse_maglev_table_size)]
    pub maglev_table_size: u32,

    /// Capacity of the device programs' conntrack and reverse-NAT maps (LRU: when full, the
    /// least recently used flows are evicted). Pinned maps of another size are rebuilt at
    /// start with their flows copied over.
    #[arg(long, value_name = "ENTRIES", default_value_t = proxy_common::maps::CT4_MAX,
          value_parser = clap::value_parser!(u32).range(256..=16_777_216))]
    pub ct_max: u32,

    /// Capacity of the service and backend maps of each family (Cilium's
    /// `--bpf-lb-map-max`). A frontend takes one entry plus one per backend. Frontends that
    /// do not fit are not programmed and are logged by name (those already programmed keep
    /// their place); pinned maps of another size are rebuilt at start.
    #[arg(long, value_name = "ENTRIES", default_value_t = proxy_common::maps::LB4_SERVICES_MAX,
          value_parser = clap::value_parser!(u32).range(16..=4_194_304))]
    pub lb_map_max: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceIngress {
    Xdp,
    Tc,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LbAlgorithm {
    /// Maglev consistent hashing (Eisenbud et al., 2016).
    Maglev,
    /// A random backend per new flow.
    Random,
}

fn parse_maglev_table_size(s: &str) -> Result<u32, String> {
    let m: u32 = s
        .parse()
        .map_err(|e| format!("--maglev-table-size {s:?}: {e}"))?;
    crate::dataplane::ebpf::maglev::validate_table_size(m)
}

#[derive(Debug, clap::Args)]
pub struct CleanupArgs {
    /// The pin directory of the agent to clean up.
    #[arg(long, value_name = "PATH", default_value = "/sys/fs/bpf/kproxy")]
    pub bpf_root: PathBuf,
}

/// Parses `250ms`, `1s`, `2m` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 100ms, 1s)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m)")),
    };
    if !(0.0..=3600.0).contains(&secs) {
        return Err(format!("{s:?} is out of range (0 to 1h)"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}
