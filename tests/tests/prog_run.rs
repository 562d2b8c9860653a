//! kproxy's device programs run on crafted packets through BPF_PROG_TEST_RUN, and connect4
//! attached to a temporary cgroup. Needs root. Every test loads `kproxy::EBPF_OBJECT` with
//! its maps pinned in a private bpffs, so tests do not share state.

use std::{
    io::ErrorKind,
    net::{Ipv4Addr, TcpListener},
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::Command,
};

use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use kproxy_tests::prog_run::*;
use proxy_common::{
    config::{CFG_FLAG_READY, CFG_FLAG_XDP_FIB_FORWARD},
    conntrack::Ct4Key,
    lb::{BACKEND_FLAG_LOCAL, SVC_FLAG_CLUSTER_IP, SVC_FLAG_EXTERNAL, SVC_FLAG_NODEPORT},
    stats::*,
};

const CLIENT: [u8; 4] = [192, 0, 2, 10];
const CLIENT_PORT: u16 = 40_000;
const NODE: [u8; 4] = [10, 0, 0, 1];
const NODE_PORT: u16 = 30_080;
const LOCAL_BE: [u8; 4] = [10, 244, 0, 5];
const REMOTE_BE: [u8; 4] = [10, 244, 1, 7];
const REMOTE_BE2: [u8; 4] = [10, 244, 2, 9];
const BE_PORT: u16 = 8080;
const SNAT_MIN: u16 = 61_000;
const SNAT_MAX: u16 = 61_010;
const NP_FLAGS: u16 = SVC_FLAG_NODEPORT | SVC_FLAG_EXTERNAL;

fn local_be() -> Backend {
    Backend {
        id: 1,
        addr: LOCAL_BE,
        port: BE_PORT,
        flags: BACKEND_FLAG_LOCAL,
    }
}

fn remote_be(id: u32, addr: [u8; 4]) -> Backend {
    Backend {
        id,
        addr,
        port: BE_PORT,
        flags: 0,
    }
}

/// A ready node with nodePort address NODE and the nodePort NODE_PORT/proto to `backends`.
fn nodeport_fixture(proto: u8, backends: &[Backend]) -> Fixture {
    let mut fx = Fixture::load();
    fx.set_config(CFG_FLAG_READY, SNAT_MIN, SNAT_MAX);
    fx.add_nodeport_addr(NODE);
    fx.add_service([0; 4], NODE_PORT, proto, NP_FLAGS, 7, backends);
    fx
}

fn syn_to_nodeport() -> PacketSpec {
    PacketSpec::tcp(CLIENT, CLIENT_PORT, NODE, NODE_PORT)
}

/// Runs `prog` and asserts it passed the packet to the stack unchanged.
fn assert_untouched(fx: &Fixture, prog: &str, pkt: &[u8], what: &str) {
    let (ret, out) = fx.run(prog, pkt);
    let pass = if prog == PROG_XDP {
        XDP_PASS
    } else {
        TC_ACT_OK
    };
    assert_eq!(ret, pass, "{what}: {prog} verdict");
    assert_eq!(out, pkt, "{what}: {prog} changed the packet");
}

/// Runs an ingress program and asserts the packet was translated and passed to the stack.
fn run_translated(fx: &Fixture, prog: &str, pkt: &[u8], what: &str) -> Parsed {
    let (ret, out) = fx.run(prog, pkt);
    let pass = if prog == PROG_XDP {
        XDP_PASS
    } else {
        TC_ACT_OK
    };
    assert_eq!(ret, pass, "{what}: {prog} verdict");
    assert_eq!(out.len(), pkt.len(), "{what}: length changed");
    assert_ne!(out, pkt, "{what}: {prog} did not translate");
    assert_checksums(&out, what);
    // Only addresses, ports and checksums may change.
    let (a, b) = (parse(pkt), parse(&out));
    let mut masked_in = pkt.to_vec();
    let mut masked_out = out.clone();
    for p in [&mut masked_in, &mut masked_out] {
        for r in [ETH_HLEN + 10..ETH_HLEN + 20, a.l4_off..a.l4_off + 4] {
            p[r].fill(0);
        }
        let csum = if a.proto == IPPROTO_TCP {
            a.l4_off + 16
        } else {
            a.l4_off + 6
        };
        p[csum..csum + 2].fill(0);
    }
    assert_eq!(
        masked_in, masked_out,
        "{what}: bytes other than the tuple changed"
    );
    b
}

fn ct_key(p: &Parsed) -> Ct4Key {
    Ct4Key {
        saddr: be32(p.saddr),
        daddr: be32(p.daddr),
        sport: be16(p.sport),
        dport: be16(p.dport),
        proto: p.proto,
        _pad: [0; 3],
    }
}

#[test]
fn all_programs_load_and_reload_with_pinned_maps() {
    let fx = Fixture::load();
    // A restarted agent loads the object again and adopts the pinned maps.
    let again = load_all(&fx.bpffs.path);
    for name in proxy_common::maps::ALL {
        assert!(fx.bpffs.path.join(name).exists(), "{name} not pinned");
        assert!(again.map(name).is_some(), "{name} missing on reload");
    }
}

#[test]
fn nodeport_tcp_local_backend_dnat_and_reverse() {
    let fx = nodeport_fixture(IPPROTO_TCP, &[local_be()]);
    for prog in [PROG_XDP, PROG_TC_INGRESS] {
        let syn = syn_to_nodeport().build();
        let out = run_translated(&fx, prog, &syn, "nodePort SYN to a local backend");
        assert_eq!(
            (out.saddr, out.sport, out.daddr, out.dport),
            (CLIENT, CLIENT_PORT, LOCAL_BE, BE_PORT),
            "{prog}: local backend: DNAT only"
        );
    }
    // The reply leaves through the device's egress and shows the nodePort to the client.
    let reply = PacketSpec::tcp(LOCAL_BE, BE_PORT, CLIENT, CLIENT_PORT).build();
    let (ret, out) = fx.run(PROG_TC_EGRESS, &reply);
    assert_eq!(ret, TC_ACT_OK, "egress reply verdict");
    assert_checksums(&out, "reply from a local backend");
    let p = parse(&out);
    assert_eq!(
        (p.saddr, p.sport, p.daddr, p.dport),
        (NODE, NODE_PORT, CLIENT, CLIENT_PORT),
        "egress: reply reverse-translated"
    );
    // Ingress only reverse-translates replies to this node's SNAT ports: a local backend's
    // reply is passed untouched there (the egress it leaves by translates it).
    for prog in [PROG_XDP, PROG_TC_INGRESS] {
        let (ret, out) = fx.run(prog, &reply);
        let pass = if prog == PROG_XDP {
            XDP_PASS
        } else {
            TC_ACT_OK
        };
        assert_eq!(ret, pass, "{prog} reply verdict");
        assert_eq!(
            out, reply,
            "{prog}: a local backend's reply is left to egress"
        );
    }
}

#[test]
fn nodeport_tcp_remote_backend_dnat_snat_and_reverse() {
    for prog in [PROG_XDP, PROG_TC_INGRESS] {
        let mut fx = nodeport_fixture(IPPROTO_TCP, &[remote_be(2, REMOTE_BE)]);
        let syn = syn_to_nodeport().build();
        let out = run_translated(&fx, prog, &syn, "nodePort SYN to a remote backend");
        assert_eq!((out.daddr, out.dport), (REMOTE_BE, BE_PORT), "{prog}: DNAT");
        assert_eq!(out.saddr, NODE, "{prog}: SNAT to the node address");
        assert!(
            (SNAT_MIN..=SNAT_MAX).contains(&out.sport),
            "{prog}: SNAT port {} outside {SNAT_MIN}-{SNAT_MAX}",
            out.sport
        );
        let ct = fx
            .ct_lookup(&ct_key(&parse(&syn)))
            .expect("CT4 entry for the flow");
        assert_eq!(ct.nat_sport, be16(out.sport), "CT4 records the SNAT port");
        assert_eq!(ct.nat_saddr, be32(NODE));
        assert_eq!(ct.backend_id, 2);

        // Same flow again: same SNAT port.
        let again = run_translated(&fx, prog, &syn, "second packet of the flow");
        assert_eq!(again, out, "{prog}: a flow keeps its translation");

        // The backend's reply to the SNAT address comes back in on the device.
        let reply = PacketSpec::tcp(REMOTE_BE, BE_PORT, NODE, out.sport).build();
        let back = run_translated(&fx, prog, &reply, "reply from a remote backend");
        assert_eq!(
            (back.saddr, back.sport, back.daddr, back.dport),
            (NODE, NODE_PORT, CLIENT, CLIENT_PORT),
            "{prog}: reply reverse-translated to the client"
        );
        let revs = fx.nat_rev_entries();
        assert_eq!(revs.len(), 1, "one reverse entry: {revs:?}");
    }
}

#[test]
fn snat_keeps_client_port_when_in_range() {
    let fx = nodeport_fixture(IPPROTO_TCP, &[remote_be(2, REMOTE_BE)]);
    let syn = PacketSpec::tcp(CLIENT, SNAT_MIN + 3, NODE, NODE_PORT).build();
    let out = run_translated(&fx, PROG_XDP, &syn, "client port inside the SNAT range");
    assert_eq!(out.sport, SNAT_MIN + 3);
    // Another client with the same port gets another SNAT port (no clash on the reply key).
    let syn2 = PacketSpec::tcp([192, 0, 2, 11], SNAT_MIN + 3, NODE, NODE_PORT).build();
    let out2 = run_translated(&fx, PROG_XDP, &syn2, "second client, same port");
    assert_ne!(out2.sport, out.sport, "SNAT port given to two flows");
    assert!((SNAT_MIN..=SNAT_MAX).contains(&out2.sport));
}

#[test]
fn ipv4_options_are_honoured() {
    for opts in [vec![1u8, 1, 1, 0], vec![1u8; 40]] {
        let fx = nodeport_fixture(IPPROTO_TCP, &[remote_be(2, REMOTE_BE)]);
        let mut spec = syn_to_nodeport();
        spec.ip_options = opts.clone();
        let syn = spec.build();
        assert_eq!(syn[ETH_HLEN] & 0x0f, 5 + opts.len() as u8 / 4);
        for prog in [PROG_XDP, PROG_TC_INGRESS] {
            let out = run_translated(&fx, prog, &syn, "IPv4 with options");
            assert_eq!(
                (out.saddr, out.daddr, out.dport),
                (NODE, REMOTE_BE, BE_PORT)
            );
            let mut reply = PacketSpec::tcp(REMOTE_BE, BE_PORT, NODE, out.sport);
            reply.ip_options = opts.clone();
            let back = run_translated(&fx, prog, &reply.build(), "reply with options");
            assert_eq!((back.saddr, back.sport), (NODE, NODE_PORT));
            assert_eq!((back.daddr, back.dport), (CLIENT, CLIENT_PORT));
        }
    }
}

#[test]
fn truncated_packets_are_never_translated() {
    let fx = nodeport_fixture(IPPROTO_TCP, &[local_be()]);
    let ufx = nodeport_fixture(IPPROTO_UDP, &[local_be()]);
    let cases = [
        (&fx, syn_to_nodeport().build()),
        (
            &fx,
            PacketSpec::tcp(LOCAL_BE, BE_PORT, CLIENT, CLIENT_PORT).build(),
        ),
        (
            &ufx,
            PacketSpec::udp(CLIENT, CLIENT_PORT, NODE, NODE_PORT).build(),
        ),
    ];
    // Make the reply of the TCP case known to the reverse NAT first.
    run_translated(&fx, PROG_XDP, &cases[0].1, "full SYN");
    for (fx, full) in cases {
        for len in 0..full.len() {
            let cut = &full[..len];
            for prog in [PROG_XDP, PROG_TC_INGRESS, PROG_TC_EGRESS] {
                let pass = if prog == PROG_XDP {
                    XDP_PASS
                } else {
                    TC_ACT_OK
                };
                match bpf_prog_test_run(fx.prog_fd(prog), cut) {
                    Ok((ret, out)) => {
                        assert_eq!(ret, pass, "{prog} on {len} of {} bytes", full.len());
                        assert_eq!(out, cut, "{prog} changed a {len}-byte truncation");
                    }
                    // The kernel refuses to run XDP on less than an Ethernet header, and tc
                    // on an IPv4 ethertype with less than a 20-byte IPv4 header (the XDP
                    // runs cover those lengths).
                    Err(e)
                        if e.kind() == ErrorKind::InvalidInput
                            && (len < ETH_HLEN || (prog != PROG_XDP && len < ETH_HLEN + 20)) => {}
                    Err(e) => panic!("{prog} on {len} bytes: {e}"),
                }
            }
        }
    }
}

#[test]
fn fragments_pass_untouched() {
    let fx = nodeport_fixture(IPPROTO_UDP, &[local_be()]);
    for frag in [0x2000u16, 0x0010, 0x2010, 0x4010] {
        let mut spec = PacketSpec::udp(CLIENT, CLIENT_PORT, NODE, NODE_PORT);
        spec.frag = frag;
        let pkt = spec.build();
        for prog in [PROG_XDP, PROG_TC_INGRESS, PROG_TC_EGRESS] {
            assert_untouched(&fx, prog, &pkt, &format!("fragment field {frag:#06x}"));
        }
    }
    // The same datagram unfragmented is translated (the fixture works).
    let pkt = PacketSpec::udp(CLIENT, CLIENT_PORT, NODE, NODE_PORT).build();
    run_translated(&fx, PROG_XDP, &pkt, "unfragmented datagram");
}

#[test]
fn non_service_traffic_passes_untouched() {
    let mut fx = nodeport_fixture(IPPROTO_TCP, &[remote_be(2, REMOTE_BE)]);
    // A cluster IP is served at socket level only.
    fx.add_service(
        [10, 96, 0, 10],
        80,
        IPPROTO_TCP,
        SVC_FLAG_CLUSTER_IP,
        8,
        &[remote_be(3, REMOTE_BE2)],
    );
    let mut arp = vec![0xffu8; 6];
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 2, 0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    let mut v6 = syn_to_nodeport().build();
    v6[12..14].copy_from_slice(&[0x86, 0xdd]);
    let cases = [
        ("ssh to the node", syn_to_nodeport_with(|s| s.dport = 22)),
        (
            "other address, nodePort",
            syn_to_nodeport_with(|s| s.daddr = [10, 0, 0, 99]),
        ),
        (
            "UDP to a TCP nodePort",
            PacketSpec::udp(CLIENT, CLIENT_PORT, NODE, NODE_PORT).build(),
        ),
        (
            "cluster IP from outside",
            PacketSpec::tcp(CLIENT, 1234, [10, 96, 0, 10], 80).build(),
        ),
        ("ICMP", syn_to_nodeport_with(|s| s.proto = 1)),
        ("ARP", arp),
        ("IPv6 ethertype", v6),
    ];
    for (what, pkt) in &cases {
        for prog in [PROG_XDP, PROG_TC_INGRESS, PROG_TC_EGRESS] {
            assert_untouched(&fx, prog, pkt, what);
        }
    }
    assert!(
        fx.nat_rev_entries().is_empty(),
        "no state for non-service traffic"
    );
}

fn syn_to_nodeport_with(f: impl FnOnce(&mut PacketSpec)) -> Vec<u8> {
    let mut s = syn_to_nodeport();
    f(&mut s);
    if s.proto == 1 {
        // ICMP: build as TCP, then relabel (the bytes need not be valid ICMP).
        s.proto = IPPROTO_TCP;
        let mut p = s.build();
        p[ETH_HLEN + 9] = 1;
        fix_ip_checksum(&mut p);
        return p;
    }
    s.build()
}

fn fix_ip_checksum(p: &mut [u8]) {
    p[ETH_HLEN + 10..ETH_HLEN + 12].fill(0);
    let c = csum_finish(csum_add(0, &p[ETH_HLEN..ETH_HLEN + 20]));
    p[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&c.to_be_bytes());
}

#[test]
fn udp_checksum_zero_stays_zero() {
    for be in [local_be(), remote_be(2, REMOTE_BE)] {
        let fx = nodeport_fixture(IPPROTO_UDP, &[be]);
        let mut spec = PacketSpec::udp(CLIENT, CLIENT_PORT, NODE, NODE_PORT);
        spec.udp_no_csum = true;
        let pkt = spec.build();
        for prog in [PROG_XDP, PROG_TC_INGRESS] {
            let out = run_translated(&fx, prog, &pkt, "UDP without checksum");
            assert_eq!(out.l4_csum, 0, "{prog}: UDP checksum 0 must stay 0");
            assert_eq!(
                out.daddr,
                if out.saddr == NODE {
                    REMOTE_BE
                } else {
                    LOCAL_BE
                }
            );
        }
        // With a checksum, it is updated correctly (checked inside run_translated).
        let with = PacketSpec::udp(CLIENT, CLIENT_PORT + 1, NODE, NODE_PORT).build();
        let out = run_translated(&fx, PROG_XDP, &with, "UDP with checksum");
        assert_ne!(out.l4_csum, 0);
    }
}

#[test]
fn service_without_endpoints_passes_untouched() {
    let fx = nodeport_fixture(IPPROTO_TCP, &[]);
    let syn = syn_to_nodeport().build();
    for prog in [PROG_XDP, PROG_TC_INGRESS, PROG_TC_EGRESS] {
        assert_untouched(&fx, prog, &syn, "count 0");
    }
}

#[test]
fn missing_or_stale_backend_is_never_used() {
    // Slot present, backend missing.
    let mut fx = nodeport_fixture(IPPROTO_TCP, &[remote_be(2, REMOTE_BE)]);
    fx.remove_backend(2);
    assert_untouched(&fx, PROG_XDP, &syn_to_nodeport().build(), "missing backend");
    // Backend of another service port (rev_nat_index mismatch).
    let mut fx = Fixture::load();
    fx.set_config(CFG_FLAG_READY, SNAT_MIN, SNAT_MAX);
    fx.add_nodeport_addr(NODE);
    fx.add_service(
        [0; 4],
        31_000,
        IPPROTO_TCP,
        NP_FLAGS,
        9,
        &[remote_be(4, REMOTE_BE2)],
    );
    fx.add_service(
        [0; 4],
        NODE_PORT,
        IPPROTO_TCP,
        NP_FLAGS,
        7,
        &[remote_be(4, REMOTE_BE2)],
    );
    // Backend 4 now says rev_nat_index 7; the 31000 frontend (index 9) must not use it.
    let syn = PacketSpec::tcp(CLIENT, CLIENT_PORT, NODE, 31_000).build();
    assert_untouched(&fx, PROG_XDP, &syn, "backend of another service port");
}

#[test]
fn conntrack_reuses_backend_until_it_is_deleted() {
    let mut fx = nodeport_fixture(
        IPPROTO_TCP,
        &[remote_be(2, REMOTE_BE), remote_be(3, REMOTE_BE2)],
    );
    let syn = syn_to_nodeport().build();
    for prog in [PROG_XDP, PROG_TC_INGRESS] {
        let first = run_translated(&fx, prog, &syn, "first packet");
        for i in 0..20 {
            let again = run_translated(&fx, prog, &syn, "same flow");
            assert_eq!(
                again.daddr, first.daddr,
                "{prog}: packet {i} changed backend"
            );
        }
        let ct = fx.ct_lookup(&ct_key(&parse(&syn))).unwrap();
        fx.remove_backend(ct.backend_id);
        let other = if first.daddr == REMOTE_BE {
            REMOTE_BE2
        } else {
            REMOTE_BE
        };
        let moved = run_translated(&fx, prog, &syn, "after the backend was deleted");
        assert_eq!(
            moved.daddr, other,
            "{prog}: flow did not move off a deleted backend"
        );
        for _ in 0..5 {
            assert_eq!(run_translated(&fx, prog, &syn, "moved flow").daddr, other);
        }
        // Restore both backends for the next program.
        fx.add_service(
            [0; 4],
            NODE_PORT,
            IPPROTO_TCP,
            NP_FLAGS,
            7,
            &[remote_be(2, REMOTE_BE), remote_be(3, REMOTE_BE2)],
        );
    }
}

#[test]
fn random_selection_reaches_every_backend() {
    let mut fx = nodeport_fixture(
        IPPROTO_TCP,
        &[remote_be(2, REMOTE_BE), remote_be(3, REMOTE_BE2)],
    );
    // 0/0: the shared default SNAT range (the fixture's 11 ports would run out).
    fx.set_config(CFG_FLAG_READY, 0, 0);
    let mut seen = std::collections::HashSet::new();
    for port in 0..64 {
        let syn = PacketSpec::tcp(CLIENT, 20_000 + port, NODE, NODE_PORT).build();
        seen.insert(run_translated(&fx, PROG_XDP, &syn, "new flow").daddr);
    }
    assert_eq!(seen.len(), 2, "64 flows all went to {seen:?}");
}

#[test]
fn nothing_is_translated_until_config_is_ready() {
    let mut fx = nodeport_fixture(IPPROTO_TCP, &[local_be()]);
    let syn = syn_to_nodeport().build();
    let reply = PacketSpec::tcp(LOCAL_BE, BE_PORT, CLIENT, CLIENT_PORT).build();
    // Create the reverse entry while ready, then take readiness away.
    run_translated(&fx, PROG_XDP, &syn, "ready");
    for flags in [0, CFG_FLAG_XDP_FIB_FORWARD] {
        fx.set_config(flags, SNAT_MIN, SNAT_MAX);
        for prog in [PROG_XDP, PROG_TC_INGRESS, PROG_TC_EGRESS] {
            assert_untouched(&fx, prog, &syn, "not ready: SYN");
            assert_untouched(&fx, prog, &reply, "not ready: reply");
        }
    }
    // A never-written config (all zero) is not ready either.
    let fresh = {
        let mut f = Fixture::load();
        f.add_nodeport_addr(NODE);
        f.add_service([0; 4], NODE_PORT, IPPROTO_TCP, NP_FLAGS, 7, &[local_be()]);
        f
    };
    assert_untouched(&fresh, PROG_XDP, &syn, "config never written");
}

#[test]
fn exact_external_ip_frontend_is_translated() {
    let mut fx = Fixture::load();
    fx.set_config(CFG_FLAG_READY, SNAT_MIN, SNAT_MAX);
    let ext = [203, 0, 113, 5];
    fx.add_service(ext, 443, IPPROTO_TCP, SVC_FLAG_EXTERNAL, 11, &[local_be()]);
    let syn = PacketSpec::tcp(CLIENT, CLIENT_PORT, ext, 443).build();
    let out = run_translated(&fx, PROG_XDP, &syn, "external IP");
    assert_eq!((out.daddr, out.dport), (LOCAL_BE, BE_PORT));
    // The external IP is not a nodePort address: its port on another address is not served.
    let other = PacketSpec::tcp(CLIENT, CLIENT_PORT, NODE, 443).build();
    assert_untouched(&fx, PROG_XDP, &other, "externalIP port on another address");
}

#[test]
fn fib_forward_falls_back_to_the_stack() {
    // With forwarding on, a destination the FIB cannot resolve from the test device still
    // ends up translated and passed to the stack (or sent, if the route exists).
    let mut fx = nodeport_fixture(IPPROTO_TCP, &[remote_be(2, REMOTE_BE)]);
    fx.set_config(
        CFG_FLAG_READY | CFG_FLAG_XDP_FIB_FORWARD,
        SNAT_MIN,
        SNAT_MAX,
    );
    let syn = syn_to_nodeport().build();
    let (ret, out) = fx.run(PROG_XDP, &syn);
    assert!(
        ret == XDP_PASS || ret == XDP_TX || ret == 4,
        "unexpected verdict {ret}"
    );
    let p = parse(&out);
    assert_eq!((p.saddr, p.daddr, p.dport), (NODE, REMOTE_BE, BE_PORT));
}

/// Puts the calling thread into the network namespace at `path` until dropped (test runs
/// use the caller's namespace: its FIB, neighbours and devices).
struct ThreadNetns {
    back: std::fs::File,
}

impl ThreadNetns {
    fn enter(path: &std::path::Path) -> Self {
        use std::os::fd::AsRawFd as _;
        let back = std::fs::File::open("/proc/thread-self/ns/net").unwrap();
        let to = std::fs::File::open(path).unwrap();
        // SAFETY: setns on fds we own; affects only this thread.
        assert_eq!(
            unsafe { libc::setns(to.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        Self { back }
    }
}

impl Drop for ThreadNetns {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd as _;
        // SAFETY: as in `enter`.
        unsafe { libc::setns(self.back.as_raw_fd(), libc::CLONE_NEWNET) };
    }
}

/// tc ingress on a node whose FIB routes the local backend through a pod's veth (its peer in
/// the pod's namespace, the neighbour known): with the veth marked in `KP_PODDEV_V1` the
/// packet is sent with `bpf_redirect_peer` (TC_ACT_REDIRECT, counted as fib_redirect_peer),
/// its Ethernet header set from the FIB (the pod's MAC, the veth's MAC) and its TTL
/// decremented; unmarked, it is redirected the old way (not counted); XDP never uses it.
#[test]
fn tc_redirects_into_a_marked_pod_veth_with_redirect_peer() {
    use kproxy_tests::harness::sys::{NetNs, unique_id};
    const POD_MAC: &str = "02:00:00:00:00:0a";
    const VETH_MAC: &str = "02:00:00:00:00:01";
    let id = unique_id();
    let node = NetNs::create(&format!("{id}-prnode")).unwrap();
    let pod = NetNs::create(&format!("{id}-prpod")).unwrap();
    let be = Ipv4Addr::from(LOCAL_BE).to_string();
    node.ip(&[
        "link",
        "add",
        "vp0",
        "address",
        VETH_MAC,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        pod.name(),
    ])
    .unwrap();
    pod.ip(&["link", "set", "eth0", "address", POD_MAC, "up"])
        .unwrap();
    node.ip_batch(&[
        "link set vp0 up".into(),
        format!("route add {be}/32 dev vp0"),
        format!("neigh add {be} lladdr {POD_MAC} dev vp0 nud permanent"),
    ])
    .unwrap();
    node.sysctl("net.ipv4.ip_forward", "1").unwrap();

    let mut fx = nodeport_fixture(IPPROTO_TCP, &[local_be()]);
    fx.set_config(
        CFG_FLAG_READY | CFG_FLAG_XDP_FIB_FORWARD,
        SNAT_MIN,
        SNAT_MAX,
    );
    let mac = |s: &str| -> Vec<u8> {
        s.split(':')
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect()
    };
    let syn = syn_to_nodeport().build();
    let _in_node = ThreadNetns::enter(&node.path());
    let vp0 = kproxy::netdev::ifindex("vp0").expect("vp0 in the node namespace");

    // Not marked: redirected through the host end (bpf_redirect), not counted.
    let before = fx.events();
    let (ret, _) = fx.run(PROG_TC_INGRESS, &syn);
    let after = fx.events();
    assert_eq!(ret, TC_ACT_REDIRECT, "unmarked veth");
    let d = |a: &[u64], b: &[u64], r: u32| a[r as usize] - b[r as usize];
    assert_eq!(d(&after, &before, STAT_FIB_FORWARD), 1);
    assert_eq!(d(&after, &before, STAT_FWD_REDIRECT_PEER), 0);

    fx.set_pod_device(vp0, proxy_common::devices::POD_DEV_PEER);
    let before = fx.events();
    let (ret, out) = fx.run(PROG_TC_INGRESS, &syn);
    let after = fx.events();
    assert_eq!(ret, TC_ACT_REDIRECT, "marked veth");
    assert_eq!(d(&after, &before, STAT_FIB_FORWARD), 1);
    assert_eq!(d(&after, &before, STAT_FWD_REDIRECT_PEER), 1);
    assert_eq!(out[0..6], mac(POD_MAC)[..], "destination MAC: the pod's");
    assert_eq!(out[6..12], mac(VETH_MAC)[..], "source MAC: the host end's");
    assert_eq!(out[ETH_HLEN + 8], syn[ETH_HLEN + 8] - 1, "TTL decremented");
    assert_checksums(&out, "peer-redirected SYN");
    let p = parse(&out);
    assert_eq!(
        (p.saddr, p.daddr, p.dport),
        (CLIENT, LOCAL_BE, BE_PORT),
        "a local backend: DNAT only, the client's address kept"
    );

    // XDP cannot redirect into a veth: it leaves the packet to the stack.
    let before = fx.events();
    let (ret, _) = fx.run(PROG_XDP, &syn);
    let after = fx.events();
    assert_eq!(ret, XDP_PASS);
    assert_eq!(d(&after, &before, STAT_FWD_REDIRECT_PEER), 0);
}

/// A cgroup2 directory for one test; the program links are dropped before it is removed.
struct TempCgroup {
    path: PathBuf,
}

impl Drop for TempCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.path);
    }
}

fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == "cgroup2")
        .map(|f| PathBuf::from(f[1]))
}

/// Runs `bash` inside `cgroup` to open a TCP connection; returns its exit status and stderr.
fn connect_in_cgroup(cgroup: &std::path::Path, addr: &str, port: u16) -> (bool, String) {
    let procs = cgroup.join("cgroup.procs");
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(format!("exec 3<>/dev/tcp/{addr}/{port} && echo connected"));
    // SAFETY: only async-signal-safe work (open/write/close) between fork and exec.
    unsafe {
        cmd.pre_exec(move || std::fs::write(&procs, b"0"));
    }
    let out = cmd.output().expect("run bash");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn connect4_translates_and_refuses_in_a_cgroup() {
    let Some(root) = cgroup2_root() else {
        panic!("no cgroup2 mount");
    };
    let mut fx = Fixture::load();
    fx.set_config(CFG_FLAG_READY, SNAT_MIN, SNAT_MAX);
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    fx.add_service(
        [10, 96, 250, 1],
        80,
        IPPROTO_TCP,
        SVC_FLAG_CLUSTER_IP,
        21,
        &[Backend {
            id: 1,
            addr: [127, 0, 0, 1],
            port,
            flags: BACKEND_FLAG_LOCAL,
        }],
    );
    fx.add_service(
        [10, 96, 250, 2],
        80,
        IPPROTO_TCP,
        SVC_FLAG_CLUSTER_IP,
        22,
        &[],
    );

    let cg = TempCgroup {
        path: root.join(format!("kproxy-prog-run-{}", std::process::id())),
    };
    std::fs::create_dir_all(&cg.path).unwrap();
    let cg_file = std::fs::File::open(&cg.path).unwrap();
    let prog: &mut CgroupSockAddr = fx
        .ebpf
        .program_mut(PROG_CONNECT4)
        .unwrap()
        .try_into()
        .unwrap();
    let link = prog
        .attach(&cg_file, CgroupAttachMode::Single)
        .expect("attach connect4");

    let (ok, err) = connect_in_cgroup(&cg.path, "10.96.250.1", 80);
    assert!(ok, "connect to the cluster IP failed: {err}");
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_ok(), "backend saw no connection");

    let (ok, err) = connect_in_cgroup(&cg.path, "10.96.250.2", 80);
    assert!(!ok, "connect to a service without endpoints succeeded");
    assert!(err.contains("refused"), "expected ECONNREFUSED, got: {err}");

    prog.detach(link).unwrap();

    // One translated connect (a connection of frontend 21), one refused.
    let events = fx.events();
    assert_eq!(events[STAT_SOCK_CONNECT_XLATE as usize], 1, "{events:?}");
    assert_eq!(
        events[STAT_SOCK_CONNECT_NO_ENDPOINTS as usize], 1,
        "{events:?}"
    );
    let s = fx.svc_stats(21);
    assert_eq!((s.connections, s.packets, s.bytes), (1, 0, 0), "{s:?}");
    assert_eq!(fx.svc_stats(22), SvcStats::default());
}

// ---------------------------------------------------------------------------------------------
// Counters (KP_STATS_V1 by reason, KP_SVC_STATS_V1 by reverse-NAT index)

/// Runs `f` and asserts the event counters changed by exactly `want` (reason, delta); every
/// other reason must stay put.
fn assert_events(fx: &mut Fixture, want: &[(u32, u64)], what: &str, f: impl FnOnce(&mut Fixture)) {
    let before = fx.events();
    f(fx);
    let after = fx.events();
    let mut expected = before.clone();
    for (reason, n) in want {
        expected[*reason as usize] += n;
    }
    let name = |v: &[u64]| -> Vec<String> {
        v.iter()
            .zip(&before)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, (a, b))| format!("{}+{}", STAT_NAMES[i], a - b))
            .collect()
    };
    assert_eq!(
        after,
        expected,
        "{what}: counted {:?}, wanted {:?}",
        name(&after),
        name(&expected)
    );
}

/// IPv4 total length of a built packet.
fn ip_len(pkt: &[u8]) -> u64 {
    u64::from(u16::from_be_bytes([pkt[ETH_HLEN + 2], pkt[ETH_HLEN + 3]]))
}

#[test]
fn counters_nodeport_flow_both_directions() {
    for prog in [PROG_XDP, PROG_TC_INGRESS] {
        let mut fx = nodeport_fixture(IPPROTO_TCP, &[local_be()]);
        let syn = syn_to_nodeport().build();
        assert_events(
            &mut fx,
            &[(STAT_FWD_XLATE, 1), (STAT_CT_CREATED, 1)],
            "first SYN",
            |fx| {
                run_translated(fx, prog, &syn, "nodePort SYN");
            },
        );
        assert_eq!(
            fx.svc_stats(7),
            SvcStats {
                packets: 1,
                bytes: ip_len(&syn),
                connections: 1
            },
            "{prog}: first packet of a new flow"
        );
        // The same flow again: a packet, not a connection.
        assert_events(&mut fx, &[(STAT_FWD_XLATE, 1)], "second packet", |fx| {
            run_translated(fx, prog, &syn, "same flow");
        });
        let s = fx.svc_stats(7);
        assert_eq!((s.packets, s.connections), (2, 1), "{prog}: {s:?}");
        // The reply leaves through egress and is counted for the same frontend.
        let mut reply = PacketSpec::tcp(LOCAL_BE, BE_PORT, CLIENT, CLIENT_PORT);
        reply.payload = b"hello".to_vec();
        let reply = reply.build();
        assert_events(&mut fx, &[(STAT_REV_XLATE, 1)], "reply on egress", |fx| {
            run_translated(fx, PROG_TC_EGRESS, &reply, "reply");
        });
        assert_eq!(
            fx.svc_stats(7),
            SvcStats {
                packets: 3,
                bytes: 2 * ip_len(&syn) + ip_len(&reply),
                connections: 1
            },
            "{prog}: reply counted"
        );
    }
}

#[test]
fn counters_remote_backend_reply_on_ingress() {
    let mut fx = nodeport_fixture(IPPROTO_UDP, &[remote_be(2, REMOTE_BE)]);
    let pkt = PacketSpec::udp(CLIENT, CLIENT_PORT, NODE, NODE_PORT).build();
    let out = run_translated(&fx, PROG_XDP, &pkt, "UDP to a remote backend");
    let reply = PacketSpec::udp(REMOTE_BE, BE_PORT, NODE, out.sport).build();
    assert_events(&mut fx, &[(STAT_REV_XLATE, 1)], "reply from remote", |fx| {
        run_translated(fx, PROG_XDP, &reply, "reply");
    });
    assert_eq!(
        fx.svc_stats(7),
        SvcStats {
            packets: 2,
            bytes: ip_len(&pkt) + ip_len(&reply),
            connections: 1
        }
    );
}

#[test]
fn counters_say_why_traffic_passed() {
    let mut fx = nodeport_fixture(IPPROTO_TCP, &[remote_be(2, REMOTE_BE)]);
    fx.add_service(
        [10, 96, 0, 10],
        80,
        IPPROTO_TCP,
        SVC_FLAG_CLUSTER_IP,
        8,
        &[remote_be(3, REMOTE_BE2)],
    );
    fx.add_service([0; 4], 31_500, IPPROTO_TCP, NP_FLAGS, 9, &[]);
    let mut arp = vec![0xffu8; 6];
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 2, 0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    let mut frag = PacketSpec::tcp(CLIENT, CLIENT_PORT, NODE, NODE_PORT);
    frag.frag = 0x2000;
    let syn = syn_to_nodeport().build();
    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        (
            "ssh to the node",
            syn_to_nodeport_with(|s| s.dport = 22),
            STAT_PASS_NOT_SERVICE,
        ),
        (
            "cluster IP from outside",
            PacketSpec::tcp(CLIENT, 1234, [10, 96, 0, 10], 80).build(),
            STAT_PASS_INTERNAL,
        ),
        (
            "nodePort without endpoints",
            PacketSpec::tcp(CLIENT, 1234, NODE, 31_500).build(),
            STAT_PASS_NO_ENDPOINTS,
        ),
        ("fragment", frag.build(), STAT_PASS_FRAGMENT),
        (
            "truncated",
            syn[..syn.len() - 1].to_vec(),
            STAT_PASS_MALFORMED,
        ),
        ("ARP", arp, STAT_PASS_OTHER_PROTO),
        (
            "ICMP",
            syn_to_nodeport_with(|s| s.proto = 1),
            STAT_PASS_OTHER_PROTO,
        ),
    ];
    for (what, pkt, reason) in &cases {
        for prog in [PROG_XDP, PROG_TC_INGRESS] {
            assert_events(&mut fx, &[(*reason, 1)], &format!("{prog}: {what}"), |fx| {
                assert_untouched(fx, prog, pkt, what)
            });
        }
        // Egress counts translations only.
        assert_events(&mut fx, &[], &format!("egress: {what}"), |fx| {
            assert_untouched(fx, PROG_TC_EGRESS, pkt, what)
        });
    }
    for idx in [7, 8, 9] {
        assert_eq!(fx.svc_stats(idx), SvcStats::default(), "index {idx}");
    }

    // Not ready: nothing is looked at.
    fx.set_config(0, SNAT_MIN, SNAT_MAX);
    assert_events(&mut fx, &[(STAT_PASS_NOT_READY, 1)], "not ready", |fx| {
        assert_untouched(fx, PROG_XDP, &syn, "not ready")
    });
}

#[test]
fn counters_backend_trouble() {
    // The only backend vanished: no valid backend.
    let mut fx = nodeport_fixture(IPPROTO_TCP, &[remote_be(2, REMOTE_BE)]);
    fx.remove_backend(2);
    let syn = syn_to_nodeport().build();
    assert_events(
        &mut fx,
        &[(STAT_PASS_NO_BACKEND, 1)],
        "missing backend",
        |fx| assert_untouched(fx, PROG_XDP, &syn, "missing backend"),
    );

    // A flow's backend vanished: reselected, and not a new connection.
    let mut fx = nodeport_fixture(
        IPPROTO_TCP,
        &[remote_be(2, REMOTE_BE), remote_be(3, REMOTE_BE2)],
    );
    run_translated(&fx, PROG_XDP, &syn, "first packet");
    let ct = fx.ct_lookup(&ct_key(&parse(&syn))).unwrap();
    fx.remove_backend(ct.backend_id);
    assert_events(
        &mut fx,
        &[(STAT_FWD_XLATE, 1), (STAT_BACKEND_RESELECTED, 1)],
        "reselection",
        |fx| {
            run_translated(fx, PROG_XDP, &syn, "after the backend was deleted");
        },
    );
    let s = fx.svc_stats(7);
    assert_eq!((s.packets, s.connections), (2, 1), "{s:?}");

    // One SNAT port for two clients of one backend: the second finds none.
    let mut fx = nodeport_fixture(IPPROTO_TCP, &[remote_be(2, REMOTE_BE)]);
    fx.set_config(CFG_FLAG_READY, SNAT_MIN, SNAT_MIN);
    run_translated(&fx, PROG_XDP, &syn, "first client");
    let other = PacketSpec::tcp([192, 0, 2, 11], CLIENT_PORT, NODE, NODE_PORT).build();
    assert_events(
        &mut fx,
        &[(STAT_SNAT_EXHAUSTED, 1)],
        "SNAT exhausted",
        |fx| assert_untouched(fx, PROG_XDP, &other, "no SNAT port left"),
    );
}

#[test]
fn counters_fib_forward_or_fallback() {
    let mut fx = nodeport_fixture(IPPROTO_TCP, &[remote_be(2, REMOTE_BE)]);
    fx.set_config(
        CFG_FLAG_READY | CFG_FLAG_XDP_FIB_FORWARD,
        SNAT_MIN,
        SNAT_MAX,
    );
    let before = fx.events();
    let (ret, _) = fx.run(PROG_XDP, &syn_to_nodeport().build());
    let after = fx.events();
    let d = |r: u32| after[r as usize] - before[r as usize];
    assert_eq!(d(STAT_FWD_XLATE), 1);
    if ret == XDP_PASS {
        assert_eq!((d(STAT_FIB_FALLBACK), d(STAT_FIB_FORWARD)), (1, 0));
    } else {
        assert_eq!((d(STAT_FIB_FALLBACK), d(STAT_FIB_FORWARD)), (0, 1));
    }
    // Without the flag neither is counted.
    fx.set_config(CFG_FLAG_READY, SNAT_MIN, SNAT_MAX);
    let syn = PacketSpec::tcp(CLIENT, CLIENT_PORT + 1, NODE, NODE_PORT).build();
    assert_events(
        &mut fx,
        &[(STAT_FWD_XLATE, 1), (STAT_CT_CREATED, 1)],
        "no FIB forwarding",
        |fx| {
            run_translated(fx, PROG_XDP, &syn, "translated");
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Session affinity (KP_AFF4_V1) and loadBalancerSourceRanges (KP_SRCR4_V1)

use proxy_common::{
    affinity::{AFFINITY_CLIENT_ADDR, Lb4AffinityKey, Lb4AffinityValue},
    lb::{SVC_FLAG_AFFINITY, SVC_FLAG_SOURCE_RANGES},
};

const REMOTE_BE3: [u8; 4] = [10, 244, 3, 11];

fn three_remote() -> [Backend; 3] {
    [
        remote_be(2, REMOTE_BE),
        remote_be(3, REMOTE_BE2),
        remote_be(4, REMOTE_BE3),
    ]
}

/// A nodePort with three remote backends and ClientIP affinity of `timeout` seconds.
fn affinity_fixture(timeout: u32) -> Fixture {
    let mut fx = nodeport_fixture(IPPROTO_TCP, &three_remote());
    fx.set_config(CFG_FLAG_READY, 0, 0);
    fx.set_master([0; 4], NODE_PORT, IPPROTO_TCP, SVC_FLAG_AFFINITY, timeout);
    fx
}

/// The backend a new flow from `client:sport` gets.
fn new_flow_backend(fx: &Fixture, prog: &str, client: [u8; 4], sport: u16) -> [u8; 4] {
    let syn = PacketSpec::tcp(client, sport, NODE, NODE_PORT).build();
    run_translated(fx, prog, &syn, "new flow").daddr
}

fn clock_monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out pointer.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) },
        0
    );
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[test]
fn affinity_keeps_a_client_on_its_backend_until_the_backend_goes() {
    for prog in [PROG_XDP, PROG_TC_INGRESS] {
        let mut fx = affinity_fixture(10_800);
        let first = new_flow_backend(&fx, prog, CLIENT, 20_000);
        for sport in 20_001..20_030 {
            assert_eq!(
                new_flow_backend(&fx, prog, CLIENT, sport),
                first,
                "{prog}: flow from port {sport} left the client's backend"
            );
        }
        // Other clients are balanced as usual (all 40 on one backend: p = 3 * 3^-40).
        let others: std::collections::HashSet<[u8; 4]> = (0..40u8)
            .map(|i| new_flow_backend(&fx, prog, [192, 0, 2, 100 + i], 20_000))
            .collect();
        assert!(
            others.len() > 1,
            "{prog}: 40 clients all went to {others:?}"
        );
        let entries = fx.affinity_entries();
        let mine = entries
            .iter()
            .find(|(k, _)| k.client_id == u64::from(be32(CLIENT)))
            .expect("an affinity entry for the client");
        assert_eq!(mine.0.client_kind, AFFINITY_CLIENT_ADDR);
        assert_eq!(mine.0.rev_nat_index, 7);
        // The pinned backend is removed: the next flow must reselect, then stick again.
        fx.remove_backend(mine.1.backend_id);
        let moved = new_flow_backend(&fx, prog, CLIENT, 21_000);
        assert_ne!(moved, first, "{prog}: a removed backend was used");
        for sport in 21_001..21_010 {
            assert_eq!(new_flow_backend(&fx, prog, CLIENT, sport), moved, "{prog}");
        }
    }
}

#[test]
fn affinity_expires_after_the_timeout() {
    let mut fx = affinity_fixture(1);
    let stale = clock_monotonic_ns() - 5_000_000_000;
    let fresh = clock_monotonic_ns();
    let mut moved = 0;
    for i in 0..30u8 {
        let client = [192, 0, 2, 100 + i];
        let key = Lb4AffinityKey::new(u64::from(be32(client)), 7, AFFINITY_CLIENT_ADDR);
        // An expired pick of backend 4 is ignored...
        fx.put_affinity(
            key,
            Lb4AffinityValue {
                last_used_ns: stale,
                backend_id: 4,
                _pad: 0,
            },
        );
        if new_flow_backend(&fx, PROG_XDP, client, 20_000) != REMOTE_BE3 {
            moved += 1;
        }
    }
    assert!(moved > 0, "30 expired picks were all honoured");
    // ...a live one is honoured.
    for i in 0..10u8 {
        let client = [192, 0, 2, 200 + i];
        let key = Lb4AffinityKey::new(u64::from(be32(client)), 7, AFFINITY_CLIENT_ADDR);
        fx.put_affinity(
            key,
            Lb4AffinityValue {
                last_used_ns: fresh,
                backend_id: 4,
                _pad: 0,
            },
        );
        assert_eq!(new_flow_backend(&fx, PROG_XDP, client, 20_000), REMOTE_BE3);
    }
}

#[test]
fn affinity_is_ignored_without_the_flag() {
    let mut fx = nodeport_fixture(IPPROTO_TCP, &three_remote());
    fx.set_config(CFG_FLAG_READY, 0, 0);
    let seen: std::collections::HashSet<[u8; 4]> = (0..40u16)
        .map(|i| new_flow_backend(&fx, PROG_XDP, CLIENT, 20_000 + i))
        .collect();
    assert!(
        seen.len() > 1,
        "without affinity 40 flows all went to {seen:?}"
    );
    assert!(
        fx.affinity_entries().is_empty(),
        "entries written without affinity"
    );
}

#[test]
fn source_ranges_drop_sources_outside_them() {
    for (prog, drop) in [(PROG_XDP, XDP_DROP), (PROG_TC_INGRESS, TC_ACT_SHOT)] {
        let mut fx = nodeport_fixture(IPPROTO_TCP, &[remote_be(2, REMOTE_BE)]);
        fx.set_master([0; 4], NODE_PORT, IPPROTO_TCP, SVC_FLAG_SOURCE_RANGES, 0);
        let inside = PacketSpec::tcp(CLIENT, CLIENT_PORT, NODE, NODE_PORT).build();
        let outside = PacketSpec::tcp([198, 51, 100, 7], CLIENT_PORT, NODE, NODE_PORT).build();
        // No range yet: everyone is dropped (an empty list allows none).
        assert_events(&mut fx, &[(STAT_DROP_SOURCE_RANGE, 1)], "no ranges", |fx| {
            assert_eq!(fx.run(prog, &inside).0, drop, "{prog}: empty ranges");
        });
        fx.add_src_range(7, [192, 0, 2, 0], 24);
        // Another frontend's range must not count.
        fx.add_src_range(8, [198, 51, 100, 0], 24);
        run_translated(&fx, prog, &inside, "source inside the range");
        assert_events(&mut fx, &[(STAT_DROP_SOURCE_RANGE, 1)], "outside", |fx| {
            assert_eq!(fx.run(prog, &outside).0, drop, "{prog}: outside the range");
        });
        // A /32 works as well.
        fx.add_src_range(7, [198, 51, 100, 7], 32);
        run_translated(&fx, prog, &outside, "source in a /32");
    }
}
