//! Rendering the IPv6 frontends of a [`DesiredState`] as one `nft -f` transaction that
//! replaces `table ip6 kproxy`: the same structure as `table ip kproxy` (see `render.rs`:
//! verdict maps keyed by address . protocol . port, `numgen random`, masquerade marks,
//! reject for frontends without endpoints), over `frontends6`. Always a full replacement
//! (one transaction, atomic); the IPv4 table is untouched by it.

use std::fmt::Write as _;

use crate::{
    dataplane::iptables::hash::hash,
    desired::{Backend6, DesiredState, Frontend6, FrontendKind, Protocol},
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

/// An IPv6 address inside an nft identifier, which allows no `:`: written with `.`.
fn ident_addr(a: &std::net::Ipv6Addr) -> String {
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
    let id = format!("{}->[{}]:{}", frontend_identity(f), b.address, b.port);
    format!(
        "ep-{}-{}__{}/{}",
        hash(&id, 8),
        readable(f),
        ident_addr(&b.address),
        b.port
    )
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

fn push_elements(s: &mut String, map: &str, elems: &[String]) {
    if elems.is_empty() {
        return;
    }
    let _ = writeln!(s, "add element {TABLE6} {map} {{ {} }}", elems.join(", "));
}

/// The whole `table ip6 kproxy` for `desired.frontends6`, as one transaction (create if
/// missing, delete, re-create). Endpoints on other nodes are masqueraded (no IPv6 cluster
/// CIDR is known to tell pod traffic apart), as the IPv4 table does without `--cluster-cidr`.
pub fn render6(desired: &DesiredState, masquerade_bit: u8) -> String {
    let t = TABLE6;
    let mut s = format!("add table {t}\ndelete table {t}\nadd table {t}\n");
    skeleton6(&mut s, masquerade_bit);
    let served: Vec<&Frontend6> = desired
        .frontends6
        .iter()
        .filter(|f| !f.backends.is_empty())
        .collect();
    for f in &served {
        let _ = writeln!(s, "add chain {t} {}", service_chain6(f));
        for b in &f.backends {
            let _ = writeln!(s, "add chain {t} {}", endpoint_chain6(f, b));
        }
    }
    for f in &served {
        for b in &f.backends {
            let ep = endpoint_chain6(f, b);
            let _ = writeln!(
                s,
                "add rule {t} {ep} ip6 saddr {} jump mark-for-masquerade",
                b.address
            );
            if !b.is_local {
                let _ = writeln!(s, "add rule {t} {ep} jump mark-for-masquerade");
            }
            let _ = writeln!(
                s,
                "add rule {t} {ep} meta l4proto {} dnat to [{}]:{}",
                proto(f.protocol),
                b.address,
                b.port
            );
        }
        let targets: Vec<String> = f
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| format!("{i} : goto {}", endpoint_chain6(f, b)))
            .collect();
        let _ = writeln!(
            s,
            "add rule {t} {} numgen random mod {} vmap {{ {} }}",
            service_chain6(f),
            f.backends.len(),
            targets.join(", ")
        );
    }
    let nodeport_ips: Vec<String> = desired
        .nodeport_addresses6
        .iter()
        .map(|a| a.to_string())
        .collect();
    push_elements(&mut s, "nodeport-ips", &nodeport_ips);
    let (mut ips, mut nps, mut no_ips, mut no_nps) = (vec![], vec![], vec![], vec![]);
    for f in &desired.frontends6 {
        let served = !f.backends.is_empty();
        let verdict = if served {
            format!("goto {}", service_chain6(f))
        } else {
            "goto reject-chain".to_string()
        };
        let p = proto(f.protocol);
        match (f.kind, served) {
            (FrontendKind::NodePort, true) => nps.push(format!("{p} . {} : {verdict}", f.port)),
            (FrontendKind::NodePort, false) => no_nps.push(format!("{p} . {} : {verdict}", f.port)),
            (_, true) => ips.push(format!("{} . {p} . {} : {verdict}", f.address, f.port)),
            (_, false) => no_ips.push(format!("{} . {p} . {} : {verdict}", f.address, f.port)),
        }
    }
    push_elements(&mut s, "service-ips", &ips);
    push_elements(&mut s, "service-nodeports", &nps);
    push_elements(&mut s, "no-endpoint-services", &no_ips);
    push_elements(&mut s, "no-endpoint-nodeports", &no_nps);
    s
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
            ],
            nodeport_addresses6: vec!["fd00:198:18::1".parse().unwrap()],
            ..DesiredState::default()
        }
    }

    #[test]
    fn ip6_table_golden() {
        crate::dataplane::nftables::check_golden("nftables6_full.nft", &render6(&sample6(), 14));
    }

    #[test]
    fn ip6_table_has_the_ip_table_structure() {
        let text = render6(&sample6(), 14);
        assert!(text.starts_with("add table ip6 kproxy\ndelete table ip6 kproxy\n"));
        assert!(
            text.contains(
                "add element ip6 kproxy service-ips { fd00:10:96::a . tcp . 80 : goto svc-"
            )
        );
        assert!(text.contains("add element ip6 kproxy no-endpoint-services { fd00:10:96::b . tcp . 80 : goto reject-chain }"));
        assert!(
            text.contains("add element ip6 kproxy service-nodeports { tcp . 30080 : goto svc-")
        );
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
