//! The `breakwater` command line: the agent itself and the clients of its API.

mod agent;
mod client;
mod output;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::DEFAULT_SOCKET;

#[derive(Debug, Parser)]
#[command(
    name = "breakwater",
    version,
    about = "Watches every TCP connection on the node with eBPF"
)]
pub struct Cli {
    /// Address of the agent's API.
    #[arg(long, global = true, env = "BREAKWATER_AGENT", default_value_t = format!("unix://{DEFAULT_SOCKET}"))]
    pub agent: String,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    /// The API's response message as JSON, with the proto's field names.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent (as root): load the eBPF programs and serve the API.
    Agent(AgentArgs),
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
}

#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// TOML config file; without one the agent observes everything and has no services.
    #[arg(long, env = "BREAKWATER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Unix socket to serve the API on [default: agent.socket from the config, else /run/breakwater/agent.sock].
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
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
    /// Anything else: exit code 1.
    #[error("{0:#}")]
    Failed(#[from] anyhow::Error),
}

impl From<crate::error::Error> for CliError {
    fn from(e: crate::error::Error) -> Self {
        match e {
            crate::error::Error::InvalidArgument(m) | crate::error::Error::NotFound(m) => {
                Self::Usage(m)
            }
            other => Self::Failed(other.into()),
        }
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
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
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Agent(args) => agent::run(args).await,
            command => client::run(&cli.agent, cli.output, command).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Usage(m)) => {
            eprintln!("error: {m}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
