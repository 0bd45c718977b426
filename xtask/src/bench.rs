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

use self::{
    api::Api,
    peers::{Bpftrace, Script},
};
use crate::{
    is_root,
    sandbox::{Agent, Env, Launch, Sandbox},
    Workspace,
};

mod api;
#[cfg(feature = "etcd")]
mod fleet;
mod peers;

#[cfg(feature = "etcd")]
pub use fleet::probe as fleet_probe;

/// Client threads running the connect loop.
const CLIENTS: usize = 2;

#[derive(clap::Args)]
pub struct Args {
    /// Length of each arm's run, in seconds (2: 9 rounds of 5 arms and the rest of the
    /// throughput part in about 6 minutes)
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    seconds: u64,
    /// Number of rounds, each one run per arm: the agent off, on, on with empty hooks, and the
    /// bpftrace peers beside the first connect loop
    #[arg(long, default_value_t = 9, value_parser = clap::value_parser!(u32).range(1..))]
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
    /// Services in the config of the agent whose `ListServices` is timed; 0 skips it
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(0..65_536))]
    services: u32,
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
    /// Connect loop (with bpftrace peers), request/response, memory, kernel cost, ListServices
    /// over many services, WatchConnections under churn
    Throughput,
    /// ListServices over many services and WatchConnections under churn (also in throughput)
    Api,
    /// The kernel's accounting of the programs' time per connection and per request, in all
    /// and per program (also in throughput)
    Kernel,
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
    if args.only == Some(Part::Api) {
        api(&env, args)?;
    }
    if args.only == Some(Part::Kernel) {
        let cpu = loop_cpu()?;
        let round = Duration::from_secs(args.seconds);
        let echo = echo_server(cpu)?;
        let off = (
            churn_in_fresh_netns(round, cpu)?,
            pingpong_loop(echo, round, cpu)?,
        );
        kernel_costs(&env, args, cpu, echo, off)?;
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

/// The connect loop, request/response, memory and kernel cost, agent off and on; the bpftrace
/// peers; `ListServices` over many services; `WatchConnections` under churn.
fn throughput(env: &Env, args: &Args) -> Result<()> {
    let started = Instant::now();
    let round = Duration::from_secs(args.seconds);
    let cpu = loop_cpu()?;
    peers::check()?;
    println!(
        "bench: {} rounds of {}s; per round one run of each arm, in an order that changes each round (pairs of rounds: an order and its mirror image, each pair rotated by one): off (no agent), on, empty (on with every program returning at once), and beside the connect loop with breakers enforcing, bpftrace-tcplife and bpftrace-counter (xtask/bpftrace/); ratios are medians of per-round ratios [quartiles]; {CLIENTS} client threads -> 127.0.0.1 in a fresh network namespace per run, the loop's threads pinned to CPU {cpu}; agent args {:?}",
        args.rounds, args.seconds, env.extra
    );

    let churn = || churn_in_fresh_netns(round, cpu);
    let off = || Ok(Beside::Nothing);
    let on = || env.agent().map(Beside::Agent);
    let empty = || env.empty_agent().map(Beside::Agent);
    let tcplife = || Bpftrace::start(Script::Tcplife, env.dir).map(Beside::Bpftrace);
    let counter = || Bpftrace::start(Script::Counter, env.dir).map(Beside::Bpftrace);
    let arms = [
        Arm::new(OFF, &off),
        Arm::new(ON, &on),
        Arm::new(EMPTY, &empty),
        Arm::new(TCPLIFE, &tcplife),
        Arm::new(COUNTER, &counter),
    ];
    let m = measure_rounds(args.rounds, &arms, churn, "conn/s")?;
    let off_rate = m.median(OFF);
    report(
        &m,
        "connect/accept/close loop (breakers enforcing on its cgroup)",
        "conn/s",
        0.97,
        0.97,
    );
    println!(
        "  peers: bpftrace tcplife / off {}, bpftrace counter / off {}, beside breakwater on / off {}",
        m.ratio(TCPLIFE, OFF),
        m.ratio(COUNTER, OFF),
        m.ratio(ON, OFF)
    );
    let vs_counter = m.ratio(ON, COUNTER);
    println!(
        "  on / bpftrace counter {vs_counter} (goal breakwater on >= bpftrace counter: {})",
        met(vs_counter.median >= 1.0)
    );

    // The same with breakers enforcing elsewhere: what tracking alone costs the loop.
    let idle = &env.sandbox.idle_relative;
    let tracking = || Agent::start_with(env, None, idle, false).map(Beside::Agent);
    let empty_idle = || Agent::start_with(env, None, idle, true).map(Beside::Agent);
    let service_hist = || {
        let args = [
            "--disable-feature".to_owned(),
            "destination_latency".to_owned(),
        ];
        let how = Launch {
            name: "agent",
            config: None,
            scope: idle,
            pin_dir: &env.sandbox.pin_dir,
            empty_hooks: false,
            args: &args,
        };
        Agent::launch(env, &how).map(Beside::Agent)
    };
    let arms = [
        Arm::new(OFF, &off),
        Arm::new(ON, &tracking),
        Arm::new(EMPTY, &empty_idle),
        Arm::new(SERVICE_HIST, &service_hist),
    ];
    let m = measure_rounds(args.rounds, &arms, churn, "conn/s")?;
    report(
        &m,
        "connect/accept/close loop, tracking only (breakers enforcing on an empty cgroup)",
        "conn/s",
        0.97,
        0.97,
    );
    println!(
        "  {SERVICE_HIST} / off {}, / empty hooks {}, / on {} (histograms per service only: destination_latency disabled)",
        m.ratio(SERVICE_HIST, OFF),
        m.ratio(SERVICE_HIST, EMPTY),
        m.ratio(SERVICE_HIST, ON)
    );

    let echo = echo_server(cpu)?;
    let pingpong_off = pingpong(env, echo, args.rounds, round, cpu)?;
    if args.sockets > 0 {
        memory(env, args.sockets)?;
    }

    kernel_costs(env, args, cpu, echo, (off_rate, pingpong_off))?;

    api(env, args)?;
    println!("throughput part: {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn api(env: &Env, args: &Args) -> Result<()> {
    if args.services > 0 {
        list_services(env, args.services)?;
    }
    watch_throughput(env, Duration::from_secs(args.seconds), loop_cpu()?)
}

/// The arms' names.
const OFF: &str = "off";
const ON: &str = "on";
const EMPTY: &str = "empty";
const TCPLIFE: &str = "bpftrace-tcplife";
const COUNTER: &str = "bpftrace-counter";
const SERVICE_HIST: &str = "on-service-histograms";

/// What runs beside a loop in one arm; stopped after the arm's run.
enum Beside {
    Nothing,
    Agent(Agent),
    Bpftrace(Bpftrace),
}

impl Beside {
    /// Stops it; a note for the round's line, if it has one.
    fn stop(self) -> Result<Option<String>> {
        match self {
            Self::Nothing => Ok(None),
            Self::Agent(agent) => agent.stop().map(|()| None),
            Self::Bpftrace(bt) => bt.stop().map(|note| Some(note).filter(|n| !n.is_empty())),
        }
    }
}

/// One arm of a measurement: its name, and what it starts beside the loop.
struct Arm<'a> {
    name: &'static str,
    start: &'a dyn Fn() -> Result<Beside>,
}

impl<'a> Arm<'a> {
    fn new(name: &'static str, start: &'a dyn Fn() -> Result<Beside>) -> Self {
        Self { name, start }
    }
}

/// Each arm's rates, one per round, in the arms' order.
struct Rounds {
    names: Vec<&'static str>,
    rates: Vec<Vec<f64>>,
    /// The rounds' wall time, agents' and scripts' starts and stops included.
    took: Duration,
}

impl Rounds {
    fn arm(&self, name: &str) -> usize {
        self.names
            .iter()
            .position(|n| *n == name)
            .unwrap_or_else(|| panic!("no arm {name} in {:?}", self.names))
    }

    fn median(&self, name: &str) -> f64 {
        median(&mut self.rates[self.arm(name)].clone())
    }

    /// The per-round ratios of arm `a`'s rate to arm `b`'s: each pair ran in the same round,
    /// close in time, which a ratio of medians would not respect.
    fn ratio(&self, a: &str, b: &str) -> Spread {
        let (a, b) = (&self.rates[self.arm(a)], &self.rates[self.arm(b)]);
        let ratios: Vec<f64> = a.iter().zip(b).map(|(a, b)| a / b).collect();
        Spread::of(&ratios)
    }
}

/// The order of `n` arms in round `round` (from 0): rounds go in pairs, an order and its
/// mirror image, and each pair starts one arm further down the list. A drift that is linear
/// over a pair (a neighbour getting busy) cancels out; over 2n rounds each arm runs in each
/// place twice and follows each of its neighbours in the list, so that neither a place nor
/// what an arm leaves behind for the next (an agent's maps being freed) favours one arm.
fn arm_order(round: usize, n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).map(|i| (i + round / 2) % n).collect();
    if round % 2 == 1 {
        order.reverse();
    }
    order
}

/// `rounds` rounds of `measure` (a rate in `unit`), one run per arm each, each round printed.
fn measure_rounds(
    rounds: u32,
    arms: &[Arm],
    measure: impl Fn() -> Result<f64>,
    unit: &str,
) -> Result<Rounds> {
    let started = Instant::now();
    let n = arms.len();
    // Ratios to off are printed per round.
    debug_assert_eq!(arms[0].name, OFF);
    let mut rates = vec![Vec::new(); n];
    for r in 0..rounds as usize {
        let order = arm_order(r, n);
        let mut rate = vec![0.0; n];
        let mut notes = vec![None; n];
        for &a in &order {
            let beside = (arms[a].start)()?;
            let measured = measure();
            notes[a] = beside.stop()?;
            rate[a] = measured?;
        }
        let arms_line = (0..n)
            .map(|a| {
                let mut s = format!("{} {:.0}", arms[a].name, rate[a]);
                if a > 0 {
                    s.push_str(&format!(" ({:.3}", rate[a] / rate[0]));
                    if let Some(note) = &notes[a] {
                        s.push_str(&format!("; {note}"));
                    }
                    s.push(')');
                }
                s
            })
            .collect::<Vec<_>>()
            .join(", ");
        let on_empty = match (
            arms.iter().position(|a| a.name == ON),
            arms.iter().position(|a| a.name == EMPTY),
        ) {
            (Some(on), Some(empty)) => format!("; on/empty {:.3}", rate[on] / rate[empty]),
            _ => String::new(),
        };
        println!(
            "round {}/{rounds} ({}): {arms_line} {unit} (ratio to off){on_empty}",
            r + 1,
            order
                .iter()
                .map(|&a| arms[a].name)
                .collect::<Vec<_>>()
                .join(", "),
        );
        for (arm, v) in rate.into_iter().enumerate() {
            rates[arm].push(v);
        }
    }
    Ok(Rounds {
        names: arms.iter().map(|a| a.name).collect(),
        rates,
        took: started.elapsed(),
    })
}

/// The medians of the rates of a loop's off, on and empty arms, then on / off and on / empty
/// (breakwater's own work, the hooks' entry cost set aside) with their goals.
fn report(m: &Rounds, what: &str, unit: &str, goal_off: f64, goal_empty: f64) {
    let rates = m
        .names
        .iter()
        .map(|n| format!("{n} {:.0}", m.median(n)))
        .collect::<Vec<_>>()
        .join(", ");
    println!(
        "{what}: {rates} {unit} (medians of {} rounds; {:.0} s)",
        m.rates[0].len(),
        m.took.as_secs_f64()
    );
    let on_off = m.ratio(ON, OFF);
    println!(
        "  on / off {on_off} (goal >= {goal_off}: {})",
        met(on_off.median >= goal_off)
    );
    println!("  empty hooks / off {}", m.ratio(EMPTY, OFF));
    let on_empty = m.ratio(ON, EMPTY);
    println!(
        "  on / empty hooks {on_empty} (breakwater's own work; goal >= {goal_empty}: {})",
        met(on_empty.median >= goal_empty)
    );
}

fn met(yes: bool) -> &'static str {
    if yes {
        "met"
    } else {
        "not met"
    }
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

/// Request/response on kept-alive connections (one byte each way) to the echo server at
/// `addr`, agent off and on: the requests per second with no agent (median).
fn pingpong(env: &Env, addr: SocketAddr, rounds: u32, round: Duration, cpu: usize) -> Result<f64> {
    let off = || Ok(Beside::Nothing);
    let on = || env.agent().map(Beside::Agent);
    let empty = || env.empty_agent().map(Beside::Agent);
    let arms = [
        Arm::new(OFF, &off),
        Arm::new(ON, &on),
        Arm::new(EMPTY, &empty),
    ];
    let m = measure_rounds(rounds, &arms, || pingpong_loop(addr, round, cpu), "req/s")?;
    report(
        &m,
        "request/response on kept-alive connections",
        "req/s",
        0.98,
        0.99,
    );
    Ok(m.median(OFF))
}

/// A loopback echo server (one byte at a time, a thread per connection) on `cpu`, for the
/// request/response loop; it lives as long as the bench.
fn echo_server(cpu: usize) -> Result<SocketAddr> {
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
    Ok(addr)
}

/// `CLIENTS` threads on `cpu`, each on one kept-alive connection to `addr`, sending a byte and
/// reading the echo for `length`: requests per second.
fn pingpong_loop(addr: SocketAddr, length: Duration, cpu: usize) -> Result<f64> {
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

/// Timed `ListServices` calls: the issue's minimum, as each took ~0.9 s with 10,000 services.
const LIST_CALLS: usize = 50;

/// `ListServices` against an agent whose config holds `services` services (one endpoint each),
/// from a gRPC client on its socket ([`Api`]: no process start-up, no printing): the median and
/// p90 of [`LIST_CALLS`] calls on one connection, after one untimed.
fn list_services(env: &Env, services: u32) -> Result<()> {
    let config = env.dir.join("bench-services.toml");
    let mut text = format!(
        "[maps]\nmax_services = {}\nmax_service_endpoints = {}\n",
        services.max(1024),
        services.max(16384)
    );
    for i in 0..services {
        text.push_str(&format!(
            "\n[[service]]\nname = \"bench-{i:05}\"\nendpoints = [\"10.200.{}.{}:8080\"]\n",
            i / 256,
            i % 256
        ));
    }
    fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
    let start = Instant::now();
    let how = Launch {
        name: "agent",
        config: Some(&config),
        scope: &env.sandbox.relative,
        pin_dir: &env.sandbox.pin_dir,
        empty_hooks: false,
        args: &[],
    };
    // The agent's start is quadratic in services: 10,000 took ~25 s to apply here.
    let agent = Agent::launch_within(env, &how, Duration::from_secs(300))?;
    let ready = start.elapsed();
    let times = (|| {
        let api = Api::connect(&env.dir.join("agent.sock"))?;
        let mut times = Vec::new();
        for call in 0..=LIST_CALLS {
            let (took, n) = api.list_services()?;
            if n != services as usize {
                bail!("ListServices returned {n} services, not {services}");
            }
            if call > 0 {
                times.push(took.as_secs_f64() * 1000.0);
            }
        }
        Ok(times)
    })();
    agent.stop()?;
    let times = times?;
    let (p50, p90) = (median(&mut times.clone()), percentile(&times, 90.0));
    println!(
        "ListServices over {services} services: median {p50:.1} ms, p90 {p90:.1} ms of {LIST_CALLS} calls (a gRPC client on the unix socket, one connection; agent ready {:.1} s after its start; goal <= 50 ms: median {}, p90 {})",
        ready.as_secs_f64(),
        met(p50 <= 50.0),
        met(p90 <= 50.0)
    );
    Ok(())
}

/// `WatchConnections` under the connect loop: one client ([`Api`], in this process, not
/// printing) subscribed to every event while an agent enforcing on the loop's cgroup tracks
/// the loop for `length`. Delivered: the events the client received from the loop's start to
/// the last one, per second of that; lost: what the stream's events reported (`lost`: the
/// client fell behind, or the kernel's ring buffer was full); the kernel's share of those is
/// the agent's `audit_lost`.
/// Each loop connection is opened and closed at both of its ends.
const EVENTS_PER_CONNECTION: f64 = 4.0;

fn watch_throughput(env: &Env, length: Duration, cpu: usize) -> Result<()> {
    let agent = env.agent()?;
    let result = (|| {
        let api = Api::connect(&env.dir.join("agent.sock"))?;
        let kernel_lost = api.counter("audit_lost")?;
        let watch = api.watch()?;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let poke = || -> Result<()> {
            let client = TcpStream::connect(addr)?;
            drop(listener.accept()?);
            drop(client);
            Ok(())
        };
        // The stream has no greeting: it is live once a connection of ours comes through.
        let deadline = Instant::now() + EVENT_TIMEOUT;
        while watch.tally().events == 0 {
            if Instant::now() >= deadline {
                bail!(
                    "no connection event within {}s of subscribing",
                    EVENT_TIMEOUT.as_secs()
                );
            }
            poke()?;
            thread::sleep(Duration::from_millis(50));
        }
        let quiet = Duration::from_millis(500);
        let before = watch.settle(quiet, EVENT_TIMEOUT)?;
        let cpu_before = agent.cpu_time();
        let start = Instant::now();
        let rate = churn_in_fresh_netns(length, cpu)?;
        // Losses ride on the next event: one more connection brings those at the end.
        poke()?;
        let after = watch.settle(quiet, Duration::from_secs(120))?;
        // Over the loop and the settling after it; the agent's tracking of the loop is in it.
        let cpu = agent.cpu_time().saturating_sub(cpu_before).as_secs_f64();
        let kernel_lost = api.counter("audit_lost")? - kernel_lost;
        let delivered = after.events - before.events;
        let lost = after.lost - before.lost;
        let secs = after.last.duration_since(start).as_secs_f64();
        let per_s = delivered as f64 / secs;
        let made = rate * length.as_secs_f64() * EVENTS_PER_CONNECTION;
        println!(
            "watch: {per_s:.0} events/s delivered to one client, {lost} lost (reported), {kernel_lost} kernel audit losses (goal >= 200k events/s: {}); {delivered} events in {secs:.2} s, the loop at {rate:.0} conn/s for {}s made {made:.0} ({:.2} events per connection delivered + lost); the agent's CPU {:.2} s: {:.1} us per event, {:.0}k events/s per CPU",
            met(per_s >= 200_000.0),
            length.as_secs(),
            (delivered + lost) as f64 / (rate * length.as_secs_f64()),
            cpu,
            cpu * 1e6 / delivered.max(1) as f64,
            delivered as f64 / cpu.max(1e-9) / 1000.0,
        );
        Ok(())
    })();
    agent.stop()?;
    result
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

/// [`kernel_cost`] of the connect loop and of request/response (to the echo server at `echo`),
/// given each loop's rate with no agent (`off`: connections/s, requests/s).
fn kernel_costs(
    env: &Env,
    args: &Args,
    cpu: usize,
    echo: SocketAddr,
    off: (f64, f64),
) -> Result<()> {
    let round = Duration::from_secs(args.seconds);
    let conns = Measured {
        label: "",
        unit: "connection",
        goal: 0.97,
        run: &|| churn_in_fresh_netns(round, cpu),
    };
    kernel_cost(env, args, &conns, off.0)?;
    let requests = Measured {
        label: ", request/response",
        unit: "request",
        goal: 0.99,
        run: &|| pingpong_loop(echo, round, cpu),
    };
    kernel_cost(env, args, &requests, off.1)
}

/// A loop whose kernel cost is measured: what it is called, what one unit of its work is (a
/// connection, a request), the goal on / empty hooks, and one run of it (units per second).
struct Measured<'a> {
    label: &'a str,
    unit: &'a str,
    goal: f64,
    run: &'a dyn Fn() -> Result<f64>,
}

/// breakwater's own work per unit of a loop's work from the kernel's accounting (`bpf_stats`):
/// the agent on against every program returning at once, in all and per program, beside the
/// loop's time per unit with no agent (`off_rate`, units per second on its one CPU).
fn kernel_cost(env: &Env, args: &Args, l: &Measured, off_rate: f64) -> Result<()> {
    // The kernel's own accounting costs time per run, so it is measured in rounds of their own:
    // alternating pairs (on first, then empty first), summed.
    let stats = BpfStats::enable()?;
    let cost = |agent: Result<Agent>, into: &mut (ProgCost, f64)| -> Result<()> {
        let agent = agent?;
        let rate = (l.run)();
        into.0.add(agent.program_cost(env));
        agent.stop()?;
        into.1 += rate? * args.seconds as f64;
        Ok(())
    };
    let (mut on, mut empty) = Default::default();
    for pair in 0..KERNEL_PAIRS {
        if pair % 2 == 0 {
            cost(env.agent(), &mut on)?;
            cost(env.empty_agent(), &mut empty)?;
        } else {
            cost(env.empty_agent(), &mut empty)?;
            cost(env.agent(), &mut on)?;
        }
    }
    drop(stats);
    let ((on, on_units), (empty, empty_units)) = (on, empty);
    let (Some(ns), Some(empty_ns)) = (on.ns_per_run(), empty.ns_per_run()) else {
        println!("kernel cost{}: no program ran", l.label);
        return Ok(());
    };
    let unit = l.unit;
    let per_unit = on.time_ns as f64 / on_units;
    let empty_per_unit = empty.time_ns as f64 / empty_units;
    println!(
        "kernel cost{}: {ns:.0} ns per program run over {} runs ({:.1} runs per {unit}, {per_unit:.0} ns per {unit}), {} runs missed (recursion); empty hooks {empty_ns:.0} ns per run ({:.1} runs, {empty_per_unit:.0} ns per {unit})",
        l.label,
        on.runs,
        on.runs as f64 / on_units,
        on.misses,
        empty.runs as f64 / empty_units,
    );
    let per_program = |c: &ProgCost, units: f64| {
        let mut each = c.each.clone();
        each.sort_by_key(|e| std::cmp::Reverse(e.2));
        // Programs that ran less than once per 20 units (in request/response, those that ran
        // only while its connections were set up) are left out of the breakdown, not the totals.
        each.iter()
            .filter(|(_, runs, _)| *runs as f64 / units >= 0.05)
            .map(|(name, runs, time)| {
                format!(
                    "{name} {:.0} ns ({:.1} runs)",
                    *time as f64 / units,
                    *runs as f64 / units
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "  per {unit}, by program: {}; empty hooks: {}",
        per_program(&on, on_units),
        per_program(&empty, empty_units)
    );
    // Time the loop spends per unit with no agent, on its one CPU.
    let loop_ns = 1e9 / off_rate;
    let own = per_unit - empty_per_unit;
    let budget = loop_ns * (1.0 - l.goal) / l.goal;
    println!(
        "  breakwater's own work, from the kernel's accounting: {own:.0} ns per {unit} = {:.1}% of the loop's {loop_ns:.0} ns per {unit} with no agent (goal on / empty >= {} is <= {budget:.0} ns: {})",
        own / loop_ns * 100.0,
        l.goal,
        met(own <= budget)
    );
    Ok(())
}

/// Pairs of rounds (on, empty hooks) the kernel's accounting is summed over.
const KERNEL_PAIRS: u32 = 3;

/// Run statistics of the agent's programs (not its iterators), in all and per program.
#[derive(Default)]
struct ProgCost {
    runs: u64,
    time_ns: u64,
    misses: u64,
    /// Name, runs and time of each program that ran.
    each: Vec<(String, u64, u64)>,
}

impl ProgCost {
    fn add(&mut self, other: ProgCost) {
        self.runs += other.runs;
        self.time_ns += other.time_ns;
        self.misses += other.misses;
        for (name, runs, time) in other.each {
            match self.each.iter_mut().find(|e| e.0 == name) {
                Some(e) => {
                    e.1 += runs;
                    e.2 += time;
                }
                None => self.each.push((name, runs, time)),
            }
        }
    }

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

/// A median with its quartiles: the spread of per-round ratios.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Spread {
    q1: f64,
    median: f64,
    q3: f64,
}

impl Spread {
    fn of(values: &[f64]) -> Self {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Self {
            q1: quantile(&sorted, 0.25),
            median: quantile(&sorted, 0.5),
            q3: quantile(&sorted, 0.75),
        }
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.3} [q1 {:.3}, q3 {:.3}]",
            self.median, self.q1, self.q3
        )
    }
}

/// The `q` quantile of sorted values, interpolated between the two nearest ranks (numpy's
/// default, R's type 7): with 9 rounds the quartiles are the 3rd and 7th values, and the
/// median is [`median`]'s.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let Some(last) = sorted.len().checked_sub(1) else {
        return f64::NAN;
    };
    let h = q * last as f64;
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(last);
    sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo])
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
            let (runs, time) = (
                p["run_count"].as_u64().unwrap_or(0),
                p["run_time_ns"].as_u64().unwrap_or(0),
            );
            cost.runs += runs;
            cost.time_ns += time;
            cost.misses += p["recursion_misses"].as_u64().unwrap_or(0);
            if runs > 0 {
                let name = p["name"].as_str().unwrap_or("?").to_owned();
                cost.each.push((name, runs, time));
            }
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
    fn quartiles_of_nine_rounds_are_the_third_and_seventh_values() {
        let v = [0.95, 0.91, 0.99, 0.93, 0.97, 0.92, 0.98, 0.94, 0.96];
        let s = Spread::of(&v);
        assert_eq!((s.q1, s.median, s.q3), (0.93, 0.95, 0.97));
        assert_eq!(s.to_string(), "0.950 [q1 0.930, q3 0.970]");
    }

    #[test]
    fn quartiles_interpolate_between_ranks() {
        // numpy.quantile([1, 2, 3, 4], [0.25, 0.5, 0.75]) = [1.75, 2.5, 3.25]
        let s = Spread::of(&[4.0, 1.0, 3.0, 2.0]);
        assert_eq!((s.q1, s.median, s.q3), (1.75, 2.5, 3.25));
        assert_eq!(s.median, median(&mut [4.0, 1.0, 3.0, 2.0]));
        let one = Spread::of(&[0.9]);
        assert_eq!((one.q1, one.median, one.q3), (0.9, 0.9, 0.9));
        assert!(Spread::of(&[]).median.is_nan());
    }

    #[test]
    fn arm_orders_are_permutations_balanced_over_two_cycles() {
        for n in 1..=6 {
            // places[arm][place]: rounds in which `arm` ran at `place`.
            let mut places = vec![vec![0; n]; n];
            // follows[a][b]: rounds in which `a` ran right after `b`.
            let mut follows = vec![vec![0; n]; n];
            for round in 0..2 * n {
                let order = arm_order(round, n);
                let mut seen = order.clone();
                seen.sort_unstable();
                assert_eq!(seen, (0..n).collect::<Vec<_>>(), "round {round} of {n}");
                for (place, &arm) in order.iter().enumerate() {
                    places[arm][place] += 1;
                }
                for w in order.windows(2) {
                    follows[w[1]][w[0]] += 1;
                }
            }
            for arm in 0..n {
                assert!(places[arm].iter().all(|&k| k == 2), "{n} arms: {places:?}");
                if n > 2 {
                    // Its neighbours in the list, each from both sides.
                    let (next, prev) = ((arm + 1) % n, (arm + n - 1) % n);
                    assert!(follows[arm][prev] > 0 && follows[arm][next] > 0);
                }
            }
        }
        assert_eq!(arm_order(0, 5), [0, 1, 2, 3, 4]);
        assert_eq!(arm_order(1, 5), [4, 3, 2, 1, 0]);
        assert_eq!(arm_order(2, 5), [1, 2, 3, 4, 0]);
    }

    #[test]
    fn ratios_pair_the_arms_round_by_round() {
        let m = Rounds {
            names: vec![OFF, ON, EMPTY],
            rates: vec![
                vec![100.0, 50.0, 200.0],
                vec![90.0, 50.0, 100.0],
                vec![100.0, 100.0, 100.0],
            ],
            took: Duration::ZERO,
        };
        assert_eq!(m.ratio(ON, OFF).median, 0.9);
        assert_eq!(m.ratio(ON, EMPTY).median, 0.9);
        assert_eq!(m.median(OFF), 100.0);
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
