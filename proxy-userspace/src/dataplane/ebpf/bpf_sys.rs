//! The few raw bpf(2) commands aya 0.14 does not offer for pinned links: open a pin, read a
//! link's target, update a link's program in place, detach a link.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;
/// `enum bpf_link_type` values of the links kproxy pins.
pub const BPF_LINK_TYPE_CGROUP: u32 = 3;
pub const BPF_LINK_TYPE_XDP: u32 = 6;
pub const BPF_LINK_TYPE_TCX: u32 = 11;

fn bpf(cmd: libc::c_long, attr: &mut [u64], size: usize) -> io::Result<i64> {
    // SAFETY: `attr` is a zero-initialised union bpf_attr of at least `size` bytes.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Opens the object pinned at `pin` (BPF_OBJ_GET).
pub fn open_pinned(pin: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(pin.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // pathname (u64), bpf_fd (u32), file_flags (u32).
    let mut attr = [path.as_ptr() as u64, 0];
    let fd = bpf(BPF_OBJ_GET, &mut attr, 16)?;
    // SAFETY: the kernel just gave us this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// A link's type and what it is attached to: for cgroup links the cgroup id (the cgroup
/// directory's inode number on cgroup v2), for XDP and TCX links the interface index.
pub fn link_target(link: &OwnedFd) -> io::Result<(u32, u64)> {
    // struct bpf_link_info: type, id, prog_id (u32 each), then an 8-byte aligned union whose
    // cgroup member starts with cgroup_id (u64).
    let mut info = [0u64; 8];
    let len = std::mem::size_of_val(&info) as u64;
    // bpf_fd (u32), info_len (u32), info (u64).
    let mut attr = [
        link.as_raw_fd() as u64 | (len << 32),
        info.as_mut_ptr() as u64,
    ];
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr, 16)?;
    let link_type = (info[0] & 0xffff_ffff) as u32;
    let target = match link_type {
        BPF_LINK_TYPE_CGROUP => info[2],
        // The xdp and tcx members start with a u32 ifindex.
        _ => info[2] & 0xffff_ffff,
    };
    Ok((link_type, target))
}

/// Replaces the program of `link` atomically (BPF_LINK_UPDATE): no moment without one.
pub fn link_update(link: &OwnedFd, new_prog: RawFd) -> io::Result<()> {
    // link_fd, new_prog_fd, flags, old_prog_fd (u32 each).
    let mut attr = [link.as_raw_fd() as u64 | ((new_prog as u64) << 32), 0];
    bpf(BPF_LINK_UPDATE, &mut attr, 16).map(|_| ())
}

/// Detaches `link` now, whoever else still holds it (BPF_LINK_DETACH).
pub fn link_detach(link: &OwnedFd) -> io::Result<()> {
    let mut attr = [link.as_raw_fd() as u64, 0];
    bpf(BPF_LINK_DETACH, &mut attr, 16).map(|_| ())
}

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// Writes `count` entries in one BPF_MAP_UPDATE_BATCH (kernel 5.6+, hash and array maps):
/// `keys` and `values` point to `count` contiguous keys and values of the map's sizes.
/// Returns how many entries the kernel processed, also on error (the batch stops at the first
/// failing entry; the entries before it are written).
///
/// # Safety
/// `keys` and `values` must be valid for reads of `count` keys/values of the map's sizes.
pub unsafe fn map_update_batch(
    map: std::os::fd::BorrowedFd<'_>,
    keys: *const u8,
    values: *const u8,
    count: u32,
) -> (u32, io::Result<()>) {
    // struct { in_batch, out_batch, keys, values (u64 each); count, map_fd (u32);
    // elem_flags, flags (u64) } of union bpf_attr.
    let mut attr = [
        0,
        0,
        keys as u64,
        values as u64,
        u64::from(count) | ((map.as_raw_fd() as u64) << 32),
        0,
        0,
        0,
    ];
    let rc = bpf(BPF_MAP_UPDATE_BATCH, &mut attr, 56);
    let processed = (attr[4] & 0xffff_ffff) as u32;
    match rc {
        Ok(_) => (processed, Ok(())),
        Err(e) => (processed, Err(e)),
    }
}
