//! Proto <-> domain: every message the API sends is made here from the core's types, and every
//! request read into them.

use std::time::{Duration, SystemTime};

use breakwater_common::breaker::{policy_flags, state, Policy, RATIO_ONE};
use breakwater_proto::v1 as pb;

use super::enforce::{BreakerEventView, BreakerView};
use crate::core::policy::{errno_name, PolicySpec};

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
        }
    }
}

fn ms(ns: u64) -> u64 {
    ns / 1_000_000
}

pub fn policy_message(p: &Policy) -> pb::BreakerPolicy {
    pb::BreakerPolicy {
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
        policy: Some(policy_message(&b.policy)),
        events_lost: b.totals.events_lost,
    }
}

/// An event for a subscriber that lost `lost` events just before it.
pub fn event_message(e: &BreakerEventView, lost: u64) -> pb::BreakerEvent {
    pb::BreakerEvent {
        service: e.service.clone(),
        from: state_message(e.from).into(),
        to: state_message(e.to).into(),
        cause: cause_message(e.cause).into(),
        requests: e.requests,
        failures: e.failures,
        consecutive_failures: e.consecutive_failures,
        time_unix_ms: e
            .time
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        reason: e.reason.clone(),
        lost,
    }
}

#[cfg(test)]
mod tests {
    use breakwater_common::breaker::{cause, Counts, Totals};

    use super::*;
    use crate::core::policy::cause_name;

    const S: u64 = 1_000_000_000;

    fn spec(preset: &str) -> PolicySpec {
        PolicySpec {
            preset: Some(preset.into()),
            ..Default::default()
        }
    }

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
        let p = spec("gobreaker").resolve().unwrap();
        let m = policy_message(&p);
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
            policy: spec("nginx").resolve().unwrap(),
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

        let event = BreakerEventView {
            service: "db".into(),
            from: state::HALF_OPEN,
            to: state::OPEN,
            cause: cause::PROBE_FAILURE,
            requests: 1,
            failures: 1,
            consecutive_failures: 1,
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1234),
            reason: String::new(),
        };
        let json = serde_json::to_value(event_message(&event, 4)).unwrap();
        assert_eq!(json["from"], "half_open");
        assert_eq!(json["to"], "open");
        assert_eq!(json["cause"], "probe_failure");
        assert_eq!(json["time_unix_ms"], 1234);
        assert_eq!(json["lost"], 4);
        assert_eq!(cause_name(cause::TTL_EXPIRED), "ttl_expired");
    }
}
