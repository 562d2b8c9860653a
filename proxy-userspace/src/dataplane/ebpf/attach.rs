//! Attaching the programs through bpf links pinned under `<bpf-root>/links`, so they stay
//! attached while the agent restarts, and a new agent replaces them without a gap.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, CgroupSockAddr, LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{TcAttachOptions, qdisc_add_clsact},
        xdp::XdpLink,
    },
};

use super::{EbpfSettings, bpf_sys};

/// Program names in the eBPF object.
pub const PROG_CONNECT4: &str = "kproxy_sock4_connect";
pub const PROG_SENDMSG4: &str = "kproxy_sock4_sendmsg";
pub const PROG_RECVMSG4: &str = "kproxy_sock4_recvmsg";
pub const PROG_GETPEERNAME4: &str = "kproxy_sock4_getpeername";
pub const PROG_XDP: &str = "kproxy_xdp_ingress";
pub const PROG_TC_INGRESS: &str = "kproxy_tc_ingress";
pub const PROG_TC_EGRESS: &str = "kproxy_tc_egress";

const CGROUP_PROGRAMS: [&str; 4] = [
    PROG_CONNECT4,
    PROG_SENDMSG4,
    PROG_RECVMSG4,
    PROG_GETPEERNAME4,
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
        let xdp_pin = dir.join(format!("xdp@{dev}"));
        match attach_xdp(ebpf, dev, &xdp_pin) {
            Ok(()) => {
                kept.push(xdp_pin);
                out.push(Attachment {
                    program: PROG_XDP,
                    target: format!("xdp/native {dev}"),
                });
            }
            Err(e) => {
                tracing::warn!(
                    device = %dev,
                    "native XDP unavailable ({e:#}); using tc ingress on this device instead"
                );
                let pin = dir.join(format!("tc_ingress@{dev}"));
                attach_tc(ebpf, PROG_TC_INGRESS, dev, TcAttachType::Ingress, &pin)
                    .with_context(|| format!("attaching {PROG_TC_INGRESS} to {dev}"))?;
                kept.push(pin);
                out.push(Attachment {
                    program: PROG_TC_INGRESS,
                    target: format!("tc/ingress {dev}"),
                });
            }
        }
        let pin = dir.join(format!("tc_egress@{dev}"));
        attach_tc(ebpf, PROG_TC_EGRESS, dev, TcAttachType::Egress, &pin)
            .with_context(|| format!("attaching {PROG_TC_EGRESS} to {dev}"))?;
        kept.push(pin);
        out.push(Attachment {
            program: PROG_TC_EGRESS,
            target: format!("tc/egress {dev}"),
        });
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

fn pinned(path: &Path) -> Option<FdLink> {
    if !path.exists() {
        return None;
    }
    match PinnedLink::from_pin(path) {
        Ok(link) => Some(link.into()),
        Err(e) => {
            tracing::warn!(pin = %path.display(), "unusable pinned link, replacing it: {e}");
            let _ = std::fs::remove_file(path);
            None
        }
    }
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
    prog.load()?;
    // A link pinned by an earlier agent on this same cgroup: swap its program in place.
    if pin.exists() {
        match update_cgroup_link(pin, cgroup, prog) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => tracing::debug!(pin = %pin.display(), "in-place update failed: {e}"),
        }
    }
    // Otherwise attach the new program next to the old one (both translate identically; the
    // second sees an already translated address), then swap the pin, which detaches the old
    // one. Through bpf_link the attachment is multi-program by nature; the kernel rejects
    // explicit attach flags there, so the mode is the default.
    let id = prog.attach(cgroup, CgroupAttachMode::default())?;
    let link: FdLink = prog.take_link(id)?.try_into()?;
    pin_replacing(link, pin)
}

/// Updates the cgroup link pinned at `pin` to `prog` if it is attached to `cgroup`.
/// Ok(false): it belongs to another cgroup (a changed --cgroup-root) and must be replaced.
fn update_cgroup_link(pin: &Path, cgroup: &File, prog: &CgroupSockAddr) -> anyhow::Result<bool> {
    use std::os::{
        fd::{AsFd as _, AsRawFd as _},
        unix::fs::MetadataExt as _,
    };
    let link = bpf_sys::open_pinned(pin)?;
    let (link_type, cgroup_id) = bpf_sys::link_target(&link)?;
    if link_type != bpf_sys::BPF_LINK_TYPE_CGROUP || cgroup_id != cgroup.metadata()?.ino() {
        return Ok(false);
    }
    bpf_sys::link_update(&link, prog.fd()?.as_fd().as_raw_fd())?;
    Ok(true)
}

fn attach_xdp(ebpf: &mut Ebpf, dev: &str, pin: &Path) -> anyhow::Result<()> {
    let prog: &mut Xdp = ebpf
        .program_mut(PROG_XDP)
        .ok_or_else(|| anyhow!("the eBPF object has no program {PROG_XDP}"))?
        .try_into()?;
    if prog.fd().is_err() {
        prog.load()?;
    }
    if let Some(old) = pinned(pin) {
        let link = XdpLink::try_from(old)?;
        match prog.attach_to_link(link) {
            Ok(id) => {
                // The pin keeps the link; our handle can go.
                let _ = prog.take_link(id)?;
                return Ok(());
            }
            Err(e) => {
                tracing::warn!(
                    device = dev,
                    "replacing the pinned XDP link failed ({e}); re-attaching"
                );
                let _ = std::fs::remove_file(pin);
            }
        }
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
    if let Some(old) = pinned(pin) {
        let link = aya::programs::tc::SchedClassifierLink::try_from(old)?;
        match prog.attach_to_link(link) {
            Ok(id) => {
                let _ = prog.take_link(id)?;
                return Ok(());
            }
            Err(e) => {
                tracing::warn!(
                    device = dev,
                    "replacing the pinned tc link failed ({e}); re-attaching"
                );
                let _ = std::fs::remove_file(pin);
            }
        }
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
