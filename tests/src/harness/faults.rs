//! Helpers for the restart and fault scenarios: killing the agent, reading what it pinned
//! (`kproxy status -o json`), and long-lived TCP connections (the pods' nginx closes every
//! connection after one request, so an echo server made of socat stands in for a keep-alive
//! server).

use std::{collections::BTreeMap, fs, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail};

use super::{Cluster, Place, cluster::kproxy_bin, probe::Asker, sys};

/// Sends SIGKILL to node `n`'s agent and reaps it (the agent gets no chance to clean up).
pub fn kill_agent(c: &mut Cluster, n: u8) -> Result<()> {
    let pid = c
        .agent_pid(n)
        .with_context(|| format!("node{n} has no agent"))?;
    // SAFETY: kill(2) on the pid of the agent we started and have not reaped.
    if unsafe { libc::kill(pid as i32, libc::SIGKILL) } != 0 {
        bail!("kill -9 {pid}: {}", std::io::Error::last_os_error());
    }
    c.stop_agent(n);
    Ok(())
}

/// `kproxy <args> --bpf-root <node n's root> -o json` in node `n`, parsed.
pub fn kproxy_json(c: &Cluster, n: u8, args: &[&str]) -> Result<serde_json::Value> {
    let bin = kproxy_bin()?;
    let root = c.node_bpf_root(n);
    let mut argv = vec![bin.to_str().unwrap()];
    argv.extend_from_slice(args);
    argv.extend_from_slice(&["--bpf-root", root.to_str().unwrap(), "-o", "json"]);
    let out = c.node(n).output_timeout(&argv, Duration::from_secs(30))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "{argv:?} failed ({}): {stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_str(&stdout).with_context(|| format!("{argv:?}: bad JSON:\n{stdout}"))
}

/// What is pinned on node `n`: link pin name -> link id, and map name -> map id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pinned {
    pub links: BTreeMap<String, u32>,
    /// Link pin name -> the id of the program it runs.
    pub programs: BTreeMap<String, u32>,
    pub maps: BTreeMap<String, u32>,
}

impl Pinned {
    /// The links attached to a device (XDP, tc): replaced in place by `bpf_link_update`.
    pub fn device_links(&self) -> BTreeMap<String, u32> {
        self.links
            .iter()
            .filter(|(k, _)| !k.contains("cgroup"))
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }
}

/// Reads the pinned links and maps of node `n` through `kproxy status -o json`.
pub fn pinned(c: &Cluster, n: u8) -> Result<Pinned> {
    let s = kproxy_json(c, n, &["status"])?;
    let mut p = Pinned::default();
    for l in s["links"].as_array().into_iter().flatten() {
        let pin = l["pin"].as_str().unwrap_or_default();
        let name = pin.rsplit('/').next().unwrap_or(pin).to_string();
        let Some(id) = l["link_id"].as_u64() else {
            bail!("link {pin} has no id: {l}");
        };
        if let Some(prog) = l["program_id"].as_u64() {
            p.programs.insert(name.clone(), prog as u32);
        }
        p.links.insert(name, id as u32);
    }
    for m in s["maps"].as_array().into_iter().flatten() {
        let name = m["name"].as_str().unwrap_or_default().to_string();
        let Some(id) = m["id"].as_u64() else {
            bail!("map {name} has no id: {m}");
        };
        p.maps.insert(name, id as u32);
    }
    Ok(p)
}

/// Starts a TCP echo server on `<pod ip>:<port>` in pod `pod`: each line a client sends is
/// answered at once with `"<pod> <client ip>:<client port> <line>"`; connections stay open.
pub fn start_echo_server(c: &mut Cluster, pod: &str, port: u16) -> Result<usize> {
    sys::require_tools(&["socat", "sed"])?;
    let script = c.tmp_dir().join(format!("echo-{pod}-{port}.sh"));
    fs::write(
        &script,
        format!("#!/bin/sh\nexec sed -u \"s/^/{pod} $SOCAT_PEERADDR:$SOCAT_PEERPORT /\"\n"),
    )?;
    fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let listen = format!("TCP-LISTEN:{port},bind={},fork,reuseaddr", c.pod_ip(pod));
    let exec = format!("EXEC:{}", script.display());
    let place = c.pod(pod);
    let idx = c.spawn(&place, &format!("echo {pod}"), &["socat", &listen, &exec])?;
    // Wait until it listens.
    let probe = format!("{}:{port}", c.pod_ip(pod));
    let ok = sys::wait_for(Duration::from_secs(5), Duration::from_millis(20), || {
        place
            .output(&["socat", "-T1", "-", &format!("TCP:{probe}")])
            .ok()
            .filter(|o| o.status.success())
            .map(|_| ())
    });
    if ok.is_none() {
        bail!("the echo server in {pod} does not listen on {probe}");
    }
    Ok(idx)
}

/// The client side of a long-lived connection: one TCP connection to `addr:port` on which
/// a line is sent every `interval_ms` and its echo awaited (2 s). Prints the `tcp-ask` line
/// format (`<ms> <seq> ok - <reply>`, `timeout`, `error EOF ...`); stops at the first
/// closed connection, or cleanly when `stop` exists.
const KEEPALIVE_CLIENT: &str = r#"#!/bin/bash
addr=$1 port=$2 stop=$3 interval=$4
now() { local t=${EPOCHREALTIME/./}; echo "${t:0:13}"; }
if ! exec 3<>"/dev/tcp/$addr/$port"; then echo "$(now) 0 error ECONNECT connect failed"; exit 1; fi
seq=0
while [ ! -e "$stop" ]; do
  t=$(now)
  if ! echo "q$seq" >&3; then echo "$t $seq error EPIPE write failed"; exit 1; fi
  while :; do
    if IFS= read -r -t 2 line <&3; then
      # A late echo of an earlier line (after a timeout) is skipped.
      case "$line" in *" q$seq") echo "$t $seq ok - $line"; break;; esac
    else
      rc=$?
      if [ $rc -gt 128 ]; then echo "$t $seq timeout"; break; fi
      echo "$t $seq error EOF connection closed"; exit 1
    fi
  done
  seq=$((seq+1))
  sleep "$interval"
done
exec 3>&-
"#;

/// A running keep-alive client (see [`KEEPALIVE_CLIENT`]).
pub struct KeepAlive {
    pub asker: Asker,
    stop: PathBuf,
}

impl KeepAlive {
    /// Connects from `place` to `target` (`ADDR:PORT`) and sends a line every `interval`.
    pub fn start(c: &Cluster, place: &Place, target: &str, interval: Duration) -> Result<Self> {
        let script = c.tmp_dir().join("keepalive-client.sh");
        if !script.exists() {
            fs::write(&script, KEEPALIVE_CLIENT)?;
        }
        let id = sys::unique_id();
        let stop = c.tmp_dir().join(format!("stop-{id}"));
        let log = c.tmp_dir().join(format!("keepalive-{id}.out"));
        let (addr, port) = target.rsplit_once(':').context("target is ADDR:PORT")?;
        let secs = format!("{:.3}", interval.as_secs_f64());
        let asker = Asker::start(
            place,
            "bash",
            &[
                script.to_str().unwrap(),
                addr,
                port,
                stop.to_str().unwrap(),
                &secs,
            ],
            &log,
        )?;
        Ok(KeepAlive { asker, stop })
    }

    /// Asks the client to close its connection and returns every line it printed.
    pub fn finish(self) -> Result<Vec<super::AskLine>> {
        fs::write(&self.stop, b"")?;
        self.asker.finish(Duration::from_secs(5))
    }
}
