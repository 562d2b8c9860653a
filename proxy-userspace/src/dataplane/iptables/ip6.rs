//! The IPv6 half of the iptables dataplane: the same `KPROXY-` chain layout (see
//! `render.rs`) for `frontends6`, through `ip6tables-restore -w --noflush`. Every change is
//! a full sync of the IPv6 chains (jumps ensured, stale `KPROXY-` chains found with
//! `ip6tables-save` deleted) in one restore; nothing changed, nothing is run. The IPv4
//! chains are not touched by it.

use std::process::{Command, Stdio};

use anyhow::Context as _;

use super::{
    hash::hash,
    render::{self, EXTERNAL_SERVICES, MARK_MASQ, NODEPORTS, POSTROUTING, Rendering, SERVICES},
};
use crate::{
    dataplane::nftables::run_with_stdin,
    desired::{Backend6, DesiredState, Frontend6, FrontendKind, Protocol},
};

const LOCK_WAIT: &str = "5";

fn frontend_identity6(f: &Frontend6) -> String {
    format!("{}|{:?}|[{}]:{}", f.service, f.kind, f.address, f.port)
}

pub fn service_chain6(f: &Frontend6) -> String {
    format!("KPROXY-SVC-{}", hash(&frontend_identity6(f), 16))
}

pub fn endpoint_chain6(f: &Frontend6, b: &Backend6) -> String {
    let id = format!("{}|[{}]:{}", frontend_identity6(f), b.address, b.port);
    format!("KPROXY-SEP-{}", hash(&id, 16))
}

fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

fn port_match(f: &Frontend6) -> String {
    let p = proto(f.protocol);
    format!("-p {p} -m {p} --dport {}", f.port)
}

fn reject6(f: &Frontend6) -> &'static str {
    match f.protocol {
        Protocol::Tcp => "-j REJECT --reject-with tcp-reset",
        _ => "-j REJECT --reject-with icmp6-port-unreachable",
    }
}

/// The IPv6 chains for `desired.frontends6`, laid out as `render::render` lays out IPv4.
/// Endpoints on other nodes are masqueraded (no IPv6 cluster CIDR is known).
pub fn render6(desired: &DesiredState, masquerade_bit: u8) -> Rendering {
    let mark = 1u32 << masquerade_bit;
    let mut r = Rendering::default();
    for c in [SERVICES, NODEPORTS, POSTROUTING, MARK_MASQ] {
        r.nat.insert(c.into(), Vec::new());
    }
    for c in [SERVICES, EXTERNAL_SERVICES, NODEPORTS] {
        r.filter.insert(c.into(), Vec::new());
    }
    let add =
        |map: &mut std::collections::BTreeMap<String, Vec<String>>, chain: &str, rule: String| {
            map.entry(chain.to_string())
                .or_default()
                .push(format!("-A {chain} {rule}"));
        };
    add(
        &mut r.nat,
        POSTROUTING,
        format!("-m mark ! --mark {mark:#x}/{mark:#x} -j RETURN"),
    );
    add(
        &mut r.nat,
        POSTROUTING,
        format!("-j MARK --xor-mark {mark:#x}"),
    );
    add(
        &mut r.nat,
        POSTROUTING,
        "-m comment --comment \"kproxy service traffic requiring SNAT\" -j MASQUERADE --random-fully".into(),
    );
    add(
        &mut r.nat,
        MARK_MASQ,
        format!("-j MARK --or-mark {mark:#x}"),
    );
    for f in &desired.frontends6 {
        let comment = format!("-m comment --comment \"{} {:?}\"", f.service, f.kind);
        if f.backends.is_empty() {
            let (chain, dst) = match f.kind {
                FrontendKind::ClusterIp => (SERVICES, format!("-d {}/128 ", f.address)),
                FrontendKind::NodePort => (NODEPORTS, String::new()),
                _ => (EXTERNAL_SERVICES, format!("-d {}/128 ", f.address)),
            };
            add(
                &mut r.filter,
                chain,
                format!(
                    "-m comment --comment \"{} {:?} has no endpoints\" {dst}{} {}",
                    f.service,
                    f.kind,
                    port_match(f),
                    reject6(f)
                ),
            );
            continue;
        }
        let svc = service_chain6(f);
        match f.kind {
            FrontendKind::NodePort => add(
                &mut r.nat,
                NODEPORTS,
                format!("{comment} {} -j {svc}", port_match(f)),
            ),
            _ => add(
                &mut r.nat,
                SERVICES,
                format!("{comment} -d {}/128 {} -j {svc}", f.address, port_match(f)),
            ),
        }
        r.nat.insert(svc.clone(), Vec::new());
        let n = f.backends.len();
        for (i, b) in f.backends.iter().enumerate() {
            let sep = endpoint_chain6(f, b);
            let c = format!(
                "-m comment --comment \"{} -> [{}]:{}\"",
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
            add(&mut r.nat, &svc, rule);
            r.nat.insert(sep.clone(), Vec::new());
            add(
                &mut r.nat,
                &sep,
                format!("{c} -s {}/128 -j {MARK_MASQ}", b.address),
            );
            if !b.is_local {
                add(&mut r.nat, &sep, format!("{c} -j {MARK_MASQ}"));
            }
            let p = proto(f.protocol);
            add(
                &mut r.nat,
                &sep,
                format!(
                    "{c} -p {p} -m {p} -j DNAT --to-destination [{}]:{}",
                    b.address, b.port
                ),
            );
        }
    }
    // Every chain the built-in chains jump to exists (empty when IPv6 has nothing for it,
    // e.g. the IPv4 source-range firewall), so a full sync never deletes a jumped-to chain.
    for (table, _, spec) in render::base_jumps() {
        let target = spec.last().copied().unwrap_or_default();
        let map = if table == "nat" {
            &mut r.nat
        } else {
            &mut r.filter
        };
        map.entry(target.to_string()).or_default();
    }
    for a in &desired.nodeport_addresses6 {
        let rule = format!(
            "-m comment --comment \"kproxy nodePorts\" -d {a}/128 -m addrtype --dst-type LOCAL -j {NODEPORTS}"
        );
        add(&mut r.nat, SERVICES, rule.clone());
        add(&mut r.filter, EXTERNAL_SERVICES, rule);
    }
    r
}

fn ip6tables(args: &[&str]) -> anyhow::Result<std::process::Output> {
    let mut all = vec!["-w", LOCK_WAIT];
    all.extend_from_slice(args);
    Command::new("ip6tables")
        .args(&all)
        .stdin(Stdio::null())
        .output()
        .context("running ip6tables")
}

fn ip6tables_save() -> anyhow::Result<String> {
    let mut out = String::new();
    for table in ["nat", "filter"] {
        out.push_str(&run_with_stdin("ip6tables-save", &["-t", table], "")?);
    }
    Ok(out)
}

fn restore6(input: &str) -> anyhow::Result<()> {
    run_with_stdin("ip6tables-restore", &["-w", LOCK_WAIT, "--noflush"], input)?;
    Ok(())
}

fn ensure_base_jumps6() -> anyhow::Result<()> {
    for (table, chain, spec) in render::base_jumps() {
        let target = spec.last().copied().unwrap_or_default();
        let _ = ip6tables(&["-t", table, "-N", target])?;
        let mut check = vec!["-t", table, "-C", chain];
        check.extend_from_slice(&spec);
        if ip6tables(&check)?.status.success() {
            continue;
        }
        let mut insert = vec!["-t", table, "-I", chain, "1"];
        insert.extend_from_slice(&spec);
        let out = ip6tables(&insert)?;
        if !out.status.success() {
            anyhow::bail!(
                "ip6tables -t {table} -I {chain} ... -j {target}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    Ok(())
}

/// The IPv6 rules as last applied (None: unknown, the next apply re-applies).
#[derive(Debug, Default)]
pub struct Ip6Rules {
    applied: Option<Rendering>,
}

impl Ip6Rules {
    /// Makes the kernel's IPv6 `KPROXY-` chains match `desired.frontends6`; with none, the
    /// chains are removed. Returns (chains written, chains deleted).
    pub fn apply(
        &mut self,
        desired: &DesiredState,
        masquerade_bit: u8,
        full: bool,
    ) -> anyhow::Result<(usize, usize)> {
        if desired.frontends6.is_empty() {
            if self.applied.is_some() || full {
                self.applied = None;
                let removed = cleanup6().context("removing the IPv6 KPROXY- chains")?;
                self.applied = Some(Rendering::default());
                return Ok((0, removed));
            }
            return Ok((0, 0));
        }
        let next = render6(desired, masquerade_bit);
        if !full && self.applied.as_ref() == Some(&next) {
            return Ok((0, 0));
        }
        self.applied = None;
        ensure_base_jumps6()?;
        let in_kernel = render::parse_save(&ip6tables_save()?).0;
        let input = render::restore_input(None, &next, &in_kernel);
        restore6(&input.text).context("ip6tables-restore")?;
        self.applied = Some(next);
        Ok((input.written, input.deleted))
    }
}

/// Removes every IPv6 `KPROXY-` chain (nat, filter) and every jump to one. Idempotent;
/// 0 when ip6tables is not installed.
pub fn cleanup6() -> anyhow::Result<usize> {
    let Ok(save) = ip6tables_save() else {
        return Ok(0);
    };
    let (chains, jumps) = render::parse_save(&save);
    if chains.nat.is_empty() && chains.filter.is_empty() && jumps.is_empty() {
        return Ok(0);
    }
    let mut text = String::new();
    for (table, map) in [("filter", &chains.filter), ("nat", &chains.nat)] {
        text.push_str(&format!("*{table}\n"));
        for (_, rule) in jumps.iter().filter(|(t, _)| t == table) {
            text.push_str(&rule.replacen("-A ", "-D ", 1));
            text.push('\n');
        }
        for name in map.keys() {
            text.push_str(&format!(":{name} - [0:0]\n"));
        }
        for name in map.keys() {
            text.push_str(&format!("-X {name}\n"));
        }
        text.push_str("COMMIT\n");
    }
    restore6(&text).context("removing the IPv6 KPROXY- chains")?;
    Ok(chains.nat.len() + chains.filter.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::ServicePortName;

    #[test]
    fn ip6_rendering_golden() {
        let spn = ServicePortName {
            namespace: "default".into(),
            name: "web".into(),
            port: "http".into(),
            protocol: Protocol::Tcp,
        };
        let be = |a: &str, is_local| Backend6 {
            address: a.parse().unwrap(),
            port: 80,
            is_local,
        };
        let fe = |kind, addr: &str, port, backends| Frontend6 {
            service: spn.clone(),
            kind,
            address: addr.parse().unwrap(),
            port,
            protocol: Protocol::Tcp,
            backends,
            affinity_timeout: None,
            source_ranges: None,
        };
        let d = DesiredState {
            frontends6: vec![
                fe(
                    FrontendKind::NodePort,
                    "::",
                    30080,
                    vec![be("fd00:10:244:1::a", true), be("fd00:10:244:2::b", false)],
                ),
                fe(
                    FrontendKind::ClusterIp,
                    "fd00:10:96::a",
                    80,
                    vec![be("fd00:10:244:1::a", true), be("fd00:10:244:2::b", false)],
                ),
                fe(FrontendKind::ClusterIp, "fd00:10:96::b", 80, vec![]),
            ],
            nodeport_addresses6: vec!["fd00:198:18::1".parse().unwrap()],
            ..DesiredState::default()
        };
        let input = render::restore_input(None, &render6(&d, 14), &Rendering::default());
        assert!(
            input
                .text
                .contains("-j DNAT --to-destination [fd00:10:244:2::b]:80")
        );
        assert!(input.text.contains(
            "-d fd00:10:96::b/128 -p tcp -m tcp --dport 80 -j REJECT --reject-with tcp-reset"
        ));
        crate::dataplane::nftables::check_golden("ip6tables_sample.restore", &input.text);
    }
}
