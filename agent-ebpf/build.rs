use which::which;

/// Building the eBPF objects needs bpf-linker on PATH; say so precisely instead of letting
/// rustc fail with a linker error.
fn main() {
    let bpf_linker =
        which("bpf-linker").expect("bpf-linker not found on PATH: run `cargo xtask setup`");
    println!("cargo:rerun-if-changed={}", bpf_linker.to_string_lossy());
}
