//! The `breakwater.v1.Agent` gRPC service: each call reads its request into the core's types
//! ([`convert`]), asks the core, and answers with its result as a message; a domain error
//! becomes a status with its code here ([`From<Error> for Status`]), and nowhere else.

pub mod authz;
pub mod convert;
pub mod health;
pub mod serve;
#[cfg(test)]
mod tests;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Instant,
};

use breakwater_proto::v1::{self as pb, agent_server::Agent};
use futures::StreamExt as _;
use tonic::{Code, Request, Response, Status};
use tracing::info;

use crate::{
    core::{
        aggregate::{latency_kinds, DestinationQuery, LatencyOf},
        listing::ConnectionList,
        owners::Owner,
        policy::{self, PolicySpec},
        reload::Reloaded,
        Core,
    },
    error::{Error, Result},
};

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::FeatureOff(_) | Error::Owned(_) => Code::FailedPrecondition,
            Error::Map { .. } | Error::Internal(_) => Code::Internal,
        };
        let mut status = Status::new(code, e.to_string());
        if let Error::Owned(_) = e {
            // A refusal of the caller's change, as InvalidArgument is, though the request was
            // well formed: the CLI exits 2 for it.
            status
                .metadata_mut()
                .insert(REFUSED_METADATA, "owner".parse().expect("ascii"));
        }
        status
    }
}

/// Metadata on a status that refused a change because another source owns the object.
pub const REFUSED_METADATA: &str = "breakwater-refused";

/// Reloads the config (`ReloadConfig`, SIGHUP): the core applies it, who may change state is
/// updated here, where calls are let through, and `remote`'s listeners and TLS files (the
/// API's, the etcd client's) as the file says. Everything is checked first (the new file, the
/// TLS files read and built, new addresses bound): if anything cannot be applied, nothing is.
pub fn reload(
    core: &mut Core,
    authz: &authz::Authz,
    remote: Option<&serve::Remote>,
) -> Result<Reloaded> {
    let (path, next) = core.next_config()?;
    let change = remote.map(|r| r.prepare(&next)).transpose().map_err(|e| {
        Error::invalid(format!(
            "{}: {}; the running config stays",
            path.display(),
            crate::error::chain(&e)
        ))
    })?;
    let own = remote.zip(change.as_ref()).map(|(r, c)| r.own(Some(c)));
    let mut reloaded = core.reload_to(&path, next, own)?;
    if let (Some(remote), Some(change)) = (remote, change) {
        reloaded.applied = serve::Remote::describe(&change);
        remote
            .commit(change)
            .map_err(|e| Error::Internal(crate::error::chain(&e)))?;
    }
    if let Some(a) = &reloaded.authz {
        authz.update(a);
        info!(authz = ?a, "authorization updated");
    }
    Ok(reloaded)
}

pub struct AgentService {
    core: Arc<Mutex<Core>>,
    authz: authz::Authz,
    started: Instant,
    host_netns: u32,
    config_path: Option<PathBuf>,
    remote: Option<Arc<serve::Remote>>,
}

impl AgentService {
    pub fn new(
        core: Arc<Mutex<Core>>,
        authz: authz::Authz,
        host_netns: u32,
        config_path: Option<PathBuf>,
    ) -> Self {
        Self {
            core,
            authz,
            started: Instant::now(),
            host_netns,
            config_path,
            remote: None,
        }
    }

    /// With the TCP listeners and TLS files that `ReloadConfig` changes too.
    pub fn with_remote(mut self, remote: Arc<serve::Remote>) -> Self {
        self.remote = Some(remote);
        self
    }

    /// Runs `f` on the core off the async workers (map walks are syscalls).
    async fn with_core<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Core) -> Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        let core = self.core.clone();
        tokio::task::spawn_blocking(move || {
            let mut core = core
                .lock()
                .map_err(|_| Error::Internal("core lock poisoned".into()))?;
            f(&mut core)
        })
        .await
        .map_err(|e| Status::internal(format!("worker failed: {e}")))?
        .map_err(Status::from)
    }
}

/// Returns freed heap memory to the system: after start-up and after answers that built large
/// messages, so the agent's RSS reflects what it holds, not what it once held.
pub fn trim_heap() {
    // SAFETY: malloc_trim only releases free memory at the top of glibc's heaps.
    unsafe { libc::malloc_trim(0) };
}

/// [`trim_heap`] in a while, when the answer being sent is gone.
fn trim_heap_soon() {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            trim_heap();
        });
    }
}

/// A server stream of messages as the API sends them.
pub type EventStream<M> = std::pin::Pin<Box<dyn futures::Stream<Item = Result<M, Status>> + Send>>;

/// Connections per `StreamConnections` message. A connection encodes to at most ~250 bytes
/// (addresses, a 63-byte service name, 16 bytes of comm), so a message stays far below gRPC's
/// default 4 MiB limit for a client; and 1,000 are few enough to build at once on an async
/// worker (well under a millisecond).
pub const CONNECTIONS_PER_MESSAGE: usize = 1000;

/// A listing's `StreamConnections` messages, each built when the stream is polled for it:
/// hyper polls for the next one only once HTTP/2 flow control has taken the previous one, so a
/// slow client holds the building back. What the agent holds encoded is bounded by the client's
/// stream window (2 MiB for tonic's defaults) and a message, not by the listing.
struct ConnectionChunks {
    list: ConnectionList,
    at: usize,
}

impl Iterator for ConnectionChunks {
    type Item = pb::StreamConnectionsResponse;

    fn next(&mut self) -> Option<Self::Item> {
        let end = (self.at + CONNECTIONS_PER_MESSAGE).min(self.list.len());
        if self.at == end {
            return None;
        }
        let connections = (self.at..end)
            .filter_map(|i| self.list.get(i))
            .map(|c| convert::connection_message(&c))
            .collect();
        self.at = end;
        Some(pb::StreamConnectionsResponse { connections })
    }
}

impl Drop for ConnectionChunks {
    fn drop(&mut self) {
        // Ended, or the client went away: the rows go now.
        if self.list.len() > CONNECTIONS_PER_MESSAGE {
            trim_heap_soon();
        }
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    type WatchBreakerEventsStream = EventStream<pb::BreakerEvent>;
    type WatchConnectionsStream = EventStream<pb::ConnectionEvent>;
    type StreamConnectionsStream = EventStream<pb::StreamConnectionsResponse>;

    async fn reload_config(
        &self,
        _: Request<pb::ReloadConfigRequest>,
    ) -> Result<Response<pb::ReloadConfigResponse>, Status> {
        let authz = self.authz.clone();
        let remote = self.remote.clone();
        let reloaded = self
            .with_core(move |core| reload(core, &authz, remote.as_deref()))
            .await?;
        Ok(Response::new(convert::reload_response(reloaded)))
    }

    async fn watch_connections(
        &self,
        request: Request<pb::WatchConnectionsRequest>,
    ) -> Result<Response<Self::WatchConnectionsStream>, Status> {
        let service = request.into_inner().service;
        // Subscribe under the lock, then let it go: the stream never holds it.
        let events = self
            .with_core(move |core| core.watch_connections(&service))
            .await?;
        Ok(Response::new(Box::pin(events.stream().map(|(e, lost)| {
            Ok(convert::connection_event_message(&e, lost))
        }))))
    }

    async fn list_breakers(
        &self,
        _: Request<pb::ListBreakersRequest>,
    ) -> Result<Response<pb::ListBreakersResponse>, Status> {
        let breakers = self.with_core(|core| core.breakers()).await?;
        Ok(Response::new(pb::ListBreakersResponse {
            breakers: breakers.iter().map(convert::breaker_message).collect(),
        }))
    }

    async fn get_breaker(
        &self,
        request: Request<pb::GetBreakerRequest>,
    ) -> Result<Response<pb::GetBreakerResponse>, Status> {
        let service = request.into_inner().service;
        let b = self.with_core(move |core| core.breaker(&service)).await?;
        Ok(Response::new(pb::GetBreakerResponse {
            breaker: Some(convert::breaker_message(&b)),
        }))
    }

    async fn set_policy(
        &self,
        request: Request<pb::SetPolicyRequest>,
    ) -> Result<Response<pb::SetPolicyResponse>, Status> {
        let req = request.into_inner();
        // A bad policy is refused before anything is touched.
        let spec = PolicySpec::from_request(&req);
        let policy = spec.rules()?;
        let quorum = spec.quorum()?;
        // The core logs every change it makes.
        let b = self
            .with_core(move |core| {
                if quorum.is_some() {
                    core.require_fleet()?;
                }
                core.set_policy(Owner::Local, &req.service, policy)?;
                core.set_quorum(Owner::Local, &req.service, quorum)?;
                core.breaker(&req.service)
            })
            .await?;
        Ok(Response::new(pb::SetPolicyResponse {
            breaker: Some(convert::breaker_message(&b)),
        }))
    }

    async fn clear_policy(
        &self,
        request: Request<pb::ClearPolicyRequest>,
    ) -> Result<Response<pb::ClearPolicyResponse>, Status> {
        let service = request.into_inner().service;
        self.with_core(move |core| core.clear_policy(Owner::Local, &service))
            .await?;
        Ok(Response::new(pb::ClearPolicyResponse {}))
    }

    async fn trip(
        &self,
        request: Request<pb::TripRequest>,
    ) -> Result<Response<pb::TripResponse>, Status> {
        let req = request.into_inner();
        let ttl = policy::trip_ttl(req.ttl_ms)?;
        let destination = convert::destination_field(&req.destination)?;
        let (b, termination) = self
            .with_core(move |core| match destination {
                Some(d) => core.trip_destination(Owner::Local, &req.service, d, ttl, &req.reason),
                None => core.trip(Owner::Local, &req.service, ttl, &req.reason),
            })
            .await?;
        Ok(Response::new(pb::TripResponse {
            breaker: Some(convert::breaker_message(&b)),
            terminated: termination.terminated as u64,
            not_terminated: termination.not_terminated,
        }))
    }

    async fn reset(
        &self,
        request: Request<pb::ResetRequest>,
    ) -> Result<Response<pb::ResetResponse>, Status> {
        let req = request.into_inner();
        let destination = convert::destination_field(&req.destination)?;
        let b = self
            .with_core(move |core| match destination {
                Some(d) => core.reset_destination(&req.service, d),
                None => core.reset(&req.service),
            })
            .await?;
        Ok(Response::new(pb::ResetResponse {
            breaker: Some(convert::breaker_message(&b)),
        }))
    }

    async fn watch_breaker_events(
        &self,
        request: Request<pb::WatchBreakerEventsRequest>,
    ) -> Result<Response<Self::WatchBreakerEventsStream>, Status> {
        let service = request.into_inner().service;
        // Subscribe under the lock, then let it go: the stream never holds it.
        let events = self
            .with_core(move |core| core.watch_breakers(&service))
            .await?;
        Ok(Response::new(Box::pin(
            events
                .stream()
                .map(|(e, lost)| Ok(convert::event_message(&e, lost))),
        )))
    }

    async fn list_services(
        &self,
        _: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        let services = self
            .with_core(|core| core.map_service_summaries(|s| convert::service_message(&s)))
            .await?;
        Ok(Response::new(pb::ListServicesResponse { services }))
    }

    async fn list_destinations(
        &self,
        request: Request<pb::ListDestinationsRequest>,
    ) -> Result<Response<pb::ListDestinationsResponse>, Status> {
        let req = request.into_inner();
        let query = DestinationQuery {
            sort: convert::destination_sort(req.sort)?,
            direction: convert::direction_filter(req.direction)?,
            service: req.service,
            limit: req.limit,
        };
        let destinations = self
            .with_core(move |core| core.destinations(&query))
            .await?;
        Ok(Response::new(pb::ListDestinationsResponse {
            destinations: destinations
                .iter()
                .map(convert::destination_message)
                .collect(),
        }))
    }

    async fn list_connections(
        &self,
        request: Request<pb::ListConnectionsRequest>,
    ) -> Result<Response<pb::ListConnectionsResponse>, Status> {
        let req = request.into_inner();
        let list = self
            .with_core(move |core| core.connections(&req.service, req.limit))
            .await?;
        let connections = list
            .iter()
            .map(|c| convert::connection_message(&c))
            .collect();
        drop(list);
        // The response is encoded and freed after we return: trim once it is gone.
        trim_heap_soon();
        Ok(Response::new(pb::ListConnectionsResponse { connections }))
    }

    async fn stream_connections(
        &self,
        request: Request<pb::StreamConnectionsRequest>,
    ) -> Result<Response<Self::StreamConnectionsStream>, Status> {
        let req = request.into_inner();
        // The rows are copied under the lock; the messages are built from the copy as the
        // client reads them, so that a slow client holds neither the lock nor the answer.
        let list = self
            .with_core(move |core| core.connections(&req.service, req.limit))
            .await?;
        Ok(Response::new(Box::pin(futures::stream::iter(
            ConnectionChunks { list, at: 0 }.map(Ok),
        ))))
    }

    async fn put_service(
        &self,
        request: Request<pb::PutServiceRequest>,
    ) -> Result<Response<pb::PutServiceResponse>, Status> {
        let req = request.into_inner();
        let (service, replaced) = self
            .with_core(move |core| {
                let (svc, replaced) = core.put_service(Owner::Local, &req.name, &req.endpoints)?;
                info!(service = %svc.name, endpoints = svc.endpoints.len(), replaced, "service put");
                Ok((core.service_summary(&svc)?, replaced))
            })
            .await?;
        Ok(Response::new(pb::PutServiceResponse {
            service: Some(convert::service_message(&service)),
            replaced,
        }))
    }

    async fn delete_service(
        &self,
        request: Request<pb::DeleteServiceRequest>,
    ) -> Result<Response<pb::DeleteServiceResponse>, Status> {
        let req = request.into_inner();
        self.with_core(move |core| {
            core.delete_service(Owner::Local, &req.name)?;
            info!(service = %req.name, "service deleted");
            Ok(())
        })
        .await?;
        Ok(Response::new(pb::DeleteServiceResponse {}))
    }

    async fn get_time_wait(
        &self,
        request: Request<pb::GetTimeWaitRequest>,
    ) -> Result<Response<pb::GetTimeWaitResponse>, Status> {
        let limit = request.into_inner().limit;
        let view = self.with_core(move |core| core.time_wait(limit)).await?;
        Ok(Response::new(convert::time_wait_response(&view)))
    }

    async fn get_latency(
        &self,
        request: Request<pb::GetLatencyRequest>,
    ) -> Result<Response<pb::GetLatencyResponse>, Status> {
        let req = request.into_inner();
        let of = LatencyOf::parse(&req.service, &req.destination, req.netns)?;
        let kinds = latency_kinds(&req.kinds)?;
        let named = !req.kinds.is_empty();
        let latency = self
            .with_core(move |core| core.latency(&of, &kinds, named))
            .await?;
        Ok(Response::new(convert::latency_response(&latency)))
    }

    async fn advise(
        &self,
        _: Request<pb::AdviseRequest>,
    ) -> Result<Response<pb::AdviseResponse>, Status> {
        let advice = self.with_core(|core| core.advise()).await?;
        Ok(Response::new(convert::advise_response(&advice)))
    }

    async fn get_agent_info(
        &self,
        _: Request<pb::GetAgentInfoRequest>,
    ) -> Result<Response<pb::GetAgentInfoResponse>, Status> {
        let state = self.with_core(|core| Ok(core.agent_state())).await?;
        let kernel = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Response::new(convert::agent_info(
            state,
            pb::GetAgentInfoResponse {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                kernel,
                uptime_ms: self.started.elapsed().as_millis() as u64,
                host_netns: self.host_netns,
                config_path: self
                    .config_path
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                ..Default::default()
            },
        )))
    }
}
