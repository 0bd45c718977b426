//! The plumbing of the client commands, written once for all of them: which agents to ask,
//! connecting (unix socket, TLS or plain TCP), the agent's status as the CLI's exit code and
//! message, asking several agents at once and printing their answers together with a NODE
//! column, as a table or as the response's JSON. The verbs themselves are in [`super::verbs`].

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use breakwater_proto::v1::agent_client::AgentClient;
use hyper_util::rt::TokioIo;
use tonic::{
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri},
    Code,
};
use tower::service_fn;

use super::{
    output,
    verbs::{self, Ask, Verb},
    CliError, Command, Output,
};
use crate::config::DEFAULT_SOCKET;

/// A connected agent.
pub type Client = AgentClient<Channel>;

/// What a verb's handler returns: the answer, or the agent's status as it came (mapped to the
/// CLI's exit code and message in one place, [`status_error`]).
pub type Answered = Result<Box<dyn Answer>, tonic::Status>;

const MAX_RESPONSE: usize = 1 << 30;
/// How long a TCP agent may take to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one answer may take (to its first byte, for streams): a node that accepts the
/// connection and never answers must not hold a fan-out up for good.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The client's side of TLS, for https:// agents.
#[derive(Clone, Debug, Default)]
pub struct ClientTls {
    /// CA certificates the agent's certificate must chain to.
    pub ca: Option<PathBuf>,
    /// The client's certificate and key.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// The agents a command goes to, as given on the command line.
#[derive(Clone, Debug, Default)]
pub struct Target {
    pub agents: Vec<String>,
    pub agents_file: Option<PathBuf>,
    pub tls: ClientTls,
}

/// Where an agent listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Unix(PathBuf),
    /// https://HOST:PORT: mutual TLS.
    Https(String),
    /// http://HOST:PORT: an agent's insecure listener.
    Http(String),
}

/// One agent to ask: its name (the address unless the agents file names it) and address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub address: Address,
    /// As written.
    pub text: String,
}

/// Parses `--agent`: unix:///PATH, https://HOST:PORT or http://HOST:PORT.
pub fn parse_address(text: &str) -> Result<Address, String> {
    let bad = |why: &str| {
        format!(
            "invalid agent address {text:?}: {why}; expected unix:///absolute/path/to/agent.sock, \
             https://HOST:PORT or http://HOST:PORT"
        )
    };
    if let Some(path) = text.strip_prefix("unix://") {
        return if path.starts_with('/') {
            Ok(Address::Unix(PathBuf::from(path)))
        } else {
            Err(bad("the socket path must be absolute"))
        };
    }
    let Some((scheme, rest)) = text.split_once("://") else {
        return Err(bad("no scheme"));
    };
    let host_port = rest.strip_suffix('/').unwrap_or(rest);
    if host_port.contains('/') || host_port.contains('@') {
        return Err(bad("only HOST:PORT may follow the scheme"));
    }
    crate::config::check_host_port(host_port).map_err(|why| bad(&why))?;
    let uri = format!("{scheme}://{host_port}");
    uri.parse::<Uri>().map_err(|e| bad(&e.to_string()))?;
    match scheme {
        "https" => Ok(Address::Https(uri)),
        "http" => Ok(Address::Http(uri)),
        _ => Err(bad(&format!("unknown scheme {scheme:?}"))),
    }
}

/// Parses an agents file: one agent a line, `ADDRESS` or `NAME=ADDRESS`; blank lines and
/// everything from a `#` at the start of a line or after a space are ignored.
pub fn parse_agents_file(text: &str) -> Result<Vec<Node>, String> {
    let mut nodes = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = match line.find('#') {
            Some(at) if at == 0 || line[..at].ends_with(char::is_whitespace) => &line[..at],
            _ => line,
        }
        .trim();
        if line.is_empty() {
            continue;
        }
        let (name, address) = match line.split_once('=') {
            Some((name, address)) => (Some(name.trim()), address.trim()),
            None => (None, line),
        };
        if name.is_some_and(str::is_empty) {
            return Err(format!("line {}: empty name before \"=\"", i + 1));
        }
        let parsed = parse_address(address).map_err(|e| format!("line {}: {e}", i + 1))?;
        nodes.push(Node {
            name: name.unwrap_or(address).to_owned(),
            address: parsed,
            text: address.to_owned(),
        });
    }
    Ok(nodes)
}

/// The agents to ask: every --agent, then the agents file's; the local socket if none.
pub fn nodes(target: &Target) -> Result<Vec<Node>, CliError> {
    let mut nodes = target
        .agents
        .iter()
        .map(|a| {
            Ok(Node {
                name: a.clone(),
                address: parse_address(a).map_err(CliError::Usage)?,
                text: a.clone(),
            })
        })
        .collect::<Result<Vec<_>, CliError>>()?;
    if let Some(path) = &target.agents_file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            CliError::Usage(format!("cannot read --agents-file {}: {e}", path.display()))
        })?;
        let listed = parse_agents_file(&text)
            .map_err(|e| CliError::Usage(format!("--agents-file {}: {e}", path.display())))?;
        if listed.is_empty() {
            return Err(CliError::Usage(format!(
                "--agents-file {} lists no agent",
                path.display()
            )));
        }
        nodes.extend(listed);
    }
    if nodes.is_empty() {
        let text = format!("unix://{DEFAULT_SOCKET}");
        nodes.push(Node {
            name: text.clone(),
            address: Address::Unix(DEFAULT_SOCKET.into()),
            text,
        });
    }
    Ok(nodes)
}

fn read_pem(flag: &str, path: &Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(path)
        .map_err(|e| CliError::Usage(format!("cannot read {flag} {}: {e}", path.display())))
}

/// The TLS settings for an https:// agent.
fn client_tls(agent: &str, tls: &ClientTls) -> Result<ClientTlsConfig, CliError> {
    let ca = tls.ca.as_deref().ok_or_else(|| {
        CliError::Usage(format!(
            "{agent}: https:// needs --tls-ca (or BREAKWATER_TLS_CA): the CA certificate that \
             the agent's certificate chains to"
        ))
    })?;
    let config =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_pem("--tls-ca", ca)?));
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => Ok(config.identity(Identity::from_pem(
            read_pem("--tls-cert", cert)?,
            read_pem("--tls-key", key)?,
        ))),
        (None, None) => Ok(config),
        _ => Err(CliError::Usage(
            "--tls-cert and --tls-key go together (BREAKWATER_TLS_CERT, BREAKWATER_TLS_KEY)".into(),
        )),
    }
}

/// The kind of the I/O error at the root of `e`, if there is one.
fn io_kind(e: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        next = err.source();
    }
    None
}

/// Who may use the agent's socket, for a caller who may not: the agent runs, and starting it
/// again is no help.
fn socket_access(path: &std::path::Path) -> String {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(meta) = std::fs::metadata(path) else {
        let dir = path.parent().unwrap_or(path);
        return format!(
            "the directory {} is not open to this user: run the command as root (sudo), or give \
             the agent a socket where its users can reach it (--socket, [agent] socket)",
            dir.display()
        );
    };
    let mode = meta.mode() & 0o777;
    let group = nix::unistd::Group::from_gid(meta.gid().into())
        .ok()
        .flatten()
        .map_or_else(|| meta.gid().to_string(), |g| g.name);
    let who = if mode & 0o060 != 0 {
        format!("root and the members of group {group}")
    } else {
        "root".to_owned()
    };
    format!(
        "the agent is running; its socket {} (mode {mode:o}) is open to {who} only: run the \
         command as root (sudo), or have the agent open it to a group of yours ([agent] \
         socket_mode = \"0660\" with socket_group) and join that group",
        path.display()
    )
}

async fn connect(node: &Node, tls: &ClientTls) -> Result<Client, CliError> {
    let agent = &node.text;
    let channel = match &node.address {
        Address::Unix(path) => {
            let path = path.clone();
            let socket = path.clone();
            let unreachable = |e: &dyn std::fmt::Display, kind: Option<std::io::ErrorKind>| {
                if kind == Some(std::io::ErrorKind::PermissionDenied) {
                    return CliError::Failed(anyhow::anyhow!(
                        "cannot reach the agent at {agent}: {e}\n{}",
                        socket_access(&socket)
                    ));
                }
                CliError::Failed(anyhow::anyhow!(
                    "cannot reach the agent at {agent}: {e}\n\
                     start it with `sudo breakwater agent` (or `cargo xtask run` from the \
                     repository), or point --agent / BREAKWATER_AGENT at its socket"
                ))
            };
            // The URI is required by tonic but unused: the connector dials the socket.
            Endpoint::from_static("http://agent.invalid")
                .timeout(REQUEST_TIMEOUT)
                .connect_with_connector(service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(TokioIo::new(stream))
                    }
                }))
                .await
                .map_err(|e| {
                    let source = std::error::Error::source(&e).map(ToString::to_string);
                    unreachable(&source.unwrap_or_else(|| e.to_string()), io_kind(&e))
                })?
        }
        Address::Https(uri) | Address::Http(uri) => {
            let mut endpoint = Endpoint::from_shared(uri.clone())
                .map_err(|e| CliError::Usage(format!("invalid agent address {agent:?}: {e}")))?
                .connect_timeout(CONNECT_TIMEOUT)
                .timeout(REQUEST_TIMEOUT);
            if matches!(node.address, Address::Https(_)) {
                endpoint = endpoint.tls_config(client_tls(agent, tls)?).map_err(|e| {
                    CliError::Usage(format!("{agent}: TLS: {}", crate::error::chain(&e)))
                })?;
            }
            endpoint.connect().await.map_err(|e| {
                CliError::Failed(anyhow::anyhow!(
                    "cannot reach the agent at {agent}: {}",
                    crate::error::chain(&e)
                ))
            })?
        }
    };
    // A node's full connection list in one message, as an agent without StreamConnections
    // answers it, outgrows gRPC's default 4 MiB (100k sockets: ~7 MB).
    Ok(AgentClient::new(channel).max_decoding_message_size(MAX_RESPONSE))
}

/// The agent's status as the CLI's error: bad input and refused changes exit 2, the rest 1.
fn status_error(s: tonic::Status) -> CliError {
    match s.code() {
        // Refused before anything changed: bad input, or a caller who may not change state.
        Code::InvalidArgument | Code::NotFound | Code::PermissionDenied => {
            CliError::Usage(s.message().to_owned())
        }
        // Another source (the fleet) owns what the caller would change.
        Code::FailedPrecondition if s.metadata().contains_key(crate::api::REFUSED_METADATA) => {
            CliError::Usage(s.message().to_owned())
        }
        // Not bad input: the agent does not run what the call needs (a feature that is off).
        Code::FailedPrecondition => CliError::Failed(anyhow::anyhow!(
            "{} (`breakwater info` shows what this agent runs)",
            s.message()
        )),
        _ => CliError::Failed(anyhow::anyhow!("agent: {} ({:?})", s.message(), s.code())),
    }
}

/// One agent's answer, ready to be printed alone or with other agents'.
pub trait Answer: Send {
    /// `-o json`: the response message as JSON.
    fn json(&self) -> serde_json::Result<String>;
    fn value(&self) -> serde_json::Result<serde_json::Value>;
    /// The table (or text) for people.
    fn table(&self) -> String;
    /// If the table is one table: its rows, to merge with other agents' (a NODE column first),
    /// and a line to print above the merged table.
    fn rows(&self) -> Option<Titled>;
}

/// A table's rows, with the line to print above them.
pub type Titled = (Option<String>, output::Rows);

type RowsOf<T> = fn(&T) -> Titled;

struct Reply<T, F> {
    msg: T,
    table: F,
    rows: Option<RowsOf<T>>,
}

impl<T, F> Answer for Reply<T, F>
where
    T: serde::Serialize + Send,
    F: Fn(&T) -> String + Send,
{
    fn json(&self) -> serde_json::Result<String> {
        serde_json::to_string_pretty(&self.msg)
    }

    fn value(&self) -> serde_json::Result<serde_json::Value> {
        serde_json::to_value(&self.msg)
    }

    fn table(&self) -> String {
        (self.table)(&self.msg)
    }

    fn rows(&self) -> Option<Titled> {
        self.rows.map(|rows| rows(&self.msg))
    }
}

pub fn reply<T>(msg: T, table: impl Fn(&T) -> String + Send + 'static) -> Box<dyn Answer>
where
    T: serde::Serialize + Send + 'static,
{
    Box::new(Reply {
        msg,
        table,
        rows: None,
    })
}

pub fn reply_rows<T>(
    msg: T,
    table: impl Fn(&T) -> String + Send + 'static,
    rows: RowsOf<T>,
) -> Box<dyn Answer>
where
    T: serde::Serialize + Send + 'static,
{
    Box::new(Reply {
        msg,
        table,
        rows: Some(rows),
    })
}

fn print(format: Output, answer: &dyn Answer) -> Result<(), CliError> {
    match format {
        Output::Json => crate::cli::out(answer.json().map_err(anyhow::Error::from)?),
        Output::Table => crate::cli::out(answer.table()),
    }
    Ok(())
}

/// Prints a stream's messages as they come (with -o json, one JSON object per line) until the
/// agent ends it, which is a failure: a watch ends only when stopped.
pub async fn follow<T: serde::Serialize>(
    opened: Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>,
    format: Output,
    what: &str,
    line: fn(&T) -> String,
) -> Result<(), CliError> {
    let mut stream = opened.map_err(status_error)?.into_inner();
    if format == Output::Table {
        eprintln!("watching {what} (Ctrl-C to stop)");
    }
    while let Some(message) = stream.message().await.map_err(status_error)? {
        match format {
            Output::Json => {
                let json = serde_json::to_string(&message).map_err(anyhow::Error::from)?;
                crate::cli::out(json);
            }
            Output::Table => crate::cli::out(line(&message)),
        }
    }
    Err(CliError::Failed(anyhow::anyhow!(
        "the agent ended the stream (it stopped?)"
    )))
}

/// Runs a client command: on one agent, its answer as it is; on several, asked of all at once
/// and printed together.
pub async fn run(target: &Target, format: Output, command: Command) -> Result<(), CliError> {
    let nodes = nodes(target)?;
    // Before connecting: bad input gets exit code 2 even when the agent is not running.
    let verb = verbs::verb(command)?;
    match (verb, &nodes[..]) {
        (Verb::Watch(watch), [node]) => watch(connect(node, &target.tls).await?, format).await,
        (Verb::Watch(_), _) => Err(CliError::Usage(format!(
            "watch follows one agent; {} were given",
            nodes.len()
        ))),
        (Verb::Ask(ask), [node]) => print(format, one(node, &target.tls, &ask).await?.as_ref()),
        (Verb::Ask(ask), _) => fan_out(&nodes, &target.tls, format, &ask).await,
    }
}

/// The verb's answer from one agent.
async fn one(node: &Node, tls: &ClientTls, ask: &Ask) -> Result<Box<dyn Answer>, CliError> {
    let agent = connect(node, tls).await?;
    ask(agent).await.map_err(status_error)
}

/// Asks every node at once; prints what came back, merged, and each failure on stderr.
async fn fan_out(
    nodes: &[Node],
    tls: &ClientTls,
    format: Output,
    ask: &Ask,
) -> Result<(), CliError> {
    let results = futures::future::join_all(nodes.iter().map(|node| one(node, tls, ask))).await;
    let answers: Vec<(&str, &dyn Answer)> = nodes
        .iter()
        .zip(&results)
        .filter_map(|(n, r)| r.as_ref().ok().map(|a| (n.name.as_str(), a.as_ref())))
        .collect();
    match format {
        Output::Json => {
            let mut list = Vec::new();
            for (node, result) in nodes.iter().zip(&results) {
                list.push(match result {
                    Ok(a) => serde_json::json!({
                        "node": node.name,
                        "result": a.value().map_err(anyhow::Error::from)?,
                    }),
                    Err(e) => serde_json::json!({ "node": node.name, "error": first_line(e) }),
                });
            }
            let all = serde_json::json!({ "nodes": list });
            crate::cli::out(serde_json::to_string_pretty(&all).map_err(anyhow::Error::from)?);
        }
        Output::Table => {
            if !answers.is_empty() {
                crate::cli::out(merged_table(&answers));
            }
        }
    }
    let failed: Vec<(&Node, &CliError)> = nodes
        .iter()
        .zip(&results)
        .filter_map(|(n, r)| r.as_ref().err().map(|e| (n, e)))
        .collect();
    for (node, e) in &failed {
        let why = first_line(e);
        if node.name == node.text {
            eprintln!("error: {}: {why}", node.name);
        } else {
            eprintln!("error: {} ({}): {why}", node.name, node.text);
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(CliError::Failed(anyhow::anyhow!(
            "{} of {} agents failed",
            failed.len(),
            nodes.len()
        )))
    }
}

/// What went wrong, without the hints on how to start a local agent (they are for one agent).
fn first_line(e: &CliError) -> String {
    e.to_string().lines().next().unwrap_or_default().to_owned()
}

/// Several agents' answers as one: one table with a NODE column when the answer is a table,
/// else each agent's under its name (one-line answers on one line).
fn merged_table(answers: &[(&str, &dyn Answer)]) -> String {
    let rows: Option<Vec<(String, Titled)>> = answers
        .iter()
        .map(|(node, a)| a.rows().map(|r| (node.to_string(), r)))
        .collect();
    if let Some(rows) = rows {
        if rows.iter().any(|(_, (_, r))| !r.rows.is_empty()) {
            let title = rows.iter().find_map(|(_, (t, _))| t.clone());
            let table = output::merged(rows.into_iter().map(|(n, (_, r))| (n, r)).collect());
            return match title {
                Some(t) => format!("{t}\n{table}"),
                None => table,
            };
        }
    }
    let texts: Vec<(&str, String)> = answers.iter().map(|(n, a)| (*n, a.table())).collect();
    if texts.iter().all(|(_, t)| !t.contains('\n')) {
        return texts
            .iter()
            .map(|(n, t)| format!("{n}: {t}"))
            .collect::<Vec<_>>()
            .join("\n");
    }
    texts
        .iter()
        .map(|(n, t)| format!("== {n} ==\n{t}"))
        .collect::<Vec<_>>()
        .join("\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use breakwater_proto::v1 as pb;
    use clap::Parser as _;

    /// Bad input is refused before the agent is even contacted, with exit code 2.
    #[tokio::test]
    async fn bad_breaker_input_is_a_usage_error() {
        let agent = &Target {
            agents: vec!["unix:///nonexistent/agent.sock".into()],
            ..Default::default()
        };
        for (args, why) in [
            (
                &["policy", "set", "db", "--failure-ratio", "2"][..],
                "failure_ratio 2 is outside 0..=1",
            ),
            (
                &[
                    "policy",
                    "set",
                    "db",
                    "--preset",
                    "nginx",
                    "--open-timeout",
                    "0s",
                ],
                "open_timeout must be more than 0",
            ),
            (
                &["policy", "set", "db", "--half-open-max", "0"],
                "half_open_max must be at least 1",
            ),
            (
                &["policy", "set", "db", "--consecutive-failures", "0"],
                "no trip rule",
            ),
        ] {
            let cli = super::super::Cli::try_parse_from(["breakwater"].iter().chain(args)).unwrap();
            match run(agent, Output::Table, cli.command).await {
                Err(CliError::Usage(m)) => assert!(m.contains(why), "{args:?}: {m}"),
                other => panic!("{args:?}: {other:?}"),
            }
        }
        let cli = super::super::Cli::try_parse_from([
            "breakwater",
            "service",
            "put",
            "db",
            "--endpoint",
            "10.0.0.1",
        ])
        .unwrap();
        assert!(matches!(
            run(agent, Output::Table, cli.command).await,
            Err(CliError::Usage(_))
        ));
        let long = "x".repeat(200);
        let cli =
            super::super::Cli::try_parse_from(["breakwater", "trip", "db", "--reason", &long])
                .unwrap();
        assert!(matches!(
            run(agent, Output::Table, cli.command).await,
            Err(CliError::Usage(_))
        ));
    }

    /// The agent's status, whatever the verb: refused input exits 2 with the agent's message,
    /// a feature that is off exits 1 with its message and where to look, the rest exits 1.
    #[test]
    fn statuses_become_exit_codes() {
        for code in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::PermissionDenied,
        ] {
            let e = status_error(tonic::Status::new(code, "no service \"db\""));
            assert_eq!(e.exit_code(), 2, "{code:?}");
            assert_eq!(e.to_string(), "no service \"db\"");
        }
        let e = status_error(tonic::Status::failed_precondition(
            "time_wait is off: disabled by configuration (features.disable)",
        ));
        assert_eq!(e.exit_code(), 1);
        assert_eq!(
            e.to_string(),
            "time_wait is off: disabled by configuration (features.disable) \
             (`breakwater info` shows what this agent runs)"
        );
        let e = status_error(tonic::Status::unavailable("shutting down"));
        assert_eq!(e.exit_code(), 1);
        assert_eq!(e.to_string(), "agent: shutting down (Unavailable)");
    }

    #[test]
    fn bad_flags_are_refused_by_the_parser() {
        for args in [
            &["trip", "db", "--for", "30"][..],
            &["trip", "db", "--for", "1500us"],
            &["policy", "set", "db", "--preset", "hystrix"],
            &["policy", "set", "db", "--interval", "soon"],
            &["policy", "set", "db", "--failure-ratio", "x"],
        ] {
            let err =
                super::super::Cli::try_parse_from(["breakwater"].iter().chain(args)).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
        let cli =
            super::super::Cli::try_parse_from(["breakwater", "trip", "db", "--for", "2m"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Trip { ttl: Some(d), .. } if d == std::time::Duration::from_secs(120)
        ));
        let cli = super::super::Cli::try_parse_from(["breakwater", "uninstall"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Uninstall { pin_dir } if pin_dir == std::path::Path::new("/sys/fs/bpf/breakwater")
        ));
    }

    #[test]
    fn agent_addresses_are_unix_https_or_http() {
        assert_eq!(
            parse_address("unix:///run/x.sock").unwrap(),
            Address::Unix(PathBuf::from("/run/x.sock"))
        );
        assert_eq!(
            parse_address("https://node1.example.com:7443").unwrap(),
            Address::Https("https://node1.example.com:7443".into())
        );
        assert_eq!(
            parse_address("http://10.0.0.1:7080/").unwrap(),
            Address::Http("http://10.0.0.1:7080".into())
        );
        assert_eq!(
            parse_address("https://[fd00::1]:7443").unwrap(),
            Address::Https("https://[fd00::1]:7443".into())
        );
        for (bad, why) in [
            ("/run/x.sock", "no scheme"),
            ("unix://relative", "must be absolute"),
            ("https://host", "expected HOST:PORT"),
            ("https://host:port", "invalid port"),
            ("https://fd00::1:7443", "in brackets"),
            ("https://host:1/path", "only HOST:PORT"),
            ("grpc://host:1", "unknown scheme \"grpc\""),
        ] {
            let err = parse_address(bad).unwrap_err();
            assert!(
                err.contains(why) && err.contains("expected unix:///"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn agents_files_name_their_nodes() {
        let nodes = parse_agents_file(
            "# fleet\n\nunix:///run/a.sock\n  web-1 = https://10.0.0.1:7443  # rack 1\n\
             db=http://db:7080\nunix:///run/odd#name.sock\n",
        )
        .unwrap();
        let got: Vec<(&str, &str)> = nodes
            .iter()
            .map(|n| (n.name.as_str(), n.text.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("unix:///run/a.sock", "unix:///run/a.sock"),
                ("web-1", "https://10.0.0.1:7443"),
                ("db", "http://db:7080"),
                ("unix:///run/odd#name.sock", "unix:///run/odd#name.sock"),
            ]
        );
        assert_eq!(
            nodes[1].address,
            Address::Https("https://10.0.0.1:7443".into())
        );
        let err = parse_agents_file("# ok\nhttps://a:1\nnot-an-address\n").unwrap_err();
        assert!(err.starts_with("line 3: invalid agent address"), "{err}");
        let err = parse_agents_file("=https://a:1").unwrap_err();
        assert!(err.contains("line 1: empty name"), "{err}");
        assert!(parse_agents_file("# nothing\n\n").unwrap().is_empty());
    }

    #[test]
    fn no_agent_given_means_the_local_socket() {
        let n = nodes(&Target::default()).unwrap();
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].address, Address::Unix(DEFAULT_SOCKET.into()));
        assert_eq!(n[0].name, format!("unix://{DEFAULT_SOCKET}"));
        let bad = Target {
            agents: vec!["tcp://x:1".into()],
            ..Default::default()
        };
        assert!(matches!(nodes(&bad), Err(CliError::Usage(_))));
    }

    /// Answers from several agents: one table with a NODE column when each is a table, one
    /// line per node when each is a line.
    #[test]
    fn answers_merge_with_a_node_column() {
        let svc = |name: &str, active: u64| pb::ListServicesResponse {
            services: vec![pb::Service {
                name: name.into(),
                endpoints: vec!["10.0.0.1:80".into()],
                outbound: Some(pb::ConnCounts {
                    active,
                    ..Default::default()
                }),
                ..Default::default()
            }],
        };
        let a = reply_rows(svc("web", 3), output::services, |r| {
            (None, output::services_rows(r))
        });
        let b = reply_rows(svc("web", 5), output::services, |r| {
            (None, output::services_rows(r))
        });
        let merged = merged_table(&[("alpha", a.as_ref()), ("beta", b.as_ref())]);
        let lines: Vec<&str> = merged.lines().collect();
        assert_eq!(lines.len(), 3, "{merged}");
        assert!(lines[0].trim_start().starts_with("NODE") && lines[0].contains("SERVICE"));
        assert!(lines[1].trim_start().starts_with("alpha") && lines[1].contains(" 3 "));
        assert!(lines[2].trim_start().starts_with("beta") && lines[2].contains(" 5 "));
        // One node alone prints exactly what it always did.
        assert_eq!(a.table(), output::services(&svc("web", 3)));

        // Nothing to list anywhere: the usual message, once per node.
        let empty = || {
            reply_rows(pb::ListServicesResponse::default(), output::services, |r| {
                (None, output::services_rows(r))
            })
        };
        let (e1, e2) = (empty(), empty());
        let merged = merged_table(&[("alpha", e1.as_ref()), ("beta", e2.as_ref())]);
        assert!(merged.starts_with("alpha: no services"), "{merged}");

        let d1 = reply(pb::DeleteServiceResponse {}, |_| {
            "deleted service web".into()
        });
        let d2 = reply(pb::DeleteServiceResponse {}, |_| {
            "deleted service web".into()
        });
        assert_eq!(
            merged_table(&[("alpha", d1.as_ref()), ("beta", d2.as_ref())]),
            "alpha: deleted service web\nbeta: deleted service web"
        );
    }

    /// An agent over the in-memory kernel on a unix socket, with `conns` connections (one in
    /// five to service db); it records the methods called and, when `old`, answers
    /// `StreamConnections` as an agent without it would.
    struct Served {
        node: Node,
        called: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
        _dir: tempfile::TempDir,
    }

    impl Served {
        fn start(conns: usize, old: bool) -> Self {
            use crate::{
                api::{authz::Authz, AgentService},
                config::{Config, Overrides},
                core::{
                    memory::{MemoryKernel, Outcome, NETNS},
                    owners::Owner,
                    Core,
                },
            };
            let kernel = MemoryKernel::new();
            let config = Config::default();
            let mut core = Core::new(kernel.clone(), config.clone(), None, Overrides::default());
            core.apply_config(&config).unwrap();
            core.put_service(Owner::Local, "db", &["127.0.0.1:1001"])
                .unwrap();
            for i in 0..conns {
                let to = if i % 5 == 0 {
                    "127.0.0.1:1001"
                } else {
                    "127.0.0.1:2000"
                };
                kernel
                    .connect(to.parse().unwrap(), Outcome::Established)
                    .unwrap();
            }
            let core = std::sync::Arc::new(std::sync::Mutex::new(core.into_dyn()));
            let api = AgentService::new(core, Authz::new(&config.agent.authz), NETNS, None);
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("agent.sock");
            let listener = tokio::net::UnixListener::bind(&path).unwrap();
            let called = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let record = called.clone();
            let layer = tower::layer::layer_fn(move |inner| Recorder {
                inner,
                called: record.clone(),
                old,
            });
            tokio::spawn(
                tonic::transport::Server::builder()
                    .layer(layer)
                    .add_service(breakwater_proto::v1::agent_server::AgentServer::new(api))
                    .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
            );
            let text = format!("unix://{}", path.display());
            Self {
                node: Node {
                    name: text.clone(),
                    address: Address::Unix(path),
                    text,
                },
                called,
                _dir: dir,
            }
        }

        /// `breakwater conns` with these flags, as JSON and as a table.
        async fn conns(&self, service: Option<&str>, limit: u32) -> (String, String) {
            let command = Command::Conns {
                service: service.map(str::to_owned),
                limit,
            };
            let Verb::Ask(ask) = verbs::verb(command).unwrap() else {
                panic!("conns asks")
            };
            let answer = one(&self.node, &ClientTls::default(), &ask).await.unwrap();
            (answer.json().unwrap(), answer.table())
        }

        fn called(&self) -> Vec<String> {
            std::mem::take(&mut *self.called.lock().unwrap())
        }
    }

    #[derive(Clone)]
    struct Recorder<S> {
        inner: S,
        called: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
        old: bool,
    }

    impl<S, B> tower::Service<tonic::codegen::http::Request<B>> for Recorder<S>
    where
        S: tower::Service<
            tonic::codegen::http::Request<B>,
            Response = tonic::codegen::http::Response<tonic::body::Body>,
        >,
        S::Future: Send + 'static,
    {
        type Response = S::Response;
        type Error = S::Error;
        type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

        fn poll_ready(
            &mut self,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            self.inner.poll_ready(cx)
        }

        fn call(&mut self, request: tonic::codegen::http::Request<B>) -> Self::Future {
            let method = request.uri().path().rsplit('/').next().unwrap().to_owned();
            self.called.lock().unwrap().push(method.clone());
            if self.old && method == "StreamConnections" {
                let status = tonic::Status::unimplemented("");
                return Box::pin(async move { Ok(status.into_http()) });
            }
            Box::pin(self.inner.call(request))
        }
    }

    /// `conns` streams the listing and prints it as the unary answer was printed; from an
    /// agent without the stream, it prints the unary answer, the same.
    #[tokio::test]
    async fn conns_streams_and_falls_back_to_the_unary_call() {
        let new = Served::start(2500, false);
        let old = Served::start(2500, true);
        for (service, limit) in [(None, 0), (Some("db"), 0), (None, 1200), (Some("db"), 7)] {
            let streamed = new.conns(service, limit).await;
            assert_eq!(new.called(), ["StreamConnections"]);
            let unary = old.conns(service, limit).await;
            assert_eq!(old.called(), ["StreamConnections", "ListConnections"]);
            assert_eq!(streamed, unary, "{service:?} {limit}");
            let v: serde_json::Value = serde_json::from_str(&streamed.0).unwrap();
            let want = match (service, limit) {
                (_, 0) if service.is_some() => 500,
                (None, 0) => 2500,
                (_, n) => n as usize,
            };
            assert_eq!(v["connections"].as_array().unwrap().len(), want);
        }
        let e = match verbs::verb(Command::Conns {
            service: Some("web".into()),
            limit: 0,
        })
        .unwrap()
        {
            Verb::Ask(ask) => one(&new.node, &ClientTls::default(), &ask).await.err(),
            Verb::Watch(_) => None,
        };
        let e = e.expect("an unknown service is refused");
        assert_eq!(
            (e.exit_code(), e.to_string()),
            (2, "no service named \"web\"".into())
        );
    }
}
