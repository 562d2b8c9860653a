//! Devices added, renamed and removed while the agent runs (issue 5).
//!
//! The agent runs with `--devices eth0,up*`. While a client keeps asking the nodePort through
//! eth0, a second uplink `up1` (a veth straight to the client, 198.19.0.0/24) appears: the
//! agent attaches its XDP/tc programs to it and serves the nodePort on its address, with the
//! client's address kept. The device is renamed (`up1` -> `up2`): the links stay (same link
//! ids) and their pins follow the name. A second address on it serves nodePorts too. Then it
//! is deleted: its pins go, and the traffic on eth0 never saw a failure.

use std::{
    fs,
    time::{Duration, Instant},
};

use kproxy_tests::harness::{
    Cluster, Place, fixtures,
    probe::{self, show, tally},
    sys,
};

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");

fn run(place: &Place, argv: &[&str]) {
    let out = place.output(argv).unwrap();
    assert!(
        out.status.success(),
        "{argv:?} in {}: {}",
        place.label,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The device link pins of node 1 (`xdp@up1`, `tc_egress@eth0`, ...), sorted.
fn device_pins(c: &Cluster) -> Vec<String> {
    let dir = c.node_bpf_root(1).join("links");
    let mut v: Vec<String> = fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains('@'))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The XDP program id on `dev` in node 1 (`ip -d link`), if any.
fn xdp_prog(c: &Cluster, dev: &str) -> Option<String> {
    let out = c
        .node(1)
        .output(&["ip", "-d", "link", "show", "dev", dev])
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text.lines().find(|l| l.contains("prog/xdp"))?;
    line.split_whitespace()
        .skip_while(|w| *w != "id")
        .nth(1)
        .map(str::to_owned)
}

fn wait_pins(c: &Cluster, want: &[&str], timeout: Duration) {
    let got = sys::wait_for(timeout, Duration::from_millis(100), || {
        let p = device_pins(c);
        (p == want).then_some(())
    });
    c.check(got.is_some(), || {
        format!(
            "device pins {:?}, want {want:?} within {timeout:?}",
            device_pins(c)
        )
    });
}

/// `curl` the nodePort at `addr` from the client until it answers (or `timeout`).
fn wait_nodeport(c: &Cluster, addr: &str, timeout: Duration) -> Duration {
    let t = Instant::now();
    let url = format!("http://{addr}:30001/");
    loop {
        let r = probe::curl(&c.client(), &url, Duration::from_secs(1)).unwrap();
        if r.ok() {
            return t.elapsed();
        }
        c.check(t.elapsed() < timeout, || format!("{url} not served: {r}"));
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn served_via(c: &Cluster, addr: &str, what: &str) {
    let url = format!("http://{addr}:30001/");
    let r = probe::curl_n(&c.client(), &url, 8, Duration::from_secs(3)).unwrap();
    let t = tally(&r);
    let client_ip = if addr.starts_with("198.19.1.") {
        "198.19.1.100"
    } else if addr.starts_with("198.19.") {
        "198.19.0.100"
    } else {
        "198.18.0.100"
    };
    c.check(
        r.iter().all(|x| x.ok())
            && t.keys().all(|k| k == "pod-a" || k == "pod-b")
            && r.iter().all(|x| x.seen_source() == Some(client_ip)),
        || format!("{what}: {url}: {t:?} {r:?}"),
    );
}

#[test]
fn devices_added_renamed_and_removed_are_followed() {
    let mut c = fixtures::one_node(TESTPOD).expect("building the cluster");
    fixtures::write_seed(&c, &["pod-a", "pod-b"], &["pod-a", "pod-b"]).unwrap();
    c.start_agent_with(1, &["--devices", "up*"]).unwrap();
    let r = c.wait_healthy(1, Duration::from_secs(30));
    c.ok(r);
    wait_pins(&c, &["tc_egress@eth0", "xdp@eth0"], Duration::from_secs(2));

    let asker = c.nodeport_asker(300);
    assert!(
        asker
            .wait_line(Duration::from_secs(5), |l| l.seq >= 5)
            .is_some(),
        "the client did not start"
    );

    // A second uplink appears.
    let node = c.node(1);
    let client = c.client();
    let client_ns = client.netns.as_ref().unwrap().name().to_owned();
    run(
        &node,
        &[
            "ip", "link", "add", "up1", "type", "veth", "peer", "name", "cup1", "netns", &client_ns,
        ],
    );
    run(&node, &["ip", "addr", "add", "198.19.0.1/24", "dev", "up1"]);
    run(&node, &["ethtool", "-K", "up1", "tx", "off"]);
    run(&node, &["sysctl", "-qw", "net.ipv4.conf.up1.rp_filter=0"]);
    run(&node, &["ip", "link", "set", "up1", "up"]);
    run(
        &client,
        &["ip", "addr", "add", "198.19.0.100/24", "dev", "cup1"],
    );
    run(&client, &["ethtool", "-K", "cup1", "tx", "off"]);
    run(&client, &["ip", "link", "set", "cup1", "up"]);
    let t = Instant::now();
    wait_pins(
        &c,
        &["tc_egress@eth0", "tc_egress@up1", "xdp@eth0", "xdp@up1"],
        Duration::from_secs(5),
    );
    let attached = t.elapsed();
    let first = wait_nodeport(&c, "198.19.0.1", Duration::from_secs(5));
    println!(
        "up1 added: programs attached within {attached:?}, nodePort answered via it after {first:?}"
    );
    let prog = xdp_prog(&c, "up1");
    c.check(prog.is_some(), || "no XDP program on up1".into());
    served_via(&c, "198.19.0.1", "via the new uplink");

    // Renamed: the links stay, the pins follow.
    run(&node, &["ip", "link", "set", "up1", "down"]);
    run(&node, &["ip", "link", "set", "up1", "name", "up2"]);
    run(&node, &["ip", "link", "set", "up2", "up"]);
    wait_pins(
        &c,
        &["tc_egress@eth0", "tc_egress@up2", "xdp@eth0", "xdp@up2"],
        Duration::from_secs(5),
    );
    let after = xdp_prog(&c, "up2");
    c.check(after == prog, || {
        format!("the XDP program changed on rename: {prog:?} -> {after:?}")
    });
    wait_nodeport(&c, "198.19.0.1", Duration::from_secs(5));
    served_via(&c, "198.19.0.1", "after the rename");

    // A new address on the device serves nodePorts too.
    run(&node, &["ip", "addr", "add", "198.19.1.1/24", "dev", "up2"]);
    run(
        &client,
        &["ip", "addr", "add", "198.19.1.100/24", "dev", "cup1"],
    );
    let took = wait_nodeport(&c, "198.19.1.1", Duration::from_secs(5));
    println!("new address 198.19.1.1 served after {took:?}");
    served_via(&c, "198.19.1.1", "on the added address");

    // Removed: its pins go; eth0 is undisturbed.
    run(&node, &["ip", "link", "del", "up2"]);
    wait_pins(&c, &["tc_egress@eth0", "xdp@eth0"], Duration::from_secs(5));
    let log = c.agent_log(1);
    c.check(
        log.contains("device renamed") && log.contains("detached"),
        || "the agent's log should say what it did".into(),
    );
    let lines = asker.finish(Duration::from_secs(60)).expect("the client");
    let failed: Vec<String> = lines
        .iter()
        .filter(|l| !l.is_ok())
        .map(|l| l.to_string())
        .collect();
    println!(
        "eth0 traffic during add/rename/remove: {} requests, {} failed",
        lines.len(),
        failed.len()
    );
    c.check(failed.is_empty() && lines.len() >= 290, || {
        format!("eth0 traffic failed: {failed:#?}\n{}", show(&lines))
    });
    served_via(&c, "198.18.0.1", "eth0 at the end");
    let running = c.agent_running(1);
    c.check(running, || "the agent exited".into());
}
