//! The seed cluster most scenarios start from.

use anyhow::Result;

use super::{
    Cluster, PodSpec,
    manifests::{Object, seed},
};

/// Name of the pod that only runs clients (no servers).
pub const CLIENT_POD: &str = "pod-z";

/// One node with pods `pod-a`, `pod-b`, `pod-c` (nginx on 80 and 8081, `udp-serve` on 5353)
/// and the client-only pod `pod-z`, all on node1.
pub fn one_node(testpod: &str) -> Result<Cluster> {
    let web = |name: &str| {
        PodSpec::new(name, 1)
            .http_ports(&[80, 8081])
            .udp(seed::DNS_TARGET_PORT)
    };
    Cluster::builder()
        .nodes(1)
        .testpod(testpod)
        .pod(web("pod-a"))
        .pod(web("pod-b"))
        .pod(web("pod-c"))
        .pod(PodSpec::new(CLIENT_POD, 1).http_ports(&[]))
        .build()
}

/// Writes `mysvc.yaml` (mysvc + its slice with `web` pods) and `dns.yaml` (dns + its slice
/// with `dns` pods). Returns the epoch ms of the last rename.
pub fn write_seed(c: &Cluster, web: &[&str], dns: &[&str]) -> Result<u64> {
    write_mysvc(c, web)?;
    write_dns(c, dns)
}

pub fn write_mysvc(c: &Cluster, web: &[&str]) -> Result<u64> {
    let objs: Vec<Object> = vec![
        seed::mysvc().into(),
        seed::mysvc_slice(web.iter().map(|p| c.endpoint(p))).into(),
    ];
    c.write_manifests("mysvc.yaml", &objs)
}

pub fn write_dns(c: &Cluster, dns: &[&str]) -> Result<u64> {
    let objs: Vec<Object> = vec![
        seed::dns().into(),
        seed::dns_slice(dns.iter().map(|p| c.endpoint(p))).into(),
    ];
    c.write_manifests("dns.yaml", &objs)
}
