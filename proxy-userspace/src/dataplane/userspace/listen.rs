//! Opening the relay's sockets on a frontend address (IPv4 or IPv6): SO_REUSEADDR so that a
//! socket just closed (its task aborted a moment ago) does not keep the address busy for the
//! next one; IPv6 sockets are IPv6 only (IPv4 frontends have their own sockets).

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

/// Pending connections a TCP listener queues before the relay accepts them.
const BACKLOG: i32 = 1024;

fn set_int_option(fd: &OwnedFd, level: i32, name: i32, value: libc::c_int) -> io::Result<()> {
    // SAFETY: setsockopt with a correctly sized int value.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn bind(fd: &OwnedFd, addr: SocketAddr) -> io::Result<()> {
    let r = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                // Network byte order.
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    // Network byte order.
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: bind with a sockaddr_in we own and its exact size.
            unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&raw const sin).cast(),
                    size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            }
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                // Network byte order.
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                // Network byte order (the octets as they are).
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: bind with a sockaddr_in6 we own and its exact size.
            unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&raw const sin6).cast(),
                    size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                )
            }
        }
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn bound_socket(ty: i32, addr: SocketAddr) -> io::Result<OwnedFd> {
    let family = match addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: plain socket(2); the result is checked before it is owned.
    let fd = unsafe { libc::socket(family, ty | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    set_int_option(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    if family == libc::AF_INET6 {
        set_int_option(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
    }
    bind(&fd, addr)?;
    Ok(fd)
}

/// A non-blocking TCP listener on `addr`.
pub fn tcp(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let fd = bound_socket(libc::SOCK_STREAM, addr)?;
    // SAFETY: listen(2) on a bound socket we own.
    if unsafe { libc::listen(fd.as_raw_fd(), BACKLOG) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(std::net::TcpListener::from(fd))
}

/// A non-blocking UDP socket bound to `addr`.
pub fn udp(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    Ok(std::net::UdpSocket::from(bound_socket(
        libc::SOCK_DGRAM,
        addr,
    )?))
}
