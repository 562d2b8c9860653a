//! `cargo xtask <command>`: set up the machine, build, test, demo. Orchestration only: the
//! eBPF object is built by proxy-userspace/build.rs.

mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain and tools kproxy needs (idempotent; quick when present).
    Setup,
    /// Build only the eBPF crate (the full build embeds it into `kproxy` anyway).
    BuildEbpf,
    /// Build kproxy and run it on this host: `cargo xtask build-and-load -- run --manifests ...`.
    BuildAndLoad {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every test: unit tests, BPF_PROG_TEST_RUN packet tests and the end-to-end netns
    /// tests (needs root). The eBPF crate is tested through the object embedded in kproxy.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Formatting and clippy, as CI checks them.
    Lint,
    /// Build a small cluster of network namespaces with nginx pods, serve the example
    /// Service through kproxy, show balancing and churn, clean up.
    Demo,
    /// Benchmark every proxy mode side by side (needs root; not part of `test`): prints a
    /// table and writes results.json, BENCHMARKS-data.md and SVG plots to --out; a full run
    /// (not --quick) into the default --out also rewrites BENCHMARKS.md's data section.
    Bench {
        /// The short flavour (about 2-3 minutes): fewer Services, shorter runs.
        #[arg(long)]
        quick: bool,
        /// Where the results go.
        #[arg(long, value_name = "DIR", default_value = "bench-results")]
        out: PathBuf,
    },
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Runs a command in the workspace root, echoing it, and fails if it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    // The eBPF build (through aya-build) needs -Z build-std on Debian's stable rustc.
    c.env("RUSTC_BOOTSTRAP", "1");
    c
}

fn build_release() -> anyhow::Result<()> {
    eprintln!("xtask: building kproxy (release; the first build takes a few minutes)");
    run(cargo().args(["build", "--release", "--bins"]))
}

fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!("{what} needs root (BPF programs, network namespaces, cgroups)");
    }
    Ok(())
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Task::Setup => setup::setup(),
        Task::BuildEbpf => {
            setup::setup()?;
            let target_dir = workspace_root().join("target/ebpf");
            run(Command::new("rustup")
                .args(["run", setup::EBPF_TOOLCHAIN, "cargo", "build", "--release"])
                .args(["--package", "proxy-ebpf", "--target", "bpfel-unknown-none"])
                .args(["-Z", "build-std=core", "--target-dir"])
                .arg(&target_dir)
                .env("RUSTC_BOOTSTRAP", "1"))?;
            eprintln!(
                "xtask: eBPF object at {}",
                target_dir
                    .join("bpfel-unknown-none/release/kproxy")
                    .display()
            );
            Ok(())
        }
        Task::BuildAndLoad { args } => {
            require_root("build-and-load")?;
            setup::setup()?;
            build_release()?;
            run(Command::new(workspace_root().join("target/release/kproxy")).args(args))
        }
        Task::Test { args } => {
            require_root("the test suite")?;
            setup::setup()?;
            build_release()?;
            eprintln!("xtask: running every test (unit, packet, end-to-end)");
            run(cargo()
                .args(["test", "--release", "--no-fail-fast"])
                .args(args))
        }
        Task::Lint => {
            setup::setup()?;
            run(cargo().args(["fmt", "--all", "--", "--check"]))?;
            run(cargo().args([
                "clippy",
                "--release",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))
        }
        Task::Bench { quick, out } => {
            require_root("the benchmark")?;
            setup::setup()?;
            build_release()?;
            let mut cmd = Command::new(workspace_root().join("target/release/kproxy-bench"));
            let default_out = out == Path::new("bench-results");
            cmd.arg("--out").arg(workspace_root().join(out));
            if quick {
                cmd.arg("--quick");
            } else if default_out {
                cmd.arg("--update-benchmarks")
                    .arg(workspace_root().join("BENCHMARKS.md"));
            }
            run(&mut cmd)
        }
        Task::Demo => {
            require_root("the demo")?;
            setup::setup()?;
            build_release()?;
            run(&mut Command::new(
                workspace_root().join("target/release/kproxy-demo"),
            ))
        }
    }
}
