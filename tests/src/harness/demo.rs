//! `cargo xtask demo`: a one-node cluster with pods pod-a and pod-b behind the example
//! Service, served by kproxy; shows which pod answers via the nodePort (from an outside
//! client) and via the cluster IP (from a pod), then replaces pod-b by pod-c and shows the
//! traffic moving. Everything is removed at the end (also on error or Ctrl-C's unwinding).

use std::{thread, time::Duration};

use anyhow::{Context, Result, bail};

use super::{
    Cluster, PodSpec, fixtures,
    manifests::seed,
    probe::{self, CurlResult},
    sys,
};

fn show_round(place: &sys::Place, url: &str, n: usize) -> Result<()> {
    println!("\n  {} -> {url}", place.label);
    for i in 1..=n {
        let r: CurlResult = probe::curl(place, url, Duration::from_secs(2))?;
        match (r.pod(), r.seen_source()) {
            (Some(pod), Some(src)) => {
                println!("    request {i}: answered by {pod} (it saw the client as {src})")
            }
            _ => println!("    request {i}: FAILED ({})", r.stderr.trim()),
        }
    }
    Ok(())
}

pub fn run() -> Result<()> {
    println!("kproxy demo: a one-node cluster made of network namespaces\n");
    let testpod = super::testpod_bin()?;
    let mut c = Cluster::builder()
        .nodes(1)
        .testpod(&testpod)
        .pod(PodSpec::new("pod-a", 1))
        .pod(PodSpec::new("pod-b", 1))
        .pod(PodSpec::new("pod-c", 1))
        .pod(PodSpec::new("client-pod", 1).http_ports(&[]))
        .build()
        .context("building the demo cluster")?;
    println!("  client     198.18.0.100   (an outside host on the lan)");
    println!("  node1      {}      (runs kproxy)", c.node_ip(1));
    for p in ["pod-a", "pod-b", "pod-c", "client-pod"] {
        println!(
            "  {p:<10} {:<14} (a pod on node1{})",
            c.pod_ip(p),
            if p == "pod-c" {
                ", not in the Service yet"
            } else {
                ""
            }
        );
    }
    println!(
        "\nService mysvc: NodePort, {}:{} -> pods' port 80, nodePort {}; endpoints pod-a, pod-b",
        seed::MYSVC_IP,
        seed::MYSVC_PORT,
        seed::MYSVC_NODEPORT
    );
    fixtures::write_mysvc(&c, &["pod-a", "pod-b"])?;
    c.start_agent(1)?;
    c.wait_healthy(1, Duration::from_secs(30))
        .context("waiting for kproxy to sync")?;
    println!("kproxy is running on node1 and reports healthy (/healthz 200)");

    let nodeport = format!("http://{}:{}/", c.node_ip(1), seed::MYSVC_NODEPORT);
    let cluster_ip = format!("http://{}:{}/", seed::MYSVC_IP, seed::MYSVC_PORT);
    show_round(&c.client(), &nodeport, 6)?;
    show_round(&c.pod("client-pod"), &cluster_ip, 6)?;

    println!("\npod-b dies, and its EndpointSlice entry is replaced by pod-c");
    c.kill_pod("pod-b")?;
    let t0 = fixtures::write_mysvc(&c, &["pod-a", "pod-c"])?;
    let seen = sys::wait_for(Duration::from_secs(5), Duration::from_millis(20), || {
        probe::curl(&c.client(), &nodeport, Duration::from_secs(1))
            .ok()
            .filter(|r| r.pod() == Some("pod-c"))
            .map(|_| sys::epoch_ms())
    });
    match seen {
        Some(t) => println!(
            "  first answer from pod-c {} ms after the manifest was replaced",
            t.saturating_sub(t0)
        ),
        None => println!("  pod-c did not answer within 5 s"),
    }
    thread::sleep(Duration::from_millis(200));
    show_round(&c.client(), &nodeport, 6)?;
    show_round(&c.pod("client-pod"), &cluster_ip, 6)?;

    if !c.agent_running(1) {
        bail!("kproxy exited during the demo:\n{}", c.logs());
    }
    println!("\nstopping kproxy and removing the cluster");
    c.stop_agent(1);
    let out = c.agent_cleanup(1)?;
    println!(
        "  kproxy cleanup: {}",
        if out.status.success() { "ok" } else { "FAILED" }
    );
    drop(c);
    println!("done");
    Ok(())
}
