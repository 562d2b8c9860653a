//! Real-kernel tests of the nftables and iptables dataplanes and the conntrack flush: each
//! runs in a fresh, uniquely named network namespace (deleted by a Drop guard), from a thread
//! that entered it, so the `nft`/`iptables-restore` processes and netlink sockets the code
//! opens act on that namespace only. Needs root; skipped (with a message) otherwise.

use std::{
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
};

use kproxy::{
    dataplane::{
        Dataplane as _,
        conntrack_flush::{self, StaleUdp},
        iptables::{self, IptablesDataplane, IptablesSettings},
        nftables::{self, NftablesDataplane, NftablesSettings, RenderOptions},
    },
    desired::{Backend, DesiredState, Frontend, FrontendKind, Ipv4Cidr, Protocol, ServicePortName},
};

struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Netns {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "kpx-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip netns add");
        assert!(st.success(), "ip netns add {name}");
        Netns { name }
    }

    /// Runs `f` on a thread that has entered the namespace.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = std::fs::File::open(&path).expect("open netns");
                // SAFETY: setns on a valid netns fd; affects this thread only.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("netns thread panicked")
        })
    }

    /// Runs a command in the namespace; returns its stdout (panics on failure).
    fn sh(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .expect("ip netns exec");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let ok = unsafe { libc::geteuid() } == 0;
    if !ok {
        eprintln!("skipped: needs root (network namespaces, netfilter)");
    }
    ok
}

fn spn(name: &str, protocol: Protocol) -> ServicePortName {
    ServicePortName {
        namespace: "default".into(),
        name: name.into(),
        port: "p".into(),
        protocol,
    }
}

fn be(a: &str, port: u16, is_local: bool) -> Backend {
    Backend {
        address: a.parse().unwrap(),
        port,
        is_local,
    }
}

fn fe(
    name: &str,
    kind: FrontendKind,
    addr: &str,
    port: u16,
    protocol: Protocol,
    backends: Vec<Backend>,
) -> Frontend {
    Frontend {
        service: spn(name, protocol),
        kind,
        address: addr.parse().unwrap(),
        port,
        protocol,
        backends,
        affinity_timeout: None,
        source_ranges: None,
    }
}

fn cidr(a: &str, len: u8) -> Ipv4Cidr {
    Ipv4Cidr::new(a.parse().unwrap(), len).unwrap()
}

/// ClusterIP + NodePort with a local and a remote endpoint, a Service without endpoints, a
/// UDP Service with ClientIP affinity, an external IP, a LoadBalancer IP with source ranges.
fn state() -> DesiredState {
    let web = vec![be("10.244.1.5", 8080, true), be("10.244.2.7", 8080, false)];
    let mut frontends = vec![
        fe(
            "web",
            FrontendKind::ClusterIp,
            "10.96.0.10",
            80,
            Protocol::Tcp,
            web.clone(),
        ),
        fe(
            "web",
            FrontendKind::NodePort,
            "0.0.0.0",
            30080,
            Protocol::Tcp,
            web.clone(),
        ),
        fe(
            "web",
            FrontendKind::ExternalIp,
            "203.0.113.10",
            80,
            Protocol::Tcp,
            web,
        ),
        Frontend {
            source_ranges: Some(vec![cidr("192.0.2.0", 24)]),
            ..fe(
                "web",
                FrontendKind::LoadBalancer,
                "198.51.100.20",
                80,
                Protocol::Tcp,
                vec![be("10.244.1.5", 8080, true)],
            )
        },
        fe(
            "empty",
            FrontendKind::ClusterIp,
            "10.96.0.20",
            443,
            Protocol::Tcp,
            vec![],
        ),
        fe(
            "empty",
            FrontendKind::NodePort,
            "0.0.0.0",
            30443,
            Protocol::Tcp,
            vec![],
        ),
        Frontend {
            affinity_timeout: Some(10800),
            ..fe(
                "dns",
                FrontendKind::ClusterIp,
                "10.96.0.53",
                53,
                Protocol::Udp,
                vec![be("10.244.1.9", 5353, true), be("10.244.3.9", 5353, false)],
            )
        },
        fe(
            "sctp",
            FrontendKind::ClusterIp,
            "10.96.0.99",
            9999,
            Protocol::Sctp,
            vec![be("10.244.1.10", 9999, true)],
        ),
    ];
    frontends.sort_by_key(|f| f.key());
    DesiredState {
        frontends,
        nodeport_addresses: vec![Ipv4Addr::new(192, 168, 1, 1)],
        ..DesiredState::default()
    }
}

/// The state after churn: the remote DNS endpoint gone and its affinity timeout changed, a
/// web endpoint added, a source range added, the SCTP Service deleted.
fn state2() -> DesiredState {
    let mut d = state();
    d.frontends.retain(|f| f.service.name != "sctp");
    for f in &mut d.frontends {
        if f.service.name == "dns" {
            f.backends
                .retain(|b| b.address != Ipv4Addr::new(10, 244, 3, 9));
            f.affinity_timeout = Some(60);
        }
        if f.kind == FrontendKind::LoadBalancer {
            f.source_ranges = Some(vec![cidr("192.0.2.0", 24), cidr("198.18.0.0", 16)]);
        }
        if f.service.name == "web" && f.kind == FrontendKind::ClusterIp {
            f.backends.push(be("10.244.4.4", 8080, false));
        }
    }
    d
}

fn opts() -> RenderOptions {
    RenderOptions {
        cluster_cidr: Some("10.244.0.0/16".parse().unwrap()),
        masquerade_bit: 14,
    }
}

#[test]
fn nftables_applies_atomically_and_cleans_up() {
    if !root() {
        return;
    }
    let ns = Netns::new("nft");
    ns.run(|| {
        nftables::probe().expect("probe");
        let mut dp = NftablesDataplane::new(NftablesSettings { render: opts() }).expect("new");
        dp.apply(&state(), true).expect("first apply");
        dp.apply(&state2(), false).expect("second apply (partial)");
        let partial = tokens(&ns.sh(&["nft", "list", "table", "ip", "kproxy"]));
        // Unchanged: nothing to do.
        assert_eq!(
            dp.apply(&state2(), false).expect("same"),
            Default::default()
        );
        // A full apply over what is there replaces it, with the same result as the partial.
        dp.apply(&state2(), true).expect("full apply");
        let full = tokens(&ns.sh(&["nft", "list", "table", "ip", "kproxy"]));
        assert_eq!(partial, full);
        // And back, partially, to the first state: the same as the first state in full.
        dp.apply(&state(), false).expect("partial back");
        let back = tokens(&ns.sh(&["nft", "list", "table", "ip", "kproxy"]));
        dp.apply(&state(), true).expect("full");
        assert_eq!(
            back,
            tokens(&ns.sh(&["nft", "list", "table", "ip", "kproxy"]))
        );
        dp.apply(&state2(), false).expect("partial again");
    });
    let table = ns.sh(&["nft", "list", "table", "ip", "kproxy"]);
    assert!(table.contains("10.244.4.4"), "{table}");
    assert!(!table.contains("10.244.3.9"), "{table}");
    assert!(!table.contains("sctp"), "{table}");
    assert!(table.contains("numgen random mod 3"), "{table}");
    assert!(table.contains("fib daddr type local"), "{table}");
    assert!(table.contains("30443 : goto reject-chain"), "{table}");
    // Affinity: one set per remaining DNS endpoint, with the new timeout; source ranges.
    assert_eq!(table.matches("flags dynamic,timeout").count(), 1, "{table}");
    assert!(table.contains("timeout 1m"), "{table}");
    assert!(table.contains("update @affinity-"), "{table}");
    // One `return` per allowed range, then the drop (no anonymous set: binding one per
    // Service made large transactions quadratic in the kernel).
    assert!(table.contains("ip saddr 192.0.2.0/24 return"), "{table}");
    assert!(table.contains("ip saddr 198.18.0.0/16 return"), "{table}");
    // The whole table is one generation: one table, no leftovers.
    let tables = ns.sh(&["nft", "list", "tables"]);
    assert_eq!(tables.trim(), "table ip kproxy");

    ns.run(|| {
        assert!(nftables::cleanup().expect("cleanup"));
        assert!(nftables::cleanup().expect("cleanup twice"));
    });
    let ruleset = ns.sh(&["nft", "list", "ruleset"]);
    assert!(!ruleset.contains("kproxy"), "{ruleset}");
}

#[test]
fn nftables_failed_transaction_leaves_previous_rules() {
    if !root() {
        return;
    }
    let ns = Netns::new("nftatomic");
    ns.run(|| {
        let mut dp = NftablesDataplane::new(NftablesSettings { render: opts() }).expect("new");
        dp.apply(&state(), true).expect("apply");
    });
    let before = ns.sh(&["nft", "list", "table", "ip", "kproxy"]);
    // A transaction that replaces the table but fails half-way is rolled back whole.
    let bad = "add table ip kproxy\ndelete table ip kproxy\nadd table ip kproxy\nadd chain ip kproxy x\nadd rule ip kproxy x goto does-not-exist\n";
    let st = Command::new("ip")
        .args(["netns", "exec", &ns.name, "sh", "-c"])
        .arg(format!("printf '{bad}' | nft -f -"))
        .status()
        .unwrap();
    assert!(!st.success());
    let after = ns.sh(&["nft", "list", "table", "ip", "kproxy"]);
    assert_eq!(before, after);
}

/// The words of an `nft list` output, sorted: equal for equal tables whatever the order in
/// which their chains and elements were added.
fn tokens(listing: &str) -> Vec<String> {
    let mut v: Vec<String> = listing
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

fn kproxy_chains(ns: &Netns) -> Vec<String> {
    let save = ns.sh(&["iptables-save"]);
    let mut v: Vec<String> = save
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter(|l| l.starts_with("KPROXY-"))
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn iptables_full_partial_and_cleanup() {
    if !root() {
        return;
    }
    let ns = Netns::new("ipt");
    let (r1, r2) = ns.run(|| {
        iptables::probe().expect("probe");
        let mut dp = IptablesDataplane::new(IptablesSettings { render: opts() }).expect("new");
        let s1 = dp.apply(&state(), true).expect("full apply");
        let partial = dp.plan(&state2(), false);
        let s2 = dp.apply(&state2(), false).expect("partial apply");
        assert_eq!(s2.writes, partial.written);
        assert_eq!(s2.deletes, partial.deleted);
        (s1, s2)
    });
    // The partial sync wrote fewer chains than the full one and deleted the SCTP service's
    // two chains and the removed DNS endpoint's.
    assert!(r2.writes < r1.writes, "{r1:?} {r2:?}");
    assert_eq!(r2.deletes, 3, "{r2:?}");
    let want = {
        let r = iptables::render::render(&state2(), &opts());
        let mut v: Vec<String> = r
            .filter
            .keys()
            .chain(r.nat.keys())
            .map(|s| s.to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(kproxy_chains(&ns), want);
    let save = ns.sh(&["iptables-save", "-t", "nat"]);
    assert!(save.contains("10.244.4.4:8080"), "{save}");
    assert!(!save.contains("10.244.3.9"), "{save}");
    assert!(
        save.contains(
            "-A PREROUTING -m comment --comment \"kproxy service portals\" -j KPROXY-SERVICES"
        ),
        "{save}"
    );
    assert!(save.contains("--probability 0.33333"), "{save}");
    assert!(save.contains("--rcheck --seconds 60 --reap"), "{save}");
    // iptables-save lists matches in its own order.
    assert!(
        save.lines()
            .any(|l| l.starts_with("-A KPROXY-FW-") && l.contains("-s 198.18.0.0/16")),
        "{save}"
    );
    let filter = ns.sh(&["iptables-save", "-t", "filter"]);
    assert!(
        filter
            .lines()
            .any(|l| l.starts_with("-A KPROXY-FIREWALL -d 198.51.100.20/32")
                && l.contains("--dport 80 -j DROP")),
        "{filter}"
    );

    // A stray chain of ours (from an older run) is deleted by a full sync.
    ns.sh(&["iptables", "-t", "nat", "-N", "KPROXY-SVC-STALESTALESTALE"]);
    ns.run(|| {
        let mut dp = IptablesDataplane::new(IptablesSettings { render: opts() }).expect("new");
        dp.apply(&state2(), true).expect("full apply");
        // The base jumps are not duplicated by a second full sync.
        dp.apply(&state2(), true).expect("full apply again");
    });
    assert_eq!(kproxy_chains(&ns), want);
    let save = ns.sh(&["iptables-save", "-t", "nat"]);
    assert_eq!(
        save.matches("-A PREROUTING -m comment --comment \"kproxy service portals\"")
            .count(),
        1,
        "{save}"
    );

    ns.run(|| {
        assert!(iptables::cleanup().expect("cleanup") > 0);
        assert_eq!(iptables::cleanup().expect("cleanup twice"), 0);
    });
    let save = ns.sh(&["iptables-save"]);
    assert!(!save.contains("KPROXY-"), "{save}");
}

#[test]
fn conntrack_flush_deletes_stale_udp_entries() {
    if !root() {
        return;
    }
    let ns = Netns::new("ct");
    let insert = |sport: &str, dst: &str, dport: &str, rsrc: &str, rsport: &str, proto: &str| {
        ns.sh(&[
            "conntrack",
            "-I",
            "-p",
            proto,
            "-s",
            "10.0.5.5",
            "-d",
            dst,
            "--sport",
            sport,
            "--dport",
            dport,
            "-r",
            rsrc,
            "-q",
            "10.0.5.5",
            "--reply-port-src",
            rsport,
            "--reply-port-dst",
            sport,
            "-t",
            "100",
        ]);
    };
    // NATed to the endpoint that goes away: deleted.
    insert("40000", "10.96.0.53", "53", "10.244.3.9", "5353", "udp");
    // NATed to the endpoint that stays: kept.
    insert("40001", "10.96.0.53", "53", "10.244.1.9", "5353", "udp");
    // A nodePort flow to the endpoint that goes away: deleted.
    insert("40002", "192.168.1.1", "30053", "10.244.3.9", "5353", "udp");
    // Un-NATed entry of a frontend that had no endpoints and now has: deleted.
    insert("40003", "10.96.0.54", "53", "10.96.0.54", "53", "udp");
    // Other traffic: kept.
    insert("40004", "10.1.1.1", "53", "10.1.1.1", "53", "udp");
    let old = DesiredState {
        frontends: vec![
            fe(
                "dns",
                FrontendKind::NodePort,
                "0.0.0.0",
                30053,
                Protocol::Udp,
                vec![be("10.244.1.9", 5353, true), be("10.244.3.9", 5353, false)],
            ),
            fe(
                "dns",
                FrontendKind::ClusterIp,
                "10.96.0.53",
                53,
                Protocol::Udp,
                vec![be("10.244.1.9", 5353, true), be("10.244.3.9", 5353, false)],
            ),
            fe(
                "dns2",
                FrontendKind::ClusterIp,
                "10.96.0.54",
                53,
                Protocol::Udp,
                vec![],
            ),
        ],
        nodeport_addresses: vec![Ipv4Addr::new(192, 168, 1, 1)],
        ..DesiredState::default()
    };
    let mut new = old.clone();
    for f in &mut new.frontends {
        f.backends = vec![be("10.244.1.9", 5353, true)];
    }
    let stale = StaleUdp::between(&old, &new);
    let deleted = ns.run(|| conntrack_flush::flush(&stale).expect("flush"));
    assert_eq!(deleted, 3);
    let list = ns.sh(&["conntrack", "-L"]);
    let mut sports: Vec<&str> = list
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("sport=")))
        .collect();
    sports.sort();
    assert_eq!(sports, ["sport=40001", "sport=40004"], "{list}");
    // Nothing left to match: a second flush deletes nothing.
    assert_eq!(ns.run(|| conntrack_flush::flush(&stale).expect("flush")), 0);
}

/// A client, a node and a pod namespace on veths: client 192.168.1.100 — node 192.168.1.1
/// and 10.244.1.1 — pod 10.244.1.5 (a TCP server on 8080 that answers with the peer
/// address it sees).
struct Topology {
    client: Netns,
    node: Netns,
    pod: Netns,
}

impl Topology {
    fn new(tag: &str) -> Topology {
        let t = Topology {
            client: Netns::new(&format!("{tag}c")),
            node: Netns::new(&format!("{tag}n")),
            pod: Netns::new(&format!("{tag}p")),
        };
        let (c, n, p) = (&t.client.name, &t.node.name, &t.pod.name);
        for args in [
            vec![
                "ip",
                "link",
                "add",
                "to-client",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                c,
            ],
            vec![
                "ip", "link", "add", "to-pod", "type", "veth", "peer", "name", "eth0", "netns", p,
            ],
            vec!["ip", "addr", "add", "192.168.1.1/24", "dev", "to-client"],
            vec!["ip", "addr", "add", "10.244.1.1/24", "dev", "to-pod"],
            vec!["ip", "link", "set", "lo", "up"],
            vec!["ip", "link", "set", "to-client", "up"],
            vec!["ip", "link", "set", "to-pod", "up"],
            // Cluster IPs are routed somewhere (as on a real node), so that local
            // connections to them get through routing to the nat output hook.
            vec!["ip", "route", "add", "10.96.0.0/12", "dev", "to-client"],
            vec!["sysctl", "-qw", "net.ipv4.ip_forward=1"],
        ] {
            t.node.sh(&args);
        }
        for (ns, addr, gw) in [
            (&t.client, "192.168.1.100/24", "192.168.1.1"),
            (&t.pod, "10.244.1.5/24", "10.244.1.1"),
        ] {
            ns.sh(&["ip", "addr", "add", addr, "dev", "eth0"]);
            ns.sh(&["ip", "link", "set", "lo", "up"]);
            ns.sh(&["ip", "link", "set", "eth0", "up"]);
            ns.sh(&["ip", "route", "add", "default", "via", gw]);
        }
        let _ = n;
        // The pod's server: runs until the process exits.
        let path = format!("/run/netns/{}", t.pod.name);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open netns");
            // SAFETY: setns on a valid netns fd; affects this thread only.
            assert_eq!(
                unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            let l = std::net::TcpListener::bind("0.0.0.0:8080").expect("bind");
            tx.send(()).unwrap();
            for s in l.incoming().flatten() {
                use std::io::Write as _;
                let mut s = s;
                let _ = write!(
                    s,
                    "{}",
                    s.peer_addr()
                        .map(|a| a.ip().to_string())
                        .unwrap_or_default()
                );
            }
        });
        rx.recv().unwrap();
        t
    }
}

/// Connects from `ns` to `addr`; the server's answer (the source it saw), or the error.
fn connect(ns: &Netns, addr: &str) -> Result<String, std::io::ErrorKind> {
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    ns.run(|| {
        use std::io::Read as _;
        let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(3))
            .map_err(|e| e.kind())?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(3)))
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(|e| e.kind())?;
        Ok(out)
    })
}

fn traffic_state() -> DesiredState {
    let web = vec![be("10.244.1.5", 8080, true)];
    let mut frontends = vec![
        fe(
            "web",
            FrontendKind::ClusterIp,
            "10.96.0.10",
            80,
            Protocol::Tcp,
            web.clone(),
        ),
        fe(
            "web",
            FrontendKind::NodePort,
            "0.0.0.0",
            30080,
            Protocol::Tcp,
            web,
        ),
        fe(
            "empty",
            FrontendKind::ClusterIp,
            "10.96.0.20",
            443,
            Protocol::Tcp,
            vec![],
        ),
        fe(
            "empty",
            FrontendKind::NodePort,
            "0.0.0.0",
            30443,
            Protocol::Tcp,
            vec![],
        ),
    ];
    frontends.sort_by_key(|f| f.key());
    DesiredState {
        frontends,
        nodeport_addresses: vec![Ipv4Addr::new(192, 168, 1, 1)],
        ..DesiredState::default()
    }
}

/// The basic behaviours through real packets, for both modes: a host process reaches a
/// cluster IP; a client reaches a nodePort with its source address preserved (local
/// endpoint); hairpin (the pod reaches itself through the cluster IP, masqueraded);
/// frontends without endpoints refuse; after cleanup nothing is served.
fn traffic(mode: &str) {
    let t = Topology::new(mode);
    t.node.run(|| {
        let mut dp: Box<dyn kproxy::dataplane::Dataplane> = if mode == "nft" {
            Box::new(NftablesDataplane::new(NftablesSettings { render: opts() }).unwrap())
        } else {
            Box::new(IptablesDataplane::new(IptablesSettings { render: opts() }).unwrap())
        };
        dp.apply(&traffic_state(), true).expect("apply");
    });
    // The host's own source address (routed via to-client), not masqueraded: local endpoint.
    assert_eq!(connect(&t.node, "10.96.0.10:80"), Ok("192.168.1.1".into()));
    assert_eq!(
        connect(&t.client, "192.168.1.1:30080"),
        Ok("192.168.1.100".into())
    );
    assert_eq!(
        connect(&t.pod, "10.96.0.10:80"),
        Ok("10.244.1.1".into()),
        "hairpin"
    );
    assert_eq!(
        connect(&t.client, "192.168.1.1:30443"),
        Err(std::io::ErrorKind::ConnectionRefused)
    );
    assert_eq!(
        connect(&t.node, "10.96.0.20:443"),
        Err(std::io::ErrorKind::ConnectionRefused)
    );
    t.node.run(|| {
        if mode == "nft" {
            nftables::cleanup().unwrap();
        } else {
            iptables::cleanup().unwrap();
        }
    });
    assert!(connect(&t.client, "192.168.1.1:30080").is_err());
}

#[test]
fn nftables_traffic() {
    if root() {
        traffic("nft");
    }
}

#[test]
fn iptables_traffic() {
    if root() {
        traffic("ipt");
    }
}
