//! The `breakwater` command line: the agent itself and the clients of its API.

mod agent;
mod client;
mod fleet;
mod output;
mod verbs;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand, ValueEnum};

use crate::config::DEFAULT_PIN_DIR;

#[derive(Debug, Parser)]
#[command(
    name = "breakwater",
    version,
    about = "Watches every TCP connection on the node with eBPF"
)]
pub struct Cli {
    /// Address of an agent's API: unix:///PATH, https://HOST:PORT (mutual TLS) or
    /// http://HOST:PORT (an insecure listener). Repeat it to ask several agents at once
    /// [default: unix:///run/breakwater/agent.sock]
    #[arg(
        long = "agent",
        global = true,
        env = "BREAKWATER_AGENT",
        value_name = "ADDRESS"
    )]
    pub agents: Vec<String>,
    /// Agents to ask, one a line: ADDRESS or NAME=ADDRESS; `#` starts a comment.
    #[arg(
        long,
        global = true,
        env = "BREAKWATER_AGENTS_FILE",
        value_name = "FILE"
    )]
    pub agents_file: Option<PathBuf>,
    /// CA certificates (PEM) that https:// agents' certificates must chain to.
    #[arg(long, global = true, env = "BREAKWATER_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This side's certificate (PEM): the client's for https:// agents; with `agent`, the
    /// agent's own for --listen [default: agent.tls_cert].
    #[arg(long, global = true, env = "BREAKWATER_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert [default: agent.tls_key].
    #[arg(long, global = true, env = "BREAKWATER_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    /// The API's response message as JSON, with the proto's field names (for `fleet`, the
    /// records in etcd).
    Json,
}

#[derive(Clone, Debug, Subcommand)]
pub enum Command {
    /// Run the agent (as root): load the eBPF programs and serve the API.
    #[command(after_help = AGENT_EXIT_CODES)]
    Agent(Box<AgentArgs>),
    /// Services with their connection counts.
    Services,
    /// Destinations (outbound) and local endpoints (inbound) with their counts.
    Destinations {
        /// Only this service's endpoints.
        #[arg(long)]
        service: Option<String>,
        #[arg(long, value_enum, default_value_t = Sort::Active)]
        sort: Sort,
        /// At most N rows (0 = all).
        #[arg(long, default_value_t = 0)]
        limit: u32,
        #[arg(long, value_enum)]
        direction: Option<DirectionArg>,
    },
    /// Live TCP connections with the process that opened them.
    Conns {
        #[arg(long)]
        service: Option<String>,
        /// At most N rows (0 = all).
        #[arg(long, default_value_t = 0)]
        limit: u32,
    },
    /// Create, replace or delete a service.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// The agent's version, kernel, programs, maps and error counters.
    Info,
    /// Latency histograms of a service (or with --destination, of one destination).
    Latency {
        /// Only this kind; repeat for more [default: every kind the agent measures].
        #[arg(long = "kind", value_enum, value_name = "KIND")]
        kinds: Vec<LatencyKind>,
        /// Service name.
        #[arg(
            required_unless_present = "destination",
            conflicts_with = "destination"
        )]
        service: Option<String>,
        /// A destination instead: IP:port or [IPv6]:port.
        #[arg(long)]
        destination: Option<String>,
        /// With --destination: only this network namespace (inode); default all.
        #[arg(long, default_value_t = 0)]
        netns: u32,
    },
    /// Findings about this node's TCP settings against what the agent sees, with advice.
    Advise,
    /// Sockets in TIME_WAIT per destination and ephemeral-port pressure, every namespace.
    Timewait {
        /// At most N rows per table (0 = all).
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Circuit breakers: every service with a policy, its state and counts, and with
    /// granularity destination each tracked destination's breaker under its service.
    Breakers {
        /// Only this service's.
        #[arg(long)]
        service: Option<String>,
    },
    /// Force a service's breaker open: its connects are refused until reset (or --for ends).
    Trip {
        /// Service name.
        name: String,
        /// Only this destination of a service with granularity destination (eject it).
        #[arg(long, value_name = "IP:PORT", value_parser = destination_arg)]
        destination: Option<std::net::SocketAddr>,
        /// Open for this long, then closed again (e.g. 30s, 5m); default until reset.
        #[arg(long = "for", value_name = "DURATION", value_parser = duration_arg)]
        ttl: Option<Duration>,
        /// Why, shown with the breaker while it is forced open.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Re-read the agent's config file and apply what changed (as SIGHUP does).
    Reload,
    /// Close a service's breaker: counts cleared, a forced trip lifted.
    Reset {
        /// Service name.
        name: String,
        /// Only this destination of a service with granularity destination.
        #[arg(long, value_name = "IP:PORT", value_parser = destination_arg)]
        destination: Option<std::net::SocketAddr>,
    },
    /// Set or clear a service's circuit-breaker policy.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Follow changes as they happen.
    #[command(subcommand)]
    Watch(WatchCommand),
    /// Remove everything the agent pinned (programs, links, maps) after it has stopped (as root).
    Uninstall {
        /// bpffs directory the agent pinned to (agent.pin_dir in its config).
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// The fleet's shared state in etcd: its nodes and their breakers, and the services,
    /// policies and trips every selected node applies.
    #[command(after_help = FLEET_EXIT_CODES)]
    Fleet(fleet::FleetArgs),
}

/// `breakwater fleet --help`'s exit codes.
const FLEET_EXIT_CODES: &str = "\
Exit codes:
  0   done (a delete, clear or reset that found nothing to remove says so, and is done)
  1   etcd unreachable (the endpoints are named) or failed
  2   bad flags or input (the reason is printed), or etcd refused the caller;
      nothing was written";

/// A destination flag: one address and port ("10.0.0.5:8080", "[fd00::5]:8080").
pub fn destination_arg(text: &str) -> Result<std::net::SocketAddr, String> {
    text.trim().parse().map_err(|_| {
        if text.contains('/') {
            format!("{text:?} is a CIDR: a destination is one address and port (IP:PORT)")
        } else {
            format!("{text:?} is not an address and port (IP:PORT, or [IPv6]:PORT)")
        }
    })
}

/// A duration flag: "30s", "500ms", "2m"; whole milliseconds (what the API carries).
fn duration_arg(text: &str) -> Result<Duration, String> {
    let d = crate::core::policy::parse_duration("duration", text)
        .map_err(|e| e.to_string().trim_start_matches("duration: ").to_owned())?;
    if d.subsec_nanos() % 1_000_000 != 0 {
        return Err(format!("{text:?} is not a whole number of milliseconds"));
    }
    Ok(d)
}

#[derive(Clone, Debug, Subcommand)]
pub enum PolicyCommand {
    /// Set or replace a service's policy: its breaker starts closed with counts cleared.
    ///
    /// Start from a preset and override fields, or give fields alone (unset ones then come from
    /// the base policy: 5 consecutive failures, open 60s, 1 probe).
    Set {
        /// Service name.
        name: String,
        #[command(flatten)]
        policy: Box<PolicyFlags>,
    },
    /// Remove a service's policy: its connects pass uncounted again.
    Clear {
        /// Service name.
        name: String,
    },
}

/// A breaker policy's fields as flags: `breakwater policy set` and `breakwater fleet policy set`.
#[derive(Clone, Debug, Default, PartialEq, clap::Args)]
pub struct PolicyFlags {
    #[arg(long, value_parser = preset_arg())]
    pub preset: Option<String>,
    /// The ratio rule needs at least N requests in the interval.
    #[arg(long, value_name = "N")]
    pub min_requests: Option<u32>,
    /// Trip when failures / requests >= F (0..=1; 0 = off).
    #[arg(long, value_name = "F")]
    pub failure_ratio: Option<f64>,
    /// Trip after N failures in a row (0 = off).
    #[arg(long, value_name = "N")]
    pub consecutive_failures: Option<u32>,
    /// Trip when N failures fall in one interval (0 = off).
    #[arg(long, value_name = "N")]
    pub max_failures: Option<u32>,
    /// Counting window in closed; counts are cleared when it ends (0s = never).
    #[arg(long, value_name = "DURATION", value_parser = duration_arg)]
    pub interval: Option<Duration>,
    /// How long open lasts before half-open.
    #[arg(long, value_name = "DURATION", value_parser = duration_arg)]
    pub open_timeout: Option<Duration>,
    /// Probes admitted in half-open; that many successes close the breaker.
    #[arg(long, value_name = "N")]
    pub half_open_max: Option<u32>,
    /// What refused connects return (default ECONNREFUSED; any case).
    #[arg(long, value_name = "NAME", value_parser = errno_arg)]
    pub errno: Option<String>,
    /// A connect slower than this counts as a failure (0s = off).
    #[arg(long, value_name = "DURATION", value_parser = duration_arg)]
    pub slow_connect: Option<Duration>,
    /// Keep established connections when the breaker trips (default: destroy them).
    #[arg(long)]
    pub no_terminate: bool,
    /// Open it on every node of the fleet when N nodes ("3"), or N% of the live ones ("50%"),
    /// have tripped it by themselves within the window (needs agents in a fleet).
    #[arg(long, value_name = "N|N%")]
    pub fleet_quorum: Option<String>,
    /// How recent those trips must be (whole seconds) [default: 60s].
    #[arg(long, value_name = "DURATION", value_parser = duration_arg)]
    pub fleet_quorum_window: Option<Duration>,
    /// One breaker for the service, or one per destination (address:port) [default: service].
    #[arg(long, value_name = "service|destination", value_parser = ["service", "destination"])]
    pub granularity: Option<String>,
    /// Per destination: at most this percent of the destinations ejected at once (at least one
    /// always may be) [default: 50].
    #[arg(long, value_name = "PERCENT")]
    pub max_ejection_percent: Option<u32>,
    /// The open timeout grows with consecutive trips (open_timeout x trips) up to this (0s =
    /// no growth) [default: 300s per destination, 0s per service].
    #[arg(long, value_name = "DURATION", value_parser = duration_arg)]
    pub max_open_timeout: Option<Duration>,
    /// Per destination: forget destinations idle this long [default: 10m].
    #[arg(long, value_name = "DURATION", value_parser = duration_arg)]
    pub destination_ttl: Option<Duration>,
    /// audit: count, trip and report as ever, refuse nothing (what would have been refused is
    /// counted); switching back to enforce keeps the state [default: enforce].
    #[arg(long, value_name = "enforce|audit", value_parser = ["enforce", "audit"])]
    pub mode: Option<String>,
}

impl From<PolicyFlags> for crate::core::policy::PolicySpec {
    /// The flags as the policy they write: the one conversion both `policy set` commands use.
    fn from(f: PolicyFlags) -> Self {
        Self {
            preset: f.preset,
            min_requests: f.min_requests,
            failure_ratio: f.failure_ratio,
            consecutive_failures: f.consecutive_failures,
            max_failures: f.max_failures,
            interval: f.interval,
            open_timeout: f.open_timeout,
            half_open_max: f.half_open_max,
            errno: f.errno,
            slow_connect: f.slow_connect,
            terminate_established: f.no_terminate.then_some(false),
            fleet_quorum: f.fleet_quorum,
            fleet_quorum_window: f.fleet_quorum_window,
            granularity: f.granularity,
            max_ejection_percent: f.max_ejection_percent,
            max_open_timeout: f.max_open_timeout,
            destination_ttl: f.destination_ttl,
            mode: f.mode,
        }
    }
}

/// A latency histogram, as `GetLatency` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LatencyKind {
    /// SYN sent -> established (connect_latency).
    Connect,
    /// A send -> the first data after it (first_response_latency).
    #[value(name = "first_response")]
    FirstResponse,
    /// Smoothed RTT when a connection leaves ESTABLISHED (tcp_stats).
    Srtt,
    /// How long connections stayed ESTABLISHED (tcp_stats).
    Lifetime,
}

impl LatencyKind {
    pub fn name(self) -> &'static str {
        match self {
            LatencyKind::Connect => "connect",
            LatencyKind::FirstResponse => "first_response",
            LatencyKind::Srtt => "srtt",
            LatencyKind::Lifetime => "lifetime",
        }
    }
}

#[derive(Clone, Debug, Subcommand)]
pub enum WatchCommand {
    /// Breaker state changes, one line each (with -o json, one JSON object per line).
    Breakers {
        /// Only this service's.
        #[arg(long)]
        service: Option<String>,
    },
    /// Connections opened, closed, failed and rejected, with their process, one line each
    /// (with -o json, one JSON object per line).
    Conns {
        /// Only connections to or from this service's endpoints.
        #[arg(long)]
        service: Option<String>,
    },
}

#[derive(Clone, Debug, clap::Args)]
#[command(args = refused_client_flags())]
pub struct AgentArgs {
    /// TOML config file; without one the agent observes everything and has no services.
    #[arg(long, env = "BREAKWATER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Unix socket to serve the API on [default: agent.socket from the config, else /run/breakwater/agent.sock].
    #[arg(long, env = "BREAKWATER_SOCKET")]
    pub socket: Option<PathBuf>,
    /// On exit, remove everything pinned (programs, links, maps): enforcement and the breakers'
    /// state do not survive. Without it they stay in the kernel until the next start.
    #[arg(long)]
    pub release_on_exit: bool,
    /// bpffs directory for the pinned maps and links [default: agent.pin_dir from the config].
    #[arg(long, env = "BREAKWATER_PIN_DIR")]
    pub pin_dir: Option<PathBuf>,
    /// A cgroup (path under the cgroup2 mount) whose processes the breakers apply to; repeat
    /// for more [default: breaker.scope from the config, else "/", the whole node].
    #[arg(long = "scope", env = "BREAKWATER_SCOPE", value_delimiter = ',')]
    pub scope: Vec<String>,
    /// Permission bits of the socket, octal: 0600 lets only root in, 0666 lets everyone read
    /// (changes still need agent.authz) [default: agent.socket_mode, else 0600].
    #[arg(long, env = "BREAKWATER_SOCKET_MODE", value_name = "MODE")]
    pub socket_mode: Option<String>,
    /// Also serve the API on HOST:PORT over TCP, with TLS and verified client certificates
    /// (needs --tls-cert, --tls-key and --tls-client-ca) [default: agent.listen].
    #[arg(long, env = "BREAKWATER_LISTEN", value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// Also serve the API on HOST:PORT over plain TCP, without TLS: whoever reaches it may
    /// read; changes only with agent.authz.insecure_writers [default: agent.insecure_listen].
    #[arg(long, env = "BREAKWATER_INSECURE_LISTEN", value_name = "HOST:PORT")]
    pub insecure_listen: Option<String>,
    /// Serve grpc.health.v1.Health, and nothing else, on HOST:PORT over plain TCP: for probes
    /// that cannot do mTLS (Kubernetes gRPC probes) [default: agent.health_listen].
    #[arg(long, env = "BREAKWATER_HEALTH_LISTEN", value_name = "HOST:PORT")]
    pub health_listen: Option<String>,
    /// Serve Prometheus metrics (GET /metrics) on HOST:PORT over plain HTTP
    /// [default: metrics.listen].
    #[arg(long, env = "BREAKWATER_METRICS_LISTEN", value_name = "HOST:PORT")]
    pub metrics_listen: Option<String>,
    /// etcd endpoint (http:// or https://) of the fleet's shared state; repeat for more. Without
    /// one the agent is on its own [default: fleet.etcd].
    #[arg(
        long = "etcd",
        env = "BREAKWATER_ETCD",
        value_name = "URL",
        value_delimiter = ','
    )]
    pub etcd: Vec<String>,
    /// This node's name in the fleet [default: fleet.node_name, else the hostname].
    #[arg(long, env = "BREAKWATER_NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,
    /// CA certificates (PEM) etcd's certificate must chain to [default: fleet.etcd_ca].
    #[arg(long, env = "BREAKWATER_ETCD_CA", value_name = "FILE")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd [default: fleet.etcd_cert].
    #[arg(long, env = "BREAKWATER_ETCD_CERT", value_name = "FILE")]
    pub etcd_cert: Option<PathBuf>,
    /// Its key (PEM) [default: fleet.etcd_key].
    #[arg(long, env = "BREAKWATER_ETCD_KEY", value_name = "FILE")]
    pub etcd_key: Option<PathBuf>,
    /// CA certificates (PEM) that client certificates must chain to, for --listen
    /// [default: agent.tls_client_ca].
    #[arg(long, env = "BREAKWATER_TLS_CLIENT_CA", value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
    /// Turn off an optional feature, whatever the kernel offers; repeat or separate with commas.
    /// Added to the config's `[features] disable`. Core features (connection_tracking,
    /// breaker_gate) cannot be turned off.
    #[arg(
        long = "disable-feature",
        env = "BREAKWATER_DISABLE_FEATURE",
        value_name = "NAME",
        value_delimiter = ',',
        value_parser = feature_arg
    )]
    pub disable_features: Vec<crate::core::features::Feature>,
    /// What to do when this kernel cannot run a core feature: `exit` with code 69, or `wait`:
    /// log why and stay up (health "" SERVING, breakwater.v1.Agent NOT_SERVING) until stopped,
    /// for supervisors that restart whatever exits (a Kubernetes DaemonSet).
    #[arg(
        long,
        env = "BREAKWATER_ON_UNSUPPORTED_KERNEL",
        value_enum,
        value_name = "WHAT",
        default_value_t = OnUnsupportedKernel::Exit
    )]
    pub on_unsupported_kernel: OnUnsupportedKernel,
    /// Log as plain text (coloured only on a terminal) or as JSON, one object a line
    /// [default: agent.log_format, else text].
    #[arg(long, env = "BREAKWATER_LOG_FORMAT", value_enum, value_name = "FORMAT")]
    pub log_format: Option<crate::config::LogFormat>,
    /// Attach every hook, but have each return at once: nothing is counted or enforced. For
    /// `cargo xtask bench`, to measure what the hooks cost by themselves.
    #[arg(long, hide = true)]
    pub empty_hooks: bool,
    /// --tls-cert (a global flag: the client's certificate for the other commands).
    #[arg(skip)]
    pub tls_cert: Option<PathBuf>,
    /// --tls-key.
    #[arg(skip)]
    pub tls_key: Option<PathBuf>,
}

/// The client's own global flags, which `breakwater agent` refuses (exit 2) rather than take,
/// list in its help and ignore. Each has the id of its global flag on [`Cli`], and so clap does
/// not propagate that one to `agent` (`--tls-cert` and `--tls-key` are both sides', and are);
/// hidden; no `env`, so an agent started with `BREAKWATER_AGENT` and the like in its
/// environment starts as before.
fn refused_client_flags() -> [clap::Arg; 4] {
    let refuse = |id: &'static str, flag: &'static str, value: &'static str, instead: &str| {
        let why = format!(
            "{flag} is a flag of the client commands; `breakwater agent` does not take it{instead}"
        );
        refused_flag(id, flag, value, why)
    };
    [
        refuse("agents", "--agent", "ADDRESS", ""),
        refuse("agents_file", "--agents-file", "FILE", ""),
        refuse(
            "tls_ca",
            "--tls-ca",
            "FILE",
            " (the agent's CA for client certificates is --tls-client-ca)",
        ),
        refuse("output", "--output", "FORMAT", "").short('o'),
    ]
}

/// A flag a command refuses (exit 2, `why` printed) rather than take: hidden, with no `env`.
fn refused_flag(
    id: &'static str,
    flag: &'static str,
    value: &'static str,
    why: String,
) -> clap::Arg {
    clap::Arg::new(id)
        .long(flag.trim_start_matches("--"))
        .value_name(value)
        .action(clap::ArgAction::Append)
        .hide(true)
        .value_parser(move |_: &str| Err::<String, _>(why.clone()))
}

/// `--preset`: one of the core's presets, each listed in the help with what it sets.
fn preset_arg() -> clap::builder::PossibleValuesParser {
    crate::core::policy::PRESETS
        .map(|(name, sets)| clap::builder::PossibleValue::new(name).help(sets))
        .into()
}

/// `--errno`: a name from the core's table, spelled as the table spells it.
fn errno_arg(name: &str) -> Result<String, String> {
    let errno = crate::core::policy::parse_errno(name).map_err(|e| e.to_string())?;
    Ok(crate::core::policy::errno_name(errno))
}

/// `--disable-feature`: an optional feature's name.
fn feature_arg(name: &str) -> Result<crate::core::features::Feature, String> {
    crate::core::features::Feature::optional(name)
}

/// `--on-unsupported-kernel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnUnsupportedKernel {
    /// Exit with code 69 (EX_UNAVAILABLE).
    Exit,
    /// Log why, then stay up and not ready until stopped (then exit with code 69).
    Wait,
}

/// Exit code of `breakwater agent` when this kernel cannot run a core feature (connection
/// tracking, the breaker's gate): sysexits' EX_UNAVAILABLE. Not 1 (a failure that a restart may
/// cure) nor 2 (bad input): restarting on the same kernel fails the same way.
pub const EXIT_UNSUPPORTED_KERNEL: u8 = 69;

/// `breakwater agent --help`'s exit codes ([`EXIT_UNSUPPORTED_KERNEL`] is the 69).
const AGENT_EXIT_CODES: &str = "\
Exit codes:
  0   stopped by SIGINT or SIGTERM
  1   failed (e.g. another agent holds the socket or the pin directory)
  2   bad flags or config (the reason is printed); nothing was started
  69  this kernel cannot run a core feature (the message says what is missing);
      with --on-unsupported-kernel=wait, after waiting to be stopped";

#[derive(Clone, Debug, Subcommand)]
pub enum ServiceCommand {
    /// Create or replace a service.
    Put {
        name: String,
        /// IP:port, CIDR:port, [IPv6]:port or [CIDR6]:port; repeat for more.
        #[arg(long = "endpoint", required = true)]
        endpoints: Vec<String>,
    },
    Delete {
        name: String,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Sort {
    Active,
    Opened,
    Failed,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DirectionArg {
    Outbound,
    Inbound,
}

/// Why a command failed, and so its exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad input: exit code 2.
    #[error("{0}")]
    Usage(String),
    /// The kernel cannot run a core feature: exit code [`EXIT_UNSUPPORTED_KERNEL`].
    #[error("{0}")]
    UnsupportedKernel(String),
    /// Anything else: exit code 1.
    #[error("{0:#}")]
    Failed(#[from] anyhow::Error),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            CliError::UnsupportedKernel(_) => EXIT_UNSUPPORTED_KERNEL,
            CliError::Failed(_) => 1,
        }
    }
}

impl From<crate::error::Error> for CliError {
    fn from(e: crate::error::Error) -> Self {
        match e {
            crate::error::Error::InvalidArgument(m)
            | crate::error::Error::NotFound(m)
            | crate::error::Error::PermissionDenied(m) => Self::Usage(m),
            other => Self::Failed(other.into()),
        }
    }
}

pub fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if matches!(cli.command, Command::Agent(_)) {
        agent::tune_allocator();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Cli {
        agents,
        agents_file,
        tls_ca,
        tls_cert,
        tls_key,
        output,
        command,
    } = cli;
    let result = runtime.block_on(async move {
        match command {
            Command::Agent(mut args) => {
                args.tls_cert = tls_cert;
                args.tls_key = tls_key;
                agent::run(*args).await
            }
            Command::Uninstall { pin_dir } => agent::uninstall(&pin_dir),
            Command::Fleet(args) => {
                fleet::refuse_node_flags_before(&matches)?;
                fleet::run(args, output).await
            }
            command => {
                let target = client::Target {
                    agents,
                    agents_file,
                    tls: client::ClientTls {
                        ca: tls_ca,
                        cert: tls_cert,
                        key: tls_key,
                    },
                };
                client::run(&target, output, command).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Prints a line of the CLI's answer. When the reader has gone away (`breakwater info | head`)
/// the CLI ends as `cat` does, by SIGPIPE, instead of panicking. SIGPIPE itself stays ignored
/// (Rust's default): a socket whose peer hangs up, e.g. an agent refusing the TLS handshake,
/// must fail the call with EPIPE, not kill the process.
pub(crate) fn out(line: impl std::fmt::Display) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    let written = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            // SAFETY: SIG_DFL then raise ends this process at once; no handler is involved.
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                libc::raise(libc::SIGPIPE);
            }
            std::process::exit(141);
        }
        Err(e) => {
            eprintln!("error: writing the answer: {e}");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::features::Feature;

    fn agent_args(args: &[&str]) -> Result<AgentArgs, clap::Error> {
        let cli = Cli::try_parse_from(["breakwater", "agent"].iter().chain(args))?;
        match cli.command {
            Command::Agent(a) => Ok(*a),
            other => panic!("not the agent: {other:?}"),
        }
    }

    /// clap's own checks of the definition (conflicting names, bad defaults, ...), which it
    /// otherwise makes only when a command is parsed in a debug build.
    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    /// The client's global flags, as `breakwater --help` lists them.
    const CLIENT_FLAGS: [&str; 5] = ["--agent", "--agents-file", "--tls-ca", "--output", "-o"];

    /// The flags a help text lists.
    fn flags_in(help: &str) -> std::collections::BTreeSet<&str> {
        help.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .filter(|w| w.starts_with('-') && w.len() > 1)
            .collect()
    }

    /// `breakwater agent --help` lists the agent's flags and none of the client's; the two sides'
    /// --tls-cert and --tls-key are there. The client's are refused (exit 2), with a word on the
    /// agent's own flag where one does that job.
    #[test]
    fn the_agent_has_its_own_flags() {
        let help = Cli::try_parse_from(["breakwater", "agent", "--help"])
            .unwrap_err()
            .to_string();
        let flags = flags_in(&help);
        for flag in CLIENT_FLAGS {
            assert!(!flags.contains(flag), "{flag} in\n{help}");
        }
        for flag in [
            "--tls-cert",
            "--tls-key",
            "--tls-client-ca",
            "--socket",
            "--listen",
        ] {
            assert!(flags.contains(flag), "no {flag} in\n{help}");
        }
        for (args, why) in [
            (
                &["--agent", "unix:///run/x.sock"][..],
                "--agent is a flag of the client commands",
            ),
            (
                &["--agents-file", "agents"],
                "--agents-file is a flag of the client commands",
            ),
            (
                &["--tls-ca", "ca.pem"],
                "CA for client certificates is --tls-client-ca",
            ),
            (&["-o", "json"], "--output is a flag of the client commands"),
            (
                &["--output=table"],
                "--output is a flag of the client commands",
            ),
        ] {
            let err = agent_args(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
            assert!(err.to_string().contains(why), "{args:?}: {err}");
        }
        // Refused on the command line only: the agent's environment may hold the client's
        // variables (BREAKWATER_AGENT, ...) as it always could.
        let cmd = Cli::command();
        let agent = cmd.find_subcommand("agent").unwrap();
        for arg in agent.get_arguments().filter(|a| a.is_hide_set()) {
            assert_eq!(arg.get_env(), None, "{}", arg.get_id());
        }
        // Before the subcommand they are the top level's, as for every command.
        let cli = Cli::try_parse_from(["breakwater", "-o", "json", "agent", "--tls-cert", "a.pem"])
            .unwrap();
        assert_eq!(cli.output, Output::Json);
        assert_eq!(cli.tls_cert.as_deref(), Some(std::path::Path::new("a.pem")));
    }

    /// The client commands take the global flags before or after their name (scripts use both),
    /// and the top-level help lists them.
    #[test]
    fn client_flags_go_before_or_after_the_command() {
        let help = Cli::try_parse_from(["breakwater", "--help"])
            .unwrap_err()
            .to_string();
        let flags = flags_in(&help);
        for flag in CLIENT_FLAGS.iter().chain(&["--tls-cert", "--tls-key"]) {
            assert!(flags.contains(flag), "no {flag} in\n{help}");
        }
        let global = [
            "--agent",
            "unix:///a.sock",
            "--agent",
            "https://b:7443",
            "--agents-file",
            "fleet",
            "--tls-ca",
            "ca.pem",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "c.key",
            "-o",
            "json",
        ];
        for command in [
            &["services"][..],
            &["policy", "set", "db", "--preset", "nginx"],
            &["watch", "conns", "--service", "db"],
            &["trip", "db", "--for", "30s"],
        ] {
            for args in [
                [&global[..], command].concat(),
                [command, &global[..]].concat(),
            ] {
                let cli = Cli::try_parse_from(["breakwater"].iter().chain(&args))
                    .unwrap_or_else(|e| panic!("{args:?}: {e}"));
                assert_eq!(cli.agents, ["unix:///a.sock", "https://b:7443"], "{args:?}");
                assert_eq!(
                    cli.agents_file.as_deref(),
                    Some(std::path::Path::new("fleet"))
                );
                assert_eq!(cli.tls_ca.as_deref(), Some(std::path::Path::new("ca.pem")));
                assert_eq!(cli.tls_cert.as_deref(), Some(std::path::Path::new("c.pem")));
                assert_eq!(cli.tls_key.as_deref(), Some(std::path::Path::new("c.key")));
                assert_eq!(cli.output, Output::Json, "{args:?}");
            }
        }
        // Split around the command, as `breakwater --agent X services -o json` is written.
        let cli = Cli::try_parse_from([
            "breakwater",
            "--agent",
            "unix:///a.sock",
            "services",
            "-o",
            "json",
        ])
        .unwrap();
        assert_eq!((cli.agents.len(), cli.output), (1, Output::Json));
    }

    #[test]
    fn features_are_disabled_by_name() {
        let a = agent_args(&[]).unwrap();
        assert!(a.disable_features.is_empty());
        assert_eq!(a.on_unsupported_kernel, OnUnsupportedKernel::Exit);
        let a = agent_args(&[
            "--disable-feature",
            "first_response_latency",
            "--disable-feature=audit_stream,retransmits",
        ])
        .unwrap();
        assert_eq!(
            a.disable_features,
            [
                Feature::FirstResponseLatency,
                Feature::AuditStream,
                Feature::Retransmits
            ]
        );
        for (bad, why) in [
            (
                "nonsense",
                "unknown feature \"nonsense\" (optional features: time_wait",
            ),
            (
                "breaker_gate",
                "breaker_gate is a core feature and cannot be disabled",
            ),
        ] {
            let err = agent_args(&["--disable-feature", bad]).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad}");
            let text = err.to_string();
            assert!(text.contains(why), "{text}");
        }
    }

    #[test]
    fn unsupported_kernels_exit_or_wait() {
        let a = agent_args(&["--on-unsupported-kernel", "wait"]).unwrap();
        assert_eq!(a.on_unsupported_kernel, OnUnsupportedKernel::Wait);
        let a = agent_args(&["--on-unsupported-kernel=exit"]).unwrap();
        assert_eq!(a.on_unsupported_kernel, OnUnsupportedKernel::Exit);
        let err = agent_args(&["--on-unsupported-kernel", "restart"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn exit_codes_say_what_kind_of_failure() {
        assert_eq!(CliError::Usage("x".into()).exit_code(), 2);
        assert_eq!(CliError::Failed(anyhow::anyhow!("x")).exit_code(), 1);
        assert_eq!(CliError::UnsupportedKernel("x".into()).exit_code(), 69);
        assert_eq!(EXIT_UNSUPPORTED_KERNEL, 69);
        // `breakwater agent --help` documents it.
        let help = Cli::try_parse_from(["breakwater", "agent", "--help"])
            .unwrap_err()
            .to_string();
        assert!(
            help.contains(&format!(
                "{EXIT_UNSUPPORTED_KERNEL}  this kernel cannot run"
            )),
            "{help}"
        );
        assert!(help.contains("--on-unsupported-kernel"), "{help}");
        assert!(help.contains("--disable-feature"), "{help}");
    }

    #[test]
    fn latency_kinds_are_the_apis() {
        for k in LatencyKind::value_variants() {
            let v = k.to_possible_value().unwrap();
            assert_eq!(v.get_name(), k.name());
            assert!(breakwater_common::hist_kind::NAMES.contains(&k.name()));
        }
        let cli = Cli::try_parse_from([
            "breakwater",
            "latency",
            "db",
            "--kind",
            "first_response",
            "--kind",
            "connect",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Latency { kinds, .. }
                if kinds == [LatencyKind::FirstResponse, LatencyKind::Connect]
        ));
    }
}
