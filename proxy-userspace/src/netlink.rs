//! The netlink plumbing the agent's four netlink users share (the link dump, the UDP socket
//! destroyer, the relay's interface setup and the conntrack flush): a socket to the kernel,
//! the message header, attribute walking. What each sends and parses stays with its user.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

/// `sizeof(struct nlmsghdr)`.
pub const NLMSG_HDR_LEN: usize = 16;

/// Netlink lengths are padded to 4 bytes.
pub const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A netlink message: the header (length, type, flags, sequence number, port 0) then `body`.
pub fn message(msg_type: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDR_LEN + body.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&msg_type.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(body);
    m
}

/// The (type, payload) of each attribute in `buf`, the type without its flag bits
/// (NLA_F_NESTED, NLA_F_NET_BYTEORDER); stops at the first malformed one.
pub fn attributes(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    /// `nla_type` without NLA_F_NESTED / NLA_F_NET_BYTEORDER.
    const NLA_TYPE_MASK: u16 = 0x3fff;
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let data = &buf[4..len];
        buf = &buf[align4(len).min(buf.len())..];
        Some((kind, data))
    })
}

/// A netlink socket of one protocol (`NETLINK_ROUTE`, `NETLINK_SOCK_DIAG`, ...), talking to
/// the kernel of the caller's network namespace.
pub struct NetlinkSocket {
    fd: OwnedFd,
}

impl NetlinkSocket {
    pub fn open(protocol: libc::c_int) -> io::Result<Self> {
        // SAFETY: plain socket(2); the result is checked before it is owned.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Makes `recv` fail after `timeout` without an answer (a kernel that never answers
    /// must not hang a sync).
    pub fn set_recv_timeout(&self, timeout: Duration) -> io::Result<()> {
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: libc::suseconds_t::from(timeout.subsec_micros() as i32),
        };
        // SAFETY: setsockopt with a valid timeval of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sends one message (or several, concatenated) to the kernel.
    pub fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: all-zero is a valid sockaddr_nl: the kernel (nl_pid 0).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `msg` and `addr` outlive the call; the lengths are theirs.
        let rc = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives one datagram (one or more messages) into `buf`; retried when interrupted.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: receives into `buf`, which we own, at most its length.
            let rc =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if rc >= 0 {
                return Ok(rc as usize);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_attributes_round_trip() {
        let mut body = Vec::new();
        // Two attributes: type 3 "lo\0" (padded to 8), and type 0x8012 (nested flag) empty.
        body.extend_from_slice(&7u16.to_ne_bytes());
        body.extend_from_slice(&3u16.to_ne_bytes());
        body.extend_from_slice(b"lo\0\0");
        body.extend_from_slice(&4u16.to_ne_bytes());
        body.extend_from_slice(&0x8012u16.to_ne_bytes());
        let m = message(18, 0x301, 9, &body);
        assert_eq!(m.len(), NLMSG_HDR_LEN + body.len());
        assert_eq!(
            u32::from_ne_bytes(m[..4].try_into().unwrap()) as usize,
            m.len()
        );
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().unwrap()), 9);
        let attrs: Vec<(u16, &[u8])> = attributes(&m[NLMSG_HDR_LEN..]).collect();
        assert_eq!(attrs, [(3, &b"lo\0"[..]), (0x12, &b""[..])]);
        assert_eq!(align4(5), 8);
        // A length past the buffer ends the walk.
        assert_eq!(attributes(&[200, 0, 1, 0, 0, 0]).count(), 0);
    }
}
