//! The records a `breakwater fleet` write puts in etcd, built from its flags and checked with
//! [`Record::parse`], the check the agents make when they read them: what passes here is what
//! the nodes will apply, and bad input exits 2 before anything is written.

use std::{collections::BTreeMap, time::Duration};

use super::super::{CliError, PolicyFlags};
use crate::{
    config::BreakerConfig,
    core::{policy::trip_ttl, service::validate_name},
    fleet::schema::{
        check_node_name, Keys, Kind, PolicyRecord, Record, Selector, ServiceRecord, TripRecord,
    },
};

/// A record to put, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Write {
    pub kind: Kind,
    pub name: String,
    pub key: String,
    pub record: Record,
    /// The value, as written.
    pub json: String,
    /// Put on a lease of this many seconds (a trip with `--for`).
    pub lease_secs: Option<i64>,
}

/// A record to delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Removal {
    pub kind: Kind,
    pub name: String,
    pub key: String,
}

/// `--node` and `--label` as the record's selector; a label given twice is refused rather than
/// one of the two kept.
pub fn selector(nodes: Vec<String>, labels: Vec<(String, String)>) -> Result<Selector, CliError> {
    let mut map = BTreeMap::new();
    for (key, value) in labels {
        if let Some(before) = map.insert(key.clone(), value.clone()) {
            return Err(CliError::Usage(format!(
                "--label {key} given twice ({key}={before} and {key}={value}); a node has one \
                 value per label"
            )));
        }
    }
    let mut nodes = nodes;
    nodes.sort();
    nodes.dedup();
    Ok(Selector { nodes, labels: map })
}

/// `--node NAME`: a node name as the agents' `--node-name` takes it.
pub fn node_arg(text: &str) -> Result<String, String> {
    check_node_name(text).map_err(|e| e.to_string())?;
    Ok(text.to_owned())
}

/// `--label KEY=VALUE`.
pub fn label_arg(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_owned(), value.trim().to_owned()))
        }
        _ => Err(format!("{text:?}: expected KEY=VALUE (e.g. zone=eu-1)")),
    }
}

/// `P/services/NAME`.
pub fn service(
    keys: &Keys,
    name: &str,
    endpoints: Vec<String>,
    selector: Selector,
) -> Result<Write, CliError> {
    let record = Record::Service(ServiceRecord {
        endpoints,
        selector,
    });
    write(keys, Kind::Service, name, &record, None)
}

/// `P/policies/NAME`, from the same flags as `breakwater policy set`.
pub fn policy(
    keys: &Keys,
    name: &str,
    flags: PolicyFlags,
    selector: Selector,
) -> Result<Write, CliError> {
    let record = Record::Policy(Box::new(PolicyRecord {
        policy: breaker_config(flags),
        selector,
    }));
    write(keys, Kind::Policy, name, &record, None)
}

/// `P/trips/NAME`; with a TTL, on a lease of that TTL rounded up to whole seconds.
pub fn trip(
    keys: &Keys,
    name: &str,
    destination: Option<std::net::SocketAddr>,
    ttl: Option<Duration>,
    reason: Option<String>,
    selector: Selector,
) -> Result<Write, CliError> {
    if ttl.is_some_and(|d| d.is_zero()) {
        return Err(CliError::Usage(format!(
            "--for must be more than 0 (leave it out to trip until `breakwater fleet reset {name}`)"
        )));
    }
    let ttl_ms = ttl.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    // The local API's check of a trip's TTL (Record::parse checks the reason, not the TTL).
    trip_ttl(ttl_ms).map_err(|e| CliError::Usage(format!("--for: {e}")))?;
    let record = Record::Trip(TripRecord {
        reason: reason.unwrap_or_default(),
        ttl_ms,
        selector,
    });
    validate_name(name)?;
    let name = match destination {
        Some(d) => crate::fleet::schema::destination_trip(name, d),
        None => name.to_owned(),
    };
    write(keys, Kind::Trip, &name, &record, ttl.map(lease_secs))
}

/// The lease that holds a trip of `ttl`: whole seconds, rounded up, at least 1.
pub fn lease_secs(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
}

/// A record of `kind` to delete.
pub fn removal(keys: &Keys, kind: Kind, name: &str) -> Result<Removal, CliError> {
    match kind {
        Kind::Trip => drop(crate::fleet::schema::trip_target(name)?),
        _ => validate_name(name)?,
    }
    Ok(Removal {
        kind,
        name: name.to_owned(),
        key: keys.object(kind, name),
    })
}

fn write(
    keys: &Keys,
    kind: Kind,
    name: &str,
    record: &Record,
    lease_secs: Option<i64>,
) -> Result<Write, CliError> {
    let json = record.to_json();
    // What the agents will read, read as they will read it.
    let record = Record::parse(kind, name, json.as_bytes())?;
    Ok(Write {
        kind,
        name: name.to_owned(),
        key: keys.object(kind, name),
        record,
        json,
        lease_secs,
    })
}

/// The policy flags as the config file's `[service.breaker]` (durations as "30s").
pub fn breaker_config(flags: PolicyFlags) -> BreakerConfig {
    let spec = crate::core::policy::PolicySpec::from(flags);
    let text = |d: Option<Duration>| d.map(duration_text);
    BreakerConfig {
        interval: text(spec.interval),
        open_timeout: text(spec.open_timeout),
        slow_connect: text(spec.slow_connect),
        fleet_quorum_window: text(spec.fleet_quorum_window),
        max_open_timeout: text(spec.max_open_timeout),
        destination_ttl: text(spec.destination_ttl),
        granularity: spec.granularity,
        mode: spec.mode,
        max_ejection_percent: spec.max_ejection_percent,
        preset: spec.preset,
        min_requests: spec.min_requests,
        failure_ratio: spec.failure_ratio,
        consecutive_failures: spec.consecutive_failures,
        max_failures: spec.max_failures,
        half_open_max: spec.half_open_max,
        errno: spec.errno,
        terminate_established: spec.terminate_established,
        fleet_quorum: spec.fleet_quorum,
    }
}

/// "30s", "1m30s", "1500ms": what `parse_duration` reads back as the same duration (the flags'
/// durations are whole milliseconds).
pub fn duration_text(d: Duration) -> String {
    if d.is_zero() {
        return "0s".into();
    }
    humantime::format_duration(d).to_string().replace(' ', "")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::policy::parse_duration;

    fn keys() -> Keys {
        Keys::new("/breakwater/v1").unwrap()
    }

    fn usage(r: Result<Write, CliError>) -> String {
        match r {
            Err(CliError::Usage(m)) => m,
            other => panic!("not a usage error: {other:?}"),
        }
    }

    #[test]
    fn services_are_checked_as_the_agents_check_them() {
        let w = service(
            &keys(),
            "db",
            vec!["10.0.0.0/24:5432".into()],
            selector(vec!["n2".into(), "n1".into(), "n2".into()], vec![]).unwrap(),
        )
        .unwrap();
        assert_eq!(w.key, "/breakwater/v1/services/db");
        assert_eq!(
            w.json,
            r#"{"endpoints":["10.0.0.0/24:5432"],"selector":{"nodes":["n1","n2"]}}"#
        );
        assert_eq!(w.lease_secs, None);
        let e = usage(service(
            &keys(),
            "db",
            vec!["10.0.0.1".into()],
            Selector::default(),
        ));
        assert!(e.contains("10.0.0.1"), "{e}");
        let e = usage(service(
            &keys(),
            "bad name",
            vec!["10.0.0.1:80".into()],
            Selector::default(),
        ));
        assert!(e.contains("bad name"), "{e}");
    }

    #[test]
    fn policies_are_the_config_files_fields() {
        let flags = PolicyFlags {
            preset: Some("gobreaker".into()),
            open_timeout: Some(Duration::from_secs(90)),
            slow_connect: Some(Duration::from_millis(1500)),
            interval: Some(Duration::ZERO),
            errno: Some("EPERM".into()),
            no_terminate: true,
            ..Default::default()
        };
        let labels = vec![("zone".to_owned(), "a".to_owned())];
        let w = policy(&keys(), "db", flags, selector(vec![], labels).unwrap()).unwrap();
        assert_eq!(
            w.json,
            r#"{"policy":{"preset":"gobreaker","interval":"0s","open_timeout":"1m30s","errno":"EPERM","slow_connect":"1s500ms","terminate_established":false},"selector":{"labels":{"zone":"a"}}}"#
        );
        let Record::Policy(p) = &w.record else {
            panic!("{w:?}")
        };
        assert!(p.policy.policy().is_ok());
        // No trip rule left: refused with the reason, as `breakwater policy set` refuses it.
        let e = usage(policy(
            &keys(),
            "db",
            PolicyFlags {
                consecutive_failures: Some(0),
                ..Default::default()
            },
            Selector::default(),
        ));
        assert!(
            e.starts_with("policy \"db\": ") && e.contains("no trip rule"),
            "{e}"
        );
        let e = usage(policy(
            &keys(),
            "db",
            PolicyFlags {
                failure_ratio: Some(2.0),
                ..Default::default()
            },
            Selector::default(),
        ));
        assert!(e.contains("failure_ratio 2 is outside 0..=1"), "{e}");
    }

    #[test]
    fn durations_read_back_the_same() {
        for ms in [
            0,
            1,
            500,
            1_000,
            1_500,
            30_000,
            90_000,
            3_600_000,
            86_400_000 + 1,
        ] {
            let d = Duration::from_millis(ms);
            assert_eq!(parse_duration("x", &duration_text(d)).unwrap(), d, "{ms}");
        }
        assert_eq!(duration_text(Duration::from_secs(30)), "30s");
    }

    #[test]
    fn trips_with_a_ttl_go_on_a_lease_of_whole_seconds() {
        let w = trip(
            &keys(),
            "db",
            None,
            Some(Duration::from_millis(1_500)),
            Some("db migration".into()),
            Selector::default(),
        )
        .unwrap();
        assert_eq!(w.key, "/breakwater/v1/trips/db");
        assert_eq!(w.json, r#"{"reason":"db migration","ttl_ms":1500}"#);
        assert_eq!(w.lease_secs, Some(2));
        let w = trip(&keys(), "db", None, None, None, Selector::default()).unwrap();
        assert_eq!((w.json.as_str(), w.lease_secs), ("{}", None));
        assert_eq!(lease_secs(Duration::from_millis(1)), 1);
        assert_eq!(lease_secs(Duration::from_secs(300)), 300);
        assert_eq!(lease_secs(Duration::from_millis(300_001)), 301);

        let e = usage(trip(
            &keys(),
            "db",
            None,
            Some(Duration::ZERO),
            None,
            Selector::default(),
        ));
        assert!(e.starts_with("--for must be more than 0"), "{e}");
        let e = usage(trip(
            &keys(),
            "db",
            None,
            None,
            Some("x".repeat(500)),
            Selector::default(),
        ));
        assert!(e.contains("reason is 500 bytes long"), "{e}");
        // One destination's trip: its own key under the service's.
        let dest = "10.0.0.5:8080".parse().unwrap();
        let w = trip(&keys(), "db", Some(dest), None, None, Selector::default()).unwrap();
        assert_eq!(w.key, "/breakwater/v1/trips/db/10.0.0.5:8080");
        assert_eq!(
            crate::fleet::schema::trip_target("db/10.0.0.5:8080").unwrap(),
            ("db", Some(dest))
        );
        assert!(crate::fleet::schema::trip_target("db/10.0.0.0/8:80").is_err());
    }

    #[test]
    fn selectors_refuse_a_label_twice() {
        let s = selector(
            vec![],
            vec![("zone".into(), "a".into()), ("tier".into(), "db".into())],
        )
        .unwrap();
        assert_eq!(s.labels.len(), 2);
        let Err(CliError::Usage(e)) = selector(
            vec![],
            vec![("zone".into(), "a".into()), ("zone".into(), "b".into())],
        ) else {
            panic!("accepted")
        };
        assert!(e.contains("--label zone given twice"), "{e}");
        assert_eq!(
            label_arg("zone = eu-1").unwrap(),
            ("zone".into(), "eu-1".into())
        );
        assert_eq!(
            label_arg("empty=").unwrap(),
            ("empty".into(), String::new())
        );
        assert!(label_arg("zone").is_err());
        assert!(label_arg("=a").is_err());
        assert!(node_arg("node-1.example.com").is_ok());
        assert!(node_arg("node 1").is_err());
    }

    #[test]
    fn removals_check_the_name() {
        let r = removal(&keys(), Kind::Trip, "db").unwrap();
        assert_eq!(r.key, "/breakwater/v1/trips/db");
        assert!(matches!(
            removal(&keys(), Kind::Trip, "a/b"),
            Err(CliError::Usage(_))
        ));
    }
}
