//! Operator commands that read the dataplane straight from the maps and links pinned under
//! a bpf root, whether or not the agent runs: `kproxy list ...`, `kproxy status`,
//! `kproxy trace`. One concept per module; each renders a table (humans) or JSON (scripts).

pub mod affinity;
pub mod backends;
pub mod conntrack;
pub mod maps;
pub mod services;
pub mod services6;
pub mod status;
pub mod table;
pub mod trace;
pub mod trace_policy;

use std::io::Write as _;

use anyhow::Context as _;
use proxy_common::{
    conntrack::{Ct4Entry, Ct4Key},
    maps as names,
};
use serde::Serialize;

use crate::cli::{ConntrackArgs, ListCommand, OutputFormat, StatusArgs, TraceArgs};

/// Writes to stdout; a closed pipe (`| head`) is not an error.
fn print(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing stdout"),
        _ => Ok(()),
    }
}

fn emit<T: Serialize>(
    format: OutputFormat,
    value: &T,
    table: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    match format {
        OutputFormat::Table => print(&table(value)),
        OutputFormat::Json => {
            let mut s = serde_json::to_string_pretty(value)?;
            s.push('\n');
            print(&s)
        }
    }
}

pub fn list(cmd: &ListCommand) -> anyhow::Result<()> {
    match cmd {
        ListCommand::Services(a) => {
            let snap = maps::LbSnapshot::read(&a.bpf_root)?;
            let mut entries = services::list(&snap);
            // Pins of an agent without IPv6 maps: no IPv6 rows.
            if let Ok(snap6) = services6::Lb6Snapshot::read(&a.bpf_root) {
                entries.extend(services6::list6(&snap6));
            }
            emit(a.output, &entries, |v| services::render(v))
        }
        ListCommand::Backends(a) => {
            let snap = maps::LbSnapshot::read(&a.bpf_root)?;
            emit(a.output, &backends::list(&snap), |v| backends::render(v))
        }
        ListCommand::Conntrack(a) => list_conntrack(a),
        ListCommand::Affinity(a) => emit(a.output, &affinity::list(&a.bpf_root)?, affinity::render),
    }
}

fn list_conntrack(a: &ConntrackArgs) -> anyhow::Result<()> {
    let filter = conntrack::Filter {
        service: a.service,
        backend: a.backend,
        client: a.client,
    };
    let ct = conntrack::read(&a.common.bpf_root, &filter)?;
    emit(a.common.output, &ct, conntrack::render)
}

pub fn status(a: &StatusArgs) -> anyhow::Result<()> {
    let s = status::collect(&a.common.bpf_root, a.healthz_address);
    emit(a.common.output, &s, status::render)
}

pub fn trace(a: &TraceArgs) -> anyhow::Result<()> {
    let root = &a.common.bpf_root;
    let (src, dst) = match (a.src, a.dst) {
        (
            src,
            trace::AnyDestination::V6 {
                address,
                port,
                proto,
            },
        ) => {
            let snap6 = services6::Lb6Snapshot::read(root)?;
            let t = services6::trace6(&snap6, src.address(), address, port, proto);
            return emit(a.common.output, &t, trace::render);
        }
        (trace::AnySource::V4(src), trace::AnyDestination::V4(dst)) => (src, dst),
        (trace::AnySource::V6(src), trace::AnyDestination::V4(dst)) => {
            anyhow::bail!("source {src} is IPv6 but destination {dst} is IPv4: give one family")
        }
    };
    let snap = maps::LbSnapshot::read(root)?;
    let ct = maps::read_hash::<Ct4Key, Ct4Entry>(root, names::CT4)?;
    let now = maps::monotonic_ns();
    let mut t = trace::trace(&snap, &ct, src, dst, now);
    // Pins of an agent older than these maps: the policies are simply not shown.
    let affinity = maps::read_hash(root, names::LB4_AFFINITY).unwrap_or_default();
    let ranges = maps::read_src_ranges(root).unwrap_or_default();
    trace_policy::apply(&mut t, &snap, src, &affinity, &ranges, now);
    emit(a.common.output, &t, trace::render)
}
