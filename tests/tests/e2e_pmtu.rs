//! Path-MTU discovery through a nodePort: a client uploads 600 KB (Linux TCP sets DF; IPv6
//! never fragments in flight) to a nodePort whose pod sits behind a link with a smaller MTU
//! (the pod-side node's end of the pod's veth). That node cannot forward the client's
//! 1500-byte segments and sends "fragmentation needed" (IPv4) or Packet Too Big (IPv6)
//! quoting the translated packet (client, or the node's SNAT address for a pod on another
//! node, -> pod:9000); kproxy rewrites it to quote client -> node:30900, so the client's TCP
//! finds its socket, lowers its MSS and the upload completes. Without the rewrite the client
//! ignores the error and the upload stalls (a PMTU black hole). Shown by: the upload
//! completing, the client's route cache holding the smaller MTU for the node's address, and
//! the agent's `translated_icmp_error` counter.
//!
//! Cases: IPv4 with a local pod (the error leaves through the tc egress program); IPv6 with
//! a local pod (the same, ICMPv6) and IPv6 with a pod on another node (the error arrives for
//! the node's SNAT address and is rewritten by the XDP ingress program).

use std::{fs, time::Duration};

use kproxy_tests::harness::{
    Cluster, PodSpec,
    cluster::node_ip6,
    manifests::{EndpointSlice, Object, Protocol, Service},
    sys,
};

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");
const POD: &str = "pod-up";
const PORT: u16 = 9000;
const NODE_PORT: u16 = 30900;
const CIP4: &str = "10.96.100.90";
const CIP6: &str = "fd00:10:96::90";
const UPLOAD_BYTES: usize = 600 * 1024;

/// The address family of a scenario.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Family {
    V4,
    V6,
}

/// `kproxy_datapath_events_total{reason}` from node1's agent.
fn event_count(c: &Cluster, reason: &str) -> f64 {
    let series = format!("kproxy_datapath_events_total{{reason=\"{reason}\"}}");
    c.metrics(1)
        .get(&series)
        .copied()
        .unwrap_or_else(|| c.fail(format!("{series} missing from /metrics")))
}

/// A cluster of `nodes` with the upload sink pod on node `pod_node` and the nodePort
/// NODE_PORT -> pod:PORT over `family`'s endpoints; node1's agent is running.
fn upload_cluster(family: Family, nodes: u8, pod_node: u8) -> Cluster {
    let mut b = Cluster::builder()
        .nodes(nodes)
        .testpod(TESTPOD)
        .pod(PodSpec::new(POD, pod_node).http_ports(&[]));
    if family == Family::V6 {
        b = b.dual_stack();
    }
    let mut c = b.build().expect("building the cluster");
    // The sink answers with the number of bytes it read once the client half-closes.
    let listen = match family {
        Family::V4 => format!("TCP-LISTEN:{PORT},bind={},fork,reuseaddr", c.pod_ip(POD)),
        Family::V6 => format!(
            "TCP6-LISTEN:{PORT},bind=[{}],fork,reuseaddr",
            c.pod_ip6(POD)
        ),
    };
    let place = c.pod(POD);
    c.spawn(&place, "upload sink", &["socat", &listen, "SYSTEM:wc -c"])
        .expect("starting the sink");
    let svc = Service::node_port("upload", CIP4).selector("upload");
    let svc = match family {
        Family::V4 => svc,
        Family::V6 => svc.dual_stack(CIP6),
    };
    let slice = EndpointSlice::for_service("upload").port("up", Protocol::Tcp, PORT);
    let slice = match family {
        Family::V4 => slice.endpoint(c.endpoint(POD)),
        Family::V6 => slice.named("upload-v6").ipv6().endpoint(c.endpoint6(POD)),
    };
    let objects: Vec<Object> = vec![
        svc.port("up", Protocol::Tcp, PORT, PORT, Some(NODE_PORT))
            .into(),
        slice.into(),
    ];
    c.write_manifests("upload.yaml", &objects)
        .expect("manifests");
    c.start_agent_ready(1).expect("starting the agent");
    c
}

/// Sets the MTU of the pod-side node's end of the pod's veth (the pod still advertises its
/// 1500-byte link's MSS, so only PMTU discovery can save the upload).
fn narrow_pod_link(c: &Cluster, family: Family, mtu: u32) {
    let pod_addr = match family {
        Family::V4 => c.pod_ip(POD).to_string(),
        Family::V6 => c.pod_ip6(POD).to_string(),
    };
    let node = c.node(c.pod_node(POD));
    let route = node
        .output(&["ip", "-o", "route", "get", &pod_addr])
        .expect("ip route get");
    let route = String::from_utf8_lossy(&route.stdout).into_owned();
    let dev = route
        .split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)
        .unwrap_or_else(|| c.fail(format!("no device in {route:?}")))
        .to_string();
    let mtu = mtu.to_string();
    let out = node
        .output(&["ip", "link", "set", "dev", &dev, "mtu", &mtu])
        .expect("ip link set mtu");
    c.check(out.status.success(), || {
        format!("setting the MTU of {dev}: {out:?}")
    });
}

/// Uploads UPLOAD_BYTES from the client to node1's nodePort over `family` and asserts the
/// sink read all of it, the client cached `mtu` for the node's address, and node1's agent
/// translated at least one ICMP error.
fn assert_upload_learns_mtu(c: &Cluster, family: Family, mtu: u32) {
    let icmp_before = event_count(c, "translated_icmp_error");
    let file = c.tmp_dir().join("upload.bin");
    let body: Vec<u8> = (0..UPLOAD_BYTES).map(|i| (i * 31 % 251) as u8).collect();
    fs::write(&file, &body).expect("writing the upload");
    let (node_addr, target) = match family {
        Family::V4 => {
            let a = c.node_ip(1).to_string();
            let t = format!("TCP:{a}:{NODE_PORT}");
            (a, t)
        }
        Family::V6 => {
            let a = node_ip6(1).to_string();
            let t = format!("TCP6:[{a}]:{NODE_PORT}");
            (a, t)
        }
    };
    let cmd = format!("socat -t 60 -T 60 - {target} < {}", file.display());
    let started = std::time::Instant::now();
    let out = c
        .client()
        .output_timeout(&["sh", "-c", &cmd], Duration::from_secs(90))
        .expect("running the upload");
    let took = started.elapsed();
    let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
    println!("{family:?} upload of {UPLOAD_BYTES} bytes: sink read {got:?} in {took:?}");
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
        .output(&["ip", "route", "get", &node_addr])
        .expect("ip route get");
    let cached = String::from_utf8_lossy(&cached.stdout).into_owned();
    println!("client route cache: {}", cached.trim());
    c.check(cached.contains(&format!("mtu {mtu}")), || {
        format!("the client has no PMTU of {mtu} for {node_addr}: {cached:?}")
    });
    let icmp_after = event_count(c, "translated_icmp_error");
    println!("translated_icmp_error: {icmp_before} -> {icmp_after}");
    c.check(icmp_after > icmp_before, || {
        "no ICMP error was translated".to_string()
    });
}

#[test]
fn upload_through_a_nodeport_to_a_smaller_mtu_pod_link_completes() {
    sys::require_tools(&["socat"]).expect("socat");
    let c = upload_cluster(Family::V4, 1, 1);
    narrow_pod_link(&c, Family::V4, 1200);
    assert_upload_learns_mtu(&c, Family::V4, 1200);
}

/// IPv6's minimum MTU (1280) on the local pod's link: the node's Packet Too Big leaves
/// through the tc egress program, rewritten.
#[test]
fn ipv6_upload_through_a_nodeport_to_a_smaller_mtu_pod_link_completes() {
    sys::require_tools(&["socat"]).expect("socat");
    let c = upload_cluster(Family::V6, 1, 1);
    narrow_pod_link(&c, Family::V6, 1280);
    assert_upload_learns_mtu(&c, Family::V6, 1280);
}

/// The pod on node2 (the flow SNATed to node1's IPv6 address): node2's Packet Too Big goes
/// to node1's address and is rewritten by node1's XDP ingress program on its way to the
/// client.
#[test]
fn ipv6_upload_to_a_remote_pod_behind_a_smaller_mtu_link_completes() {
    sys::require_tools(&["socat"]).expect("socat");
    let c = upload_cluster(Family::V6, 2, 2);
    narrow_pod_link(&c, Family::V6, 1280);
    assert_upload_learns_mtu(&c, Family::V6, 1280);
}
