//! The integration-test harness: a Kubernetes-like cluster made of network namespaces on one
//! machine, the kproxy agent started per node, and clients that report what they saw.
//!
//! ```no_run
//! use kproxy_tests::harness::{Cluster, PodSpec, manifests::seed};
//! let mut c = Cluster::builder().nodes(1).pod(PodSpec::new("pod-a", 1)).build().unwrap();
//! c.write_manifests("mysvc.yaml", &[seed::mysvc().into(), seed::mysvc_slice([c.endpoint("pod-a")]).into()]).unwrap();
//! c.start_agent_ready(1).unwrap();
//! let r = c.curl(&c.client(), "http://198.18.0.1:30001/");
//! assert_eq!(r.pod(), Some("pod-a"));
//! ```
//!
//! Needs root and the tools `ip` (iproute2), `ethtool`, `nginx` (nginx-light), `curl`, and
//! for some tests `bpftool` and `tc`.

pub mod cluster;
pub mod demo;
pub mod faults;
pub mod fixtures;
pub mod manifests;
pub mod probe;
pub mod sys;

pub use cluster::{
    CLIENT_IP, Cluster, ClusterBuilder, PodSpec, kproxy_bin, node_ip, pod_cidr, testpod_bin,
};
pub use probe::{AskLine, CurlResult, Outcome};
pub use sys::Place;
