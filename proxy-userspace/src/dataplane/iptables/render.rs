//! Rendering a [`DesiredState`] as kube-proxy's iptables layout under the `KPROXY-` prefix,
//! and the `iptables-restore --noflush` input that moves the kernel from one rendering to the
//! next, rewriting only the chains that changed.
//!
//! nat table:
//! - `KPROXY-SERVICES` (jumped from PREROUTING and OUTPUT): one rule per cluster IP,
//!   external IP and LoadBalancer IP frontend with endpoints, jumping to its `KPROXY-SVC-`;
//!   last, for each nodePort address, `-d addr -m addrtype --dst-type LOCAL -j KPROXY-NODEPORTS`.
//! - `KPROXY-NODEPORTS`: one rule per nodePort frontend with endpoints.
//! - `KPROXY-SVC-<hash>`: `-m statistic --mode random --probability 1/(n-i)` to each
//!   `KPROXY-SEP-<hash>`, the last one unconditional.
//! - `KPROXY-SEP-<hash>`: mark for masquerade if the source is the endpoint (hairpin) and, for
//!   an endpoint on another node, if the source is outside the cluster CIDR (all sources
//!   without one); then DNAT.
//! - sessionAffinity ClientIP (as kube-proxy): before the statistic rules, `KPROXY-SVC-` has
//!   per endpoint `-m recent --name KPROXY-SEP-<hash> --rcheck --seconds T --reap -j
//!   KPROXY-SEP-<hash>`, and the endpoint's DNAT rule records the client with `-m recent
//!   --name KPROXY-SEP-<hash> --set`.
//! - loadBalancerSourceRanges (as kube-proxy's `KUBE-FW-`): the LoadBalancer IP's and the
//!   nodePort's rules jump to `KPROXY-FW-<hash>`, which sends sources inside the ranges (and
//!   the LoadBalancer IP itself when a node address is inside) to `KPROXY-SVC-`; the rest
//!   fall through undNATed and the filter `KPROXY-FIREWALL` drops them.
//! - `KPROXY-MARK-MASQ` sets the mark, `KPROXY-POSTROUTING` (jumped from POSTROUTING)
//!   masquerades marked packets.
//!
//! filter table (jumped with `--ctstate NEW`):
//! - `KPROXY-SERVICES` (FORWARD, OUTPUT): REJECT for cluster IPs without endpoints.
//! - `KPROXY-EXTERNAL-SERVICES` (INPUT, FORWARD, OUTPUT): REJECT for external and
//!   LoadBalancer IPs without endpoints; then, per nodePort address, a jump to the filter
//!   `KPROXY-NODEPORTS`, which rejects nodePorts without endpoints.
//! - `KPROXY-FIREWALL` (INPUT, FORWARD, OUTPUT): DROP for new connections still addressed to
//!   a frontend with source ranges (its `KPROXY-FW-` chain did not let them through).

use std::collections::{BTreeMap, BTreeSet};

use super::hash::{endpoint_identity, frontend_identity, hash};
use crate::{
    dataplane::nftables::render::{RenderOptions, firewall_allowed, network},
    desired::{Backend, DesiredState, Frontend, FrontendKind, Protocol},
};

pub const SERVICES: &str = "KPROXY-SERVICES";
pub const EXTERNAL_SERVICES: &str = "KPROXY-EXTERNAL-SERVICES";
pub const NODEPORTS: &str = "KPROXY-NODEPORTS";
pub const POSTROUTING: &str = "KPROXY-POSTROUTING";
pub const MARK_MASQ: &str = "KPROXY-MARK-MASQ";
pub const FIREWALL: &str = "KPROXY-FIREWALL";
pub const PREFIX: &str = "KPROXY-";

/// The chains of the two tables, each with its rules (`-A CHAIN ...` lines).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rendering {
    pub nat: BTreeMap<String, Vec<String>>,
    pub filter: BTreeMap<String, Vec<String>>,
}

/// The chains always rewritten (they refer to every frontend, or are tiny).
pub fn is_top_level(chain: &str) -> bool {
    !["KPROXY-SVC-", "KPROXY-SEP-", "KPROXY-FW-"]
        .iter()
        .any(|p| chain.starts_with(p))
}

pub fn firewall_chain(f: &Frontend) -> String {
    format!("KPROXY-FW-{}", hash(&frontend_identity(f), 16))
}

pub fn service_chain(f: &Frontend) -> String {
    format!("KPROXY-SVC-{}", hash(&frontend_identity(f), 16))
}

pub fn endpoint_chain(f: &Frontend, b: &Backend) -> String {
    format!("KPROXY-SEP-{}", hash(&endpoint_identity(f, b), 16))
}

fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

fn kind(k: FrontendKind) -> &'static str {
    match k {
        FrontendKind::ClusterIp => "cluster IP",
        FrontendKind::NodePort => "nodePort",
        FrontendKind::ExternalIp => "external IP",
        FrontendKind::LoadBalancer => "load balancer IP",
    }
}

/// `-p tcp -m tcp --dport 80`
fn port_match(f: &Frontend) -> String {
    let p = proto(f.protocol);
    format!("-p {p} -m {p} --dport {}", f.port)
}

fn reject(f: &Frontend) -> &'static str {
    match f.protocol {
        Protocol::Tcp => "-j REJECT --reject-with tcp-reset",
        _ => "-j REJECT --reject-with icmp-port-unreachable",
    }
}

pub fn render(desired: &DesiredState, opts: &RenderOptions) -> Rendering {
    let mark = 1u32 << opts.masquerade_bit;
    let mut nat: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut filter: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for c in [SERVICES, NODEPORTS, POSTROUTING, MARK_MASQ] {
        nat.insert(c.into(), Vec::new());
    }
    for c in [SERVICES, EXTERNAL_SERVICES, NODEPORTS, FIREWALL] {
        filter.insert(c.into(), Vec::new());
    }
    let add = |map: &mut BTreeMap<String, Vec<String>>, chain: &str, rule: String| {
        map.entry(chain.to_string())
            .or_default()
            .push(format!("-A {chain} {rule}"));
    };
    add(
        &mut nat,
        POSTROUTING,
        format!("-m mark ! --mark {mark:#x}/{mark:#x} -j RETURN"),
    );
    add(
        &mut nat,
        POSTROUTING,
        format!("-j MARK --xor-mark {mark:#x}"),
    );
    add(
        &mut nat,
        POSTROUTING,
        "-m comment --comment \"kproxy service traffic requiring SNAT\" -j MASQUERADE --random-fully"
            .into(),
    );
    add(&mut nat, MARK_MASQ, format!("-j MARK --or-mark {mark:#x}"));

    let outside = opts
        .cluster_cidr
        .as_ref()
        .map(|c| format!("! -s {} ", network(c)));
    for f in &desired.frontends {
        let comment = format!("-m comment --comment \"{} {}\"", f.service, kind(f.kind));
        if f.source_ranges.is_some() {
            add(&mut filter, FIREWALL, firewall_drop(f));
        }
        if f.backends.is_empty() {
            let (chain, dst) = match f.kind {
                FrontendKind::ClusterIp => (SERVICES, format!("-d {}/32 ", f.address)),
                FrontendKind::NodePort => (NODEPORTS, String::new()),
                _ => (EXTERNAL_SERVICES, format!("-d {}/32 ", f.address)),
            };
            add(
                &mut filter,
                chain,
                format!(
                    "-m comment --comment \"{} {} has no endpoints\" {dst}{} {}",
                    f.service,
                    kind(f.kind),
                    port_match(f),
                    reject(f)
                ),
            );
            continue;
        }
        let svc = service_chain(f);
        // With source ranges the frontend's traffic passes its firewall chain first.
        let entry = match &f.source_ranges {
            Some(ranges) => {
                let fw = firewall_chain(f);
                nat.insert(fw.clone(), Vec::new());
                let allowed = firewall_allowed(f, ranges, &desired.nodeport_addresses);
                for a in allowed {
                    add(&mut nat, &fw, format!("{comment} -s {a} -j {svc}"));
                }
                fw
            }
            None => svc.clone(),
        };
        match f.kind {
            FrontendKind::NodePort => add(
                &mut nat,
                NODEPORTS,
                format!("{comment} {} -j {entry}", port_match(f)),
            ),
            _ => add(
                &mut nat,
                SERVICES,
                format!("{comment} -d {}/32 {} -j {entry}", f.address, port_match(f)),
            ),
        }
        nat.insert(svc.clone(), Vec::new());
        if let Some(timeout) = f.affinity_timeout {
            for b in &f.backends {
                let sep = endpoint_chain(f, b);
                add(
                    &mut nat,
                    &svc,
                    format!(
                        "-m comment --comment \"{} -> {}:{}\" -m recent --name {sep} --rcheck --seconds {timeout} --reap -j {sep}",
                        f.service, b.address, b.port
                    ),
                );
            }
        }
        let n = f.backends.len();
        for (i, b) in f.backends.iter().enumerate() {
            let sep = endpoint_chain(f, b);
            let c = format!(
                "-m comment --comment \"{} -> {}:{}\"",
                f.service, b.address, b.port
            );
            let rule = if i + 1 < n {
                format!(
                    "{c} -m statistic --mode random --probability {:.10} -j {sep}",
                    1.0 / (n - i) as f64
                )
            } else {
                format!("{c} -j {sep}")
            };
            add(&mut nat, &svc, rule);
            nat.insert(sep.clone(), Vec::new());
            add(
                &mut nat,
                &sep,
                format!("{c} -s {}/32 -j {MARK_MASQ}", b.address),
            );
            if !b.is_local {
                add(
                    &mut nat,
                    &sep,
                    format!("{c} {}-j {MARK_MASQ}", outside.as_deref().unwrap_or("")),
                );
            }
            let p = proto(f.protocol);
            let recent = match f.affinity_timeout {
                Some(_) => format!("-m recent --name {sep} --set "),
                None => String::new(),
            };
            add(
                &mut nat,
                &sep,
                format!(
                    "{c} {recent}-p {p} -m {p} -j DNAT --to-destination {}:{}",
                    b.address, b.port
                ),
            );
        }
    }
    // The nodePorts, last in the services chains, only to local nodePort addresses.
    for a in &desired.nodeport_addresses {
        add(
            &mut nat,
            SERVICES,
            format!(
                "-m comment --comment \"kproxy nodePorts\" -d {a}/32 -m addrtype --dst-type LOCAL -j {NODEPORTS}"
            ),
        );
        add(
            &mut filter,
            EXTERNAL_SERVICES,
            format!(
                "-m comment --comment \"kproxy nodePorts\" -d {a}/32 -m addrtype --dst-type LOCAL -j {NODEPORTS}"
            ),
        );
    }
    Rendering { nat, filter }
}

/// The filter rule that drops what a frontend's `KPROXY-FW-` chain did not DNAT: packets
/// still addressed to the frontend (a nodePort: to a local address).
fn firewall_drop(f: &Frontend) -> String {
    let dst = match f.kind {
        FrontendKind::NodePort => "-m addrtype --dst-type LOCAL".to_string(),
        _ => format!("-d {}/32", f.address),
    };
    format!(
        "-m comment --comment \"{} {} traffic not accepted by {}\" {dst} {} -j DROP",
        f.service,
        kind(f.kind),
        firewall_chain(f),
        port_match(f)
    )
}

/// What a restore changes: `iptables-restore --noflush` transactions (`*table ... COMMIT`
/// blocks), applied in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreInput {
    /// Before `text`, when there are many: the new and changed per-Service chains in
    /// batches, endpoint chains first, then service chains, then firewall chains (each batch
    /// only jumps to chains already there). Nothing jumps to a new chain until `text`, and a
    /// changed one is rewritten in one transaction, so traffic sees each Service as it was
    /// or as it will be, never a dangling jump.
    pub before: Vec<String>,
    /// The top-level chains (and everything else that was not batched).
    pub text: String,
    /// After `text`, when there are many: the chains gone, in batches, those that jump
    /// first (nothing kept jumps to them any more).
    pub after: Vec<String>,
    /// Chains (re)written.
    pub written: usize,
    /// Chains deleted.
    pub deleted: usize,
}

impl RestoreInput {
    /// Every input, in the order to apply them.
    pub fn steps(&self) -> impl Iterator<Item = &String> {
        self.before
            .iter()
            .chain(std::iter::once(&self.text))
            .chain(self.after.iter())
    }
}

/// The `iptables-restore --noflush` input from `previous` (what the kernel has, as we
/// rendered it; `None` for a full sync) to `next`, in one transaction. The top-level chains
/// are always rewritten; per-frontend/per-endpoint chains only if new or changed; chains gone
/// from `next` are flushed and deleted, as are `extra_stale` chains (found in the kernel on a
/// full sync).
pub fn restore_input(
    previous: Option<&Rendering>,
    next: &Rendering,
    extra_stale: &Rendering,
) -> RestoreInput {
    restore_plan(previous, next, extra_stale, None)
}

/// [`restore_input`], with the per-Service chains to write and the chains to delete split
/// into transactions that each name at most about `batch` chains (a chain and the chains
/// its rules jump to) when there are more (see [`RestoreInput`]).
///
/// Why: iptables-nft (1.8.x) keeps the names of the chains one transaction refers to in a
/// sorted linked list, walked for every rule (`cache_chain_list_insert`): quadratic in the
/// chains of one transaction. 10,000 Services x 10 endpoints (110,000 chains, 520,000
/// rules) in one transaction did not finish in 10 minutes; in transactions of 500 names
/// they take about 20 s of CPU, 1,000 Services 0.8 s instead of 2.5 s.
pub fn restore_plan(
    previous: Option<&Rendering>,
    next: &Rendering,
    extra_stale: &Rendering,
    batch: Option<usize>,
) -> RestoreInput {
    let mut out = RestoreInput::default();
    let tables = [
        (
            "filter",
            previous.map(|p| &p.filter),
            &next.filter,
            &extra_stale.filter,
        ),
        ("nat", previous.map(|p| &p.nat), &next.nat, &extra_stale.nat),
    ];
    for (table, prev, next, extra) in tables {
        let mut write: Vec<&String> = next
            .iter()
            .filter(|(name, rules)| {
                is_top_level(name) || prev.and_then(|p| p.get(*name)) != Some(*rules)
            })
            .map(|(name, _)| name)
            .collect();
        let mut gone: Vec<&String> = prev
            .into_iter()
            .flat_map(|p| p.keys())
            .chain(extra.keys())
            .filter(|name| !next.contains_key(*name))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        out.written += write.len();
        out.deleted += gone.len();
        let size = batch.unwrap_or(usize::MAX).max(1);
        let per_service_names: usize = write
            .iter()
            .filter(|n| !is_top_level(n))
            .map(|n| names(next, n))
            .sum();
        if per_service_names > size {
            out.before
                .extend(write_batches(table, &mut write, next, size));
        }
        if gone.len() > size {
            gone.sort_by_key(|name| deletion_rank(name));
            out.after.extend(
                gone.chunks(size)
                    .map(|chunk| transaction(table, &[], next, chunk)),
            );
            gone.clear();
        }
        out.text.push_str(&transaction(table, &write, next, &gone));
    }
    out
}

/// How many chain names writing `chain` refers to, at most: itself and a jump per rule.
fn names(rules: &BTreeMap<String, Vec<String>>, chain: &str) -> usize {
    1 + rules.get(chain).map_or(0, Vec::len)
}

/// Takes the per-Service chains out of `write` into transactions of about `size` chain
/// names, in the order they jump to each other (endpoint, service, firewall); the first
/// one also writes `KPROXY-MARK-MASQ`, which endpoint chains jump to.
fn write_batches(
    table: &str,
    write: &mut Vec<&String>,
    rules: &BTreeMap<String, Vec<String>>,
    size: usize,
) -> Vec<String> {
    let (mut per_service, top): (Vec<&String>, Vec<&String>) =
        write.iter().partition(|n| !is_top_level(n));
    let (mark, top): (Vec<&String>, Vec<&String>) =
        top.into_iter().partition(|n| n.as_str() == MARK_MASQ);
    *write = top;
    per_service.sort_by_key(|name| write_rank(name));
    let mut batches = Vec::new();
    let mut chains = mark;
    let mut budget = 0;
    for name in per_service {
        let cost = names(rules, name);
        if budget + cost > size && !chains.is_empty() {
            batches.push(transaction(table, &chains, rules, &[]));
            chains.clear();
            budget = 0;
        }
        chains.push(name);
        budget += cost;
    }
    if !chains.is_empty() {
        batches.push(transaction(table, &chains, rules, &[]));
    }
    batches
}

/// Endpoint chains before the service chains that jump to them, before the firewall chains
/// that jump to those.
fn write_rank(chain: &str) -> (u8, &str) {
    let rank = if chain.starts_with("KPROXY-SEP-") {
        0
    } else if chain.starts_with("KPROXY-SVC-") {
        1
    } else {
        2
    };
    (rank, chain)
}

/// The chains that jump first: top-level ones (but `KPROXY-MARK-MASQ`, which endpoint chains
/// jump to, last), firewall, service, then endpoint chains.
fn deletion_rank(chain: &str) -> (u8, &str) {
    let rank = if chain == MARK_MASQ {
        4
    } else if chain.starts_with("KPROXY-SEP-") {
        3
    } else if chain.starts_with("KPROXY-SVC-") {
        2
    } else if chain.starts_with("KPROXY-FW-") {
        1
    } else {
        0
    };
    (rank, chain)
}

/// One table's transaction: declare (create or flush) `write` and `gone`, add the rules of
/// `write`, delete `gone`.
fn transaction(
    table: &str,
    write: &[&String],
    rules: &BTreeMap<String, Vec<String>>,
    gone: &[&String],
) -> String {
    let mut text = format!("*{table}\n");
    for name in write.iter().chain(gone.iter()) {
        text.push_str(&format!(":{name} - [0:0]\n"));
    }
    for name in write {
        for rule in &rules[*name] {
            text.push_str(rule);
            text.push('\n');
        }
    }
    for name in gone {
        text.push_str(&format!("-X {name}\n"));
    }
    text.push_str("COMMIT\n");
    text
}

/// The transactions that delete `chains` (found in the kernel, none of them jumped to from
/// outside `chains` any more) from `table`: one, or batches of `batch` in the order of
/// [`deletion_rank`].
pub fn deletion(
    table: &str,
    chains: &BTreeMap<String, Vec<String>>,
    batch: Option<usize>,
) -> Vec<String> {
    let mut gone: Vec<&String> = chains.keys().collect();
    let size = batch.unwrap_or(usize::MAX).max(1);
    if gone.len() <= size {
        return vec![transaction(table, &[], chains, &gone)];
    }
    gone.sort_by_key(|name| deletion_rank(name));
    gone.chunks(size)
        .map(|chunk| transaction(table, &[], chains, chunk))
        .collect()
}

/// The `KPROXY-` chains of an `iptables-save` output, per table (rules not filled), and the
/// rules of other chains that jump to a `KPROXY-` chain, as `(table, "-A ...")`.
pub fn parse_save(save: &str) -> (Rendering, Vec<(String, String)>) {
    let mut r = Rendering::default();
    let mut jumps = Vec::new();
    let mut table = String::new();
    for line in save.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim().to_string();
        } else if let Some(rest) = line.strip_prefix(':') {
            let name = rest.split_whitespace().next().unwrap_or_default();
            if name.starts_with(PREFIX) {
                let map = match table.as_str() {
                    "nat" => &mut r.nat,
                    "filter" => &mut r.filter,
                    _ => continue,
                };
                map.insert(name.to_string(), Vec::new());
            }
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let chain = rest.split_whitespace().next().unwrap_or_default();
            if !chain.starts_with(PREFIX) && line.contains(&format!("-j {PREFIX}")) {
                jumps.push((table.clone(), line.to_string()));
            }
        }
    }
    (r, jumps)
}

/// The jumps from the built-in chains: (table, chain, rule spec).
pub fn base_jumps() -> Vec<(&'static str, &'static str, Vec<&'static str>)> {
    let portals = ["-m", "comment", "--comment", "kproxy service portals"];
    let new = ["-m", "conntrack", "--ctstate", "NEW"];
    let ext = [
        "-m",
        "comment",
        "--comment",
        "kproxy externally-visible service portals",
    ];
    let fw = [
        "-m",
        "comment",
        "--comment",
        "kproxy load balancer source ranges",
    ];
    let join = |a: &[&'static str], b: &[&'static str], target: &'static str| {
        let mut v = a.to_vec();
        v.extend_from_slice(b);
        v.extend_from_slice(&["-j", target]);
        v
    };
    vec![
        ("nat", "PREROUTING", join(&portals, &[], SERVICES)),
        ("nat", "OUTPUT", join(&portals, &[], SERVICES)),
        (
            "nat",
            "POSTROUTING",
            join(
                &["-m", "comment", "--comment", "kproxy postrouting rules"],
                &[],
                POSTROUTING,
            ),
        ),
        ("filter", "INPUT", join(&new, &fw, FIREWALL)),
        ("filter", "FORWARD", join(&new, &fw, FIREWALL)),
        ("filter", "OUTPUT", join(&new, &fw, FIREWALL)),
        ("filter", "INPUT", join(&new, &ext, EXTERNAL_SERVICES)),
        ("filter", "FORWARD", join(&new, &ext, EXTERNAL_SERVICES)),
        ("filter", "OUTPUT", join(&new, &ext, EXTERNAL_SERVICES)),
        ("filter", "FORWARD", join(&new, &portals, SERVICES)),
        ("filter", "OUTPUT", join(&new, &portals, SERVICES)),
    ]
}
