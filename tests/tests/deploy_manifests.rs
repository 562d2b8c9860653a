//! The deploy/ manifests: every document validates against the Kubernetes API schemas
//! (`kubernetes-validate`, strict: unknown fields are errors, for the oldest and newest
//! versions kproxy targets), and the DaemonSet, parsed into the API types, has what a node
//! proxy needs (host network, named capabilities without privileged, bpffs and cgroup2
//! mounts, liveness on /healthz:10256, system-node-critical, tolerating every taint).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::Deserialize as _;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn manifests() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("reading deploy/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no YAML files in deploy/");
    v
}

/// Every YAML document of deploy/, as (file, kind, value).
fn documents() -> Vec<(String, String, serde_yaml::Value)> {
    let mut out = Vec::new();
    for path in manifests() {
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = serde_yaml::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));
            if v.is_null() {
                continue;
            }
            let kind = v["kind"].as_str().unwrap_or_default().to_string();
            out.push((path.display().to_string(), kind, v));
        }
    }
    out
}

fn one<T: serde::de::DeserializeOwned>(kind: &str) -> T {
    let docs: Vec<_> = documents().into_iter().filter(|d| d.1 == kind).collect();
    assert_eq!(docs.len(), 1, "expected exactly one {kind} in deploy/");
    serde_yaml::from_value(docs[0].2.clone())
        .unwrap_or_else(|e| panic!("{}: the {kind} does not parse: {e}", docs[0].0))
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    let files: Vec<String> = manifests()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    for version in ["1.30.0", "1.33.0"] {
        let out = Command::new("python3")
            .args(["-m", "kubernetes_validate", "--strict", "-k", version])
            .args(&files)
            .output()
            .expect("running python3");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("No module named kubernetes_validate"),
            "kubernetes-validate is not installed: run `cargo xtask setup`\n{stderr}"
        );
        println!("kubernetes {version}:\n{stdout}{stderr}");
        assert!(
            out.status.success() && !stdout.contains("ERROR") && !stderr.contains("ERROR"),
            "deploy/ does not validate against Kubernetes {version}:\n{stdout}{stderr}"
        );
        // Every document was checked (a file it could not read would be skipped silently).
        let passed = stdout
            .lines()
            .chain(stderr.lines())
            .filter(|l| l.contains(" passed "))
            .count();
        assert_eq!(passed, documents().len(), "{stdout}{stderr}");
    }
}

#[test]
fn every_object_parses_into_the_api_types() {
    let kinds: BTreeSet<String> = documents().into_iter().map(|d| d.1).collect();
    let want: BTreeSet<String> = [
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
        "ServiceAccount",
    ]
    .map(String::from)
    .into();
    assert_eq!(kinds, want);
    let sa: ServiceAccount = one("ServiceAccount");
    let role: ClusterRole = one("ClusterRole");
    let binding: ClusterRoleBinding = one("ClusterRoleBinding");
    let config: ConfigMap = one("ConfigMap");
    let ds: DaemonSet = one("DaemonSet");
    let sa_name = sa.metadata.name.clone().unwrap();
    let ns = sa.metadata.namespace.clone().unwrap();

    // RBAC: list/watch on what kproxy reads, events to report; nothing else.
    let rules = role.rules.unwrap_or_default();
    let mut granted = BTreeSet::new();
    for r in &rules {
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                for v in &r.verbs {
                    granted.insert(format!("{g}/{res}:{v}"));
                }
            }
        }
    }
    for want in [
        "/services:list",
        "/services:watch",
        "/nodes:list",
        "/nodes:watch",
        "discovery.k8s.io/endpointslices:list",
        "discovery.k8s.io/endpointslices:watch",
        "/events:create",
        "/events:patch",
    ] {
        assert!(
            granted.contains(want),
            "ClusterRole lacks {want}: {granted:?}"
        );
    }
    for g in &granted {
        let verb = g.rsplit(':').next().unwrap();
        assert!(
            ["list", "watch"].contains(&verb) || g.contains("/events:"),
            "ClusterRole grants more than list/watch: {g}"
        );
    }
    assert_eq!(binding.role_ref.name, role.metadata.name.clone().unwrap());
    let subject = &binding.subjects.as_ref().unwrap()[0];
    assert_eq!(
        (subject.kind.as_str(), subject.name.as_str()),
        ("ServiceAccount", sa_name.as_str())
    );
    assert_eq!(subject.namespace.as_deref(), Some(ns.as_str()));

    // The DaemonSet.
    let spec = ds.spec.expect("DaemonSet spec");
    let pod = spec.template.spec.expect("pod spec");
    assert_eq!(pod.host_network, Some(true), "hostNetwork");
    assert_ne!(pod.host_pid, Some(true), "hostPID is not needed");
    assert_eq!(pod.service_account_name.as_deref(), Some(sa_name.as_str()));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tolerations = pod.tolerations.unwrap_or_default();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "must tolerate every taint (operator: Exists, no key, no effect): {tolerations:?}"
    );
    assert_eq!(pod.containers.len(), 1);
    let c = &pod.containers[0];

    let sc = c.security_context.clone().expect("securityContext");
    assert_eq!(sc.privileged, Some(false), "not privileged");
    let caps = sc.capabilities.expect("capabilities");
    assert_eq!(caps.drop, Some(vec!["ALL".to_string()]));
    let added: BTreeSet<String> = caps.add.unwrap_or_default().into_iter().collect();
    let expected: BTreeSet<String> = [
        "BPF",
        "NET_ADMIN",
        "SYS_ADMIN",
        "PERFMON",
        "SYS_RESOURCE",
        "NET_BIND_SERVICE",
    ]
    .map(String::from)
    .into();
    assert_eq!(added, expected, "capabilities added");

    let probe = c.liveness_probe.clone().expect("livenessProbe");
    let get = probe.http_get.expect("liveness httpGet");
    assert_eq!(get.path.as_deref(), Some("/healthz"));
    assert_eq!(get.port, IntOrString::Int(10256));

    let volumes = pod.volumes.unwrap_or_default();
    let host_path_of = |mount_path: &str| -> String {
        let m = c
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == mount_path)
            .unwrap_or_else(|| panic!("no volumeMount at {mount_path}"));
        let v = volumes
            .iter()
            .find(|v| v.name == m.name)
            .unwrap_or_else(|| panic!("no volume {}", m.name));
        v.host_path
            .as_ref()
            .unwrap_or_else(|| panic!("volume {} is not a hostPath", m.name))
            .path
            .clone()
    };
    assert_eq!(host_path_of("/sys/fs/bpf"), "/sys/fs/bpf", "bpffs");
    assert_eq!(
        host_path_of("/run/kproxy/cgroup"),
        "/sys/fs/cgroup",
        "cgroup2"
    );

    // The flags point at those mounts, and every $(VAR) they use is defined.
    let args = c.args.clone().unwrap_or_default();
    assert_eq!(args.first().map(String::as_str), Some("run"));
    for want in [
        "--bpf-root=/sys/fs/bpf/kproxy",
        "--cgroup-root=/run/kproxy/cgroup",
        "--healthz-bind-address=0.0.0.0:10256",
        "--hostname-override=$(NODE_NAME)",
    ] {
        assert!(args.iter().any(|a| a == want), "args lack {want}: {args:?}");
    }
    let data = config.data.unwrap_or_default();
    let env: BTreeSet<String> = c
        .env
        .iter()
        .flatten()
        .map(|e| e.name.clone())
        .chain(data.keys().cloned())
        .collect();
    assert!(
        c.env_from
            .iter()
            .flatten()
            .any(|e| e.config_map_ref.as_ref().map(|r| r.name.as_str())
                == config.metadata.name.as_deref()),
        "the container does not read the ConfigMap"
    );
    for a in &args {
        if let Some(start) = a.find("$(") {
            let var = &a[start + 2..a[start..].find(')').unwrap() + start];
            assert!(env.contains(var), "{a}: {var} is not defined: {env:?}");
        }
    }
    for key in ["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"] {
        assert!(data.contains_key(key), "ConfigMap lacks {key}");
    }
}
