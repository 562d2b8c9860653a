//! `--manifests PATH`: a YAML file, or a directory of `*.yaml`/`*.yml` files, holding v1
//! Services, discovery.k8s.io/v1 EndpointSlices and v1 Nodes (multi-document, `---`; a v1
//! `List` is unpacked). Bad input never stops the rest: each malformed document or invalid
//! object is reported once per read of its file, naming the file, document and object, and
//! everything else is used.

use std::{
    collections::{BTreeMap, btree_map::Entry},
    fmt, fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use serde::de::DeserializeOwned;
use serde_yaml::Value;
use tracing::{debug, warn};

use super::{K8sObject, ObjectKey};
use crate::model::{
    DEFAULT_NAMESPACE, NamespacedName,
    endpoints::{SliceConversion, convert_slice},
    service::{ServiceConversion, convert_service, nodeport_conflicts},
};

/// How often `ManifestWatcher::changed` looks at the files.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Where an object was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    /// 1-based index among the file's non-empty documents.
    pub document: usize,
    /// 1-based line the document starts on.
    pub line: usize,
    /// Index in a `List`'s `items`.
    pub item: Option<usize>,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: document {} (line {})",
            self.file.display(),
            self.document,
            self.line
        )?;
        if let Some(i) = self.item {
            write!(f, " items[{i}]")?;
        }
        Ok(())
    }
}

/// Severity of a diagnostic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Warn,
    Debug,
}

/// A problem (or, at debug level, a note) found while reading manifests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub level: Level,
    pub message: String,
}

impl Diagnostic {
    fn warn(message: String) -> Self {
        Self {
            level: Level::Warn,
            message,
        }
    }

    fn debug(message: String) -> Self {
        Self {
            level: Level::Debug,
            message,
        }
    }

    fn emit(&self) {
        match self.level {
            Level::Warn => warn!("manifests: {}", self.message),
            Level::Debug => debug!("manifests: {}", self.message),
        }
    }
}

/// An object read from a manifest, with where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Parsed {
    pub object: K8sObject,
    pub origin: Origin,
}

/// Parses one manifest file's text. Returns the usable objects and the problems found.
pub fn parse_manifest(file: &Path, text: &str) -> (Vec<Parsed>, Vec<Diagnostic>) {
    let mut out = Vec::new();
    let mut diags = Vec::new();
    for (index, (line, doc)) in split_documents(text).into_iter().enumerate() {
        let origin = Origin {
            file: file.to_path_buf(),
            document: index + 1,
            line,
            item: None,
        };
        // Padded so the parser's line numbers are the file's.
        let padded = format!("{}{doc}", "\n".repeat(line.saturating_sub(1)));
        match serde_yaml::from_str::<Value>(&padded) {
            Ok(value) => handle_value(value, Some(&padded), &origin, &mut out, &mut diags),
            Err(e) => diags.push(Diagnostic::warn(format!("{origin}: malformed YAML: {e}"))),
        }
    }
    (out, diags)
}

/// Splits a YAML stream at `---` (and after `...`) lines, returning each document with content
/// and the line it starts on.
fn split_documents(text: &str) -> Vec<(usize, String)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut start = 1;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let marker = line
            .strip_prefix("---")
            .filter(|rest| rest.is_empty() || rest.starts_with([' ', '\t']));
        if let Some(rest) = marker {
            docs.push((start, std::mem::take(&mut current)));
            start = n;
            current.push_str(rest);
            current.push('\n');
        } else if line.trim_end() == "..." {
            docs.push((start, std::mem::take(&mut current)));
            start = n + 1;
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    docs.push((start, current));
    docs.retain(|(_, d)| {
        d.lines().any(|l| {
            let t = l.trim();
            !t.is_empty() && !t.starts_with('#')
        })
    });
    docs
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut v = value;
    for key in path {
        v = v.get(key)?;
    }
    v.as_str()
}

/// `kind namespace/name` (or `kind name`) of an untyped object, for messages.
fn describe(kind: &str, value: &Value, namespaced: bool) -> String {
    let name = str_at(value, &["metadata", "name"]).unwrap_or("<no name>");
    if namespaced {
        let ns = str_at(value, &["metadata", "namespace"])
            .filter(|s| !s.is_empty())
            .unwrap_or(DEFAULT_NAMESPACE);
        format!("{kind} {ns}/{name}")
    } else {
        format!("{kind} {name}")
    }
}

fn typed<T: DeserializeOwned>(value: Value, text: Option<&str>) -> Result<T, String> {
    match text {
        Some(t) => serde_yaml::from_str(t).map_err(|e| e.to_string()),
        None => serde_yaml::from_value(value).map_err(|e| e.to_string()),
    }
}

fn handle_value(
    value: Value,
    text: Option<&str>,
    origin: &Origin,
    out: &mut Vec<Parsed>,
    diags: &mut Vec<Diagnostic>,
) {
    if value.is_null() {
        return;
    }
    if !value.is_mapping() {
        diags.push(Diagnostic::warn(format!(
            "{origin}: not a Kubernetes object (expected a mapping with apiVersion and kind)"
        )));
        return;
    }
    let api_version = value.get("apiVersion").and_then(Value::as_str);
    let kind = value.get("kind").and_then(Value::as_str);
    let (api_version, kind) = match (api_version, kind) {
        (Some(a), Some(k)) if !a.is_empty() && !k.is_empty() => (a, k),
        (a, _) => {
            let missing = if a.is_none_or(str::is_empty) {
                "apiVersion"
            } else {
                "kind"
            };
            diags.push(Diagnostic::warn(format!(
                "{origin}: {}: has no {missing}; skipped",
                describe(kind.unwrap_or("object"), &value, true)
            )));
            return;
        }
    };
    match (api_version, kind) {
        ("v1", "List") => {
            let items = value
                .get("items")
                .and_then(Value::as_sequence)
                .cloned()
                .unwrap_or_default();
            for (i, item) in items.into_iter().enumerate() {
                let origin = Origin {
                    item: Some(i),
                    ..origin.clone()
                };
                handle_value(item, None, &origin, out, diags);
            }
        }
        ("v1", "Service") => {
            let what = describe(kind, &value, true);
            match typed::<Service>(value, text) {
                Ok(svc) => push_service(svc, &what, origin, out, diags),
                Err(e) => diags.push(Diagnostic::warn(format!("{origin}: {what}: {e}; skipped"))),
            }
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            let what = describe(kind, &value, true);
            match typed::<EndpointSlice>(value, text) {
                Ok(slice) => push_slice(slice, &what, origin, out, diags),
                Err(e) => diags.push(Diagnostic::warn(format!("{origin}: {what}: {e}; skipped"))),
            }
        }
        ("v1", "Node") => {
            let what = describe(kind, &value, false);
            match typed::<Node>(value, text) {
                Ok(node) if node.metadata.name.as_deref().is_some_and(|n| !n.is_empty()) => {
                    out.push(Parsed {
                        object: K8sObject::Node(Box::new(node)),
                        origin: origin.clone(),
                    });
                }
                Ok(_) => diags.push(Diagnostic::warn(format!(
                    "{origin}: {what}: has no metadata.name; skipped"
                ))),
                Err(e) => diags.push(Diagnostic::warn(format!("{origin}: {what}: {e}; skipped"))),
            }
        }
        (_, "Service" | "EndpointSlice" | "Node") => {
            let expected = if kind == "EndpointSlice" {
                "discovery.k8s.io/v1"
            } else {
                "v1"
            };
            diags.push(Diagnostic::warn(format!(
                "{origin}: {}: apiVersion {api_version} is not supported (expected {expected}); skipped",
                describe(kind, &value, kind != "Node")
            )));
        }
        _ => diags.push(Diagnostic::debug(format!(
            "{origin}: {} ({api_version}) is not used by kproxy; ignored",
            describe(kind, &value, true)
        ))),
    }
}

fn default_namespace(ns: &mut Option<String>) {
    if ns.as_deref().is_none_or(str::is_empty) {
        *ns = Some(DEFAULT_NAMESPACE.to_owned());
    }
}

fn push_service(
    mut svc: Service,
    what: &str,
    origin: &Origin,
    out: &mut Vec<Parsed>,
    diags: &mut Vec<Diagnostic>,
) {
    default_namespace(&mut svc.metadata.namespace);
    match convert_service(&svc) {
        ServiceConversion::Invalid(why) => {
            diags.push(Diagnostic::warn(format!(
                "{origin}: {what}: {why}; skipped"
            )));
            return;
        }
        ServiceConversion::Ignored(why) => {
            diags.push(Diagnostic::debug(format!(
                "{origin}: {what}: ignored: {why}"
            )));
        }
        ServiceConversion::Serve(_) => {}
    }
    out.push(Parsed {
        object: K8sObject::Service(Box::new(svc)),
        origin: origin.clone(),
    });
}

fn push_slice(
    mut slice: EndpointSlice,
    what: &str,
    origin: &Origin,
    out: &mut Vec<Parsed>,
    diags: &mut Vec<Diagnostic>,
) {
    default_namespace(&mut slice.metadata.namespace);
    match convert_slice(&slice) {
        SliceConversion::Invalid(why) => {
            diags.push(Diagnostic::warn(format!(
                "{origin}: {what}: {why}; skipped"
            )));
            return;
        }
        SliceConversion::Ignored(why) => {
            diags.push(Diagnostic::debug(format!(
                "{origin}: {what}: ignored: {why}"
            )));
        }
        SliceConversion::Serve(_) => {}
    }
    out.push(Parsed {
        object: K8sObject::EndpointSlice(Box::new(slice)),
        origin: origin.clone(),
    });
}

/// Checks across files: an object defined twice (the first by file and document order wins)
/// and Services whose nodePort another Service already uses (the later by namespace/name
/// loses, as the API server would have refused it). Returns the objects, sorted by key.
pub fn assemble<'a>(
    parsed: impl IntoIterator<Item = &'a Parsed>,
) -> (Vec<K8sObject>, Vec<Diagnostic>) {
    let mut diags = Vec::new();
    let mut by_key: BTreeMap<ObjectKey, &Parsed> = BTreeMap::new();
    for p in parsed {
        match by_key.entry(p.object.key()) {
            Entry::Vacant(e) => {
                e.insert(p);
            }
            Entry::Occupied(e) => diags.push(Diagnostic::warn(format!(
                "{}: {}: already defined in {}; this one is ignored",
                p.origin,
                e.key(),
                e.get().origin
            ))),
        }
    }
    let services: Vec<(ObjectKey, NamespacedName, _)> = by_key
        .iter()
        .filter_map(|(key, p)| match &p.object {
            K8sObject::Service(svc) => match convert_service(svc) {
                ServiceConversion::Serve(ports) => Some((
                    key.clone(),
                    NamespacedName::new(&key.namespace, &key.name),
                    ports,
                )),
                _ => None,
            },
            _ => None,
        })
        .collect();
    let losers = nodeport_conflicts(services.iter().map(|(_, n, p)| (n, p)));
    for (key, name, _) in &services {
        if let Some(why) = losers.get(name) {
            if let Some(p) = by_key.remove(key) {
                diags.push(Diagnostic::warn(format!(
                    "{}: {key}: {why}; skipped",
                    p.origin
                )));
            }
        }
    }
    (
        by_key.into_values().map(|p| p.object.clone()).collect(),
        diags,
    )
}

/// What identifies a file's version: a replaced file (rename) has a new inode, an edited one
/// a new mtime or size.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileStamp {
    path: PathBuf,
    mtime: Option<SystemTime>,
    size: u64,
    dev: u64,
    inode: u64,
}

impl FileStamp {
    fn of(path: PathBuf, meta: &fs::Metadata) -> Self {
        Self {
            path,
            mtime: meta.modified().ok(),
            size: meta.len(),
            dev: meta.dev(),
            inode: meta.ino(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Fingerprint {
    Unreadable(String),
    Files(Vec<FileStamp>),
}

fn is_manifest_name(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml"))
}

/// Stats the manifest file set (symlinks followed, so ConfigMap volume updates count).
fn scan(path: &Path) -> Fingerprint {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) => return Fingerprint::Unreadable(e.to_string()),
    };
    if !meta.is_dir() {
        return Fingerprint::Files(vec![FileStamp::of(path.to_path_buf(), &meta)]);
    }
    let entries = match fs::read_dir(path) {
        Ok(e) => e,
        Err(e) => return Fingerprint::Unreadable(e.to_string()),
    };
    let mut stamps: Vec<FileStamp> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| is_manifest_name(p))
        .filter_map(|p| {
            let meta = fs::metadata(&p).ok().filter(fs::Metadata::is_file)?;
            Some(FileStamp::of(p, &meta))
        })
        .collect();
    stamps.sort_by(|a, b| a.path.cmp(&b.path));
    Fingerprint::Files(stamps)
}

/// Watches `--manifests PATH` by polling: re-reads when a file's (path, mtime, size, inode)
/// changes, or a file appears or goes away, and returns the full set of objects. Only changed
/// files are parsed again, so an unchanged bad file is not reported on every read.
#[derive(Debug)]
pub struct ManifestWatcher {
    path: PathBuf,
    interval: Duration,
    state: Option<Fingerprint>,
    cache: BTreeMap<PathBuf, (FileStamp, Vec<Parsed>)>,
}

impl ManifestWatcher {
    /// A watcher for a path that may not exist yet (then it serves no objects).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            interval: DEFAULT_POLL_INTERVAL,
            state: None,
            cache: BTreeMap::new(),
        }
    }

    /// A watcher for a path that must exist now (for the agent's startup check).
    pub fn open(path: impl Into<PathBuf>) -> std::io::Result<Self> {
        let path = path.into();
        fs::metadata(&path)?;
        Ok(Self::new(path))
    }

    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the manifests if they changed since the last call (the first call always reads):
    /// `Some(full set)` then, `None` when nothing changed. Problems are logged.
    pub fn poll(&mut self) -> Option<Vec<K8sObject>> {
        let (objects, diags) = self.poll_with_diagnostics()?;
        for d in &diags {
            d.emit();
        }
        Some(objects)
    }

    /// `poll`, returning the problems instead of logging them.
    pub fn poll_with_diagnostics(&mut self) -> Option<(Vec<K8sObject>, Vec<Diagnostic>)> {
        let fingerprint = scan(&self.path);
        if self.state.as_ref() == Some(&fingerprint) {
            return None;
        }
        let mut diags = Vec::new();
        match &fingerprint {
            Fingerprint::Unreadable(e) => {
                diags.push(Diagnostic::warn(format!(
                    "{}: cannot be read: {e}; serving no objects from it",
                    self.path.display()
                )));
                self.cache.clear();
            }
            Fingerprint::Files(stamps) => {
                let mut cache = BTreeMap::new();
                for stamp in stamps {
                    let entry = match self.cache.remove(&stamp.path) {
                        Some(cached) if cached.0 == *stamp => cached,
                        _ => {
                            let parsed = match fs::read_to_string(&stamp.path) {
                                Ok(text) => {
                                    let (parsed, d) = parse_manifest(&stamp.path, &text);
                                    diags.extend(d);
                                    parsed
                                }
                                Err(e) => {
                                    diags.push(Diagnostic::warn(format!(
                                        "{}: cannot be read: {e}",
                                        stamp.path.display()
                                    )));
                                    Vec::new()
                                }
                            };
                            (stamp.clone(), parsed)
                        }
                    };
                    cache.insert(stamp.path.clone(), entry);
                }
                self.cache = cache;
            }
        }
        self.state = Some(fingerprint);
        let (objects, d) = assemble(self.cache.values().flat_map(|(_, parsed)| parsed));
        diags.extend(d);
        Some((objects, diags))
    }

    /// Waits (polling every interval) until the manifests change, and returns the full set.
    /// The first call returns at once.
    pub async fn changed(&mut self) -> Vec<K8sObject> {
        loop {
            if let Some(objects) = self.poll() {
                return objects;
            }
            tokio::time::sleep(self.interval).await;
        }
    }
}

/// Reads the manifests once (problems logged).
pub fn load_manifests(path: &Path) -> Vec<K8sObject> {
    ManifestWatcher::new(path).poll().unwrap_or_default()
}
