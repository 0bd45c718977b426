//! Circuit-breaker policies as people write them (a preset, explicit fields, or both) and as the
//! kernel keeps them ([`Policy`]), with every check a policy must pass.

use std::time::Duration;

use breakwater_common::breaker::{cause, policy_flags, DestPolicy, Policy, RATIO_ONE};

use crate::error::{Error, Result};

/// Named starting points for a policy, with what each sets (the CLI's help shows it; a unit test
/// resolves each one and checks the text against its fields).
pub const PRESETS: [(&str, &str); 3] = [
    (
        "gobreaker",
        "min_requests 3, failure_ratio 0.6, interval 60s, open_timeout 30s, half_open_max 1",
    ),
    (
        "nginx",
        "nginx's max_fails=3 fail_timeout=30s on each server: granularity destination, \
         max_failures 3, interval 30s, open_timeout 30s, half_open_max 1, \
         max_ejection_percent 100",
    ),
    (
        "envoy",
        "Envoy's outlier detection defaults: granularity destination, consecutive_failures 5, \
         open_timeout 30s, max_ejection_percent 10, max_open_timeout 300s, half_open_max 1",
    ),
];

/// Values of `mode`: refuse connects while open, or only count and report what would be.
pub const MODES: [&str; 2] = ["enforce", "audit"];

/// Values of `granularity`: one breaker for the service, or one per destination (address:port).
pub const GRANULARITIES: [&str; 2] = ["service", "destination"];

/// Destination granularity's defaults.
pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 50;
pub const DEFAULT_DESTINATION_TTL: Duration = Duration::from_secs(600);
/// The growth cap of the open timeout with destination granularity (Envoy's
/// `max_ejection_time`); with service granularity the default is 0: no growth (gobreaker).
pub const DEFAULT_MAX_OPEN_TIMEOUT: Duration = Duration::from_secs(300);

/// A policy as the core keeps it: the kernel's `Policy` and what destination granularity adds
/// (`DestPolicy`; its `live` is the agent's count, not part of the policy).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    pub policy: Policy,
    pub dest: DestPolicy,
}

impl From<Policy> for Rules {
    fn from(policy: Policy) -> Self {
        let dest = if policy.flags & policy_flags::DESTINATION != 0 {
            DestPolicy {
                max_open_timeout_ns: ns(DEFAULT_MAX_OPEN_TIMEOUT),
                destination_ttl_ns: ns(DEFAULT_DESTINATION_TTL),
                max_ejection_percent: DEFAULT_MAX_EJECTION_PERCENT,
                live: 0,
            }
        } else {
            DestPolicy::default()
        };
        Self { policy, dest }
    }
}

impl Rules {
    /// Whether each destination has its own breaker.
    pub fn per_destination(&self) -> bool {
        self.policy.flags & policy_flags::DESTINATION != 0
    }
}

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
    /// The fleet quorum rule (see [`Quorum`]): a count of nodes ("3") or a share of the live
    /// ones ("50%"). Kept by the agent, not the kernel.
    pub fleet_quorum: Option<String>,
    pub fleet_quorum_window: Option<Duration>,
    /// "service" (one breaker) or "destination" (one per address:port of the service).
    pub granularity: Option<String>,
    /// Destination granularity: at most this share of the destinations ejected at once.
    pub max_ejection_percent: Option<u32>,
    /// Cap of the open timeout that grows with each consecutive trip; 0: it does not grow.
    pub max_open_timeout: Option<Duration>,
    /// Destination granularity: destinations not seen for this long are forgotten (and no
    /// longer count as the service's).
    pub destination_ttl: Option<Duration>,
    /// "enforce" (refuse while open) or "audit" (count and report what would be refused).
    pub mode: Option<String>,
}

/// How many nodes make a fleet quorum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuorumSize {
    Nodes(u32),
    /// Percent of the live nodes, rounded up.
    Percent(u32),
}

/// The fleet quorum rule: when `size` nodes have tripped the service by themselves within
/// `window`, every node opens it for `open_timeout`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quorum {
    pub size: QuorumSize,
    pub window: Duration,
}

/// The quorum window when none is given.
pub const DEFAULT_QUORUM_WINDOW: Duration = Duration::from_secs(60);

impl Quorum {
    /// Nodes needed out of `live`: at least 1.
    pub fn needed(&self, live: usize) -> usize {
        match self.size {
            QuorumSize::Nodes(n) => n as usize,
            QuorumSize::Percent(p) => (live * p as usize).div_ceil(100),
        }
        .max(1)
    }

    pub fn describe(&self) -> String {
        let size = match self.size {
            QuorumSize::Nodes(n) => n.to_string(),
            QuorumSize::Percent(p) => format!("{p}%"),
        };
        format!(
            "{size} nodes within {}",
            humantime::format_duration(self.window)
        )
    }
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
    per_destination: bool,
    max_ejection_percent: u32,
    max_open_timeout: Option<Duration>,
    audit: bool,
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
        per_destination: false,
        max_ejection_percent: DEFAULT_MAX_EJECTION_PERCENT,
        max_open_timeout: None,
        audit: false,
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
        // ... on each `server` line of an upstream: per destination, and nginx marks every
        // server down if all fail.
        "nginx" => Ok(Fields {
            consecutive_failures: 0,
            max_failures: 3,
            interval: secs(30),
            open_timeout: secs(30),
            half_open_max: 1,
            per_destination: true,
            max_ejection_percent: 100,
            ..base()
        }),
        // Envoy's outlier detection: consecutive_5xx 5 (here failed connects), base_ejection_time
        // 30s, max_ejection_percent 10, max_ejection_time 300s.
        "envoy" => Ok(Fields {
            consecutive_failures: 5,
            open_timeout: secs(30),
            half_open_max: 1,
            per_destination: true,
            max_ejection_percent: 10,
            max_open_timeout: Some(secs(300)),
            ..base()
        }),
        _ => Err(Error::invalid(format!(
            "unknown preset {name:?} (known: {})",
            PRESETS.map(|(n, _)| n).join(", ")
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
    /// A preset, as it is.
    pub fn preset(name: &str) -> Self {
        Self {
            preset: Some(name.to_owned()),
            ..Default::default()
        }
    }

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
        if let Some(g) = &self.granularity {
            f.per_destination = match g.trim().to_ascii_lowercase().as_str() {
                "service" => false,
                "destination" => true,
                _ => {
                    return Err(Error::invalid(format!(
                        "granularity {g:?}: expected {}",
                        GRANULARITIES.join(" or ")
                    )))
                }
            };
        }
        if let Some(m) = &self.mode {
            f.audit = match m.trim().to_ascii_lowercase().as_str() {
                "enforce" => false,
                "audit" => true,
                _ => {
                    return Err(Error::invalid(format!(
                        "mode {m:?}: expected {}",
                        MODES.join(" or ")
                    )))
                }
            };
        }
        if let Some(p) = self.max_ejection_percent {
            f.max_ejection_percent = p;
        }
        if let Some(d) = self.max_open_timeout {
            f.max_open_timeout = Some(d);
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
        if f.per_destination {
            flags |= policy_flags::DESTINATION;
        }
        if f.audit {
            flags |= policy_flags::AUDIT;
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
}

impl PolicySpec {
    /// The kernel's policy and destination granularity's rules, or the first thing wrong.
    pub fn rules(&self) -> Result<Rules> {
        let policy = self.resolve()?;
        let mut rules = Rules::from(policy);
        let per_destination = rules.per_destination();
        let percent = match (self.max_ejection_percent, self.preset_fields()?) {
            (Some(p), _) => p,
            (None, f) => f.max_ejection_percent,
        };
        if !(1..=100).contains(&percent) {
            return Err(Error::invalid(format!(
                "max_ejection_percent {percent} is outside 1..=100"
            )));
        }
        let max_open = match self.max_open_timeout {
            Some(d) => d,
            // The default never conflicts with a long open_timeout: it is at least that.
            None => match self.preset_fields()?.max_open_timeout {
                Some(d) => d,
                None if per_destination => {
                    DEFAULT_MAX_OPEN_TIMEOUT.max(Duration::from_nanos(policy.open_timeout_ns))
                }
                None => Duration::ZERO,
            },
        };
        check_duration("max_open_timeout", max_open)?;
        if !max_open.is_zero() && ns(max_open) < policy.open_timeout_ns {
            return Err(Error::invalid(format!(
                "max_open_timeout {} is shorter than open_timeout {} (0 turns the growth off)",
                humantime::format_duration(max_open),
                humantime::format_duration(Duration::from_nanos(policy.open_timeout_ns))
            )));
        }
        let ttl = self.destination_ttl.unwrap_or(DEFAULT_DESTINATION_TTL);
        check_duration("destination_ttl", ttl)?;
        if ttl < Duration::from_secs(1) {
            return Err(Error::invalid(
                "destination_ttl must be at least 1s (how long an idle destination is kept)",
            ));
        }
        if !per_destination
            && (self.max_ejection_percent.is_some()
                || self.destination_ttl.is_some()
                || !max_open.is_zero())
        {
            return Err(Error::invalid(
                "max_ejection_percent, max_open_timeout and destination_ttl need granularity \
                 destination",
            ));
        }
        rules.dest.max_ejection_percent = percent;
        rules.dest.max_open_timeout_ns = ns(max_open);
        rules.dest.destination_ttl_ns = ns(ttl);
        if !per_destination {
            rules.dest.max_ejection_percent = 0;
            rules.dest.destination_ttl_ns = 0;
        }
        Ok(rules)
    }

    fn preset_fields(&self) -> Result<Fields> {
        match self.preset.as_deref().map(str::trim) {
            None | Some("") => Ok(base()),
            Some(name) => preset(&name.to_ascii_lowercase()),
        }
    }

    /// The fleet quorum rule, if the policy has one; the first thing wrong with it otherwise.
    pub fn quorum(&self) -> Result<Option<Quorum>> {
        let Some(text) = self.fleet_quorum.as_deref().map(str::trim) else {
            if self.fleet_quorum_window.is_some() {
                return Err(Error::invalid(
                    "fleet_quorum_window needs fleet_quorum (how many nodes)",
                ));
            }
            return Ok(None);
        };
        let bad = || {
            Error::invalid(format!(
                "fleet_quorum {text:?}: expected a number of nodes (\"3\") or a percentage of the \
                 live nodes (\"50%\")"
            ))
        };
        let size = match text.strip_suffix('%') {
            Some(p) => match p.trim().parse::<u32>() {
                Ok(p @ 1..=100) => QuorumSize::Percent(p),
                _ => return Err(bad()),
            },
            None => match text.parse::<u32>() {
                Ok(n @ 1..) => QuorumSize::Nodes(n),
                _ => return Err(bad()),
            },
        };
        let window = self.fleet_quorum_window.unwrap_or(DEFAULT_QUORUM_WINDOW);
        check_duration("fleet_quorum_window", window)?;
        if window < Duration::from_secs(1) || window.subsec_nanos() != 0 {
            return Err(Error::invalid(format!(
                "fleet_quorum_window {} must be whole seconds, at least 1s (it is an etcd lease)",
                humantime::format_duration(window)
            )));
        }
        Ok(Some(Quorum { size, window }))
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

/// Name of a cause as the API prints it (`failure_ratio`, `manual`, ...).
pub fn cause_name(c: u32) -> &'static str {
    cause::NAMES.get(c as usize).copied().unwrap_or("unknown")
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn presets_are_what_they_say() {
        let g = PolicySpec::preset("gobreaker").resolve().unwrap();
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
        let n = PolicySpec::preset("NGINX").resolve().unwrap();
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
    fn every_preset_resolves_to_what_its_help_says() {
        for (name, sets) in PRESETS {
            let f = preset(name).unwrap();
            let secs = |d: Duration| format!("{}s", d.as_secs());
            let pairs = sets.rsplit(": ").next().unwrap().split(", ");
            for pair in pairs {
                let (field, value) = pair.split_once(' ').unwrap();
                let actual = match field {
                    "min_requests" => f.min_requests.to_string(),
                    "failure_ratio" => f.failure_ratio.to_string(),
                    "consecutive_failures" => f.consecutive_failures.to_string(),
                    "max_failures" => f.max_failures.to_string(),
                    "interval" => secs(f.interval),
                    "open_timeout" => secs(f.open_timeout),
                    "half_open_max" => f.half_open_max.to_string(),
                    "granularity" => GRANULARITIES[usize::from(f.per_destination)].to_owned(),
                    "max_ejection_percent" => f.max_ejection_percent.to_string(),
                    "max_open_timeout" => secs(f.max_open_timeout.unwrap_or_default()),
                    other => panic!("{name}: unknown field {other:?} in its help"),
                };
                assert_eq!(actual, value, "{name}: {field}");
            }
        }
    }

    #[test]
    fn audit_mode_is_a_flag_of_the_policy() {
        let mode = |m: &str| {
            PolicySpec {
                mode: Some(m.into()),
                ..Default::default()
            }
            .resolve()
        };
        assert_ne!(mode("AUDIT").unwrap().flags & policy_flags::AUDIT, 0);
        assert_eq!(mode("enforce").unwrap().flags & policy_flags::AUDIT, 0);
        assert_eq!(
            mode("dry-run").unwrap_err().to_string(),
            "mode \"dry-run\": expected enforce or audit"
        );
    }

    #[test]
    fn destination_rules_have_defaults_and_checks() {
        let per_dest = |f: fn(&mut PolicySpec)| {
            let mut spec = PolicySpec {
                granularity: Some("destination".into()),
                ..Default::default()
            };
            f(&mut spec);
            spec.rules()
        };
        let r = per_dest(|_| {}).unwrap();
        assert!(r.per_destination());
        assert_eq!(r.dest.max_ejection_percent, 50);
        assert_eq!(r.dest.max_open_timeout_ns, 300 * S);
        assert_eq!(r.dest.destination_ttl_ns, 600 * S);
        // A default never below open_timeout.
        let r = per_dest(|s| s.open_timeout = Some(Duration::from_secs(600))).unwrap();
        assert_eq!(r.dest.max_open_timeout_ns, 600 * S);
        let e = per_dest(|s| s.max_open_timeout = Some(Duration::from_secs(10)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("shorter than open_timeout"), "{e}");
        for bad in [0, 101] {
            let e = PolicySpec {
                granularity: Some("destination".into()),
                max_ejection_percent: Some(bad),
                ..Default::default()
            }
            .rules()
            .unwrap_err()
            .to_string();
            assert!(e.contains("outside 1..=100"), "{e}");
        }
        let e = per_dest(|s| s.granularity = Some("host".into()))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "granularity \"host\": expected service or destination");
        // Per-destination fields on a service's one breaker say so.
        let e = PolicySpec {
            max_ejection_percent: Some(20),
            ..Default::default()
        }
        .rules()
        .unwrap_err()
        .to_string();
        assert!(e.contains("need granularity destination"), "{e}");
        let svc = PolicySpec::default().rules().unwrap();
        assert!(!svc.per_destination());
        assert_eq!(svc.dest, DestPolicy::default());
        let envoy = PolicySpec::preset("envoy").rules().unwrap();
        assert_eq!(
            (
                envoy.dest.max_ejection_percent,
                envoy.dest.max_open_timeout_ns
            ),
            (10, 300 * S)
        );
    }

    #[test]
    fn quorums_are_counts_or_shares_of_live_nodes() {
        let q = |text: &str, window: Option<u64>| {
            PolicySpec {
                fleet_quorum: Some(text.into()),
                fleet_quorum_window: window.map(Duration::from_secs),
                ..Default::default()
            }
            .quorum()
        };
        let three = q("3", None).unwrap().unwrap();
        assert_eq!((three.needed(5), three.window), (3, DEFAULT_QUORUM_WINDOW));
        let half = q("50%", Some(30)).unwrap().unwrap();
        assert_eq!((half.needed(5), half.needed(4), half.needed(0)), (3, 2, 1));
        assert_eq!(half.describe(), "50% nodes within 30s");
        for bad in ["0", "0%", "101%", "x", "-1", ""] {
            let e = q(bad, None).unwrap_err().to_string();
            assert!(e.starts_with("fleet_quorum "), "{bad}: {e}");
        }
        let e = PolicySpec {
            fleet_quorum_window: Some(Duration::from_millis(1500)),
            fleet_quorum: Some("2".into()),
            ..Default::default()
        }
        .quorum()
        .unwrap_err()
        .to_string();
        assert!(e.contains("whole seconds"), "{e}");
        assert_eq!(PolicySpec::default().quorum().unwrap(), None);
    }

    #[test]
    fn errno_names_round_trip_in_any_case() {
        for (name, number) in ERRNOS {
            assert_eq!(parse_errno(&name.to_ascii_lowercase()).unwrap(), number);
            assert_eq!(errno_name(number), name);
        }
        let e = parse_errno("EAGAIN").unwrap_err().to_string();
        assert_eq!(
            e,
            "unknown errno \"EAGAIN\" (allowed: ECONNREFUSED, EHOSTUNREACH, EPERM)"
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
                PolicySpec::preset("hystrix"),
                "unknown preset \"hystrix\" (known: gobreaker, nginx, envoy)",
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
                    ..PolicySpec::preset("nginx")
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
                    ..PolicySpec::preset("gobreaker")
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
}
