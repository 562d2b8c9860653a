//! The IPv6 device path (XDP and tc) on crafted IPv6 packets through BPF_PROG_TEST_RUN:
//! nodePort DNAT with checksums checked against a from-scratch computation, reverse NAT of
//! replies, SNAT for a remote backend, extension headers passed untranslated, source ranges
//! and session affinity. Needs root; each test loads its own copy of the object.

use std::net::Ipv6Addr;

use aya::maps::{
    HashMap, MapData,
    lpm_trie::{Key as LpmKey, LpmTrie},
};
use kproxy_tests::prog_run::*;
use proxy_common::{
    affinity::{Lb6AffinityKey, Lb6AffinityValue},
    config::CFG_FLAG_READY,
    conntrack6::{Ct6Key, Nat6RevEntry},
    lb::{
        BACKEND_FLAG_LOCAL, SVC_FLAG_AFFINITY, SVC_FLAG_EXTERNAL, SVC_FLAG_NODEPORT,
        SVC_FLAG_SOURCE_RANGES,
    },
    lb6::{Lb6Backend, Lb6Key, Lb6Service},
    maps,
    src_range::{Lb6SrcRangeKey, SRC_RANGE_INDEX_BITS},
    stats::{STAT_DROP_SOURCE_RANGE, STAT_FWD_XLATE, STAT_PASS_FRAGMENT, STAT_PASS_OTHER_PROTO},
};

const CLIENT: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10);
const OTHER_CLIENT: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x20);
const CLIENT_PORT: u16 = 40_000;
const NODE: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, 0, 1);
const NODE_PORT: u16 = 30_080;
const LOCAL_BE: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 5);
const LOCAL_BE2: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 6);
const REMOTE_BE: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 2, 0, 0, 0, 7);
const BE_PORT: u16 = 80;
const SNAT_MIN: u16 = 61_000;
const SNAT_MAX: u16 = 61_010;
const NP_FLAGS: u16 = SVC_FLAG_NODEPORT | SVC_FLAG_EXTERNAL;
const INDEX: u16 = 3;
const IP6_HLEN: usize = 40;

// ---------------------------------------------------------------------------------------------
// IPv6 packets

fn words(a: Ipv6Addr) -> [u32; 4] {
    let o = a.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

/// An Ethernet/IPv6 frame with `ext` (extension headers, their first next-header field
/// is the transport) between the IPv6 header and a TCP (SYN) or UDP header, with a correct
/// L4 checksum over the IPv6 pseudo header.
fn pkt6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, proto: u8, ext: &[u8]) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    if proto == IPPROTO_TCP {
        l4.extend_from_slice(&0x0102_0304u32.to_be_bytes());
        l4.extend_from_slice(&0u32.to_be_bytes());
        l4.extend_from_slice(&[0x50, 0x02]);
        l4.extend_from_slice(&64800u16.to_be_bytes());
        l4.extend_from_slice(&[0, 0, 0, 0]);
    } else {
        let payload = b"kproxy udp6 payload";
        l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
        l4.extend_from_slice(payload);
    }
    let mut p = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x86, 0xdd];
    let nexthdr = if ext.is_empty() { proto } else { 0 };
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&((ext.len() + l4.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[nexthdr, 64]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(ext);
    p.extend_from_slice(&l4);
    let l4_off = ETH_HLEN + IP6_HLEN + ext.len();
    let csum = l4_csum6(&p, l4_off, proto);
    let off = l4_off + l4_csum_off(proto);
    p[off..off + 2].copy_from_slice(&csum.to_be_bytes());
    p
}

/// The L4 checksum of the frame `p` computed from scratch (its checksum field taken as 0).
fn l4_csum6(p: &[u8], l4_off: usize, proto: u8) -> u16 {
    let mut l4 = p[l4_off..].to_vec();
    let off = l4_csum_off(proto);
    l4[off..off + 2].fill(0);
    let mut sum = csum_add(0, &p[ETH_HLEN + 8..ETH_HLEN + 40]);
    sum += l4.len() as u32 + u32::from(proto);
    sum = csum_add(sum, &l4);
    let c = csum_finish(sum);
    if proto == IPPROTO_UDP && c == 0 {
        0xffff
    } else {
        c
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Parsed6 {
    saddr: Ipv6Addr,
    sport: u16,
    daddr: Ipv6Addr,
    dport: u16,
}

/// The tuple of a frame without extension headers, after checking its L4 checksum against
/// a from-scratch computation.
fn parse6_checked(p: &[u8], proto: u8, what: &str) -> Parsed6 {
    let l4 = ETH_HLEN + IP6_HLEN;
    let off = l4 + l4_csum_off(proto);
    let got = u16::from_be_bytes([p[off], p[off + 1]]);
    assert_eq!(
        got,
        l4_csum6(p, l4, proto),
        "{what}: L4 checksum differs from a recomputation"
    );
    let addr = |o: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&p[o..o + 16]).unwrap());
    Parsed6 {
        saddr: addr(ETH_HLEN + 8),
        daddr: addr(ETH_HLEN + 24),
        sport: u16::from_be_bytes([p[l4], p[l4 + 1]]),
        dport: u16::from_be_bytes([p[l4 + 2], p[l4 + 3]]),
    }
}

// ---------------------------------------------------------------------------------------------
// Maps

struct Be6 {
    id: u32,
    addr: Ipv6Addr,
    flags: u8,
}

/// A ready node whose IPv6 nodePort address is NODE, with the nodePort NODE_PORT/proto
/// (`flags` on its master, `master_id` in its backend id) to `backends`.
fn fixture6(proto: u8, flags: u16, master_id: u32, backends: &[Be6]) -> Fixture {
    let mut fx = Fixture::load();
    fx.set_config(CFG_FLAG_READY, SNAT_MIN, SNAT_MAX);
    let mut npa: HashMap<&mut MapData, [u32; 4], u32> =
        HashMap::try_from(fx.ebpf.map_mut(maps::LB6_NODEPORT_ADDRS).unwrap()).unwrap();
    npa.insert(words(NODE), 1, 0).unwrap();
    let mut bes: HashMap<&mut MapData, u32, Lb6Backend> =
        HashMap::try_from(fx.ebpf.map_mut(maps::LB6_BACKENDS).unwrap()).unwrap();
    for b in backends {
        let v = Lb6Backend {
            address: words(b.addr),
            port: BE_PORT.to_be(),
            proto,
            flags: b.flags,
            rev_nat_index: INDEX,
            _pad: 0,
        };
        bes.insert(b.id, v, 0).unwrap();
    }
    let mut svcs: HashMap<&mut MapData, Lb6Key, Lb6Service> =
        HashMap::try_from(fx.ebpf.map_mut(maps::LB6_SERVICES).unwrap()).unwrap();
    for (i, b) in backends.iter().enumerate() {
        let slot = Lb6Service {
            backend_id: b.id,
            count: 0,
            rev_nat_index: INDEX,
            flags,
            _pad: 0,
        };
        let key = Lb6Key::new([0; 4], NODE_PORT.to_be(), proto, i as u16 + 1);
        svcs.insert(key, slot, 0).unwrap();
    }
    let master = Lb6Service {
        backend_id: master_id,
        count: backends.len() as u16,
        rev_nat_index: INDEX,
        flags,
        _pad: 0,
    };
    svcs.insert(Lb6Key::new([0; 4], NODE_PORT.to_be(), proto, 0), master, 0)
        .unwrap();
    fx
}

fn local(id: u32, addr: Ipv6Addr) -> Be6 {
    Be6 {
        id,
        addr,
        flags: BACKEND_FLAG_LOCAL,
    }
}

fn nat6_rev_entries(fx: &mut Fixture) -> Vec<(Ct6Key, Nat6RevEntry)> {
    let m: HashMap<&mut MapData, Ct6Key, Nat6RevEntry> =
        HashMap::try_from(fx.ebpf.map_mut(maps::NAT6_REV).unwrap()).unwrap();
    m.iter().map(|r| r.unwrap()).collect()
}

fn delta(before: &[u64], after: &[u64], stat: u32) -> u64 {
    after[stat as usize] - before[stat as usize]
}

// ---------------------------------------------------------------------------------------------
// Tests

/// A client's SYN and UDP datagram to [node]:nodePort reach the local backend (client source
/// kept) with a valid checksum, on XDP and tc ingress; the backend's reply leaving through
/// tc egress comes from [node]:nodePort again, checksum valid.
#[test]
fn ipv6_nodeport_local_backend_dnat_and_reverse_nat() {
    for proto in [IPPROTO_TCP, IPPROTO_UDP] {
        let fx = fixture6(proto, NP_FLAGS, 0, &[local(1, LOCAL_BE)]);
        for prog in [PROG_XDP, PROG_TC_INGRESS] {
            let what = format!("{prog} proto {proto}");
            let syn = pkt6(CLIENT, CLIENT_PORT, NODE, NODE_PORT, proto, &[]);
            let (rc, out) = fx.run(prog, &syn);
            let pass = if prog == PROG_XDP {
                XDP_PASS
            } else {
                TC_ACT_OK
            };
            assert_eq!(rc, pass, "{what}");
            assert_eq!(
                parse6_checked(&out[..syn.len()], proto, &what),
                Parsed6 {
                    saddr: CLIENT,
                    sport: CLIENT_PORT,
                    daddr: LOCAL_BE,
                    dport: BE_PORT
                },
                "{what}: DNAT to the local backend"
            );
            let reply = pkt6(LOCAL_BE, BE_PORT, CLIENT, CLIENT_PORT, proto, &[]);
            let (rc, out) = fx.run(PROG_TC_EGRESS, &reply);
            assert_eq!(rc, TC_ACT_OK);
            assert_eq!(
                parse6_checked(&out[..reply.len()], proto, &what),
                Parsed6 {
                    saddr: NODE,
                    sport: NODE_PORT,
                    daddr: CLIENT,
                    dport: CLIENT_PORT
                },
                "{what}: reply reverse-translated on egress"
            );
        }
    }
}

/// A remote backend: the client's SYN is SNATed to the node's IPv6 address and a port of
/// the SNAT range; the backend's reply to that port, arriving on ingress, goes back to the
/// client from [node]:nodePort.
#[test]
fn ipv6_remote_backend_snat_and_reverse_on_ingress() {
    let mut fx = fixture6(
        IPPROTO_TCP,
        NP_FLAGS,
        0,
        &[Be6 {
            id: 4,
            addr: REMOTE_BE,
            flags: 0,
        }],
    );
    let syn = pkt6(CLIENT, CLIENT_PORT, NODE, NODE_PORT, IPPROTO_TCP, &[]);
    let (rc, out) = fx.run(PROG_XDP, &syn);
    assert_eq!(rc, XDP_PASS);
    let fwd = parse6_checked(&out[..syn.len()], IPPROTO_TCP, "SNAT SYN");
    assert_eq!(
        (fwd.saddr, fwd.daddr, fwd.dport),
        (NODE, REMOTE_BE, BE_PORT),
        "SNAT to the node, DNAT to the remote backend"
    );
    assert!(
        (SNAT_MIN..=SNAT_MAX).contains(&fwd.sport),
        "SNAT port {} outside {SNAT_MIN}-{SNAT_MAX}",
        fwd.sport
    );
    assert_eq!(nat6_rev_entries(&mut fx).len(), 1, "one reverse entry");
    let reply = pkt6(REMOTE_BE, BE_PORT, NODE, fwd.sport, IPPROTO_TCP, &[]);
    for prog in [PROG_XDP, PROG_TC_INGRESS] {
        let (_, out) = fx.run(prog, &reply);
        assert_eq!(
            parse6_checked(&out[..reply.len()], IPPROTO_TCP, prog),
            Parsed6 {
                saddr: NODE,
                sport: NODE_PORT,
                daddr: CLIENT,
                dport: CLIENT_PORT
            },
            "{prog}: reply back to the client"
        );
    }
}

/// Packets with an extension header (hop-by-hop) or a fragment header are passed
/// untranslated and counted, never mistranslated.
#[test]
fn ipv6_extension_headers_and_fragments_pass_untranslated() {
    let mut fx = fixture6(IPPROTO_TCP, NP_FLAGS, 0, &[local(1, LOCAL_BE)]);
    // Hop-by-hop: next header TCP, length 0 (8 bytes), PadN over the remaining 6 bytes.
    let hbh = [IPPROTO_TCP, 0, 1, 4, 0, 0, 0, 0];
    // Fragment header: next header TCP, offset 0, M flag set (a first fragment).
    let frag = [IPPROTO_TCP, 0, 0, 1, 0xde, 0xad, 0xbe, 0xef];
    for (ext, stat, first) in [
        (hbh, STAT_PASS_OTHER_PROTO, 0u8),
        (frag, STAT_PASS_FRAGMENT, 44),
    ] {
        let mut p = pkt6(CLIENT, CLIENT_PORT, NODE, NODE_PORT, IPPROTO_TCP, &ext);
        if first == 44 {
            p[ETH_HLEN + 6] = 44;
        }
        for prog in [PROG_XDP, PROG_TC_INGRESS] {
            let before = fx.events();
            let (rc, out) = fx.run(prog, &p);
            let after = fx.events();
            let pass = if prog == PROG_XDP {
                XDP_PASS
            } else {
                TC_ACT_OK
            };
            assert_eq!(rc, pass, "{prog}");
            assert_eq!(
                &out[..p.len()],
                &p[..],
                "{prog}: header {first} packet changed"
            );
            assert_eq!(delta(&before, &after, stat), 1, "{prog}: not counted");
            assert_eq!(delta(&before, &after, STAT_FWD_XLATE), 0, "{prog}");
        }
    }
}

/// loadBalancerSourceRanges on an IPv6 frontend: a client inside 2001:db8:1::/48 is
/// translated, one outside is dropped (XDP and tc) and counted.
#[test]
fn ipv6_source_ranges_drop_sources_outside_them() {
    let mut fx = fixture6(
        IPPROTO_TCP,
        NP_FLAGS | SVC_FLAG_SOURCE_RANGES,
        0,
        &[local(1, LOCAL_BE)],
    );
    let mut trie: LpmTrie<&mut MapData, Lb6SrcRangeKey, u8> =
        LpmTrie::try_from(fx.ebpf.map_mut(maps::LB6_SRC_RANGE).unwrap()).unwrap();
    let prefix = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0);
    let key = LpmKey::new(
        SRC_RANGE_INDEX_BITS + 48,
        Lb6SrcRangeKey::new(INDEX, words(prefix)),
    );
    trie.insert(&key, 1, 0).unwrap();
    for prog in [PROG_XDP, PROG_TC_INGRESS] {
        let inside = pkt6(CLIENT, CLIENT_PORT, NODE, NODE_PORT, IPPROTO_TCP, &[]);
        let (_, out) = fx.run(prog, &inside);
        let got = parse6_checked(&out[..inside.len()], IPPROTO_TCP, prog);
        assert_eq!(
            got.daddr, LOCAL_BE,
            "{prog}: a source inside the range is served"
        );
        let outside = pkt6(OTHER_CLIENT, CLIENT_PORT, NODE, NODE_PORT, IPPROTO_TCP, &[]);
        let before = fx.events();
        let (rc, _) = fx.run(prog, &outside);
        let after = fx.events();
        let drop = if prog == PROG_XDP {
            XDP_DROP
        } else {
            TC_ACT_SHOT
        };
        assert_eq!(rc, drop, "{prog}: a source outside the range is dropped");
        assert_eq!(delta(&before, &after, STAT_DROP_SOURCE_RANGE), 1, "{prog}");
    }
}

/// Session affinity on an IPv6 frontend: every new flow of a client goes to the backend its
/// first flow got (two backends, 30 flows from distinct ports), recorded by client address.
#[test]
fn ipv6_affinity_keeps_a_client_on_its_backend() {
    let mut fx = fixture6(
        IPPROTO_TCP,
        NP_FLAGS | SVC_FLAG_AFFINITY,
        600,
        &[local(1, LOCAL_BE), local(2, LOCAL_BE2)],
    );
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..30u16 {
        let syn = pkt6(CLIENT, CLIENT_PORT + i, NODE, NODE_PORT, IPPROTO_TCP, &[]);
        let (_, out) = fx.run(PROG_XDP, &syn);
        seen.insert(parse6_checked(&out[..syn.len()], IPPROTO_TCP, "affinity").daddr);
    }
    assert_eq!(seen.len(), 1, "one client, one backend: {seen:?}");
    let aff: HashMap<&mut MapData, Lb6AffinityKey, Lb6AffinityValue> =
        HashMap::try_from(fx.ebpf.map_mut(maps::LB6_AFFINITY).unwrap()).unwrap();
    let entries: Vec<_> = aff.iter().map(|r| r.unwrap()).collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].0.client, words(CLIENT));
    assert_eq!(entries[0].0.rev_nat_index, INDEX);
}
