//! ICMPv6 errors about translated IPv6 nodePort flows are reverse-translated
//! (BPF_PROG_TEST_RUN), the twin of `prog_run_icmp.rs`: the client must find its own packet
//! ([client]:port -> [node]:nodePort) quoted, or it ignores the error and path-MTU discovery
//! breaks. The maps are written by the agent's map writer from a desired state; expected
//! packets are built independently (the client's original packet quoted, the ICMPv6
//! checksum computed from scratch) and compared byte for byte. Needs root.

use std::net::Ipv6Addr;

use kproxy::{
    dataplane::ebpf::{maps6::PinnedMaps6, writer6::MapWriter6},
    desired::{Backend6, DesiredState, Frontend6, FrontendKind, Protocol, ServicePortName},
};
use kproxy_tests::prog_run::*;
use proxy_common::{
    config::CFG_FLAG_READY,
    stats::{STAT_ICMP_ERROR_XLATE, STAT_PASS_OTHER_PROTO},
};

const CLIENT: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10);
const CLIENT_PORT: u16 = 40_000;
const NODE: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, 0, 1);
const NODE_PORT: u16 = 30_080;
const LOCAL_BE: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 5);
const REMOTE_BE: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 2, 0, 0, 0, 7);
const ROUTER: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1);
const BE_PORT: u16 = 8080;
const SNAT_MIN: u16 = 61_000;
const SNAT_MAX: u16 = 61_010;

const IPPROTO_ICMPV6: u8 = 58;
const IP6_HLEN: usize = 40;
const ICMP6_DEST_UNREACH: u8 = 1;
const ICMP6_PKT_TOO_BIG: u8 = 2;
const ICMP6_TIME_EXCEEDED: u8 = 3;
const CODE_PORT_UNREACH: u8 = 4;
const PATH_MTU: u32 = 1280;
/// An ICMPv6 error quotes as much as fits in the minimum MTU (RFC 4443 2.4(c)).
const MAX_QUOTE: usize = 1280 - IP6_HLEN - 8;

// ---------------------------------------------------------------------------------------------
// Packets

/// An Ethernet/IPv6 frame of `proto` (TCP: an ACK|PSH segment) carrying `payload`, with a
/// correct L4 checksum.
fn frame6(
    src: Ipv6Addr,
    sport: u16,
    dst: Ipv6Addr,
    dport: u16,
    proto: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    if proto == IPPROTO_TCP {
        l4.extend_from_slice(&0x0102_0304u32.to_be_bytes());
        l4.extend_from_slice(&0x0506_0708u32.to_be_bytes());
        l4.extend_from_slice(&[0x50, 0x18]);
        l4.extend_from_slice(&64800u16.to_be_bytes());
        l4.extend_from_slice(&[0, 0, 0, 0]);
    } else {
        l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
    }
    l4.extend_from_slice(payload);
    let mut p = ip6_frame(src, dst, proto, &l4);
    let off = ETH_HLEN + IP6_HLEN + l4_csum_off(proto);
    let csum = upper_csum6(&p, off);
    p[off..off + 2].copy_from_slice(&csum.to_be_bytes());
    p
}

/// Ethernet + a fixed IPv6 header (`nexthdr`, hop limit 64) + `payload`.
fn ip6_frame(src: Ipv6Addr, dst: Ipv6Addr, nexthdr: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x86, 0xdd];
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[nexthdr, 64]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

/// The upper-layer checksum of the frame `p` (no extension headers) computed from scratch
/// over the IPv6 pseudo header, its own field at `csum_off` taken as 0.
fn upper_csum6(p: &[u8], csum_off: usize) -> u16 {
    let mut body = p[ETH_HLEN + IP6_HLEN..].to_vec();
    let rel = csum_off - ETH_HLEN - IP6_HLEN;
    body[rel..rel + 2].fill(0);
    let mut sum = csum_add(0, &p[ETH_HLEN + 8..ETH_HLEN + IP6_HLEN]);
    sum += body.len() as u32 + u32::from(p[ETH_HLEN + 6]);
    csum_finish(csum_add(sum, &body))
}

const ICMP6_CSUM_OFF: usize = ETH_HLEN + IP6_HLEN + 2;

/// An ICMPv6 error `src -> dst` (`field`: Packet Too Big's MTU, else 0) quoting the first
/// `max_quote` bytes of the IPv6 packet in the frame `about`, checksum computed from scratch.
fn icmp6_error(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    icmp_type: u8,
    code: u8,
    field: u32,
    about: &[u8],
    max_quote: usize,
) -> Vec<u8> {
    let quote = &about[ETH_HLEN..];
    let quote = &quote[..quote.len().min(max_quote)];
    let mut msg = vec![icmp_type, code, 0, 0];
    msg.extend_from_slice(&field.to_be_bytes());
    msg.extend_from_slice(quote);
    let mut p = ip6_frame(src, dst, IPPROTO_ICMPV6, &msg);
    let csum = upper_csum6(&p, ICMP6_CSUM_OFF);
    p[ICMP6_CSUM_OFF..ICMP6_CSUM_OFF + 2].copy_from_slice(&csum.to_be_bytes());
    p
}

fn addr_at(p: &[u8], off: usize) -> Ipv6Addr {
    Ipv6Addr::from(<[u8; 16]>::try_from(&p[off..off + 16]).unwrap())
}

fn port_at(p: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([p[off], p[off + 1]])
}

/// What a receiver reads from an ICMPv6 error.
#[derive(Debug, PartialEq, Eq)]
struct Err6 {
    saddr: Ipv6Addr,
    daddr: Ipv6Addr,
    /// Packet Too Big's MTU (the 4 bytes after the checksum).
    field: u32,
    quoted: (Ipv6Addr, u16, Ipv6Addr, u16),
}

/// The error's fields, after checking its ICMPv6 checksum against a from-scratch
/// computation.
fn parse_err6(p: &[u8], what: &str) -> Err6 {
    assert_eq!(
        port_at(p, ICMP6_CSUM_OFF),
        upper_csum6(p, ICMP6_CSUM_OFF),
        "{what}: ICMPv6 checksum differs from a recomputation"
    );
    parse_err6_unchecked(p)
}

/// The tuple of a TCP/UDP frame without extension headers.
fn tuple6(p: &[u8]) -> (Ipv6Addr, u16, Ipv6Addr, u16) {
    let l4 = ETH_HLEN + IP6_HLEN;
    (
        addr_at(p, ETH_HLEN + 8),
        port_at(p, l4),
        addr_at(p, ETH_HLEN + 24),
        port_at(p, l4 + 2),
    )
}

/// `original` with the L4 checksum of `translated` (the quoted L4 checksum is left as the
/// error's sender saw it).
fn with_l4_csum_of(original: &[u8], translated: &[u8], proto: u8) -> Vec<u8> {
    let mut v = original.to_vec();
    let off = ETH_HLEN + IP6_HLEN + l4_csum_off(proto);
    v[off..off + 2].copy_from_slice(&translated[off..off + 2]);
    v
}

/// The client's 1400-byte TCP segment or UDP datagram to [node]:nodePort.
fn client_packet(proto: u8) -> Vec<u8> {
    let payload: Vec<u8> = (0..1400u32).map(|i| (i * 7) as u8).collect();
    frame6(CLIENT, CLIENT_PORT, NODE, NODE_PORT, proto, &payload)
}

/// A backend's 1400-byte reply as it sends it.
fn backend_reply(from: Ipv6Addr, to: Ipv6Addr, to_port: u16) -> Vec<u8> {
    let payload: Vec<u8> = (0..1400u32).map(|i| (i * 3) as u8).collect();
    frame6(from, BE_PORT, to, to_port, IPPROTO_TCP, &payload)
}

// ---------------------------------------------------------------------------------------------
// Maps and runs

/// A ready node serving the IPv6 nodePort NODE_PORT/`proto` on NODE, to one backend (local
/// or on another node), with the maps written by the agent's IPv6 map writer.
fn node6(proto: u8, backend: Ipv6Addr, is_local: bool) -> Fixture {
    let mut fx = Fixture::load();
    fx.set_config(CFG_FLAG_READY, SNAT_MIN, SNAT_MAX);
    let protocol = if proto == IPPROTO_TCP {
        Protocol::Tcp
    } else {
        Protocol::Udp
    };
    let desired = DesiredState {
        frontends6: vec![Frontend6 {
            service: ServicePortName {
                namespace: "default".into(),
                name: "upload".into(),
                port: String::new(),
                protocol,
            },
            kind: FrontendKind::NodePort,
            address: Ipv6Addr::UNSPECIFIED,
            port: NODE_PORT,
            protocol,
            backends: vec![Backend6 {
                address: backend,
                port: BE_PORT,
                is_local,
            }],
            affinity_timeout: None,
            source_ranges: None,
        }],
        nodeport_addresses6: vec![NODE],
        ..DesiredState::default()
    };
    let maps = PinnedMaps6::take(&mut fx.ebpf).expect("take the IPv6 maps");
    let mut writer = MapWriter6::new(maps);
    writer.apply(&desired, true).expect("write the maps");
    // The maps stay referenced by the loaded programs; the writer's handles may go.
    drop(writer);
    fx
}

fn pass_of(prog: &str) -> u32 {
    if prog == PROG_XDP {
        XDP_PASS
    } else {
        TC_ACT_OK
    }
}

/// Runs `prog` on `pkt`, which it must pass; returns the packet as it left.
fn run_pass6(fx: &Fixture, prog: &str, pkt: &[u8], what: &str) -> Vec<u8> {
    let (rc, out) = fx.run(prog, pkt);
    assert_eq!(rc, pass_of(prog), "{what}: {prog} verdict");
    out[..pkt.len()].to_vec()
}

/// Sends the client's packet through XDP (the nodePort translation); returns (client
/// packet, translated packet).
fn translate(fx: &mut Fixture, proto: u8) -> (Vec<u8>, Vec<u8>) {
    let pkt = client_packet(proto);
    let out = run_pass6(fx, PROG_XDP, &pkt, "client packet");
    if out == pkt {
        let ev: Vec<(usize, u64)> = fx
            .events()
            .into_iter()
            .enumerate()
            .filter(|e| e.1 != 0)
            .collect();
        panic!("the client packet was not translated: events {ev:?}");
    }
    (pkt, out)
}

fn icmp_events(fx: &mut Fixture) -> (u64, u64) {
    let e = fx.events();
    (
        e[STAT_ICMP_ERROR_XLATE as usize],
        e[STAT_PASS_OTHER_PROTO as usize],
    )
}

// ---------------------------------------------------------------------------------------------
// Tests

/// The node cannot forward the client's segment into the pod's 1280-byte link: its Packet
/// Too Big (to the client, quoting the DNATed segment) leaves quoting what the client sent,
/// with the MTU kept, on every program that may see it.
#[test]
fn packet_too_big_from_the_node_about_a_local_backend_flow() {
    let mut fx = node6(IPPROTO_TCP, LOCAL_BE, true);
    let (client_pkt, dnat) = translate(&mut fx, IPPROTO_TCP);
    assert_eq!(tuple6(&dnat).2, LOCAL_BE, "DNAT to the local backend");
    let err = icmp6_error(
        NODE,
        CLIENT,
        ICMP6_PKT_TOO_BIG,
        0,
        PATH_MTU,
        &dnat,
        MAX_QUOTE,
    );
    assert_eq!(err.len(), ETH_HLEN + 1280, "a full-size error");
    let want = icmp6_error(
        NODE,
        CLIENT,
        ICMP6_PKT_TOO_BIG,
        0,
        PATH_MTU,
        &with_l4_csum_of(&client_pkt, &dnat, IPPROTO_TCP),
        MAX_QUOTE,
    );
    for prog in [PROG_TC_EGRESS, PROG_TC_INGRESS, PROG_XDP] {
        let out = run_pass6(&fx, prog, &err, "packet too big");
        assert_eq!(out, want, "{prog}: the error quotes what the client sent");
        assert_eq!(
            parse_err6(&out, prog),
            Err6 {
                saddr: NODE,
                daddr: CLIENT,
                field: PATH_MTU,
                quoted: (CLIENT, CLIENT_PORT, NODE, NODE_PORT),
            },
            "{prog}"
        );
    }
    assert_eq!(icmp_events(&mut fx), (3, 0));
}

/// The pod has nothing on the port: its port unreachable comes from [node]:nodePort's
/// address, quoting the client's datagram.
#[test]
fn port_unreachable_from_a_local_backend_looks_like_the_node_port() {
    let mut fx = node6(IPPROTO_UDP, LOCAL_BE, true);
    let (client_pkt, dnat) = translate(&mut fx, IPPROTO_UDP);
    let err = icmp6_error(
        LOCAL_BE,
        CLIENT,
        ICMP6_DEST_UNREACH,
        CODE_PORT_UNREACH,
        0,
        &dnat,
        MAX_QUOTE,
    );
    let want = icmp6_error(
        NODE,
        CLIENT,
        ICMP6_DEST_UNREACH,
        CODE_PORT_UNREACH,
        0,
        &with_l4_csum_of(&client_pkt, &dnat, IPPROTO_UDP),
        MAX_QUOTE,
    );
    for prog in [PROG_TC_EGRESS, PROG_TC_INGRESS, PROG_XDP] {
        let out = run_pass6(&fx, prog, &err, "port unreachable");
        assert_eq!(
            out, want,
            "{prog}: from the nodePort, quoting the client's datagram"
        );
        parse_err6(&out, prog);
    }
    assert_eq!(icmp_events(&mut fx).0, 3);
}

/// A remote backend (the flow SNATed to the node's address): its port unreachable and a
/// router's time exceeded and Packet Too Big (an 8-byte quote) arrive on the device for
/// the node's address and must leave for the client, quoting the client's packet.
#[test]
fn errors_about_a_snat_flow_reach_the_client() {
    let mut fx = node6(IPPROTO_UDP, REMOTE_BE, false);
    let (client_pkt, xlated) = translate(&mut fx, IPPROTO_UDP);
    let (src, sport, dst, _) = tuple6(&xlated);
    assert_eq!((src, dst), (NODE, REMOTE_BE), "SNAT to the node");
    assert!((SNAT_MIN..=SNAT_MAX).contains(&sport), "SNAT port {sport}");
    let quoted = with_l4_csum_of(&client_pkt, &xlated, IPPROTO_UDP);
    let cases = [
        (
            REMOTE_BE,
            ICMP6_DEST_UNREACH,
            CODE_PORT_UNREACH,
            0,
            MAX_QUOTE,
            NODE,
        ),
        (ROUTER, ICMP6_TIME_EXCEEDED, 0, 0, MAX_QUOTE, ROUTER),
        // A minimal quote: the fixed header and the 8-byte UDP header.
        (ROUTER, ICMP6_PKT_TOO_BIG, 0, PATH_MTU, IP6_HLEN + 8, ROUTER),
    ];
    for (from, t, code, field, quote, want_from) in cases {
        let err = icmp6_error(from, NODE, t, code, field, &xlated, quote);
        let want = icmp6_error(want_from, CLIENT, t, code, field, &quoted, quote);
        for prog in [PROG_XDP, PROG_TC_INGRESS] {
            let out = run_pass6(&fx, prog, &err, "error about a SNATed flow");
            assert_eq!(out, want, "{prog}: type {t} from {from}");
            parse_err6(&out, prog);
        }
    }
    assert_eq!(icmp_events(&mut fx).0, 6);
}

/// A router on the client's side cannot forward the reply (sent from [node]:nodePort after
/// reverse NAT) and tells the frontend address: the error goes to the backend, quoting its
/// reply as it sent it (to the client for a local backend, to the node's SNAT port for a
/// remote one), so its TCP lowers its segment size.
#[test]
fn packet_too_big_about_a_reply_reaches_the_backend() {
    for (backend, is_local) in [(LOCAL_BE, true), (REMOTE_BE, false)] {
        let mut fx = node6(IPPROTO_TCP, backend, is_local);
        let (_, fwd) = translate(&mut fx, IPPROTO_TCP);
        let (to, to_port) = if is_local {
            (CLIENT, CLIENT_PORT)
        } else {
            (NODE, tuple6(&fwd).1)
        };
        let reply = backend_reply(backend, to, to_port);
        // A local backend's reply is reverse-translated on egress, a remote one's on ingress.
        let prog = if is_local { PROG_TC_EGRESS } else { PROG_XDP };
        let rev = run_pass6(&fx, prog, &reply, "reply");
        assert_eq!(tuple6(&rev), (NODE, NODE_PORT, CLIENT, CLIENT_PORT));
        let err = icmp6_error(
            ROUTER,
            NODE,
            ICMP6_PKT_TOO_BIG,
            0,
            PATH_MTU,
            &rev,
            MAX_QUOTE,
        );
        let want = icmp6_error(
            ROUTER,
            backend,
            ICMP6_PKT_TOO_BIG,
            0,
            PATH_MTU,
            &with_l4_csum_of(&reply, &rev, IPPROTO_TCP),
            MAX_QUOTE,
        );
        for prog in [PROG_XDP, PROG_TC_INGRESS] {
            let out = run_pass6(&fx, prog, &err, "packet too big about a reply");
            assert_eq!(
                out, want,
                "{prog} ({backend}): to the backend, quoting its reply"
            );
            assert_eq!(parse_err6(&out, prog).field, PATH_MTU);
        }
        assert_eq!(icmp_events(&mut fx).0, 2);
    }
}

/// Errors about flows we did not translate, ICMPv6 that is not an error, and quotes we do
/// not parse pass byte for byte unchanged (counted as another protocol on XDP ingress).
#[test]
fn errors_not_about_our_flows_pass_untouched() {
    let mut fx = node6(IPPROTO_UDP, LOCAL_BE, true);
    let (_, dnat) = translate(&mut fx, IPPROTO_UDP);
    let stranger = frame6(
        CLIENT,
        CLIENT_PORT + 1,
        LOCAL_BE,
        BE_PORT,
        IPPROTO_UDP,
        b"x",
    );
    // The DNATed datagram behind a fragment header (next header UDP, offset 0, M set).
    let mut fragment = dnat[..ETH_HLEN + IP6_HLEN].to_vec();
    fragment[ETH_HLEN + 6] = 44;
    fragment.extend_from_slice(&[IPPROTO_UDP, 0, 0, 1, 0xde, 0xad, 0xbe, 0xef]);
    fragment.extend_from_slice(&dnat[ETH_HLEN + IP6_HLEN..]);
    let unreach = |from, to, about: &[u8]| {
        icmp6_error(
            from,
            to,
            ICMP6_DEST_UNREACH,
            CODE_PORT_UNREACH,
            0,
            about,
            MAX_QUOTE,
        )
    };
    let cases = [
        (
            "a flow we never translated",
            unreach(LOCAL_BE, CLIENT, &stranger),
        ),
        (
            "an error not sent to the quoted source",
            unreach(LOCAL_BE, ROUTER, &dnat),
        ),
        (
            "a quote with an extension header",
            unreach(LOCAL_BE, CLIENT, &fragment),
        ),
        (
            "an echo request (type 128) carrying the datagram",
            icmp6_error(LOCAL_BE, CLIENT, 128, 0, 0, &dnat, MAX_QUOTE),
        ),
        (
            "a parameter problem (type 4)",
            icmp6_error(LOCAL_BE, CLIENT, 4, 0, 40, &dnat, MAX_QUOTE),
        ),
    ];
    for (what, pkt) in &cases {
        for prog in [PROG_XDP, PROG_TC_INGRESS, PROG_TC_EGRESS] {
            let out = run_pass6(&fx, prog, pkt, what);
            assert_eq!(&out, pkt, "{prog}: {what}: changed");
        }
    }
    // XDP and tc ingress count each as another protocol; egress counts only translations.
    assert_eq!(icmp_events(&mut fx), (0, 2 * cases.len() as u64));
}

/// A cut-short error (the IPv6 payload length then claims more than there is) and errors
/// whose quote is too short for the ports are never translated.
#[test]
fn truncated_errors_are_never_translated() {
    let mut fx = node6(IPPROTO_UDP, LOCAL_BE, true);
    let (_, dnat) = translate(&mut fx, IPPROTO_UDP);
    let err = icmp6_error(
        LOCAL_BE,
        CLIENT,
        ICMP6_DEST_UNREACH,
        CODE_PORT_UNREACH,
        0,
        &dnat,
        IP6_HLEN + 64,
    );
    for len in ETH_HLEN..err.len() {
        for prog in [PROG_XDP, PROG_TC_EGRESS] {
            // tc needs at least the fixed IPv6 header behind an IPv6 ethertype.
            if prog != PROG_XDP && len < ETH_HLEN + IP6_HLEN {
                continue;
            }
            let out = run_pass6(&fx, prog, &err[..len], "cut short");
            assert_eq!(out, &err[..len], "{prog}: cut at {len}: changed");
        }
    }
    // Consistent lengths, but the quote ends before the 8 transport bytes every error carries.
    for quote in 0..IP6_HLEN + 8 {
        let short = icmp6_error(
            LOCAL_BE,
            CLIENT,
            ICMP6_DEST_UNREACH,
            CODE_PORT_UNREACH,
            0,
            &dnat,
            quote,
        );
        let out = run_pass6(&fx, PROG_TC_EGRESS, &short, "short quote");
        assert_eq!(out, short, "quote of {quote} bytes: changed");
    }
    assert_eq!(icmp_events(&mut fx).0, 0, "nothing translated");
}

// ---------------------------------------------------------------------------------------------
// Mutations

/// Ethernet and the outer IPv6 header: mutations keep them (the kernel's test run needs
/// them).
const HDRS: usize = ETH_HLEN + IP6_HLEN;

/// xorshift64*, seeded: a failure names its seed and iteration.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Whether the ICMPv6 checksum of `p` verifies (over the payload length the header claims,
/// as a receiver checks it).
fn icmp6_csum_ok(p: &[u8]) -> bool {
    let len = usize::from(port_at(p, ETH_HLEN + 4));
    let end = (ETH_HLEN + IP6_HLEN + len).min(p.len());
    let body = &p[ETH_HLEN + IP6_HLEN..end];
    let mut sum = csum_add(0, &p[ETH_HLEN + 8..ETH_HLEN + IP6_HLEN]);
    sum += body.len() as u32 + u32::from(IPPROTO_ICMPV6);
    csum_finish(csum_add(sum, body)) == 0
}

/// Byte ranges a translation may change: the outer addresses, the ICMPv6 checksum, the
/// quoted addresses and ports.
fn may_change(i: usize) -> bool {
    let icmp = ETH_HLEN + IP6_HLEN;
    let q = icmp + 8;
    (ETH_HLEN + 8..icmp).contains(&i)
        || (icmp + 2..icmp + 4).contains(&i)
        || (q + 8..q + IP6_HLEN + 4).contains(&i)
}

/// Errors about the fixture's flows, mutated at random (cut short, bytes overwritten, the
/// payload length, the quoted next header, the ICMPv6 type changed), through every
/// program: each output is the input unchanged or a correct rewrite (only addresses, ports
/// and the checksum changed, the quote now client -> [node]:nodePort and the error to the
/// client, the checksum exactly as valid as it was). `KPROXY_FUZZ_SEED`/`KPROXY_FUZZ_ITERS`
/// as in `prog_run_fuzz`.
#[test]
fn mutated_errors_are_untouched_or_correctly_rewritten() {
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(default)
    };
    let seed = env("KPROXY_FUZZ_SEED", 0x1c6_6e44);
    let iters = env("KPROXY_FUZZ_ITERS", 5_000);
    let mut fx = node6(IPPROTO_UDP, LOCAL_BE, true);
    let (_, dnat) = translate(&mut fx, IPPROTO_UDP);
    let bases = [
        icmp6_error(
            LOCAL_BE,
            CLIENT,
            ICMP6_DEST_UNREACH,
            CODE_PORT_UNREACH,
            0,
            &dnat,
            MAX_QUOTE,
        ),
        icmp6_error(
            NODE,
            CLIENT,
            ICMP6_PKT_TOO_BIG,
            0,
            PATH_MTU,
            &dnat,
            IP6_HLEN + 8,
        ),
        icmp6_error(
            ROUTER,
            CLIENT,
            ICMP6_TIME_EXCEEDED,
            0,
            0,
            &dnat,
            IP6_HLEN + 64,
        ),
    ];
    let mut rng = Rng(seed | 1);
    let (mut rewritten, mut untouched) = (0u64, 0u64);
    for it in 0..iters {
        let mut p = bases[rng.below(bases.len())].clone();
        for _ in 0..=rng.below(3) {
            match rng.below(6) {
                0 if p.len() > HDRS => p.truncate(HDRS + rng.below(p.len() - HDRS)),
                1 => {
                    let i = ETH_HLEN + rng.below(p.len() - ETH_HLEN);
                    p[i] = rng.next() as u8;
                }
                2 => {
                    let len = (rng.next() as u16).to_be_bytes();
                    p[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&len);
                }
                // The quoted next header.
                3 if p.len() > HDRS + 8 + 6 => {
                    p[HDRS + 8 + 6] = [0, 6, 17, 44, 58, 132][rng.below(6)];
                }
                // The ICMPv6 type.
                4 if p.len() > HDRS => p[HDRS] = [1, 2, 3, 4, 128, 135][rng.below(6)],
                // A bit of the quoted addresses.
                _ => {
                    let i = HDRS + 8 + 8 + rng.below(32);
                    if i < p.len() {
                        p[i] ^= 1 << rng.below(8);
                    }
                }
            }
        }
        for prog in [PROG_XDP, PROG_TC_INGRESS, PROG_TC_EGRESS] {
            let what = format!("seed {seed:#x} iteration {it} {prog}");
            let out = run_pass6(&fx, prog, &p, &what);
            if out == p {
                untouched += 1;
                continue;
            }
            rewritten += 1;
            for (i, (a, b)) in p.iter().zip(&out).enumerate() {
                assert!(a == b || may_change(i), "{what}: byte {i} changed");
            }
            let e = parse_err6_unchecked(&out);
            assert_eq!(e.daddr, CLIENT, "{what}: not sent to the client");
            assert_eq!(
                e.quoted,
                (CLIENT, CLIENT_PORT, NODE, NODE_PORT),
                "{what}: quotes a packet the client never sent"
            );
            assert_eq!(
                icmp6_csum_ok(&out),
                icmp6_csum_ok(&p),
                "{what}: checksum validity changed"
            );
        }
    }
    println!("{iters} mutated errors x 3 programs: {rewritten} rewritten, {untouched} untouched");
    assert!(
        rewritten > 0 && untouched > 0,
        "the mutations never / always hit"
    );
}

/// [`parse_err6`] without the checksum check.
fn parse_err6_unchecked(p: &[u8]) -> Err6 {
    let icmp = ETH_HLEN + IP6_HLEN;
    let q = icmp + 8;
    let ql4 = q + IP6_HLEN;
    Err6 {
        saddr: addr_at(p, ETH_HLEN + 8),
        daddr: addr_at(p, ETH_HLEN + 24),
        field: u32::from_be_bytes(p[icmp + 4..icmp + 8].try_into().unwrap()),
        quoted: (
            addr_at(p, q + 8),
            port_at(p, ql4),
            addr_at(p, q + 24),
            port_at(p, ql4 + 2),
        ),
    }
}
