//! The iptables dataplane: kube-proxy's iptables layout under the `KPROXY-` prefix (never
//! `KUBE-`, so it does not fight a kube-proxy still installed), applied with one
//! `iptables-restore -w --noflush`: one transaction per table, or, with the nf_tables backend
//! and many chains, the per-Service chains in transactions of their own before the top-level
//! ones that jump to them (see [`render::restore_plan`]). Syncs are partial: only the per-frontend and
//! per-endpoint chains that changed since the last successful apply are rewritten (plus the
//! few top-level chains), chains that are gone are deleted. A full sync (on start, when asked,
//! and after any error) also ensures the jumps from the built-in chains and deletes every
//! `KPROXY-` chain found in the kernel that the rendering does not have.
//!
//! Whichever `iptables-restore` is installed (legacy or nf_tables backend) is used. IPv6
//! frontends get the same chains through `ip6tables-restore` (`ip6.rs`).
//! `localhost:nodePort` is not served (no route_localnet).

pub mod hash;
pub mod ip6;
pub mod render;

use std::process::{Command, Stdio};

use anyhow::Context as _;

use self::render::Rendering;
use super::{ApplyStats, Dataplane, conntrack_flush, nftables::run_with_stdin};
pub use crate::dataplane::nftables::RenderOptions;
use crate::desired::DesiredState;

/// The `-w` (xtables lock wait) seconds.
const LOCK_WAIT: &str = "5";

/// With the nf_tables backend, about the most chain names one restore transaction refers
/// to (see [`render::restore_plan`] why).
const NFT_BACKEND_BATCH: usize = 500;

/// How the iptables dataplane is set up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IptablesSettings {
    pub render: RenderOptions,
}

pub struct IptablesDataplane {
    settings: IptablesSettings,
    /// What the kernel has, as we rendered it (None: unknown, the next sync is full).
    applied: Option<Rendering>,
    /// The state `applied` came from, for the stale UDP conntrack flush.
    previous: DesiredState,
    ip6: ip6::Ip6Rules,
    /// About the most chain names per restore transaction (None: the legacy backend, one
    /// transaction per table and sync).
    batch: Option<usize>,
}

impl IptablesDataplane {
    /// Checks that iptables works here (see [`probe`]); programs nothing yet.
    pub fn new(settings: IptablesSettings) -> anyhow::Result<Self> {
        probe().context("iptables mode is not usable on this host")?;
        Ok(Self {
            settings,
            applied: None,
            previous: DesiredState::default(),
            ip6: ip6::Ip6Rules::default(),
            batch: restore_batch(),
        })
    }

    pub fn settings(&self) -> &IptablesSettings {
        &self.settings
    }

    /// The restore input that the next apply of `desired` would use (for tests and debugging).
    pub fn plan(&self, desired: &DesiredState, full: bool) -> render::RestoreInput {
        let next = render::render(desired, &self.settings.render);
        let previous = if full { None } else { self.applied.as_ref() };
        render::restore_plan(previous, &next, &Rendering::default(), self.batch)
    }

    fn full_sync_preparation(&self) -> anyhow::Result<Rendering> {
        ensure_base_jumps()?;
        let save = iptables_save()?;
        Ok(render::parse_save(&save).0)
    }
}

fn iptables(args: &[&str]) -> anyhow::Result<std::process::Output> {
    let mut all = vec!["-w", LOCK_WAIT];
    all.extend_from_slice(args);
    Command::new("iptables")
        .args(&all)
        .stdin(Stdio::null())
        .output()
        .context("running iptables")
}

/// `iptables-save -t "$1"` with the stack limit raised: iptables-save 1.8.9 (nf_tables)
/// overflows the default 8 MiB stack on a table of 110,000 chains (segfault, no output).
const SAVE_WITH_STACK: &str = "ulimit -s unlimited 2>/dev/null || ulimit -s \"$(ulimit -H -s)\"; exec iptables-save -t \"$1\"";

fn iptables_save() -> anyhow::Result<String> {
    let mut out = String::new();
    for table in ["nat", "filter"] {
        let save = run_with_stdin("sh", &["-c", SAVE_WITH_STACK, "sh", table], "")
            .with_context(|| format!("iptables-save -t {table}"))?;
        out.push_str(&save);
    }
    Ok(out)
}

/// How many chain names one restore transaction may refer to: batches with the nf_tables
/// backend (`iptables-restore --version` says "nf_tables"), no limit with the legacy one
/// (which replaces the whole table at each commit: batches would multiply that).
fn restore_batch() -> Option<usize> {
    let version = run_with_stdin("iptables-restore", &["--version"], "").unwrap_or_default();
    version.contains("nf_tables").then_some(NFT_BACKEND_BATCH)
}

/// Applies the transactions of `plan` in order, in one `iptables-restore`.
fn restore_steps(plan: &render::RestoreInput) -> anyhow::Result<()> {
    let input: String = plan.steps().map(String::as_str).collect();
    restore(&input)
}

fn restore(input: &str) -> anyhow::Result<()> {
    run_with_stdin("iptables-restore", &["-w", LOCK_WAIT, "--noflush"], input)?;
    Ok(())
}

/// Creates the top-level chains and the jumps to them from the built-in chains, if missing.
fn ensure_base_jumps() -> anyhow::Result<()> {
    for (table, chain, spec) in render::base_jumps() {
        let target = spec.last().copied().unwrap_or_default();
        // Creating an existing chain fails; that is fine.
        let _ = iptables(&["-t", table, "-N", target])?;
        let mut check = vec!["-t", table, "-C", chain];
        check.extend_from_slice(&spec);
        if iptables(&check)?.status.success() {
            continue;
        }
        let mut insert = vec!["-t", table, "-I", chain, "1"];
        insert.extend_from_slice(&spec);
        let out = iptables(&insert)?;
        if !out.status.success() {
            anyhow::bail!(
                "iptables -t {table} -I {chain} ... -j {target}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    Ok(())
}

/// Can this host use the iptables mode? `iptables-restore` must run and the nat table must be
/// usable (listing it loads it).
pub fn probe() -> anyhow::Result<()> {
    run_with_stdin("iptables-restore", &["--version"], "").context("iptables-restore")?;
    let out = iptables(&["-t", "nat", "-S", "PREROUTING"])?;
    if !out.status.success() {
        anyhow::bail!(
            "the nat table is not usable: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Removes every `KPROXY-` chain of the nat and filter tables and every jump to one, in one
/// `iptables-restore`. Idempotent. Returns the number of chains removed (0 also when
/// iptables is not installed).
pub fn cleanup() -> anyhow::Result<usize> {
    let save = match iptables_save() {
        Ok(s) => s,
        Err(e) => {
            if Command::new("iptables-save")
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_err()
            {
                return Ok(0);
            }
            return Err(e);
        }
    };
    let (chains, jumps) = render::parse_save(&save);
    if chains.nat.is_empty() && chains.filter.is_empty() && jumps.is_empty() {
        return Ok(cleanup6_logged());
    }
    // The jumps from the built-in chains first: then nothing outside ours refers to them.
    let mut text = String::new();
    for table in ["filter", "nat"] {
        text.push_str(&format!("*{table}\n"));
        for (_, rule) in jumps.iter().filter(|(t, _)| t == table) {
            text.push_str(&rule.replacen("-A ", "-D ", 1));
            text.push('\n');
        }
        text.push_str("COMMIT\n");
    }
    let batch = restore_batch();
    for (table, map) in [("filter", &chains.filter), ("nat", &chains.nat)] {
        if !map.is_empty() {
            text.extend(render::deletion(table, map, batch));
        }
    }
    restore(&text).context("removing the KPROXY- chains")?;
    Ok(chains.nat.len() + chains.filter.len() + cleanup6_logged())
}

/// The IPv6 chains' cleanup; a failure there is logged, not fatal to the IPv4 one.
fn cleanup6_logged() -> usize {
    ip6::cleanup6().unwrap_or_else(|e| {
        tracing::warn!("removing the IPv6 KPROXY- chains: {e:#}");
        0
    })
}

impl Dataplane for IptablesDataplane {
    fn name(&self) -> &'static str {
        "iptables"
    }

    fn apply(&mut self, desired: &DesiredState, full: bool) -> anyhow::Result<ApplyStats> {
        let (written6, deleted6) =
            self.ip6
                .apply(desired, self.settings.render.masquerade_bit, full)?;
        let mut stats = self.apply4(desired, full)?;
        stats.writes += written6;
        stats.deletes += deleted6;
        Ok(stats)
    }
}

impl IptablesDataplane {
    fn apply4(&mut self, desired: &DesiredState, full: bool) -> anyhow::Result<ApplyStats> {
        let next = render::render(desired, &self.settings.render);
        let full = full || self.applied.is_none();
        if !full && self.applied.as_ref() == Some(&next) {
            return Ok(ApplyStats::default());
        }
        let previous = self.applied.take();
        let input = if full {
            let in_kernel = self.full_sync_preparation()?;
            render::restore_plan(None, &next, &in_kernel, self.batch)
        } else {
            render::restore_plan(previous.as_ref(), &next, &Rendering::default(), self.batch)
        };
        // On error `applied` stays None: the next apply is a full sync.
        restore_steps(&input).context("iptables-restore")?;
        self.applied = Some(next);
        let stale = conntrack_flush::StaleUdp::between(&self.previous, desired);
        conntrack_flush::flush_and_log(&stale, "iptables");
        self.previous = desired.clone();
        Ok(ApplyStats {
            writes: input.written,
            deletes: input.deleted,
            rejected: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::nftables::{check_golden, sample_desired};
    use crate::desired::Backend;

    fn opts() -> RenderOptions {
        RenderOptions {
            cluster_cidr: Some("10.244.0.0/16".parse().unwrap()),
            masquerade_bit: 14,
        }
    }

    #[test]
    fn golden_sample_full() {
        let r = render::render(&sample_desired(), &opts());
        let input = render::restore_input(None, &r, &Rendering::default());
        check_golden("iptables_sample.restore", &input.text);
    }

    #[test]
    fn partial_sync_rewrites_only_changed_chains() {
        let d1 = sample_desired();
        let r1 = render::render(&d1, &opts());
        // Unchanged: only the top-level chains are rewritten.
        let same = render::restore_input(Some(&r1), &r1, &Rendering::default());
        assert_eq!(same.deleted, 0);
        assert!(!same.text.contains(":KPROXY-SVC-"));
        assert!(!same.text.contains(":KPROXY-SEP-"));

        // Remove the remote UDP DNS endpoint 10.244.3.9, and add one to the web ClusterIP.
        let mut d2 = d1.clone();
        let dns = d2.frontends.iter_mut().find(|f| f.port == 53).unwrap();
        let removed = dns.backends.pop().unwrap();
        let dns_f = dns.clone();
        let web = d2
            .frontends
            .iter_mut()
            .find(|f| f.address.to_string() == "10.96.0.10")
            .unwrap();
        let added = Backend {
            address: "10.244.4.4".parse().unwrap(),
            port: 8080,
            is_local: false,
        };
        web.backends.push(added.clone());
        let web_f = web.clone();
        let r2 = render::render(&d2, &opts());
        let p = render::restore_input(Some(&r1), &r2, &Rendering::default());

        let declared: Vec<&str> = p
            .text
            .lines()
            .filter_map(|l| l.strip_prefix(':'))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        let deleted: Vec<&str> = p
            .text
            .lines()
            .filter_map(|l| l.strip_prefix("-X "))
            .collect();
        let dns_sep_gone = render::endpoint_chain(&dns_f, &removed);
        let web_sep_new = render::endpoint_chain(&web_f, &added);
        let mut want_declared = vec![
            // filter
            "KPROXY-EXTERNAL-SERVICES".to_string(),
            "KPROXY-FIREWALL".into(),
            "KPROXY-NODEPORTS".into(),
            "KPROXY-SERVICES".into(),
        ];
        let mut nat: Vec<String> = vec![
            "KPROXY-MARK-MASQ".into(),
            "KPROXY-NODEPORTS".into(),
            "KPROXY-POSTROUTING".into(),
            web_sep_new.clone(),
            "KPROXY-SERVICES".into(),
            render::service_chain(&dns_f),
            render::service_chain(&web_f),
        ];
        nat.sort();
        nat.push(dns_sep_gone.clone());
        want_declared.extend(nat);
        assert_eq!(declared, want_declared, "{}", p.text);
        assert_eq!(deleted, vec![dns_sep_gone.as_str()]);
        assert_eq!(p.deleted, 1);
        // The other endpoint chains of the changed frontends are not rewritten.
        for b in &dns_f.backends {
            let name = render::endpoint_chain(&dns_f, b);
            assert!(!declared.contains(&name.as_str()), "{name}");
        }
        // A frontend that goes away takes its chains with it.
        let mut d3 = d2.clone();
        d3.frontends.retain(|f| f.port != 53);
        let r3 = render::render(&d3, &opts());
        let p3 = render::restore_input(Some(&r2), &r3, &Rendering::default());
        let deleted: Vec<&str> = p3
            .text
            .lines()
            .filter_map(|l| l.strip_prefix("-X "))
            .collect();
        let mut want = vec![render::service_chain(&dns_f)];
        want.extend(
            dns_f
                .backends
                .iter()
                .map(|b| render::endpoint_chain(&dns_f, b)),
        );
        want.sort();
        assert_eq!(deleted, want);
    }

    #[test]
    fn batches_only_jump_to_chains_already_written() {
        let mut d = sample_desired();
        let template = d.frontends[0].clone();
        for i in 0..300u32 {
            let mut f = template.clone();
            f.address = std::net::Ipv4Addr::from(0x0a64_0000 + i);
            f.service.name = format!("fill-{i}");
            d.frontends.push(f);
        }
        let next = render::render(&d, &opts());
        let plan = render::restore_plan(None, &next, &Rendering::default(), Some(50));
        assert!(plan.before.len() > 10, "{}", plan.before.len());
        let mut declared = std::collections::BTreeSet::new();
        for step in plan.steps() {
            let here: Vec<&str> = step
                .lines()
                .filter_map(|l| l.strip_prefix(':'))
                .map(|l| l.split(' ').next().unwrap())
                .collect();
            declared.extend(here.iter().map(|s| s.to_string()));
            for target in step.lines().filter_map(|l| l.split(" -j ").nth(1)) {
                if target.starts_with(render::PREFIX) {
                    assert!(declared.contains(target), "{target} before it exists");
                }
            }
        }
        let all: std::collections::BTreeSet<String> =
            next.nat.keys().chain(next.filter.keys()).cloned().collect();
        assert_eq!(declared, all);
        // The top-level chains come last, in one transaction per table.
        assert!(!plan.text.contains(":KPROXY-SEP-"), "{}", plan.text);
        assert!(plan.text.contains(":KPROXY-SERVICES"));
        // Unbatched, the same chains in one transaction per table.
        let one = render::restore_input(None, &next, &Rendering::default());
        assert!(one.before.is_empty() && one.after.is_empty());
        assert_eq!(one.written, plan.written);
        // Everything gone: deleted in batches, jumping chains first.
        let gone = render::restore_plan(
            Some(&next),
            &Rendering::default(),
            &Rendering::default(),
            Some(50),
        );
        let deleted: Vec<&str> = gone
            .steps()
            .flat_map(|s| s.lines())
            .filter_map(|l| l.strip_prefix("-X "))
            .collect();
        assert_eq!(deleted.len(), next.nat.len() + next.filter.len());
        let first_sep = deleted
            .iter()
            .position(|c| c.starts_with("KPROXY-SEP-"))
            .unwrap();
        let last_svc = deleted
            .iter()
            .rposition(|c| c.starts_with("KPROXY-SVC-"))
            .unwrap();
        assert!(last_svc < first_sep);
        assert_eq!(deleted.last(), Some(&render::MARK_MASQ));
    }

    #[test]
    fn chain_names_are_stable() {
        let d = sample_desired();
        let f = d
            .frontends
            .iter()
            .find(|f| f.address.to_string() == "10.96.0.10")
            .unwrap();
        let name = render::service_chain(f);
        assert_eq!(name.len(), "KPROXY-SVC-".len() + 16);
        assert!(
            name.len() <= 28,
            "iptables chain names are at most 28 characters"
        );
        // Pinned, so a change of the identity scheme (which would rewrite every chain on
        // upgrade) is a conscious one.
        assert_eq!(
            hash::frontend_identity(f),
            "default/web:http/TCP|ClusterIp|10.96.0.10:80"
        );
        assert_eq!(name, "KPROXY-SVC-TNCELF3SA663Q3PQ");
        let mut g = f.clone();
        g.backends.clear();
        assert_eq!(render::service_chain(&g), name);
        g.port = 81;
        assert_ne!(render::service_chain(&g), name);
    }

    #[test]
    fn parse_save_finds_chains_and_jumps() {
        let save = "*nat\n:PREROUTING ACCEPT [0:0]\n:KPROXY-SERVICES - [0:0]\n:KUBE-SERVICES - [0:0]\n\
                    -A PREROUTING -m comment --comment \"kproxy service portals\" -j KPROXY-SERVICES\n\
                    -A PREROUTING -j KUBE-SERVICES\nCOMMIT\n*filter\n:KPROXY-NODEPORTS - [0:0]\nCOMMIT\n";
        let (r, jumps) = render::parse_save(save);
        assert_eq!(r.nat.keys().collect::<Vec<_>>(), ["KPROXY-SERVICES"]);
        assert_eq!(r.filter.keys().collect::<Vec<_>>(), ["KPROXY-NODEPORTS"]);
        assert_eq!(jumps.len(), 1);
        assert_eq!(jumps[0].0, "nat");
    }
}
