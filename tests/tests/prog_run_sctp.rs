//! SCTP through the device programs (BPF_PROG_TEST_RUN; this kernel has no SCTP sockets, so
//! packet tests are all there is). SCTP's CRC32c covers the ports but not the addresses:
//! an address-only translation (externalIP/LoadBalancer with port == targetPort) leaves the
//! CRC untouched; a port change (nodePort -> targetPort, SNAT ports, and back) updates it
//! from the per-length factor table the agent writes (`KP_SCTP_CRC_V1`). Every output is
//! checked against a from-scratch CRC32c. Needs root.

mod dp_common;

use dp_common::*;
use kproxy_tests::prog_run::*;
use proxy_common::{
    lb::SVC_FLAG_EXTERNAL,
    stats::{STAT_FWD_XLATE, STAT_PASS_SCTP_NO_CRC_FACTOR, STAT_REV_XLATE},
};

const EXT_IP: [u8; 4] = [198, 51, 100, 7];
const SCTP_PORT: u16 = 3868;
const SCTP_CSUM_OFF: usize = 8;

/// SCTP lengths (common header included) the port rewrites are tried on: the smallest
/// packet with a chunk header, odd ones (SCTP pads chunks, but the update must not rely on
/// it), and the largest in a 1500-byte MTU.
const SCTP_LENS: [usize; 6] = [16, 17, 33, 200, 1001, 1480];

fn sctp_be(id: u32, addr: [u8; 4], local: bool) -> Backend {
    Backend {
        id,
        addr,
        port: SCTP_PORT,
        flags: if local {
            proxy_common::lb::BACKEND_FLAG_LOCAL
        } else {
            0
        },
    }
}

/// An SCTP packet of `sctp_len` bytes (12-byte common header, then a chunk) with a correct
/// CRC32c.
fn sctp_packet(saddr: [u8; 4], sport: u16, daddr: [u8; 4], dport: u16, sctp_len: usize) -> Vec<u8> {
    let chunk_len = sctp_len - 12;
    let mut payload = vec![0u8, 0x03];
    payload.extend_from_slice(&(chunk_len as u16).to_be_bytes());
    payload.extend((4..chunk_len).map(|i| (i * 7 + 3) as u8));
    payload.truncate(chunk_len);
    let mut spec = PacketSpec::sctp(saddr, sport, daddr, dport);
    spec.payload = payload;
    let p = spec.build();
    assert_eq!(p.len(), ETH_HLEN + 20 + sctp_len);
    p
}

/// The CRC32c field of an SCTP packet (as SCTP stores it: little-endian).
fn stored_crc(p: &[u8]) -> u32 {
    let l4 = parse(p).l4_off;
    u32::from_le_bytes(
        p[l4 + SCTP_CSUM_OFF..l4 + SCTP_CSUM_OFF + 4]
            .try_into()
            .unwrap(),
    )
}

/// The CRC32c of an SCTP packet computed from scratch (over the packet with the field 0).
fn computed_crc(p: &[u8]) -> u32 {
    let l4 = parse(p).l4_off;
    let mut sctp = p[l4..].to_vec();
    sctp[SCTP_CSUM_OFF..SCTP_CSUM_OFF + 4].fill(0);
    crc32c(&sctp)
}

fn assert_crc_valid(p: &[u8], what: &str) {
    assert_eq!(
        stored_crc(p),
        computed_crc(p),
        "{what}: the CRC32c does not validate"
    );
}

fn tuple(p: &[u8]) -> ([u8; 4], u16, [u8; 4], u16) {
    let p = parse(p);
    (p.saddr, p.sport, p.daddr, p.dport)
}

#[test]
fn crc32c_helper_matches_the_rfc_3720_vectors() {
    // RFC 3720 B.4: 32 bytes of zeros, of ones; and the common check value of "123456789".
    assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
    assert_eq!(crc32c(&[0xffu8; 32]), 0x62a8_ab43);
    assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    let p = sctp_packet(CLIENT, CLIENT_PORT, NODE, NODE_PORT, 33);
    assert_crc_valid(&p, "built packet");
}

#[test]
fn sctp_external_ip_same_port_is_translated_with_the_crc_untouched() {
    let mut fx = nodeport_fixture(IPPROTO_SCTP, &[local_be()]);
    fx.add_service(
        EXT_IP,
        SCTP_PORT,
        IPPROTO_SCTP,
        SVC_FLAG_EXTERNAL,
        9,
        &[sctp_be(11, LOCAL_BE, true)],
    );
    let pkt = PacketSpec::sctp(CLIENT, CLIENT_PORT, EXT_IP, SCTP_PORT).build();
    for prog in [PROG_XDP, PROG_TC_INGRESS] {
        let out = run_pass(&fx, prog, &pkt, "sctp to an external IP");
        assert_checksums(&out, "sctp forward");
        assert_eq!(
            tuple(&out),
            (CLIENT, CLIENT_PORT, LOCAL_BE, SCTP_PORT),
            "{prog}: DNAT of the address only"
        );
        assert_eq!(
            stored_crc(&out),
            stored_crc(&pkt),
            "{prog}: the CRC32c does not cover addresses"
        );
        assert_eq!(out[..ETH_HLEN + 10], pkt[..ETH_HLEN + 10]);
    }
    let reply = PacketSpec::sctp(LOCAL_BE, SCTP_PORT, CLIENT, CLIENT_PORT).build();
    let out = run_pass(&fx, PROG_TC_EGRESS, &reply, "sctp reply");
    assert_checksums(&out, "sctp reply");
    assert_eq!(stored_crc(&out), stored_crc(&reply));
    let p = parse(&out);
    assert_eq!(
        (p.saddr, p.sport),
        (EXT_IP, SCTP_PORT),
        "reply from the external IP"
    );
    assert!(fx.events()[STAT_FWD_XLATE as usize] >= 2);
}

/// nodePort 30080 -> a local backend's 8080, through XDP and tc ingress, and the backend's
/// reply back to the nodePort through tc egress: ports rewritten, CRC32c valid, at every
/// length.
#[test]
fn sctp_nodeport_to_another_target_port_rewrites_ports_with_a_valid_crc() {
    let mut fx = nodeport_fixture(IPPROTO_SCTP, &[local_be()]);
    for (i, len) in SCTP_LENS.into_iter().enumerate() {
        let client_port = CLIENT_PORT + i as u16;
        let pkt = sctp_packet(CLIENT, client_port, NODE, NODE_PORT, len);
        for prog in [PROG_XDP, PROG_TC_INGRESS] {
            let what = format!("{prog}, SCTP length {len}, nodePort to a local backend");
            let out = run_pass(&fx, prog, &pkt, &what);
            assert_eq!(
                tuple(&out),
                (CLIENT, client_port, LOCAL_BE, BE_PORT),
                "{what}: DNAT to the backend's address and port"
            );
            assert_crc_valid(&out, &what);
            assert_ne!(stored_crc(&out), stored_crc(&pkt), "{what}: CRC unchanged");
            assert_checksums(&out, &what);
        }
        let reply = sctp_packet(LOCAL_BE, BE_PORT, CLIENT, client_port, len);
        let what = format!("SCTP length {len}, reply through tc egress");
        let out = run_pass(&fx, PROG_TC_EGRESS, &reply, &what);
        assert_eq!(
            tuple(&out),
            (NODE, NODE_PORT, CLIENT, client_port),
            "{what}: from the nodePort"
        );
        assert_crc_valid(&out, &what);
        assert_checksums(&out, &what);
    }
    let events = fx.events();
    assert_eq!(events[STAT_FWD_XLATE as usize], 2 * SCTP_LENS.len() as u64);
    assert_eq!(events[STAT_REV_XLATE as usize], SCTP_LENS.len() as u64);
    assert_eq!(events[STAT_PASS_SCTP_NO_CRC_FACTOR as usize], 0);
}

/// A remote backend: the request leaves SNATed to the node's address and a SNAT port, the
/// reply comes back through ingress (XDP and tc) and is turned into nodePort -> client.
#[test]
fn sctp_remote_backend_snat_port_and_reply_keep_a_valid_crc() {
    let mut fx = nodeport_fixture(IPPROTO_SCTP, &[remote_be()]);
    for len in [17, 1480] {
        let pkt = sctp_packet(CLIENT, CLIENT_PORT, NODE, NODE_PORT, len);
        let mut snat_port = None;
        for prog in [PROG_XDP, PROG_TC_INGRESS] {
            let what = format!("{prog}, SCTP length {len}, nodePort to a remote backend");
            let out = run_pass(&fx, prog, &pkt, &what);
            let (saddr, sport, daddr, dport) = tuple(&out);
            assert_eq!(
                (saddr, daddr, dport),
                (NODE, REMOTE_BE, BE_PORT),
                "{what}: SNAT to the node, DNAT to the backend"
            );
            assert!(
                (SNAT_MIN..=SNAT_MAX).contains(&sport),
                "{what}: source port {sport} outside the SNAT range"
            );
            assert_eq!(*snat_port.get_or_insert(sport), sport, "{what}: same flow");
            assert_crc_valid(&out, &what);
            assert_checksums(&out, &what);
        }
        let snat_port = snat_port.unwrap();
        let reply = sctp_packet(REMOTE_BE, BE_PORT, NODE, snat_port, len);
        for prog in [PROG_XDP, PROG_TC_INGRESS] {
            let what = format!("{prog}, SCTP length {len}, reply from the remote backend");
            let out = run_pass(&fx, prog, &reply, &what);
            assert_eq!(
                tuple(&out),
                (NODE, NODE_PORT, CLIENT, CLIENT_PORT),
                "{what}: from the nodePort to the client"
            );
            assert_crc_valid(&out, &what);
            assert_checksums(&out, &what);
        }
        fx.ct_clear();
    }
}

/// The update is incremental: a packet whose CRC was wrong stays wrong by the same amount
/// (the receiver still drops it), in both directions.
#[test]
fn sctp_corrupt_crc_stays_corrupt_after_a_port_rewrite() {
    let mut fx = nodeport_fixture(IPPROTO_SCTP, &[local_be()]);
    let corrupt = |mut p: Vec<u8>| {
        let l4 = parse(&p).l4_off;
        p[l4 + SCTP_CSUM_OFF + 1] ^= 0x10;
        p
    };
    let error = |p: &[u8]| stored_crc(p) ^ computed_crc(p);
    let pkt = corrupt(sctp_packet(CLIENT, CLIENT_PORT, NODE, NODE_PORT, 101));
    assert_ne!(error(&pkt), 0);
    for prog in [PROG_XDP, PROG_TC_INGRESS] {
        let out = run_pass(&fx, prog, &pkt, "corrupt sctp");
        assert_eq!(tuple(&out), (CLIENT, CLIENT_PORT, LOCAL_BE, BE_PORT));
        assert_eq!(error(&out), error(&pkt), "{prog}: the CRC error changed");
    }
    // A payload corruption (the CRC is right for other bytes) stays one too.
    let mut reply = sctp_packet(LOCAL_BE, BE_PORT, CLIENT, CLIENT_PORT, 101);
    let last = reply.len() - 1;
    reply[last] ^= 0x01;
    assert_ne!(error(&reply), 0);
    let out = run_pass(&fx, PROG_TC_EGRESS, &reply, "corrupt sctp reply");
    assert_eq!(tuple(&out), (NODE, NODE_PORT, CLIENT, CLIENT_PORT));
    assert_eq!(error(&out), error(&reply), "egress: the CRC error changed");
    assert_eq!(fx.events()[STAT_FWD_XLATE as usize], 2);
}

/// Linux leaves the CRC field zero when the device computes it later (CHECKSUM_PARTIAL, as
/// for a local backend's reply): the ports are rewritten, the field stays zero for that
/// computation.
#[test]
fn sctp_zero_crc_left_for_the_offload_stays_zero() {
    let fx = nodeport_fixture(IPPROTO_SCTP, &[local_be()]);
    let zero_crc = |mut p: Vec<u8>| {
        let l4 = parse(&p).l4_off;
        p[l4 + SCTP_CSUM_OFF..l4 + SCTP_CSUM_OFF + 4].fill(0);
        p
    };
    let pkt = zero_crc(sctp_packet(CLIENT, CLIENT_PORT, NODE, NODE_PORT, 64));
    let out = run_pass(&fx, PROG_TC_INGRESS, &pkt, "sctp with a zero CRC");
    assert_eq!(tuple(&out), (CLIENT, CLIENT_PORT, LOCAL_BE, BE_PORT));
    assert_eq!(stored_crc(&out), 0);
    let reply = zero_crc(sctp_packet(LOCAL_BE, BE_PORT, CLIENT, CLIENT_PORT, 64));
    let out = run_pass(&fx, PROG_TC_EGRESS, &reply, "sctp reply with a zero CRC");
    assert_eq!(tuple(&out), (NODE, NODE_PORT, CLIENT, CLIENT_PORT));
    assert_eq!(stored_crc(&out), 0);
}

/// Without its length's factor (a table the agent never wrote) a port-changing packet is
/// passed untouched and counted; other lengths still translate.
#[test]
fn sctp_port_rewrite_without_a_crc_factor_is_passed_and_counted() {
    let mut fx = nodeport_fixture(IPPROTO_SCTP, &[local_be()]);
    fx.set_sctp_crc_shift(33, 0);
    let pkt = sctp_packet(CLIENT, CLIENT_PORT, NODE, NODE_PORT, 33);
    for prog in [PROG_XDP, PROG_TC_INGRESS] {
        assert_untouched(&fx, prog, &pkt, "sctp without its CRC factor");
    }
    assert_eq!(fx.events()[STAT_PASS_SCTP_NO_CRC_FACTOR as usize], 2);
    let pkt = sctp_packet(CLIENT, CLIENT_PORT, NODE, NODE_PORT, 34);
    let out = run_pass(&fx, PROG_XDP, &pkt, "sctp with its CRC factor");
    assert_eq!(tuple(&out), (CLIENT, CLIENT_PORT, LOCAL_BE, BE_PORT));
    assert_crc_valid(&out, "length 34");
}
