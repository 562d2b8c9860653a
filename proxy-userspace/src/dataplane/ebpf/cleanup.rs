//! `kproxy cleanup`: remove every link, map pin and directory the agent created.

use std::path::Path;

use super::attach::links_dir;
use crate::bpffs;

/// Removes what kproxy pinned under `bpf_root`. Removing a link's last pin detaches its
/// program. Returns the number of pins removed. Idempotent: a missing root is success.
pub fn cleanup(bpf_root: &Path) -> anyhow::Result<usize> {
    if !bpf_root.exists() {
        return Ok(0);
    }
    let mut removed = 0;
    let links = links_dir(bpf_root);
    if links.exists() {
        for entry in std::fs::read_dir(&links)? {
            let path = entry?.path();
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
