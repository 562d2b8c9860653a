//! A "cluster" made of network namespaces:
//!
//! ```text
//!  client netns (198.18.0.100/24 eth0)          an outside host
//!        |
//!  lan netns: bridge br0 ---------------------- one port per node and the client
//!        |                         |
//!  node1 netns (eth0 198.18.0.1)   node2 netns (eth0 198.18.0.2)   ... ip_forward=1
//!    | vp0  | vp1                    pod CIDR 10.244.N.0/24, routes to the other
//!  pod-a   pod-b                     nodes' pod CIDRs via their node IPs
//!  (eth0 10.244.1.10/32, default via 169.254.1.1 = the node, which has it on lo)
//! ```
//!
//! With `ClusterBuilder::dual_stack()` every one of them also gets an IPv6 address next to
//! its IPv4 one (all IPv4 addresses unchanged): the client fd00:198:18::100/64, node n
//! fd00:198:18::n/64, pods fd00:10:244:n::<10+k>/128 with a default route via fe80::1 (the
//! node's end of every pod veth), routes between nodes' pod ranges fd00:10:244:n::/64;
//! no DAD anywhere (`accept_dad=0`, `nodad`), so addresses are usable at once.
//!
//! Each node also gets its own cgroup v2 directory (every process started "in" the node or
//! one of its pods is put there, so the agent's socket hooks see them) and its own bpf-root
//! directory. Everything is named `kpt<pid>x<counter>...` and removed on drop, also when a
//! test panics (the agents' logs are printed then).

use std::{
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};

use super::{
    manifests::{self, Endpoint, Object},
    probe,
    sys::{self, Cgroup, NetNs, Place, Proc},
};

/// The outside client's address on the lan.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
/// Pods' default gateway: a link-local address every node has on `lo`.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
pub const HEALTHZ_PORT: u16 = 10256;

/// The outside client's IPv6 address on the lan (dual-stack clusters).
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, 0, 0x100);
/// Pods' IPv6 default gateway: the node's end of every pod veth.
pub const POD_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// The IPv6 address of node `n` on the lan (dual-stack clusters).
pub fn node_ip6(n: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, 0, u16::from(n))
}

/// The IPv6 pod range of node `n`.
pub fn pod_cidr6(n: u8) -> String {
    format!("fd00:10:244:{n:x}::/64")
}

/// The address of node `n` (1-based) on the lan.
pub fn node_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, n)
}

/// The pod CIDR of node `n`.
pub fn pod_cidr(n: u8) -> String {
    format!("10.244.{n}.0/24")
}

/// The `kproxy` binary: `$KPROXY_BIN`, else `<workspace>/target/release/kproxy`.
pub fn kproxy_bin() -> Result<PathBuf> {
    let p = match std::env::var_os("KPROXY_BIN") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/kproxy"),
    };
    if !p.is_file() {
        bail!(
            "the kproxy agent binary is missing at {}: run `cargo build --release` (or \
             `cargo xtask test`), or point KPROXY_BIN at it",
            p.display()
        );
    }
    Ok(p.canonicalize().unwrap_or(p))
}

/// The `kproxy-testpod` binary: `$KPROXY_TESTPOD_BIN`, else next to the running executable
/// (integration tests live in `target/<profile>/deps`), else `target/{release,debug}`.
pub fn testpod_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KPROXY_TESTPOD_BIN") {
        return Ok(PathBuf::from(p));
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            candidates.push(dir.join("kproxy-testpod"));
        }
    }
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    candidates.push(target.join("release/kproxy-testpod"));
    candidates.push(target.join("debug/kproxy-testpod"));
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        anyhow!("kproxy-testpod is not built: run `cargo build -p kproxy-tests --bins` (or `cargo xtask test`)")
    })
}

/// A pod to create.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub name: String,
    /// 1-based node index.
    pub node: u8,
    /// Default: 10.244.<node>.<10 + index of the pod on its node>.
    pub ip: Option<Ipv4Addr>,
    /// nginx ports. Port 80 answers `"<name> $remote_addr\n"`, any other port P answers
    /// `"<name>:P $remote_addr\n"`. Empty: no nginx.
    pub http_ports: Vec<u16>,
    /// `kproxy-testpod udp-serve <name> <ip>:<port>` for each.
    pub udp_ports: Vec<u16>,
}

/// Turns off duplicate address detection in `ns` for interfaces created from now on (and
/// existing ones), so IPv6 addresses are usable at once.
fn no_dad(ns: &NetNs) -> Result<()> {
    for k in [
        "net.ipv6.conf.all.accept_dad",
        "net.ipv6.conf.default.accept_dad",
    ] {
        ns.sysctl(k, "0")?;
    }
    Ok(())
}

impl PodSpec {
    /// A pod with nginx on port 80.
    pub fn new(name: &str, node: u8) -> PodSpec {
        PodSpec {
            name: name.into(),
            node,
            ip: None,
            http_ports: vec![80],
            udp_ports: Vec::new(),
        }
    }

    pub fn ip(mut self, ip: Ipv4Addr) -> PodSpec {
        self.ip = Some(ip);
        self
    }

    pub fn http_ports(mut self, ports: &[u16]) -> PodSpec {
        self.http_ports = ports.to_vec();
        self
    }

    pub fn udp(mut self, port: u16) -> PodSpec {
        self.udp_ports.push(port);
        self
    }
}

#[derive(Default)]
pub struct ClusterBuilder {
    nodes: u8,
    pods: Vec<PodSpec>,
    testpod: Option<PathBuf>,
    proxy_mode: Option<String>,
    dual_stack: bool,
}

impl ClusterBuilder {
    /// Gives the client, nodes and pods IPv6 addresses too (see the module docs); nginx
    /// then also listens on the pod's IPv6 address.
    pub fn dual_stack(mut self) -> Self {
        self.dual_stack = true;
        self
    }

    pub fn nodes(mut self, n: u8) -> Self {
        self.nodes = n;
        self
    }

    pub fn pod(mut self, spec: PodSpec) -> Self {
        self.pods.push(spec);
        self
    }

    /// The `kproxy-testpod` to use (integration tests pass `env!("CARGO_BIN_EXE_kproxy-testpod")`).
    pub fn testpod(mut self, path: impl Into<PathBuf>) -> Self {
        self.testpod = Some(path.into());
        self
    }

    /// The agents' `--proxy-mode` (default `ebpf`).
    pub fn proxy_mode(mut self, mode: &str) -> Self {
        self.proxy_mode = Some(mode.into());
        self
    }

    pub fn build(self) -> Result<Cluster> {
        Cluster::build(self)
    }
}

struct NodeState {
    index: u8,
    name: String,
    ip: Ipv4Addr,
    netns: Arc<NetNs>,
    cgroup: Cgroup,
    bpf_root: PathBuf,
    dir: PathBuf,
    agent: Option<Proc>,
    /// bpf roots an agent ran with (cleaned up on drop).
    agent_ran: bool,
    next_if: u32,
    pods_on_node: u8,
}

struct PodState {
    spec: PodSpec,
    ip: Ipv4Addr,
    /// Dual-stack clusters only.
    ip6: Option<Ipv6Addr>,
    netns: Arc<NetNs>,
    dir: PathBuf,
    nginx: Option<Proc>,
    udp: Vec<Proc>,
}

/// A running cluster; see the module docs. Dropping it removes everything it created.
pub struct Cluster {
    id: String,
    tmp: PathBuf,
    manifests: PathBuf,
    testpod: PathBuf,
    cgroup_parent: Option<Cgroup>,
    lan: Option<Arc<NetNs>>,
    client: Option<Arc<NetNs>>,
    nodes: Vec<NodeState>,
    pods: Vec<PodState>,
    /// Other processes started through `spawn` (ended on drop).
    extra: Vec<Proc>,
    /// The agents' `--proxy-mode`.
    proxy_mode: String,
    dual_stack: bool,
}

impl Cluster {
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder {
            nodes: 1,
            ..Default::default()
        }
    }

    fn build(b: ClusterBuilder) -> Result<Cluster> {
        sys::require_root()?;
        sys::require_tools(&["ip", "ethtool", "nginx", "curl"])?;
        let testpod = match b.testpod {
            Some(p) => p,
            None => testpod_bin()?,
        };
        if !testpod.is_file() {
            bail!("kproxy-testpod not found at {}", testpod.display());
        }
        if b.nodes == 0 || b.nodes > 99 {
            bail!("a cluster needs 1..=99 nodes");
        }
        let cg_root = sys::cgroup2_mount()?;
        let tmp_root = std::env::temp_dir();
        sys::sweep_stale(&cg_root, &tmp_root);

        let id = sys::unique_id();
        let tmp = tmp_root.join(&id);
        fs::create_dir_all(&tmp)?;
        let manifests = tmp.join("manifests");
        let mut c = Cluster {
            id: id.clone(),
            tmp: tmp.clone(),
            manifests: manifests.clone(),
            testpod,
            cgroup_parent: None,
            lan: None,
            client: None,
            nodes: Vec::new(),
            pods: Vec::new(),
            extra: Vec::new(),
            proxy_mode: b.proxy_mode.clone().unwrap_or_else(|| "ebpf".into()),
            dual_stack: b.dual_stack,
        };
        fs::create_dir_all(&manifests)?;
        c.cgroup_parent = Some(Cgroup::create(cg_root.join(&id))?);

        // The lan: a bridge in its own namespace.
        let lan = NetNs::create(&format!("{id}-lan"))?;
        c.lan = Some(lan.clone());
        lan.ip_batch(&["link add br0 type bridge".into(), "link set br0 up".into()])?;

        // The outside client.
        let client = NetNs::create(&format!("{id}-client"))?;
        c.client = Some(client.clone());
        if c.dual_stack {
            no_dad(&client)?;
        }
        lan.ip(&[
            "link",
            "add",
            "cl",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            client.name(),
        ])?;
        lan.ip_batch(&["link set cl master br0".into(), "link set cl up".into()])?;
        client.ip_batch(&[
            format!("addr add {CLIENT_IP}/24 dev eth0"),
            "link set eth0 up".into(),
        ])?;
        if c.dual_stack {
            client.ip_batch(&[format!("addr add {CLIENT_IP6}/64 dev eth0 nodad")])?;
        }
        c.ethtool(&lan, "cl", &["tx", "off"])?;
        c.ethtool(&client, "eth0", &["tx", "off"])?;

        for n in 1..=b.nodes {
            c.add_node(n)?;
        }
        // Pod CIDR routes between nodes.
        for i in 0..c.nodes.len() {
            let lines: Vec<String> = (1..=b.nodes)
                .filter(|&m| m != c.nodes[i].index)
                .map(|m| format!("route add {} via {}", pod_cidr(m), node_ip(m)))
                .collect();
            c.nodes[i].netns.ip_batch(&lines)?;
            if c.dual_stack {
                let lines: Vec<String> = (1..=b.nodes)
                    .filter(|&m| m != c.nodes[i].index)
                    .map(|m| format!("route add {} via {}", pod_cidr6(m), node_ip6(m)))
                    .collect();
                c.nodes[i].netns.ip_batch(&lines)?;
            }
        }
        c.write_manifests("nodes.yaml", &c.node_objects())?;
        for spec in b.pods {
            c.add_pod(spec)?;
        }
        Ok(c)
    }

    /// `ethtool -K <dev> <features...>` inside `ns`.
    fn ethtool(&self, ns: &Arc<NetNs>, dev: &str, features: &[&str]) -> Result<()> {
        let place = Place {
            netns: Some(ns.clone()),
            cgroup: None,
            label: ns.name().into(),
        };
        let mut argv = vec!["ethtool", "-K", dev];
        argv.extend_from_slice(features);
        let out = place.output(&argv)?;
        if !out.status.success() {
            bail!(
                "{argv:?} in {}: {}",
                ns.name(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn add_node(&mut self, n: u8) -> Result<()> {
        let lan = self.lan.clone().unwrap();
        let name = format!("node{n}");
        let netns = NetNs::create(&format!("{}-{name}", self.id))?;
        let cgroup = Cgroup::create(self.cgroup_parent.as_ref().unwrap().path().join(&name))?;
        let dir = self.tmp.join(&name);
        let bpf_root = dir.join("bpf");
        fs::create_dir_all(&bpf_root)?;
        let ip = node_ip(n);
        self.nodes.push(NodeState {
            index: n,
            name: name.clone(),
            ip,
            netns: netns.clone(),
            cgroup,
            bpf_root,
            dir,
            agent: None,
            agent_ran: false,
            next_if: 0,
            pods_on_node: 0,
        });
        let lan_if = format!("n{n}");
        if self.dual_stack {
            no_dad(&netns)?;
        }
        lan.ip(&[
            "link",
            "add",
            &lan_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns.name(),
        ])?;
        lan.ip_batch(&[
            format!("link set {lan_if} master br0"),
            format!("link set {lan_if} up"),
        ])?;
        netns.ip_batch(&[
            format!("addr add {ip}/24 dev eth0"),
            "link set eth0 up".into(),
            format!("addr add {POD_GATEWAY}/32 dev lo scope link"),
        ])?;
        if self.dual_stack {
            // A default route, as real nodes have: packets to service addresses then reach
            // the forward hook (where the rule modes reject them without endpoints) instead
            // of being answered "no route" by the kernel.
            netns.ip_batch(&[
                format!("addr add {}/64 dev eth0 nodad", node_ip6(n)),
                "route add ::/0 dev eth0".into(),
            ])?;
            netns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        }
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            ("net.ipv4.conf.eth0.rp_filter", "0"),
        ] {
            netns.sysctl(k, v)?;
        }
        // Physical-NIC realism on veths:
        // - tx checksum offload off on every veth end: a veth otherwise passes packets with a
        //   partial (CHECKSUM_PARTIAL) checksum through to the peer, which a real NIC never
        //   delivers; with it off, the dataplane sees and must fix complete checksums.
        // - the lan-side peer of each node's eth0 gets GRO and an XDP program that passes
        //   everything: a real NIC always transmits XDP_TX frames, but a veth hands them to
        //   its peer only when the peer has NAPI (GRO) and, for XDP_TX, also wakes the peer
        //   only when it runs an XDP program; without it XDP_TX'd frames sit unprocessed.
        self.ethtool(&netns, "eth0", &["tx", "off"])?;
        self.ethtool(&lan, &lan_if, &["tx", "off", "gro", "on"])?;
        self.xdp_pass(&lan, &lan_if)?;
        Ok(())
    }

    /// Attaches an XDP_PASS program to `dev` in `ns` (loaded and pinned by kproxy-testpod on
    /// a bpffs of the cluster's own, attached with `ip link set ... xdpdrv pinned`).
    fn xdp_pass(&self, ns: &Arc<NetNs>, dev: &str) -> Result<()> {
        let bpffs = self.tmp.join("lan-bpf");
        if !sys::is_bpffs(&bpffs) {
            fs::create_dir_all(&bpffs)?;
            sys::run_checked(
                std::process::Command::new("mount")
                    .args(["-t", "bpf", "bpf"])
                    .arg(&bpffs),
            )?;
        }
        let pin = bpffs.join(format!("xdp_pass_{dev}"));
        let tp = self.testpod.to_string_lossy().into_owned();
        sys::run_checked(
            std::process::Command::new(&tp)
                .arg("xdp-pass-pin")
                .arg(&pin),
        )?;
        let r = ns.ip(&[
            "link",
            "set",
            "dev",
            dev,
            "xdpdrv",
            "pinned",
            pin.to_str().unwrap(),
        ]);
        let _ = fs::remove_file(&pin);
        r.map(|_| ())
    }

    /// Adds (and starts) a pod; may be called after `build`.
    pub fn add_pod(&mut self, spec: PodSpec) -> Result<()> {
        if self.pods.iter().any(|p| p.spec.name == spec.name) {
            bail!("pod {} exists already", spec.name);
        }
        let ni = self.node_idx(spec.node)?;
        let node_ns = self.nodes[ni].netns.clone();
        let node_ip = self.nodes[ni].ip;
        let ip = spec.ip.unwrap_or(Ipv4Addr::new(
            10,
            244,
            spec.node,
            10 + self.nodes[ni].pods_on_node,
        ));
        let ip6 = self.dual_stack.then(|| {
            Ipv6Addr::new(
                0xfd00,
                0x10,
                0x244,
                u16::from(spec.node),
                0,
                0,
                0,
                u16::from(10 + self.nodes[ni].pods_on_node),
            )
        });
        self.nodes[ni].pods_on_node += 1;
        let if_name = format!("vp{}", self.nodes[ni].next_if);
        self.nodes[ni].next_if += 1;

        let netns = NetNs::create(&format!("{}-n{}-{}", self.id, spec.node, spec.name))?;
        let dir = self.tmp.join("pods").join(&spec.name);
        fs::create_dir_all(&dir)?;
        self.pods.push(PodState {
            spec: spec.clone(),
            ip,
            ip6,
            netns: netns.clone(),
            dir: dir.clone(),
            nginx: None,
            udp: Vec::new(),
        });

        if ip6.is_some() {
            no_dad(&netns)?;
        }
        node_ns.ip(&[
            "link",
            "add",
            &if_name,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns.name(),
        ])?;
        node_ns.ip_batch(&[
            format!("link set {if_name} up"),
            format!("route add {ip}/32 dev {if_name} scope link src {node_ip}"),
        ])?;
        netns.ip_batch(&[
            format!("addr add {ip}/32 dev eth0"),
            "link set eth0 up".into(),
            format!("route add {POD_GATEWAY}/32 dev eth0 scope link"),
            format!("route add default via {POD_GATEWAY} dev eth0"),
        ])?;
        if let Some(ip6) = ip6 {
            node_ns.ip_batch(&[
                format!("addr add {POD_GATEWAY6}/64 dev {if_name} nodad"),
                format!("route add {ip6}/128 dev {if_name}"),
            ])?;
            netns.ip_batch(&[
                format!("addr add {ip6}/128 dev eth0 nodad"),
                format!("route add ::/0 via {POD_GATEWAY6} dev eth0"),
            ])?;
        }
        // See add_node: no partial checksums from veths. The pod side keeps GRO off, as the
        // veths CNIs create do, so frames XDP-redirected into a pod's veth are dropped (the
        // kernel wants NAPI on the receiving peer): a dataplane must not rely on that.
        // KPROXY_E2E_POD_NAPI=1 turns GRO on there, to triage past such a failure.
        self.ethtool(&node_ns, &if_name, &["tx", "off"])?;
        self.ethtool(&netns, "eth0", &["tx", "off"])?;
        if std::env::var("KPROXY_E2E_POD_NAPI").is_ok_and(|v| v == "1") {
            self.ethtool(&netns, "eth0", &["gro", "on"])?;
        }

        if !spec.http_ports.is_empty() {
            self.start_nginx(&spec.name)?;
        }
        for port in spec.udp_ports.clone() {
            self.start_udp_serve(&spec.name, port)?;
        }
        Ok(())
    }

    fn node_idx(&self, n: u8) -> Result<usize> {
        self.nodes
            .iter()
            .position(|x| x.index == n)
            .ok_or_else(|| anyhow!("no node{n} in this cluster"))
    }

    fn pod_idx(&self, name: &str) -> Result<usize> {
        self.pods
            .iter()
            .position(|p| p.spec.name == name)
            .ok_or_else(|| anyhow!("no pod {name} in this cluster"))
    }

    /// Starts nginx in pod `name` (again, after `kill_pod`).
    pub fn start_nginx(&mut self, name: &str) -> Result<()> {
        let pi = self.pod_idx(name)?;
        let place = self.pod(name);
        let p = &self.pods[pi];
        let dir = p.dir.clone();
        for sub in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
            fs::create_dir_all(dir.join("tmp").join(sub))?;
        }
        let pid_file = dir.join("nginx.pid");
        let _ = fs::remove_file(&pid_file);
        let mut servers = String::new();
        for &port in &p.spec.http_ports {
            let label = if port == 80 {
                p.spec.name.clone()
            } else {
                format!("{}:{port}", p.spec.name)
            };
            let listen6 = p
                .ip6
                .map(|ip6| format!("        listen [{ip6}]:{port};\n"))
                .unwrap_or_default();
            servers.push_str(&format!(
                "    server {{\n        listen {}:{port};\n{listen6}        location / {{ return 200 \"{label} $remote_addr\\n\"; }}\n    }}\n",
                p.ip
            ));
        }
        let d = dir.display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 512; }}\n\
             http {{\n    access_log off;\n    default_type text/plain;\n    keepalive_timeout 0;\n\
             \x20   client_body_temp_path {d}/tmp/body;\n    proxy_temp_path {d}/tmp/proxy;\n\
             \x20   fastcgi_temp_path {d}/tmp/fastcgi;\n    uwsgi_temp_path {d}/tmp/uwsgi;\n    scgi_temp_path {d}/tmp/scgi;\n\
             {servers}}}\n"
        );
        let conf_path = dir.join("nginx.conf");
        fs::write(&conf_path, conf)?;
        let log = dir.join("nginx.out");
        let proc = place.spawn_logged(
            &format!("nginx {name}"),
            &[
                "nginx",
                "-e",
                &format!("{d}/error.log"),
                "-p",
                &format!("{d}/"),
                "-c",
                conf_path.to_str().unwrap(),
            ],
            &log,
        )?;
        self.pods[pi].nginx = Some(proc);
        // nginx writes its pid file after it has bound its listening sockets.
        let ok = sys::wait_for(Duration::from_secs(5), Duration::from_millis(10), || {
            pid_file.exists().then_some(())
        });
        if ok.is_none() {
            let out = fs::read_to_string(&log).unwrap_or_default();
            let err = fs::read_to_string(dir.join("error.log")).unwrap_or_default();
            bail!("nginx in pod {name} did not start:\n{out}\n{err}");
        }
        Ok(())
    }

    /// Starts `kproxy-testpod udp-serve <pod> <pod ip>:<port>` in pod `name`.
    pub fn start_udp_serve(&mut self, name: &str, port: u16) -> Result<()> {
        let pi = self.pod_idx(name)?;
        let place = self.pod(name);
        let log = self.pods[pi].dir.join(format!("udp-{port}.out"));
        let _ = fs::remove_file(&log);
        let addr = format!("{}:{port}", self.pods[pi].ip);
        let tp = self.testpod.to_string_lossy().into_owned();
        let proc = place.spawn_logged(
            &format!("udp-serve {name}:{port}"),
            &[&tp, "udp-serve", name, &addr],
            &log,
        )?;
        self.pods[pi].udp.push(proc);
        let ok = sys::wait_for(Duration::from_secs(5), Duration::from_millis(10), || {
            fs::read_to_string(&log)
                .ok()
                .filter(|s| s.contains("listening"))
                .map(|_| ())
        });
        if ok.is_none() {
            bail!(
                "udp-serve in pod {name} did not start: {}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Starts `kproxy-testpod udp-serve <pod> [<pod ipv6>]:<port>` in pod `name`
    /// (dual-stack clusters).
    pub fn start_udp_serve6(&mut self, name: &str, port: u16) -> Result<()> {
        let pi = self.pod_idx(name)?;
        let place = self.pod(name);
        let log = self.pods[pi].dir.join(format!("udp6-{port}.out"));
        let _ = fs::remove_file(&log);
        let addr = format!("[{}]:{port}", self.pod_ip6(name));
        let tp = self.testpod.to_string_lossy().into_owned();
        let proc = place.spawn_logged(
            &format!("udp-serve {name}:[{port}]"),
            &[&tp, "udp-serve", name, &addr],
            &log,
        )?;
        self.pods[pi].udp.push(proc);
        let ok = sys::wait_for(Duration::from_secs(5), Duration::from_millis(10), || {
            fs::read_to_string(&log)
                .ok()
                .filter(|s| s.contains("listening"))
                .map(|_| ())
        });
        if ok.is_none() {
            bail!(
                "udp-serve in pod {name} did not start: {}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Stops pod `name`'s udp-serve processes (SIGKILL by pid).
    pub fn stop_udp_serve(&mut self, name: &str) -> Result<()> {
        let pi = self.pod_idx(name)?;
        for mut p in self.pods[pi].udp.drain(..) {
            p.kill();
        }
        Ok(())
    }

    /// "Kills" pod `name`: its nginx and udp-serve processes are ended (by pid). Its
    /// namespace and address stay, so traffic still sent to it is refused (RST / port
    /// unreachable), which the tests count.
    pub fn kill_pod(&mut self, name: &str) -> Result<()> {
        let pi = self.pod_idx(name)?;
        if let Some(mut p) = self.pods[pi].nginx.take() {
            p.kill();
        }
        self.stop_udp_serve(name)
    }

    // ---- places and addresses ----

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The test's temp dir (manifests, logs, bpf roots).
    pub fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    /// The outside client (not in any node's cgroup).
    pub fn client(&self) -> Place {
        Place {
            netns: self.client.clone(),
            cgroup: None,
            label: "client".into(),
        }
    }

    /// A host process on node `n`: the node's netns and cgroup.
    pub fn node(&self, n: u8) -> Place {
        let i = self.node_idx(n).expect("no such node");
        let node = &self.nodes[i];
        Place {
            netns: Some(node.netns.clone()),
            cgroup: Some(node.cgroup.path().to_path_buf()),
            label: node.name.clone(),
        }
    }

    /// A process in pod `name`: the pod's netns and its node's cgroup.
    pub fn pod(&self, name: &str) -> Place {
        let p = &self.pods[self.pod_idx(name).expect("no such pod")];
        let node = &self.nodes[self.node_idx(p.spec.node).unwrap()];
        Place {
            netns: Some(p.netns.clone()),
            cgroup: Some(node.cgroup.path().to_path_buf()),
            label: format!("pod {name}"),
        }
    }

    pub fn node_ip(&self, n: u8) -> Ipv4Addr {
        node_ip(n)
    }

    pub fn client_ip(&self) -> Ipv4Addr {
        CLIENT_IP
    }

    pub fn pod_ip(&self, name: &str) -> Ipv4Addr {
        self.pods[self.pod_idx(name).expect("no such pod")].ip
    }

    /// Pod `name`'s IPv6 address (dual-stack clusters).
    pub fn pod_ip6(&self, name: &str) -> Ipv6Addr {
        self.pods[self.pod_idx(name).expect("no such pod")]
            .ip6
            .expect("pod IPv6 addresses exist in dual-stack clusters only")
    }

    /// A ready endpoint for pod `name` in an `addressType: IPv6` slice.
    pub fn endpoint6(&self, name: &str) -> Endpoint {
        Endpoint::new(
            &self.pod_ip6(name).to_string(),
            &format!("node{}", self.pod_node(name)),
            name,
        )
    }

    pub fn pod_node(&self, name: &str) -> u8 {
        self.pods[self.pod_idx(name).expect("no such pod")]
            .spec
            .node
    }

    /// A ready EndpointSlice endpoint for pod `name`.
    pub fn endpoint(&self, name: &str) -> Endpoint {
        Endpoint::new(
            &self.pod_ip(name).to_string(),
            &format!("node{}", self.pod_node(name)),
            name,
        )
    }

    pub fn node_cgroup(&self, n: u8) -> PathBuf {
        self.nodes[self.node_idx(n).unwrap()]
            .cgroup
            .path()
            .to_path_buf()
    }

    pub fn node_bpf_root(&self, n: u8) -> PathBuf {
        self.nodes[self.node_idx(n).unwrap()].bpf_root.clone()
    }

    pub fn node_netns(&self, n: u8) -> String {
        self.nodes[self.node_idx(n).unwrap()]
            .netns
            .name()
            .to_string()
    }

    /// Path of the `kproxy-testpod` binary (for argv).
    pub fn testpod(&self) -> String {
        self.testpod.to_string_lossy().into_owned()
    }

    /// Spawns a long-running process at `place`; it is ended when the cluster is dropped
    /// (or earlier with `stop_extra`). Returns an index for `stop_extra`.
    pub fn spawn(&mut self, place: &Place, name: &str, argv: &[&str]) -> Result<usize> {
        let log = self.tmp.join(format!("extra-{}.log", self.extra.len()));
        self.extra.push(place.spawn_logged(name, argv, &log)?);
        Ok(self.extra.len() - 1)
    }

    /// The pid of a process started with `spawn`.
    pub fn extra_pid(&self, idx: usize) -> Option<u32> {
        self.extra.get(idx)?.pid()
    }

    pub fn stop_extra(&mut self, idx: usize) {
        if let Some(p) = self.extra.get_mut(idx) {
            p.kill();
        }
    }

    // ---- manifests ----

    /// The directory the agents watch (`--manifests`).
    pub fn manifests_dir(&self) -> &Path {
        &self.manifests
    }

    /// v1 Node objects for every node.
    pub fn node_objects(&self) -> Vec<Object> {
        self.nodes
            .iter()
            .map(|n| {
                Object::Node(manifests::Node {
                    name: n.name.clone(),
                    internal_ip: n.ip.to_string(),
                    pod_cidr: pod_cidr(n.index),
                })
            })
            .collect()
    }

    /// Atomically (write a temp file outside the dir, then rename into it) replaces
    /// `<manifests>/<file>` with these objects. Returns the epoch ms of the rename.
    pub fn write_manifests(&self, file: &str, objects: &[Object]) -> Result<u64> {
        self.write_manifest_text(file, &manifests::render(objects))
    }

    /// Like `write_manifests` with literal text.
    pub fn write_manifest_text(&self, file: &str, text: &str) -> Result<u64> {
        let tmp = self.tmp.join(format!(".{file}.tmp"));
        fs::write(&tmp, text)?;
        let t = sys::epoch_ms();
        fs::rename(&tmp, self.manifests.join(file))
            .with_context(|| format!("renaming into {file}"))?;
        Ok(t)
    }

    pub fn remove_manifest(&self, file: &str) -> Result<u64> {
        let t = sys::epoch_ms();
        fs::remove_file(self.manifests.join(file))?;
        Ok(t)
    }

    // ---- the agent ----

    /// The agents' `--proxy-mode`.
    pub fn proxy_mode(&self) -> &str {
        &self.proxy_mode
    }

    /// Changes the `--proxy-mode` of agents started from now on.
    pub fn set_proxy_mode(&mut self, mode: &str) {
        self.proxy_mode = mode.into();
    }

    /// The agent's argv for node `n` (without the binary).
    pub fn agent_args(&self, n: u8) -> Vec<String> {
        let node = &self.nodes[self.node_idx(n).unwrap()];
        vec![
            "run".into(),
            "--manifests".into(),
            self.manifests.display().to_string(),
            "--hostname-override".into(),
            node.name.clone(),
            "--proxy-mode".into(),
            self.proxy_mode.clone(),
            "--cluster-cidr".into(),
            CLUSTER_CIDR.into(),
            "--devices".into(),
            "eth0".into(),
            "--cgroup-root".into(),
            node.cgroup.path().display().to_string(),
            "--bpf-root".into(),
            node.bpf_root.display().to_string(),
            // The health checks of these tests come from outside the node (the default is
            // localhost only, as for a real node without a load balancer).
            "--healthz-bind-address".into(),
            format!("0.0.0.0:{HEALTHZ_PORT}"),
        ]
    }

    /// Starts `kproxy run` for node `n` (with `agent_args` plus `extra`), in the node's netns
    /// and cgroup, logging to `<tmp>/node<n>/agent.log`.
    pub fn start_agent_with(&mut self, n: u8, extra: &[&str]) -> Result<()> {
        let bin = kproxy_bin()?;
        let ni = self.node_idx(n)?;
        if self.nodes[ni]
            .agent
            .as_mut()
            .is_some_and(|a| a.is_running())
        {
            bail!("the agent of node{n} is running already");
        }
        let mut argv: Vec<String> = vec![bin.display().to_string()];
        argv.extend(self.agent_args(n));
        argv.extend(extra.iter().map(|s| s.to_string()));
        // Extra flags for every agent, e.g. KPROXY_AGENT_EXTRA_ARGS="--xdp-fib-forward false".
        if let Ok(more) = std::env::var("KPROXY_AGENT_EXTRA_ARGS") {
            argv.extend(more.split_whitespace().map(String::from));
        }
        let argv_ref: Vec<&str> = argv.iter().map(String::as_str).collect();
        let log = self.nodes[ni].dir.join("agent.log");
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let place = self.node(n);
        let proc = place.spawn_logged(&format!("kproxy node{n}"), &argv_ref, &log)?;
        self.nodes[ni].agent = Some(proc);
        self.nodes[ni].agent_ran = true;
        Ok(())
    }

    pub fn start_agent(&mut self, n: u8) -> Result<()> {
        self.start_agent_with(n, &[])
    }

    /// Starts the agent and waits until its /healthz answers 200.
    pub fn start_agent_ready(&mut self, n: u8) -> Result<()> {
        self.start_agent(n)?;
        self.wait_healthy(n, Duration::from_secs(30))
    }

    /// The HTTP status of `GET http://<node ip>:10256/healthz`, asked from inside node `n`
    /// (0 when nothing answered).
    /// `/metrics` of node `n`'s agent (on its default 127.0.0.1:10249) as `series -> value`;
    /// empty when it cannot be scraped.
    pub fn metrics(&self, n: u8) -> std::collections::BTreeMap<String, f64> {
        let Ok(out) = self.node(n).output_timeout(
            &[
                "curl",
                "-sS",
                "--max-time",
                "5",
                "http://127.0.0.1:10249/metrics",
            ],
            Duration::from_secs(10),
        ) else {
            return Default::default();
        };
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                Some((series.to_string(), value.trim().parse().ok()?))
            })
            .collect()
    }

    pub fn healthz(&self, n: u8) -> u16 {
        let url = format!("http://{}:{HEALTHZ_PORT}/healthz", node_ip(n));
        self.node(n)
            .output_timeout(
                &[
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--max-time",
                    "1",
                    &url,
                ],
                Duration::from_secs(5),
            )
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(0)
    }

    /// Waits until node `n`'s agent reports healthy; fails early if it exits.
    pub fn wait_healthy(&mut self, n: u8, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = 0;
        while Instant::now() < deadline {
            last = self.healthz(n);
            if last == 200 {
                return Ok(());
            }
            if !self.agent_running(n) {
                bail!(
                    "the agent of node{n} exited before it was healthy\n{}",
                    self.agent_log_tail(n, 80)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "the agent of node{n} was not healthy within {timeout:?} (last /healthz status {last})\n{}",
            self.agent_log_tail(n, 80)
        )
    }

    /// Whether node `n`'s agent process is still running.
    pub fn agent_running(&mut self, n: u8) -> bool {
        let ni = self.node_idx(n).unwrap();
        self.nodes[ni]
            .agent
            .as_mut()
            .is_some_and(|a| a.is_running())
    }

    /// The agent's pid, if started.
    pub fn agent_pid(&self, n: u8) -> Option<u32> {
        self.nodes[self.node_idx(n).unwrap()]
            .agent
            .as_ref()
            .and_then(|a| a.pid())
    }

    /// Stops node `n`'s agent (SIGTERM, then SIGKILL after 5 s); returns its exit code.
    pub fn stop_agent(&mut self, n: u8) -> Option<i32> {
        let ni = self.node_idx(n).unwrap();
        let st = self.nodes[ni].agent.as_mut()?.stop(Duration::from_secs(5));
        self.nodes[ni].agent = None;
        st.and_then(|s| s.code())
    }

    /// Runs `kproxy cleanup --bpf-root <node's bpf root>` in node `n`.
    pub fn agent_cleanup(&self, n: u8) -> Result<std::process::Output> {
        self.agent_cleanup_within(n, Duration::from_secs(30))
    }

    /// `kproxy cleanup` given up to `timeout` (removing a rule mode's 10,000 Services takes
    /// longer than the default 30 s; a cleanup cut short leaves the next agent to finish it).
    pub fn agent_cleanup_within(&self, n: u8, timeout: Duration) -> Result<std::process::Output> {
        let bin = kproxy_bin()?;
        let root = self.node_bpf_root(n);
        self.node(n).output_timeout(
            &[
                bin.to_str().unwrap(),
                "cleanup",
                "--bpf-root",
                root.to_str().unwrap(),
            ],
            timeout,
        )
    }

    pub fn agent_log_path(&self, n: u8) -> PathBuf {
        self.nodes[self.node_idx(n).unwrap()].dir.join("agent.log")
    }

    pub fn agent_log(&self, n: u8) -> String {
        fs::read_to_string(self.agent_log_path(n)).unwrap_or_default()
    }

    fn agent_log_tail(&self, n: u8, lines: usize) -> String {
        let log = self.agent_log(n);
        let all: Vec<&str> = log.lines().collect();
        let from = all.len().saturating_sub(lines);
        format!(
            "---- node{n} agent log (last {} lines) ----\n{}\n----",
            all.len() - from,
            all[from..].join("\n")
        )
    }

    /// The last lines of every agent's log that ran, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .filter(|n| n.agent_ran)
            .map(|n| self.agent_log_tail(n.index, 150))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Panics with `msg` and the agents' logs.
    #[track_caller]
    pub fn fail(&self, msg: impl std::fmt::Display) -> ! {
        panic!("{msg}\n{}", self.logs())
    }

    /// `assert!` that adds the agents' logs.
    #[track_caller]
    pub fn check(&self, cond: bool, msg: impl FnOnce() -> String) {
        if !cond {
            self.fail(msg());
        }
    }

    /// Unwraps a harness result, failing with the agents' logs.
    #[track_caller]
    pub fn ok<T>(&self, r: Result<T>) -> T {
        match r {
            Ok(v) => v,
            Err(e) => self.fail(format!("{e:#}")),
        }
    }

    // ---- convenience probes ----

    /// `curl` at `place` (3 s max).
    pub fn curl(&self, place: &Place, url: &str) -> probe::CurlResult {
        self.ok(probe::curl(place, url, Duration::from_secs(3)))
    }

    /// `testpod <args>` at `place`, to completion.
    pub fn ask(&self, place: &Place, args: &[&str], timeout: Duration) -> Vec<probe::AskLine> {
        self.ok(probe::ask(place, &self.testpod(), args, timeout))
    }

    /// Starts `testpod <args>` at `place` in the background (output in the temp dir).
    pub fn ask_start(&self, place: &Place, args: &[&str]) -> probe::Asker {
        let log = self.tmp.join(format!("ask-{}.out", sys::unique_id()));
        self.ok(probe::Asker::start(place, &self.testpod(), args, &log))
    }

    /// `count` HTTP requests, one every 50 ms (each on a new connection, 1 s timeout), from
    /// the client to the seed Service's nodePort on node1: traffic kept flowing while a test
    /// disturbs the node.
    pub fn nodeport_asker(&self, count: u32) -> probe::Asker {
        let target = format!("{}:{}", self.node_ip(1), manifests::seed::MYSVC_NODEPORT);
        let count = count.to_string();
        let args = [
            "tcp-ask",
            &target,
            "--http",
            "--count",
            &count,
            "--interval-ms",
            "50",
            "--timeout-ms",
            "1000",
        ];
        self.ask_start(&self.client(), &args)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if thread::panicking() {
            let logs = self.logs();
            if !logs.is_empty() {
                eprintln!("{logs}");
            }
        }
        // 1. Agents: SIGTERM (let them detach), then `kproxy cleanup` for what is left.
        for i in 0..self.nodes.len() {
            if let Some(mut a) = self.nodes[i].agent.take() {
                a.stop(Duration::from_secs(5));
            }
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].agent_ran
                && let Ok(bin) = kproxy_bin()
            {
                let root = self.nodes[i].bpf_root.clone();
                let _ = self.node(self.nodes[i].index).output_timeout(
                    &[
                        bin.to_str().unwrap(),
                        "cleanup",
                        "--bpf-root",
                        root.to_str().unwrap(),
                    ],
                    Duration::from_secs(15),
                );
            }
        }
        // 2. Every other process we started.
        self.extra.clear();
        for p in &mut self.pods {
            p.nginx = None;
            p.udp.clear();
        }
        // 3. Namespaces (their veths go with them).
        self.pods.clear();
        let nodes: Vec<NodeState> = self.nodes.drain(..).collect();
        let mut cgroups = Vec::new();
        for n in nodes {
            drop(n.netns);
            cgroups.push(n.cgroup);
        }
        self.client = None;
        self.lan = None;
        // 4. Mounts (bpffs the agents mounted) and cgroups, then the temp dir.
        sys::umount_all_under(&self.tmp);
        drop(cgroups);
        self.cgroup_parent = None;
        sys::umount_all_under(&self.tmp);
        if let Err(e) = fs::remove_dir_all(&self.tmp) {
            eprintln!("harness: could not remove {}: {e}", self.tmp.display());
        }
    }
}
