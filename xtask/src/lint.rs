//! `cargo xtask lint`: rustfmt, clippy on the host crates, and clippy on the eBPF crate for the
//! BPF target, every warning an error.
//!
//! The eBPF crate's modules are all behind `cfg(target_arch = "bpf")`, so host clippy sees none
//! of it: it is linted the way agent/build.rs (aya-build 0.2.0) builds it, with nightly for
//! `bpfel-unknown-none` and `-Z build-std=core`, with the flags aya-build sets, in a target
//! directory of its own (aya-build's lies under a build script's OUT_DIR and holds full builds,
//! not clippy's checks).

use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use crate::{describe, Workspace};

/// The toolchain aya-build builds the eBPF crate with (`aya_build::Toolchain::default()`).
const BPF_TOOLCHAIN: &str = "nightly";
const EBPF_PACKAGE: &str = "breakwater-ebpf";

/// One tool run of the lint.
#[derive(Debug)]
pub struct Step {
    /// What `ok: NAME` prints.
    pub name: &'static str,
    /// Run as `rustup run TOOLCHAIN cargo ...` when set; else with the cargo that runs xtask.
    pub toolchain: Option<&'static str>,
    /// cargo's arguments.
    pub args: Vec<String>,
    /// Environment set for it.
    pub env: Vec<(&'static str, String)>,
}

impl Step {
    /// The command line as bash takes it (printed when the step fails).
    pub fn shell_line(&self) -> String {
        let mut words: Vec<String> = self
            .env
            .iter()
            .map(|(key, value)| format!("{key}={}", shell_quoted(value)))
            .collect();
        match self.toolchain {
            Some(toolchain) => words.push(format!("cargo +{toolchain}")),
            None => words.push("cargo".to_string()),
        }
        words.extend(self.args.iter().cloned());
        words.join(" ")
    }
}

/// `value` as one bash word: as it is when it is plain, else in `$'...'` (which spells
/// aya-build's 0x1f separator `\x1f`).
fn shell_quoted(value: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_=.,/:+@%".contains(c);
    if !value.is_empty() && value.chars().all(plain) {
        return value.to_string();
    }
    let mut quoted = String::from("$'");
    for c in value.chars() {
        match c {
            '\\' | '\'' => {
                quoted.push('\\');
                quoted.push(c);
            }
            c if c.is_control() => quoted.push_str(&format!("\\x{:02x}", u32::from(c))),
            c => quoted.push(c),
        }
    }
    quoted.push('\'');
    quoted
}

/// The lint's steps, in order: rustfmt, clippy on the host crates, clippy on the eBPF crate.
/// `host_arch` is `std::env::consts::ARCH`; the eBPF check gets its target directory
/// (`<target>/clippy-bpf`).
///
/// Clippy runs `--quiet`: no progress lines, and none of the `warning: breakwater@0.1.0: ...`
/// lines that agent/build.rs relays from aya-build whenever it rebuilds the eBPF object; errors
/// and clippy's diagnostics still print.
pub fn steps(target_dir: &Path, host_arch: &str, big_endian: bool) -> Vec<Step> {
    let strings = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut bpf_args = strings(&[
        "clippy",
        "--quiet",
        "--package",
        EBPF_PACKAGE,
        "--release",
        "--target",
        bpf_target(big_endian),
        "-Z",
        "build-std=core",
        "--target-dir",
    ]);
    bpf_args.push(target_dir.join("clippy-bpf").display().to_string());
    bpf_args.extend(strings(&["--", "-D", "warnings"]));
    vec![
        Step {
            name: "rustfmt",
            toolchain: None,
            args: strings(&["fmt", "--all", "--check"]),
            env: Vec::new(),
        },
        Step {
            name: "clippy (host crates)",
            toolchain: None,
            args: strings(&[
                "clippy",
                "--quiet",
                "--workspace",
                "--all-targets",
                // xtask's `etcd` (the fleet bench) too.
                "--all-features",
                "--",
                "-D",
                "warnings",
            ]),
            env: Vec::new(),
        },
        Step {
            name: "clippy (agent-ebpf for bpf)",
            toolchain: Some(BPF_TOOLCHAIN),
            args: bpf_args,
            env: vec![("CARGO_ENCODED_RUSTFLAGS", bpf_rustflags(host_arch))],
        },
    ]
}

/// aya-build's target: `bpfel-unknown-none`, or `bpfeb` on a big-endian host.
fn bpf_target(big_endian: bool) -> &'static str {
    if big_endian {
        "bpfeb-unknown-none"
    } else {
        "bpfel-unknown-none"
    }
}

/// The `CARGO_ENCODED_RUSTFLAGS` aya-build 0.2.0 builds the eBPF crate with (its `build_ebpf`):
/// the host architecture as `bpf_target_arch` (which aya-ebpf's syscall argument code reads),
/// full debug info and BTF for the linker. Fields are separated by 0x1f.
fn bpf_rustflags(host_arch: &str) -> String {
    // aya-build's `target_arch_fixup`.
    let arch = if host_arch.starts_with("riscv64") {
        "riscv64"
    } else {
        host_arch
    };
    [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".to_string(),
        "-Clink-arg=--btf".to_string(),
    ]
    .join("\x1f")
}

/// The host's steps (`steps` for this machine and workspace).
fn host_steps(ws: &Workspace) -> Result<Vec<Step>> {
    Ok(steps(
        &ws.target_dir()?,
        std::env::consts::ARCH,
        cfg!(target_endian = "big"),
    ))
}

fn command(ws: &Workspace, step: &Step) -> Command {
    let mut cmd = match step.toolchain {
        Some(toolchain) => {
            // As aya-build runs it: `rustup run` picks the toolchain, and what the outer cargo
            // set for its own rustc must not leak into the nightly one.
            let mut cmd = Command::new("rustup");
            cmd.args(["run", toolchain, "cargo"])
                .current_dir(&ws.root)
                .env_remove("RUSTC")
                .env_remove("RUSTC_WORKSPACE_WRAPPER")
                .env_remove("CARGO");
            cmd
        }
        None => ws.cargo(),
    };
    cmd.args(&step.args);
    for (key, value) in &step.env {
        cmd.env(key, value);
    }
    cmd
}

/// Runs every step (all of them, even after one fails); prints `ok: NAME` for each that passes
/// and the tool's own output for each that fails, and fails naming them.
pub fn run(ws: &Workspace) -> Result<()> {
    let mut failed = Vec::new();
    for step in host_steps(ws)? {
        let mut cmd = command(ws, &step);
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("could not start `{}`", describe(&cmd)))?;
        if out.status.success() {
            println!("ok: {}", step.name);
            continue;
        }
        println!(
            "FAILED: {} ({}): {}",
            step.name,
            out.status,
            step.shell_line()
        );
        // rustfmt's diff is on stdout, clippy's diagnostics on stderr.
        print!("{}", String::from_utf8_lossy(&out.stdout));
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        failed.push(step.name);
    }
    if !failed.is_empty() {
        bail!("lint failed: {}", failed.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustflags_mirror_aya_build() {
        assert_eq!(
            bpf_rustflags("x86_64"),
            "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"
        );
        assert!(bpf_rustflags("riscv64gc").starts_with("--cfg=bpf_target_arch=\"riscv64\"\x1f"));
        assert!(bpf_rustflags("aarch64").starts_with("--cfg=bpf_target_arch=\"aarch64\"\x1f"));
    }

    #[test]
    fn steps_in_order_every_warning_an_error() {
        let steps = steps(Path::new("/t"), "x86_64", false);
        let names: Vec<&str> = steps.iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            [
                "rustfmt",
                "clippy (host crates)",
                "clippy (agent-ebpf for bpf)"
            ]
        );
        assert_eq!(steps[0].shell_line(), "cargo fmt --all --check");
        for clippy in &steps[1..] {
            assert!(clippy
                .args
                .ends_with(&["--", "-D", "warnings"].map(String::from)));
        }
        assert_eq!(
            steps[1].shell_line(),
            "cargo clippy --quiet --workspace --all-targets --all-features -- -D warnings"
        );
        assert_eq!(
            steps[2].shell_line(),
            "CARGO_ENCODED_RUSTFLAGS=$'--cfg=bpf_target_arch=\"x86_64\"\\x1f-Cdebuginfo=2\\x1f-Clink-arg=--btf' \
             cargo +nightly clippy --quiet --package breakwater-ebpf --release \
             --target bpfel-unknown-none -Z build-std=core --target-dir /t/clippy-bpf -- -D warnings"
        );
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quoted("-Dwarnings"), "-Dwarnings");
        assert_eq!(shell_quoted(""), "$''");
        assert_eq!(shell_quoted("a b"), "$'a b'");
        assert_eq!(shell_quoted("it's\\"), "$'it\\'s\\\\'");
        assert_eq!(shell_quoted("a\x1fb"), "$'a\\x1fb'");
    }

    #[test]
    fn bpf_step_follows_the_host_endianness() {
        let steps = steps(Path::new("/t"), "s390x", true);
        assert!(steps[2].args.iter().any(|a| a == "bpfeb-unknown-none"));
    }
}
