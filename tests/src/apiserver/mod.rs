//! A small in-process Kubernetes API server for tests: it speaks the real list/watch HTTP
//! protocol well enough for kube-rs's client and watcher (and so for kproxy's API source).
//!
//! - `GET /api/v1/services`, `/api/v1/namespaces/{ns}/services`,
//!   `/apis/discovery.k8s.io/v1/[namespaces/{ns}/]endpointslices`, `/api/v1/nodes`, and single
//!   objects under them; `labelSelector` (equality terms) and `fieldSelector`
//!   (`metadata.name=...`) are honoured.
//! - Lists carry the global resourceVersion; every object its own.
//! - `?watch=true&resourceVersion=N` replays the changes after N from a bounded history and
//!   then streams new ones (chunked, one JSON event a line), with `BOOKMARK`s when
//!   `allowWatchBookmarks=true`, until `timeoutSeconds`. A version older than the history gets
//!   an `ERROR` event with a 410 `Expired` Status (what a real server sends, and what makes
//!   kube-rs's watcher relist). `sendInitialEvents=true` (streaming lists) is supported;
//!   `limit` and `continue` page a list from a snapshot taken by its first page (see
//!   `pages`); `resourceVersionMatch` is accepted and ignored.
//! - The test drives it: [`TestApiServer::apply`] / [`TestApiServer::delete`] change objects,
//!   [`TestApiServer::stop`] drops the listener and every connection (the API server going
//!   away), [`TestApiServer::start`] serves again on the same address with the same objects
//!   and history, [`TestApiServer::compact`] forgets the history so resumes get 410 Gone.
//! - It can listen inside a network namespace (where a node's agent runs): the listening
//!   socket is created by a helper thread that entered the namespace.
//!
//! The server runs on its own thread and tokio runtime, so it works the same from plain
//! `#[test]`s and from async tests; all methods are synchronous.

mod http;
mod pages;
pub mod store;

use std::{
    fmt,
    net::{Ipv4Addr, SocketAddr, TcpListener as StdTcpListener},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize as _, Serialize};
use serde_json::Value;
use tokio::{runtime::Handle, sync::watch, task::JoinHandle};

use self::store::Store;
pub use self::store::{Key, Resource};

/// How many changes the history keeps by default.
pub const DEFAULT_HISTORY: usize = 1000;
/// How often watches with bookmarks get one by default.
pub const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(5);

/// What watch streams wake up on.
#[derive(Clone, Copy, Debug, Default)]
struct Tick {
    /// Bumped on every change.
    rv: u64,
    /// Bumped to end every open watch stream.
    close_watches: u64,
}

/// Request counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub service_lists: u64,
    pub endpoint_slice_lists: u64,
    pub node_lists: u64,
    pub service_watches: u64,
    pub endpoint_slice_watches: u64,
    pub node_watches: u64,
    /// Watches answered with 410 Gone.
    pub expired: u64,
    pub connections: u64,
}

impl Stats {
    pub fn lists(&self, r: Resource) -> u64 {
        match r {
            Resource::Services => self.service_lists,
            Resource::EndpointSlices => self.endpoint_slice_lists,
            Resource::Nodes => self.node_lists,
        }
    }

    pub fn watches(&self, r: Resource) -> u64 {
        match r {
            Resource::Services => self.service_watches,
            Resource::EndpointSlices => self.endpoint_slice_watches,
            Resource::Nodes => self.node_watches,
        }
    }
}

#[derive(Default)]
struct Counters {
    lists: [AtomicU64; 3],
    watches: [AtomicU64; 3],
    expired: AtomicU64,
    connections: AtomicU64,
}

fn index(r: Resource) -> usize {
    match r {
        Resource::Services => 0,
        Resource::EndpointSlices => 1,
        Resource::Nodes => 2,
    }
}

struct Shared {
    store: Mutex<Store>,
    tick: watch::Sender<Tick>,
    bookmark_interval: Duration,
    counters: Counters,
    /// Resources whose requests are answered 500 (see `TestApiServer::set_failing`).
    failing: Mutex<Vec<Resource>>,
    /// Paged lists in progress.
    pages: Mutex<pages::ListPages>,
}

impl Shared {
    fn count_list(&self, r: Resource) {
        self.counters.lists[index(r)].fetch_add(1, Ordering::Relaxed);
    }

    fn count_watch(&self, r: Resource) {
        self.counters.watches[index(r)].fetch_add(1, Ordering::Relaxed);
    }

    fn count_expired(&self) {
        self.counters.expired.fetch_add(1, Ordering::Relaxed);
    }

    fn changed(&self, rv: u64) {
        self.tick.send_modify(|t| t.rv = rv);
    }
}

/// Builder for [`TestApiServer`].
#[derive(Debug, Clone)]
pub struct Builder {
    netns: Option<PathBuf>,
    port: u16,
    history: usize,
    bookmark_interval: Duration,
}

impl Default for Builder {
    fn default() -> Self {
        Self {
            netns: None,
            port: 0,
            history: DEFAULT_HISTORY,
            bookmark_interval: DEFAULT_BOOKMARK_INTERVAL,
        }
    }
}

impl Builder {
    /// Listen inside this network namespace (e.g. `/var/run/netns/<node>`).
    pub fn netns(mut self, path: impl Into<PathBuf>) -> Self {
        self.netns = Some(path.into());
        self
    }

    /// Listen on this port of 127.0.0.1 (default: any free port).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Keep at most this many changes for watches to resume from.
    pub fn history(mut self, n: usize) -> Self {
        self.history = n;
        self
    }

    pub fn bookmark_interval(mut self, d: Duration) -> Self {
        self.bookmark_interval = d;
        self
    }

    /// Starts the server (listening).
    pub fn start(self) -> Result<TestApiServer> {
        let (tick, _) = watch::channel(Tick::default());
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new(self.history)),
            tick,
            bookmark_interval: self.bookmark_interval,
            counters: Counters::default(),
            failing: Mutex::new(Vec::new()),
            pages: Mutex::new(pages::ListPages::default()),
        });
        let (handle_tx, handle_rx) = mpsc::channel();
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = thread::Builder::new()
            .name("test-apiserver".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(rt.handle().clone()));
                rt.block_on(async {
                    let _ = shutdown_rx.await;
                });
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .context("spawning the API server thread")?;
        let handle = handle_rx
            .recv()
            .context("the API server thread died")?
            .context("building the API server runtime")?;
        let mut server = TestApiServer {
            shared,
            handle,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
            netns: self.netns,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, self.port)),
            tasks: Arc::new(Mutex::new(Vec::new())),
            running: false,
        };
        server.start()?;
        Ok(server)
    }
}

/// The test API server; see the module docs. Stopped on drop.
pub struct TestApiServer {
    shared: Arc<Shared>,
    handle: Handle,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
    netns: Option<PathBuf>,
    addr: SocketAddr,
    /// The accept loop and every connection task.
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
    running: bool,
}

impl fmt::Debug for TestApiServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestApiServer")
            .field("addr", &self.addr)
            .field("netns", &self.netns)
            .field("running", &self.running)
            .finish()
    }
}

impl TestApiServer {
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// A server on 127.0.0.1 of this process's network namespace, any free port.
    pub fn new() -> Result<Self> {
        Builder::default().start()
    }

    /// A server on 127.0.0.1 inside the network namespace at `netns` (any free port).
    pub fn in_netns(netns: impl Into<PathBuf>) -> Result<Self> {
        Builder::default().netns(netns).start()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    /// (Re)starts listening on the same address; a no-op when running. Objects, versions and
    /// history are kept across `stop`/`start`.
    pub fn start(&mut self) -> Result<()> {
        if self.running {
            return Ok(());
        }
        let listener = bind(self.netns.as_deref(), self.addr)?;
        self.addr = listener.local_addr()?;
        let shared = self.shared.clone();
        let tasks = self.tasks.clone();
        let accept = self.handle.spawn(async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("test API server: listener: {e}");
                    return;
                }
            };
            loop {
                let stream = match listener.accept().await {
                    Ok((s, _)) => s,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                shared.counters.connections.fetch_add(1, Ordering::Relaxed);
                let conn = tokio::spawn(http::serve_connection(shared.clone(), stream));
                let mut t = tasks.lock().unwrap();
                t.retain(|h| !h.is_finished());
                t.push(conn);
            }
        });
        self.tasks.lock().unwrap().push(accept);
        self.running = true;
        Ok(())
    }

    /// The API server goes away: the listener is closed (new connections are refused) and
    /// every open connection (lists, watches) is dropped. Returns once they are closed.
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        self.running = false;
        // On the server's (single) thread, so the accept loop cannot add a connection
        // between taking the list and aborting.
        let tasks = self.tasks.clone();
        let (tx, rx) = mpsc::channel();
        self.handle.spawn(async move {
            let handles: Vec<JoinHandle<()>> = std::mem::take(&mut *tasks.lock().unwrap());
            for h in &handles {
                h.abort();
            }
            for h in handles {
                let _ = h.await;
            }
            let _ = tx.send(());
        });
        let _ = rx.recv_timeout(Duration::from_secs(5));
    }

    /// `stop`, then `start` after `down`.
    pub fn restart(&mut self, down: Duration) -> Result<()> {
        self.stop();
        thread::sleep(down);
        self.start()
    }

    /// Forgets the change history (as an etcd compaction does for the watch cache) and ends
    /// every open watch stream: the watchers' resumes get 410 Gone and must relist.
    pub fn compact(&self) {
        self.shared.store.lock().unwrap().compact();
        self.close_watches();
    }

    /// Ends every open watch stream normally (as the server's watch timeout does); clients
    /// resume from their last resourceVersion.
    pub fn close_watches(&self) {
        self.shared.tick.send_modify(|t| t.close_watches += 1);
    }

    /// Creates or updates an object (anything serializing to a v1 Service,
    /// discovery.k8s.io/v1 EndpointSlice or v1 Node with `kind` and `apiVersion`). Returns
    /// its new resourceVersion.
    pub fn apply<T: Serialize>(&self, object: &T) -> Result<u64> {
        let value = serde_json::to_value(object).context("serializing the object")?;
        self.apply_value(value)
    }

    pub fn apply_value(&self, value: Value) -> Result<u64> {
        let rv = {
            let mut store = self.shared.store.lock().unwrap();
            match store.apply(value) {
                Ok(rv) => rv,
                Err(e) => bail!("test API server: {e}"),
            }
        };
        self.shared.changed(rv);
        Ok(rv)
    }

    /// Applies every document of a YAML text (`---`-separated, e.g. the harness's
    /// `manifests::render`). Returns the last resourceVersion.
    pub fn apply_yaml(&self, text: &str) -> Result<u64> {
        let mut rv = self.resource_version();
        for doc in serde_yaml::Deserializer::from_str(text) {
            let value = Value::deserialize(doc).context("parsing YAML")?;
            if value.is_null() {
                continue;
            }
            rv = self.apply_value(value)?;
        }
        Ok(rv)
    }

    /// Deletes `kind` (`Service`, `EndpointSlice`, `Node`) `namespace/name` (namespace
    /// ignored for Nodes; empty means `default`). Returns the deletion's resourceVersion, or
    /// None if there was no such object.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Option<u64> {
        let key = key(kind, namespace, name)?;
        let rv = self.shared.store.lock().unwrap().delete(&key)?;
        self.shared.changed(rv);
        Some(rv)
    }

    /// While `failing`, requests for `resource` get a 500 InternalError Status (a server
    /// that is up but cannot serve that resource, e.g. to hold back an initial list).
    pub fn set_failing(&self, resource: Resource, failing: bool) {
        let mut f = self.shared.failing.lock().unwrap();
        f.retain(|r| *r != resource);
        if failing {
            f.push(resource);
        }
    }

    /// The stored object, as JSON.
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let key = key(kind, namespace, name)?;
        self.shared.store.lock().unwrap().get(&key).cloned()
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store.lock().unwrap().resource_version()
    }

    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        let l = |r| c.lists[index(r)].load(Ordering::Relaxed);
        let w = |r| c.watches[index(r)].load(Ordering::Relaxed);
        Stats {
            service_lists: l(Resource::Services),
            endpoint_slice_lists: l(Resource::EndpointSlices),
            node_lists: l(Resource::Nodes),
            service_watches: w(Resource::Services),
            endpoint_slice_watches: w(Resource::EndpointSlices),
            node_watches: w(Resource::Nodes),
            expired: c.expired.load(Ordering::Relaxed),
            connections: c.connections.load(Ordering::Relaxed),
        }
    }

    /// A kubeconfig for this server (plain HTTP, no credentials).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n    namespace: default\ncurrent-context: test\nusers:\n- name: test\n  user: {{}}\n",
            self.url()
        )
    }

    /// Writes [`Self::kubeconfig`] to `path`.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.kubeconfig())
            .with_context(|| format!("writing {}", path.display()))
    }
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        self.stop();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn key(kind: &str, namespace: &str, name: &str) -> Option<Key> {
    let resource = Resource::from_kind(kind)?;
    let namespace = if !resource.namespaced() {
        String::new()
    } else if namespace.is_empty() {
        "default".to_owned()
    } else {
        namespace.to_owned()
    };
    Some(Key {
        resource,
        namespace,
        name: name.to_owned(),
    })
}

/// Binds a non-blocking listener on `addr`, inside `netns` if given (from a helper thread
/// that enters the namespace: a socket stays in the namespace it was created in). std sets
/// SO_REUSEADDR, so a restart can rebind the port while old connections are in TIME_WAIT.
fn bind(netns: Option<&Path>, addr: SocketAddr) -> Result<StdTcpListener> {
    let listen = move || -> Result<StdTcpListener> {
        let l = StdTcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        l.set_nonblocking(true)?;
        Ok(l)
    };
    let Some(netns) = netns else {
        return listen();
    };
    let netns = netns.to_path_buf();
    thread::spawn(move || -> Result<StdTcpListener> {
        let ns =
            std::fs::File::open(&netns).with_context(|| format!("opening {}", netns.display()))?;
        // SAFETY: setns on a valid descriptor; only this helper thread changes namespace.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("entering {}", netns.display()));
        }
        listen()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the netns helper thread panicked"))?
}
