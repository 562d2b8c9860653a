//! `kproxy trace SRC DST:PORT/PROTO`: which frontend a flow matches, which backend it gets and
//! why, decided the way the kernel programs decide (see proxy-ebpf's `lb.rs`/`nodeport.rs`).

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
    str::FromStr,
};

use proxy_common::{
    config::CFG_FLAG_READY,
    conntrack::{Ct4Entry, Ct4Key},
    lb::{BACKEND_FLAG_LOCAL, SVC_FLAG_EXTERNAL},
};
use serde::Serialize;

use super::{
    maps::{LbSnapshot, addr, frontend_label, port, proto_name},
    services::{slot_label, slots, type_flags},
};

/// `SRC`: `ADDR[:PORT]`. Without a port no conntrack entry can be matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Source {
    pub address: Ipv4Addr,
    pub port: Option<u16>,
}

impl FromStr for Source {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(a) = s.parse::<SocketAddrV4>() {
            return Ok(Self {
                address: *a.ip(),
                port: Some(a.port()),
            });
        }
        match s.parse::<Ipv4Addr>() {
            Ok(address) => Ok(Self {
                address,
                port: None,
            }),
            Err(_) => Err(format!(
                "{s:?} is not an IPv4 source: expected ADDR[:PORT], e.g. 198.18.0.100:40000"
            )),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{p}", self.address),
            None => write!(f, "{}", self.address),
        }
    }
}

/// `DST`: `ADDR:PORT[/PROTO]`, PROTO one of tcp, udp, sctp (any case); tcp if omitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Destination {
    pub address: Ipv4Addr,
    pub port: u16,
    /// IPPROTO_*.
    pub proto: u8,
}

impl FromStr for Destination {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (sa, proto) = split_proto(s)?;
        let a: SocketAddrV4 = sa.parse().map_err(|_| {
            format!("{s:?} is not a destination: expected ADDR:PORT/PROTO, e.g. 10.96.0.10:53/udp")
        })?;
        Ok(Self {
            address: *a.ip(),
            port: a.port(),
            proto,
        })
    }
}

/// `ADDR:PORT[/PROTO]` split into the address part and IPPROTO_* (tcp if omitted).
fn split_proto(s: &str) -> Result<(&str, u8), String> {
    {
        let (sa, proto) = match s.rsplit_once('/') {
            Some((sa, p)) => {
                let proto = match p.to_ascii_lowercase().as_str() {
                    "tcp" => 6,
                    "udp" => 17,
                    "sctp" => 132,
                    _ => {
                        return Err(format!(
                            "{p:?} is not a protocol: expected tcp, udp or sctp"
                        ));
                    }
                };
                (sa, proto)
            }
            None => (s, 6),
        };
        Ok((sa, proto))
    }
}

/// `SRC` of either family: `ADDR[:PORT]`, `IPV6ADDR` or `[IPV6ADDR]:PORT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnySource {
    V4(Source),
    V6(Ipv6Addr),
}

impl FromStr for AnySource {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(a) = s.parse::<Source>() {
            return Ok(Self::V4(a));
        }
        if let Ok(a) = s.parse::<SocketAddrV6>() {
            return Ok(Self::V6(*a.ip()));
        }
        s.parse::<Ipv6Addr>().map(Self::V6).map_err(|_| {
            format!(
                "{s:?} is not a source: expected ADDR[:PORT], e.g. 198.18.0.100:40000 or [fd00::1]:40000"
            )
        })
    }
}

impl AnySource {
    pub fn address(&self) -> IpAddr {
        match self {
            Self::V4(s) => IpAddr::V4(s.address),
            Self::V6(a) => IpAddr::V6(*a),
        }
    }
}

/// `DST` of either family: `ADDR:PORT[/PROTO]` or `[IPV6ADDR]:PORT[/PROTO]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnyDestination {
    V4(Destination),
    V6 {
        address: Ipv6Addr,
        port: u16,
        /// IPPROTO_*.
        proto: u8,
    },
}

impl FromStr for AnyDestination {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(d) = s.parse::<Destination>() {
            return Ok(Self::V4(d));
        }
        let (sa, proto) = split_proto(s)?;
        let a: SocketAddrV6 = sa.parse().map_err(|_| {
            format!(
                "{s:?} is not a destination: expected ADDR:PORT/PROTO, e.g. 10.96.0.10:53/udp or [fd00:10:96::a]:53/udp"
            )
        })?;
        Ok(Self::V6 {
            address: *a.ip(),
            port: a.port(),
            proto,
        })
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}/{}",
            self.address,
            self.port,
            proto_name(self.proto)
        )
    }
}

/// A backend the flow gets or may get.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Candidate {
    pub id: u32,
    pub address: IpAddr,
    pub port: u16,
    /// `local` or `remote` (a remote backend is reached with SNAT to the node).
    pub locality: &'static str,
    pub probability: f64,
}

/// The answer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Trace {
    pub flow: String,
    /// The frontend entry that matches, `address:port/PROTO` (` (nodePort)` for the wildcard).
    pub frontend: Option<String>,
    /// `exact` (the address itself is a frontend) or `nodePort` (a nodePort address of this
    /// node, matched to the 0.0.0.0 wildcard frontend).
    #[serde(rename = "match")]
    pub matched: Option<&'static str>,
    pub types: Vec<&'static str>,
    pub rev_nat_index: Option<u16>,
    /// `not-a-service`, `no-endpoints` (refused), `dropped` (loadBalancerSourceRanges),
    /// `conntrack` (an existing flow keeps its backend), `affinity` (a new flow follows its
    /// client's session affinity), `random` (a new flow: one of `candidates` at random).
    pub verdict: &'static str,
    /// The backend of an existing flow (verdict `conntrack`) or of the client's affinity
    /// (verdict `affinity`).
    pub backend: Option<Candidate>,
    /// The source an existing flow is SNATed to (a remote backend).
    pub snat: Option<SocketAddrV4>,
    /// The backends a new flow may get, each with its probability.
    pub candidates: Vec<Candidate>,
    /// Why, in words, in the order the datapath decides.
    pub reasons: Vec<String>,
}

fn candidate(id: u32, a: impl Into<IpAddr>, p: u16, local: bool, probability: f64) -> Candidate {
    Candidate {
        id,
        address: a.into(),
        port: p,
        locality: if local { "local" } else { "remote" },
        probability,
    }
}

/// Decides like the datapath: exact frontend, else the nodePort wildcard when the destination
/// is a nodePort address; no endpoints refuse; an existing valid CT4 entry for the exact tuple
/// keeps its backend; otherwise a random backend slot.
pub fn trace(
    snap: &LbSnapshot,
    ct: &[(Ct4Key, Ct4Entry)],
    src: Source,
    dst: Destination,
    now_ns: u64,
) -> Trace {
    let mut t = Trace {
        flow: format!("{src} -> {dst}"),
        frontend: None,
        matched: None,
        types: Vec::new(),
        rev_nat_index: None,
        verdict: "not-a-service",
        backend: None,
        snat: None,
        candidates: Vec::new(),
        reasons: Vec::new(),
    };
    match snap.config {
        Some(c) if c.flags & CFG_FLAG_READY != 0 => {}
        Some(_) => t.reasons.push(
            "the agent has not programmed its first sync yet: the programs translate nothing \
             until it has"
                .into(),
        ),
        None => t
            .reasons
            .push("the config map could not be read: the programs may translate nothing".into()),
    }
    let is_npa = snap.nodeport_addrs.contains(&dst.address);
    let found = match snap.master(dst.address, dst.port, dst.proto) {
        Some(m) => {
            t.matched = Some("exact");
            t.reasons.push(format!("{dst} is a frontend (exact match)"));
            Some(m)
        }
        None if is_npa => match snap.master(Ipv4Addr::UNSPECIFIED, dst.port, dst.proto) {
            Some(m) => {
                t.matched = Some("nodePort");
                t.reasons.push(format!(
                    "{} is a nodePort address of this node, and nodePort {}/{} is programmed",
                    dst.address,
                    dst.port,
                    proto_name(dst.proto)
                ));
                Some(m)
            }
            None => {
                t.reasons.push(format!(
                    "{} is a nodePort address of this node, but no nodePort {}/{} is programmed",
                    dst.address,
                    dst.port,
                    proto_name(dst.proto)
                ));
                None
            }
        },
        None => {
            t.reasons.push(format!(
                "no frontend {dst}, and {} is not a nodePort address of this node",
                dst.address
            ));
            None
        }
    };
    let Some((key, svc)) = found else {
        t.reasons
            .push("not a service: the packet is left alone (not translated)".into());
        return t;
    };
    t.frontend = Some(frontend_label(&key));
    t.types = type_flags(svc.flags);
    t.rev_nat_index = Some(svc.rev_nat_index);
    let external = svc.flags & SVC_FLAG_EXTERNAL != 0;
    if external {
        t.reasons.push(
            "reachable from outside the node: packets entering the node's devices are \
             translated by XDP/tc with conntrack; connect()/sendmsg() of pods and host \
             processes on this node are translated by the socket hooks"
                .into(),
        );
    } else {
        t.reasons.push(
            "a cluster IP: translated at connect()/sendmsg() by the socket hooks for pods and \
             host processes on this node; packets arriving from outside the node are not \
             translated"
                .into(),
        );
    }
    if svc.count == 0 {
        t.verdict = "no-endpoints";
        t.reasons.push(
            "no endpoints: refused (connect() fails with ECONNREFUSED at once; packets from \
             outside reach the node's stack, where nothing listens on the port)"
                .into(),
        );
        return t;
    }
    if external {
        if let Some(sport) = src.port {
            let want = Ct4Key {
                saddr: u32::from_ne_bytes(src.address.octets()),
                daddr: u32::from_ne_bytes(dst.address.octets()),
                sport: sport.to_be(),
                dport: dst.port.to_be(),
                proto: dst.proto,
                _pad: [0; 3],
            };
            if let Some((_, e)) = ct.iter().find(|(k, _)| *k == want) {
                let valid = e.rev_nat_index == svc.rev_nat_index
                    && snap.backends.get(&e.backend_id).is_some_and(|b| {
                        b.rev_nat_index == svc.rev_nat_index
                            && b.address == e.backend_addr
                            && b.port == e.backend_port
                    });
                let age = now_ns.saturating_sub(e.last_seen_ns) as f64 / 1e9;
                if valid {
                    let b = snap.backends[&e.backend_id];
                    t.verdict = "conntrack";
                    t.backend = Some(candidate(
                        e.backend_id,
                        addr(b.address),
                        port(b.port),
                        b.flags & BACKEND_FLAG_LOCAL != 0,
                        1.0,
                    ));
                    t.snat = (e.nat_saddr != 0)
                        .then(|| SocketAddrV4::new(addr(e.nat_saddr), port(e.nat_sport)));
                    t.reasons.push(format!(
                        "an existing conntrack entry for this exact tuple (last packet {age:.1}s \
                         ago) keeps the flow on backend {}:{} (id {}){}",
                        addr(b.address),
                        port(b.port),
                        e.backend_id,
                        match t.snat {
                            Some(s) => format!(", SNATed to {s}"),
                            None => ", without SNAT (a local backend sees the client)".into(),
                        }
                    ));
                    return t;
                }
                t.reasons.push(format!(
                    "a conntrack entry for this tuple names backend id {} ({}:{}), which is \
                     gone or changed: the next packet selects again",
                    e.backend_id,
                    addr(e.backend_addr),
                    port(e.backend_port)
                ));
            } else {
                t.reasons
                    .push("no conntrack entry for this tuple: a new flow".into());
            }
        } else {
            t.reasons.push(
                "no source port given: conntrack not consulted (give SRC as ADDR:PORT)".into(),
            );
        }
    }
    let all = slots(snap, &key, &svc);
    let active: Vec<_> = all.iter().filter(|s| s.state == "active").collect();
    if active.is_empty() {
        t.verdict = "no-endpoints";
        t.reasons.push(format!(
            "{} backend slots, none usable ({}): the flow is not translated",
            all.len(),
            all.iter().map(slot_label).collect::<Vec<_>>().join("; ")
        ));
        return t;
    }
    let p = 1.0 / active.len() as f64;
    t.verdict = "random";
    t.candidates = active
        .iter()
        .map(|s| {
            candidate(
                s.id,
                s.address.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                s.port.unwrap_or(0),
                s.locality == "local",
                p,
            )
        })
        .collect();
    t.reasons.push(format!(
        "the backend is picked at random among {} slot(s), each with probability {p:.2}{}",
        active.len(),
        if active.len() < all.len() {
            " (unusable slots are skipped to the next one, so their share goes to their \
             successors)"
        } else {
            ""
        }
    ));
    if external && active.iter().any(|s| s.locality == "remote") {
        t.reasons.push(
            "from outside, a remote backend is reached with SNAT to the node's address".into(),
        );
    }
    t
}

pub fn render(t: &Trace) -> String {
    let mut out = format!("flow:      {}\n", t.flow);
    if let Some(f) = &t.frontend {
        out.push_str(&format!(
            "frontend:  {f} ({} match; {}; rev-NAT {})\n",
            t.matched.unwrap_or("?"),
            t.types.join(","),
            t.rev_nat_index.unwrap_or(0)
        ));
    }
    let verdict = match t.verdict {
        "not-a-service" => "not a service".to_string(),
        "no-endpoints" => "no endpoints: refused".to_string(),
        "dropped" => "dropped: the source is outside loadBalancerSourceRanges".to_string(),
        "conntrack" | "affinity" => match &t.backend {
            Some(b) => {
                format!(
                    "backend {} (id {}, {}){}",
                    std::net::SocketAddr::new(b.address, b.port),
                    b.id,
                    b.locality,
                    t.snat.map(|s| format!(", SNAT {s}")).unwrap_or_default()
                ) + if t.verdict == "affinity" {
                    " (session affinity)"
                } else {
                    ""
                }
            }
            None => "conntrack".into(),
        },
        _ => {
            let mut s = format!("one of {} backends, at random:", t.candidates.len());
            for c in &t.candidates {
                s.push_str(&format!(
                    "\n             {} ({}, id {})  p={:.2}",
                    std::net::SocketAddr::new(c.address, c.port),
                    c.locality,
                    c.id,
                    c.probability
                ));
            }
            s
        }
    };
    out.push_str(&format!("verdict:   {verdict}\n"));
    for (i, r) in t.reasons.iter().enumerate() {
        let head = if i == 0 { "why:" } else { "" };
        out.push_str(&format!("{head:<11}- {r}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use proxy_common::config::Lb4Config;

    use super::*;
    use crate::inspect::services::tests::seed_snapshot;

    fn be(a: Ipv4Addr) -> u32 {
        u32::from_ne_bytes(a.octets())
    }

    fn ready(mut s: LbSnapshot) -> LbSnapshot {
        s.config = Some(Lb4Config {
            flags: CFG_FLAG_READY,
            snat_port_min: 61000,
            snat_port_max: 65535,
        });
        s
    }

    #[test]
    fn parses_arguments() {
        let s: Source = "198.18.0.100:40000".parse().unwrap();
        assert_eq!(s.address, Ipv4Addr::new(198, 18, 0, 100));
        assert_eq!(s.port, Some(40000));
        assert_eq!("10.0.0.1".parse::<Source>().unwrap().port, None);
        assert!("nonsense".parse::<Source>().is_err());
        let d: Destination = "198.18.0.1:30001/tcp".parse().unwrap();
        assert_eq!((d.port, d.proto), (30001, 6));
        assert_eq!(
            "10.96.0.10:53/UDP".parse::<Destination>().unwrap().proto,
            17
        );
        assert_eq!("10.96.0.10:53".parse::<Destination>().unwrap().proto, 6);
        assert!("10.96.0.10:53/icmp".parse::<Destination>().is_err());
        assert!("10.96.0.10/tcp".parse::<Destination>().is_err());
        assert_eq!(d.to_string(), "198.18.0.1:30001/TCP");
    }

    #[test]
    fn nodeport_new_flow_is_random_among_backends() {
        let snap = ready(seed_snapshot());
        let t = trace(
            &snap,
            &[],
            "198.18.0.100:40000".parse().unwrap(),
            "198.18.0.1:30001/tcp".parse().unwrap(),
            0,
        );
        assert_eq!(t.matched, Some("nodePort"));
        assert_eq!(t.frontend.as_deref(), Some("0.0.0.0:30001/TCP (nodePort)"));
        assert_eq!(t.verdict, "random");
        assert_eq!(t.candidates.len(), 2);
        assert!(t.candidates.iter().all(|c| c.probability == 0.5));
        let out = render(&t);
        assert!(
            out.contains("verdict:   one of 2 backends, at random:"),
            "{out}"
        );
        assert!(
            out.contains("10.244.1.11:80 (local, id 4)  p=0.50"),
            "{out}"
        );
    }

    #[test]
    fn existing_flow_keeps_its_backend() {
        let snap = ready(seed_snapshot());
        let key = Ct4Key {
            saddr: be(Ipv4Addr::new(198, 18, 0, 100)),
            daddr: be(Ipv4Addr::new(198, 18, 0, 1)),
            sport: 40000u16.to_be(),
            dport: 30001u16.to_be(),
            proto: 6,
            _pad: [0; 3],
        };
        let mut e = Ct4Entry {
            backend_id: 4,
            backend_addr: be(Ipv4Addr::new(10, 244, 1, 11)),
            backend_port: 80u16.to_be(),
            rev_nat_index: 2,
            nat_saddr: 0,
            nat_sport: 0,
            flags: 0,
            last_seen_ns: 0,
        };
        let src: Source = "198.18.0.100:40000".parse().unwrap();
        let dst: Destination = "198.18.0.1:30001/tcp".parse().unwrap();
        let t = trace(&snap, &[(key, e)], src, dst, 2_000_000_000);
        assert_eq!(t.verdict, "conntrack");
        let b = t.backend.clone().unwrap();
        assert_eq!(
            (b.address, b.id),
            (IpAddr::V4(Ipv4Addr::new(10, 244, 1, 11)), 4)
        );
        assert!(render(&t).contains("verdict:   backend 10.244.1.11:80 (id 4, local)"));
        // Another source port: a new flow.
        let other = trace(
            &snap,
            &[(key, e)],
            "198.18.0.100:40001".parse().unwrap(),
            dst,
            0,
        );
        assert_eq!(other.verdict, "random");
        // The backend changed address: reselect.
        e.backend_addr = be(Ipv4Addr::new(10, 244, 1, 99));
        let t = trace(&snap, &[(key, e)], src, dst, 0);
        assert_eq!(t.verdict, "random");
        assert!(t.reasons.iter().any(|r| r.contains("gone or changed")));
    }

    #[test]
    fn not_a_service_and_no_endpoints() {
        let mut snap = ready(seed_snapshot());
        let t = trace(
            &snap,
            &[],
            "198.18.0.100".parse().unwrap(),
            "198.18.0.1:30002/tcp".parse().unwrap(),
            0,
        );
        assert_eq!(t.verdict, "not-a-service");
        assert!(render(&t).contains("verdict:   not a service"));
        let t = trace(
            &snap,
            &[],
            "198.18.0.100".parse().unwrap(),
            "10.96.100.208:8080/udp".parse().unwrap(),
            0,
        );
        assert_eq!(t.verdict, "not-a-service");
        let key = proxy_common::lb::Lb4Key::new(
            be(Ipv4Addr::new(10, 96, 100, 208)),
            8080u16.to_be(),
            6,
            0,
        );
        snap.services.get_mut(&key).unwrap().count = 0;
        let t = trace(
            &snap,
            &[],
            "10.244.1.12".parse().unwrap(),
            "10.96.100.208:8080/tcp".parse().unwrap(),
            0,
        );
        assert_eq!(t.matched, Some("exact"));
        assert_eq!(t.verdict, "no-endpoints");
        assert!(render(&t).contains("verdict:   no endpoints: refused"));
    }
}
