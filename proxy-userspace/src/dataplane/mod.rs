//! Dataplane backends. Each one programs a [`DesiredState`] exactly; none re-derives
//! Kubernetes semantics.

pub mod conntrack_flush;
pub mod ebpf;
pub mod iptables;
pub mod nftables;
pub mod userspace;

use crate::{desired::DesiredState, desired_cache::FrontendChanges};

/// What one apply changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Entries written (inserted or changed).
    pub writes: usize,
    /// Entries deleted.
    pub deletes: usize,
    /// Frontends that could not be programmed (with the reason), e.g. a full map.
    pub rejected: Vec<String>,
}

pub trait Dataplane {
    /// A short name for logs and metrics ("ebpf", ...).
    fn name(&self) -> &'static str;

    /// Makes the dataplane serve exactly `desired`. `full` asks the backend to re-read what it
    /// has programmed instead of trusting its own record (after an error, or on start).
    fn apply(&mut self, desired: &DesiredState, full: bool) -> anyhow::Result<ApplyStats>;

    /// `apply(desired, false)` when only the frontends on the `changed` keys differ from the
    /// state the last successful apply was given (a partial sync). Backends that gain nothing
    /// from knowing that (the rule modes diff their own rules) keep the whole apply.
    fn apply_changed(
        &mut self,
        desired: &DesiredState,
        changed: &FrontendChanges,
    ) -> anyhow::Result<ApplyStats> {
        let _ = changed;
        self.apply(desired, false)
    }

    /// Whether the backend has delayed work that the next apply does (e.g. removing a
    /// drained backend): the agent then syncs even without a change.
    fn has_due_work(&self) -> bool {
        false
    }

    /// The node's devices (name, ifindex) changed: devices were added, removed or renamed.
    /// Backends with per-device programs follow; the rule modes match addresses, not devices.
    fn set_devices(&mut self, _devices: &[(String, u32)]) -> anyhow::Result<()> {
        Ok(())
    }

    /// Called on every poll of the agent's loop: backends that keep a view of the node's
    /// other links (the eBPF mode's pod devices) refresh it when due. Failures are logged
    /// by the backend; the last view stays.
    fn follow_links(&mut self) {}
}
