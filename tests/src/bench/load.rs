//! Load generators and sinks, run inside the cluster's namespaces as subcommands of
//! `kproxy-bench`. Each prints its count on stdout and stops by itself.

use std::{
    net::{SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

/// Packets per sendmmsg/recvmmsg call.
const BATCH: usize = 64;
/// Small UDP payload (a 60-byte frame with headers).
const PAYLOAD: usize = 18;

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> Result<T> {
    args.get(i)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("argument {i}: {what}"))
}

/// `udp-flood ADDR:PORT SECONDS`: sends small UDP packets as fast as sendmmsg allows from one
/// socket (one flow); prints how many were sent.
pub fn udp_flood_main(args: &[String]) -> Result<()> {
    let target: SocketAddr = arg(args, 0, "ADDR:PORT")?;
    let secs: u64 = arg(args, 1, "SECONDS")?;
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    sock.connect(target)?;
    let payload = [0x5au8; PAYLOAD];
    let mut iov: Vec<libc::iovec> = (0..BATCH)
        .map(|_| libc::iovec {
            iov_base: payload.as_ptr() as *mut libc::c_void,
            iov_len: PAYLOAD,
        })
        .collect();
    // SAFETY: all-zero mmsghdr is valid; each then points at one iovec.
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
        m.msg_hdr.msg_iov = v;
        m.msg_hdr.msg_iovlen = 1;
    }
    let end = Instant::now() + Duration::from_secs(secs);
    let mut sent: u64 = 0;
    while Instant::now() < end {
        for _ in 0..64 {
            // SAFETY: `msgs` holds BATCH valid headers whose buffers outlive the call.
            let n = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
            if n > 0 {
                sent += n as u64;
            }
        }
    }
    println!("{sent}");
    eprintln!("cpu {:.6}", self_cpu_seconds());
    Ok(())
}

/// This process's CPU time (user + system), in seconds. The kernel charges the softirq work a
/// task runs on its way out (here: the whole veth -> node -> pod path of a sent packet) to
/// that task when it does not account IRQ time separately, so the sender's and the sink's
/// time is the packet path's cost without the rest of a shared machine's load.
pub fn self_cpu_seconds() -> f64 {
    // SAFETY: all-zero rusage is valid; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid out pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// The CPU seconds a load process printed on stderr with [`self_cpu_seconds`].
pub fn printed_cpu_seconds(stderr: &[u8]) -> Option<f64> {
    String::from_utf8_lossy(stderr)
        .lines()
        .find_map(|l| l.strip_prefix("cpu ")?.trim().parse().ok())
}

/// `udp-sink ADDR:PORT SECONDS`: counts the UDP packets that arrive within SECONDS.
pub fn udp_sink_main(args: &[String]) -> Result<()> {
    let addr: SocketAddr = arg(args, 0, "ADDR:PORT")?;
    let secs: u64 = arg(args, 1, "SECONDS")?;
    let sock = UdpSocket::bind(addr)?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let big: libc::c_int = 16 << 20;
    // SAFETY: plain setsockopt with a c_int value.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&big as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as u32,
        );
    }
    let mut bufs = vec![[0u8; 2048]; BATCH];
    let mut iov: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: all-zero mmsghdr is valid; each then points at one iovec.
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
        m.msg_hdr.msg_iov = v;
        m.msg_hdr.msg_iovlen = 1;
    }
    let end = Instant::now() + Duration::from_secs(secs);
    let mut got: u64 = 0;
    while Instant::now() < end {
        // SAFETY: `msgs` holds BATCH valid headers whose buffers outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as u32,
                0,
                std::ptr::null_mut(),
            )
        };
        if n > 0 {
            got += n as u64;
        }
    }
    println!("{got}");
    eprintln!("cpu {:.6}", self_cpu_seconds());
    Ok(())
}

/// Closes with RST (SO_LINGER 0) so the client leaves no TIME_WAIT behind.
fn close_abortive(s: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: plain setsockopt with a linger struct.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as u32,
        );
    }
}

/// `connect-loop ADDR:PORT SECONDS`: opens and closes TCP connections one after the other;
/// prints "<succeeded> <failed>".
pub fn connect_loop_main(args: &[String]) -> Result<()> {
    let target: SocketAddr = arg(args, 0, "ADDR:PORT")?;
    let secs: u64 = arg(args, 1, "SECONDS")?;
    let end = Instant::now() + Duration::from_secs(secs);
    let (mut ok, mut failed) = (0u64, 0u64);
    while Instant::now() < end {
        match TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
            Ok(s) => {
                ok += 1;
                close_abortive(s);
            }
            Err(_) => failed += 1,
        }
    }
    println!("{ok} {failed}");
    Ok(())
}

/// `connect-latency ADDR:PORT N`: N new connections one after the other; prints the median
/// and the 99th percentile of connect() in microseconds.
pub fn connect_latency_main(args: &[String]) -> Result<()> {
    let target: SocketAddr = arg(args, 0, "ADDR:PORT")?;
    let n: usize = arg(args, 1, "N")?;
    let mut us = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let s = TcpStream::connect_timeout(&target, Duration::from_secs(2))
            .with_context(|| format!("connecting to {target}"))?;
        us.push(t.elapsed().as_secs_f64() * 1e6);
        close_abortive(s);
    }
    us.sort_by(f64::total_cmp);
    let pick = |q: f64| us[((us.len() as f64 - 1.0) * q).round() as usize];
    println!("{:.1} {:.1}", pick(0.5), pick(0.99));
    Ok(())
}
