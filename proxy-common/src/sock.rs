//! Socket-level load balancing: what `recvmsg4`/`getpeername4` need to show the frontend
//! address to an application whose `connect()`/`sendmsg()` was translated.

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Sock4RevKey {
    /// bpf_get_socket_cookie() of the socket.
    pub cookie: u64,
    /// be: the backend the socket was sent to.
    pub address: u32,
    /// be
    pub port: u16,
    pub _pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sock4RevValue {
    /// be: the frontend the application asked for.
    pub address: u32,
    /// be
    pub port: u16,
    pub rev_nat_index: u16,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `repr(C)` data with explicit padding.
    unsafe impl aya::Pod for super::Sock4RevKey {}
    unsafe impl aya::Pod for super::Sock4RevValue {}
}

const _: () = assert!(core::mem::size_of::<Sock4RevKey>() == 16);
const _: () = assert!(core::mem::size_of::<Sock4RevValue>() == 8);
