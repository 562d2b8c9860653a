//! `kproxy list affinity`: the eBPF dataplane's session-affinity entries (`KP_AFF4_V1`):
//! which client got which backend of which frontend, and how long ago. Clients are source
//! addresses (traffic entering through the devices) or network namespaces (connect()/sendmsg()
//! from pods and host processes, keyed by netns cookie). The rule modes keep affinity in
//! netfilter instead, which [`RULE_MODES`] points to.

use std::{collections::BTreeMap, net::SocketAddrV4, path::Path};

use proxy_common::{
    affinity::{AFFINITY_CLIENT_NETNS, Lb4AffinityKey, Lb4AffinityValue},
    lb::{Lb4Key, Lb4Service, SVC_FLAG_AFFINITY},
    maps as names,
};
use serde::Serialize;

use super::{
    maps::{LbSnapshot, addr, frontend_label, monotonic_ns, port, read_hash},
    table::Table,
};

pub const RULE_MODES: &str = "in the nftables mode affinity is one set per endpoint \
(`nft list table ip kproxy`, sets named affinity-...; `nft list set ip kproxy NAME` shows the \
clients and their expiry); in the iptables mode it is the recent match's lists \
(/proc/net/xt_recent/KPROXY-SEP-..., named after the endpoint chains in `iptables-save -t nat`)";

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AffinityEntry {
    /// "address" or "netns".
    pub client_kind: &'static str,
    /// The client's address, or `netns:<cookie>`.
    pub client: String,
    pub rev_nat_index: u16,
    /// The frontend (as `kproxy list services` shows it), if it still exists.
    pub frontend: Option<String>,
    pub backend_id: u32,
    /// The backend, if the id still names one of the frontend's backends.
    pub backend: Option<SocketAddrV4>,
    /// Seconds since the client last got this backend.
    pub age_seconds: f64,
    /// The frontend's affinity timeout; None when the frontend has no affinity (any more).
    pub timeout_seconds: Option<u32>,
    /// Whether the next new flow of this client would follow the entry.
    pub live: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Affinity {
    pub entries: Vec<AffinityEntry>,
}

fn client_label(k: &Lb4AffinityKey) -> (&'static str, String) {
    if k.client_kind == AFFINITY_CLIENT_NETNS {
        ("netns", format!("netns:{}", k.client_id))
    } else {
        ("address", addr(k.client_id as u32).to_string())
    }
}

/// The master entries by reverse-NAT index.
fn masters_by_index(snap: &LbSnapshot) -> BTreeMap<u16, (Lb4Key, Lb4Service)> {
    snap.masters()
        .into_iter()
        .map(|(k, v)| (v.rev_nat_index, (k, v)))
        .collect()
}

pub fn entry(
    k: &Lb4AffinityKey,
    v: &Lb4AffinityValue,
    snap: &LbSnapshot,
    masters: &BTreeMap<u16, (Lb4Key, Lb4Service)>,
    now: u64,
) -> AffinityEntry {
    let (client_kind, client) = client_label(k);
    let master = masters.get(&k.rev_nat_index);
    let timeout_seconds = master
        .filter(|(_, m)| m.flags & SVC_FLAG_AFFINITY != 0)
        .map(|(_, m)| m.backend_id);
    let backend = snap
        .backends
        .get(&v.backend_id)
        .filter(|b| b.rev_nat_index == k.rev_nat_index)
        .map(|b| SocketAddrV4::new(addr(b.address), port(b.port)));
    let age_ns = now.saturating_sub(v.last_used_ns);
    let live = backend.is_some()
        && timeout_seconds.is_some_and(|t| age_ns <= u64::from(t) * 1_000_000_000);
    AffinityEntry {
        client_kind,
        client,
        rev_nat_index: k.rev_nat_index,
        frontend: master.map(|(key, _)| frontend_label(key)),
        backend_id: v.backend_id,
        backend,
        age_seconds: age_ns as f64 / 1e9,
        timeout_seconds,
        live,
    }
}

/// Reads the affinity entries pinned under `root`, sorted by frontend and client.
pub fn list(root: &Path) -> anyhow::Result<Affinity> {
    if !root.join(names::LB4_AFFINITY).exists() {
        anyhow::bail!(
            "{} is not pinned under {} (is --bpf-root right, and has an eBPF-mode agent run with it?); {RULE_MODES}",
            names::LB4_AFFINITY,
            root.display()
        );
    }
    let snap = LbSnapshot::read(root)?;
    let raw = read_hash::<Lb4AffinityKey, Lb4AffinityValue>(root, names::LB4_AFFINITY)?;
    let masters = masters_by_index(&snap);
    let now = monotonic_ns();
    let mut entries: Vec<AffinityEntry> = raw
        .iter()
        .map(|(k, v)| entry(k, v, &snap, &masters, now))
        .collect();
    entries.sort_by(|a, b| {
        (a.rev_nat_index, &a.client_kind, &a.client).cmp(&(
            b.rev_nat_index,
            &b.client_kind,
            &b.client,
        ))
    });
    Ok(Affinity { entries })
}

fn state(e: &AffinityEntry) -> &'static str {
    if e.live {
        "live"
    } else if e.timeout_seconds.is_none() {
        "affinity off"
    } else if e.backend.is_none() {
        "backend gone"
    } else {
        "expired"
    }
}

pub fn render(a: &Affinity) -> String {
    if a.entries.is_empty() {
        return format!("no session-affinity entries (eBPF mode); {RULE_MODES}\n");
    }
    let mut t = Table::new(&["CLIENT", "FRONTEND", "BACKEND", "AGE", "TIMEOUT", "STATE"]);
    for e in &a.entries {
        t.row(vec![
            e.client.clone(),
            e.frontend
                .clone()
                .unwrap_or_else(|| format!("(gone, rev-NAT {})", e.rev_nat_index)),
            e.backend
                .map(|b| format!("{b} (id {})", e.backend_id))
                .unwrap_or_else(|| format!("(gone, id {})", e.backend_id)),
            format!("{:.1}s", e.age_seconds),
            e.timeout_seconds
                .map(|t| format!("{t}s"))
                .unwrap_or_else(|| "-".into()),
            state(e).into(),
        ]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use proxy_common::{
        affinity::AFFINITY_CLIENT_ADDR,
        lb::{Lb4Backend, SVC_FLAG_NODEPORT},
    };

    use super::*;

    fn snapshot() -> LbSnapshot {
        let mut snap = LbSnapshot::default();
        let key = Lb4Key::new(0, 30001u16.to_be(), 6, 0);
        snap.services.insert(
            key,
            Lb4Service {
                backend_id: 60,
                count: 1,
                rev_nat_index: 3,
                flags: SVC_FLAG_NODEPORT | SVC_FLAG_AFFINITY,
                _pad: 0,
            },
        );
        snap.backends.insert(
            9,
            Lb4Backend {
                address: u32::from_ne_bytes([10, 244, 1, 5]),
                port: 80u16.to_be(),
                proto: 6,
                flags: 0,
                rev_nat_index: 3,
                _pad: 0,
            },
        );
        snap
    }

    #[test]
    fn entries_say_client_frontend_backend_and_state() {
        let snap = snapshot();
        let masters = masters_by_index(&snap);
        let client = u64::from(u32::from_ne_bytes([198, 18, 0, 100]));
        let k = Lb4AffinityKey::new(client, 3, AFFINITY_CLIENT_ADDR);
        let now = 100_000_000_000;
        let fresh = Lb4AffinityValue {
            last_used_ns: now - 5_000_000_000,
            backend_id: 9,
            _pad: 0,
        };
        let e = entry(&k, &fresh, &snap, &masters, now);
        assert_eq!(e.client, "198.18.0.100");
        assert_eq!(e.frontend.as_deref(), Some("0.0.0.0:30001/TCP (nodePort)"));
        assert_eq!(e.backend, Some("10.244.1.5:80".parse().unwrap()));
        assert_eq!((e.timeout_seconds, e.live), (Some(60), true));
        let old = Lb4AffinityValue {
            last_used_ns: now - 61_000_000_000,
            ..fresh
        };
        assert_eq!(state(&entry(&k, &old, &snap, &masters, now)), "expired");
        let gone = Lb4AffinityValue {
            backend_id: 10,
            ..fresh
        };
        assert_eq!(
            state(&entry(&k, &gone, &snap, &masters, now)),
            "backend gone"
        );
        let netns = Lb4AffinityKey::new(4096, 3, AFFINITY_CLIENT_NETNS);
        let e = entry(&netns, &fresh, &snap, &masters, now);
        assert_eq!((e.client_kind, e.client.as_str()), ("netns", "netns:4096"));
        let text = render(&Affinity { entries: vec![e] });
        assert!(
            text.contains("netns:4096") && text.contains("live"),
            "{text}"
        );
    }
}
