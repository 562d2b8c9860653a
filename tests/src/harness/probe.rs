//! Running clients (curl, `kproxy-testpod udp-ask`/`tcp-ask`) somewhere in the cluster and
//! reading what they saw.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow};

use super::sys::{Place, Proc};

/// What one curl invocation saw.
#[derive(Clone, Debug)]
pub struct CurlResult {
    /// curl's exit code (0 ok, 7 could not connect, 28 timeout); -1 when killed.
    pub exit: i32,
    pub body: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl CurlResult {
    pub fn ok(&self) -> bool {
        self.exit == 0
    }

    /// The pod that answered: the first word of the body (`pod-a 198.18.0.100`).
    pub fn pod(&self) -> Option<&str> {
        if !self.ok() {
            return None;
        }
        self.body.split_whitespace().next()
    }

    /// The client address the pod saw: the second word of the body.
    pub fn seen_source(&self) -> Option<&str> {
        if !self.ok() {
            return None;
        }
        self.body.split_whitespace().nth(1)
    }

    /// curl said the connection was refused (exit 7 "Connection refused" / "Couldn't connect").
    pub fn refused(&self) -> bool {
        self.exit == 7
            && (self.stderr.contains("Connection refused")
                || self.stderr.contains("Couldn't connect"))
    }
}

impl fmt::Display for CurlResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "curl exit {} after {:?}: body {:?} stderr {:?}",
            self.exit,
            self.elapsed,
            self.body.trim(),
            self.stderr.trim()
        )
    }
}

/// `curl -sS --max-time <max> URL` at `place`.
pub fn curl(place: &Place, url: &str, max_time: Duration) -> Result<CurlResult> {
    let secs = format!("{:.3}", max_time.as_secs_f64());
    let start = Instant::now();
    let out = place.output_timeout(
        &[
            "curl",
            "-sS",
            "--max-time",
            &secs,
            "--connect-timeout",
            &secs,
            url,
        ],
        max_time + Duration::from_secs(5),
    )?;
    Ok(CurlResult {
        exit: out.status.code().unwrap_or(-1),
        body: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: start.elapsed(),
    })
}

/// Up to `n` curls in a row; returns every result. Stops early after 3 failures in a row
/// (the caller sees fewer than `n` results and the failures), to keep failing tests fast.
pub fn curl_n(place: &Place, url: &str, n: usize, max_time: Duration) -> Result<Vec<CurlResult>> {
    let mut v: Vec<CurlResult> = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(curl(place, url, max_time)?);
        if v.len() >= 3 && v[v.len() - 3..].iter().all(|r| !r.ok()) {
            break;
        }
    }
    Ok(v)
}

/// How many answers each pod gave (failures under `"<failed>"`).
pub fn tally(results: &[CurlResult]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in results {
        *m.entry(r.pod().unwrap_or("<failed>").to_string())
            .or_insert(0) += 1;
    }
    m
}

/// One line of `udp-ask`/`tcp-ask` output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AskLine {
    /// Epoch milliseconds when the query was sent.
    pub ts_ms: u64,
    pub seq: u64,
    pub outcome: Outcome,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `peer` is where the reply came from (UDP) or getpeername() (TCP); `text` the reply.
    Ok {
        peer: String,
        text: String,
    },
    Timeout,
    /// `errno` is a name such as `ECONNREFUSED`.
    Error {
        errno: String,
        message: String,
    },
}

impl AskLine {
    /// The pod that answered (first word of the reply).
    pub fn pod(&self) -> Option<&str> {
        match &self.outcome {
            Outcome::Ok { text, .. } => text.split_whitespace().next(),
            _ => None,
        }
    }

    /// The client address the pod saw (second word of the reply).
    pub fn seen_source(&self) -> Option<&str> {
        match &self.outcome {
            Outcome::Ok { text, .. } => text.split_whitespace().nth(1),
            _ => None,
        }
    }

    pub fn is_ok(&self) -> bool {
        matches!(self.outcome, Outcome::Ok { .. })
    }

    pub fn is_errno(&self, name: &str) -> bool {
        matches!(&self.outcome, Outcome::Error { errno, .. } if errno == name)
    }
}

impl fmt::Display for AskLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.outcome {
            Outcome::Ok { peer, text } => {
                write!(f, "{} #{} ok from {peer}: {text}", self.ts_ms, self.seq)
            }
            Outcome::Timeout => write!(f, "{} #{} timeout", self.ts_ms, self.seq),
            Outcome::Error { errno, message } => {
                write!(f, "{} #{} error {errno} {message}", self.ts_ms, self.seq)
            }
        }
    }
}

/// Parses the output of the ask commands (lines that do not parse are skipped).
pub fn parse_ask(stdout: &str) -> Vec<AskLine> {
    stdout
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(4, ' ');
            let ts_ms = f.next()?.parse().ok()?;
            let seq = f.next()?.parse().ok()?;
            let kind = f.next()?;
            let rest = f.next().unwrap_or("");
            let outcome = match kind {
                "ok" => {
                    let (peer, text) = rest.split_once(' ').unwrap_or((rest, ""));
                    Outcome::Ok {
                        peer: peer.into(),
                        text: text.into(),
                    }
                }
                "timeout" => Outcome::Timeout,
                "error" => {
                    let (errno, message) = rest.split_once(' ').unwrap_or((rest, ""));
                    Outcome::Error {
                        errno: errno.into(),
                        message: message.into(),
                    }
                }
                _ => return None,
            };
            Some(AskLine {
                ts_ms,
                seq,
                outcome,
            })
        })
        .collect()
}

/// Renders lines for a failure message.
pub fn show(lines: &[AskLine]) -> String {
    lines.iter().map(|l| format!("  {l}\n")).collect()
}

/// A running `udp-ask`/`tcp-ask` (or anything printing those lines) in the background; its
/// output goes to a file so it can be read while it runs (`peek`).
pub struct Asker {
    proc: Proc,
    argv: Vec<String>,
    log: PathBuf,
}

impl Asker {
    /// Starts `testpod <args>` at `place`, writing its output to `log`.
    pub fn start(place: &Place, testpod: &str, args: &[&str], log: &Path) -> Result<Asker> {
        let mut argv = vec![testpod];
        argv.extend_from_slice(args);
        let _ = std::fs::remove_file(log);
        let proc = place.spawn_logged("asker", &argv, log)?;
        Ok(Asker {
            proc,
            argv: argv.iter().map(|s| s.to_string()).collect(),
            log: log.to_path_buf(),
        })
    }

    /// The lines printed so far.
    pub fn peek(&self) -> Vec<AskLine> {
        parse_ask(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// Waits until a line satisfies `pred` (up to `timeout`); returns it.
    pub fn wait_line(&self, timeout: Duration, pred: impl Fn(&AskLine) -> bool) -> Option<AskLine> {
        super::sys::wait_for(timeout, Duration::from_millis(10), || {
            self.peek().into_iter().find(|l| pred(l))
        })
    }

    /// Waits for it to finish (killing it after `timeout`) and parses its output.
    pub fn finish(mut self, timeout: Duration) -> Result<Vec<AskLine>> {
        let deadline = Instant::now() + timeout;
        while self.proc.is_running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let killed = self.proc.is_running();
        let status = self.proc.kill();
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        if killed || !status.is_some_and(|s| s.success()) {
            return Err(anyhow!(
                "{:?} {} ({status:?}); output:\n{text}",
                self.argv,
                if killed {
                    "did not finish in time"
                } else {
                    "failed"
                }
            ));
        }
        Ok(parse_ask(&text))
    }
}

/// Runs `testpod <args>` at `place` to completion and parses its output.
pub fn ask(place: &Place, testpod: &str, args: &[&str], timeout: Duration) -> Result<Vec<AskLine>> {
    let mut argv = vec![testpod];
    argv.extend_from_slice(args);
    let out = place.output_timeout(&argv, timeout)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(anyhow!(
            "{argv:?} at {} failed ({}): {}\nstdout:\n{stdout}",
            place.label,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(parse_ask(&stdout))
}
