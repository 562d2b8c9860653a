//! Scenario 10: /healthz answers 200 once synced; `kproxy cleanup` leaves nothing behind
//! (no XDP or tc program on eth0, no programs on the cgroup, no pins), and a second cleanup
//! also succeeds.

use std::{path::Path, time::Duration};

use kproxy_tests::harness::{Cluster, fixtures, probe, sys::require_tools};

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");

/// What is attached on node `n`: (xdp on eth0, tc/tcx programs on eth0, cgroup programs, pins).
fn installed(c: &Cluster, n: u8) -> (String, String, String, Vec<String>) {
    let node = c.node(n);
    let text = |argv: &[&str]| {
        let o = node.output(argv).unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let link = text(&["ip", "-d", "link", "show", "dev", "eth0"]);
    let xdp = link
        .lines()
        .filter(|l| l.contains("xdp") || l.contains("prog/"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut tc = String::new();
    for dir in ["ingress", "egress"] {
        let t = text(&["tc", "filter", "show", "dev", "eth0", dir]);
        if !t.trim().is_empty() {
            tc.push_str(&format!("tc {dir}: {t}\n"));
        }
    }
    let tcx = text(&[&c.testpod(), "tcx-count", "eth0"]);
    for l in tcx.lines() {
        if let Some((dir, n)) = l.split_once(' ')
            && n.trim() != "0"
        {
            tc.push_str(&format!("tcx {dir}: {n} programs\n"));
        }
    }
    let cg = c.node_cgroup(n);
    let cgroup = text(&["bpftool", "cgroup", "show", cg.to_str().unwrap()]);
    let cgroup = cgroup
        .lines()
        .filter(|l| l.trim().starts_with(|ch: char| ch.is_ascii_digit()))
        .collect::<Vec<_>>()
        .join("\n");
    let mut pins = Vec::new();
    list_files(&c.node_bpf_root(n), &mut pins);
    (xdp, tc, cgroup, pins)
}

fn list_files(dir: &Path, out: &mut Vec<String>) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            out.push(e.path().display().to_string());
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                list_files(&e.path(), out);
            }
        }
    }
}

fn cleanup_leaves_nothing(c: &Cluster) {
    let out = c.agent_cleanup(1).unwrap();
    assert!(
        out.status.success(),
        "kproxy cleanup failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (xdp, tc, cgroup, pins) = installed(c, 1);
    assert!(
        xdp.is_empty(),
        "XDP still attached on eth0 after cleanup:\n{xdp}"
    );
    assert!(
        tc.is_empty(),
        "tc programs still on eth0 after cleanup:\n{tc}"
    );
    assert!(
        cgroup.is_empty(),
        "programs still on the cgroup after cleanup:\n{cgroup}"
    );
    assert!(pins.is_empty(), "pins left after cleanup: {pins:?}");
    // The service is no longer served.
    let r = probe::curl(
        &c.pod("pod-z"),
        "http://10.96.100.208:8080/",
        Duration::from_secs(2),
    )
    .unwrap();
    assert!(!r.ok(), "the cluster IP is still served after cleanup: {r}");
    let out = c.agent_cleanup(1).unwrap();
    assert!(
        out.status.success(),
        "a second kproxy cleanup failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn started() -> Cluster {
    require_tools(&["tc", "bpftool"]).unwrap();
    let mut c = fixtures::one_node(TESTPOD).expect("building the cluster");
    fixtures::write_seed(&c, &["pod-a", "pod-b"], &["pod-a", "pod-b"]).unwrap();
    assert_eq!(
        c.healthz(1),
        0,
        "nothing should answer on :10256 before the agent runs"
    );
    c.start_agent(1).unwrap();
    let mut seen = Vec::new();
    let ok = kproxy_tests::harness::sys::wait_for(
        Duration::from_secs(30),
        Duration::from_millis(20),
        || {
            let s = c.healthz(1);
            if seen.last() != Some(&s) {
                seen.push(s);
            }
            (s == 200).then_some(())
        },
    );
    println!("/healthz statuses seen while starting: {seen:?}");
    assert!(
        ok.is_some(),
        "/healthz never answered 200 (saw {seen:?})\n{}",
        c.logs()
    );
    // Health checkers outside the node reach it too (default bind 0.0.0.0:10256).
    let r = probe::curl(
        &c.client(),
        "http://198.18.0.1:10256/healthz",
        Duration::from_secs(2),
    )
    .unwrap();
    assert!(r.ok(), "/healthz from the client: {r}");
    let r = probe::curl(
        &c.pod("pod-z"),
        "http://10.96.100.208:8080/",
        Duration::from_secs(2),
    )
    .unwrap();
    assert!(r.ok(), "the service should be served once healthy: {r}");

    let (xdp, tc, cgroup, pins) = installed(&c, 1);
    println!("installed while running:\nxdp: {xdp}\ntc: {tc}\ncgroup:\n{cgroup}\npins: {pins:?}");
    assert!(
        !xdp.is_empty(),
        "no XDP program on eth0 while the agent runs"
    );
    assert!(
        !tc.is_empty(),
        "no tc/tcx program on eth0 while the agent runs"
    );
    assert!(
        !cgroup.is_empty(),
        "no programs on the node's cgroup while the agent runs"
    );
    c
}

#[test]
fn healthz_then_cleanup_after_stop() {
    let mut c = started();
    let code = c.stop_agent(1);
    println!("agent exit code after SIGTERM: {code:?}");
    cleanup_leaves_nothing(&c);
}

#[test]
fn cleanup_after_agent_was_killed() {
    let mut c = started();
    let pid = c.agent_pid(1).unwrap();
    // SAFETY: SIGKILL to the agent we started, by its pid.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    c.stop_agent(1);
    cleanup_leaves_nothing(&c);
}
