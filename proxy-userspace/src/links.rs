//! This network namespace's links with their kind (`veth`, `netkit`, ...) and whether their
//! peer lives in another namespace, from one rtnetlink dump (`ip -d link` reads the same).
//! `/sys/class/net` would not do: under `ip netns exec` or in a container it may belong to
//! another namespace, while a netlink socket always talks to the caller's own.

use std::io;

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

const NLMSG_HDR_LEN: usize = 16;
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
/// `nla_type` without NLA_F_NESTED / NLA_F_NET_BYTEORDER.
const NLA_TYPE_MASK: u16 = 0x3fff;

/// Every link of this network namespace.
pub fn links() -> io::Result<Vec<Link>> {
    let sock = RouteSocket::open()?;
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
    let attr_len = 8;
    let len = NLMSG_HDR_LEN + IFINFOMSG_LEN + attr_len;
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&RTM_GETLINK.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // pid
    m.extend_from_slice(&[0u8; IFINFOMSG_LEN]); // AF_UNSPEC, every link
    m.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    m.extend_from_slice(&IFLA_EXT_MASK.to_ne_bytes());
    m.extend_from_slice(&RTEXT_FILTER_SKIP_STATS.to_ne_bytes());
    m
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

/// The (type, payload) of each attribute in `buf`; stops at the first malformed one.
fn attributes(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let data = &buf[4..len];
        buf = &buf[align4(len).min(buf.len())..];
        Some((kind, data))
    })
}

fn c_string(data: &[u8]) -> String {
    let end = data.iter().position(|b| *b == 0).unwrap_or(data.len());
    String::from_utf8_lossy(&data[..end]).into_owned()
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

struct RouteSocket(i32);

impl Drop for RouteSocket {
    fn drop(&mut self) {
        // SAFETY: closing our own fd.
        unsafe { libc::close(self.0) };
    }
}

impl RouteSocket {
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2).
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self(fd))
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: all-zero is a valid sockaddr_nl (the kernel: nl_pid 0).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: sending our own buffer to our own address struct.
        let rc = unsafe {
            libc::sendto(
                self.0,
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: receiving into our own buffer.
        let rc = unsafe { libc::recv(self.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(rc as usize)
    }
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
