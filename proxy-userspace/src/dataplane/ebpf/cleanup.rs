//! `kproxy cleanup`: remove every link, map pin and directory the agent created.

use std::{ffi::CString, io, os::unix::ffi::OsStrExt as _, path::Path};

use super::attach::links_dir;
use crate::bpffs;

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;

/// Detaches the pinned link at `pin` now (BPF_LINK_DETACH), whoever else still holds it: a
/// killed agent's descriptors, or the kernel's deferred release of the last reference,
/// would otherwise leave the program attached for a while after the pin is gone.
fn detach_pinned_link(pin: &Path) -> io::Result<()> {
    let path = CString::new(pin.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // union bpf_attr for BPF_OBJ_GET: pathname (u64), bpf_fd (u32), file_flags (u32).
    let mut get = [0u64; 2];
    get[0] = path.as_ptr() as u64;
    // SAFETY: bpf(2) with a zeroed attr of the size passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, get.as_mut_ptr(), 16usize) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = fd as i32;
    // union bpf_attr for BPF_LINK_DETACH: link_fd (u32).
    let mut detach = [0u32; 4];
    detach[0] = fd as u32;
    // SAFETY: as above.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_DETACH, detach.as_mut_ptr(), 16usize) };
    let err = io::Error::last_os_error();
    // SAFETY: closing the fd we opened.
    unsafe { libc::close(fd) };
    if rc < 0 { Err(err) } else { Ok(()) }
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
