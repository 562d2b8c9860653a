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

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const ETH_HLEN: usize = 14;

pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_DROP: u32 = 1;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_OK: u32 = 0;

pub const PROG_XDP: &str = "kproxy_xdp_ingress";
pub const PROG_TC_INGRESS: &str = "kproxy_tc_ingress";
pub const PROG_TC_EGRESS: &str = "kproxy_tc_egress";
pub const PROG_CONNECT4: &str = "kproxy_sock4_connect";
pub const PROGS_SOCK: [&str; 4] = [
    PROG_CONNECT4,
    "kproxy_sock4_sendmsg",
    "kproxy_sock4_recvmsg",
    "kproxy_sock4_getpeername",
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
        let l4_len = if self.proto == IPPROTO_TCP { 20 } else { 8 } + self.payload.len();
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
            p.extend_from_slice(&[0x50, 0x02]); // data offset 5, SYN
            p.extend_from_slice(&64240u16.to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
        } else {
            p.extend_from_slice(&(l4_len as u16).to_be_bytes());
            p.extend_from_slice(&[0, 0]);
        }
        p.extend_from_slice(&self.payload);
        fix_checksums(&mut p, !self.udp_no_csum);
        p
    }
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
    let csum_off = if proto == IPPROTO_TCP {
        l4 + 16
    } else {
        l4 + 6
    };
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
    let csum_off = if proto == IPPROTO_TCP {
        l4 + 16
    } else {
        l4 + 6
    };
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
