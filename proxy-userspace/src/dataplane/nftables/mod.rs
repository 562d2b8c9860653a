//! The nftables dataplane: `table ip kproxy`, with kube-proxy's nftables-mode semantics
//! (verdict maps keyed by address/protocol/port, `numgen random` balancing, masquerade marks,
//! reject for frontends without endpoints). Every apply is one atomic `nft -f -` transaction:
//! a full one replaces the whole table (on start, when asked, after any error), a partial one
//! rewrites only the chains and map elements that changed; nothing changed, nothing is run.
//!
//! IPv6 frontends go to `table ip6 kproxy` of the same structure (`render6.rs`), replaced
//! as a whole when they change and removed when there are none.
//!
//! `localhost:nodePort` is not served (it would need
//! `net.ipv4.conf.all.route_localnet`, which kproxy does not set); `net.ipv4.ip_forward` is
//! the node's business.

pub mod render;
pub mod render6;

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use anyhow::Context as _;

pub use self::render::RenderOptions;
use super::{ApplyStats, Dataplane, conntrack_flush};
use crate::desired::DesiredState;

/// How the nftables dataplane is set up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NftablesSettings {
    pub render: RenderOptions,
}

pub struct NftablesDataplane {
    settings: NftablesSettings,
    /// What the table holds, as last applied successfully (None: not trusted, the next
    /// apply replaces the whole table).
    applied: Option<render::Model>,
    /// The state that rendering came from, for the stale UDP conntrack flush.
    previous: DesiredState,
    /// What `table ip6 kproxy` holds, as last applied successfully (None: not trusted,
    /// the next apply replaces or removes the whole table).
    applied6: Option<Table6>,
}

/// `table ip6 kproxy` as last applied.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Table6 {
    /// Removed: nothing IPv6 to serve.
    Absent,
    Present(render::Model),
}

impl NftablesDataplane {
    /// Checks that `nft` works here (see [`probe`]); programs nothing yet.
    pub fn new(settings: NftablesSettings) -> anyhow::Result<Self> {
        probe().context("nftables mode is not usable on this host")?;
        Ok(Self {
            settings,
            applied: None,
            previous: DesiredState::default(),
            applied6: None,
        })
    }

    pub fn settings(&self) -> &NftablesSettings {
        &self.settings
    }
}

/// Runs `program args` with `input` on stdin; the error carries its stderr.
pub(crate) fn run_with_stdin(program: &str, args: &[&str], input: &str) -> anyhow::Result<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program}"))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    // Write from a thread: a large input must not deadlock against a full stdout pipe.
    let input = input.to_string();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {program}"))?;
    let written = writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))?;
    if !out.status.success() {
        anyhow::bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    written.with_context(|| format!("writing to {program}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Can this host use the nftables mode? `nft list tables` must work, and the kernel must
/// accept (in a checked, never committed transaction) a table with every feature we use:
/// concatenated verdict maps, `numgen`, `fib`, `dnat`, `masquerade`, `reject`.
pub fn probe() -> anyhow::Result<()> {
    run_with_stdin("nft", &["list", "tables"], "").context("nft list tables")?;
    run_with_stdin("nft", &["--check", "-f", "-"], &render::render_probe())
        .context("the kernel does not accept kproxy's nftables features")?;
    Ok(())
}

/// Removes `table ip kproxy` and everything in it. Idempotent. Returns whether `nft` could
/// be run at all (false: no nft binary, nothing of ours can exist through it).
pub fn cleanup() -> anyhow::Result<bool> {
    if which_nft().is_none() {
        return Ok(false);
    }
    run_with_stdin("nft", &["-f", "-"], &render::render_cleanup())
        .context("deleting table ip kproxy")?;
    run_with_stdin("nft", &["-f", "-"], &render6::render_cleanup6())
        .context("deleting table ip6 kproxy")?;
    Ok(true)
}

fn which_nft() -> Option<()> {
    Command::new("nft")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .ok()
        .filter(|s| s.success())
        .map(|_| ())
}

impl Dataplane for NftablesDataplane {
    fn name(&self) -> &'static str {
        "nftables"
    }

    fn apply(&mut self, desired: &DesiredState, full: bool) -> anyhow::Result<ApplyStats> {
        let v6_changes = self.apply6(desired, full)?;
        let mut stats = self.apply4(desired, full)?;
        stats.writes += v6_changes;
        Ok(stats)
    }
}

impl NftablesDataplane {
    /// Makes `table ip6 kproxy` match `desired.frontends6`, as `apply4` does for the IPv4
    /// table (a partial transaction when it is trusted, so the affinity sets keep their
    /// clients; the table deleted when there is nothing IPv6 to serve). Returns the number
    /// of commands run.
    fn apply6(&mut self, desired: &DesiredState, full: bool) -> anyhow::Result<usize> {
        let bit = self.settings.render.masquerade_bit;
        let (next, text) = if desired.frontends6.is_empty() {
            if !full && self.applied6 == Some(Table6::Absent) {
                return Ok(0);
            }
            (Table6::Absent, render6::render_cleanup6())
        } else {
            let model = render6::model6(desired);
            let text = match (self.applied6.take(), full) {
                (Some(Table6::Present(prev)), false) => {
                    match render6::render_partial6(&prev, &model) {
                        Some(text) => text,
                        None => {
                            self.applied6 = Some(Table6::Present(prev));
                            return Ok(0);
                        }
                    }
                }
                _ => render6::render_model6(&model, bit),
            };
            (Table6::Present(model), text)
        };
        // On error `applied6` stays None: the next apply replaces the whole table.
        self.applied6 = None;
        run_with_stdin("nft", &["-f", "-"], &text).context("applying table ip6 kproxy")?;
        self.applied6 = Some(next);
        Ok(text.lines().count())
    }

    fn apply4(&mut self, desired: &DesiredState, full: bool) -> anyhow::Result<ApplyStats> {
        let next = render::model(desired, &self.settings.render);
        let text = match (self.applied.take(), full) {
            (Some(prev), false) => match render::render_partial(&prev, &next) {
                Some(text) => text,
                None => {
                    self.applied = Some(prev);
                    return Ok(ApplyStats::default());
                }
            },
            _ => render::render_model(&next, &self.settings.render),
        };
        // On error `applied` stays None: the next apply replaces the whole table.
        run_with_stdin("nft", &["-f", "-"], &text).context("applying table ip kproxy")?;
        self.applied = Some(next);
        let stale = conntrack_flush::StaleUdp::between(&self.previous, desired);
        conntrack_flush::flush_and_log(&stale, "nftables");
        self.previous = desired.clone();
        // Commands, not kernel objects: a rough measure of the work done.
        let count = |verb: &str| text.lines().filter(|l| l.starts_with(verb)).count();
        Ok(ApplyStats {
            writes: count("add "),
            deletes: count("delete "),
            rejected: Vec::new(),
        })
    }
}

/// A representative state for rendering tests: a ClusterIP with a local and a remote
/// endpoint, its NodePort, a Service without endpoints (ClusterIP and NodePort), a UDP
/// Service (with ClientIP affinity), an external IP, a LoadBalancer IP (with source ranges,
/// on its nodePort too).
#[cfg(test)]
pub(crate) fn sample_desired() -> DesiredState {
    use crate::desired::{Backend, Frontend, FrontendKind, Protocol, ServicePortName};
    let spn = |name: &str, port: &str, protocol| ServicePortName {
        namespace: "default".into(),
        name: name.into(),
        port: port.into(),
        protocol,
    };
    let be = |a: &str, port, is_local| Backend {
        address: a.parse().unwrap(),
        port,
        is_local,
    };
    let web = vec![be("10.244.1.5", 8080, true), be("10.244.2.7", 8080, false)];
    // The first range holds a node address: the LoadBalancer IP itself is allowed too.
    let ranges: Vec<crate::desired::Ipv4Cidr> = [("192.168.0.0", 16), ("203.0.113.0", 24)]
        .into_iter()
        .map(|(a, l)| crate::desired::Ipv4Cidr::new(a.parse().unwrap(), l).unwrap())
        .collect();
    let mut frontends = vec![
        Frontend {
            service: spn("web", "http", Protocol::Tcp),
            kind: FrontendKind::ClusterIp,
            address: "10.96.0.10".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
            backends: web.clone(),
            affinity_timeout: None,
            source_ranges: None,
        },
        Frontend {
            service: spn("web", "http", Protocol::Tcp),
            kind: FrontendKind::NodePort,
            address: "0.0.0.0".parse().unwrap(),
            port: 30080,
            protocol: Protocol::Tcp,
            backends: web.clone(),
            affinity_timeout: None,
            source_ranges: Some(ranges.clone()),
        },
        Frontend {
            service: spn("web", "http", Protocol::Tcp),
            kind: FrontendKind::ExternalIp,
            address: "203.0.113.10".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
            backends: web.clone(),
            affinity_timeout: None,
            source_ranges: None,
        },
        Frontend {
            service: spn("web", "http", Protocol::Tcp),
            kind: FrontendKind::LoadBalancer,
            address: "198.51.100.20".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
            backends: vec![be("10.244.1.5", 8080, true)],
            affinity_timeout: None,
            source_ranges: Some(ranges),
        },
        Frontend {
            service: spn("empty", "", Protocol::Tcp),
            kind: FrontendKind::ClusterIp,
            address: "10.96.0.20".parse().unwrap(),
            port: 443,
            protocol: Protocol::Tcp,
            backends: vec![],
            affinity_timeout: None,
            source_ranges: None,
        },
        Frontend {
            service: spn("empty", "", Protocol::Tcp),
            kind: FrontendKind::NodePort,
            address: "0.0.0.0".parse().unwrap(),
            port: 30443,
            protocol: Protocol::Tcp,
            backends: vec![],
            affinity_timeout: None,
            source_ranges: None,
        },
        Frontend {
            service: spn("dns", "dns", Protocol::Udp),
            kind: FrontendKind::ClusterIp,
            address: "10.96.0.53".parse().unwrap(),
            port: 53,
            protocol: Protocol::Udp,
            backends: vec![
                be("10.244.1.9", 5353, true),
                be("10.244.2.9", 5353, false),
                be("10.244.3.9", 5353, false),
            ],
            affinity_timeout: Some(10800),
            source_ranges: None,
        },
    ];
    frontends.sort_by_key(|f| f.key());
    DesiredState {
        frontends,
        nodeport_addresses: vec![
            "192.168.1.1".parse().unwrap(),
            "192.168.1.2".parse().unwrap(),
        ],
        ..DesiredState::default()
    }
}

/// Compares `actual` with the golden file `name` under this crate's `tests/golden/`;
/// `KPROXY_UPDATE_GOLDEN=1` rewrites it instead.
#[cfg(test)]
pub(crate) fn check_golden(name: &str, actual: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("KPROXY_UPDATE_GOLDEN").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "golden file {}: {e} (KPROXY_UPDATE_GOLDEN=1 writes it)",
            path.display()
        )
    });
    assert!(
        want == actual,
        "rendering differs from {} (KPROXY_UPDATE_GOLDEN=1 rewrites it):\n--- want\n{want}\n--- got\n{actual}",
        path.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> RenderOptions {
        RenderOptions {
            cluster_cidr: Some("10.244.0.0/16".parse().unwrap()),
            masquerade_bit: 14,
        }
    }

    #[test]
    fn golden_sample() {
        check_golden(
            "nftables_sample.nft",
            &render::render(&sample_desired(), &opts()),
        );
    }

    #[test]
    fn partial_touches_only_what_changed() {
        let d1 = sample_desired();
        let m1 = render::model(&d1, &opts());
        assert_eq!(render::render_partial(&m1, &m1), None);
        // The remote DNS endpoint goes away; the empty service gets an endpoint.
        let mut d2 = d1.clone();
        for f in &mut d2.frontends {
            if f.service.name == "dns" {
                f.backends.pop();
            }
            if f.service.name == "empty" && f.kind == crate::desired::FrontendKind::ClusterIp {
                f.backends.push(crate::desired::Backend {
                    address: "10.244.1.20".parse().unwrap(),
                    port: 443,
                    is_local: true,
                });
            }
        }
        let m2 = render::model(&d2, &opts());
        let text = render::render_partial(&m1, &m2).unwrap();
        check_golden("nftables_partial.nft", &text);
        // Untouched: the web chains and elements.
        assert!(!text.contains("default/web"), "{text}");
        // Back again.
        let back = render::render_partial(&m2, &m1).unwrap();
        assert!(back.contains("delete chain ip kproxy svc-"), "{back}");
    }

    #[test]
    fn golden_empty_without_cluster_cidr() {
        check_golden(
            "nftables_empty.nft",
            &render::render(&DesiredState::default(), &RenderOptions::default()),
        );
    }

    #[test]
    fn chain_names_are_stable_and_distinct() {
        let d = sample_desired();
        let names: Vec<String> = d.frontends.iter().map(render::service_chain).collect();
        let again: Vec<String> = sample_desired()
            .frontends
            .iter()
            .map(render::service_chain)
            .collect();
        assert_eq!(names, again);
        let unique: std::collections::BTreeSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len());
        // A change of backends does not rename the service chain; endpoint chains of the
        // same address under two frontends differ.
        let mut f = d.frontends[0].clone();
        let before = render::service_chain(&f);
        f.backends.pop();
        assert_eq!(render::service_chain(&f), before);
        let web_cluster = d.frontends.iter().find(|f| f.port == 80).unwrap();
        let web_node = d.frontends.iter().find(|f| f.port == 30080).unwrap();
        let b = &web_cluster.backends[0];
        assert_ne!(
            render::endpoint_chain(web_cluster, b),
            render::endpoint_chain(web_node, b)
        );
        for n in &names {
            assert!(n.len() < 256, "{n}");
        }
    }
}
