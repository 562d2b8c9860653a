//! Paged lists (`limit` / `continue`), as kube-rs's watcher asks for them (500 objects a
//! page): the first page takes a snapshot of the whole list, the following pages are cut
//! from that snapshot, so a list stays consistent at its resourceVersion while objects
//! change (what the real API server does by reading etcd at the list's revision). A
//! snapshot is dropped after its last page, or when too many lists are open; a `continue`
//! token whose snapshot is gone gets 410 Expired, as a real server's expired token does.

use std::{collections::VecDeque, sync::Arc};

use serde_json::Value;

/// Open paged lists kept at most (the oldest is dropped first).
const MAX_OPEN_LISTS: usize = 16;

/// One page of a list.
pub struct Page {
    pub resource_version: u64,
    pub items: Vec<Value>,
    /// Set when more pages follow.
    pub continue_token: Option<String>,
}

/// The `continue` token names no open list.
pub struct ExpiredToken;

#[derive(Default)]
pub struct ListPages {
    next_id: u64,
    open: VecDeque<(u64, u64, Arc<Vec<Value>>)>,
}

impl ListPages {
    /// The first page of `items` (all of them without a `limit`).
    pub fn first(
        &mut self,
        resource_version: u64,
        items: Vec<Value>,
        limit: Option<usize>,
    ) -> Page {
        match limit {
            Some(limit) if items.len() > limit => {
                self.next_id += 1;
                let id = self.next_id;
                let items = Arc::new(items);
                let page = self.cut(id, resource_version, &items, 0, limit);
                if self.open.len() >= MAX_OPEN_LISTS {
                    self.open.pop_front();
                }
                self.open.push_back((id, resource_version, items));
                page
            }
            _ => Page {
                resource_version,
                items,
                continue_token: None,
            },
        }
    }

    /// The page a `continue` token points at.
    pub fn next(&mut self, token: &str, limit: Option<usize>) -> Result<Page, ExpiredToken> {
        let (id, offset) = token
            .split_once(':')
            .and_then(|(id, off)| Some((id.parse::<u64>().ok()?, off.parse::<usize>().ok()?)))
            .ok_or(ExpiredToken)?;
        let at = self
            .open
            .iter()
            .position(|(i, ..)| *i == id)
            .ok_or(ExpiredToken)?;
        let (_, rv, items) = &self.open[at];
        let (rv, items) = (*rv, items.clone());
        let page = self.cut(id, rv, &items, offset, limit.unwrap_or(usize::MAX));
        if page.continue_token.is_none() {
            self.open.remove(at);
        }
        Ok(page)
    }

    fn cut(&self, id: u64, rv: u64, items: &[Value], offset: usize, limit: usize) -> Page {
        let end = offset.saturating_add(limit).min(items.len());
        let start = offset.min(end);
        Page {
            resource_version: rv,
            items: items[start..end].to_vec(),
            continue_token: (end < items.len()).then(|| format!("{id}:{end}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn pages_cover_the_snapshot_once_and_then_expire() {
        let mut pages = ListPages::default();
        let items: Vec<Value> = (0..5).map(|i| json!(i)).collect();
        let p1 = pages.first(7, items, Some(2));
        assert_eq!(p1.items, [json!(0), json!(1)]);
        let t1 = p1.continue_token.expect("more pages");
        let p2 = pages.next(&t1, Some(2)).ok().expect("open");
        assert_eq!((p2.resource_version, p2.items.len()), (7, 2));
        let p3 = pages
            .next(&p2.continue_token.unwrap(), Some(2))
            .ok()
            .expect("open");
        assert_eq!(p3.items, [json!(4)]);
        assert!(p3.continue_token.is_none());
        assert!(pages.next(&t1, Some(2)).is_err(), "the list is closed");
        let all = pages.first(8, vec![json!(1)], Some(2));
        assert!(all.continue_token.is_none());
    }
}
