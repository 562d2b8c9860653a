//! The object store behind the test API server: objects by resource/namespace/name, one
//! global resourceVersion counter, and a bounded event history that watches resume from.

use std::collections::{BTreeMap, VecDeque};

use serde_json::{Value, json};

/// The resources the server serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    Services,
    EndpointSlices,
    Nodes,
}

impl Resource {
    pub const ALL: [Resource; 3] = [
        Resource::Services,
        Resource::EndpointSlices,
        Resource::Nodes,
    ];

    pub fn kind(self) -> &'static str {
        match self {
            Resource::Services => "Service",
            Resource::EndpointSlices => "EndpointSlice",
            Resource::Nodes => "Node",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Resource::Services | Resource::Nodes => "v1",
            Resource::EndpointSlices => "discovery.k8s.io/v1",
        }
    }

    pub fn namespaced(self) -> bool {
        !matches!(self, Resource::Nodes)
    }

    /// The plural name in URLs.
    pub fn plural(self) -> &'static str {
        match self {
            Resource::Services => "services",
            Resource::EndpointSlices => "endpointslices",
            Resource::Nodes => "nodes",
        }
    }

    pub fn from_kind(kind: &str) -> Option<Resource> {
        Resource::ALL.into_iter().find(|r| r.kind() == kind)
    }

    /// From the URL's group/version prefix and plural.
    pub fn from_url(group_version: &str, plural: &str) -> Option<Resource> {
        Resource::ALL
            .into_iter()
            .find(|r| r.api_version() == group_version && r.plural() == plural)
    }
}

/// Identity of a stored object (namespace empty for Nodes).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub resource: Resource,
    pub namespace: String,
    pub name: String,
}

/// `ADDED`, `MODIFIED` or `DELETED`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, as watches replay it.
#[derive(Clone, Debug)]
pub struct Change {
    pub rv: u64,
    pub key: Key,
    pub event: EventType,
    pub object: Value,
}

/// Why a watch cannot resume.
#[derive(Debug, PartialEq, Eq)]
pub struct Expired {
    pub requested: u64,
    pub oldest: u64,
}

#[derive(Debug)]
pub struct Store {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Change>,
    max_history: usize,
    /// Watches must start at a resourceVersion >= this (older ones get 410 Gone).
    oldest_valid: u64,
    next_uid: u64,
}

impl Store {
    pub fn new(max_history: usize) -> Self {
        Self {
            // Start above 0: "0" means "any" in the protocol.
            rv: 100,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            max_history: max_history.max(1),
            oldest_valid: 100,
            next_uid: 1,
        }
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn oldest_valid(&self) -> u64 {
        self.oldest_valid
    }

    /// Creates or replaces an object (`kind`, `apiVersion`, `metadata.name` required;
    /// `metadata.namespace` defaults to `default` for namespaced kinds). Returns the new
    /// resourceVersion. An object identical to the stored one (ignoring server-set metadata)
    /// is still a change, as with a real server's update.
    pub fn apply(&mut self, mut object: Value) -> Result<u64, String> {
        let kind = object
            .get("kind")
            .and_then(Value::as_str)
            .ok_or("object without kind")?
            .to_owned();
        let resource = Resource::from_kind(&kind).ok_or_else(|| format!("unknown kind {kind}"))?;
        if object.get("apiVersion").and_then(Value::as_str) != Some(resource.api_version()) {
            return Err(format!(
                "{kind}: apiVersion must be {}",
                resource.api_version()
            ));
        }
        let meta = object
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .ok_or_else(|| format!("{kind} without metadata"))?;
        let name = meta
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| format!("{kind} without metadata.name"))?
            .to_owned();
        let namespace = if resource.namespaced() {
            let ns = meta
                .get("namespace")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .unwrap_or("default")
                .to_owned();
            meta.insert("namespace".into(), json!(ns));
            ns
        } else {
            meta.remove("namespace");
            String::new()
        };
        let key = Key {
            resource,
            namespace,
            name,
        };
        let uid = match self
            .objects
            .get(&key)
            .and_then(|o| o.pointer("/metadata/uid"))
        {
            Some(uid) => uid.clone(),
            None => {
                self.next_uid += 1;
                json!(format!("00000000-0000-4000-8000-{:012x}", self.next_uid))
            }
        };
        self.rv += 1;
        meta.insert("uid".into(), uid);
        meta.insert("resourceVersion".into(), json!(self.rv.to_string()));
        let event = if self.objects.contains_key(&key) {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.objects.insert(key.clone(), object.clone());
        self.record(Change {
            rv: self.rv,
            key,
            event,
            object,
        });
        Ok(self.rv)
    }

    /// Deletes an object; returns the resourceVersion of the deletion, or None if absent.
    pub fn delete(&mut self, key: &Key) -> Option<u64> {
        let mut object = self.objects.remove(key)?;
        self.rv += 1;
        if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), json!(self.rv.to_string()));
        }
        self.record(Change {
            rv: self.rv,
            key: key.clone(),
            event: EventType::Deleted,
            object,
        });
        Some(self.rv)
    }

    fn record(&mut self, change: Change) {
        self.history.push_back(change);
        while self.history.len() > self.max_history {
            if let Some(old) = self.history.pop_front() {
                // A watch from old.rv still has everything after it; one from before does not.
                self.oldest_valid = old.rv;
            }
        }
    }

    /// Forgets the whole history: a watch resuming from any resourceVersion up to the
    /// current one gets 410 Gone (as after an etcd compaction the watch cache cannot serve).
    pub fn compact(&mut self) {
        self.history.clear();
        self.oldest_valid = self.rv + 1;
    }

    pub fn get(&self, key: &Key) -> Option<&Value> {
        self.objects.get(key)
    }

    /// Current objects of `resource` (in `namespace` if given) matching `filter`.
    pub fn list(
        &self,
        resource: Resource,
        namespace: Option<&str>,
        filter: &dyn Fn(&Value) -> bool,
    ) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|(k, _)| k.resource == resource)
            .filter(|(k, _)| namespace.is_none_or(|ns| k.namespace == ns))
            .filter(|(_, o)| filter(o))
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// The changes after `rv` (all resources), or `Expired` if the history no longer
    /// reaches back to it.
    pub fn changes_since(&self, rv: u64) -> Result<Vec<Change>, Expired> {
        if rv < self.oldest_valid {
            return Err(Expired {
                requested: rv,
                oldest: self.oldest_valid,
            });
        }
        Ok(self.history.iter().filter(|c| c.rv > rv).cloned().collect())
    }
}

/// `labelSelector`: comma-separated `k=v`, `k==v`, `k!=v`, `k`, `!k`. Set-based terms
/// (`k in (a,b)`) are not supported and match everything.
pub fn label_selector_matches(selector: &str, object: &Value) -> bool {
    let labels = object.pointer("/metadata/labels");
    let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
    split_terms(selector).into_iter().all(|term| {
        let term = term.trim();
        if term.is_empty() || term.contains(" in ") || term.contains(" notin ") {
            true
        } else if let Some((k, v)) = term.split_once("!=") {
            label(k.trim()) != Some(v.trim())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            label(k.trim()) == Some(v.trim())
        } else if let Some(k) = term.strip_prefix('!') {
            label(k.trim()).is_none()
        } else {
            label(term).is_some()
        }
    })
}

/// `fieldSelector`: comma-separated `path=v`, `path==v`, `path!=v` on `metadata.name` and
/// `metadata.namespace` (other fields: looked up by their dotted path).
pub fn field_selector_matches(selector: &str, object: &Value) -> bool {
    split_terms(selector).into_iter().all(|term| {
        let term = term.trim();
        if term.is_empty() {
            return true;
        }
        let (path, want, negate) = if let Some((p, v)) = term.split_once("!=") {
            (p, v, true)
        } else if let Some((p, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            (p, v, false)
        } else {
            return true;
        };
        let pointer = format!("/{}", path.trim().replace('.', "/"));
        let have = object
            .pointer(&pointer)
            .and_then(Value::as_str)
            .unwrap_or("");
        (have == want.trim()) != negate
    })
}

/// Splits on commas outside parentheses.
fn split_terms(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": {"app": name}}, "spec": {}})
    }

    #[test]
    fn versions_history_and_expiry() {
        let mut s = Store::new(3);
        let rv0 = s.resource_version();
        let a = s.apply(svc("a")).unwrap();
        let b = s.apply(svc("b")).unwrap();
        assert!(a > rv0 && b > a);
        assert_eq!(s.changes_since(rv0).unwrap().len(), 2);
        assert_eq!(s.changes_since(a).unwrap()[0].event, EventType::Added);
        s.apply(svc("a")).unwrap();
        let key = Key {
            resource: Resource::Services,
            namespace: "default".into(),
            name: "a".into(),
        };
        let d = s.delete(&key).unwrap();
        // History of 3: the first change fell out; a watch from before it is expired.
        assert!(s.changes_since(rv0).is_err());
        let ch = s.changes_since(a).unwrap();
        assert_eq!(ch.len(), 3);
        assert_eq!(ch[1].event, EventType::Modified);
        assert_eq!(ch[2].event, EventType::Deleted);
        assert_eq!(
            ch[2].object.pointer("/metadata/resourceVersion"),
            Some(&json!(d.to_string()))
        );
        assert!(s.delete(&key).is_none());
        s.compact();
        assert!(s.changes_since(d).is_err());
        let e = s.apply(svc("c")).unwrap();
        assert_eq!(s.changes_since(e).unwrap().len(), 0);
        assert_eq!(s.list(Resource::Services, None, &|_| true).len(), 2);
    }

    #[test]
    fn selectors() {
        let o = json!({"metadata": {"name": "node1", "labels": {"a": "1", "b": "2"}}});
        assert!(field_selector_matches("metadata.name=node1", &o));
        assert!(!field_selector_matches("metadata.name=node2", &o));
        assert!(field_selector_matches("metadata.name!=node2", &o));
        assert!(label_selector_matches("a=1,b", &o));
        assert!(!label_selector_matches("a=1,!b", &o));
        assert!(label_selector_matches("c!=x,a==1", &o));
        assert!(label_selector_matches("a in (1,2)", &o));
    }
}
