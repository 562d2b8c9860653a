//! This network namespace's interfaces and IPv4 addresses, and CIDR matching.

use std::{
    collections::BTreeSet,
    ffi::CStr,
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

/// The interface the userspace mode puts service addresses on (like kube-proxy IPVS's
/// `kube-ipvs0`): its addresses are not node addresses.
pub const RELAY_INTERFACE: &str = "kproxy0";

/// An IPv4 prefix such as `10.244.0.0/16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Cidr {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
}

impl Ipv4Cidr {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        if self.prefix_len == 0 {
            return true;
        }
        let mask = u32::MAX << (32 - u32::from(self.prefix_len));
        (u32::from(ip) & mask) == (u32::from(self.address) & mask)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, len) = s.split_once('/').unwrap_or((s, "32"));
        let address: Ipv4Addr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv4 CIDR (address {addr:?} is invalid)"))?;
        let prefix_len: u8 = len
            .trim()
            .parse()
            .ok()
            .filter(|l| *l <= 32)
            .ok_or_else(|| format!("{s:?} is not an IPv4 CIDR (prefix length {len:?})"))?;
        Ok(Self {
            address,
            prefix_len,
        })
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix_len)
    }
}

/// An IPv4 address held by an interface of this network namespace.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct InterfaceAddress {
    pub interface: String,
    pub address: Ipv4Addr,
}

/// Every IPv4 address of every interface in this network namespace (getifaddrs).
pub fn interface_addresses() -> std::io::Result<Vec<InterfaceAddress>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr whose family we check first.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        if family != libc::AF_INET {
            continue;
        }
        // SAFETY: AF_INET addresses are sockaddr_in.
        let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
        let address = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let interface = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        out.push(InterfaceAddress { interface, address });
    }
    // SAFETY: `head` came from getifaddrs.
    unsafe { libc::freeifaddrs(head) };
    out.sort();
    Ok(out)
}

/// The global IPv6 addresses of this network namespace (sorted; no loopback, link-local or
/// v4-mapped addresses: none of them can take a nodePort from another host; none of the
/// userspace mode's relay interface, which are service addresses).
pub fn interface_addresses6() -> std::io::Result<Vec<Ipv6Addr>> {
    global_addresses6(|interface| interface != RELAY_INTERFACE)
}

/// The global IPv6 addresses of the userspace mode's relay interface (sorted).
pub fn relay_interface_addresses6() -> std::io::Result<Vec<Ipv6Addr>> {
    global_addresses6(|interface| interface == RELAY_INTERFACE)
}

/// The global IPv6 addresses of the interfaces whose name passes `keep` (sorted).
fn global_addresses6(keep: impl Fn(&str) -> bool) -> std::io::Result<Vec<Ipv6Addr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = BTreeSet::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr whose family we check first.
        if i32::from(unsafe { (*ifa.ifa_addr).sa_family }) != libc::AF_INET6 {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string of the list getifaddrs returned.
        let interface = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        if !keep(&interface.to_string_lossy()) {
            continue;
        }
        // SAFETY: AF_INET6 addresses are sockaddr_in6.
        let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
        let address = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
        let link_local = address.segments()[0] & 0xffc0 == 0xfe80;
        if !address.is_loopback() && !link_local && address.to_ipv4_mapped().is_none() {
            out.insert(address);
        }
    }
    // SAFETY: `head` came from getifaddrs.
    unsafe { libc::freeifaddrs(head) };
    Ok(out.into_iter().collect())
}

/// The interfaces that carry node traffic: those with an address that is not loopback and
/// not inside the pod range.
pub fn default_devices(
    addresses: &[InterfaceAddress],
    cluster_cidr: Option<Ipv4Cidr>,
) -> Vec<String> {
    let devices: BTreeSet<String> = addresses
        .iter()
        .filter(|a| !a.address.is_loopback() && a.interface != RELAY_INTERFACE)
        .filter(|a| !cluster_cidr.is_some_and(|c| c.contains(a.address)))
        .map(|a| a.interface.clone())
        .collect();
    devices.into_iter().collect()
}

/// The node addresses that serve nodePorts: all addresses, or those inside the given CIDRs.
pub fn nodeport_addresses(addresses: &[InterfaceAddress], filter: &[Ipv4Cidr]) -> Vec<Ipv4Addr> {
    let set: BTreeSet<Ipv4Addr> = addresses
        .iter()
        .filter(|a| a.interface != RELAY_INTERFACE)
        .map(|a| a.address)
        .filter(|ip| filter.is_empty() || filter.iter().any(|c| c.contains(*ip)))
        .collect();
    set.into_iter().collect()
}

/// Every interface of this network namespace: (name, ifindex), by name.
pub fn interfaces() -> Vec<(String, u32)> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns an array ended by a zero entry, freed below.
    let head = unsafe { libc::if_nameindex() };
    if head.is_null() {
        return out;
    }
    let mut cur = head;
    loop {
        // SAFETY: `cur` is within the array (the zero entry ends the loop).
        let e = unsafe { &*cur };
        if e.if_index == 0 || e.if_name.is_null() {
            break;
        }
        // SAFETY: if_name is a NUL-terminated string owned by the array.
        let name = unsafe { CStr::from_ptr(e.if_name) }
            .to_string_lossy()
            .into_owned();
        out.push((name, e.if_index));
        // SAFETY: the array goes on until its zero entry.
        cur = unsafe { cur.add(1) };
    }
    // SAFETY: `head` came from if_nameindex.
    unsafe { libc::if_freenameindex(head) };
    out.sort();
    out
}

/// Whether `--devices` entry `selector` names `device`: the exact name, or a prefix ending in
/// `*` or `+` (`eth*` matches eth0, eth1, ...).
pub fn device_matches(selector: &str, device: &str) -> bool {
    match selector.strip_suffix(['*', '+']) {
        Some(prefix) => device.starts_with(prefix),
        None => selector == device,
    }
}

/// The node's devices now, as (name, ifindex): the interfaces `--devices` selects, or without
/// it those holding node addresses (not loopback, not inside the pod range). Re-evaluated
/// while running, so devices added, removed or renamed are followed.
pub fn select_devices(
    selectors: &[String],
    addresses: &[InterfaceAddress],
    cluster_cidr: Option<Ipv4Cidr>,
) -> Vec<(String, u32)> {
    let all = interfaces();
    if selectors.is_empty() {
        let names = default_devices(addresses, cluster_cidr);
        return all.into_iter().filter(|(n, _)| names.contains(n)).collect();
    }
    all.into_iter()
        .filter(|(n, _)| selectors.iter().any(|s| device_matches(s, n)))
        .collect()
}

/// The interface index of `name`, or None if it does not exist.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: `c` is a valid C string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (index != 0).then_some(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parses_and_matches() {
        let c: Ipv4Cidr = "10.244.0.0/16".parse().unwrap();
        assert!(c.contains("10.244.3.4".parse().unwrap()));
        assert!(!c.contains("10.245.0.1".parse().unwrap()));
        let host: Ipv4Cidr = "198.18.0.1".parse().unwrap();
        assert_eq!(host.prefix_len, 32);
        assert!("10.0.0.0/33".parse::<Ipv4Cidr>().is_err());
        assert!("nonsense/8".parse::<Ipv4Cidr>().is_err());
        assert!(
            "0.0.0.0/0"
                .parse::<Ipv4Cidr>()
                .unwrap()
                .contains(Ipv4Addr::BROADCAST)
        );
    }

    #[test]
    fn device_selectors() {
        assert!(device_matches("eth0", "eth0"));
        assert!(!device_matches("eth0", "eth01"));
        assert!(device_matches("eth*", "eth12"));
        assert!(device_matches("up+", "up1"));
        assert!(!device_matches("up*", "eth0"));
        let lo = interfaces();
        assert!(lo.iter().any(|(n, i)| n == "lo" && *i > 0), "{lo:?}");
        assert_eq!(
            select_devices(&["l*".into()], &[], None),
            lo.into_iter()
                .filter(|(n, _)| n.starts_with('l'))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn devices_skip_loopback_and_pod_gateways() {
        let addrs = vec![
            InterfaceAddress {
                interface: "lo".into(),
                address: Ipv4Addr::LOCALHOST,
            },
            InterfaceAddress {
                interface: "eth0".into(),
                address: "198.18.0.1".parse().unwrap(),
            },
            InterfaceAddress {
                interface: "p-a".into(),
                address: "10.244.1.1".parse().unwrap(),
            },
        ];
        let cidr = Some("10.244.0.0/16".parse().unwrap());
        assert_eq!(default_devices(&addrs, cidr), vec!["eth0".to_string()]);
        let only_lan = ["198.18.0.0/24".parse().unwrap()];
        assert_eq!(
            nodeport_addresses(&addrs, &only_lan),
            vec!["198.18.0.1".parse::<Ipv4Addr>().unwrap()]
        );
        assert_eq!(nodeport_addresses(&addrs, &[]).len(), 3);
    }
}
