//! TCP state in the conntrack entries the device programs write (BPF_PROG_TEST_RUN): the
//! flags the userspace sweep turns into timeouts (SYN only, established, closed), a port
//! reused after a close, and the conntrack counters. Needs root.

mod dp_common;

use dp_common::*;
use kproxy_tests::prog_run::*;
use proxy_common::{
    conntrack::{
        CT_FLAG_FIN_FWD, CT_FLAG_FIN_REV, CT_FLAG_RST, CT_FLAG_SEEN_NON_SYN, CT_FLAG_TCP_STATE,
        TcpCtState, tcp_ct_state,
    },
    lb::BACKEND_FLAG_LOCAL,
    stats::{STAT_CT_CREATED, STAT_CT_LOST_MIDFLOW},
};

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const FIN_ACK: u8 = 0x11;
const RST: u8 = 0x04;

fn client(flags: u8) -> Vec<u8> {
    let mut s = PacketSpec::tcp(CLIENT, CLIENT_PORT, NODE, NODE_PORT);
    s.tcp_flags = flags;
    s.build()
}

fn backend_reply(flags: u8) -> Vec<u8> {
    let mut s = PacketSpec::tcp(LOCAL_BE, BE_PORT, CLIENT, CLIENT_PORT);
    s.tcp_flags = flags;
    s.build()
}

fn flags_after(fx: &mut Fixture, prog: &str, pkt: &[u8]) -> u16 {
    run_pass(fx, prog, pkt, "packet");
    let key = ct_key_of(&parse(&client(SYN)));
    fx.ct_lookup(&key).expect("CT4 entry").flags
}

#[test]
fn tcp_states_through_a_connection() {
    let mut fx = nodeport_fixture(IPPROTO_TCP, &[local_be()]);
    let f = flags_after(&mut fx, PROG_XDP, &client(SYN));
    assert_eq!(f, CT_FLAG_TCP_STATE, "SYN only");
    assert_eq!(tcp_ct_state(f), TcpCtState::SynSent);
    // A retransmitted SYN changes nothing.
    assert_eq!(flags_after(&mut fx, PROG_XDP, &client(SYN)), f);
    let f = flags_after(&mut fx, PROG_XDP, &client(ACK));
    assert_eq!(f, CT_FLAG_TCP_STATE | CT_FLAG_SEEN_NON_SYN);
    assert_eq!(tcp_ct_state(f), TcpCtState::Established);
    // The client closes: half-closed is still established.
    let f = flags_after(&mut fx, PROG_XDP, &client(FIN_ACK));
    assert_eq!(f & CT_FLAG_FIN_FWD, CT_FLAG_FIN_FWD);
    assert_eq!(tcp_ct_state(f), TcpCtState::Established);
    // The backend's FIN leaves through the device's egress: closed.
    let f = flags_after(&mut fx, PROG_TC_EGRESS, &backend_reply(FIN_ACK));
    assert_eq!(f & CT_FLAG_FIN_REV, CT_FLAG_FIN_REV);
    assert_eq!(tcp_ct_state(f), TcpCtState::Closed);
    // The last ACK keeps it closed; a new SYN on the same port reopens it.
    assert_eq!(
        tcp_ct_state(flags_after(&mut fx, PROG_XDP, &client(ACK))),
        TcpCtState::Closed
    );
    let f = flags_after(&mut fx, PROG_XDP, &client(SYN));
    assert_eq!(f, CT_FLAG_TCP_STATE, "port reused: a new connection");
    // A reset from either side closes at once.
    let f = flags_after(&mut fx, PROG_XDP, &client(ACK));
    assert_eq!(tcp_ct_state(f), TcpCtState::Established);
    let f = flags_after(&mut fx, PROG_TC_EGRESS, &backend_reply(RST));
    assert_eq!(f & CT_FLAG_RST, CT_FLAG_RST);
    assert_eq!(tcp_ct_state(f), TcpCtState::Closed);
    let f = flags_after(&mut fx, PROG_XDP, &client(SYN));
    assert_eq!(f, CT_FLAG_TCP_STATE);
    let f = flags_after(&mut fx, PROG_XDP, &client(RST));
    assert_eq!(tcp_ct_state(f), TcpCtState::Closed);
}

#[test]
fn udp_entries_carry_no_tcp_state() {
    let mut fx = nodeport_fixture(IPPROTO_UDP, &[local_be()]);
    let pkt = PacketSpec::udp(CLIENT, CLIENT_PORT, NODE, NODE_PORT).build();
    run_pass(&fx, PROG_XDP, &pkt, "udp");
    let e = fx.ct_lookup(&ct_key_of(&parse(&pkt))).expect("CT4 entry");
    assert_eq!(e.flags, 0);
}

#[test]
fn a_midflow_packet_without_state_is_counted() {
    let mut fx = nodeport_fixture(IPPROTO_TCP, &[local_be()]);
    let before = fx.events();
    // An ACK of a flow the map does not know (evicted, expired): translated, and counted.
    run_pass(&fx, PROG_XDP, &client(ACK), "ack without state");
    let after = fx.events();
    let delta = |r: u32| after[r as usize] - before[r as usize];
    assert_eq!(delta(STAT_CT_LOST_MIDFLOW), 1);
    assert_eq!(delta(STAT_CT_CREATED), 1);
    // It is established from then on, and the next packets are not "lost".
    run_pass(&fx, PROG_XDP, &client(ACK), "next ack");
    assert_eq!(
        fx.events()[STAT_CT_LOST_MIDFLOW as usize],
        after[STAT_CT_LOST_MIDFLOW as usize]
    );
    let f = fx
        .ct_lookup(&ct_key_of(&parse(&client(ACK))))
        .unwrap()
        .flags;
    assert_eq!(tcp_ct_state(f), TcpCtState::Established);
    // A SYN of a new flow is not a loss.
    let mut s = PacketSpec::tcp(CLIENT, CLIENT_PORT + 1, NODE, NODE_PORT);
    s.tcp_flags = SYN;
    run_pass(&fx, PROG_XDP, &s.build(), "new syn");
    assert_eq!(
        fx.events()[STAT_CT_LOST_MIDFLOW as usize],
        after[STAT_CT_LOST_MIDFLOW as usize]
    );
}

/// A removed backend that still drains (out of every slot, still in the backends map) keeps
/// its established connection, but a new connection that reuses the client port after the
/// old one closed picks a live backend instead of following the closed entry.
#[test]
fn a_reused_port_after_close_does_not_follow_a_draining_backend() {
    let mut fx = nodeport_fixture(IPPROTO_TCP, &[local_be()]);
    let to = |fx: &Fixture, flags: u8, what: &str| {
        parse(&run_pass(fx, PROG_XDP, &client(flags), what)).daddr
    };
    assert_eq!(to(&fx, SYN, "syn"), LOCAL_BE);
    assert_eq!(to(&fx, ACK, "ack"), LOCAL_BE);
    // The endpoint is replaced: the slots now hold only the new pod; the old backend drains.
    const NEW_BE: [u8; 4] = [10, 244, 0, 6];
    let new_be = Backend {
        id: 3,
        addr: NEW_BE,
        port: BE_PORT,
        flags: BACKEND_FLAG_LOCAL,
    };
    fx.add_service([0; 4], NODE_PORT, IPPROTO_TCP, NP_FLAGS, 7, &[new_be]);
    assert_eq!(to(&fx, ACK, "established ack while draining"), LOCAL_BE);
    assert_eq!(to(&fx, RST, "client reset"), LOCAL_BE);
    assert_eq!(
        to(&fx, SYN, "syn on the reused port"),
        NEW_BE,
        "a new connection must not go to the draining backend"
    );
    // Its retransmitted SYN stays with the pick.
    assert_eq!(to(&fx, SYN, "retransmitted syn"), NEW_BE);
}
