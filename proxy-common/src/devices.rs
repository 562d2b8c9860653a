//! The node's pod devices, as the device programs see them (`crate::maps::POD_DEVICES`).

/// The device has a peer in a pod's network namespace (a veth or netkit whose other end was
/// moved there): the tc ingress program delivers a packet FIB-forwarded to it straight into
/// the peer's ingress with `bpf_redirect_peer`, skipping the host end's transmit and the
/// per-CPU backlog (Cilium's "BPF host routing"). `bpf_redirect_peer` drops the packet on a
/// device without such a peer, so only the agent, which checked the link, sets this.
pub const POD_DEV_PEER: u32 = 1 << 0;
