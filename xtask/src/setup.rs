//! `cargo xtask setup`: makes a Debian 12 x86_64 machine ready to build, test and run breakwater.
//!
//! Every step checks first and changes nothing when the machine is already ready, so running it
//! again is cheap. It prints one `ok:` / `installing:` / `warning:` line per step and fails with
//! what is missing when it cannot fix it.

use std::{
    env, fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{anyhow, bail, Context, Result};

use crate::{describe, is_root, output, run as run_cmd};

const BPF_LINKER_VERSION: &str = "0.13.0";
/// `cargo fuzz` (`cargo xtask fuzz`, and the fuzz stage of `cargo xtask test`).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Python packages the tests run, pinned (a new release must not change a test's verdict), all
/// in one venv: [`VENV`] under `~/.cache/breakwater`. Add a package here rather than a venv.
const PYTHON_PACKAGES: &[(&str, &str)] = &[
    // Validates deploy/kubernetes against the Kubernetes schemas (tests/tests/deploy.rs).
    ("kubernetes-validate", "1.37.0"),
    // A gRPC client that knows none of our .proto files: server reflection and health checks
    // against the agent (tests/python/grpc_probe.py, run by tests/tests/observability.rs).
    ("grpcio", "1.85.1"),
    ("grpcio-reflection", "1.85.1"),
    ("grpcio-health-checking", "1.85.1"),
];

/// The tests' Python venv, under `~/.cache/breakwater` (tests/tests/deploy.rs finds it there).
const VENV: &str = "venv";

pub fn run() -> Result<()> {
    let root = is_root();
    toolchain()?;
    check_cargo_fuzz()?;
    check_mount("bpffs", "bpf", "/sys/fs/bpf", root)?;
    check_mount("tracefs", "tracefs", "/sys/kernel/tracing", root)?;
    check_ss(root)?;
    check_cgroup2()?;
    check_python_venv(root)?;
    check_promtool(root)?;
    check_etcd(root)?;
    check_nginx(root)?;
    check_bpftrace(root)?;
    check_containers(root)?;
    check_vm_tools(root)?;
    Ok(())
}

/// What building and linting need (the part of `run` that `cargo xtask lint` runs): nightly
/// with rust-src and clippy, clippy and rustfmt on the toolchain that runs xtask, bpf-linker,
/// protoc.
pub fn toolchain() -> Result<()> {
    check_nightly()?;
    check_component("nightly", "rust-src")?;
    check_component("nightly", "clippy")?;
    let active = output(Command::new("rustup").args(["show", "active-toolchain"]))?;
    let active = active
        .split_whitespace()
        .next()
        .context("`rustup show active-toolchain` printed nothing")?;
    check_component(active, "clippy")?;
    check_component(active, "rustfmt")?;
    check_bpf_linker()?;
    check_protoc(is_root())?;
    Ok(())
}

/// The version of the `cargo-fuzz` on PATH, if one runs.
fn cargo_fuzz_version() -> Option<String> {
    let path = which::which("cargo-fuzz").ok()?;
    // `cargo-fuzz 0.13.2`
    let out = output(Command::new(path).arg("--version")).ok()?;
    out.split_whitespace().nth(1).map(str::to_owned)
}

/// cargo-fuzz [`CARGO_FUZZ_VERSION`], installed with `cargo install --locked` when it is
/// missing or another version (about a minute).
pub fn check_cargo_fuzz() -> Result<()> {
    let found = cargo_fuzz_version();
    if found.as_deref() != Some(CARGO_FUZZ_VERSION) {
        println!(
            "installing: cargo-fuzz {CARGO_FUZZ_VERSION} (cargo install --locked; found: {})",
            found.as_deref().unwrap_or("none")
        );
        run_cmd(
            Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
                .args(["install", "cargo-fuzz", "--version", CARGO_FUZZ_VERSION])
                .args(["--locked", "--force"]),
        )?;
    }
    match cargo_fuzz_version() {
        Some(v) if v == CARGO_FUZZ_VERSION => {
            println!("ok: cargo-fuzz {v}");
            Ok(())
        }
        other => bail!(
            "cargo-fuzz {CARGO_FUZZ_VERSION} was installed but `cargo-fuzz --version` says {}; \
             is cargo's bin directory ($CARGO_HOME/bin, usually ~/.cargo/bin) on PATH?",
            other.as_deref().unwrap_or("nothing")
        ),
    }
}

/// The installed toolchain called plain `nightly` (not a dated one), which aya-build uses.
fn check_nightly() -> Result<()> {
    let list = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to find the nightly toolchain")?;
    let name = list
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .find(|name| is_plain_nightly(name));
    match name {
        Some(name) => {
            println!("ok: toolchain {name}");
            Ok(())
        }
        None => bail!(
            "the `nightly` toolchain is not installed (`rustup toolchain list` has no nightly-<host>); \
             the eBPF programs are built with it (-Z build-std). It cannot be installed from here \
             (RUSTUP_AUTO_INSTALL=0, no toolchain downloads): provide it on the machine, e.g. \
             `rustup toolchain install nightly --profile minimal --component rust-src`"
        ),
    }
}

fn is_plain_nightly(name: &str) -> bool {
    name == "nightly"
        || name
            .strip_prefix("nightly-")
            .is_some_and(|host| !host.starts_with(|c: char| c.is_ascii_digit()))
}

/// A rustup component of `toolchain`, added when missing.
fn check_component(toolchain: &str, component: &str) -> Result<()> {
    let installed = || -> Result<bool> {
        let list = output(Command::new("rustup").args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            toolchain,
        ]))?;
        Ok(list.lines().any(|line| line.starts_with(component)))
    };
    if installed()? {
        println!("ok: {component} for {toolchain}");
        return Ok(());
    }
    let mut add = Command::new("rustup");
    add.args(["component", "add", component, "--toolchain", toolchain]);
    println!(
        "installing: {component} for {toolchain} ({})",
        describe(&add)
    );
    run_cmd(&mut add)?;
    if !installed()? {
        bail!(
            "`{}` succeeded but {component} is still not listed",
            describe(&add)
        );
    }
    println!("ok: {component} for {toolchain}");
    Ok(())
}

/// `bpf-linker` found on PATH that runs on its own (not only under `rustup run`) and is 0.13.
fn bpf_linker() -> Result<(String, PathBuf), String> {
    let path = which::which("bpf-linker").map_err(|_| "bpf-linker is not on PATH".to_string())?;
    let version = output(Command::new(&path).arg("--version"))
        .map_err(|e| format!("{} does not run: {e:#}", path.display()))?;
    let version = version
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    if !version.starts_with("0.13.") {
        return Err(format!(
            "{} is version {version:?}, need 0.13",
            path.display()
        ));
    }
    Ok((version, path))
}

fn check_bpf_linker() -> Result<()> {
    if let Err(why) = bpf_linker() {
        println!(
            "installing: bpf-linker {BPF_LINKER_VERSION} against nightly's libLLVM, about 2 minutes ({why})"
        );
        install_bpf_linker()?;
    }
    let (version, path) = bpf_linker().map_err(|why| {
        anyhow!(
            "bpf-linker was installed but the check still fails: {why}; \
             is cargo's bin directory ($CARGO_HOME/bin, usually ~/.cargo/bin) on PATH?"
        )
    })?;
    println!("ok: bpf-linker {version} ({})", path.display());
    Ok(())
}

/// Builds bpf-linker against nightly's own shared libLLVM (see shared/TOOLCHAIN.md): a prefix
/// whose lib/ holds libLLVM.so and the soname, both linked to the nightly sysroot's library.
fn install_bpf_linker() -> Result<()> {
    let version = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let major: u32 = version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version:"))
        .and_then(|v| v.trim().split('.').next()?.parse().ok())
        .context("`rustc +nightly -vV` printed no \"LLVM version: N.x\" line")?;

    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let libdir = Path::new(sysroot.trim()).join("lib");
    let pattern = format!("libLLVM.so.{major}");
    let mut candidates: Vec<PathBuf> = fs::read_dir(&libdir)
        .with_context(|| format!("reading {}", libdir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with(&pattern))
        })
        .collect();
    candidates.sort();
    let lib = candidates.pop().with_context(|| {
        format!(
            "no {pattern}* in {}: the nightly toolchain ships no shared libLLVM to build bpf-linker against",
            libdir.display()
        )
    })?;
    let soname = lib.file_name().context("libLLVM path has no file name")?;

    let home = env::var_os("HOME").context("HOME is not set")?;
    let prefix = Path::new(&home)
        .join(".cache/breakwater")
        .join(format!("llvm-{major}"));
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    for link in [prefix_lib.join("libLLVM.so"), prefix_lib.join(soname)] {
        replace_symlink(&lib, &link)?;
    }

    run_cmd(
        Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--locked", "--force", "--no-default-features", "--features"])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix),
    )
}

fn replace_symlink(target: &Path, link: &Path) -> Result<()> {
    if fs::read_link(link).is_ok_and(|current| current == target) {
        return Ok(());
    }
    match fs::remove_file(link) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", link.display())),
    }
    symlink(target, link)
        .with_context(|| format!("linking {} -> {}", link.display(), target.display()))
}

fn is_mounted(fstype: &str, path: &str) -> Result<bool> {
    breakwater_common::mounts::is_mounted(fstype, Path::new(path))
        .context("reading /proc/self/mounts")
}

fn check_mount(what: &str, fstype: &str, path: &str, root: bool) -> Result<()> {
    if is_mounted(fstype, path)? {
        println!("ok: {what} mounted at {path}");
        return Ok(());
    }
    if !root {
        println!(
            "warning: {what} is not mounted at {path} (not root, so not mounting it; \
             as root: mount -t {fstype} {fstype} {path})"
        );
        return Ok(());
    }
    println!("installing: {what} at {path} (mount -t {fstype} {fstype} {path})");
    run_cmd(Command::new("mount").args(["-t", fstype, fstype, path]))?;
    if !is_mounted(fstype, path)? {
        bail!(
            "`mount -t {fstype} {fstype} {path}` succeeded but /proc/self/mounts does not show it"
        );
    }
    println!("ok: {what} mounted at {path}");
    Ok(())
}

fn check_ss(root: bool) -> Result<()> {
    if let Ok(path) = which::which("ss") {
        println!("ok: ss ({})", path.display());
        return Ok(());
    }
    if !root {
        bail!("the `ss` command is missing: install the Debian package iproute2 as root (apt-get install -y iproute2), or run `cargo xtask setup` as root");
    }
    println!("installing: iproute2 for `ss` (apt-get install -y iproute2)");
    apt_install(&["iproute2"], &[])?;
    let path = which::which("ss")
        .map_err(|_| anyhow!("iproute2 was installed but `ss` is still not on PATH"))?;
    println!("ok: ss ({})", path.display());
    Ok(())
}

/// `apt-get install -y [options] packages`; `apt-get update` first only when the install fails
/// (stale or missing package lists), then once more.
fn apt_install(packages: &[&str], options: &[&str]) -> Result<()> {
    let install = || {
        run_cmd(
            Command::new("apt-get")
                .args(["install", "-y"])
                .args(options)
                .args(packages)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    if install().is_ok() {
        return Ok(());
    }
    println!("installing: the install failed; apt-get update, then again");
    run_cmd(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    install()
}

/// Debian packages `cargo xtask vm-test` needs, each with the command that shows it is there.
const VM_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "qemu-system-x86_64"),
    // Static, so the guest needs no libraries for it.
    ("busybox-static", "busybox"),
    ("cpio", "cpio"),
    // Decompresses 6.12's .ko.xz modules on the host.
    ("xz-utils", "xz"),
    // setpriv, which tests/tests/remote.rs runs in the guest.
    ("util-linux", "setpriv"),
    // objcopy strips the test binaries' debug info before they go into the guest's RAM.
    ("binutils", "objcopy"),
];

fn is_installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f", "${Status}", package]))
        .is_ok_and(|status| status == "install ok installed")
}

/// QEMU, busybox-static and friends for `cargo xtask vm-test` (kernels are fetched by vm-test
/// itself, into ~/.cache/breakwater/kernels).
fn check_vm_tools(root: bool) -> Result<()> {
    let present =
        |(package, command): &(&str, &str)| is_installed(package) && which::which(command).is_ok();
    let missing: Vec<&str> = VM_PACKAGES
        .iter()
        .filter(|p| !present(p))
        .map(|(package, _)| *package)
        .collect();
    if !missing.is_empty() {
        let list = missing.join(" ");
        if !root {
            println!(
                "warning: {list} missing for `cargo xtask vm-test` (not root, so not installing; \
                 as root: apt-get install -y --no-install-recommends {list})"
            );
            return Ok(());
        }
        println!("installing: {list} for vm-test (apt-get install -y --no-install-recommends)");
        apt_install(&missing, &["--no-install-recommends"])?;
        if let Some((package, command)) = VM_PACKAGES.iter().find(|p| !present(p)) {
            bail!("{package} was installed but `{command}` is still not on PATH");
        }
    }
    let list: Vec<&str> = VM_PACKAGES.iter().map(|(package, _)| *package).collect();
    println!("ok: {} (for vm-test)", list.join(", "));
    Ok(())
}

/// Debian's promtool, which tests/tests/observability.rs runs on the agent's `/metrics`.
const PROMTOOL: &str = "/usr/bin/promtool";

/// promtool comes in Debian's `prometheus` package, with the Prometheus server (installed by
/// [`apt_install_stopped`], so not left running). `--no-install-recommends` also leaves out
/// prometheus-node-exporter, another server. A prometheus package that was already installed is
/// left as it is.
fn check_promtool(root: bool) -> Result<()> {
    let present = || is_installed("prometheus") && Path::new(PROMTOOL).is_file();
    if !present() {
        if !root {
            println!(
                "warning: promtool is missing for tests/tests/observability.rs (not root, so not \
                 installing; as root: apt-get install -y --no-install-recommends prometheus, then \
                 stop and disable its server)"
            );
            return Ok(());
        }
        println!(
            "installing: prometheus for promtool (apt-get install -y --no-install-recommends; \
             its server is not left running)"
        );
        apt_install_stopped(&["prometheus"], "prometheus")?;
        if !present() {
            bail!("the prometheus package was installed but {PROMTOOL} is still missing");
        }
    }
    let version = output(Command::new(PROMTOOL).arg("--version"))?;
    let version = version.lines().next().unwrap_or_default();
    println!("ok: promtool ({PROMTOOL}: {version})");
    Ok(())
}

/// Debian's etcd 3.4, each package with the file that shows it is there.
const ETCD_PACKAGES: &[(&str, &str)] = &[
    // The server tests/src/etcd.rs starts, one throwaway instance per test.
    ("etcd-server", "/usr/bin/etcd"),
    // etcdctl, to look into such a server by hand.
    ("etcd-client", "/usr/bin/etcdctl"),
];

/// etcd-server's postinst enables and starts `etcd.service` (or its init script): it is
/// installed by [`apt_install_stopped`], so no system etcd is left running or starting at boot.
/// Packages that were already installed are left as they are.
fn check_etcd(root: bool) -> Result<()> {
    let missing = missing_packages(ETCD_PACKAGES);
    if !missing.is_empty() {
        let list = missing.join(" ");
        if !root {
            println!(
                "warning: {list} missing for tests/tests/etcd.rs (not root, so not installing; as \
                 root: apt-get install -y --no-install-recommends {list}, then stop and disable \
                 etcd.service)"
            );
            return Ok(());
        }
        println!(
            "installing: {list} (apt-get install -y --no-install-recommends; the etcd server is \
             not left running)"
        );
        if missing.contains(&"etcd-server") {
            apt_install_stopped(&missing, "etcd")?;
        } else {
            apt_install(&missing, &["--no-install-recommends"])?;
        }
        if let Some((package, file)) = ETCD_PACKAGES.iter().find(|p| !package_present(p)) {
            bail!("the {package} package was installed but {file} is still missing");
        }
    }
    // `etcd Version: 3.4.23`, then the API, Go and platform lines.
    let version = output(Command::new("/usr/bin/etcd").arg("--version"))?;
    let version = version.lines().next().unwrap_or_default();
    println!("ok: etcd, etcdctl (/usr/bin/etcd: {version})");
    Ok(())
}

/// nginx, the real proxy of tests/tests/ejection.rs (an upstream of three servers).
const NGINX_PACKAGES: &[(&str, &str)] = &[("nginx", "/usr/sbin/nginx")];

/// nginx's postinst starts `nginx.service` on port 80: it is installed by
/// [`apt_install_stopped`], so no system nginx is left running or starting at boot. The test
/// runs its own instance, on loopback, from a config in a temporary directory.
fn check_nginx(root: bool) -> Result<()> {
    let missing = missing_packages(NGINX_PACKAGES);
    if !missing.is_empty() {
        if !root {
            println!(
                "warning: nginx missing for tests/tests/ejection.rs (not root, so not \
                 installing; as root: apt-get install -y --no-install-recommends nginx, then \
                 stop and disable nginx.service)"
            );
            return Ok(());
        }
        println!(
            "installing: nginx (apt-get install -y --no-install-recommends; its server is not \
             left running)"
        );
        apt_install_stopped(&missing, "nginx")?;
        if let Some((package, file)) = NGINX_PACKAGES.iter().find(|p| !package_present(p)) {
            bail!("the {package} package was installed but {file} is still missing");
        }
    }
    // `nginx -v` prints its version on stderr.
    let version = Command::new("/usr/sbin/nginx")
        .arg("-v")
        .output()
        .context("could not start /usr/sbin/nginx")?;
    println!(
        "ok: nginx ({})",
        String::from_utf8_lossy(&version.stderr).trim()
    );
    Ok(())
}

/// bpftrace, the bench's peer arms: the same connect loop under a bpftrace script on the
/// tracepoint breakwater uses (xtask/bpftrace/), for scale.
const BPFTRACE_PACKAGES: &[(&str, &str)] = &[("bpftrace", "/usr/bin/bpftrace")];

fn check_bpftrace(root: bool) -> Result<()> {
    let missing = missing_packages(BPFTRACE_PACKAGES);
    if !missing.is_empty() {
        if !root {
            println!(
                "warning: bpftrace missing for `cargo xtask bench`'s peer arms (not root, so \
                 not installing; as root: apt-get install -y --no-install-recommends bpftrace)"
            );
            return Ok(());
        }
        println!("installing: bpftrace for the bench (apt-get install -y --no-install-recommends)");
        apt_install(&missing, &["--no-install-recommends"])?;
        if let Some((package, file)) = BPFTRACE_PACKAGES.iter().find(|p| !package_present(p)) {
            bail!("the {package} package was installed but {file} is still missing");
        }
    }
    // `bpftrace v0.17.0`.
    let version = output(Command::new("/usr/bin/bpftrace").arg("--version"))?;
    println!("ok: bpftrace ({})", version.trim());
    Ok(())
}

/// `cargo xtask image` builds the agent's image with buildah; tests/tests/image.rs runs it with
/// podman on runc (crun, podman's other runtime, refuses a hybrid cgroup v1/v2 layout). Without
/// their recommends: fuse-overlayfs, slirp4netns and uidmap serve rootless containers only.
/// podman's units (podman.socket and friends) are started on demand, no server is left running.
const CONTAINER_PACKAGES: &[(&str, &str)] = &[
    ("buildah", "/usr/bin/buildah"),
    ("podman", "/usr/bin/podman"),
    ("runc", "/usr/sbin/runc"),
];

fn check_containers(root: bool) -> Result<()> {
    let missing = missing_packages(CONTAINER_PACKAGES);
    if !missing.is_empty() {
        let list = missing.join(" ");
        if !root {
            println!(
                "warning: {list} missing for `cargo xtask image` and tests/tests/image.rs (not \
                 root, so not installing; as root: apt-get install -y --no-install-recommends \
                 {list})"
            );
            return Ok(());
        }
        println!(
            "installing: {list} for the agent's image (apt-get install -y \
             --no-install-recommends)"
        );
        apt_install(&missing, &["--no-install-recommends"])?;
        if let Some((package, file)) = CONTAINER_PACKAGES.iter().find(|p| !package_present(p)) {
            bail!("the {package} package was installed but {file} is still missing");
        }
    }
    // `buildah version 1.28.2 (image-spec ...)`, `podman version 4.3.1`, `runc version 1.1.5+ds1`.
    let mut versions = Vec::new();
    for (package, file) in CONTAINER_PACKAGES {
        let version = output(Command::new(file).arg("--version"))?;
        let version = version.split_whitespace().nth(2).unwrap_or("?").to_string();
        versions.push(format!("{package} {version}"));
    }
    println!("ok: {}", versions.join(", "));
    Ok(())
}

/// protoc and the well-known types' .proto files: the etcd-client crate's build script compiles
/// etcd's API with prost-build, which runs protoc, and they import
/// google/protobuf/descriptor.proto, which protoc finds only in /usr/include (libprotobuf-dev,
/// a recommend of protobuf-compiler).
const PROTOC_PACKAGES: &[(&str, &str)] = &[
    ("protobuf-compiler", "/usr/bin/protoc"),
    (
        "libprotobuf-dev",
        "/usr/include/google/protobuf/descriptor.proto",
    ),
];

/// Building the workspace needs protoc: without root there is nothing to do but say so.
fn check_protoc(root: bool) -> Result<()> {
    let missing = missing_packages(PROTOC_PACKAGES);
    if !missing.is_empty() {
        let list = missing.join(" ");
        if !root {
            bail!(
                "{list} missing: the etcd-client crate's build script needs protoc and the \
                 protobuf well-known types; as root: apt-get install -y --no-install-recommends \
                 {list}, or run `cargo xtask setup` as root"
            );
        }
        println!("installing: {list} for protoc (apt-get install -y --no-install-recommends)");
        apt_install(&missing, &["--no-install-recommends"])?;
        if let Some((package, file)) = PROTOC_PACKAGES.iter().find(|p| !package_present(p)) {
            bail!("the {package} package was installed but {file} is still missing");
        }
    }
    let version = output(Command::new("/usr/bin/protoc").arg("--version"))?;
    println!("ok: protoc (/usr/bin/protoc: {})", version.trim());
    Ok(())
}

fn package_present((package, file): &(&str, &str)) -> bool {
    is_installed(package) && Path::new(file).exists()
}

fn missing_packages(packages: &[(&'static str, &str)]) -> Vec<&'static str> {
    packages
        .iter()
        .filter(|p| !package_present(p))
        .map(|(package, _)| *package)
        .collect()
}

/// `apt_install` (without recommends) of `packages`, one of which ships the server `service`,
/// without leaving that server running or starting at boot.
///
/// Debian's postinst of such a package enables `SERVICE.service` (even without systemd running:
/// it links the unit into multi-user.target.wants), starts it with systemd running, and
/// otherwise runs `update-rc.d SERVICE defaults` and `invoke-rc.d SERVICE start`, which starts
/// it only where the runlevel is known and /usr/sbin/policy-rc.d does not forbid it (in a
/// container `runlevel` fails, and Docker's images forbid every start). So with systemd the unit
/// is masked for the install (a runtime mask, gone at the next boot whatever happens), then
/// unmasked, disabled and stopped; without, `update-rc.d SERVICE disable` turns the rc links
/// into K links and removes the unit's link, and the server is stopped if it runs.
fn apt_install_stopped(packages: &[&str], service: &str) -> Result<()> {
    let systemd = Path::new("/run/systemd/system").is_dir();
    let unit = format!("{service}.service");
    let systemctl = |args: &[&str]| run_cmd(Command::new("systemctl").args(args).arg(&unit));
    if systemd {
        systemctl(&["mask", "--runtime"])?;
    }
    let installed = apt_install(packages, &["--no-install-recommends"]);
    if systemd {
        systemctl(&["unmask", "--runtime"])?;
    }
    installed?;
    if systemd {
        return systemctl(&["disable", "--now"]);
    }
    let init = Path::new("/etc/init.d").join(service);
    if init.is_file() {
        run_cmd(Command::new("update-rc.d").args([service, "disable"]))?;
        let running = Command::new(&init)
            .arg("status")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if running {
            run_cmd(Command::new(&init).arg("stop"))?;
        }
    }
    Ok(())
}

fn check_cgroup2() -> Result<()> {
    let cgroup2 =
        breakwater_common::mounts::find("cgroup2").context("reading /proc/self/mounts")?;
    match cgroup2 {
        Some(mount_point) => {
            println!("ok: cgroup2 mounted at {}", mount_point.display());
            Ok(())
        }
        None => bail!(
            "no cgroup2 filesystem is mounted (none in /proc/self/mounts): breakwater attaches its \
             programs to the cgroup v2 hierarchy; mount it (mount -t cgroup2 none /sys/fs/cgroup) \
             or boot with cgroup v2 enabled"
        ),
    }
}

/// The venv of [`PYTHON_PACKAGES`], made with Debian's python3 when there is one (it outlives
/// pyenv or PATH changes), else the python3 on PATH.
fn check_python_venv(root: bool) -> Result<()> {
    let home = env::var_os("HOME").context("HOME is not set")?;
    let venv = Path::new(&home).join(".cache/breakwater").join(VENV);
    let python = venv.join("bin/python");
    let missing = |python: &Path| -> Vec<String> {
        PYTHON_PACKAGES
            .iter()
            .filter(|(name, version)| {
                let script = format!("import importlib.metadata as m; print(m.version({name:?}))");
                output(Command::new(python).args(["-c", &script]))
                    .map_or(true, |found| found.trim() != *version)
            })
            .map(|(name, version)| format!("{name}=={version}"))
            .collect()
    };
    if !python.is_file() || output(Command::new(&python).arg("--version")).is_err() {
        let base = if Path::new("/usr/bin/python3").is_file() {
            PathBuf::from("/usr/bin/python3")
        } else {
            which::which("python3").map_err(|_| {
                anyhow!("python3 is missing: install the Debian packages python3 and python3-venv")
            })?
        };
        println!(
            "installing: Python venv {} ({} -m venv)",
            venv.display(),
            base.display()
        );
        let make = || {
            run_cmd(
                Command::new(&base)
                    .args(["-m", "venv", "--clear"])
                    .arg(&venv),
            )
        };
        if make().is_err() {
            if !root || base != Path::new("/usr/bin/python3") {
                bail!(
                    "`{} -m venv {}` failed: install the Debian package python3-venv (as root: \
                     apt-get install -y python3-venv) or run `cargo xtask setup` as root",
                    base.display(),
                    venv.display()
                );
            }
            println!("installing: python3-venv (apt-get install -y python3-venv)");
            apt_install(&["python3-venv"], &[])?;
            make()?;
        }
    }
    let wanted = missing(&python);
    if !wanted.is_empty() {
        println!("installing: {} into {}", wanted.join(" "), venv.display());
        run_cmd(
            Command::new(&python)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                ])
                .args(&wanted),
        )?;
        let still = missing(&python);
        if !still.is_empty() {
            bail!(
                "pip install succeeded but {} still does not report {}",
                python.display(),
                still.join(" ")
            );
        }
    }
    let list: Vec<String> = PYTHON_PACKAGES
        .iter()
        .map(|(name, version)| format!("{name} {version}"))
        .collect();
    println!("ok: Python venv {} ({})", venv.display(), list.join(", "));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_nightly_names() {
        assert!(is_plain_nightly("nightly"));
        assert!(is_plain_nightly("nightly-x86_64-unknown-linux-gnu"));
        assert!(!is_plain_nightly(
            "nightly-2024-01-01-x86_64-unknown-linux-gnu"
        ));
        assert!(!is_plain_nightly("stable-x86_64-unknown-linux-gnu"));
    }
}
