//! This network namespace's links with their kind (`veth`, `netkit`, ...) and whether their
//! peer lives in another namespace, from one rtnetlink dump (`ip -d link` reads the same).
//! `/sys/class/net` would not do: under `ip netns exec` or in a container it may belong to
//! another namespace, while a netlink socket always talks to the caller's own.

use std::io;

use crate::netlink::{NLMSG_HDR_LEN, NetlinkSocket, align4, attributes, message};

/// One link of the dump.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub ifindex: u32,
    pub name: String,
    /// `IFLA_INFO_KIND` ("veth", "netkit", "bridge", ...); empty for plain devices (a NIC,
    /// loopback).
    pub kind: String,
    /// The link's other end is in another network namespace (`IFLA_LINK_NETNSID` is set):
    /// for a veth or netkit, a pod's end.
    pub peer_in_other_netns: bool,
}

impl Link {
    /// Whether the link is a pod's device as CNIs create them: a veth or netkit pair whose
    /// other end was moved into another namespace (`bpf_redirect_peer` can deliver there).
    pub fn is_pod_device(&self) -> bool {
        matches!(self.kind.as_str(), "veth" | "netkit") && self.peer_in_other_netns
    }
}

const IFINFOMSG_LEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_EXT_MASK: u16 = 29;
const IFLA_LINK_NETNSID: u16 = 37;
const IFLA_INFO_KIND: u16 = 1;
/// Leaves the per-link statistics out of the dump (most of its bytes).
const RTEXT_FILTER_SKIP_STATS: u32 = 1 << 3;

/// Every link of this network namespace.
pub fn links() -> io::Result<Vec<Link>> {
    let sock = NetlinkSocket::open(libc::NETLINK_ROUTE)?;
    sock.send(&getlink_dump_request())?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = sock.recv(&mut buf)?;
        if n == 0 {
            return Err(io::Error::other("rtnetlink: the link dump ended early"));
        }
        if parse_messages(&buf[..n], &mut out)? {
            return Ok(out);
        }
    }
}

/// RTM_GETLINK, NLM_F_DUMP, without statistics.
fn getlink_dump_request() -> Vec<u8> {
    let mut body = vec![0u8; IFINFOMSG_LEN]; // AF_UNSPEC, every link
    body.extend_from_slice(&8u16.to_ne_bytes());
    body.extend_from_slice(&IFLA_EXT_MASK.to_ne_bytes());
    body.extend_from_slice(&RTEXT_FILTER_SKIP_STATS.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    message(RTM_GETLINK, flags, 1, &body)
}

/// Parses one datagram of the dump into `out`; returns whether the dump is done.
fn parse_messages(mut buf: &[u8], out: &mut Vec<Link>) -> io::Result<bool> {
    while buf.len() >= NLMSG_HDR_LEN {
        let len = u32::from_ne_bytes(buf[0..4].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(buf[4..6].try_into().unwrap());
        if len < NLMSG_HDR_LEN || len > buf.len() {
            return Err(io::Error::other("rtnetlink: malformed message"));
        }
        let body = &buf[NLMSG_HDR_LEN..len];
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = body
                    .get(0..4)
                    .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
                    .unwrap_or(0);
                if errno != 0 {
                    return Err(io::Error::from_raw_os_error(-errno));
                }
            }
            RTM_NEWLINK => {
                if let Some(link) = parse_link(body) {
                    out.push(link);
                }
            }
            _ => {}
        }
        buf = &buf[align4(len).min(buf.len())..];
    }
    Ok(false)
}

/// One RTM_NEWLINK body: ifinfomsg, then attributes.
fn parse_link(body: &[u8]) -> Option<Link> {
    let ifindex = i32::from_ne_bytes(body.get(4..8)?.try_into().ok()?);
    let mut link = Link {
        ifindex: u32::try_from(ifindex).ok()?,
        name: String::new(),
        kind: String::new(),
        peer_in_other_netns: false,
    };
    for (kind, data) in attributes(body.get(IFINFOMSG_LEN..)?) {
        match kind {
            IFLA_IFNAME => link.name = c_string(data),
            IFLA_LINK_NETNSID => link.peer_in_other_netns = true,
            IFLA_LINKINFO => {
                if let Some((_, k)) = attributes(data).find(|(t, _)| *t == IFLA_INFO_KIND) {
                    link.kind = c_string(k);
                }
            }
            _ => {}
        }
    }
    Some(link)
}

fn c_string(data: &[u8]) -> String {
    let end = data.iter().position(|b| *b == 0).unwrap_or(data.len());
    String::from_utf8_lossy(&data[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dump_lists_loopback_as_a_plain_device() {
        let all = links().expect("rtnetlink link dump");
        let lo = all
            .iter()
            .find(|l| l.name == "lo")
            .unwrap_or_else(|| panic!("no lo in {all:?}"));
        assert_eq!(lo.ifindex, crate::netdev::ifindex("lo").unwrap());
        assert!(!lo.is_pod_device(), "{lo:?}");
    }

    #[test]
    fn pod_devices_are_veth_or_netkit_with_a_remote_peer() {
        let link = |kind: &str, remote: bool| Link {
            ifindex: 7,
            name: "x".into(),
            kind: kind.into(),
            peer_in_other_netns: remote,
        };
        assert!(link("veth", true).is_pod_device());
        assert!(link("netkit", true).is_pod_device());
        // Both ends here: bpf_redirect_peer would drop (the peer must be elsewhere).
        assert!(!link("veth", false).is_pod_device());
        // A VLAN or macvlan on a device of another namespace has no peer to deliver to.
        assert!(!link("vlan", true).is_pod_device());
        assert!(!link("", false).is_pod_device());
    }

    #[test]
    fn attributes_of_a_crafted_link_message() {
        // ifinfomsg (index 9) + IFLA_IFNAME "vp0" + IFLA_LINK_NETNSID 0 +
        // IFLA_LINKINFO { IFLA_INFO_KIND "veth" } (nested flag set, as the kernel sends it).
        let mut body = vec![0u8; IFINFOMSG_LEN];
        body[4..8].copy_from_slice(&9i32.to_ne_bytes());
        let mut attr = |kind: u16, data: &[u8]| {
            let len = 4 + data.len();
            body.extend_from_slice(&(len as u16).to_ne_bytes());
            body.extend_from_slice(&kind.to_ne_bytes());
            body.extend_from_slice(data);
            body.resize(align4(body.len()), 0);
        };
        attr(IFLA_IFNAME, b"vp0\0");
        attr(IFLA_LINK_NETNSID, &0i32.to_ne_bytes());
        let mut kind = Vec::new();
        kind.extend_from_slice(&9u16.to_ne_bytes());
        kind.extend_from_slice(&IFLA_INFO_KIND.to_ne_bytes());
        kind.extend_from_slice(b"veth\0\0\0\0");
        attr(IFLA_LINKINFO | 0x8000, &kind);
        assert_eq!(
            parse_link(&body),
            Some(Link {
                ifindex: 9,
                name: "vp0".into(),
                kind: "veth".into(),
                peer_in_other_netns: true,
            })
        );
    }
}
