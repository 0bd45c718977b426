//! `cargo xtask soak --minutes N`: one agent under a steady, mixed load for N minutes, watched
//! for memory drift, errors and losses nobody counted (issue #16).
//!
//! The agent (the release binary) enforces only in the soak's own cgroup and pins in a
//! directory of its own ([`Sandbox`]); it is joined to a real etcd ([`EtcdServer`]) and serves
//! `/metrics`. Its config has [`SERVICES`] services with a policy each over [`DESTS`]
//! destinations, all on loopback: one listener per destination (`127.77.x.y:P`, `127.78.0.y:P`),
//! some of them closed at any time (connects refused, breakers trip, and recover through
//! half-open once the listener is back). Then, for the whole run:
//!
//! - client threads connect at `--rate` per second to destinations chosen at random, and wait
//!   for the server's close (every outcome counted by destination: connected, refused by the
//!   network, refused by a breaker, reset);
//! - a query every second through the CLI (`services`, `breakers`, `destinations`, `info`,
//!   `conns`, `timewait`, `latency`) or a `/metrics` scrape, each of which must succeed;
//! - [`WATCHES`] watch streams held open (`breakwater watch conns|breakers` processes);
//! - a reload every minute (`breakwater reload`, SIGHUP on alternate minutes) of a rewritten
//!   config (an idle service's policy changed, a service added or removed);
//! - etcd killed for [`ETCD_DOWN`] every [`ETCD_PERIOD`], then started again on the same ports
//!   and data; the agent must be connected again [`RECONNECT`] after.
//!
//! What it checks at the end (with the load stopped and the streams drained) is described on
//! [`check`]. Errors (a failed query, reload or stream, an unexpected agent log line at WARN or
//! above, a non-zero error counter, an unexplained count) and uncounted losses fail the soak;
//! the RSS drift is reported against its goal, and fails runs of 10 minutes or more.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader, ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    etcd::EtcdServer,
    is_root,
    sandbox::{Agent, Env, Launch, Sandbox},
    Workspace,
};

/// Destinations connected to, and services (those with destinations, and idle ones).
const DESTS: usize = 1_000;
const SERVICES: usize = 1_000;
/// Services of one destination each (`soak-NNN`, destination NNN) ...
const SINGLE: usize = 900;
/// ... services of `granularity = "destination"` over a /30 (`soak-dNN`, 4 destinations each),
const GROUPS: usize = 25;
/// ... and idle services, never connected to (`soak-iNN`), whose policies the reloads change.
const IDLE: usize = SERVICES - SINGLE - GROUPS;
/// Watch streams held open for the whole run: conns of one service each, breakers of one
/// service each, and breakers of every service.
const WATCH_CONNS: usize = 60;
const WATCH_BREAKERS_ONE: usize = 20;
const WATCH_BREAKERS_ALL: usize = 20;
const WATCHES: usize = WATCH_CONNS + WATCH_BREAKERS_ONE + WATCH_BREAKERS_ALL;
/// Client threads sharing `--rate`.
const CLIENTS: usize = 2;
/// How often a different twentieth of the destinations is closed (each for one period).
const FLAP_PERIOD: Duration = Duration::from_secs(30);
/// etcd goes away for `ETCD_DOWN` every `ETCD_PERIOD`, the first time at `ETCD_FIRST`.
const ETCD_FIRST: Duration = Duration::from_secs(40);
const ETCD_PERIOD: Duration = Duration::from_secs(90);
const ETCD_DOWN: Duration = Duration::from_secs(20);
/// How long the agent may take to be connected again once etcd is back (its backoff is at
/// most 10 s).
const RECONNECT: Duration = Duration::from_secs(20);
const RELOAD_EVERY: Duration = Duration::from_secs(60);
const RSS_EVERY: Duration = Duration::from_secs(5);
/// The RSS goal: the last minute's mean at most this much above the first minute's after the
/// warm-up.
const DRIFT_GOAL: f64 = 0.10;
/// Runs this long or longer fail when the drift misses its goal.
const DRIFT_ENFORCED_MINUTES: u64 = 10;
/// The policy's errno: no connect returns it otherwise on loopback.
const ERRNO: i32 = libc::EHOSTUNREACH;
/// Agent log messages (WARN) that the soak causes on purpose: etcd's outages. Everything else
/// at WARN or above is an error.
const EXPECTED_WARNINGS: [&str; 2] = [
    "fleet: link to etcd lost; enforcing what was last applied",
    "fleet: cannot reach etcd",
];

#[derive(clap::Args)]
pub struct Args {
    /// Length of the run, in minutes
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    minutes: u64,
    /// Connections per second, over the destinations
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=20_000))]
    rate: u64,
    /// Extra arguments for `breakwater agent` (one string, split on whitespace)
    #[arg(
        long,
        default_value = "",
        hide_default_value = true,
        allow_hyphen_values = true
    )]
    agent_args: String,
}

impl Args {
    /// The soak of `cargo xtask test`.
    pub fn ci() -> Self {
        Self {
            minutes: 2,
            rate: 300,
            agent_args: String::new(),
        }
    }
}

pub fn run(ws: &Workspace, args: &Args) -> Result<()> {
    let bin = crate::build(ws)?;
    soak(&bin, args).map(|_| ())
}

/// The soak with an agent already built; its one-line outcome.
pub fn soak(bin: &Path, args: &Args) -> Result<String> {
    if !is_root() {
        bail!("`cargo xtask soak` runs the agent and must run as root (e.g. `sudo -E cargo xtask soak`)");
    }
    crate::bench::fd_limit();
    let sandbox = Sandbox::new(bin, "soak")?;
    let tmp = tempfile::Builder::new()
        .prefix("breakwater-soak-")
        .tempdir()
        .context("creating a temporary directory")?;
    let extra: Vec<&str> = args.agent_args.split_whitespace().collect();
    let env = Env {
        bin,
        dir: tmp.path(),
        sandbox: &sandbox,
        extra: &extra,
    };
    let mut etcd = EtcdServer::start(&tmp.path().join("etcd"), "breakwater-soak")?;
    let servers = Servers::start()?;
    let layout = Layout::new(servers.port);
    let config = tmp.path().join("soak.toml");
    fs::write(&config, layout.config(0)).context("writing the soak's config")?;
    let metrics_port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let node = format!("soak-{}", std::process::id());
    let agent_args = [
        "--etcd".to_owned(),
        etcd.url(),
        "--node-name".to_owned(),
        node.clone(),
        "--metrics-listen".to_owned(),
        format!("127.0.0.1:{metrics_port}"),
        "--log-format".to_owned(),
        "json".to_owned(),
    ];
    let agent = Agent::launch(
        &env,
        &Launch {
            name: "agent",
            config: Some(&config),
            scope: &sandbox.relative,
            pin_dir: &sandbox.pin_dir,
            empty_hooks: false,
            args: &agent_args,
        },
    )?;
    println!(
        "soak: {} minutes; agent pid {} (scope {}, pins {}, {}, node {node}, /metrics on 127.0.0.1:{metrics_port}); {SERVICES} services with a policy each ({SINGLE} of one destination, {GROUPS} of granularity destination over 4, {IDLE} idle), {DESTS} destinations on loopback port {}, a twentieth closed every {}s and every fiftieth always; {} conn/s on {CLIENTS} threads; {WATCHES} watch streams; a query every second; a reload every {}s; etcd down {}s every {}s",
        args.minutes,
        agent.pid(),
        sandbox.relative,
        sandbox.pin_dir.display(),
        etcd.version,
        servers.port,
        FLAP_PERIOD.as_secs(),
        args.rate,
        RELOAD_EVERY.as_secs(),
        ETCD_DOWN.as_secs(),
        ETCD_PERIOD.as_secs(),
    );
    let ctx = Ctx {
        env: &env,
        agent: &agent,
        layout: &layout,
        errors: Errors::default(),
        metrics_port,
        last: Mutex::default(),
    };
    let result = run_soak(&ctx, args, &servers, &mut etcd, &config);
    let stopped = agent.stop();
    servers.stop();
    let outcome = result?;
    stopped?;
    Ok(outcome)
}

/// What the soak's threads share.
struct Ctx<'a> {
    env: &'a Env<'a>,
    agent: &'a Agent,
    layout: &'a Layout,
    errors: Errors,
    metrics_port: u16,
    /// The last value of each counter `info` reports (counters, map evictions, recursion
    /// misses): none may go backwards.
    last: Mutex<BTreeMap<String, u64>>,
}

impl Ctx<'_> {
    /// `info` the soak's own way: every counter in it must be at least what it was before.
    fn info(&self, now: Duration) -> Result<serde_json::Value> {
        let info = self.query(&["info"])?;
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let counters = info["counters"].as_array().into_iter().flatten();
        let maps = info["maps"].as_array().into_iter().flatten();
        let programs = info["programs"].as_array().into_iter().flatten();
        let values = counters
            .map(|c| (format!("counter {}", c["name"]), &c["value"]))
            .chain(maps.map(|m| (format!("{} evictions", m["name"]), &m["evictions"])))
            .chain(programs.map(|p| {
                (
                    format!("{} recursion misses", p["name"]),
                    &p["recursion_misses"],
                )
            }));
        for (name, value) in values {
            let value = value.as_u64().unwrap_or(0);
            let before = last.insert(name.clone(), value).unwrap_or(0);
            if value < before {
                self.errors.add(
                    now,
                    format!("info: {name} went backwards, from {before} to {value}"),
                );
            }
        }
        Ok(info)
    }

    /// `breakwater --agent <agent> -o json ARGS`, parsed; a failure is an error of the soak.
    fn query(&self, args: &[&str]) -> Result<serde_json::Value> {
        let out = crate::output(self.agent.cli(self.env).args(["-o", "json"]).args(args))?;
        serde_json::from_str(&out).with_context(|| format!("`{}` printed no JSON", args.join(" ")))
    }
}

/// Errors seen, with when (seconds into the run).
#[derive(Default)]
struct Errors(Mutex<Vec<String>>);

impl Errors {
    fn add(&self, at: Duration, what: impl std::fmt::Display) {
        let line = format!("{:>5}s {what}", at.as_secs());
        eprintln!("soak error: {line}");
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(line);
    }

    fn count(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn list(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn run_soak(
    ctx: &Ctx,
    args: &Args,
    servers: &Servers,
    etcd: &mut EtcdServer,
    config: &Path,
) -> Result<String> {
    let length = Duration::from_secs(args.minutes * 60);
    // Before any load: the counters' zero, the streams subscribed.
    let info0 = ctx.info(Duration::ZERO)?;
    let watches = Watches::start(ctx)?;
    // Let every stream reach the agent before the first connect.
    thread::sleep(Duration::from_secs(2));
    watches.check_alive(ctx, Duration::ZERO);

    let start = Instant::now();
    let stop = AtomicBool::new(false);
    let outcomes = Outcomes::default();
    let rss = Mutex::new(Vec::<(f64, u64)>::new());
    let mut minute_lines = Vec::new();
    let mut reloads = 0u64;
    let mut etcd_outages = 0u64;
    let mut queries = Queries::default();
    thread::scope(|s| -> Result<()> {
        for k in 0..CLIENTS {
            let (stop, outcomes, layout) = (&stop, &outcomes, ctx.layout);
            let rate = args.rate as f64 / CLIENTS as f64;
            s.spawn(move || client(k, rate, layout, outcomes, stop));
        }
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let kib = ctx.agent.rss_kib();
                rss.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((start.elapsed().as_secs_f64(), kib));
                sleep_unless(&stop, RSS_EVERY);
            }
        });
        // The main loop: a tick per second.
        let mut tick = 0u64;
        let mut next_reload = RELOAD_EVERY;
        let mut etcd_down_at = ETCD_FIRST;
        let mut etcd_back_at = None::<Duration>;
        let mut next_minute = Duration::from_secs(60);
        let mut flap_epoch = u64::MAX;
        loop {
            let now = start.elapsed();
            if now >= length {
                break;
            }
            let epoch = now.as_secs() / FLAP_PERIOD.as_secs();
            if epoch != flap_epoch {
                flap_epoch = epoch;
                if let Err(e) = servers.flap(epoch) {
                    ctx.errors.add(now, format!("reopening listeners: {e:#}"));
                }
            }
            queries.run(ctx, tick, now);
            if now >= next_reload {
                reloads += 1;
                if let Err(e) = reload(ctx, config, reloads) {
                    ctx.errors.add(now, format!("reload {reloads}: {e:#}"));
                }
                next_reload += RELOAD_EVERY;
            }
            if etcd.running() && now >= etcd_down_at && now + ETCD_DOWN < length {
                etcd.stop();
                etcd_outages += 1;
            } else if !etcd.running() && now >= etcd_down_at + ETCD_DOWN {
                if let Err(e) = etcd.start_again() {
                    ctx.errors
                        .add(now, format!("etcd did not come back: {e:#}"));
                }
                etcd_back_at = Some(now);
                etcd_down_at += ETCD_PERIOD;
            }
            if let Some(back) = etcd_back_at {
                if now >= back + RECONNECT {
                    etcd_back_at = None;
                    match ctx.info(now) {
                        Ok(info) if info["fleet"]["connected"] == true => {}
                        Ok(info) => ctx.errors.add(
                            now,
                            format!(
                                "the agent is not connected to etcd {}s after it came back: {}",
                                RECONNECT.as_secs(),
                                info["fleet"]
                            ),
                        ),
                        Err(e) => ctx.errors.add(now, format!("info: {e:#}")),
                    }
                }
            }
            watches.check_alive(ctx, now);
            if now >= next_minute {
                next_minute += Duration::from_secs(60);
                let line = progress(ctx, &outcomes, &rss, &watches, now, etcd.running());
                println!("{line}");
                minute_lines.push(line);
            }
            tick += 1;
            let next = Duration::from_secs(tick);
            thread::sleep(next.saturating_sub(start.elapsed()));
        }
        stop.store(true, Ordering::Relaxed);
        Ok(())
    })?;
    let took = start.elapsed();
    if !etcd.running() {
        etcd.start_again()?;
    }
    // The load has stopped: let the last events reach the streams.
    watches.drain();
    // Logs first: the checks below query the agent, which logs nothing at WARN for that.
    scan_log(ctx, took);
    let report = check(ctx, &info0, &outcomes, servers.accepted(), &watches, took)?;
    watches.stop();
    let rss = rss.into_inner().unwrap_or_else(|e| e.into_inner());
    let drift = Drift::of(&rss, took);
    let summary = Summary {
        took,
        rate: args.rate,
        outcomes: &outcomes,
        drift: &drift,
        report: &report,
        queries: &queries,
        reloads,
        etcd_outages,
        errors: ctx.errors.count(),
    };
    summary.print();
    let errors = ctx.errors.list();
    if !errors.is_empty() {
        println!("errors ({}):", errors.len());
        for e in errors.iter().take(50) {
            println!("  {e}");
        }
    }
    let mut failures = Vec::new();
    if !errors.is_empty() {
        failures.push(format!("{} errors", errors.len()));
    }
    if !report.uncounted.is_empty() {
        failures.push(format!("uncounted losses: {}", report.uncounted.join("; ")));
    }
    if args.minutes >= DRIFT_ENFORCED_MINUTES && drift.pct.is_some_and(|p| p > DRIFT_GOAL * 100.0) {
        failures.push(format!(
            "RSS drift {:.1}% over the goal of {:.0}%",
            drift.pct.unwrap_or(0.0),
            DRIFT_GOAL * 100.0
        ));
    }
    if !failures.is_empty() {
        bail!("soak failed: {}", failures.join(", "));
    }
    Ok(format!(
        "ok, {} min, {} connections, RSS drift {}, {} events delivered, {} lost (all counted), 0 errors",
        args.minutes,
        outcomes.total(),
        drift.shown(),
        report.delivered,
        report.lost
    ))
}

/// Sleeps for `d`, waking early when `stop` is set.
fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let until = Instant::now() + d;
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        thread::sleep(Duration::from_millis(100).min(until - Instant::now()));
    }
}

/// Where the destinations are, what the services are, and the config that says so.
struct Layout {
    port: u16,
}

impl Layout {
    fn new(port: u16) -> Self {
        Self { port }
    }

    /// Destination `i`: `127.77.(i/100).(i%100+1)` for the single-destination services,
    /// `127.78.0.(4+j)` for the others (25 aligned /30s from 127.78.0.4).
    fn dest(&self, i: usize) -> SocketAddrV4 {
        let ip = if i < SINGLE {
            Ipv4Addr::new(127, 77, (i / 100) as u8, (i % 100 + 1) as u8)
        } else {
            Ipv4Addr::new(127, 78, 0, (4 + i - SINGLE) as u8)
        };
        SocketAddrV4::new(ip, self.port)
    }

    /// The service destination `i` belongs to.
    fn service_of(i: usize) -> String {
        if i < SINGLE {
            format!("soak-{i:03}")
        } else {
            format!("soak-d{:02}", (i - SINGLE) / 4)
        }
    }

    /// Destination `i` is closed (no listener) in flap period `epoch`: a twentieth of them in
    /// turn, and every fiftieth always.
    fn closed(i: usize, epoch: u64) -> bool {
        i % 50 == 49 || (i as u64) % 20 == epoch % 20
    }

    /// The config of the `n`th reload (0: the first): idle service `n % IDLE`'s open timeout
    /// is 31 s instead of 30 s, and `soak-extra` exists in odd ones.
    fn config(&self, n: u64) -> String {
        let p = self.port;
        let mut c = String::from("[metrics]\ntop_destinations = 50\n\n");
        for i in 0..SINGLE {
            let policy = if i % 3 == 0 {
                "preset = \"gobreaker\"\nmin_requests = 2"
            } else {
                "consecutive_failures = 3"
            };
            let _ = write!(
                c,
                "[[service]]\nname = \"{}\"\nendpoints = [\"{}\"]\n[service.breaker]\n{policy}\nopen_timeout = \"2s\"\nerrno = \"EHOSTUNREACH\"\nterminate_established = false\n\n",
                Self::service_of(i),
                self.dest(i)
            );
        }
        for g in 0..GROUPS {
            let preset = if g % 2 == 0 { "nginx" } else { "envoy" };
            let _ = write!(
                c,
                "[[service]]\nname = \"soak-d{g:02}\"\nendpoints = [\"127.78.0.{}/30:{p}\"]\n[service.breaker]\npreset = \"{preset}\"\nopen_timeout = \"2s\"\nmax_open_timeout = \"8s\"\nerrno = \"EHOSTUNREACH\"\n\n",
                4 + 4 * g
            );
        }
        for k in 0..IDLE {
            let timeout = if n > 0 && (n as usize) % IDLE == k {
                31
            } else {
                30
            };
            let _ = write!(
                c,
                "[[service]]\nname = \"soak-i{k:02}\"\nendpoints = [\"127.79.0.{}:{p}\"]\n[service.breaker]\nconsecutive_failures = 5\nopen_timeout = \"{timeout}s\"\n\n",
                k + 1
            );
        }
        if n % 2 == 1 {
            let _ = write!(
                c,
                "[[service]]\nname = \"soak-extra\"\nendpoints = [\"127.79.1.1:{p}\"]\n\n"
            );
        }
        c
    }
}

/// One listener per destination, on one server thread that accepts and closes at once (the
/// server closes first: TIME_WAIT lands on its side, the clients' ports stay free).
struct Servers {
    port: u16,
    /// Listeners to (re)open or close: set by `flap`, applied by the thread.
    want_epoch: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
    /// Errors of the server thread (reopening a listener).
    failure: Arc<Mutex<Option<String>>>,
    done: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Servers {
    fn start() -> Result<Self> {
        // The port: whatever the first address gets, then the same on every other.
        let first = TcpListener::bind("127.77.0.1:0").context("binding 127.77.0.1:0")?;
        let port = first.local_addr()?.port();
        drop(first);
        let layout = Layout::new(port);
        let mut listeners: Vec<Option<TcpListener>> = Vec::with_capacity(DESTS);
        for i in 0..DESTS {
            listeners.push(Some(listen(layout.dest(i))?));
        }
        let want_epoch = Arc::new(AtomicU64::new(u64::MAX));
        let accepted = Arc::new(AtomicU64::new(0));
        let failure = Arc::new(Mutex::new(None));
        let done = Arc::new(AtomicBool::new(false));
        let (want, acc, fail, stop) = (
            want_epoch.clone(),
            accepted.clone(),
            failure.clone(),
            done.clone(),
        );
        let thread = thread::Builder::new()
            .name("soak-servers".into())
            .spawn(move || serve(&layout, listeners, &want, &acc, &fail, &stop))
            .context("starting the server thread")?;
        Ok(Self {
            port,
            want_epoch,
            accepted,
            failure,
            done,
            thread: Some(thread),
        })
    }

    /// Closes the listeners of period `epoch` and reopens the others.
    fn flap(&self, epoch: u64) -> Result<()> {
        self.want_epoch.store(epoch, Ordering::Relaxed);
        if let Some(f) = self
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            bail!(f);
        }
        Ok(())
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    fn stop(mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn listen(addr: SocketAddrV4) -> Result<TcpListener> {
    // std sets SO_REUSEADDR: a listener reopens whatever TIME_WAIT its port has.
    let l = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

fn serve(
    layout: &Layout,
    mut listeners: Vec<Option<TcpListener>>,
    want: &AtomicU64,
    accepted: &AtomicU64,
    failure: &Mutex<Option<String>>,
    done: &AtomicBool,
) {
    let mut epoch = u64::MAX;
    while !done.load(Ordering::Relaxed) {
        let w = want.load(Ordering::Relaxed);
        if w != epoch {
            epoch = w;
            for (i, l) in listeners.iter_mut().enumerate() {
                let closed = w != u64::MAX && Layout::closed(i, w);
                match (closed, l.is_some()) {
                    (true, true) => *l = None,
                    (false, false) => match listen(layout.dest(i)) {
                        Ok(new) => *l = Some(new),
                        Err(e) => {
                            *failure.lock().unwrap_or_else(|e| e.into_inner()) =
                                Some(format!("{e:#}"));
                        }
                    },
                    _ => {}
                }
            }
        }
        let mut fds: Vec<libc::pollfd> = listeners
            .iter()
            .flatten()
            .map(|l| libc::pollfd {
                fd: l.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: a valid array of pollfd of the length given.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
        if n <= 0 {
            continue;
        }
        let ready: Vec<i32> = fds
            .iter()
            .filter(|p| p.revents & libc::POLLIN != 0)
            .map(|p| p.fd)
            .collect();
        for l in listeners.iter().flatten() {
            if !ready.contains(&l.as_raw_fd()) {
                continue;
            }
            while let Ok((stream, _)) = l.accept() {
                drop(stream);
                accepted.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Outcome of a client's connection.
#[derive(Clone, Copy)]
enum Outcome {
    /// Connected; the server's close read as EOF.
    Ok = 0,
    /// Refused by the network (no listener: an RST).
    Refused = 1,
    /// Refused by a breaker (the policy's errno).
    Rejected = 2,
    /// Connected, then reset (a listener closed with the connection in its accept queue).
    Reset = 3,
    /// Anything else: an error of the soak.
    Other = 4,
}

/// Outcomes by destination.
struct Outcomes(Vec<[AtomicU64; 5]>);

impl Default for Outcomes {
    fn default() -> Self {
        Self((0..DESTS).map(|_| Default::default()).collect())
    }
}

impl Outcomes {
    fn add(&self, dest: usize, o: Outcome) {
        self.0[dest][o as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn sum(&self, o: Outcome) -> u64 {
        self.0
            .iter()
            .map(|d| d[o as usize].load(Ordering::Relaxed))
            .sum()
    }

    /// Of the destinations of `service`.
    fn of_service(&self, service: &str, o: Outcome) -> u64 {
        (0..DESTS)
            .filter(|&i| Layout::service_of(i) == service)
            .map(|i| self.0[i][o as usize].load(Ordering::Relaxed))
            .sum()
    }

    fn total(&self) -> u64 {
        (0..5)
            .map(|o| {
                self.0
                    .iter()
                    .map(|d| d[o].load(Ordering::Relaxed))
                    .sum::<u64>()
            })
            .sum()
    }
}

/// Client thread `k`: `rate` connections per second to random destinations until `stop`.
fn client(k: usize, rate: f64, layout: &Layout, outcomes: &Outcomes, stop: &AtomicBool) {
    let mut rng = 0x9E37_79B9_7F4A_7C15_u64 ^ (k as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let start = Instant::now();
    let mut n = 0u64;
    let mut first_other = true;
    while !stop.load(Ordering::Relaxed) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let i = (rng % DESTS as u64) as usize;
        let (o, error) = connect(SocketAddr::V4(layout.dest(i)));
        if let (Outcome::Other, Some(e), true) = (o, error, first_other) {
            first_other = false;
            eprintln!(
                "soak: client {k}: {} : {e} (first of its kind)",
                layout.dest(i)
            );
        }
        outcomes.add(i, o);
        n += 1;
        let due = start + Duration::from_secs_f64(n as f64 / rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
    }
}

fn connect(addr: SocketAddr) -> (Outcome, Option<std::io::Error>) {
    let mut stream = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => {
            let o = match e.raw_os_error() {
                Some(libc::ECONNREFUSED) => Outcome::Refused,
                Some(ERRNO) => Outcome::Rejected,
                _ => Outcome::Other,
            };
            return (o, Some(e));
        }
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut b = [0u8; 1];
    match stream.read(&mut b) {
        Ok(_) => (Outcome::Ok, None),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => (Outcome::Reset, Some(e)),
        Err(e) => (Outcome::Other, Some(e)),
    }
}

/// The queries of the main loop: one per second, in turn.
#[derive(Default)]
struct Queries {
    done: u64,
    failed: u64,
    slowest: Duration,
}

const QUERIES: [&[&str]; 8] = [
    &["services"],
    &["breakers"],
    &["destinations", "--limit", "50"],
    &["info"],
    &["conns", "--limit", "20"],
    &["timewait", "--limit", "10"],
    &["latency", "soak-000"],
    &[], // the /metrics scrape
];

impl Queries {
    fn run(&mut self, ctx: &Ctx, tick: u64, now: Duration) {
        let q = QUERIES[(tick % QUERIES.len() as u64) as usize];
        let started = Instant::now();
        let result = if q.is_empty() {
            scrape(ctx.metrics_port).map(|_| ())
        } else if q == ["info"] {
            ctx.info(now).map(|_| ())
        } else {
            ctx.query(q).map(|_| ())
        };
        self.done += 1;
        self.slowest = self.slowest.max(started.elapsed());
        if let Err(e) = result {
            self.failed += 1;
            let what = if q.is_empty() {
                "GET /metrics".to_owned()
            } else {
                q.join(" ")
            };
            ctx.errors.add(now, format!("query `{what}`: {e:#}"));
        }
    }
}

/// `GET /metrics`: must answer 200 with the agent's families.
fn scrape(port: u16) -> Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    if !text.starts_with("HTTP/1.0 200") && !text.starts_with("HTTP/1.1 200") {
        bail!("answered {:?}", text.lines().next().unwrap_or("nothing"));
    }
    if !text.contains("breakwater_map_entries") {
        bail!("no breakwater_map_entries in the answer");
    }
    Ok(text)
}

/// Rewrites the config (the `n`th reload) and applies it: `breakwater reload` on odd reloads,
/// SIGHUP on even ones (then the agent's log must say it reloaded).
fn reload(ctx: &Ctx, config: &Path, n: u64) -> Result<()> {
    fs::write(config, ctx.layout.config(n))?;
    let idle = format!("soak-i{:02}", (n as usize) % IDLE);
    if n % 2 == 1 {
        let v = ctx.query(&["reload"])?;
        let changed = v["policies_changed"].as_array().into_iter().flatten();
        if !changed.clone().any(|s| s == idle.as_str()) {
            bail!("the reload did not change {idle}'s policy: {v}");
        }
        if !v["services_added"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s == "soak-extra")
        {
            bail!("the reload did not add soak-extra: {v}");
        }
    } else {
        let before = log_count(ctx, "SIGHUP: config reloaded");
        let pid = libc::pid_t::try_from(ctx.agent.pid())?;
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
        if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
            return Err(std::io::Error::last_os_error()).context("SIGHUP");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while log_count(ctx, "SIGHUP: config reloaded") == before {
            if Instant::now() >= deadline {
                bail!("the agent did not log `SIGHUP: config reloaded` within 10 s of SIGHUP");
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

fn log_count(ctx: &Ctx, message: &str) -> usize {
    fs::read_to_string(&ctx.agent.log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(message))
        .count()
}

/// Every agent log line at WARN or above that is not one of [`EXPECTED_WARNINGS`] is an error;
/// so is a line that is not JSON (`--log-format json`).
fn scan_log(ctx: &Ctx, at: Duration) {
    let log = fs::read_to_string(&ctx.agent.log).unwrap_or_default();
    let mut expected = BTreeMap::<&str, u64>::new();
    for line in log.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            ctx.errors
                .add(at, format!("agent log line not JSON: {line}"));
            continue;
        };
        let level = v["level"].as_str().unwrap_or("");
        if level != "WARN" && level != "ERROR" {
            continue;
        }
        let message = v["fields"]["message"].as_str().unwrap_or("");
        if let Some(m) = EXPECTED_WARNINGS.iter().find(|m| **m == message) {
            *expected.entry(m).or_default() += 1;
        } else {
            ctx.errors.add(at, format!("agent log: {line}"));
        }
    }
    println!("agent log: expected warnings {expected:?}");
}

/// The watch streams: `breakwater -o json watch ...` processes, each read by a thread.
struct Watches {
    streams: Vec<Stream>,
}

struct Stream {
    /// `conns SERVICE`, `breakers SERVICE` or `breakers`.
    what: String,
    service: Option<String>,
    conns: bool,
    child: Mutex<Child>,
    stats: Arc<Mutex<StreamStats>>,
    stderr: PathBuf,
    /// Reported dead already.
    dead: AtomicBool,
}

#[derive(Default, Clone)]
struct StreamStats {
    /// Events received, by `kind` (conns) or `to` (breakers).
    events: BTreeMap<String, u64>,
    received: u64,
    /// The sum of the events' `lost`.
    lost: u64,
    /// Lines that were not events.
    garbage: u64,
}

impl Watches {
    fn start(ctx: &Ctx) -> Result<Self> {
        let mut streams = Vec::with_capacity(WATCHES);
        // Spread over the services: single ones (dead ones among them) and groups.
        let conns = (0..WATCH_CONNS).map(|k| {
            if k % 6 == 5 {
                Layout::service_of(SINGLE + (k / 6) % GROUPS * 4)
            } else {
                Layout::service_of((k * 15 + 4) % SINGLE)
            }
        });
        for service in conns {
            streams.push(Stream::start(ctx, Some(service), true)?);
        }
        for k in 0..WATCH_BREAKERS_ONE {
            let service = if k % 4 == 3 {
                Layout::service_of(SINGLE + k * 4 % (GROUPS * 4))
            } else {
                // Destinations that are always closed: their breakers trip all the time.
                Layout::service_of((k * 50 + 49) % SINGLE)
            };
            streams.push(Stream::start(ctx, Some(service), false)?);
        }
        for _ in 0..WATCH_BREAKERS_ALL {
            streams.push(Stream::start(ctx, None, false)?);
        }
        Ok(Self { streams })
    }

    /// A stream that ended is an error.
    fn check_alive(&self, ctx: &Ctx, now: Duration) {
        for s in &self.streams {
            let exited = s
                .child
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .try_wait()
                .ok()
                .flatten();
            if let Some(status) = exited {
                if !s.dead.swap(true, Ordering::Relaxed) {
                    let err = fs::read_to_string(&s.stderr).unwrap_or_default();
                    ctx.errors.add(
                        now,
                        format!("`watch {}` ended ({status}): {}", s.what, err.trim()),
                    );
                }
            }
        }
    }

    fn stats(&self) -> Vec<StreamStats> {
        self.streams
            .iter()
            .map(|s| s.stats.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect()
    }

    fn totals(&self) -> (u64, u64) {
        self.stats()
            .iter()
            .fold((0, 0), |(r, l), s| (r + s.received, l + s.lost))
    }

    /// Waits until no stream has received anything for 2 s (at most 30 s).
    fn drain(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = self.totals();
        let mut quiet_since = Instant::now();
        while Instant::now() < deadline {
            thread::sleep(Duration::from_millis(250));
            let now = self.totals();
            if now != last {
                last = now;
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= Duration::from_secs(2) {
                return;
            }
        }
    }

    fn stop(self) {
        for s in &self.streams {
            let mut c = s.child.lock().unwrap_or_else(|e| e.into_inner());
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Stream {
    fn start(ctx: &Ctx, service: Option<String>, conns: bool) -> Result<Self> {
        let verb = if conns { "conns" } else { "breakers" };
        let what = match &service {
            Some(s) => format!("{verb} {s}"),
            None => verb.to_owned(),
        };
        let stderr = ctx
            .env
            .dir
            .join(format!("watch-{}.err", what.replace(' ', "-")));
        let mut cmd = ctx.agent.cli(ctx.env);
        cmd.args(["-o", "json", "watch", verb]);
        if let Some(s) = &service {
            cmd.args(["--service", s]);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&stderr)?)
            .spawn()
            .with_context(|| format!("starting `breakwater watch {what}`"))?;
        let stdout = child.stdout.take().context("piped")?;
        let stats = Arc::new(Mutex::new(StreamStats::default()));
        let st = stats.clone();
        let key = if conns { "kind" } else { "to" };
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut s = st.lock().unwrap_or_else(|e| e.into_inner());
                match serde_json::from_str::<serde_json::Value>(&line) {
                    Ok(v) if v.is_object() => {
                        s.received += 1;
                        s.lost += v["lost"].as_u64().unwrap_or(0);
                        let k = v[key].as_str().unwrap_or("?").to_owned();
                        *s.events.entry(k).or_default() += 1;
                    }
                    _ => s.garbage += 1,
                }
            }
        });
        Ok(Self {
            what,
            service,
            conns,
            child: Mutex::new(child),
            stats,
            stderr,
            dead: AtomicBool::new(false),
        })
    }
}

/// A line of progress, each minute.
fn progress(
    ctx: &Ctx,
    outcomes: &Outcomes,
    rss: &Mutex<Vec<(f64, u64)>>,
    watches: &Watches,
    now: Duration,
    etcd_up: bool,
) -> String {
    let kib = rss
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .last()
        .map_or(0, |r| r.1);
    let (delivered, lost) = watches.totals();
    let info = ctx.info(now).unwrap_or_default();
    let maps = MapFill::of(&info);
    format!(
        "soak {:>3} min: {} connections (ok {}, refused {}, rejected {}, reset {}), RSS {:.1} MB, {}, events {delivered} delivered {lost} lost, recursion misses {}, etcd {}, errors {}",
        now.as_secs() / 60,
        outcomes.total(),
        outcomes.sum(Outcome::Ok),
        outcomes.sum(Outcome::Refused),
        outcomes.sum(Outcome::Rejected),
        outcomes.sum(Outcome::Reset),
        kib as f64 / 1024.0,
        maps.short(),
        misses(&info),
        if etcd_up { "up" } else { "down" },
        ctx.errors.count()
    )
}

/// Recursion misses of the programs (iterators excluded: they never miss).
fn misses(info: &serde_json::Value) -> u64 {
    info["programs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| p["recursion_misses"].as_u64().unwrap_or(0))
        .sum()
}

fn counter(info: &serde_json::Value, name: &str) -> u64 {
    info["counters"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == name)
        .and_then(|c| c["value"].as_u64())
        .unwrap_or(0)
}

/// Map fill and evictions, from `info`.
struct MapFill(Vec<(String, u64, u64, u64)>);

impl MapFill {
    fn of(info: &serde_json::Value) -> Self {
        Self(
            info["maps"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| {
                    (
                        m["name"].as_str().unwrap_or("?").to_owned(),
                        m["entries"].as_u64().unwrap_or(0),
                        m["capacity"].as_u64().unwrap_or(0),
                        m["evictions"].as_u64().unwrap_or(0),
                    )
                })
                .collect(),
        )
    }

    /// The fullest map, and evictions over all.
    fn short(&self) -> String {
        let fullest = self
            .0
            .iter()
            .filter(|m| m.2 > 0)
            .max_by(|a, b| (a.1 as f64 / a.2 as f64).total_cmp(&(b.1 as f64 / b.2 as f64)));
        let evictions: u64 = self.0.iter().map(|m| m.3).sum();
        match fullest {
            Some((name, e, c, _)) => format!(
                "fullest map {name} {e}/{c} ({:.1}%), evictions {evictions}",
                *e as f64 * 100.0 / *c as f64
            ),
            None => format!("evictions {evictions}"),
        }
    }
}

/// What the end-of-run checks found.
struct Report {
    delivered: u64,
    lost: u64,
    /// Per kind of loss, how much, and where it is counted.
    losses: Vec<(String, u64)>,
    /// Losses nobody counted: each fails the soak.
    uncounted: Vec<String>,
    maps: MapFill,
    misses: u64,
    counters: Vec<(String, u64)>,
}

/// Counters of `info` that are errors when not zero.
const ERROR_COUNTERS: [&str; 5] = [
    "prog_errors",
    "read_errors",
    "map_errors",
    "no_offsets",
    "conns_full",
];

/// The end-of-run checks, with the load stopped and the streams drained:
///
/// - `info`'s error counters ([`ERROR_COUNTERS`]) are zero (and, all along the run, no counter
///   of `info` went backwards: [`Ctx::info`]);
/// - the kernel's counts against the clients' (ground truth): per service summed, outbound
///   `opened` against the connections made (ok and reset), `failed_refused` against the
///   connects refused by the network, the breakers' `rejected` against the connects refused
///   with the policy's errno, inbound `opened` against the servers' accepts (plus resets). A count below the clients' is a loss, counted only up to the
///   programs' recursion misses (the kernel's own count of skipped runs); a count above is an
///   error;
/// - each `watch conns --service S`: the events it received plus the `lost` they reported
///   must cover the service's counts of events (outbound and inbound opened, closed, failed,
///   and rejected connects), which the same program runs produce: fewer is an uncounted loss
///   (`lost` counts every service's events, so it may exceed the service's share); more events
///   than counted is an error;
/// - each `watch breakers --service S` of a service-granularity policy: its `open` events plus
///   `lost` plus the breaker's `events_lost` (ring buffer full) cover the breaker's `trips`;
/// - the `watch breakers` of every service all subscribed before any load: each received plus
///   lost must equal the most any of them got (all saw the same events).
fn check(
    ctx: &Ctx,
    info0: &serde_json::Value,
    outcomes: &Outcomes,
    accepted: u64,
    watches: &Watches,
    took: Duration,
) -> Result<Report> {
    let info = ctx.info(took)?;
    let services = ctx.query(&["services"])?;
    let breakers = ctx.query(&["breakers"])?;
    let err = |what: String| ctx.errors.add(took, what);
    let mut uncounted = Vec::new();
    let mut losses = Vec::new();

    let counters: Vec<(String, u64)> = info["counters"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            (
                c["name"].as_str().unwrap_or("?").to_owned(),
                c["value"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    for name in ERROR_COUNTERS {
        let v = counter(&info, name);
        if v > 0 {
            err(format!("info counter {name} = {v}"));
        }
    }
    let misses = misses(&info).saturating_sub(misses(info0));

    let svc: BTreeMap<String, &serde_json::Value> = services["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| Some((s["name"].as_str()?.to_owned(), s)))
        .collect();
    let brk: BTreeMap<String, &serde_json::Value> = breakers["breakers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| Some((b["service"].as_str()?.to_owned(), b)))
        .collect();
    let u = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let sum_svc =
        |f: &dyn Fn(&serde_json::Value) -> u64| -> u64 { svc.values().map(|s| f(s)).sum() };
    let rejected_of = |b: &serde_json::Value| -> u64 {
        u(&b["rejected"])
            + b["destinations"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|d| u(&d["rejected"]))
                .sum::<u64>()
    };

    // The kernel against the clients.
    let opened = sum_svc(&|s| u(&s["outbound"]["opened"]));
    let refused = sum_svc(&|s| u(&s["outbound"]["failed_refused"]));
    let rejected: u64 = brk.values().map(|b| rejected_of(b)).sum();
    let made = outcomes.sum(Outcome::Ok) + outcomes.sum(Outcome::Reset);
    for (what, kernel, clients, exact) in [
        ("outbound opened", opened, made, false),
        (
            "outbound failed_refused",
            refused,
            outcomes.sum(Outcome::Refused),
            false,
        ),
        (
            "breakers' rejected",
            rejected,
            outcomes.sum(Outcome::Rejected),
            true,
        ),
    ] {
        if kernel > clients {
            err(format!(
                "{what}: the kernel counted {kernel}, the clients made {clients}"
            ));
        } else if kernel < clients {
            let short = clients - kernel;
            losses.push((format!("{what} not counted (recursion misses)"), short));
            if exact || short > misses {
                uncounted.push(format!(
                    "{what}: the kernel counted {kernel} of the clients' {clients} ({short} short, {misses} recursion misses)"
                ));
            }
        }
    }

    // Inbound: every connection the servers accepted was opened; those reset in a closed
    // listener's queue were opened and never accepted.
    let inbound = sum_svc(&|s| u(&s["inbound"]["opened"]));
    let resets = outcomes.sum(Outcome::Reset);
    if inbound > accepted + resets {
        err(format!(
            "inbound opened: the kernel counted {inbound}, the servers accepted {accepted} (and {resets} were reset)"
        ));
    } else if inbound < accepted {
        let short = accepted - inbound;
        losses.push((
            "inbound opened not counted (recursion misses)".into(),
            short,
        ));
        if short > misses {
            uncounted.push(format!(
                "inbound opened: the kernel counted {inbound} of the {accepted} accepted ({misses} recursion misses)"
            ));
        }
    }

    // The streams.
    let stats = watches.stats();
    let mut most_all = 0;
    for (s, st) in watches.streams.iter().zip(&stats) {
        if st.garbage > 0 {
            err(format!(
                "`watch {}` printed {} lines that are no events",
                s.what, st.garbage
            ));
        }
        if s.service.is_none() {
            most_all = most_all.max(st.received + st.lost);
        }
    }
    for (s, st) in watches.streams.iter().zip(&stats) {
        let got = st.received + st.lost;
        match (&s.service, s.conns) {
            (Some(name), true) => {
                let Some(sv) = svc.get(name) else {
                    err(format!("no service {name} in `services`"));
                    continue;
                };
                let dir = |d: &str| {
                    let c = &sv[d];
                    u(&c["opened"])
                        + u(&c["closed"])
                        + u(&c["failed_refused"])
                        + u(&c["failed_timeout"])
                        + u(&c["failed_other"])
                };
                let rej = brk.get(name).map_or(0, |b| rejected_of(b));
                let expected = dir("outbound") + dir("inbound") + rej;
                // `lost` counts what the stream missed of every service (the agent cannot
                // tell whose), so it may exceed this service's share; received may not.
                if st.received > expected {
                    err(format!(
                        "`watch {}`: {} events > {expected} counted by the kernel ({:?}; clients: ok {}, refused {}, rejected {})",
                        s.what,
                        st.received,
                        st.events,
                        outcomes.of_service(name, Outcome::Ok),
                        outcomes.of_service(name, Outcome::Refused),
                        outcomes.of_service(name, Outcome::Rejected),
                    ));
                } else if got < expected {
                    uncounted.push(format!(
                        "`watch {}`: {} events + {} lost < {expected} counted by the kernel",
                        s.what, st.received, st.lost
                    ));
                }
            }
            (Some(name), false) => {
                let Some(b) = brk.get(name) else {
                    err(format!("no breaker {name} in `breakers`"));
                    continue;
                };
                if b["destinations"].as_array().is_some_and(|d| !d.is_empty()) {
                    continue;
                }
                let trips = u(&b["trips"]);
                let opens = st.events.get("open").copied().unwrap_or(0);
                if opens + st.lost + u(&b["events_lost"]) < trips {
                    uncounted.push(format!(
                        "`watch {}`: {opens} open events + {} lost + {} lost by the ring buffer < {trips} trips",
                        s.what, st.lost, u(&b["events_lost"])
                    ));
                }
            }
            (None, _) => {
                if got < most_all {
                    uncounted.push(format!(
                        "`watch {}`: {} events + {} lost, another stream of every breaker got {most_all}",
                        s.what, st.received, st.lost
                    ));
                }
            }
        }
    }
    let (delivered, lost) = watches.totals();
    losses.push((
        "events lost by watch streams (reported to them)".into(),
        lost,
    ));
    let ring_lost: u64 = brk.values().map(|b| u(&b["events_lost"])).sum();
    losses.push((
        "breaker events lost by the ring buffer (events_lost)".into(),
        ring_lost,
    ));
    losses.push((
        "audit events lost by the ring buffer (audit_lost)".into(),
        counter(&info, "audit_lost"),
    ));
    Ok(Report {
        delivered,
        lost,
        losses,
        uncounted,
        maps: MapFill::of(&info),
        misses,
        counters,
    })
}

/// RSS over the run: the first minute after the warm-up against the last minute.
struct Drift {
    first: f64,
    last: f64,
    max: u64,
    /// Percent; none when the run is too short for two windows.
    pct: Option<f64>,
    warmup: Duration,
    window: Duration,
}

impl Drift {
    fn of(samples: &[(f64, u64)], took: Duration) -> Self {
        let total = took.as_secs_f64();
        // Long runs: a minute of warm-up, then minute windows; short ones scale down.
        let warmup = (total / 6.0).min(60.0);
        let window = ((total - warmup) / 2.0).min(60.0);
        let mean = |from: f64, to: f64| {
            let v: Vec<f64> = samples
                .iter()
                .filter(|(t, _)| *t >= from && *t < to)
                .map(|(_, k)| *k as f64)
                .collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        let first = mean(warmup, warmup + window);
        let last = mean(total - window, total + 1.0);
        let pct = match (first, last) {
            (Some(f), Some(l)) if f > 0.0 => Some((l - f) / f * 100.0),
            _ => None,
        };
        Self {
            first: first.unwrap_or(0.0),
            last: last.unwrap_or(0.0),
            max: samples.iter().map(|s| s.1).max().unwrap_or(0),
            pct,
            warmup: Duration::from_secs_f64(warmup),
            window: Duration::from_secs_f64(window),
        }
    }

    fn shown(&self) -> String {
        self.pct
            .map_or_else(|| "n/a".to_owned(), |p| format!("{p:+.1}%"))
    }
}

struct Summary<'a> {
    took: Duration,
    rate: u64,
    outcomes: &'a Outcomes,
    drift: &'a Drift,
    report: &'a Report,
    queries: &'a Queries,
    reloads: u64,
    etcd_outages: u64,
    errors: usize,
}

impl Summary<'_> {
    fn print(&self) {
        let o = self.outcomes;
        let d = self.drift;
        let r = self.report;
        let mb = |k: f64| k / 1024.0;
        let mut rows: Vec<(String, String)> = vec![
            (
                "duration".into(),
                format!("{:.1} min", self.took.as_secs_f64() / 60.0),
            ),
            (
                "connections".into(),
                format!(
                    "{} ({:.0}/s, asked {}/s): ok {}, refused {}, rejected by breakers {}, reset {}, other {}",
                    o.total(),
                    o.total() as f64 / self.took.as_secs_f64(),
                    self.rate,
                    o.sum(Outcome::Ok),
                    o.sum(Outcome::Refused),
                    o.sum(Outcome::Rejected),
                    o.sum(Outcome::Reset),
                    o.sum(Outcome::Other)
                ),
            ),
            (
                "agent RSS".into(),
                format!(
                    "first {:.1} MB, last {:.1} MB, max {:.1} MB; drift {} (mean of {}s after {}s of warm-up vs the last {}s; goal <= {:.0}%: {})",
                    mb(d.first),
                    mb(d.last),
                    mb(d.max as f64),
                    d.shown(),
                    d.window.as_secs(),
                    d.warmup.as_secs(),
                    d.window.as_secs(),
                    DRIFT_GOAL * 100.0,
                    match d.pct {
                        Some(p) if p <= DRIFT_GOAL * 100.0 => "met",
                        Some(_) => "not met",
                        None => "n/a",
                    }
                ),
            ),
        ];
        for (name, e, c, ev) in &r.maps.0 {
            if *e > 0 || *ev > 0 {
                rows.push((
                    format!("map {name}"),
                    format!(
                        "{e}/{c} ({:.1}%), evictions {ev}",
                        *e as f64 * 100.0 / (*c).max(1) as f64
                    ),
                ));
            }
        }
        rows.push((
            "watch streams".into(),
            format!(
                "{WATCHES}: {} events delivered, {} lost (reported to them)",
                r.delivered, r.lost
            ),
        ));
        for (what, n) in &r.losses {
            rows.push((format!("loss: {what}"), n.to_string()));
        }
        rows.push(("recursion misses".into(), r.misses.to_string()));
        let counters: Vec<String> = r
            .counters
            .iter()
            .filter(|(_, v)| *v > 0)
            .map(|(n, v)| format!("{n} {v}"))
            .collect();
        rows.push(("info counters (non-zero)".into(), counters.join(", ")));
        rows.push((
            "queries".into(),
            format!(
                "{} ({} failed), slowest {} ms",
                self.queries.done,
                self.queries.failed,
                self.queries.slowest.as_millis()
            ),
        ));
        rows.push(("reloads".into(), self.reloads.to_string()));
        rows.push(("etcd outages".into(), self.etcd_outages.to_string()));
        rows.push((
            "uncounted losses".into(),
            if r.uncounted.is_empty() {
                "0".into()
            } else {
                r.uncounted.join("; ")
            },
        ));
        rows.push(("errors".into(), self.errors.to_string()));
        let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        println!();
        println!("== soak summary");
        for (k, v) in rows {
            println!("{k:<width$}  {v}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_consistent() {
        let l = Layout::new(9000);
        let mut seen = std::collections::HashSet::new();
        for i in 0..DESTS {
            assert!(seen.insert(l.dest(i)), "destination {i} twice");
        }
        assert_eq!(Layout::service_of(0), "soak-000");
        assert_eq!(Layout::service_of(903), "soak-d00");
        assert_eq!(Layout::service_of(904), "soak-d01");
        assert_eq!(l.dest(904).ip().octets(), [127, 78, 0, 8]);
        let c0 = l.config(0);
        assert_eq!(c0.matches("[[service]]").count(), SERVICES);
        assert_eq!(l.config(1).matches("[[service]]").count(), SERVICES + 1);
        assert_ne!(l.config(2), c0);
    }

    #[test]
    fn drift_of_flat_memory_is_zero() {
        let samples: Vec<(f64, u64)> = (0..100).map(|t| (t as f64 * 5.0, 1000)).collect();
        let d = Drift::of(&samples, Duration::from_secs(500));
        assert_eq!(d.pct, Some(0.0));
        assert_eq!(d.max, 1000);
    }
}
