//! `breakwater fleet`: the fleet's state in etcd, read and written with no agent in between.
//! The desired services, policies and trips are written as [`crate::fleet::schema`] lays them
//! out, built from the same flags as the node commands' and checked as the agents check them
//! ([`records`]), so bad input exits 2 before etcd is dialed; what the agents publish (nodes,
//! breakers) is read and printed as several agents' answers are ([`output`]). [`store`] talks
//! to etcd.

mod output;
mod records;
mod store;

use std::{path::PathBuf, time::Duration};

use clap::{parser::ValueSource, Subcommand};
use serde_json::Value;

use self::{
    output::{Breaker, Change, Desired, Trip},
    records::{label_arg, node_arg, Removal, Write},
    store::{Etcd, Kv, Settings},
};
use super::{duration_arg, refused_flag, CliError, Output, PolicyFlags};
use crate::{
    core::service::validate_name,
    fleet::schema::{self, BreakerRecord, Keys, Kind, NodeRecord, Record, Selector},
};

#[derive(Clone, Debug, clap::Args)]
#[command(args = refused_node_flags())]
pub struct FleetArgs {
    /// etcd endpoint: http://HOST:PORT or https://HOST:PORT; repeat or separate with commas.
    #[arg(
        long = "etcd",
        global = true,
        env = "BREAKWATER_ETCD",
        value_name = "URL",
        value_delimiter = ','
    )]
    pub etcd: Vec<String>,
    /// CA certificates (PEM) etcd's certificate must chain to (https:// endpoints need it).
    #[arg(long, global = true, env = "BREAKWATER_ETCD_CA", value_name = "FILE")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd.
    #[arg(long, global = true, env = "BREAKWATER_ETCD_CERT", value_name = "FILE")]
    pub etcd_cert: Option<PathBuf>,
    /// Its key (PEM).
    #[arg(long, global = true, env = "BREAKWATER_ETCD_KEY", value_name = "FILE")]
    pub etcd_key: Option<PathBuf>,
    /// Where the fleet's keys live: the agents' `[fleet] prefix`.
    #[arg(
        long,
        global = true,
        env = "BREAKWATER_FLEET_PREFIX",
        value_name = "PREFIX",
        default_value = schema::DEFAULT_PREFIX
    )]
    pub prefix: String,
    #[command(subcommand)]
    pub command: FleetCommand,
}

#[derive(Clone, Debug, Subcommand)]
pub enum FleetCommand {
    /// The agents in the fleet, as each publishes itself while it runs.
    Nodes,
    /// Every node's breakers, as the agents publish them.
    Breakers {
        /// Only this service's.
        name: Option<String>,
    },
    /// The fleet's services, policies and trips, one row per name.
    Services,
    /// Create, replace or delete a fleet service.
    #[command(subcommand)]
    Service(FleetServiceCommand),
    /// Set or clear a service's fleet policy.
    #[command(subcommand)]
    Policy(FleetPolicyCommand),
    /// Force a service's breakers open on the selected nodes, until reset (or --for ends).
    Trip {
        /// Service name.
        name: String,
        /// Only this destination of a service with granularity destination (eject it).
        #[arg(long, value_name = "IP:PORT", value_parser = crate::cli::destination_arg)]
        destination: Option<std::net::SocketAddr>,
        /// Open for this long (e.g. 30s, 5m): the trip is put on an etcd lease of as many whole
        /// seconds, and goes with it; default until reset.
        #[arg(long = "for", value_name = "DURATION", value_parser = duration_arg)]
        ttl: Option<Duration>,
        /// Why, shown with the breakers while they are forced open.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        selector: SelectorFlags,
    },
    /// Delete a service's fleet trip: the breakers it forced open close. A trip made on a node
    /// is reset on that node.
    Reset {
        /// Service name.
        name: String,
        /// The trip of this destination.
        #[arg(long, value_name = "IP:PORT", value_parser = crate::cli::destination_arg)]
        destination: Option<std::net::SocketAddr>,
    },
    /// Follow the nodes' breakers: one line per state change (with -o json, one JSON object
    /// per line).
    Watch {
        /// Only this service's.
        #[arg(long)]
        service: Option<String>,
        /// Also the counters' updates (each node writes them at most every 10 s).
        #[arg(long)]
        all: bool,
    },
}

#[derive(Clone, Debug, Subcommand)]
pub enum FleetServiceCommand {
    /// Create or replace a fleet service: it replaces (shadows) a service of the same name that
    /// the selected nodes define themselves.
    Put {
        name: String,
        /// IP:port, CIDR:port, [IPv6]:port or [CIDR6]:port; repeat for more.
        #[arg(long = "endpoint", required = true)]
        endpoints: Vec<String>,
        #[command(flatten)]
        selector: SelectorFlags,
    },
    /// Delete a fleet service: nodes that define it themselves go back to theirs.
    Delete { name: String },
}

#[derive(Clone, Debug, Subcommand)]
pub enum FleetPolicyCommand {
    /// Set or replace a service's fleet policy (the flags of `breakwater policy set`).
    Set {
        /// Service name.
        name: String,
        #[command(flatten)]
        policy: Box<PolicyFlags>,
        #[command(flatten)]
        selector: SelectorFlags,
    },
    /// Remove a service's fleet policy: nodes with one of their own go back to it.
    Clear {
        /// Service name.
        name: String,
    },
}

/// The nodes a record applies to; without either flag, every node.
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args)]
pub struct SelectorFlags {
    /// Only this node (its --node-name); repeat for more. With --label, these nodes and the
    /// labels' [default: every node].
    #[arg(long = "node", value_name = "NODE", value_parser = node_arg)]
    pub nodes: Vec<String>,
    /// Only the nodes with this label (their `[fleet] labels`); repeat: nodes with all of them.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = label_arg)]
    pub labels: Vec<(String, String)>,
}

impl SelectorFlags {
    fn selector(self) -> Result<Selector, CliError> {
        records::selector(self.nodes, self.labels)
    }
}

/// The flags that dial agents, which `breakwater fleet` refuses (exit 2) wherever they are
/// written after `fleet`: each has the id of its global flag on [`super::Cli`], so that one is
/// not propagated here (see [`super::refused_client_flags`]). Before `fleet` they are the top
/// level's, and [`refuse_node_flags_before`] refuses them.
fn refused_node_flags() -> [clap::Arg; 5] {
    let refuse = |id: &'static str, flag: &'static str, value: &'static str, instead: &str| {
        refused_flag(
            id,
            flag,
            value,
            format!(
                "{flag} is a flag of the commands that dial agents; `breakwater fleet` talks to \
                 etcd and does not take it ({instead})"
            ),
        )
        .global(true)
    };
    [
        refuse(
            "agents",
            "--agent",
            "ADDRESS",
            "etcd's endpoints are --etcd",
        ),
        refuse(
            "agents_file",
            "--agents-file",
            "FILE",
            "the agents in etcd are `breakwater fleet nodes`",
        ),
        refuse("tls_ca", "--tls-ca", "FILE", "etcd's CA is --etcd-ca"),
        refuse(
            "tls_cert",
            "--tls-cert",
            "FILE",
            "etcd's client certificate is --etcd-cert",
        ),
        refuse("tls_key", "--tls-key", "FILE", "its key is --etcd-key"),
    ]
}

/// `breakwater --agent X fleet ...`: the agents' flags given before `fleet` (their environment
/// variables are no reason to refuse: a shell may set them for the other commands).
pub fn refuse_node_flags_before(matches: &clap::ArgMatches) -> Result<(), CliError> {
    for (id, flag) in [
        ("agents", "--agent"),
        ("agents_file", "--agents-file"),
        ("tls_ca", "--tls-ca"),
        ("tls_cert", "--tls-cert"),
        ("tls_key", "--tls-key"),
    ] {
        if matches.value_source(id) == Some(ValueSource::CommandLine) {
            return Err(CliError::Usage(format!(
                "{flag} is a flag of the commands that dial agents; `breakwater fleet` talks to \
                 etcd (--etcd, --etcd-ca, --etcd-cert, --etcd-key) and does not take it"
            )));
        }
    }
    Ok(())
}

/// A fleet command, its input checked.
#[derive(Debug)]
enum Plan {
    Nodes,
    Breakers(Option<String>),
    Services,
    Put(Box<Write>),
    Remove(Removal),
    Watch { service: Option<String>, all: bool },
}

/// The command's plan from its flags: bad input is refused here, exit 2, before etcd is dialed.
fn plan(keys: &Keys, command: FleetCommand) -> Result<Plan, CliError> {
    let check = |name: &Option<String>| name.as_deref().map(validate_name).transpose();
    Ok(match command {
        FleetCommand::Nodes => Plan::Nodes,
        FleetCommand::Breakers { name } => {
            check(&name)?;
            Plan::Breakers(name)
        }
        FleetCommand::Services => Plan::Services,
        FleetCommand::Service(FleetServiceCommand::Put {
            name,
            endpoints,
            selector,
        }) => Plan::Put(Box::new(records::service(
            keys,
            &name,
            endpoints,
            selector.selector()?,
        )?)),
        FleetCommand::Service(FleetServiceCommand::Delete { name }) => {
            Plan::Remove(records::removal(keys, Kind::Service, &name)?)
        }
        FleetCommand::Policy(FleetPolicyCommand::Set {
            name,
            policy,
            selector,
        }) => Plan::Put(Box::new(records::policy(
            keys,
            &name,
            *policy,
            selector.selector()?,
        )?)),
        FleetCommand::Policy(FleetPolicyCommand::Clear { name }) => {
            Plan::Remove(records::removal(keys, Kind::Policy, &name)?)
        }
        FleetCommand::Trip {
            name,
            destination,
            ttl,
            reason,
            selector,
        } => Plan::Put(Box::new(records::trip(
            keys,
            &name,
            destination,
            ttl,
            reason,
            selector.selector()?,
        )?)),
        FleetCommand::Reset { name, destination } => {
            validate_name(&name)?;
            let name = match destination {
                Some(d) => crate::fleet::schema::destination_trip(&name, d),
                None => name,
            };
            Plan::Remove(records::removal(keys, Kind::Trip, &name)?)
        }
        FleetCommand::Watch { service, all } => {
            check(&service)?;
            Plan::Watch { service, all }
        }
    })
}

/// Runs a fleet command: its flags checked (exit 2), then etcd asked (exit 1 if unreachable).
pub async fn run(args: FleetArgs, format: Output) -> Result<(), CliError> {
    let settings = Settings::new(&args)?;
    let keys = Keys::new(&args.prefix)?;
    let plan = plan(&keys, args.command)?;
    let etcd = Etcd::connect(&settings).await?;
    match plan {
        Plan::Nodes => {
            let nodes = read_nodes(&etcd, &keys).await?;
            print(
                format,
                || output::nodes(&nodes, &keys.nodes()),
                || output::nodes_json(&nodes),
            )
        }
        Plan::Breakers(name) => {
            let mut list = read_breakers(&etcd, &keys).await?;
            list.retain(|b| name.as_ref().is_none_or(|n| *n == b.service));
            print(
                format,
                || match (&name, list.is_empty()) {
                    (Some(n), true) => format!("no node publishes a breaker for {n}"),
                    (None, true) => format!(
                        "no breakers under {} (agents publish the breakers of the services \
                         with a policy)",
                        keys.breakers()
                    ),
                    _ => output::breakers(&list),
                },
                || output::breakers_json(&list),
            )
        }
        Plan::Services => {
            let list = read_desired(&etcd, &keys).await?;
            print(
                format,
                || output::services(&list, keys.prefix()),
                || output::services_json(&list),
            )
        }
        Plan::Put(write) => {
            let put = etcd.put(&write).await?;
            print(
                format,
                || output::written(&write, &put),
                || output::written_json(&write, &put),
            )
        }
        Plan::Remove(removal) => {
            let deleted = etcd.delete(&removal.key).await?;
            print(
                format,
                || output::removed(&removal, &deleted),
                || output::removed_json(&removal, &deleted),
            )
        }
        Plan::Watch { service, all } => watch(&etcd, &keys, format, service, all).await,
    }
}

fn print(
    format: Output,
    table: impl FnOnce() -> String,
    json: impl FnOnce() -> Value,
) -> Result<(), CliError> {
    match format {
        Output::Table => crate::cli::out(table()),
        Output::Json => {
            crate::cli::out(serde_json::to_string_pretty(&json()).map_err(anyhow::Error::from)?)
        }
    }
    Ok(())
}

/// A record the agents wrote that cannot be read: said on stderr, and left out.
fn unreadable(key: &str, e: &serde_json::Error) {
    eprintln!("warning: {key}: unreadable record, left out: {e}");
}

async fn read_nodes(etcd: &Etcd, keys: &Keys) -> Result<Vec<(String, NodeRecord)>, CliError> {
    let [kvs]: [Vec<Kv>; 1] = etcd
        .list(&[keys.nodes()])
        .await?
        .try_into()
        .unwrap_or_default();
    Ok(kvs
        .iter()
        .filter_map(|kv| {
            let node = keys.parse_node(&kv.key)?;
            match serde_json::from_slice(&kv.value) {
                Ok(r) => Some((node.to_owned(), r)),
                Err(e) => {
                    unreadable(&kv.key, &e);
                    None
                }
            }
        })
        .collect())
}

async fn read_breakers(etcd: &Etcd, keys: &Keys) -> Result<Vec<Breaker>, CliError> {
    let [kvs]: [Vec<Kv>; 1] = etcd
        .list(&[keys.breakers()])
        .await?
        .try_into()
        .unwrap_or_default();
    Ok(kvs.iter().filter_map(|kv| breaker(keys, kv)).collect())
}

fn breaker(keys: &Keys, kv: &Kv) -> Option<Breaker> {
    let (node, service) = keys.parse_breaker(&kv.key)?;
    match serde_json::from_slice::<BreakerRecord>(&kv.value) {
        Ok(record) => Some(Breaker {
            node: node.to_owned(),
            service: service.to_owned(),
            record,
        }),
        Err(e) => {
            unreadable(&kv.key, &e);
            None
        }
    }
}

/// The services, policies and trips, read at one revision and grouped by name (sorted), each
/// record checked as the agents check it; with the time left of each trip's lease.
async fn read_desired(etcd: &Etcd, keys: &Keys) -> Result<Vec<Desired>, CliError> {
    let prefixes: Vec<String> = Kind::ALL.iter().map(|&k| keys.kind(k)).collect();
    let lists = etcd.list(&prefixes).await?;
    let mut by_name: std::collections::BTreeMap<String, Desired> = Default::default();
    for kv in lists.iter().flatten() {
        let Some((kind, name)) = keys.parse(&kv.key) else {
            continue;
        };
        let entry = by_name.entry(name.to_owned()).or_insert_with(|| Desired {
            name: name.to_owned(),
            ..Default::default()
        });
        let parsed = Record::parse(kind, name, &kv.value).map_err(|e| e.to_string());
        match (kind, parsed) {
            (Kind::Service, Ok(Record::Service(r))) => entry.service = Some(Ok(r)),
            (Kind::Policy, Ok(Record::Policy(r))) => entry.policy = Some(Ok(*r)),
            (Kind::Trip, Ok(Record::Trip(record))) => {
                let remaining_s = if kv.lease == 0 {
                    None
                } else {
                    etcd.lease_remaining(kv.lease).await?
                };
                entry.trip = Some(Ok(Trip {
                    record,
                    remaining_s,
                }));
            }
            (Kind::Service, Err(e)) => entry.service = Some(Err(e)),
            (Kind::Policy, Err(e)) => entry.policy = Some(Err(e)),
            (Kind::Trip, Err(e)) => entry.trip = Some(Err(e)),
            (_, Ok(_)) => unreachable!("Record::parse reads the kind it is given"),
        }
    }
    Ok(by_name.into_values().collect())
}

async fn watch(
    etcd: &Etcd,
    keys: &Keys,
    format: Output,
    service: Option<String>,
    all: bool,
) -> Result<(), CliError> {
    let mut stream = etcd.watch(&keys.breakers()).await?;
    if format == Output::Table {
        eprintln!(
            "watching the breakers under {} (Ctrl-C to stop)",
            keys.breakers()
        );
    }
    while let Some(response) = etcd.next(&mut stream).await? {
        if response.canceled() {
            return Err(CliError::Failed(anyhow::anyhow!(
                "etcd cancelled the watch: {}",
                or(response.cancel_reason(), "no reason given")
            )));
        }
        for event in response.events() {
            let Some(change) = change(keys, event, service.as_deref()) else {
                continue;
            };
            if !(all || change.changes_state()) {
                continue;
            }
            let time = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
            match format {
                Output::Table => crate::cli::out(output::change_line(&time, &change)),
                Output::Json => crate::cli::out(output::change_json(&time, &change)),
            }
        }
    }
    Err(CliError::Failed(anyhow::anyhow!(
        "etcd ended the watch (it stopped?)"
    )))
}

fn or<'a>(s: &'a str, default: &'a str) -> &'a str {
    if s.is_empty() {
        default
    } else {
        s
    }
}

/// A watch event on `P/breakers/NODE/SERVICE` (of `only`, if given) as a change; None for other
/// keys.
fn change(keys: &Keys, event: &etcd_client::Event, only: Option<&str>) -> Option<Change> {
    let kv = event.kv()?;
    let key = String::from_utf8_lossy(kv.key());
    let (node, service) = keys.parse_breaker(&key)?;
    if only.is_some_and(|s| s != service) {
        return None;
    }
    let read = |value: &[u8]| match serde_json::from_slice::<BreakerRecord>(value) {
        Ok(r) => Some(r),
        Err(e) => {
            unreadable(&key, &e);
            None
        }
    };
    let now = match event.event_type() {
        etcd_client::EventType::Put => Some(read(kv.value())?),
        etcd_client::EventType::Delete => None,
    };
    Some(Change {
        node: node.to_owned(),
        service: service.to_owned(),
        now,
        before: event.prev_kv().and_then(|p| read(p.value())),
        revision: kv.mod_revision(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::{CommandFactory as _, FromArgMatches as _, Parser as _};

    fn parse(args: &[&str]) -> Result<(FleetArgs, Output), clap::Error> {
        let cli = Cli::try_parse_from(["breakwater", "fleet"].iter().chain(args))?;
        match cli.command {
            Command::Fleet(a) => Ok((a, cli.output)),
            other => panic!("not fleet: {other:?}"),
        }
    }

    fn fleet(args: &[&str]) -> FleetArgs {
        parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}")).0
    }

    fn keys() -> Keys {
        Keys::new(schema::DEFAULT_PREFIX).unwrap()
    }

    /// `-o` and the etcd flags go before or after the subcommand; the prefix has its default.
    #[test]
    fn etcd_flags_go_anywhere_after_fleet() {
        for args in [
            &[
                "--etcd",
                "http://a:2379,http://b:2379",
                "-o",
                "json",
                "nodes",
            ][..],
            &[
                "nodes",
                "--etcd=http://a:2379",
                "--etcd",
                "http://b:2379",
                "-o",
                "json",
            ],
            &[
                "-o",
                "json",
                "nodes",
                "--etcd",
                "http://a:2379",
                "--etcd",
                "http://b:2379",
            ],
        ] {
            let (a, output) = parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert_eq!(a.etcd, ["http://a:2379", "http://b:2379"], "{args:?}");
            assert_eq!(output, Output::Json, "{args:?}");
            assert_eq!(a.prefix, "/breakwater/v1");
            assert!(matches!(a.command, FleetCommand::Nodes));
        }
        let a = fleet(&[
            "service",
            "put",
            "db",
            "--endpoint",
            "10.0.0.1:5432",
            "--etcd",
            "https://e:2379",
            "--etcd-ca",
            "ca.pem",
            "--etcd-cert",
            "c.pem",
            "--etcd-key",
            "c.key",
            "--prefix",
            "/bw/test",
        ]);
        assert_eq!(a.etcd_ca.as_deref(), Some(std::path::Path::new("ca.pem")));
        assert_eq!(a.etcd_cert.as_deref(), Some(std::path::Path::new("c.pem")));
        assert_eq!(a.etcd_key.as_deref(), Some(std::path::Path::new("c.key")));
        assert_eq!(a.prefix, "/bw/test");
    }

    /// The flags that dial agents are refused after `fleet` (exit 2, with what to use instead)
    /// and before it; their environment variables are not.
    #[test]
    fn fleet_refuses_the_agents_flags() {
        for (args, why) in [
            (
                &["--agent", "unix:///a.sock", "nodes"][..],
                "etcd's endpoints are --etcd",
            ),
            (
                &["nodes", "--agent", "https://n1:7443"],
                "--agent is a flag of the commands",
            ),
            (
                &["trip", "db", "--agents-file", "agents"],
                "the agents in etcd are `breakwater fleet nodes`",
            ),
            (
                &["breakers", "--tls-ca", "ca.pem"],
                "etcd's CA is --etcd-ca",
            ),
            (&["--tls-cert", "c.pem", "nodes"], "--etcd-cert"),
            (&["watch", "--tls-key=c.key"], "--etcd-key"),
        ] {
            let err = parse(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
            assert!(err.to_string().contains(why), "{args:?}: {err}");
        }
        let help = Cli::try_parse_from(["breakwater", "fleet", "nodes", "--help"])
            .unwrap_err()
            .to_string();
        for flag in ["--agent ", "--agents-file", "--tls-ca", "--tls-cert"] {
            assert!(!help.contains(flag), "{flag} in\n{help}");
        }
        for flag in ["--etcd ", "--etcd-ca", "--prefix", "--output"] {
            assert!(help.contains(flag), "no {flag} in\n{help}");
        }

        let matches = |args: &[&str]| {
            Cli::command()
                .try_get_matches_from(["breakwater"].iter().chain(args))
                .unwrap()
        };
        let before = matches(&["--agent", "unix:///a.sock", "fleet", "nodes"]);
        assert!(matches!(
            Cli::from_arg_matches(&before).unwrap().command,
            Command::Fleet(_)
        ));
        let err = refuse_node_flags_before(&before).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(
            err.to_string()
                .starts_with("--agent is a flag of the commands that dial"),
            "{err}"
        );
        let err =
            refuse_node_flags_before(&matches(&["--tls-ca", "x", "fleet", "nodes"])).unwrap_err();
        assert!(err.to_string().starts_with("--tls-ca "), "{err}");
        assert!(refuse_node_flags_before(&matches(&["-o", "json", "fleet", "nodes"])).is_ok());
    }

    #[test]
    fn etcd_must_be_given_and_well_formed() {
        let usage = |args: &[&str]| match Settings::new(&fleet(args)) {
            Err(CliError::Usage(m)) => m,
            other => panic!("{args:?}: {other:?}"),
        };
        // Without --etcd (and with BREAKWATER_ETCD unset, as in the tests).
        if std::env::var_os("BREAKWATER_ETCD").is_none() {
            let e = usage(&["nodes"]);
            assert!(
                e.starts_with("`breakwater fleet` needs etcd: --etcd URL"),
                "{e}"
            );
        }
        let e = usage(&["nodes", "--etcd", "10.0.0.5:2379"]);
        assert!(
            e.contains("invalid etcd endpoint \"10.0.0.5:2379\": no scheme"),
            "{e}"
        );
        let e = usage(&["nodes", "--etcd", "http://a:1,https://b:1"]);
        assert!(e.contains("all http:// or all https://"), "{e}");
        let e = usage(&["nodes", "--etcd", "https://a:1"]);
        assert!(e.starts_with("https:// etcd needs --etcd-ca"), "{e}");
        let e = usage(&["nodes", "--etcd", "http://a:1", "--etcd-ca", "ca.pem"]);
        assert!(e.contains("are for https:// endpoints"), "{e}");
        let e = usage(&["nodes", "--etcd", "https://a:1", "--etcd-cert", "c.pem"]);
        assert!(
            e.starts_with("--etcd-cert and --etcd-key go together"),
            "{e}"
        );
        let e = usage(&[
            "nodes",
            "--etcd",
            "https://a:1",
            "--etcd-ca",
            "/nonexistent/ca.pem",
        ]);
        assert!(
            e.starts_with("cannot read --etcd-ca /nonexistent/ca.pem"),
            "{e}"
        );
        let e = usage(&["nodes", "--etcd", " , "]);
        assert!(e.starts_with("`breakwater fleet` needs etcd"), "{e}");
        let s =
            Settings::new(&fleet(&["nodes", "--etcd", "http://a:2379/,http://b:2379"])).unwrap();
        assert_eq!(s.endpoints, ["http://a:2379", "http://b:2379"]);
    }

    /// Every write is built and checked before etcd is dialed: bad input exits 2 (the etcd
    /// endpoint here is never reached).
    #[tokio::test]
    async fn bad_input_exits_2_before_etcd_is_dialed() {
        for (args, why) in [
            (
                &["service", "put", "db", "--endpoint", "10.0.0.1"][..],
                "10.0.0.1",
            ),
            (&["service", "delete", "no/such"], "no/such"),
            (
                &["policy", "set", "db", "--failure-ratio", "2"],
                "failure_ratio 2 is outside 0..=1",
            ),
            (
                &["policy", "set", "db", "--consecutive-failures", "0"],
                "no trip rule",
            ),
            (&["trip", "db", "--for", "0s"], "--for must be more than 0"),
            (
                &["trip", "db", "--label", "zone=a", "--label", "zone=b"],
                "--label zone given twice",
            ),
            (&["breakers", "bad name"], "bad name"),
        ] {
            let mut all = vec!["--etcd", "http://192.0.2.1:2379"];
            all.extend(args);
            let a = fleet(&all);
            match run(a, Output::Table).await {
                Err(CliError::Usage(m)) => assert!(m.contains(why), "{args:?}: {m}"),
                other => panic!("{args:?}: {other:?}"),
            }
        }
        let a = fleet(&["nodes", "--etcd", "http://a:1", "--prefix", "breakwater"]);
        assert!(matches!(
            run(a, Output::Table).await,
            Err(CliError::Usage(_))
        ));
    }

    /// Flags the parser refuses (exit 2): the node commands' value parsers.
    #[test]
    fn bad_flags_are_refused_by_the_parser() {
        for args in [
            &["trip", "db", "--for", "30"][..],
            &["trip", "db", "--for", "1500us"],
            &["trip", "db", "--node", "bad node"],
            &["trip", "db", "--label", "zone"],
            &["policy", "set", "db", "--preset", "hystrix"],
            &["policy", "set", "db", "--errno", "EAGAIN"],
            &["policy", "set", "db", "--interval", "soon"],
            &["service", "put", "db"],
            &["reset"],
        ] {
            let err = parse(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn commands_become_their_records() {
        let plan_of = |args: &[&str]| plan(&keys(), fleet(args).command).unwrap();
        let Plan::Put(w) = plan_of(&[
            "service",
            "put",
            "db",
            "--endpoint",
            "10.0.0.1:5432",
            "--endpoint",
            "[fd00::/64]:5432",
            "--node",
            "n1",
            "--label",
            "zone=a",
        ]) else {
            panic!("a put")
        };
        assert_eq!(w.key, "/breakwater/v1/services/db");
        assert_eq!(
            w.json,
            r#"{"endpoints":["10.0.0.1:5432","[fd00::/64]:5432"],"selector":{"nodes":["n1"],"labels":{"zone":"a"}}}"#
        );

        let Plan::Put(w) = plan_of(&[
            "policy",
            "set",
            "db",
            "--preset",
            "nginx",
            "--open-timeout",
            "10s",
            "--errno",
            "eperm",
            "--no-terminate",
        ]) else {
            panic!("a put")
        };
        assert_eq!(w.key, "/breakwater/v1/policies/db");
        assert_eq!(
            w.json,
            r#"{"policy":{"preset":"nginx","open_timeout":"10s","errno":"EPERM","terminate_established":false}}"#
        );

        let Plan::Put(w) = plan_of(&["trip", "db", "--for", "90s", "--reason", "migration"]) else {
            panic!("a put")
        };
        assert_eq!(w.json, r#"{"reason":"migration","ttl_ms":90000}"#);
        assert_eq!(w.lease_secs, Some(90));

        for (args, key) in [
            (&["reset", "db"][..], "/breakwater/v1/trips/db"),
            (&["policy", "clear", "db"], "/breakwater/v1/policies/db"),
            (&["service", "delete", "db"], "/breakwater/v1/services/db"),
        ] {
            let Plan::Remove(r) = plan_of(args) else {
                panic!("{args:?}")
            };
            assert_eq!(r.key, key);
        }
        assert!(matches!(
            plan_of(&["watch", "--service", "db", "--all"]),
            Plan::Watch { service: Some(s), all: true } if s == "db"
        ));
        assert!(matches!(
            plan_of(&["breakers", "db"]),
            Plan::Breakers(Some(s)) if s == "db"
        ));
    }

    /// An etcd that does not answer: exit 1, the endpoints named.
    #[tokio::test]
    async fn unreachable_etcd_exits_1_naming_it() {
        // A port nobody listens on, on this host: refused at once.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}");
        let a = fleet(&["nodes", "--etcd", &url]);
        match run(a, Output::Table).await {
            Err(e @ CliError::Failed(_)) => {
                assert_eq!(e.exit_code(), 1);
                let text = e.to_string();
                assert!(
                    text.starts_with(&format!("cannot reach etcd at {url}")),
                    "{text}"
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
