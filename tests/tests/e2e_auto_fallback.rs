//! `--proxy-mode auto` on a host where BPF cannot be used, for real: the agent runs with
//! CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN dropped (capsh), so loading programs, creating maps
//! and mounting bpffs all fail. It must say so in one line, fall back to nftables, and still
//! serve the seed Service (nodePort from outside with the client's address kept, cluster IP
//! from a pod); no BPF program may be left attached. With netfilter unusable as well (no
//! `nft`, `iptables` or `iptables-restore` on the agent's PATH) it must fall back to the
//! userspace relay and still serve.

use std::time::Duration;

use kproxy_tests::harness::{
    Cluster, fixtures, kproxy_bin,
    manifests::seed,
    probe::{self, tally},
    sys,
};

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");

fn agent_log(c: &Cluster) -> String {
    std::fs::read_to_string(c.tmp_dir().join("extra-0.log")).unwrap_or_default()
}

#[track_caller]
fn fail(c: &Cluster, msg: impl std::fmt::Display) -> ! {
    panic!("{msg}\n---- agent log ----\n{}\n----", agent_log(c))
}

/// Starts node1's agent in auto mode under capsh without CAP_BPF, CAP_PERFMON and
/// CAP_SYS_ADMIN (and with `path` as its PATH when given) and waits for /healthz.
fn start_auto_without_bpf(c: &mut Cluster, path: Option<&str>) {
    let bin = kproxy_bin().expect("kproxy binary");
    let mut args = c.agent_args(1);
    let i = args
        .iter()
        .position(|a| a == "--proxy-mode")
        .expect("--proxy-mode in the agent's argv");
    args[i + 1] = "auto".to_string();
    let command = std::iter::once(bin.display().to_string())
        .chain(args)
        .collect::<Vec<_>>()
        .join(" ");
    let capsh_cmd = match path {
        Some(p) => format!("PATH={p} exec {command}"),
        None => format!("exec {command}"),
    };
    let argv = [
        "capsh",
        "--drop=cap_bpf,cap_perfmon,cap_sys_admin",
        "--",
        "-c",
        capsh_cmd.as_str(),
    ];
    let node = c.node(1);
    c.spawn(&node, "kproxy node1 auto without BPF", &argv)
        .expect("starting the agent under capsh");
    let healthy = sys::wait_for(Duration::from_secs(30), Duration::from_millis(100), || {
        (c.healthz(1) == 200).then_some(())
    });
    if healthy.is_none() {
        fail(c, "the agent without BPF capabilities never became healthy");
    }
}

#[test]
fn auto_mode_without_bpf_capabilities_falls_back_to_nftables_and_serves() {
    let mut c = fixtures::one_node(TESTPOD).expect("building the cluster");
    fixtures::write_seed(&c, &["pod-a", "pod-b"], &["pod-a", "pod-b"]).expect("manifests");

    start_auto_without_bpf(&mut c, None);
    let log = agent_log(&c);
    let chosen = log
        .lines()
        .find(|l| l.contains("proxy mode nftables chosen"))
        .unwrap_or_else(|| fail(&c, "no line saying nftables was chosen"));
    eprintln!("agent: {chosen}");
    assert!(
        chosen.contains("ebpf:"),
        "the choice must say why eBPF was not usable: {chosen}"
    );

    let nodeport = format!("http://{}:{}/", c.node_ip(1), seed::MYSVC_NODEPORT);
    let results = probe::curl_n(&c.client(), &nodeport, 20, Duration::from_secs(3)).expect("curl");
    let failed: Vec<String> = results
        .iter()
        .filter(|r| !r.ok())
        .map(|r| r.to_string())
        .collect();
    if !failed.is_empty() {
        fail(
            &c,
            format!("nodePort failures through the fallback: {failed:#?}"),
        );
    }
    let answered: Vec<String> = tally(&results).keys().cloned().collect();
    assert_eq!(answered, ["pod-a", "pod-b"], "nodePort answers");
    for r in &results {
        assert_eq!(
            r.seen_source(),
            Some(c.client_ip().to_string().as_str()),
            "a local endpoint sees the client's own address: {r}"
        );
    }

    let cip = format!("http://{}:{}/", seed::MYSVC_IP, seed::MYSVC_PORT);
    let results = probe::curl_n(
        &c.pod(fixtures::CLIENT_POD),
        &cip,
        12,
        Duration::from_secs(3),
    )
    .expect("curl");
    assert!(
        results.iter().all(|r| r.ok()),
        "cluster IP through the fallback: {results:#?}"
    );

    let out = c
        .node(1)
        .output(&["ip", "-d", "link", "show", "eth0"])
        .expect("ip link");
    let links = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        !links.contains("prog/xdp"),
        "no XDP program may be attached: {links}"
    );
}

#[test]
fn auto_mode_without_bpf_or_netfilter_falls_back_to_userspace_and_serves() {
    let mut c = fixtures::one_node(TESTPOD).expect("building the cluster");
    fixtures::write_seed(&c, &["pod-a", "pod-b"], &["pod-a", "pod-b"]).expect("manifests");
    // An empty directory as PATH: no nft, iptables or iptables-restore for the agent.
    let empty = c.tmp_dir().join("empty-path");
    std::fs::create_dir_all(&empty).expect("creating the empty PATH directory");
    start_auto_without_bpf(&mut c, Some(empty.to_str().expect("utf-8 path")));

    let log = agent_log(&c);
    let chosen = log
        .lines()
        .find(|l| l.contains("proxy mode userspace chosen"))
        .unwrap_or_else(|| fail(&c, "no line saying userspace was chosen"));
    eprintln!("agent: {chosen}");
    for why in ["ebpf:", "nftables:", "iptables:"] {
        assert!(
            chosen.contains(why),
            "the choice must say why {why} was not usable: {chosen}"
        );
    }

    // Served through the relay: the nodePort from outside (the pods see the node, the
    // userspace mode's documented limitation), the cluster IP from a pod, and
    // localhost:nodePort on the node.
    let nodeport = format!("http://{}:{}/", c.node_ip(1), seed::MYSVC_NODEPORT);
    let cip = format!("http://{}:{}/", seed::MYSVC_IP, seed::MYSVC_PORT);
    let localhost = format!("http://127.0.0.1:{}/", seed::MYSVC_NODEPORT);
    for (place, url) in [
        (c.client(), &nodeport),
        (c.pod(fixtures::CLIENT_POD), &cip),
        (c.node(1), &localhost),
    ] {
        let results = probe::curl_n(&place, url, 16, Duration::from_secs(3)).expect("curl");
        let failed: Vec<String> = results
            .iter()
            .filter(|r| !r.ok())
            .map(|r| r.to_string())
            .collect();
        if !failed.is_empty() {
            fail(
                &c,
                format!("{} -> {url} through the relay: {failed:#?}", place.label),
            );
        }
        let answered: Vec<String> = tally(&results).keys().cloned().collect();
        assert_eq!(answered, ["pod-a", "pod-b"], "{} -> {url}", place.label);
    }
    let r = probe::curl(&c.client(), &nodeport, Duration::from_secs(3)).expect("curl");
    assert_eq!(
        r.seen_source(),
        Some(c.node_ip(1).to_string().as_str()),
        "the relay connects from the node: {r}"
    );

    // Nothing of the other modes was installed.
    let node = c.node(1);
    let nft = node.output(&["nft", "list", "ruleset"]).expect("nft");
    let nft = String::from_utf8_lossy(&nft.stdout).into_owned();
    assert!(!nft.contains("kproxy"), "no nftables table: {nft}");
    let links = node.output(&["ip", "-d", "link", "show"]).expect("ip link");
    let links = String::from_utf8_lossy(&links.stdout).into_owned();
    assert!(!links.contains("prog/xdp"), "no XDP program: {links}");
    assert!(links.contains("kproxy0"), "the relay interface: {links}");
}
