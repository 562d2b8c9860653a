//! Helpers for running kproxy's programs on crafted packets with `BPF_PROG_TEST_RUN`:
//! a raw syscall wrapper (aya 0.14 has none), an Ethernet/IPv4/TCP/UDP packet builder with
//! correct checksums, a parser and checksum verifiers, and a fixture that loads
//! `kproxy::EBPF_OBJECT` with its maps pinned in a private bpffs.

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
    programs::{CgroupSockAddr, SchedClassifier, Xdp},
};
use proxy_common::{
    affinity::{Lb4AffinityKey, Lb4AffinityValue},
    config::Lb4Config,
    conntrack::{Ct4Entry, Ct4Key, Nat4RevEntry},
    lb::{Lb4Backend, Lb4Key, Lb4Service},
    maps,
    src_range::{Lb4SrcRangeKey, SRC_RANGE_INDEX_BITS},
    stats::{STAT_REASONS, SvcStats},
};

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;
pub const ETH_HLEN: usize = 14;

pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_DROP: u32 = 1;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_REDIRECT: u32 = 7;

pub const PROG_XDP: &str = "kproxy_xdp_ingress";
pub const PROG_TC_INGRESS: &str = "kproxy_tc_ingress";
pub const PROG_TC_EGRESS: &str = "kproxy_tc_egress";
pub const PROG_CONNECT4: &str = "kproxy_sock4_connect";
pub const PROGS_SOCK: [&str; 8] = [
    PROG_CONNECT4,
    "kproxy_sock4_sendmsg",
    "kproxy_sock4_recvmsg",
    "kproxy_sock4_getpeername",
    "kproxy_sock6_connect",
    "kproxy_sock6_sendmsg",
    "kproxy_sock6_recvmsg",
    "kproxy_sock6_getpeername",
];

// ---------------------------------------------------------------------------------------------
// BPF_PROG_TEST_RUN

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// The `test` member of `union bpf_attr` (uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BpfAttrTestRun {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    /// Explicit so the tail is zero: the kernel rejects non-zero bytes past the fields it
    /// knows (EINVAL).
    _pad: u32,
}

/// Runs the program `prog_fd` once on `data`; returns its return value and the packet as the
/// program left it.
pub fn bpf_prog_test_run(prog_fd: i32, data: &[u8]) -> io::Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; data.len() + 512];
    let mut attr = BpfAttrTestRun {
        prog_fd: prog_fd as u32,
        data_size_in: data.len() as u32,
        data_size_out: out.len() as u32,
        data_in: data.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat: 1,
        ..Default::default()
    };
    // SAFETY: `attr` is a valid bpf_attr prefix; the buffers outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut BpfAttrTestRun,
            size_of::<BpfAttrTestRun>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    out.truncate(attr.data_size_out as usize);
    Ok((attr.retval, out))
}

/// Runs the program `prog_fd` `repeat` times on `data` in the kernel (BPF_PROG_TEST_RUN with
/// `repeat`); returns its last return value and the kernel's average time per run in ns.
/// Each run starts from the original packet; maps keep what earlier runs wrote (so after the
/// first run a flow is established).
pub fn bpf_prog_test_run_repeat(prog_fd: i32, data: &[u8], repeat: u32) -> io::Result<(u32, u32)> {
    let mut attr = BpfAttrTestRun {
        prog_fd: prog_fd as u32,
        data_size_in: data.len() as u32,
        data_in: data.as_ptr() as u64,
        repeat,
        ..Default::default()
    };
    // SAFETY: `attr` is a valid bpf_attr prefix; the input buffer outlives the call; no
    // output buffer is given (data_out 0).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut BpfAttrTestRun,
            size_of::<BpfAttrTestRun>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((attr.retval, attr.duration))
}

// ---------------------------------------------------------------------------------------------
// Packets

/// One's complement sum of `data` (big-endian 16-bit words), not folded.
pub fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

pub fn csum_finish(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// What to build. Addresses and ports in host notation.
#[derive(Clone, Debug)]
pub struct PacketSpec {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// IPv4 options, padded by the builder to a multiple of 4 bytes.
    pub ip_options: Vec<u8>,
    /// Flags + fragment offset field (host order), e.g. 0x4000 = DF, 0x2000 = MF.
    pub frag: u16,
    pub payload: Vec<u8>,
    /// UDP only: send checksum 0 ("no checksum").
    pub udp_no_csum: bool,
    /// TCP only: the flags byte (0x02 = SYN).
    pub tcp_flags: u8,
}

impl PacketSpec {
    pub fn tcp(saddr: [u8; 4], sport: u16, daddr: [u8; 4], dport: u16) -> Self {
        Self {
            saddr,
            daddr,
            sport,
            dport,
            proto: IPPROTO_TCP,
            ip_options: Vec::new(),
            frag: 0x4000,
            payload: Vec::new(),
            udp_no_csum: false,
            tcp_flags: 0x02,
        }
    }

    /// An SCTP packet with one DATA-like chunk of payload (the CRC32c covers all of it).
    pub fn sctp(saddr: [u8; 4], sport: u16, daddr: [u8; 4], dport: u16) -> Self {
        Self {
            proto: IPPROTO_SCTP,
            payload: b"\x00\x03\x00\x14kproxy sctp chunk".to_vec(),
            ..Self::tcp(saddr, sport, daddr, dport)
        }
    }

    pub fn udp(saddr: [u8; 4], sport: u16, daddr: [u8; 4], dport: u16) -> Self {
        Self {
            proto: IPPROTO_UDP,
            payload: b"kproxy udp payload!".to_vec(),
            ..Self::tcp(saddr, sport, daddr, dport)
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let mut opts = self.ip_options.clone();
        while !opts.len().is_multiple_of(4) {
            opts.push(0); // End of options list
        }
        let ihl = 20 + opts.len();
        let l4_len = l4_hlen(self.proto) + self.payload.len();
        let tot_len = ihl + l4_len;
        let mut p = Vec::with_capacity(ETH_HLEN + tot_len);
        p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x08, 0x00]);
        p.push(0x40 | (ihl / 4) as u8);
        p.push(0);
        p.extend_from_slice(&(tot_len as u16).to_be_bytes());
        p.extend_from_slice(&0x1234u16.to_be_bytes());
        p.extend_from_slice(&self.frag.to_be_bytes());
        p.push(64);
        p.push(self.proto);
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(&self.saddr);
        p.extend_from_slice(&self.daddr);
        p.extend_from_slice(&opts);
        p.extend_from_slice(&self.sport.to_be_bytes());
        p.extend_from_slice(&self.dport.to_be_bytes());
        if self.proto == IPPROTO_TCP {
            p.extend_from_slice(&0x0102_0304u32.to_be_bytes()); // seq
            p.extend_from_slice(&0u32.to_be_bytes()); // ack
            p.extend_from_slice(&[0x50, self.tcp_flags]); // data offset 5, flags
            p.extend_from_slice(&64240u16.to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
        } else if self.proto == IPPROTO_SCTP {
            p.extend_from_slice(&0xdead_beefu32.to_be_bytes()); // verification tag
            p.extend_from_slice(&[0, 0, 0, 0]); // CRC32c
        } else {
            p.extend_from_slice(&(l4_len as u16).to_be_bytes());
            p.extend_from_slice(&[0, 0]);
        }
        p.extend_from_slice(&self.payload);
        fix_checksums(&mut p, !self.udp_no_csum);
        p
    }
}

/// The fixed header length of a transport the builder knows.
pub fn l4_hlen(proto: u8) -> usize {
    match proto {
        IPPROTO_TCP => 20,
        IPPROTO_SCTP => 12,
        _ => 8,
    }
}

/// The offset of the checksum inside a transport header.
pub fn l4_csum_off(proto: u8) -> usize {
    match proto {
        IPPROTO_TCP => 16,
        IPPROTO_SCTP => 8,
        _ => 6,
    }
}

/// Plain bitwise CRC32c (SCTP's checksum, RFC 9260 appendix B), as the value SCTP stores
/// little-endian.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Offsets of an IPv4 packet built by [`PacketSpec::build`] (or translated from one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub ip_csum: u16,
    pub l4_csum: u16,
    pub l4_off: usize,
}

pub fn parse(p: &[u8]) -> Parsed {
    let ihl = usize::from(p[ETH_HLEN] & 0x0f) * 4;
    let l4 = ETH_HLEN + ihl;
    let proto = p[ETH_HLEN + 9];
    let csum_off = l4 + l4_csum_off(proto);
    Parsed {
        saddr: p[ETH_HLEN + 12..ETH_HLEN + 16].try_into().unwrap(),
        daddr: p[ETH_HLEN + 16..ETH_HLEN + 20].try_into().unwrap(),
        sport: u16::from_be_bytes([p[l4], p[l4 + 1]]),
        dport: u16::from_be_bytes([p[l4 + 2], p[l4 + 3]]),
        proto,
        ip_csum: u16::from_be_bytes([p[ETH_HLEN + 10], p[ETH_HLEN + 11]]),
        l4_csum: u16::from_be_bytes([p[csum_off], p[csum_off + 1]]),
        l4_off: l4,
    }
}

/// Recomputes the IPv4 header checksum and the TCP/UDP checksum from scratch (UDP: only if
/// `udp_csum`, else 0).
pub fn fix_checksums(p: &mut [u8], udp_csum: bool) {
    let ihl = usize::from(p[ETH_HLEN] & 0x0f) * 4;
    let l3 = ETH_HLEN;
    let l4 = l3 + ihl;
    p[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
    let ip = csum_finish(csum_add(0, &p[l3..l4]));
    p[l3 + 10..l3 + 12].copy_from_slice(&ip.to_be_bytes());
    let proto = p[l3 + 9];
    let csum_off = l4 + l4_csum_off(proto);
    if proto == IPPROTO_SCTP {
        p[csum_off..csum_off + 4].fill(0);
        let crc = crc32c(&p[l4..]);
        p[csum_off..csum_off + 4].copy_from_slice(&crc.to_le_bytes());
        return;
    }
    p[csum_off..csum_off + 2].copy_from_slice(&[0, 0]);
    if proto == IPPROTO_UDP && !udp_csum {
        return;
    }
    let l4_len = p.len() - l4;
    let mut sum = csum_add(0, &p[l3 + 12..l3 + 20]);
    sum += u32::from(proto) + l4_len as u32;
    sum = csum_add(sum, &p[l4..]);
    let mut c = csum_finish(sum);
    if proto == IPPROTO_UDP && c == 0 {
        c = 0xffff;
    }
    p[csum_off..csum_off + 2].copy_from_slice(&c.to_be_bytes());
}

/// Panics unless both checksums of `p` equal the ones computed from scratch.
pub fn assert_checksums(p: &[u8], what: &str) {
    let got = parse(p);
    let mut fixed = p.to_vec();
    fix_checksums(&mut fixed, !(got.proto == IPPROTO_UDP && got.l4_csum == 0));
    let want = parse(&fixed);
    assert_eq!(
        (got.ip_csum, got.l4_csum),
        (want.ip_csum, want.l4_csum),
        "{what}: (ip, l4) checksums differ from a recomputation"
    );
    assert_eq!(
        p,
        &fixed[..],
        "{what}: packet differs from its recomputation"
    );
}

/// Builds an ICMP error (`icmp_type`/`code`, `mtu` in the "next-hop MTU" field for
/// fragmentation needed) from `src` to `dst` quoting the first `quote_len` bytes of the IPv4
/// packet in `quoted` (an Ethernet frame as [`PacketSpec::build`] makes), with correct
/// checksums, as Linux's icmp_send builds one.
pub fn icmp_error(
    src: [u8; 4],
    dst: [u8; 4],
    icmp_type: u8,
    code: u8,
    mtu: u16,
    quoted: &[u8],
    quote_len: usize,
) -> Vec<u8> {
    let quote = &quoted[ETH_HLEN..(ETH_HLEN + quote_len).min(quoted.len())];
    let tot_len = 20 + 8 + quote.len();
    let mut p = Vec::with_capacity(ETH_HLEN + tot_len);
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x03, 0x02, 0, 0, 0, 0, 0x04, 0x08, 0x00]);
    p.extend_from_slice(&[0x45, 0xc0]);
    p.extend_from_slice(&(tot_len as u16).to_be_bytes());
    p.extend_from_slice(&[0x43, 0x21, 0, 0, 64, IPPROTO_ICMP, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&[icmp_type, code, 0, 0, 0, 0]);
    p.extend_from_slice(&mtu.to_be_bytes());
    p.extend_from_slice(quote);
    let ip = csum_finish(csum_add(0, &p[ETH_HLEN..ETH_HLEN + 20]));
    p[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&ip.to_be_bytes());
    let icmp = csum_finish(csum_add(0, &p[ETH_HLEN + 20..]));
    p[ETH_HLEN + 22..ETH_HLEN + 24].copy_from_slice(&icmp.to_be_bytes());
    p
}

/// An ICMP error as the tests read it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParsedIcmp {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub icmp_type: u8,
    pub ip_csum: u16,
    pub icmp_csum: u16,
    /// The quoted packet: addresses, ports, its IPv4 header checksum, its L4 checksum when
    /// quoted.
    pub q_saddr: [u8; 4],
    pub q_daddr: [u8; 4],
    pub q_sport: u16,
    pub q_dport: u16,
    pub q_ip_csum: u16,
    pub q_l4_csum: Option<u16>,
}

pub fn parse_icmp(p: &[u8]) -> ParsedIcmp {
    let ihl = usize::from(p[ETH_HLEN] & 0x0f) * 4;
    let icmp = ETH_HLEN + ihl;
    let q = icmp + 8;
    let qihl = usize::from(p[q] & 0x0f) * 4;
    let ql4 = q + qihl;
    let qcsum = ql4 + l4_csum_off(p[q + 9]);
    ParsedIcmp {
        saddr: p[ETH_HLEN + 12..ETH_HLEN + 16].try_into().unwrap(),
        daddr: p[ETH_HLEN + 16..ETH_HLEN + 20].try_into().unwrap(),
        icmp_type: p[icmp],
        ip_csum: u16::from_be_bytes([p[ETH_HLEN + 10], p[ETH_HLEN + 11]]),
        icmp_csum: u16::from_be_bytes([p[icmp + 2], p[icmp + 3]]),
        q_saddr: p[q + 12..q + 16].try_into().unwrap(),
        q_daddr: p[q + 16..q + 20].try_into().unwrap(),
        q_sport: u16::from_be_bytes([p[ql4], p[ql4 + 1]]),
        q_dport: u16::from_be_bytes([p[ql4 + 2], p[ql4 + 3]]),
        q_ip_csum: u16::from_be_bytes([p[q + 10], p[q + 11]]),
        q_l4_csum: (qcsum + 2 <= p.len()).then(|| u16::from_be_bytes([p[qcsum], p[qcsum + 1]])),
    }
}

/// The ICMP error `p` with its outer IPv4 header checksum, ICMP checksum and quoted IPv4
/// header checksum computed from scratch.
pub fn icmp_recompute(p: &[u8]) -> Vec<u8> {
    let ihl = usize::from(p[ETH_HLEN] & 0x0f) * 4;
    let icmp = ETH_HLEN + ihl;
    let q = icmp + 8;
    let qihl = usize::from(p[q] & 0x0f) * 4;
    let mut fixed = p.to_vec();
    fixed[ETH_HLEN + 10..ETH_HLEN + 12].fill(0);
    let ip = csum_finish(csum_add(0, &fixed[ETH_HLEN..icmp]));
    fixed[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&ip.to_be_bytes());
    fixed[q + 10..q + 12].fill(0);
    let qip = csum_finish(csum_add(0, &fixed[q..q + qihl]));
    fixed[q + 10..q + 12].copy_from_slice(&qip.to_be_bytes());
    fixed[icmp + 2..icmp + 4].fill(0);
    let ic = csum_finish(csum_add(0, &fixed[icmp..]));
    fixed[icmp + 2..icmp + 4].copy_from_slice(&ic.to_be_bytes());
    fixed
}

/// Panics unless the outer IPv4 header checksum, the ICMP checksum and the quoted IPv4
/// header checksum of the ICMP error `p` are what a from-scratch computation gives.
pub fn assert_icmp_checksums(p: &[u8], what: &str) {
    assert_eq!(
        p,
        &icmp_recompute(p)[..],
        "{what}: checksums differ from a recomputation"
    );
}

// ---------------------------------------------------------------------------------------------
// Fixture

/// A bpffs mounted on a fresh directory; unmounted and removed on drop (even when a test
/// panics).
pub struct BpfFs {
    pub path: PathBuf,
}

impl BpfFs {
    pub fn mount() -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "kproxy-prog-run-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create bpffs dir");
        let target = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: valid C strings; no data argument.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            let err = io::Error::last_os_error();
            let _ = std::fs::remove_dir(&path);
            panic!(
                "mount bpffs on {}: {err} (these tests need root)",
                path.display()
            );
        }
        Self { path }
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        if let Ok(target) = CString::new(self.path.as_os_str().as_encoded_bytes()) {
            // SAFETY: valid C string.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

pub struct Backend {
    pub id: u32,
    pub addr: [u8; 4],
    pub port: u16,
    pub flags: u8,
}

/// The loaded object with all programs loaded; fields drop in order (programs and maps
/// before the bpffs holding the pins).
pub struct Fixture {
    pub ebpf: Ebpf,
    pub bpffs: BpfFs,
}

pub fn be32(a: [u8; 4]) -> u32 {
    u32::from_ne_bytes(a)
}

pub fn be16(p: u16) -> u16 {
    p.to_be()
}

impl Fixture {
    /// Loads `kproxy::EBPF_OBJECT` with maps pinned in a fresh bpffs and loads (verifies)
    /// every program as the agent does.
    pub fn load() -> Self {
        let bpffs = BpfFs::mount();
        let ebpf = load_all(&bpffs.path);
        Self { ebpf, bpffs }
    }

    fn map(&mut self, name: &str) -> &mut aya::maps::Map {
        self.ebpf
            .map_mut(name)
            .unwrap_or_else(|| panic!("map {name} missing from the object"))
    }

    fn services(&mut self) -> HashMap<&mut MapData, Lb4Key, Lb4Service> {
        HashMap::try_from(self.map(maps::LB4_SERVICES)).unwrap()
    }

    fn backends(&mut self) -> HashMap<&mut MapData, u32, Lb4Backend> {
        HashMap::try_from(self.map(maps::LB4_BACKENDS)).unwrap()
    }

    pub fn set_config(&mut self, flags: u32, snat_min: u16, snat_max: u16) {
        let mut cfg: Array<&mut MapData, Lb4Config> =
            Array::try_from(self.map(maps::LB4_CONFIG)).unwrap();
        cfg.set(
            0,
            Lb4Config {
                flags,
                snat_port_min: snat_min,
                snat_port_max: snat_max,
            },
            0,
        )
        .unwrap();
    }

    pub fn add_nodeport_addr(&mut self, addr: [u8; 4]) {
        let mut m: HashMap<&mut MapData, u32, u32> =
            HashMap::try_from(self.map(maps::LB4_NODEPORT_ADDRS)).unwrap();
        m.insert(be32(addr), 1, 0).unwrap();
    }

    /// Writes a frontend in the writer's order: backends, slots, master (count last).
    pub fn add_service(
        &mut self,
        addr: [u8; 4],
        port: u16,
        proto: u8,
        flags: u16,
        rev_nat_index: u16,
        backends: &[Backend],
    ) {
        for b in backends {
            let be = Lb4Backend {
                address: be32(b.addr),
                port: be16(b.port),
                proto,
                flags: b.flags,
                rev_nat_index,
                _pad: 0,
            };
            self.backends().insert(b.id, be, 0).unwrap();
        }
        let mut svcs = self.services();
        for (i, b) in backends.iter().enumerate() {
            let slot = Lb4Service {
                backend_id: b.id,
                count: 0,
                rev_nat_index,
                flags,
                _pad: 0,
            };
            let key = Lb4Key::new(be32(addr), be16(port), proto, i as u16 + 1);
            svcs.insert(key, slot, 0).unwrap();
        }
        let master = Lb4Service {
            backend_id: 0,
            count: backends.len() as u16,
            rev_nat_index,
            flags,
            _pad: 0,
        };
        svcs.insert(Lb4Key::new(be32(addr), be16(port), proto, 0), master, 0)
            .unwrap();
    }

    /// Marks `ifindex` in `KP_PODDEV_V1` with `flags` (`POD_DEV_*`), as the agent does for a
    /// pod's veth.
    pub fn set_pod_device(&mut self, ifindex: u32, flags: u32) {
        let mut m: HashMap<&mut MapData, u32, u32> =
            HashMap::try_from(self.map(maps::POD_DEVICES)).unwrap();
        m.insert(ifindex, flags, 0).unwrap();
    }

    /// Overwrites the SCTP CRC32c factor of the SCTP length `len` (0 = as never written).
    pub fn set_sctp_crc_shift(&mut self, len: u32, shift: u32) {
        let mut m: Array<&mut MapData, u32> =
            Array::try_from(self.map(maps::SCTP_CRC_SHIFT)).unwrap();
        m.set(len, shift, 0).unwrap();
    }

    /// Forgets every flow the programs tracked (CT4), as a node that never saw them.
    pub fn ct_clear(&mut self) {
        let mut m: HashMap<&mut MapData, Ct4Key, Ct4Entry> =
            HashMap::try_from(self.map(maps::CT4)).unwrap();
        let keys: Vec<Ct4Key> = m.keys().map(|k| k.unwrap()).collect();
        for k in keys {
            let _ = m.remove(&k);
        }
    }

    /// Gives the frontend's master entry `flags` (added) and the `backend_id` the writer
    /// stores there (the affinity timeout in seconds).
    pub fn set_master(&mut self, addr: [u8; 4], port: u16, proto: u8, flags: u16, backend_id: u32) {
        let mut svcs = self.services();
        let key = Lb4Key::new(be32(addr), be16(port), proto, 0);
        let mut master = svcs.get(&key, 0).unwrap();
        master.flags |= flags;
        master.backend_id = backend_id;
        svcs.insert(key, master, 0).unwrap();
    }

    /// Allows `addr/prefix_len` for the frontend `rev_nat_index` (loadBalancerSourceRanges).
    pub fn add_src_range(&mut self, rev_nat_index: u16, addr: [u8; 4], prefix_len: u8) {
        let mut m: LpmTrie<&mut MapData, Lb4SrcRangeKey, u8> =
            LpmTrie::try_from(self.map(maps::LB4_SRC_RANGE)).unwrap();
        let key = LpmKey::new(
            SRC_RANGE_INDEX_BITS + u32::from(prefix_len),
            Lb4SrcRangeKey::new(rev_nat_index, be32(addr)),
        );
        m.insert(&key, 1, 0).unwrap();
    }

    fn affinity(&mut self) -> HashMap<&mut MapData, Lb4AffinityKey, Lb4AffinityValue> {
        HashMap::try_from(self.map(maps::LB4_AFFINITY)).unwrap()
    }

    /// Every session-affinity entry.
    pub fn affinity_entries(&mut self) -> Vec<(Lb4AffinityKey, Lb4AffinityValue)> {
        self.affinity().iter().map(|r| r.unwrap()).collect()
    }

    pub fn put_affinity(&mut self, key: Lb4AffinityKey, value: Lb4AffinityValue) {
        self.affinity().insert(key, value, 0).unwrap();
    }

    pub fn remove_backend(&mut self, id: u32) {
        self.backends().remove(&id).unwrap();
    }

    pub fn ct_lookup(&mut self, key: &Ct4Key) -> Option<Ct4Entry> {
        let m: HashMap<&mut MapData, Ct4Key, Ct4Entry> =
            HashMap::try_from(self.map(maps::CT4)).unwrap();
        m.get(key, 0).ok()
    }

    pub fn nat_rev_entries(&mut self) -> Vec<(Ct4Key, Nat4RevEntry)> {
        let m: HashMap<&mut MapData, Ct4Key, Nat4RevEntry> =
            HashMap::try_from(self.map(maps::NAT4_REV)).unwrap();
        m.iter().map(|r| r.unwrap()).collect()
    }

    /// Every event counter (`STAT_*` order), summed over the CPUs.
    pub fn events(&mut self) -> Vec<u64> {
        let m: PerCpuArray<&mut MapData, u64> =
            PerCpuArray::try_from(self.map(maps::STATS)).unwrap();
        (0..STAT_REASONS as u32)
            .map(|i| m.get(&i, 0).unwrap().iter().sum())
            .collect()
    }

    /// The counters of the frontend `rev_nat_index`, summed over the CPUs (zero if it has
    /// no entry yet).
    pub fn svc_stats(&mut self, rev_nat_index: u16) -> SvcStats {
        let m: PerCpuHashMap<&mut MapData, u16, SvcStats> =
            PerCpuHashMap::try_from(self.map(maps::SVC_STATS)).unwrap();
        match m.get(&rev_nat_index, 0) {
            Ok(values) => values.iter().fold(SvcStats::default(), |a, v| SvcStats {
                packets: a.packets + v.packets,
                bytes: a.bytes + v.bytes,
                connections: a.connections + v.connections,
            }),
            Err(MapError::KeyNotFound) => SvcStats::default(),
            Err(e) => panic!("reading {}: {e}", maps::SVC_STATS),
        }
    }

    pub fn prog_fd(&self, name: &str) -> i32 {
        self.ebpf
            .program(name)
            .unwrap_or_else(|| panic!("program {name} missing"))
            .fd()
            .unwrap()
            .as_fd()
            .as_raw_fd()
    }

    /// Runs `prog` on `pkt`, panicking if the syscall fails.
    pub fn run(&self, prog: &str, pkt: &[u8]) -> (u32, Vec<u8>) {
        bpf_prog_test_run(self.prog_fd(prog), pkt)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN {prog} on {} bytes: {e}", pkt.len()))
    }
}

/// Loads the object as the agent does (maps pinned by name under `pin_dir`) and loads every
/// program; panics with the verifier log if one is rejected.
pub fn load_all(pin_dir: &Path) -> Ebpf {
    load_all_from(pin_dir, kproxy::EBPF_OBJECT)
}

/// Like [`load_all`] for another build of the object (e.g. the dev profile).
pub fn load_all_from(pin_dir: &Path, object: &[u8]) -> Ebpf {
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .load(object)
        .unwrap_or_else(|e| panic!("loading the eBPF object: {e:?}"));
    // As the agent does before attaching: SCTP port rewrites need it.
    kproxy::dataplane::ebpf::sctp_crc::write_sctp_crc_shifts(&mut ebpf)
        .unwrap_or_else(|e| panic!("writing the SCTP CRC32c factors: {e:#}"));
    let xdp: &mut Xdp = ebpf.program_mut(PROG_XDP).unwrap().try_into().unwrap();
    xdp.load()
        .unwrap_or_else(|e| panic!("{PROG_XDP} rejected: {e:?}"));
    for name in [PROG_TC_INGRESS, PROG_TC_EGRESS] {
        let tc: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
        tc.load()
            .unwrap_or_else(|e| panic!("{name} rejected: {e:?}"));
    }
    for name in PROGS_SOCK {
        let p: &mut CgroupSockAddr = ebpf.program_mut(name).unwrap().try_into().unwrap();
        p.load()
            .unwrap_or_else(|e| panic!("{name} rejected: {e:?}"));
    }
    ebpf
}
