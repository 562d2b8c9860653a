//! Rendering the IPv6 frontends of a [`DesiredState`] as `table ip6 kproxy`: the same
//! structure as `table ip kproxy` (see `render.rs`: verdict maps keyed by address .
//! protocol . port, `numgen random`, masquerade marks, reject for frontends without
//! endpoints, per-endpoint dynamic timeout sets for sessionAffinity ClientIP, firewall
//! chains for loadBalancerSourceRanges) over `frontends6`, as the same [`Model`], so a
//! change is applied as a partial transaction that keeps the affinity sets' clients. The
//! IPv4 table is untouched by it.

use std::{collections::BTreeMap, net::Ipv6Addr};

use super::render::{MAPS, Model, push_model, render_partial_in};
use crate::{
    dataplane::iptables::hash::hash,
    desired::{Backend6, DesiredState, Frontend6, FrontendKind, Ipv6Cidr, Protocol},
};

/// `table ip6 kproxy`.
pub const TABLE6: &str = "ip6 kproxy";

fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

fn frontend_identity(f: &Frontend6) -> String {
    format!("{}:{:?}:[{}]:{}", f.service, f.kind, f.address, f.port)
}

fn endpoint_identity(f: &Frontend6, b: &Backend6) -> String {
    format!("{}->[{}]:{}", frontend_identity(f), b.address, b.port)
}

/// An IPv6 address inside an nft identifier, which allows no `:`: written with `.`.
fn ident_addr(a: &Ipv6Addr) -> String {
    a.to_string().replace(':', ".")
}

fn readable(f: &Frontend6) -> String {
    let addr = match f.kind {
        FrontendKind::NodePort => "nodeport".to_string(),
        _ => ident_addr(&f.address),
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

pub fn service_chain6(f: &Frontend6) -> String {
    format!("svc-{}-{}", hash(&frontend_identity(f), 8), readable(f))
}

pub fn endpoint_chain6(f: &Frontend6, b: &Backend6) -> String {
    format!(
        "ep-{}-{}__{}/{}",
        hash(&endpoint_identity(f, b), 8),
        readable(f),
        ident_addr(&b.address),
        b.port
    )
}

/// The client-address set of endpoint `b` of a frontend with affinity `timeout` seconds
/// (the timeout is part of the name: a changed timeout is a new set).
pub fn affinity_set6(f: &Frontend6, b: &Backend6, timeout: u32) -> String {
    format!(
        "affinity-{}-{}__{}/{}",
        hash(&format!("{}/{timeout}", endpoint_identity(f, b)), 8),
        readable(f),
        ident_addr(&b.address),
        b.port
    )
}

pub fn firewall_chain6(f: &Frontend6) -> String {
    format!(
        "firewall-{}-{}",
        hash(&frontend_identity(f), 8),
        readable(f)
    )
}

/// The sources a frontend with source `ranges` admits: the ranges, plus (as kube-proxy, for
/// VIPs that loop back on the node) the LoadBalancer IP itself when a node address is
/// inside one, so the node's own connections to it pass.
pub(crate) fn firewall_allowed6(
    f: &Frontend6,
    ranges: &[Ipv6Cidr],
    node: &[Ipv6Addr],
) -> Vec<String> {
    let mut allowed: Vec<String> = ranges.iter().map(|r| r.to_string()).collect();
    let node_inside = ranges.iter().any(|r| node.iter().any(|a| r.contains(*a)));
    if node_inside && f.kind == FrontendKind::LoadBalancer {
        allowed.push(f.address.to_string());
    }
    allowed
}

/// Sets, maps, helper and base chains: `render.rs`'s skeleton in the ip6 family.
fn skeleton6(s: &mut String, masquerade_bit: u8) {
    let t = TABLE6;
    let mark = 1u32 << masquerade_bit;
    let mut line = |l: String| {
        s.push_str(&l);
        s.push('\n');
    };
    line(format!("add set {t} nodeport-ips {{ type ipv6_addr ; }}"));
    for (name, key) in [
        ("service-ips", "ipv6_addr . inet_proto . inet_service"),
        ("service-nodeports", "inet_proto . inet_service"),
        (
            "no-endpoint-services",
            "ipv6_addr . inet_proto . inet_service",
        ),
        ("no-endpoint-nodeports", "inet_proto . inet_service"),
        ("firewall-ips", "ipv6_addr . inet_proto . inet_service"),
        ("firewall-nodeports", "inet_proto . inet_service"),
    ] {
        line(format!("add map {t} {name} {{ type {key} : verdict ; }}"));
    }
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
        "add rule {t} services ip6 daddr . meta l4proto . th dport vmap @service-ips"
    ));
    line(format!(
        "add rule {t} services ip6 daddr @nodeport-ips fib daddr type local meta l4proto . th dport vmap @service-nodeports"
    ));
    line(format!("add chain {t} service-endpoints-check"));
    line(format!(
        "add rule {t} service-endpoints-check ip6 daddr . meta l4proto . th dport vmap @no-endpoint-services"
    ));
    line(format!("add chain {t} firewall-check"));
    line(format!(
        "add rule {t} firewall-check ip6 daddr . meta l4proto . th dport vmap @firewall-ips"
    ));
    line(format!(
        "add rule {t} firewall-check ip6 daddr @nodeport-ips fib daddr type local meta l4proto . th dport vmap @firewall-nodeports"
    ));
    line(format!("add chain {t} nodeport-endpoints-check"));
    line(format!(
        "add rule {t} nodeport-endpoints-check ip6 daddr @nodeport-ips fib daddr type local meta l4proto . th dport vmap @no-endpoint-nodeports"
    ));
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
}

/// The chains and sets of one IPv6 frontend with endpoints: the service chain (affinity
/// lookups first, then `numgen random`) and an endpoint chain per backend.
fn model_frontend6(m: &mut Model, f: &Frontend6) {
    let mut service_rules = Vec::new();
    if let Some(timeout) = f.affinity_timeout {
        for b in &f.backends {
            let set = affinity_set6(f, b, timeout);
            m.sets.insert(
                set.clone(),
                format!("{{ type ipv6_addr ; flags dynamic,timeout ; timeout {timeout}s ; }}"),
            );
            service_rules.push(format!("ip6 saddr @{set} goto {}", endpoint_chain6(f, b)));
        }
    }
    let targets: Vec<String> = f
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| format!("{i} : goto {}", endpoint_chain6(f, b)))
        .collect();
    service_rules.push(format!(
        "numgen random mod {} vmap {{ {} }}",
        f.backends.len(),
        targets.join(", ")
    ));
    m.chains.insert(service_chain6(f), service_rules);
    for b in &f.backends {
        let mut rules = vec![format!("ip6 saddr {} jump mark-for-masquerade", b.address)];
        // No IPv6 cluster CIDR is known to tell pod traffic apart: everything to an
        // endpoint on another node is masqueraded (as IPv4 without --cluster-cidr).
        if !b.is_local {
            rules.push("jump mark-for-masquerade".to_string());
        }
        if let Some(timeout) = f.affinity_timeout {
            rules.push(format!(
                "update @{} {{ ip6 saddr }}",
                affinity_set6(f, b, timeout)
            ));
        }
        rules.push(format!(
            "meta l4proto {} dnat to [{}]:{}",
            proto(f.protocol),
            b.address,
            b.port
        ));
        m.chains.insert(endpoint_chain6(f, b), rules);
    }
}

/// The firewall chain and map element of an IPv6 frontend with loadBalancerSourceRanges.
fn model_firewall6(m: &mut Model, f: &Frontend6, node: &[Ipv6Addr]) {
    let Some(ranges) = &f.source_ranges else {
        return;
    };
    let allowed = firewall_allowed6(f, ranges, node);
    let rule = if allowed.is_empty() {
        "drop".to_string()
    } else {
        format!("ip6 saddr != {{ {} }} drop", allowed.join(", "))
    };
    let chain = firewall_chain6(f);
    m.chains.insert(chain.clone(), vec![rule]);
    let (map, key) = frontend_map_key(f, "firewall-ips", "firewall-nodeports");
    m.elements
        .get_mut(map)
        .expect("map")
        .insert(key, format!("goto {chain}"));
}

/// The map (of the two given: by address, or nodePorts) and key a frontend is found under.
fn frontend_map_key(
    f: &Frontend6,
    by_address: &'static str,
    nodeports: &'static str,
) -> (&'static str, String) {
    match f.kind {
        FrontendKind::NodePort => (nodeports, format!("{} . {}", proto(f.protocol), f.port)),
        _ => (
            by_address,
            format!("{} . {} . {}", f.address, proto(f.protocol), f.port),
        ),
    }
}

/// What `desired.frontends6` puts in `table ip6 kproxy` besides the skeleton.
pub fn model6(desired: &DesiredState) -> Model {
    let mut m = Model::default();
    for name in MAPS {
        m.elements.insert(name, BTreeMap::new());
    }
    for f in desired.frontends6.iter().filter(|f| !f.backends.is_empty()) {
        model_frontend6(&mut m, f);
    }
    for f in &desired.frontends6 {
        model_firewall6(&mut m, f, &desired.nodeport_addresses6);
    }
    for a in &desired.nodeport_addresses6 {
        m.elements
            .get_mut("nodeport-ips")
            .expect("map")
            .insert(a.to_string(), String::new());
    }
    for f in &desired.frontends6 {
        let (verdict, (map, key)) = if f.backends.is_empty() {
            (
                "goto reject-chain".to_string(),
                frontend_map_key(f, "no-endpoint-services", "no-endpoint-nodeports"),
            )
        } else {
            (
                format!("goto {}", service_chain6(f)),
                frontend_map_key(f, "service-ips", "service-nodeports"),
            )
        };
        m.elements.get_mut(map).expect("map").insert(key, verdict);
    }
    m
}

/// The whole `table ip6 kproxy` for `desired.frontends6`, as one transaction (create if
/// missing, delete, re-create).
pub fn render6(desired: &DesiredState, masquerade_bit: u8) -> String {
    render_model6(&model6(desired), masquerade_bit)
}

/// [`render6`] from a [`model6`].
pub fn render_model6(m: &Model, masquerade_bit: u8) -> String {
    let t = TABLE6;
    let mut s = format!("add table {t}\ndelete table {t}\nadd table {t}\n");
    skeleton6(&mut s, masquerade_bit);
    push_model(&mut s, t, m);
    s
}

/// The transaction from `prev` to `next` touching only what changed (see
/// `render::render_partial`); `None` when nothing did.
pub fn render_partial6(prev: &Model, next: &Model) -> Option<String> {
    render_partial_in(TABLE6, prev, next)
}

/// Removes `table ip6 kproxy` (succeeds whether or not it exists).
pub fn render_cleanup6() -> String {
    format!("add table {TABLE6}\ndelete table {TABLE6}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::ServicePortName;

    fn sample6() -> DesiredState {
        let spn = |name: &str| ServicePortName {
            namespace: "default".into(),
            name: name.into(),
            port: "http".into(),
            protocol: Protocol::Tcp,
        };
        let be = |a: &str, is_local| Backend6 {
            address: a.parse().unwrap(),
            port: 80,
            is_local,
        };
        let fe = |name: &str, kind, addr: &str, port, backends: Vec<Backend6>| Frontend6 {
            service: spn(name),
            kind,
            address: addr.parse().unwrap(),
            port,
            protocol: Protocol::Tcp,
            backends,
            affinity_timeout: None,
            source_ranges: None,
        };
        DesiredState {
            frontends6: vec![
                fe(
                    "web",
                    FrontendKind::NodePort,
                    "::",
                    30080,
                    vec![be("fd00:10:244:1::a", true), be("fd00:10:244:2::b", false)],
                ),
                fe(
                    "web",
                    FrontendKind::ClusterIp,
                    "fd00:10:96::a",
                    80,
                    vec![be("fd00:10:244:1::a", true), be("fd00:10:244:2::b", false)],
                ),
                fe(
                    "empty",
                    FrontendKind::ClusterIp,
                    "fd00:10:96::b",
                    80,
                    vec![],
                ),
                Frontend6 {
                    affinity_timeout: Some(10800),
                    ..fe(
                        "sticky",
                        FrontendKind::ClusterIp,
                        "fd00:10:96::c",
                        80,
                        vec![be("fd00:10:244:1::a", true), be("fd00:10:244:2::b", false)],
                    )
                },
                Frontend6 {
                    source_ranges: Some(guarded_ranges()),
                    ..fe(
                        "guarded",
                        FrontendKind::LoadBalancer,
                        "fd00:198:51::1",
                        80,
                        vec![be("fd00:10:244:1::a", true)],
                    )
                },
                Frontend6 {
                    source_ranges: Some(guarded_ranges()),
                    ..fe(
                        "guarded",
                        FrontendKind::NodePort,
                        "::",
                        30090,
                        vec![be("fd00:10:244:1::a", true)],
                    )
                },
            ],
            nodeport_addresses6: vec!["fd00:198:18::1".parse().unwrap()],
            ..DesiredState::default()
        }
    }

    /// A client range, and the node's own range (so the LoadBalancer IP itself is allowed).
    fn guarded_ranges() -> Vec<Ipv6Cidr> {
        vec![
            Ipv6Cidr::new("2001:db8:1::".parse().unwrap(), 64).unwrap(),
            Ipv6Cidr::new("fd00:198:18::".parse().unwrap(), 64).unwrap(),
        ]
    }

    #[test]
    fn ip6_affinity_sets_per_endpoint() {
        let text = render6(&sample6(), 14);
        let sets: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("add set ip6 kproxy affinity-"))
            .collect();
        assert_eq!(sets.len(), 2, "one set per endpoint of the sticky frontend");
        for set in &sets {
            assert!(
                set.ends_with("{ type ipv6_addr ; flags dynamic,timeout ; timeout 10800s ; }"),
                "{set}"
            );
            assert!(set.contains("-default/sticky/"), "{set}");
        }
        assert_eq!(text.matches("update @affinity-").count(), 2);
        assert!(text.contains("{ ip6 saddr }"));
        let svc = text
            .lines()
            .filter(|l| l.contains(" svc-") && l.contains("sticky") && l.contains("add rule"))
            .collect::<Vec<_>>();
        assert_eq!(svc.len(), 3, "two affinity lookups, then numgen: {svc:?}");
        assert!(svc[0].contains("ip6 saddr @affinity-"), "{}", svc[0]);
        assert!(svc[2].contains("numgen random mod 2"), "{}", svc[2]);
    }

    #[test]
    fn ip6_source_ranges_firewall_chains() {
        let text = render6(&sample6(), 14);
        let fw: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("add rule ip6 kproxy firewall-") && l.contains("guarded"))
            .collect();
        assert_eq!(fw.len(), 2, "LoadBalancer and nodePort: {fw:?}");
        // The LoadBalancer IP itself is allowed (a node address is in range), only there.
        let lb = fw.iter().find(|l| !l.contains("nodeport")).unwrap();
        assert!(
            lb.ends_with("ip6 saddr != { 2001:db8:1::/64, fd00:198:18::/64, fd00:198:51::1 } drop"),
            "{lb}"
        );
        let np = fw.iter().find(|l| l.contains("nodeport")).unwrap();
        assert!(
            np.ends_with("ip6 saddr != { 2001:db8:1::/64, fd00:198:18::/64 } drop"),
            "{np}"
        );
        assert!(text.contains("fd00:198:51::1 . tcp . 80 : goto firewall-"));
        assert!(text.contains(
            "add element ip6 kproxy firewall-nodeports {\n\ttcp . 30090 : goto firewall-"
        ));
        assert!(text.contains("add chain ip6 kproxy filter-prerouting-pre-dnat { type filter hook prerouting priority -110 ;"));
    }

    #[test]
    fn ip6_partial_keeps_affinity_sets_of_unchanged_endpoints() {
        let before = sample6();
        assert_eq!(render_partial6(&model6(&before), &model6(&before)), None);
        let mut after = before.clone();
        let sticky = after
            .frontends6
            .iter_mut()
            .find(|f| f.service.name == "sticky")
            .unwrap();
        sticky.backends.pop();
        let text = render_partial6(&model6(&before), &model6(&after)).unwrap();
        assert!(!text.contains("delete table"), "{text}");
        assert_eq!(
            text.matches("delete set ip6 kproxy affinity-").count(),
            1,
            "only the removed endpoint's set goes:\n{text}"
        );
        assert!(!text.contains("add set"), "{text}");
    }

    #[test]
    fn ip6_table_golden() {
        crate::dataplane::nftables::check_golden("nftables6_full.nft", &render6(&sample6(), 14));
    }

    #[test]
    fn ip6_table_has_the_ip_table_structure() {
        let text = render6(&sample6(), 14);
        assert!(text.starts_with("add table ip6 kproxy\ndelete table ip6 kproxy\n"));
        assert!(text.contains("\tfd00:10:96::a . tcp . 80 : goto svc-"));
        assert!(text.contains(
            "add element ip6 kproxy no-endpoint-services {\n\tfd00:10:96::b . tcp . 80 : goto reject-chain\n}"
        ));
        assert!(text.contains("\ttcp . 30080 : goto svc-"));
        assert!(text.contains("dnat to [fd00:10:244:2::b]:80"));
        assert!(
            !text.contains("ip daddr"),
            "no IPv4 matches in the ip6 table"
        );
        // Chain names are nft identifiers: no ':' in them.
        for l in text.lines().filter(|l| l.starts_with("add chain")) {
            assert!(!l.contains(':') || l.contains('{'), "{l}");
        }
    }
}
