use which::which;

/// Rebuild when bpf-linker changes (it is not a cargo dependency, so cargo cannot see it).
fn main() {
    let bpf_linker = which("bpf-linker").expect("bpf-linker not found: run `cargo xtask setup`");
    println!(
        "cargo:rerun-if-changed={}",
        bpf_linker.to_str().expect("utf-8 path")
    );
}
