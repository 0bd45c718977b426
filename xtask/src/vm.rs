//! `cargo xtask vm-test`: the privileged integration tests inside Debian's stock kernels.
//!
//! Users run the agent on Debian 12's 6.1 and on 6.12, not on this machine's kernel; Debian 11's
//! 5.10 is too old for the agent's core, and the tests of that path run on it. For each of
//! those kernels this boots Debian's own package in QEMU (TCG: KVM hangs on this machine kind,
//! see shared/KERNEL.md) with an initramfs holding busybox, `ip`/`ss`/`setpriv`, the release
//! agent, the test binaries and the kernel modules the tests need, runs the test binaries one
//! after another in the guest and reads their output back from the serial console.

use std::{
    collections::{BTreeMap, BTreeSet},
    env, fmt, fs,
    io::{BufRead, BufReader, Read, Write},
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{output, run as run_cmd, Workspace};

/// A line of Debian kernel packages: names are `{prefix}N{suffix}`, the newest has the largest N.
pub struct KernelLine {
    /// What `--kernel` calls it.
    pub name: &'static str,
    prefix: &'static str,
    suffix: &'static str,
    /// The only test binaries that run on this line, whatever the selection (None: the
    /// selection alone decides).
    binaries: Option<&'static [&'static str]>,
    /// The `sources.list` line of the archive that has the line's packages when the machine's
    /// apt sources do not list it (None: the machine's sources). apt then runs with this line
    /// alone and package lists of its own in the kernel cache ([`Apt`]).
    apt_source: Option<&'static str>,
}

/// The kernels users run, Debian 12's default and the 6.12 backport, then Debian 11's 5.10, too
/// old for the agent's core: its verifier refuses `bpf_sk_storage_get` in tracing programs,
/// so the agent stops with exit 69 and the reason, and only the `kernel` tests (that path and
/// the wait mode) run there; every other test needs a running agent. The cloud flavour boots
/// fast and has BTF, cgroup BPF and INET_DIAG_DESTROY built in.
pub const KERNELS: &[KernelLine] = &[
    KernelLine {
        name: "6.1",
        prefix: "linux-image-6.1.0-",
        suffix: "-cloud-amd64-unsigned",
        binaries: None,
        apt_source: None,
    },
    KernelLine {
        name: "6.12",
        prefix: "linux-image-6.12.",
        suffix: "+deb12-cloud-amd64-unsigned",
        binaries: None,
        apt_source: None,
    },
    KernelLine {
        name: "5.10",
        prefix: "linux-image-5.10.0-",
        suffix: "-cloud-amd64-unsigned",
        binaries: Some(&["kernel"]),
        // Bullseye's main suite has had its last point release (11.11): its kernel package no
        // longer changes. Debian 12's debian-archive-keyring holds bullseye's keys.
        apt_source: Some(
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg target=Packages] \
             http://deb.debian.org/debian bullseye main",
        ),
    },
];

/// Modules the guest loads (their dependencies come along): `ss` and sock_diag SOCK_DESTROY
/// need inet_diag/tcp_diag, tests make veth pairs; all three are modules in the cloud kernels.
const MODULES: &[&str] = &["inet_diag", "tcp_diag", "veth"];

/// Test binaries that cannot run in the guest: deploy.rs runs `systemd-analyze` and the Python
/// venv's `kubernetes-validate` (host tools, ~/.cache/breakwater/venv), and checks files, not the
/// kernel; etcd.rs runs the host's /usr/bin/etcd and tests the harness, not the kernel; fleet.rs
/// needs that etcd too (its agents' programs are the ones every other suite checks in the guest);
/// image.rs runs the agent's image with the host's podman and its container storage. The host
/// suite runs them.
const HOST_ONLY_BINARIES: &[&str] = &["deploy", "etcd", "fleet", "image"];

/// Single tests that need the host's Python venv (the grpcio client), Debian's promtool or a
/// tool the guest lacks, skipped in the guest.
const HOST_ONLY_TESTS: &[(&str, &str)] = &[
    (
        "observability",
        "reflection_and_health_serve_a_client_without_our_protos",
    ),
    ("observability", "metrics_pass_promtool_check"),
    // Hides cgroup2 with util-linux's unshare and umount in a mount namespace of its own.
    ("faults", "without_cgroup2_the_agent_says_so_and_exits_1"),
];

/// What a VM run takes by default: (test binary, test names; empty = every test of it that is
/// not host-only). `--full` and test filters take every binary that is not host-only.
const VM_DEFAULT: &[(&str, &[&str])] = &[
    ("api", &[]),
    ("breaker", &[]),
    ("ejection", &[]),
    ("faults", &[]),
    ("latency", &[]),
    ("observability", &[]),
    ("operate", &[]),
    ("remote", &[]),
    ("timewait", &[]),
    ("tracking", &[]),
    ("kernel", &[]),
];

/// How long one kernel's run may take, boot to power-off, before QEMU is killed: the whole
/// default set took 6–7 min under TCG here on a quiet day and 12–14 min on a slow one (6.1:
/// 698 s, 6.12: 830 s), and two hung kernels must still leave a cold CI run inside 90 minutes.
pub const TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// The marker the guest prints last, with the run's exit status.
const DONE_MARKER: &str = "BREAKWATER-VM-DONE rc=";
/// Printed by the guest once /init runs: `BREAKWATER-VM-BOOTED <release> <uptime s>`.
const BOOTED_MARKER: &str = "BREAKWATER-VM-BOOTED ";
/// Printed by the guest after each test binary: `BREAKWATER-VM-BIN <name> rc=N secs=S`.
const BIN_MARKER: &str = "BREAKWATER-VM-BIN ";

#[derive(clap::Args)]
pub struct Args {
    /// Kernels to boot: 6.1, 6.12, 5.10 or all
    #[arg(long, default_value = "all", value_parser = kernel_choices())]
    pub kernel: String,
    /// Every test that can run in the guest, not only the default subset
    #[arg(long)]
    pub full: bool,
    /// Seconds one kernel may take (boot, tests, power-off) before QEMU is killed
    #[arg(long, default_value_t = TIMEOUT.as_secs())]
    pub timeout: u64,
    /// Test this agent binary (e.g. a release artifact) instead of building target/release/breakwater
    #[arg(long, value_name = "PATH")]
    pub agent_bin: Option<PathBuf>,
    /// Test filters and libtest options for every test binary in the guest, after `--`
    #[arg(last = true)]
    pub test_args: Vec<String>,
}

/// What `--kernel` takes: a line's name or `all`.
fn kernel_choices() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(KERNELS.iter().map(|k| k.name).chain(["all"]))
}

/// The kernel lines `--kernel` names.
pub fn kernels(choice: &str) -> Vec<&'static KernelLine> {
    KERNELS
        .iter()
        .filter(|k| choice == "all" || k.name == choice)
        .collect()
}

/// `cargo xtask vm-test`: setup, build, then every chosen kernel in turn.
pub fn run(ws: &Workspace, args: &Args) -> Result<()> {
    crate::setup::run()?;
    let started = Instant::now();
    let agent = match &args.agent_bin {
        Some(path) => std::path::absolute(path)?,
        None => crate::build_release(ws)?,
    };
    let tests = build_tests(ws)?;
    println!("== build: {} s", started.elapsed().as_secs());
    let runs = run_kernels(
        ws,
        &agent,
        &tests,
        &kernels(&args.kernel),
        &Selection {
            full: args.full,
            filters: args.test_args.clone(),
        },
        Duration::from_secs(args.timeout),
    )?;
    print_summary(&runs);
    let failed: Vec<&str> = runs
        .iter()
        .filter(|r| !r.ok())
        .map(|r| r.line.name)
        .collect();
    if !failed.is_empty() {
        bail!("vm-test failed on kernel {}", failed.join(", "));
    }
    Ok(())
}

/// A test binary built by cargo: its target name (`tracking`) and executable.
pub struct TestBinary {
    pub name: String,
    pub path: PathBuf,
}

/// Builds the integration tests (the same command the host suite runs, so it reuses them) and
/// returns their executables.
pub fn build_tests(ws: &Workspace) -> Result<Vec<TestBinary>> {
    let mut cmd = ws.cargo();
    cmd.args([
        "test",
        "--package",
        "breakwater-tests",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    // JSON on stdout; progress and compiler errors on stderr, shown as they come.
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the integration tests failed ({})", out.status);
    }
    let json = String::from_utf8_lossy(&out.stdout);
    let mut bins = test_binaries(&json)?;
    bins.sort_by(|a, b| a.name.cmp(&b.name));
    if bins.is_empty() {
        bail!("`cargo test -p breakwater-tests --no-run` reported no test executables");
    }
    Ok(bins)
}

/// The test executables in cargo's JSON messages.
fn test_binaries(json: &str) -> Result<Vec<TestBinary>> {
    let mut bins = Vec::new();
    for line in json.lines().filter(|l| l.starts_with('{')) {
        let msg: serde_json::Value = serde_json::from_str(line).context("cargo JSON message")?;
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let (Some(name), Some(path)) = (msg["target"]["name"].as_str(), msg["executable"].as_str())
        else {
            continue;
        };
        bins.push(TestBinary {
            name: name.to_string(),
            path: PathBuf::from(path),
        });
    }
    Ok(bins)
}

/// Which tests to run: the default subset, `--full`, or the user's filters on every binary.
pub struct Selection {
    pub full: bool,
    pub filters: Vec<String>,
}

/// One test binary run in the guest, with its arguments after `--test-threads=1`.
#[derive(Debug, PartialEq)]
struct GuestRun {
    binary: String,
    args: Vec<String>,
}

/// The guest's runs on `line` for these binaries, and notes on binaries left out.
fn guest_runs(
    binaries: &[String],
    selection: &Selection,
    line: &KernelLine,
) -> (Vec<GuestRun>, Vec<String>) {
    let mut runs = Vec::new();
    let mut notes = Vec::new();
    let everything = selection.full || !selection.filters.is_empty();
    for binary in binaries {
        if HOST_ONLY_BINARIES.contains(&binary.as_str())
            || line
                .binaries
                .is_some_and(|only| !only.contains(&binary.as_str()))
        {
            continue;
        }
        let skips = HOST_ONLY_TESTS
            .iter()
            .filter(|(b, _)| b == binary)
            .flat_map(|(_, test)| ["--skip".to_string(), test.to_string()]);
        if everything {
            let mut args = selection.filters.clone();
            args.extend(skips);
            runs.push(GuestRun {
                binary: binary.clone(),
                args,
            });
            continue;
        }
        match VM_DEFAULT.iter().find(|(b, _)| b == binary) {
            None => notes.push(format!(
                "note: test binary `{binary}` is not in the VM's default subset (VM_DEFAULT in \
                 xtask/src/vm.rs); --full runs it"
            )),
            Some((_, [])) => runs.push(GuestRun {
                binary: binary.clone(),
                args: skips.collect(),
            }),
            Some((_, tests)) => {
                let mut args: Vec<String> = tests.iter().map(|t| t.to_string()).collect();
                args.push("--exact".to_string());
                runs.push(GuestRun {
                    binary: binary.clone(),
                    args,
                });
            }
        }
    }
    (runs, notes)
}

/// Boots every kernel in `lines` in turn with the tests `selection` picks.
pub fn run_kernels(
    ws: &Workspace,
    agent: &Path,
    tests: &[TestBinary],
    lines: &[&'static KernelLine],
    selection: &Selection,
    timeout: Duration,
) -> Result<Vec<KernelRun>> {
    let names: Vec<String> = tests.iter().map(|t| t.name.clone()).collect();
    let mut line_runs = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    for line in lines {
        let (runs, line_notes) = guest_runs(&names, selection, line);
        for note in line_notes {
            if !notes.contains(&note) {
                notes.push(note);
            }
        }
        line_runs.push(runs);
    }
    for note in &notes {
        println!("{note}");
    }
    // One root for every line, with the test binaries any of them runs; each line's initramfs
    // takes only its own.
    let mut all_runs: Vec<&GuestRun> = Vec::new();
    for run in line_runs.iter().flatten() {
        if !all_runs.iter().any(|r| r.binary == run.binary) {
            all_runs.push(run);
        }
    }
    let work = ws.target_dir()?.join("vm-test");
    let started = Instant::now();
    let root = work.join("root");
    let staged = stage_root(&root, agent, tests, &all_runs)?;
    println!(
        "vm: initramfs base staged in {} s ({} MiB): busybox, ip, ss, setpriv, the agent, {} \
         test binaries",
        started.elapsed().as_secs(),
        staged / (1 << 20),
        all_runs.len()
    );
    let mut results = Vec::new();
    for (line, runs) in lines.iter().zip(&line_runs) {
        let started = Instant::now();
        let only = match line.binaries {
            Some(only) => format!(" (test binaries: {} only)", only.join(", ")),
            None => String::new(),
        };
        println!("== vm {}: preparing{only}", line.name);
        let result = match prepare_kernel(line).and_then(|kernel| {
            let (initrd, staged) = pack_initrd(&root, &work, &kernel, runs)?;
            let mut run = boot(line, &kernel, &initrd, &work, staged, timeout)?;
            // Without filters something must run: zero tests means the guest ran none of them.
            if selection.filters.is_empty() && run.ok() && run.passed() == 0 {
                run.problem = Some("no test ran in the guest".to_string());
            }
            Ok(run)
        }) {
            Ok(run) => run,
            Err(error) => KernelRun::failed(line, format!("{error:#}"), started.elapsed()),
        };
        result.print_report();
        results.push(result);
    }
    Ok(results)
}

// ---------------------------------------------------------------------------------------------
// Kernel packages

/// An unpacked kernel package in the cache.
pub struct Kernel {
    /// `6.1.0-57-cloud-amd64`
    release: String,
    vmlinuz: PathBuf,
    /// `lib/modules/<release>`
    modules: PathBuf,
}

fn cache_dir() -> Result<PathBuf> {
    let home = env::var_os("HOME").context("HOME is not set")?;
    Ok(Path::new(&home).join(".cache/breakwater/kernels"))
}

/// The apt-cache regex for a line's package names.
fn apt_pattern(line: &KernelLine) -> String {
    let escape = |s: &str| s.replace('.', r"\.").replace('+', r"\+");
    format!("^{}[0-9]+{}$", escape(line.prefix), escape(line.suffix))
}

/// The package number N of `name` if it belongs to `line`.
fn package_number(line: &KernelLine, name: &str) -> Option<u64> {
    let middle = name.strip_prefix(line.prefix)?.strip_suffix(line.suffix)?;
    if middle.is_empty() || !middle.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    middle.parse().ok()
}

/// The newest package of `line` in `apt-cache search` output (`NAME - description` lines).
fn newest_package(line: &KernelLine, search: &str) -> Option<String> {
    search
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|name| Some((package_number(line, name)?, name)))
        .max()
        .map(|(_, name)| name.to_string())
}

/// How apt runs for a line's packages: with the machine's configuration, or, for a line with an
/// `apt_source`, with that source alone and package lists of its own under the kernel cache
/// (`apt-5.10/`), so that an archive the machine's sources do not list needs no change to them.
struct Apt {
    /// The private configuration's directory; None: the machine's.
    dir: Option<PathBuf>,
}

impl Apt {
    fn for_line(cache: &Path, line: &KernelLine) -> Result<Self> {
        let Some(source) = line.apt_source else {
            return Ok(Self { dir: None });
        };
        let dir = cache.join(format!("apt-{}", line.name));
        for sub in ["lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let list = dir.join("sources.list");
        let text = format!("{source}\n");
        if fs::read_to_string(&list).ok().as_deref() != Some(text.as_str()) {
            fs::write(&list, text).with_context(|| format!("writing {}", list.display()))?;
        }
        Ok(Self { dir: Some(dir) })
    }

    /// `program` (apt-get, apt-cache) with this configuration.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        if let Some(dir) = &self.dir {
            cmd.args(private_apt_options(dir));
        }
        cmd
    }

    /// Whether the private configuration has no package lists yet (the machine's: never said).
    fn lists_missing(&self) -> bool {
        let Some(dir) = &self.dir else {
            return false;
        };
        !fs::read_dir(dir.join("lists")).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
        })
    }

    fn update(&self) -> Result<()> {
        run_cmd(self.command("apt-get").arg("update").stdout(Stdio::null()))
    }

    /// The sources it reads, for messages.
    fn sources(&self) -> String {
        match &self.dir {
            Some(dir) => dir.join("sources.list").display().to_string(),
            None => "the machine's apt sources".to_string(),
        }
    }
}

/// apt's options for the sources list, package lists and caches in `dir` instead of the
/// machine's (whose apt.conf.d, for proxies and the like, still applies). apt downloads as root:
/// its sandbox user `_apt` cannot enter root's home, and apt would fall back to root anyway,
/// with a warning.
fn private_apt_options(dir: &Path) -> Vec<std::ffi::OsString> {
    let mut args = Vec::new();
    for (key, value) in [
        ("Dir::Etc::sourcelist", dir.join("sources.list")),
        ("Dir::Etc::sourceparts", PathBuf::from("-")),
        ("Dir::State::Lists", dir.join("lists")),
        ("Dir::Cache", dir.join("cache")),
        ("APT::Sandbox::User", PathBuf::from("root")),
    ] {
        let mut option = std::ffi::OsString::from(format!("{key}="));
        option.push(value);
        args.push("-o".into());
        args.push(option);
    }
    args
}

fn newest_available(line: &KernelLine, apt: &Apt) -> Result<String> {
    let search =
        output(
            apt.command("apt-cache")
                .args(["search", "--names-only", &apt_pattern(line)]),
        )?;
    newest_package(line, &search).with_context(|| {
        let hint = if apt.dir.is_some() {
            String::new()
        } else {
            " (is this Debian 12 with bookworm-security in its sources? try `apt-get update`)"
                .to_string()
        };
        format!(
            "apt-cache knows no {}N{} package in {}{hint}",
            line.prefix,
            line.suffix,
            apt.sources()
        )
    })
}

/// The newest kernel package of `line`, downloaded and unpacked into the cache unless it is
/// there already; older cached packages of the line are removed.
fn prepare_kernel(line: &KernelLine) -> Result<Kernel> {
    let cache = cache_dir()?;
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let apt = Apt::for_line(&cache, line)?;
    if apt.lists_missing() {
        println!("vm: apt-get update for {}", apt.sources());
        apt.update()?;
    }
    let fetch = || -> Result<String> {
        let package = newest_available(line, &apt)?;
        let tree = cache.join(&package);
        if tree.join("boot").is_dir() {
            println!("vm: {package} (cached in {})", cache.display());
        } else {
            unpack(&download(&cache, &package, &apt)?, &tree)?;
        }
        Ok(package)
    };
    let package = match fetch() {
        Ok(package) => package,
        Err(error) => {
            // Stale apt lists name packages the mirror has replaced (404), missing lists none:
            // refresh once and pick again.
            println!(
                "vm: {error:#}; running apt-get update for {} and trying again",
                apt.sources()
            );
            apt.update()?;
            fetch()?
        }
    };
    prune_cache(&cache, line, &package);
    kernel_in(&cache.join(&package))
}

/// `apt-get download` into the cache; returns the .deb.
fn download(cache: &Path, package: &str, apt: &Apt) -> Result<PathBuf> {
    if let Some(deb) = cached_deb(cache, package)? {
        return Ok(deb);
    }
    println!("vm: downloading {package}");
    // Into a scratch directory first: a failed download leaves nothing behind.
    let partial = cache.join(".download");
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir_all(&partial)?;
    output(
        apt.command("apt-get")
            .args(["download", package])
            .current_dir(&partial),
    )
    .with_context(|| format!("downloading {package}"))?;
    let deb = cached_deb(&partial, package)?
        .with_context(|| format!("apt-get download {package} left no .deb"))?;
    let dest = cache.join(deb.file_name().context("deb name")?);
    fs::rename(&deb, &dest)?;
    let _ = fs::remove_dir_all(&partial);
    Ok(dest)
}

fn cached_deb(dir: &Path, package: &str) -> Result<Option<PathBuf>> {
    let prefix = format!("{package}_");
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            return Ok(Some(dir.join(&*name)));
        }
    }
    Ok(None)
}

fn unpack(deb: &Path, tree: &Path) -> Result<()> {
    let mut partial = tree.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let _ = fs::remove_dir_all(&partial);
    run_cmd(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&partial))?;
    fs::rename(&partial, tree).with_context(|| format!("renaming to {}", tree.display()))
}

/// Removes the cached packages of `line` other than `keep` (each is ~100 MiB unpacked).
fn prune_cache(cache: &Path, line: &KernelLine, keep: &str) {
    let Ok(entries) = fs::read_dir(cache) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let package = name.split('_').next().unwrap_or_default();
        if package == keep || package_number(line, package).is_none() {
            continue;
        }
        println!("vm: removing {} (an older package)", entry.path().display());
        let path = entry.path();
        let _ = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
    }
}

fn kernel_in(tree: &Path) -> Result<Kernel> {
    let modules_root = tree.join("lib/modules");
    let release = fs::read_dir(&modules_root)
        .with_context(|| format!("reading {}", modules_root.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .with_context(|| format!("{} is empty", modules_root.display()))?;
    let vmlinuz = tree.join("boot").join(format!("vmlinuz-{release}"));
    if !vmlinuz.is_file() {
        bail!("{} is missing", vmlinuz.display());
    }
    Ok(Kernel {
        modules: modules_root.join(&release),
        release,
        vmlinuz,
    })
}

// ---------------------------------------------------------------------------------------------
// Kernel modules

/// A module's name as the kernel spells it (`-` and `_` are the same) and its compression.
fn module_name(file: &str) -> Option<(String, &'static str)> {
    [".ko", ".ko.xz"].into_iter().find_map(|ext| {
        let stem = file.strip_suffix(ext)?;
        Some((stem.replace('-', "_"), ext))
    })
}

/// Every module file under `dir`, by name.
fn module_index(dir: &Path, index: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            module_index(&path, index)?;
        } else if let Some((name, _)) = module_name(&entry.file_name().to_string_lossy()) {
            index.insert(name, path);
        }
    }
    Ok(())
}

/// A module file's ELF, decompressed (busybox insmod may not read .ko.xz).
fn module_elf(path: &Path) -> Result<Vec<u8>> {
    if path.extension().is_some_and(|e| e == "xz") {
        let out = Command::new("xz")
            .arg("-dc")
            .arg(path)
            .output()
            .context("running xz (Debian package xz-utils)")?;
        if !out.status.success() {
            bail!("xz -dc {} failed", path.display());
        }
        return Ok(out.stdout);
    }
    fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// The contents of an ELF64 little-endian file's section `name`.
fn elf_section<'a>(elf: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let u16_at = |at: usize| Some(u16::from_le_bytes(elf.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| {
        let v = u64::from_le_bytes(elf.get(at..at + 8)?.try_into().ok()?);
        usize::try_from(v).ok()
    };
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let shoff = u64_at(0x28)?;
    let shentsize = usize::from(u16_at(0x3a)?);
    let shnum = usize::from(u16_at(0x3c)?);
    let shstrndx = usize::from(u16_at(0x3e)?);
    let section = |i: usize| {
        let at = shoff.checked_add(i.checked_mul(shentsize)?)?;
        let (offset, size) = (u64_at(at + 24)?, u64_at(at + 32)?);
        Some((
            u32_at(at)? as usize,
            elf.get(offset..offset.checked_add(size)?)?,
        ))
    };
    let (_, names) = section(shstrndx)?;
    (0..shnum).find_map(|i| {
        let (name_at, data) = section(i)?;
        let rest = names.get(name_at..)?;
        let end = rest.iter().position(|&b| b == 0)?;
        (&rest[..end] == name.as_bytes()).then_some(data)
    })
}

/// The modules a module needs loaded first: `depends=` of its `.modinfo` (what depmod turns
/// into modules.dep, which Debian's package does not ship: depmod runs at install).
fn module_depends(elf: &[u8]) -> Result<Vec<String>> {
    let modinfo = elf_section(elf, ".modinfo").context("no .modinfo section")?;
    let mut depends = Vec::new();
    for list in modinfo
        .split(|&b| b == 0)
        .filter_map(|entry| entry.strip_prefix(b"depends="))
    {
        let list = String::from_utf8_lossy(list);
        depends.extend(
            list.split(',')
                .filter(|name| !name.is_empty())
                .map(|name| name.replace('-', "_")),
        );
    }
    Ok(depends)
}

/// `wanted` and everything they depend on, each after its dependencies.
fn load_order(
    wanted: &[&str],
    mut depends: impl FnMut(&str) -> Result<Vec<String>>,
) -> Result<Vec<String>> {
    fn visit(
        name: &str,
        depends: &mut dyn FnMut(&str) -> Result<Vec<String>>,
        order: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> Result<()> {
        if !seen.insert(name.to_string()) {
            return Ok(());
        }
        for dep in depends(name)? {
            visit(&dep, depends, order, seen)?;
        }
        order.push(name.to_string());
        Ok(())
    }
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for name in wanted {
        visit(name, &mut depends, &mut order, &mut seen)?;
    }
    Ok(order)
}

/// Writes [`MODULES`] and their dependencies into `dir`, decompressed; returns the load order.
fn stage_modules(kernel: &Kernel, dir: &Path) -> Result<Vec<String>> {
    let mut index = BTreeMap::new();
    module_index(&kernel.modules.join("kernel"), &mut index)?;
    let mut elves = BTreeMap::new();
    let order = load_order(MODULES, |name| {
        let path = index
            .get(name)
            .with_context(|| format!("module {name} is not in {}", kernel.modules.display()))?;
        let elf = module_elf(path)?;
        let deps = module_depends(&elf).with_context(|| format!("reading {}", path.display()))?;
        elves.insert(name.to_string(), elf);
        Ok(deps)
    })?;
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir)?;
    for name in &order {
        fs::write(dir.join(format!("{name}.ko")), &elves[name])?;
    }
    Ok(order)
}

// ---------------------------------------------------------------------------------------------
// The initramfs

/// The shared libraries `ldd` lists for a binary (none for a static one).
fn ldd_paths(ldd: &str) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for line in ldd.lines().map(str::trim) {
        if line.contains("=> not found") {
            bail!("ldd: {line}");
        }
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            paths.push(PathBuf::from(path));
        }
    }
    Ok(paths)
}

fn libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // A static binary (busybox-static): nothing to copy.
        if String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable")
            || text.contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    ldd_paths(&text)
}

/// Copies `binary` to `dest` without debug info (the test binaries are hundreds of MiB with
/// it, and the initramfs lives in the guest's RAM).
fn copy_stripped(binary: &Path, dest: &Path) -> Result<()> {
    let _ = fs::remove_file(dest);
    run_cmd(
        Command::new("objcopy")
            .arg("--strip-debug")
            .arg(binary)
            .arg(dest),
    )
}

/// Fills `root` with everything but the kernel's modules and /init; returns its size in bytes.
fn stage_root(root: &Path, agent: &Path, tests: &[TestBinary], runs: &[&GuestRun]) -> Result<u64> {
    if root.exists() {
        fs::remove_dir_all(root).with_context(|| format!("removing {}", root.display()))?;
    }
    // Merged /usr as on Debian 12, so that library paths from ldd land where the loader looks.
    for dir in [
        "usr/bin",
        "usr/lib",
        "usr/lib64",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "root",
        "tests",
        "mods",
    ] {
        fs::create_dir_all(root.join(dir))?;
    }
    for (link, target) in [
        ("bin", "usr/bin"),
        ("sbin", "usr/bin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
        ("usr/sbin", "bin"),
    ] {
        symlink(target, root.join(link))?;
    }
    let bin = root.join("usr/bin");
    let mut elves: Vec<PathBuf> = Vec::new();

    let busybox = which::which("busybox").context(
        "busybox is missing: run `cargo xtask setup` as root (Debian package busybox-static)",
    )?;
    fs::copy(&busybox, bin.join("busybox"))?;
    elves.push(busybox.clone());
    let applets = output(Command::new(&busybox).arg("--list"))?;
    // The real tools: busybox's ip has no netns, its setpriv no --groups; ss it lacks.
    let real = [
        ("ip", "iproute2"),
        ("ss", "iproute2"),
        ("setpriv", "util-linux"),
    ];
    for applet in applets.lines().map(str::trim) {
        // `--list` names busybox itself too.
        if !applet.is_empty()
            && applet != "busybox"
            && !real.iter().any(|(name, _)| *name == applet)
        {
            symlink("busybox", bin.join(applet))
                .with_context(|| format!("linking busybox applet {applet}"))?;
        }
    }
    for (name, package) in real {
        let path = which::which(name)
            .with_context(|| format!("`{name}` is missing (Debian package {package})"))?;
        fs::copy(&path, bin.join(name))?;
        elves.push(path);
    }

    // The proxy tests/tests/ejection.rs puts in front of its servers (the guest's own copy of
    // the host's nginx, from `cargo xtask setup`).
    let nginx = Path::new("/usr/sbin/nginx");
    if !nginx.exists() {
        bail!("/usr/sbin/nginx is missing: run `cargo xtask setup` as root (Debian package nginx)");
    }
    // /usr/sbin is a link to /usr/bin here.
    fs::copy(nginx, bin.join("nginx"))?;
    elves.push(nginx.to_path_buf());

    copy_stripped(agent, &bin.join("breakwater"))?;
    elves.push(agent.to_path_buf());
    for run in runs {
        let test = tests
            .iter()
            .find(|t| t.name == run.binary)
            .context("test binary")?;
        copy_stripped(&test.path, &root.join("tests").join(&test.name))?;
        elves.push(test.path.clone());
    }

    let mut libs = BTreeSet::new();
    for elf in &elves {
        libs.extend(libraries(elf)?);
    }
    for lib in libs {
        let dest = root.join(lib.strip_prefix("/").unwrap_or(&lib));
        if let Some(dir) = dest.parent() {
            fs::create_dir_all(dir)?;
        }
        fs::copy(&lib, &dest).with_context(|| format!("copying {}", lib.display()))?;
    }

    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    fs::write(
        root.join("etc/hosts"),
        "127.0.0.1 localhost\n::1 localhost\n",
    )?;
    dir_size(root)
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            total += dir_size(&entry.path())?;
        } else if kind.is_file() {
            total += entry.metadata()?.len();
        }
    }
    Ok(total)
}

/// `s` as one shell word.
fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The guest's /init: mounts, modules, then each test binary; prints the markers the host reads.
fn init_script(modules: &[String], runs: &[GuestRun]) -> String {
    let mut script = String::from(
        r#"#!/bin/sh
# Written by `cargo xtask vm-test` (xtask/src/vm.rs): runs the integration tests, then powers off.
export PATH=/usr/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /sys/fs/bpf /sys/fs/cgroup /sys/kernel/tracing
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t tracefs tracefs /sys/kernel/tracing
ip link set lo up
"#,
    );
    for module in modules {
        script.push_str(&format!(
            "insmod /mods/{module}.ko || echo \"BREAKWATER-VM: insmod {module} failed\"\n"
        ));
    }
    script.push_str(&format!(
        r#"echo "{BOOTED_MARKER}$(uname -r) $(cut -d' ' -f1 /proc/uptime)"
export BREAKWATER_BIN=/bin/breakwater CI=true
# libtest's per-test times (`<1.2s>` after each result) are behind -Z; RUSTC_BOOTSTRAP allows it.
export RUSTC_BOOTSTRAP=1
# The lowest MemAvailable while the tests run, to size the guest (builtins only: no forks).
(
    low=
    while :; do
        while read -r key kb unit; do [ "$key" = MemAvailable: ] && break; done </proc/meminfo
        if [ -z "$low" ] || [ "$kb" -lt "$low" ]; then low=$kb; echo "$low" >/run/mem-low; fi
        sleep 2
    done
) &
cd /tmp
# What this kernel lets the agent do, as it reports it (the README's kernel table comes from here).
echo "BREAKWATER-VM: features on $(uname -r):"
mkdir -p /sys/fs/cgroup/bw-features
/bin/breakwater agent --socket /run/features.sock --pin-dir /sys/fs/bpf/bw-features \
    --scope /bw-features --release-on-exit >/run/features.log 2>&1 &
agent=$!
i=0
while [ ! -S /run/features.sock ] && kill -0 $agent 2>/dev/null && [ $i -lt 600 ]; do
    sleep 0.1; i=$((i + 1))
done
if [ -S /run/features.sock ]; then
    /bin/breakwater --agent unix:///run/features.sock info | sed -n '/^ *FEATURE /,/^ *$/p'
    kill $agent
fi
wait $agent
echo "BREAKWATER-VM: agent exit status $?"
grep -E '^error' /run/features.log
rmdir /sys/fs/cgroup/bw-features
rc=0
run() {{
    name=$1; shift
    start=$(cut -d' ' -f1 /proc/uptime)
    /tests/$name --test-threads=1 --color=never -Z unstable-options --report-time "$@" </dev/null
    status=$?
    end=$(cut -d' ' -f1 /proc/uptime)
    echo "{BIN_MARKER}$name rc=$status secs=$(echo "$end $start" | awk '{{printf "%.1f", $1 - $2}}')"
    [ $status -eq 0 ] || rc=1
}}
"#
    ));
    for run in runs {
        let mut line = format!("run {}", sh_quote(&run.binary));
        for arg in &run.args {
            line.push(' ');
            line.push_str(&sh_quote(arg));
        }
        script.push_str(&line);
        script.push('\n');
    }
    script.push_str(&format!(
        r#"total=$(awk '/^MemTotal/ {{ print int($2 / 1024) }}' /proc/meminfo)
echo "BREAKWATER-VM: memory: at least $(( $(cat /run/mem-low) / 1024 )) MiB of $total available throughout"
echo "{DONE_MARKER}$rc"
# The console drains asynchronously: give the marker time to reach the host.
sleep 1
poweroff -f
"#
    ));
    script
}

/// The kernel's modules and /init into `root`, then `root` as a newc cpio archive, uncompressed:
/// the guest unpacks gzip slower under TCG than it copies (measured: /init at 5.7 s with
/// `gzip -1`, which took 2.9 s more on the host, against 4.3 s without). Of the test binaries
/// in `root` it takes those `runs` run. Returns the archive and the bytes of the files in it.
fn pack_initrd(
    root: &Path,
    work: &Path,
    kernel: &Kernel,
    runs: &[GuestRun],
) -> Result<(PathBuf, u64)> {
    let modules = stage_modules(kernel, &root.join("mods"))?;
    println!("vm: modules {}", modules.join(", "));
    let init = root.join("init");
    fs::write(&init, init_script(&modules, runs))?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;

    let leave_out: BTreeSet<PathBuf> = fs::read_dir(root.join("tests"))?
        .map(|entry| Ok(entry?.file_name()))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .filter(|name| !runs.iter().any(|r| name.to_str() == Some(&r.binary)))
        .map(|name| Path::new("./tests").join(name))
        .collect();
    let mut list = Vec::new();
    let size = list_tree(root, Path::new("."), &leave_out, &mut list)?;
    let initrd = work.join(format!("initrd-{}.cpio", kernel.release));
    let file = fs::File::create(&initrd)?;
    let mut cpio = Command::new("cpio")
        .args([
            "--null",
            "--create",
            "--format=newc",
            "--owner=0:0",
            "--quiet",
        ])
        .current_dir(root)
        .stdin(Stdio::piped())
        .stdout(file)
        .spawn()
        .context("running cpio (Debian package cpio)")?;
    cpio.stdin.take().context("cpio stdin")?.write_all(&list)?;
    let status = cpio.wait()?;
    if !status.success() {
        bail!("cpio failed ({status})");
    }
    Ok((initrd, size))
}

/// NUL-separated relative paths under `root` but those in `leave_out` (and what they hold),
/// each directory before what it holds; returns the bytes of the regular files listed.
fn list_tree(
    root: &Path,
    rel: &Path,
    leave_out: &BTreeSet<PathBuf>,
    list: &mut Vec<u8>,
) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let mut entries: Vec<_> = fs::read_dir(root.join(rel))?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    let mut size = 0;
    for entry in entries {
        let path = rel.join(entry.file_name());
        if leave_out.contains(&path) {
            continue;
        }
        list.extend_from_slice(path.as_os_str().as_bytes());
        list.push(0);
        let kind = entry.file_type()?;
        if kind.is_dir() {
            size += list_tree(root, &path, leave_out, list)?;
        } else if kind.is_file() {
            size += entry.metadata()?.len();
        }
    }
    Ok(size)
}

// ---------------------------------------------------------------------------------------------
// Booting and reading the console

/// A console line without terminal control: the firmware resets and clears the screen, which
/// must not reach the user's terminal.
fn printable(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                // CSI (`ESC [ params final`) or a two-character escape (`ESC c`).
                if chars.next() == Some('[') {
                    while chars.next().is_some_and(|c| !('@'..='~').contains(&c)) {}
                }
            }
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// `test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 5 filtered out; ...`
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TestResult {
    pub ok: bool,
    pub passed: u32,
    pub failed: u32,
    pub ignored: u32,
}

fn parse_test_result(line: &str) -> Option<TestResult> {
    let rest = &line[line.find("test result: ")? + "test result: ".len()..];
    let (verdict, counts) = rest.split_once(". ")?;
    let count = |what: &str| -> Option<u32> {
        counts
            .split(';')
            .map(str::trim)
            .find_map(|part| part.strip_suffix(what)?.trim().parse().ok())
    };
    Some(TestResult {
        ok: match verdict {
            "ok" => true,
            "FAILED" => false,
            _ => return None,
        },
        passed: count("passed")?,
        failed: count("failed")?,
        ignored: count("ignored").unwrap_or(0),
    })
}

/// The exit status in the guest's last line.
fn parse_done(line: &str) -> Option<i32> {
    let rest = &line[line.find(DONE_MARKER)? + DONE_MARKER.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// `(binary, exit status, seconds)` from a test binary's end marker.
fn parse_bin(line: &str) -> Option<(String, i32, f64)> {
    let rest = &line[line.find(BIN_MARKER)? + BIN_MARKER.len()..];
    let mut words = rest.split_whitespace();
    let name = words.next()?.to_string();
    let rc = words.next()?.strip_prefix("rc=")?.parse().ok()?;
    let secs = words.next()?.strip_prefix("secs=")?.parse().ok()?;
    Some((name, rc, secs))
}

/// A failed test's name from libtest's `test NAME ... FAILED` line.
fn parse_failed_test(line: &str) -> Option<&str> {
    let rest = line.strip_prefix("test ")?;
    let (name, verdict) = rest.split_once(" ... ")?;
    verdict.starts_with("FAILED").then_some(name)
}

/// One test binary's run in the guest.
pub struct BinaryRun {
    name: String,
    result: Option<TestResult>,
    rc: i32,
    secs: f64,
}

/// One kernel's run: what the console said and how it ended.
pub struct KernelRun {
    pub line: &'static KernelLine,
    pub release: String,
    binaries: Vec<BinaryRun>,
    failed_tests: Vec<String>,
    /// The guest's overall exit status, from its last line.
    done: Option<i32>,
    /// Why there is no verdict from the guest (no boot, hang, panic, error on the host).
    problem: Option<String>,
    pub elapsed: Duration,
    boot_secs: Option<f64>,
    log: Option<PathBuf>,
}

impl KernelRun {
    fn failed(line: &'static KernelLine, problem: String, elapsed: Duration) -> Self {
        Self {
            line,
            release: line.name.to_string(),
            binaries: Vec::new(),
            failed_tests: Vec::new(),
            done: None,
            problem: Some(problem),
            elapsed,
            boot_secs: None,
            log: None,
        }
    }

    pub fn ok(&self) -> bool {
        self.problem.is_none() && self.done == Some(0)
    }

    pub fn passed(&self) -> u32 {
        self.binaries
            .iter()
            .filter_map(|b| b.result)
            .map(|r| r.passed)
            .sum()
    }

    pub fn failed_count(&self) -> u32 {
        self.binaries
            .iter()
            .filter_map(|b| b.result)
            .map(|r| r.failed)
            .sum()
    }

    /// Reads one console line.
    fn take(&mut self, line: &str) {
        if let Some(rest) = line
            .find(BOOTED_MARKER)
            .map(|at| &line[at + BOOTED_MARKER.len()..])
        {
            let mut words = rest.split_whitespace();
            if let Some(release) = words.next() {
                self.release = release.to_string();
            }
            self.boot_secs = words.next().and_then(|s| s.parse().ok());
        } else if let Some(result) = parse_test_result(line) {
            // Kept until the binary's end marker claims it.
            self.binaries.push(BinaryRun {
                name: String::new(),
                result: Some(result),
                rc: -1,
                secs: 0.0,
            });
        } else if let Some((name, rc, secs)) = parse_bin(line) {
            match self.binaries.last_mut().filter(|b| b.name.is_empty()) {
                Some(run) => {
                    run.name = name;
                    run.rc = rc;
                    run.secs = secs;
                }
                // Crashed or killed before its summary line.
                None => self.binaries.push(BinaryRun {
                    name,
                    result: None,
                    rc,
                    secs,
                }),
            }
        } else if let Some(rc) = parse_done(line) {
            self.done = Some(rc);
        } else if let Some(name) = parse_failed_test(line) {
            self.failed_tests.push(name.to_string());
        }
    }

    fn verdict(&self) -> String {
        match (&self.problem, self.done) {
            (Some(problem), _) => format!("FAILED: {problem}"),
            (None, Some(0)) => "ok".to_string(),
            (None, Some(rc)) => format!("FAILED (guest exit status {rc})"),
            (None, None) => "FAILED (no verdict)".to_string(),
        }
    }

    /// The binaries' own summary lines, then the kernel's line.
    fn print_report(&self) {
        println!();
        for bin in &self.binaries {
            let name = if bin.name.is_empty() { "?" } else { &bin.name };
            match bin.result {
                Some(r) => println!(
                    "{name:>14}: test result: {}. {} passed; {} failed; {} ignored ({:.0} s)",
                    if r.ok { "ok" } else { "FAILED" },
                    r.passed,
                    r.failed,
                    r.ignored,
                    bin.secs
                ),
                None => println!(
                    "{name:>14}: no test result (exit status {}, {:.0} s): crashed?",
                    bin.rc, bin.secs
                ),
            }
        }
        for test in &self.failed_tests {
            println!("  failed: {test}");
        }
        if let Some(log) = &self.log {
            println!("  console log: {}", crate::shown(log).display());
        }
        let boot = self
            .boot_secs
            .map(|s| format!(", booted in {s:.1} s"))
            .unwrap_or_default();
        println!(
            "== kernel {}: {} ({} passed, {} failed) in {} s{boot}",
            self.release,
            self.verdict(),
            self.passed(),
            self.failed_count(),
            self.elapsed.as_secs()
        );
    }
}

impl fmt::Display for KernelRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<6} {:<30} {:<7} {:>6} {:>6} {:>6} s",
            self.line.name,
            self.release,
            if self.ok() { "ok" } else { "FAILED" },
            self.passed(),
            self.failed_count(),
            self.elapsed.as_secs()
        )
    }
}

pub fn print_summary(runs: &[KernelRun]) {
    println!();
    println!(
        "{:<6} {:<30} {:<7} {:>6} {:>6} {:>8}",
        "KERNEL", "RELEASE", "RESULT", "PASSED", "FAILED", "TIME"
    );
    for run in runs {
        println!("{run}");
    }
}

/// Guest memory: room for the unpacked initramfs (it lives in RAM, twice while unpacking) and
/// for several agents' preallocated maps.
fn guest_memory_mib(staged: u64) -> u64 {
    let staged_mib = staged.div_ceil(1 << 20);
    (1536 + 2 * staged_mib).div_ceil(256) * 256
}

fn boot(
    line: &'static KernelLine,
    kernel: &Kernel,
    initrd: &Path,
    work: &Path,
    staged: u64,
    timeout: Duration,
) -> Result<KernelRun> {
    let started = Instant::now();
    let log_path = work.join(format!("{}.log", kernel.release));
    let mut log = fs::File::create(&log_path)?;
    let memory = guest_memory_mib(staged);
    println!(
        "== vm {}: booting {} (QEMU TCG, 2 vCPUs, {memory} MiB; timeout {} s)",
        line.name,
        kernel.release,
        timeout.as_secs()
    );
    let mut qemu = Command::new("qemu-system-x86_64")
        // KVM hangs on this machine kind (shared/KERNEL.md): emulate.
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "2"])
        .arg("-m")
        .arg(memory.to_string())
        // No NIC: the guest needs only loopback and veth, and no iPXE ROM slows the boot.
        .args(["-nographic", "-no-reboot", "-nic", "none", "-kernel"])
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running qemu-system-x86_64 (Debian package qemu-system-x86; `cargo xtask setup` installs it)")?;

    let (tx, rx) = mpsc::channel::<String>();
    let readers: Vec<_> = [
        Box::new(qemu.stdout.take().context("qemu stdout")?) as Box<dyn Read + Send>,
        Box::new(qemu.stderr.take().context("qemu stderr")?),
    ]
    .into_iter()
    .map(|stream| {
        let tx = tx.clone();
        thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            while reader.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
                let _ = tx.send(printable(&String::from_utf8_lossy(&buf)));
                buf.clear();
            }
        })
    })
    .collect();
    drop(tx);

    let mut run = KernelRun {
        line,
        release: kernel.release.clone(),
        binaries: Vec::new(),
        failed_tests: Vec::new(),
        done: None,
        problem: None,
        elapsed: Duration::ZERO,
        boot_secs: None,
        log: Some(log_path.clone()),
    };
    let deadline = started + timeout;
    let mut last_lines: Vec<String> = Vec::new();
    loop {
        // Once the guest has said it is done, power-off should follow at once.
        let wait_until = if run.done.is_some() {
            deadline.min(Instant::now() + Duration::from_secs(30))
        } else {
            deadline
        };
        match rx.recv_timeout(wait_until.saturating_duration_since(Instant::now())) {
            Ok(text) => {
                println!("{text}");
                writeln!(log, "{text}")?;
                run.take(&text);
                last_lines.push(text);
                if last_lines.len() > 20 {
                    last_lines.remove(0);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = qemu.kill();
                if run.done.is_none() {
                    run.problem = Some(format!(
                        "no result after {} s: QEMU killed (hung, or the timeout is too short: \
                         --timeout)",
                        timeout.as_secs()
                    ));
                }
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = qemu.wait()?;
    for reader in readers {
        let _ = reader.join();
    }
    run.elapsed = started.elapsed();
    if run.problem.is_none() && run.done.is_none() {
        let what = if run.boot_secs.is_none() {
            "the guest never reached /init (kernel did not boot?)"
        } else {
            "the guest stopped before its last line (panic or crash?)"
        };
        run.problem = Some(format!(
            "{what}; QEMU exited ({status}); last console lines:\n    {}",
            last_lines.join("\n    ")
        ));
    }
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_newest_package_of_a_line() {
        let search = "\
linux-image-6.1.0-9-cloud-amd64-unsigned - Linux 6.1 for x86-64 cloud
linux-image-6.1.0-57-cloud-amd64-unsigned - Linux 6.1 for x86-64 cloud
linux-image-6.1.0-56-cloud-amd64-unsigned - Linux 6.1 for x86-64 cloud
linux-image-6.1.0-58-cloud-amd64-dbg - debug symbols
linux-image-6.1.0-60-rt-amd64-unsigned - Linux 6.1 for x86-64, PREEMPT_RT
linux-image-6.12.118+deb12-cloud-amd64-unsigned - Linux 6.12 for x86-64 cloud
linux-image-6.12.9+deb12-cloud-amd64-unsigned - Linux 6.12 for x86-64 cloud
linux-image-6.12.120+deb12-cloud-amd64 - signed
";
        assert_eq!(
            newest_package(&KERNELS[0], search).as_deref(),
            Some("linux-image-6.1.0-57-cloud-amd64-unsigned")
        );
        assert_eq!(
            newest_package(&KERNELS[1], search).as_deref(),
            Some("linux-image-6.12.118+deb12-cloud-amd64-unsigned")
        );
        assert_eq!(newest_package(&KERNELS[0], ""), None);
        assert_eq!(
            apt_pattern(&KERNELS[1]),
            r"^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64-unsigned$"
        );
    }

    #[test]
    fn the_5_10_line_is_debian_11s_from_its_own_apt_source() {
        let line = kernels("5.10")[0];
        let search = "\
linux-image-5.10.0-30-cloud-amd64-unsigned - Linux 5.10 for x86-64 cloud
linux-image-5.10.0-32-cloud-amd64-unsigned - Linux 5.10 for x86-64 cloud
linux-image-5.10.0-32-cloud-amd64 - Linux 5.10 for x86-64 cloud (signed)
linux-image-5.10.0-33-cloud-amd64-dbg - debug symbols
linux-image-5.10.0-35-amd64-unsigned - Linux 5.10 for 64-bit PCs
linux-image-6.1.0-57-cloud-amd64-unsigned - Linux 6.1 for x86-64 cloud
";
        assert_eq!(
            newest_package(line, search).as_deref(),
            Some("linux-image-5.10.0-32-cloud-amd64-unsigned")
        );
        // 6.1's names are not 5.10's, nor 5.10's 6.1's.
        assert_eq!(
            newest_package(&KERNELS[0], search).as_deref(),
            Some("linux-image-6.1.0-57-cloud-amd64-unsigned")
        );
        assert_eq!(
            apt_pattern(line),
            r"^linux-image-5\.10\.0-[0-9]+-cloud-amd64-unsigned$"
        );
        let source = line.apt_source.unwrap();
        assert!(source.starts_with("deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg"));
        assert!(source.ends_with(" http://deb.debian.org/debian bullseye main"));
        assert_eq!(line.binaries, Some(&["kernel"][..]));
        assert!(KERNELS[..2]
            .iter()
            .all(|k| k.apt_source.is_none() && k.binaries.is_none()));
    }

    #[test]
    fn a_private_apt_configuration() {
        let cache = tempfile::tempdir().unwrap();
        let line = kernels("5.10")[0];
        let apt = Apt::for_line(cache.path(), line).unwrap();
        let dir = cache.path().join("apt-5.10");
        assert_eq!(apt.dir.as_deref(), Some(dir.as_path()));
        assert_eq!(
            fs::read_to_string(dir.join("sources.list")).unwrap(),
            format!("{}\n", line.apt_source.unwrap())
        );
        assert!(apt.lists_missing());
        fs::write(
            dir.join("lists/deb.debian.org_debian_dists_bullseye_main_binary-amd64_Packages.lz4"),
            "",
        )
        .unwrap();
        assert!(!apt.lists_missing());
        let cmd = apt.command("apt-cache");
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let d = dir.display();
        assert_eq!(
            args,
            [
                "-o".to_string(),
                format!("Dir::Etc::sourcelist={d}/sources.list"),
                "-o".to_string(),
                "Dir::Etc::sourceparts=-".to_string(),
                "-o".to_string(),
                format!("Dir::State::Lists={d}/lists"),
                "-o".to_string(),
                format!("Dir::Cache={d}/cache"),
                "-o".to_string(),
                "APT::Sandbox::User=root".to_string(),
            ]
        );
        // The machine's apt for the other lines, as it is.
        let machine = Apt::for_line(cache.path(), &KERNELS[0]).unwrap();
        assert!(machine.dir.is_none() && !machine.lists_missing());
        assert_eq!(machine.command("apt-get").get_args().count(), 0);
        // Pruning a line's old packages leaves the private configuration alone.
        prune_cache(
            cache.path(),
            line,
            "linux-image-5.10.0-32-cloud-amd64-unsigned",
        );
        prune_cache(
            cache.path(),
            &KERNELS[0],
            "linux-image-6.1.0-57-cloud-amd64-unsigned",
        );
        assert!(dir.join("sources.list").is_file());
    }

    #[test]
    fn the_cache_keeps_one_package_per_line() {
        let cache = tempfile::tempdir().unwrap();
        let old = "linux-image-6.1.0-56-cloud-amd64-unsigned";
        let new = "linux-image-6.1.0-57-cloud-amd64-unsigned";
        let other = "linux-image-6.12.118+deb12-cloud-amd64-unsigned";
        for dir in [old, new, other] {
            fs::create_dir_all(cache.path().join(dir).join("boot")).unwrap();
            fs::write(cache.path().join(format!("{dir}_1_amd64.deb")), "").unwrap();
        }
        prune_cache(cache.path(), &KERNELS[0], new);
        let mut left: Vec<String> = fs::read_dir(cache.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                new.to_string(),
                format!("{new}_1_amd64.deb"),
                other.to_string(),
                format!("{other}_1_amd64.deb"),
            ]
        );
    }

    #[test]
    fn kernel_choice() {
        let names: Vec<&str> = kernels("all").iter().map(|k| k.name).collect();
        assert_eq!(names, ["6.1", "6.12", "5.10"]);
        assert_eq!(kernels("6.12")[0].name, "6.12");
        assert_eq!(kernels("5.10")[0].name, "5.10");
        let parser = kernel_choices();
        let choices: Vec<String> = clap::builder::TypedValueParser::possible_values(&parser)
            .unwrap()
            .map(|v| v.get_name().to_string())
            .collect();
        assert_eq!(choices, ["6.1", "6.12", "5.10", "all"]);
    }

    #[test]
    fn parses_test_results() {
        let ok = "test result: ok. 37 passed; 0 failed; 1 ignored; 0 measured; 2 filtered out; finished in 312.04s";
        assert_eq!(
            parse_test_result(ok),
            Some(TestResult {
                ok: true,
                passed: 37,
                failed: 0,
                ignored: 1
            })
        );
        let failed = "test result: FAILED. 1 passed; 7 failed; 0 ignored; 0 measured; 0 filtered out; finished in 3.10s";
        assert_eq!(
            parse_test_result(failed).map(|r| (r.ok, r.passed, r.failed)),
            Some((false, 1, 7))
        );
        assert_eq!(parse_test_result("test foo ... ok"), None);
        assert_eq!(
            parse_test_result("test result: maybe. 1 passed; 0 failed"),
            None
        );
    }

    #[test]
    fn parses_markers() {
        assert_eq!(parse_done("BREAKWATER-VM-DONE rc=0"), Some(0));
        assert_eq!(parse_done("[  3.1] x BREAKWATER-VM-DONE rc=1\r"), Some(1));
        assert_eq!(parse_done("BREAKWATER-VM-DONE rc="), None);
        assert_eq!(
            parse_bin("BREAKWATER-VM-BIN tracking rc=101 secs=95.3"),
            Some(("tracking".to_string(), 101, 95.3))
        );
        assert_eq!(
            parse_failed_test("test trip_rejects ... FAILED <1.2s>"),
            Some("trip_rejects")
        );
        assert_eq!(parse_failed_test("test trip_rejects ... ok"), None);
    }

    #[test]
    fn a_kernel_run_from_its_console() {
        let mut run = KernelRun::failed(&KERNELS[0], String::new(), Duration::ZERO);
        run.problem = None;
        for line in [
            "BREAKWATER-VM-BOOTED 6.1.0-57-cloud-amd64 2.51",
            "test a ... ok",
            "test b ... FAILED",
            "test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out",
            "BREAKWATER-VM-BIN api rc=101 secs=10.0",
            "BREAKWATER-VM-BIN breaker rc=139 secs=1.0",
            "BREAKWATER-VM-DONE rc=1",
        ] {
            run.take(line);
        }
        assert_eq!(run.release, "6.1.0-57-cloud-amd64");
        assert_eq!(run.boot_secs, Some(2.51));
        assert_eq!((run.passed(), run.failed_count()), (1, 1));
        assert_eq!(run.failed_tests, ["b"]);
        assert_eq!(run.binaries.len(), 2);
        assert_eq!(run.binaries[0].name, "api");
        assert!(run.binaries[1].result.is_none());
        assert!(!run.ok());
        run.done = Some(0);
        assert!(run.ok());
    }

    #[test]
    fn console_lines_lose_terminal_control() {
        assert_eq!(
            printable("\x1bc\x1b[?7l\x1b[2JBREAKWATER-VM-BOOTED 6.1 4.7\r\n"),
            "BREAKWATER-VM-BOOTED 6.1 4.7"
        );
        assert_eq!(printable("test a ... ok\t<1.0s>"), "test a ... ok\t<1.0s>");
    }

    #[test]
    fn ldd_output() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            ldd_paths(ldd).unwrap(),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert!(ldd_paths("\tlibfoo.so.1 => not found\n").is_err());
    }

    #[test]
    fn module_load_order_puts_dependencies_first() {
        let deps: BTreeMap<&str, &[&str]> = BTreeMap::from([
            ("inet_diag", &[][..]),
            ("tcp_diag", &["inet_diag"][..]),
            ("veth", &[][..]),
            ("a", &["b", "c"][..]),
            ("b", &["c"][..]),
            ("c", &["a"][..]), // a cycle must not loop forever
        ]);
        let lookup = |name: &str| -> Result<Vec<String>> {
            Ok(deps
                .get(name)
                .context("unknown")?
                .iter()
                .map(|s| s.to_string())
                .collect())
        };
        assert_eq!(
            load_order(&["tcp_diag", "inet_diag", "veth"], lookup).unwrap(),
            ["inet_diag", "tcp_diag", "veth"]
        );
        assert_eq!(load_order(&["a"], lookup).unwrap(), ["c", "b", "a"]);
        assert!(load_order(&["nope"], lookup).is_err());
        assert_eq!(
            module_name("nf-conntrack.ko.xz"),
            Some(("nf_conntrack".to_string(), ".ko.xz"))
        );
        assert_eq!(module_name("modules.order"), None);
    }

    /// A minimal ELF64 with a null section, `.modinfo` and the section-name table.
    fn elf_with_modinfo(modinfo: &[u8]) -> Vec<u8> {
        let names = b"\0.modinfo\0.shstrtab\0";
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let modinfo_at = elf.len();
        elf.extend_from_slice(modinfo);
        let names_at = elf.len();
        elf.extend_from_slice(names);
        let shoff = elf.len();
        let header = |name: u32, offset: usize, size: usize| {
            let mut h = vec![0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[24..32].copy_from_slice(&(offset as u64).to_le_bytes());
            h[32..40].copy_from_slice(&(size as u64).to_le_bytes());
            h
        };
        elf.extend(header(0, 0, 0));
        elf.extend(header(1, modinfo_at, modinfo.len()));
        elf.extend(header(10, names_at, names.len()));
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
        elf
    }

    #[test]
    fn module_depends_from_modinfo() {
        let elf = elf_with_modinfo(b"license=GPL\0depends=inet_diag,nf-conntrack\0vermagic=6.1\0");
        assert_eq!(module_depends(&elf).unwrap(), ["inet_diag", "nf_conntrack"]);
        let elf = elf_with_modinfo(b"depends=\0intree=Y\0");
        assert!(module_depends(&elf).unwrap().is_empty());
        assert!(module_depends(b"not an elf").is_err());
    }

    #[test]
    fn selection_of_guest_runs() {
        let bins: Vec<String> = [
            "api",
            "deploy",
            "etcd",
            "image",
            "observability",
            "newthing",
        ]
        .map(String::from)
        .to_vec();
        let default = Selection {
            full: false,
            filters: Vec::new(),
        };
        let (runs, notes) = guest_runs(&bins, &default, &KERNELS[0]);
        let names: Vec<&str> = runs.iter().map(|r| r.binary.as_str()).collect();
        assert_eq!(names, ["api", "observability"]);
        assert_eq!(
            runs[1].args,
            [
                "--skip",
                "reflection_and_health_serve_a_client_without_our_protos",
                "--skip",
                "metrics_pass_promtool_check"
            ]
        );
        assert!(notes[0].contains("newthing"));

        let filtered = Selection {
            full: false,
            filters: vec!["trip".to_string()],
        };
        let (runs, notes) = guest_runs(&bins, &filtered, &KERNELS[0]);
        let names: Vec<&str> = runs.iter().map(|r| r.binary.as_str()).collect();
        assert_eq!(names, ["api", "observability", "newthing"]);
        assert_eq!(runs[0].args, ["trip"]);
        assert!(notes.is_empty());
    }

    #[test]
    fn on_5_10_only_the_kernel_tests_run() {
        let bins: Vec<String> = ["api", "deploy", "kernel", "tracking"]
            .map(String::from)
            .to_vec();
        let default = Selection {
            full: false,
            filters: Vec::new(),
        };
        let names = |line: &KernelLine| -> Vec<String> {
            let (runs, _) = guest_runs(&bins, &default, line);
            runs.into_iter().map(|r| r.binary).collect()
        };
        assert_eq!(names(kernels("5.10")[0]), ["kernel"]);
        assert_eq!(names(kernels("6.1")[0]), ["api", "kernel", "tracking"]);
        assert_eq!(names(kernels("6.12")[0]), ["api", "kernel", "tracking"]);
    }

    #[test]
    fn a_line_runs_only_its_binaries() {
        let line = KernelLine {
            name: "old",
            prefix: "linux-image-old-",
            suffix: "",
            binaries: Some(&["kernel", "deploy"]),
            apt_source: None,
        };
        let bins: Vec<String> = ["api", "deploy", "kernel", "newthing"]
            .map(String::from)
            .to_vec();
        let mut selection = Selection {
            full: false,
            filters: Vec::new(),
        };
        // By default, with --full and with filters alike; host-only binaries stay out.
        for (full, filters) in [
            (false, vec![]),
            (true, vec![]),
            (false, vec!["wait".into()]),
        ] {
            selection.full = full;
            selection.filters = filters;
            let (runs, notes) = guest_runs(&bins, &selection, &line);
            let names: Vec<&str> = runs.iter().map(|r| r.binary.as_str()).collect();
            assert_eq!(names, ["kernel"]);
            assert_eq!(runs[0].args, selection.filters);
            assert!(notes.is_empty(), "{notes:?}");
        }
    }

    #[test]
    fn init_script_quotes_arguments() {
        assert_eq!(sh_quote("tracking"), "tracking");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote(""), "''");
        let script = init_script(
            &["inet_diag".to_string()],
            &[GuestRun {
                binary: "api".to_string(),
                args: vec!["a b".to_string()],
            }],
        );
        assert!(script.contains("insmod /mods/inet_diag.ko"));
        assert!(script.contains("\nrun api 'a b'\n"));
        assert!(script.contains("BREAKWATER-VM-DONE rc=$rc"));
    }

    #[test]
    fn the_initramfs_list_leaves_out_other_lines_binaries() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("tests")).unwrap();
        fs::write(root.path().join("init"), "12").unwrap();
        fs::write(root.path().join("tests/api"), "1234").unwrap();
        fs::write(root.path().join("tests/kernel"), "123").unwrap();
        let leave_out = BTreeSet::from([PathBuf::from("./tests/api")]);
        let mut list = Vec::new();
        let size = list_tree(root.path(), Path::new("."), &leave_out, &mut list).unwrap();
        assert_eq!(list, b"./init\0./tests\0./tests/kernel\0");
        assert_eq!(size, 5);
    }

    #[test]
    fn memory_grows_with_the_initramfs() {
        assert_eq!(guest_memory_mib(0), 1536);
        assert_eq!(guest_memory_mib(300 << 20), 2304);
    }
}
