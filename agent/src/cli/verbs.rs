//! The client commands, one handler each. [`verb`] turns a command's flags into its request
//! (checking what can be checked without an agent); the verb's handler sends that request to
//! one agent and shapes the answer. Connecting, mapping the agent's status to the exit code,
//! asking several agents and printing are the plumbing's ([`super::client`]), written once.

use std::future::Future;

use breakwater_proto::v1 as pb;
use futures::future::BoxFuture;
use tonic::Code;

use super::{
    client::{follow, reply, reply_rows, Answered, Client, Titled},
    output, CliError, Command, DirectionArg, Output, PolicyCommand, ServiceCommand, Sort,
    WatchCommand,
};
use crate::core::{
    policy::{self as breaker, PolicySpec},
    service::parse_endpoints,
};

/// A client command, its input checked and its request made.
pub enum Verb {
    /// One request, one answer: asked of every agent given, the answers printed together.
    Ask(Ask),
    /// A stream followed on one agent, printed as it comes until the agent ends it.
    Watch(Watch),
}

/// A unary verb's request sent to one agent by its handler.
pub type Ask = Box<dyn Fn(Client) -> BoxFuture<'static, Answered> + Send + Sync>;

/// A streaming verb on one agent, printed in the given format.
pub type Watch = Box<dyn FnOnce(Client, Output) -> BoxFuture<'static, Result<(), CliError>> + Send>;

/// `request` sent by `handler`, once per agent.
fn ask<R, F, Fut>(request: R, handler: F) -> Verb
where
    R: Clone + Send + Sync + 'static,
    F: Fn(Client, R) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Answered> + Send + 'static,
{
    Verb::Ask(Box::new(move |agent| {
        Box::pin(handler(agent, request.clone()))
    }))
}

/// `request` sent by `handler`, which follows the stream it opens.
fn watch<R, F, Fut>(request: R, handler: F) -> Verb
where
    R: Send + 'static,
    F: FnOnce(Client, R, Output) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), CliError>> + Send + 'static,
{
    Verb::Watch(Box::new(move |agent, format| {
        Box::pin(handler(agent, request, format))
    }))
}

/// The command's verb: its request from its flags, and its handler. Bad input that can be seen
/// here is refused here, with exit code 2 even when no agent runs.
pub fn verb(command: Command) -> Result<Verb, CliError> {
    Ok(match command {
        Command::Agent(_) | Command::Uninstall { .. } | Command::Fleet(_) => {
            unreachable!("not a client command: main runs it")
        }
        Command::Services => ask(pb::ListServicesRequest {}, services),
        Command::Destinations {
            service,
            sort,
            limit,
            direction,
        } => ask(
            destinations_request(service, sort, limit, direction),
            destinations,
        ),
        Command::Conns { service, limit } => ask(
            pb::StreamConnectionsRequest {
                service: service.unwrap_or_default(),
                limit,
            },
            conns,
        ),
        Command::Service(ServiceCommand::Put { name, endpoints }) => {
            parse_endpoints(&name, &endpoints)?;
            ask(pb::PutServiceRequest { name, endpoints }, put_service)
        }
        Command::Service(ServiceCommand::Delete { name }) => {
            ask(pb::DeleteServiceRequest { name }, delete_service)
        }
        Command::Info => ask(pb::GetAgentInfoRequest {}, info),
        Command::Latency {
            kinds,
            service,
            destination,
            netns,
        } => ask(
            pb::GetLatencyRequest {
                service: service.unwrap_or_default(),
                destination: destination.unwrap_or_default(),
                netns,
                kinds: kinds.iter().map(|k| k.name().to_owned()).collect(),
            },
            latency,
        ),
        Command::Advise => ask(pb::AdviseRequest {}, advise),
        Command::Timewait { limit } => ask(pb::GetTimeWaitRequest { limit }, timewait),
        Command::Breakers { service: None } => ask(pb::ListBreakersRequest {}, breakers),
        Command::Breakers {
            service: Some(service),
        } => ask(pb::GetBreakerRequest { service }, breaker),
        Command::Trip {
            name,
            destination,
            ttl,
            reason,
        } => {
            let reason = reason.unwrap_or_default();
            breaker::check_reason(&reason)?;
            let request = pb::TripRequest {
                service: name,
                ttl_ms: ttl.map(|d| d.as_millis() as u64),
                reason,
                destination: destination.map(|d| d.to_string()).unwrap_or_default(),
            };
            ask(request, trip)
        }
        Command::Reload => ask(pb::ReloadConfigRequest {}, reload),
        Command::Reset { name, destination } => ask(
            pb::ResetRequest {
                service: name,
                destination: destination.map(|d| d.to_string()).unwrap_or_default(),
            },
            reset,
        ),
        Command::Policy(p @ PolicyCommand::Set { .. }) => {
            let request = set_policy_request(p).expect("a set command");
            PolicySpec::from_request(&request).resolve()?;
            ask(request, set_policy)
        }
        Command::Policy(PolicyCommand::Clear { name }) => {
            ask(pb::ClearPolicyRequest { service: name }, clear_policy)
        }
        Command::Watch(WatchCommand::Breakers { service }) => watch(
            pb::WatchBreakerEventsRequest {
                service: service.unwrap_or_default(),
            },
            watch_breakers,
        ),
        Command::Watch(WatchCommand::Conns { service }) => watch(
            pb::WatchConnectionsRequest {
                service: service.unwrap_or_default(),
            },
            watch_conns,
        ),
    })
}

/// `ListDestinations` from `breakwater destinations`' flags.
fn destinations_request(
    service: Option<String>,
    sort: Sort,
    limit: u32,
    direction: Option<DirectionArg>,
) -> pb::ListDestinationsRequest {
    pb::ListDestinationsRequest {
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
    }
}

/// `SetPolicy` from `breakwater policy set`'s flags.
fn set_policy_request(command: PolicyCommand) -> Option<pb::SetPolicyRequest> {
    let PolicyCommand::Set { name, policy } = command else {
        return None;
    };
    Some(PolicySpec::from(*policy).to_request(&name))
}

// The handlers: one request to one agent, the answer as a table (or line) and as rows to merge
// with other agents'. A status from the agent is returned as it is.

async fn services(mut agent: Client, request: pb::ListServicesRequest) -> Answered {
    let r = agent.list_services(request).await?.into_inner();
    Ok(reply_rows(r, output::services, |r| {
        (None, output::services_rows(r))
    }))
}

async fn destinations(mut agent: Client, request: pb::ListDestinationsRequest) -> Answered {
    let r = agent.list_destinations(request).await?.into_inner();
    Ok(reply_rows(r, output::destinations, |r| {
        (None, output::destinations_rows(r))
    }))
}

/// The listing streamed, its chunks put together: printed as `ListConnections` answered it
/// whole, which an agent older than `StreamConnections` is asked instead.
async fn conns(mut agent: Client, request: pb::StreamConnectionsRequest) -> Answered {
    let connections = match agent.stream_connections(request.clone()).await {
        Ok(stream) => {
            let mut stream = stream.into_inner();
            let mut connections = Vec::new();
            while let Some(chunk) = stream.message().await? {
                connections.extend(chunk.connections);
            }
            connections
        }
        Err(s) if s.code() == Code::Unimplemented => {
            #[expect(
                deprecated,
                reason = "the fallback for agents without StreamConnections"
            )]
            let r = agent.list_connections(pb::ListConnectionsRequest {
                service: request.service,
                limit: request.limit,
            });
            r.await?.into_inner().connections
        }
        Err(s) => return Err(s),
    };
    let r = pb::ListConnectionsResponse { connections };
    Ok(reply_rows(r, output::connections, |r| {
        (None, output::connections_rows(r))
    }))
}

async fn put_service(mut agent: Client, request: pb::PutServiceRequest) -> Answered {
    let r = agent.put_service(request).await?.into_inner();
    Ok(reply(r, output::put_service))
}

async fn delete_service(mut agent: Client, request: pb::DeleteServiceRequest) -> Answered {
    let name = request.name.clone();
    let r = agent.delete_service(request).await?.into_inner();
    Ok(reply(r, move |_| format!("deleted service {name}")))
}

async fn info(mut agent: Client, request: pb::GetAgentInfoRequest) -> Answered {
    let r = agent.get_agent_info(request).await?.into_inner();
    Ok(reply(r, output::info))
}

async fn latency(mut agent: Client, request: pb::GetLatencyRequest) -> Answered {
    let r = agent.get_latency(request).await?.into_inner();
    Ok(reply(r, output::latency))
}

async fn advise(mut agent: Client, request: pb::AdviseRequest) -> Answered {
    let r = agent.advise(request).await?.into_inner();
    Ok(reply(r, output::advise))
}

async fn timewait(mut agent: Client, request: pb::GetTimeWaitRequest) -> Answered {
    let r = agent.get_time_wait(request).await?.into_inner();
    Ok(reply(r, output::time_wait))
}

async fn breakers(mut agent: Client, request: pb::ListBreakersRequest) -> Answered {
    let r = agent.list_breakers(request).await?.into_inner();
    Ok(reply_rows(r, output::breakers, |r| {
        (None, output::breakers_rows(r))
    }))
}

/// One service's breaker, answered as a list of one (the same table and JSON as `breakers`).
async fn breaker(mut agent: Client, request: pb::GetBreakerRequest) -> Answered {
    let r = agent.get_breaker(request).await?.into_inner();
    let list = pb::ListBreakersResponse {
        breakers: r.breaker.into_iter().collect(),
    };
    Ok(reply_rows(list, output::breakers, |r| {
        (None, output::breakers_rows(r))
    }))
}

async fn trip(mut agent: Client, request: pb::TripRequest) -> Answered {
    let r = agent.trip(request).await?.into_inner();
    Ok(reply_rows(r, output::tripped, |r| {
        let (title, mut rows) = changed_rows("tripped", &r.breaker);
        rows.notes.extend(output::termination_note(r));
        (title, rows)
    }))
}

async fn reload(mut agent: Client, request: pb::ReloadConfigRequest) -> Answered {
    let r = agent.reload_config(request).await?.into_inner();
    Ok(reply(r, output::reloaded))
}

async fn reset(mut agent: Client, request: pb::ResetRequest) -> Answered {
    let r = agent.reset(request).await?.into_inner();
    Ok(reply_rows(
        r,
        |r| output::breaker_changed("reset", &r.breaker),
        |r| changed_rows("reset", &r.breaker),
    ))
}

async fn set_policy(mut agent: Client, request: pb::SetPolicyRequest) -> Answered {
    let r = agent.set_policy(request).await?.into_inner();
    Ok(reply_rows(
        r,
        |r| output::breaker_changed("policy set on", &r.breaker),
        |r| changed_rows("policy set on", &r.breaker),
    ))
}

async fn clear_policy(mut agent: Client, request: pb::ClearPolicyRequest) -> Answered {
    let name = request.service.clone();
    let r = agent.clear_policy(request).await?.into_inner();
    Ok(reply(r, move |_| {
        format!("cleared the breaker policy of {name}: its connects pass uncounted")
    }))
}

async fn watch_breakers(
    mut agent: Client,
    request: pb::WatchBreakerEventsRequest,
    format: Output,
) -> Result<(), CliError> {
    let stream = agent.watch_breaker_events(request).await;
    follow(
        stream,
        format,
        "breaker state changes",
        output::breaker_event,
    )
    .await
}

async fn watch_conns(
    mut agent: Client,
    request: pb::WatchConnectionsRequest,
    format: Output,
) -> Result<(), CliError> {
    let stream = agent.watch_connections(request).await;
    follow(stream, format, "connections", output::connection_event).await
}

/// A breaker after a trip, reset or new policy, as rows, with "tripped db" above them.
fn changed_rows(verb: &str, b: &Option<pb::Breaker>) -> Titled {
    let list = pb::ListBreakersResponse {
        breakers: b.iter().cloned().collect(),
    };
    let title = b.as_ref().map(|b| format!("{verb} {}", b.service));
    (title, output::breakers_rows(&list))
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
            "eperm",
        ]);
        assert_eq!(r.preset, "");
        assert_eq!(r.errno.as_deref(), Some("EPERM"));
        assert_eq!(r.failure_ratio, Some(0.5));
        assert_eq!(r.interval_ms, Some(120_000));
        assert_eq!(r.slow_connect_ms, Some(500));
        assert_eq!(r.terminate_established, None);
        assert!(PolicySpec::from_request(&r).resolve().is_ok());
    }

    #[test]
    fn presets_and_errnos_come_from_the_core_tables() {
        let refused = |args: &[&str]| {
            super::super::Cli::try_parse_from(
                ["breakwater", "policy", "set", "db"].iter().chain(args),
            )
            .unwrap_err()
            .to_string()
        };
        let e = refused(&["--errno", "EAGAIN"]);
        assert!(
            e.contains("unknown errno \"EAGAIN\" (allowed: ECONNREFUSED, EHOSTUNREACH, EPERM)"),
            "{e}"
        );
        let e = refused(&["--preset", "hystrix"]);
        assert!(
            e.contains("[possible values: gobreaker, nginx, envoy]"),
            "{e}"
        );
        let help = refused(&["--help"]);
        for (name, sets) in breaker::PRESETS {
            assert!(help.contains(name) && help.contains(sets), "{help}");
        }
    }

    #[test]
    fn destination_flags_become_the_request() {
        let r = destinations_request(
            Some("db".into()),
            Sort::Failed,
            5,
            Some(DirectionArg::Inbound),
        );
        assert_eq!(r.service, "db");
        assert_eq!(r.sort(), pb::DestinationSort::Failed);
        assert_eq!(r.limit, 5);
        assert_eq!(r.direction(), pb::Direction::Inbound);
        let r = destinations_request(None, Sort::Active, 0, None);
        assert_eq!(r.direction(), pb::Direction::Unspecified);
    }
}
