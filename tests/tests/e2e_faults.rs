//! Faults and defaults that must hold (issue 5), each checked by what a user sees:
//!
//! - a missing or invalid `--cgroup-root`, or a `--devices` entry that does not exist: the
//!   agent exits non-zero at once with an error naming the flag and the value, and nothing is
//!   installed (no programs on the cgroup or the device, no pins);
//! - the manifests directory replaced by a malformed file: the last good state keeps being
//!   served, and a later good change is applied;
//! - no bpffs (not even the directory) at `--bpf-root`: the agent creates and mounts it;
//! - security defaults: every pinned map and link is mode 0600 (root only), and the metrics
//!   endpoint listens on 127.0.0.1 only (refused from the client's netns, answered inside
//!   the node), while /healthz answers from outside.

use std::{
    fs,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::Duration,
};

use kproxy_tests::harness::{
    Cluster, fixtures, kproxy_bin,
    probe::{self, tally},
    sys,
};

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");

fn seeded() -> Cluster {
    let c = fixtures::one_node(TESTPOD).expect("building the cluster");
    fixtures::write_seed(&c, &["pod-a", "pod-b"], &["pod-a", "pod-b"]).unwrap();
    c
}

/// Every file under `dir` (recursively), with directories listed too.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&p, out);
            }
            out.push(p);
        }
    }
}

/// The kproxy pins under node 1's bpf root (maps `KP_*` and links), ignoring the kernel's
/// own `*.debug` views of a fresh bpffs.
fn pins(c: &Cluster) -> Vec<PathBuf> {
    let mut all = Vec::new();
    walk(&c.node_bpf_root(1), &mut all);
    all.into_iter()
        .filter(|p| p.is_file())
        .filter(|p| !p.to_string_lossy().ends_with(".debug"))
        .collect()
}

/// Programs attached to node 1's cgroup and eth0 (bpftool and ip), as text; empty: none.
fn attached(c: &Cluster) -> String {
    let node = c.node(1);
    let cg = c.node_cgroup(1);
    let mut s = String::new();
    let out = node
        .output(&["bpftool", "cgroup", "show", cg.to_str().unwrap()])
        .unwrap();
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        if l.trim().starts_with(|ch: char| ch.is_ascii_digit()) {
            s.push_str(&format!("cgroup: {l}\n"));
        }
    }
    let out = node
        .output(&["ip", "-d", "link", "show", "dev", "eth0"])
        .unwrap();
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        if l.contains("prog/xdp") {
            s.push_str(&format!("eth0: {l}\n"));
        }
    }
    let out = node.output(&[&c.testpod(), "tcx-count", "eth0"]).unwrap();
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        if l.split_once(' ').is_some_and(|(_, n)| n.trim() != "0") {
            s.push_str(&format!("tcx: {l}\n"));
        }
    }
    s
}

/// Runs the agent of node 1 with `flag` set to `value` (instead of the harness' value) and
/// expects it to fail at once with an error naming `flag` and `names`; returns its stderr.
fn agent_fails_with(c: &Cluster, flag: &str, value: &str, names: &str) -> String {
    let bin = kproxy_bin().unwrap();
    let mut args = c.agent_args(1);
    let i = args
        .iter()
        .position(|a| a == flag)
        .expect("the harness passes the flag");
    args[i + 1] = value.to_string();
    let mut argv = vec![bin.to_str().unwrap()];
    argv.extend(args.iter().map(String::as_str));
    let out = c
        .node(1)
        .output_timeout(&argv, Duration::from_secs(20))
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    println!("{flag} {value}: exit {:?}\n{stderr}", out.status.code());
    assert!(
        !out.status.success() && out.status.code().is_some(),
        "the agent should exit with an error for {flag} {value}, got {:?}:\n{stderr}",
        out.status
    );
    assert!(
        stderr.contains(flag) && stderr.contains(names),
        "the error should name {flag} and {names}:\n{stderr}"
    );
    let left = pins(c);
    assert!(left.is_empty(), "pins left after a failed start: {left:?}");
    let progs = attached(c);
    assert!(
        progs.is_empty(),
        "programs attached after a failed start:\n{progs}"
    );
    stderr
}

#[test]
fn bad_cgroup_root_or_device_fails_clearly_and_installs_nothing() {
    sys::require_tools(&["bpftool"]).unwrap();
    let c = seeded();
    let missing = c.tmp_dir().join("no-such-cgroup");
    let missing = missing.to_str().unwrap();
    let e = agent_fails_with(&c, "--cgroup-root", missing, missing);
    assert!(e.contains("No such file"), "{e}");
    // A directory that exists but is not a cgroup v2 directory.
    let not_cgroup = c.tmp_dir().join("not-a-cgroup");
    fs::create_dir_all(&not_cgroup).unwrap();
    let not_cgroup = not_cgroup.to_str().unwrap();
    let e = agent_fails_with(&c, "--cgroup-root", not_cgroup, not_cgroup);
    assert!(e.contains("not a cgroup v2 directory"), "{e}");
    // A device that does not exist (next to one that does).
    agent_fails_with(&c, "--devices", "eth0,kpnodev0", "\"kpnodev0\"");
}

#[test]
fn malformed_manifests_keep_the_last_good_state() {
    let mut c = seeded();
    c.start_agent_ready(1).unwrap();
    let client = c.client();
    let pod = c.pod("pod-z");
    let serve_both = |c: &Cluster, label: &str| {
        for (place, url) in [
            (&client, "http://198.18.0.1:30001/"),
            (&pod, "http://10.96.100.208:8080/"),
        ] {
            let r = probe::curl_n(place, url, 12, Duration::from_secs(2)).unwrap();
            let t = tally(&r);
            c.check(
                r.len() == 12 && r.iter().all(|x| x.ok()) && t.len() == 2,
                || format!("{label}: {url} from {}: {t:?}", place.label),
            );
        }
    };
    serve_both(&c, "before");

    // The directory goes away and a malformed file takes its place.
    let dir = c.manifests_dir().to_path_buf();
    let aside = dir.with_extension("good");
    fs::rename(&dir, &aside).unwrap();
    fs::write(
        &dir,
        "apiVersion: v1\nkind: Service\nmetadata: {name: [oops\n  spec: : :\n",
    )
    .unwrap();
    let logged = sys::wait_for(Duration::from_secs(5), Duration::from_millis(50), || {
        c.agent_log(1)
            .contains("keeping the last good state")
            .then_some(())
    });
    c.check(logged.is_some(), || {
        "the agent did not notice the malformed manifests".into()
    });
    std::thread::sleep(Duration::from_millis(500));
    let running = c.agent_running(1);
    c.check(running, || "the agent exited on malformed manifests".into());
    serve_both(&c, "while the manifests are malformed");

    // The directory comes back: still served, and changes apply again.
    fs::remove_file(&dir).unwrap();
    fs::rename(&aside, &dir).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    serve_both(&c, "after the manifests came back");
    let synced = |c: &Cluster| c.agent_log(1).matches(" synced ").count();
    let before = synced(&c);
    fixtures::write_mysvc(&c, &["pod-a"]).unwrap();
    let applied = sys::wait_for(Duration::from_secs(5), Duration::from_millis(50), || {
        (synced(&c) > before).then_some(())
    });
    c.check(applied.is_some(), || {
        "a change after the recovery was not applied".into()
    });
    let r = probe::curl_n(
        &client,
        "http://198.18.0.1:30001/",
        10,
        Duration::from_secs(2),
    )
    .unwrap();
    let t = tally(&r);
    c.check(t.len() == 1 && t.get("pod-a") == Some(&10), || {
        format!("after removing pod-b: {t:?}")
    });
}

#[test]
fn bpffs_is_created_and_mounted_when_missing() {
    let mut c = seeded();
    let root = c.node_bpf_root(1);
    fs::remove_dir(&root).unwrap();
    assert!(!root.exists());
    c.start_agent_ready(1).unwrap();
    assert!(
        sys::is_bpffs(&root),
        "{} should be a bpffs mounted by the agent",
        root.display()
    );
    let p = pins(&c);
    c.check(p.iter().any(|p| p.ends_with("KP_CT4_V1")), || {
        format!("no maps pinned under {}: {p:?}", root.display())
    });
    let r = c.curl(&c.client(), "http://198.18.0.1:30001/");
    c.check(r.ok(), || format!("nodePort not served: {r}"));
}

#[test]
fn pins_are_root_only_and_metrics_listen_on_localhost() {
    let mut c = seeded();
    let root = c.node_bpf_root(1);
    assert!(
        !sys::is_bpffs(&root),
        "the harness' bpf root starts as a plain directory"
    );
    c.start_agent_ready(1).unwrap();

    // Every pin (maps and links) is 0600 and owned by root.
    let p = pins(&c);
    c.check(
        p.iter().any(|p| p.to_string_lossy().contains("/links/")),
        || format!("no links pinned: {p:?}"),
    );
    let mut modes = Vec::new();
    for path in &p {
        let md = fs::metadata(path).unwrap();
        let mode = md.permissions().mode() & 0o7777;
        modes.push(format!("{:o} {}", mode, path.display()));
        c.check(mode == 0o600 && md.uid() == 0, || {
            format!(
                "{} is mode {mode:o} uid {}, want 0600 root",
                path.display(),
                md.uid()
            )
        });
    }
    // Directories: not writable by others.
    let mut dirs = vec![root.clone()];
    let mut all = Vec::new();
    walk(&root, &mut all);
    dirs.extend(all.into_iter().filter(|p| p.is_dir()));
    for d in &dirs {
        let mode = fs::metadata(d).unwrap().permissions().mode() & 0o7777;
        modes.push(format!("{mode:o} {}/", d.display()));
    }
    println!("pins and directories:\n  {}", modes.join("\n  "));

    // Metrics: only on the node's loopback.
    let r = probe::curl(
        &c.client(),
        "http://198.18.0.1:10249/metrics",
        Duration::from_secs(2),
    )
    .unwrap();
    c.check(r.refused(), || {
        format!("metrics should not be reachable from outside the node: {r}")
    });
    let r = probe::curl(
        &c.node(1),
        "http://127.0.0.1:10249/metrics",
        Duration::from_secs(2),
    )
    .unwrap();
    c.check(r.ok() && r.body.contains("kproxy_synced"), || {
        format!("metrics on 127.0.0.1:10249 inside the node: {r}")
    });
    // /healthz answers health checkers outside the node.
    let r = probe::curl(
        &c.client(),
        "http://198.18.0.1:10256/healthz",
        Duration::from_secs(2),
    )
    .unwrap();
    c.check(r.ok(), || format!("/healthz from the client: {r}"));
}
