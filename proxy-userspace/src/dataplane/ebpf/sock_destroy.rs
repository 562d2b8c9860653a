//! Closing connected UDP sockets whose backend went away (the socket-level twin of
//! kube-proxy's stale UDP conntrack flush).
//!
//! A UDP socket that `connect()`ed to a cluster IP was translated once, at connect time, to
//! a backend; without help it would keep sending to that backend after it is gone (the DNS
//! blackhole). For every process in the agent's cgroup tree, we visit its network namespace
//! and destroy (SOCK_DESTROY over NETLINK_SOCK_DIAG, as `ss -K` does) the UDP sockets connected
//! to a removed backend that our socket hooks translated. The application sees ECONNABORTED
//! and reconnects, which the hook then sends to a live backend.

use std::{
    collections::{BTreeSet, HashSet},
    fs::File,
    io,
    net::{Ipv4Addr, Ipv6Addr},
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use crate::netlink::{NLMSG_HDR_LEN, NetlinkSocket, align4, message};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const REQ_LEN: usize = 56; // struct inet_diag_req_v2
const MSG_MIN_LEN: usize = 72; // struct inet_diag_msg

/// The network namespaces of every process in `cgroup_root` and below, deduplicated.
fn namespaces_of_cgroup(cgroup_root: &Path) -> Vec<PathBuf> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let mut dirs = vec![cgroup_root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines().filter(|l| !l.is_empty()) {
                let ns = PathBuf::from(format!("/proc/{pid}/ns/net"));
                if let Ok(meta) = std::fs::metadata(&ns) {
                    if seen.insert((meta.dev(), meta.ino())) {
                        out.push(ns);
                    }
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            dirs.extend(
                entries
                    .flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.path()),
            );
        }
    }
    out
}

/// Destroys the UDP sockets connected to any of `targets` that `was_translated(cookie,
/// address, port)` accepts, in every network namespace of the cgroup tree. Returns how many.
pub fn destroy_udp_sockets(
    cgroup_root: &Path,
    targets: &HashSet<(Ipv4Addr, u16)>,
    was_translated: impl Fn(u64, Ipv4Addr, u16) -> bool + Sync,
) -> anyhow::Result<usize> {
    in_each_netns(cgroup_root, |_| {
        destroy_in_current_netns(targets, &was_translated)
    })
}

/// `destroy_udp_sockets` for IPv6 UDP sockets (AF_INET6 dump; v4-mapped peers are IPv4
/// sockets' business and not matched here).
pub fn destroy_udp_sockets6(
    cgroup_root: &Path,
    targets: &HashSet<(Ipv6Addr, u16)>,
    was_translated: impl Fn(u64, Ipv6Addr, u16) -> bool + Sync,
) -> anyhow::Result<usize> {
    in_each_netns(cgroup_root, |_| {
        destroy_matching(libc::AF_INET6 as u8, &|s: &DumpedSocket| {
            let dst = Ipv6Addr::from(s.dst6);
            targets.contains(&(dst, s.dport)) && was_translated(s.cookie, dst, s.dport)
        })
    })
}

/// Runs `f` on a thread inside each network namespace of the cgroup tree; sums the counts.
fn in_each_netns(
    cgroup_root: &Path,
    run: impl Fn(&PathBuf) -> io::Result<usize> + Sync,
) -> anyhow::Result<usize> {
    let namespaces = namespaces_of_cgroup(cgroup_root);
    let mut total = 0;
    std::thread::scope(|scope| {
        let handles: Vec<_> = namespaces
            .iter()
            .map(|ns| {
                let run = &run;
                scope.spawn(move || -> io::Result<usize> {
                    // setns affects only this thread.
                    let f = File::open(ns)?;
                    // SAFETY: setns on a valid namespace fd.
                    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    run(ns)
                })
            })
            .collect();
        for h in handles {
            match h.join() {
                Ok(Ok(n)) => total += n,
                Ok(Err(e)) => tracing::debug!("socket scan in a namespace failed: {e}"),
                Err(_) => tracing::warn!("socket scan thread panicked"),
            }
        }
    });
    Ok(total)
}

fn request_family(family: u8, msg_type: u16, flags: u16, sockid: &[u8; 48]) -> Vec<u8> {
    let mut req = Vec::with_capacity(REQ_LEN);
    req.push(family); // sdiag_family
    req.push(libc::IPPROTO_UDP as u8); // sdiag_protocol
    req.push(0); // idiag_ext
    req.push(0); // pad
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // idiag_states: all
    req.extend_from_slice(sockid);
    message(msg_type, flags, 1, &req)
}

/// One UDP socket from a dump: its `inet_diag_sockid` (48 bytes) and what we match on.
struct DumpedSocket {
    sockid: [u8; 48],
    dst: Ipv4Addr,
    /// The whole 16-byte destination field (IPv6 sockets).
    dst6: [u8; 16],
    dport: u16,
    cookie: u64,
}

fn dump_udp_family(sock: &NetlinkSocket, family: u8) -> io::Result<Vec<DumpedSocket>> {
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    sock.send(&request_family(
        family,
        SOCK_DIAG_BY_FAMILY,
        flags,
        &[0; 48],
    ))?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = sock.recv(&mut buf)?;
        let mut off = 0;
        while off + NLMSG_HDR_LEN <= n {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap_or_default()) as usize;
            let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap_or_default());
            if len < NLMSG_HDR_LEN || off + len > n {
                return Ok(out);
            }
            if ty == libc::NLMSG_DONE as u16 || ty == libc::NLMSG_ERROR as u16 {
                return Ok(out);
            }
            let body = &buf[off + NLMSG_HDR_LEN..off + len];
            if body.len() >= MSG_MIN_LEN {
                let mut sockid = [0u8; 48];
                sockid.copy_from_slice(&body[4..52]);
                let dport = u16::from_be_bytes([sockid[2], sockid[3]]);
                let dst = Ipv4Addr::new(sockid[20], sockid[21], sockid[22], sockid[23]);
                let mut dst6 = [0u8; 16];
                dst6.copy_from_slice(&sockid[20..36]);
                let lo = u32::from_ne_bytes(sockid[40..44].try_into().unwrap_or_default());
                let hi = u32::from_ne_bytes(sockid[44..48].try_into().unwrap_or_default());
                out.push(DumpedSocket {
                    sockid,
                    dst,
                    dst6,
                    dport,
                    cookie: (u64::from(hi) << 32) | u64::from(lo),
                });
            }
            off += align4(len);
        }
    }
}

fn destroy_in_current_netns(
    targets: &HashSet<(Ipv4Addr, u16)>,
    was_translated: &(impl Fn(u64, Ipv4Addr, u16) -> bool + Sync),
) -> io::Result<usize> {
    destroy_matching(libc::AF_INET as u8, &|s: &DumpedSocket| {
        targets.contains(&(s.dst, s.dport)) && was_translated(s.cookie, s.dst, s.dport)
    })
}

/// Destroys the UDP sockets of `family` in this netns that `matches` accepts.
fn destroy_matching(
    family: u8,
    matches: &(impl Fn(&DumpedSocket) -> bool + Sync),
) -> io::Result<usize> {
    let sock = NetlinkSocket::open(libc::NETLINK_SOCK_DIAG)?;
    let victims: Vec<DumpedSocket> = dump_udp_family(&sock, family)?
        .into_iter()
        .filter(|s| matches(s))
        .collect();
    let mut destroyed = 0;
    for v in victims {
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
        sock.send(&request_family(family, SOCK_DESTROY, flags, &v.sockid))?;
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf)?;
        // NLMSG_ERROR with error 0 is the ack.
        if n >= NLMSG_HDR_LEN + 4 {
            let err = i32::from_ne_bytes(buf[16..20].try_into().unwrap_or_default());
            if err == 0 {
                destroyed += 1;
                let backend: std::net::IpAddr = if family == libc::AF_INET6 as u8 {
                    Ipv6Addr::from(v.dst6).into()
                } else {
                    v.dst.into()
                };
                tracing::debug!(%backend, port = v.dport, "destroyed a connected UDP socket");
            } else {
                tracing::debug!(
                    "SOCK_DESTROY failed: {}",
                    io::Error::from_raw_os_error(-err)
                );
            }
        }
    }
    Ok(destroyed)
}
