//! Circuit-breaker policies as people write them (a preset, explicit fields, or both) and as the
//! kernel keeps them ([`Policy`]), with every check a policy must pass; and the one place where
//! breakers, policies and events become API messages.

use std::time::{Duration, SystemTime};

use breakwater_common::breaker::{cause, policy_flags, state, Policy, RATIO_ONE};
use breakwater_proto::v1 as pb;

use crate::{
    api::enforce::{BreakerEventView, BreakerView},
    error::{Error, Result},
};

/// Named starting points for a policy.
pub const PRESETS: [&str; 2] = ["gobreaker", "nginx"];

/// Errnos a refused `connect()` may return, by name.
pub const ERRNOS: [(&str, u32); 3] = [
    ("ECONNREFUSED", libc::ECONNREFUSED as u32),
    ("EHOSTUNREACH", libc::EHOSTUNREACH as u32),
    ("EPERM", libc::EPERM as u32),
];

/// Longest duration a policy or a trip accepts: far beyond any sensible value, far below what
/// the kernel's `now + duration` could overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Bytes of an operator's reason the kernel keeps (`SvcMeta::reason`).
pub const MAX_REASON: usize = 128;

/// A policy as written: an optional preset and overrides of any of its fields. Unset fields
/// come from the preset, or without one from the base policy (see [`base`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicySpec {
    pub preset: Option<String>,
    pub min_requests: Option<u32>,
    pub failure_ratio: Option<f64>,
    pub consecutive_failures: Option<u32>,
    pub max_failures: Option<u32>,
    pub interval: Option<Duration>,
    pub open_timeout: Option<Duration>,
    pub half_open_max: Option<u32>,
    pub errno: Option<String>,
    pub slow_connect: Option<Duration>,
    pub terminate_established: Option<bool>,
}

/// A policy with every field explicit, in the units people use.
#[derive(Clone, Debug, PartialEq)]
struct Fields {
    min_requests: u32,
    failure_ratio: f64,
    consecutive_failures: u32,
    max_failures: u32,
    interval: Duration,
    open_timeout: Duration,
    half_open_max: u32,
    errno: u32,
    slow_connect: Duration,
    terminate_established: bool,
}

/// The policy without a preset: gobreaker's library defaults (trip after 5 failures in a row,
/// counts never cleared by time, Open for 60 s, one probe).
fn base() -> Fields {
    Fields {
        min_requests: 0,
        failure_ratio: 0.0,
        consecutive_failures: 5,
        max_failures: 0,
        interval: Duration::ZERO,
        open_timeout: Duration::from_secs(60),
        half_open_max: 1,
        errno: libc::ECONNREFUSED as u32,
        slow_connect: Duration::ZERO,
        terminate_established: true,
    }
}

fn preset(name: &str) -> Result<Fields> {
    let secs = Duration::from_secs;
    match name {
        // sony/gobreaker as commonly configured: trip at 60% failures over at least 3 requests.
        "gobreaker" => Ok(Fields {
            min_requests: 3,
            failure_ratio: 0.6,
            consecutive_failures: 0,
            interval: secs(60),
            open_timeout: secs(30),
            half_open_max: 1,
            ..base()
        }),
        // nginx `max_fails=3 fail_timeout=30s`: 3 failures within 30 s open it for 30 s, then
        // one trial connection.
        "nginx" => Ok(Fields {
            consecutive_failures: 0,
            max_failures: 3,
            interval: secs(30),
            open_timeout: secs(30),
            half_open_max: 1,
            ..base()
        }),
        _ => Err(Error::invalid(format!(
            "unknown preset {name:?} (known: {})",
            PRESETS.join(", ")
        ))),
    }
}

/// The errno number for a name, case-insensitive.
pub fn parse_errno(name: &str) -> Result<u32> {
    ERRNOS
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name.trim()))
        .map(|&(_, v)| v)
        .ok_or_else(|| {
            Error::invalid(format!(
                "unknown errno {name:?} (allowed: {})",
                ERRNOS.map(|(n, _)| n).join(", ")
            ))
        })
}

/// The name of an errno number the kernel was given ("errno N" for one not in [`ERRNOS`]).
pub fn errno_name(errno: u32) -> String {
    ERRNOS
        .iter()
        .find(|&&(_, v)| v == errno)
        .map_or_else(|| format!("errno {errno}"), |(n, _)| (*n).to_owned())
}

/// A duration as people write it: "30s", "500ms", "2m", "1h 30m".
pub fn parse_duration(field: &str, text: &str) -> Result<Duration> {
    let d = humantime::parse_duration(text.trim()).map_err(|e| {
        Error::invalid(format!(
            "{field}: invalid duration {text:?} ({e}; e.g. \"30s\", \"500ms\", \"2m\")"
        ))
    })?;
    check_duration(field, d)?;
    Ok(d)
}

fn check_duration(field: &str, d: Duration) -> Result<()> {
    if d > MAX_DURATION {
        return Err(Error::invalid(format!(
            "{field} {} is too long (at most {})",
            humantime::format_duration(d),
            humantime::format_duration(MAX_DURATION)
        )));
    }
    Ok(())
}

fn ns(d: Duration) -> u64 {
    // Below MAX_DURATION, so it fits.
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl PolicySpec {
    /// The kernel's policy, or the first thing wrong with this one.
    pub fn resolve(&self) -> Result<Policy> {
        let mut f = match self.preset.as_deref().map(str::trim) {
            None | Some("") => base(),
            Some(name) => preset(&name.to_ascii_lowercase())?,
        };
        macro_rules! set {
            ($($field:ident),*) => { $(if let Some(v) = self.$field { f.$field = v; })* };
        }
        set!(
            min_requests,
            failure_ratio,
            consecutive_failures,
            max_failures,
            interval,
            open_timeout,
            half_open_max,
            slow_connect,
            terminate_established
        );
        if let Some(e) = &self.errno {
            f.errno = parse_errno(e)?;
        }

        if !(0.0..=1.0).contains(&f.failure_ratio) {
            return Err(Error::invalid(format!(
                "failure_ratio {} is outside 0..=1",
                f.failure_ratio
            )));
        }
        let ratio_ppm = (f.failure_ratio * f64::from(RATIO_ONE)).round() as u32;
        if f.failure_ratio > 0.0 && ratio_ppm == 0 {
            return Err(Error::invalid(format!(
                "failure_ratio {} is too small (the smallest is 0.000001; 0 turns the rule off)",
                f.failure_ratio
            )));
        }
        for (field, d) in [
            ("interval", f.interval),
            ("open_timeout", f.open_timeout),
            ("slow_connect", f.slow_connect),
        ] {
            check_duration(field, d)?;
        }
        if f.open_timeout.is_zero() {
            return Err(Error::invalid(
                "open_timeout must be more than 0 (how long the breaker stays open)",
            ));
        }
        if f.half_open_max == 0 {
            return Err(Error::invalid(
                "half_open_max must be at least 1 (probes admitted in half-open)",
            ));
        }
        if ratio_ppm == 0 && f.consecutive_failures == 0 && f.max_failures == 0 {
            return Err(Error::invalid(
                "the policy has no trip rule: set failure_ratio, consecutive_failures or \
                 max_failures above 0",
            ));
        }
        let mut flags = policy_flags::ENABLED;
        if f.terminate_established {
            flags |= policy_flags::TERMINATE;
        }
        Ok(Policy {
            min_requests: f.min_requests,
            failure_ratio_ppm: ratio_ppm,
            consecutive_failures: f.consecutive_failures,
            max_failures: f.max_failures,
            interval_ns: ns(f.interval),
            open_timeout_ns: ns(f.open_timeout),
            slow_connect_ns: ns(f.slow_connect),
            half_open_max: f.half_open_max,
            errno: f.errno,
            flags,
            _pad: 0,
        })
    }

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

/// A trip's time to live from the API (`None`: until reset).
pub fn trip_ttl(ttl_ms: Option<u64>) -> Result<Option<Duration>> {
    match ttl_ms {
        None => Ok(None),
        Some(0) => Err(Error::invalid(
            "ttl_ms must be more than 0 (leave it unset to trip until reset)",
        )),
        Some(ms) => {
            let d = Duration::from_millis(ms);
            check_duration("ttl", d)?;
            Ok(Some(d))
        }
    }
}

/// An operator's reason must fit what the kernel keeps.
pub fn check_reason(reason: &str) -> Result<()> {
    if reason.len() > MAX_REASON {
        return Err(Error::invalid(format!(
            "reason is {} bytes long (at most {MAX_REASON})",
            reason.len()
        )));
    }
    Ok(())
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

/// Name of a cause as the API prints it (`failure_ratio`, `manual`, ...).
pub fn cause_name(c: u32) -> &'static str {
    cause::NAMES.get(c as usize).copied().unwrap_or("unknown")
}

#[cfg(test)]
mod tests {
    use breakwater_common::breaker::{Counts, Totals};

    use super::*;

    const S: u64 = 1_000_000_000;

    fn spec(preset: &str) -> PolicySpec {
        PolicySpec {
            preset: Some(preset.into()),
            ..Default::default()
        }
    }

    #[test]
    fn presets_are_what_they_say() {
        let g = spec("gobreaker").resolve().unwrap();
        assert_eq!(
            g,
            Policy {
                min_requests: 3,
                failure_ratio_ppm: 600_000,
                consecutive_failures: 0,
                max_failures: 0,
                interval_ns: 60 * S,
                open_timeout_ns: 30 * S,
                slow_connect_ns: 0,
                half_open_max: 1,
                errno: 111,
                flags: policy_flags::ENABLED | policy_flags::TERMINATE,
                _pad: 0,
            }
        );
        let n = spec("NGINX").resolve().unwrap();
        assert_eq!(
            (n.max_failures, n.failure_ratio_ppm, n.consecutive_failures),
            (3, 0, 0)
        );
        assert_eq!(
            (n.interval_ns, n.open_timeout_ns, n.half_open_max),
            (30 * S, 30 * S, 1)
        );
    }

    #[test]
    fn no_preset_is_the_base_policy() {
        for preset in [None, Some(String::new())] {
            let p = PolicySpec {
                preset,
                ..Default::default()
            }
            .resolve()
            .unwrap();
            assert_eq!(p.consecutive_failures, 5);
            assert_eq!((p.failure_ratio_ppm, p.max_failures), (0, 0));
            assert_eq!((p.interval_ns, p.open_timeout_ns), (0, 60 * S));
            assert_eq!((p.half_open_max, p.errno), (1, 111));
            assert_eq!(p.flags, policy_flags::ENABLED | policy_flags::TERMINATE);
        }
    }

    #[test]
    fn overrides_replace_preset_fields() {
        let p = PolicySpec {
            preset: Some("gobreaker".into()),
            failure_ratio: Some(0.25),
            min_requests: Some(20),
            open_timeout: Some(Duration::from_millis(1500)),
            slow_connect: Some(Duration::from_millis(200)),
            errno: Some("ehostunreach".into()),
            terminate_established: Some(false),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!((p.failure_ratio_ppm, p.min_requests), (250_000, 20));
        assert_eq!(p.open_timeout_ns, 1_500_000_000);
        assert_eq!(p.slow_connect_ns, 200_000_000);
        assert_eq!(p.interval_ns, 60 * S, "kept from the preset");
        assert_eq!(p.errno, 113);
        assert_eq!(p.flags, policy_flags::ENABLED);

        let p = PolicySpec {
            consecutive_failures: Some(0),
            max_failures: Some(10),
            errno: Some("EPERM".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(
            (p.consecutive_failures, p.max_failures, p.errno),
            (0, 10, 1)
        );
    }

    #[test]
    fn bad_policies_say_why() {
        let cases = [
            (
                spec("hystrix"),
                "unknown preset \"hystrix\" (known: gobreaker, nginx)",
            ),
            (
                PolicySpec {
                    failure_ratio: Some(1.5),
                    ..Default::default()
                },
                "failure_ratio 1.5 is outside 0..=1",
            ),
            (
                PolicySpec {
                    failure_ratio: Some(-0.1),
                    ..Default::default()
                },
                "failure_ratio -0.1 is outside 0..=1",
            ),
            (
                PolicySpec {
                    failure_ratio: Some(f64::NAN),
                    ..Default::default()
                },
                "failure_ratio NaN is outside 0..=1",
            ),
            (
                PolicySpec {
                    failure_ratio: Some(1e-9),
                    ..Default::default()
                },
                "is too small",
            ),
            (
                PolicySpec {
                    open_timeout: Some(Duration::ZERO),
                    ..spec("nginx")
                },
                "open_timeout must be more than 0",
            ),
            (
                PolicySpec {
                    half_open_max: Some(0),
                    ..Default::default()
                },
                "half_open_max must be at least 1",
            ),
            (
                PolicySpec {
                    errno: Some("ETIMEDOUT".into()),
                    ..Default::default()
                },
                "unknown errno \"ETIMEDOUT\" (allowed: ECONNREFUSED, EHOSTUNREACH, EPERM)",
            ),
            (
                PolicySpec {
                    consecutive_failures: Some(0),
                    ..Default::default()
                },
                "the policy has no trip rule",
            ),
            (
                PolicySpec {
                    failure_ratio: Some(0.0),
                    ..spec("gobreaker")
                },
                "the policy has no trip rule",
            ),
            (
                PolicySpec {
                    interval: Some(MAX_DURATION + Duration::from_secs(1)),
                    ..Default::default()
                },
                "interval 30days 1s is too long (at most 30days)",
            ),
        ];
        for (spec, why) in cases {
            let err = spec.resolve().unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{spec:?}");
            assert!(
                err.to_string().contains(why),
                "{spec:?}: {err} lacks {why:?}"
            );
        }
    }

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(
            parse_duration("interval", "30s").unwrap(),
            Duration::from_secs(30)
        );
        assert_eq!(
            parse_duration("interval", "500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(
            parse_duration("interval", "2m").unwrap(),
            Duration::from_secs(120)
        );
        let err = parse_duration("open_timeout", "30")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("open_timeout: invalid duration \"30\""),
            "{err}"
        );
        let err = parse_duration("open_timeout", "31days")
            .unwrap_err()
            .to_string();
        assert!(err.contains("too long"), "{err}");
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
    fn trips_check_ttl_and_reason() {
        assert_eq!(trip_ttl(None).unwrap(), None);
        assert_eq!(
            trip_ttl(Some(1500)).unwrap(),
            Some(Duration::from_millis(1500))
        );
        assert!(trip_ttl(Some(0))
            .unwrap_err()
            .to_string()
            .contains("ttl_ms must be more than 0"));
        assert!(check_reason(&"x".repeat(MAX_REASON)).is_ok());
        assert!(check_reason(&"x".repeat(MAX_REASON + 1))
            .unwrap_err()
            .to_string()
            .contains("at most 128"));
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
