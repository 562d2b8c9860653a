//! HTTP/1.1 for the test API server: keep-alive connections, `GET` list/get/watch requests,
//! JSON responses with `Content-Length`, watch streams as chunked newline-delimited JSON.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

use super::{
    Shared,
    pages::ExpiredToken,
    store::{Change, Key, Resource, field_selector_matches, label_selector_matches},
};

const MAX_HEAD: usize = 64 * 1024;

struct Request {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    close: bool,
}

/// Serves one connection until the peer closes it (or the task is aborted by `stop`).
pub(super) async fn serve_connection(shared: Arc<Shared>, mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::with_capacity(4096);
    loop {
        let req = match read_request(&mut stream, &mut buf).await {
            Ok(Some(r)) => r,
            Ok(None) | Err(_) => return,
        };
        let close = req.close;
        let ok = handle(&shared, &mut stream, req).await;
        if !ok || close {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

/// Reads one request head (and skips a body, if any). `Ok(None)` at a clean EOF.
async fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<Request>> {
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(std::io::Error::other("request head too large"));
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let method = first.next().unwrap_or("").to_owned();
    let target = first.next().unwrap_or("/").to_owned();
    let version = first.next().unwrap_or("HTTP/1.1").to_owned();
    let mut content_length = 0usize;
    let mut close = version == "HTTP/1.0";
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                content_length = v.parse().unwrap_or(0);
            } else if k == "connection" {
                close = v.eq_ignore_ascii_case("close");
            }
        }
    }
    buf.drain(..head_end);
    while buf.len() < content_length {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    buf.drain(..content_length);
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), parse_query(q)),
        None => (target, BTreeMap::new()),
    };
    Ok(Some(Request {
        method,
        path,
        query,
        close,
    }))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn parse_query(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a path names.
enum Target {
    Collection {
        resource: Resource,
        namespace: Option<String>,
    },
    Object(Key),
    Version,
}

fn route(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (gv, rest): (String, &[&str]) = match parts.as_slice() {
        ["version"] => return Some(Target::Version),
        ["api", v, rest @ ..] => ((*v).to_owned(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return None,
    };
    let (namespace, plural, name) = match rest {
        ["namespaces", ns, plural] => (Some((*ns).to_owned()), *plural, None),
        ["namespaces", ns, plural, name] => (Some((*ns).to_owned()), *plural, Some(*name)),
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(*name)),
        _ => return None,
    };
    let resource = Resource::from_url(&gv, plural)?;
    if namespace.is_some() && !resource.namespaced() {
        return None;
    }
    match name {
        None => Some(Target::Collection {
            resource,
            namespace,
        }),
        Some(name) => Some(Target::Object(Key {
            resource,
            namespace: namespace.unwrap_or_default(),
            name: name.to_owned(),
        })),
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

async fn respond(stream: &mut TcpStream, code: u16, body: &Value) -> bool {
    let text = body.to_string();
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        410 => "Gone",
        500 => "Internal Server Error",
        _ => "Error",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        text.len()
    );
    stream.write_all(head.as_bytes()).await.is_ok()
        && stream.write_all(text.as_bytes()).await.is_ok()
        && stream.flush().await.is_ok()
}

/// Handles one request; false if the connection must be closed.
async fn handle(shared: &Arc<Shared>, stream: &mut TcpStream, req: Request) -> bool {
    if req.method != "GET" {
        return respond(
            stream,
            405,
            &status(
                405,
                "MethodNotAllowed",
                "the test API server is read-only over HTTP",
            ),
        )
        .await;
    }
    let Some(target) = route(&req.path) else {
        return respond(
            stream,
            404,
            &status(404, "NotFound", &format!("no route for {}", req.path)),
        )
        .await;
    };
    let resource = match &target {
        Target::Collection { resource, .. } => Some(*resource),
        Target::Object(k) => Some(k.resource),
        Target::Version => None,
    };
    if resource.is_some_and(|r| shared.failing.lock().unwrap().contains(&r)) {
        let msg = "the test API server was told to fail this resource";
        return respond(stream, 500, &status(500, "InternalError", msg)).await;
    }
    match target {
        Target::Version => {
            respond(
                stream,
                200,
                &json!({"major": "1", "minor": "34", "gitVersion": "v1.34.0-kproxy-test"}),
            )
            .await
        }
        Target::Object(key) => {
            let obj = shared.store.lock().unwrap().get(&key).cloned();
            match obj {
                Some(o) => respond(stream, 200, &o).await,
                None => {
                    let msg = format!(
                        "{}s \"{}\" not found",
                        key.resource.plural().trim_end_matches('s'),
                        key.name
                    );
                    respond(stream, 404, &status(404, "NotFound", &msg)).await
                }
            }
        }
        Target::Collection {
            resource,
            namespace,
        } => {
            let labels = req.query.get("labelSelector").cloned().unwrap_or_default();
            let fields = req.query.get("fieldSelector").cloned().unwrap_or_default();
            let filter = move |o: &Value| {
                label_selector_matches(&labels, o) && field_selector_matches(&fields, o)
            };
            let watch = req
                .query
                .get("watch")
                .is_some_and(|v| v == "true" || v == "1");
            if watch {
                watch_stream(shared, stream, &req, resource, namespace, &filter).await
            } else {
                let limit = req
                    .query
                    .get("limit")
                    .and_then(|l| l.parse::<usize>().ok())
                    .filter(|l| *l > 0);
                // The lock is not held across an await (the guard is not `Send`).
                let continued = req
                    .query
                    .get("continue")
                    .filter(|t| !t.is_empty())
                    .map(|token| shared.pages.lock().unwrap().next(token, limit));
                let page = match continued {
                    Some(next) => match next {
                        Ok(page) => page,
                        Err(ExpiredToken) => {
                            shared.count_expired();
                            let msg = "The provided continue parameter is too old to display a \
                                       consistent list result. You can start a new list without \
                                       the continue parameter.";
                            return respond(stream, 410, &status(410, "Expired", msg)).await;
                        }
                    },
                    None => {
                        let (rv, items) = {
                            let store = shared.store.lock().unwrap();
                            (
                                store.resource_version(),
                                store.list(resource, namespace.as_deref(), &filter),
                            )
                        };
                        shared.count_list(resource);
                        shared.pages.lock().unwrap().first(rv, items, limit)
                    }
                };
                let mut metadata = json!({"resourceVersion": page.resource_version.to_string()});
                if let Some(token) = page.continue_token {
                    metadata["continue"] = json!(token);
                }
                let body = json!({
                    "kind": format!("{}List", resource.kind()),
                    "apiVersion": resource.api_version(),
                    "metadata": metadata,
                    "items": page.items,
                });
                respond(stream, 200, &body).await
            }
        }
    }
}

async fn send_chunk(stream: &mut TcpStream, event: &Value) -> bool {
    let mut line = event.to_string();
    line.push('\n');
    let chunk = format!("{:x}\r\n{line}\r\n", line.len());
    stream.write_all(chunk.as_bytes()).await.is_ok() && stream.flush().await.is_ok()
}

fn bookmark(resource: Resource, rv: u64, initial_end: bool) -> Value {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"type": "BOOKMARK", "object": {"kind": resource.kind(), "apiVersion": resource.api_version(), "metadata": meta}})
}

fn event_json(change: &Change) -> Value {
    json!({"type": change.event.as_str(), "object": change.object})
}

/// `?watch=true`: replays the history after `resourceVersion`, then streams changes until
/// `timeoutSeconds`, the server's `close_watches` or the peer going away. A resourceVersion
/// older than the history gets one `ERROR` event with a 410 `Expired` Status.
async fn watch_stream(
    shared: &Arc<Shared>,
    stream: &mut TcpStream,
    req: &Request,
    resource: Resource,
    namespace: Option<String>,
    filter: &(dyn Fn(&Value) -> bool + Send + Sync),
) -> bool {
    shared.count_watch(resource);
    let head =
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    if stream.write_all(head.as_bytes()).await.is_err() {
        return false;
    }
    let bookmarks = req
        .query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true");
    let send_initial = req
        .query
        .get("sendInitialEvents")
        .is_some_and(|v| v == "true");
    let timeout = req
        .query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .filter(|t| *t > 0)
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let deadline = Instant::now() + timeout;
    let requested = req
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|v| *v > 0);
    let matches = |c: &Change| {
        c.key.resource == resource
            && namespace.as_deref().is_none_or(|ns| c.key.namespace == ns)
            && filter(&c.object)
    };

    let mut rx = shared.tick.subscribe();
    let generation = rx.borrow_and_update().close_watches;
    // Where to start: a given version, or "now" with the current objects sent first
    // (unset/"0", or sendInitialEvents=true).
    let mut last = match requested {
        Some(rv) if !send_initial => rv,
        _ => {
            let (rv, items) = {
                let store = shared.store.lock().unwrap();
                (
                    store.resource_version(),
                    store.list(resource, namespace.as_deref(), filter),
                )
            };
            for obj in items {
                if !send_chunk(stream, &json!({"type": "ADDED", "object": obj})).await {
                    return false;
                }
            }
            if send_initial && !send_chunk(stream, &bookmark(resource, rv, true)).await {
                return false;
            }
            rv
        }
    };
    let bookmark_every = shared.bookmark_interval;
    let mut next_bookmark = Instant::now() + bookmark_every;
    loop {
        let changes = shared.store.lock().unwrap().changes_since(last);
        match changes {
            Err(expired) => {
                shared.count_expired();
                let msg = format!(
                    "too old resource version: {} ({})",
                    expired.requested, expired.oldest
                );
                let ev = json!({"type": "ERROR", "object": status(410, "Expired", &msg)});
                let _ = send_chunk(stream, &ev).await;
                return end_chunks(stream).await;
            }
            Ok(changes) => {
                for c in &changes {
                    if matches(c) && !send_chunk(stream, &event_json(c)).await {
                        return false;
                    }
                    last = c.rv;
                }
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return end_chunks(stream).await;
        }
        if bookmarks && now >= next_bookmark {
            if !send_chunk(stream, &bookmark(resource, last, false)).await {
                return false;
            }
            next_bookmark = now + bookmark_every;
        }
        let wake = deadline.min(if bookmarks { next_bookmark } else { deadline });
        tokio::select! {
            r = rx.changed() => {
                if r.is_err() || rx.borrow_and_update().close_watches != generation {
                    return end_chunks(stream).await;
                }
            }
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
}

async fn end_chunks(stream: &mut TcpStream) -> bool {
    stream.write_all(b"0\r\n\r\n").await.is_ok() && stream.flush().await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_and_routes() {
        let q = parse_query("watch=true&fieldSelector=metadata.name%3Dnode1&x=a+b&y=%zz");
        assert_eq!(q["fieldSelector"], "metadata.name=node1");
        assert_eq!(q["x"], "a b");
        assert_eq!(q["y"], "%zz");
        assert!(matches!(
            route("/api/v1/services"),
            Some(Target::Collection {
                resource: Resource::Services,
                namespace: None
            })
        ));
        assert!(matches!(
            route("/apis/discovery.k8s.io/v1/namespaces/kube-system/endpointslices"),
            Some(Target::Collection { resource: Resource::EndpointSlices, namespace: Some(ns) }) if ns == "kube-system"
        ));
        assert!(
            matches!(route("/api/v1/nodes/node1"), Some(Target::Object(k)) if k.name == "node1")
        );
        assert!(route("/api/v1/namespaces/x/nodes").is_none());
        assert!(route("/api/v1/pods").is_none());
    }
}
