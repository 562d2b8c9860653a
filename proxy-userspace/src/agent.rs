//! `kproxy run`: source -> model -> desired state -> dataplane, with a bounded-frequency
//! sync loop (kube-proxy's runner: coalesce bursts, retry failures as full syncs).

use std::{
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    cli::RunArgs,
    dataplane::ebpf::EbpfSettings,
    desired::NodeContext,
    desired_cache::DesiredCache,
    health::{self, Status},
    mode::{self, ModeInputs},
    model::Model,
    netdev,
    source::kube::KubeSource,
    source::manifests::{Level, ManifestWatcher},
};

/// Where Services and EndpointSlices come from.
enum Source {
    Manifests(ManifestWatcher),
    Kube(Box<KubeSource>),
}

/// How often the manifests are polled and the node's addresses re-read.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// A sync re-reads and rewrites everything at least this often (kube-proxy's periodic full
/// sync), repairing whatever was changed behind the agent's back; the others are partial.
const FULL_SYNC_PERIOD: Duration = Duration::from_secs(300);
/// The delay before retrying a failed sync (it grows to RETRY_MAX).
const RETRY_MIN: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);

fn default_cgroup_root() -> anyhow::Result<PathBuf> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, ty) = (f.next()?, f.next()?, f.next()?);
            (ty == "cgroup2").then(|| PathBuf::from(dir))
        })
        .next()
        .context("no cgroup2 mount found: pass --cgroup-root")
}

/// `--cgroup-root` must be a cgroup v2 directory; checked before anything is installed.
fn check_cgroup2_dir(path: &std::path::Path) -> anyhow::Result<()> {
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .with_context(|| format!("--cgroup-root {}: invalid path", path.display()))?;
    // SAFETY: statfs writes into `st`, which we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        let e = std::io::Error::last_os_error();
        bail!("--cgroup-root {}: {e}", path.display());
    }
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type's width differs between libcs"
    )]
    let on_cgroup2 = st.f_type as i64 == CGROUP2_SUPER_MAGIC;
    if !path.is_dir() || !on_cgroup2 {
        bail!(
            "--cgroup-root {}: not a cgroup v2 directory (pass a directory under the cgroup2 mount)",
            path.display()
        );
    }
    Ok(())
}

/// Large allocations (an API list page being read, a whole sync's scratch vectors) come
/// from `mmap` and go back to the kernel when freed. glibc otherwise raises its mmap
/// threshold to the largest block freed so far, and later large blocks are carved from the
/// heap, where they leave holes between long-lived small objects that no trim can return.
pub fn fix_malloc_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes a tuning parameter of the allocator.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Returns the heap freed after building everything (the first and other whole syncs peak
/// far above what is kept) to the kernel, instead of holding it as resident memory.
fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only gives free pages of the allocator's heap back.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Whether a port of service `name` has a Local traffic policy.
fn has_local_policy(model: &Model, name: &crate::model::NamespacedName) -> bool {
    model.services().service(name).is_some_and(|ports| {
        ports
            .values()
            .any(|i| i.internal_policy_local() || i.external_policy_local())
    })
}

fn node_name(args: &RunArgs) -> String {
    if let Some(n) = &args.hostname_override {
        return n.clone();
    }
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0 {
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        return String::from_utf8_lossy(&buf[..end]).to_lowercase();
    }
    "localhost".into()
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let node = node_name(&args);
    let addresses = netdev::interface_addresses().context("listing this node's addresses")?;
    // Names given in full must exist at start (a typo fails at once); `prefix*` selectors
    // may match nothing yet.
    for dev in &args.devices {
        if !dev.ends_with(['*', '+']) && netdev::ifindex(dev).is_none() {
            bail!("--devices: no interface named {dev:?} in this network namespace");
        }
    }
    let mut node_devices = netdev::select_devices(&args.devices, &addresses, args.cluster_cidr);
    let devices: Vec<String> = node_devices.iter().map(|(n, _)| n.clone()).collect();
    let cgroup_root = match &args.cgroup_root {
        Some(p) => {
            check_cgroup2_dir(p)?;
            p.clone()
        }
        None => default_cgroup_root()?,
    };

    let status = Arc::new(Status::default());
    if let Ok(mut r) = status.bpf_root.lock() {
        *r = Some(args.bpf_root.clone());
    }
    tokio::spawn(health::serve(
        args.healthz_bind_address,
        status.clone(),
        false,
    ));
    tokio::spawn(health::serve(
        args.metrics_bind_address,
        status.clone(),
        true,
    ));

    let inputs = ModeInputs {
        ebpf: EbpfSettings {
            bpf_root: args.bpf_root.clone(),
            cgroup_root: cgroup_root.clone(),
            devices: devices.clone(),
            xdp_fib_forward: args.xdp_fib_forward,
            device_ingress_xdp: args.device_ingress == crate::cli::DeviceIngress::Xdp,
            tc_redirect_peer: args.tc_redirect_peer,
            maglev_table_size: match args.lb_algorithm {
                crate::cli::LbAlgorithm::Maglev => Some(args.maglev_table_size),
                crate::cli::LbAlgorithm::Random => None,
            },
            ct_max: args.ct_max,
            lb_map_max: args.lb_map_max,
        },
        cluster_cidr: args.cluster_cidr,
    };
    let mut dataplane = mode::start(args.proxy_mode, &inputs)?;
    let mode = dataplane.name();
    if let Ok(mut m) = status.mode.lock() {
        *m = mode.to_string();
    }
    tracing::info!(
        mode,
        node = %node,
        devices = ?devices,
        cgroup_root = %cgroup_root.display(),
        bpf_root = %args.bpf_root.display(),
        "kproxy started"
    );

    let mut source = match &args.manifests {
        Some(path) => {
            tracing::info!(manifests = %path.display(), "source: manifest files");
            Source::Manifests(ManifestWatcher::new(path.clone()))
        }
        None => {
            let kube = KubeSource::connect(args.kubeconfig.as_deref(), &node)
                .await
                .context("connecting to the Kubernetes API")?;
            tracing::info!(server = kube.server(), "source: the Kubernetes API");
            Source::Kube(Box::new(kube))
        }
    };
    let mut last_sync_at: Option<Instant> = None;
    let mut health_checks = crate::healthcheck::HealthChecks::new(status.clone());
    let mut model = Model::new();
    // What the dataplane was last given, updated per changed service between full syncs.
    let mut desired = DesiredCache::new();
    let mut changed_services = std::collections::BTreeSet::new();
    let mut no_local = health::NoLocalEndpoints::default();
    let mut last_full_sync = Instant::now();
    // When a sync held back by min-sync-period (or a retry) is due: the loop wakes then,
    // not at the next poll tick.
    let mut wake_at: Option<Instant> = None;
    let mut have_objects = false;
    let mut dirty = true;
    let mut full_sync = true;
    let mut retry_at: Option<Instant> = None;
    let mut retry_delay = RETRY_MIN;
    let mut last_nodeport_addrs = Vec::new();
    let mut last_nodeport_addrs6: Vec<std::net::Ipv6Addr> = Vec::new();
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let kube_event = async {
            match &mut source {
                Source::Kube(k) => k.next(&mut model).await,
                Source::Manifests(_) => std::future::pending().await,
            }
        };
        let wake = async {
            match wake_at {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tick.tick() => {}
            _ = wake => wake_at = None,
            r = kube_event => {
                if let Err(e) = r {
                    bail!("the Kubernetes API source stopped: {e:#}");
                }
            }
            _ = sigterm.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
        if let Source::Kube(k) = &mut source {
            for kind in k.take_changes() {
                status.count_change(kind);
            }
            if k.initial_sync_done() {
                have_objects = true;
                if model.has_pending() {
                    let changes = model.apply_pending();
                    dirty |= !changes.is_empty();
                    changed_services.extend(changes.services);
                }
            }
        }
        if let Source::Manifests(watcher) = &mut source
            && let Some((objects, diags)) = watcher.poll_with_diagnostics()
        {
            for d in &diags {
                match d.level {
                    Level::Warn => tracing::warn!("manifests: {}", d.message),
                    Level::Debug => tracing::debug!("manifests: {}", d.message),
                }
            }
            if objects.is_empty() && diags.iter().any(|d| d.level == Level::Warn) {
                // Unreadable or wholly malformed (e.g. the directory replaced by a bad file):
                // keep serving what was last programmed rather than removing every service.
                tracing::warn!("manifests: nothing usable was read; keeping the last good state");
            } else {
                status.observe_objects(&objects);
                let changes = model.replace_all(objects);
                have_objects = true;
                dirty |= !changes.is_empty() || !status.synced.load(Ordering::Relaxed);
                changed_services.extend(changes.services);
            }
        }
        let addresses = match netdev::interface_addresses() {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::warn!("listing addresses: {e}");
                None
            }
        };
        let nodeport_addrs = match &addresses {
            Some(a) => netdev::nodeport_addresses(a, &args.nodeport_addresses),
            None => last_nodeport_addrs.clone(),
        };
        if let Some(a) = &addresses {
            // Devices added, removed or renamed: the per-device programs follow.
            let now = netdev::select_devices(&args.devices, a, args.cluster_cidr);
            if now != node_devices {
                tracing::info!(before = ?node_devices, now = ?now, "node devices changed");
                match dataplane.set_devices(&now) {
                    Ok(()) => node_devices = now,
                    Err(e) => tracing::error!("following the device change: {e:#}"),
                }
            }
        }
        dataplane.follow_links();
        if nodeport_addrs != last_nodeport_addrs {
            last_nodeport_addrs = nodeport_addrs;
            dirty = true;
        }
        // `--nodeport-addresses` takes IPv4 CIDRs; like kube-proxy with no CIDR of a family,
        // the IPv6 family then serves nodePorts on every (global) IPv6 address.
        match netdev::interface_addresses6() {
            Ok(a) if a != last_nodeport_addrs6 => {
                last_nodeport_addrs6 = a;
                dirty = true;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("listing IPv6 addresses: {e}"),
        }
        dirty |= dataplane.has_due_work();
        if last_full_sync.elapsed() >= FULL_SYNC_PERIOD {
            full_sync = true;
            dirty = true;
        }
        if !have_objects || !dirty {
            continue;
        }
        if let Some(t) = retry_at.filter(|t| Instant::now() < *t) {
            wake_at = Some(t);
            continue;
        }
        if let Some(t) = last_sync_at
            .map(|t| t + args.min_sync_period)
            .filter(|t| Instant::now() < *t)
        {
            // Bounded frequency: the batch is applied when the period is over.
            wake_at = Some(t);
            continue;
        }
        last_sync_at = Some(Instant::now());
        let ctx = NodeContext {
            node_name: node.clone(),
            nodeport_addresses: last_nodeport_addrs.clone(),
            nodeport_addresses6: last_nodeport_addrs6.clone(),
            zone: model.node_zone(&node),
        };
        let started = Instant::now();
        // Partial unless a full sync is due or the node itself changed (its name, zone or
        // addresses shape every frontend).
        let whole = full_sync || desired.context() != Some(&ctx);
        let names = std::mem::take(&mut changed_services);
        let (result, changed) = if whole {
            desired.rebuild(&model, &ctx);
            (dataplane.apply(desired.state(), full_sync), None)
        } else {
            let changed = desired.update(&model, &names);
            (
                dataplane.apply_changed(desired.state(), &changed),
                Some(changed),
            )
        };
        match result {
            Ok(stats) => {
                let took = started.elapsed();
                let state = desired.state();
                // Both scan every service: after a partial sync only when a changed service
                // has (or had) a Local policy or a health check.
                if whole
                    || no_local != health::NoLocalEndpoints::default()
                    || names.iter().any(|n| has_local_policy(&model, n))
                {
                    no_local = health::no_local_endpoints(&model, state);
                }
                let programmed = match &changed {
                    None => status.record_sync(took, state, no_local),
                    Some(c) => status.record_partial_sync(took, state, no_local, c),
                };
                for r in &stats.rejected {
                    tracing::error!("{r}");
                }
                status
                    .frontends_rejected
                    .store(stats.rejected.len() as u64, Ordering::Relaxed);
                if whole || health_checks.needs_update(&model, &names) {
                    health_checks.update(&model, &ctx);
                }
                // took_ms: the sync itself (desired state and dataplane write);
                // event_to_written_ms: from the first change of the batch being received to
                // the dataplane written (includes min-sync-period batching and any sync in
                // progress), absent when no change was pending.
                let event_to_written_ms = programmed.map(|d| d.as_secs_f64() * 1000.0);
                let message = if status.synced.swap(true, Ordering::Relaxed) {
                    "synced"
                } else {
                    "first sync programmed"
                };
                tracing::info!(
                    frontends = state.frontends.len(),
                    partial = changed.is_some(),
                    changed_frontends = changed.as_ref().map(|c| c.len()),
                    writes = stats.writes,
                    deletes = stats.deletes,
                    took_ms = took.as_secs_f64() * 1000.0,
                    event_to_written_ms,
                    "{message}"
                );
                if whole {
                    last_full_sync = Instant::now();
                    release_free_heap();
                }
                dirty = false;
                full_sync = false;
                retry_at = None;
                retry_delay = RETRY_MIN;
            }
            Err(e) => {
                status.record_sync_error();
                tracing::error!(
                    retry_in_ms = retry_delay.as_millis() as u64,
                    "sync failed: {e:#}"
                );
                // The changes were consumed: only a full sync can repair a partial write.
                full_sync = true;
                retry_at = Some(Instant::now() + retry_delay);
                retry_delay = (retry_delay * 2).min(RETRY_MAX);
            }
        }
    }
    match mode {
        "ebpf" => tracing::info!(
            "stopping; programs and maps stay pinned under {}",
            args.bpf_root.display()
        ),
        "userspace" => tracing::info!("stopping; the connections relayed by this agent end"),
        _ => tracing::info!("stopping; the {mode} rules stay installed"),
    }
    Ok(())
}
