//! Opening the relay's sockets on a frontend address: SO_REUSEADDR so that a socket just
//! closed (its task aborted a moment ago) does not keep the address busy for the next one.

use std::{
    io,
    net::SocketAddrV4,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

/// Pending connections a TCP listener queues before the relay accepts them.
const BACKLOG: i32 = 1024;

fn bound_socket(ty: i32, addr: SocketAddrV4) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked before it is owned.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            ty | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a correctly sized int value.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        // Network byte order.
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            // Network byte order.
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: bind with a sockaddr_in we own and its exact size.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const sin).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// A non-blocking TCP listener on `addr`.
pub fn tcp(addr: SocketAddrV4) -> io::Result<std::net::TcpListener> {
    let fd = bound_socket(libc::SOCK_STREAM, addr)?;
    // SAFETY: listen(2) on a bound socket we own.
    if unsafe { libc::listen(fd.as_raw_fd(), BACKLOG) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(std::net::TcpListener::from(fd))
}

/// A non-blocking UDP socket bound to `addr`.
pub fn udp(addr: SocketAddrV4) -> io::Result<std::net::UdpSocket> {
    Ok(std::net::UdpSocket::from(bound_socket(
        libc::SOCK_DGRAM,
        addr,
    )?))
}
