//! `kproxy cleanup`: remove every link, map pin and directory the agent created.

use std::path::Path;

use super::{attach::links_dir, bpf_sys};
use crate::bpffs;

/// Detaches the pinned link at `pin` now, whoever else still holds it: a killed agent's
/// descriptors, or the kernel's deferred release of the last reference, would otherwise leave
/// the program attached for a while after the pin is gone.
fn detach_pinned_link(pin: &Path) -> std::io::Result<()> {
    bpf_sys::link_detach(&bpf_sys::open_pinned(pin)?)
}

/// Removes what kproxy pinned under `bpf_root`, detaching every pinned link first. Returns the number of pins removed. Idempotent: a missing root is success.
pub fn cleanup(bpf_root: &Path) -> anyhow::Result<usize> {
    if !bpf_root.exists() {
        return Ok(0);
    }
    let mut removed = 0;
    let links = links_dir(bpf_root);
    if links.exists() {
        for entry in std::fs::read_dir(&links)? {
            let path = entry?.path();
            if let Err(e) = detach_pinned_link(&path) {
                // Not a link (or already defunct): removing the pin is all there is to do.
                tracing::debug!(pin = %path.display(), "explicit detach: {e}");
            }
            std::fs::remove_file(&path)?;
            tracing::info!(pin = %path.display(), "detached");
            removed += 1;
        }
        std::fs::remove_dir(&links)?;
    }
    for entry in std::fs::read_dir(bpf_root)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        // Every map kproxy pins (of any layout version) starts with KP_.
        if name.starts_with("KP_") {
            std::fs::remove_file(&path)?;
            removed += 1;
        }
    }
    // A fresh bpffs mount holds the kernel's `maps.debug`/`progs.debug` views: not ours.
    let empty = std::fs::read_dir(bpf_root)?
        .flatten()
        .all(|e| e.file_name().to_string_lossy().ends_with(".debug"));
    if empty {
        if bpffs::is_mount_point(bpf_root) && bpffs::is_bpffs(bpf_root).unwrap_or(false) {
            // We mounted it (`--bpf-root` was not on a bpffs): take the mount away too.
            let _ = bpffs::unmount(bpf_root);
        }
        let _ = std::fs::remove_dir(bpf_root);
    }
    Ok(removed)
}
