//! Self-test of the e2e harness (no agent needed): a 2-node cluster has direct pod-IP
//! connectivity (node->pod, pod->pod on one node and across nodes), processes land in the
//! right cgroup, and everything is removed afterwards, also when the test panics.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use kproxy_tests::harness::{Cluster, PodSpec, sys};

fn two_nodes() -> Cluster {
    Cluster::builder()
        .nodes(2)
        .testpod(env!("CARGO_BIN_EXE_kproxy-testpod"))
        .pod(PodSpec::new("pod-a", 1).udp(5353))
        .pod(PodSpec::new("pod-b", 1))
        .pod(PodSpec::new("pod-c", 2).http_ports(&[80, 8081]))
        .build()
        .expect("building the cluster")
}

struct Leftovers {
    id: String,
    tmp: PathBuf,
    cgroup_parent: PathBuf,
}

impl Leftovers {
    fn of(c: &Cluster) -> Leftovers {
        Leftovers {
            id: c.id().to_string(),
            tmp: c.tmp_dir().to_path_buf(),
            cgroup_parent: c.node_cgroup(1).parent().unwrap().to_path_buf(),
        }
    }

    fn assert_gone(&self) {
        let netns: Vec<String> = std::fs::read_dir("/var/run/netns")
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let left: Vec<&String> = netns
            .iter()
            .filter(|n| n.starts_with(&format!("{}-", self.id)))
            .collect();
        assert!(left.is_empty(), "network namespaces left behind: {left:?}");
        assert!(
            !self.tmp.exists(),
            "temp dir {} left behind",
            self.tmp.display()
        );
        assert!(
            !self.cgroup_parent.exists(),
            "cgroup {} left behind",
            self.cgroup_parent.display()
        );
        let mounts = sys::mounts_under(&self.tmp);
        assert!(mounts.is_empty(), "mounts left behind: {mounts:?}");
    }
}

fn body(c: &Cluster, place: &sys::Place, url: &str) -> String {
    let r = c.curl(place, url);
    assert!(r.ok(), "curl {url} from {}: {r}", place.label);
    r.body.trim().to_string()
}

#[test]
fn pod_ip_connectivity_and_cleanup() {
    let c = two_nodes();
    let leftovers = Leftovers::of(&c);

    // node -> local pod: the node's eth0 address is the source.
    assert_eq!(
        body(&c, &c.node(1), "http://10.244.1.10/"),
        "pod-a 198.18.0.1"
    );
    // node -> remote pod, through the pod-CIDR route.
    assert_eq!(
        body(&c, &c.node(1), "http://10.244.2.10/"),
        "pod-c 198.18.0.1"
    );
    assert_eq!(
        body(&c, &c.node(2), "http://10.244.1.11/"),
        "pod-b 198.18.0.2"
    );
    // pod -> pod, same node and across nodes; pods see each other's IPs (no NAT).
    assert_eq!(
        body(&c, &c.pod("pod-a"), "http://10.244.1.11/"),
        "pod-b 10.244.1.10"
    );
    assert_eq!(
        body(&c, &c.pod("pod-a"), "http://10.244.2.10/"),
        "pod-c 10.244.1.10"
    );
    assert_eq!(
        body(&c, &c.pod("pod-c"), "http://10.244.1.10/"),
        "pod-a 10.244.2.10"
    );
    assert_eq!(
        body(&c, &c.pod("pod-c"), "http://10.244.2.10:8081/"),
        "pod-c:8081 10.244.2.10"
    );
    // A pod reaches its own node.
    let r = c.ask(
        &c.pod("pod-b"),
        &["tcp-ask", "198.18.0.1:1", "--timeout-ms", "1000"],
        Duration::from_secs(5),
    );
    assert!(
        r.len() == 1 && r[0].is_errno("ECONNREFUSED"),
        "pod-b -> node1:1 should be refused: {r:?}"
    );

    // The client reaches the nodes (nothing listens on port 1: refused, not a timeout)...
    let r = c.ask(
        &c.client(),
        &["tcp-ask", "198.18.0.2:1", "--timeout-ms", "1000"],
        Duration::from_secs(5),
    );
    assert!(
        r.len() == 1 && r[0].is_errno("ECONNREFUSED"),
        "client -> node2:1 should be refused: {r:?}"
    );
    // ...but has no route to pods (that is what Services are for).
    let r = c.curl(&c.client(), "http://10.244.1.10/");
    assert!(
        !r.ok(),
        "the client should not reach a pod IP directly: {r}"
    );

    // UDP: udp-serve answers with its name and the client's address.
    let lines = c.ask(
        &c.pod("pod-c"),
        &[
            "udp-ask",
            "10.244.1.10:5353",
            "--count",
            "3",
            "--interval-ms",
            "10",
        ],
        Duration::from_secs(10),
    );
    assert_eq!(lines.len(), 3, "{lines:?}");
    for l in &lines {
        assert_eq!(l.pod(), Some("pod-a"), "{l}");
        assert!(l.seen_source().unwrap().starts_with("10.244.2.10:"), "{l}");
    }
    let lines = c.ask(
        &c.pod("pod-b"),
        &[
            "udp-ask",
            "10.244.1.10:5353",
            "--connected",
            "--count",
            "2",
            "--sport",
            "40000",
        ],
        Duration::from_secs(10),
    );
    assert!(
        lines
            .iter()
            .all(|l| l.seen_source() == Some("10.244.1.11:40000")),
        "{lines:?}"
    );
    // Nothing listens on 5353 in pod-b: a connected socket sees ECONNREFUSED.
    let lines = c.ask(
        &c.pod("pod-a"),
        &[
            "udp-ask",
            "10.244.1.11:5353",
            "--connected",
            "--count",
            "2",
            "--timeout-ms",
            "500",
        ],
        Duration::from_secs(10),
    );
    assert!(
        lines.iter().all(|l| l.is_errno("ECONNREFUSED")),
        "{lines:?}"
    );

    // Processes started in a pod are in the pod's node's cgroup; host processes likewise.
    let procs = std::fs::read_to_string(c.node_cgroup(1).join("cgroup.procs")).unwrap();
    assert!(
        !procs.trim().is_empty(),
        "node1's cgroup should hold pod-a/pod-b's servers"
    );
    let out = c.node(2).output(&["cat", "/proc/self/cgroup"]).unwrap();
    let cg = String::from_utf8_lossy(&out.stdout);
    let rel = c.node_cgroup(2);
    let rel = rel.strip_prefix(sys::cgroup2_mount().unwrap()).unwrap();
    assert!(
        cg.lines()
            .any(|l| l.starts_with("0::") && Path::new(&l[3..]) == Path::new("/").join(rel)),
        "{cg}"
    );

    // Physical-NIC realism: no tx checksum offload on veths.
    let out = c.node(1).output(&["ethtool", "-k", "eth0"]).unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("tx-checksumming: off"));

    // Killing a pod: its server is gone, the address still answers (refused).
    let mut c = c;
    c.kill_pod("pod-b").unwrap();
    let r = c.curl(&c.node(1), "http://10.244.1.11/");
    assert!(r.refused(), "{r}");

    drop(c);
    leftovers.assert_gone();
}

#[test]
fn cleanup_after_panic() {
    let (tx, rx) = std::sync::mpsc::channel();
    let res = std::thread::spawn(move || {
        let c = Cluster::builder()
            .nodes(1)
            .testpod(env!("CARGO_BIN_EXE_kproxy-testpod"))
            .pod(PodSpec::new("pod-a", 1).udp(5353))
            .build()
            .expect("building the cluster");
        tx.send(Leftovers::of(&c)).unwrap();
        panic!("deliberate panic with a cluster up");
    })
    .join();
    assert!(res.is_err());
    rx.recv().unwrap().assert_gone();
}
