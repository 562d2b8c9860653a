//! The service addresses on the relay interface: what apply wants there, and a watchdog
//! that puts them back when something else removed them (the interface deleted, an address
//! flushed), loudly, instead of silently serving nothing on them.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::task::AbortHandle;

use super::iface::{self, RELAY_INTERFACE};

/// How often the watchdog compares the interface with what apply wants.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// The addresses apply wants on the interface. Apply and the watchdog change the kernel
/// only while holding the lock, so they never undo each other.
#[derive(Default)]
pub struct ServiceAddresses {
    wanted: Mutex<BTreeSet<IpAddr>>,
}

impl ServiceAddresses {
    /// Adds what `want` has and the interface lacks (first step of an apply: listeners
    /// need their address). Returns how many were added.
    pub fn add_missing(&self, want: &BTreeSet<IpAddr>) -> anyhow::Result<usize> {
        let mut wanted = self
            .wanted
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?;
        let have: BTreeSet<IpAddr> = iface::addresses()?.into_iter().collect();
        let mut added = 0;
        for ip in want.difference(&have) {
            iface::add(*ip)?;
            wanted.insert(*ip);
            added += 1;
        }
        wanted.extend(want.iter().copied());
        Ok(added)
    }

    /// Removes what the interface has beyond `want` (last step of an apply, once the
    /// listeners on those addresses are closed). Returns how many were removed.
    pub fn remove_unwanted(&self, want: &BTreeSet<IpAddr>) -> anyhow::Result<usize> {
        let mut wanted = self
            .wanted
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?;
        let have: BTreeSet<IpAddr> = iface::addresses()?.into_iter().collect();
        let mut removed = 0;
        for ip in have.difference(want) {
            iface::remove(*ip)?;
            removed += 1;
        }
        *wanted = want.clone();
        Ok(removed)
    }

    /// Puts back wanted addresses the interface lost. Returns how many.
    fn restore(&self) -> anyhow::Result<usize> {
        let wanted = self
            .wanted
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?;
        let have: BTreeSet<IpAddr> = iface::addresses()?.into_iter().collect();
        let lost: Vec<IpAddr> = wanted.difference(&have).copied().collect();
        if lost.is_empty() {
            return Ok(0);
        }
        tracing::warn!(
            lost = lost.len(),
            "{RELAY_INTERFACE} lost service addresses (removed by something else): restoring {lost:?}"
        );
        for ip in &lost {
            iface::add(*ip)?;
        }
        Ok(lost.len())
    }
}

/// Stops the watchdog when dropped.
pub struct Watchdog(AbortHandle);

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts the watchdog (inside the runtime the caller entered).
pub fn watch(addresses: Arc<ServiceAddresses>) -> Watchdog {
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = addresses.restore() {
                tracing::error!(
                    "{RELAY_INTERFACE}: cannot restore the service addresses: {e:#}; cluster, external and LoadBalancer IPs are not served"
                );
            }
        }
    });
    Watchdog(task.abort_handle())
}
