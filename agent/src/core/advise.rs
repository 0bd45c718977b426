//! The advisor: each namespace's TCP settings set against what the agent observed (TIME_WAIT,
//! port pressure, listen-queue overflows, connection churn), as findings with their evidence and
//! the change they recommend. It never changes a setting.

use std::collections::BTreeMap;

use breakwater_common::{direction, tcp_state, SockRecord};

use super::{
    service::display_addr,
    timewait::{Level, Report},
};
use crate::netns::NetSettings;

/// Churn: at least this many new connections per second ...
pub const CHURN_MIN_RATE: f64 = 5.0;
/// ... whose median lifetime is under this many microseconds.
pub const CHURN_MAX_MEDIAN_US: u64 = 1_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Info,
    Warn,
    Critical,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    pub kind: &'static str,
    pub severity: Severity,
    pub netns: u32,
    pub subject: String,
    pub evidence: String,
    pub recommendation: String,
}

/// What a namespace looks like now.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NsView {
    pub netns: u32,
    pub settings: NetSettings,
    pub sockets: u64,
    pub time_wait: u64,
    pub fin_wait2: u64,
}

impl NsView {
    pub fn new(netns: u32, socks: &[SockRecord], settings: NetSettings) -> Self {
        let count = |state| socks.iter().filter(|s| s.state == state).count() as u64;
        Self {
            netns,
            settings,
            sockets: socks.len() as u64,
            time_wait: count(tcp_state::TIME_WAIT),
            fin_wait2: count(tcp_state::FIN_WAIT2),
        }
    }
}

/// A destination (or local endpoint) with its connection rate and median lifetime.
#[derive(Clone, Debug, PartialEq)]
pub struct ChurnSample {
    pub netns: u32,
    pub addr: [u8; 16],
    pub port: u16,
    pub direction: u8,
    pub service: String,
    pub opened_per_s: f64,
    pub median_lifetime_us: u64,
    pub samples: u64,
}

fn endpoint(addr: &[u8; 16], port: u16, service: &str) -> String {
    let a = display_addr(addr);
    let e = if a.is_ipv6() {
        format!("[{a}]:{port}")
    } else {
        format!("{a}:{port}")
    };
    if service.is_empty() {
        e
    } else {
        format!("{e} ({service})")
    }
}

pub fn advise(
    namespaces: &[NsView],
    report: &Report,
    churn: &[ChurnSample],
    service_of: impl Fn(&[u8; 16], u16) -> String,
    file_max: u64,
) -> Vec<Finding> {
    let mut out = Vec::new();
    let by_ns: BTreeMap<u32, &NsView> = namespaces.iter().map(|n| (n.netns, n)).collect();

    for p in report.pressure.iter().filter(|p| p.level >= Level::Warn) {
        let (lo, hi) = p.settings.port_range;
        let size = u32::from(hi) - u32::from(lo) + 1;
        let mut recommend = Vec::new();
        if p.settings.tcp_tw_reuse != 1 && p.time_wait > 0 {
            recommend.push(
                "set net.ipv4.tcp_tw_reuse=1 in this namespace so new connections to the same \
                 destination can reuse ports in TIME_WAIT"
                    .to_owned(),
            );
        }
        if size < 40_000 {
            recommend.push(format!(
                "widen net.ipv4.ip_local_port_range from \"{lo} {hi}\" (e.g. \"15000 65000\")"
            ));
        }
        recommend.push(
            "keep connections to this destination alive and reuse them (connection pooling, \
             HTTP keep-alive) so fewer ports are spent"
                .to_owned(),
        );
        out.push(Finding {
            kind: "port_pressure",
            severity: if p.level == Level::Critical {
                Severity::Critical
            } else {
                Severity::Warn
            },
            netns: p.netns,
            subject: format!(
                "{} -> {}",
                display_addr(&p.saddr),
                endpoint(&p.daddr, p.dport, &service_of(&p.daddr, p.dport))
            ),
            evidence: format!(
                "{} of {size} ephemeral ports ({:.0}%) in use, {} of them in TIME_WAIT; \
                 ip_local_port_range \"{lo} {hi}\", tcp_tw_reuse={}",
                p.in_use,
                p.ratio * 100.0,
                p.time_wait,
                p.settings.tcp_tw_reuse
            ),
            recommendation: recommend.join("; "),
        });
    }

    // TIME_WAIT piling up toward one destination while tcp_tw_reuse is off, short of pressure.
    for t in &report.time_wait {
        let Some(ns) = by_ns.get(&t.netns) else {
            continue;
        };
        let (lo, hi) = ns.settings.port_range;
        let size = u64::from(hi) - u64::from(lo) + 1;
        let already = out
            .iter()
            .any(|f| f.kind == "port_pressure" && f.netns == t.netns);
        if t.direction == direction::OUTBOUND
            && ns.settings.tcp_tw_reuse == 0
            && t.count * 10 >= size
            && !already
        {
            out.push(Finding {
                kind: "time_wait_reuse",
                severity: Severity::Info,
                netns: t.netns,
                subject: endpoint(&t.addr, t.port, &service_of(&t.addr, t.port)),
                evidence: format!(
                    "{} sockets in TIME_WAIT toward it ({}% of the ephemeral range); tcp_tw_reuse=0",
                    t.count,
                    t.count * 100 / size
                ),
                recommendation: "set net.ipv4.tcp_tw_reuse=1, and keep connections alive".into(),
            });
        }
    }

    for ns in namespaces {
        let s = &ns.settings;
        if s.tcp_max_tw_buckets > 0 && ns.time_wait * 2 >= u64::from(s.tcp_max_tw_buckets) {
            out.push(Finding {
                kind: "time_wait_buckets",
                severity: if ns.time_wait >= u64::from(s.tcp_max_tw_buckets) {
                    Severity::Critical
                } else {
                    Severity::Warn
                },
                netns: ns.netns,
                subject: "TIME_WAIT table".into(),
                evidence: format!(
                    "{} sockets in TIME_WAIT, tcp_max_tw_buckets={} (beyond it the kernel \
                     closes connections without TIME_WAIT)",
                    ns.time_wait, s.tcp_max_tw_buckets
                ),
                recommendation: format!(
                    "raise net.ipv4.tcp_max_tw_buckets (e.g. to {}) or reuse connections",
                    u64::from(s.tcp_max_tw_buckets).max(ns.time_wait) * 2
                ),
            });
        }
        if s.listen_overflows > 0 || s.listen_drops > 0 {
            out.push(Finding {
                kind: "listen_overflow",
                severity: Severity::Warn,
                netns: ns.netns,
                subject: "listen queues".into(),
                evidence: format!(
                    "ListenOverflows={} ListenDrops={} since the namespace started; somaxconn={}",
                    s.listen_overflows, s.listen_drops, s.somaxconn
                ),
                recommendation: format!(
                    "raise net.core.somaxconn (e.g. to {}) and the listen() backlog of the \
                     servers here, or accept faster",
                    (s.somaxconn * 4).max(4096)
                ),
            });
        }
        if ns.fin_wait2 >= 100 && s.tcp_fin_timeout > 30 {
            out.push(Finding {
                kind: "fin_wait2",
                severity: Severity::Info,
                netns: ns.netns,
                subject: "FIN_WAIT2 sockets".into(),
                evidence: format!(
                    "{} sockets in FIN_WAIT2; tcp_fin_timeout={}s",
                    ns.fin_wait2, s.tcp_fin_timeout
                ),
                recommendation: "lower net.ipv4.tcp_fin_timeout (e.g. to 30)".into(),
            });
        }
    }

    for c in churn {
        if c.opened_per_s >= CHURN_MIN_RATE
            && c.samples > 0
            && c.median_lifetime_us < CHURN_MAX_MEDIAN_US
        {
            let (whose, fix) = if c.direction == direction::INBOUND {
                (
                    "clients connecting to it",
                    "have its clients (gateways, proxies) keep upstream connections alive \
                     (e.g. nginx `keepalive` in the upstream block, HTTP/1.1 keep-alive, one \
                     long-lived gRPC channel)",
                )
            } else {
                (
                    "this node's clients",
                    "pool and keep alive the connections to it (HTTP keep-alive, connection \
                     pools, one long-lived gRPC channel) instead of one connection per request",
                )
            };
            let dir = if c.direction == direction::INBOUND {
                "inbound"
            } else {
                "outbound"
            };
            let lifetime = if c.median_lifetime_us < 1000 {
                format!("{} µs", c.median_lifetime_us)
            } else {
                format!("{:.1} ms", c.median_lifetime_us as f64 / 1000.0)
            };
            out.push(Finding {
                kind: "churn",
                severity: Severity::Warn,
                netns: c.netns,
                subject: format!("{} {dir}", endpoint(&c.addr, c.port, &c.service)),
                evidence: format!(
                    "{:.1} new connections/s from {whose}, median lifetime {lifetime} over {} \
                     closed connections: connections are not being reused",
                    c.opened_per_s, c.samples
                ),
                recommendation: fix.into(),
            });
        }
    }

    let sockets: u64 = namespaces.iter().map(|n| n.sockets).sum();
    if file_max > 0 && sockets * 2 >= file_max {
        out.push(Finding {
            kind: "file_max",
            severity: Severity::Warn,
            netns: 0,
            subject: "fs.file-max".into(),
            evidence: format!("{sockets} TCP sockets on the node, fs.file-max={file_max}"),
            recommendation: format!("raise fs.file-max (e.g. to {})", sockets * 4),
        });
    }

    out.sort_by(|a, b| b.severity.cmp(&a.severity).then(a.kind.cmp(b.kind)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::timewait::{self, Pressure};
    use breakwater_common::v4_mapped;

    fn settings() -> NetSettings {
        NetSettings {
            port_range: (50000, 50099),
            tcp_tw_reuse: 0,
            somaxconn: 4096,
            tcp_max_tw_buckets: 200,
            tcp_fin_timeout: 60,
            listen_overflows: 0,
            listen_drops: 0,
        }
    }

    #[test]
    fn narrow_range_without_reuse_gets_both_changes() {
        let p = Pressure {
            netns: 7,
            saddr: v4_mapped([127, 0, 0, 1]),
            daddr: v4_mapped([127, 0, 0, 1]),
            dport: 8080,
            in_use: 85,
            time_wait: 85,
            settings: settings(),
            ratio: 0.85,
            level: timewait::Level::Critical,
        };
        let report = Report {
            time_wait: vec![],
            pressure: vec![p],
        };
        let ns = NsView {
            netns: 7,
            settings: settings(),
            sockets: 90,
            time_wait: 85,
            fin_wait2: 0,
        };
        let f = advise(&[ns], &report, &[], |_, _| "web".into(), 1 << 20);
        let p = f.iter().find(|f| f.kind == "port_pressure").unwrap();
        assert_eq!(p.severity, Severity::Critical);
        assert_eq!(p.subject, "127.0.0.1 -> 127.0.0.1:8080 (web)");
        assert!(
            p.evidence.contains("85 of 100 ephemeral ports (85%)"),
            "{}",
            p.evidence
        );
        assert!(p.recommendation.contains("tcp_tw_reuse=1"));
        assert!(p.recommendation.contains("ip_local_port_range"));
        // 85 of 200 buckets is under half: no bucket finding; nothing else fires.
        assert_eq!(f.len(), 1, "{f:?}");
    }

    #[test]
    fn churn_listen_overflow_and_buckets() {
        let mut s = settings();
        s.listen_overflows = 3;
        let ns = NsView {
            netns: 1,
            settings: s,
            sockets: 150,
            time_wait: 150,
            fin_wait2: 0,
        };
        let churn = ChurnSample {
            netns: 1,
            addr: v4_mapped([10, 0, 0, 1]),
            port: 80,
            direction: direction::INBOUND,
            service: String::new(),
            opened_per_s: 120.0,
            median_lifetime_us: 2_000,
            samples: 500,
        };
        let slow = ChurnSample {
            opened_per_s: 120.0,
            median_lifetime_us: 5_000_000,
            ..churn.clone()
        };
        let f = advise(
            &[ns],
            &Report::default(),
            &[churn, slow],
            |_, _| String::new(),
            0,
        );
        let kinds: Vec<_> = f.iter().map(|f| f.kind).collect();
        assert_eq!(kinds, ["churn", "listen_overflow", "time_wait_buckets"]);
        assert!(f[0].evidence.contains("120.0 new connections/s"));
        assert!(f[0].recommendation.contains("keepalive"));
    }
}
