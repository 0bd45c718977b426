//! TIME_WAIT per destination and ephemeral-port pressure, from a walk of every socket.

use std::collections::{BTreeMap, BTreeSet};

use breakwater_common::{direction, tcp_state, SockRecord};

use super::service::ServiceTable;
use crate::netns::NetSettings;

/// Share of a namespace's ephemeral port range in use toward one destination that raises a
/// warning, and a critical finding.
pub const WARN: f64 = 0.5;
pub const CRITICAL: f64 = 0.8;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Warn,
    Critical,
}

impl Level {
    pub fn of(ratio: f64) -> Self {
        if ratio >= CRITICAL {
            Self::Critical
        } else if ratio >= WARN {
            Self::Warn
        } else {
            Self::Ok
        }
    }
}

/// Sockets in TIME_WAIT under one key (outbound: remote end; inbound: local end).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimeWait {
    pub netns: u32,
    pub addr: [u8; 16],
    pub port: u16,
    pub direction: u8,
    pub count: u64,
}

/// Ephemeral ports in use from one source address toward one destination.
#[derive(Clone, Debug, PartialEq)]
pub struct Pressure {
    pub netns: u32,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub dport: u16,
    /// Sockets in any state whose local port lies in the namespace's ephemeral range.
    pub in_use: u64,
    /// Of which in TIME_WAIT.
    pub time_wait: u64,
    pub settings: NetSettings,
    pub ratio: f64,
    pub level: Level,
}

#[derive(Debug, Default, PartialEq)]
pub struct Report {
    /// Most TIME_WAIT first.
    pub time_wait: Vec<TimeWait>,
    /// Highest ratio first.
    pub pressure: Vec<Pressure>,
}

impl Report {
    /// Sockets in TIME_WAIT per service, `[outbound, inbound]`, over every namespace: each key
    /// counted under the service whose endpoint it matches; services without any are absent.
    pub fn by_service<'a>(&self, services: &'a ServiceTable) -> BTreeMap<&'a str, [u64; 2]> {
        let mut out = BTreeMap::<&str, [u64; 2]>::new();
        for t in &self.time_wait {
            if let Some(s) = services.match_endpoint(&t.addr, t.port) {
                out.entry(&s.name).or_default()[usize::from(t.direction == direction::INBOUND)] +=
                    t.count;
            }
        }
        out
    }
}

type PressureKey = ([u8; 16], [u8; 16], u16);

/// Counts per namespace. A socket whose local port has a listener is inbound, like the seed.
pub fn analyze(namespaces: &[(u32, Vec<SockRecord>, NetSettings)]) -> Report {
    let mut report = Report::default();
    for (netns, socks, settings) in namespaces {
        let listening: BTreeSet<u16> = socks
            .iter()
            .filter(|s| s.state == tcp_state::LISTEN)
            .map(|s| s.sport)
            .collect();
        let (lo, hi) = settings.port_range;
        let range = u64::from(hi.saturating_sub(lo)) + 1;
        let mut tw: BTreeMap<([u8; 16], u16, u8), u64> = BTreeMap::new();
        // (source, destination, port) -> (in use, of which in TIME_WAIT)
        let mut ports: BTreeMap<PressureKey, (u64, u64)> = BTreeMap::new();
        for s in socks
            .iter()
            .filter(|s| s.state != tcp_state::LISTEN && s.dport != 0)
        {
            let is_tw = s.state == tcp_state::TIME_WAIT;
            if listening.contains(&s.sport) {
                if is_tw {
                    *tw.entry((s.saddr, s.sport, direction::INBOUND))
                        .or_default() += 1;
                }
                continue;
            }
            if is_tw {
                *tw.entry((s.daddr, s.dport, direction::OUTBOUND))
                    .or_default() += 1;
            }
            if (lo..=hi).contains(&s.sport) {
                let e = ports.entry((s.saddr, s.daddr, s.dport)).or_default();
                e.0 += 1;
                e.1 += u64::from(is_tw);
            }
        }
        report.time_wait.extend(
            tw.into_iter()
                .map(|((addr, port, direction), count)| TimeWait {
                    netns: *netns,
                    addr,
                    port,
                    direction,
                    count,
                }),
        );
        report.pressure.extend(ports.into_iter().map(
            |((saddr, daddr, dport), (in_use, time_wait))| {
                let ratio = in_use as f64 / range as f64;
                Pressure {
                    netns: *netns,
                    saddr,
                    daddr,
                    dport,
                    in_use,
                    time_wait,
                    settings: *settings,
                    ratio,
                    level: Level::of(ratio),
                }
            },
        ));
    }
    report
        .time_wait
        .sort_by(|a, b| b.count.cmp(&a.count).then(a.port.cmp(&b.port)));
    report
        .pressure
        .sort_by(|a, b| b.ratio.total_cmp(&a.ratio).then(a.dport.cmp(&b.dport)));
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use breakwater_common::v4_mapped;

    fn sock(state: u8, s: [u8; 4], sport: u16, d: [u8; 4], dport: u16) -> SockRecord {
        SockRecord {
            saddr: v4_mapped(s),
            daddr: v4_mapped(d),
            sport,
            dport,
            state,
            ..Default::default()
        }
    }

    #[test]
    fn time_wait_by_service_sums_each_direction_over_namespaces() {
        let mut services = ServiceTable::new(8, 64);
        services
            .put("db", vec!["10.0.0.0/24:5432".parse().unwrap()])
            .unwrap();
        let tw = |netns, addr: [u8; 4], port, direction, count| TimeWait {
            netns,
            addr: v4_mapped(addr),
            port,
            direction,
            count,
        };
        let report = Report {
            time_wait: vec![
                tw(1, [10, 0, 0, 1], 5432, direction::OUTBOUND, 3),
                tw(2, [10, 0, 0, 9], 5432, direction::OUTBOUND, 2),
                tw(1, [10, 0, 0, 1], 5432, direction::INBOUND, 4),
                tw(1, [10, 0, 1, 1], 5432, direction::OUTBOUND, 7),
            ],
            pressure: Vec::new(),
        };
        let by = report.by_service(&services);
        assert_eq!(by.into_iter().collect::<Vec<_>>(), [("db", [5, 4])]);
    }

    #[test]
    fn counts_time_wait_by_direction_and_pressure_by_destination() {
        let settings = NetSettings {
            port_range: (50000, 50099),
            ..Default::default()
        };
        let (me, db, web) = ([10, 0, 0, 1], [10, 0, 0, 9], [10, 0, 0, 5]);
        let mut socks = vec![sock(tcp_state::LISTEN, me, 80, [0; 4], 0)];
        // 60 ports toward db:5432, 40 of them in TIME_WAIT; one bound outside the range.
        for i in 0..60 {
            let state = if i < 40 {
                tcp_state::TIME_WAIT
            } else {
                tcp_state::ESTABLISHED
            };
            socks.push(sock(state, me, 50000 + i, db, 5432));
        }
        socks.push(sock(tcp_state::ESTABLISHED, me, 1234, db, 5432));
        // Server side: clients' connections to our port 80, 3 in TIME_WAIT.
        for i in 0..3 {
            socks.push(sock(tcp_state::TIME_WAIT, me, 80, web, 40000 + i));
        }
        let r = analyze(&[(7, socks, settings)]);
        assert_eq!(
            r.time_wait,
            vec![
                TimeWait {
                    netns: 7,
                    addr: v4_mapped(db),
                    port: 5432,
                    direction: direction::OUTBOUND,
                    count: 40
                },
                TimeWait {
                    netns: 7,
                    addr: v4_mapped(me),
                    port: 80,
                    direction: direction::INBOUND,
                    count: 3
                },
            ]
        );
        assert_eq!(r.pressure.len(), 1);
        let p = &r.pressure[0];
        assert_eq!((p.in_use, p.time_wait), (60, 40));
        assert!((p.ratio - 0.6).abs() < 1e-9);
        assert_eq!(p.level, Level::Warn);
    }

    #[test]
    fn levels_at_the_thresholds() {
        assert_eq!(Level::of(0.49), Level::Ok);
        assert_eq!(Level::of(0.5), Level::Warn);
        assert_eq!(Level::of(0.8), Level::Critical);
    }
}
