//! Tables for people; `-o json` bypasses all of this.

use breakwater_proto::v1 as pb;
use comfy_table::{presets::NOTHING, Cell, CellAlignment, Table};

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(NOTHING);
    t.set_header(header.iter().map(Cell::new));
    t
}

fn num(v: u64) -> Cell {
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

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

pub fn services(r: &pb::ListServicesResponse) -> String {
    let mut t = table(&[
        "SERVICE",
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
        "CONNECT-P99",
    ]);
    for s in &r.services {
        let o = s.outbound.unwrap_or_default();
        let i = s.inbound.unwrap_or_default();
        t.add_row(vec![
            Cell::new(&s.name),
            Cell::new(s.endpoints.join(",")),
            num(o.active),
            num(o.opened),
            num(o.closed),
            num(o.failed_refused),
            num(o.failed_timeout),
            num(o.failed_other),
            num(i.active),
            num(i.opened),
            Cell::new(if s.connect_p50_us == 0 {
                "-".into()
            } else {
                micros(s.connect_p50_us)
            }),
            Cell::new(if s.connect_p99_us == 0 {
                "-".into()
            } else {
                micros(s.connect_p99_us)
            }),
        ]);
    }
    if r.services.is_empty() {
        return "no services (add one with `breakwater service put NAME --endpoint IP:PORT`)"
            .into();
    }
    t.to_string()
}

pub fn destinations(r: &pb::ListDestinationsResponse) -> String {
    let mut t = table(&[
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
        "RETX",
    ]);
    for d in &r.destinations {
        t.add_row(vec![
            Cell::new(endpoint(&d.address, d.port)),
            Cell::new(direction(d.direction)),
            Cell::new(or_dash(&d.service)),
            Cell::new(d.netns),
            num(d.active),
            num(d.opened),
            num(d.closed),
            num(d.failed_refused),
            num(d.failed_timeout),
            num(d.failed_other),
            num(d.time_wait_entered),
            num(d.retransmits),
        ]);
    }
    t.to_string()
}

pub fn connections(r: &pb::ListConnectionsResponse) -> String {
    let mut t = table(&[
        "LOCAL", "REMOTE", "DIR", "STATE", "PID", "COMM", "CGROUP", "SERVICE", "AGE",
    ]);
    for c in &r.connections {
        t.add_row(vec![
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
    t.to_string()
}

fn age(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{}s", ms / 1_000),
        60_000..3_600_000 => format!("{}m{}s", ms / 60_000, ms % 60_000 / 1_000),
        _ => format!("{}h{}m", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

/// bcc-style histograms: one line per bucket from the first to the last non-empty one.
pub fn latency(r: &pb::GetLatencyResponse) -> String {
    let mut out = String::new();
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
            let (lo, hi) = crate::latency::bounds(idx);
            let bar = "*".repeat((count * 40).div_ceil(top) as usize);
            out += &format!("{lo:>10} -> {:<10} : {count:<8} |{bar:<40}|\n", hi - 1);
        }
    }
    out.trim_end().to_owned()
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
    format!(
        "{} service {}: {}",
        if r.replaced { "replaced" } else { "created" },
        s.name,
        s.endpoints.join(", ")
    )
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
    format!("{out}\n{p}\n\n{m}\n\n{c}")
}

#[cfg(test)]
mod tests {
    use super::*;

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
