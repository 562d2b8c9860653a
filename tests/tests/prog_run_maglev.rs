//! Maglev in the XDP program, through BPF_PROG_TEST_RUN: the map writer (as the agent runs
//! it) fills two independent sets of pinned maps ("two nodes"), and the program must pick
//! the same backend for a flow on both, and again for the same flow once its conntrack entry
//! is gone. Needs root.

use std::{collections::BTreeMap, net::Ipv4Addr};

use kproxy::{
    dataplane::ebpf::{maps::PinnedMaps, writer::MapWriter},
    desired::{
        Backend as DesiredBackend, DesiredState, Frontend, FrontendKind, Protocol, ServicePortName,
    },
};
use kproxy_tests::prog_run::*;
use proxy_common::{config::CFG_FLAG_READY, maglev::MAGLEV_TABLE_SIZE_DEFAULT};

const NODE: [u8; 4] = [10, 0, 0, 1];
const NODE_PORT: u16 = 30_080;
const BACKENDS: [[u8; 4]; 4] = [
    [10, 244, 1, 10],
    [10, 244, 1, 11],
    [10, 244, 2, 12],
    [10, 244, 3, 13],
];

fn frontend(kind: FrontendKind, address: Ipv4Addr, port: u16, backends: &[[u8; 4]]) -> Frontend {
    Frontend {
        service: ServicePortName {
            namespace: "default".into(),
            name: format!("svc-{port}"),
            port: String::new(),
            protocol: Protocol::Tcp,
        },
        kind,
        address,
        port,
        protocol: Protocol::Tcp,
        backends: backends
            .iter()
            .map(|a| DesiredBackend {
                address: Ipv4Addr::from(*a),
                port: 8080,
                is_local: true,
            })
            .collect(),
        affinity_timeout: None,
        source_ranges: None,
    }
}

/// A node whose maps the writer filled with Maglev on. `other_first` gives the node another
/// frontend first, so its backend ids and reverse-NAT indexes differ from a node without it.
/// `datapath_table_size` is what the programs are told (normally the same as `maglev`).
fn node_with(
    maglev: Option<u32>,
    datapath_table_size: u32,
    other_first: bool,
    backends: &[[u8; 4]],
) -> Fixture {
    let mut fx = Fixture::load();
    fx.set_config(CFG_FLAG_READY, 61_000, 65_000);
    let mut frontends = Vec::new();
    if other_first {
        frontends.push(frontend(
            FrontendKind::ClusterIp,
            Ipv4Addr::new(10, 96, 0, 1),
            443,
            &[[10, 244, 9, 9], [10, 244, 9, 8]],
        ));
    }
    frontends.push(frontend(
        FrontendKind::NodePort,
        Ipv4Addr::UNSPECIFIED,
        NODE_PORT,
        backends,
    ));
    let desired = DesiredState {
        frontends,
        nodeport_addresses: vec![Ipv4Addr::from(NODE)],
        ..DesiredState::default()
    };
    let mut maps = PinnedMaps::take(&mut fx.ebpf).expect("take the maps");
    maps.set_maglev_config(datapath_table_size).unwrap();
    let mut writer = MapWriter::new(maps);
    writer.set_maglev(maglev);
    writer.apply(&desired, true).expect("write the maps");
    // The maps stay referenced by the loaded programs; the writer's handles may go.
    drop(writer);
    fx
}

fn node(maglev: Option<u32>, other_first: bool, backends: &[[u8; 4]]) -> Fixture {
    node_with(maglev, maglev.unwrap_or(0), other_first, backends)
}

/// The backend address each of `flows` client ports is sent to.
fn backends_of(fx: &Fixture, flows: &[u16]) -> Vec<[u8; 4]> {
    flows
        .iter()
        .map(|&sport| {
            let syn = PacketSpec::tcp([192, 0, 2, 10], sport, NODE, NODE_PORT).build();
            let (ret, out) = fx.run(PROG_XDP, &syn);
            assert_eq!(ret, XDP_PASS, "translated packets go to the stack here");
            let p = parse(&out);
            assert_eq!(p.dport, 8080, "flow from port {sport} not translated");
            p.daddr
        })
        .collect()
}

#[test]
fn maglev_same_flow_same_backend_on_two_nodes_and_after_conntrack_loss() {
    let flows: Vec<u16> = (0..96).map(|i| 40_000 + i * 7).collect();
    let mut a = node(Some(MAGLEV_TABLE_SIZE_DEFAULT), false, &BACKENDS);
    let mut reversed = BACKENDS;
    reversed.reverse();
    let b = node(Some(MAGLEV_TABLE_SIZE_DEFAULT), true, &reversed);
    let on_a = backends_of(&a, &flows);
    let on_b = backends_of(&b, &flows);
    assert_eq!(on_a, on_b, "two nodes with the same backends disagree");
    a.ct_clear();
    let again = backends_of(&a, &flows);
    assert_eq!(
        on_a, again,
        "the same flow moved after its conntrack entry was lost"
    );
    // Spread over the backends (96 flows over 4: each gets some).
    let mut per_backend: BTreeMap<[u8; 4], usize> = BTreeMap::new();
    for be in &on_a {
        *per_backend.entry(*be).or_default() += 1;
    }
    assert_eq!(per_backend.len(), BACKENDS.len(), "{per_backend:?}");
}

#[test]
fn random_mode_nodes_disagree_and_a_missing_table_falls_back() {
    let flows: Vec<u16> = (0..96).map(|i| 40_000 + i * 7).collect();
    // Random selection: two nodes agree on a flow with probability 1/4 each; all 96 agreeing
    // would be a 4^-96 accident, so this shows the agreement above is Maglev's doing.
    let a = node(None, false, &BACKENDS);
    let b = node(None, false, &BACKENDS);
    assert_ne!(backends_of(&a, &flows), backends_of(&b, &flows));
    // Maglev on in the datapath but no table written (e.g. the map full): still served.
    let c = node_with(None, MAGLEV_TABLE_SIZE_DEFAULT, false, &BACKENDS);
    assert_eq!(backends_of(&c, &flows).len(), flows.len());
}
