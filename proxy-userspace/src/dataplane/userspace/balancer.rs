//! Choosing the backend of a new relayed connection or UDP session: random over the
//! frontend's backends, sticky per client IP with ClientIP affinity, and only for sources
//! inside `loadBalancerSourceRanges`. Apply swaps a frontend's whole [`Pool`] at once, so a
//! new connection sees either the old backend set or the new one, never a mix.

use std::{
    collections::{HashMap, hash_map::RandomState},
    hash::{BuildHasher as _, Hasher as _},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::watch;

use crate::desired::{Ipv4Cidr, Ipv6Cidr};

/// One `loadBalancerSourceRanges` entry, of the frontend's family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceRange {
    V4(Ipv4Cidr),
    V6(Ipv6Cidr),
}

impl SourceRange {
    /// Whether `ip` is inside (never across families).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self, ip) {
            (SourceRange::V4(c), IpAddr::V4(a)) => c.contains(a),
            (SourceRange::V6(c), IpAddr::V6(a)) => c.contains(a),
            _ => false,
        }
    }
}

/// One backend of a frontend. Connections and sessions relayed to it watch [`Self::retired`]
/// and close when apply removes the backend.
pub struct BackendHandle {
    pub address: SocketAddr,
    retired: watch::Sender<bool>,
}

impl BackendHandle {
    pub fn new(address: impl Into<SocketAddr>) -> Arc<Self> {
        Arc::new(Self {
            address: address.into(),
            retired: watch::Sender::new(false),
        })
    }

    /// Closes every connection and session relayed to this backend.
    pub fn retire(&self) {
        self.retired.send_replace(true);
    }

    /// Resolves once the backend is retired (at once if it already is).
    pub async fn wait_retired(&self) {
        let mut rx = self.retired.subscribe();
        // The sender lives as long as `self`, so this ends only on retirement.
        let _ = rx.wait_for(|retired| *retired).await;
    }
}

/// What a frontend serves now.
#[derive(Default)]
pub struct Pool {
    pub backends: Vec<Arc<BackendHandle>>,
    /// ClientIP affinity: how long a client's pick is kept after its last new connection.
    pub affinity_timeout: Option<Duration>,
    /// `None`: every source is served; `Some`: only sources inside one of these.
    pub source_ranges: Option<Vec<SourceRange>>,
    /// One of the node's addresses is inside `source_ranges`: connections the node makes to
    /// its own frontend address (whose source is that address) are allowed, as kube-proxy
    /// allows in-node connections then.
    pub node_in_ranges: bool,
}

/// When the affinity table is pruned of expired entries.
const AFFINITY_PRUNE_AT: usize = 4096;

/// The balancer of one frontend, shared by its listeners and connections.
pub struct Balancer {
    /// `namespace/name:port/PROTO kind address:port`, for logs.
    pub label: String,
    pool: RwLock<Arc<Pool>>,
    /// Client IP -> (backend, last time it was picked for that client).
    affinity: Mutex<HashMap<IpAddr, (SocketAddr, Instant)>>,
}

impl Balancer {
    pub fn new(label: String, pool: Pool) -> Self {
        Self {
            label,
            pool: RwLock::new(Arc::new(pool)),
            affinity: Mutex::default(),
        }
    }

    /// Replaces the pool; affinity picks of backends no longer in it are forgotten, and all
    /// of them when affinity is switched off.
    pub fn swap(&self, pool: Pool) {
        let affinity_on = pool.affinity_timeout.is_some();
        let kept: Vec<SocketAddr> = pool.backends.iter().map(|b| b.address).collect();
        if let Ok(mut p) = self.pool.write() {
            *p = Arc::new(pool);
        }
        if let Ok(mut a) = self.affinity.lock() {
            a.retain(|_, (b, _)| affinity_on && kept.contains(b));
        }
    }

    fn pool(&self) -> Arc<Pool> {
        self.pool.read().map(|p| Arc::clone(&p)).unwrap_or_default()
    }

    /// Whether `client` may use this frontend (`loadBalancerSourceRanges`) at `local`, the
    /// address it reached.
    pub fn admits(&self, client: IpAddr, local: IpAddr) -> bool {
        let pool = self.pool();
        match &pool.source_ranges {
            None => true,
            Some(ranges) => {
                ranges.iter().any(|r| r.contains(client))
                    || (client == local && pool.node_in_ranges)
            }
        }
    }

    /// The backend for a new flow from `client`, not one of `avoid` (backends that already
    /// failed to connect for this flow). `None` when no backend is left.
    pub fn pick(&self, client: IpAddr, avoid: &[SocketAddr]) -> Option<Arc<BackendHandle>> {
        let pool = self.pool();
        let usable: Vec<&Arc<BackendHandle>> = pool
            .backends
            .iter()
            .filter(|b| !avoid.contains(&b.address))
            .collect();
        if usable.is_empty() {
            return None;
        }
        let Some(timeout) = pool.affinity_timeout else {
            return Some(Arc::clone(usable[random_below(usable.len())]));
        };
        let now = Instant::now();
        let mut table = self.affinity.lock().ok()?;
        if let Some((addr, last)) = table.get(&client)
            && now.duration_since(*last) <= timeout
            && let Some(b) = usable.iter().find(|b| b.address == *addr)
        {
            let b = Arc::clone(b);
            table.insert(client, (b.address, now));
            return Some(b);
        }
        if table.len() >= AFFINITY_PRUNE_AT {
            table.retain(|_, (_, last)| now.duration_since(*last) <= timeout);
        }
        let b = Arc::clone(usable[random_below(usable.len())]);
        table.insert(client, (b.address, now));
        Some(b)
    }
}

/// A uniformly distributed index below `n` (> 0), from std's randomly keyed hasher.
fn random_below(n: usize) -> usize {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    (h.finish() % n as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4};

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    fn addr(last: u8) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, last), 8080))
    }

    fn pool(backends: &[u8], affinity: Option<u64>) -> Pool {
        Pool {
            backends: backends
                .iter()
                .map(|b| BackendHandle::new(addr(*b)))
                .collect(),
            affinity_timeout: affinity.map(Duration::from_secs),
            source_ranges: None,
            node_in_ranges: false,
        }
    }

    #[test]
    fn random_pick_uses_every_backend_and_skips_avoided_ones() {
        let b = Balancer::new("t".into(), pool(&[1, 2, 3], None));
        let client = v4(192, 0, 2, 1);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            seen.insert(b.pick(client, &[addr(2)]).expect("a backend").address);
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![addr(1), addr(3)]);
        assert!(b.pick(client, &[addr(1), addr(2), addr(3)]).is_none());
        b.swap(Pool::default());
        assert!(b.pick(client, &[]).is_none());
    }

    #[test]
    fn affinity_sticks_per_client_until_the_backend_goes() {
        let b = Balancer::new("t".into(), pool(&[1, 2, 3, 4], Some(60)));
        let first = b.pick(v4(192, 0, 2, 1), &[]).expect("a backend");
        for _ in 0..50 {
            let again = b.pick(v4(192, 0, 2, 1), &[]).expect("a backend");
            assert_eq!(again.address, first.address);
        }
        let others: std::collections::BTreeSet<_> = (2..60)
            .map(|c| b.pick(v4(192, 0, 2, c), &[]).expect("b").address)
            .collect();
        assert!(others.len() > 1, "other clients spread: {others:?}");
        // The picked backend leaves: the client moves and sticks to its new pick.
        let rest: Vec<u8> = [1, 2, 3, 4]
            .into_iter()
            .filter(|l| addr(*l) != first.address)
            .collect();
        b.swap(pool(&rest, Some(60)));
        let moved = b.pick(v4(192, 0, 2, 1), &[]).expect("a backend");
        assert_ne!(moved.address, first.address);
        for _ in 0..20 {
            let again = b.pick(v4(192, 0, 2, 1), &[]).expect("a backend");
            assert_eq!(again.address, moved.address);
        }
    }

    #[test]
    fn source_ranges_admit_only_their_sources() {
        let mut p = pool(&[1], None);
        p.source_ranges = Some(vec![SourceRange::V4(
            Ipv4Cidr::new(Ipv4Addr::new(198, 18, 0, 0), 24).expect("cidr"),
        )]);
        let vip = v4(203, 0, 113, 1);
        let b = Balancer::new("t".into(), p);
        assert!(b.admits(v4(198, 18, 0, 9), vip));
        assert!(!b.admits(v4(198, 19, 0, 9), vip));
        // The node reaching its own VIP: only when a node address is in range.
        assert!(!b.admits(vip, vip));
        let mut p = pool(&[1], None);
        p.source_ranges = Some(vec![]);
        p.node_in_ranges = true;
        b.swap(p);
        assert!(b.admits(vip, vip));
        assert!(!b.admits(v4(198, 18, 0, 9), vip));
        b.swap(pool(&[1], None));
        assert!(b.admits(v4(198, 19, 0, 9), vip));
    }

    #[tokio::test]
    async fn retiring_a_backend_wakes_its_watchers() {
        let h = BackendHandle::new(addr(1));
        let w = tokio::spawn({
            let h = Arc::clone(&h);
            async move { h.wait_retired().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!w.is_finished());
        h.retire();
        tokio::time::timeout(Duration::from_secs(5), w)
            .await
            .expect("woken")
            .expect("joined");
        // Already retired: resolves at once.
        tokio::time::timeout(Duration::from_secs(1), h.wait_retired())
            .await
            .expect("at once");
    }

    #[test]
    fn ipv6_source_ranges_and_affinity() {
        let six = |s: &str| IpAddr::V6(s.parse::<Ipv6Addr>().unwrap());
        let mut p = pool(&[1, 2, 3], Some(60));
        p.source_ranges = Some(vec![
            SourceRange::V6(Ipv6Cidr::new("fd00:198:18::".parse().unwrap(), 120).unwrap()),
            SourceRange::V4(Ipv4Cidr::new(Ipv4Addr::new(198, 18, 0, 0), 24).unwrap()),
        ]);
        let vip = six("fd00:198:51::30");
        let b = Balancer::new("t".into(), p);
        assert!(b.admits(six("fd00:198:18::7"), vip));
        assert!(!b.admits(six("fd00:198:18::1:7"), vip));
        // A range of the other family never matches (no v4-mapped shortcut).
        assert!(!b.admits(six("::ffff:198.18.0.9"), vip));
        let first = b.pick(six("fd00:198:18::7"), &[]).expect("a backend");
        for _ in 0..20 {
            let again = b.pick(six("fd00:198:18::7"), &[]).expect("a backend");
            assert_eq!(again.address, first.address);
        }
    }
}
