//! `cargo xtask fuzz`: the cargo-fuzz targets in `fuzz/` (libFuzzer, with nightly), each for a
//! while or a number of runs, with the executions each one did; a crash fails it, naming the
//! input libFuzzer saved.
//!
//! Each target starts from its seeds (`fuzz/seeds/TARGET`, committed) and the corpus earlier
//! runs grew (`fuzz/corpus/TARGET`, not committed: libFuzzer writes its new inputs there).

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{describe, Workspace};

/// The targets (`fuzz/fuzz_targets/NAME.rs`), in the order they run.
pub const TARGETS: [&str; 7] = [
    "config",
    "endpoint",
    "duration",
    "policy",
    "rpc",
    "pinned",
    "fleet_record",
];

/// The toolchain libFuzzer's instrumentation needs (`-Z sanitizer`, sancov).
const TOOLCHAIN: &str = "nightly";

/// How the targets are built, the same for `cargo fuzz build` and `cargo fuzz run` (any
/// difference rebuilds): release with debug assertions and overflow checks (cargo-fuzz's
/// default), no sanitizer (the code fuzzed is safe Rust: ASan would double the build and halve
/// the executions), and 16 codegen units (cargo-fuzz's 1 makes the agent's build minutes
/// longer on two cores).
const BUILD_FLAGS: [&str; 5] = [
    "--release",
    "--debug-assertions",
    "--sanitizer=none",
    "--codegen-units",
    "16",
];

#[derive(clap::Args)]
pub struct Args {
    /// Only this target (config, endpoint, duration, policy, rpc, pinned, fleet_record)
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    pub target: Option<String>,
    /// Seconds each target runs for (with --runs: at most)
    #[arg(long, default_value_t = 60)]
    pub time: u64,
    /// Stop each target after this many executions
    #[arg(long)]
    pub runs: Option<u64>,
}

/// What one target did.
pub struct Run {
    pub target: &'static str,
    pub executions: u64,
    pub took: Duration,
    /// The input libFuzzer saved for a crash, or why the run failed.
    pub failure: Option<String>,
}

pub fn run(ws: &Workspace, args: &Args) -> Result<()> {
    crate::setup::toolchain()?;
    crate::setup::check_cargo_fuzz()?;
    let took = build(ws)?;
    println!("== fuzz build: {} s", took.as_secs());
    let targets: Vec<&'static str> = match &args.target {
        Some(t) => TARGETS.iter().copied().filter(|n| n == t).collect(),
        None => TARGETS.to_vec(),
    };
    let runs: Vec<Run> = targets
        .iter()
        .map(|t| run_target(ws, t, Duration::from_secs(args.time), args.runs))
        .collect::<Result<_>>()?;
    report(&runs)
}

/// Prints a line per target, and fails naming those that crashed.
pub fn report(runs: &[Run]) -> Result<()> {
    println!();
    println!(
        "{:<14} {:>14} {:>8}  result",
        "target", "executions", "seconds"
    );
    for r in runs {
        println!(
            "{:<14} {:>14} {:>8}  {}",
            r.target,
            r.executions,
            r.took.as_secs(),
            r.failure.as_deref().unwrap_or("ok")
        );
    }
    let failed: Vec<String> = runs
        .iter()
        .filter_map(|r| r.failure.as_ref().map(|f| format!("{}: {f}", r.target)))
        .collect();
    if !failed.is_empty() {
        bail!("fuzzing found a crash: {}", failed.join("; "));
    }
    Ok(())
}

/// `cargo +nightly fuzz ...` in the workspace root, as aya-build runs nightly: what the outer
/// cargo set for its own rustc must not leak into nightly's.
fn cargo_fuzz(ws: &Workspace) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", TOOLCHAIN, "cargo", "fuzz"])
        .current_dir(&ws.root)
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO");
    cmd
}

/// Builds every target; returns how long it took.
pub fn build(ws: &Workspace) -> Result<Duration> {
    let started = Instant::now();
    crate::run(cargo_fuzz(ws).arg("build").args(BUILD_FLAGS))?;
    Ok(started.elapsed())
}

/// Runs `target` from its seeds and corpus for `time` (or `runs` executions, whichever comes
/// first), printing libFuzzer's output as it comes.
pub fn run_target(
    ws: &Workspace,
    target: &'static str,
    time: Duration,
    runs: Option<u64>,
) -> Result<Run> {
    let fuzz = ws.root.join("fuzz");
    let corpus = fuzz.join("corpus").join(target);
    let seeds = fuzz.join("seeds").join(target);
    let artifacts = fuzz.join("artifacts").join(target);
    for dir in [&corpus, &artifacts] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if !seeds.is_dir() {
        bail!("no seeds for {target}: {} is missing", seeds.display());
    }
    let mut cmd = cargo_fuzz(ws);
    cmd.args(["run"])
        .args(BUILD_FLAGS)
        .arg(target)
        .arg(&corpus)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={}", time.as_secs().max(1)))
        .arg("-print_final_stats=1")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        // Inputs past 64 KiB only slow it down: configs and records are far smaller.
        .arg("-max_len=65536");
    if let Some(runs) = runs {
        cmd.arg(format!("-runs={runs}"));
    }
    println!("== fuzz {target}: {}", describe(&cmd));
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{}`", describe(&cmd)))?;
    let stderr = child.stderr.take().context("libFuzzer's stderr")?;
    let mut executions = None;
    let mut artifact = None;
    for line in BufReader::new(stderr).lines() {
        let line = line.context("reading libFuzzer's output")?;
        if let Some(n) = final_executions(&line) {
            executions = Some(n);
        }
        if let Some(path) = artifact_of(&line) {
            artifact = Some(path.to_string());
        }
        // Progress lines only every so often: the final stats and any report in full.
        if !line.starts_with('#') || line.contains("DONE") {
            eprintln!("{line}");
        }
    }
    let status = child.wait().context("waiting for cargo fuzz")?;
    let took = started.elapsed();
    let failure = match (status.success(), artifact) {
        (true, _) => None,
        (false, Some(path)) => Some(format!(
            "crash, input saved in {} (reproduce: cargo +nightly fuzz run {target} {})",
            shown(ws, &path),
            shown(ws, &path)
        )),
        (false, None) => Some(format!("`cargo fuzz run {target}` failed ({status})")),
    };
    Ok(Run {
        target,
        executions: executions.unwrap_or(0),
        took,
        failure,
    })
}

/// `stat::number_of_executed_units: 1234` (`-print_final_stats=1`).
fn final_executions(line: &str) -> Option<u64> {
    line.strip_prefix("stat::number_of_executed_units:")?
        .trim()
        .parse()
        .ok()
}

/// `Test unit written to PATH` (a crash, a timeout, a leak or an out-of-memory input).
fn artifact_of(line: &str) -> Option<&str> {
    Some(line.split_once("Test unit written to ")?.1.trim())
}

fn shown<'a>(ws: &Workspace, path: &'a str) -> std::borrow::Cow<'a, str> {
    match Path::new(path).strip_prefix(&ws.root) {
        Ok(rel) => rel.display().to_string().into(),
        Err(_) => path.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libfuzzer_lines_are_read() {
        assert_eq!(
            final_executions("stat::number_of_executed_units: 1048576"),
            Some(1_048_576)
        );
        assert_eq!(final_executions("stat::peak_rss_mb: 80"), None);
        assert_eq!(
            artifact_of("artifact_prefix='fuzz/artifacts/rpc/'; Test unit written to fuzz/artifacts/rpc/crash-da39"),
            Some("fuzz/artifacts/rpc/crash-da39")
        );
        assert_eq!(artifact_of("#1024 pulse cov: 1"), None);
    }
}
