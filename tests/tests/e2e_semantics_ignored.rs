//! Service semantics, Services kproxy must leave alone (e2e "should implement
//! service.kubernetes.io/service-proxy-name", "should implement
//! service.kubernetes.io/headless", ExternalName): they get no frontend, are not served, and
//! are no error (nothing logged as a warning or error, the agent stays healthy and serves
//! the others). Changing them into proxied Services (the label removed, ExternalName ->
//! ClusterIP) serves them.

mod semantics_common;

use kproxy_tests::harness::{Cluster, PodSpec};
use semantics_common::*;

const TESTPOD: &str = env!("CARGO_BIN_EXE_kproxy-testpod");

fn other_proxy(labelled: bool) -> String {
    let labels = if labelled {
        "\n  labels: {service.kubernetes.io/service-proxy-name: other-proxy}"
    } else {
        ""
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: other\n  namespace: default{labels}\nspec:\n  type: NodePort\n  clusterIP: 10.96.105.30\n  selector: {{app: web}}\n  ports:\n  - {{name: http, protocol: TCP, port: 80, targetPort: 80, nodePort: 30107}}\n"
    )
}

fn external_name(converted: bool) -> String {
    let spec = if converted {
        "  type: ClusterIP\n  clusterIP: 10.96.105.50\n  selector: {app: web}"
    } else {
        "  type: ExternalName\n  externalName: web.example.invalid"
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: extname, namespace: default}}\nspec:\n{spec}\n  ports:\n  - {{name: http, protocol: TCP, port: 80, targetPort: 80}}\n"
    )
}

const HEADLESS: &str = "apiVersion: v1
kind: Service
metadata: {name: headless, namespace: default}
spec:
  clusterIP: None
  clusterIPs: [None]
  selector: {app: web}
  ports:
  - {name: http, protocol: TCP, port: 80, targetPort: 80}
";

const NORMAL: &str = "apiVersion: v1
kind: Service
metadata: {name: normal, namespace: default}
spec:
  clusterIP: 10.96.105.40
  selector: {app: web}
  ports:
  - {name: http, protocol: TCP, port: 80, targetPort: 80}
";

#[test]
fn external_name_headless_and_other_proxies_services_are_ignored() {
    let mut c = Cluster::builder()
        .nodes(1)
        .testpod(TESTPOD)
        .pod(PodSpec::new("pod-a", 1))
        .pod(PodSpec::new("pod-z", 1).http_ports(&[]))
        .build()
        .expect("building the cluster");
    let ep = [Ep::of(&c, "pod-a")];
    let http = [("http", "TCP", 80)];
    let mut headless_slice = slice("headless-1", "headless", &http, &ep);
    headless_slice = headless_slice.replace(
        "    kubernetes.io/service-name: headless\n",
        "    kubernetes.io/service-name: headless\n    service.kubernetes.io/headless: \"\"\n",
    );
    let docs = |labelled: bool, converted: bool| {
        vec![
            other_proxy(labelled),
            slice("other-1", "other", &http, &ep),
            external_name(converted),
            slice("extname-1", "extname", &http, &ep),
            HEADLESS.to_string(),
            headless_slice.clone(),
            NORMAL.to_string(),
            slice("normal-1", "normal", &http, &ep),
        ]
    };
    write(&c, "services.yaml", &docs(true, false));
    c.start_agent_ready(1).unwrap();
    let pod_z = c.pod("pod-z");
    let client = c.client();
    wait_served(
        &c,
        &pod_z,
        "http://10.96.105.40/",
        "the normal service",
        |r| r.pod() == Some("pod-a"),
    );

    // Only the normal service is programmed.
    let fe = frontends(&c, 1);
    println!("frontends: {fe:?}");
    c.check(fe == ["10.96.105.40:80/TCP"], || {
        format!("only normal's frontend should be programmed: {fe:#?}")
    });
    // Not served: the other proxy's cluster IP and nodePort.
    let r = curl(&pod_z, "http://10.96.105.30/");
    c.check(!r.ok(), || {
        format!("the other proxy's service is served: {r}")
    });
    let r = curl(&client, "http://198.18.0.1:30107/");
    c.check(!r.ok(), || {
        format!("the other proxy's nodePort is served: {r}")
    });
    // No error: nothing about them is logged as a warning or an error.
    let log = c.agent_log(1);
    let complaints: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .filter(|l| {
            ["other", "extname", "headless"]
                .iter()
                .any(|n| l.contains(n))
        })
        .collect();
    c.check(complaints.is_empty(), || {
        format!("ignored services were reported as problems: {complaints:#?}")
    });
    assert_eq!(c.healthz(1), 200);

    // The label removed, ExternalName turned into ClusterIP: both are served now.
    write(&c, "services.yaml", &docs(false, true));
    for (place, url) in [
        (&pod_z, "http://10.96.105.30/"),
        (&client, "http://198.18.0.1:30107/"),
        (&pod_z, "http://10.96.105.50/"),
    ] {
        wait_served(&c, place, url, "now proxied", |r| r.pod() == Some("pod-a"));
    }
    // And back to ExternalName / labelled: released again.
    write(&c, "services.yaml", &docs(true, false));
    wait_frontends(&c, 1, "ignored again", |fe| fe == ["10.96.105.40:80/TCP"]);
    wait_not_served(&c, &pod_z, "http://10.96.105.50/", "ExternalName again");
    wait_not_served(&c, &client, "http://198.18.0.1:30107/", "labelled again");
}
