//! Socket-level load balancing over IPv6: what `recvmsg6`/`getpeername6` need to show the
//! frontend address to an application whose `connect()`/`sendmsg()` was translated.

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Sock6RevKey {
    /// bpf_get_socket_cookie() of the socket.
    pub cookie: u64,
    /// be words: the backend the socket was sent to.
    pub address: [u32; 4],
    /// be
    pub port: u16,
    pub _pad: [u16; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sock6RevValue {
    /// be words: the frontend the application asked for.
    pub address: [u32; 4],
    /// be
    pub port: u16,
    pub rev_nat_index: u16,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `repr(C)` data with explicit padding.
    unsafe impl aya::Pod for super::Sock6RevKey {}
    unsafe impl aya::Pod for super::Sock6RevValue {}
}

const _: () = assert!(core::mem::size_of::<Sock6RevKey>() == 32);
const _: () = assert!(core::mem::size_of::<Sock6RevValue>() == 20);
