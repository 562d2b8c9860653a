//! `KP_PODDEV_V1`: which of the node's devices are pods' veths (or netkit devices), so the
//! tc ingress program may deliver a FIB-forwarded packet straight into the pod's namespace
//! with `bpf_redirect_peer`. Written from the node's links (one rtnetlink dump), refreshed
//! while the agent runs. An entry missing only costs the fast path (the program then uses
//! `bpf_redirect`); a wrong one would drop packets, so only links checked to have a peer in
//! another namespace get one, and never the devices the programs serve (`--devices`).

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{HashMap, MapData},
};
use proxy_common::{devices::POD_DEV_PEER, maps as names};

use crate::links::Link;

/// How often the links are re-read: a pod's veth that appears between two reads is served
/// through `bpf_redirect` meanwhile (correct, only slower).
const REFRESH_PERIOD: Duration = Duration::from_secs(1);

/// The ifindexes that get [`POD_DEV_PEER`]: pods' devices ([`Link::is_pod_device`]) that are
/// not one of the node devices the programs serve (a node's uplink may itself be a veth
/// whose peer is elsewhere, as in test clusters; it must keep its own transmit path).
pub fn pod_device_ifindexes(links: &[Link], node_devices: &[String]) -> BTreeSet<u32> {
    links
        .iter()
        .filter(|l| l.is_pod_device() && !node_devices.contains(&l.name))
        .map(|l| l.ifindex)
        .collect()
}

/// The map and what it holds.
pub struct PodDevices {
    map: HashMap<MapData, u32, u32>,
    /// Whether peer redirects are wanted (`--tc-redirect-peer`); if not, the map is kept
    /// empty.
    enabled: bool,
    written: BTreeSet<u32>,
    last_refresh: Option<Instant>,
}

impl PodDevices {
    /// Takes the map from the loaded object; what an earlier agent wrote is known from the
    /// pin and corrected by the first refresh.
    pub fn take(ebpf: &mut Ebpf, enabled: bool) -> anyhow::Result<Self> {
        let map = ebpf
            .take_map(names::POD_DEVICES)
            .with_context(|| format!("the eBPF object has no map {}", names::POD_DEVICES))?;
        let map: HashMap<MapData, u32, u32> = HashMap::try_from(map)
            .with_context(|| format!("map {} has an unexpected type", names::POD_DEVICES))?;
        let written = map.keys().filter_map(Result::ok).collect();
        Ok(Self {
            map,
            enabled,
            written,
            last_refresh: None,
        })
    }

    /// Re-reads the links if the last read is older than [`REFRESH_PERIOD`] (or `force`),
    /// and writes the differences. Returns the number of entries written or deleted.
    pub fn refresh(&mut self, node_devices: &[String], force: bool) -> anyhow::Result<usize> {
        let now = Instant::now();
        if !force
            && self
                .last_refresh
                .is_some_and(|t| now.duration_since(t) < REFRESH_PERIOD)
        {
            return Ok(0);
        }
        self.last_refresh = Some(now);
        let wanted = if self.enabled {
            let links = crate::links::links().context("listing the node's links")?;
            pod_device_ifindexes(&links, node_devices)
        } else {
            BTreeSet::new()
        };
        self.write(&wanted)
    }

    /// Makes the map hold exactly `wanted` (deletions first: a gone ifindex must not stay).
    fn write(&mut self, wanted: &BTreeSet<u32>) -> anyhow::Result<usize> {
        let mut changes = 0;
        let gone: Vec<u32> = self.written.difference(wanted).copied().collect();
        for ifindex in gone {
            match self.map.remove(&ifindex) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("deleting ifindex {ifindex} from {}", names::POD_DEVICES)
                    });
                }
            }
            self.written.remove(&ifindex);
            changes += 1;
        }
        let new: Vec<u32> = wanted.difference(&self.written).copied().collect();
        for ifindex in new {
            self.map
                .insert(ifindex, POD_DEV_PEER, 0)
                .with_context(|| format!("writing ifindex {ifindex} to {}", names::POD_DEVICES))?;
            self.written.insert(ifindex);
            changes += 1;
        }
        if changes > 0 {
            tracing::debug!(
                devices = ?self.written,
                "pod devices for bpf_redirect_peer"
            );
        }
        Ok(changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(ifindex: u32, name: &str, kind: &str, remote: bool) -> Link {
        Link {
            ifindex,
            name: name.into(),
            kind: kind.into(),
            peer_in_other_netns: remote,
        }
    }

    #[test]
    fn only_pods_veths_outside_the_served_devices() {
        let links = [
            link(1, "lo", "", false),
            // The node's uplink, a veth into another namespace (as in test clusters).
            link(2, "eth0", "veth", true),
            link(3, "vp0", "veth", true),
            link(4, "nk0", "netkit", true),
            // A veth pair with both ends on the node (no peer namespace to deliver to).
            link(5, "v-a", "veth", false),
            link(6, "v-b", "veth", false),
            link(7, "br0", "bridge", false),
        ];
        let got = pod_device_ifindexes(&links, &["eth0".into()]);
        assert_eq!(got, BTreeSet::from([3, 4]));
        // Without --devices naming it, an uplink veth counts as a pod's: callers pass the
        // devices the programs are attached to.
        assert!(pod_device_ifindexes(&links, &[]).contains(&2));
    }
}
