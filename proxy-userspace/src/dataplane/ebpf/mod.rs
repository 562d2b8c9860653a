//! The eBPF dataplane: socket-level load balancing on a cgroup, XDP (or tc) on the devices,
//! driven through pinned maps.

pub mod attach;
pub mod bpf_sys;
pub mod cleanup;
pub mod ct_gc;
pub mod ct_gc6;
pub mod layout;
pub mod maglev;
pub mod maps;
pub mod maps6;
pub mod pod_devices;
pub mod sctp_crc;
pub mod sock_destroy;
pub mod writer;
pub mod writer6;

use std::{
    collections::HashSet,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::{Ebpf, EbpfLoader};
use proxy_common::config::{
    CFG_FLAG_READY, CFG_FLAG_XDP_FIB_FORWARD, Lb4Config, SNAT_PORT_MAX, SNAT_PORT_MIN,
};

use self::{maps::PinnedMaps, maps6::PinnedMaps6, writer::MapWriter, writer6::MapWriter6};
use super::{ApplyStats, Dataplane};
use crate::{
    desired::{DesiredState, Protocol},
    desired_cache::FrontendChanges,
};

/// How the eBPF dataplane is set up on this node.
#[derive(Clone, Debug)]
pub struct EbpfSettings {
    pub bpf_root: PathBuf,
    pub cgroup_root: PathBuf,
    pub devices: Vec<String>,
    pub xdp_fib_forward: bool,
    /// XDP on the devices' ingress (else tc, as where native XDP cannot attach).
    pub device_ingress_xdp: bool,
    /// tc ingress delivers packets for local pods into their namespace with
    /// `bpf_redirect_peer` (the agent marks the pods' veths in `KP_PODDEV_V1`).
    pub tc_redirect_peer: bool,
    /// Maglev table size for traffic entering the node; None = random selection.
    pub maglev_table_size: Option<u32>,
    /// max_entries of CT4 and NAT4_REV.
    pub ct_max: u32,
    /// max_entries of the service and backend maps of both families.
    pub lb_map_max: u32,
}

/// The maps whose capacity is a setting, with the capacity asked for.
fn sized_maps(settings: &EbpfSettings) -> [(&'static str, u32); 6] {
    use proxy_common::maps as names;
    [
        (names::CT4, settings.ct_max),
        (names::NAT4_REV, settings.ct_max),
        (names::LB4_SERVICES, settings.lb_map_max),
        (names::LB4_BACKENDS, settings.lb_map_max),
        (names::LB6_SERVICES, settings.lb_map_max),
        (names::LB6_BACKENDS, settings.lb_map_max),
    ]
}

pub struct EbpfDataplane {
    // Kept alive: dropping it would unload programs whose links are not pinned; its programs
    // are attached to devices that appear later.
    ebpf: Ebpf,
    settings: EbpfSettings,
    writer: MapWriter<PinnedMaps>,
    writer6: MapWriter6<PinnedMaps6>,
    pod_devices: pod_devices::PodDevices,
    ready: bool,
    pub attachments: Vec<attach::Attachment>,
    /// Set when maps were rebuilt for a new layout while an earlier agent's programs serve
    /// through the pinned links: they keep serving from the old maps until the first sync
    /// has filled the new ones; then the new programs are swapped in and the old pins go.
    pending_swap: Option<layout::PinPlan>,
}

impl EbpfDataplane {
    /// Loads the programs, adopts or creates the pinned maps under the bpf root, and attaches
    /// the programs (replacing the links a previous agent pinned, without a gap).
    pub fn start(settings: EbpfSettings) -> anyhow::Result<Self> {
        crate::bpffs::ensure_root(&settings.bpf_root)
            .with_context(|| format!("preparing --bpf-root {}", settings.bpf_root.display()))?;
        let mut layouts = layout::object_layouts(crate::EBPF_OBJECT)?;
        // The conntrack maps are sized by --ct-max, not by the object: compare pins against
        // that, so a restart with the same --ct-max adopts them and a changed one rebuilds
        // them with the flows copied over.
        // Likewise the service and backend maps by --lb-map-max (rebuilt from the desired
        // state by the first sync when it changed).
        let sized = sized_maps(&settings);
        for (name, entries) in &sized {
            if let Some(l) = layouts.get_mut(*name) {
                l.max_entries = *entries;
            }
        }
        let plan = layout::prepare(&settings.bpf_root, layouts)?;
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(&settings.bpf_root);
        for (name, entries) in &sized {
            loader.map_max_entries(name, *entries);
        }
        let mut ebpf = loader
            .load(crate::EBPF_OBJECT)
            .context("loading the eBPF object (maps and programs)")?;
        if let Err(e) = aya_log::EbpfLogger::init(&mut ebpf) {
            tracing::debug!("kernel-side logging not enabled: {e}");
        }
        layout::migrate(&settings.bpf_root, &plan);
        sctp_crc::write_sctp_crc_shifts(&mut ebpf)?;
        attach::load_all(&mut ebpf)?;
        let swap_later = !plan.fresh.is_empty() && attach::links_pinned(&settings.bpf_root);
        let (attachments, pending_swap) = if swap_later {
            tracing::info!(
                rebuilt = ?plan.fresh,
                "maps rebuilt for a new layout: the programs attached now keep serving until the first sync fills them"
            );
            (Vec::new(), Some(plan))
        } else {
            let attachments = attach::attach_all(&mut ebpf, &settings)?;
            layout::remove_retired(&plan);
            (attachments, None)
        };
        let capacity = PinnedMaps::capacity(&ebpf)?;
        let mut maps = PinnedMaps::take(&mut ebpf)?;
        maps.set_maglev_config(settings.maglev_table_size.unwrap_or(0))?;
        let mut writer = MapWriter::with_capacity(maps, capacity).with_tcp_drain(tcp_drain());
        writer.set_maglev(settings.maglev_table_size);
        let capacity6 = PinnedMaps6::capacity(&ebpf)?;
        let writer6 = MapWriter6::with_capacity(PinnedMaps6::take(&mut ebpf)?, capacity6);
        let mut pod_devices = pod_devices::PodDevices::take(&mut ebpf, settings.tc_redirect_peer)?;
        if let Err(e) = pod_devices.refresh(&settings.devices, true) {
            tracing::warn!("pod devices for bpf_redirect_peer: {e:#}");
        }
        for dev in &settings.devices {
            set_accept_local(dev);
        }
        ct_gc::spawn(settings.bpf_root.clone());
        Ok(Self {
            ebpf,
            settings,
            writer,
            writer6,
            pod_devices,
            ready: false,
            attachments,
            pending_swap,
        })
    }

    pub fn bpf_root(&self) -> &Path {
        &self.settings.bpf_root
    }

    fn write_config(&mut self) -> anyhow::Result<()> {
        let mut flags = 0;
        if self.ready {
            flags |= CFG_FLAG_READY;
        }
        if self.settings.xdp_fib_forward {
            flags |= CFG_FLAG_XDP_FIB_FORWARD;
        }
        self.writer.maps_mut().set_config(Lb4Config {
            flags,
            snat_port_min: SNAT_PORT_MIN,
            snat_port_max: SNAT_PORT_MAX,
        })
    }
}

impl EbpfDataplane {
    /// Closes the connected IPv6 UDP sockets our hooks sent to a removed backend (the IPv6
    /// twin of the IPv4 close in `apply`).
    fn close_udp_sockets6(&self, removed: &[writer6::RemovedBackend6]) {
        let gone: HashSet<(std::net::Ipv6Addr, u16)> = removed
            .iter()
            .filter(|b| b.protocol == Protocol::Udp)
            .map(|b| (b.address, b.port))
            .collect();
        if gone.is_empty() {
            return;
        }
        let maps = self.writer6.maps();
        let destroyed = sock_destroy::destroy_udp_sockets6(
            &self.settings.cgroup_root,
            &gone,
            |cookie, addr, port| maps.socket_was_translated(cookie, addr, port),
        );
        match destroyed {
            Ok(n) if n > 0 => {
                tracing::info!(
                    sockets = n,
                    "closed connected IPv6 UDP sockets of removed backends"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("closing IPv6 UDP sockets of removed backends: {e:#}"),
        }
    }
}

/// How long removed TCP backends drain (`KPROXY_TCP_DRAIN_SECS`, default 5 s): connections
/// in flight to a replaced pod finish instead of being reset by another backend. After it,
/// their conntrack entries reselect and the sweep removes them.
fn tcp_drain() -> std::time::Duration {
    const DEFAULT: std::time::Duration = std::time::Duration::from_secs(5);
    match std::env::var("KPROXY_TCP_DRAIN_SECS") {
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(s) => std::time::Duration::from_secs(s),
            Err(_) => {
                tracing::warn!(
                    "KPROXY_TCP_DRAIN_SECS={v:?} is not a number of seconds; using {DEFAULT:?}"
                );
                DEFAULT
            }
        },
        Err(_) => DEFAULT,
    }
}

/// A packet SNATed to the node's own address may be passed to the kernel's stack (when
/// XDP cannot forward it itself); without accept_local the stack drops it as a martian.
fn set_accept_local(device: &str) {
    let path = format!("/proc/sys/net/ipv4/conf/{device}/accept_local");
    if let Err(e) = std::fs::write(&path, "1") {
        tracing::warn!(device, "could not set accept_local: {e}");
    }
}

impl EbpfDataplane {
    /// What follows a write of the maps: released affinity entries, the ready flag, a
    /// pending program swap, and closing UDP sockets of removed backends.
    fn after_write(
        &mut self,
        outcome: writer::ApplyOutcome,
        outcome6: writer6::ApplyOutcome6,
    ) -> anyhow::Result<ApplyStats> {
        if !outcome.affinity_released.is_empty() {
            // Entries of frontends without affinity are ignored by the programs anyway; this
            // only frees their room.
            match self
                .writer
                .maps_mut()
                .clear_affinity(&outcome.affinity_released)
            {
                Ok(n) => tracing::debug!(entries = n, "removed released session-affinity entries"),
                Err(e) => tracing::warn!("removing released session-affinity entries: {e:#}"),
            }
        }
        if !outcome6.affinity_released.is_empty() {
            match self
                .writer6
                .maps_mut()
                .clear_affinity(&outcome6.affinity_released)
            {
                Ok(n) => tracing::debug!(entries = n, "removed released IPv6 affinity entries"),
                Err(e) => tracing::warn!("removing released IPv6 affinity entries: {e:#}"),
            }
        }
        if !self.ready {
            self.ready = true;
        }
        self.write_config()?;
        if let Some(plan) = &self.pending_swap {
            layout::migrate(&self.settings.bpf_root, plan);
            self.attachments = attach::attach_all(&mut self.ebpf, &self.settings)?;
            layout::remove_retired(plan);
            self.pending_swap = None;
            tracing::info!("the rebuilt maps are filled: the new programs serve");
        }
        let gone: HashSet<(Ipv4Addr, u16)> = outcome
            .removed_backends
            .iter()
            .filter(|b| b.protocol == Protocol::Udp)
            .map(|b| (b.address, b.port))
            .collect();
        if !gone.is_empty() {
            let maps = self.writer.maps();
            let destroyed = sock_destroy::destroy_udp_sockets(
                &self.settings.cgroup_root,
                &gone,
                |cookie, addr, port| maps.socket_was_translated(cookie, addr, port),
            );
            match destroyed {
                Ok(n) if n > 0 => {
                    tracing::info!(
                        sockets = n,
                        "closed connected UDP sockets of removed backends"
                    )
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("closing UDP sockets of removed backends: {e:#}"),
            }
        }
        let mut stats = outcome.stats;
        stats.writes += outcome6.stats.writes;
        stats.deletes += outcome6.stats.deletes;
        stats.rejected.extend(outcome6.stats.rejected);
        self.close_udp_sockets6(&outcome6.removed_backends);
        Ok(stats)
    }
}

impl Dataplane for EbpfDataplane {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn apply(&mut self, desired: &DesiredState, full: bool) -> anyhow::Result<ApplyStats> {
        let outcome = self.writer.apply(desired, full)?;
        let outcome6 = self.writer6.apply(desired, full)?;
        self.after_write(outcome, outcome6)
    }

    fn apply_changed(
        &mut self,
        desired: &DesiredState,
        changed: &FrontendChanges,
    ) -> anyhow::Result<ApplyStats> {
        let outcome = match self.writer.apply_changed(desired, &changed.keys)? {
            Some(o) => o,
            None => self.writer.apply(desired, false)?,
        };
        // IPv6 frontends are few so far: the IPv6 writer diffs them all.
        let outcome6 = self.writer6.apply(desired, false)?;
        self.after_write(outcome, outcome6)
    }

    fn has_due_work(&self) -> bool {
        self.writer.drain_due(std::time::Instant::now())
    }

    fn set_devices(&mut self, devices: &[(String, u32)]) -> anyhow::Result<()> {
        if self.pending_swap.is_some() {
            // Attached with the others once the maps are filled.
            self.settings.devices = devices.iter().map(|(n, _)| n.clone()).collect();
            return Ok(());
        }
        let dir = attach::links_dir(&self.settings.bpf_root);
        let changes = attach::follow_devices(
            &mut self.ebpf,
            &dir,
            devices,
            self.settings.device_ingress_xdp,
        )?;
        for dev in &changes.attached {
            set_accept_local(dev);
        }
        if changes != attach::DeviceChanges::default() {
            tracing::info!(
                attached = ?changes.attached,
                detached = ?changes.detached,
                renamed = ?changes.renamed,
                "devices changed"
            );
        }
        self.settings.devices = devices.iter().map(|(n, _)| n.clone()).collect();
        // A device now served (or no longer) changes which links are pods' devices.
        if let Err(e) = self.pod_devices.refresh(&self.settings.devices, true) {
            tracing::warn!("pod devices for bpf_redirect_peer: {e:#}");
        }
        Ok(())
    }

    fn follow_links(&mut self) {
        if let Err(e) = self.pod_devices.refresh(&self.settings.devices, false) {
            tracing::warn!("pod devices for bpf_redirect_peer: {e:#}");
        }
    }
}
