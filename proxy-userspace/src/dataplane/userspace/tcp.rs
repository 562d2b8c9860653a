//! The TCP relay: one task per accepted connection, which connects to a backend picked by
//! the frontend's [`Balancer`] and copies both ways (a half-close on one side is passed on
//! to the other). The connection is reset when its backend is removed.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::net::{TcpListener, TcpStream};

use super::{RateLimitedLog, balancer::Balancer};

/// How long connecting to one backend may take before another one is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How many backends one client connection tries before it is reset.
const MAX_TRIES: usize = 3;

/// Accepts connections on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, balancer: Arc<Balancer>) {
    let mut errors = RateLimitedLog::default();
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(relay(stream, peer, Arc::clone(&balancer)));
            }
            Err(e) => {
                // E.g. out of file descriptors: back off instead of spinning.
                errors.warn(|| format!("{}: accept failed: {e}", balancer.label));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Closes `stream` with a reset (SO_LINGER 0), as a kernel dataplane refuses a connection.
fn reset(stream: TcpStream) {
    if let Ok(std) = stream.into_std() {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&std);
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt on a descriptor we own, with a correctly sized linger value.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const linger).cast(),
                size_of::<libc::linger>() as libc::socklen_t,
            );
        }
    }
}

async fn connect_backend(
    peer: SocketAddr,
    balancer: &Balancer,
) -> Option<(TcpStream, Arc<super::balancer::BackendHandle>)> {
    let mut tried = Vec::new();
    while tried.len() < MAX_TRIES {
        let backend = balancer.pick(peer.ip(), &tried)?;
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(backend.address)).await {
            Ok(Ok(s)) => return Some((s, backend)),
            Ok(Err(e)) => tracing::debug!(
                "{}: backend {} refused {peer}: {e}",
                balancer.label,
                backend.address
            ),
            Err(_) => tracing::debug!(
                "{}: backend {} did not answer {peer} in {CONNECT_TIMEOUT:?}",
                balancer.label,
                backend.address
            ),
        }
        tried.push(backend.address);
    }
    None
}

async fn relay(mut client: TcpStream, peer: SocketAddr, balancer: Arc<Balancer>) {
    let local = client
        .local_addr()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |l| l.ip());
    if !balancer.admits(peer.ip(), local) {
        reset(client);
        return;
    }
    let Some((mut upstream, backend)) = connect_backend(peer, &balancer).await else {
        reset(client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    tokio::select! {
        // Ends when both directions are done (each EOF is passed on as a shutdown) or on
        // an error; dropping the streams closes them.
        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
        () = backend.wait_retired() => {
            reset(client);
            reset(upstream);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddrV4;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::dataplane::userspace::balancer::{BackendHandle, Pool};

    /// A relay on 127.0.0.1 in front of `backend`; returns its address.
    async fn relay_to(backend: Arc<BackendHandle>) -> SocketAddrV4 {
        let pool = Pool {
            backends: vec![backend],
            ..Pool::default()
        };
        let balancer = Arc::new(Balancer::new("test".into(), pool));
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("relay listener");
        let SocketAddr::V4(addr) = listener.local_addr().expect("addr") else {
            unreachable!("bound to an IPv4 address")
        };
        tokio::spawn(serve(listener, balancer));
        addr
    }

    async fn backend_listener() -> (TcpListener, SocketAddrV4) {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("backend listener");
        let SocketAddr::V4(addr) = l.local_addr().expect("addr") else {
            unreachable!("bound to an IPv4 address")
        };
        (l, addr)
    }

    #[tokio::test]
    async fn half_close_is_passed_on_and_the_answer_still_comes_back() {
        let (backend, backend_addr) = backend_listener().await;
        // The backend reads until the client's EOF, then answers and closes.
        tokio::spawn(async move {
            let (mut s, _) = backend.accept().await.expect("accept");
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.expect("read");
            s.write_all(format!("got {} bytes", got.len()).as_bytes())
                .await
                .expect("write");
        });
        let relay = relay_to(BackendHandle::new(backend_addr)).await;
        let mut client = TcpStream::connect(relay).await.expect("connect");
        client.write_all(&[7u8; 100_000]).await.expect("write");
        client.shutdown().await.expect("half-close");
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_string(&mut answer))
            .await
            .expect("answered in time")
            .expect("read");
        assert_eq!(answer, "got 100000 bytes");
    }

    #[tokio::test]
    async fn retiring_the_backend_resets_its_relayed_connections() {
        let (backend, backend_addr) = backend_listener().await;
        tokio::spawn(async move {
            let (mut s, _) = backend.accept().await.expect("accept");
            // Echo forever.
            let mut buf = [0u8; 64];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        let handle = BackendHandle::new(backend_addr);
        let relay = relay_to(Arc::clone(&handle)).await;
        let mut client = TcpStream::connect(relay).await.expect("connect");
        client.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        client.read_exact(&mut buf).await.expect("echo");
        assert_eq!(&buf, b"ping");
        handle.retire();
        let r = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .expect("closed in time");
        assert!(
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "the relayed connection should be reset: {r:?}"
        );
    }

    #[tokio::test]
    async fn a_backend_that_refuses_is_skipped_for_a_live_one() {
        let (live, live_addr) = backend_listener().await;
        tokio::spawn(async move {
            let (mut s, _) = live.accept().await.expect("accept");
            s.write_all(b"live").await.expect("write");
        });
        // A port that was just free: nothing listens there.
        let (dead, dead_addr) = backend_listener().await;
        drop(dead);
        let pool = Pool {
            backends: vec![BackendHandle::new(dead_addr), BackendHandle::new(live_addr)],
            ..Pool::default()
        };
        let balancer = Arc::new(Balancer::new("test".into(), pool));
        let client_side = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("listener");
        let SocketAddr::V4(relay) = client_side.local_addr().expect("addr") else {
            unreachable!("bound to an IPv4 address")
        };
        tokio::spawn(serve(client_side, balancer));
        let mut client = TcpStream::connect(relay).await.expect("connect");
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_string(&mut answer))
            .await
            .expect("answered in time")
            .expect("read");
        assert_eq!(answer, "live");
    }
}
