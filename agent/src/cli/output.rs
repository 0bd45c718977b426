//! Tables for people; `-o json` bypasses all of this.

use breakwater_proto::v1 as pb;
use comfy_table::{presets::NOTHING, Cell, CellAlignment, Table};

use crate::{
    api::convert::{conn_stats, destination_stats},
    core::counters::COUNTERS,
};

pub(super) fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(NOTHING);
    t.set_header(header.iter().map(Cell::new));
    t
}

/// A table's header and rows, so that several agents' tables can become one.
pub struct Rows {
    pub header: Vec<&'static str>,
    pub rows: Vec<Vec<Cell>>,
    /// Lines printed under the table.
    pub notes: Vec<String>,
}

impl Rows {
    fn new(header: &[&'static str]) -> Self {
        Self {
            header: header.to_vec(),
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    fn table(self) -> Table {
        let mut t = table(&self.header);
        for row in self.rows {
            t.add_row(row);
        }
        t
    }
}

/// Several agents' tables as one, with a NODE column first; notes prefixed with the node.
pub fn merged(nodes: Vec<(String, Rows)>) -> String {
    let mut header = vec!["NODE"];
    header.extend(
        nodes
            .first()
            .map(|(_, r)| r.header.clone())
            .unwrap_or_default(),
    );
    let mut t = table(&header);
    let mut notes = Vec::new();
    for (node, rows) in nodes {
        for row in rows.rows {
            let mut cells = vec![Cell::new(&node)];
            cells.extend(row);
            t.add_row(cells);
        }
        notes.extend(rows.notes.into_iter().map(|n| format!("{node}: {n}")));
    }
    if notes.is_empty() {
        t.to_string()
    } else {
        format!("{t}\n\n{}", notes.join("\n"))
    }
}

pub(super) fn num(v: u64) -> Cell {
    Cell::new(v).set_alignment(CellAlignment::Right)
}

fn endpoint(addr: &str, port: u32) -> String {
    if addr.contains(':') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    }
}

fn direction(d: i32) -> &'static str {
    match pb::Direction::try_from(d) {
        Ok(pb::Direction::Inbound) => "in",
        Ok(pb::Direction::Outbound) => "out",
        _ => "?",
    }
}

pub(super) fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

pub fn services(r: &pb::ListServicesResponse) -> String {
    if r.services.is_empty() {
        return "no services (add one with `breakwater service put NAME --endpoint IP:PORT`)"
            .into();
    }
    services_rows(r).table().to_string()
}

pub fn services_rows(r: &pb::ListServicesResponse) -> Rows {
    // The counters' columns, outbound then inbound, from the counter table.
    let columns = |dir: usize| {
        COUNTERS
            .iter()
            .filter_map(move |c| c.services_columns[dir].map(|title| (title, c.get)))
    };
    let mut header = vec!["SERVICE", "OWNER", "ENDPOINTS"];
    header.extend(columns(0).chain(columns(1)).map(|(title, _)| title));
    header.extend(["CONNECT-P50", "CONNECT-P99"]);
    let mut t = Rows::new(&header);
    for s in &r.services {
        let stats =
            [&s.outbound, &s.inbound].map(|c| c.as_ref().map(conn_stats).unwrap_or_default());
        let mut row = vec![
            Cell::new(&s.name),
            Cell::new(owner_cell(s.owner, s.shadowed)),
            Cell::new(s.endpoints.join(",")),
        ];
        for (dir, stats) in stats.iter().enumerate() {
            row.extend(columns(dir).map(|(_, get)| num(get(stats))));
        }
        row.extend(
            [s.connect_p50_us, s.connect_p99_us]
                .map(|us| Cell::new(if us == 0 { "-".into() } else { micros(us) })),
        );
        t.rows.push(row);
    }
    t
}

pub fn destinations(r: &pb::ListDestinationsResponse) -> String {
    destinations_rows(r).table().to_string()
}

pub fn destinations_rows(r: &pb::ListDestinationsResponse) -> Rows {
    let columns = || {
        COUNTERS
            .iter()
            .filter_map(|c| c.destinations_column.map(|title| (title, c.get)))
    };
    let mut header = vec!["DESTINATION", "DIR", "SERVICE", "NETNS"];
    header.extend(columns().map(|(title, _)| title));
    let mut t = Rows::new(&header);
    for d in &r.destinations {
        let stats = destination_stats(d);
        let mut row = vec![
            Cell::new(endpoint(&d.address, d.port)),
            Cell::new(direction(d.direction)),
            Cell::new(or_dash(&d.service)),
            Cell::new(d.netns),
        ];
        row.extend(columns().map(|(_, get)| num(get(&stats))));
        t.rows.push(row);
    }
    t
}

pub fn connections(r: &pb::ListConnectionsResponse) -> String {
    connections_rows(r).table().to_string()
}

pub fn connections_rows(r: &pb::ListConnectionsResponse) -> Rows {
    let mut t = Rows::new(&[
        "LOCAL", "REMOTE", "DIR", "STATE", "PID", "COMM", "CGROUP", "SERVICE", "AGE",
    ]);
    for c in &r.connections {
        t.rows.push(vec![
            Cell::new(endpoint(&c.local_address, c.local_port)),
            Cell::new(endpoint(&c.remote_address, c.remote_port)),
            Cell::new(direction(c.direction)),
            Cell::new(&c.state),
            Cell::new(if c.pid == 0 {
                "-".to_string()
            } else {
                c.pid.to_string()
            }),
            Cell::new(or_dash(&c.comm)),
            Cell::new(if c.cgroup_id == 0 {
                "-".to_string()
            } else {
                c.cgroup_id.to_string()
            }),
            Cell::new(or_dash(&c.service)),
            Cell::new(age(c.age_ms)),
        ]);
    }
    t
}

fn age(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{}s", ms / 1_000),
        60_000..3_600_000 => format!("{}m{}s", ms / 60_000, ms % 60_000 / 1_000),
        _ => format!("{}h{}m", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

/// bcc-style histograms: one line per bucket from the first to the last non-empty one; then
/// the kinds left out because their feature is off.
pub fn latency(r: &pb::GetLatencyResponse) -> String {
    let mut out = String::new();
    let off: String = r
        .features_off
        .iter()
        .map(|f| {
            format!(
                "{} not measured: {} is off: {}\n",
                kinds_of(&f.name),
                f.name,
                or_dash(&f.reason)
            )
        })
        .collect();
    for h in &r.histograms {
        out += &format!(
            "{} latency: {} samples, p50 {}, p90 {}, p99 {}, max < {}\n",
            h.kind,
            h.count,
            micros(h.p50_us),
            micros(h.p90_us),
            micros(h.p99_us),
            micros(h.max_us)
        );
        if h.buckets.is_empty() {
            continue;
        }
        out += &format!("{:>24} : {:<8} distribution\n", "µs", "count");
        let top = h.buckets.iter().map(|b| b.count).max().unwrap_or(1).max(1);
        let (first, last) = (h.buckets[0].index, h.buckets[h.buckets.len() - 1].index);
        for idx in first..=last {
            let b = h.buckets.iter().find(|b| b.index == idx);
            let count = b.map_or(0, |b| b.count);
            let (lo, hi) = crate::core::latency::bounds(idx);
            let bar = "*".repeat((count * 40).div_ceil(top) as usize);
            out += &format!("{lo:>10} -> {:<10} : {count:<8} |{bar:<40}|\n", hi - 1);
        }
    }
    out += &off;
    out.trim_end().to_owned()
}

/// The latency kinds a feature measures, as the output names them.
fn kinds_of(feature: &str) -> &'static str {
    match feature {
        "connect_latency" => "connect latency",
        "first_response_latency" => "first_response latency",
        "tcp_stats" => "srtt and lifetime",
        _ => "some histograms",
    }
}

fn micros(us: u64) -> String {
    match us {
        0..1_000 => format!("{us}µs"),
        1_000..1_000_000 => format!("{:.1}ms", us as f64 / 1e3),
        _ => format!("{:.2}s", us as f64 / 1e6),
    }
}

pub fn advise(r: &pb::AdviseResponse) -> String {
    let mut out = String::new();
    if r.findings.is_empty() {
        out += "no findings: nothing the agent sees calls for a change\n";
    }
    for f in &r.findings {
        let severity = match pb::Severity::try_from(f.severity) {
            Ok(pb::Severity::Critical) => "CRITICAL",
            Ok(pb::Severity::Warn) => "WARN",
            _ => "INFO",
        };
        out += &format!(
            "{severity} {} netns {}: {}\n  evidence: {}\n  advice:   {}\n\n",
            f.kind, f.netns, f.subject, f.evidence, f.recommendation
        );
    }
    let mut t = table(&[
        "NETNS",
        "SOCKETS",
        "TIME-WAIT",
        "PORT RANGE",
        "TW_REUSE",
        "SOMAXCONN",
        "MAX_TW",
        "FIN_TIMEOUT",
        "LISTEN-OVF",
    ]);
    for n in &r.namespaces {
        t.add_row(vec![
            Cell::new(n.netns),
            num(n.sockets),
            num(n.time_wait),
            Cell::new(format!("{}-{}", n.port_range_low, n.port_range_high)),
            num(n.tcp_tw_reuse.into()),
            num(n.somaxconn.into()),
            num(n.tcp_max_tw_buckets.into()),
            num(n.tcp_fin_timeout.into()),
            num(n.listen_overflows),
        ]);
    }
    format!(
        "{out}{t}\nfs.file-max {}\nbreakwater never changes a setting itself.",
        r.file_max
    )
}

pub fn time_wait(r: &pb::GetTimeWaitResponse) -> String {
    let mut t = table(&[
        "TIME-WAIT",
        "DIR",
        "SERVICE",
        "NETNS",
        "SOCKETS",
        "ENTERING/S",
    ]);
    for d in &r.destinations {
        t.add_row(vec![
            Cell::new(endpoint(&d.address, d.port)),
            Cell::new(direction(d.direction)),
            Cell::new(or_dash(&d.service)),
            Cell::new(d.netns),
            num(d.time_wait),
            Cell::new(format!("{:.1}", d.entered_per_s)).set_alignment(CellAlignment::Right),
        ]);
    }
    let mut p = table(&[
        "SOURCE",
        "DESTINATION",
        "NETNS",
        "PORTS",
        "OF RANGE",
        "IN-TW",
        "USED",
        "LEVEL",
        "TW_REUSE",
    ]);
    for x in &r.pressure {
        let level = match pb::PressureLevel::try_from(x.level) {
            Ok(pb::PressureLevel::Critical) => "CRITICAL",
            Ok(pb::PressureLevel::Warn) => "warn",
            _ => "ok",
        };
        p.add_row(vec![
            Cell::new(&x.source_address),
            Cell::new(endpoint(&x.address, x.port)),
            Cell::new(x.netns),
            num(x.ports_in_use),
            Cell::new(format!("{}-{}", x.port_range_low, x.port_range_high)),
            num(x.time_wait),
            Cell::new(format!("{:.1}%", x.ratio * 100.0)).set_alignment(CellAlignment::Right),
            Cell::new(level),
            num(x.tcp_tw_reuse.into()),
        ]);
    }
    let mut sv = table(&["SERVICE", "OUT TIME-WAIT", "IN TIME-WAIT"]);
    for x in &r.services {
        sv.add_row(vec![Cell::new(&x.service), num(x.outbound), num(x.inbound)]);
    }
    let services = if r.services.is_empty() {
        String::new()
    } else {
        format!("\n\n{sv}")
    };
    format!("{t}{services}\n\nephemeral port pressure (warn at 50%, critical at 80%)\n{p}")
}

pub fn put_service(r: &pb::PutServiceResponse) -> String {
    let s = r.service.clone().unwrap_or_default();
    let mut out = format!(
        "{} service {}: {}",
        if r.replaced { "replaced" } else { "created" },
        s.name,
        s.endpoints.join(", ")
    );
    if let Some(note) = protected_note(&s.name, &s.protected) {
        out += &format!("\n{note}");
    }
    out
}

/// What a service covers that its breaker never refuses, if anything.
pub fn protected_note(service: &str, protected: &[String]) -> Option<String> {
    (!protected.is_empty()).then(|| {
        format!(
            "note: {service} covers protected destinations, never refused: {}",
            protected.join(", ")
        )
    })
}

pub fn info(r: &pb::GetAgentInfoResponse) -> String {
    let mut out = format!(
        "breakwater {}  kernel {}  up {}  host netns {}\n",
        r.version,
        r.kernel,
        age(r.uptime_ms),
        r.host_netns
    );
    if !r.config_path.is_empty() {
        out += &format!("config {}\n", r.config_path);
    }
    if let Some(f) = &r.fleet {
        out += &fleet_link(f);
    }
    let mut f = table(&["FEATURE", "STATUS", "HOOK", "REASON"]);
    for x in &r.features {
        f.add_row(vec![
            Cell::new(&x.name),
            Cell::new(feature_status(x.status)),
            Cell::new(or_dash(&x.hook)),
            Cell::new(or_dash(&x.reason)),
        ]);
    }
    let mut p = table(&["PROGRAM", "ATTACH", "ID", "RUNS", "NS/RUN", "MISSED"]);
    for x in &r.programs {
        let per_run = x.run_time_ns.checked_div(x.run_count).unwrap_or(0);
        p.add_row(vec![
            Cell::new(&x.name),
            Cell::new(&x.attach),
            num(x.id.into()),
            num(x.run_count),
            num(per_run),
            num(x.recursion_misses),
        ]);
    }
    let mut m = table(&["MAP", "ENTRIES", "CAPACITY", "EVICTIONS"]);
    for x in &r.maps {
        m.add_row(vec![
            Cell::new(&x.name),
            num(x.entries),
            num(x.capacity.into()),
            num(x.evictions),
        ]);
    }
    let mut c = table(&["COUNTER", "VALUE"]);
    for x in &r.counters {
        c.add_row(vec![Cell::new(&x.name), num(x.value)]);
    }
    format!("{out}\n{f}\n\n{p}\n\n{m}\n\n{c}")
}

/// The link to the fleet, on one line: "fleet node n1 via etcd http://... : in sync since ...
/// (revision 42)" or "... : down since ...: why".
fn fleet_link(f: &pb::FleetLink) -> String {
    let since = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(f.since_unix_ms),
    );
    let mut line = format!("fleet node {} via etcd {}: ", f.node, f.etcd.join(","));
    if f.connected {
        line += &format!("in sync since {since} (revision {})", f.applied_revision);
    } else {
        line += &format!("DOWN since {since}: {}", f.last_error);
    }
    if f.invalid_records + f.not_applied > 0 {
        line += &format!(
            "; {} invalid record(s), {} not applied here",
            f.invalid_records, f.not_applied
        );
    }
    line + "\n"
}

fn owner_name(owner: i32) -> &'static str {
    match pb::Owner::try_from(owner) {
        Ok(pb::Owner::Local) => "local",
        Ok(pb::Owner::Config) => "config",
        Ok(pb::Owner::Fleet) => "fleet",
        _ => "-",
    }
}

/// "fleet", or "fleet (shadows config)" where the fleet's hides another definition.
fn owner_cell(owner: i32, shadowed: i32) -> String {
    match owner_name(shadowed) {
        "-" => owner_name(owner).to_owned(),
        hidden => format!("{} (shadows {hidden})", owner_name(owner)),
    }
}

fn feature_status(status: i32) -> &'static str {
    match pb::FeatureStatus::try_from(status) {
        Ok(pb::FeatureStatus::On) => "on",
        Ok(pb::FeatureStatus::Degraded) => "degraded",
        Ok(pb::FeatureStatus::Off) => "off",
        _ => "?",
    }
}

fn breaker_state(state: i32) -> &'static str {
    match pb::BreakerState::try_from(state) {
        Ok(pb::BreakerState::Closed) => "closed",
        Ok(pb::BreakerState::Open) => "open",
        Ok(pb::BreakerState::HalfOpen) => "half_open",
        _ => "?",
    }
}

fn breaker_cause(cause: i32) -> String {
    pb::BreakerCause::try_from(cause)
        .map(|c| {
            c.as_str_name()
                .trim_start_matches("BREAKER_CAUSE_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| "?".into())
}

/// "30s", "1m30s", "500ms": the durations people typed.
pub(super) fn millis(ms: u64) -> String {
    humantime::format_duration(std::time::Duration::from_millis(ms))
        .to_string()
        .replace(' ', "")
}

/// A policy on one line: its trip rules, then what happens when it trips.
pub fn policy_summary(p: &pb::BreakerPolicy) -> String {
    let mut rules = Vec::new();
    if p.failure_ratio > 0.0 {
        rules.push(format!("ratio>={} of>={}", p.failure_ratio, p.min_requests));
    }
    if p.consecutive_failures > 0 {
        rules.push(format!("{} in a row", p.consecutive_failures));
    }
    if p.max_failures > 0 {
        rules.push(format!("{} failures", p.max_failures));
    }
    let mut out = rules.join(" | ");
    if p.interval_ms > 0 {
        out += &format!(" per {}", millis(p.interval_ms));
    }
    out += &format!(
        "; open {}, {} probe{}, {}",
        millis(p.open_timeout_ms),
        p.half_open_max,
        if p.half_open_max == 1 { "" } else { "s" },
        p.errno
    );
    if p.slow_connect_ms > 0 {
        out += &format!(", slow>{}", millis(p.slow_connect_ms));
    }
    if !p.terminate_established {
        out += ", keep established";
    }
    if p.mode == "audit" {
        out += ", audit: refuses nothing";
    }
    if p.granularity == pb::Granularity::Destination as i32 {
        out += &format!(
            ", per destination (eject at most {}%",
            p.max_ejection_percent
        );
        if p.max_open_timeout_ms > 0 {
            out += &format!(", open up to {}", millis(p.max_open_timeout_ms));
        }
        out += ")";
    }
    if !p.fleet_quorum.is_empty() {
        out += &format!(
            ", fleet quorum {} in {}",
            p.fleet_quorum,
            millis(p.fleet_quorum_window_ms)
        );
    }
    out
}

/// The OPEN-FOR cell: how long an open breaker stays open.
fn open_for(remaining_ms: u64, state: i32, forced: bool) -> String {
    match (remaining_ms, state == pb::BreakerState::Open as i32) {
        (0, true) if forced => "until reset".to_owned(),
        (0, _) => "-".to_owned(),
        (ms, _) => millis(ms),
    }
}

fn state_cell(b: &pb::Breaker) -> String {
    let mut state = breaker_state(b.state).to_owned();
    if b.forced {
        state += " (forced)";
    }
    if b.policy.as_ref().is_some_and(|p| p.mode == "audit") {
        state += " (audit)";
    }
    state
}

pub fn breakers(r: &pb::ListBreakersResponse) -> String {
    if r.breakers.is_empty() {
        return "no breakers (put a policy on a service with `breakwater policy set NAME --preset gobreaker`)"
            .into();
    }
    let rows = breakers_rows(r);
    if rows.notes.is_empty() {
        rows.table().to_string()
    } else {
        let notes = rows.notes.join("\n");
        format!("{}\n\n{notes}", rows.table())
    }
}

pub fn breakers_rows(r: &pb::ListBreakersResponse) -> Rows {
    let mut t = Rows::new(&[
        "SERVICE", "STATE", "REQUESTS", "FAILURES", "IN-A-ROW", "REJECTED", "TRIPS", "OPEN-FOR",
        "POLICY", "OWNER",
    ]);
    for b in &r.breakers {
        t.rows.push(vec![
            Cell::new(&b.service),
            Cell::new(state_cell(b)),
            num(b.requests),
            num(b.failures),
            num(b.consecutive_failures),
            num(b.rejected),
            num(b.trips),
            Cell::new(open_for(b.open_remaining_ms, b.state, b.forced)),
            Cell::new(b.policy.as_ref().map(policy_summary).unwrap_or_default()),
            Cell::new(owner_cell(b.policy_owner, 0)),
        ]);
        for d in &b.destinations {
            let mut state = breaker_state(d.state).to_owned();
            if d.forced {
                state += " (forced)";
            }
            t.rows.push(vec![
                Cell::new(format!("  {}", d.destination)),
                Cell::new(state),
                num(d.requests),
                num(d.failures),
                num(d.consecutive_failures),
                Cell::new("-"),
                num(u64::from(d.trips)),
                Cell::new(open_for(d.open_remaining_ms, d.state, d.forced)),
                Cell::new(""),
                Cell::new(if d.forced {
                    owner_name(d.tripped_by).to_owned()
                } else {
                    String::new()
                }),
            ]);
        }
    }
    t.notes = r
        .breakers
        .iter()
        .filter(|b| b.audited > 0)
        .map(|b| {
            format!(
                "{}: {} connects would have been refused (audit mode)",
                b.service, b.audited
            )
        })
        .collect();
    t.notes.extend(
        r.breakers
            .iter()
            .filter_map(|b| protected_note(&b.service, &b.protected)),
    );
    t.notes
        .extend(r.breakers.iter().filter(|b| b.forced).filter_map(|b| {
            let by = match owner_name(b.tripped_by) {
                "-" => String::new(),
                by => format!(" by {by}"),
            };
            match b.reason.as_str() {
                "" if by.is_empty() => None,
                "" => Some(format!("{} forced open{by}", b.service)),
                why => Some(format!("{} forced open{by}: {why}", b.service)),
            }
        }));
    t
}

/// After a trip, reset or new policy: what was done, and the breaker now.
pub fn breaker_changed(verb: &str, b: &Option<pb::Breaker>) -> String {
    let Some(b) = b else {
        return format!("{verb}: the agent returned no breaker");
    };
    let list = pb::ListBreakersResponse {
        breakers: vec![b.clone()],
    };
    format!("{verb} {}\n{}", b.service, breakers(&list))
}

/// After a trip: the breaker now, and what became of the established connections.
pub fn tripped(r: &pb::TripResponse) -> String {
    let mut out = breaker_changed("tripped", &r.breaker);
    if let Some(note) = termination_note(r) {
        out += &format!("\n{note}");
    }
    out
}

/// What a trip did to the service's established connections, if its policy terminates them.
pub fn termination_note(r: &pb::TripResponse) -> Option<String> {
    let terminates = r
        .breaker
        .as_ref()
        .and_then(|b| b.policy.as_ref())
        .is_some_and(|p| p.terminate_established);
    if !r.not_terminated.is_empty() {
        Some(format!(
            "established connections NOT terminated: {}",
            r.not_terminated
        ))
    } else if terminates {
        Some(format!(
            "terminated {} established connection{}",
            r.terminated,
            if r.terminated == 1 { "" } else { "s" }
        ))
    } else {
        None
    }
}

/// One line per state change.
pub fn breaker_event(e: &pb::BreakerEvent) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(e.time_unix_ms);
    let mut out = format!(
        "{} {} {} -> {} ({}) requests={} failures={} consecutive_failures={}",
        humantime::format_rfc3339_millis(time),
        if e.destination.is_empty() {
            e.service.clone()
        } else {
            format!("{} {}", e.service, e.destination)
        },
        breaker_state(e.from),
        breaker_state(e.to),
        breaker_cause(e.cause),
        e.requests,
        e.failures,
        e.consecutive_failures
    );
    if !e.reason.is_empty() {
        out += &format!(" reason={:?}", e.reason);
    }
    if e.lost > 0 {
        out += &format!(" [{} events lost before this one]", e.lost);
    }
    out
}

/// One connection event as a line: time, kind, both ends, process, service.
pub fn connection_event(e: &pb::ConnectionEvent) -> String {
    let time = humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(e.time_unix_ms),
    );
    let kind = e
        .kind()
        .as_str_name()
        .trim_start_matches("CONNECTION_EVENT_KIND_")
        .to_ascii_lowercase();
    let arrow = if e.direction() == pb::Direction::Inbound {
        "<-"
    } else {
        "->"
    };
    let local = if e.local_address.is_empty() {
        "-".to_owned()
    } else {
        endpoint(&e.local_address, e.local_port)
    };
    let mut line = format!(
        "{time} {kind:<8} {local} {arrow} {} pid={} comm={}",
        endpoint(&e.remote_address, e.remote_port),
        e.pid,
        e.comm
    );
    if !e.reason.is_empty() {
        line += &format!(" reason={}", e.reason);
    }
    if !e.service.is_empty() {
        line += &format!(" service={}", e.service);
    }
    if !e.container_id.is_empty() {
        line += &format!(
            " container={}",
            &e.container_id[..12.min(e.container_id.len())]
        );
    } else if !e.cgroup.is_empty() {
        line += &format!(" cgroup={}", e.cgroup);
    }
    if e.kind() == pb::ConnectionEventKind::Closed {
        line += &format!(" sent={} received={}", e.bytes_sent, e.bytes_received);
    }
    if e.lost > 0 {
        line += &format!(" (lost {} before this)", e.lost);
    }
    line
}

/// What a reload changed.
pub fn reloaded(r: &pb::ReloadConfigResponse) -> String {
    let mut parts = Vec::new();
    for (what, names) in [
        ("services added", &r.services_added),
        ("services changed", &r.services_changed),
        ("services removed", &r.services_removed),
        ("policies changed", &r.policies_changed),
        ("scope added", &r.scope_added),
        ("scope removed", &r.scope_removed),
        ("applied", &r.applied),
        ("take effect at the next start", &r.pending_restart),
    ] {
        if !names.is_empty() {
            parts.push(format!("{what}: {}", names.join(", ")));
        }
    }
    if parts.is_empty() {
        format!("reloaded {}: nothing changed", r.config_path)
    } else {
        format!("reloaded {}\n  {}", r.config_path, parts.join("\n  "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breakers_read_naturally() {
        let policy = pb::BreakerPolicy {
            min_requests: 3,
            failure_ratio: 0.6,
            interval_ms: 60_000,
            open_timeout_ms: 30_000,
            half_open_max: 1,
            errno: "ECONNREFUSED".into(),
            terminate_established: true,
            ..Default::default()
        };
        assert_eq!(
            policy_summary(&policy),
            "ratio>=0.6 of>=3 per 1m; open 30s, 1 probe, ECONNREFUSED"
        );
        let b = pb::Breaker {
            service: "db".into(),
            state: pb::BreakerState::Open.into(),
            forced: true,
            reason: "maintenance".into(),
            policy: Some(policy),
            ..Default::default()
        };
        let out = breaker_changed("tripped", &Some(b.clone()));
        assert!(out.starts_with("tripped db\n"), "{out}");
        assert!(out.contains("open (forced)"), "{out}");
        assert!(out.contains("until reset"), "{out}");
        assert!(out.contains("db forced open: maintenance"), "{out}");
        let fleets = pb::Breaker {
            tripped_by: pb::Owner::Fleet.into(),
            policy_owner: pb::Owner::Fleet.into(),
            ..b.clone()
        };
        let out = breaker_changed("tripped", &Some(fleets));
        assert!(
            out.contains("db forced open by fleet: maintenance"),
            "{out}"
        );
        let line = breaker_event(&pb::BreakerEvent {
            service: "db".into(),
            from: pb::BreakerState::Closed.into(),
            to: pb::BreakerState::Open.into(),
            cause: pb::BreakerCause::FailureRatio.into(),
            requests: 5,
            failures: 3,
            consecutive_failures: 3,
            time_unix_ms: 1_000,
            reason: String::new(),
            lost: 2,
            ..Default::default()
        });
        assert_eq!(
            line,
            "1970-01-01T00:00:01.000Z db closed -> open (failure_ratio) requests=5 failures=3 \
             consecutive_failures=3 [2 events lost before this one]"
        );
    }

    #[test]
    fn info_lists_the_features() {
        let r = pb::GetAgentInfoResponse {
            version: "0.1.0".into(),
            kernel: "6.1.0-28-amd64".into(),
            features: vec![
                pb::Feature {
                    name: "connection_tracking".into(),
                    status: pb::FeatureStatus::On.into(),
                    hook: "tp_btf/inet_sock_set_state".into(),
                    reason: String::new(),
                },
                pb::Feature {
                    name: "first_response_latency".into(),
                    status: pb::FeatureStatus::Off.into(),
                    hook: String::new(),
                    reason: "disabled by configuration (features.disable)".into(),
                },
            ],
            ..Default::default()
        };
        let out = info(&r);
        let lines: Vec<&str> = out.lines().map(str::trim).collect();
        let header = lines.iter().position(|l| l.starts_with("FEATURE")).unwrap();
        assert!(lines[header].contains("STATUS") && lines[header].contains("REASON"));
        assert!(lines[header + 1].starts_with("connection_tracking"));
        assert!(lines[header + 1].contains(" on ") && lines[header + 1].ends_with('-'));
        let off = lines[header + 2];
        assert!(off.starts_with("first_response_latency"), "{out}");
        assert!(off.contains(" off ") && off.contains(" - "), "{out}");
        assert!(off.ends_with("disabled by configuration (features.disable)"));
    }

    #[test]
    fn latency_names_what_is_not_measured() {
        let r = pb::GetLatencyResponse {
            histograms: vec![pb::Histogram {
                kind: "connect".into(),
                count: 0,
                ..Default::default()
            }],
            features_off: vec![pb::Feature {
                name: "first_response_latency".into(),
                status: pb::FeatureStatus::Off.into(),
                hook: String::new(),
                reason: "no tcp_sendmsg_locked tracepoint (Linux 6.12 brings it)".into(),
            }],
        };
        assert_eq!(
            latency(&r),
            "connect latency: 0 samples, p50 0µs, p90 0µs, p99 0µs, max < 0µs\n\
             first_response latency not measured: first_response_latency is off: no \
             tcp_sendmsg_locked tracepoint (Linux 6.12 brings it)"
        );
    }

    #[test]
    fn trips_say_what_became_of_the_connections() {
        let b = |terminate| pb::Breaker {
            service: "db".into(),
            state: pb::BreakerState::Open.into(),
            policy: Some(pb::BreakerPolicy {
                terminate_established: terminate,
                half_open_max: 1,
                ..Default::default()
            }),
            ..Default::default()
        };
        let r = pb::TripResponse {
            breaker: Some(b(true)),
            terminated: 3,
            not_terminated: String::new(),
        };
        assert!(tripped(&r).ends_with("\nterminated 3 established connections"));
        let r = pb::TripResponse {
            breaker: Some(b(true)),
            terminated: 0,
            not_terminated: "terminate_on_trip is off: x".into(),
        };
        assert!(tripped(&r)
            .ends_with("\nestablished connections NOT terminated: terminate_on_trip is off: x"));
        let r = pb::TripResponse {
            breaker: Some(b(false)),
            ..Default::default()
        };
        assert_eq!(termination_note(&r), None);
    }

    #[test]
    fn counter_columns_are_as_documented() {
        let d = pb::Destination {
            address: "10.0.0.1".into(),
            port: 80,
            direction: pb::Direction::Outbound.into(),
            netns: 7,
            active: 1,
            opened: 2,
            closed: 3,
            failed_refused: 4,
            failed_timeout: 5,
            failed_other: 6,
            time_wait_entered: 7,
            retransmits: 8,
            bytes_sent: 9,
            bytes_received: 10,
            ..Default::default()
        };
        let rows = destinations_rows(&pb::ListDestinationsResponse {
            destinations: vec![d],
        });
        assert_eq!(
            rows.header,
            [
                "DESTINATION",
                "DIR",
                "SERVICE",
                "NETNS",
                "ACTIVE",
                "OPENED",
                "CLOSED",
                "REFUSED",
                "TIMEOUT",
                "OTHER",
                "TO-TW",
                "RETX"
            ]
        );
        let cells: Vec<String> = rows.rows[0].iter().map(|c| c.content()).collect();
        assert_eq!(
            cells,
            [
                "10.0.0.1:80",
                "out",
                "-",
                "7",
                "1",
                "2",
                "3",
                "4",
                "5",
                "6",
                "7",
                "8"
            ]
        );

        let counts = |base: u64| pb::ConnCounts {
            active: base + 1,
            opened: base + 2,
            closed: base + 3,
            failed_refused: base + 4,
            failed_timeout: base + 5,
            failed_other: base + 6,
            ..Default::default()
        };
        let rows = services_rows(&pb::ListServicesResponse {
            services: vec![pb::Service {
                name: "db".into(),
                endpoints: vec!["10.0.0.1:80".into()],
                outbound: Some(counts(0)),
                inbound: Some(counts(10)),
                connect_p50_us: 1500,
                connect_p99_us: 0,
                owner: pb::Owner::Fleet.into(),
                shadowed: pb::Owner::Config.into(),
                protected: Vec::new(),
            }],
        });
        assert_eq!(
            rows.header,
            [
                "SERVICE",
                "OWNER",
                "ENDPOINTS",
                "ACTIVE",
                "OPENED",
                "CLOSED",
                "REFUSED",
                "TIMEOUT",
                "OTHER",
                "IN-ACTIVE",
                "IN-OPENED",
                "CONNECT-P50",
                "CONNECT-P99"
            ]
        );
        let cells: Vec<String> = rows.rows[0].iter().map(|c| c.content()).collect();
        assert_eq!(
            cells,
            [
                "db",
                "fleet (shadows config)",
                "10.0.0.1:80",
                "1",
                "2",
                "3",
                "4",
                "5",
                "6",
                "11",
                "12",
                "1.5ms",
                "-"
            ]
        );
    }

    #[test]
    fn ages_read_naturally() {
        assert_eq!(age(5), "5ms");
        assert_eq!(age(61_000), "1m1s");
        assert_eq!(age(3_720_000), "1h2m");
    }

    #[test]
    fn ipv6_endpoints_get_brackets() {
        assert_eq!(endpoint("::1", 80), "[::1]:80");
        assert_eq!(endpoint("127.0.0.1", 80), "127.0.0.1:80");
    }
}
