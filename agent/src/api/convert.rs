//! Proto <-> domain: every message the API sends is made here from the core's types, and every
//! request read into them. Nothing here decides anything.

use std::time::{Duration, SystemTime};

use breakwater_common::{
    breaker::{policy_flags, state, RATIO_ONE},
    direction, tcp_state, ConnStats,
};
use breakwater_proto::v1 as pb;

use crate::{
    core::{
        advise,
        aggregate::{
            Advice, AgentState, Destination, DestinationSort, Latency, ServiceSummary, TimeWaitView,
        },
        audit::{ConnectionEvent, ConnectionEventKind},
        breakers::{BreakerEvent, BreakerView, DestinationView},
        counters::conn_counters,
        features::{FeatureState, Status as FeatureStatus},
        latency,
        listing::Connection,
        owners::Owner,
        policy::{errno_name, PolicySpec, Quorum, QuorumSize, Rules},
        reload::Reloaded,
        service::display_addr,
        timewait::Level,
        Histogram,
    },
    error::{Error, Result},
};

impl PolicySpec {
    /// The policy a `SetPolicy` request asks for (checked by [`PolicySpec::resolve`]).
    pub fn from_request(r: &pb::SetPolicyRequest) -> Self {
        let ms = |v: Option<u64>| v.map(Duration::from_millis);
        Self {
            preset: (!r.preset.is_empty()).then(|| r.preset.clone()),
            min_requests: r.min_requests,
            failure_ratio: r.failure_ratio,
            consecutive_failures: r.consecutive_failures,
            max_failures: r.max_failures,
            interval: ms(r.interval_ms),
            open_timeout: ms(r.open_timeout_ms),
            half_open_max: r.half_open_max,
            errno: r.errno.clone(),
            slow_connect: ms(r.slow_connect_ms),
            terminate_established: r.terminate_established,
            fleet_quorum: r.fleet_quorum.clone(),
            fleet_quorum_window: ms(r.fleet_quorum_window_ms),
            granularity: r.granularity.clone(),
            max_ejection_percent: r.max_ejection_percent,
            max_open_timeout: ms(r.max_open_timeout_ms),
            destination_ttl: ms(r.destination_ttl_ms),
            mode: r.mode.clone(),
        }
    }

    /// The `SetPolicy` request for this policy on `service`: what [`PolicySpec::from_request`]
    /// reads back.
    pub fn to_request(&self, service: &str) -> pb::SetPolicyRequest {
        let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
        pb::SetPolicyRequest {
            service: service.to_owned(),
            preset: self.preset.clone().unwrap_or_default(),
            min_requests: self.min_requests,
            failure_ratio: self.failure_ratio,
            consecutive_failures: self.consecutive_failures,
            max_failures: self.max_failures,
            interval_ms: ms(self.interval),
            open_timeout_ms: ms(self.open_timeout),
            half_open_max: self.half_open_max,
            errno: self.errno.clone(),
            slow_connect_ms: ms(self.slow_connect),
            terminate_established: self.terminate_established,
            fleet_quorum: self.fleet_quorum.clone(),
            fleet_quorum_window_ms: ms(self.fleet_quorum_window),
            granularity: self.granularity.clone(),
            max_ejection_percent: self.max_ejection_percent,
            max_open_timeout_ms: ms(self.max_open_timeout),
            destination_ttl_ms: ms(self.destination_ttl),
            mode: self.mode.clone(),
        }
    }
}

/// A request's `destination` ("address:port"; empty = none).
pub fn destination_field(text: &str) -> Result<Option<std::net::SocketAddr>> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    crate::cli::destination_arg(text)
        .map(Some)
        .map_err(|why| Error::invalid(format!("destination: {why}")))
}

fn ms(ns: u64) -> u64 {
    ns / 1_000_000
}

pub fn policy_message(rules: &Rules, quorum: Option<&Quorum>) -> pb::BreakerPolicy {
    let p = &rules.policy;
    let per_destination = p.flags & policy_flags::DESTINATION != 0;
    pb::BreakerPolicy {
        granularity: if per_destination {
            pb::Granularity::Destination
        } else {
            pb::Granularity::Service
        }
        .into(),
        mode: if p.flags & policy_flags::AUDIT != 0 {
            "audit"
        } else {
            "enforce"
        }
        .into(),
        max_ejection_percent: rules.dest.max_ejection_percent,
        max_open_timeout_ms: ms(rules.dest.max_open_timeout_ns),
        destination_ttl_ms: ms(rules.dest.destination_ttl_ns),
        fleet_quorum: quorum.map_or_else(String::new, |q| match q.size {
            QuorumSize::Nodes(n) => n.to_string(),
            QuorumSize::Percent(p) => format!("{p}%"),
        }),
        fleet_quorum_window_ms: quorum.map_or(0, |q| q.window.as_millis() as u64),
        min_requests: p.min_requests,
        failure_ratio: f64::from(p.failure_ratio_ppm) / f64::from(RATIO_ONE),
        consecutive_failures: p.consecutive_failures,
        max_failures: p.max_failures,
        interval_ms: ms(p.interval_ns),
        open_timeout_ms: ms(p.open_timeout_ns),
        half_open_max: p.half_open_max,
        errno: errno_name(p.errno),
        slow_connect_ms: ms(p.slow_connect_ns),
        terminate_established: p.flags & policy_flags::TERMINATE != 0,
    }
}

pub fn state_message(s: u32) -> pb::BreakerState {
    match s {
        state::CLOSED => pb::BreakerState::Closed,
        state::OPEN => pb::BreakerState::Open,
        state::HALF_OPEN => pb::BreakerState::HalfOpen,
        _ => pb::BreakerState::Unspecified,
    }
}

pub fn cause_message(c: u32) -> pb::BreakerCause {
    // The proto's values are the kernel's causes (a test keeps them in step).
    i32::try_from(c)
        .ok()
        .and_then(|c| pb::BreakerCause::try_from(c).ok())
        .unwrap_or(pb::BreakerCause::Unspecified)
}

pub fn breaker_message(b: &BreakerView) -> pb::Breaker {
    let c = &b.counts;
    pb::Breaker {
        service: b.service.clone(),
        state: state_message(c.state).into(),
        forced: c.forced != 0,
        reason: b.reason.clone(),
        requests: c.requests,
        failures: c.failures,
        successes: c.successes,
        consecutive_failures: c.consecutive_failures,
        consecutive_successes: c.consecutive_successes,
        rejected: b.totals.rejected,
        trips: b.totals.trips,
        probes: b.totals.probes,
        open_remaining_ms: b.open_remaining_ms,
        policy: Some(policy_message(
            &Rules {
                policy: b.policy,
                dest: b.dest,
            },
            b.quorum.as_ref(),
        )),
        events_lost: b.totals.events_lost,
        policy_owner: owner_message(Some(b.policy_owner)).into(),
        tripped_by: owner_message(b.tripped_by).into(),
        destinations: b.destinations.iter().map(destination_breaker).collect(),
        live_destinations: b.dest.live,
        ejected: b.ejected() as u32,
        ejections_capped: b.more_totals.capped,
        destinations_untracked: b.more_totals.untracked,
        audited: b.more_totals.audited,
        protected: b.protected.iter().map(ToString::to_string).collect(),
    }
}

fn destination_breaker(d: &DestinationView) -> pb::DestinationBreaker {
    let c = &d.counts;
    pb::DestinationBreaker {
        destination: d.destination.to_string(),
        state: state_message(c.state).into(),
        forced: c.forced != 0,
        reason: d.reason.clone(),
        requests: c.requests,
        failures: c.failures,
        consecutive_failures: c.consecutive_failures,
        open_remaining_ms: d.open_remaining_ms,
        trips: d.trips,
        idle_ms: ms(d.idle_ns),
        tripped_by: owner_message(d.tripped_by).into(),
    }
}

pub fn owner_message(owner: Option<Owner>) -> pb::Owner {
    match owner {
        None => pb::Owner::Unspecified,
        Some(Owner::Local) => pb::Owner::Local,
        Some(Owner::Config) => pb::Owner::Config,
        Some(Owner::Fleet) => pb::Owner::Fleet,
    }
}

/// An event for a subscriber that lost `lost` events just before it.
pub fn event_message(e: &BreakerEvent, lost: u64) -> pb::BreakerEvent {
    let t = &e.transition;
    pb::BreakerEvent {
        service: e.service.clone(),
        from: state_message(t.from).into(),
        to: state_message(t.to).into(),
        cause: cause_message(t.cause).into(),
        requests: t.requests,
        failures: t.failures,
        consecutive_failures: t.consecutive_failures,
        time_unix_ms: e
            .time
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        reason: e.reason.clone(),
        lost,
        destination: e.destination.map(|d| d.to_string()).unwrap_or_default(),
    }
}

fn direction_message(d: u8) -> pb::Direction {
    if d == direction::INBOUND {
        pb::Direction::Inbound
    } else {
        pb::Direction::Outbound
    }
}

/// A direction filter: unspecified is both.
pub fn direction_filter(v: i32) -> Result<Option<u8>> {
    match pb::Direction::try_from(v) {
        Ok(pb::Direction::Unspecified) => Ok(None),
        Ok(pb::Direction::Outbound) => Ok(Some(direction::OUTBOUND)),
        Ok(pb::Direction::Inbound) => Ok(Some(direction::INBOUND)),
        Err(_) => Err(Error::invalid(format!("direction: unknown value {v}"))),
    }
}

pub fn destination_sort(v: i32) -> Result<DestinationSort> {
    match pb::DestinationSort::try_from(v) {
        Ok(pb::DestinationSort::Opened) => Ok(DestinationSort::Opened),
        Ok(pb::DestinationSort::Failed) => Ok(DestinationSort::Failed),
        Ok(pb::DestinationSort::Active | pb::DestinationSort::Unspecified) => {
            Ok(DestinationSort::Active)
        }
        Err(_) => Err(Error::invalid(format!("sort: unknown value {v}"))),
    }
}

pub fn conn_counts(s: &ConnStats) -> pb::ConnCounts {
    conn_counters!(literal pb::ConnCounts, s)
}

/// A service's counts as the API sent them (the CLI reads them back).
pub fn conn_stats(c: &pb::ConnCounts) -> ConnStats {
    conn_counters!(literal ConnStats, c)
}

/// A destination's counts as the API sent them.
pub fn destination_stats(d: &pb::Destination) -> ConnStats {
    conn_counters!(literal ConnStats, d)
}

pub fn service_message(s: &ServiceSummary) -> pb::Service {
    let connect = latency::summarize(&s.connect);
    pb::Service {
        connect_p50_us: connect.p50,
        connect_p99_us: connect.p99,
        name: s.service.name.clone(),
        endpoints: s
            .service
            .endpoints
            .iter()
            .map(ToString::to_string)
            .collect(),
        outbound: Some(conn_counts(&s.stats[0])),
        inbound: Some(conn_counts(&s.stats[1])),
        owner: owner_message(Some(s.owner)).into(),
        shadowed: owner_message(s.shadowed).into(),
        protected: s.protected.iter().map(ToString::to_string).collect(),
    }
}

fn address(addr: &[u8; 16]) -> String {
    display_addr(addr).to_string()
}

pub fn destination_message(d: &Destination) -> pb::Destination {
    let (k, s) = (&d.key, &d.stats);
    conn_counters!(literal pb::Destination, s,
        address: address(&k.addr),
        port: k.port.into(),
        service: d.service.clone(),
        direction: direction_message(k.direction).into(),
        netns: k.netns,
    )
}

pub fn connection_message(c: &Connection<'_>) -> pb::Connection {
    let r = c.row;
    let comm_len = r.comm.iter().position(|&b| b == 0).unwrap_or(r.comm.len());
    pb::Connection {
        local_address: address(&r.saddr),
        local_port: r.sport.into(),
        remote_address: address(&r.daddr),
        remote_port: r.dport.into(),
        direction: direction_message(r.direction).into(),
        state: tcp_state::name(r.state).to_owned(),
        netns: r.netns,
        pid: r.pid,
        comm: String::from_utf8_lossy(&r.comm[..comm_len]).into_owned(),
        cgroup_id: r.cgroup_id,
        service: c.service.to_owned(),
        age_ms: r.age_ms,
        cookie: r.cookie,
    }
}

pub fn histogram_message(kind: u32, h: &Histogram) -> pb::Histogram {
    let s = latency::summarize(h);
    pb::Histogram {
        kind: breakwater_common::hist_kind::NAMES[kind as usize].to_owned(),
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

pub fn latency_response(l: &Latency) -> pb::GetLatencyResponse {
    pb::GetLatencyResponse {
        histograms: l
            .histograms
            .iter()
            .map(|(kind, h)| histogram_message(*kind, h))
            .collect(),
        features_off: l.features_off.iter().map(feature_message).collect(),
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

pub fn time_wait_response(v: &TimeWaitView) -> pb::GetTimeWaitResponse {
    pb::GetTimeWaitResponse {
        destinations: v
            .destinations
            .iter()
            .map(|d| {
                let t = &d.time_wait;
                pb::TimeWaitDestination {
                    entered_per_s: d.entered_per_s,
                    address: address(&t.addr),
                    port: t.port.into(),
                    direction: direction_message(t.direction).into(),
                    netns: t.netns,
                    service: d.service.clone(),
                    time_wait: t.count,
                }
            })
            .collect(),
        pressure: v
            .pressure
            .iter()
            .map(|(p, service)| pb::PortPressure {
                netns: p.netns,
                source_address: address(&p.saddr),
                address: address(&p.daddr),
                port: p.dport.into(),
                service: service.clone(),
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
            .collect(),
        services: v
            .services
            .iter()
            .map(|s| pb::ServiceTimeWait {
                service: s.service.clone(),
                outbound: s.outbound,
                inbound: s.inbound,
            })
            .collect(),
    }
}

pub fn advise_response(a: &Advice) -> pb::AdviseResponse {
    pb::AdviseResponse {
        findings: a
            .findings
            .iter()
            .map(|f| pb::Finding {
                kind: f.kind.to_owned(),
                severity: match f.severity {
                    advise::Severity::Info => pb::Severity::Info,
                    advise::Severity::Warn => pb::Severity::Warn,
                    advise::Severity::Critical => pb::Severity::Critical,
                }
                .into(),
                netns: f.netns,
                subject: f.subject.clone(),
                evidence: f.evidence.clone(),
                recommendation: f.recommendation.clone(),
            })
            .collect(),
        namespaces: a
            .namespaces
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
        file_max: a.file_max,
    }
}

/// The programs, maps, counters and features of `GetAgentInfo`, on `base`.
pub fn agent_info(s: AgentState, base: pb::GetAgentInfoResponse) -> pb::GetAgentInfoResponse {
    pb::GetAgentInfoResponse {
        programs: s
            .programs
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
        maps: s
            .maps
            .into_iter()
            .map(|m| pb::MapInfo {
                name: m.name.to_owned(),
                capacity: m.capacity,
                entries: m.entries,
                evictions: m.evictions,
            })
            .collect(),
        counters: s
            .counters
            .into_iter()
            .map(|(name, value)| pb::Counter {
                name: name.to_owned(),
                value,
            })
            .collect(),
        features: s.features.iter().map(feature_message).collect(),
        fleet: s.fleet.map(|f| pb::FleetLink {
            node: f.node,
            etcd: f.endpoints,
            connected: f.connected,
            since_unix_ms: f
                .since
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            applied_revision: f.applied_revision,
            invalid_records: f.invalid_records,
            not_applied: f.not_applied,
            last_error: f.last_error,
        }),
        ..base
    }
}

pub fn reload_response(r: Reloaded) -> pb::ReloadConfigResponse {
    pb::ReloadConfigResponse {
        config_path: r.config_path,
        services_added: r.services_added,
        services_changed: r.services_changed,
        services_removed: r.services_removed,
        policies_changed: r.policies_changed,
        scope_added: r.scope_added,
        scope_removed: r.scope_removed,
        applied: r.applied,
        pending_restart: r.pending_restart,
    }
}

/// A connection event for a subscriber that lost `lost` events just before it.
pub fn connection_event_message(e: &ConnectionEvent, lost: u64) -> pb::ConnectionEvent {
    pb::ConnectionEvent {
        kind: match e.kind {
            ConnectionEventKind::Opened => pb::ConnectionEventKind::Opened,
            ConnectionEventKind::Closed => pb::ConnectionEventKind::Closed,
            ConnectionEventKind::Failed => pb::ConnectionEventKind::Failed,
            ConnectionEventKind::Rejected => pb::ConnectionEventKind::Rejected,
            ConnectionEventKind::Unspecified => pb::ConnectionEventKind::Unspecified,
        }
        .into(),
        reason: e.reason.clone(),
        direction: direction_message(e.direction).into(),
        local_address: e.local_address.map(|a| a.to_string()).unwrap_or_default(),
        local_port: e.local_port.into(),
        remote_address: e.remote_address.to_string(),
        remote_port: e.remote_port.into(),
        netns: e.netns,
        pid: e.pid,
        comm: e.comm.clone(),
        cgroup_id: e.cgroup_id,
        container_id: e.container_id.clone(),
        cgroup: e.cgroup.clone(),
        service: e.service.clone(),
        time_unix_ms: e.time_unix_ms,
        bytes_sent: e.bytes_sent,
        bytes_received: e.bytes_received,
        duration_us: e.duration_us,
        lost: e.lost + lost,
    }
}

#[cfg(test)]
mod tests {
    use breakwater_common::breaker::{cause, Counts, Totals, Transition};

    use super::*;
    use crate::core::{
        features::{Feature, Features},
        policy::cause_name,
    };

    const S: u64 = 1_000_000_000;

    #[test]
    fn requests_map_to_specs() {
        let r = pb::SetPolicyRequest {
            service: "db".into(),
            preset: "nginx".into(),
            open_timeout_ms: Some(5000),
            errno: Some("EPERM".into()),
            ..Default::default()
        };
        let s = PolicySpec::from_request(&r);
        assert_eq!(s.preset.as_deref(), Some("nginx"));
        assert_eq!(s.open_timeout, Some(Duration::from_secs(5)));
        assert_eq!(s.interval, None);
        let p = s.resolve().unwrap();
        assert_eq!((p.open_timeout_ns, p.errno, p.max_failures), (5 * S, 1, 3));
        assert_eq!(PolicySpec::from_request(&Default::default()).preset, None);
    }

    #[test]
    fn policies_map_back_to_messages() {
        let p = PolicySpec::preset("gobreaker").resolve().unwrap();
        let m = policy_message(&p.into(), None);
        assert_eq!(m.failure_ratio, 0.6);
        assert_eq!(
            (m.min_requests, m.interval_ms, m.open_timeout_ms),
            (3, 60_000, 30_000)
        );
        assert_eq!(m.errno, "ECONNREFUSED");
        assert!(m.terminate_established);
        assert_eq!(errno_name(999), "errno 999");
        // A message's policy resolves to the same kernel policy.
        let again = PolicySpec::from_request(&pb::SetPolicyRequest {
            min_requests: Some(m.min_requests),
            failure_ratio: Some(m.failure_ratio),
            consecutive_failures: Some(m.consecutive_failures),
            max_failures: Some(m.max_failures),
            interval_ms: Some(m.interval_ms),
            open_timeout_ms: Some(m.open_timeout_ms),
            half_open_max: Some(m.half_open_max),
            errno: Some(m.errno.clone()),
            slow_connect_ms: Some(m.slow_connect_ms),
            terminate_established: Some(m.terminate_established),
            ..Default::default()
        })
        .resolve()
        .unwrap();
        assert_eq!(again, p);
    }

    #[test]
    fn states_and_causes_match_the_kernel() {
        for s in [state::CLOSED, state::OPEN, state::HALF_OPEN] {
            let name = state_message(s).as_str_name().to_ascii_lowercase();
            assert_eq!(name.strip_prefix("breaker_state_"), Some(state::name(s)));
        }
        assert_eq!(state_message(99), pb::BreakerState::Unspecified);
        for (c, name) in cause::NAMES.iter().enumerate().skip(1) {
            let m = cause_message(c as u32).as_str_name().to_ascii_lowercase();
            assert_eq!(m.strip_prefix("breaker_cause_"), Some(*name));
        }
        assert_eq!(cause_message(cause::NONE), pb::BreakerCause::Unspecified);
        assert_eq!(cause_message(cause::COUNT), pb::BreakerCause::Unspecified);
    }

    #[test]
    fn breakers_and_events_become_messages() {
        let view = BreakerView {
            service: "db".into(),
            policy: PolicySpec::preset("nginx").resolve().unwrap(),
            counts: Counts {
                state: state::OPEN,
                forced: 1,
                requests: 7,
                failures: 3,
                consecutive_failures: 2,
                ..Default::default()
            },
            totals: Totals {
                rejected: 11,
                trips: 2,
                probes: 1,
                events_lost: 0,
            },
            reason: "maintenance".into(),
            open_remaining_ms: 2500,
            policy_owner: Owner::Fleet,
            tripped_by: Some(Owner::Local),
            quorum: None,
            dest: Default::default(),
            more_totals: Default::default(),
            destinations: Vec::new(),
            protected: Vec::new(),
        };
        let json = serde_json::to_value(breaker_message(&view)).unwrap();
        for (k, v) in [
            ("service", serde_json::json!("db")),
            ("state", serde_json::json!("open")),
            ("forced", serde_json::json!(true)),
            ("requests", serde_json::json!(7)),
            ("failures", serde_json::json!(3)),
            ("consecutive_failures", serde_json::json!(2)),
            ("rejected", serde_json::json!(11)),
            ("trips", serde_json::json!(2)),
            ("open_remaining_ms", serde_json::json!(2500)),
            ("reason", serde_json::json!("maintenance")),
        ] {
            assert_eq!(json[k], v, "{k}");
        }
        assert_eq!(json["policy"]["max_failures"], 3);

        let event = BreakerEvent {
            service: "db".into(),
            transition: Transition {
                from: state::HALF_OPEN,
                to: state::OPEN,
                cause: cause::PROBE_FAILURE,
                requests: 1,
                failures: 1,
                consecutive_failures: 1,
            },
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1234),
            reason: String::new(),
            destination: None,
        };
        let json = serde_json::to_value(event_message(&event, 4)).unwrap();
        assert_eq!(json["from"], "half_open");
        assert_eq!(json["to"], "open");
        assert_eq!(json["cause"], "probe_failure");
        assert_eq!(json["time_unix_ms"], 1234);
        assert_eq!(json["lost"], 4);
        assert_eq!(cause_name(cause::TTL_EXPIRED), "ttl_expired");
    }

    #[test]
    fn features_keep_their_names_and_statuses() {
        let mut f = Features::default();
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
        assert_eq!(
            tonic::Status::from(err).code(),
            tonic::Code::InvalidArgument
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
    fn specs_go_to_requests_and_back() {
        for case in crate::core::conformance::table() {
            for run in case.runs {
                let req = run.policy.to_request("db");
                assert_eq!(req.service, "db");
                assert_eq!(PolicySpec::from_request(&req), run.policy, "{}", case.name);
            }
        }
    }
}
