//! What the fleet keeps in etcd, under one prefix (default `/breakwater/v1`), each value a JSON
//! document. Desired state is written by operators (`breakwater fleet`); node state by agents,
//! on their lease, so it goes when the agent does. Each record is a Kubernetes-like spec, so a
//! CRD front end can map onto it one to one.
//!
//! | key | value | written by | lease |
//! |---|---|---|---|
//! | `P/services/NAME` | [`ServiceRecord`] | operators | - |
//! | `P/policies/NAME` | [`PolicyRecord`] | operators | - |
//! | `P/trips/NAME` | [`TripRecord`] | operators | the trip's TTL, if it has one |
//! | `P/nodes/NODE` | [`NodeRecord`] | the node's agent | the agent's |
//! | `P/breakers/NODE/NAME` | [`BreakerRecord`] | the node's agent | the agent's |
//! | `P/autotrips/NAME/NODE` | [`AutoTripRecord`] | the node's agent | the quorum window |

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    config::BreakerConfig,
    core::service::{parse_endpoints, validate_name},
    error::{Error, Result},
};

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/breakwater/v1";

/// A node's name: what `--node-name` takes and the keys hold (a DNS label or name, as
/// Kubernetes node names are).
pub fn check_node_name(node: &str) -> Result<()> {
    let ok = !node.is_empty()
        && node.len() <= 253
        && node
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "node name {node:?}: expected 1 to 253 letters, digits, '-', '.' or '_'"
        )))
    }
}

/// The kinds of desired state, by the key segment they live under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    Policy,
    Trip,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Service, Kind::Policy, Kind::Trip];

    pub fn segment(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::Policy => "policies",
            Kind::Trip => "trips",
        }
    }
}

/// The keys under one prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// `prefix` without its trailing slashes; it must start with `/`.
    pub fn new(prefix: &str) -> Result<Self> {
        let prefix = prefix.trim_end_matches('/');
        if !prefix.starts_with('/') || prefix.is_empty() {
            return Err(Error::invalid(format!(
                "fleet prefix {prefix:?} must start with \"/\" (e.g. {DEFAULT_PREFIX:?})"
            )));
        }
        Ok(Self {
            prefix: prefix.to_owned(),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// All records of a kind: `P/services/`.
    pub fn kind(&self, kind: Kind) -> String {
        format!("{}/{}/", self.prefix, kind.segment())
    }

    pub fn object(&self, kind: Kind, name: &str) -> String {
        format!("{}{name}", self.kind(kind))
    }

    pub fn nodes(&self) -> String {
        format!("{}/nodes/", self.prefix)
    }

    pub fn node(&self, node: &str) -> String {
        format!("{}{node}", self.nodes())
    }

    pub fn breakers(&self) -> String {
        format!("{}/breakers/", self.prefix)
    }

    pub fn node_breakers(&self, node: &str) -> String {
        format!("{}{node}/", self.breakers())
    }

    pub fn breaker(&self, node: &str, service: &str) -> String {
        format!("{}{service}", self.node_breakers(node))
    }

    pub fn autotrips(&self, service: &str) -> String {
        format!("{}/autotrips/{service}/", self.prefix)
    }

    pub fn autotrip(&self, service: &str, node: &str) -> String {
        format!("{}{node}", self.autotrips(service))
    }

    /// What a key of desired state names: its kind and the object's name. None for node state
    /// and for keys outside the prefix.
    pub fn parse<'k>(&self, key: &'k str) -> Option<(Kind, &'k str)> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        let (segment, name) = rest.split_once('/')?;
        let kind = Kind::ALL.into_iter().find(|k| k.segment() == segment)?;
        Some((kind, name))
    }

    /// The node and service of a `P/breakers/NODE/NAME` key.
    pub fn parse_breaker<'k>(&self, key: &'k str) -> Option<(&'k str, &'k str)> {
        key.strip_prefix(&self.breakers())?.split_once('/')
    }

    pub fn all_autotrips(&self) -> String {
        format!("{}/autotrips/", self.prefix)
    }

    /// The key ranges an agent watches, `[start, end)`: everything but `P/breakers/`, which
    /// other nodes write as their breakers change and no agent needs (so a node's watch carries
    /// the fleet's changes, not every node's traffic). The segments sort as `autotrips`,
    /// `breakers`, `nodes`, `policies`, `services`, `trips`.
    pub fn watched(&self) -> [(String, String); 2] {
        [
            (self.all_autotrips(), self.breakers()),
            (self.nodes(), format!("{}/trips0", self.prefix)),
        ]
    }

    /// The service and node of a `P/autotrips/NAME/NODE` key.
    pub fn parse_autotrip<'k>(&self, key: &'k str) -> Option<(&'k str, &'k str)> {
        key.strip_prefix(&self.all_autotrips())?.split_once('/')
    }

    /// The node of a `P/nodes/NODE` key.
    pub fn parse_node<'k>(&self, key: &'k str) -> Option<&'k str> {
        key.strip_prefix(&self.nodes())
    }
}

/// Which nodes a record applies to: all of them if both lists are empty; else the nodes named,
/// and the nodes whose labels include every one given.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Selector {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl Selector {
    pub fn is_all(&self) -> bool {
        self.nodes.is_empty() && self.labels.is_empty()
    }

    pub fn selects(&self, node: &str, labels: &BTreeMap<String, String>) -> bool {
        self.is_all()
            || self.nodes.iter().any(|n| n == node)
            || (!self.labels.is_empty()
                && self.labels.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }
}

/// `P/services/NAME`: a service's endpoints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceRecord {
    pub endpoints: Vec<String>,
    #[serde(default, skip_serializing_if = "Selector::is_all")]
    pub selector: Selector,
}

/// `P/policies/NAME`: the breaker policy of the service NAME, with the config file's fields.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyRecord {
    pub policy: BreakerConfig,
    #[serde(default, skip_serializing_if = "Selector::is_all")]
    pub selector: Selector,
}

/// `P/trips/NAME`: the service NAME is forced open on every selected node (`P/trips/NAME/IP:PORT`:
/// that destination of it, with granularity destination). A trip with a TTL
/// is written on an etcd lease of that TTL (rounded up to whole seconds), so etcd deletes it
/// when it ends and a node that joins late reads the remainder from the lease, not from any
/// node's clock. Deleting the key resets the breakers it tripped.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TripRecord {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// The TTL as given, in milliseconds (the lease holds it in whole seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Selector::is_all")]
    pub selector: Selector,
}

/// A desired-state record, read and checked.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    Service(ServiceRecord),
    Policy(Box<PolicyRecord>),
    Trip(TripRecord),
}

impl Record {
    /// Reads and checks the value of `kind`'s object `name`: the same checks as the local API's
    /// (names, endpoints, policy fields, reasons), so a record that passes here can be applied.
    pub fn parse(kind: Kind, name: &str, value: &[u8]) -> Result<Self> {
        match kind {
            Kind::Trip => drop(trip_target(name)?),
            _ => validate_name(name)?,
        }
        let bad = |e: serde_json::Error| {
            Error::invalid(format!("{} {name:?}: invalid record: {e}", kind.segment()))
        };
        let record = match kind {
            Kind::Service => {
                let r: ServiceRecord = serde_json::from_slice(value).map_err(bad)?;
                parse_endpoints(name, &r.endpoints)?;
                Record::Service(r)
            }
            Kind::Policy => {
                let r: PolicyRecord = serde_json::from_slice(value).map_err(bad)?;
                r.policy
                    .policy()
                    .map_err(|e| Error::invalid(format!("policy {name:?}: {e}")))?;
                Record::Policy(Box::new(r))
            }
            Kind::Trip => {
                let r: TripRecord = serde_json::from_slice(value).map_err(bad)?;
                crate::core::policy::check_reason(&r.reason)?;
                crate::core::policy::trip_ttl(r.ttl_ms)
                    .map_err(|e| Error::invalid(format!("trips {name:?}: {e}")))?;
                Record::Trip(r)
            }
        };
        Ok(record)
    }

    pub fn selector(&self) -> &Selector {
        match self {
            Record::Service(r) => &r.selector,
            Record::Policy(r) => &r.selector,
            Record::Trip(r) => &r.selector,
        }
    }

    pub fn to_json(&self) -> String {
        match self {
            Record::Service(r) => serde_json::to_string(r),
            Record::Policy(r) => serde_json::to_string(r),
            Record::Trip(r) => serde_json::to_string(r),
        }
        .expect("records serialize")
    }
}

/// What a trip's name forces open: `NAME`, the service's breaker, or `NAME/IP:PORT`, one
/// destination of a service with granularity destination.
pub fn trip_target(name: &str) -> Result<(&str, Option<std::net::SocketAddr>)> {
    let (service, destination) = match name.split_once('/') {
        Some((service, dest)) => (service, Some(dest)),
        None => (name, None),
    };
    validate_name(service)?;
    let destination = destination
        .map(|d| {
            crate::cli::destination_arg(d)
                .map_err(|why| Error::invalid(format!("trips {name:?}: {why}")))
        })
        .transpose()?;
    Ok((service, destination))
}

/// The name of a trip of one destination of `service`.
pub fn destination_trip(service: &str, destination: std::net::SocketAddr) -> String {
    format!("{service}/{destination}")
}

/// `P/nodes/NODE`: an agent, while it lives.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeRecord {
    /// The agent's version.
    pub version: String,
    /// `uname -r`.
    pub kernel: String,
    /// The features that are on.
    pub features: Vec<String>,
    pub labels: BTreeMap<String, String>,
    /// RFC 3339.
    pub started_at: String,
    /// The etcd revision of the desired state the agent last applied.
    pub applied_revision: i64,
}

/// `P/breakers/NODE/NAME`: a breaker on one node. Written when its state changes, and its
/// counters at most every 10 s while they change.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BreakerRecord {
    /// `closed`, `open` or `half_open`.
    pub state: String,
    pub forced: bool,
    pub reason: String,
    /// Who forced it open: `fleet`, `local` (an operator on the node), or empty.
    pub tripped_by: String,
    /// Who set the policy: `config`, `local` or `fleet`.
    pub policy_owner: String,
    pub requests: u64,
    pub failures: u64,
    pub rejected: u64,
    pub trips: u64,
}

/// `P/autotrips/NAME/NODE`: NODE's breaker for NAME tripped by itself; the key lives for the
/// quorum window.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AutoTripRecord {
    /// The transition's cause (`consecutive_failures`, `failure_ratio`, ...).
    pub cause: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let k = Keys::new("/breakwater/v1/").unwrap();
        assert_eq!(k.object(Kind::Service, "db"), "/breakwater/v1/services/db");
        assert_eq!(
            k.parse("/breakwater/v1/policies/db"),
            Some((Kind::Policy, "db"))
        );
        assert_eq!(k.parse("/breakwater/v1/nodes/a"), None);
        assert_eq!(k.parse("/breakwater/v10/services/db"), None);
        assert_eq!(k.parse_breaker(&k.breaker("n1", "db")), Some(("n1", "db")));
        assert_eq!(k.parse_node(&k.node("n1")), Some("n1"));
        assert_eq!(
            k.parse_autotrip(&k.autotrip("db", "n1")),
            Some(("db", "n1"))
        );
        assert!(Keys::new("breakwater").is_err());
    }

    #[test]
    fn the_watched_ranges_hold_all_but_the_breakers() {
        let k = Keys::new(DEFAULT_PREFIX).unwrap();
        let watched = |key: &str| {
            k.watched()
                .iter()
                .any(|(start, end)| key >= start.as_str() && key < end.as_str())
        };
        for key in [
            k.object(Kind::Service, "db"),
            k.object(Kind::Policy, "db"),
            k.object(Kind::Trip, "zzz"),
            k.node("n1"),
            k.autotrip("db", "n1"),
        ] {
            assert!(watched(&key), "{key}");
        }
        for key in [
            k.breaker("n1", "db"),
            format!("{DEFAULT_PREFIX}/tripsx"),
            "/other".into(),
        ] {
            assert!(!watched(&key), "{key}");
        }
    }

    #[test]
    fn records_are_checked_like_the_local_api() {
        let ok = Record::parse(
            Kind::Service,
            "db",
            br#"{"endpoints":["10.0.0.0/24:5432"]}"#,
        );
        assert!(ok.is_ok(), "{ok:?}");
        let e = Record::parse(Kind::Service, "db", br#"{"endpoints":["10.0.0.1"]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("10.0.0.1"), "{e}");
        let e = Record::parse(Kind::Service, "db", br#"{"endpoint":[]}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("services \"db\": invalid record: unknown field `endpoint`"),
            "{e}"
        );
        let e = Record::parse(Kind::Policy, "db", br#"{"policy":{"failure_ratio":2}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("policy \"db\": "), "{e}");
        assert!(Record::parse(Kind::Trip, "db", b"{}").is_ok());
        let e = Record::parse(Kind::Trip, "db", br#"{"ttl_ms":0}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("trips \"db\": ttl_ms must be more than 0"),
            "{e}"
        );
        assert!(Record::parse(Kind::Trip, "bad name!", b"{}").is_err());
        let p = Record::Policy(Box::new(PolicyRecord {
            policy: BreakerConfig {
                preset: Some("nginx".into()),
                ..Default::default()
            },
            selector: Selector::default(),
        }));
        assert_eq!(p.to_json(), r#"{"policy":{"preset":"nginx"}}"#);
        assert_eq!(
            Record::parse(Kind::Policy, "db", p.to_json().as_bytes()).unwrap(),
            p
        );
    }

    #[test]
    fn selectors_pick_nodes_by_name_or_labels() {
        let labels: BTreeMap<String, String> = [("zone".to_owned(), "a".to_owned())].into();
        assert!(Selector::default().selects("n1", &labels));
        let by_name = Selector {
            nodes: vec!["n2".into()],
            ..Default::default()
        };
        assert!(!by_name.selects("n1", &labels) && by_name.selects("n2", &labels));
        let by_label = Selector {
            labels: [("zone".to_owned(), "a".to_owned())].into(),
            ..Default::default()
        };
        assert!(by_label.selects("n1", &labels));
        assert!(!by_label.selects("n1", &BTreeMap::new()));
    }
}
