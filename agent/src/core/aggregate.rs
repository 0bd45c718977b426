//! What the core reports from the kernel's maps and walks: services with their counts,
//! destinations, latency histograms, TIME_WAIT and port pressure, the advisor's findings and
//! the agent's own state (live connections: [`super::listing`]). Rates (connections opened, TIME_WAIT entered
//! per second) come from snapshots the agent takes every [`RateWindow::SAMPLE_EVERY`].

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

use breakwater_common::{conn_flags, direction, hist_kind, ConnStats, DestKey, HIST_BUCKETS};

use super::{
    advise, counters,
    features::{Feature, FeatureState},
    kernel::Walked,
    owners::Owner,
    protected::protected_among,
    service::{Endpoint, Service},
    timewait::{self, Pressure, TimeWait},
    Core, Histogram, Kernel, MapSummary, ProgramSummary,
};
use crate::error::{Error, Result};

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
    snapshots: VecDeque<(Instant, HashMap<DestKey, [u64; 2]>)>,
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
    pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);

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

/// First-response samples still held by live connections (`ConnInfo::fr_count`): the
/// programs add them to the maps when a connection's buckets change or it closes, so a reader
/// adds them to what it read from the maps. Each is (destination, service, bucket, count).
#[derive(Default)]
pub struct PendingSamples(Vec<(DestKey, u32, u8, u64)>);

impl PendingSamples {
    /// Adds the samples of service `id` to `h`.
    pub fn add_service(&self, id: u32, h: &mut Histogram) {
        for (_, svc, bucket, count) in &self.0 {
            if *svc == id {
                h[usize::from(*bucket)] += count;
            }
        }
    }

    /// Adds the samples of the destinations `keep` selects to `h`.
    pub fn add_destinations(&self, keep: impl Fn(&DestKey) -> bool, h: &mut Histogram) {
        for (dest, _, bucket, count) in &self.0 {
            if keep(dest) {
                h[usize::from(*bucket)] += count;
            }
        }
    }
}

/// A service with its counts and its connect latency.
#[derive(Clone, Debug)]
pub struct ServiceSummary {
    pub service: Service,
    pub owner: Owner,
    /// The owner of the definition the fleet's hides.
    pub shadowed: Option<Owner>,
    /// Outbound, inbound.
    pub stats: [ConnStats; 2],
    pub connect: Histogram,
    /// Protected destinations its endpoints cover.
    pub protected: Vec<super::protected::Protected>,
}

/// How `destinations` orders its answer (descending).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DestinationSort {
    #[default]
    Active,
    Opened,
    /// Every reason of failure together.
    Failed,
}

/// A destination (outbound) or local endpoint (inbound) and its counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    pub key: DestKey,
    /// The service its endpoint belongs to; empty if none.
    pub service: String,
    pub stats: ConnStats,
}

/// Which destinations `destinations` answers with.
#[derive(Clone, Debug, Default)]
pub struct DestinationQuery {
    /// Only this service's; empty: all.
    pub service: String,
    /// Only this direction's.
    pub direction: Option<u8>,
    pub sort: DestinationSort,
    /// At most this many; 0: all.
    pub limit: u32,
}

/// A destination in every namespace: address, port, direction.
pub type EndpointKey = ([u8; 16], u16, u8);

/// What a latency query asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LatencyOf {
    Service(String),
    /// One address (IPv4-mapped for IPv4) and port, outbound, in one namespace or (0) all.
    Destination {
        addr: [u8; 16],
        port: u16,
        netns: u32,
    },
}

impl LatencyOf {
    /// Exactly one of a service's name and a destination ("IP:port").
    pub fn parse(service: &str, destination: &str, netns: u32) -> Result<Self> {
        match (service.is_empty(), destination.is_empty()) {
            (false, true) => Ok(LatencyOf::Service(service.to_owned())),
            (true, false) => {
                let e: Endpoint = destination.parse()?;
                if e.net.prefix_len() != e.net.max_prefix_len() {
                    return Err(Error::invalid(format!(
                        "destination {destination:?} must be one address, not a network"
                    )));
                }
                let addr = match e.net.addr() {
                    std::net::IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
                    std::net::IpAddr::V6(a) => a.octets(),
                };
                Ok(LatencyOf::Destination {
                    addr,
                    port: e.port,
                    netns,
                })
            }
            _ => Err(Error::invalid(
                "give either a service or a destination (IP:port), not both and not neither",
            )),
        }
    }
}

/// The histogram kinds (`hist_kind`) named, in their order; every kind if none is.
pub fn latency_kinds(names: &[String]) -> Result<Vec<u32>> {
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

/// Latency histograms, and the features off that left kinds out.
#[derive(Clone, Debug, Default)]
pub struct Latency {
    /// (kind, histogram), in the order asked.
    pub histograms: Vec<(u32, Histogram)>,
    pub features_off: Vec<FeatureState>,
}

/// TIME_WAIT and port pressure, with the services and rates they belong to.
#[derive(Clone, Debug, Default)]
pub struct TimeWaitView {
    /// Most first.
    pub destinations: Vec<TimeWaitRow>,
    /// Highest ratio first.
    pub pressure: Vec<(Pressure, String)>,
    /// Most first, then by name.
    pub services: Vec<ServiceTimeWait>,
}

#[derive(Clone, Debug)]
pub struct TimeWaitRow {
    pub time_wait: TimeWait,
    /// Empty if none.
    pub service: String,
    /// Connections a second that entered TIME_WAIT there, over the last minute.
    pub entered_per_s: f64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceTimeWait {
    pub service: String,
    pub outbound: u64,
    pub inbound: u64,
}

/// The advisor's findings and what it looked at.
#[derive(Clone, Debug, Default)]
pub struct Advice {
    pub findings: Vec<advise::Finding>,
    pub namespaces: Vec<advise::NsView>,
    /// `fs.file-max`.
    pub file_max: u64,
}

/// The agent's own state: programs, maps, counters and features.
#[derive(Clone, Debug)]
pub struct AgentState {
    pub programs: Vec<ProgramSummary>,
    pub maps: Vec<MapSummary>,
    pub counters: Vec<(&'static str, u64)>,
    pub features: Vec<FeatureState>,
    pub fleet: Option<super::FleetLink>,
}

/// The first `limit` items; 0 means all.
fn limited<T>(mut items: Vec<T>, limit: u32) -> Vec<T> {
    if limit > 0 {
        items.truncate(limit as usize);
    }
    items
}

impl<K: Kernel + ?Sized> Core<K> {
    /// Takes a snapshot of every destination's rate counters (the agent calls it every
    /// [`RateWindow::SAMPLE_EVERY`]).
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

    /// A service's counts and connect latency.
    pub fn service_summary(&self, s: &Service) -> Result<ServiceSummary> {
        let mut one = self.summaries_of(&[s], |s| s)?;
        Ok(one.remove(0))
    }

    /// Every service's, by name.
    pub fn service_summaries(&self) -> Result<Vec<ServiceSummary>> {
        self.map_service_summaries(|s| s)
    }

    /// Every service's, by name, each made into what the caller keeps (with 10,000 services,
    /// the summaries' histograms alone are 10 MB).
    pub fn map_service_summaries<T>(&self, f: impl FnMut(ServiceSummary) -> T) -> Result<Vec<T>> {
        self.summaries_of(&self.services.iter().collect::<Vec<_>>(), f)
    }

    fn summaries_of<T>(
        &self,
        services: &[&Service],
        mut f: impl FnMut(ServiceSummary) -> T,
    ) -> Result<Vec<T>> {
        let ids: Vec<u32> = services.iter().map(|s| s.id).collect();
        let protected = self.protected();
        let mut out = Vec::with_capacity(services.len());
        self.kernel
            .service_figures(&ids, hist_kind::CONNECT, &mut |i, stats, connect| {
                let s = services[i];
                out.push(f(ServiceSummary {
                    connect: *connect,
                    stats,
                    owner: self.owners.service(&s.name).unwrap_or_default(),
                    shadowed: self.owners.shadowed_service(&s.name),
                    protected: protected_among(&protected, &s.endpoints),
                    service: s.clone(),
                }));
            })?;
        Ok(out)
    }

    /// The first-response samples live connections hold and the histograms do not have yet.
    pub fn pending_first_responses(&mut self) -> Result<PendingSamples> {
        let mut pending = PendingSamples::default();
        self.kernel.for_each_connection(&mut |r| {
            let c = &r.info;
            if c.direction != direction::OUTBOUND || c.flags & conn_flags::COUNTED == 0 {
                return;
            }
            let dest = c.dest_key();
            for (&bucket, &count) in c.fr_bucket.iter().zip(&c.fr_count) {
                if count > 0 && u32::from(bucket) < HIST_BUCKETS {
                    pending.0.push((dest, c.svc, bucket, u64::from(count)));
                }
            }
        })?;
        Ok(pending)
    }

    /// Every service's first-response histogram, with what live connections still hold.
    pub fn first_response_by_service(&mut self) -> Result<HashMap<u32, Histogram>> {
        let pending = self.pending_first_responses()?;
        let ids: Vec<u32> = self.services.iter().map(|s| s.id).collect();
        let mut out = HashMap::with_capacity(ids.len());
        self.kernel
            .service_figures(&ids, hist_kind::FIRST_RESPONSE, &mut |i, _, h| {
                let mut h = *h;
                pending.add_service(ids[i], &mut h);
                out.insert(ids[i], h);
            })?;
        Ok(out)
    }

    /// Histograms of one kind for the destinations `keep` selects, summed.
    fn destination_histogram(&self, kind: u32, keep: impl Fn(&DestKey) -> bool) -> Histogram {
        let mut h = [0u64; HIST_BUCKETS as usize];
        for (k, hist) in self.kernel.destination_histograms(kind) {
            if keep(&k) {
                for (sum, n) in h.iter_mut().zip(hist) {
                    *sum += n;
                }
            }
        }
        h
    }

    /// Destinations with their counts and services. NotFound for an unknown service.
    pub fn destinations(&self, q: &DestinationQuery) -> Result<Vec<Destination>> {
        self.require_known(&q.service)?;
        let mut out: Vec<Destination> = self
            .kernel
            .destinations()
            .into_iter()
            .filter(|(k, _)| q.direction.is_none_or(|d| d == k.direction))
            .map(|(key, stats)| Destination {
                service: self.service_name(&key.addr, key.port),
                key,
                stats,
            })
            .filter(|d| q.service.is_empty() || d.service == q.service)
            .collect();
        let value = |d: &Destination| match q.sort {
            DestinationSort::Active => d.stats.active,
            DestinationSort::Opened => d.stats.opened,
            DestinationSort::Failed => counters::failed(&d.stats),
        };
        // Ties by address as people read it, then port; equal ones keep the map's order.
        out.sort_by_cached_key(|d| {
            let shown = super::service::display_addr(&d.key.addr).to_string();
            (std::cmp::Reverse(value(d)), shown, d.key.port)
        });
        Ok(limited(out, q.limit))
    }

    /// Every destination and direction's counts, summed over the network namespaces.
    pub fn destinations_by_endpoint(&self) -> Vec<(EndpointKey, ConnStats)> {
        let mut by: HashMap<EndpointKey, ConnStats> = HashMap::new();
        for (k, s) in self.kernel.destinations() {
            counters::add(by.entry((k.addr, k.port, k.direction)).or_default(), &s);
        }
        by.into_iter().collect()
    }

    /// Pins again what was unpinned by hand while the agent ran: without the pins, the trips
    /// and the gate would end with this process.
    pub fn restore_pins(&mut self) {
        match self.kernel.restore_pins() {
            Ok(paths) if paths.is_empty() => {}
            Ok(paths) => tracing::warn!(
                pins = ?paths,
                "pins were removed while the agent ran: pinned again"
            ),
            Err(e) => tracing::error!(error = %e, "pins were removed and cannot be pinned again"),
        }
    }

    /// Reaps what the kernel keeps of connections whose socket is gone (see
    /// `Kernel::sweep_connections`); the count reaped is the `conns_reaped` counter.
    pub fn sweep_connections(&mut self) {
        match self.kernel.sweep_connections() {
            Ok(Some(0)) => {}
            Ok(Some(reaped)) => tracing::info!(reaped, "connections whose socket is gone: reaped"),
            Ok(None) => tracing::debug!("a namespace could not be walked: connections not swept"),
            Err(e) => tracing::warn!(error = %e, "connections not swept"),
        }
    }

    /// Latency histograms of `kinds` (`hist_kind`). Kinds `named` must be measured
    /// (FailedPrecondition otherwise); with none named, the ones whose feature is off are left
    /// out and their features named instead of reported as zeros.
    pub fn latency(&mut self, of: &LatencyOf, kinds: &[u32], named: bool) -> Result<Latency> {
        let features = self.kernel.features();
        if matches!(of, LatencyOf::Destination { .. }) {
            // Without it there is no histogram of any kind per destination.
            features.require(Feature::DestinationLatency)?;
        }
        let mut out = Latency::default();
        let mut measured = Vec::new();
        for &kind in kinds {
            let feature = Feature::of_histogram(kind);
            match features.require(feature) {
                Ok(()) => measured.push(kind),
                Err(e) if named => return Err(e),
                Err(_) => {
                    if out.features_off.iter().all(|f| f.feature != feature) {
                        out.features_off.push(features.get(feature).clone());
                    }
                }
            }
        }
        let pending = self.pending_first_responses()?;
        for kind in measured {
            let h = match of {
                LatencyOf::Service(name) => {
                    let id = self.services.require(name)?.id;
                    let mut h = self.kernel.service_histogram(id, kind)?;
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
                    let mut h = self.destination_histogram(kind, keep);
                    if kind == hist_kind::FIRST_RESPONSE {
                        pending.add_destinations(keep, &mut h);
                    }
                    h
                }
            };
            out.histograms.push((kind, h));
        }
        Ok(out)
    }

    /// Every TCP socket of every namespace, counted: TIME_WAIT and port pressure.
    pub fn time_wait_report(&mut self) -> Result<timewait::Report> {
        Ok(timewait::analyze(&self.kernel.sockets()?))
    }

    /// TIME_WAIT per destination and per service, and port pressure, each list at most
    /// `limit` long (0: all).
    pub fn time_wait(&mut self, limit: u32) -> Result<TimeWaitView> {
        let report = self.time_wait_report()?;
        let mut services: Vec<ServiceTimeWait> = report
            .by_service(&self.services)
            .into_iter()
            .map(|(service, [outbound, inbound])| ServiceTimeWait {
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
        let entering = self
            .rates
            .rates(&self.kernel.destinations(), Rate::TimeWaitEntered);
        let destinations = limited(report.time_wait, limit)
            .into_iter()
            .map(|t| TimeWaitRow {
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
                service: self.service_name(&t.addr, t.port),
                time_wait: t,
            })
            .collect();
        let pressure = limited(report.pressure, limit)
            .into_iter()
            .map(|p| {
                let service = self.service_name(&p.daddr, p.dport);
                (p, service)
            })
            .collect();
        Ok(TimeWaitView {
            destinations,
            pressure,
            services: limited(services, limit),
        })
    }

    /// The advisor's findings and what it looked at.
    pub fn advise(&mut self) -> Result<Advice> {
        let walked: Vec<Walked> = self.kernel.sockets()?;
        let report = timewait::analyze(&walked);
        let namespaces: Vec<advise::NsView> = walked
            .iter()
            .map(|(ns, socks, settings)| advise::NsView::new(*ns, socks, *settings))
            .collect();
        let dests = self.kernel.destinations();
        let rates = self.rates.rates(&dests, Rate::Opened);
        let lifetimes = self.kernel.destination_histograms(hist_kind::LIFETIME);
        let churn: Vec<advise::ChurnSample> = dests
            .iter()
            .filter(|(k, _)| rates.get(k).copied().unwrap_or(0.0) >= advise::CHURN_MIN_RATE)
            .filter_map(|(k, _)| {
                let life = super::latency::summarize(lifetimes.get(k)?);
                Some(advise::ChurnSample {
                    netns: k.netns,
                    addr: k.addr,
                    port: k.port,
                    direction: k.direction,
                    service: self.service_name(&k.addr, k.port),
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
        let findings = advise::advise(
            &namespaces,
            &report,
            &churn,
            |addr, port| self.service_name(addr, port),
            file_max,
        );
        Ok(Advice {
            findings,
            namespaces,
            file_max,
        })
    }

    /// The agent's programs, maps, counters and features now.
    pub fn agent_state(&self) -> AgentState {
        let k = &self.kernel;
        AgentState {
            programs: k.programs(),
            maps: k.maps(),
            counters: k.counters(),
            features: k.features().iter().cloned().collect(),
            fleet: self.fleet.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_requests_name_exactly_one_target() {
        let req = |service: &str, destination: &str| LatencyOf::parse(service, destination, 0);
        assert!(matches!(req("db", ""), Ok(LatencyOf::Service(s)) if s == "db"));
        match req("", "[::1]:80") {
            Ok(LatencyOf::Destination { addr, port, .. }) => {
                assert_eq!(port, 80);
                assert_eq!(addr, std::net::Ipv6Addr::LOCALHOST.octets());
            }
            _ => panic!("a destination"),
        }
        match req("", "10.0.0.1:80") {
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
            let err = req(s, d).expect_err("rejected");
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
    fn limits_of_zero_mean_all() {
        assert_eq!(limited(vec![1, 2, 3], 0), vec![1, 2, 3]);
        assert_eq!(limited(vec![1, 2, 3], 2), vec![1, 2]);
    }
}
