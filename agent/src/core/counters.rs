//! The connection counters the kernel keeps per destination and per service (`ConnStats`), in
//! one table: [`conn_counters!`]. It drives the user-side view of the kernel struct
//! ([`COUNTERS`], [`add`]), the proto conversions (`api::convert`), the Prometheus families
//! (`metrics`) and the CLI's columns (`cli::output`).
//!
//! A new counter is a field of `ConnStats` and the program that moves it (agent-ebpf
//! `sock.rs`), a field of the proto's `ConnCounts` and `Destination`, and a row here. A place
//! left out fails to compile (every struct literal and pattern the table expands to names every
//! field) or fails a unit test (the proto's descriptor against the table, the families, the
//! columns).

use breakwater_common::ConnStats;

/// The table. `conn_counters!(define)` makes [`COUNTERS`] and [`add`];
/// `conn_counters!(literal Type, src)` is the struct literal `Type { active: src.active, ... }`
/// of every counter, and `conn_counters!(literal Type, src, other: value, ...)` adds the other
/// fields of `Type`.
///
/// Rows are in the proto's field order, which is the order of the metric families and of the
/// CLI's columns. Each row's braces are the rest of its [`Counter`].
macro_rules! conn_counters {
    (@rows [define] $($field:ident { $($meta:tt)* })*) => {
        /// Every counter, in the proto's field order.
        pub const COUNTERS: &[Counter] = &[$(
            Counter {
                name: stringify!($field),
                get: |s| s.$field,
                $($meta)*
            },
        )*];

        /// Adds `s` to `into`, counter by counter.
        pub fn add(into: &mut ConnStats, s: &ConnStats) {
            $(into.$field += s.$field;)*
        }

        /// The table names every field of `ConnStats`, and nothing else: this pattern does
        /// not compile otherwise.
        const _: fn(ConnStats) = |s| {
            let ConnStats { $($field: _),* } = s;
        };
    };
    (@rows [literal $($ty:ident)::+, $src:expr $(, $other:ident : $value:expr)* $(,)?]
        $($field:ident { $($meta:tt)* })*) => {
        $($ty)::+ {
            $($field: $src.$field,)*
            $($other: $value,)*
        }
    };
    ($($how:tt)*) => {
        conn_counters! { @rows [$($how)*]
            active {
                kind: Kind::Gauge,
                family: "connections_active",
                label: None,
                help: "Connections in ESTABLISHED now, per {what} and direction",
                destinations_column: Some("ACTIVE"),
                services_columns: [Some("ACTIVE"), Some("IN-ACTIVE")],
            }
            opened {
                kind: Kind::Counter,
                family: "connections_opened",
                label: None,
                help: "Connections that reached ESTABLISHED, per {what} and direction",
                destinations_column: Some("OPENED"),
                services_columns: [Some("OPENED"), Some("IN-OPENED")],
            }
            closed {
                kind: Kind::Counter,
                family: "connections_closed",
                label: None,
                help: "Established connections that left ESTABLISHED, per {what} and direction",
                destinations_column: Some("CLOSED"),
                services_columns: [Some("CLOSED"), None],
            }
            failed_refused {
                kind: Kind::Counter,
                family: FAILED,
                label: Some(("reason", "refused")),
                help: "Connects that failed, per {what}, direction and reason: refused (RST), \
                       timeout (SYN retries ran out), other",
                destinations_column: Some("REFUSED"),
                services_columns: [Some("REFUSED"), None],
            }
            failed_timeout {
                kind: Kind::Counter,
                family: FAILED,
                label: Some(("reason", "timeout")),
                help: "",
                destinations_column: Some("TIMEOUT"),
                services_columns: [Some("TIMEOUT"), None],
            }
            failed_other {
                kind: Kind::Counter,
                family: FAILED,
                label: Some(("reason", "other")),
                help: "",
                destinations_column: Some("OTHER"),
                services_columns: [Some("OTHER"), None],
            }
            time_wait_entered {
                kind: Kind::Counter,
                family: "time_wait_entered",
                label: None,
                help: "Connections that went into TIME_WAIT on this side, per {what} and direction",
                destinations_column: Some("TO-TW"),
                services_columns: [None, None],
            }
            retransmits {
                kind: Kind::Counter,
                family: "retransmits",
                label: None,
                help: "Segments retransmitted (SYNs included), per {what} and direction",
                destinations_column: Some("RETX"),
                services_columns: [None, None],
            }
            bytes_sent {
                kind: Kind::Counter,
                family: "sent_bytes",
                label: None,
                help: "Payload bytes acknowledged by the peer over closed connections, per {what} \
                       and direction",
                destinations_column: None,
                services_columns: [None, None],
            }
            bytes_received {
                kind: Kind::Counter,
                family: "received_bytes",
                label: None,
                help: "Payload bytes received over closed connections, per {what} and direction",
                destinations_column: None,
                services_columns: [None, None],
            }
        }
    };
}
pub(crate) use conn_counters;

/// The family of the failed connects, one counter per reason.
pub const FAILED: &str = "connections_failed";

/// How Prometheus types a counter's family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Goes up and down (sockets in a state now).
    Gauge,
    /// Only goes up (`_total`).
    Counter,
}

/// One counter of `ConnStats` and where it shows.
#[derive(Clone, Copy, Debug)]
pub struct Counter {
    /// Its field in `ConnStats`, in the proto (`ConnCounts`, `Destination`) and in `-o json`.
    pub name: &'static str,
    pub get: fn(&ConnStats) -> u64,
    pub kind: Kind,
    /// The metric family after `breakwater_service_` / `breakwater_destination_` (the encoder
    /// appends a counter's `_total`). Counters of one family are neighbours in the table.
    pub family: &'static str,
    /// The label that tells the counters of one family apart.
    pub label: Option<(&'static str, &'static str)>,
    /// The family's help, on its first counter ("" on the others); `{what}` is "service" or
    /// "destination".
    pub help: &'static str,
    /// Its column in `breakwater destinations`.
    pub destinations_column: Option<&'static str>,
    /// Its columns in `breakwater services`: outbound, inbound.
    pub services_columns: [Option<&'static str>; 2],
}

conn_counters!(define);

/// Connects that failed, for whatever reason.
pub fn failed(s: &ConnStats) -> u64 {
    COUNTERS
        .iter()
        .filter(|c| c.family == FAILED)
        .map(|c| (c.get)(s))
        .sum()
}

/// A metric family and its counters, in table order.
pub fn families() -> impl Iterator<Item = (&'static str, Kind, &'static str, &'static [Counter])> {
    let mut rest = COUNTERS;
    std::iter::from_fn(move || {
        let first = rest.first()?;
        let n = rest.iter().take_while(|c| c.family == first.family).count();
        let (family, tail) = rest.split_at(n);
        rest = tail;
        Some((first.family, first.kind, first.help, family))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_family_is_one_run_of_one_kind_with_one_help() {
        let families: Vec<_> = families().collect();
        let names: Vec<_> = families.iter().map(|f| f.0).collect();
        let mut unique = names.clone();
        unique.dedup();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(
            unique.len(),
            names.len(),
            "a family split in two: {names:?}"
        );
        for (family, kind, help, counters) in families {
            assert!(!help.is_empty(), "{family} has no help");
            assert!(help.contains("{what}"), "{family}: {help}");
            for c in &counters[1..] {
                assert_eq!(c.kind, kind, "{}", c.name);
                assert_eq!(c.help, "", "{}: one help per family", c.name);
            }
            // Counters of a family with several are told apart by one label.
            if counters.len() > 1 {
                let labels: Vec<_> = counters.iter().map(|c| c.label).collect();
                assert!(labels.iter().all(|l| l.is_some_and(|l| l.0 == "reason")));
            } else {
                assert_eq!(counters[0].label, None, "{family}");
            }
        }
    }

    #[test]
    fn the_table_reads_and_adds_every_field() {
        // Each field its own power of two.
        let mut s = ConnStats::default();
        let fields = [
            &mut s.active,
            &mut s.opened,
            &mut s.closed,
            &mut s.failed_refused,
            &mut s.failed_timeout,
            &mut s.failed_other,
            &mut s.time_wait_entered,
            &mut s.retransmits,
            &mut s.bytes_sent,
            &mut s.bytes_received,
        ];
        let bits: Vec<u64> = (0..fields.len()).map(|i| 1 << i).collect();
        for (f, b) in fields.into_iter().zip(&bits) {
            *f = *b;
        }
        let got: Vec<u64> = COUNTERS.iter().map(|c| (c.get)(&s)).collect();
        assert_eq!(
            got, bits,
            "each counter reads its own field, in the struct's order"
        );
        assert_eq!(conn_counters!(literal ConnStats, s), s);
        let mut sum = s;
        add(&mut sum, &s);
        assert!(COUNTERS.iter().all(|c| (c.get)(&sum) == 2 * (c.get)(&s)));
        assert_eq!(failed(&s), 0b111000);
    }
}
