//! SCTP through the device programs (BPF_PROG_TEST_RUN; this kernel has no SCTP sockets, so
//! packet tests are all there is). SCTP's CRC32c covers the ports but not the addresses:
//! frontends whose port equals the backend's (externalIP/LoadBalancer with port ==
//! targetPort) are translated with an address rewrite only and the CRC untouched; a
//! translation that would change a port is refused (passed, counted), as in Cilium.
//! Needs root.

mod dp_common;

use dp_common::*;
use kproxy_tests::prog_run::*;
use proxy_common::{
    lb::SVC_FLAG_EXTERNAL,
    stats::{STAT_FWD_XLATE, STAT_PASS_SCTP_PORT_REWRITE},
};

const EXT_IP: [u8; 4] = [198, 51, 100, 7];
const SCTP_PORT: u16 = 3868;

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
        let p = parse(&out);
        assert_eq!(
            (p.saddr, p.sport, p.daddr, p.dport),
            (CLIENT, CLIENT_PORT, LOCAL_BE, SCTP_PORT),
            "{prog}: DNAT of the address only"
        );
        let crc = |b: &[u8]| b[p.l4_off + 8..p.l4_off + 12].to_vec();
        assert_eq!(
            crc(&out),
            crc(&pkt),
            "{prog}: the CRC32c does not cover addresses"
        );
        assert_eq!(out[..ETH_HLEN + 10], pkt[..ETH_HLEN + 10]);
    }
    let reply = PacketSpec::sctp(LOCAL_BE, SCTP_PORT, CLIENT, CLIENT_PORT).build();
    let out = run_pass(&fx, PROG_TC_EGRESS, &reply, "sctp reply");
    assert_checksums(&out, "sctp reply");
    let p = parse(&out);
    assert_eq!(
        (p.saddr, p.sport),
        (EXT_IP, SCTP_PORT),
        "reply from the external IP"
    );
    assert!(fx.events()[STAT_FWD_XLATE as usize] >= 2);
}

#[test]
fn sctp_translation_that_would_change_a_port_is_refused() {
    // nodePort 30080 -> backend port 8080: the CRC would have to change.
    let mut fx = nodeport_fixture(IPPROTO_SCTP, &[local_be()]);
    let pkt = PacketSpec::sctp(CLIENT, CLIENT_PORT, NODE, NODE_PORT).build();
    for prog in [PROG_XDP, PROG_TC_INGRESS] {
        assert_untouched(&fx, prog, &pkt, "sctp nodePort with another targetPort");
    }
    assert_eq!(fx.events()[STAT_PASS_SCTP_PORT_REWRITE as usize], 2);
    // A remote backend on the same port still needs SNAT to another source port...
    let mut fx = nodeport_fixture(IPPROTO_SCTP, &[]);
    fx.add_service(
        EXT_IP,
        SCTP_PORT,
        IPPROTO_SCTP,
        SVC_FLAG_EXTERNAL,
        9,
        &[sctp_be(12, REMOTE_BE, false)],
    );
    let pkt = PacketSpec::sctp(CLIENT, CLIENT_PORT, EXT_IP, SCTP_PORT).build();
    assert_untouched(
        &fx,
        PROG_XDP,
        &pkt,
        "sctp to a remote backend, SNAT port differs",
    );
    // ...unless the client's port is one SNAT keeps (inside the SNAT range).
    let pkt = PacketSpec::sctp(CLIENT, SNAT_MIN + 3, EXT_IP, SCTP_PORT).build();
    let out = run_pass(&fx, PROG_XDP, &pkt, "sctp, client port kept by SNAT");
    assert_checksums(&out, "sctp snat");
    let p = parse(&out);
    assert_eq!(
        (p.saddr, p.sport, p.daddr, p.dport),
        (EXT_IP, SNAT_MIN + 3, REMOTE_BE, SCTP_PORT)
    );
}
