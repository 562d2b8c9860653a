//! Where the Kubernetes objects come from: manifest files now (`--manifests`), the API server
//! through kube-rs watchers later. A source only parses and reports bad input; the model
//! gives the objects their meaning.

pub mod kube;
pub mod manifests;

use std::{
    fmt,
    hash::{Hash, Hasher},
};

use k8s_openapi::{
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

pub use self::manifests::{Diagnostic, Level, ManifestWatcher, Origin, Parsed, parse_manifest};
use crate::model::NamespacedName;

/// The kinds of object kproxy reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    Service,
    EndpointSlice,
    Node,
}

impl ObjectKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Service => "Service",
            ObjectKind::EndpointSlice => "EndpointSlice",
            ObjectKind::Node => "Node",
        }
    }
}

/// Identity of an object: kind, namespace (empty for Nodes) and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub kind: ObjectKind,
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    /// An object standing for the deleted object of this key: its name and namespace only,
    /// which is all the model reads of a deleted object.
    pub fn tombstone(&self) -> K8sObject {
        let meta = ObjectMeta {
            name: Some(self.name.clone()),
            namespace: (!self.namespace.is_empty()).then(|| self.namespace.clone()),
            ..ObjectMeta::default()
        };
        match self.kind {
            ObjectKind::Service => K8sObject::Service(Box::new(Service {
                metadata: meta,
                ..Service::default()
            })),
            ObjectKind::EndpointSlice => K8sObject::EndpointSlice(Box::new(EndpointSlice {
                metadata: meta,
                ..EndpointSlice::default()
            })),
            ObjectKind::Node => K8sObject::Node(Box::new(Node {
                metadata: meta,
                ..Node::default()
            })),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind.as_str(), self.name)
        } else {
            write!(f, "{} {}/{}", self.kind.as_str(), self.namespace, self.name)
        }
    }
}

/// One object a source delivers.
#[derive(Clone, Debug, PartialEq)]
pub enum K8sObject {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    Node(Box<Node>),
}

impl K8sObject {
    /// A digest of the whole object, to tell a changed object from an unchanged one without
    /// keeping a copy.
    pub fn digest(&self) -> u64 {
        let json = match self {
            K8sObject::Service(o) => serde_json::to_vec(o),
            K8sObject::EndpointSlice(o) => serde_json::to_vec(o),
            K8sObject::Node(o) => serde_json::to_vec(o),
        };
        let mut h = std::collections::hash_map::DefaultHasher::new();
        // Serializing these plain data types does not fail; if it did, the object would
        // count as changed every time, which is safe.
        json.unwrap_or_default().hash(&mut h);
        h.finish()
    }

    pub fn kind(&self) -> ObjectKind {
        match self {
            K8sObject::Service(_) => ObjectKind::Service,
            K8sObject::EndpointSlice(_) => ObjectKind::EndpointSlice,
            K8sObject::Node(_) => ObjectKind::Node,
        }
    }

    /// Kind/namespace/name; namespaced objects without a namespace are in `default`.
    pub fn key(&self) -> ObjectKey {
        let (kind, namespace, name) = match self {
            K8sObject::Service(s) => {
                let n = NamespacedName::of(&s.metadata);
                (ObjectKind::Service, n.namespace, n.name)
            }
            K8sObject::EndpointSlice(s) => {
                let n = NamespacedName::of(&s.metadata);
                (ObjectKind::EndpointSlice, n.namespace, n.name)
            }
            K8sObject::Node(n) => (
                ObjectKind::Node,
                String::new(),
                n.metadata.name.clone().unwrap_or_default(),
            ),
        };
        ObjectKey {
            kind,
            namespace,
            name,
        }
    }
}
