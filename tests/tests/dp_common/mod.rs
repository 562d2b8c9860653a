//! Shared fixtures of the datapath reliability packet tests (ICMP errors, conntrack states,
//! SCTP, fuzzing): one nodePort with a local, a remote, or both kinds of backends.
#![allow(dead_code)]

use kproxy_tests::prog_run::*;
use proxy_common::{
    config::CFG_FLAG_READY,
    conntrack::Ct4Key,
    lb::{BACKEND_FLAG_LOCAL, SVC_FLAG_EXTERNAL, SVC_FLAG_NODEPORT},
};

pub const CLIENT: [u8; 4] = [192, 0, 2, 10];
pub const CLIENT_PORT: u16 = 40_000;
pub const NODE: [u8; 4] = [10, 0, 0, 1];
/// The node's address on the pod link (the source of errors this node sends).
pub const NODE_POD_GW: [u8; 4] = [10, 244, 0, 1];
pub const ROUTER: [u8; 4] = [10, 0, 0, 254];
pub const NODE_PORT: u16 = 30_080;
pub const LOCAL_BE: [u8; 4] = [10, 244, 0, 5];
pub const REMOTE_BE: [u8; 4] = [10, 244, 1, 7];
pub const BE_PORT: u16 = 8080;
pub const SNAT_MIN: u16 = 61_000;
pub const SNAT_MAX: u16 = 61_010;
pub const NP_FLAGS: u16 = SVC_FLAG_NODEPORT | SVC_FLAG_EXTERNAL;

pub fn local_be() -> Backend {
    Backend {
        id: 1,
        addr: LOCAL_BE,
        port: BE_PORT,
        flags: BACKEND_FLAG_LOCAL,
    }
}

pub fn remote_be() -> Backend {
    Backend {
        id: 2,
        addr: REMOTE_BE,
        port: BE_PORT,
        flags: 0,
    }
}

/// A ready node with nodePort address NODE and the nodePort NODE_PORT/proto to `backends`.
pub fn nodeport_fixture(proto: u8, backends: &[Backend]) -> Fixture {
    let mut fx = Fixture::load();
    fx.set_config(CFG_FLAG_READY, SNAT_MIN, SNAT_MAX);
    fx.add_nodeport_addr(NODE);
    fx.add_service([0; 4], NODE_PORT, proto, NP_FLAGS, 7, backends);
    fx
}

pub fn verdict_pass(prog: &str) -> u32 {
    if prog == PROG_XDP {
        XDP_PASS
    } else {
        TC_ACT_OK
    }
}

/// Runs `prog` and asserts it passed the packet to the stack unchanged.
pub fn assert_untouched(fx: &Fixture, prog: &str, pkt: &[u8], what: &str) {
    let (ret, out) = fx.run(prog, pkt);
    assert_eq!(ret, verdict_pass(prog), "{what}: {prog} verdict");
    assert_eq!(out, pkt, "{what}: {prog} changed the packet");
}

/// Runs `prog` on `pkt`, asserts the pass verdict and returns the packet it left.
pub fn run_pass(fx: &Fixture, prog: &str, pkt: &[u8], what: &str) -> Vec<u8> {
    let (ret, out) = fx.run(prog, pkt);
    assert_eq!(ret, verdict_pass(prog), "{what}: {prog} verdict");
    assert_eq!(out.len(), pkt.len(), "{what}: {prog} changed the length");
    out
}

pub fn ct_key_of(p: &Parsed) -> Ct4Key {
    Ct4Key {
        saddr: be32(p.saddr),
        daddr: be32(p.daddr),
        sport: be16(p.sport),
        dport: be16(p.dport),
        proto: p.proto,
        _pad: [0; 3],
    }
}
