//! Rendering a [`DesiredState`] as one `nft -f` transaction that replaces `table ip kproxy`.
//!
//! The layout follows kube-proxy's nftables mode (KEP-3866):
//! - `services`: one lookup of `ip daddr . meta l4proto . th dport` in the verdict map
//!   `service-ips` (cluster IPs, external IPs, LoadBalancer IPs), and for destinations in the
//!   set `nodeport-ips` that are local (`fib daddr type local`) one lookup of
//!   `meta l4proto . th dport` in `service-nodeports`: the cost of a first packet does not
//!   grow with the number of Services.
//! - `svc-<hash>-<name>` per frontend: for the i-th of N endpoints
//!   `numgen random mod (N-i) == 0 goto ep-...`, the last one `goto ep-...` (each taken with
//!   probability 1/N; no anonymous map per Service: see [`balancing_rules`] why).
//! - `ep-<hash>-<name>` per endpoint of a frontend: the masquerade mark for hairpin (source
//!   is the endpoint) and for traffic from outside the cluster CIDR to an endpoint on another
//!   node, then `dnat to`.
//! - sessionAffinity ClientIP (as kube-proxy): each endpoint of such a frontend has a set
//!   `affinity-<hash>-<name>` (`flags dynamic,timeout; timeout <T>s`) of client addresses;
//!   the service chain first sends a source found in an endpoint's set to that endpoint
//!   (`ip saddr @set goto ep-...`), and the endpoint chain records its client
//!   (`update @set { ip saddr }`). The timeout is part of the set's name, so a changed
//!   timeout is a new set.
//! - loadBalancerSourceRanges (as kube-proxy): `firewall-check`, at priority -110 before
//!   DNAT in prerouting and output, looks the destination up in `firewall-ips` (LoadBalancer
//!   IPs) and `firewall-nodeports` and goes to a per-frontend `firewall-<hash>-<name>` chain
//!   that drops sources outside the ranges (plus the LoadBalancer IP itself when a node
//!   address is inside, for VIPs that loop back on the node).
//! - `nat-prerouting`/`nat-output` (dstnat) jump to `services`; `nat-postrouting` (srcnat)
//!   masquerades marked packets.
//! - `filter-input`/`filter-forward`/`filter-output` at priority -110 (dstnat - 10) reject (TCP reset,
//!   ICMP port unreachable) new connections to frontends without endpoints, through the
//!   verdict maps `no-endpoint-services` and `no-endpoint-nodeports`.
//!
//! `localhost:nodePort` is not served (that would need route_localnet).

use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr};

use crate::{
    dataplane::iptables::hash::{endpoint_identity, frontend_identity, hash},
    desired::{Backend, DesiredState, Frontend, FrontendKind, Protocol},
    netdev::Ipv4Cidr,
};

/// The table kproxy owns (family `ip`).
pub const TABLE: &str = "kproxy";

/// What the rendering depends on besides the desired state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderOptions {
    /// Pod range: traffic from outside it that goes to an endpoint on another node is
    /// masqueraded. Without it, all traffic to endpoints on other nodes is.
    pub cluster_cidr: Option<Ipv4Cidr>,
    /// The packet mark bit that asks for masquerading (kube-proxy's default is 14).
    pub masquerade_bit: u8,
}

impl Default for RenderOptions {
    fn default() -> Self {
        Self {
            cluster_cidr: None,
            masquerade_bit: 14,
        }
    }
}

fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

/// A readable suffix for chain names (nft identifiers allow `/`, `-`, `_`, `.`).
fn readable(f: &Frontend) -> String {
    let addr = match f.kind {
        FrontendKind::NodePort => "nodeport".to_string(),
        _ => f.address.to_string(),
    };
    format!(
        "{}/{}/{}/{}/{}",
        f.service.namespace,
        f.service.name,
        proto(f.protocol),
        addr,
        f.port
    )
}

pub fn service_chain(f: &Frontend) -> String {
    format!("svc-{}-{}", hash(&frontend_identity(f), 8), readable(f))
}

pub fn endpoint_chain(f: &Frontend, b: &Backend) -> String {
    format!(
        "ep-{}-{}__{}/{}",
        hash(&endpoint_identity(f, b), 8),
        readable(f),
        b.address,
        b.port
    )
}

/// The client-address set of endpoint `b` of a frontend with affinity `timeout` seconds.
pub fn affinity_set(f: &Frontend, b: &Backend, timeout: u32) -> String {
    format!(
        "affinity-{}-{}__{}/{}",
        hash(&format!("{}/{timeout}", endpoint_identity(f, b)), 8),
        readable(f),
        b.address,
        b.port
    )
}

pub fn firewall_chain(f: &Frontend) -> String {
    format!(
        "firewall-{}-{}",
        hash(&frontend_identity(f), 8),
        readable(f)
    )
}

/// The drop rule of a frontend's firewall chain: sources outside `ranges` (plus, when a node
/// address is inside one, the LoadBalancer IP itself, as kube-proxy does) are dropped.
pub(crate) fn firewall_allowed(
    f: &Frontend,
    ranges: &[crate::desired::Ipv4Cidr],
    node: &[Ipv4Addr],
) -> Vec<String> {
    let mut allowed: Vec<String> = ranges.iter().map(|r| r.to_string()).collect();
    let node_inside = ranges.iter().any(|r| node.iter().any(|a| r.contains(*a)));
    if node_inside && f.kind == FrontendKind::LoadBalancer {
        allowed.push(f.address.to_string());
    }
    allowed
}

/// The rules of a `firewall-` chain: allowed sources return (on to DNAT), the rest drop.
/// One rule per allowed range rather than `ip saddr != { ... } drop`: that anonymous set
/// would cost a walk of the whole transaction when bound (see [`balancing_rules`]).
fn firewall_rules(allowed: &[String]) -> Vec<String> {
    allowed
        .iter()
        .map(|a| format!("ip saddr {a} return"))
        .chain(std::iter::once("drop".to_string()))
        .collect()
}

pub(crate) fn network(c: &Ipv4Cidr) -> String {
    let mask = if c.prefix_len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(c.prefix_len))
    };
    let net = std::net::Ipv4Addr::from(u32::from(c.address) & mask);
    format!("{net}/{}", c.prefix_len)
}

/// The part of the table that does not depend on the desired state: sets, maps, helper and
/// base chains (after the table is created).
fn skeleton(opts: &RenderOptions) -> String {
    let t = format!("ip {TABLE}");
    let mark = 1u32 << opts.masquerade_bit;
    let mut s = String::new();
    let mut line = |l: String| {
        s.push_str(&l);
        s.push('\n');
    };
    // Sets and maps first: rules refer to them.
    line(format!("add set {t} nodeport-ips {{ type ipv4_addr ; }}"));
    for (name, key) in [
        ("service-ips", "ipv4_addr . inet_proto . inet_service"),
        ("service-nodeports", "inet_proto . inet_service"),
        (
            "no-endpoint-services",
            "ipv4_addr . inet_proto . inet_service",
        ),
        ("no-endpoint-nodeports", "inet_proto . inet_service"),
        ("firewall-ips", "ipv4_addr . inet_proto . inet_service"),
        ("firewall-nodeports", "inet_proto . inet_service"),
    ] {
        line(format!("add map {t} {name} {{ type {key} : verdict ; }}"));
    }

    // Helper chains.
    line(format!("add chain {t} reject-chain"));
    line(format!(
        "add rule {t} reject-chain meta l4proto tcp reject with tcp reset"
    ));
    line(format!("add rule {t} reject-chain reject"));
    line(format!("add chain {t} mark-for-masquerade"));
    line(format!(
        "add rule {t} mark-for-masquerade meta mark set meta mark or {mark:#x}"
    ));
    line(format!("add chain {t} masquerading"));
    line(format!(
        "add rule {t} masquerading meta mark & {mark:#x} == 0 return"
    ));
    line(format!(
        "add rule {t} masquerading meta mark set meta mark xor {mark:#x}"
    ));
    line(format!("add rule {t} masquerading masquerade fully-random"));
    line(format!("add chain {t} services"));
    line(format!(
        "add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips"
    ));
    line(format!(
        "add rule {t} services ip daddr @nodeport-ips fib daddr type local meta l4proto . th dport vmap @service-nodeports"
    ));
    line(format!("add chain {t} service-endpoints-check"));
    line(format!(
        "add rule {t} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services"
    ));
    line(format!("add chain {t} firewall-check"));
    line(format!(
        "add rule {t} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips"
    ));
    line(format!(
        "add rule {t} firewall-check ip daddr @nodeport-ips fib daddr type local meta l4proto . th dport vmap @firewall-nodeports"
    ));
    line(format!("add chain {t} nodeport-endpoints-check"));
    line(format!(
        "add rule {t} nodeport-endpoints-check ip daddr @nodeport-ips fib daddr type local meta l4proto . th dport vmap @no-endpoint-nodeports"
    ));

    // Base chains. Priorities as numbers (dstnat = -100, srcnat = 100): nft 1.0.6 accepts
    // the names only in some hooks.
    for (name, ty, hook, prio, jumps) in [
        (
            "nat-prerouting",
            "nat",
            "prerouting",
            "-100",
            &["services"][..],
        ),
        ("nat-output", "nat", "output", "-100", &["services"][..]),
        (
            "nat-postrouting",
            "nat",
            "postrouting",
            "100",
            &["masquerading"][..],
        ),
        (
            "filter-prerouting-pre-dnat",
            "filter",
            "prerouting",
            "-110",
            &["firewall-check"][..],
        ),
        (
            "filter-output-pre-dnat",
            "filter",
            "output",
            "-110",
            &["firewall-check"][..],
        ),
        (
            "filter-input",
            "filter",
            "input",
            "-110",
            &["nodeport-endpoints-check", "service-endpoints-check"][..],
        ),
        (
            "filter-forward",
            "filter",
            "forward",
            "-110",
            &["service-endpoints-check"][..],
        ),
        (
            "filter-output",
            "filter",
            "output",
            "-110",
            &["service-endpoints-check", "nodeport-endpoints-check"][..],
        ),
    ] {
        line(format!(
            "add chain {t} {name} {{ type {ty} hook {hook} priority {prio} ; policy accept ; }}"
        ));
        for j in jumps {
            let cond = if ty == "filter" { "ct state new " } else { "" };
            line(format!("add rule {t} {name} {cond}jump {j}"));
        }
    }

    s
}

/// What a desired state puts in the table besides the skeleton: the per-frontend and
/// per-endpoint chains (name -> rule bodies) and the elements of the sets and maps
/// (map -> key -> verdict, "" for set elements).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Model {
    /// Sets the chains use (name -> declaration): the affinity sets.
    pub sets: BTreeMap<String, String>,
    pub chains: BTreeMap<String, Vec<String>>,
    pub elements: BTreeMap<&'static str, BTreeMap<String, String>>,
}

pub const MAPS: [&str; 7] = [
    "nodeport-ips",
    "service-ips",
    "service-nodeports",
    "no-endpoint-services",
    "no-endpoint-nodeports",
    "firewall-ips",
    "firewall-nodeports",
];

/// The chains (and sets) of one frontend with endpoints: the service chain and an endpoint
/// chain per backend.
fn model_frontend(m: &mut Model, f: &Frontend, outside: Option<&str>) {
    let mut service_rules = Vec::new();
    if let Some(timeout) = f.affinity_timeout {
        for b in &f.backends {
            let set = affinity_set(f, b, timeout);
            m.sets.insert(
                set.clone(),
                format!("{{ type ipv4_addr ; flags dynamic,timeout ; timeout {timeout}s ; }}"),
            );
            service_rules.push(format!("ip saddr @{set} goto {}", endpoint_chain(f, b)));
        }
    }
    service_rules.extend(balancing_rules(f));
    m.chains.insert(service_chain(f), service_rules);
    for b in &f.backends {
        let mut rules = vec![format!("ip saddr {} jump mark-for-masquerade", b.address)];
        if !b.is_local {
            rules.push(format!("{}jump mark-for-masquerade", outside.unwrap_or("")));
        }
        if let Some(timeout) = f.affinity_timeout {
            rules.push(format!(
                "update @{} {{ ip saddr }}",
                affinity_set(f, b, timeout)
            ));
        }
        rules.push(format!(
            "meta l4proto {} dnat to {}:{}",
            proto(f.protocol),
            b.address,
            b.port
        ));
        m.chains.insert(endpoint_chain(f, b), rules);
    }
}

/// The rules that pick an endpoint at random: the i-th of n endpoints is taken with
/// probability 1/(n-i) when the rules before it were not (iptables' `statistic` cascade),
/// so each is taken with probability 1/n; the last one unconditionally.
///
/// Not kube-proxy's `numgen random mod n vmap { 0 : goto ..., ... }`: that anonymous map
/// is a set of its own, and the kernel, binding an anonymous set to its rule, walks the
/// whole transaction so far (`__nft_set_trans_bind`): quadratic in the size of a full
/// sync (10,000 Services x 10 endpoints took 300 s to program, with these rules ~10 s).
/// The cost of a first packet grows with the number of endpoints of its Service only.
fn balancing_rules(f: &Frontend) -> impl Iterator<Item = String> + '_ {
    let n = f.backends.len();
    f.backends.iter().enumerate().map(move |(i, b)| {
        let target = endpoint_chain(f, b);
        if i + 1 < n {
            format!("numgen random mod {} == 0 goto {target}", n - i)
        } else {
            format!("goto {target}")
        }
    })
}

/// The firewall chain and map element of a frontend with loadBalancerSourceRanges.
fn model_firewall(m: &mut Model, f: &Frontend, node: &[Ipv4Addr]) {
    let Some(ranges) = &f.source_ranges else {
        return;
    };
    let chain = firewall_chain(f);
    m.chains.insert(
        chain.clone(),
        firewall_rules(&firewall_allowed(f, ranges, node)),
    );
    let (map, key) = match f.kind {
        FrontendKind::NodePort => (
            "firewall-nodeports",
            format!("{} . {}", proto(f.protocol), f.port),
        ),
        _ => (
            "firewall-ips",
            format!("{} . {} . {}", f.address, proto(f.protocol), f.port),
        ),
    };
    m.elements
        .get_mut(map)
        .expect("map")
        .insert(key, format!("goto {chain}"));
}

pub fn model(desired: &DesiredState, opts: &RenderOptions) -> Model {
    let mut m = Model::default();
    for name in MAPS {
        m.elements.insert(name, BTreeMap::new());
    }
    let outside = opts
        .cluster_cidr
        .as_ref()
        .map(|c| format!("ip saddr != {} ", network(c)));
    for f in desired.frontends.iter().filter(|f| !f.backends.is_empty()) {
        model_frontend(&mut m, f, outside.as_deref());
    }
    for f in &desired.frontends {
        model_firewall(&mut m, f, &desired.nodeport_addresses);
    }
    let el = &mut m.elements;
    for a in &desired.nodeport_addresses {
        el.get_mut("nodeport-ips")
            .expect("map")
            .insert(a.to_string(), String::new());
    }
    for f in &desired.frontends {
        let (verdict, ips, nodeports) = if f.backends.is_empty() {
            (
                "goto reject-chain".to_string(),
                "no-endpoint-services",
                "no-endpoint-nodeports",
            )
        } else {
            (
                format!("goto {}", service_chain(f)),
                "service-ips",
                "service-nodeports",
            )
        };
        let (map, key) = match f.kind {
            FrontendKind::NodePort => (nodeports, format!("{} . {}", proto(f.protocol), f.port)),
            _ => (
                ips,
                format!("{} . {} . {}", f.address, proto(f.protocol), f.port),
            ),
        };
        el.get_mut(map).expect("map").insert(key, verdict);
    }
    m
}

fn element(key: &str, value: &str) -> String {
    if value.is_empty() {
        key.to_string()
    } else {
        format!("{key} : {value}")
    }
}

fn push_elements(s: &mut String, t: &str, verb: &str, map: &str, elems: &[String]) {
    if elems.is_empty() {
        return;
    }
    let _ = writeln!(s, "{verb} element {t} {map} {{");
    for (i, e) in elems.iter().enumerate() {
        let sep = if i + 1 < elems.len() { "," } else { "" };
        let _ = writeln!(s, "\t{e}{sep}");
    }
    s.push_str("}\n");
}

fn push_rules(s: &mut String, t: &str, chain: &str, rules: &[String]) {
    for r in rules {
        let _ = writeln!(s, "add rule {t} {chain} {r}");
    }
}

/// The full transaction: create-if-missing, delete, and re-create `table ip kproxy` with
/// everything `desired` needs. Applied with `nft -f -`, it is atomic.
pub fn render(desired: &DesiredState, opts: &RenderOptions) -> String {
    render_model(&model(desired, opts), opts)
}

/// [`render`] from a [`model`].
pub fn render_model(m: &Model, opts: &RenderOptions) -> String {
    let t = format!("ip {TABLE}");
    let mut s = format!("add table {t}\ndelete table {t}\nadd table {t}\n");
    s.push_str(&skeleton(opts));
    push_model(&mut s, &t, m);
    s
}

/// Everything of `m` into table `t` (family and name), whose skeleton is already there.
pub(crate) fn push_model(s: &mut String, t: &str, m: &Model) {
    for (name, decl) in &m.sets {
        let _ = writeln!(s, "add set {t} {name} {decl}");
    }
    // All chains before any rule: a vmap `goto` needs its target to exist.
    for name in m.chains.keys() {
        let _ = writeln!(s, "add chain {t} {name}");
    }
    for (name, rules) in &m.chains {
        push_rules(s, t, name, rules);
    }
    // Elements last: they refer to the chains.
    for (map, elems) in &m.elements {
        let elems: Vec<String> = elems.iter().map(|(k, v)| element(k, v)).collect();
        push_elements(s, t, "add", map, &elems);
    }
}

/// The transaction that moves the table from `prev` to `next` (both models of what is in
/// it), touching only what changed: new chains are added, changed ones flushed and
/// rewritten, gone ones flushed and deleted after the elements that pointed to them; map
/// elements that are gone or changed are deleted, new or changed ones added. `None` when
/// nothing changed. Applied with `nft -f -`, it is atomic too.
pub fn render_partial(prev: &Model, next: &Model) -> Option<String> {
    render_partial_in(&format!("ip {TABLE}"), prev, next)
}

/// [`render_partial`] for table `t` (family and name), e.g. `ip6 kproxy`.
pub(crate) fn render_partial_in(t: &str, prev: &Model, next: &Model) -> Option<String> {
    let mut s = String::new();
    for (name, decl) in next
        .sets
        .iter()
        .filter(|(n, _)| !prev.sets.contains_key(*n))
    {
        let _ = writeln!(s, "add set {t} {name} {decl}");
    }
    for name in next.chains.keys().filter(|n| !prev.chains.contains_key(*n)) {
        let _ = writeln!(s, "add chain {t} {name}");
    }
    let empty = BTreeMap::new();
    for map in MAPS {
        let p = prev.elements.get(map).unwrap_or(&empty);
        let n = next.elements.get(map).unwrap_or(&empty);
        let gone: Vec<String> = p
            .iter()
            .filter(|(k, v)| n.get(*k) != Some(*v))
            .map(|(k, _)| k.clone())
            .collect();
        push_elements(&mut s, t, "delete", map, &gone);
    }
    for (name, rules) in &next.chains {
        match prev.chains.get(name) {
            Some(old) if old == rules => {}
            Some(_) => {
                let _ = writeln!(s, "flush chain {t} {name}");
                push_rules(&mut s, t, name, rules);
            }
            None => push_rules(&mut s, t, name, rules),
        }
    }
    for map in MAPS {
        let p = prev.elements.get(map).unwrap_or(&empty);
        let n = next.elements.get(map).unwrap_or(&empty);
        let new: Vec<String> = n
            .iter()
            .filter(|(k, v)| p.get(*k) != Some(*v))
            .map(|(k, v)| element(k, v))
            .collect();
        push_elements(&mut s, t, "add", map, &new);
    }
    let gone: Vec<&String> = prev
        .chains
        .keys()
        .filter(|n| !next.chains.contains_key(*n))
        .collect();
    // Flush them all first: a gone service chain refers to gone endpoint chains.
    for name in &gone {
        let _ = writeln!(s, "flush chain {t} {name}");
    }
    for name in &gone {
        let _ = writeln!(s, "delete chain {t} {name}");
    }
    // Sets last: the rules that used them are rewritten or gone by now.
    for name in prev.sets.keys().filter(|n| !next.sets.contains_key(*n)) {
        let _ = writeln!(s, "delete set {t} {name}");
    }
    (!s.is_empty()).then_some(s)
}

/// The transaction that removes the table (succeeds whether or not it exists).
pub fn render_cleanup() -> String {
    format!("add table ip {TABLE}\ndelete table ip {TABLE}\n")
}

/// A small table using every feature [`render`] needs, for `nft --check` (probe).
pub fn render_probe() -> String {
    let t = "ip kproxy-probe";
    format!(
        "add table {t}\n\
         add map {t} m {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}\n\
         add set {t} aff {{ type ipv4_addr ; flags dynamic,timeout ; timeout 10800s ; }}\n\
         add chain {t} ep\n\
         add rule {t} ep update @aff {{ ip saddr }}\n\
         add rule {t} ep meta l4proto tcp dnat to 10.0.0.1:80\n\
         add chain {t} svc\n\
         add rule {t} svc ip saddr @aff goto ep\n\
         add rule {t} svc numgen random mod 2 == 0 goto ep\n\
         add chain {t} fw\n\
         add rule {t} fw ip saddr != {{ 192.0.2.0/24, 198.51.100.1 }} drop\n\
         add chain {t} pre {{ type nat hook prerouting priority -100 ; policy accept ; }}\n\
         add rule {t} pre ip daddr . meta l4proto . th dport vmap @m\n\
         add rule {t} pre fib daddr type local meta l4proto . th dport vmap {{ tcp . 1 : goto svc }}\n\
         add chain {t} post {{ type nat hook postrouting priority 100 ; policy accept ; }}\n\
         add rule {t} post meta mark & 0x4000 == 0 return\n\
         add rule {t} post masquerade fully-random\n\
         add chain {t} filt {{ type filter hook output priority -110 ; policy accept ; }}\n\
         add rule {t} filt ct state new meta l4proto tcp reject with tcp reset\n\
         add element {t} m {{ 10.96.0.1 . tcp . 80 : goto svc }}\n\
         delete table {t}\n"
    )
}
