//! ICMP errors about translated nodePort flows are reverse-translated (BPF_PROG_TEST_RUN):
//! the client must find its own packet (client -> nodeIP:nodePort) quoted, or it ignores the
//! error and path-MTU discovery breaks. Expected packets are built independently (the
//! client's original packet quoted, from-scratch checksums) and compared byte for byte.
//! Needs root.

mod dp_common;

use dp_common::*;
use kproxy_tests::prog_run::*;
use proxy_common::stats::{STAT_ICMP_ERROR_XLATE, STAT_PASS_OTHER_PROTO};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const CODE_PORT_UNREACH: u8 = 3;
const CODE_FRAG_NEEDED: u8 = 4;
/// Linux quotes as much of the packet as fits in 576 bytes.
const LINUX_QUOTE: usize = 576 - 20 - 8;

/// A full-size TCP data segment of the client (DF set, ACK|PSH), 1400 bytes of payload.
fn client_data_segment() -> PacketSpec {
    let mut spec = PacketSpec::tcp(CLIENT, CLIENT_PORT, NODE, NODE_PORT);
    spec.tcp_flags = 0x18;
    spec.payload = (0..1400u32).map(|i| (i * 7) as u8).collect();
    spec
}

/// Sends `spec` through XDP (the nodePort translation) and returns (client packet,
/// translated packet).
fn translate(fx: &Fixture, spec: &PacketSpec) -> (Vec<u8>, Vec<u8>) {
    let pkt = spec.build();
    let out = run_pass(fx, PROG_XDP, &pkt, "client packet");
    assert_ne!(out, pkt, "the client packet was not translated");
    (pkt, out)
}

/// The client's own packet with the L4 checksum of `translated` (the quoted L4 checksum is
/// left as the error's sender saw it).
fn client_view(client_pkt: &[u8], translated: &[u8]) -> Vec<u8> {
    let mut v = client_pkt.to_vec();
    let p = parse(translated);
    let off = p.l4_off + l4_csum_off(p.proto);
    v[off..off + 2].copy_from_slice(&translated[off..off + 2]);
    v
}

fn icmp_events(fx: &mut Fixture) -> (u64, u64) {
    let e = fx.events();
    (
        e[STAT_ICMP_ERROR_XLATE as usize],
        e[STAT_PASS_OTHER_PROTO as usize],
    )
}

#[test]
fn frag_needed_from_the_node_about_a_local_backend_flow() {
    let mut fx = nodeport_fixture(IPPROTO_TCP, &[local_be()]);
    let (client_pkt, dnat) = translate(&fx, &client_data_segment());
    assert_eq!(parse(&dnat).daddr, LOCAL_BE);
    // The node cannot forward the 1454-byte packet to the pod link (MTU 1200): its stack
    // sends fragmentation needed to the client, quoting the post-DNAT packet.
    let err = icmp_error(
        NODE_POD_GW,
        CLIENT,
        ICMP_DEST_UNREACH,
        CODE_FRAG_NEEDED,
        1200,
        &dnat,
        LINUX_QUOTE,
    );
    let out = run_pass(&fx, PROG_TC_EGRESS, &err, "frag needed on egress");
    let want = icmp_error(
        NODE_POD_GW,
        CLIENT,
        ICMP_DEST_UNREACH,
        CODE_FRAG_NEEDED,
        1200,
        &client_view(&client_pkt, &dnat),
        LINUX_QUOTE,
    );
    assert_eq!(out, want, "the error quotes what the client sent");
    assert_icmp_checksums(&out, "frag needed");
    let p = parse_icmp(&out);
    assert_eq!(
        (p.q_saddr, p.q_sport, p.q_daddr, p.q_dport),
        (CLIENT, CLIENT_PORT, NODE, NODE_PORT)
    );
    // Golden checksums (a change in the rewrite shows up here first).
    assert_eq!(
        (p.ip_csum, p.icmp_csum, p.q_ip_csum),
        (
            parse_icmp(&want).ip_csum,
            parse_icmp(&want).icmp_csum,
            parse(&client_pkt).ip_csum
        )
    );
    assert_eq!(icmp_events(&mut fx), (1, 0));
}

#[test]
fn port_unreachable_from_a_local_backend_looks_like_the_node_port() {
    let mut fx = nodeport_fixture(IPPROTO_UDP, &[local_be()]);
    let (client_pkt, dnat) = translate(&fx, &PacketSpec::udp(CLIENT, CLIENT_PORT, NODE, NODE_PORT));
    // The pod has nothing on the port: its stack answers port unreachable from its address.
    let err = icmp_error(
        LOCAL_BE,
        CLIENT,
        ICMP_DEST_UNREACH,
        CODE_PORT_UNREACH,
        0,
        &dnat,
        LINUX_QUOTE,
    );
    for prog in [PROG_TC_EGRESS, PROG_TC_INGRESS, PROG_XDP] {
        let out = run_pass(&fx, prog, &err, "port unreachable");
        let want = icmp_error(
            NODE,
            CLIENT,
            ICMP_DEST_UNREACH,
            CODE_PORT_UNREACH,
            0,
            &client_view(&client_pkt, &dnat),
            LINUX_QUOTE,
        );
        assert_eq!(
            out, want,
            "{prog}: from the nodePort, quoting the client's datagram"
        );
        assert_icmp_checksums(&out, "port unreachable");
    }
    assert_eq!(icmp_events(&mut fx).0, 3);
}

#[test]
fn errors_about_a_snat_flow_reach_the_client() {
    let mut fx = nodeport_fixture(IPPROTO_UDP, &[remote_be()]);
    let (client_pkt, xlated) =
        translate(&fx, &PacketSpec::udp(CLIENT, CLIENT_PORT, NODE, NODE_PORT));
    let x = parse(&xlated);
    assert_eq!((x.saddr, x.daddr), (NODE, REMOTE_BE), "SNATed to the node");
    let want_from = |src: [u8; 4], t: u8, c: u8| {
        icmp_error(
            src,
            CLIENT,
            t,
            c,
            0,
            &client_view(&client_pkt, &xlated),
            LINUX_QUOTE,
        )
    };
    // The remote backend says port unreachable to the node's SNAT address: it arrives on
    // the device and must leave for the client, from the nodePort.
    let err = icmp_error(
        REMOTE_BE,
        NODE,
        ICMP_DEST_UNREACH,
        CODE_PORT_UNREACH,
        0,
        &xlated,
        LINUX_QUOTE,
    );
    for prog in [PROG_XDP, PROG_TC_INGRESS] {
        let out = run_pass(&fx, prog, &err, "port unreachable from a remote backend");
        assert_eq!(
            out,
            want_from(NODE, ICMP_DEST_UNREACH, CODE_PORT_UNREACH),
            "{prog}"
        );
    }
    // A router between the node and the backend: time exceeded keeps the router's address.
    let err = icmp_error(ROUTER, NODE, ICMP_TIME_EXCEEDED, 0, 0, &xlated, LINUX_QUOTE);
    let out = run_pass(&fx, PROG_XDP, &err, "time exceeded from a router");
    assert_eq!(out, want_from(ROUTER, ICMP_TIME_EXCEEDED, 0));
    assert_icmp_checksums(&out, "time exceeded");
    assert_eq!(icmp_events(&mut fx).0, 3);
}

#[test]
fn an_eight_byte_quote_is_enough() {
    // RFC 792 routers quote only the IPv4 header and 8 bytes: the TCP checksum is missing.
    let fx = nodeport_fixture(IPPROTO_TCP, &[remote_be()]);
    let (client_pkt, xlated) = translate(&fx, &client_data_segment());
    let err = icmp_error(
        ROUTER,
        NODE,
        ICMP_DEST_UNREACH,
        CODE_FRAG_NEEDED,
        1280,
        &xlated,
        28,
    );
    let out = run_pass(&fx, PROG_XDP, &err, "8-byte quote");
    let want = icmp_error(
        ROUTER,
        CLIENT,
        ICMP_DEST_UNREACH,
        CODE_FRAG_NEEDED,
        1280,
        &client_pkt,
        28,
    );
    assert_eq!(out, want);
    assert_eq!(parse_icmp(&out).q_l4_csum, None);
}

#[test]
fn quoted_ip_options_are_honoured() {
    let fx = nodeport_fixture(IPPROTO_UDP, &[local_be()]);
    let mut spec = PacketSpec::udp(CLIENT, CLIENT_PORT, NODE, NODE_PORT);
    spec.ip_options = vec![0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x00]; // NOPs + EOL
    let (client_pkt, dnat) = translate(&fx, &spec);
    let err = icmp_error(
        LOCAL_BE,
        CLIENT,
        ICMP_DEST_UNREACH,
        3,
        0,
        &dnat,
        LINUX_QUOTE,
    );
    let out = run_pass(&fx, PROG_TC_EGRESS, &err, "quoted header with options");
    let want = icmp_error(
        NODE,
        CLIENT,
        ICMP_DEST_UNREACH,
        3,
        0,
        &client_view(&client_pkt, &dnat),
        LINUX_QUOTE,
    );
    assert_eq!(out, want);
}

#[test]
fn errors_not_about_our_flows_pass_untouched() {
    let mut fx = nodeport_fixture(IPPROTO_UDP, &[local_be()]);
    let (_, dnat) = translate(&fx, &PacketSpec::udp(CLIENT, CLIENT_PORT, NODE, NODE_PORT));
    // Another client port: no flow.
    let stranger = PacketSpec::udp(CLIENT, CLIENT_PORT + 1, LOCAL_BE, BE_PORT).build();
    let cases = [
        (
            "a flow we never translated",
            icmp_error(
                LOCAL_BE,
                CLIENT,
                ICMP_DEST_UNREACH,
                3,
                0,
                &stranger,
                LINUX_QUOTE,
            ),
        ),
        (
            "an error not sent to the quoted source",
            icmp_error(
                LOCAL_BE,
                ROUTER,
                ICMP_DEST_UNREACH,
                3,
                0,
                &dnat,
                LINUX_QUOTE,
            ),
        ),
        (
            "an echo request (type 8) quoting nothing",
            icmp_error(LOCAL_BE, CLIENT, 8, 0, 0, &dnat, LINUX_QUOTE),
        ),
        (
            "a redirect (type 5)",
            icmp_error(LOCAL_BE, CLIENT, 5, 0, 0, &dnat, LINUX_QUOTE),
        ),
    ];
    for (what, pkt) in &cases {
        for prog in [PROG_XDP, PROG_TC_INGRESS, PROG_TC_EGRESS] {
            assert_untouched(&fx, prog, pkt, what);
        }
    }
    // A quoted non-first fragment has no ports.
    let mut frag = dnat.clone();
    frag[ETH_HLEN + 6..ETH_HLEN + 8].copy_from_slice(&0x2010u16.to_be_bytes());
    let err = icmp_error(
        LOCAL_BE,
        CLIENT,
        ICMP_DEST_UNREACH,
        3,
        0,
        &frag,
        LINUX_QUOTE,
    );
    assert_untouched(&fx, PROG_TC_EGRESS, &err, "quoted later fragment");
    assert_eq!(icmp_events(&mut fx).0, 0, "nothing translated");
}

#[test]
fn truncated_errors_are_never_translated() {
    let fx = nodeport_fixture(IPPROTO_UDP, &[local_be()]);
    let (_, dnat) = translate(&fx, &PacketSpec::udp(CLIENT, CLIENT_PORT, NODE, NODE_PORT));
    let err = icmp_error(
        LOCAL_BE,
        CLIENT,
        ICMP_DEST_UNREACH,
        3,
        0,
        &dnat,
        LINUX_QUOTE,
    );
    // Cut short (the IPv4 total length then claims more than there is).
    for len in 0..err.len() {
        for prog in [PROG_TC_EGRESS, PROG_XDP] {
            // The kernel runs XDP on at least an Ethernet header, tc on an IPv4 ethertype
            // with at least a 20-byte IPv4 header (XDP covers the shorter cuts).
            if len < ETH_HLEN || (prog != PROG_XDP && len < ETH_HLEN + 20) {
                continue;
            }
            assert_untouched(&fx, prog, &err[..len], &format!("cut at {len}"));
        }
    }
    // Consistent lengths but a quote too short for the ports: 20 + 8 + quoted header + < 8.
    for quote in 0..28 {
        let short = icmp_error(LOCAL_BE, CLIENT, ICMP_DEST_UNREACH, 3, 0, &dnat, quote);
        assert_untouched(
            &fx,
            PROG_TC_EGRESS,
            &short,
            &format!("quote of {quote} bytes"),
        );
    }
}

/// A backend's reply with 1400 bytes of payload, as the backend sends it.
fn backend_reply(from: [u8; 4], to: [u8; 4], to_port: u16) -> Vec<u8> {
    let mut s = PacketSpec::tcp(from, BE_PORT, to, to_port);
    s.tcp_flags = 0x18;
    s.payload = (0..1400u32).map(|i| (i * 3) as u8).collect();
    s.build()
}

#[test]
fn frag_needed_about_a_reply_reaches_the_local_backend() {
    let mut fx = nodeport_fixture(IPPROTO_TCP, &[local_be()]);
    translate(&fx, &client_data_segment());
    // The backend's reply leaves through egress as node:30080 -> client; a router on the
    // client's side cannot forward it and tells the frontend address.
    let reply = backend_reply(LOCAL_BE, CLIENT, CLIENT_PORT);
    let rev = run_pass(&fx, PROG_TC_EGRESS, &reply, "reply");
    assert_eq!(parse(&rev).saddr, NODE);
    let err = icmp_error(
        ROUTER,
        NODE,
        ICMP_DEST_UNREACH,
        CODE_FRAG_NEEDED,
        1280,
        &rev,
        LINUX_QUOTE,
    );
    for prog in [PROG_XDP, PROG_TC_INGRESS] {
        let out = run_pass(&fx, prog, &err, "frag needed about a reply");
        let want = icmp_error(
            ROUTER,
            LOCAL_BE,
            ICMP_DEST_UNREACH,
            CODE_FRAG_NEEDED,
            1280,
            &client_view(&reply, &rev),
            LINUX_QUOTE,
        );
        assert_eq!(out, want, "{prog}: to the backend, quoting its own reply");
        assert_icmp_checksums(&out, "frag needed about a reply");
    }
    assert_eq!(icmp_events(&mut fx).0, 2);
}

#[test]
fn frag_needed_about_a_snat_reply_reaches_the_remote_backend() {
    let fx = nodeport_fixture(IPPROTO_TCP, &[remote_be()]);
    let (_, fwd) = translate(&fx, &client_data_segment());
    let snat_port = parse(&fwd).sport;
    let reply = backend_reply(REMOTE_BE, NODE, snat_port);
    let rev = run_pass(&fx, PROG_XDP, &reply, "reply from the remote backend");
    assert_eq!(
        (parse(&rev).daddr, parse(&rev).dport),
        (CLIENT, CLIENT_PORT)
    );
    let err = icmp_error(
        ROUTER,
        NODE,
        ICMP_DEST_UNREACH,
        CODE_FRAG_NEEDED,
        1280,
        &rev,
        LINUX_QUOTE,
    );
    let out = run_pass(&fx, PROG_XDP, &err, "frag needed about a SNATed reply");
    let want = icmp_error(
        ROUTER,
        REMOTE_BE,
        ICMP_DEST_UNREACH,
        CODE_FRAG_NEEDED,
        1280,
        &client_view(&reply, &rev),
        LINUX_QUOTE,
    );
    assert_eq!(
        out, want,
        "to the remote backend, quoting its reply to the node"
    );
}
