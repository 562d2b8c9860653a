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
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// Copies every entry of the (non per-CPU) map `from` into `to`, both with these key and value
/// sizes; entries that vanish while copying are skipped. Returns the number copied.
pub fn map_copy(
    from: &OwnedFd,
    to: &OwnedFd,
    key_size: usize,
    value_size: usize,
) -> io::Result<usize> {
    let mut key = vec![0u8; key_size.max(1)];
    let mut next = vec![0u8; key_size.max(1)];
    let mut value = vec![0u8; value_size.max(1)];
    let mut copied = 0;
    let mut first = true;
    loop {
        // map_fd (u32, padded), key (u64), next_key (u64).
        let key_ptr = if first { 0 } else { key.as_ptr() as u64 };
        let mut attr = [
            from.as_raw_fd() as u64,
            key_ptr,
            next.as_mut_ptr() as u64,
            0,
        ];
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr, 32) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(copied),
            Err(e) => return Err(e),
        }
        first = false;
        std::mem::swap(&mut key, &mut next);
        // map_fd, key, value, flags.
        let mut attr = [
            from.as_raw_fd() as u64,
            key.as_ptr() as u64,
            value.as_mut_ptr() as u64,
            0,
        ];
        if bpf(BPF_MAP_LOOKUP_ELEM, &mut attr, 32).is_err() {
            continue;
        }
        let mut attr = [
            to.as_raw_fd() as u64,
            key.as_ptr() as u64,
            value.as_mut_ptr() as u64,
            0,
        ];
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr, 32)?;
        copied += 1;
    }
}

/// `struct bpf_map_info`'s first fields of the map at `fd`: type, id, key size, value size,
/// max entries, flags.
pub fn map_info(fd: &OwnedFd) -> io::Result<[u32; 6]> {
    // The kernel fills at most `len` bytes of the (larger) struct.
    let mut info = [0u32; 20];
    let len = std::mem::size_of_val(&info) as u64;
    let mut attr = [
        fd.as_raw_fd() as u64 | (len << 32),
        info.as_mut_ptr() as u64,
    ];
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr, 16)?;
    Ok([info[0], info[1], info[2], info[3], info[4], info[5]])
}
