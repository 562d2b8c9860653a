//! Flushing stale UDP conntrack entries after an apply of a rule-based dataplane (nftables,
//! iptables), over the conntrack netlink API (NETLINK_NETFILTER, ctnetlink).
//!
//! UDP has no connection teardown: a conntrack entry that NATed a flow to a backend that is
//! gone keeps sending the flow's packets there until it times out (the DNS blackhole,
//! kubernetes#59368). Likewise an entry created while a frontend had no endpoints keeps its
//! packets un-NATed after endpoints appear. kube-proxy deletes both kinds with
//! `conntrack -D`; we dump the table once and delete the matching entries by tuple.

use std::{collections::HashSet, io, net::Ipv4Addr};

use crate::{
    desired::{DesiredState, FrontendKind, Protocol},
    netlink::{NLMSG_HDR_LEN, NetlinkSocket, align4, attributes, message},
};

/// Which conntrack entries to delete. All matches are on UDP entries of the original
/// direction's destination (the frontend) and, for NATed ones, the reply source (the backend).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StaleUdp {
    /// (frontend address, frontend port, backend address, backend port): entries to the
    /// frontend NATed to the backend. A frontend address of `0.0.0.0` (a nodePort) matches any
    /// original destination address.
    pub nat_to_backend: HashSet<(Ipv4Addr, u16, Ipv4Addr, u16)>,
    /// (frontend address, frontend port): entries to the frontend that were not NATed (the
    /// frontend had no endpoints). `0.0.0.0` matches the nodePort addresses below.
    pub not_natted: HashSet<(Ipv4Addr, u16)>,
    /// The nodePort addresses, for the `0.0.0.0` entries of `not_natted`.
    pub nodeport_addresses: HashSet<Ipv4Addr>,
}

impl StaleUdp {
    pub fn is_empty(&self) -> bool {
        self.nat_to_backend.is_empty() && self.not_natted.is_empty()
    }

    /// What changed from `old` to `new`: UDP backends that a frontend no longer has (or whose
    /// frontend is gone), and UDP frontends that had no endpoints (or did not exist) and now
    /// have some.
    pub fn between(old: &DesiredState, new: &DesiredState) -> StaleUdp {
        let mut out = StaleUdp {
            nodeport_addresses: new.nodeport_addresses.iter().copied().collect(),
            ..StaleUdp::default()
        };
        let new_by_key: std::collections::HashMap<_, _> =
            new.frontends.iter().map(|f| (f.key(), f)).collect();
        for f in old.frontends.iter().filter(|f| f.protocol == Protocol::Udp) {
            let kept = new_by_key.get(&f.key());
            for b in &f.backends {
                let still = kept.is_some_and(|n| {
                    n.backends
                        .iter()
                        .any(|nb| nb.address == b.address && nb.port == b.port)
                });
                if !still {
                    out.nat_to_backend
                        .insert((f.address, f.port, b.address, b.port));
                }
            }
        }
        let old_by_key: std::collections::HashMap<_, _> =
            old.frontends.iter().map(|f| (f.key(), f)).collect();
        for f in new.frontends.iter().filter(|f| f.protocol == Protocol::Udp) {
            if f.backends.is_empty() {
                continue;
            }
            let had_none = old_by_key
                .get(&f.key())
                .is_none_or(|o| o.backends.is_empty());
            if had_none {
                let addr = if f.kind == FrontendKind::NodePort {
                    Ipv4Addr::UNSPECIFIED
                } else {
                    f.address
                };
                out.not_natted.insert((addr, f.port));
            }
        }
        out
    }

    fn matches(&self, e: &Entry) -> bool {
        if e.orig.proto != Protocol::Udp.number() {
            return false;
        }
        let natted = e.reply.src != e.orig.dst || e.reply.sport != e.orig.dport;
        if natted {
            self.nat_to_backend
                .contains(&(e.orig.dst, e.orig.dport, e.reply.src, e.reply.sport))
                || self.nat_to_backend.contains(&(
                    Ipv4Addr::UNSPECIFIED,
                    e.orig.dport,
                    e.reply.src,
                    e.reply.sport,
                ))
        } else {
            self.not_natted.contains(&(e.orig.dst, e.orig.dport))
                || (self.nodeport_addresses.contains(&e.orig.dst)
                    && self
                        .not_natted
                        .contains(&(Ipv4Addr::UNSPECIFIED, e.orig.dport)))
        }
    }
}

/// Deletes the UDP conntrack entries of the current network namespace that `stale` matches.
/// Returns how many were deleted. A missing conntrack table (module not loaded) is 0.
pub fn flush(stale: &StaleUdp) -> io::Result<usize> {
    if stale.is_empty() {
        return Ok(0);
    }
    let sock = Netlink::open()?;
    let entries = sock.dump()?;
    let mut deleted = 0;
    for e in entries.iter().filter(|e| stale.matches(e)) {
        match sock.delete(e) {
            Ok(()) => deleted += 1,
            // Gone by itself in between (timed out, or deleted by someone else).
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {}
            Err(err) => return Err(err),
        }
    }
    Ok(deleted)
}

/// Runs [`flush`] and logs the outcome; errors are logged, not returned (a stale entry times
/// out by itself, the rules are already programmed).
pub fn flush_and_log(stale: &StaleUdp, mode: &str) {
    if stale.is_empty() {
        return;
    }
    match flush(stale) {
        Ok(0) => {}
        Ok(n) => tracing::info!(mode, entries = n, "deleted stale UDP conntrack entries"),
        Err(e) => tracing::warn!(mode, "deleting stale UDP conntrack entries: {e}"),
    }
}

// --- ctnetlink ---------------------------------------------------------------------------

const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLA_F_NESTED: u16 = 0x8000;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const NFGENMSG_LEN: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tuple {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    sport: u16,
    dport: u16,
}

impl Default for Tuple {
    fn default() -> Self {
        Self {
            src: Ipv4Addr::UNSPECIFIED,
            dst: Ipv4Addr::UNSPECIFIED,
            proto: 0,
            sport: 0,
            dport: 0,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Entry {
    orig: Tuple,
    reply: Tuple,
    zone: Option<u16>,
}

fn parse_tuple(buf: &[u8]) -> Tuple {
    let mut t = Tuple::default();
    for (ty, p) in attributes(buf) {
        match ty {
            CTA_TUPLE_IP => {
                for (ty, p) in attributes(p) {
                    if p.len() == 4 {
                        let a = Ipv4Addr::new(p[0], p[1], p[2], p[3]);
                        match ty {
                            CTA_IP_V4_SRC => t.src = a,
                            CTA_IP_V4_DST => t.dst = a,
                            _ => {}
                        }
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (ty, p) in attributes(p) {
                    match (ty, p.len()) {
                        (CTA_PROTO_NUM, 1) => t.proto = p[0],
                        (CTA_PROTO_SRC_PORT, 2) => t.sport = u16::from_be_bytes([p[0], p[1]]),
                        (CTA_PROTO_DST_PORT, 2) => t.dport = u16::from_be_bytes([p[0], p[1]]),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    t
}

/// Parses the attributes of one ctnetlink conntrack message (after the nfgenmsg).
fn parse_entry(buf: &[u8]) -> Entry {
    let mut e = Entry::default();
    for (ty, p) in attributes(buf) {
        match ty {
            CTA_TUPLE_ORIG => e.orig = parse_tuple(p),
            CTA_TUPLE_REPLY => e.reply = parse_tuple(p),
            CTA_ZONE if p.len() == 2 => e.zone = Some(u16::from_be_bytes([p[0], p[1]])),
            _ => {}
        }
    }
    e
}

/// Appends an attribute with `payload`; returns nothing, pads to 4 bytes.
fn put_attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let len = (4 + payload.len()) as u16;
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(align4(buf.len()), 0);
}

/// Appends a nested attribute whose content `fill` writes.
fn put_nested(buf: &mut Vec<u8>, ty: u16, fill: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0; 4]);
    fill(buf);
    let len = (buf.len() - start) as u16;
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    buf[start + 2..start + 4].copy_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
}

/// The body (nfgenmsg + attributes) of a delete request for `e`'s original tuple.
fn delete_body(e: &Entry) -> Vec<u8> {
    let mut b = vec![libc::AF_INET as u8, 0, 0, 0];
    put_nested(&mut b, CTA_TUPLE_ORIG, |b| {
        put_nested(b, CTA_TUPLE_IP, |b| {
            put_attr(b, CTA_IP_V4_SRC, &e.orig.src.octets());
            put_attr(b, CTA_IP_V4_DST, &e.orig.dst.octets());
        });
        put_nested(b, CTA_TUPLE_PROTO, |b| {
            put_attr(b, CTA_PROTO_NUM, &[e.orig.proto]);
            put_attr(b, CTA_PROTO_SRC_PORT, &e.orig.sport.to_be_bytes());
            put_attr(b, CTA_PROTO_DST_PORT, &e.orig.dport.to_be_bytes());
        });
    });
    if let Some(zone) = e.zone {
        put_attr(&mut b, CTA_ZONE, &zone.to_be_bytes());
    }
    b
}

struct Netlink {
    sock: NetlinkSocket,
    seq: std::cell::Cell<u32>,
}

impl Netlink {
    fn open() -> io::Result<Self> {
        let sock = NetlinkSocket::open(NETLINK_NETFILTER)?;
        // So a kernel that never answers cannot hang a sync.
        sock.set_recv_timeout(std::time::Duration::from_secs(5))?;
        Ok(Self {
            sock,
            seq: std::cell::Cell::new(1),
        })
    }

    fn send(&self, msg_type: u16, flags: u16, body: &[u8]) -> io::Result<u32> {
        let seq = self.seq.get();
        self.seq.set(seq.wrapping_add(1));
        let msg_type = (NFNL_SUBSYS_CTNETLINK << 8) | msg_type;
        self.sock.send(&message(msg_type, flags, seq, body))?;
        Ok(seq)
    }

    /// Receives messages of request `seq` until `done` (NLMSG_DONE, or the ack of a non-dump
    /// request), calling `each` on every other message's payload (after the nlmsghdr).
    fn recv_until_done(&self, seq: u32, mut each: impl FnMut(&[u8])) -> io::Result<()> {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = self.sock.recv(&mut buf)?;
            let mut data = &buf[..n];
            while data.len() >= NLMSG_HDR_LEN {
                let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
                let ty = u16::from_ne_bytes([data[4], data[5]]);
                let mseq = u32::from_ne_bytes([data[8], data[9], data[10], data[11]]);
                if len < NLMSG_HDR_LEN || len > data.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "truncated netlink message",
                    ));
                }
                let payload = &data[NLMSG_HDR_LEN..len];
                data = &data[align4(len).min(data.len())..];
                if mseq != seq {
                    continue;
                }
                match ty {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let code = payload
                            .get(..4)
                            .map(|p| i32::from_ne_bytes([p[0], p[1], p[2], p[3]]))
                            .unwrap_or(-libc::EIO);
                        return if code == 0 {
                            Ok(())
                        } else {
                            Err(io::Error::from_raw_os_error(-code))
                        };
                    }
                    _ => each(payload),
                }
            }
        }
    }

    /// Every IPv4 conntrack entry of this network namespace.
    fn dump(&self) -> io::Result<Vec<Entry>> {
        let body = [libc::AF_INET as u8, 0, 0, 0];
        let seq = self.send(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, &body)?;
        let mut out = Vec::new();
        let res = self.recv_until_done(seq, |p| {
            if p.len() >= NFGENMSG_LEN {
                out.push(parse_entry(&p[NFGENMSG_LEN..]));
            }
        });
        match res {
            Ok(()) => Ok(out),
            // No conntrack in this namespace (nf_conntrack not loaded): nothing to flush.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EOPNOTSUPP)) => Ok(out),
            Err(e) => Err(e),
        }
    }

    fn delete(&self, e: &Entry) -> io::Result<()> {
        let seq = self.send(
            IPCTNL_MSG_CT_DELETE,
            NLM_F_REQUEST | NLM_F_ACK,
            &delete_body(e),
        )?;
        self.recv_until_done(seq, |_| {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::{Backend, Frontend, ServicePortName};

    fn fe(kind: FrontendKind, addr: &str, port: u16, backends: &[(&str, u16)]) -> Frontend {
        Frontend {
            service: ServicePortName {
                namespace: "ns".into(),
                name: "dns".into(),
                port: "dns".into(),
                protocol: Protocol::Udp,
            },
            kind,
            address: addr.parse().unwrap(),
            port,
            protocol: Protocol::Udp,
            backends: backends
                .iter()
                .map(|(a, p)| Backend {
                    address: a.parse().unwrap(),
                    port: *p,
                    is_local: false,
                })
                .collect(),
            affinity_timeout: None,
            source_ranges: None,
        }
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn stale_between_states() {
        let old = DesiredState {
            frontends: vec![
                fe(
                    FrontendKind::NodePort,
                    "0.0.0.0",
                    30053,
                    &[("10.0.0.1", 53)],
                ),
                fe(
                    FrontendKind::ClusterIp,
                    "10.96.0.10",
                    53,
                    &[("10.0.0.1", 53), ("10.0.0.2", 53)],
                ),
                fe(FrontendKind::ClusterIp, "10.96.0.11", 53, &[]),
            ],
            nodeport_addresses: vec![ip("192.168.1.1")],
            ..DesiredState::default()
        };
        let new = DesiredState {
            frontends: vec![
                fe(
                    FrontendKind::NodePort,
                    "0.0.0.0",
                    30053,
                    &[("10.0.0.2", 53)],
                ),
                fe(
                    FrontendKind::ClusterIp,
                    "10.96.0.10",
                    53,
                    &[("10.0.0.2", 53)],
                ),
                fe(
                    FrontendKind::ClusterIp,
                    "10.96.0.11",
                    53,
                    &[("10.0.0.3", 53)],
                ),
            ],
            nodeport_addresses: vec![ip("192.168.1.1")],
            ..DesiredState::default()
        };
        let s = StaleUdp::between(&old, &new);
        let want: HashSet<_> = [
            (ip("0.0.0.0"), 30053, ip("10.0.0.1"), 53),
            (ip("10.96.0.10"), 53, ip("10.0.0.1"), 53),
        ]
        .into_iter()
        .collect();
        assert_eq!(s.nat_to_backend, want);
        let want: HashSet<_> = [(ip("10.96.0.11"), 53)].into_iter().collect();
        assert_eq!(s.not_natted, want);
        assert!(StaleUdp::between(&new, &new).is_empty());

        let entry = |odst: &str, dport: u16, rsrc: &str, sport: u16| Entry {
            orig: Tuple {
                src: ip("10.0.5.5"),
                dst: ip(odst),
                proto: 17,
                sport: 40000,
                dport,
            },
            reply: Tuple {
                src: ip(rsrc),
                dst: ip("10.0.5.5"),
                proto: 17,
                sport,
                dport: 40000,
            },
            zone: None,
        };
        assert!(s.matches(&entry("10.96.0.10", 53, "10.0.0.1", 53)));
        assert!(!s.matches(&entry("10.96.0.10", 53, "10.0.0.2", 53)));
        assert!(s.matches(&entry("192.168.1.1", 30053, "10.0.0.1", 53)));
        assert!(s.matches(&entry("10.96.0.11", 53, "10.96.0.11", 53)));
        assert!(!s.matches(&entry("10.96.0.12", 53, "10.96.0.12", 53)));
        let mut tcp = entry("10.96.0.10", 53, "10.0.0.1", 53);
        tcp.orig.proto = 6;
        assert!(!s.matches(&tcp));
    }

    #[test]
    fn delete_message_round_trips() {
        let e = Entry {
            orig: Tuple {
                src: ip("1.2.3.4"),
                dst: ip("5.6.7.8"),
                proto: 17,
                sport: 1000,
                dport: 53,
            },
            reply: Tuple::default(),
            zone: Some(7),
        };
        let body = delete_body(&e);
        let parsed = parse_entry(&body[NFGENMSG_LEN..]);
        assert_eq!(parsed.orig, e.orig);
        assert_eq!(parsed.zone, Some(7));
    }
}
