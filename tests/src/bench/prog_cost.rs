//! Per-packet cost of the XDP program, measured in the kernel with BPF_PROG_TEST_RUN and
//! `repeat`, with the maps written by the agent's own map writer for 1 and 10,000 Services.

use std::{net::Ipv4Addr, time::Instant};

use anyhow::{Context as _, Result};
use kproxy::{
    dataplane::ebpf::{maglev, maps::PinnedMaps, writer::MapWriter},
    desired::{Backend, DesiredState, Frontend, FrontendKind, Protocol, ServicePortName},
};
use proxy_common::{config::CFG_FLAG_READY, maglev::MAGLEV_TABLE_SIZE_DEFAULT};
use serde::Serialize;

use crate::prog_run::{Fixture, PROG_XDP, PacketSpec, bpf_prog_test_run_repeat};

const NODE: [u8; 4] = [10, 0, 0, 1];
const NODE_PORT: u16 = 30_900;

#[derive(Clone, Debug, Serialize)]
pub struct ProgCost {
    pub services: usize,
    pub backends: usize,
    /// Average ns per run of a UDP packet of an established flow to a nodePort.
    pub ns_per_packet: f64,
    pub repeat: u32,
    /// The map writer alone (no agent): every map written from empty, ms.
    pub writer_full_ms: f64,
    /// The map writer alone: one endpoint of one Service changed, ms.
    pub writer_change_ms: f64,
    /// The same change back as a partial apply (only that frontend's entries), ms.
    pub writer_partial_ms: f64,
}

fn frontend(
    name: String,
    kind: FrontendKind,
    address: Ipv4Addr,
    port: u16,
    backends: Vec<Backend>,
) -> Frontend {
    Frontend {
        service: ServicePortName {
            namespace: "bench".into(),
            name,
            port: String::new(),
            protocol: Protocol::Udp,
        },
        kind,
        address,
        port,
        protocol: Protocol::Udp,
        backends,
        affinity_timeout: None,
        source_ranges: None,
    }
}

/// The nodePort under test plus `services - 1` cluster IPs with 10 endpoints each.
fn desired(services: usize) -> DesiredState {
    let mut frontends = vec![frontend(
        "np".into(),
        FrontendKind::NodePort,
        Ipv4Addr::UNSPECIFIED,
        NODE_PORT,
        vec![Backend {
            address: Ipv4Addr::new(10, 244, 1, 10),
            port: 9000,
            is_local: true,
        }],
    )];
    for i in 1..services {
        let backends = (0..10)
            .map(|e| Backend {
                address: Ipv4Addr::from(0x0af0_0000 + (i * 10 + e) as u32),
                port: 8080,
                is_local: false,
            })
            .collect();
        frontends.push(frontend(
            format!("fill-{i}"),
            FrontendKind::ClusterIp,
            Ipv4Addr::from(0x0a64_0000 + i as u32),
            80,
            backends,
        ));
    }
    DesiredState {
        frontends,
        nodeport_addresses: vec![Ipv4Addr::from(NODE)],
        ..DesiredState::default()
    }
}

fn one(services: usize, repeat: u32) -> Result<ProgCost> {
    let mut fx = Fixture::load();
    fx.set_config(CFG_FLAG_READY, 61_000, 65_000);
    let state = desired(services);
    let capacity = PinnedMaps::capacity(&fx.ebpf)?;
    let mut maps = PinnedMaps::take(&mut fx.ebpf)?;
    maps.set_maglev_config(MAGLEV_TABLE_SIZE_DEFAULT)?;
    let mut writer = MapWriter::with_capacity(maps, capacity);
    writer.set_maglev(Some(MAGLEV_TABLE_SIZE_DEFAULT));
    let t = Instant::now();
    let out = writer.apply(&state, true)?;
    let writer_full_ms = t.elapsed().as_secs_f64() * 1000.0;
    anyhow::ensure!(
        out.stats.rejected.is_empty(),
        "rejected: {:?}",
        out.stats.rejected
    );
    let mut changed = state.clone();
    if let Some(f) = changed.frontends.last_mut() {
        f.backends[0].address = Ipv4Addr::new(10, 239, 255, 254);
    }
    let t = Instant::now();
    writer.apply(&changed, false)?;
    let writer_change_ms = t.elapsed().as_secs_f64() * 1000.0;
    let keys = state
        .frontends
        .last()
        .map(|f| f.key())
        .into_iter()
        .collect();
    let t = Instant::now();
    let partial = writer.apply_changed(&state, &keys)?;
    let writer_partial_ms = t.elapsed().as_secs_f64() * 1000.0;
    anyhow::ensure!(
        partial.is_some(),
        "the partial apply fell back to a whole one"
    );
    let mut pkt = PacketSpec::udp([192, 0, 2, 10], 40_000, NODE, NODE_PORT);
    pkt.payload = vec![0; 18];
    let bytes = pkt.build();
    let fd = fx.prog_fd(PROG_XDP);
    // Warm up (creates the flow's conntrack entry), then measure.
    bpf_prog_test_run_repeat(fd, &bytes, 1000).context("BPF_PROG_TEST_RUN")?;
    let mut best = u32::MAX;
    for _ in 0..3 {
        let (_, ns) = bpf_prog_test_run_repeat(fd, &bytes, repeat).context("BPF_PROG_TEST_RUN")?;
        best = best.min(ns);
    }
    Ok(ProgCost {
        services,
        backends: state.frontends.iter().map(|f| f.backends.len()).sum(),
        ns_per_packet: f64::from(best),
        repeat,
        writer_full_ms,
        writer_change_ms,
        writer_partial_ms,
    })
}

/// The cost with 1, 1,000 and 10,000 Services (the best of three runs each).
pub fn measure(repeat: u32) -> Result<Vec<ProgCost>> {
    [1, 1000, 10_000]
        .into_iter()
        .map(|n| one(n, repeat))
        .collect()
}

/// Time to compute one Maglev table (M = 16381) for 10 backends, in ms (userspace).
pub fn maglev_table_ms() -> f64 {
    let ids: Vec<[u8; 6]> = (0..10u32)
        .map(|i| maglev::backend_identity(Ipv4Addr::from(0x0af4_0000 + i), 80))
        .collect();
    let t = Instant::now();
    let n = 20;
    for _ in 0..n {
        std::hint::black_box(maglev::table(&ids, MAGLEV_TABLE_SIZE_DEFAULT));
    }
    t.elapsed().as_secs_f64() * 1000.0 / f64::from(n)
}
