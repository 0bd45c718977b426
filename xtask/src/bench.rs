//! `cargo xtask bench`: loopback TCP connect/accept/close throughput with the agent off and on,
//! interleaved in one run so that both sides see the same machine state.

use std::{
    fs::{self, File},
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

use crate::{is_root, Workspace};

/// Client threads running the connect loop.
const CLIENTS: usize = 2;
/// How long the agent may take to answer `info` after it starts.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the agent may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(clap::Args)]
pub struct Args {
    /// Length of each round, in seconds
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    seconds: u64,
    /// Number of rounds, each one OFF then one ON measurement
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Extra arguments for `breakwater agent` (one string, split on whitespace)
    #[arg(
        long,
        default_value = "",
        hide_default_value = true,
        allow_hyphen_values = true
    )]
    agent_args: String,
    /// Sockets to hold open (both ends count) for the agent's memory measurement; 0 skips it
    #[arg(long, default_value_t = 100_000)]
    sockets: usize,
}

pub fn run(ws: &Workspace, args: &Args) -> Result<()> {
    if !is_root() {
        bail!("`cargo xtask bench` runs the agent and must run as root (e.g. `sudo -E cargo xtask bench`)");
    }
    let bin = crate::build(ws)?;
    let agent_args: Vec<&str> = args.agent_args.split_whitespace().collect();
    let round = Duration::from_secs(args.seconds);

    println!("machine: {}", machine());
    let addr = start_server()?;
    println!(
        "bench: {} rounds of {}s with the agent off and {}s on, {CLIENTS} client threads -> {addr}, agent args {agent_args:?}",
        args.rounds, args.seconds, args.seconds
    );

    let tmp = tempfile::Builder::new()
        .prefix("breakwater-bench-")
        .tempdir()
        .context("creating a temporary directory")?;
    let mut off = Vec::new();
    let mut on = Vec::new();
    let mut ratios = Vec::new();
    for r in 1..=args.rounds {
        // Alternate the order so that a drift (TIME_WAIT build-up, a busy neighbour) does not
        // always favour the same side.
        let off_first = r % 2 == 1;
        let mut rate_off = None;
        if off_first {
            rate_off = Some(connect_loop(addr, round)?);
        }
        let agent = Agent::start(&bin, tmp.path(), &agent_args)?;
        let rate_on = connect_loop(addr, round);
        agent.stop()?;
        let rate_on = rate_on?;
        let rate_off = match rate_off {
            Some(r) => r,
            None => connect_loop(addr, round)?,
        };
        println!(
            "round {r}/{} ({}): off {rate_off:.0} conn/s, on {rate_on:.0} conn/s, ratio {:.3}",
            args.rounds,
            if off_first { "off, on" } else { "on, off" },
            rate_on / rate_off
        );
        off.push(rate_off);
        on.push(rate_on);
        ratios.push(rate_on / rate_off);
    }

    let (off, on, ratio) = (median(&mut off), median(&mut on), median(&mut ratios));
    println!(
        "connect/accept/close loop: off {off:.0} conn/s, on {on:.0} conn/s, ratio {ratio:.3} (median of per-round ratios; goal >= 0.97)"
    );

    pingpong(&bin, tmp.path(), &agent_args, args.rounds, round)?;
    if args.sockets > 0 {
        memory(&bin, tmp.path(), &agent_args, args.sockets)?;
    }

    // The kernel's own accounting costs time per run, so it is measured in a round of its own.
    let stats = BpfStats::enable()?;
    let agent = Agent::start(&bin, tmp.path(), &agent_args)?;
    let rate = connect_loop(addr, round);
    let cost = agent.program_cost(&bin, tmp.path());
    agent.stop()?;
    drop(stats);
    let rate = rate?;
    if let Some(ns) = cost.ns_per_run() {
        println!(
            "kernel cost: {ns:.0} ns per program run over {} runs ({:.1} runs per connection), {} runs missed (recursion)",
            cost.runs,
            cost.runs as f64 / (rate * args.seconds as f64),
            cost.misses
        );
    }
    Ok(())
}

/// Request/response on kept-alive connections (one byte each way), agent off and on.
fn pingpong(
    bin: &Path,
    dir: &Path,
    agent_args: &[&str],
    rounds: u32,
    round: Duration,
) -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut stream = stream;
                let mut b = [0u8; 1];
                while stream.read_exact(&mut b).is_ok() && stream.write_all(&b).is_ok() {}
            });
        }
    });
    let run = |length: Duration| -> Result<f64> {
        let deadline = Instant::now() + length;
        let start = Instant::now();
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| {
                thread::spawn(move || -> std::io::Result<u64> {
                    let mut s = TcpStream::connect(addr)?;
                    s.set_nodelay(true)?;
                    let mut b = [7u8; 1];
                    let mut n = 0;
                    while Instant::now() < deadline {
                        s.write_all(&b)?;
                        s.read_exact(&mut b)?;
                        n += 1;
                    }
                    Ok(n)
                })
            })
            .collect();
        let mut total = 0;
        for c in clients {
            total += c
                .join()
                .map_err(|_| anyhow!("a ping-pong client panicked"))??;
        }
        Ok(total as f64 / start.elapsed().as_secs_f64())
    };
    let mut ratios = Vec::new();
    let (mut offs, mut ons) = (Vec::new(), Vec::new());
    for r in 1..=rounds {
        let off_first = r % 2 == 1;
        let mut off = None;
        if off_first {
            off = Some(run(round)?);
        }
        let agent = Agent::start(bin, dir, agent_args)?;
        let on = run(round);
        agent.stop()?;
        let on = on?;
        let off = match off {
            Some(v) => v,
            None => run(round)?,
        };
        ratios.push(on / off);
        offs.push(off);
        ons.push(on);
    }
    let (off, on, ratio) = (median(&mut offs), median(&mut ons), median(&mut ratios));
    println!(
        "request/response on kept-alive connections: off {off:.0} req/s, on {on:.0} req/s, ratio {ratio:.3} (goal >= 0.98)"
    );
    Ok(())
}

/// The agent's resident memory idle, and with `sockets` tracked sockets listed once. A process
/// may not hold that many descriptors here (RLIMIT_NOFILE, no CAP_SYS_RESOURCE), so helper
/// processes (`cargo xtask hold-sockets`) hold them, each within its own limit.
fn memory(bin: &Path, dir: &Path, agent_args: &[&str], sockets: usize) -> Result<()> {
    let agent = Agent::start(bin, dir, agent_args)?;
    let idle = agent.rss_kib();
    let per_helper = fd_limit().saturating_sub(1024) / 2;
    if per_helper == 0 {
        bail!("RLIMIT_NOFILE is too low to hold sockets");
    }
    let mut pairs = sockets / 2;
    let mut helpers = Vec::new();
    while pairs > 0 {
        let n = pairs.min(per_helper);
        let mut child = Command::new(std::env::current_exe()?)
            .args(["hold-sockets", &n.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting a socket-holding helper")?;
        let mut ready = [0u8; 1];
        child
            .stdout
            .take()
            .expect("piped")
            .read_exact(&mut ready)
            .context("waiting for a socket-holding helper")?;
        helpers.push(child);
        pairs -= n;
    }
    let url = format!("unix://{}", dir.join("agent.sock").display());
    for cmd in [
        &["conns", "-o", "json"][..],
        &["destinations"][..],
        &["timewait"][..],
    ] {
        let ok = Command::new(bin)
            .args(["--agent", &url])
            .args(cmd)
            .stdout(Stdio::null())
            .status()?
            .success();
        if !ok {
            bail!("breakwater {cmd:?} failed with {sockets} sockets open");
        }
    }
    // Let the agent finish sending and give the memory back (it trims after large answers).
    thread::sleep(Duration::from_secs(1));
    let (rss, peak) = (agent.rss_kib(), agent.hwm_kib());
    agent.stop()?;
    for mut h in helpers {
        drop(h.stdin.take());
        let _ = h.wait();
    }
    println!(
        "agent memory: idle {:.1} MB; with {} tracked sockets listed: {:.1} MB now, {:.1} MB peak (goals <= 30 MB idle, <= 64 MB)",
        idle as f64 / 1024.0,
        sockets / 2 * 2,
        rss as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    Ok(())
}

fn fd_limit() -> usize {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit into a valid struct; raise the soft limit to the hard one.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
    }
    l.rlim_cur as usize
}

/// `cargo xtask hold-sockets PAIRS`: opens PAIRS loopback connections (both ends here), writes
/// one byte to stdout when they are up, and holds them until stdin closes.
pub fn hold_sockets(pairs: usize) -> Result<()> {
    fd_limit();
    // One (source, destination) pair has ~28k ephemeral ports: spread over listeners.
    let listeners: Vec<TcpListener> = (0..pairs.div_ceil(20_000).max(1))
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()?;
    let mut held = Vec::with_capacity(pairs * 2);
    for i in 0..pairs {
        let l = &listeners[i % listeners.len()];
        held.push(TcpStream::connect(l.local_addr()?)?);
        held.push(l.accept()?.0);
    }
    std::io::stdout().write_all(b"r")?;
    std::io::stdout().flush()?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    Ok(())
}

/// Run statistics of the programs on the connection path.
#[derive(Default)]
struct ProgCost {
    runs: u64,
    time_ns: u64,
    misses: u64,
}

impl ProgCost {
    fn ns_per_run(&self) -> Option<f64> {
        (self.runs > 0).then(|| self.time_ns as f64 / self.runs as f64)
    }
}

/// Turns on `kernel.bpf_stats_enabled` (per-program run counts and time) for the run, and
/// restores the previous value when dropped.
struct BpfStats(String);

impl BpfStats {
    const PATH: &'static str = "/proc/sys/kernel/bpf_stats_enabled";

    fn enable() -> Result<Self> {
        let old =
            fs::read_to_string(Self::PATH).with_context(|| format!("reading {}", Self::PATH))?;
        fs::write(Self::PATH, "1").with_context(|| format!("writing {}", Self::PATH))?;
        Ok(Self(old.trim().to_owned()))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = fs::write(Self::PATH, &self.0);
    }
}

/// "N CPUs (model), kernel X".
fn machine() -> String {
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("nproc {cpus} ({model}), kernel {}", kernel.trim())
}

/// A listener on 127.0.0.1 served by one thread that accepts and closes at once. The server
/// closes first, so TIME_WAIT lands on its side and the clients' ephemeral ports stay free.
fn start_server() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    thread::Builder::new()
        .name("bench-server".into())
        .spawn(move || {
            for stream in listener.incoming() {
                drop(stream);
            }
        })
        .context("starting the server thread")?;
    Ok(addr)
}

/// Runs the connect/close loop on `CLIENTS` threads for `length`; returns connections per second.
fn connect_loop(addr: SocketAddr, length: Duration) -> Result<f64> {
    let start = Instant::now();
    let deadline = start + length;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| thread::spawn(move || client(addr, deadline)))
        .collect();
    let mut done = 0u64;
    let mut failed = 0u64;
    let mut first_error = None;
    for client in clients {
        let stats = client
            .join()
            .map_err(|_| anyhow!("a client thread panicked"))?;
        done += stats.done;
        failed += stats.failed;
        first_error = first_error.or(stats.first_error);
    }
    let elapsed = start.elapsed().as_secs_f64();
    if let Some(error) = first_error {
        println!("warning: {failed} connections failed (first: {error})");
    }
    if done == 0 {
        bail!("no connection to {addr} succeeded");
    }
    Ok(done as f64 / elapsed)
}

struct ClientStats {
    done: u64,
    failed: u64,
    first_error: Option<std::io::Error>,
}

fn client(addr: SocketAddr, deadline: Instant) -> ClientStats {
    let mut stats = ClientStats {
        done: 0,
        failed: 0,
        first_error: None,
    };
    let mut byte = [0u8; 1];
    while Instant::now() < deadline {
        // Wait for the server's close (EOF) before closing: the server closes first.
        let result = TcpStream::connect(addr).and_then(|mut stream| stream.read(&mut byte));
        match result {
            Ok(_) => stats.done += 1,
            Err(error) => {
                stats.failed += 1;
                stats.first_error.get_or_insert(error);
            }
        }
    }
    stats
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

/// A running `breakwater agent`; killed when dropped before `stop`.
struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    /// Starts the agent with its API on `<dir>/agent.sock` and waits until `info` answers.
    fn start(bin: &Path, dir: &Path, extra: &[&str]) -> Result<Self> {
        let socket = dir.join("agent.sock");
        let log = dir.join("agent.log");
        let _ = fs::remove_file(&socket);
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(bin)
            .arg("agent")
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {} agent", bin.display()))?;
        let mut agent = Self { child, log };

        let url = format!("unix://{}", socket.display());
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = agent.child.try_wait()? {
                bail!(
                    "the agent exited before it was ready ({status}){}",
                    agent.log_tail()
                );
            }
            let ready = Command::new(bin)
                .args(["--agent", &url, "info"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .with_context(|| format!("running {} --agent {url} info", bin.display()))?
                .success();
            if ready {
                return Ok(agent);
            }
            if Instant::now() >= deadline {
                bail!(
                    "`{} --agent {url} info` did not succeed within {}s{}",
                    bin.display(),
                    READY_TIMEOUT.as_secs(),
                    agent.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Run count, time and recursion misses of the programs on the connection path, from the
    /// agent's own `info` (which reads the kernel's fdinfo).
    fn program_cost(&self, bin: &Path, dir: &Path) -> ProgCost {
        let url = format!("unix://{}", dir.join("agent.sock").display());
        let out = Command::new(bin)
            .args(["--agent", &url, "info", "-o", "json"])
            .stdin(Stdio::null())
            .output();
        let Ok(out) = out else {
            return ProgCost::default();
        };
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let mut cost = ProgCost::default();
        for p in v["programs"].as_array().into_iter().flatten() {
            if p["attach"].as_str().is_some_and(|a| a.starts_with("iter/")) {
                continue;
            }
            cost.runs += p["run_count"].as_u64().unwrap_or(0);
            cost.time_ns += p["run_time_ns"].as_u64().unwrap_or(0);
            cost.misses += p["recursion_misses"].as_u64().unwrap_or(0);
        }
        cost
    }

    fn status_kib(&self, field: &str) -> u64 {
        fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    fn hwm_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    /// SIGTERM, then wait (SIGKILL after `STOP_TIMEOUT`).
    fn stop(mut self) -> Result<()> {
        let pid = libc::pid_t::try_from(self.child.id()).context("pid out of range")?;
        // SAFETY: kill has no memory-safety preconditions; the pid is our own unreaped child.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            return Err(std::io::Error::last_os_error()).context("sending SIGTERM to the agent");
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    println!(
                        "warning: the agent exited with {status} after SIGTERM{}",
                        self.log_tail()
                    );
                }
                return Ok(());
            }
            if Instant::now() >= deadline {
                println!(
                    "warning: the agent did not exit within {}s of SIGTERM; killing it{}",
                    STOP_TIMEOUT.as_secs(),
                    self.log_tail()
                );
                self.child.kill()?;
                self.child.wait()?;
                return Ok(());
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines of the agent's output, for error messages.
    fn log_tail(&self) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        format!("\nlast lines of {}:\n{tail}", self.log.display())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
    }

    #[test]
    fn loop_counts_connections() {
        let addr = start_server().unwrap();
        let rate = connect_loop(addr, Duration::from_millis(200)).unwrap();
        assert!(rate > 0.0);
    }
}
