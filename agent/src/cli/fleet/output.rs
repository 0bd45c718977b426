//! `breakwater fleet`'s tables and JSON. What is per node is printed as several agents' answers
//! are (`breakwater --agents-file F ...`): tables with a NODE column first, JSON as
//! `{"nodes": [{"node": NODE, "result": ...}]}`, so a script reads both alike.

use comfy_table::Cell;
use serde_json::{json, Value};

use super::{
    records::{Removal, Write},
    store::{Deleted, Put},
};
use crate::{
    api::convert::policy_message,
    cli::output::{millis, num, or_dash, policy_summary, table},
    config::BreakerConfig,
    fleet::schema::{
        BreakerRecord, Kind, NodeRecord, PolicyRecord, Record, Selector, ServiceRecord, TripRecord,
    },
};

/// One node's breaker, from `P/breakers/NODE/SERVICE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Breaker {
    pub node: String,
    pub service: String,
    pub record: BreakerRecord,
}

/// A trip in etcd and, if it is on a lease, the seconds left of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trip {
    pub record: TripRecord,
    pub remaining_s: Option<i64>,
}

/// A record as read: None if there is none, Err with the reason if it does not pass the
/// agents' check.
pub type Entry<T> = Option<Result<T, String>>;

/// One name's desired state: its service, policy and trip, each if the fleet has one.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Desired {
    pub name: String,
    pub service: Entry<ServiceRecord>,
    pub policy: Entry<PolicyRecord>,
    pub trip: Entry<Trip>,
}

/// `P/nodes/*`: one row per agent.
pub fn nodes(nodes: &[(String, NodeRecord)], prefix: &str) -> String {
    if nodes.is_empty() {
        return format!(
            "no agents under {prefix} (an agent joins with `breakwater agent --etcd URL`, or \
             [fleet] etcd in its config, and this prefix)"
        );
    }
    let mut t = table(&[
        "NODE",
        "VERSION",
        "KERNEL",
        "STARTED",
        "APPLIED-REVISION",
        "LABELS",
        "FEATURES",
    ]);
    for (node, r) in nodes {
        let labels: Vec<String> = r.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        t.add_row(vec![
            Cell::new(node),
            Cell::new(or_dash(&r.version)),
            Cell::new(or_dash(&r.kernel)),
            Cell::new(or_dash(&r.started_at)),
            num(u64::try_from(r.applied_revision).unwrap_or(0)),
            Cell::new(or_dash(&labels.join(","))),
            num(r.features.len() as u64),
        ]);
    }
    t.to_string()
}

/// `{"nodes": [{"node": NODE, "result": NodeRecord}]}`.
pub fn nodes_json(nodes: &[(String, NodeRecord)]) -> Value {
    let list: Vec<Value> = nodes
        .iter()
        .map(|(node, r)| json!({ "node": node, "result": r }))
        .collect();
    json!({ "nodes": list })
}

fn state_cell(r: &BreakerRecord) -> String {
    let state = or_dash(&r.state);
    if r.forced {
        format!("{state} (forced)")
    } else {
        state.to_owned()
    }
}

/// `P/breakers/*/*`: one row per node and service, NODE first; under the table, who forced
/// which breaker open and why.
pub fn breakers(list: &[Breaker]) -> String {
    let mut t = table(&[
        "NODE",
        "SERVICE",
        "STATE",
        "REQUESTS",
        "FAILURES",
        "REJECTED",
        "TRIPS",
        "TRIPPED-BY",
        "POLICY-OWNER",
    ]);
    let mut notes = Vec::new();
    for b in list {
        let r = &b.record;
        t.add_row(vec![
            Cell::new(&b.node),
            Cell::new(&b.service),
            Cell::new(state_cell(r)),
            num(r.requests),
            num(r.failures),
            num(r.rejected),
            num(r.trips),
            Cell::new(or_dash(&r.tripped_by)),
            Cell::new(or_dash(&r.policy_owner)),
        ]);
        if r.forced {
            let by = match r.tripped_by.as_str() {
                "" => String::new(),
                by => format!(" by {by}"),
            };
            notes.push(match r.reason.as_str() {
                "" => format!("{}: {} forced open{by}", b.node, b.service),
                why => format!("{}: {} forced open{by}: {why}", b.node, b.service),
            });
        }
    }
    if notes.is_empty() {
        t.to_string()
    } else {
        format!("{t}\n\n{}", notes.join("\n"))
    }
}

/// `{"nodes": [{"node": NODE, "result": {"breakers": [{"service": ..., <BreakerRecord>}]}}]}`:
/// the shape of `breakwater --agents-file F breakers -o json`.
pub fn breakers_json(list: &[Breaker]) -> Value {
    let mut nodes: Vec<(&str, Vec<Value>)> = Vec::new();
    for b in list {
        let mut item = json!({ "service": b.service });
        if let (Value::Object(item), Ok(Value::Object(fields))) =
            (&mut item, serde_json::to_value(&b.record))
        {
            item.extend(fields);
        }
        match nodes.last_mut() {
            Some((node, items)) if *node == b.node => items.push(item),
            _ => nodes.push((&b.node, vec![item])),
        }
    }
    let list: Vec<Value> = nodes
        .into_iter()
        .map(|(node, breakers)| json!({ "node": node, "result": { "breakers": breakers } }))
        .collect();
    json!({ "nodes": list })
}

/// Which nodes a record applies to, in words.
pub fn selector_text(s: &Selector) -> String {
    let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    match (s.nodes.is_empty(), labels.is_empty()) {
        (true, true) => "all nodes".into(),
        (false, true) => format!("nodes {}", s.nodes.join(",")),
        (true, false) => format!("nodes with {}", labels.join(",")),
        (false, false) => format!(
            "nodes {} and nodes with {}",
            s.nodes.join(","),
            labels.join(",")
        ),
    }
}

/// A selector in a table cell: "-" for all nodes.
fn selector_cell(s: &Selector) -> String {
    if s.is_all() {
        "-".into()
    } else {
        selector_text(s)
    }
}

/// A policy on one line, as `breakwater breakers` shows it.
pub fn policy_text(p: &BreakerConfig) -> String {
    let quorum = p.spec().and_then(|spec| spec.quorum());
    match (p.policy(), quorum) {
        (Ok(policy), Ok(quorum)) => policy_summary(&policy_message(&policy, quorum.as_ref())),
        (Err(e), _) | (_, Err(e)) => format!("invalid: {e}"),
    }
}

/// A trip on one line: for how long, why, where.
pub fn trip_text(t: &Trip) -> String {
    let mut out = match (t.record.ttl_ms, t.remaining_s) {
        (None, _) => "until reset".to_owned(),
        (Some(ms), Some(left)) => format!(
            "for {} ({} left)",
            millis(ms),
            millis(u64::try_from(left).unwrap_or(0) * 1_000)
        ),
        (Some(ms), None) => format!("for {}", millis(ms)),
    };
    if !t.record.reason.is_empty() {
        out += &format!(": {}", t.record.reason);
    }
    if !t.record.selector.is_all() {
        out += &format!(" [{}]", selector_text(&t.record.selector));
    }
    out
}

fn entry_cell<T>(e: &Entry<T>, text: impl Fn(&T) -> String) -> String {
    match e {
        None => "-".into(),
        Some(Ok(t)) => text(t),
        Some(Err(_)) => "INVALID (see below)".into(),
    }
}

/// The desired state, one row per name: its endpoints and selector if the fleet defines the
/// service ("-": the nodes' own definition, if any), its fleet policy and trip.
pub fn services(list: &[Desired], prefix: &str) -> String {
    if list.is_empty() {
        return format!(
            "no fleet services, policies or trips under {prefix} (add one with `breakwater \
             fleet service put NAME --endpoint IP:PORT`)"
        );
    }
    let mut t = table(&["NAME", "ENDPOINTS", "SELECTOR", "POLICY", "TRIP"]);
    let mut invalid = Vec::new();
    for d in list {
        t.add_row(vec![
            Cell::new(&d.name),
            Cell::new(entry_cell(&d.service, |s| s.endpoints.join(","))),
            Cell::new(entry_cell(&d.service, |s| selector_cell(&s.selector))),
            Cell::new(entry_cell(&d.policy, |p| {
                let mut text = policy_text(&p.policy);
                if !p.selector.is_all() {
                    text += &format!(" [{}]", selector_text(&p.selector));
                }
                text
            })),
            Cell::new(entry_cell(&d.trip, trip_text)),
        ]);
        for (kind, e) in [
            (
                Kind::Service,
                d.service.as_ref().and_then(|e| e.as_ref().err()),
            ),
            (
                Kind::Policy,
                d.policy.as_ref().and_then(|e| e.as_ref().err()),
            ),
            (Kind::Trip, d.trip.as_ref().and_then(|e| e.as_ref().err())),
        ] {
            if let Some(why) = e {
                invalid.push(format!("invalid {}/{}: {why}", kind.segment(), d.name));
            }
        }
    }
    if invalid.is_empty() {
        t.to_string()
    } else {
        format!("{t}\n\n{}", invalid.join("\n"))
    }
}

fn entry_json<T: serde::Serialize>(e: &Entry<T>) -> Value {
    match e {
        None => Value::Null,
        Some(Ok(t)) => serde_json::to_value(t).unwrap_or(Value::Null),
        Some(Err(why)) => json!({ "error": why }),
    }
}

/// `{"services": [{"name": NAME, "service": <ServiceRecord>|null, "policy": <PolicyRecord>|null,
/// "trip": <TripRecord>|null}]}`: each record as stored; one that does not pass the agents'
/// check is `{"error": "..."}`.
pub fn services_json(list: &[Desired]) -> Value {
    let items: Vec<Value> = list
        .iter()
        .map(|d| {
            let trip = match &d.trip {
                Some(Ok(t)) => Some(Ok(&t.record)),
                Some(Err(e)) => Some(Err(e.clone())),
                None => None,
            };
            json!({
                "name": d.name,
                "service": entry_json(&d.service),
                "policy": entry_json(&d.policy),
                "trip": entry_json(&trip),
            })
        })
        .collect();
    json!({ "services": items })
}

/// After a put: what was written, where it applies.
pub fn written(w: &Write, put: &Put) -> String {
    let verb = if put.replaced { "replaced" } else { "created" };
    let selector = selector_text(w.record.selector());
    match &w.record {
        Record::Service(s) => format!(
            "{verb} fleet service {} on {selector}: {}",
            w.name,
            s.endpoints.join(", ")
        ),
        Record::Policy(p) => format!(
            "{verb} the fleet policy of {} on {selector}: {}",
            w.name,
            policy_text(&p.policy)
        ),
        Record::Trip(t) => {
            let again = if put.replaced {
                " (replacing its fleet trip)"
            } else {
                ""
            };
            let mut out = format!("tripped {}{again} on {selector}", w.name);
            match (t.ttl_ms, put.lease) {
                (Some(ms), Some(_)) => out += &format!(" for {}", millis(ms)),
                _ => out += " until reset",
            }
            if !t.reason.is_empty() {
                out += &format!(": {}", t.reason);
            }
            match put.lease {
                Some((id, secs)) => {
                    out += &format!(
                        "\netcd deletes the trip with its lease ({secs}s, id {id:x}); \
                         `breakwater fleet reset {}` ends it sooner",
                        w.name
                    );
                }
                None => out += &format!("\n`breakwater fleet reset {}` ends it", w.name),
            }
            out
        }
    }
}

/// `{"kind", "name", "key", "revision", "replaced", "record", "lease": {"id", "ttl_s"}}`.
pub fn written_json(w: &Write, put: &Put) -> Value {
    let record: Value = serde_json::from_str(&w.json).unwrap_or(Value::Null);
    let mut out = json!({
        "kind": kind_name(w.kind),
        "name": w.name,
        "key": w.key,
        "revision": put.revision,
        "replaced": put.replaced,
        "record": record,
    });
    if let (Value::Object(map), Some((id, ttl))) = (&mut out, put.lease) {
        map.insert("lease".into(), json!({ "id": id, "ttl_s": ttl }));
    }
    out
}

/// After a delete; when there was nothing, what else may hold the name.
pub fn removed(r: &Removal, d: &Deleted) -> String {
    match (r.kind, d.deleted) {
        (Kind::Service, true) => format!(
            "deleted fleet service {}: nodes that define it themselves (config or local API) \
             go back to theirs",
            r.name
        ),
        (Kind::Policy, true) => format!(
            "cleared the fleet policy of {}: nodes with a policy of their own go back to it",
            r.name
        ),
        (Kind::Trip, true) => format!(
            "reset {}: deleted its fleet trip; the breakers it forced open close",
            r.name
        ),
        (Kind::Service, false) => {
            format!("no fleet service {}: nothing to delete", r.name)
        }
        (Kind::Policy, false) => format!("no fleet policy of {}: nothing to clear", r.name),
        (Kind::Trip, false) => format!(
            "no fleet trip of {0}: nothing to reset (a trip with --for ends by itself; a trip \
             made on a node is reset there: `breakwater --agent ADDRESS reset {0}`)",
            r.name
        ),
    }
}

/// `{"kind", "name", "key", "revision", "deleted"}`.
pub fn removed_json(r: &Removal, d: &Deleted) -> Value {
    json!({
        "kind": kind_name(r.kind),
        "name": r.name,
        "key": r.key,
        "revision": d.revision,
        "deleted": d.deleted,
    })
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Service => "service",
        Kind::Policy => "policy",
        Kind::Trip => "trip",
    }
}

/// A change of one node's breaker, as `watch` sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub node: String,
    pub service: String,
    /// None: the key was deleted (the agent stopped, or the breaker went).
    pub now: Option<BreakerRecord>,
    pub before: Option<BreakerRecord>,
    pub revision: i64,
}

impl Change {
    /// Anything but the counters changed.
    pub fn changes_state(&self) -> bool {
        let state = |r: &BreakerRecord| {
            (
                r.state.clone(),
                r.forced,
                r.reason.clone(),
                r.tripped_by.clone(),
                r.policy_owner.clone(),
            )
        };
        match (&self.now, &self.before) {
            (Some(now), Some(before)) => state(now) != state(before),
            _ => true,
        }
    }
}

/// One line per change: time, node, service, state before -> after, and why.
pub fn change_line(time: &str, c: &Change) -> String {
    let before = c.before.as_ref().map_or("-".into(), state_cell);
    let Some(now) = &c.now else {
        return format!(
            "{time} {} {} {before} -> gone (the agent left, or the breaker went)",
            c.node, c.service
        );
    };
    let mut line = format!(
        "{time} {} {} {before} -> {} requests={} failures={} rejected={} trips={}",
        c.node,
        c.service,
        state_cell(now),
        now.requests,
        now.failures,
        now.rejected,
        now.trips
    );
    if now.forced && !now.tripped_by.is_empty() {
        line += &format!(" tripped_by={}", now.tripped_by);
    }
    if !now.reason.is_empty() {
        line += &format!(" reason={:?}", now.reason);
    }
    line
}

/// One JSON object per change: `{"time", "revision", "node", "service", "deleted", <the
/// BreakerRecord's fields>, "previous": <BreakerRecord>|null}`.
pub fn change_json(time: &str, c: &Change) -> Value {
    let mut out = json!({
        "time": time,
        "revision": c.revision,
        "node": c.node,
        "service": c.service,
        "deleted": c.now.is_none(),
    });
    if let (Value::Object(out), Some(Ok(Value::Object(fields)))) =
        (&mut out, c.now.as_ref().map(serde_json::to_value))
    {
        out.extend(fields);
    }
    if let Value::Object(out) = &mut out {
        out.insert(
            "previous".into(),
            c.before
                .as_ref()
                .and_then(|b| serde_json::to_value(b).ok())
                .unwrap_or(Value::Null),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(state: &str, forced: bool, by: &str, reason: &str) -> BreakerRecord {
        BreakerRecord {
            state: state.into(),
            forced,
            reason: reason.into(),
            tripped_by: by.into(),
            policy_owner: "fleet".into(),
            requests: 10,
            failures: 4,
            rejected: 2,
            trips: 1,
        }
    }

    fn cells(line: &str) -> Vec<&str> {
        line.split_whitespace().collect()
    }

    #[test]
    fn breakers_have_a_node_column_and_say_who_forced_them() {
        let list = vec![
            Breaker {
                node: "n1".into(),
                service: "db".into(),
                record: breaker("open", true, "fleet", "db migration"),
            },
            Breaker {
                node: "n1".into(),
                service: "web".into(),
                record: breaker("closed", false, "", ""),
            },
            Breaker {
                node: "n2".into(),
                service: "db".into(),
                record: breaker("open", true, "local", ""),
            },
        ];
        let out = breakers(&list);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            cells(lines[0]),
            [
                "NODE",
                "SERVICE",
                "STATE",
                "REQUESTS",
                "FAILURES",
                "REJECTED",
                "TRIPS",
                "TRIPPED-BY",
                "POLICY-OWNER"
            ]
        );
        assert_eq!(
            cells(lines[1]),
            ["n1", "db", "open", "(forced)", "10", "4", "2", "1", "fleet", "fleet"]
        );
        assert_eq!(
            cells(lines[2]),
            ["n1", "web", "closed", "10", "4", "2", "1", "-", "fleet"]
        );
        assert_eq!(cells(lines[3])[..4], ["n2", "db", "open", "(forced)"]);
        assert_eq!(lines[4], "");
        assert_eq!(lines[5], "n1: db forced open by fleet: db migration");
        assert_eq!(lines[6], "n2: db forced open by local");

        // As several agents' `breakers -o json`: one item per node, its breakers under result.
        let j = breakers_json(&list);
        assert_eq!(j["nodes"].as_array().unwrap().len(), 2);
        assert_eq!(j["nodes"][0]["node"], "n1");
        let b = &j["nodes"][0]["result"]["breakers"];
        assert_eq!(b.as_array().unwrap().len(), 2);
        assert_eq!(b[0]["service"], "db");
        assert_eq!(b[0]["state"], "open");
        assert_eq!(b[0]["forced"], true);
        assert_eq!(b[0]["tripped_by"], "fleet");
        assert_eq!(
            j["nodes"][1]["result"]["breakers"][0]["tripped_by"],
            "local"
        );
    }

    #[test]
    fn nodes_list_their_labels_and_features() {
        let r = NodeRecord {
            version: "0.1.0".into(),
            kernel: "6.1.0-28-amd64".into(),
            features: vec!["connection_tracking".into(), "breaker_gate".into()],
            labels: [
                ("zone".to_owned(), "a".to_owned()),
                ("tier".to_owned(), "db".to_owned()),
            ]
            .into(),
            started_at: "2025-01-01T00:00:00Z".into(),
            applied_revision: 42,
        };
        let list = vec![
            ("n1".to_owned(), r),
            ("n2".to_owned(), NodeRecord::default()),
        ];
        let out = nodes(&list, "/breakwater/v1/nodes/");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            cells(lines[0]),
            [
                "NODE",
                "VERSION",
                "KERNEL",
                "STARTED",
                "APPLIED-REVISION",
                "LABELS",
                "FEATURES"
            ]
        );
        assert_eq!(
            cells(lines[1]),
            [
                "n1",
                "0.1.0",
                "6.1.0-28-amd64",
                "2025-01-01T00:00:00Z",
                "42",
                "tier=db,zone=a",
                "2"
            ]
        );
        assert_eq!(cells(lines[2]), ["n2", "-", "-", "-", "0", "-", "0"]);
        let j = nodes_json(&list);
        assert_eq!(j["nodes"][0]["node"], "n1");
        assert_eq!(j["nodes"][0]["result"]["kernel"], "6.1.0-28-amd64");
        assert_eq!(j["nodes"][0]["result"]["features"][1], "breaker_gate");
        assert!(nodes(&[], "/p/nodes/").starts_with("no agents under /p/nodes/"));
    }

    #[test]
    fn services_show_their_policy_and_trip() {
        let by_label = Selector {
            labels: [("zone".to_owned(), "a".to_owned())].into(),
            ..Default::default()
        };
        let list = vec![
            Desired {
                name: "db".into(),
                service: Some(Ok(ServiceRecord {
                    endpoints: vec!["10.0.0.0/24:5432".into(), "10.0.1.5:5432".into()],
                    selector: by_label.clone(),
                })),
                policy: Some(Ok(PolicyRecord {
                    policy: BreakerConfig {
                        preset: Some("gobreaker".into()),
                        ..Default::default()
                    },
                    selector: Selector::default(),
                })),
                trip: Some(Ok(Trip {
                    record: TripRecord {
                        reason: "migration".into(),
                        ttl_ms: Some(300_000),
                        selector: Selector::default(),
                    },
                    remaining_s: Some(200),
                })),
            },
            Desired {
                name: "web".into(),
                policy: Some(Err("policy \"web\": no trip rule".into())),
                trip: Some(Ok(Trip {
                    record: TripRecord {
                        selector: Selector {
                            nodes: vec!["n1".into()],
                            ..Default::default()
                        },
                        ..Default::default()
                    },
                    remaining_s: None,
                })),
                ..Default::default()
            },
        ];
        let out = services(&list, "/breakwater/v1");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            cells(lines[0]),
            ["NAME", "ENDPOINTS", "SELECTOR", "POLICY", "TRIP"]
        );
        assert!(
            lines[1].contains("db")
                && lines[1].contains("10.0.0.0/24:5432,10.0.1.5:5432")
                && lines[1].contains("nodes with zone=a")
                && lines[1].contains("ratio>=0.6 of>=3 per 1m; open 30s, 1 probe, ECONNREFUSED")
                && lines[1].contains("for 5m (3m20s left): migration"),
            "{out}"
        );
        assert!(
            lines[2].starts_with(" web ")
                && lines[2].contains("INVALID (see below)")
                && lines[2].trim_end().ends_with("until reset [nodes n1]"),
            "{out}"
        );
        assert_eq!(cells(lines[2])[1..3], ["-", "-"]);
        assert_eq!(
            *lines.last().unwrap(),
            "invalid policies/web: policy \"web\": no trip rule"
        );

        let j = services_json(&list);
        assert_eq!(j["services"][0]["name"], "db");
        assert_eq!(j["services"][0]["service"]["endpoints"][1], "10.0.1.5:5432");
        assert_eq!(
            j["services"][0]["service"]["selector"]["labels"]["zone"],
            "a"
        );
        assert_eq!(j["services"][0]["policy"]["policy"]["preset"], "gobreaker");
        assert_eq!(j["services"][0]["trip"]["ttl_ms"], 300_000);
        assert_eq!(j["services"][1]["service"], Value::Null);
        assert_eq!(
            j["services"][1]["policy"]["error"],
            "policy \"web\": no trip rule"
        );
        assert!(services(&[], "/p").starts_with("no fleet services, policies or trips under /p"));
    }

    #[test]
    fn selectors_read_as_words() {
        assert_eq!(selector_text(&Selector::default()), "all nodes");
        let s = Selector {
            nodes: vec!["n1".into(), "n2".into()],
            labels: [("zone".to_owned(), "a".to_owned())].into(),
        };
        assert_eq!(selector_text(&s), "nodes n1,n2 and nodes with zone=a");
    }

    #[test]
    fn watch_lines_say_what_changed() {
        let c = Change {
            node: "n1".into(),
            service: "db".into(),
            now: Some(breaker("open", true, "fleet", "migration")),
            before: Some(breaker("closed", false, "", "")),
            revision: 7,
        };
        assert!(c.changes_state());
        assert_eq!(
            change_line("T", &c),
            "T n1 db closed -> open (forced) requests=10 failures=4 rejected=2 trips=1 \
             tripped_by=fleet reason=\"migration\""
        );
        let j = change_json("T", &c);
        assert_eq!(j["node"], "n1");
        assert_eq!(j["state"], "open");
        assert_eq!(j["forced"], true);
        assert_eq!(j["reason"], "migration");
        assert_eq!(j["deleted"], false);
        assert_eq!(j["previous"]["state"], "closed");

        let counts_only = Change {
            now: Some(BreakerRecord {
                requests: 99,
                ..breaker("closed", false, "", "")
            }),
            ..c.clone()
        };
        let counts_only = Change {
            before: Some(breaker("closed", false, "", "")),
            ..counts_only
        };
        assert!(!counts_only.changes_state());

        let gone = Change {
            now: None,
            ..c.clone()
        };
        assert!(gone.changes_state());
        assert_eq!(
            change_line("T", &gone),
            "T n1 db closed -> gone (the agent left, or the breaker went)"
        );
        assert_eq!(change_json("T", &gone)["deleted"], true);
    }

    #[test]
    fn writes_say_what_they_did() {
        let keys = crate::fleet::schema::Keys::new("/breakwater/v1").unwrap();
        let w = super::super::records::trip(
            &keys,
            "db",
            None,
            Some(std::time::Duration::from_secs(300)),
            Some("migration".into()),
            Selector::default(),
        )
        .unwrap();
        let put = Put {
            revision: 9,
            replaced: false,
            lease: Some((0x1f, 300)),
        };
        assert_eq!(
            written(&w, &put),
            "tripped db on all nodes for 5m: migration\netcd deletes the trip with its lease \
             (300s, id 1f); `breakwater fleet reset db` ends it sooner"
        );
        let j = written_json(&w, &put);
        assert_eq!(j["kind"], "trip");
        assert_eq!(j["key"], "/breakwater/v1/trips/db");
        assert_eq!(j["record"]["ttl_ms"], 300_000);
        assert_eq!(j["lease"]["ttl_s"], 300);
        assert_eq!(j["revision"], 9);

        let r = super::super::records::removal(&keys, Kind::Trip, "db").unwrap();
        let none = Deleted {
            revision: 9,
            deleted: false,
        };
        assert!(removed(&r, &none).starts_with("no fleet trip of db: nothing to reset"));
        assert_eq!(removed_json(&r, &none)["deleted"], false);
    }
}
