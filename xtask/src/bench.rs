//! `cargo xtask bench`: loopback TCP connect/accept/close throughput with the agent off and on,
//! interleaved in one run so that both sides see the same machine state; then the breaker's
//! figures: what a connect to an open breaker costs next to one refused by a closed port (RST),
//! and how many connects still reach the network once a breaker's trip condition holds; then
//! three agents in one etcd ([`fleet`]): how fast a fleet trip is enforced on every node, and
//! what idle agents write to etcd.
//!
//! Every agent the bench starts enforces only in a cgroup of the bench's own
//! (`<cgroup2>/breakwater-bench-<pid>`, which this process joins for the whole run), pins in
//! `/sys/fs/bpf/breakwater-bench-<pid>` and releases its pins on exit; [`Sandbox`] removes both
//! at the end, on error paths too.

use std::{
    fs::{self, File},
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        mpsc, Arc, Barrier,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

use crate::{
    is_root,
    sandbox::{Agent, Env, Sandbox},
    Workspace,
};

#[cfg(feature = "etcd")]
mod fleet;

#[cfg(feature = "etcd")]
pub use fleet::probe as fleet_probe;

/// Client threads running the connect loop.
const CLIENTS: usize = 2;

#[derive(clap::Args)]
pub struct Args {
    /// Length of each round, in seconds
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    seconds: u64,
    /// Number of rounds, each one measurement with the agent off, on, and on with empty hooks
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
    /// Run only this part of the bench
    #[arg(long, value_enum)]
    only: Option<Part>,
    /// Timed connects to the open breaker, and as many to a closed port, for the breaker's latency
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(100..))]
    connects: u64,
    /// Client threads connecting at once when the breaker trips
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=256))]
    burst_threads: u64,
    /// Fleet trips timed to every node, each way (etcd client, `breakwater fleet trip`)
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    fleet_rounds: u32,
    /// How long the fleet's agents stay idle while their etcd writes are counted, in seconds
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    fleet_idle_seconds: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    /// Connect loop, request/response, memory and kernel cost, agent off and on
    Throughput,
    /// Connect to an open breaker versus a closed port, and connects that pass a tripped breaker
    Breaker,
    /// Three agents in one etcd: a trip's propagation to every node, and idle etcd writes
    Fleet,
}

pub fn run(ws: &Workspace, args: &Args) -> Result<()> {
    if !is_root() {
        bail!("`cargo xtask bench` runs the agent and must run as root (e.g. `sudo -E cargo xtask bench`)");
    }
    let bin = crate::build(ws)?;
    if cfg!(not(feature = "etcd")) && args.only.is_none_or(|only| only == Part::Fleet) {
        // Setup has installed protoc: now xtask can be built with its etcd client.
        return with_etcd(ws);
    }
    let agent_args: Vec<&str> = args.agent_args.split_whitespace().collect();

    println!("machine: {}", machine());
    // Declared first so that it is dropped last, after every agent has stopped.
    let sandbox = Sandbox::new(&bin, "bench")?;
    println!(
        "agents: scope {} (this process and its children), pins {}, --release-on-exit",
        sandbox.relative,
        sandbox.pin_dir.display()
    );
    let tmp = tempfile::Builder::new()
        .prefix("breakwater-bench-")
        .tempdir()
        .context("creating a temporary directory")?;
    let env = Env {
        bin: &bin,
        dir: tmp.path(),
        sandbox: &sandbox,
        extra: &agent_args,
    };
    let runs = |part| args.only.is_none_or(|only| only == part);
    if runs(Part::Throughput) {
        throughput(&env, args)?;
    }
    if runs(Part::Breaker) {
        breaker(&env, args)?;
    }
    #[cfg(feature = "etcd")]
    if runs(Part::Fleet) {
        fleet::run(&env, args)?;
    }
    Ok(())
}

/// Runs this same command again in an xtask built with the `etcd` feature.
fn with_etcd(ws: &Workspace) -> Result<()> {
    let status = ws
        .cargo()
        .args([
            "run",
            "--quiet",
            "--package",
            "xtask",
            "--features",
            "etcd",
            "--",
        ])
        .args(std::env::args_os().skip(1))
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("the bench built with its etcd client failed ({status})");
    }
    Ok(())
}

/// The connect loop, request/response, memory and kernel cost, agent off and on.
fn throughput(env: &Env, args: &Args) -> Result<()> {
    let round = Duration::from_secs(args.seconds);
    let cpu = loop_cpu()?;
    println!(
        "bench: {} rounds of {}s with the agent off, on, and on with empty hooks (every program returning at once); {CLIENTS} client threads -> 127.0.0.1 in a fresh network namespace per run, the loop's threads pinned to CPU {cpu}; agent args {:?}",
        args.rounds, args.seconds, env.extra
    );

    let churn = || churn_in_fresh_netns(round, cpu);
    let m = measure_rounds(
        args.rounds,
        &|| env.agent(),
        &|| env.empty_agent(),
        churn,
        "conn/s",
    )?;
    println!(
        "connect/accept/close loop: off {:.0} conn/s, on {:.0} conn/s, ratio {:.3} (median of per-round ratios; goal >= 0.97); empty hooks {:.0} conn/s, ratio {:.3}",
        m.off, m.on, m.on_ratio, m.empty, m.empty_ratio
    );
    // The same with breakers enforcing elsewhere: what tracking alone costs the loop.
    let idle = &env.sandbox.idle_relative;
    let tracking = || Agent::start_with(env, None, idle, false);
    let empty = || Agent::start_with(env, None, idle, true);
    let m = measure_rounds(args.rounds, &tracking, &empty, churn, "conn/s")?;
    println!(
        "connect/accept/close loop, tracking only (breakers enforce on an empty cgroup): off {:.0} conn/s, on {:.0} conn/s, ratio {:.3}; empty hooks ratio {:.3}",
        m.off, m.on, m.on_ratio, m.empty_ratio
    );

    pingpong(env, args.rounds, round, cpu)?;
    if args.sockets > 0 {
        memory(env, args.sockets)?;
    }

    // The kernel's own accounting costs time per run, so it is measured in a round of its own.
    let stats = BpfStats::enable()?;
    let agent = env.agent()?;
    let rate = churn();
    let cost = agent.program_cost(env);
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

/// Medians over the rounds of a loop's rate with the agent off, on, and on with empty hooks,
/// and of the per-round ratios of the latter two to off.
struct Medians {
    off: f64,
    on: f64,
    empty: f64,
    on_ratio: f64,
    empty_ratio: f64,
}

/// `rounds` rounds of `measure` (a rate in `unit`) with no agent, the agent `on` starts and the
/// one `empty` starts, each round printed.
fn measure_rounds(
    rounds: u32,
    on: &dyn Fn() -> Result<Agent>,
    empty: &dyn Fn() -> Result<Agent>,
    measure: impl Fn() -> Result<f64>,
    unit: &str,
) -> Result<Medians> {
    const ARMS: [&str; 3] = ["off", "on", "empty"];
    let mut rates: [Vec<f64>; 3] = Default::default();
    let mut ratios: [Vec<f64>; 2] = Default::default();
    for r in 0..rounds {
        // Rotate the order so that a drift (a busy neighbour) favours no arm.
        let mut rate = [0.0; 3];
        let order: Vec<usize> = (0..3).map(|i| (i + r as usize) % 3).collect();
        for &arm in &order {
            let agent = match arm {
                1 => Some(on()?),
                2 => Some(empty()?),
                _ => None,
            };
            let measured = measure();
            if let Some(agent) = agent {
                agent.stop()?;
            }
            rate[arm] = measured?;
        }
        println!(
            "round {}/{rounds} ({}): off {:.0} {unit}, on {:.0} {unit}, empty {:.0} {unit}; ratios {:.3}, {:.3}",
            r + 1,
            order.iter().map(|&a| ARMS[a]).collect::<Vec<_>>().join(", "),
            rate[0],
            rate[1],
            rate[2],
            rate[1] / rate[0],
            rate[2] / rate[0]
        );
        for (arm, v) in rate.iter().enumerate() {
            rates[arm].push(*v);
        }
        ratios[0].push(rate[1] / rate[0]);
        ratios[1].push(rate[2] / rate[0]);
    }
    Ok(Medians {
        off: median(&mut rates[0]),
        on: median(&mut rates[1]),
        empty: median(&mut rates[2]),
        on_ratio: median(&mut ratios[0]),
        empty_ratio: median(&mut ratios[1]),
    })
}

/// The CPU the measured loops run on: the first this process may use. On one CPU a loop's rate
/// is what its work costs; spread over several, it is as much where the scheduler puts the
/// client and server threads and how fast they wake each other (on a 2-vCPU VM, two runs of the
/// same loop differed by 11%, standard deviation of their ratio, against a few percent pinned).
fn loop_cpu() -> Result<usize> {
    // SAFETY: a zeroed cpu_set_t is valid.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; it writes at most the set's size.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) } != 0 {
        return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE.
        .find(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .context("this process may run on no CPU")
}

/// Pins the calling thread (and the threads it starts from now on) to `cpu`.
fn pin(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` < CPU_SETSIZE (from `loop_cpu`).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; the set is valid for its size.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) } != 0 {
        return Err(std::io::Error::last_os_error()).context("sched_setaffinity");
    }
    Ok(())
}

/// Request/response on kept-alive connections (one byte each way), agent off and on.
fn pingpong(env: &Env, rounds: u32, round: Duration, cpu: usize) -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    thread::spawn(move || {
        // The echo threads it starts inherit the CPU.
        if pin(cpu).is_err() {
            return;
        }
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
                thread::spawn(move || -> Result<u64> {
                    pin(cpu)?;
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
    let m = measure_rounds(
        rounds,
        &|| env.agent(),
        &|| env.empty_agent(),
        || run(round),
        "req/s",
    )?;
    println!(
        "request/response on kept-alive connections: off {:.0} req/s, on {:.0} req/s, ratio {:.3} (goal >= 0.98); empty hooks {:.0} req/s, ratio {:.3}",
        m.off, m.on, m.on_ratio, m.empty, m.empty_ratio
    );
    Ok(())
}

/// The agent's resident memory idle, and with `sockets` tracked sockets listed once. A process
/// may not hold that many descriptors here (RLIMIT_NOFILE, no CAP_SYS_RESOURCE), so helper
/// processes (`cargo xtask hold-sockets`) hold them, each within its own limit. They are listed
/// with the CLI, as users list them: `conns` streams (`StreamConnections`), so the peak is that
/// path's. The peak is the listing's alone: start-up (the programs loaded, the kernel's BTF read
/// whole) peaks higher, in its first second, and is printed apart.
fn memory(env: &Env, sockets: usize) -> Result<()> {
    let agent = env.agent()?;
    let (idle, start_peak) = (agent.rss_kib(), agent.hwm_kib());
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
    agent.reset_peak()?;
    for cmd in [
        &["conns", "-o", "json"][..],
        &["destinations"][..],
        &["timewait"][..],
    ] {
        let ok = env
            .cli()
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
        "agent memory: idle {:.1} MB (start-up peak {:.1} MB); with {} tracked sockets listed: {:.1} MB now, {:.1} MB peak while listing (goals <= 30 MB idle, <= 64 MB)",
        idle as f64 / 1024.0,
        start_peak as f64 / 1024.0,
        sockets / 2 * 2,
        rss as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    Ok(())
}

/// Raises the soft limit on open files to the hard one; returns it.
pub(crate) fn fd_limit() -> usize {
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

/// One run of the connect loop in a network namespace of its own, with its own server. The
/// TIME_WAIT sockets a run leaves (for 60 s, up to `tcp_max_tw_buckets` per namespace) go with
/// its namespace instead of slowing down, or speeding up, the runs after it.
fn churn_in_fresh_netns(length: Duration, cpu: usize) -> Result<f64> {
    let ns = NetNs::new()?;
    ns.run(move || {
        // The server and client threads inherit the CPU.
        pin(cpu)?;
        let server = Server::start()?;
        let rate = connect_loop(server.addr, length);
        server.stop();
        rate
    })
}

/// A listener on 127.0.0.1 served by one thread that accepts and closes at once. The server
/// closes first, so TIME_WAIT lands on its side and the clients' ephemeral ports stay free.
struct Server {
    addr: SocketAddr,
    done: Arc<AtomicBool>,
    thread: thread::JoinHandle<()>,
}

impl Server {
    fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let done = Arc::new(AtomicBool::new(false));
        let stop = done.clone();
        let thread = thread::Builder::new()
            .name("bench-server".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    drop(stream);
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                }
            })
            .context("starting the server thread")?;
        Ok(Self { addr, done, thread })
    }

    /// Stops the server and closes its listener.
    fn stop(self) {
        self.done.store(true, Ordering::Relaxed);
        // Wakes the blocked accept.
        let _ = TcpStream::connect(self.addr);
        let _ = self.thread.join();
    }
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

impl Agent {
    /// Run count, time and recursion misses of the programs on the connection path, from the
    /// agent's own `info` (which reads the kernel's fdinfo).
    fn program_cost(&self, env: &Env) -> ProgCost {
        let out = env.cli().args(["info", "-o", "json"]).output();
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
}

/// The breaker's service whose latency is measured, and the one tripped under a burst.
const SVC_OPEN: &str = "bench-open";
const SVC_BURST: &str = "bench-burst";
/// A service with `granularity = "destination"`: the refusal cost of an ejected destination.
const SVC_EJECT: &str = "bench-eject";
/// Connects per burst thread and round.
const BURST_CONNECTS: u64 = 1_000;
/// Bursts, each tripping the breaker once (reset in between).
const BURST_ROUNDS: u64 = 10;
/// How long the agent may take to show a trip (state, watch event).
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The breaker's figures, from one agent with two services (`consecutive_failures = 1`, open
/// for 10 minutes) on closed ports:
///
/// - latency: `connect()` to `bench-open`'s endpoint once the breaker is open (refused in the
///   kernel) against `connect()` to a closed port of no service (refused by an RST), interleaved;
/// - burst: `burst_threads` threads in a fresh network namespace connect to `bench-burst`'s
///   endpoint at once; the first RST trips it, and every connect that still sends a SYN after
///   that (the namespace's `ActiveOpens` minus the connects admitted before the trip, from the
///   trip event's `requests`) passed a breaker whose trip condition held; `BURST_ROUNDS`
///   times, reset in between.
fn breaker(env: &Env, args: &Args) -> Result<()> {
    // Bound and never listening: a SYN to these ports is answered with an RST, and nothing
    // else can take them during the run.
    let (open_sock, open_addr) = reserve_port()?;
    let (closed_sock, closed_addr) = reserve_port()?;
    let (burst_sock, burst_addr) = reserve_port()?;
    let (eject_sock, eject_addr) = reserve_port()?;
    let config = env.dir.join("bench-breaker.toml");
    let policy = "[service.breaker]\nconsecutive_failures = 1\nopen_timeout = \"10m\"\n";
    fs::write(
        &config,
        format!(
            "[[service]]\nname = \"{SVC_OPEN}\"\nendpoints = [\"{open_addr}\"]\n{policy}\n\
             [[service]]\nname = \"{SVC_BURST}\"\nendpoints = [\"{burst_addr}\"]\n{policy}\n\
             [[service]]\nname = \"{SVC_EJECT}\"\nendpoints = [\"{eject_addr}\"]\n{policy}\
             granularity = \"destination\"\n"
        ),
    )
    .with_context(|| format!("writing {}", config.display()))?;
    let agent = Agent::start(env, Some(&config))?;

    // Trip `bench-open` the way a dead service does: one connect refused by the network.
    let errno = connect_once(open_addr)?;
    if errno != libc::ECONNREFUSED {
        bail!(
            "the connect that should trip {SVC_OPEN} ({open_addr}) got {}",
            std::io::Error::from_raw_os_error(errno)
        );
    }
    wait_open(env, SVC_OPEN)?;
    let (open, closed) = connect_latency(open_addr, closed_addr, args.connects)?;
    let rejected = breaker_json(env, SVC_OPEN)?["rejected"]
        .as_u64()
        .unwrap_or(0);
    if rejected < args.connects {
        bail!(
            "{SVC_OPEN} counted {rejected} rejected connects, fewer than the {} timed ones",
            args.connects
        );
    }
    let n = open.len();
    let (open_p50, open_p99) = (median(&mut open.clone()), percentile(&open, 99.0));
    let (closed_p50, closed_p99) = (median(&mut closed.clone()), percentile(&closed, 99.0));
    let ratio = open_p50 / closed_p50;
    let met = open_p50 <= 1000.0 && ratio <= 0.25;
    println!(
        "connect() refused by an open breaker: median {:.2} us, p99 {:.2} us; to a closed port (RST): median {:.2} us, p99 {:.2} us; ratio of medians {ratio:.3} ({n} each, interleaved; goals median <= 1 us, ratio <= 0.25: {})",
        open_p50 / 1000.0,
        open_p99 / 1000.0,
        closed_p50 / 1000.0,
        closed_p99 / 1000.0,
        if met { "met" } else { "not met" }
    );

    // The same refusal by a destination's breaker (destination granularity), interleaved with
    // the service-level one.
    let errno = connect_once(eject_addr)?;
    if errno != libc::ECONNREFUSED {
        bail!(
            "the connect that should eject {eject_addr} got {}",
            std::io::Error::from_raw_os_error(errno)
        );
    }
    wait_ejected(env, eject_addr)?;
    let (ejected, service) = connect_latency(eject_addr, open_addr, args.connects)?;
    let (ejected_p50, ejected_p99) = (median(&mut ejected.clone()), percentile(&ejected, 99.0));
    let service_p50 = median(&mut service.clone());
    println!(
        "connect() refused by an ejected destination (granularity destination): median {:.2} us, p99 {:.2} us; by the service's open breaker, interleaved: median {:.2} us; ratio of medians {:.3} ({} each)",
        ejected_p50 / 1000.0,
        ejected_p99 / 1000.0,
        service_p50 / 1000.0,
        ejected_p50 / service_p50,
        ejected.len()
    );

    let burst = burst(env, burst_addr, args.burst_threads)?;
    agent.stop()?;
    drop((open_sock, closed_sock, burst_sock, eject_sock));
    let after = burst.reached_after_trip;
    println!(
        "connects that reached the network after the trip condition held: {after} (goal 0: {}); {BURST_ROUNDS} trips under {} concurrent threads in a fresh namespace, {} connects: {} reached the network (ActiveOpens), {} refused by the breaker, {} admitted before the trips (trip events' requests)",
        if after == 0 { "met" } else { "not met" },
        args.burst_threads,
        burst.attempts,
        burst.reached,
        burst.rejected,
        burst.admitted_before_trip,
    );
    if burst.reached + burst.rejected != burst.attempts {
        println!(
            "warning: reached + refused by the breaker ({}) != connects made ({})",
            burst.reached + burst.rejected,
            burst.attempts
        );
    }
    Ok(())
}

/// Interleaved `connect()` times (ns) to `open` (a tripped breaker's endpoint) and `closed` (a
/// closed port of no service), `n` each after a warm-up; each on a fresh socket, only the
/// `connect` call timed. Every connect must fail with ECONNREFUSED.
fn connect_latency(
    open: SocketAddrV4,
    closed: SocketAddrV4,
    n: u64,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let warmup = 500;
    let mut times = (Vec::new(), Vec::new());
    for i in 0..warmup + n {
        for (addr, out) in [(open, &mut times.0), (closed, &mut times.1)] {
            let sock = tcp_socket()?;
            let sa = sockaddr(addr);
            let start = Instant::now();
            // SAFETY: a valid socket and a sockaddr_in of the size given.
            let rc = unsafe {
                libc::connect(
                    sock.as_raw_fd(),
                    std::ptr::from_ref(&sa).cast(),
                    socklen::<libc::sockaddr_in>(),
                )
            };
            let elapsed = start.elapsed();
            let errno = if rc == 0 { 0 } else { last_errno() };
            if errno != libc::ECONNREFUSED {
                bail!(
                    "connect() to {addr} returned {} instead of ECONNREFUSED",
                    std::io::Error::from_raw_os_error(errno)
                );
            }
            if i >= warmup {
                out.push(elapsed.as_nanos() as f64);
            }
        }
    }
    Ok(times)
}

/// Totals over the burst rounds.
#[derive(Default)]
struct Burst {
    /// Connects made.
    attempts: u64,
    /// Connects that sent a SYN (the namespace's `ActiveOpens`).
    reached: u64,
    /// Connects the breaker refused.
    rejected: u64,
    /// Connects the breaker admitted while closed (each round's trip event's `requests`).
    admitted_before_trip: u64,
    /// Per round, SYNs sent beyond the connects admitted before the trip.
    reached_after_trip: u64,
}

/// `threads` threads in `ns`, released at once, each making `BURST_CONNECTS` connects to
/// `addr`; returns how many were made. Every one must fail with ECONNREFUSED.
fn burst_round(ns: &NetNs, addr: SocketAddrV4, threads: u64) -> Result<u64> {
    let start = Arc::new(Barrier::new(usize::try_from(threads)?));
    let clients: Vec<_> = (0..threads)
        .map(|_| {
            let start = start.clone();
            let file = ns.file()?;
            Ok(thread::spawn(move || -> Result<(u64, u64)> {
                let joined = join(&file);
                start.wait();
                joined?;
                let (mut refused, mut other) = (0, 0);
                for _ in 0..BURST_CONNECTS {
                    match connect_once(addr)? {
                        libc::ECONNREFUSED => refused += 1,
                        _ => other += 1,
                    }
                }
                Ok((refused, other))
            }))
        })
        .collect::<Result<_>>()?;
    let mut attempts = 0;
    for c in clients {
        let (refused, other) = c.join().map_err(|_| anyhow!("a burst client panicked"))??;
        if other > 0 {
            bail!("{other} connects to {addr} failed otherwise than with ECONNREFUSED");
        }
        attempts += refused;
    }
    Ok(attempts)
}

/// Trips `SVC_BURST` under `threads` concurrent connect loops in a namespace of their own, so
/// that its `ActiveOpens` (SYNs sent) counts these connects and nothing else.
fn burst(env: &Env, addr: SocketAddrV4, threads: u64) -> Result<Burst> {
    let ns = NetNs::new()?;
    let mut watch = env
        .cli()
        .args(["-o", "json", "watch", "breakers", "--service", SVC_BURST])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting `breakwater watch breakers`")?;
    let events = watch_lines(&mut watch);
    let result = (|| {
        let mut total = Burst::default();
        for round in 0..BURST_ROUNDS {
            // The stream has no greeting: a manual trip and reset show that it is live; a reset
            // closes the breaker, counts cleared, for the next round.
            let verbs: &[&str] = if round == 0 {
                &["trip", "reset"]
            } else {
                &["reset"]
            };
            for verb in verbs {
                crate::output(env.cli().args([verb, SVC_BURST]))?;
            }
            next_event(&events, "closed")?;
            let before = ns.run(tcp_snmp)?;
            total.attempts += burst_round(&ns, addr, threads)?;
            let after = ns.run(tcp_snmp)?;
            let trip = next_event(&events, "open")?;
            if trip["lost"].as_u64().unwrap_or(0) > 0 || trip["cause"] != "consecutive_failures" {
                bail!("unexpected trip event: {trip}");
            }
            let reached = after.active_opens - before.active_opens;
            let admitted = trip["requests"].as_u64().unwrap_or(0);
            total.reached += reached;
            total.admitted_before_trip += admitted;
            total.reached_after_trip += reached.saturating_sub(admitted);
        }
        total.rejected = breaker_json(env, SVC_BURST)?["rejected"]
            .as_u64()
            .unwrap_or(0);
        Ok(total)
    })();
    let _ = watch.kill();
    let _ = watch.wait();
    result
}

/// `Tcp:` counters of the calling thread's network namespace.
struct TcpSnmp {
    active_opens: u64,
}

fn tcp_snmp() -> Result<TcpSnmp> {
    // /proc/self/net is the main thread's namespace; this thread's is under thread-self.
    let text = fs::read_to_string("/proc/thread-self/net/snmp")?;
    let mut rows = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (rows.next(), rows.next());
    let (Some(names), Some(values)) = (names, values) else {
        bail!("no Tcp: lines in /proc/thread-self/net/snmp");
    };
    let active_opens = names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "ActiveOpens")
        .and_then(|(_, v)| v.parse().ok())
        .context("no Tcp: ActiveOpens in /proc/thread-self/net/snmp")?;
    Ok(TcpSnmp { active_opens })
}

/// The lines `watch` prints, parsed, on a channel (the reader thread ends with the process).
fn watch_lines(child: &mut Child) -> mpsc::Receiver<serde_json::Value> {
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("piped");
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Ok(v) = serde_json::from_str(&line) {
                if tx.send(v).is_err() {
                    break;
                }
            }
        }
    });
    rx
}

/// The next event (skipping others) whose `to` is `to`.
fn next_event(events: &mpsc::Receiver<serde_json::Value>, to: &str) -> Result<serde_json::Value> {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = events.recv_timeout(left).map_err(|_| {
            anyhow!(
                "no breaker event to {to:?} within {}s",
                EVENT_TIMEOUT.as_secs()
            )
        })?;
        if event["to"] == to {
            return Ok(event);
        }
    }
}

/// One service's breaker from `breakwater breakers -o json`.
fn breaker_json(env: &Env, service: &str) -> Result<serde_json::Value> {
    let out = crate::output(env.cli().args(["-o", "json", "breakers"]))?;
    let v: serde_json::Value = serde_json::from_str(&out).context("parsing `breakers -o json`")?;
    v["breakers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|b| b["service"] == service)
        .cloned()
        .with_context(|| format!("no breaker for {service} in `breakers -o json`: {out}"))
}

/// Waits until `bench-eject`'s destination `addr` is ejected (open).
fn wait_ejected(env: &Env, addr: SocketAddrV4) -> Result<()> {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        let b = breaker_json(env, SVC_EJECT)?;
        let open = b["destinations"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|d| d["destination"] == addr.to_string() && d["state"] == "open");
        if open {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{addr} of {SVC_EJECT} is not ejected after a refused connect: {b}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn wait_open(env: &Env, service: &str) -> Result<()> {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        let b = breaker_json(env, service)?;
        if b["state"] == "open" {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{service}'s breaker is not open after a refused connect: {b}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// `p`th percentile (nearest rank).
fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn socklen<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(std::mem::size_of::<T>()).expect("small struct")
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn tcp_socket() -> Result<OwnedFd> {
    // SAFETY: socket(2) has no memory-safety preconditions.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket()");
    }
    // SAFETY: a descriptor we just opened and own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One blocking `connect()` from a fresh socket; its errno (0 if it connected).
fn connect_once(addr: SocketAddrV4) -> Result<i32> {
    connect_socket(addr).map(|(_, errno)| errno)
}

/// A fresh socket after one blocking `connect()`, and its errno (0 if it connected).
fn connect_socket(addr: SocketAddrV4) -> Result<(OwnedFd, i32)> {
    let sock = tcp_socket()?;
    let sa = sockaddr(addr);
    // SAFETY: a valid socket and a sockaddr_in of the size given.
    let rc = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            std::ptr::from_ref(&sa).cast(),
            socklen::<libc::sockaddr_in>(),
        )
    };
    let errno = if rc == 0 { 0 } else { last_errno() };
    Ok((sock, errno))
}

/// A socket bound to a free port of 127.0.0.1 and never listening: connects to it get an RST.
fn reserve_port() -> Result<(OwnedFd, SocketAddrV4)> {
    let sock = tcp_socket()?;
    let mut sa = sockaddr(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
    let mut len = socklen::<libc::sockaddr_in>();
    // SAFETY: a valid socket and a sockaddr_in of the size given, read back into the same.
    let ok = unsafe {
        libc::bind(sock.as_raw_fd(), std::ptr::from_ref(&sa).cast(), len) == 0
            && libc::getsockname(
                sock.as_raw_fd(),
                std::ptr::from_mut(&mut sa).cast(),
                &mut len,
            ) == 0
    };
    if !ok {
        return Err(std::io::Error::last_os_error()).context("binding a socket to 127.0.0.1:0");
    }
    Ok((
        sock,
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, u16::from_be(sa.sin_port)),
    ))
}

/// A named network namespace (`ip netns add bw-bench-<pid>-<n>`) with `lo` up, deleted on drop.
struct NetNs {
    name: String,
}

impl NetNs {
    fn new() -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "bw-bench-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        crate::output(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name };
        crate::output(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]))?;
        Ok(ns)
    }

    /// A descriptor of the namespace, for [`join`] on the threads that should run in it.
    fn file(&self) -> Result<File> {
        let path = Path::new("/run/netns").join(&self.name);
        File::open(&path).with_context(|| format!("opening {}", path.display()))
    }

    /// Runs `f` on a thread in the namespace and returns its result.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
        let file = self.file()?;
        thread::spawn(move || {
            join(&file)?;
            f()
        })
        .join()
        .map_err(|_| anyhow!("a thread in the namespace panicked"))?
    }
}

/// Moves the calling thread (only) into the network namespace `ns`.
fn join(ns: &File) -> Result<()> {
    // SAFETY: setns on a namespace descriptor we hold; it affects the calling thread only.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns(CLONE_NEWNET)");
    }
    Ok(())
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .status();
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
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&[5.0], 99.0), 5.0);
    }

    #[test]
    fn loop_counts_connections() {
        let server = Server::start().unwrap();
        let rate = connect_loop(server.addr, Duration::from_millis(200)).unwrap();
        server.stop();
        assert!(rate > 0.0);
    }

    #[test]
    fn threads_started_by_a_pinned_thread_run_on_its_cpu() {
        let cpu = loop_cpu().unwrap();
        let ran_on = thread::spawn(move || {
            pin(cpu).unwrap();
            // SAFETY: sched_getcpu has no preconditions.
            thread::spawn(|| unsafe { libc::sched_getcpu() })
                .join()
                .unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(usize::try_from(ran_on).ok(), Some(cpu));
    }
}
