//! The client commands: one RPC each, printed as a table or as the response's JSON.

use std::path::PathBuf;

use breakwater_proto::v1::{self as pb, agent_client::AgentClient};
use hyper_util::rt::TokioIo;
use tonic::{
    transport::{Channel, Endpoint, Uri},
    Code,
};
use tower::service_fn;

use super::{output, CliError, Command, DirectionArg, Output, ServiceCommand, Sort};
use crate::service::parse_endpoints;

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

pub async fn run(agent: &str, format: Output, command: Command) -> Result<(), CliError> {
    // Check what can be checked here first, so that bad input gets exit code 2 even when
    // the agent is not running.
    if let Command::Service(ServiceCommand::Put { name, endpoints }) = &command {
        parse_endpoints(name, endpoints)?;
    }
    let mut client = connect(agent).await?;
    match command {
        Command::Agent(_) => unreachable!("handled by the caller"),
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

#[cfg(test)]
mod tests {
    use super::*;

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
