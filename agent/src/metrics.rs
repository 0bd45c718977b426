//! Prometheus metrics: `GET /metrics` on a plain-HTTP listener (`--metrics-listen`), gathered
//! from the core at scrape time (the kernel maps are the store; nothing is kept in between but
//! a few seconds' cache of the TIME_WAIT walk).
//!
//! Labels stay bounded: series are per service, per map, per program and per kernel counter;
//! per-destination series only for the `[metrics] top_destinations` destinations with the most
//! opened connections. Latency histograms are the kernel's log2 histograms re-bucketed at
//! powers of two of a microsecond ([`LE_US`]), which are exact bucket edges, so the cumulative
//! counts are exact.

use std::{
    collections::HashMap,
    convert::Infallible,
    fmt,
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use breakwater_common::{
    breaker::{state, Totals},
    direction, hist_bucket, ConnStats, HIST_BUCKETS,
};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, header, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, MetricEncoder, NoLabelSet,
    },
    metrics::MetricType,
    registry::Registry,
};
use tracing::{debug, warn};

use crate::{
    core::{
        counters,
        features::{Feature, Status},
        latency,
        service::display_addr,
        timewait, Core, Histogram, MapSummary, ProgramSummary,
    },
    error::{Error, Result},
};

/// Histogram bucket bounds (`le`), in µs: every power of two from 16 µs to about 33.5 s. Each
/// is where one of the kernel's buckets begins, so no bucket straddles a bound.
pub const LE_US: [u64; 22] = {
    let mut le = [0; 22];
    let mut i = 0;
    while i < le.len() {
        le[i] = 1 << (i + 4);
        i += 1;
    }
    le
};

/// How long one walk of every namespace's sockets (TIME_WAIT, port pressure) is reused.
const TIME_WAIT_CACHE: Duration = Duration::from_secs(5);

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the metrics listener serves from.
pub struct Metrics {
    core: Arc<Mutex<Core>>,
    top_destinations: usize,
    started: SystemTime,
    time_wait: Mutex<Option<(Instant, Arc<TimeWaitSummary>)>>,
}

/// From one socket walk: what the metrics need of it, before services are matched.
#[derive(Debug, Default)]
struct TimeWaitSummary {
    report: timewait::Report,
    /// Sockets in TIME_WAIT per (address, port, direction), over every namespace.
    time_wait: HashMap<([u8; 16], u16, u8), u64>,
    /// The highest share of a port range in use per destination (address, port), over every
    /// namespace and source address.
    pressure: HashMap<([u8; 16], u16), f64>,
}

/// Everything one scrape reports, read under the core's lock and encoded after it.
#[derive(Debug)]
struct Snapshot {
    start_time_s: f64,
    services: Vec<ServiceRow>,
    destinations: Vec<DestinationRow>,
    /// False if the socket walk failed: the TIME_WAIT and pressure series are left out.
    time_wait_known: bool,
    counters: Vec<(&'static str, u64)>,
    maps: Vec<MapSummary>,
    programs: Vec<ProgramSummary>,
    /// Every feature and whether it runs (on or degraded).
    features: Vec<(Feature, bool)>,
    fleet: Option<crate::core::FleetLink>,
}

impl Snapshot {
    fn enabled(&self, feature: Feature) -> bool {
        self.features.iter().any(|(f, on)| *f == feature && *on)
    }
}

#[derive(Debug)]
struct ServiceRow {
    name: String,
    /// Outbound, inbound.
    stats: [ConnStats; 2],
    time_wait: [u64; 2],
    pressure: f64,
    connect: Histogram,
    first_response: Histogram,
    breaker: Option<(u32, Totals)>,
    /// Connects the breaker would have refused in audit mode.
    audited: u64,
    /// Destination granularity only.
    ejection: Option<Ejection>,
}

/// A per-destination breaker policy's figures, and the states of its destinations (at most
/// [`MAX_DESTINATION_SERIES`], those not closed first).
#[derive(Debug, Default)]
struct Ejection {
    live: u32,
    ejected: u32,
    capped: u64,
    untracked: u64,
    states: Vec<(String, u32)>,
}

/// Destinations of one service with a `breakwater_breaker_destination_state` series: the label
/// stays bounded however many addresses a CIDR endpoint matches.
pub const MAX_DESTINATION_SERIES: usize = 32;

#[derive(Debug)]
struct DestinationRow {
    /// "IP:port" ("[IPv6]:port").
    destination: String,
    direction: u8,
    service: String,
    stats: ConnStats,
    time_wait: u64,
    pressure: f64,
}

const DIRECTIONS: [(u8, &str); 2] = [
    (direction::OUTBOUND, "outbound"),
    (direction::INBOUND, "inbound"),
];

fn direction_name(d: u8) -> &'static str {
    if d == direction::INBOUND {
        "inbound"
    } else {
        "outbound"
    }
}

fn endpoint(addr: &[u8; 16], port: u16) -> String {
    std::net::SocketAddr::new(display_addr(addr), port).to_string()
}

impl Metrics {
    pub fn new(core: Arc<Mutex<Core>>, top_destinations: u32) -> Self {
        Self {
            core,
            top_destinations: top_destinations as usize,
            started: SystemTime::now(),
            time_wait: Mutex::new(None),
        }
    }

    /// The socket walk's summary, at most [`TIME_WAIT_CACHE`] old; None if the walk failed.
    fn time_wait(&self, core: &mut Core) -> Option<Arc<TimeWaitSummary>> {
        let mut cache = self.time_wait.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, summary)) = cache.as_ref() {
            if at.elapsed() < TIME_WAIT_CACHE {
                return Some(summary.clone());
            }
        }
        let report = match core.time_wait_report() {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "metrics: cannot walk the sockets; TIME_WAIT series left out");
                return None;
            }
        };
        let mut summary = TimeWaitSummary::default();
        for t in &report.time_wait {
            *summary
                .time_wait
                .entry((t.addr, t.port, t.direction))
                .or_default() += t.count;
        }
        for p in &report.pressure {
            let max = summary.pressure.entry((p.daddr, p.dport)).or_default();
            *max = max.max(p.ratio);
        }
        summary.report = report;
        let summary = Arc::new(summary);
        *cache = Some((Instant::now(), summary.clone()));
        Some(summary)
    }

    /// Reads everything a scrape reports (holds the core's lock: call off the async workers).
    fn snapshot(&self, core: &mut Core) -> Result<Snapshot> {
        let tw = self.time_wait(core);
        let tw_count = |addr: &[u8; 16], port: u16, dir: u8| {
            tw.as_ref()
                .and_then(|t| t.time_wait.get(&(*addr, port, dir)).copied())
                .unwrap_or(0)
        };
        let mut ejections: HashMap<String, Ejection> = HashMap::new();
        let mut audited: HashMap<String, u64> = HashMap::new();
        let breakers: HashMap<String, (u32, Totals)> = core
            .breakers()?
            .into_iter()
            .map(|b| {
                if b.policy.flags & breakwater_common::breaker::policy_flags::DESTINATION != 0 {
                    let mut states: Vec<(String, u32)> = b
                        .destinations
                        .iter()
                        .map(|d| (d.destination.to_string(), d.counts.state))
                        .collect();
                    states.sort_by_key(|(_, st)| *st == state::CLOSED);
                    let ejected = b.ejected();
                    states.truncate(MAX_DESTINATION_SERIES);
                    ejections.insert(
                        b.service.clone(),
                        Ejection {
                            live: b.dest.live,
                            ejected: ejected as u32,
                            capped: b.more_totals.capped,
                            untracked: b.more_totals.untracked,
                            states,
                        },
                    );
                }
                audited.insert(b.service.clone(), b.more_totals.audited);
                (b.service, (b.counts.state, b.totals))
            })
            .collect();
        let services_table = core.services();
        let time_wait_by_service: HashMap<String, [u64; 2]> = tw
            .as_ref()
            .map(|tw| tw.report.by_service(services_table))
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        let mut pressure_by_service: HashMap<String, f64> = HashMap::new();
        if let Some(tw) = &tw {
            for ((addr, port), ratio) in &tw.pressure {
                if let Some(s) = services_table.match_endpoint(addr, *port) {
                    let max = pressure_by_service.entry(s.name.clone()).or_default();
                    *max = max.max(*ratio);
                }
            }
        }
        let mut first_response = core.first_response_by_service()?;
        let mut services: Vec<ServiceRow> = core.map_service_summaries(|s| ServiceRow {
            time_wait: time_wait_by_service
                .get(&s.service.name)
                .copied()
                .unwrap_or_default(),
            pressure: pressure_by_service
                .get(&s.service.name)
                .copied()
                .unwrap_or_default(),
            first_response: first_response
                .remove(&s.service.id)
                .unwrap_or([0; HIST_BUCKETS as usize]),
            breaker: breakers.get(&s.service.name).copied(),
            audited: audited.get(&s.service.name).copied().unwrap_or_default(),
            ejection: ejections.remove(&s.service.name),
            stats: s.stats,
            connect: s.connect,
            name: s.service.name,
        })?;
        let services_table = core.services();
        services.sort_by(|a, b| a.name.cmp(&b.name));

        // One row per destination and direction, summed over namespaces.
        let mut top = core.destinations_by_endpoint();
        top.sort_by(|(ka, a), (kb, b)| {
            (b.opened, b.active)
                .cmp(&(a.opened, a.active))
                .then_with(|| ka.cmp(kb))
        });
        top.truncate(self.top_destinations);
        let destinations = top
            .into_iter()
            .map(|((addr, port, dir), stats)| DestinationRow {
                destination: endpoint(&addr, port),
                direction: dir,
                service: services_table
                    .match_endpoint(&addr, port)
                    .map(|s| s.name.clone())
                    .unwrap_or_default(),
                stats,
                time_wait: tw_count(&addr, port, dir),
                pressure: if dir == direction::OUTBOUND {
                    tw.as_ref()
                        .and_then(|t| t.pressure.get(&(addr, port)).copied())
                        .unwrap_or(0.0)
                } else {
                    0.0
                },
            })
            .collect();

        let state = core.agent_state();
        Ok(Snapshot {
            start_time_s: self
                .started
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
            services,
            destinations,
            time_wait_known: tw.is_some(),
            counters: state.counters,
            maps: state.maps,
            programs: state.programs,
            features: state
                .features
                .iter()
                .map(|s| (s.feature, s.status != Status::Off))
                .collect(),
            fleet: state.fleet,
        })
    }

    /// One scrape, encoded in the Prometheus text format, or OpenMetrics if `openmetrics`.
    pub async fn render(self: &Arc<Self>, openmetrics: bool) -> Result<String> {
        let this = self.clone();
        let snapshot = tokio::task::spawn_blocking(move || {
            let mut core = this
                .core
                .lock()
                .map_err(|_| Error::Internal("core lock poisoned".into()))?;
            this.snapshot(&mut core)
        })
        .await
        .map_err(|e| Error::Internal(format!("metrics worker failed: {e}")))??;
        Ok(encode(snapshot, openmetrics))
    }

    async fn respond(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let reply = |status: StatusCode, content_type: &str, body: String| {
            Response::builder()
                .status(status)
                .header(header::CONTENT_TYPE, content_type)
                .body(Full::new(Bytes::from(body)))
                .expect("a valid response")
        };
        if req.uri().path() != "/metrics" {
            return reply(
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                "not found: the metrics are at /metrics\n".into(),
            );
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut r = reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain; charset=utf-8",
                "only GET and HEAD\n".into(),
            );
            r.headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
            return r;
        }
        // Prometheus asks for OpenMetrics first; anything else gets the classic text format.
        let openmetrics = req
            .headers()
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains("application/openmetrics-text"));
        match self.render(openmetrics).await {
            Ok(body) => reply(
                StatusCode::OK,
                if openmetrics {
                    OPENMETRICS
                } else {
                    prometheus_client::encoding::prometheus_text::CONTENT_TYPE
                },
                body,
            ),
            Err(e) => {
                warn!(error = %e, "metrics: scrape failed");
                reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain; charset=utf-8",
                    format!("{e}\n"),
                )
            }
        }
    }
}

/// Serves `GET /metrics` on the connections `incoming` hands over (from whichever socket
/// `metrics.listen` is bound to now: a reload can move it) until `shutdown` completes.
pub async fn serve(
    mut incoming: tokio::sync::mpsc::Receiver<tokio::net::TcpStream>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => return,
            accepted = incoming.recv() => match accepted {
                Some(stream) => stream,
                None => return,
            },
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(metrics.respond(req).await) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                debug!(error = %e, "metrics: connection ended with an error");
            }
        });
    }
}

/// The cumulative-ready buckets of a kernel histogram: per `le` bound (in seconds) the count
/// of the kernel buckets below it and above the previous bound, then the rest under +Inf; and
/// the sum in seconds, estimated from bucket midpoints (the kernel keeps no sum).
fn prometheus_buckets(h: &Histogram) -> (Vec<(f64, u64)>, f64, u64) {
    let mut out = Vec::with_capacity(LE_US.len() + 1);
    let mut from = 0usize;
    for le in LE_US {
        // Kernel buckets [from, to) end at or below `le`.
        let to = hist_bucket(le) as usize;
        out.push((le as f64 / 1e6, h[from..to].iter().sum()));
        from = to;
    }
    out.push((f64::INFINITY, h[from..].iter().sum()));
    let sum_us: f64 = h
        .iter()
        .enumerate()
        .filter(|(_, n)| **n > 0)
        .map(|(b, n)| {
            let (lo, hi) = latency::bounds(b as u32);
            let mid = if b as u32 + 1 >= HIST_BUCKETS {
                lo as f64
            } else {
                (lo + hi) as f64 / 2.0
            };
            mid * *n as f64
        })
        .sum();
    (out, sum_us / 1e6, h.iter().sum())
}

type Labels = Vec<(&'static str, String)>;

fn labels<const N: usize>(pairs: [(&'static str, &str); N]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

/// One metric family: its descriptor, then one sample per row.
fn family<V>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: impl IntoIterator<Item = (Labels, V)>,
    mut put: impl FnMut(&mut MetricEncoder, &V) -> fmt::Result,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in rows {
        put(&mut m.encode_family(&labels)?, &v)?;
    }
    Ok(())
}

fn gauge<V: EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, V)>,
) -> fmt::Result {
    family(enc, name, help, MetricType::Gauge, rows, |m, v| {
        m.encode_gauge(v)
    })
}

/// `name` without `_total`: the encoder appends it.
fn counter<V: EncodeCounterValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, V)>,
) -> fmt::Result {
    family(enc, name, help, MetricType::Counter, rows, |m, v| {
        m.encode_counter::<NoLabelSet, V, u64>(v, None)
    })
}

fn histogram<'h>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, &'h Histogram)>,
) -> fmt::Result {
    family(enc, name, help, MetricType::Histogram, rows, |m, h| {
        let (buckets, sum, count) = prometheus_buckets(h);
        m.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    })
}

/// The connection counters shared by services and destinations, under `prefix`: one family
/// per family of the counter table, one sample per row (and per label of the family).
fn connection_families<'r, R: 'r>(
    enc: &mut DescriptorEncoder,
    prefix: &str,
    what: &str,
    rows: &'r [R],
    each: impl Fn(&'r R) -> Vec<(Labels, &'r ConnStats)>,
) -> fmt::Result {
    let all: Vec<(Labels, &ConnStats)> = rows.iter().flat_map(each).collect();
    for (family, kind, help, members) in counters::families() {
        let samples: Vec<(Labels, u64)> = all
            .iter()
            .flat_map(|(l, s)| {
                members.iter().map(|c| {
                    let mut l = l.clone();
                    if let Some((name, value)) = c.label {
                        l.push((name, value.to_owned()));
                    }
                    (l, (c.get)(s))
                })
            })
            .collect();
        let name = format!("{prefix}_{family}");
        let help = help.replace("{what}", what);
        match kind {
            counters::Kind::Gauge => gauge(enc, &name, &help, samples)?,
            counters::Kind::Counter => counter(enc, &name, &help, samples)?,
        }
    }
    Ok(())
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let enc = &mut enc;
        gauge(
            enc,
            "breakwater_agent_info",
            "The agent's version (always 1)",
            [(labels([("version", env!("CARGO_PKG_VERSION"))]), 1u64)],
        )?;
        gauge(
            enc,
            "breakwater_agent_start_time_seconds",
            "When the agent started, in seconds since the Unix epoch",
            [(Labels::new(), self.start_time_s)],
        )?;

        // Services.
        connection_families(enc, "breakwater_service", "service", &self.services, |s| {
            DIRECTIONS
                .iter()
                .enumerate()
                .map(|(i, (_, dir))| {
                    (
                        labels([("service", s.name.as_str()), ("direction", dir)]),
                        &s.stats[i],
                    )
                })
                .collect()
        })?;
        if self.time_wait_known {
            gauge(
                enc,
                "breakwater_service_time_wait_sockets",
                "Sockets in TIME_WAIT now, per service and direction (every namespace)",
                self.services.iter().flat_map(|s| {
                    DIRECTIONS.iter().enumerate().map(|(i, (_, dir))| {
                        (
                            labels([("service", s.name.as_str()), ("direction", dir)]),
                            s.time_wait[i],
                        )
                    })
                }),
            )?;
            gauge(
                enc,
                "breakwater_service_port_pressure_ratio",
                "The highest share of a namespace's ephemeral port range in use from one source \
                 address toward one of the service's endpoints (warn from 0.5, critical from 0.8)",
                self.services
                    .iter()
                    .map(|s| (labels([("service", s.name.as_str())]), s.pressure)),
            )?;
        }
        // A histogram whose feature is off is left out, not reported empty.
        if self.enabled(Feature::ConnectLatency) {
            histogram(
                enc,
                "breakwater_service_connect_duration_seconds",
                "SYN sent to ESTABLISHED of the service's outbound connections (sum estimated \
                 from bucket midpoints)",
                self.services
                    .iter()
                    .map(|s| (labels([("service", s.name.as_str())]), &s.connect)),
            )?;
        }
        if self.enabled(Feature::FirstResponseLatency) {
            histogram(
                enc,
                "breakwater_service_first_response_duration_seconds",
                "A send on an outbound connection to the first data that arrives after it (sum \
                 estimated from bucket midpoints)",
                self.services
                    .iter()
                    .map(|s| (labels([("service", s.name.as_str())]), &s.first_response)),
            )?;
        }

        // Breakers: services with a policy.
        let breakers: Vec<(&str, u32, &Totals)> = self
            .services
            .iter()
            .filter_map(|s| s.breaker.as_ref().map(|(st, t)| (s.name.as_str(), *st, t)))
            .collect();
        gauge(
            enc,
            "breakwater_breaker_state",
            "Circuit-breaker state: 1 for the state it is in, 0 for the others",
            breakers.iter().flat_map(|(service, st, _)| {
                [state::CLOSED, state::OPEN, state::HALF_OPEN].map(|s| {
                    (
                        labels([("service", service), ("state", state::name(s))]),
                        u64::from(s == *st),
                    )
                })
            }),
        )?;
        for (name, help, f) in [
            (
                "breakwater_breaker_trips",
                "Times the breaker tripped open (by its rules or by hand)",
                (|t: &Totals| t.trips) as fn(&Totals) -> u64,
            ),
            (
                "breakwater_breaker_rejected",
                "Connects the breaker refused while open",
                |t| t.rejected,
            ),
            (
                "breakwater_breaker_probes",
                "Connects admitted as half-open probes",
                |t| t.probes,
            ),
            (
                "breakwater_breaker_events_lost",
                "State-change events the kernel's ring buffer had no room for",
                |t| t.events_lost,
            ),
        ] {
            counter(
                enc,
                name,
                help,
                breakers
                    .iter()
                    .map(|(service, _, t)| (labels([("service", service)]), f(t))),
            )?;
        }

        counter(
            enc,
            "breakwater_breaker_audited",
            "Connects the breaker would have refused, let through because its policy is in audit \
             mode",
            self.services
                .iter()
                .filter(|s| s.breaker.is_some())
                .map(|s| (labels([("service", s.name.as_str())]), s.audited)),
        )?;

        // Destination granularity: each destination's state (bounded), and the service's
        // figures.
        let ejections: Vec<(&str, &Ejection)> = self
            .services
            .iter()
            .filter_map(|s| s.ejection.as_ref().map(|e| (s.name.as_str(), e)))
            .collect();
        gauge(
            enc,
            "breakwater_breaker_destination_state",
            "Per-destination breaker state: 1 for the state it is in (at most 32 destinations \
             per service, those not closed first)",
            ejections.iter().flat_map(|(service, e)| {
                e.states.iter().flat_map(move |(dest, st)| {
                    [state::CLOSED, state::OPEN, state::HALF_OPEN].map(|s| {
                        (
                            labels([
                                ("service", *service),
                                ("destination", dest.as_str()),
                                ("state", state::name(s)),
                            ]),
                            u64::from(s == *st),
                        )
                    })
                })
            }),
        )?;
        gauge(
            enc,
            "breakwater_breaker_destinations_ejected",
            "Destinations of the service not closed now",
            ejections
                .iter()
                .map(|(service, e)| (labels([("service", service)]), u64::from(e.ejected))),
        )?;
        gauge(
            enc,
            "breakwater_breaker_destinations_live",
            "Destinations of the service seen within its destination_ttl (the ejection cap is a \
             share of them)",
            ejections
                .iter()
                .map(|(service, e)| (labels([("service", service)]), u64::from(e.live))),
        )?;
        counter(
            enc,
            "breakwater_breaker_ejections_capped",
            "Destination trips refused because max_ejection_percent were ejected already",
            ejections
                .iter()
                .map(|(service, e)| (labels([("service", service)]), e.capped)),
        )?;
        counter(
            enc,
            "breakwater_breaker_destinations_untracked",
            "New destinations let through untracked: maps.max_destination_breakers was full",
            ejections
                .iter()
                .map(|(service, e)| (labels([("service", service)]), e.untracked)),
        )?;

        // The top destinations.
        connection_families(
            enc,
            "breakwater_destination",
            "destination",
            &self.destinations,
            |d| {
                vec![(
                    labels([
                        ("destination", d.destination.as_str()),
                        ("direction", direction_name(d.direction)),
                        ("service", d.service.as_str()),
                    ]),
                    &d.stats,
                )]
            },
        )?;
        if self.time_wait_known {
            gauge(
                enc,
                "breakwater_destination_time_wait_sockets",
                "Sockets in TIME_WAIT now, per top destination and direction",
                self.destinations.iter().map(|d| {
                    (
                        labels([
                            ("destination", d.destination.as_str()),
                            ("direction", direction_name(d.direction)),
                            ("service", d.service.as_str()),
                        ]),
                        d.time_wait,
                    )
                }),
            )?;
            gauge(
                enc,
                "breakwater_destination_port_pressure_ratio",
                "The highest share of a namespace's ephemeral port range in use from one source \
                 address toward this (outbound) destination",
                self.destinations
                    .iter()
                    .filter(|d| d.direction == direction::OUTBOUND)
                    .map(|d| {
                        (
                            labels([
                                ("destination", d.destination.as_str()),
                                ("service", d.service.as_str()),
                            ]),
                            d.pressure,
                        )
                    }),
            )?;
        }

        // The link to the fleet, when there is one.
        if let Some(f) = &self.fleet {
            let node = || labels([("node", f.node.as_str())]);
            gauge(
                enc,
                "breakwater_fleet_connected",
                "1 while the agent is in sync with the fleet's etcd, 0 while it is not (it then \
                 enforces what it last applied)",
                [(node(), u64::from(f.connected))],
            )?;
            gauge(
                enc,
                "breakwater_fleet_link_changed_timestamp_seconds",
                "When the link to etcd last came up or went down (Unix time)",
                [(
                    node(),
                    f.since
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_secs_f64(),
                )],
            )?;
            gauge(
                enc,
                "breakwater_fleet_applied_revision",
                "The etcd revision of the fleet's desired state last applied on this node",
                [(node(), f.applied_revision)],
            )?;
            counter(
                enc,
                "breakwater_fleet_invalid_records",
                "Records in etcd that were invalid and so not applied",
                [(node(), f.invalid_records)],
            )?;
            counter(
                enc,
                "breakwater_fleet_records_not_applied",
                "Valid records of the fleet that could not be applied on this node",
                [(node(), f.not_applied)],
            )?;
        }

        // The agent's own health.
        gauge(
            enc,
            "breakwater_feature_enabled",
            "1 if the feature runs on this node (on or degraded), 0 if it is off; \
             `breakwater info` says why",
            self.features
                .iter()
                .map(|(f, on)| (labels([("feature", f.name())]), u64::from(*on))),
        )?;
        counter(
            enc,
            "breakwater_kernel_events",
            "Events the eBPF programs counted, one series per counter of `breakwater info` \
             (prog_errors, read_errors, map_errors, underflows, ...)",
            self.counters
                .iter()
                .map(|(name, v)| (labels([("counter", name)]), *v)),
        )?;
        gauge(
            enc,
            "breakwater_map_entries",
            "Entries in a kernel map now",
            self.maps
                .iter()
                .map(|m| (labels([("map", m.name)]), m.entries)),
        )?;
        gauge(
            enc,
            "breakwater_map_capacity",
            "Capacity of a kernel map",
            self.maps
                .iter()
                .map(|m| (labels([("map", m.name)]), u64::from(m.capacity))),
        )?;
        counter(
            enc,
            "breakwater_map_evictions",
            "Entries the kernel's LRU evicted from a full map",
            self.maps
                .iter()
                .map(|m| (labels([("map", m.name)]), m.evictions)),
        )?;
        counter(
            enc,
            "breakwater_program_missed_runs",
            "Runs of an eBPF program the kernel skipped (recursion on one CPU): their events \
             were not counted",
            self.programs
                .iter()
                .map(|p| (labels([("program", p.name)]), p.recursion_misses)),
        )?;
        counter(
            enc,
            "breakwater_program_runs",
            "Runs of an eBPF program (0 unless kernel.bpf_stats_enabled=1)",
            self.programs
                .iter()
                .map(|p| (labels([("program", p.name)]), p.run_count)),
        )?;
        counter(
            enc,
            "breakwater_program_run_seconds",
            "Time spent in an eBPF program (0 unless kernel.bpf_stats_enabled=1)",
            self.programs
                .iter()
                .map(|p| (labels([("program", p.name)]), p.run_time_ns as f64 / 1e9)),
        )
    }
}

fn encode(snapshot: Snapshot, openmetrics: bool) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot));
    let mut out = String::new();
    let encoded = if openmetrics {
        prometheus_client::encoding::text::encode(&mut out, &registry)
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
    };
    // Writing to a String fails only if our own encoding code does.
    encoded.expect("metrics encode into a String");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use breakwater_common::hist_bucket_low;

    #[test]
    fn bucket_bounds_are_kernel_bucket_edges() {
        for le in LE_US {
            assert_eq!(hist_bucket_low(hist_bucket(le)), le, "{le}");
        }
        assert!(LE_US.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(*LE_US.last().unwrap(), 1 << 25);
    }

    #[test]
    fn histograms_convert_exactly() {
        let mut h = [0u64; HIST_BUCKETS as usize];
        h[hist_bucket(3) as usize] += 1; // below the first bound
        h[hist_bucket(15) as usize] += 2; // just below 16 µs
        h[hist_bucket(16) as usize] += 4; // 16 µs: above le=16µs
        h[hist_bucket(1_000) as usize] += 8; // in (512, 1024]
        h[HIST_BUCKETS as usize - 1] += 16; // hours
        let (buckets, sum, count) = prometheus_buckets(&h);
        assert_eq!(count, 31);
        assert_eq!(buckets.len(), LE_US.len() + 1);
        assert_eq!(buckets.iter().map(|b| b.1).sum::<u64>(), 31);
        let at = |le_us: u64| {
            buckets
                .iter()
                .take_while(|(le, _)| *le <= le_us as f64 / 1e6)
                .map(|b| b.1)
                .sum::<u64>()
        };
        assert_eq!(at(16), 3);
        assert_eq!(at(512), 7);
        assert_eq!(at(1024), 15);
        assert_eq!(at(1 << 25), 15);
        assert_eq!(buckets.last().unwrap(), &(f64::INFINITY, 16));
        assert!(sum > 16.0 * 2.0 * 3600.0, "{sum}");
    }

    fn snapshot() -> Snapshot {
        let mut connect = [0u64; HIST_BUCKETS as usize];
        connect[hist_bucket(40) as usize] = 20;
        Snapshot {
            start_time_s: 1.0e9,
            services: vec![ServiceRow {
                name: "db".into(),
                stats: [
                    ConnStats {
                        active: 15,
                        opened: 20,
                        closed: 5,
                        failed_refused: 5,
                        ..Default::default()
                    },
                    ConnStats::default(),
                ],
                time_wait: [3, 0],
                pressure: 0.25,
                connect,
                first_response: [0; HIST_BUCKETS as usize],
                breaker: Some((
                    state::OPEN,
                    Totals {
                        rejected: 7,
                        trips: 1,
                        ..Default::default()
                    },
                )),
                ejection: None,
                audited: 0,
            }],
            destinations: vec![DestinationRow {
                destination: "[::1]:5432".into(),
                direction: direction::OUTBOUND,
                service: "db".into(),
                stats: ConnStats {
                    opened: 20,
                    ..Default::default()
                },
                time_wait: 3,
                pressure: 0.25,
            }],
            time_wait_known: true,
            counters: vec![("prog_errors", 0), ("underflows", 2)],
            maps: vec![MapSummary {
                name: "BW_DESTS",
                capacity: 64,
                entries: 3,
                evictions: 0,
            }],
            programs: vec![ProgramSummary {
                name: "bw_state",
                recursion_misses: 1,
                ..Default::default()
            }],
            features: Feature::ALL
                .into_iter()
                .map(|f| (f, f != Feature::FirstResponseLatency))
                .collect(),
            fleet: Some(crate::core::FleetLink {
                node: "n1".into(),
                connected: true,
                applied_revision: 42,
                invalid_records: 1,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn both_formats_name_the_series_as_documented() {
        let text = encode(snapshot(), false);
        for line in [
            "# TYPE breakwater_service_connections_opened_total counter",
            "breakwater_service_connections_opened_total{service=\"db\",direction=\"outbound\"} 20",
            "breakwater_service_connections_active{service=\"db\",direction=\"outbound\"} 15",
            "breakwater_service_connections_failed_total{service=\"db\",direction=\"outbound\",reason=\"refused\"} 5",
            "breakwater_service_time_wait_sockets{service=\"db\",direction=\"outbound\"} 3",
            "breakwater_service_port_pressure_ratio{service=\"db\"} 0.25",
            "breakwater_service_connect_duration_seconds_count{service=\"db\"} 20",
            "breakwater_service_connect_duration_seconds_bucket{service=\"db\",le=\"+Inf\"} 20",
            "breakwater_breaker_state{service=\"db\",state=\"open\"} 1",
            "breakwater_breaker_state{service=\"db\",state=\"closed\"} 0",
            "breakwater_breaker_trips_total{service=\"db\"} 1",
            "breakwater_breaker_rejected_total{service=\"db\"} 7",
            "breakwater_destination_connections_opened_total{destination=\"[::1]:5432\",direction=\"outbound\",service=\"db\"} 20",
            "breakwater_kernel_events_total{counter=\"underflows\"} 2",
            "breakwater_map_entries{map=\"BW_DESTS\"} 3",
            "breakwater_program_missed_runs_total{program=\"bw_state\"} 1",
            "breakwater_agent_info{version=\"0.1.0\"} 1",
            "# TYPE breakwater_feature_enabled gauge",
            "breakwater_feature_enabled{feature=\"connect_latency\"} 1",
            "breakwater_feature_enabled{feature=\"first_response_latency\"} 0",
            "breakwater_fleet_connected{node=\"n1\"} 1",
            "breakwater_fleet_applied_revision{node=\"n1\"} 42",
            "breakwater_fleet_invalid_records_total{node=\"n1\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        // Off: its histogram is left out rather than reported empty.
        assert!(!text.contains("breakwater_service_first_response_duration_seconds"));
        assert_eq!(
            text.matches("breakwater_feature_enabled{").count(),
            Feature::ALL.len()
        );
        assert!(!text.contains("# EOF"));
        let open = encode(snapshot(), true);
        assert!(open.ends_with("# EOF\n"), "{open}");
        assert!(open.contains("# TYPE breakwater_service_connections_opened counter\n"));
    }
}
