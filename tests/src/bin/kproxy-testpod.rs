//! A tiny workload for the kproxy e2e tests.
//!
//! ```text
//! kproxy-testpod udp-serve NAME ADDR:PORT
//!     Replies to every datagram with "NAME <client ip>:<client port>".
//!     Prints "listening ADDR:PORT" once bound.
//! kproxy-testpod udp-ask ADDR:PORT [--connected] [--count N] [--interval-ms MS]
//!                        [--timeout-ms MS] [--sport PORT]
//!     Sends N queries. Without --connected every query is a sendto() on one unconnected
//!     socket (bound to --sport if given); with --connected one connected socket is used for
//!     all queries, like a DNS client, and is re-created after an error.
//! kproxy-testpod tcp-ask ADDR:PORT [--http] [--count N] [--interval-ms MS] [--timeout-ms MS]
//!     Opens a new connection per query; with --http sends "GET /" and reports the body.
//! kproxy-testpod tcx-count IF
//!     Prints "ingress N" and "egress N": how many programs are attached to IF's TCX
//!     hooks (BPF_PROG_QUERY; bpftool 7.1 cannot show TCX). Run it in the device's netns.
//! kproxy-testpod xdp-pass-pin PATH
//!     Loads a two-instruction XDP program that returns XDP_PASS and pins it at PATH (on a
//!     bpffs), for `ip link set dev IF xdpdrv pinned PATH`.
//! ```
//!
//! The ask commands print one line per query, flushed at once:
//!
//! ```text
//! <epoch ms when sent> <seq> ok <peer addr> <reply...>
//! <epoch ms when sent> <seq> timeout
//! <epoch ms when sent> <seq> error <ERRNO NAME> <message>
//! ```
//!
//! `<peer addr>` is the address the reply came from (UDP) or `getpeername()` (TCP).

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    process::ExitCode,
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("udp-serve") => udp_serve(&args[1..]),
        Some("udp-ask") => ask(&args[1..], Proto::Udp),
        Some("tcp-ask") => ask(&args[1..], Proto::Tcp),
        Some("tcx-count") => tcx_count(&args[1..]),
        Some("xdp-pass-pin") => xdp_pass_pin(&args[1..]),
        _ => Err(usage()),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kproxy-testpod: {e}");
            ExitCode::from(2)
        }
    }
}

fn usage() -> String {
    "usage: kproxy-testpod udp-serve NAME ADDR:PORT | udp-ask ADDR:PORT [--connected] [--count N] \
     [--interval-ms MS] [--timeout-ms MS] [--sport PORT] | tcp-ask ADDR:PORT [--http] [--count N] \
     [--interval-ms MS] [--timeout-ms MS]"
        .to_string()
}

fn epoch_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

fn errno_name(e: &io::Error) -> String {
    let name = match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "ECONNREFUSED",
        Some(libc::ECONNABORTED) => "ECONNABORTED",
        Some(libc::ECONNRESET) => "ECONNRESET",
        Some(libc::EHOSTUNREACH) => "EHOSTUNREACH",
        Some(libc::ENETUNREACH) => "ENETUNREACH",
        Some(libc::ETIMEDOUT) => "ETIMEDOUT",
        Some(libc::EPERM) => "EPERM",
        Some(libc::EACCES) => "EACCES",
        Some(libc::EADDRNOTAVAIL) => "EADDRNOTAVAIL",
        Some(libc::EINVAL) => "EINVAL",
        Some(libc::EPIPE) => "EPIPE",
        Some(n) => return format!("E{n}"),
        None => return format!("{:?}", e.kind()),
    };
    name.to_string()
}

fn udp_serve(args: &[String]) -> Result<(), String> {
    let [name, addr] = args else {
        return Err(usage());
    };
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| format!("bad address {addr}: {e}"))?;
    let sock = UdpSocket::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    println!("listening {addr}");
    io::stdout().flush().ok();
    let mut buf = [0u8; 2048];
    loop {
        match sock.recv_from(&mut buf) {
            Ok((_, from)) => {
                let reply = format!("{name} {from}");
                if let Err(e) = sock.send_to(reply.as_bytes(), from) {
                    eprintln!("send_to {from}: {e}");
                }
            }
            Err(e) => eprintln!("recv_from: {e}"),
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Proto {
    Udp,
    Tcp,
}

struct AskOpts {
    target: SocketAddr,
    connected: bool,
    http: bool,
    count: u64,
    interval: Duration,
    timeout: Duration,
    sport: u16,
}

fn parse_ask(args: &[String]) -> Result<AskOpts, String> {
    let mut it = args.iter();
    let target = it.next().ok_or_else(usage)?;
    let target: SocketAddr = target
        .parse()
        .map_err(|e| format!("bad address {target}: {e}"))?;
    let mut o = AskOpts {
        target,
        connected: false,
        http: false,
        count: 1,
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(1000),
        sport: 0,
    };
    while let Some(a) = it.next() {
        let mut num = |what: &str| -> Result<u64, String> {
            it.next()
                .ok_or_else(|| format!("{what} needs a value"))?
                .parse::<u64>()
                .map_err(|e| format!("{what}: {e}"))
        };
        match a.as_str() {
            "--connected" => o.connected = true,
            "--http" => o.http = true,
            "--count" => o.count = num("--count")?,
            "--interval-ms" => o.interval = Duration::from_millis(num("--interval-ms")?),
            "--timeout-ms" => o.timeout = Duration::from_millis(num("--timeout-ms")?),
            "--sport" => o.sport = u16::try_from(num("--sport")?).map_err(|e| e.to_string())?,
            other => return Err(format!("unknown option {other}\n{}", usage())),
        }
    }
    Ok(o)
}

fn ask(args: &[String], proto: Proto) -> Result<(), String> {
    let o = parse_ask(args)?;
    let mut udp: Option<UdpSocket> = None;
    let start = Instant::now();
    for seq in 0..o.count {
        // A fixed schedule: query `seq` goes out at start + seq*interval (or at once if late).
        let due = start + o.interval * seq as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        let ts = epoch_ms();
        let line = match proto {
            Proto::Udp => udp_query(&o, &mut udp, seq),
            Proto::Tcp => tcp_query(&o),
        };
        println!("{ts} {seq} {line}");
        io::stdout().flush().ok();
    }
    Ok(())
}

fn new_udp(o: &AskOpts) -> io::Result<UdpSocket> {
    // The target's family: an IPv6 target needs an IPv6 socket.
    let any = if o.target.is_ipv6() {
        SocketAddr::from(([0u16; 8], o.sport))
    } else {
        SocketAddr::from(([0, 0, 0, 0], o.sport))
    };
    let s = UdpSocket::bind(any)?;
    s.set_read_timeout(Some(o.timeout))?;
    if o.connected {
        s.connect(o.target)?;
    }
    Ok(s)
}

fn udp_query(o: &AskOpts, slot: &mut Option<UdpSocket>, seq: u64) -> String {
    if slot.is_none() {
        match new_udp(o) {
            Ok(s) => *slot = Some(s),
            Err(e) => return format!("error {} socket: {e}", errno_name(&e)),
        }
    }
    let sock = slot.as_ref().unwrap();
    // Drop late replies to earlier queries so they are not taken for this one's.
    let _ = sock.set_nonblocking(true);
    let mut buf = [0u8; 2048];
    while sock.recv_from(&mut buf).is_ok() {}
    let _ = sock.set_nonblocking(false);
    let query = format!("query {seq}");
    let sent = if o.connected {
        sock.send(query.as_bytes())
    } else {
        sock.send_to(query.as_bytes(), o.target)
    };
    let r = sent.and_then(|_| sock.recv_from(&mut buf));
    match r {
        Ok((n, from)) => format!("ok {from} {}", String::from_utf8_lossy(&buf[..n]).trim()),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            "timeout".into()
        }
        Err(e) => {
            if o.connected {
                // Like a resolver: throw the socket away and open a new one for the next query.
                *slot = None;
            }
            format!("error {} {e}", errno_name(&e))
        }
    }
}

fn tcp_query(o: &AskOpts) -> String {
    let mut s = match TcpStream::connect_timeout(&o.target, o.timeout) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::TimedOut || e.kind() == io::ErrorKind::WouldBlock => {
            return "timeout".into();
        }
        Err(e) => return format!("error {} connect: {e}", errno_name(&e)),
    };
    let peer = s
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|e| format!("?({e})"));
    if !o.http {
        return format!("ok {peer} connected");
    }
    let _ = s.set_read_timeout(Some(o.timeout));
    let _ = s.set_write_timeout(Some(o.timeout));
    let req = format!(
        "GET / HTTP/1.0\r\nHost: {}\r\nConnection: close\r\n\r\n",
        o.target
    );
    if let Err(e) = s.write_all(req.as_bytes()) {
        return format!("error {} write: {e}", errno_name(&e));
    }
    let mut resp = Vec::new();
    if let Err(e) = s.read_to_end(&mut resp) {
        if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) && resp.is_empty()
        {
            return "timeout".into();
        }
        if resp.is_empty() {
            return format!("error {} read: {e}", errno_name(&e));
        }
    }
    let text = String::from_utf8_lossy(&resp);
    match text.split_once("\r\n\r\n") {
        Some((head, body))
            if head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200") =>
        {
            format!("ok {peer} {}", body.trim())
        }
        Some((head, _)) => format!("error HTTP {}", head.lines().next().unwrap_or("")),
        None => format!("error SHORT short response: {:?}", text.trim()),
    }
}

/// BPF_PROG_QUERY on a device's TCX hooks.
fn tcx_count(args: &[String]) -> Result<(), String> {
    const BPF_PROG_QUERY: libc::c_long = 16;
    const BPF_TCX_INGRESS: u32 = 46;
    const BPF_TCX_EGRESS: u32 = 47;
    let [ifname] = args else { return Err(usage()) };
    let c = std::ffi::CString::new(ifname.as_str()).map_err(|e| e.to_string())?;
    // SAFETY: a valid NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if ifindex == 0 {
        return Err(format!("no interface {ifname}"));
    }
    for (name, attach_type) in [("ingress", BPF_TCX_INGRESS), ("egress", BPF_TCX_EGRESS)] {
        // union bpf_attr, the `query` member: target_ifindex @0, attach_type @4,
        // query_flags @8, attach_flags @12, prog_ids @16, prog_cnt @24.
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&ifindex.to_ne_bytes());
        attr[4..8].copy_from_slice(&attach_type.to_ne_bytes());
        // SAFETY: attr is a zeroed bpf_attr-sized buffer; prog_ids is NULL so the kernel
        // only writes prog_cnt.
        let r =
            unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_QUERY, attr.as_mut_ptr(), attr.len()) };
        if r != 0 {
            return Err(format!(
                "BPF_PROG_QUERY {name}: {}",
                io::Error::last_os_error()
            ));
        }
        let cnt = u32::from_ne_bytes(attr[24..28].try_into().unwrap());
        println!("{name} {cnt}");
    }
    Ok(())
}

/// BPF_PROG_LOAD of `r0 = XDP_PASS; exit`, then BPF_OBJ_PIN.
fn xdp_pass_pin(args: &[String]) -> Result<(), String> {
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_PROG_TYPE_XDP: u32 = 6;
    let [path] = args else { return Err(usage()) };
    // struct bpf_insn { u8 code; u8 dst:4, src:4; s16 off; s32 imm; }
    let insns: [u64; 2] = [
        // BPF_ALU64 | BPF_MOV | BPF_K, r0, imm = 2 (XDP_PASS)
        u64::from_le_bytes([0xb7, 0, 0, 0, 2, 0, 0, 0]),
        // BPF_JMP | BPF_EXIT
        u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
    ];
    let license = b"GPL\0";
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&BPF_PROG_TYPE_XDP.to_ne_bytes());
    attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    attr[48..56].copy_from_slice(b"xdp_pass");
    // SAFETY: attr is a bpf_attr-sized buffer describing valid instruction and license memory.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_LOAD, attr.as_mut_ptr(), attr.len()) };
    if fd < 0 {
        return Err(format!("BPF_PROG_LOAD: {}", io::Error::last_os_error()));
    }
    let cpath = std::ffi::CString::new(path.as_str()).map_err(|e| e.to_string())?;
    let mut attr = [0u8; 128];
    attr[0..8].copy_from_slice(&(cpath.as_ptr() as u64).to_ne_bytes());
    attr[8..12].copy_from_slice(&(fd as u32).to_ne_bytes());
    // SAFETY: as above; pathname points at a NUL-terminated string.
    let r = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, attr.as_mut_ptr(), attr.len()) };
    if r != 0 {
        return Err(format!(
            "BPF_OBJ_PIN {path}: {}",
            io::Error::last_os_error()
        ));
    }
    Ok(())
}
