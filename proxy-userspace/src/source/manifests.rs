//! `--manifests PATH`: a YAML file, or a directory of `*.yaml`/`*.yml` files, holding v1
//! Services, discovery.k8s.io/v1 EndpointSlices and v1 Nodes (multi-document, `---`; a v1
//! `List` is unpacked). Bad input never stops the rest: each malformed document or invalid
//! object is reported once per read of its file, naming the file, document and object, and
//! everything else is used.

use std::{
    collections::{BTreeMap, BTreeSet, btree_map::Entry},
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

use super::{K8sObject, ObjectKey, ObjectKind};
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
    /// 1-based line the document starts on (its `---` line, if any).
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

/// What a rejected document held, so that the watcher can keep serving the last good
/// version of it instead of dropping what is programmed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Unusable {
    /// This object (a Service, EndpointSlice or Node that failed validation).
    Object(ObjectKey),
    /// Unknown: the document is not even YAML, so any object of its file may be affected.
    Document,
}

/// A problem (or, at debug level, a note) found while reading manifests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub level: Level,
    pub message: String,
    /// Set when a document that may hold a served object was rejected.
    pub unusable: Option<Unusable>,
}

impl Diagnostic {
    fn warn(message: String) -> Self {
        Self {
            level: Level::Warn,
            message,
            unusable: None,
        }
    }

    fn rejected(message: String, unusable: Unusable) -> Self {
        Self {
            level: Level::Warn,
            message,
            unusable: Some(unusable),
        }
    }

    fn debug(message: String) -> Self {
        Self {
            level: Level::Debug,
            message,
            unusable: None,
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
        match serde_yaml::from_str::<Value>(&doc) {
            Ok(value) => handle_value(value, Some((&doc, line)), &origin, &mut out, &mut diags),
            Err(e) => diags.push(Diagnostic::rejected(
                format!("{origin}: malformed YAML: {}", yaml_error(&e, line)),
                Unusable::Document,
            )),
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

/// The identity of an untyped object of a kind kproxy reads (namespace defaulted).
fn untyped_key(kind: ObjectKind, value: &Value) -> Unusable {
    let name = str_at(value, &["metadata", "name"]).unwrap_or_default();
    let namespace = match kind {
        ObjectKind::Node => "",
        _ => str_at(value, &["metadata", "namespace"])
            .filter(|s| !s.is_empty())
            .unwrap_or(DEFAULT_NAMESPACE),
    };
    Unusable::Object(ObjectKey {
        kind,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    })
}

/// A parser error of a document starting on the file's line `first_line`, with the line
/// number the file's. (Documents are parsed on their own: padding each with the lines before
/// it made parsing a file quadratic in its length.)
fn yaml_error(e: &serde_yaml::Error, first_line: usize) -> String {
    let offset = first_line.saturating_sub(1);
    let text = e.to_string();
    // Every "line N" of the message (the problem's and its context's marks).
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(i) = rest.find("line ") {
        let (head, tail) = rest.split_at(i + "line ".len());
        out.push_str(head);
        let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
        match tail[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&(n + offset).to_string()),
            Err(_) => out.push_str(&tail[..digits]),
        }
        rest = &tail[digits..];
    }
    out.push_str(rest);
    out
}

/// A document's text and the file line it starts on.
type DocText<'a> = (&'a str, usize);

fn typed<T: DeserializeOwned>(value: Value, text: Option<DocText<'_>>) -> Result<T, String> {
    match text {
        Some((t, line)) => serde_yaml::from_str(t).map_err(|e| yaml_error(&e, line)),
        None => serde_yaml::from_value(value).map_err(|e| e.to_string()),
    }
}

fn handle_value(
    value: Value,
    text: Option<DocText<'_>>,
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
            let key = untyped_key(ObjectKind::Service, &value);
            match typed::<Service>(value, text) {
                Ok(svc) => push_service(svc, &what, origin, out, diags),
                Err(e) => diags.push(Diagnostic::rejected(
                    format!("{origin}: {what}: {e}; skipped"),
                    key,
                )),
            }
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            let what = describe(kind, &value, true);
            let key = untyped_key(ObjectKind::EndpointSlice, &value);
            match typed::<EndpointSlice>(value, text) {
                Ok(slice) => push_slice(slice, &what, origin, out, diags),
                Err(e) => diags.push(Diagnostic::rejected(
                    format!("{origin}: {what}: {e}; skipped"),
                    key,
                )),
            }
        }
        ("v1", "Node") => {
            let what = describe(kind, &value, false);
            let key = untyped_key(ObjectKind::Node, &value);
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
                Err(e) => diags.push(Diagnostic::rejected(
                    format!("{origin}: {what}: {e}; skipped"),
                    key,
                )),
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
        // Said once per read of the file (files are re-read only when they change), so a
        // directory shared with other manifests does not flood the log.
        _ => diags.push(Diagnostic::warn(format!(
            "{origin}: {} ({api_version}): kind {kind} is not one kproxy reads (Service, EndpointSlice, Node); ignored",
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
            let key = K8sObject::Service(Box::new(svc)).key();
            diags.push(Diagnostic::rejected(
                format!("{origin}: {what}: {why}; skipped"),
                Unusable::Object(key),
            ));
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
            let key = K8sObject::EndpointSlice(Box::new(slice)).key();
            diags.push(Diagnostic::rejected(
                format!("{origin}: {what}: {why}; skipped"),
                Unusable::Object(key),
            ));
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
/// and Services whose nodePort another Service already uses (one of them is skipped, as the
/// API server would have refused it: not one in `served`, else the later by namespace/name).
/// Returns the objects, sorted by key.
pub fn assemble<'a>(
    parsed: impl IntoIterator<Item = &'a Parsed>,
    served: &BTreeSet<NamespacedName>,
) -> (Vec<K8sObject>, Vec<Diagnostic>) {
    let (kept, diags) = assemble_parsed(parsed, served);
    (kept.into_iter().map(|p| p.object).collect(), diags)
}

fn assemble_parsed<'a>(
    parsed: impl IntoIterator<Item = &'a Parsed>,
    served: &BTreeSet<NamespacedName>,
) -> (Vec<Parsed>, Vec<Diagnostic>) {
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
    let losers = nodeport_conflicts(services.iter().map(|(_, n, p)| (n, p)), served);
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
    (by_key.into_values().cloned().collect(), diags)
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

/// One file as last read: its usable objects and what it held that could not be used.
#[derive(Debug)]
struct CachedFile {
    stamp: FileStamp,
    parsed: Vec<Parsed>,
    unusable: BTreeSet<Unusable>,
}

/// Watches `--manifests PATH` by polling: re-reads when a file's (path, mtime, size, inode)
/// changes, or a file appears or goes away, and returns the full set of objects. Only changed
/// files are parsed again, so an unchanged bad file is not reported on every read.
///
/// Nothing programmed is lost to a bad edit: when a served object's new version is rejected
/// (invalid, or in a document that is not YAML at all), its last good version keeps being
/// returned until the file is fixed or the object is removed from it.
#[derive(Debug)]
pub struct ManifestWatcher {
    path: PathBuf,
    interval: Duration,
    state: Option<Fingerprint>,
    cache: BTreeMap<PathBuf, CachedFile>,
    /// The objects returned by the last read, with where they came from.
    last_good: BTreeMap<ObjectKey, Parsed>,
    /// Objects of `last_good` that are last good versions kept in place of rejected ones.
    kept: BTreeSet<ObjectKey>,
}

impl ManifestWatcher {
    /// A watcher for a path that may not exist yet (then it serves no objects).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            interval: DEFAULT_POLL_INTERVAL,
            state: None,
            cache: BTreeMap::new(),
            last_good: BTreeMap::new(),
            kept: BTreeSet::new(),
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
                        Some(cached) if cached.stamp == *stamp => cached,
                        _ => read_file(stamp, &mut diags),
                    };
                    cache.insert(stamp.path.clone(), entry);
                }
                self.cache = cache;
            }
        }
        self.state = Some(fingerprint);
        let kept = self.last_good_of_rejected();
        let kept_keys: BTreeSet<ObjectKey> = kept.iter().map(|p| p.object.key()).collect();
        for p in &kept {
            let key = p.object.key();
            if !self.kept.contains(&key) {
                diags.push(Diagnostic::warn(format!(
                    "{key}: its new version in {} cannot be used; serving its last good version until the file is fixed",
                    p.origin.file.display()
                )));
            }
        }
        let served: BTreeSet<NamespacedName> = self
            .last_good
            .keys()
            .filter(|k| k.kind == ObjectKind::Service)
            .map(|k| NamespacedName::new(&k.namespace, &k.name))
            .collect();
        let all = self
            .cache
            .values()
            .flat_map(|f| &f.parsed)
            .chain(kept.iter());
        let (objects, d) = assemble_parsed(all, &served);
        diags.extend(d);
        self.last_good = objects
            .iter()
            .map(|p| (p.object.key(), p.clone()))
            .collect();
        self.kept = kept_keys;
        Some((objects.into_iter().map(|p| p.object).collect(), diags))
    }

    /// The last good versions of objects whose file now holds a rejected version of them (or
    /// a document that is not YAML, which may have been any of the file's objects).
    fn last_good_of_rejected(&self) -> Vec<Parsed> {
        let mut kept = Vec::new();
        for (file, cached) in &self.cache {
            if cached.unusable.is_empty() {
                continue;
            }
            let present: BTreeSet<ObjectKey> =
                cached.parsed.iter().map(|p| p.object.key()).collect();
            let any = cached.unusable.contains(&Unusable::Document);
            for (key, p) in &self.last_good {
                let rejected = any || cached.unusable.contains(&Unusable::Object(key.clone()));
                if p.origin.file == *file && rejected && !present.contains(key) {
                    kept.push(p.clone());
                }
            }
        }
        kept
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

/// Reads and parses one manifest file.
fn read_file(stamp: &FileStamp, diags: &mut Vec<Diagnostic>) -> CachedFile {
    let (parsed, unusable) = match fs::read_to_string(&stamp.path) {
        Ok(text) => {
            let (parsed, d) = parse_manifest(&stamp.path, &text);
            let unusable = d.iter().filter_map(|d| d.unusable.clone()).collect();
            diags.extend(d);
            (parsed, unusable)
        }
        Err(e) => {
            diags.push(Diagnostic::warn(format!(
                "{}: cannot be read: {e}",
                stamp.path.display()
            )));
            (Vec::new(), BTreeSet::new())
        }
    };
    CachedFile {
        stamp: stamp.clone(),
        parsed,
        unusable,
    }
}

/// Reads the manifests once (problems logged).
pub fn load_manifests(path: &Path) -> Vec<K8sObject> {
    ManifestWatcher::new(path).poll().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::ObjectKind;

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";
    const SLICE: &str = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: prod, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints: [{addresses: [10.0.0.1]}]\n";

    fn warnings(diags: &[Diagnostic]) -> Vec<&str> {
        diags
            .iter()
            .filter(|d| d.level == Level::Warn)
            .map(|d| d.message.as_str())
            .collect()
    }

    fn keys(objects: &[Parsed]) -> Vec<String> {
        objects.iter().map(|p| p.object.key().to_string()).collect()
    }

    #[test]
    fn errors_name_the_file_line_and_parsing_stays_linear() {
        // A typed error on the file's line 14 (document 3), and a syntax error in the flow
        // mapping opened on line 18 (document 4).
        let text = format!(
            "{SVC}---\n{SVC}---\napiVersion: v1\nkind: Service\nmetadata: {{name: typed}}\nspec: {{clusterIP: 10.96.0.2, ports: [{{port: 80, protocol: [x]}}]}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: x\n  spec: [\n"
        );
        let (_, diags) = parse_manifest(Path::new("f.yaml"), &text);
        let w = warnings(&diags);
        assert_eq!(w.len(), 2, "{w:#?}");
        assert!(w[0].contains("at line 14 column 59"), "{}", w[0]);
        assert!(
            w[1].contains("at line 19 column 7") && w[1].contains("flow mapping at line 18"),
            "{}",
            w[1]
        );
        // 20,000 documents parse in well under the seconds the padded parser took.
        let big: String = (0..20_000)
            .map(|i| format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}}}\nspec: {{clusterIP: 10.96.0.1, ports: [{{port: 80}}]}}\n"))
            .collect();
        let (parsed, _) = parse_manifest(Path::new("big.yaml"), &big);
        assert_eq!(parsed.len(), 20_000);
    }

    #[test]
    fn malformed_document_does_not_stop_the_others() {
        let text = format!(
            "# leading comment\n{SVC}---\napiVersion: v1\nkind: Service\nmetadata: {{name: bad\n  spec: [\n---\n{SLICE}---\n# only a comment\n---\napiVersion: v1\nkind: Node\nmetadata: {{name: n1}}\n"
        );
        let (parsed, diags) = parse_manifest(Path::new("m/all.yaml"), &text);
        assert_eq!(
            keys(&parsed),
            ["Service default/web", "EndpointSlice prod/web-1", "Node n1"]
        );
        let w = warnings(&diags);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("m/all.yaml: document 2 (line 6): malformed YAML:"),
            "{}",
            w[0]
        );
        assert_eq!(parsed[2].origin.document, 4);
        // Namespaces default to `default` on the parsed objects themselves.
        let K8sObject::Service(svc) = &parsed[0].object else {
            panic!("a Service");
        };
        assert_eq!(svc.metadata.namespace.as_deref(), Some("default"));
    }

    #[test]
    fn unknown_kinds_and_missing_type_fields() {
        let text = format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d}}\n---\nkind: Service\nmetadata: {{name: x}}\n---\napiVersion: v1\nmetadata: {{name: y}}\n---\n- 1\n---\napiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {{name: old}}\n---\n{SVC}"
        );
        let (parsed, diags) = parse_manifest(Path::new("f.yml"), &text);
        assert_eq!(keys(&parsed), ["Service default/web"]);
        let w = warnings(&diags);
        assert_eq!(w.len(), 5, "{w:?}");
        assert!(
            w[0].contains("document 1")
                && w[0].contains("Deployment default/d")
                && w[0].contains("kind Deployment is not one kproxy reads"),
            "{}",
            w[0]
        );
        assert!(
            w[1].contains("document 2") && w[1].contains("Service default/x: has no apiVersion")
        );
        assert!(w[2].contains("document 3") && w[2].contains("has no kind"));
        assert!(w[3].contains("document 4") && w[3].contains("not a Kubernetes object"));
        assert!(w[4].contains("apiVersion discovery.k8s.io/v1beta1 is not supported"));
    }

    #[test]
    fn invalid_objects_are_reported_and_skipped() {
        let text = format!(
            "{SVC}---\napiVersion: v1\nkind: Service\nmetadata: {{name: noip, namespace: a}}\nspec: {{type: NodePort, ports: [{{port: 80}}]}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: typed}}\nspec: {{ports: [{{port: http}}]}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: ext}}\nspec: {{type: ExternalName, externalName: example.com}}\n"
        );
        let (parsed, diags) = parse_manifest(Path::new("svc.yaml"), &text);
        // The ExternalName service is kept (ignored later, not an error).
        assert_eq!(
            keys(&parsed),
            ["Service default/web", "Service default/ext"]
        );
        let w = warnings(&diags);
        assert_eq!(w.len(), 2, "{w:?}");
        assert_eq!(
            w[0],
            "svc.yaml: document 2 (line 5): Service a/noip: has no spec.clusterIP (kproxy reads manifests without an API server to allocate one); skipped"
        );
        assert!(w[1].starts_with("svc.yaml: document 3 (line 10): Service default/typed: "));
    }

    #[test]
    fn list_items_duplicates_and_node_port_conflicts() {
        let list = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: b}\n  spec: {type: NodePort, clusterIP: 10.96.0.2, ports: [{port: 80, nodePort: 30000}]}\n- apiVersion: v1\n  kind: Service\n  metadata: {name: a}\n  spec: {type: NodePort, clusterIP: 10.96.0.1, ports: [{port: 80, nodePort: 30000}]}\n";
        let (p1, d1) = parse_manifest(Path::new("1.yaml"), list);
        assert!(d1.is_empty(), "{d1:?}");
        assert_eq!(p1[0].origin.item, Some(0));
        let dup = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.3, ports: [{port: 81}]}\n";
        let (p2, _) = parse_manifest(Path::new("2.yaml"), dup);
        let (objects, diags) = assemble(p1.iter().chain(&p2), &BTreeSet::new());
        let names: Vec<String> = objects.iter().map(|o| o.key().to_string()).collect();
        assert_eq!(names, ["Service default/a"]);
        let w = warnings(&diags);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].starts_with("2.yaml: document 1 (line 1): Service default/a: already defined in 1.yaml: document 1 (line 1) items[1]"));
        assert_eq!(
            w[1],
            "1.yaml: document 1 (line 1) items[0]: Service default/b: nodePort 30000/TCP is already used by Service default/a; skipped"
        );
    }

    fn write(path: &Path, text: &str) {
        fs::write(path, text).expect("write test file");
    }

    #[test]
    fn watcher_sees_rename_new_and_deleted_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("a.yaml");
        write(&a, SVC);
        write(&dir.path().join("notes.txt"), "not yaml");
        let mut w = ManifestWatcher::new(dir.path());
        let (objects, diags) = w.poll_with_diagnostics().expect("first read");
        assert_eq!(objects.len(), 1);
        assert!(diags.is_empty());
        assert!(w.poll().is_none());

        // Replaced by rename with same size (mtime may well be equal): the inode differs.
        let tmp = dir.path().join(".a.yaml.tmp");
        write(&tmp, &SVC.replace("web", "wex"));
        assert!(w.poll().is_none(), "hidden files are not manifests");
        fs::rename(&tmp, &a).expect("rename");
        let objects = w.poll().expect("rename detected");
        assert_eq!(objects[0].key().name, "wex");

        // A bad file: reported once, not on every poll nor when another file changes.
        let bad = dir.path().join("bad.yml");
        write(&bad, "apiVersion: v1\nkind: Service\nmetadata: {name: [\n");
        let (objects, diags) = w.poll_with_diagnostics().expect("new file");
        assert_eq!(objects.len(), 1);
        assert_eq!(warnings(&diags).len(), 1);
        assert!(warnings(&diags)[0].contains("bad.yml: document 1"));
        assert!(w.poll_with_diagnostics().is_none());
        let c = dir.path().join("c.yaml");
        write(&c, SLICE);
        let (objects, diags) = w.poll_with_diagnostics().expect("another new file");
        assert_eq!(objects.len(), 2);
        assert!(diags.is_empty(), "{diags:?}");
        assert_eq!(objects[1].kind(), ObjectKind::EndpointSlice);

        // Deleted files count.
        fs::remove_file(&c).expect("rm");
        fs::remove_file(&bad).expect("rm");
        assert_eq!(w.poll().expect("deletion").len(), 1);

        // The whole path gone: no objects, one warning.
        drop(dir);
        let (objects, diags) = w.poll_with_diagnostics().expect("path gone");
        assert!(objects.is_empty());
        assert_eq!(warnings(&diags).len(), 1);
        assert!(w.poll().is_none());
    }

    #[test]
    fn a_rejected_new_version_keeps_the_last_good_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("web.yaml");
        let other = dir.path().join("other.yaml");
        write(&f, &format!("{SVC}---\n{SLICE}"));
        write(&other, &SVC.replace("web", "other"));
        let mut w = ManifestWatcher::new(dir.path());
        assert_eq!(w.poll().map(|o| o.len()), Some(3));

        // The Service's port edited to 65536: reported, and the old version still served.
        write(
            &f,
            &format!("{}---\n{SLICE}", SVC.replace("port: 80", "port: 65536")),
        );
        let (objects, diags) = w.poll_with_diagnostics().expect("changed");
        let w1 = warnings(&diags);
        assert_eq!(w1.len(), 2, "{w1:?}");
        assert!(w1[0].contains("Service default/web") && w1[0].contains("65536"));
        assert!(w1[1].contains("serving its last good version"), "{}", w1[1]);
        let K8sObject::Service(svc) = &objects[1] else {
            panic!("{objects:?}")
        };
        assert_eq!(svc.metadata.name.as_deref(), Some("web"));
        assert_eq!(
            svc.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port,
            80
        );
        // Another file changes: still kept, not reported again.
        write(&other, &SVC.replace("web", "other2"));
        let (objects, diags) = w.poll_with_diagnostics().expect("changed");
        assert_eq!(objects.len(), 3);
        assert!(warnings(&diags).is_empty(), "{diags:?}");

        // A document that is not YAML: every object of that file keeps its last version.
        write(&f, "apiVersion: v1\nkind: Service\nmetadata: {name: [\n");
        let objects = w.poll().expect("changed");
        assert_eq!(objects.len(), 3, "{objects:?}");

        // Fixed with the Service removed on purpose: it goes.
        write(&f, SLICE);
        let objects = w.poll().expect("changed");
        let names: Vec<String> = objects.iter().map(|o| o.key().to_string()).collect();
        assert_eq!(
            names,
            ["Service default/other2", "EndpointSlice prod/web-1"]
        );
    }

    #[test]
    fn watcher_on_a_single_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("one.yaml");
        write(&f, SVC);
        let mut w = ManifestWatcher::open(&f)
            .expect("exists")
            .with_interval(Duration::from_millis(5));
        assert_eq!(load_manifests(&f).len(), 1);
        assert_eq!(w.poll().map(|o| o.len()), Some(1));
        write(&f, &format!("{SVC}---\n{SLICE}"));
        assert_eq!(w.poll().map(|o| o.len()), Some(2));
        assert!(ManifestWatcher::open(dir.path().join("missing.yaml")).is_err());
    }

    #[test]
    fn garbage_never_panics() {
        let inputs = [
            "",
            "---\n---\n",
            "...\n",
            "\u{feff}apiVersion: v1\nkind: Node\n",
            "apiVersion: v1\nkind: List\nitems: 3\n",
            "apiVersion: v1\nkind: List\nitems: [1, {kind: Service}]\n",
            "apiVersion: [1]\nkind: {a: b}\n",
            "apiVersion: v1\nkind: Service\nspec: {ports: [{port: -1, nodePort: 99999999999}]}\n",
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: x}\naddressType: IPv4\nendpoints: [{addresses: []}]\nports: [{port: 0}]\n",
            "--- !weird\n&a [*a]\n",
            "{{{{",
        ];
        for text in inputs {
            let (parsed, _) = parse_manifest(Path::new("g.yaml"), text);
            let _ = assemble(&parsed, &BTreeSet::new());
        }
    }
}
