//! Map layout changes across agent versions (issue 5): an agent that finds pins of an older
//! layout rebuilds or migrates them without a gap in serving, and removes the stale pins;
//! `kproxy cleanup` removes such pins too.
//!
//! The older agent is simulated on a running node: after the agent stops (its programs keep
//! serving through the pinned links), the pins are changed into what an older version would
//! have left:
//! - `KP_LB4_SVC_V1` renamed to `KP_LB4_SVC_V0` (an older versioned name; the attached
//!   programs still use that map);
//! - `KP_CT4_V1` renamed to `KP_CT4_V0` (same entries, older name: migrated);
//! - `KP_LB4_BE_V1` renamed to `KP_LB4_BE_V0`, and a map with another value size pinned
//!   under the current name `KP_LB4_BE_V1` (it must not be adopted).
//!
//! A new agent starts while a client keeps asking the nodePort: no request fails, the stale
//! pins are gone, the current names hold maps of the right layout, and the service is served
//! from them.

use std::{fs, path::Path, time::Duration};

use kproxy_tests::harness::{
    Cluster, fixtures,
    probe::{show, tally},
    sys,
};

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");

/// The map pins (files directly under the bpf root), sorted.
fn map_pins(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(root)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.ends_with(".debug"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// `bpftool map show pinned PIN`: the value size.
fn value_size(c: &Cluster, pin: &Path) -> Option<u32> {
    let out = c
        .node(1)
        .output(&["bpftool", "map", "show", "pinned", pin.to_str().unwrap()])
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split_whitespace()
        .skip_while(|w| *w != "value")
        .nth(1)
        .and_then(|v| v.trim_end_matches('B').parse().ok())
}

fn run(c: &Cluster, argv: &[&str]) {
    let out = c.node(1).output(argv).unwrap();
    assert!(
        out.status.success(),
        "{argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn older_map_layouts_are_rebuilt_or_migrated_without_a_gap() {
    sys::require_tools(&["bpftool"]).unwrap();
    let mut c = fixtures::one_node(TESTPOD).expect("building the cluster");
    fixtures::write_seed(&c, &["pod-a", "pod-b"], &["pod-a", "pod-b"]).unwrap();
    c.start_agent_ready(1).unwrap();
    let root = c.node_bpf_root(1);
    let current = map_pins(&root);
    let be_pin = root.join("KP_LB4_BE_V1");
    let be_size = value_size(&c, &be_pin).expect("the backends map's value size");

    let asker = c.nodeport_asker(300);
    assert!(
        asker
            .wait_line(Duration::from_secs(5), |l| l.seq >= 5)
            .is_some(),
        "the client did not start"
    );
    c.stop_agent(1);

    // What an older agent would have left.
    for (from, to) in [
        ("KP_LB4_SVC_V1", "KP_LB4_SVC_V0"),
        ("KP_CT4_V1", "KP_CT4_V0"),
        ("KP_LB4_BE_V1", "KP_LB4_BE_V0"),
    ] {
        fs::rename(root.join(from), root.join(to)).unwrap();
    }
    let wrong = be_size + 8;
    run(
        &c,
        &[
            "bpftool",
            "map",
            "create",
            be_pin.to_str().unwrap(),
            "type",
            "hash",
            "key",
            "4",
            "value",
            &wrong.to_string(),
            "entries",
            "16",
            "name",
            "KP_LB4_BE_V1",
        ],
    );
    let ct_before = c
        .node(1)
        .output(&[
            "bpftool",
            "map",
            "dump",
            "pinned",
            root.join("KP_CT4_V0").to_str().unwrap(),
        ])
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.starts_with("key"))
                .count()
        })
        .unwrap_or(0);
    std::thread::sleep(Duration::from_millis(500));

    c.start_agent_ready(1).unwrap();
    let log = c.agent_log(1);
    let lines = asker.finish(Duration::from_secs(60)).expect("the client");
    let failed: Vec<String> = lines
        .iter()
        .filter(|l| !l.is_ok())
        .map(|l| l.to_string())
        .collect();
    println!(
        "layout change: {} requests across the upgrade, {} failed; {ct_before} conntrack entries in the older CT map",
        lines.len(),
        failed.len()
    );
    c.check(failed.is_empty(), || {
        format!(
            "requests failed across the layout change: {failed:#?}\n{}",
            show(&lines)
        )
    });
    c.check(
        log.contains("another layout") && log.contains("rebuilt maps are filled"),
        || "the log should say what was rebuilt".into(),
    );
    c.check(log.contains("migrated the entries"), || {
        "the CT map of an older name should have been migrated".into()
    });

    // The pins are this build's, with this build's layout.
    let after = map_pins(&root);
    c.check(after == current, || {
        format!("pins after the upgrade: {after:?}, want {current:?}")
    });
    let size = value_size(&c, &be_pin);
    c.check(size == Some(be_size), || {
        format!("KP_LB4_BE_V1 value size {size:?}, want {be_size}")
    });
    let r = kproxy_tests::harness::probe::curl_n(
        &c.client(),
        "http://198.18.0.1:30001/",
        10,
        Duration::from_secs(3),
    )
    .unwrap();
    let t = tally(&r);
    c.check(
        r.iter().all(|x| x.ok()) && t.keys().all(|k| k == "pod-a" || k == "pod-b"),
        || format!("after the upgrade: {t:?}"),
    );

    // `kproxy cleanup` removes stale pins too (twice is fine).
    c.stop_agent(1);
    run(
        &c,
        &[
            "bpftool",
            "map",
            "create",
            root.join("KP_OLD_MAP_V0").to_str().unwrap(),
            "type",
            "hash",
            "key",
            "4",
            "value",
            "4",
            "entries",
            "4",
            "name",
            "KP_OLD_MAP_V0",
        ],
    );
    for _ in 0..2 {
        let out = c.agent_cleanup(1).unwrap();
        c.check(out.status.success(), || {
            format!("cleanup: {}", String::from_utf8_lossy(&out.stderr))
        });
    }
    let left = map_pins(&root);
    c.check(left.is_empty(), || {
        format!("pins left after cleanup: {left:?}")
    });
}
