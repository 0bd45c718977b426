//! The client commands: one RPC each, printed as a table or as the response's JSON.

use std::path::PathBuf;

use breakwater_proto::v1::{self as pb, agent_client::AgentClient};
use hyper_util::rt::TokioIo;
use tonic::{
    transport::{Channel, Endpoint, Uri},
    Code,
};
use tower::service_fn;

use super::{
    output, CliError, Command, DirectionArg, Output, PolicyCommand, Preset, ServiceCommand, Sort,
    WatchCommand,
};
use crate::{
    breaker::{self, PolicySpec},
    service::parse_endpoints,
};

const MAX_RESPONSE: usize = 1 << 30;

/// Where the agent listens, from `--agent`.
fn socket_path(agent: &str) -> Result<PathBuf, CliError> {
    match agent.strip_prefix("unix://") {
        Some(path) if path.starts_with('/') => Ok(PathBuf::from(path)),
        _ => Err(CliError::Usage(format!(
            "invalid --agent {agent:?}: expected unix:///absolute/path/to/agent.sock"
        ))),
    }
}

async fn connect(agent: &str) -> Result<AgentClient<Channel>, CliError> {
    let path = socket_path(agent)?;
    let unreachable = |e: &dyn std::fmt::Display| {
        CliError::Failed(anyhow::anyhow!(
            "cannot reach the agent at {agent}: {e}\n\
             start it with `sudo breakwater agent` (or `cargo xtask run` from the repository), \
             or point --agent / BREAKWATER_AGENT at its socket"
        ))
    };
    // The URI is required by tonic but unused: the connector dials the socket.
    let channel = Endpoint::from_static("http://agent.invalid")
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
            unreachable(&source.unwrap_or_else(|| e.to_string()))
        })?;
    // A node's full connection list outgrows gRPC's default 4 MiB (100k sockets: ~7 MB).
    Ok(AgentClient::new(channel).max_decoding_message_size(MAX_RESPONSE))
}

fn status_error(s: tonic::Status) -> CliError {
    match s.code() {
        Code::InvalidArgument | Code::NotFound => CliError::Usage(s.message().to_owned()),
        _ => CliError::Failed(anyhow::anyhow!("agent: {} ({:?})", s.message(), s.code())),
    }
}

fn print<T: serde::Serialize>(
    format: Output,
    msg: &T,
    table: impl FnOnce(&T) -> String,
) -> Result<(), CliError> {
    match format {
        Output::Json => {
            let json = serde_json::to_string_pretty(msg).map_err(anyhow::Error::from)?;
            println!("{json}");
        }
        Output::Table => println!("{}", table(msg)),
    }
    Ok(())
}

/// `SetPolicy` from `breakwater policy set`'s flags.
fn set_policy_request(command: PolicyCommand) -> Option<pb::SetPolicyRequest> {
    let PolicyCommand::Set {
        name,
        preset,
        min_requests,
        failure_ratio,
        consecutive_failures,
        max_failures,
        interval,
        open_timeout,
        half_open_max,
        errno,
        slow_connect,
        no_terminate,
    } = command
    else {
        return None;
    };
    let ms = |d: Option<std::time::Duration>| d.map(|d| d.as_millis() as u64);
    Some(pb::SetPolicyRequest {
        service: name,
        preset: match preset {
            None => String::new(),
            Some(Preset::Gobreaker) => "gobreaker".into(),
            Some(Preset::Nginx) => "nginx".into(),
        },
        min_requests,
        failure_ratio,
        consecutive_failures,
        max_failures,
        interval_ms: ms(interval),
        open_timeout_ms: ms(open_timeout),
        half_open_max,
        errno,
        slow_connect_ms: ms(slow_connect),
        terminate_established: no_terminate.then_some(false),
    })
}

/// Prints breaker events as they come, until the agent ends the stream.
async fn watch_breakers(
    client: &mut AgentClient<Channel>,
    format: Output,
    service: Option<String>,
) -> Result<(), CliError> {
    let mut stream = client
        .watch_breaker_events(pb::WatchBreakerEventsRequest {
            service: service.unwrap_or_default(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if format == Output::Table {
        eprintln!("watching breaker state changes (Ctrl-C to stop)");
    }
    while let Some(event) = stream.message().await.map_err(status_error)? {
        match format {
            Output::Json => {
                let json = serde_json::to_string(&event).map_err(anyhow::Error::from)?;
                println!("{json}");
            }
            Output::Table => println!("{}", output::breaker_event(&event)),
        }
    }
    Err(CliError::Failed(anyhow::anyhow!(
        "the agent ended the stream (it stopped?)"
    )))
}

pub async fn run(agent: &str, format: Output, command: Command) -> Result<(), CliError> {
    // Check what can be checked here first, so that bad input gets exit code 2 even when
    // the agent is not running.
    match &command {
        Command::Service(ServiceCommand::Put { name, endpoints }) => {
            parse_endpoints(name, endpoints)?;
        }
        Command::Trip { reason, .. } => breaker::check_reason(reason.as_deref().unwrap_or(""))?,
        _ => {}
    }
    let command = match command {
        Command::Policy(p @ PolicyCommand::Set { .. }) => {
            let req = set_policy_request(p).expect("a set command");
            PolicySpec::from_request(&req).resolve()?;
            return print_set_policy(agent, format, req).await;
        }
        other => other,
    };
    let mut client = connect(agent).await?;
    match command {
        Command::Agent(_) | Command::Uninstall { .. } => unreachable!("handled by the caller"),
        Command::Policy(PolicyCommand::Set { .. }) => unreachable!("handled above"),
        Command::Breakers => {
            let r = client
                .list_breakers(pb::ListBreakersRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            print(format, &r, output::breakers)
        }
        Command::Trip { name, ttl, reason } => {
            let r = client
                .trip(pb::TripRequest {
                    service: name,
                    ttl_ms: ttl.map(|d| d.as_millis() as u64),
                    reason: reason.unwrap_or_default(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print(format, &r, |r| {
                output::breaker_changed("tripped", &r.breaker)
            })
        }
        Command::Reset { name } => {
            let r = client
                .reset(pb::ResetRequest { service: name })
                .await
                .map_err(status_error)?
                .into_inner();
            print(format, &r, |r| output::breaker_changed("reset", &r.breaker))
        }
        Command::Policy(PolicyCommand::Clear { name }) => {
            let r = client
                .clear_policy(pb::ClearPolicyRequest {
                    service: name.clone(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print(format, &r, |_| {
                format!("cleared the breaker policy of {name}: its connects pass uncounted")
            })
        }
        Command::Watch(WatchCommand::Breakers { service }) => {
            watch_breakers(&mut client, format, service).await
        }
        Command::Services => {
            let r = client
                .list_services(pb::ListServicesRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            print(format, &r, output::services)
        }
        Command::Destinations {
            service,
            sort,
            limit,
            direction,
        } => {
            let req = pb::ListDestinationsRequest {
                service: service.unwrap_or_default(),
                sort: match sort {
                    Sort::Active => pb::DestinationSort::Active,
                    Sort::Opened => pb::DestinationSort::Opened,
                    Sort::Failed => pb::DestinationSort::Failed,
                }
                .into(),
                limit,
                direction: match direction {
                    None => pb::Direction::Unspecified,
                    Some(DirectionArg::Outbound) => pb::Direction::Outbound,
                    Some(DirectionArg::Inbound) => pb::Direction::Inbound,
                }
                .into(),
            };
            let r = client
                .list_destinations(req)
                .await
                .map_err(status_error)?
                .into_inner();
            print(format, &r, output::destinations)
        }
        Command::Conns { service, limit } => {
            let req = pb::ListConnectionsRequest {
                service: service.unwrap_or_default(),
                limit,
            };
            let r = client
                .list_connections(req)
                .await
                .map_err(status_error)?
                .into_inner();
            print(format, &r, output::connections)
        }
        Command::Service(ServiceCommand::Put { name, endpoints }) => {
            let r = client
                .put_service(pb::PutServiceRequest { name, endpoints })
                .await
                .map_err(status_error)?
                .into_inner();
            print(format, &r, output::put_service)
        }
        Command::Service(ServiceCommand::Delete { name }) => {
            let r = client
                .delete_service(pb::DeleteServiceRequest { name: name.clone() })
                .await
                .map_err(status_error)?
                .into_inner();
            print(format, &r, |_| format!("deleted service {name}"))
        }
        Command::Latency {
            service,
            destination,
            netns,
        } => {
            let r = client
                .get_latency(pb::GetLatencyRequest {
                    service: service.unwrap_or_default(),
                    destination: destination.unwrap_or_default(),
                    netns,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print(format, &r, output::latency)
        }
        Command::Advise => {
            let r = client
                .advise(pb::AdviseRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            print(format, &r, output::advise)
        }
        Command::Timewait { limit } => {
            let r = client
                .get_time_wait(pb::GetTimeWaitRequest { limit })
                .await
                .map_err(status_error)?
                .into_inner();
            print(format, &r, output::time_wait)
        }
        Command::Info => {
            let r = client
                .get_agent_info(pb::GetAgentInfoRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            print(format, &r, output::info)
        }
    }
}

async fn print_set_policy(
    agent: &str,
    format: Output,
    req: pb::SetPolicyRequest,
) -> Result<(), CliError> {
    let r = connect(agent)
        .await?
        .set_policy(req)
        .await
        .map_err(status_error)?
        .into_inner();
    print(format, &r, |r| {
        output::breaker_changed("policy set on", &r.breaker)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    fn policy_set(args: &[&str]) -> pb::SetPolicyRequest {
        let cli = super::super::Cli::try_parse_from(
            ["breakwater", "policy", "set", "db"].iter().chain(args),
        )
        .unwrap();
        let Command::Policy(p) = cli.command else {
            panic!("a policy command")
        };
        set_policy_request(p).unwrap()
    }

    #[test]
    fn policy_flags_become_overrides() {
        let r = policy_set(&[
            "--preset",
            "gobreaker",
            "--open-timeout",
            "10s",
            "--no-terminate",
        ]);
        assert_eq!(r.service, "db");
        assert_eq!(r.preset, "gobreaker");
        assert_eq!(r.open_timeout_ms, Some(10_000));
        assert_eq!(r.terminate_established, Some(false));
        assert_eq!((r.interval_ms, r.failure_ratio), (None, None));

        let r = policy_set(&[
            "--failure-ratio",
            "0.5",
            "--min-requests",
            "10",
            "--interval",
            "2m",
            "--slow-connect",
            "500ms",
            "--errno",
            "EPERM",
        ]);
        assert_eq!(r.preset, "");
        assert_eq!(r.failure_ratio, Some(0.5));
        assert_eq!(r.interval_ms, Some(120_000));
        assert_eq!(r.slow_connect_ms, Some(500));
        assert_eq!(r.terminate_established, None);
        assert!(PolicySpec::from_request(&r).resolve().is_ok());
    }

    /// Bad input is refused before the agent is even contacted, with exit code 2.
    #[tokio::test]
    async fn bad_breaker_input_is_a_usage_error() {
        let agent = "unix:///nonexistent/agent.sock";
        for (args, why) in [
            (
                &["policy", "set", "db", "--failure-ratio", "2"][..],
                "failure_ratio 2 is outside 0..=1",
            ),
            (
                &["policy", "set", "db", "--errno", "EIO"],
                "unknown errno \"EIO\"",
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
        let long = "x".repeat(200);
        let cli =
            super::super::Cli::try_parse_from(["breakwater", "trip", "db", "--reason", &long])
                .unwrap();
        assert!(matches!(
            run(agent, Output::Table, cli.command).await,
            Err(CliError::Usage(_))
        ));
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
    fn agent_address_must_be_a_unix_socket_path() {
        assert_eq!(
            socket_path("unix:///run/x.sock").unwrap(),
            PathBuf::from("/run/x.sock")
        );
        for bad in ["/run/x.sock", "unix://relative", "http://1.2.3.4:5"] {
            assert!(matches!(socket_path(bad), Err(CliError::Usage(_))), "{bad}");
        }
    }
}
