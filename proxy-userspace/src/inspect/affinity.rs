//! `kproxy list affinity`: session affinity (`sessionAffinity: ClientIP`) is not implemented
//! yet, so there is no affinity map to list. Said plainly, not as an error.

use serde::Serialize;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Affinity {
    pub supported: bool,
    pub entries: Vec<()>,
    pub note: &'static str,
}

pub const NOTE: &str = "session affinity (sessionAffinity: ClientIP) is not implemented yet: \
kproxy has no affinity map, and every new flow or connect() picks a backend at random";

pub fn list() -> Affinity {
    Affinity {
        supported: false,
        entries: Vec::new(),
        note: NOTE,
    }
}

pub fn render(a: &Affinity) -> String {
    format!("no affinity entries: {}\n", a.note)
}
