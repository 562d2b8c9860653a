//! `--proxy-mode userspace`: the agent relays connections itself, as the original
//! kube-proxy userspace mode did, for hosts with neither BPF nor a usable netfilter.
//!
//! - Cluster, external and LoadBalancer IPs (IPv4 and IPv6) are put on the agent's own
//!   interface ([`iface::RELAY_INTERFACE`]) so they are local addresses; the relay listens
//!   on them.
//! - NodePorts are plain listening sockets on every nodePort address of the node of the
//!   frontend's family (IPv6 frontends on the node's IPv6 addresses) and on 127.0.0.1 (so
//!   `localhost:<nodePort>` works, which the kernel modes cannot serve).
//! - A frontend without endpoints has no listener: the kernel refuses at once (TCP reset,
//!   ICMP port unreachable).
//! - Apply is incremental: each frontend's backend set is swapped as a whole
//!   ([`balancer::Balancer::swap`]); a frontend that did not change keeps its listener and
//!   connections; a removed backend gets no new flows and its relayed ones are closed.
//!
//! The one thing it cannot do: keep the client's source address (backends see the node).
//! It is also the slowest mode: every byte crosses the agent.

mod addresses;
pub mod balancer;
pub mod iface;
mod listen;
mod tcp;
mod udp;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::{AsRawFd as _, RawFd},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use tokio::{runtime::Handle, task::AbortHandle};

use self::{
    addresses::{ServiceAddresses, Watchdog},
    balancer::{BackendHandle, Balancer, Pool, SourceRange},
};
use super::{ApplyStats, Dataplane};
use crate::desired::{DesiredState, Frontend, Frontend6, FrontendKind, Protocol, ServicePortName};

pub use self::iface::cleanup;

type FrontendKey = (IpAddr, u16, Protocol);

/// A frontend of either family, as the relay serves it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RelayFrontend {
    service: ServicePortName,
    kind: FrontendKind,
    /// Unspecified (of the family) for a nodePort.
    address: IpAddr,
    port: u16,
    protocol: Protocol,
    backends: Vec<SocketAddr>,
    affinity_timeout: Option<u32>,
    source_ranges: Option<Vec<SourceRange>>,
}

impl RelayFrontend {
    fn key(&self) -> FrontendKey {
        (self.address, self.port, self.protocol)
    }
}

impl From<&Frontend> for RelayFrontend {
    fn from(f: &Frontend) -> Self {
        Self {
            service: f.service.clone(),
            kind: f.kind,
            address: IpAddr::V4(f.address),
            port: f.port,
            protocol: f.protocol,
            backends: f
                .backends
                .iter()
                .map(|b| SocketAddr::new(IpAddr::V4(b.address), b.port))
                .collect(),
            affinity_timeout: f.affinity_timeout,
            source_ranges: f
                .source_ranges
                .as_ref()
                .map(|r| r.iter().copied().map(SourceRange::V4).collect()),
        }
    }
}

impl From<&Frontend6> for RelayFrontend {
    fn from(f: &Frontend6) -> Self {
        Self {
            service: f.service.clone(),
            kind: f.kind,
            address: IpAddr::V6(f.address),
            port: f.port,
            protocol: f.protocol,
            backends: f
                .backends
                .iter()
                .map(|b| SocketAddr::new(IpAddr::V6(b.address), b.port))
                .collect(),
            affinity_timeout: f.affinity_timeout,
            source_ranges: f
                .source_ranges
                .as_ref()
                .map(|r| r.iter().copied().map(SourceRange::V6).collect()),
        }
    }
}

/// A warning logged at most every [`RateLimitedLog::EVERY`], with the count of the ones
/// left out (for per-connection failures, which can come in floods).
#[derive(Default)]
pub(crate) struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    const EVERY: Duration = Duration::from_secs(10);

    pub(crate) fn warn(&mut self, message: impl FnOnce() -> String) {
        if self.last.is_some_and(|t| t.elapsed() < Self::EVERY) {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(suppressed = self.suppressed, "{}", message());
        self.last = Some(Instant::now());
        self.suppressed = 0;
    }
}

/// A running accept or receive loop; dropping it stops the loop and closes its socket.
struct Listener {
    task: AbortHandle,
    /// A TCP listener's descriptor (owned by the task, which only ends when aborted).
    tcp_fd: Option<RawFd>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        // The aborted task drops its socket a moment later, on a runtime thread; shutting
        // the listener down first stops it listening now, so the kernel refuses new
        // connections at once and the address:port can be listened on again right away.
        if let Some(fd) = self.tcp_fd {
            // SAFETY: `fd` is still open: the task that owns it has not been aborted yet.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
        self.task.abort();
    }
}

/// The relay of one frontend.
struct Relay {
    frontend: Option<RelayFrontend>,
    balancer: Arc<Balancer>,
    backends: BTreeMap<SocketAddr, Arc<BackendHandle>>,
    listeners: BTreeMap<SocketAddr, Listener>,
    /// A node address is inside the frontend's source ranges (as last applied).
    node_in_ranges: bool,
}

impl Drop for Relay {
    fn drop(&mut self) {
        // The frontend is gone: its connections and sessions go with it.
        for b in self.backends.values() {
            b.retire();
        }
    }
}

fn label(f: &RelayFrontend) -> String {
    match (f.kind, f.address) {
        (FrontendKind::NodePort, IpAddr::V4(_)) => format!("{} nodePort {}", f.service, f.port),
        (FrontendKind::NodePort, IpAddr::V6(_)) => {
            format!("{} IPv6 nodePort {}", f.service, f.port)
        }
        (kind, address) => format!(
            "{} {kind:?} {}",
            f.service,
            SocketAddr::new(address, f.port)
        ),
    }
}

impl Relay {
    fn new(f: &RelayFrontend) -> Self {
        Self {
            frontend: None,
            balancer: Arc::new(Balancer::new(label(f), Pool::default())),
            backends: BTreeMap::new(),
            listeners: BTreeMap::new(),
            node_in_ranges: false,
        }
    }

    /// Swaps in the frontend's backend set if it changed; backends that left are retired.
    /// Returns whether anything changed.
    fn update_pool(&mut self, f: &RelayFrontend, node_addresses: &[IpAddr]) -> bool {
        let node_in_ranges = f.source_ranges.as_ref().is_some_and(|r| {
            node_addresses
                .iter()
                .any(|a| r.iter().any(|c| c.contains(*a)))
        });
        if self.frontend.as_ref() == Some(f) && self.node_in_ranges == node_in_ranges {
            return false;
        }
        self.node_in_ranges = node_in_ranges;
        let mut backends = BTreeMap::new();
        for addr in f.backends.iter().copied() {
            let handle = self
                .backends
                .remove(&addr)
                .unwrap_or_else(|| BackendHandle::new(addr));
            backends.insert(addr, handle);
        }
        let removed = std::mem::replace(&mut self.backends, backends);
        self.balancer.swap(Pool {
            backends: self.backends.values().cloned().collect(),
            affinity_timeout: f.affinity_timeout.map(|s| Duration::from_secs(s.into())),
            source_ranges: f.source_ranges.clone(),
            node_in_ranges,
        });
        // Retired after the swap, so no new flow picks them in between.
        for b in removed.values() {
            b.retire();
        }
        self.frontend = Some(f.clone());
        true
    }

    /// Opens the listeners the frontend needs and closes the others. Bind failures are
    /// pushed to `failures`; the next apply tries again. Returns the number of changes.
    fn update_listeners(
        &mut self,
        f: &RelayFrontend,
        nodeport_addresses: &BTreeSet<IpAddr>,
        failures: &mut Vec<String>,
    ) -> usize {
        let wanted: BTreeSet<SocketAddr> = if f.backends.is_empty() {
            BTreeSet::new()
        } else if f.kind == FrontendKind::NodePort {
            nodeport_addresses
                .iter()
                .filter(|ip| ip.is_ipv6() == f.address.is_ipv6())
                .map(|ip| SocketAddr::new(*ip, f.port))
                .collect()
        } else {
            BTreeSet::from([SocketAddr::new(f.address, f.port)])
        };
        let before = self.listeners.len();
        self.listeners.retain(|addr, _| wanted.contains(addr));
        let mut changes = before - self.listeners.len();
        for addr in wanted {
            if self.listeners.contains_key(&addr) {
                continue;
            }
            match self.listen(addr, f.protocol) {
                Ok(l) => {
                    self.listeners.insert(addr, l);
                    changes += 1;
                }
                Err(e) => failures.push(format!(
                    "{}: cannot listen on {addr}/{}: {e:#}",
                    self.balancer.label,
                    f.protocol.as_str()
                )),
            }
        }
        changes
    }

    /// Binds `addr` and starts its loop (inside the runtime the caller entered).
    fn listen(&self, addr: SocketAddr, protocol: Protocol) -> anyhow::Result<Listener> {
        let balancer = Arc::clone(&self.balancer);
        let (task, tcp_fd) = match protocol {
            Protocol::Tcp => {
                let l = tokio::net::TcpListener::from_std(listen::tcp(addr)?)?;
                let fd = l.as_raw_fd();
                (tokio::spawn(tcp::serve(l, balancer)), Some(fd))
            }
            Protocol::Udp => {
                // UDP sockets share the address (SO_REUSEADDR) while the old one goes.
                let s = tokio::net::UdpSocket::from_std(listen::udp(addr)?)?;
                (tokio::spawn(udp::serve(s, balancer)), None)
            }
            Protocol::Sctp => bail!("SCTP is not relayed"),
        };
        Ok(Listener {
            task: task.abort_handle(),
            tcp_fd,
        })
    }
}

/// Every relayed connection holds two sockets: lift the soft limit on open files to the hard
/// one (often 1024 vs 1M), as proxies do.
fn raise_open_files_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let old = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                tracing::debug!(from = old, to = lim.rlim_max, "raised the open files limit");
            }
        }
    }
}

pub struct UserspaceDataplane {
    runtime: Handle,
    addresses: Arc<ServiceAddresses>,
    relays: BTreeMap<FrontendKey, Relay>,
    _watchdog: Watchdog,
}

impl UserspaceDataplane {
    /// Creates (or adopts) the relay interface. Must be called inside the agent's tokio
    /// runtime, which runs the relay's tasks.
    pub fn new() -> anyhow::Result<Self> {
        let runtime =
            Handle::try_current().context("the userspace mode needs the agent's tokio runtime")?;
        iface::ensure()?;
        raise_open_files_limit();
        let addresses = Arc::new(ServiceAddresses::default());
        let watchdog = {
            let _runtime = runtime.enter();
            addresses::watch(Arc::clone(&addresses))
        };
        Ok(Self {
            runtime,
            addresses,
            relays: BTreeMap::new(),
            _watchdog: watchdog,
        })
    }
}

impl Dataplane for UserspaceDataplane {
    fn name(&self) -> &'static str {
        "userspace"
    }

    /// Every apply compares with the kernel's addresses and binds what is missing, so a full
    /// sync is no different from a partial one.
    fn apply(&mut self, desired: &DesiredState, _full: bool) -> anyhow::Result<ApplyStats> {
        let _runtime = self.runtime.enter();
        let mut stats = ApplyStats::default();
        let frontends: Vec<RelayFrontend> = desired
            .frontends
            .iter()
            .map(RelayFrontend::from)
            .chain(desired.frontends6.iter().map(RelayFrontend::from))
            .collect();
        let want_addresses: BTreeSet<IpAddr> = frontends
            .iter()
            .filter(|f| f.kind != FrontendKind::NodePort)
            .map(|f| f.address)
            .collect();
        // Addresses first: a listener can only bind an address the node has.
        stats.writes += self.addresses.add_missing(&want_addresses)?;

        let node_addresses: Vec<IpAddr> = desired
            .nodeport_addresses
            .iter()
            .copied()
            .map(IpAddr::V4)
            .chain(desired.nodeport_addresses6.iter().copied().map(IpAddr::V6))
            .collect();
        let mut nodeport_addresses: BTreeSet<IpAddr> = node_addresses.iter().copied().collect();
        nodeport_addresses.insert(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let wanted: BTreeSet<FrontendKey> = frontends.iter().map(RelayFrontend::key).collect();
        let before = self.relays.len();
        self.relays.retain(|key, _| wanted.contains(key));
        stats.deletes += before - self.relays.len();
        let mut failures = Vec::new();
        for f in &frontends {
            let relay = self.relays.entry(f.key()).or_insert_with(|| Relay::new(f));
            let is_new = relay.frontend.is_none();
            if f.protocol == Protocol::Sctp {
                if is_new {
                    stats.rejected.push(format!(
                        "{}: SCTP is not served in userspace mode",
                        label(f)
                    ));
                }
                relay.frontend = Some(f.clone());
                continue;
            }
            if relay.update_pool(f, &node_addresses) {
                stats.writes += 1;
            }
            stats.writes += relay.update_listeners(f, &nodeport_addresses, &mut failures);
        }

        // Addresses last: their listeners are closed by now.
        stats.deletes += self.addresses.remove_unwanted(&want_addresses)?;
        if !failures.is_empty() {
            bail!(
                "{} frontend listener(s) could not be opened (retried on the next sync): {}",
                failures.len(),
                failures.join("; ")
            );
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddrV4;

    use crate::desired::Backend;

    fn frontend(port: u16, backends: usize) -> RelayFrontend {
        RelayFrontend::from(&Frontend {
            service: ServicePortName {
                namespace: "default".into(),
                name: "web".into(),
                port: String::new(),
                protocol: Protocol::Tcp,
            },
            kind: FrontendKind::ClusterIp,
            address: Ipv4Addr::LOCALHOST,
            port,
            protocol: Protocol::Tcp,
            backends: (0..backends)
                .map(|i| Backend {
                    address: Ipv4Addr::LOCALHOST,
                    port: 1 + i as u16,
                    is_local: true,
                })
                .collect(),
            affinity_timeout: None,
            source_ranges: None,
        })
    }

    /// Endpoints go and come back within one sync period: the listener is closed (refusing
    /// at once) and opened again on the same address without "address in use".
    #[tokio::test]
    async fn a_closed_tcp_listener_refuses_at_once_and_its_address_is_free_again() {
        let port = {
            let probe = listen::tcp(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)))
                .expect("probe");
            probe.local_addr().expect("addr").port()
        };
        let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
        let served = frontend(port, 1);
        let mut relay = Relay::new(&served);
        let none = BTreeSet::new();
        for round in 0..20 {
            let mut failures = Vec::new();
            relay.update_pool(&served, &[]);
            relay.update_listeners(&served, &none, &mut failures);
            assert!(failures.is_empty(), "round {round}: {failures:?}");
            let gone = frontend(port, 0);
            relay.update_pool(&gone, &[]);
            relay.update_listeners(&gone, &none, &mut failures);
            let r = std::net::TcpStream::connect(addr);
            assert!(
                matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
                "round {round}: without endpoints the port refuses: {r:?}"
            );
        }
    }
}
