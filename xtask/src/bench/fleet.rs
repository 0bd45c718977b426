//! The fleet part of `cargo xtask bench`: one etcd (Debian's `/usr/bin/etcd`, on free loopback
//! ports, its data in the bench's temporary directory) and three agents in it, each with its own
//! socket, pin directory and scope cgroup (`<cgroup2>/breakwater-bench-<pid>-nK`), as three
//! nodes of one machine.
//!
//! - Propagation: how long a trip written to etcd takes to be enforced on every node. The ground
//!   truth is the kernel's: per node, a probe process (`cargo xtask fleet-probe`) in that node's
//!   cgroup connects to the service's endpoint (a listener on 127.0.0.1) every
//!   [`PROBE_EVERY`] and timestamps (CLOCK_MONOTONIC) each change of the connect's result; a trip
//!   is enforced on a node at its first connect refused with the policy's errno (EHOSTUNREACH).
//!   Each round writes the trip once with the bench's own etcd client (no process start-up) and
//!   once with `breakwater fleet trip` (from its spawn), deleting the key in between and waiting
//!   until every node lets connects through again.
//! - Idle writes: with no traffic and no changes, what the agents write to etcd — PUT and DELETE
//!   events of a watch on the prefix, by node, and how far etcd's revision moves — against the
//!   lease keep-alives etcd receives, which are not writes (from etcd's `/metrics`).

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader, Write},
    net::{SocketAddrV4, TcpListener},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use etcd_client::{Client, ConnectOptions, EventType, GetOptions, WatchOptions};

use super::{median, percentile, socklen, Args};
use crate::{
    etcd::EtcdServer,
    sandbox::{cgroup2_mount, release_pins, Agent, Env, Launch},
};

/// The agents' default key prefix.
const PREFIX: &str = "/breakwater/v1";
const SERVICE: &str = "bench-fleet";
const NODES: usize = 3;
/// What the policy makes refused connects return: no connect to a listener returns it otherwise.
const ERRNO: i32 = libc::EHOSTUNREACH;
/// The probes' pause between connects: the resolution of the propagation times.
const PROBE_EVERY: Duration = Duration::from_micros(500);
/// How long a trip or a reset may take to reach every node before the bench gives up.
const ENFORCE_TIMEOUT: Duration = Duration::from_secs(10);
/// Between two trips, once every node lets connects through again.
const PAUSE: Duration = Duration::from_millis(100);
/// Before the idle window: longer than the agents' counters period (10 s), so that the counters
/// the probes moved are published before it starts.
const SETTLE: Duration = Duration::from_secs(12);
/// How long etcd may take to answer a client once healthy.
const ETCD_READY_TIMEOUT: Duration = Duration::from_secs(30);
const GOAL_MS: f64 = 100.0;

pub(super) fn run(env: &Env, args: &Args) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting a tokio runtime")?;
    let etcd = Etcd::start(&env.dir.join("etcd"), &rt)?;
    let url = etcd.url();
    let mut client = etcd.client.clone();

    // Declared before the agents and probes: dropped after them.
    let dirs: Vec<NodeDirs> = (1..=NODES)
        .map(|k| NodeDirs::new(env, &format!("bench-n{k}")))
        .collect::<Result<_>>()?;
    let agents: Vec<Agent> = dirs
        .iter()
        .map(|d| {
            let args = [
                "--etcd".to_owned(),
                url.clone(),
                "--node-name".to_owned(),
                d.node.clone(),
            ];
            Agent::launch(
                env,
                &Launch {
                    name: &d.node,
                    config: None,
                    scope: &d.relative,
                    pin_dir: &d.pin_dir,
                    empty_hooks: false,
                    args: &args,
                },
            )
        })
        .collect::<Result<_>>()?;

    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    let std::net::SocketAddr::V4(addr) = listener.local_addr()? else {
        bail!("127.0.0.1 gave an IPv6 address");
    };
    thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    let endpoint = addr.to_string();
    let fleet = |args: &[&str]| {
        crate::output(
            Command::new(env.bin)
                .args(["fleet", "--etcd", &url])
                .args(args)
                .stdin(Stdio::null()),
        )
    };
    fleet(&["service", "put", SERVICE, "--endpoint", &endpoint])?;
    fleet(&[
        "policy",
        "set",
        SERVICE,
        "--consecutive-failures",
        "5",
        "--errno",
        "EHOSTUNREACH",
    ])?;
    for (agent, d) in agents.iter().zip(&dirs) {
        wait_policy(env, agent, &d.node)?;
    }

    println!(
        "fleet: {} on loopback, {NODES} agents (--etcd, --node-name bench-n1..{NODES}; each its own socket, pins and scope cgroup); `breakwater fleet service put {SERVICE} --endpoint {endpoint}` (a listener), `policy set {SERVICE} --consecutive-failures 5 --errno EHOSTUNREACH`; per node a probe process in the node's cgroup connects every {} us and timestamps its first connect refused with EHOSTUNREACH; {} rounds, each a trip written by the etcd client and one by `breakwater fleet trip`, the key deleted in between",
        etcd.version,
        PROBE_EVERY.as_micros(),
        args.fleet_rounds
    );
    let (tx, events) = mpsc::channel();
    let probes: Vec<Probe> = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| Probe::start(i, &d.cgroup, addr, tx.clone()))
        .collect::<Result<_>>()?;
    drop(tx);
    let mut nodes = Nodes {
        events,
        errno: [None; NODES],
    };
    nodes.wait_all(0, 0).context("the probes' first connects")?;

    let trip_key = format!("{PREFIX}/trips/{SERVICE}");
    let mut by_client = Propagation::default();
    let mut by_cli = Propagation::default();
    let mut resets = Vec::new();
    let mut put_acks = Vec::new();
    for _ in 0..args.fleet_rounds {
        for via_cli in [false, true] {
            let t0 = mono_ns();
            let at = if via_cli {
                let mut trip = Command::new(env.bin)
                    .args([
                        "fleet", "--etcd", &url, "trip", SERVICE, "--reason", "bench",
                    ])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .spawn()
                    .context("starting `breakwater fleet trip`")?;
                let at = nodes.wait_all(ERRNO, t0);
                let status = trip.wait()?;
                if !status.success() {
                    bail!("`breakwater fleet trip {SERVICE}` failed ({status})");
                }
                at?
            } else {
                rt.block_on(client.put(trip_key.as_str(), r#"{"reason":"bench"}"#, None))
                    .context("etcd put of the trip")?;
                put_acks.push(ms(mono_ns() - t0));
                nodes.wait_all(ERRNO, t0)?
            };
            let round = if via_cli { &mut by_cli } else { &mut by_client };
            round.add(t0, &at);

            let t1 = mono_ns();
            rt.block_on(client.delete(trip_key.as_str(), None))
                .context("etcd delete of the trip")?;
            let at = nodes.wait_all(0, t1).context("the reset")?;
            resets.push(ms(at.iter().max().copied().unwrap_or(t1) - t1));
            thread::sleep(PAUSE);
        }
    }
    by_client.print("from the etcd write");
    by_cli.print("from `breakwater fleet trip` invoked");
    println!(
        "fleet reset (trip key deleted) -> connects pass on every node: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; etcd put of the trip answered in p50 {:.2} ms",
        median(&mut resets.clone()),
        percentile(&resets, 99.0),
        resets.iter().copied().fold(0.0, f64::max),
        median(&mut put_acks),
    );

    drop(probes);
    idle(&rt, &mut client, &etcd, &dirs, args.fleet_idle_seconds)?;

    for agent in agents {
        agent.stop()?;
    }
    Ok(())
}

/// Times of one way of tripping, over the rounds.
#[derive(Default)]
struct Propagation {
    /// Per round, to the last node (ms).
    every: Vec<f64>,
    /// Per round and node (ms).
    each: Vec<f64>,
}

impl Propagation {
    fn add(&mut self, t0: u64, at: &[u64; NODES]) {
        let each: Vec<f64> = at.iter().map(|&t| ms(t - t0)).collect();
        self.every.push(each.iter().copied().fold(0.0, f64::max));
        self.each.extend(each);
    }

    fn print(&self, from: &str) {
        let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        let p99 = percentile(&self.every, 99.0);
        println!(
            "fleet trip -> enforced on every node, {from}: p50 {:.1} ms, p99 {p99:.1} ms, max {:.1} ms over {} trips (goal <= {GOAL_MS:.0} ms on loopback: {}); per node: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            median(&mut self.every.clone()),
            max(&self.every),
            self.every.len(),
            if p99 <= GOAL_MS { "met" } else { "not met" },
            median(&mut self.each.clone()),
            percentile(&self.each, 99.0),
            max(&self.each),
        );
    }
}

/// The idle window: `seconds` with no traffic and no changes, after [`SETTLE`].
fn idle(
    rt: &tokio::runtime::Runtime,
    client: &mut Client,
    etcd: &Etcd,
    dirs: &[NodeDirs],
    seconds: u64,
) -> Result<()> {
    let window = Duration::from_secs(seconds);
    let (settled, idle, rev, before, after) = rt.block_on(async {
        let revision = |r: Option<&etcd_client::ResponseHeader>| r.map_or(0, |h| h.revision());
        let start = revision(client.get(PREFIX, None).await?.header());
        let mut stream = client
            .watch(
                PREFIX,
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(start + 1),
                ),
            )
            .await?;
        let mut events = Vec::new();
        let now = tokio::time::Instant::now;
        collect(&mut stream, &mut events, now() + SETTLE).await?;
        let from = revision(client.get(PREFIX, None).await?.header());
        let before = etcd.metrics();
        collect(&mut stream, &mut events, now() + window).await?;
        let to = revision(client.get(PREFIX, None).await?.header());
        let after = etcd.metrics();
        // Events up to `to` that were still on their way.
        collect(&mut stream, &mut events, now() + Duration::from_millis(500)).await?;
        let (settled, idle): (Vec<_>, Vec<_>) = events
            .into_iter()
            .filter(|(r, _, _)| *r <= to)
            .partition(|(r, _, _)| *r <= from);
        Ok::<_, etcd_client::Error>((settled, idle, to - from, before, after))
    })?;
    let (before, after) = (before?, after?);
    let minutes = window.as_secs_f64() / 60.0;
    let per_node = |events: &[(i64, String, bool)], node: &str| {
        events
            .iter()
            .filter(|(_, key, _)| node_of(key) == Some(node))
            .count()
    };
    let writes: Vec<String> = dirs
        .iter()
        .map(|d| {
            format!(
                "{} {:.1}",
                d.node,
                per_node(&idle, &d.node) as f64 / minutes
            )
        })
        .collect();
    let others = idle.iter().filter(|(_, k, _)| node_of(k).is_none()).count();
    let delta = |name: &str| after.get(name).unwrap_or(&0.0) - before.get(name).unwrap_or(&0.0);
    let keepalives = delta(KEEPALIVES);
    let met = idle.is_empty() && rev == 0;
    println!(
        "fleet idle: {NODES} agents, no traffic and no changes for {seconds} s (after {} s settling): key writes per node per minute: {} ({others} others; PUT and DELETE events of a watch on {PREFIX}); etcd's revision advanced by {rev}; lease keep-alives {:.1} per node per minute ({keepalives:.0} LeaseKeepAlive messages etcd received, {:.0} renewals; {:.0} raft proposals committed) (goal keep-alives only, 0 key writes: {})",
        SETTLE.as_secs(),
        writes.join(", "),
        keepalives / NODES as f64 / minutes,
        delta(RENEWALS),
        delta(PROPOSALS),
        if met { "met" } else { "not met" },
    );
    let settled_keys: BTreeMap<&str, usize> =
        settled.iter().fold(BTreeMap::new(), |mut m, (_, k, _)| {
            *m.entry(k.as_str()).or_default() += 1;
            m
        });
    println!(
        "fleet settling ({} s after the probes stopped, counters flushed at most every 10 s): {} writes {settled_keys:?}",
        SETTLE.as_secs(),
        settled.len()
    );
    if !idle.is_empty() {
        let keys: Vec<&str> = idle.iter().map(|(_, k, _)| k.as_str()).collect();
        println!("fleet idle writes: {keys:?}");
    }
    Ok(())
}

/// A watch's events until `until`, as (revision, key, put or delete).
async fn collect(
    stream: &mut etcd_client::WatchStream,
    events: &mut Vec<(i64, String, bool)>,
    until: tokio::time::Instant,
) -> Result<(), etcd_client::Error> {
    loop {
        let Ok(message) = tokio::time::timeout_at(until, stream.message()).await else {
            return Ok(());
        };
        let Some(message) = message? else {
            return Ok(());
        };
        for e in message.events() {
            if let Some(kv) = e.kv() {
                events.push((
                    kv.mod_revision(),
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    e.event_type() == EventType::Put,
                ));
            }
        }
    }
}

/// The node whose key this is: `P/nodes/NODE`, `P/breakers/NODE/NAME`, `P/autotrips/NAME/NODE`.
fn node_of(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(PREFIX)?.strip_prefix('/')?;
    let mut parts = rest.split('/');
    match (parts.next()?, parts.next(), parts.next()) {
        ("nodes", Some(node), None) => Some(node),
        ("breakers", Some(node), Some(_)) => Some(node),
        ("autotrips", Some(_), Some(node)) => Some(node),
        _ => None,
    }
}

const KEEPALIVES: &str = r#"grpc_server_msg_received_total{grpc_method="LeaseKeepAlive",grpc_service="etcdserverpb.Lease",grpc_type="bidi_stream"}"#;
const RENEWALS: &str = "etcd_debugging_lease_renewed_total";
const PROPOSALS: &str = "etcd_server_proposals_committed_total";

/// Waits until `agent` shows the fleet's policy on `SERVICE`.
fn wait_policy(env: &Env, agent: &Agent, node: &str) -> Result<()> {
    let deadline = Instant::now() + ENFORCE_TIMEOUT;
    loop {
        let out = crate::output(agent.cli(env).args(["-o", "json", "breakers"]))?;
        let v: serde_json::Value = serde_json::from_str(&out).context("parsing `breakers`")?;
        let applied = v["breakers"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|b| b["service"] == SERVICE && b["policy_owner"] == "fleet");
        if applied {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{node} does not show the fleet's policy for {SERVICE} after {}s: {out}{}",
                ENFORCE_TIMEOUT.as_secs(),
                agent.log_tail()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// What the probes report, and each node's last connect result.
struct Nodes {
    events: mpsc::Receiver<Result<ProbeEvent>>,
    errno: [Option<i32>; NODES],
}

impl Nodes {
    /// Waits until every node's connects return `errno` (0: they connect), as of a change at or
    /// after `since` (CLOCK_MONOTONIC ns) for nodes not there yet; returns when each got there.
    fn wait_all(&mut self, errno: i32, since: u64) -> Result<[u64; NODES]> {
        let mut at = [None; NODES];
        for (i, e) in self.errno.iter().enumerate() {
            if *e == Some(errno) && since == 0 {
                at[i] = Some(0);
            }
        }
        let deadline = Instant::now() + ENFORCE_TIMEOUT;
        while at.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = self.events.recv_timeout(left).map_err(|_| {
                anyhow!(
                    "connects do not return {} on every node within {}s (last: {:?})",
                    std::io::Error::from_raw_os_error(errno),
                    ENFORCE_TIMEOUT.as_secs(),
                    self.errno
                )
            })?;
            let event = event?;
            if event.errno != 0 && event.errno != ERRNO {
                bail!(
                    "bench-n{}'s probe: connect to the service returned {}",
                    event.node + 1,
                    std::io::Error::from_raw_os_error(event.errno)
                );
            }
            self.errno[event.node] = Some(event.errno);
            if event.errno == errno && event.at >= since {
                at[event.node].get_or_insert(event.at);
            } else if event.errno != errno {
                // It went back: only a change that stays counts.
                at[event.node] = None;
            }
        }
        Ok(at.map(|t| t.unwrap_or(since)))
    }
}

/// A change of a probe's connect result.
struct ProbeEvent {
    node: usize,
    /// CLOCK_MONOTONIC, ns.
    at: u64,
    errno: i32,
}

/// A `cargo xtask fleet-probe` process; killed on drop.
struct Probe(Child);

impl Probe {
    fn start(
        node: usize,
        cgroup: &Path,
        addr: SocketAddrV4,
        tx: mpsc::Sender<Result<ProbeEvent>>,
    ) -> Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("fleet-probe")
            .arg(cgroup)
            .arg(addr.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting a fleet probe")?;
        let stdout = child.stdout.take().expect("piped");
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let parsed = line
                    .split_once(' ')
                    .and_then(|(at, e)| Some((at.parse().ok()?, e.parse().ok()?)));
                let event = parsed
                    .map(|(at, errno)| ProbeEvent { node, at, errno })
                    .ok_or_else(|| anyhow!("bench-n{}'s probe printed {line:?}", node + 1));
                if tx.send(event).is_err() {
                    break;
                }
            }
        });
        Ok(Self(child))
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `cargo xtask fleet-probe CGROUP ADDR`: joins the cgroup (absolute path), then connects to
/// ADDR every [`PROBE_EVERY`], each connect on a fresh socket closed with an RST (no TIME_WAIT
/// left), and prints `<CLOCK_MONOTONIC ns> <errno>` (0: connected) at each change of the result,
/// until stdout closes.
pub fn probe(cgroup: &Path, addr: SocketAddrV4) -> Result<()> {
    let procs = cgroup.join("cgroup.procs");
    fs::write(&procs, std::process::id().to_string())
        .with_context(|| format!("joining {}", cgroup.display()))?;
    let mut out = std::io::stdout().lock();
    let mut last = None;
    loop {
        let errno = connect_rst(addr)?;
        let now = mono_ns();
        if last != Some(errno) {
            last = Some(errno);
            if writeln!(out, "{now} {errno}")
                .and_then(|()| out.flush())
                .is_err()
            {
                return Ok(());
            }
        }
        thread::sleep(PROBE_EVERY);
    }
}

/// One `connect()` from a fresh socket, closed with an RST; its errno (0 if it connected).
fn connect_rst(addr: SocketAddrV4) -> Result<i32> {
    let (sock, errno) = super::connect_socket(addr)?;
    if errno != 0 {
        return Ok(errno);
    }
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a linger struct of the size given.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast(),
            socklen::<libc::linger>(),
        );
    }
    Ok(0)
}

/// CLOCK_MONOTONIC in ns: the same clock in the probes and the bench.
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// One node's cgroup (`<cgroup2>/breakwater-bench-<pid>-<node>`) and pin directory
/// (`/sys/fs/bpf/breakwater-bench-<pid>-<node>`); both removed on drop.
struct NodeDirs {
    bin: PathBuf,
    node: String,
    cgroup: PathBuf,
    relative: String,
    pin_dir: PathBuf,
}

impl NodeDirs {
    fn new(env: &Env, node: &str) -> Result<Self> {
        let name = format!("breakwater-bench-{}-{node}", std::process::id());
        let cgroup = cgroup2_mount()?.join(&name);
        fs::create_dir(&cgroup).with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        Ok(Self {
            bin: env.bin.to_owned(),
            node: node.to_owned(),
            cgroup,
            relative: format!("/{name}"),
            pin_dir: Path::new("/sys/fs/bpf").join(&name),
        })
    }
}

impl Drop for NodeDirs {
    fn drop(&mut self) {
        release_pins(&self.bin, &self.pin_dir);
        // Its probe was killed and reaped: the cgroup empties as soon as the kernel notices.
        for _ in 0..50 {
            if fs::remove_dir(&self.cgroup).is_ok() || !self.cgroup.exists() {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        for (what, path) in [("cgroup", &self.cgroup), ("pin directory", &self.pin_dir)] {
            if path.exists() {
                eprintln!(
                    "warning: could not remove the bench's {what} {}",
                    path.display()
                );
            }
        }
    }
}

/// The bench's etcd ([`EtcdServer`]) and a client of it; killed on drop.
struct Etcd {
    server: EtcdServer,
    client: Client,
    /// "etcd X.Y.Z", from `etcd --version`.
    version: String,
}

impl Etcd {
    fn start(dir: &Path, rt: &tokio::runtime::Runtime) -> Result<Self> {
        let server = EtcdServer::start(dir, "breakwater-bench")?;
        let client = ready(&server.url(), rt)?;
        Ok(Self {
            version: server.version.clone(),
            server,
            client,
        })
    }

    fn url(&self) -> String {
        self.server.url()
    }

    /// etcd's counters from `/metrics` (the client port serves it), by name with labels.
    fn metrics(&self) -> Result<BTreeMap<String, f64>> {
        Ok(self
            .server
            .get("/metrics")?
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_owned(), value.parse().ok()?))
            })
            .collect())
    }
}

/// A client once a linearizable get succeeds.
fn ready(url: &str, rt: &tokio::runtime::Runtime) -> Result<Client> {
    let deadline = Instant::now() + ETCD_READY_TIMEOUT;
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_timeout(Duration::from_secs(2));
    loop {
        let probe = rt.block_on(async {
            let mut client = Client::connect([url], Some(options.clone())).await?;
            client
                .get(PREFIX, Some(GetOptions::new().with_count_only()))
                .await?;
            Ok::<_, etcd_client::Error>(client)
        });
        match probe {
            Ok(client) => return Ok(client),
            Err(e) if Instant::now() >= deadline => {
                bail!("etcd at {url} did not answer within {ETCD_READY_TIMEOUT:?}: {e}")
            }
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_their_node() {
        assert_eq!(node_of("/breakwater/v1/nodes/n1"), Some("n1"));
        assert_eq!(node_of("/breakwater/v1/breakers/n1/db"), Some("n1"));
        assert_eq!(node_of("/breakwater/v1/autotrips/db/n2"), Some("n2"));
        assert_eq!(node_of("/breakwater/v1/trips/db"), None);
        assert_eq!(node_of("/breakwater/v10/nodes/n1"), None);
    }
}
