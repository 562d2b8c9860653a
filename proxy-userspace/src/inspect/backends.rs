//! `kproxy list backends`: the backends map, with the frontend each backend belongs to.

use std::net::Ipv4Addr;

use proxy_common::lb::BACKEND_FLAG_LOCAL;
use serde::Serialize;

use super::{
    maps::{LbSnapshot, addr, frontend_label, port, proto_name},
    table::Table,
};

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendEntry {
    pub id: u32,
    pub address: Ipv4Addr,
    pub port: u16,
    pub protocol: String,
    /// `local` (the backend runs on this node) or `remote`.
    pub flags: Vec<&'static str>,
    pub rev_nat_index: u16,
    /// The frontend (`address:port/PROTO`) with that reverse-NAT index, if one exists.
    pub service: Option<String>,
    /// Whether a slot of that frontend points at this backend (else it is being added or
    /// removed, or left over).
    pub in_use: bool,
}

pub fn list(snap: &LbSnapshot) -> Vec<BackendEntry> {
    snap.backends
        .iter()
        .map(|(id, b)| {
            let master = snap.master_by_rev_nat(b.rev_nat_index);
            let in_use = master.is_some_and(|k| {
                snap.services.iter().any(|(sk, sv)| {
                    sk.backend_slot != 0
                        && sv.backend_id == *id
                        && sk.address == k.address
                        && sk.dport == k.dport
                        && sk.proto == k.proto
                })
            });
            BackendEntry {
                id: *id,
                address: addr(b.address),
                port: port(b.port),
                protocol: proto_name(b.proto),
                flags: vec![if b.flags & BACKEND_FLAG_LOCAL != 0 {
                    "local"
                } else {
                    "remote"
                }],
                rev_nat_index: b.rev_nat_index,
                service: master.map(|k| frontend_label(&k)),
                in_use,
            }
        })
        .collect()
}

pub fn render(entries: &[BackendEntry]) -> String {
    if entries.is_empty() {
        return "no backends are programmed\n".into();
    }
    let mut t = Table::new(&["ID", "BACKEND", "FLAGS", "SERVICE (REV-NAT)"]);
    for e in entries {
        let mut service = match &e.service {
            Some(s) => format!("{s} ({})", e.rev_nat_index),
            None => format!("none (rev-NAT {} has no frontend)", e.rev_nat_index),
        };
        if e.service.is_some() && !e.in_use {
            service.push_str(" [no slot]");
        }
        t.row(vec![
            e.id.to_string(),
            format!("{}:{}/{}", e.address, e.port, e.protocol),
            e.flags.join(","),
            service,
        ]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inspect::services::tests::seed_snapshot;

    #[test]
    fn lists_backends_with_their_frontend() {
        let snap = seed_snapshot();
        let l = list(&snap);
        assert_eq!(l.len(), 4);
        assert_eq!(l[0].service.as_deref(), Some("10.96.100.208:8080/TCP"));
        assert_eq!(
            l[2].service.as_deref(),
            Some("0.0.0.0:30001/TCP (nodePort)")
        );
        assert!(l.iter().all(|b| b.in_use));
        let out = render(&l);
        let first = out.lines().nth(1).unwrap();
        assert_eq!(
            first,
            "1   10.244.1.10:80/TCP  local  10.96.100.208:8080/TCP (1)"
        );
    }
}
