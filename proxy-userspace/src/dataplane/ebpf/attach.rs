//! Attaching the programs through bpf links pinned under `<bpf-root>/links`, so they stay
//! attached while the agent restarts, and a new agent replaces them without a gap.

use std::{
    fs::File,
    os::{
        fd::{AsFd as _, AsRawFd as _, RawFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, CgroupSockAddr, LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::FdLink,
        tc::{TcAttachOptions, qdisc_add_clsact},
    },
};

use super::{EbpfSettings, bpf_sys};

/// Program names in the eBPF object.
pub const PROG_CONNECT4: &str = "kproxy_sock4_connect";
pub const PROG_SENDMSG4: &str = "kproxy_sock4_sendmsg";
pub const PROG_RECVMSG4: &str = "kproxy_sock4_recvmsg";
pub const PROG_GETPEERNAME4: &str = "kproxy_sock4_getpeername";
pub const PROG_CONNECT6: &str = "kproxy_sock6_connect";
pub const PROG_SENDMSG6: &str = "kproxy_sock6_sendmsg";
pub const PROG_RECVMSG6: &str = "kproxy_sock6_recvmsg";
pub const PROG_GETPEERNAME6: &str = "kproxy_sock6_getpeername";
pub const PROG_XDP: &str = "kproxy_xdp_ingress";
pub const PROG_TC_INGRESS: &str = "kproxy_tc_ingress";
pub const PROG_TC_EGRESS: &str = "kproxy_tc_egress";

const CGROUP_PROGRAMS: [&str; 8] = [
    PROG_CONNECT4,
    PROG_SENDMSG4,
    PROG_RECVMSG4,
    PROG_GETPEERNAME4,
    PROG_CONNECT6,
    PROG_SENDMSG6,
    PROG_RECVMSG6,
    PROG_GETPEERNAME6,
];

/// Where the links live: `<bpf-root>/links`.
pub fn links_dir(bpf_root: &Path) -> PathBuf {
    bpf_root.join("links")
}

/// One program attached somewhere, for logs and status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub program: &'static str,
    /// "cgroup <path>", "xdp/native <dev>", "tc/ingress <dev>", "tc/egress <dev>".
    pub target: String,
}

pub fn attach_all(ebpf: &mut Ebpf, settings: &EbpfSettings) -> anyhow::Result<Vec<Attachment>> {
    let dir = links_dir(&settings.bpf_root);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    crate::bpffs::root_only(&dir)?;
    let mut kept: Vec<PathBuf> = Vec::new();
    let mut out = Vec::new();

    let cgroup = File::open(&settings.cgroup_root).with_context(|| {
        format!(
            "opening --cgroup-root {} (a cgroup v2 directory)",
            settings.cgroup_root.display()
        )
    })?;
    for name in CGROUP_PROGRAMS {
        let pin = dir.join(format!("cgroup_{name}"));
        attach_cgroup(ebpf, name, &cgroup, &pin)
            .with_context(|| format!("attaching {name} to {}", settings.cgroup_root.display()))?;
        kept.push(pin);
        out.push(Attachment {
            program: name,
            target: format!("cgroup {}", settings.cgroup_root.display()),
        });
    }

    for dev in &settings.devices {
        for (a, pin) in attach_device(ebpf, &dir, dev, settings.device_ingress_xdp)? {
            kept.push(pin);
            out.push(a);
        }
    }

    // Links of an earlier run that this run does not use (a device no longer listed):
    // removing the pin detaches them.
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if !kept.contains(&path) {
            tracing::info!(link = %path.display(), "detaching a link this run does not use");
            let _ = std::fs::remove_file(&path);
        }
    }
    for a in &out {
        tracing::info!(program = a.program, target = %a.target, "attached");
    }
    Ok(out)
}

/// Loads every program into the kernel (the verifier runs now, so a refused program is an
/// error at start even when attaching waits).
pub fn load_all(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    for name in CGROUP_PROGRAMS {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("the eBPF object has no program {name}"))?
            .try_into()?;
        prog.load().with_context(|| format!("loading {name}"))?;
    }
    let xdp: &mut Xdp = ebpf
        .program_mut(PROG_XDP)
        .ok_or_else(|| anyhow!("the eBPF object has no program {PROG_XDP}"))?
        .try_into()?;
    xdp.load().with_context(|| format!("loading {PROG_XDP}"))?;
    for name in [PROG_TC_INGRESS, PROG_TC_EGRESS] {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("the eBPF object has no program {name}"))?
            .try_into()?;
        prog.load().with_context(|| format!("loading {name}"))?;
    }
    Ok(())
}

/// Whether links of an earlier agent are pinned under `bpf_root` (its programs may serve).
pub fn links_pinned(bpf_root: &Path) -> bool {
    std::fs::read_dir(links_dir(bpf_root))
        .map(|mut rd| rd.next().is_some())
        .unwrap_or(false)
}

/// Attaches the device programs to `dev` (XDP, or tc ingress where native XDP cannot attach;
/// tc egress), each through a link pinned as `<kind>@<dev>` under `dir`, swapping the program
/// into a link pinned there before when it is on the same device. With `ingress_xdp` false
/// (`--device-ingress tc`) the ingress program is always tc.
pub fn attach_device(
    ebpf: &mut Ebpf,
    dir: &Path,
    dev: &str,
    ingress_xdp: bool,
) -> anyhow::Result<Vec<(Attachment, PathBuf)>> {
    let mut out = Vec::new();
    let xdp_pin = dir.join(format!("xdp@{dev}"));
    let xdp = if ingress_xdp {
        attach_xdp(ebpf, dev, &xdp_pin)
    } else {
        Err(anyhow::anyhow!("--device-ingress tc"))
    };
    match xdp {
        Ok(()) => out.push((
            Attachment {
                program: PROG_XDP,
                target: format!("xdp/native {dev}"),
            },
            xdp_pin,
        )),
        Err(e) => {
            tracing::warn!(
                device = %dev,
                "native XDP unavailable or not wanted ({e:#}); using tc ingress on this device instead"
            );
            let pin = dir.join(format!("tc_ingress@{dev}"));
            attach_tc(ebpf, PROG_TC_INGRESS, dev, TcAttachType::Ingress, &pin)
                .with_context(|| format!("attaching {PROG_TC_INGRESS} to {dev}"))?;
            out.push((
                Attachment {
                    program: PROG_TC_INGRESS,
                    target: format!("tc/ingress {dev}"),
                },
                pin,
            ));
        }
    }
    let pin = dir.join(format!("tc_egress@{dev}"));
    attach_tc(ebpf, PROG_TC_EGRESS, dev, TcAttachType::Egress, &pin)
        .with_context(|| format!("attaching {PROG_TC_EGRESS} to {dev}"))?;
    out.push((
        Attachment {
            program: PROG_TC_EGRESS,
            target: format!("tc/egress {dev}"),
        },
        pin,
    ));
    Ok(out)
}

/// A device link pin's name, split: `xdp@eth0` -> ("xdp", "eth0").
fn device_pin_parts(pin: &Path) -> Option<(&str, &str)> {
    let name = pin.file_name()?.to_str()?;
    let (kind, dev) = name.split_once('@')?;
    matches!(kind, "xdp" | "tc_ingress" | "tc_egress").then_some((kind, dev))
}

/// What [`follow_devices`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DeviceChanges {
    pub attached: Vec<String>,
    pub detached: Vec<String>,
    /// `(old name, new name)`.
    pub renamed: Vec<(String, String)>,
}

/// Brings the device links under `dir` in line with `wanted` (name, ifindex): links whose
/// device is gone or no longer wanted are detached and unpinned; a link whose device was
/// renamed keeps working and its pin follows the new name; wanted devices without links get
/// the programs (XDP ingress unless `ingress_xdp` is false). Per-device failures are logged
/// and skipped (the others still get served).
pub fn follow_devices(
    ebpf: &mut Ebpf,
    dir: &Path,
    wanted: &[(String, u32)],
    ingress_xdp: bool,
) -> anyhow::Result<DeviceChanges> {
    let mut changes = DeviceChanges::default();
    let mut linked: Vec<String> = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let pin = entry?.path();
        let Some((kind, dev)) = device_pin_parts(&pin) else {
            continue;
        };
        let (kind, dev) = (kind.to_owned(), dev.to_owned());
        // The device the link is attached to now (0: its device was deleted).
        let ifindex = bpf_sys::open_pinned(&pin)
            .and_then(|l| bpf_sys::link_target(&l))
            .map(|(_, on)| on)
            .unwrap_or(0);
        match wanted
            .iter()
            .find(|(_, i)| u64::from(*i) == ifindex && ifindex != 0)
        {
            Some((name, _)) if *name == dev => linked.push(dev),
            Some((name, _)) => {
                let to = dir.join(format!("{kind}@{name}"));
                std::fs::rename(&pin, &to)
                    .with_context(|| format!("renaming {} to {}", pin.display(), to.display()))?;
                tracing::info!(from = %dev, to = %name, "device renamed: its links follow");
                if !changes.renamed.iter().any(|(_, n)| n == name) {
                    changes.renamed.push((dev, name.clone()));
                }
                linked.push(name.clone());
            }
            None => {
                if let Ok(link) = bpf_sys::open_pinned(&pin) {
                    let _ = bpf_sys::link_detach(&link);
                }
                let _ = std::fs::remove_file(&pin);
                tracing::info!(device = %dev, program = %kind, "device gone or no longer selected: detached");
                if !changes.detached.contains(&dev) {
                    changes.detached.push(dev);
                }
            }
        }
    }
    for (name, _) in wanted {
        if linked.contains(name) {
            continue;
        }
        match attach_device(ebpf, dir, name, ingress_xdp) {
            Ok(done) => {
                for (a, _) in &done {
                    tracing::info!(program = a.program, target = %a.target, "attached to a new device");
                }
                changes.attached.push(name.clone());
            }
            Err(e) => tracing::error!(device = %name, "attaching to a new device failed: {e:#}"),
        }
    }
    Ok(changes)
}

/// Pins a new link at `pin` atomically: pin beside it, then rename over the old pin (whose
/// link, if any, is released and detached).
fn pin_replacing(link: FdLink, pin: &Path) -> anyhow::Result<()> {
    // bpffs reserves names with dots.
    let mut tmp = pin.as_os_str().to_owned();
    tmp.push("_new");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let pinned = link
        .pin(&tmp)
        .with_context(|| format!("pinning {}", tmp.display()))?;
    std::fs::rename(&tmp, pin)
        .with_context(|| format!("renaming {} to {}", tmp.display(), pin.display()))?;
    drop(pinned);
    Ok(())
}

fn attach_cgroup(ebpf: &mut Ebpf, name: &str, cgroup: &File, pin: &Path) -> anyhow::Result<()> {
    let prog: &mut CgroupSockAddr = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("the eBPF object has no program {name}"))?
        .try_into()?;
    if prog.fd().is_err() {
        prog.load()?;
    }
    // A link pinned by an earlier agent on this same cgroup: swap its program in place.
    let cgroup_id = cgroup.metadata()?.ino();
    let prog_fd = prog.fd()?.as_fd().as_raw_fd();
    if update_pinned_link(pin, bpf_sys::BPF_LINK_TYPE_CGROUP, cgroup_id, prog_fd) {
        return Ok(());
    }
    // Otherwise attach the new program next to the old one (both translate identically; the
    // second sees an already translated address), then swap the pin, which detaches the old
    // one. Through bpf_link the attachment is multi-program by nature; the kernel rejects
    // explicit attach flags there, so the mode is the default.
    let id = prog.attach(cgroup, CgroupAttachMode::default())?;
    let link: FdLink = prog.take_link(id)?.try_into()?;
    pin_replacing(link, pin)
}

/// Swaps `prog_fd` into the link pinned at `pin` (BPF_LINK_UPDATE: no moment without a
/// program) when that link is of `link_type` and attached to `target` (cgroup id or
/// ifindex). Otherwise, or if the update fails, the old link is detached and its pin removed
/// so that a fresh attachment can take its place; returns whether the update was done.
fn update_pinned_link(pin: &Path, link_type: u32, target: u64, prog_fd: RawFd) -> bool {
    if !pin.exists() {
        return false;
    }
    let updated = bpf_sys::open_pinned(pin).and_then(|link| {
        let (t, on) = bpf_sys::link_target(&link)?;
        if (t, on) != (link_type, target) {
            // Another cgroup or device (the flags changed): not ours to reuse.
            let _ = bpf_sys::link_detach(&link);
            return Ok(false);
        }
        bpf_sys::link_update(&link, prog_fd)?;
        Ok(true)
    });
    match updated {
        Ok(true) => return true,
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(pin = %pin.display(), "replacing a pinned link failed ({e}); re-attaching")
        }
    }
    if let Ok(link) = bpf_sys::open_pinned(pin) {
        let _ = bpf_sys::link_detach(&link);
    }
    let _ = std::fs::remove_file(pin);
    false
}

fn attach_xdp(ebpf: &mut Ebpf, dev: &str, pin: &Path) -> anyhow::Result<()> {
    let prog: &mut Xdp = ebpf
        .program_mut(PROG_XDP)
        .ok_or_else(|| anyhow!("the eBPF object has no program {PROG_XDP}"))?
        .try_into()?;
    if prog.fd().is_err() {
        prog.load()?;
    }
    let ifindex = crate::netdev::ifindex(dev).ok_or_else(|| anyhow!("no interface {dev}"))?;
    let prog_fd = prog.fd()?.as_fd().as_raw_fd();
    if update_pinned_link(pin, bpf_sys::BPF_LINK_TYPE_XDP, u64::from(ifindex), prog_fd) {
        return Ok(());
    }
    let id = prog.attach(dev, XdpMode::Driver)?;
    let link: FdLink = prog.take_link(id)?.try_into()?;
    pin_replacing(link, pin)
}

fn attach_tc(
    ebpf: &mut Ebpf,
    name: &str,
    dev: &str,
    direction: TcAttachType,
    pin: &Path,
) -> anyhow::Result<()> {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("the eBPF object has no program {name}"))?
        .try_into()?;
    if prog.fd().is_err() {
        prog.load()?;
    }
    let ifindex = crate::netdev::ifindex(dev).ok_or_else(|| anyhow!("no interface {dev}"))?;
    let prog_fd = prog.fd()?.as_fd().as_raw_fd();
    if update_pinned_link(pin, bpf_sys::BPF_LINK_TYPE_TCX, u64::from(ifindex), prog_fd) {
        return Ok(());
    }
    // TCX (kernel >= 6.6) gives a pinnable link; older kernels need the clsact qdisc.
    let id = match prog.attach_with_options(
        dev,
        direction,
        TcAttachOptions::TcxOrder(LinkOrder::default()),
    ) {
        Ok(id) => id,
        Err(e) => {
            let _ = qdisc_add_clsact(dev);
            return Err(anyhow!(e)).context("TCX attach failed (kernel older than 6.6?)");
        }
    };
    let link: FdLink = prog.take_link(id)?.try_into()?;
    pin_replacing(link, pin)
}
