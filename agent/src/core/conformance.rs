//! The circuit breaker's conformance table: policies, the connects made under each and how
//! each ends, and the state the breaker must be in after each. The core's unit tests run it
//! against the in-memory kernel (agent-common's state machine, simulated time); the privileged
//! integration tests (`tests/tests/breaker.rs`) against the real kernel, with real connects to
//! a listening server, a closed port and a full accept queue. One table, so the two cannot
//! drift.

use std::time::Duration;

use breakwater_common::breaker::state::{CLOSED, HALF_OPEN, OPEN};

use super::policy::PolicySpec;

/// What a step of a run does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Connect to the listening endpoint: established (and closed again by the client).
    Up,
    /// Connect to the closed endpoint: the network refuses it (RST).
    Refused,
    /// Connect to the endpoint whose SYNs are dropped: it times out.
    Timeout,
    /// Connect while open: the breaker rejects it with this errno before any SYN.
    Rejected(i32),
    /// Let time pass (an open timeout).
    Wait(Duration),
}

/// A policy set on a service whose endpoints are the three of [`Step`], then steps and the
/// breaker's state (`breakwater_common::breaker::state`) after each.
#[derive(Clone, Debug)]
pub struct Run {
    pub policy: PolicySpec,
    pub steps: Vec<(Step, u32)>,
}

/// Runs one after the other on one service: a later run's policy replaces the earlier one's
/// (which closes the breaker and clears its counts).
#[derive(Clone, Debug)]
pub struct Case {
    pub name: &'static str,
    pub runs: Vec<Run>,
}

/// Just over the open timeouts of 1 s the table sets.
pub const SHORT: Duration = Duration::from_millis(1100);

const ECONNREFUSED: i32 = libc::ECONNREFUSED;

/// Every case.
pub fn table() -> Vec<Case> {
    use Step::*;
    let one_second = Some(Duration::from_secs(1));
    vec![
        Case {
            name: "gobreaker",
            runs: vec![
                // Requests >= 3 and failures / requests >= 0.6: 2 of 3 trips it.
                Run {
                    policy: PolicySpec::preset("gobreaker"),
                    steps: vec![
                        (Up, CLOSED),
                        (Refused, CLOSED),
                        (Refused, OPEN),
                        (Rejected(ECONNREFUSED), OPEN),
                    ],
                },
                // The same preset with a short open_timeout, to see Half-Open; a timeout is a
                // failure too.
                Run {
                    policy: PolicySpec {
                        open_timeout: one_second,
                        ..PolicySpec::preset("gobreaker")
                    },
                    steps: vec![
                        (Up, CLOSED),
                        (Up, CLOSED),
                        // 1 of 3, then 2 of 4, then 3 of 5 = 0.6.
                        (Timeout, CLOSED),
                        (Refused, CLOSED),
                        (Refused, OPEN),
                        (Rejected(ECONNREFUSED), OPEN),
                        (Wait(SHORT), HALF_OPEN),
                        // The one probe succeeds: closed again.
                        (Up, CLOSED),
                        (Up, CLOSED),
                    ],
                },
            ],
        },
        Case {
            name: "nginx",
            runs: vec![
                // max_fails=3 within fail_timeout: successes in between do not matter. At
                // service granularity: the table's steps count on the service's one breaker.
                Run {
                    policy: nginx_per_service(),
                    steps: vec![
                        (Refused, CLOSED),
                        (Up, CLOSED),
                        (Refused, CLOSED),
                        (Up, CLOSED),
                        (Up, CLOSED),
                        (Refused, OPEN),
                        (Rejected(ECONNREFUSED), OPEN),
                    ],
                },
                Run {
                    policy: PolicySpec {
                        open_timeout: one_second,
                        ..nginx_per_service()
                    },
                    steps: vec![
                        (Refused, CLOSED),
                        (Refused, CLOSED),
                        (Refused, OPEN),
                        (Wait(SHORT), HALF_OPEN),
                        // The trial connection fails: open again, for another open_timeout.
                        (Refused, OPEN),
                        (Rejected(ECONNREFUSED), OPEN),
                        (Wait(SHORT), HALF_OPEN),
                        (Up, CLOSED),
                    ],
                },
            ],
        },
        Case {
            name: "explicit",
            runs: vec![
                Run {
                    policy: PolicySpec {
                        consecutive_failures: Some(2),
                        open_timeout: one_second,
                        half_open_max: Some(2),
                        errno: Some("EHOSTUNREACH".into()),
                        ..Default::default()
                    },
                    steps: vec![
                        (Refused, CLOSED),
                        (Up, CLOSED),
                        (Refused, CLOSED),
                        (Timeout, OPEN),
                        (Rejected(libc::EHOSTUNREACH), OPEN),
                        (Wait(SHORT), HALF_OPEN),
                        // Two probes are needed to close; the first one's success is not
                        // enough.
                        (Up, HALF_OPEN),
                        (Up, CLOSED),
                        (Refused, CLOSED),
                        (Refused, OPEN),
                    ],
                },
                Run {
                    policy: PolicySpec {
                        consecutive_failures: Some(1),
                        errno: Some("EPERM".into()),
                        ..Default::default()
                    },
                    steps: vec![(Refused, OPEN), (Rejected(libc::EPERM), OPEN)],
                },
            ],
        },
    ]
}

/// The case of that name.
pub fn case(name: &str) -> Case {
    table()
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no conformance case {name:?}"))
}

/// The nginx preset's rule on the service's one breaker (the preset itself is per destination).
fn nginx_per_service() -> PolicySpec {
    PolicySpec {
        granularity: Some("service".into()),
        ..PolicySpec::preset("nginx")
    }
}
