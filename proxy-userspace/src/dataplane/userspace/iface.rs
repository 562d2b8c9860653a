//! The interface that holds the service addresses of the userspace mode (`kproxy0`), as
//! kube-proxy's IPVS mode holds them on `kube-ipvs0`: cluster, external and LoadBalancer IPs
//! become local addresses of the node, so the relay can listen on them and the kernel
//! delivers pods' and the host's packets to it. The link stays down: local addresses are
//! served whatever the link state, and a down link sends and answers nothing itself.
//!
//! Spoken over rtnetlink (NETLINK_ROUTE) directly, a few fixed messages, to keep
//! dependencies small. A kernel without the `dummy` driver gets an empty bridge instead
//! (equally inert for this use).

use std::{io, net::IpAddr};

use anyhow::{Context as _, bail};

use crate::{
    netdev,
    netlink::{NLMSG_HDR_LEN, NetlinkSocket, align4, message},
};

/// The name of the interface the userspace mode owns.
pub const RELAY_INTERFACE: &str = netdev::RELAY_INTERFACE;

const IFINFOMSG_LEN: usize = 16;
const IFADDRMSG_LEN: usize = 8;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_F_NODAD: u8 = 0x02;

fn put_attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(align4(buf.len()), 0);
}

fn put_nested(buf: &mut Vec<u8>, ty: u16, fill: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0; 4]);
    fill(buf);
    let len = (buf.len() - start) as u16;
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    buf[start + 2..start + 4].copy_from_slice(&ty.to_ne_bytes());
}

fn ifinfomsg(index: u32) -> Vec<u8> {
    let mut b = vec![0u8; IFINFOMSG_LEN];
    b[0] = libc::AF_UNSPEC as u8;
    b[4..8].copy_from_slice(&(index as i32).to_ne_bytes());
    b
}

/// A NETLINK_ROUTE socket doing one request at a time, each acknowledged.
struct Rtnl {
    sock: NetlinkSocket,
    seq: u32,
}

impl Rtnl {
    fn open() -> io::Result<Self> {
        Ok(Self {
            sock: NetlinkSocket::open(libc::NETLINK_ROUTE)?,
            seq: 0,
        })
    }

    /// Sends one request with NLM_F_ACK and returns the kernel's answer (Ok on ack).
    fn request(&mut self, msg_type: u16, flags: u16, body: &[u8]) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let flags = flags | libc::NLM_F_REQUEST as u16 | libc::NLM_F_ACK as u16;
        self.sock.send(&message(msg_type, flags, self.seq, body))?;
        let mut buf = vec![0u8; 8192];
        loop {
            let n = self.sock.recv(&mut buf)?;
            let mut rest = &buf[..n];
            while rest.len() >= NLMSG_HDR_LEN {
                let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap_or_default()) as usize;
                let ty = u16::from_ne_bytes(rest[4..6].try_into().unwrap_or_default());
                let seq = u32::from_ne_bytes(rest[8..12].try_into().unwrap_or_default());
                if len < NLMSG_HDR_LEN || len > rest.len() {
                    break;
                }
                if seq == self.seq && ty == libc::NLMSG_ERROR as u16 && len >= NLMSG_HDR_LEN + 4 {
                    let errno = i32::from_ne_bytes(
                        rest[NLMSG_HDR_LEN..NLMSG_HDR_LEN + 4]
                            .try_into()
                            .unwrap_or_default(),
                    );
                    return if errno == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::from_raw_os_error(-errno))
                    };
                }
                rest = &rest[align4(len).min(rest.len())..];
            }
        }
    }

    fn new_link(&mut self, name: &str, kind: &str) -> io::Result<()> {
        let mut body = ifinfomsg(0);
        let mut cname = name.as_bytes().to_vec();
        cname.push(0);
        put_attr(&mut body, IFLA_IFNAME, &cname);
        put_nested(&mut body, IFLA_LINKINFO, |b| {
            put_attr(b, IFLA_INFO_KIND, kind.as_bytes())
        });
        let flags = (libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16;
        self.request(libc::RTM_NEWLINK, flags, &body)
    }

    fn del_link(&mut self, index: u32) -> io::Result<()> {
        self.request(libc::RTM_DELLINK, 0, &ifinfomsg(index))
    }

    fn address(&mut self, msg_type: u16, flags: u16, index: u32, ip: IpAddr) -> io::Result<()> {
        let (family, prefix_len, octets) = match ip {
            IpAddr::V4(a) => (libc::AF_INET, 32, a.octets().to_vec()),
            IpAddr::V6(a) => (libc::AF_INET6, 128, a.octets().to_vec()),
        };
        let mut body = vec![0u8; IFADDRMSG_LEN];
        body[0] = family as u8;
        body[1] = prefix_len; // the address alone, no subnet route
        // IPv6: no duplicate address detection, which would leave the address tentative
        // (unusable) on the link that stays down.
        body[2] = if ip.is_ipv6() { IFA_F_NODAD } else { 0 };
        body[3] = libc::RT_SCOPE_UNIVERSE;
        body[4..8].copy_from_slice(&index.to_ne_bytes());
        put_attr(&mut body, IFA_LOCAL, &octets);
        put_attr(&mut body, IFA_ADDRESS, &octets);
        self.request(msg_type, flags, &body)
    }
}

/// The index of [`RELAY_INTERFACE`], creating it (a `dummy` link, or an empty bridge when
/// the kernel has no dummy driver) if it does not exist.
pub fn ensure() -> anyhow::Result<u32> {
    if let Some(index) = netdev::ifindex(RELAY_INTERFACE) {
        return Ok(index);
    }
    let mut rtnl = Rtnl::open().context("opening a NETLINK_ROUTE socket")?;
    if let Err(dummy) = rtnl.new_link(RELAY_INTERFACE, "dummy") {
        rtnl.new_link(RELAY_INTERFACE, "bridge").map_err(|bridge| {
            anyhow::anyhow!(
                "creating interface {RELAY_INTERFACE}: as a dummy link: {dummy}; as an empty bridge: {bridge}"
            )
        })?;
        tracing::info!(
            "the kernel has no dummy link driver ({dummy}); {RELAY_INTERFACE} is an empty bridge"
        );
    }
    match netdev::ifindex(RELAY_INTERFACE) {
        Some(index) => Ok(index),
        None => bail!("interface {RELAY_INTERFACE} vanished right after it was created"),
    }
}

/// The addresses (IPv4 and global IPv6) the interface holds now (none when it does not
/// exist).
pub fn addresses() -> anyhow::Result<Vec<IpAddr>> {
    let mut all: Vec<IpAddr> = netdev::interface_addresses()
        .context("listing addresses")?
        .into_iter()
        .filter(|a| a.interface == RELAY_INTERFACE)
        .map(|a| IpAddr::V4(a.address))
        .collect();
    all.extend(
        netdev::relay_interface_addresses6()
            .context("listing IPv6 addresses")?
            .into_iter()
            .map(IpAddr::V6),
    );
    Ok(all)
}

/// Adds `ip` (a no-op when present), creating the interface if it is missing.
pub fn add(ip: IpAddr) -> anyhow::Result<()> {
    let index = ensure()?;
    let mut rtnl = Rtnl::open().context("opening a NETLINK_ROUTE socket")?;
    let flags = (libc::NLM_F_CREATE | libc::NLM_F_REPLACE) as u16;
    rtnl.address(libc::RTM_NEWADDR, flags, index, ip)
        .with_context(|| format!("adding {ip} to {RELAY_INTERFACE}"))
}

/// Removes `ip` (a no-op when absent or when the interface does not exist).
pub fn remove(ip: IpAddr) -> anyhow::Result<()> {
    let Some(index) = netdev::ifindex(RELAY_INTERFACE) else {
        return Ok(());
    };
    let mut rtnl = Rtnl::open().context("opening a NETLINK_ROUTE socket")?;
    match rtnl.address(libc::RTM_DELADDR, 0, index, ip) {
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(()),
        r => r.with_context(|| format!("removing {ip} from {RELAY_INTERFACE}")),
    }
}

/// Deletes [`RELAY_INTERFACE`] and with it every service address. Returns whether it existed.
pub fn cleanup() -> anyhow::Result<bool> {
    let Some(index) = netdev::ifindex(RELAY_INTERFACE) else {
        return Ok(false);
    };
    let mut rtnl = Rtnl::open().context("opening a NETLINK_ROUTE socket")?;
    match rtnl.del_link(index) {
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(false),
        r => r
            .map(|()| true)
            .with_context(|| format!("deleting interface {RELAY_INTERFACE}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_and_nested_lengths_cover_children() {
        let mut b = Vec::new();
        put_nested(&mut b, IFLA_LINKINFO, |b| {
            put_attr(b, IFLA_INFO_KIND, b"dummy")
        });
        // outer header 4 + inner header 4 + "dummy" 5 padded to 8.
        assert_eq!(b.len(), 16);
        assert_eq!(u16::from_ne_bytes([b[0], b[1]]), 16);
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), 9);
        assert_eq!(&b[8..13], b"dummy");
    }
}
