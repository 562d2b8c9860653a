//! Security defaults (issue 5), checked by what an outsider or an unprivileged user sees:
//!
//! - without `--healthz-bind-address`/`--metrics-bind-address`, health and metrics listen on
//!   127.0.0.1 only (refused from the client, answered inside the node);
//! - the health and metrics endpoints are read-only: anything but GET/HEAD gets 405;
//! - an unprivileged user (`nobody`, via setuid in a child) can neither open a pin for
//!   writing nor get a map or link fd from it (EACCES/EPERM), for every pin;
//! - no nodePort on a node address outside `--nodeport-addresses`, from outside (XDP) or
//!   from a pod (socket hooks), while the addresses inside are served.

use std::{
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use kproxy_tests::harness::{Cluster, fixtures, kproxy_bin, probe, sys};

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");

fn seeded() -> Cluster {
    let c = fixtures::one_node(TESTPOD).expect("building the cluster");
    fixtures::write_seed(&c, &["pod-a", "pod-b"], &["pod-a", "pod-b"]).unwrap();
    c
}

/// The harness's agent arguments without the flag `flag` and its value.
fn args_without(c: &Cluster, flag: &str) -> Vec<String> {
    let mut args = c.agent_args(1);
    if let Some(i) = args.iter().position(|a| a == flag) {
        args.drain(i..i + 2);
    }
    args
}

/// `curl -s -o /dev/null -w %{http_code} -X METHOD url` at `place`: the status (0: none).
fn status(place: &kproxy_tests::harness::Place, method: &str, url: &str) -> u16 {
    let out = place
        .output_timeout(
            &[
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "2",
                "-X",
                method,
                url,
            ],
            Duration::from_secs(5),
        )
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

#[test]
fn health_and_metrics_are_local_by_default_and_read_only() {
    let mut c = seeded();
    let bin = kproxy_bin().unwrap().display().to_string();
    let mut argv = vec![bin];
    argv.extend(args_without(&c, "--healthz-bind-address"));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let node = c.node(1);
    c.spawn(&node, "kproxy node1 (default binds)", &argv)
        .unwrap();
    let up = sys::wait_for(Duration::from_secs(30), Duration::from_millis(100), || {
        (status(&node, "GET", "http://127.0.0.1:10256/healthz") == 200).then_some(())
    });
    assert!(
        up.is_some(),
        "/healthz on 127.0.0.1 inside the node never answered 200"
    );

    let client = c.client();
    for url in [
        "http://198.18.0.1:10256/healthz",
        "http://198.18.0.1:10249/metrics",
    ] {
        let r = probe::curl(&client, url, Duration::from_secs(2)).unwrap();
        assert!(r.refused(), "{url} must not be reachable from outside: {r}");
    }
    // Read-only: every other method gets 405 (with Allow), on both listeners.
    for url in [
        "http://127.0.0.1:10256/healthz",
        "http://127.0.0.1:10256/livez",
        "http://127.0.0.1:10249/metrics",
    ] {
        assert_eq!(status(&node, "GET", url), 200, "GET {url}");
        assert_eq!(status(&node, "HEAD", url), 200, "HEAD {url}");
        for method in ["POST", "PUT", "DELETE", "PATCH"] {
            assert_eq!(status(&node, method, url), 405, "{method} {url}");
        }
    }
    let out = node
        .output(&[
            "curl",
            "-s",
            "-i",
            "-X",
            "POST",
            "http://127.0.0.1:10256/healthz",
        ])
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Allow: GET, HEAD"), "{text}");
    println!("health/metrics: refused from outside, 405 for POST/PUT/DELETE/PATCH");
}

/// Every regular file under `dir`, recursively.
fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            files(&p, out);
        } else if !p.to_string_lossy().ends_with(".debug") {
            out.push(p);
        }
    }
}

/// As `nobody`: opens each pin read-write and asks the kernel for its object (BPF_OBJ_GET).
/// Python's ctypes makes the raw syscall; the child drops to uid/gid 65534 before exec.
const AS_NOBODY: &str = r#"
import ctypes, errno, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for p in sys.argv[1:]:
    try:
        os.close(os.open(p, os.O_RDWR))
        opened = "ok"
    except OSError as e:
        opened = errno.errorcode[e.errno]
    path = ctypes.create_string_buffer(p.encode())
    attr = (ctypes.c_uint64 * 3)()
    attr[0] = ctypes.addressof(path)
    fd = libc.syscall(321, 7, ctypes.byref(attr), 24)  # bpf(BPF_OBJ_GET)
    got = "ok" if fd >= 0 else errno.errorcode[ctypes.get_errno()]
    print(p, opened, got)
"#;

#[test]
fn pins_cannot_be_used_by_an_unprivileged_user() {
    let mut c = seeded();
    c.start_agent_ready(1).unwrap();
    let root = c.node_bpf_root(1);
    let mut pins = Vec::new();
    files(&root, &mut pins);
    assert!(
        pins.len() >= 10 && pins.iter().any(|p| p.to_string_lossy().contains("/links/")),
        "{pins:?}"
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(AS_NOBODY)
        .args(&pins)
        .uid(65534)
        .gid(65534)
        .output()
        .expect("running python3 as nobody");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut bad = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let denied = |r: &str| r == "EACCES" || r == "EPERM";
        if f.len() != 3 || !denied(f[1]) || !denied(f[2]) {
            bad.push(line.to_owned());
        }
    }
    println!(
        "{} pins tried as nobody (open O_RDWR and BPF_OBJ_GET), e.g. {}",
        pins.len(),
        text.lines().next().unwrap_or("")
    );
    assert_eq!(text.lines().count(), pins.len(), "{text}");
    assert!(bad.is_empty(), "usable by nobody: {bad:#?}");
    // And the traffic the maps drive is still served (nobody changed anything).
    let r = c.curl(&c.client(), "http://198.18.0.1:30001/");
    assert!(r.ok(), "{r}");
}

#[test]
fn no_nodeport_outside_nodeport_addresses() {
    let mut c = seeded();
    // A second node address on eth0, outside the --nodeport-addresses range, and a client
    // address next to it.
    let node = c.node(1);
    let client = c.client();
    for (place, argv) in [
        (&node, ["ip", "addr", "add", "198.20.0.1/24", "dev", "eth0"]),
        (
            &client,
            ["ip", "addr", "add", "198.20.0.100/24", "dev", "eth0"],
        ),
    ] {
        let out = place.output(&argv).unwrap();
        assert!(out.status.success(), "{argv:?}");
    }
    c.start_agent_with(1, &["--nodeport-addresses", "198.18.0.0/24"])
        .unwrap();
    let r = c.wait_healthy(1, Duration::from_secs(30));
    c.ok(r);

    let inside = probe::curl_n(
        &client,
        "http://198.18.0.1:30001/",
        6,
        Duration::from_secs(3),
    )
    .unwrap();
    assert!(
        inside.iter().all(|r| r.ok()),
        "inside --nodeport-addresses: {inside:?}"
    );
    let pod_z = c.pod("pod-z");
    for (place, what) in [(&client, "from outside"), (&pod_z, "from a pod")] {
        for _ in 0..4 {
            let r = probe::curl(place, "http://198.20.0.1:30001/", Duration::from_secs(2)).unwrap();
            assert!(
                !r.ok(),
                "198.20.0.1:30001 is outside --nodeport-addresses but was served {what}: {r}"
            );
        }
    }
    // The same address serves once it is inside the range (so the refusal above was the
    // filter, not the network).
    c.stop_agent(1);
    c.start_agent_with(1, &["--nodeport-addresses", "198.18.0.0/24,198.20.0.0/24"])
        .unwrap();
    let r = c.wait_healthy(1, Duration::from_secs(30));
    c.ok(r);
    let ok = sys::wait_for(Duration::from_secs(5), Duration::from_millis(100), || {
        probe::curl(&client, "http://198.20.0.1:30001/", Duration::from_secs(1))
            .ok()
            .filter(|r| r.ok())
    });
    assert!(
        ok.is_some(),
        "198.20.0.1:30001 was not served once inside --nodeport-addresses"
    );
    println!(
        "nodePort refused outside --nodeport-addresses (outside and from a pod), served inside"
    );
}

/// The default deployment puts `--bpf-root` under the host's existing bpffs
/// (`/sys/fs/bpf/kproxy`): the directories the agent creates there are root-only (0700), the
/// pins 0600, and `nobody` can use none of them.
#[test]
fn bpf_root_under_an_existing_bpffs_is_root_only() {
    use std::os::unix::fs::PermissionsExt as _;
    let mut c = seeded();
    let parent = c.tmp_dir().join("host-bpf");
    fs::create_dir_all(&parent).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "bpf", "bpf"])
        .arg(&parent)
        .status()
        .unwrap();
    assert!(mounted.success());
    // Let others traverse the parent, as /sys/fs/bpf allows: only kproxy's own modes guard.
    fs::set_permissions(&parent, fs::Permissions::from_mode(0o755)).unwrap();
    let root = parent.join("kproxy");
    let bin = kproxy_bin().unwrap().display().to_string();
    let mut args = c.agent_args(1);
    let i = args.iter().position(|a| a == "--bpf-root").unwrap();
    args[i + 1] = root.display().to_string();
    let mut argv = vec![bin.clone()];
    argv.extend(args);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let node = c.node(1);
    let agent = c
        .spawn(&node, "kproxy node1 (bpffs subdir)", &argv)
        .unwrap();
    let up = sys::wait_for(Duration::from_secs(30), Duration::from_millis(100), || {
        (c.healthz(1) == 200).then_some(())
    });

    let mut report = Vec::new();
    let mut pins = Vec::new();
    files(&root, &mut pins);
    let modes = |p: &Path| {
        fs::metadata(p)
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(0)
    };
    for d in [root.clone(), root.join("links")] {
        report.push(format!("{:o} {}", modes(&d), d.display()));
    }
    let root_mode = modes(&root);
    let links_mode = modes(&root.join("links"));
    let pin_modes: Vec<(PathBuf, u32)> = pins.iter().map(|p| (p.clone(), modes(p))).collect();
    let out = Command::new("python3")
        .arg("-c")
        .arg(AS_NOBODY)
        .args(&pins)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // Tear down before asserting: the pins hold programs on the node's devices.
    c.stop_extra(agent);
    let cleaned = node
        .output(&[&bin, "cleanup", "--bpf-root", root.to_str().unwrap()])
        .unwrap();
    let _ = Command::new("umount").arg("-l").arg(&parent).status();

    assert!(up.is_some(), "the agent did not become healthy");
    assert!(cleaned.status.success(), "cleanup failed");
    println!(
        "bpf root under an existing bpffs: {report:?}; {} pins tried as nobody",
        pins.len()
    );
    assert!(pins.len() >= 10, "{pins:?}");
    assert_eq!(root_mode, 0o700, "{report:?}");
    assert_eq!(links_mode, 0o700, "{report:?}");
    for (p, mode) in &pin_modes {
        assert_eq!(*mode, 0o600, "{}", p.display());
    }
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert!(
            f.len() == 3
                && ["EACCES", "EPERM"].contains(&f[1])
                && ["EACCES", "EPERM"].contains(&f[2]),
            "usable by nobody: {line}"
        );
    }
    assert_eq!(text.lines().count(), pins.len(), "{text}");
}
