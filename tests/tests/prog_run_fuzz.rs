//! A seeded packet fuzzer for the device programs (BPF_PROG_TEST_RUN): random packets and
//! mutations of valid nodePort/external-IP packets, replies and ICMP errors (truncated at
//! every length, bit flips, random IHL and options, fragments, bad lengths, zero checksums,
//! random protocols including SCTP and ICMP), through XDP, tc ingress and tc egress. Every
//! output must be either the input unchanged, or a correct translation:
//!
//! - forward: the input was addressed to a programmed frontend; the output goes to one of
//!   its backends, from the client or (SNAT) from the frontend address and a SNAT port;
//! - reverse: the input came from a backend; the output comes from a frontend;
//! - ICMP error: the quoted packet now goes to a frontend (an error about a request), or
//!   comes from a backend (an error about a reply);
//!
//! with the same length and verdict, no byte changed outside the addresses, ports and
//! checksums, and checksums exactly as valid as they were (incremental updates keep a valid
//! checksum valid). Reproducible: `KPROXY_FUZZ_SEED` (default fixed) and
//! `KPROXY_FUZZ_ITERS` (default 20,000 inputs, well under a second of runs) for longer runs.
//! Needs root.

mod dp_common;

use dp_common::*;
use kproxy_tests::prog_run::*;
use proxy_common::lb::{BACKEND_FLAG_LOCAL, SVC_FLAG_EXTERNAL};

const EXT_IP: [u8; 4] = [198, 51, 100, 7];
const SCTP_PORT: u16 = 3868;
const PROGS: [&str; 3] = [PROG_XDP, PROG_TC_INGRESS, PROG_TC_EGRESS];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// An address and port (host notation).
type Endpoint = ([u8; 4], u16);

/// The frontends programmed in the fixture: (address, port, proto) -> backends.
struct World {
    frontends: Vec<([u8; 4], u16, u8, Vec<Endpoint>)>,
}

impl World {
    fn backends_of(&self, addr: [u8; 4], port: u16, proto: u8) -> Option<&Vec<Endpoint>> {
        self.frontends
            .iter()
            .find(|(a, p, pr, _)| *a == addr && *p == port && *pr == proto)
            .map(|f| &f.3)
    }
    fn is_frontend(&self, addr: [u8; 4], port: u16, proto: u8) -> bool {
        self.backends_of(addr, port, proto).is_some()
    }
    fn is_backend(&self, addr: [u8; 4], port: u16, proto: u8) -> bool {
        self.frontends
            .iter()
            .any(|(_, _, pr, bs)| *pr == proto && bs.contains(&(addr, port)))
    }
}

fn fixture() -> (Fixture, World) {
    let mut fx = nodeport_fixture(IPPROTO_TCP, &[local_be(), remote_be()]);
    fx.add_service([0; 4], NODE_PORT, IPPROTO_UDP, NP_FLAGS, 8, &[local_be()]);
    let sctp = Backend {
        id: 11,
        addr: LOCAL_BE,
        port: SCTP_PORT,
        flags: BACKEND_FLAG_LOCAL,
    };
    fx.add_service(
        EXT_IP,
        SCTP_PORT,
        IPPROTO_SCTP,
        SVC_FLAG_EXTERNAL,
        9,
        &[sctp],
    );
    let world = World {
        frontends: vec![
            (
                NODE,
                NODE_PORT,
                IPPROTO_TCP,
                vec![(LOCAL_BE, BE_PORT), (REMOTE_BE, BE_PORT)],
            ),
            (NODE, NODE_PORT, IPPROTO_UDP, vec![(LOCAL_BE, BE_PORT)]),
            (EXT_IP, SCTP_PORT, IPPROTO_SCTP, vec![(LOCAL_BE, SCTP_PORT)]),
        ],
    };
    (fx, world)
}

/// Valid packets the programs translate (or reverse-translate), with random client ports.
fn base_packet(rng: &mut Rng, fx: &Fixture) -> Vec<u8> {
    let cport = 30_000 + rng.below(35_000) as u16;
    let mut spec = match rng.below(8) {
        0 => PacketSpec::tcp(CLIENT, cport, NODE, NODE_PORT),
        1 => PacketSpec::udp(CLIENT, cport, NODE, NODE_PORT),
        2 => PacketSpec::sctp(CLIENT, cport, EXT_IP, SCTP_PORT),
        3 => PacketSpec::tcp(LOCAL_BE, BE_PORT, CLIENT, cport),
        4 => PacketSpec::udp(LOCAL_BE, BE_PORT, CLIENT, cport),
        5 => PacketSpec::tcp(REMOTE_BE, BE_PORT, NODE, SNAT_MIN + rng.below(11) as u16),
        6 => {
            // An ICMP error about a translated request.
            let client = PacketSpec::udp(CLIENT, cport, NODE, NODE_PORT).build();
            let (_, dnat) = fx.run(PROG_XDP, &client);
            let quote = 28 + rng.below(40);
            return icmp_error(LOCAL_BE, CLIENT, 3, rng.byte() % 16, 1200, &dnat, quote);
        }
        _ => {
            // An ICMP error about a reverse-translated reply, sent to the frontend.
            let client = PacketSpec::udp(CLIENT, cport, NODE, NODE_PORT).build();
            fx.run(PROG_XDP, &client);
            let reply = PacketSpec::udp(LOCAL_BE, BE_PORT, CLIENT, cport).build();
            let (_, rev) = fx.run(PROG_TC_EGRESS, &reply);
            let quote = 28 + rng.below(40);
            return icmp_error(ROUTER, NODE, 3, 4, 1200, &rev, quote);
        }
    };
    spec.tcp_flags = [0x02, 0x10, 0x18, 0x11, 0x04][rng.below(5)];
    if rng.below(4) == 0 {
        spec.ip_options = (0..rng.below(41)).map(|_| rng.byte()).collect();
    }
    if rng.below(8) == 0 {
        spec.payload = (0..rng.below(200)).map(|_| rng.byte()).collect();
    }
    spec.build()
}

fn mutate(rng: &mut Rng, p: &mut Vec<u8>) {
    let l3 = ETH_HLEN;
    for _ in 0..=rng.below(3) {
        match rng.below(9) {
            0 => {
                let len = ETH_HLEN + 20 + rng.below(p.len().saturating_sub(ETH_HLEN + 20) + 1);
                p.truncate(len.min(p.len()));
            }
            1 => {
                for _ in 0..=rng.below(4) {
                    let i = l3 + rng.below(p.len() - l3);
                    p[i] ^= 1 << rng.below(8);
                }
            }
            2 => p[l3] = 0x40 | (rng.byte() & 0x0f),
            3 => {
                let f = [0x2000u16, 0x0001, 0x2001, 0x1fff, rng.next() as u16][rng.below(5)];
                p[l3 + 6..l3 + 8].copy_from_slice(&f.to_be_bytes());
            }
            4 => {
                let t = [
                    0u16,
                    20,
                    27,
                    28,
                    (p.len() - l3) as u16 + 1,
                    rng.next() as u16,
                ][rng.below(6)];
                p[l3 + 2..l3 + 4].copy_from_slice(&t.to_be_bytes());
            }
            5 => p[l3 + 10..l3 + 12].fill(0),
            6 => {
                let ihl = usize::from(p[l3] & 0x0f) * 4;
                let off = l3 + ihl + [6usize, 16, 8][rng.below(3)];
                if off + 2 <= p.len() {
                    p[off..off + 2].fill(0);
                }
            }
            7 => p[l3 + 9] = [1u8, 6, 17, 132, rng.byte()][rng.below(5)],
            _ => {
                let i = l3 + rng.below(p.len() - l3);
                p[i] = rng.byte();
            }
        }
    }
}

fn random_packet(rng: &mut Rng) -> Vec<u8> {
    let len = ETH_HLEN + 20 + rng.below(120);
    let mut p: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
    p[12..14].copy_from_slice(&[0x08, 0x00]);
    if rng.below(2) == 0 {
        p[ETH_HLEN] = 0x45;
        p[ETH_HLEN + 16..ETH_HLEN + 20].copy_from_slice(&[NODE, EXT_IP][rng.below(2)]);
        p[ETH_HLEN + 9] = [6u8, 17, 132, 1][rng.below(4)];
    }
    p
}

/// Whether the checksums of a well-formed TCP/UDP/SCTP packet are right.
fn l4_checksums_ok(p: &[u8]) -> bool {
    let mut fixed = p.to_vec();
    let parsed = parse(p);
    fix_checksums(
        &mut fixed,
        !(parsed.proto == IPPROTO_UDP && parsed.l4_csum == 0),
    );
    fixed == p
}

fn icmp_checksums_ok(p: &[u8]) -> bool {
    icmp_recompute(p) == p
}

/// Panics unless `out` is a correct translation of `inp` (see the module docs).
fn check_translation(world: &World, prog: &str, inp: &[u8], out: &[u8], case: &str) {
    let ihl = usize::from(inp[ETH_HLEN] & 0x0f) * 4;
    let proto = inp[ETH_HLEN + 9];
    let l4 = ETH_HLEN + ihl;
    let mut mask = vec![false; inp.len()];
    let mut allow = |r: std::ops::Range<usize>| {
        for i in r {
            if i < mask.len() {
                mask[i] = true;
            }
        }
    };
    allow(ETH_HLEN + 10..ETH_HLEN + 20);
    if proto == IPPROTO_ICMP {
        let q = l4 + 8;
        let qihl = usize::from(inp[q] & 0x0f) * 4;
        allow(l4 + 2..l4 + 4);
        allow(q + 10..q + 20);
        allow(q + qihl..q + qihl + 4);
        let a = parse_icmp(inp);
        let b = parse_icmp(out);
        let qproto = inp[q + 9];
        // About a request (quoted dst backend -> frontend) or about a reply (quoted src
        // frontend -> backend).
        let request = world.is_frontend(b.q_daddr, b.q_dport, qproto)
            && world.is_backend(a.q_daddr, a.q_dport, qproto);
        let reply = world.is_frontend(a.q_saddr, a.q_sport, qproto)
            && world.is_backend(b.q_saddr, b.q_sport, qproto);
        assert!(
            request || reply,
            "{case}: {prog}: ICMP error rewritten to quote {b:?} from {a:?}"
        );
        assert_eq!(
            b.daddr, b.q_saddr,
            "{case}: {prog}: error not sent to the quoted source"
        );
        assert_eq!(
            icmp_checksums_ok(out),
            icmp_checksums_ok(inp),
            "{case}: {prog}: checksum validity changed"
        );
    } else {
        allow(l4..l4 + 4);
        let csum = l4 + l4_csum_off(proto);
        allow(csum..csum + if proto == IPPROTO_SCTP { 4 } else { 2 });
        let a = parse(inp);
        let b = parse(out);
        let forward = world
            .backends_of(a.daddr, a.dport, proto)
            .is_some_and(|bs| bs.contains(&(b.daddr, b.dport)))
            && ((b.saddr, b.sport) == (a.saddr, a.sport)
                || (b.saddr == a.daddr && (SNAT_MIN..=SNAT_MAX).contains(&b.sport)));
        let reverse =
            world.is_backend(a.saddr, a.sport, proto) && world.is_frontend(b.saddr, b.sport, proto);
        assert!(
            forward || reverse,
            "{case}: {prog}: not a translation: {a:?} -> {b:?}"
        );
        assert_eq!(
            l4_checksums_ok(out),
            l4_checksums_ok(inp),
            "{case}: {prog}: checksum validity changed ({a:?} -> {b:?})"
        );
    }
    for (i, allowed) in mask.iter().enumerate() {
        assert!(
            *allowed || inp[i] == out[i],
            "{case}: {prog}: byte {i} changed outside the tuple and checksums"
        );
    }
}

/// Runs `pkt` through every program; returns how many translated it.
fn run_case(fx: &Fixture, world: &World, pkt: &[u8], case: &str) -> usize {
    let mut translated = 0;
    for prog in PROGS {
        if pkt.len() < ETH_HLEN + 20 {
            continue; // the kernel refuses shorter test runs
        }
        let (ret, out) = fx.run(prog, pkt);
        assert_eq!(ret, verdict_pass(prog), "{case}: {prog}: verdict");
        assert_eq!(out.len(), pkt.len(), "{case}: {prog}: length changed");
        if out != pkt {
            check_translation(world, prog, pkt, &out, case);
            translated += 1;
        }
    }
    translated
}

#[test]
fn fuzz_device_programs() {
    let seed = env_u64("KPROXY_FUZZ_SEED", 0x6b70_726f_7879);
    let iters = env_u64("KPROXY_FUZZ_ITERS", 20_000);
    let (fx, world) = fixture();
    let mut rng = Rng(seed | 1);
    let started = std::time::Instant::now();
    let (mut inputs, mut translated) = (0u64, 0u64);
    // Every truncation of a few valid packets.
    for _ in 0..6 {
        let base = base_packet(&mut rng, &fx);
        for len in ETH_HLEN + 20..=base.len() {
            let case = format!("seed {seed:#x}: truncation to {len}");
            translated += run_case(&fx, &world, &base[..len], &case) as u64;
            inputs += 1;
        }
    }
    for i in 0..iters {
        let pkt = match rng.below(10) {
            0 => random_packet(&mut rng),
            1 => base_packet(&mut rng, &fx),
            _ => {
                let mut p = base_packet(&mut rng, &fx);
                mutate(&mut rng, &mut p);
                p
            }
        };
        let case = format!("seed {seed:#x}, input {i}: {:02x?}", pkt);
        translated += run_case(&fx, &world, &pkt, &case) as u64;
        inputs += 1;
    }
    eprintln!(
        "fuzz: seed {seed:#x}: {inputs} inputs x {} programs, {translated} translations checked, \
         {:.1} s",
        PROGS.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        translated > 0,
        "the fuzzer never produced a translatable packet"
    );
}
