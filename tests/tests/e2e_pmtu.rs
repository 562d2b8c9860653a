//! Path-MTU discovery through a nodePort: a client uploads 600 KB (Linux TCP sets DF) to a
//! nodePort whose pod sits behind a link with a smaller MTU (the node's end of the pod's
//! veth at 1200). The node cannot forward the client's 1500-byte segments and sends
//! "fragmentation needed" quoting the translated packet (client -> pod:9000); the egress
//! program rewrites it to quote client -> node:30900, so the client's TCP finds its socket,
//! lowers its MSS and the upload completes. Without the rewrite the client ignores the
//! error and the upload stalls (a PMTU black hole). Shown by: the upload completing, the
//! client's route cache holding MTU 1200 for the node's address, and the agent's
//! `translated_icmp_error` counter.

use std::{fs, time::Duration};

use kproxy_tests::harness::{
    Cluster, PodSpec,
    manifests::{EndpointSlice, Object, Protocol, Service},
    sys,
};

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");
const POD: &str = "pod-up";
const PORT: u16 = 9000;
const NODE_PORT: u16 = 30900;
const POD_LINK_MTU: u32 = 1200;
const UPLOAD_BYTES: usize = 600 * 1024;

/// `kproxy_datapath_events_total{reason}` from node1's agent.
fn event_count(c: &Cluster, reason: &str) -> f64 {
    let series = format!("kproxy_datapath_events_total{{reason=\"{reason}\"}}");
    c.metrics(1)
        .get(&series)
        .copied()
        .unwrap_or_else(|| c.fail(format!("{series} missing from /metrics")))
}

#[test]
fn upload_through_a_nodeport_to_a_smaller_mtu_pod_link_completes() {
    sys::require_tools(&["socat"]).expect("socat");
    let mut c = Cluster::builder()
        .nodes(1)
        .testpod(TESTPOD)
        .pod(PodSpec::new(POD, 1).http_ports(&[]))
        .build()
        .expect("building the cluster");
    let pod_ip = c.pod_ip(POD);
    // The sink answers with the number of bytes it read once the client half-closes.
    let listen = format!("TCP-LISTEN:{PORT},bind={pod_ip},fork,reuseaddr");
    let place = c.pod(POD);
    c.spawn(&place, "upload sink", &["socat", &listen, "SYSTEM:wc -c"])
        .expect("starting the sink");
    let objects: Vec<Object> = vec![
        Service::node_port("upload", "10.96.100.90")
            .selector("upload")
            .port("up", Protocol::Tcp, PORT, PORT, Some(NODE_PORT))
            .into(),
        EndpointSlice::for_service("upload")
            .port("up", Protocol::Tcp, PORT)
            .endpoint(c.endpoint(POD))
            .into(),
    ];
    c.write_manifests("upload.yaml", &objects)
        .expect("manifests");
    c.start_agent_ready(1).expect("starting the agent");

    // The node's end of the pod's veth gets the smaller MTU (the pod still advertises a
    // 1460-byte MSS, so only PMTU discovery can save the upload).
    let node = c.node(1);
    let route = node
        .output(&["ip", "-o", "route", "get", &pod_ip.to_string()])
        .expect("ip route get");
    let route = String::from_utf8_lossy(&route.stdout).into_owned();
    let dev = route
        .split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)
        .unwrap_or_else(|| c.fail(format!("no device in {route:?}")))
        .to_string();
    let mtu = POD_LINK_MTU.to_string();
    let out = node
        .output(&["ip", "link", "set", "dev", &dev, "mtu", &mtu])
        .expect("ip link set mtu");
    c.check(out.status.success(), || {
        format!("setting the MTU of {dev}: {out:?}")
    });

    let icmp_before = event_count(&c, "translated_icmp_error");
    let file = c.tmp_dir().join("upload.bin");
    let body: Vec<u8> = (0..UPLOAD_BYTES).map(|i| (i * 31 % 251) as u8).collect();
    fs::write(&file, &body).expect("writing the upload");
    let node_ip = c.node_ip(1);
    let cmd = format!(
        "socat -t 60 -T 60 - TCP:{node_ip}:{NODE_PORT} < {}",
        file.display()
    );
    let started = std::time::Instant::now();
    let out = c
        .client()
        .output_timeout(&["sh", "-c", &cmd], Duration::from_secs(90))
        .expect("running the upload");
    let took = started.elapsed();
    let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
    println!("upload of {UPLOAD_BYTES} bytes: sink read {got:?} in {took:?}");
    c.check(got == UPLOAD_BYTES.to_string(), || {
        format!(
            "the upload did not complete: sink read {got:?} (stderr {:?})",
            String::from_utf8_lossy(&out.stderr)
        )
    });

    // The client learned the smaller MTU for the nodePort's address: it took the error as
    // being about its own connection.
    let cached = c
        .client()
        .output(&["ip", "route", "get", &node_ip.to_string()])
        .expect("ip route get");
    let cached = String::from_utf8_lossy(&cached.stdout).into_owned();
    println!("client route cache: {}", cached.trim());
    c.check(cached.contains(&format!("mtu {POD_LINK_MTU}")), || {
        format!("the client has no PMTU of {POD_LINK_MTU} for {node_ip}: {cached:?}")
    });
    let icmp_after = event_count(&c, "translated_icmp_error");
    println!("translated_icmp_error: {icmp_before} -> {icmp_after}");
    c.check(icmp_after > icmp_before, || {
        "no ICMP error was translated".to_string()
    });
}
