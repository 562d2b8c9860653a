//! Low-level pieces: unique names, network namespaces, cgroups, running commands inside a
//! namespace + cgroup, process guards and mounts.
//!
//! Commands are put into a namespace with `setns(2)` in `pre_exec` (not `ip netns exec`, which
//! remounts /sys and would hide the cgroup2 mount and the bpffs pin directories), and into a
//! cgroup by writing `0` (the writing process) to `cgroup.procs` in `pre_exec`.

use std::{
    ffi::CString,
    fs::{self, File},
    io::{Read, Write},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Prefix of every netns, cgroup dir and temp dir the harness creates; followed by the pid
/// of the test process and a per-process counter.
pub const NAME_PREFIX: &str = "kpt";

/// A name unique to this process and call: `kpt<pid>x<counter>`.
pub fn unique_id() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{NAME_PREFIX}{}x{n}", std::process::id())
}

/// Fails unless we are root: namespaces, cgroups, mounts and eBPF all need it.
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the kproxy e2e tests create network namespaces and load eBPF: run them as root");
    }
    Ok(())
}

/// Fails with a message naming `cargo xtask setup` when a tool is missing from PATH.
pub fn require_tools(tools: &[&str]) -> Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| find_in_path(t).is_none())
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing tools needed by the e2e tests: {} (install them with `cargo xtask setup`, \
             or apt-get install iproute2 ethtool nginx-light curl bpftool)",
            missing.join(", ")
        );
    }
    Ok(())
}

pub fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].iter().map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// The mount point of the cgroup v2 hierarchy (`/sys/fs/cgroup` or, in hybrid mode,
/// `/sys/fs/cgroup/unified`).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_src, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount(dir)))
        })
        .next()
        .ok_or_else(|| anyhow!("no cgroup2 hierarchy is mounted (see /proc/mounts)"))
}

fn unescape_mount(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Mount points at or below `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(mounts) = fs::read_to_string("/proc/mounts") else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|d| PathBuf::from(unescape_mount(d)))
        .filter(|d| d.starts_with(dir))
        .collect();
    v.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    v.dedup();
    v
}

/// Whether `dir` is a bpffs mount point.
pub fn is_bpffs(dir: &Path) -> bool {
    let Ok(mounts) = fs::read_to_string("/proc/mounts") else {
        return false;
    };
    mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && Path::new(&unescape_mount(f[1])) == dir && f[2] == "bpf"
    })
}

/// Lazily unmounts every mount at or below `dir` (deepest first). Best effort.
pub fn umount_all_under(dir: &Path) {
    for m in mounts_under(dir) {
        if let Ok(c) = CString::new(m.as_os_str().as_encoded_bytes()) {
            // SAFETY: a valid NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// A named network namespace (`/var/run/netns/<name>`, created with `ip netns add`),
/// deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    file: File,
    /// Only the original deletes the namespace on drop, not `dup`s.
    owner: bool,
}

impl NetNs {
    pub fn create(name: &str) -> Result<Arc<NetNs>> {
        run_checked(Command::new("ip").args(["netns", "add", name]))?;
        let file = match File::open(format!("/var/run/netns/{name}")) {
            Ok(f) => f,
            Err(e) => {
                let _ = Command::new("ip").args(["netns", "del", name]).output();
                return Err(e).context(format!("opening netns {name}"));
            }
        };
        let ns = Arc::new(NetNs {
            name: name.to_string(),
            file,
            owner: true,
        });
        // Loopback up in every namespace.
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.name))
    }

    /// `ip -n <ns> ARGS...`, failing with stderr on a non-zero exit.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run_checked(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Runs a batch of `ip` commands (one per line) in this namespace.
    pub fn ip_batch(&self, lines: &[String]) -> Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut child = Command::new("ip")
            .args(["-n", &self.name, "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning ip -batch")?;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(lines.join("\n").as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "ip -n {} -batch failed: {}\ncommands:\n{}",
                self.name,
                String::from_utf8_lossy(&out.stderr),
                lines.join("\n")
            );
        }
        Ok(())
    }

    /// Writes a sysctl of this namespace (`net.ipv4.ip_forward` style or a /proc/sys path).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let place = Place {
            netns: Some(Arc::new(self.dup()?)),
            cgroup: None,
            label: self.name.clone(),
        };
        let out = place.output(&["sh", "-c", &format!("echo {value} > {path}")])?;
        if !out.status.success() {
            bail!(
                "sysctl {key}={value} in {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn dup(&self) -> Result<NetNs> {
        Ok(NetNs {
            name: self.name.clone(),
            file: self.file.try_clone()?,
            owner: false,
        })
    }

    fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }
}

/// The namespace is deleted when the last `Arc` to the original goes (processes still in it
/// keep it alive until they end).
impl Drop for NetNs {
    fn drop(&mut self) {
        if self.owner {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .output();
        }
    }
}

/// A cgroup v2 directory, removed on drop (after its processes are gone).
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    pub fn create(path: PathBuf) -> Result<Cgroup> {
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Cgroup { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pids in this cgroup.
    pub fn pids(&self) -> Vec<u32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Everything still in the test's own cgroup was started by the test: a forked child
        // (e.g. socat's per-connection process) outlives its killed parent and would keep
        // the cgroup (cgroup.kill takes the whole subtree, kernel >= 5.14).
        let _ = fs::write(self.path.join("cgroup.kill"), "1");
        for _ in 0..50 {
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
        eprintln!(
            "harness: could not remove cgroup {} (pids still in it: {:?})",
            self.path.display(),
            self.pids()
        );
    }
}

/// Where a command runs: a network namespace (None: the test's own) and a cgroup.
#[derive(Clone, Debug)]
pub struct Place {
    pub netns: Option<Arc<NetNs>>,
    pub cgroup: Option<PathBuf>,
    /// For messages: "client", "node1", "pod pod-a".
    pub label: String,
}

impl Place {
    /// A `Command` that runs inside this place's namespace and cgroup.
    ///
    /// `die_with_parent` sets PR_SET_PDEATHSIG=SIGKILL: the process is killed if the thread
    /// that spawned it exits, so daemons do not outlive a test killed from outside (the
    /// guards in the cluster end them normally).
    pub fn command(&self, program: &str, die_with_parent: bool) -> Command {
        let mut cmd = Command::new(program);
        let ns_fd = self.netns.as_ref().map(|n| n.fd());
        let cg = self
            .cgroup
            .as_ref()
            .map(|c| CString::new(c.join("cgroup.procs").as_os_str().as_encoded_bytes()).unwrap());
        // SAFETY: the closure only makes async-signal-safe syscalls (prctl, open, write,
        // close, setns) on data prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if die_with_parent && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(cg) = &cg {
                    let fd = libc::open(cg.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let r = libc::write(fd, b"0".as_ptr().cast(), 1);
                    let err = std::io::Error::last_os_error();
                    libc::close(fd);
                    if r != 1 {
                        return Err(err);
                    }
                }
                if let Some(fd) = ns_fd
                    && libc::setns(fd, libc::CLONE_NEWNET) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Runs `argv` here to completion and captures its output (stdin is /dev/null).
    pub fn output(&self, argv: &[&str]) -> Result<Output> {
        let (prog, args) = argv.split_first().ok_or_else(|| anyhow!("empty argv"))?;
        self.command(prog, false)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {argv:?} in {}", self.label))
    }

    /// Like `output` but kills the command after `timeout` (the result then says so).
    pub fn output_timeout(&self, argv: &[&str], timeout: Duration) -> Result<Output> {
        let (prog, args) = argv.split_first().ok_or_else(|| anyhow!("empty argv"))?;
        let child = self
            .command(prog, true)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {argv:?} in {}", self.label))?;
        wait_output_timeout(child, timeout)
            .with_context(|| format!("running {argv:?} in {}", self.label))
    }

    /// Spawns a long-running process here with stdout+stderr appended to `log`.
    pub fn spawn_logged(&self, name: &str, argv: &[&str], log: &Path) -> Result<Proc> {
        let (prog, args) = argv.split_first().ok_or_else(|| anyhow!("empty argv"))?;
        let out = fs::OpenOptions::new().create(true).append(true).open(log)?;
        let err = out.try_clone()?;
        let child = self
            .command(prog, true)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("spawning {argv:?} in {}", self.label))?;
        Ok(Proc {
            name: name.to_string(),
            child: Some(child),
            log: Some(log.to_path_buf()),
        })
    }

    /// Spawns a process here with piped stdout/stderr (read them with `Proc::wait_output`).
    pub fn spawn_piped(&self, name: &str, argv: &[&str]) -> Result<Proc> {
        let (prog, args) = argv.split_first().ok_or_else(|| anyhow!("empty argv"))?;
        let child = self
            .command(prog, true)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {argv:?} in {}", self.label))?;
        Ok(Proc {
            name: name.to_string(),
            child: Some(child),
            log: None,
        })
    }
}

/// Waits for a child with piped output, killing it after `timeout`.
pub fn wait_output_timeout(mut child: Child, timeout: Duration) -> Result<Output> {
    let mut so = child.stdout.take();
    let mut se = child.stderr.take();
    let t_out = thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(s) = so.as_mut() {
            let _ = s.read_to_end(&mut v);
        }
        v
    });
    let t_err = thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(s) = se.as_mut() {
            let _ = s.read_to_end(&mut v);
        }
        v
    });
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            let _ = child.kill();
            break child.wait()?;
        }
        thread::sleep(Duration::from_millis(5));
    };
    let stdout = t_out.join().unwrap_or_default();
    let mut stderr = t_err.join().unwrap_or_default();
    if timed_out {
        stderr.extend_from_slice(format!("\n[harness: killed after {timeout:?}]\n").as_bytes());
    }
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// A process we started; killed by pid (SIGKILL) and reaped on drop unless already ended.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    log: Option<PathBuf>,
}

impl Proc {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn log_path(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// Whether the process is still running (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The exit status if it has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Sends `sig` to the process (by its pid) if it is still running.
    pub fn signal(&mut self, sig: i32) {
        if let Some(c) = self.child.as_mut()
            && matches!(c.try_wait(), Ok(None))
        {
            // SAFETY: kill(2) on the pid of a child we have not reaped yet.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL; returns the exit status.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        if let Ok(Some(st)) = c.try_wait() {
            return Some(st);
        }
        // SAFETY: as above.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = c.kill();
        c.wait().ok()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        let _ = c.kill();
        c.wait().ok()
    }

    /// Waits (up to `timeout`, then kills) for a process spawned with `spawn_piped`.
    pub fn wait_output(mut self, timeout: Duration) -> Result<Output> {
        let c = self
            .child
            .take()
            .ok_or_else(|| anyhow!("{} was already reaped", self.name))?;
        wait_output_timeout(c, timeout)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs a host command and returns stdout, failing with stderr on a non-zero exit.
pub fn run_checked(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `f` every `every` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(every);
    }
}

/// Milliseconds since the Unix epoch (the clock `kproxy-testpod` prints).
pub fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Whether a process with this pid exists.
pub fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes leftovers of earlier test processes that died without cleaning up (their pid is
/// gone): netns named `kpt<pid>x...`, cgroup dirs and temp dirs of that form. Never kills.
pub fn sweep_stale(cgroup_root: &Path, tmp_root: &Path) {
    let stale = |name: &str| -> bool {
        let Some(rest) = name.strip_prefix(NAME_PREFIX) else {
            return false;
        };
        let Some((pid, _)) = rest.split_once('x') else {
            return false;
        };
        pid.parse::<u32>()
            .is_ok_and(|p| p != std::process::id() && !pid_alive(p))
    };
    if let Ok(rd) = fs::read_dir("/var/run/netns") {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if stale(&n) {
                let _ = Command::new("ip").args(["netns", "del", &n]).output();
            }
        }
    }
    if let Ok(rd) = fs::read_dir(tmp_root) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if stale(&n) {
                umount_all_under(&e.path());
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    if let Ok(rd) = fs::read_dir(cgroup_root) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if stale(&n) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
}

/// rmdir a cgroup tree bottom-up (fails quietly on non-empty cgroups).
pub fn remove_cgroup_tree(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}
