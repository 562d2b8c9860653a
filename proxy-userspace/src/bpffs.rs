//! The pin directory: a directory on a bpffs, mounted by us when there is none.

use std::{
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Whether `path` lies on a bpffs.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statfs writes into `st`, which we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type's width differs between libcs"
    )]
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

fn mount_bpffs(path: &Path) -> anyhow::Result<()> {
    let target = CString::new(path.as_os_str().as_bytes())?;
    // Only root may look into the pin directory (the pins themselves are 0600 anyway).
    // SAFETY: plain mount(2) with valid C strings.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("mounting bpffs on {}", path.display()));
    }
    tracing::info!(path = %path.display(), "mounted bpffs");
    Ok(())
}

/// Makes `root` a directory on a bpffs: creates it on an existing bpffs, or mounts a bpffs
/// on the nearest existing directory that can hold it (`/sys/fs/bpf` for the default root).
pub fn ensure_root(root: &Path) -> anyhow::Result<()> {
    if root.exists() {
        if !is_bpffs(root)? {
            mount_bpffs(root)?;
        }
        return root_only(root);
    }
    // Find the nearest existing ancestor.
    let mut missing: Vec<PathBuf> = Vec::new();
    let mut cur = root.to_path_buf();
    while !cur.exists() {
        missing.push(cur.clone());
        match cur.parent() {
            Some(p) => cur = p.to_path_buf(),
            None => bail!("no existing ancestor of {}", root.display()),
        }
    }
    // Sysfs cannot hold new directories: mount bpffs on /sys/fs/bpf (or wherever the
    // existing ancestor is) first when that ancestor is not already a bpffs.
    let ancestor_is_bpffs = is_bpffs(&cur)?;
    if !ancestor_is_bpffs && is_sysfs(&cur)? {
        mount_bpffs(&cur)?;
    }
    for dir in missing.iter().rev() {
        std::fs::create_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if !is_bpffs(root)? {
        mount_bpffs(root)?;
    }
    root_only(root)
}

/// Makes a pin directory root-only (0700): a directory created on an existing bpffs (the
/// host's `/sys/fs/bpf`) would otherwise be world-readable.
pub fn root_only(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} root-only", dir.display()))
}

fn is_sysfs(path: &Path) -> io::Result<bool> {
    const SYSFS_MAGIC: i64 = 0x6265_6572;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statfs writes into `st`, which we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type's width differs between libcs"
    )]
    Ok(st.f_type as i64 == SYSFS_MAGIC)
}

/// Whether `path` is a mount point (its device differs from its parent's).
pub fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let (Ok(me), Some(parent)) = (std::fs::metadata(path), path.parent()) else {
        return false;
    };
    std::fs::metadata(parent).is_ok_and(|p| p.dev() != me.dev())
}

/// Unmounts a bpffs we may have mounted at `path` (lazily, so open fds keep working).
pub fn unmount(path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: umount2 with a valid C string.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
