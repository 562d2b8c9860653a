//! The UDP relay: one session per client address and port, with its own socket connected
//! to the backend picked for it. Replies go back to the client from the frontend's socket
//! (so from the frontend address). A session ends after [`IDLE_TIMEOUT`] without a datagram
//! either way, or when its backend is removed; the client's next datagram opens a new one.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::net::UdpSocket;

use super::{
    RateLimitedLog,
    balancer::{BackendHandle, Balancer},
};

/// How long a session lives without traffic (the kernel's UDP conntrack timeout).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_DATAGRAM: usize = 65_535;
/// Sessions one frontend socket keeps at most (each holds a socket): beyond it, datagrams of
/// new flows are dropped until sessions idle out, so a flood of sources cannot exhaust the
/// agent's file descriptors.
const MAX_SESSIONS: usize = 16_384;

/// Milliseconds since the first call, as a cheap shared clock for activity stamps.
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

struct Session {
    id: u64,
    upstream: Arc<UdpSocket>,
    last_active: Arc<AtomicU64>,
}

type Sessions = Arc<Mutex<HashMap<SocketAddr, Session>>>;

/// Relays datagrams arriving on `socket` until the task is aborted.
pub async fn serve(socket: UdpSocket, balancer: Arc<Balancer>) {
    let socket = Arc::new(socket);
    let sessions: Sessions = Arc::default();
    let mut next_id = 0u64;
    let mut errors = RateLimitedLog::default();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, client) = match socket.recv_from(&mut buf).await {
            Ok((n, c)) => (n, c),
            Err(e) => {
                errors.warn(|| format!("{}: receiving failed: {e}", balancer.label));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let existing = sessions.lock().ok().and_then(|s| {
            s.get(&client)
                .map(|s| (Arc::clone(&s.upstream), Arc::clone(&s.last_active)))
        });
        let (upstream, last_active) = match existing {
            Some(s) => s,
            None => {
                next_id += 1;
                match open_session(&socket, &balancer, &sessions, client, next_id).await {
                    Some(s) => s,
                    None => continue,
                }
            }
        };
        last_active.store(now_ms(), Ordering::Relaxed);
        // A refused datagram (the backend's port closed) is the backend's answer to give;
        // UDP has no way to pass it on, so it is dropped like the datagram itself.
        let _ = upstream.send(&buf[..n]).await;
    }
}

/// Picks a backend for `client` and starts the session's reply task. `None`: the datagram
/// is dropped (source not admitted, no backend, or no socket).
async fn open_session(
    socket: &Arc<UdpSocket>,
    balancer: &Arc<Balancer>,
    sessions: &Sessions,
    client: SocketAddr,
    id: u64,
) -> Option<(Arc<UdpSocket>, Arc<AtomicU64>)> {
    let local = socket
        .local_addr()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |l| l.ip());
    if !balancer.admits(client.ip(), local) {
        return None;
    }
    if sessions.lock().is_ok_and(|s| s.len() >= MAX_SESSIONS) {
        tracing::debug!(
            "{}: {MAX_SESSIONS} UDP sessions open; dropping a new flow's datagram",
            balancer.label
        );
        return None;
    }
    let backend = balancer.pick(client.ip(), &[])?;
    let any: SocketAddr = match backend.address {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let upstream = match UdpSocket::bind(any).await {
        Ok(u) => u,
        Err(e) => {
            tracing::warn!("{}: no socket for a UDP session: {e}", balancer.label);
            return None;
        }
    };
    if let Err(e) = upstream.connect(backend.address).await {
        tracing::debug!("{}: connecting to {}: {e}", balancer.label, backend.address);
        return None;
    }
    let upstream = Arc::new(upstream);
    let last_active = Arc::new(AtomicU64::new(now_ms()));
    if let Ok(mut s) = sessions.lock() {
        s.insert(
            client,
            Session {
                id,
                upstream: Arc::clone(&upstream),
                last_active: Arc::clone(&last_active),
            },
        );
    }
    tokio::spawn(replies(
        Arc::clone(socket),
        Arc::clone(&upstream),
        client,
        backend,
        Arc::clone(sessions),
        id,
        Arc::clone(&last_active),
    ));
    Some((upstream, last_active))
}

/// Sends the backend's datagrams back to the client until the session is idle for
/// [`IDLE_TIMEOUT`] or the backend is retired, then forgets the session.
async fn replies(
    socket: Arc<UdpSocket>,
    upstream: Arc<UdpSocket>,
    client: SocketAddr,
    backend: Arc<BackendHandle>,
    sessions: Sessions,
    id: u64,
    last_active: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let idle_ms = now_ms().saturating_sub(last_active.load(Ordering::Relaxed));
        let Some(left) = IDLE_TIMEOUT.checked_sub(Duration::from_millis(idle_ms)) else {
            break;
        };
        tokio::select! {
            r = upstream.recv(&mut buf) => {
                if let Ok(n) = r {
                    last_active.store(now_ms(), Ordering::Relaxed);
                    let _ = socket.send_to(&buf[..n], client).await;
                }
            }
            () = tokio::time::sleep(left) => {}
            () = backend.wait_retired() => break,
        }
    }
    if let Ok(mut s) = sessions.lock()
        && s.get(&client).is_some_and(|s| s.id == id)
    {
        s.remove(&client);
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddrV4;

    use super::*;
    use crate::dataplane::userspace::balancer::Pool;

    async fn bound() -> (UdpSocket, SocketAddrV4) {
        let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind");
        let SocketAddr::V4(a) = s.local_addr().expect("addr") else {
            unreachable!("bound to an IPv4 address")
        };
        (s, a)
    }

    /// A backend answering each datagram with `<name> <datagram>`.
    async fn backend(name: &'static str) -> SocketAddrV4 {
        let (s, addr) = bound().await;
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let reply = format!("{name} {}", String::from_utf8_lossy(&buf[..n]));
                let _ = s.send_to(reply.as_bytes(), from).await;
            }
        });
        addr
    }

    async fn ask(client: &UdpSocket, relay: SocketAddrV4, q: &str) -> (String, SocketAddr) {
        client.send_to(q.as_bytes(), relay).await.expect("send");
        let mut buf = [0u8; 1500];
        let (n, from) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .expect("answered in time")
            .expect("recv");
        (String::from_utf8_lossy(&buf[..n]).into_owned(), from)
    }

    #[tokio::test]
    async fn a_flow_keeps_its_backend_until_the_backend_is_retired() {
        let a = BackendHandle::new(backend("a").await);
        let b = BackendHandle::new(backend("b").await);
        let balancer = Arc::new(Balancer::new(
            "test".into(),
            Pool {
                backends: vec![Arc::clone(&a), Arc::clone(&b)],
                ..Pool::default()
            },
        ));
        let (relay_socket, relay) = bound().await;
        tokio::spawn(serve(relay_socket, Arc::clone(&balancer)));
        let (client, _) = bound().await;
        let (first, from) = ask(&client, relay, "q0").await;
        assert_eq!(
            from,
            SocketAddr::V4(relay),
            "replies come from the frontend"
        );
        let used = first.split_whitespace().next().expect("a name").to_string();
        for i in 1..10 {
            let (r, _) = ask(&client, relay, &format!("q{i}")).await;
            assert_eq!(r, format!("{used} q{i}"), "one flow, one backend");
        }
        // The used backend leaves: the flow moves to the other one.
        let (gone, other) = if used == "a" { (&a, &b) } else { (&b, &a) };
        balancer.swap(Pool {
            backends: vec![Arc::clone(other)],
            ..Pool::default()
        });
        gone.retire();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let other_name = if used == "a" { "b" } else { "a" };
        for i in 10..15 {
            let (r, _) = ask(&client, relay, &format!("q{i}")).await;
            assert_eq!(r, format!("{other_name} q{i}"));
        }
    }
}
