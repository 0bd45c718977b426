//! The `breakwater.v1.Agent` gRPC service: a thin layer over the domain core and the kernel maps.

pub mod audit;
pub mod authz;
pub mod convert;
pub mod enforce;
pub mod health;
pub mod reload;
pub mod serve;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Instant,
};

use breakwater_common::{direction, hist_kind, tcp_state, ConnRecord, ConnStats, DestKey};
use breakwater_proto::v1::{self as pb, agent_server::Agent};
use tonic::{Request, Response, Status};
use tracing::info;

use crate::{
    clock::monotonic_ns,
    core::{
        advise,
        counters::conn_counters,
        features::{Feature, FeatureState, Status as FeatureStatus},
        latency,
        policy::{self as breaker, PolicySpec},
        service::Endpoint,
        service::{display_addr, parse_endpoints, Service, ServiceTable},
        timewait::{self, Level},
    },
    ebpf::Kernel,
    error::{Error, Result},
};

/// What the API serves from: the kernel side and the service table, changed together.
pub struct Core {
    pub kernel: Kernel,
    pub services: ServiceTable,
    pub rates: RateWindow,
    /// Breaker state changes, fanned out to `WatchBreakerEvents` subscribers.
    pub events: tokio::sync::broadcast::Sender<enforce::BreakerEventView>,
    /// Connection events, fanned out to `WatchConnections` subscribers.
    pub audit: tokio::sync::broadcast::Sender<pb::ConnectionEvent>,
    pub cgroups: audit::CgroupPaths,
    /// The config last applied (at start or by a reload): a reload applies the difference.
    pub config: crate::config::Config,
    pub config_path: Option<PathBuf>,
    pub overrides: reload::Overrides,
    /// Who may change state; a reload updates it in place.
    pub authz: authz::Authz,
}

/// Counters whose per-second rates the agent reports.
#[derive(Clone, Copy)]
pub enum Rate {
    Opened = 0,
    TimeWaitEntered = 1,
}

impl Rate {
    fn of(self, s: &ConnStats) -> u64 {
        match self {
            Rate::Opened => s.opened,
            Rate::TimeWaitEntered => s.time_wait_entered,
        }
    }
}

/// Recent snapshots of every destination's rate counters.
pub struct RateWindow {
    started: Instant,
    snapshots: std::collections::VecDeque<(Instant, HashMap<DestKey, [u64; 2]>)>,
}

impl Default for RateWindow {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            snapshots: Default::default(),
        }
    }
}

impl RateWindow {
    /// Snapshots kept: one a `SAMPLE_EVERY`, a minute's worth.
    const KEEP: usize = 6;
    pub const SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

    /// Per second for each destination, over the oldest snapshot kept (or since the agent
    /// started).
    fn rates(&self, now: &[(DestKey, ConnStats)], rate: Rate) -> HashMap<DestKey, f64> {
        let (since, base) = match self.snapshots.front() {
            Some((t, base)) => (*t, Some(base)),
            None => (self.started, None),
        };
        let secs = since.elapsed().as_secs_f64().max(1.0);
        now.iter()
            .map(|(k, s)| {
                let before = base.and_then(|b| b.get(k)).map_or(0, |v| v[rate as usize]);
                (*k, rate.of(s).saturating_sub(before) as f64 / secs)
            })
            .collect()
    }
}

impl Core {
    /// Takes a snapshot of every destination's rate counters (the agent calls it periodically).
    pub fn sample(&mut self) {
        let snap = self
            .kernel
            .destinations()
            .into_iter()
            .map(|(k, s)| (k, [s.opened, s.time_wait_entered]))
            .collect();
        self.rates.snapshots.push_back((Instant::now(), snap));
        while self.rates.snapshots.len() > RateWindow::KEEP {
            self.rates.snapshots.pop_front();
        }
    }

    /// The advisor's findings and what it looked at.
    pub fn advise(&mut self) -> Result<pb::AdviseResponse> {
        let walked = self.kernel.sockets()?;
        let report = timewait::analyze(&walked);
        let views: Vec<advise::NsView> = walked
            .iter()
            .map(|(ns, socks, settings)| advise::NsView::new(*ns, socks, *settings))
            .collect();
        let dests = self.kernel.destinations();
        let rates = self.rates.rates(&dests, Rate::Opened);
        let lifetimes = self.kernel.histograms_by_destination(hist_kind::LIFETIME);
        let service_name = |addr: &[u8; 16], port: u16| {
            self.services
                .match_endpoint(addr, port)
                .map(|s| s.name.clone())
                .unwrap_or_default()
        };
        let churn: Vec<advise::ChurnSample> = dests
            .iter()
            .filter(|(k, _)| rates.get(k).copied().unwrap_or(0.0) >= advise::CHURN_MIN_RATE)
            .filter_map(|(k, _)| {
                let life = latency::summarize(lifetimes.get(k)?);
                Some(advise::ChurnSample {
                    netns: k.netns,
                    addr: k.addr,
                    port: k.port,
                    direction: k.direction,
                    service: service_name(&k.addr, k.port),
                    opened_per_s: rates[k],
                    median_lifetime_us: life.p50,
                    samples: life.count,
                })
            })
            .collect();
        let file_max = std::fs::read_to_string("/proc/sys/fs/file-max")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let findings = advise::advise(&views, &report, &churn, service_name, file_max);
        Ok(pb::AdviseResponse {
            findings: findings
                .into_iter()
                .map(|f| pb::Finding {
                    kind: f.kind.to_owned(),
                    severity: match f.severity {
                        advise::Severity::Info => pb::Severity::Info,
                        advise::Severity::Warn => pb::Severity::Warn,
                        advise::Severity::Critical => pb::Severity::Critical,
                    }
                    .into(),
                    netns: f.netns,
                    subject: f.subject,
                    evidence: f.evidence,
                    recommendation: f.recommendation,
                })
                .collect(),
            namespaces: views
                .iter()
                .map(|v| pb::NamespaceSettings {
                    netns: v.netns,
                    tcp_tw_reuse: v.settings.tcp_tw_reuse.into(),
                    port_range_low: v.settings.port_range.0.into(),
                    port_range_high: v.settings.port_range.1.into(),
                    somaxconn: v.settings.somaxconn,
                    tcp_max_tw_buckets: v.settings.tcp_max_tw_buckets,
                    tcp_fin_timeout: v.settings.tcp_fin_timeout,
                    listen_overflows: v.settings.listen_overflows,
                    listen_drops: v.settings.listen_drops,
                    sockets: v.sockets,
                    time_wait: v.time_wait,
                    fin_wait2: v.fin_wait2,
                })
                .collect(),
            file_max,
        })
    }

    /// Applies the config over what a previous agent left pinned (at start, before seeding):
    /// its services are put, and its breaker policies set where they differ from the pinned
    /// ones (an unchanged policy keeps the breaker's state across the restart).
    pub fn apply_config(&mut self, config: &crate::config::Config) -> Result<()> {
        for s in &config.services {
            self.put_service(&s.name, &s.endpoints)?;
        }
        for (name, policy) in config.policies()? {
            let id = self.services.require(&name)?.id;
            let enabled = breakwater_common::breaker::Policy {
                flags: policy.flags | breakwater_common::breaker::policy_flags::ENABLED,
                ..policy
            };
            if self.kernel.policy(id)? != enabled {
                self.set_policy(&name, enabled)?;
            }
        }
        Ok(())
    }

    pub fn put_service(&mut self, name: &str, endpoints: &[String]) -> Result<(Service, bool)> {
        let endpoints = parse_endpoints(name, endpoints)?;
        // Validate against a copy: on any error the live table and the kernel stay as they were.
        let mut next = ServiceTable::clone(&self.services);
        let change = next.put(name, endpoints)?;
        if change.created {
            self.kernel.reset_service_stats(change.id)?;
            self.kernel.clear_breaker(change.id)?;
            self.kernel.set_service_meta(change.id, name, "")?;
        }
        self.kernel.put_endpoints(change.id, &change.added)?;
        self.kernel.remove_endpoints(&change.removed)?;
        self.services = next;
        let svc = self.services.get(name).expect("just put").clone();
        Ok((svc, change.replaced))
    }

    pub fn delete_service(&mut self, name: &str) -> Result<()> {
        let svc = self.services.require(name)?.clone();
        self.kernel.remove_endpoints(&svc.endpoints)?;
        self.kernel.reset_service_stats(svc.id)?;
        self.kernel.clear_breaker(svc.id)?;
        self.services.delete(name)?;
        Ok(())
    }
}

pub struct AgentService {
    core: Arc<Mutex<Core>>,
    started: Instant,
    host_netns: u32,
    config_path: Option<PathBuf>,
}

impl AgentService {
    pub fn new(core: Arc<Mutex<Core>>, host_netns: u32, config_path: Option<PathBuf>) -> Self {
        Self {
            core,
            started: Instant::now(),
            host_netns,
            config_path,
        }
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

fn counts(s: &ConnStats) -> pb::ConnCounts {
    conn_counters!(literal pb::ConnCounts, s)
}

fn pb_direction(d: u8) -> pb::Direction {
    if d == direction::INBOUND {
        pb::Direction::Inbound
    } else {
        pb::Direction::Outbound
    }
}

fn service_message(core: &Core, s: &Service) -> Result<pb::Service> {
    let connect = latency::summarize(&core.kernel.service_histogram(s.id, hist_kind::CONNECT)?);
    Ok(pb::Service {
        connect_p50_us: connect.p50,
        connect_p99_us: connect.p99,
        name: s.name.clone(),
        endpoints: s.endpoints.iter().map(ToString::to_string).collect(),
        outbound: Some(counts(
            &core.kernel.service_stats(s.id, direction::OUTBOUND)?,
        )),
        inbound: Some(counts(
            &core.kernel.service_stats(s.id, direction::INBOUND)?,
        )),
    })
}

fn destination_message(services: &ServiceTable, k: &DestKey, s: &ConnStats) -> pb::Destination {
    conn_counters!(literal pb::Destination, s,
        address: display_addr(&k.addr).to_string(),
        port: k.port.into(),
        service: services
            .match_endpoint(&k.addr, k.port)
            .map(|s| s.name.clone())
            .unwrap_or_default(),
        direction: pb_direction(k.direction).into(),
        netns: k.netns,
    )
}

fn connection_message(services: &ServiceTable, r: &ConnRecord, now_ns: u64) -> pb::Connection {
    let c = &r.info;
    let (addr, port) = if c.direction == direction::INBOUND {
        (&c.saddr, c.sport)
    } else {
        (&c.daddr, c.dport)
    };
    let comm_len = c.comm.iter().position(|&b| b == 0).unwrap_or(c.comm.len());
    pb::Connection {
        local_address: display_addr(&c.saddr).to_string(),
        local_port: c.sport.into(),
        remote_address: display_addr(&c.daddr).to_string(),
        remote_port: c.dport.into(),
        direction: pb_direction(c.direction).into(),
        state: tcp_state::name(r.state as u8).to_owned(),
        netns: c.netns,
        pid: c.pid,
        comm: String::from_utf8_lossy(&c.comm[..comm_len]).into_owned(),
        cgroup_id: c.cgroup_id,
        service: services
            .match_endpoint(addr, port)
            .map(|s| s.name.clone())
            .unwrap_or_default(),
        age_ms: now_ns.saturating_sub(c.start_ns) / 1_000_000,
        cookie: r.cookie,
    }
}

fn direction_filter(v: i32) -> Result<Option<u8>> {
    match pb::Direction::try_from(v) {
        Ok(pb::Direction::Unspecified) => Ok(None),
        Ok(pb::Direction::Outbound) => Ok(Some(direction::OUTBOUND)),
        Ok(pb::Direction::Inbound) => Ok(Some(direction::INBOUND)),
        Err(_) => Err(Error::invalid(format!("direction: unknown value {v}"))),
    }
}

fn histogram_message(kind: u32, h: &crate::ebpf::Histogram) -> pb::Histogram {
    let s = latency::summarize(h);
    pb::Histogram {
        kind: hist_kind::NAMES[kind as usize].to_owned(),
        count: s.count,
        p50_us: s.p50,
        p90_us: s.p90,
        p99_us: s.p99,
        max_us: s.max,
        buckets: h
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(i, &count)| {
                let (low_us, high_us) = latency::bounds(i as u32);
                pb::HistogramBucket {
                    index: i as u32,
                    low_us,
                    high_us,
                    count,
                }
            })
            .collect(),
    }
}

/// A feature's state as the API reports it.
pub fn feature_message(s: &FeatureState) -> pb::Feature {
    pb::Feature {
        name: s.feature.name().to_owned(),
        status: match s.status {
            FeatureStatus::On => pb::FeatureStatus::On,
            FeatureStatus::Degraded => pb::FeatureStatus::Degraded,
            FeatureStatus::Off => pb::FeatureStatus::Off,
        }
        .into(),
        hook: s.hook.clone(),
        reason: s.reason.clone(),
    }
}

/// The histogram kinds (`hist_kind`) a `GetLatency` request names, in its order; every kind if
/// it names none.
fn latency_kinds(names: &[String]) -> Result<Vec<u32>> {
    if names.is_empty() {
        return Ok((0..hist_kind::COUNT).collect());
    }
    names
        .iter()
        .map(|name| {
            hist_kind::NAMES
                .iter()
                .position(|k| k == name)
                .map(|k| k as u32)
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "unknown latency kind {name:?} (known: {})",
                        hist_kind::NAMES.join(", ")
                    ))
                })
        })
        .collect()
}

/// What a `GetLatency` request asks for.
enum LatencyOf {
    Service(String),
    Destination {
        addr: [u8; 16],
        port: u16,
        netns: u32,
    },
}

fn latency_target(req: &pb::GetLatencyRequest) -> Result<LatencyOf> {
    match (req.service.is_empty(), req.destination.is_empty()) {
        (false, true) => Ok(LatencyOf::Service(req.service.clone())),
        (true, false) => {
            let e: Endpoint = req.destination.parse()?;
            if e.net.prefix_len() != e.net.max_prefix_len() {
                return Err(Error::invalid(format!(
                    "destination {:?} must be one address, not a network",
                    req.destination
                )));
            }
            let addr = match e.net.addr() {
                std::net::IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
                std::net::IpAddr::V6(a) => a.octets(),
            };
            Ok(LatencyOf::Destination {
                addr,
                port: e.port,
                netns: req.netns,
            })
        }
        _ => Err(Error::invalid(
            "give either a service or a destination (IP:port), not both and not neither",
        )),
    }
}

/// Returns freed heap memory to the system: after start-up and after answers that built large
/// messages, so the agent's RSS reflects what it holds, not what it once held.
pub fn trim_heap() {
    // SAFETY: malloc_trim only releases free memory at the top of glibc's heaps.
    unsafe { libc::malloc_trim(0) };
}

/// The first `limit` items; 0 means all.
fn limited<T>(mut items: Vec<T>, limit: u32) -> Vec<T> {
    if limit > 0 {
        items.truncate(limit as usize);
    }
    items
}

fn require_known(services: &ServiceTable, name: &str) -> Result<()> {
    if !name.is_empty() {
        services.require(name)?;
    }
    Ok(())
}

/// A server stream of events as the API sends them.
pub type EventStream<M> = std::pin::Pin<Box<dyn futures::Stream<Item = Result<M, Status>> + Send>>;

/// The stream `WatchBreakerEvents` answers with.
pub type BreakerEventStream = EventStream<pb::BreakerEvent>;

/// Events from `rx` (only `service`'s, unless empty) as messages, each with the number this
/// subscriber lost just before it.
pub fn filtered_events<E, M>(
    rx: tokio::sync::broadcast::Receiver<E>,
    service: String,
    service_of: fn(&E) -> &str,
    message: fn(E, u64) -> M,
) -> EventStream<M>
where
    E: Clone + Send + 'static,
    M: Send + 'static,
{
    use tokio::sync::broadcast::error::RecvError;
    Box::pin(futures::stream::unfold(rx, move |mut rx| {
        let service = service.clone();
        async move {
            let mut lost = 0;
            loop {
                match rx.recv().await {
                    Ok(e) if service.is_empty() || service_of(&e) == service => {
                        return Some((Ok(message(e, lost)), rx));
                    }
                    Ok(_) => {}
                    // Lost events may have been any service's: count them all.
                    Err(RecvError::Lagged(n)) => lost += n,
                    Err(RecvError::Closed) => return None,
                }
            }
        }
    }))
}

fn breaker_events(
    rx: tokio::sync::broadcast::Receiver<enforce::BreakerEventView>,
    service: String,
) -> BreakerEventStream {
    filtered_events(
        rx,
        service,
        |e| &e.service,
        |e, lost| convert::event_message(&e, lost),
    )
}

#[tonic::async_trait]
impl Agent for AgentService {
    type WatchBreakerEventsStream = BreakerEventStream;
    type WatchConnectionsStream = audit::ConnectionEventStream;

    async fn reload_config(
        &self,
        _: Request<pb::ReloadConfigRequest>,
    ) -> Result<Response<pb::ReloadConfigResponse>, Status> {
        let changes = self.with_core(|core| core.reload()).await?;
        Ok(Response::new(changes))
    }

    async fn watch_connections(
        &self,
        request: Request<pb::WatchConnectionsRequest>,
    ) -> Result<Response<Self::WatchConnectionsStream>, Status> {
        let service = request.into_inner().service;
        let filter = service.clone();
        let rx = self
            .with_core(move |core| {
                core.kernel.features().require(Feature::AuditStream)?;
                require_known(&core.services, &filter)?;
                core.kernel.set_audit(true)?;
                Ok(core.audit.subscribe())
            })
            .await?;
        Ok(Response::new(audit::connection_events(rx, service)))
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
        let policy = PolicySpec::from_request(&req).resolve()?;
        // The core logs every change it makes.
        let b = self
            .with_core(move |core| core.set_policy(&req.service, policy))
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
        self.with_core(move |core| core.clear_policy(&service))
            .await?;
        Ok(Response::new(pb::ClearPolicyResponse {}))
    }

    async fn trip(
        &self,
        request: Request<pb::TripRequest>,
    ) -> Result<Response<pb::TripResponse>, Status> {
        let req = request.into_inner();
        let ttl = breaker::trip_ttl(req.ttl_ms)?;
        breaker::check_reason(&req.reason)?;
        let (b, termination) = self
            .with_core(move |core| core.trip(&req.service, ttl, &req.reason))
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
        let service = request.into_inner().service;
        let b = self.with_core(move |core| core.reset(&service)).await?;
        Ok(Response::new(pb::ResetResponse {
            breaker: Some(convert::breaker_message(&b)),
        }))
    }

    async fn watch_breaker_events(
        &self,
        request: Request<pb::WatchBreakerEventsRequest>,
    ) -> Result<Response<Self::WatchBreakerEventsStream>, Status> {
        let service = request.into_inner().service;
        let filter = service.clone();
        // Subscribe under the lock, then let it go: the stream never holds it.
        let rx = self
            .with_core(move |core| {
                require_known(&core.services, &filter)?;
                Ok(core.subscribe())
            })
            .await?;
        Ok(Response::new(breaker_events(rx, service)))
    }

    async fn list_services(
        &self,
        _: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        let services = self
            .with_core(|core| {
                core.services
                    .iter()
                    .map(|s| service_message(core, s))
                    .collect::<Result<Vec<_>>>()
            })
            .await?;
        Ok(Response::new(pb::ListServicesResponse { services }))
    }

    async fn list_destinations(
        &self,
        request: Request<pb::ListDestinationsRequest>,
    ) -> Result<Response<pb::ListDestinationsResponse>, Status> {
        let req = request.into_inner();
        let sort = pb::DestinationSort::try_from(req.sort)
            .map_err(|_| Error::invalid(format!("sort: unknown value {}", req.sort)))?;
        let dir = direction_filter(req.direction)?;
        let destinations = self
            .with_core(move |core| {
                require_known(&core.services, &req.service)?;
                let mut out: Vec<pb::Destination> = core
                    .kernel
                    .destinations()
                    .iter()
                    .filter(|(k, _)| dir.is_none_or(|d| d == k.direction))
                    .map(|(k, s)| destination_message(&core.services, k, s))
                    .filter(|d| req.service.is_empty() || d.service == req.service)
                    .collect();
                let key = |d: &pb::Destination| match sort {
                    pb::DestinationSort::Opened => d.opened,
                    pb::DestinationSort::Failed => {
                        d.failed_refused + d.failed_timeout + d.failed_other
                    }
                    pb::DestinationSort::Active | pb::DestinationSort::Unspecified => d.active,
                };
                out.sort_by(|a, b| {
                    key(b)
                        .cmp(&key(a))
                        .then_with(|| (&a.address, a.port).cmp(&(&b.address, b.port)))
                });
                Ok(limited(out, req.limit))
            })
            .await?;
        Ok(Response::new(pb::ListDestinationsResponse { destinations }))
    }

    async fn list_connections(
        &self,
        request: Request<pb::ListConnectionsRequest>,
    ) -> Result<Response<pb::ListConnectionsResponse>, Status> {
        let req = request.into_inner();
        let connections = self
            .with_core(move |core| {
                require_known(&core.services, &req.service)?;
                let now = monotonic_ns();
                let mut out: Vec<pb::Connection> = Vec::with_capacity(1024);
                let services = &core.services;
                core.kernel.for_each_connection(|r| {
                    let c = connection_message(services, r, now);
                    if req.service.is_empty() || c.service == req.service {
                        out.push(c);
                    }
                })?;
                out.sort_by(|a, b| b.age_ms.cmp(&a.age_ms).then(a.cookie.cmp(&b.cookie)));
                Ok(limited(out, req.limit))
            })
            .await?;
        // The response is encoded and freed after we return: trim once it is gone.
        tokio::spawn(async {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            trim_heap();
        });
        Ok(Response::new(pb::ListConnectionsResponse { connections }))
    }

    async fn put_service(
        &self,
        request: Request<pb::PutServiceRequest>,
    ) -> Result<Response<pb::PutServiceResponse>, Status> {
        let req = request.into_inner();
        let (service, replaced) = self
            .with_core(move |core| {
                let (svc, replaced) = core.put_service(&req.name, &req.endpoints)?;
                info!(service = %svc.name, endpoints = svc.endpoints.len(), replaced, "service put");
                Ok((service_message(core, &svc)?, replaced))
            })
            .await?;
        Ok(Response::new(pb::PutServiceResponse {
            service: Some(service),
            replaced,
        }))
    }

    async fn delete_service(
        &self,
        request: Request<pb::DeleteServiceRequest>,
    ) -> Result<Response<pb::DeleteServiceResponse>, Status> {
        let req = request.into_inner();
        self.with_core(move |core| {
            core.delete_service(&req.name)?;
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
        let response = self
            .with_core(move |core| {
                let report = timewait::analyze(&core.kernel.sockets()?);
                let service = |addr: &[u8; 16], port: u16| {
                    core.services
                        .match_endpoint(addr, port)
                        .map(|s| s.name.clone())
                        .unwrap_or_default()
                };
                let mut services: Vec<pb::ServiceTimeWait> = report
                    .by_service(&core.services)
                    .into_iter()
                    .map(|(service, [outbound, inbound])| pb::ServiceTimeWait {
                        service: service.to_owned(),
                        outbound,
                        inbound,
                    })
                    .collect();
                services.sort_by(|a, b| {
                    (b.outbound + b.inbound)
                        .cmp(&(a.outbound + a.inbound))
                        .then_with(|| a.service.cmp(&b.service))
                });
                let entering = core
                    .rates
                    .rates(&core.kernel.destinations(), Rate::TimeWaitEntered);
                let destinations = limited(report.time_wait, limit)
                    .iter()
                    .map(|t| pb::TimeWaitDestination {
                        entered_per_s: entering
                            .get(&DestKey {
                                addr: t.addr,
                                netns: t.netns,
                                port: t.port,
                                direction: t.direction,
                                _pad: 0,
                            })
                            .copied()
                            .unwrap_or(0.0),
                        address: display_addr(&t.addr).to_string(),
                        port: t.port.into(),
                        direction: pb_direction(t.direction).into(),
                        netns: t.netns,
                        service: service(&t.addr, t.port),
                        time_wait: t.count,
                    })
                    .collect();
                let pressure = limited(report.pressure, limit)
                    .iter()
                    .map(|p| pb::PortPressure {
                        netns: p.netns,
                        source_address: display_addr(&p.saddr).to_string(),
                        address: display_addr(&p.daddr).to_string(),
                        port: p.dport.into(),
                        service: service(&p.daddr, p.dport),
                        ports_in_use: p.in_use,
                        time_wait: p.time_wait,
                        port_range_low: p.settings.port_range.0.into(),
                        port_range_high: p.settings.port_range.1.into(),
                        ratio: p.ratio,
                        level: match p.level {
                            Level::Ok => pb::PressureLevel::Ok,
                            Level::Warn => pb::PressureLevel::Warn,
                            Level::Critical => pb::PressureLevel::Critical,
                        }
                        .into(),
                        tcp_tw_reuse: p.settings.tcp_tw_reuse.into(),
                    })
                    .collect();
                Ok(pb::GetTimeWaitResponse {
                    destinations,
                    pressure,
                    services: limited(services, limit),
                })
            })
            .await?;
        Ok(Response::new(response))
    }

    async fn get_latency(
        &self,
        request: Request<pb::GetLatencyRequest>,
    ) -> Result<Response<pb::GetLatencyResponse>, Status> {
        let req = request.into_inner();
        let target = latency_target(&req)?;
        let kinds = latency_kinds(&req.kinds)?;
        let asked = !req.kinds.is_empty();
        let (histograms, features_off) = self
            .with_core(move |core| {
                // Kinds asked for by name must be measured; with none asked for, the ones whose
                // feature is off are left out and named instead of reported as zeros.
                let features = core.kernel.features();
                let mut features_off: Vec<pb::Feature> = Vec::new();
                let mut measured = Vec::new();
                for kind in kinds {
                    let feature = Feature::of_histogram(kind);
                    match features.require(feature) {
                        Ok(()) => measured.push(kind),
                        Err(e) if asked => return Err(e),
                        Err(_) => {
                            if features_off.iter().all(|f| f.name != feature.name()) {
                                features_off.push(feature_message(features.get(feature)));
                            }
                        }
                    }
                }
                let pending = core.kernel.pending_first_responses()?;
                let histograms = measured
                    .into_iter()
                    .map(|kind| {
                        let h = match &target {
                            LatencyOf::Service(name) => {
                                let id = core.services.require(name)?.id;
                                let mut h = core.kernel.service_histogram(id, kind)?;
                                if kind == hist_kind::FIRST_RESPONSE {
                                    pending.add_service(id, &mut h);
                                }
                                h
                            }
                            LatencyOf::Destination { addr, port, netns } => {
                                let keep = |k: &DestKey| {
                                    k.addr == *addr
                                        && k.port == *port
                                        && k.direction == direction::OUTBOUND
                                        && (*netns == 0 || k.netns == *netns)
                                };
                                let mut h = core.kernel.destination_histogram(kind, keep);
                                if kind == hist_kind::FIRST_RESPONSE {
                                    pending.add_destinations(keep, &mut h);
                                }
                                h
                            }
                        };
                        Ok(histogram_message(kind, &h))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok((histograms, features_off))
            })
            .await?;
        Ok(Response::new(pb::GetLatencyResponse {
            histograms,
            features_off,
        }))
    }

    async fn advise(
        &self,
        _: Request<pb::AdviseRequest>,
    ) -> Result<Response<pb::AdviseResponse>, Status> {
        let r = self.with_core(|core| core.advise()).await?;
        Ok(Response::new(r))
    }

    async fn get_agent_info(
        &self,
        _: Request<pb::GetAgentInfoRequest>,
    ) -> Result<Response<pb::GetAgentInfoResponse>, Status> {
        let (programs, maps, counters, features) = self
            .with_core(|core| {
                let k = &core.kernel;
                let features = k.features().iter().map(feature_message).collect();
                Ok((k.programs(), k.maps(), k.counters(), features))
            })
            .await?;
        let kernel = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Response::new(pb::GetAgentInfoResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            kernel,
            uptime_ms: self.started.elapsed().as_millis() as u64,
            programs: programs
                .into_iter()
                .map(|p| pb::ProgramInfo {
                    name: p.name.to_owned(),
                    attach: p.attach,
                    id: p.id,
                    run_count: p.run_count,
                    run_time_ns: p.run_time_ns,
                    recursion_misses: p.recursion_misses,
                })
                .collect(),
            maps: maps
                .into_iter()
                .map(|m| pb::MapInfo {
                    name: m.name.to_owned(),
                    capacity: m.capacity,
                    entries: m.entries,
                    evictions: m.evictions,
                })
                .collect(),
            counters: counters
                .into_iter()
                .map(|(name, value)| pb::Counter {
                    name: name.to_owned(),
                    value,
                })
                .collect(),
            host_netns: self.host_netns,
            config_path: self
                .config_path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            features,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_requests_name_exactly_one_target() {
        let req = |service: &str, destination: &str| pb::GetLatencyRequest {
            service: service.into(),
            destination: destination.into(),
            netns: 0,
            kinds: Vec::new(),
        };
        assert!(matches!(latency_target(&req("db", "")), Ok(LatencyOf::Service(s)) if s == "db"));
        match latency_target(&req("", "[::1]:80")) {
            Ok(LatencyOf::Destination { addr, port, .. }) => {
                assert_eq!(port, 80);
                assert_eq!(addr, std::net::Ipv6Addr::LOCALHOST.octets());
            }
            _ => panic!("a destination"),
        }
        match latency_target(&req("", "10.0.0.1:80")) {
            Ok(LatencyOf::Destination { addr, .. }) => {
                assert_eq!(&addr[10..], &[0xff, 0xff, 10, 0, 0, 1])
            }
            _ => panic!("a destination"),
        }
        for (s, d, why) in [
            ("", "", "not both and not neither"),
            ("db", "10.0.0.1:80", "not both"),
            ("", "10.0.0.0/8:80", "must be one address"),
            ("", "10.0.0.1", "missing \":port\""),
        ] {
            let err = latency_target(&req(s, d)).err().expect("rejected");
            assert!(matches!(err, Error::InvalidArgument(_)));
            assert!(err.to_string().contains(why), "{err}");
        }
    }

    #[test]
    fn latency_kinds_are_named_as_the_histograms_are() {
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(latency_kinds(&[]).unwrap(), [0, 1, 2, 3]);
        assert_eq!(
            latency_kinds(&names(&["first_response", "connect"])).unwrap(),
            [hist_kind::FIRST_RESPONSE, hist_kind::CONNECT]
        );
        let err = latency_kinds(&names(&["rtt"])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown latency kind \"rtt\" (known: connect, first_response, srtt, lifetime)"
        );
        assert!(matches!(err, Error::InvalidArgument(_)));
    }

    #[test]
    fn features_keep_their_names_and_statuses() {
        let mut f = crate::core::features::Features::default();
        f.on(Feature::TcpStats, "tp_btf/inet_sock_set_state");
        f.set(
            Feature::Retransmits,
            FeatureStatus::Degraded,
            "kprobe/x",
            "no tp",
        );
        let m: Vec<_> = f.iter().map(feature_message).collect();
        assert_eq!(m.len(), Feature::ALL.len());
        let by = |name: &str| m.iter().find(|x| x.name == name).unwrap().clone();
        assert_eq!(by("tcp_stats").status(), pb::FeatureStatus::On);
        assert_eq!(by("tcp_stats").hook, "tp_btf/inet_sock_set_state");
        assert_eq!(by("retransmits").status(), pb::FeatureStatus::Degraded);
        assert_eq!(by("retransmits").reason, "no tp");
        assert_eq!(by("audit_stream").status(), pb::FeatureStatus::Off);
        let json = serde_json::to_value(by("audit_stream")).unwrap();
        assert_eq!(json["status"], "off");
    }

    #[test]
    fn enum_filters_reject_unknown_values() {
        assert_eq!(direction_filter(0).unwrap(), None);
        assert_eq!(direction_filter(2).unwrap(), Some(direction::INBOUND));
        let err = direction_filter(9).unwrap_err();
        assert_eq!(err.to_string(), "direction: unknown value 9");
        assert_eq!(Status::from(err).code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn errors_keep_their_status_codes() {
        let code = |e: Error| Status::from(e).code();
        assert_eq!(code(Error::invalid("x")), tonic::Code::InvalidArgument);
        assert_eq!(code(Error::NotFound("x".into())), tonic::Code::NotFound);
        assert_eq!(
            code(Error::ResourceExhausted("x".into())),
            tonic::Code::ResourceExhausted
        );
        assert_eq!(code(Error::Internal("x".into())), tonic::Code::Internal);
        assert_eq!(
            code(Error::FeatureOff("x".into())),
            tonic::Code::FailedPrecondition
        );
    }

    #[tokio::test]
    async fn breaker_event_streams_filter_and_count_what_was_lost() {
        use futures::StreamExt as _;
        let event = |service: &str, cause: u32| enforce::BreakerEventView {
            service: service.into(),
            from: 0,
            to: 1,
            cause,
            requests: 0,
            failures: 0,
            consecutive_failures: 0,
            time: std::time::SystemTime::now(),
            reason: String::new(),
        };
        let (tx, rx) = tokio::sync::broadcast::channel(2);
        let mut stream = breaker_events(rx, "db".into());
        for (i, s) in ["db", "web", "db", "db"].iter().enumerate() {
            tx.send(event(s, i as u32 + 1)).unwrap();
        }
        drop(tx);
        // Capacity 2: the first two were overwritten; the web one is filtered out.
        let got: Vec<_> = stream.by_ref().map(Result::unwrap).collect().await;
        assert_eq!(
            got.iter().map(|e| (e.cause, e.lost)).collect::<Vec<_>>(),
            vec![(3, 2), (4, 0)]
        );
    }

    /// The counter table and the proto agree: `ConnCounts` is the table, in its order, and so
    /// is `Destination` after its key fields.
    #[test]
    fn the_counter_table_is_the_protos() {
        use prost::Message as _;
        use prost_types::field_descriptor_proto::Type;
        let fds =
            prost_types::FileDescriptorSet::decode(breakwater_proto::FILE_DESCRIPTOR_SET).unwrap();
        let message = |name: &str| {
            fds.file
                .iter()
                .flat_map(|f| &f.message_type)
                .find(|m| m.name() == name)
                .unwrap_or_else(|| panic!("no message {name}"))
                .clone()
        };
        let table: Vec<&str> = crate::core::counters::COUNTERS
            .iter()
            .map(|c| c.name)
            .collect();
        let counters = |m: &prost_types::DescriptorProto, skip: usize| {
            m.field[skip..]
                .iter()
                .map(|f| {
                    assert_eq!(f.r#type(), Type::Uint64, "{}", f.name());
                    f.name().to_owned()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(counters(&message("ConnCounts"), 0), table);
        let destination = message("Destination");
        let keys: Vec<&str> = destination.field[..5].iter().map(|f| f.name()).collect();
        assert_eq!(keys, ["address", "port", "service", "direction", "netns"]);
        assert_eq!(counters(&destination, 5), table);
    }

    #[test]
    fn limits_of_zero_mean_all() {
        assert_eq!(limited(vec![1, 2, 3], 0), vec![1, 2, 3]);
        assert_eq!(limited(vec![1, 2, 3], 2), vec![1, 2]);
    }
}
