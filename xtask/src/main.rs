//! Developer tasks for breakwater:
//! `cargo xtask <setup|build|image|run|lint|test|vm-test|bench|soak|fuzz>`.

mod bench;
mod etcd;
mod fuzz;
mod image;
mod lint;
mod sandbox;
mod setup;
mod soak;
mod vm;

use std::{
    env,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

/// Where `breakwater agent` serves its API unless given `--socket`.
const DEFAULT_SOCKET: &str = "/run/breakwater/agent.sock";

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "breakwater developer tasks"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Make this machine ready to build and run breakwater (idempotent; root for mounts and apt)
    Setup,
    /// Setup, then build the agent in release mode (target/release/breakwater)
    Build,
    /// Setup, build, then the agent's OCI image with buildah from the release binary alone
    /// (localhost/breakwater:<version>; root: into root's container storage)
    Image(image::Args),
    /// Setup, build, then run the agent in the foreground (root)
    Run {
        /// Extra arguments for `breakwater agent`, after `--`
        #[arg(last = true)]
        agent_args: Vec<String>,
    },
    /// rustfmt, and clippy (every warning an error) on the host crates and on the eBPF crate for
    /// the BPF target; installs the toolchain pieces it needs first
    Lint,
    /// Setup, lint, build, unit and privileged integration tests (root), each fuzz target
    /// briefly, then the same tests on Debian's 6.1 and 6.12 kernels in QEMU, and the unsupported-kernel tests on Debian 11's 5.10
    Test {
        /// Skip the tests on Debian's kernels in QEMU (quick local runs; CI runs them)
        #[arg(long)]
        no_vm: bool,
        /// Extra arguments for the integration test binaries after `--` (e.g. a test name
        /// filter), on the host and in the VMs
        #[arg(last = true)]
        test_args: Vec<String>,
    },
    /// The privileged integration tests inside Debian's stock kernels (6.1, 6.12, 5.10) in QEMU
    VmTest(vm::Args),
    /// The cargo-fuzz targets (fuzz/): each for --time seconds or --runs executions, with the
    /// executions each did; fails on a crash, naming the input saved
    Fuzz(fuzz::Args),
    /// Throughput and memory with the agent off and on, the breaker's rejection cost, and a
    /// fleet trip's propagation through etcd (root)
    Bench(bench::Args),
    /// One agent for N minutes under connection churn, queries, watch streams, reloads and an
    /// etcd that goes away: RSS drift, map fill, losses, errors (root)
    Soak(soak::Args),
    /// (used by bench) hold PAIRS loopback connections open until stdin closes
    #[command(hide = true)]
    HoldSockets { pairs: usize },
    /// (used by bench) join CGROUP, then connect to ADDR in a loop and print each change of
    /// the result
    #[cfg(feature = "etcd")]
    #[command(hide = true)]
    FleetProbe {
        cgroup: PathBuf,
        addr: std::net::SocketAddrV4,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run_task(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_task(task: Task) -> Result<()> {
    let ws = Workspace::new();
    match task {
        Task::Setup => setup::run(),
        Task::Build => build(&ws).map(|bin| println!("built: {}", bin.display())),
        Task::Image(args) => image::run_task(&ws, &args),
        Task::Run { agent_args } => run_agent(&ws, &agent_args),
        Task::Lint => setup::toolchain().and_then(|()| lint::run(&ws)),
        Task::Test { no_vm, test_args } => test(&ws, no_vm, &test_args),
        Task::VmTest(args) => vm::run(&ws, &args),
        Task::Fuzz(args) => fuzz::run(&ws, &args),
        Task::Bench(args) => bench::run(&ws, &args),
        Task::Soak(args) => soak::run(&ws, &args),
        Task::HoldSockets { pairs } => bench::hold_sockets(pairs),
        #[cfg(feature = "etcd")]
        Task::FleetProbe { cgroup, addr } => bench::fleet_probe(&cgroup, addr),
    }
}

/// The cargo workspace this xtask belongs to.
pub struct Workspace {
    root: PathBuf,
}

impl Workspace {
    fn new() -> Self {
        let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let root = manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf();
        Self { root }
    }

    /// `cargo` (the one that runs this xtask), started in the workspace root.
    fn cargo(&self) -> Command {
        let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cmd.current_dir(&self.root);
        cmd
    }

    /// The absolute path of the release agent binary (honours CARGO_TARGET_DIR and the like).
    fn agent_bin(&self) -> Result<PathBuf> {
        Ok(self.target_dir()?.join("release").join("breakwater"))
    }

    /// Cargo's target directory (honours CARGO_TARGET_DIR and the like).
    fn target_dir(&self) -> Result<PathBuf> {
        let metadata =
            output(
                self.cargo()
                    .args(["metadata", "--format-version", "1", "--no-deps"]),
            )?;
        let metadata: serde_json::Value =
            serde_json::from_str(&metadata).context("parsing `cargo metadata` output")?;
        let target_dir = metadata["target_directory"]
            .as_str()
            .context("`cargo metadata` printed no target_directory")?;
        Ok(PathBuf::from(target_dir))
    }
}

/// Setup, then build the release agent; returns the absolute path of the binary.
pub fn build(ws: &Workspace) -> Result<PathBuf> {
    setup::run()?;
    build_release(ws)
}

fn build_release(ws: &Workspace) -> Result<PathBuf> {
    run(ws
        .cargo()
        .args(["build", "--release", "--package", "breakwater"]))?;
    let bin = ws.agent_bin()?;
    if !bin.is_file() {
        bail!(
            "`cargo build --release -p breakwater` succeeded but {} does not exist",
            bin.display()
        );
    }
    Ok(bin)
}

fn run_agent(ws: &Workspace, agent_args: &[String]) -> Result<()> {
    if !is_root() {
        bail!("`cargo xtask run` loads eBPF programs and must run as root (e.g. `sudo -E cargo xtask run`)");
    }
    let bin = build(ws)?;
    let socket = socket_arg(agent_args);
    let has_config = env::var_os("BREAKWATER_CONFIG").is_some()
        || agent_args
            .iter()
            .any(|arg| arg == "--config" || arg.starts_with("--config="));
    let note = if socket.is_none() && has_config {
        " (unless the config file sets agent.socket)"
    } else {
        ""
    };
    let socket = socket.unwrap_or(DEFAULT_SOCKET);
    let socket = std::path::absolute(socket).unwrap_or_else(|_| socket.into());
    let url = format!("unix://{}", socket.display());
    println!("agent API: {url}{note}");
    println!(
        "try:       {} --agent {url} destinations",
        shown(&bin).display()
    );
    let err = Command::new(&bin).arg("agent").args(agent_args).exec();
    Err(err).with_context(|| format!("executing {}", bin.display()))
}

/// The value of `--socket X` / `--socket=X` among the agent's arguments.
fn socket_arg(args: &[String]) -> Option<&str> {
    args.iter().enumerate().find_map(|(i, arg)| {
        if arg == "--socket" {
            args.get(i + 1).map(String::as_str)
        } else {
            arg.strip_prefix("--socket=")
        }
    })
}

/// One stage of `cargo xtask test` and how it went.
struct Stage {
    name: String,
    /// What it found (`ok, 6.1.0-57-cloud-amd64 (50 passed, 0 failed)`), or why it failed.
    outcome: Result<String, String>,
    took: Duration,
}

impl Stage {
    fn print(&self) {
        let took = self.took.as_secs();
        match &self.outcome {
            Ok(what) if what.is_empty() => println!("== {}: {took} s", self.name),
            Ok(what) => println!("== {}: {what} in {took} s", self.name),
            Err(why) => println!("== {}: FAILED in {took} s: {why}", self.name),
        }
    }
}

/// Runs `f` as a stage and prints its duration.
fn stage(stages: &mut Vec<Stage>, name: &str, f: impl FnOnce() -> Result<String>) {
    let started = Instant::now();
    let stage = Stage {
        name: name.to_string(),
        outcome: f().map_err(|e| format!("{e:#}")),
        took: started.elapsed(),
    };
    stage.print();
    stages.push(stage);
}

/// The lint, the build, the image, then the host suite, a 2-minute soak, a short fuzz run, then
/// every VM kernel; a failing stage does not stop
/// the later ones (a CI run shows everything at once), only a failed build skips the tests.
fn test(ws: &Workspace, no_vm: bool, test_args: &[String]) -> Result<()> {
    setup::run()?;
    let mut stages = Vec::new();
    stage(&mut stages, "lint", || {
        lint::run(ws).map(|()| String::new())
    });
    let (mut agent, mut tests) = (None, None);
    stage(&mut stages, "build", || {
        run(ws.cargo().args([
            "test",
            "--workspace",
            "--exclude",
            "breakwater-tests",
            "--no-run",
        ]))?;
        agent = Some(build_release(ws)?);
        tests = Some(vm::build_tests(ws)?);
        Ok(String::new())
    });
    let (Some(agent), Some(tests)) = (agent, tests) else {
        return summary(&stages);
    };

    // The image of the agent just built, which tests/tests/image.rs runs (BREAKWATER_IMAGE);
    // root's container storage, as the integration tests need root anyway.
    let mut image = None;
    if is_root() {
        stage(&mut stages, "image", || {
            let tag = image::default_tag();
            let id = image::build(ws, &agent, &tag)?;
            let what = format!("{tag} ({})", id.get(..12).unwrap_or(&id));
            image = Some(tag);
            Ok(what)
        });
    } else {
        println!("== image: skipped (needs root, as the integration tests do)");
    }

    stage(&mut stages, "host suite", || {
        host_suite(ws, &agent, image.as_deref(), test_args).map(|()| String::new())
    });
    // The 2-minute soak: fails on an error or a loss nobody counted.
    stage(&mut stages, "soak", || {
        if !is_root() {
            return Ok("skipped: not root".to_owned());
        }
        soak::soak(&agent, &soak::Args::ci())
    });

    stage(&mut stages, "fuzz", || fuzz_briefly(ws));

    if no_vm {
        println!("== vm: skipped (--no-vm)");
    } else {
        let selection = vm::Selection {
            full: false,
            filters: test_args.to_vec(),
        };
        for line in vm::KERNELS {
            let mut runs = Vec::new();
            stage(&mut stages, &format!("vm {}", line.name), || {
                runs = vm::run_kernels(ws, &agent, &tests, &[line], &selection, vm::TIMEOUT)?;
                let run = runs.first().context("no kernel ran")?;
                let what = format!(
                    "{} ({} passed, {} failed)",
                    run.release,
                    run.passed(),
                    run.failed_count()
                );
                if !run.ok() {
                    bail!(what);
                }
                Ok(format!("ok, {what}"))
            });
        }
    }

    summary(&stages)
}

/// Seconds each fuzz target runs in `cargo xtask test`: a smoke run (the targets build, the
/// seeds pass, the easy crashes show); `cargo xtask fuzz` runs them for real.
const FUZZ_SMOKE_SECS: u64 = 12;

/// The fuzz stage: builds every target and runs each briefly.
fn fuzz_briefly(ws: &Workspace) -> Result<String> {
    let built = fuzz::build(ws)?;
    println!("== fuzz build: {} s", built.as_secs());
    let runs = fuzz::TARGETS
        .iter()
        .map(|t| fuzz::run_target(ws, t, Duration::from_secs(FUZZ_SMOKE_SECS), None))
        .collect::<Result<Vec<_>>>()?;
    fuzz::report(&runs)?;
    let executions: u64 = runs.iter().map(|r| r.executions).sum();
    Ok(format!(
        "ok, {} targets, {executions} executions, build {} s",
        runs.len(),
        built.as_secs()
    ))
}

/// Prints every stage again, and fails naming those that failed.
fn summary(stages: &[Stage]) -> Result<()> {
    println!();
    println!("== summary");
    for stage in stages {
        stage.print();
    }
    let failed: Vec<&str> = stages
        .iter()
        .filter(|s| s.outcome.is_err())
        .map(|s| s.name.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    Ok(())
}

/// Unit tests, then the privileged integration tests on this machine's kernel (tests/tests/image.rs
/// runs `image`, the agent's image, when given).
fn host_suite(
    ws: &Workspace,
    agent: &Path,
    image: Option<&str>,
    test_args: &[String],
) -> Result<()> {
    println!("== unit tests");
    let unit = run(ws
        .cargo()
        .args(["test", "--workspace", "--exclude", "breakwater-tests"]));

    println!("== privileged integration tests (breakwater-tests)");
    if !is_root() {
        if env::var("CI").as_deref() == Ok("true") {
            bail!("CI=true but not running as root: the privileged integration tests (breakwater-tests) need root");
        }
        println!(
            "skipped: privileged integration tests need root (run `cargo xtask test` as root)"
        );
        return unit;
    }
    let mut cmd = ws.cargo();
    if let Some(image) = image {
        cmd.env("BREAKWATER_IMAGE", image);
    }
    let integration = run(cmd
        .args([
            "test",
            "--package",
            "breakwater-tests",
            // Every test binary, even after one fails: CI shows all that fail at once.
            "--no-fail-fast",
            "--",
            "--test-threads=1",
        ])
        .args(test_args)
        .env("BREAKWATER_BIN", agent));
    unit.and(integration)
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `path` relative to the current directory when it is below it.
fn shown(path: &Path) -> &Path {
    env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok())
        .unwrap_or(path)
}

fn describe(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Runs `cmd` with inherited stdio; fails unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{}`", describe(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", describe(cmd));
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout; fails (with its stderr) unless it exits 0.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{}`", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{}` printed non-UTF-8", describe(cmd)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn socket_arg_forms() {
        assert_eq!(socket_arg(&args(&["--foo"])), None);
        assert_eq!(socket_arg(&args(&["--socket", "/x.sock"])), Some("/x.sock"));
        assert_eq!(
            socket_arg(&args(&["-v", "--socket=/y.sock"])),
            Some("/y.sock")
        );
        assert_eq!(socket_arg(&args(&["--socket"])), None);
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli =
            Cli::try_parse_from(["xtask", "test", "--", "some_filter", "--nocapture"]).unwrap();
        match cli.command {
            Task::Test { no_vm, test_args } => {
                assert!(!no_vm);
                assert_eq!(test_args, ["some_filter", "--nocapture"]);
            }
            _ => panic!("wrong task"),
        }
        let cli =
            Cli::try_parse_from(["xtask", "vm-test", "--kernel", "6.1", "--", "trip"]).unwrap();
        match cli.command {
            Task::VmTest(args) => {
                assert_eq!(args.kernel, "6.1");
                assert_eq!(args.test_args, ["trip"]);
            }
            _ => panic!("wrong task"),
        }
        let cli = Cli::try_parse_from(["xtask", "vm-test", "--kernel", "5.10"]).unwrap();
        match cli.command {
            Task::VmTest(args) => assert_eq!(args.kernel, "5.10"),
            _ => panic!("wrong task"),
        }
        assert!(Cli::try_parse_from(["xtask", "vm-test", "--kernel", "5.4"]).is_err());
        let cli = Cli::try_parse_from(["xtask", "image", "--output", "bw.tar"]).unwrap();
        match cli.command {
            Task::Image(args) => {
                assert_eq!(args.tag, None);
                assert_eq!(args.output, Some(PathBuf::from("bw.tar")));
            }
            _ => panic!("wrong task"),
        }
        let cli = Cli::try_parse_from(["xtask", "lint"]).unwrap();
        assert!(matches!(cli.command, Task::Lint));
        assert!(Cli::try_parse_from(["xtask", "lint", "--fix"]).is_err());
    }
}
