//! The TCP relay: one task per accepted connection, which connects to a backend picked by
//! the frontend's [`Balancer`] and copies both ways (a half-close on one side is passed on
//! to the other). The connection is reset when its backend is removed.

use std::{
    net::{SocketAddr, SocketAddrV4},
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
            Ok((stream, SocketAddr::V4(peer))) => {
                tokio::spawn(relay(stream, peer, Arc::clone(&balancer)));
            }
            Ok((_, SocketAddr::V6(_))) => {}
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
    peer: SocketAddrV4,
    balancer: &Balancer,
) -> Option<(TcpStream, Arc<super::balancer::BackendHandle>)> {
    let mut tried = Vec::new();
    while tried.len() < MAX_TRIES {
        let backend = balancer.pick(*peer.ip(), &tried)?;
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

async fn relay(mut client: TcpStream, peer: SocketAddrV4, balancer: Arc<Balancer>) {
    if !balancer.admits(*peer.ip()) {
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
