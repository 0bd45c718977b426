//! The standard services every API listener serves beside `breakwater.v1.Agent`:
//! `grpc.health.v1.Health` and server reflection (v1 and v1alpha), so that generic clients
//! (grpcurl, Kubernetes gRPC probes, grpc_health_probe) need none of our .proto files. Plus the
//! health-only listener (`--health-listen`): plain TCP, health and nothing else.

use std::future::Future;

use breakwater_proto::v1::agent_server::AgentServer;
use tonic::server::NamedService as _;
use tonic_health::{
    pb::health_server::HealthServer,
    server::{HealthReporter, HealthService},
    ServingStatus,
};

/// The Agent service's name as health checks ask for it: "breakwater.v1.Agent".
pub const AGENT_SERVICE: &str = AgentServer::<super::AgentService>::NAME;

/// The statuses every health service of the agent answers from: "" (the whole agent) and
/// [`AGENT_SERVICE`]. NOT_SERVING until [`Health::set_serving`] (the programs are attached),
/// and again once the agent is shutting down.
#[derive(Clone, Debug)]
pub struct Health {
    reporter: HealthReporter,
}

impl Health {
    pub async fn new() -> Self {
        let health = Self {
            reporter: HealthReporter::new(),
        };
        health.set_serving(false).await;
        health
    }

    /// Sets both statuses; `Watch` callers are told of the change.
    pub async fn set_serving(&self, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for name in ["", AGENT_SERVICE] {
            self.reporter.set_service_status(name, status).await;
        }
    }

    /// This kernel cannot run the agent and it waits to be stopped
    /// (`--on-unsupported-kernel=wait`): the process is alive ("" SERVING: liveness passes) but
    /// the API is not ([`AGENT_SERVICE`] NOT_SERVING: never ready).
    pub async fn set_unsupported(&self) {
        self.reporter
            .set_service_status("", ServingStatus::Serving)
            .await;
        self.reporter
            .set_service_status(AGENT_SERVICE, ServingStatus::NotServing)
            .await;
    }

    /// A `grpc.health.v1.Health` service over these statuses (one per listener; all share them).
    pub fn service(&self) -> HealthServer<HealthService> {
        HealthServer::new(HealthService::from_health_reporter(self.reporter.clone()))
    }
}

/// Server reflection over our descriptor set and the health service's: `grpc.reflection.v1`
/// and the older `v1alpha` that many clients still ask for.
pub fn reflection() -> (
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
) {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(breakwater_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // Both sets are compiled in and checked by tests: they always decode.
    (
        builder()
            .build_v1()
            .expect("the embedded descriptor sets decode"),
        builder()
            .build_v1alpha()
            .expect("the embedded descriptor sets decode"),
    )
}

/// Serves `grpc.health.v1.Health` alone on plain TCP until `shutdown` completes: no data and
/// no changes, so it may be exposed where probes come from (they cannot do mTLS).
pub async fn serve_health_only(
    incoming: impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> + Send + 'static,
    health: Health,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(health.service())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic_health::pb::{
        health_check_response::ServingStatus as PbStatus, health_client::HealthClient,
        HealthCheckRequest,
    };

    #[tokio::test]
    async fn statuses_follow_the_agent_and_unknown_services_are_not_found() {
        let health = Health::new().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_health_only(
            TcpListenerStream::new(listener),
            health.clone(),
            async {
                let _ = stopped.await;
            },
        ));
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = HealthClient::new(channel.clone());
        let check = |service: &str| HealthCheckRequest {
            service: service.into(),
        };
        for serving in [false, true, false] {
            health.set_serving(serving).await;
            for name in ["", "breakwater.v1.Agent"] {
                let status = client
                    .check(check(name))
                    .await
                    .unwrap()
                    .into_inner()
                    .status();
                let want = if serving {
                    PbStatus::Serving
                } else {
                    PbStatus::NotServing
                };
                assert_eq!(status, want, "{name:?}");
            }
        }
        health.set_unsupported().await;
        for (name, want) in [
            ("", PbStatus::Serving),
            ("breakwater.v1.Agent", PbStatus::NotServing),
        ] {
            let status = client
                .check(check(name))
                .await
                .unwrap()
                .into_inner()
                .status();
            assert_eq!(status, want, "unsupported kernel: {name:?}");
        }
        let err = client.check(check("nope.v1.X")).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
        // Only health is served here.
        let mut agent = breakwater_proto::v1::agent_client::AgentClient::new(channel);
        let err = agent
            .list_services(breakwater_proto::v1::ListServicesRequest {})
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unimplemented);
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    #[test]
    fn reflection_builds_from_the_embedded_descriptor_sets() {
        let _ = reflection();
    }
}
