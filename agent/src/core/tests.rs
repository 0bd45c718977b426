//! The core's rules, against the in-memory kernel: no root, no kernel.

use std::{net::SocketAddr, time::Duration};

use breakwater_common::{
    breaker::{cause, state},
    counter, direction, hist_kind,
};
use futures::StreamExt as _;

use super::{
    aggregate::DestinationQuery,
    audit::ConnectionEventKind,
    conformance::{self, Step},
    memory::{MemoryKernel, Outcome},
    owners::Owner,
    policy::PolicySpec,
    Core, Kernel,
};
use crate::{
    config::{Config, Overrides},
    error::Error,
};

/// The three endpoints of the conformance table: listening, closed, dropping SYNs.
const UP: &str = "127.0.0.1:1001";
const CLOSED: &str = "127.0.0.1:1002";
const HANG: &str = "127.0.0.1:1003";

fn addr(a: &str) -> SocketAddr {
    a.parse().unwrap()
}

fn core(kernel: &MemoryKernel) -> Core<MemoryKernel> {
    Core::new(
        kernel.clone(),
        Config::default(),
        None,
        Overrides::default(),
    )
}

fn policy(spec: PolicySpec) -> breakwater_common::breaker::Policy {
    spec.resolve().unwrap()
}

fn consecutive(n: u32) -> PolicySpec {
    PolicySpec {
        consecutive_failures: Some(n),
        ..Default::default()
    }
}

/// The kernel's transitions, read as the agent reads its ring buffer.
fn deliver(core: &mut Core<MemoryKernel>, kernel: &MemoryKernel) {
    core.on_kernel_events(&kernel.take_events());
    core.on_connection_events(&kernel.take_conn_events());
}

fn destination<K: Kernel + ?Sized>(core: &Core<K>, a: &str) -> breakwater_common::ConnStats {
    let a = addr(a);
    core.destinations(&DestinationQuery::default())
        .unwrap()
        .into_iter()
        .find(|d| super::service::display_addr(&d.key.addr) == a.ip() && d.key.port == a.port())
        .map(|d| d.stats)
        .unwrap_or_default()
}

#[test]
fn the_conformance_table_holds_in_memory() {
    for case in conformance::table() {
        let kernel = MemoryKernel::new();
        let mut core = core(&kernel);
        core.put_service(Owner::Local, "svc", &[UP, CLOSED, HANG])
            .unwrap();
        for (r, run) in case.runs.iter().enumerate() {
            core.set_policy(Owner::Local, "svc", policy(run.policy.clone()))
                .unwrap();
            for (i, &(step, want)) in run.steps.iter().enumerate() {
                let at = format!("{} run {r} step {i} ({step:?})", case.name);
                let rejected =
                    |core: &Core<MemoryKernel>| core.breaker("svc").unwrap().totals.rejected;
                match step {
                    Step::Up => {
                        let c = kernel
                            .connect(addr(UP), Outcome::Established)
                            .unwrap_or_else(|e| panic!("{at}: rejected with {e}"));
                        kernel.close(c);
                    }
                    Step::Refused | Step::Timeout => {
                        let before = rejected(&core);
                        let (to, outcome) = if step == Step::Refused {
                            (CLOSED, Outcome::Refused)
                        } else {
                            (HANG, Outcome::Timeout)
                        };
                        kernel
                            .connect(addr(to), outcome)
                            .unwrap_or_else(|e| panic!("{at}: rejected with {e}"));
                        assert_eq!(rejected(&core), before, "{at}: not rejected by the breaker");
                    }
                    Step::Rejected(errno) => {
                        let before = rejected(&core);
                        let opened = destination(&core, UP).opened;
                        let failed = destination(&core, CLOSED).failed_refused;
                        for to in [UP, CLOSED, HANG, UP, UP] {
                            let got = kernel.connect(addr(to), Outcome::Established);
                            assert_eq!(got, Err(errno), "{at}: {to}");
                        }
                        assert_eq!(rejected(&core), before + 5, "{at}");
                        assert_eq!(destination(&core, UP).opened, opened, "{at}: no SYN sent");
                        assert_eq!(destination(&core, CLOSED).failed_refused, failed, "{at}");
                    }
                    Step::Wait(d) => kernel.advance(d),
                }
                deliver(&mut core, &kernel);
                let b = core.breaker("svc").unwrap();
                assert_eq!(b.counts.state, want, "{at}: {b:?}");
            }
        }
    }
}

#[test]
fn a_tripped_preset_reports_its_trip_and_open_time() {
    // What the integration test checks after the gobreaker case's first run, in memory.
    let case = conformance::case("gobreaker");
    let kernel = MemoryKernel::new();
    let mut core = core(&kernel);
    core.put_service(Owner::Local, "svc", &[UP, CLOSED, HANG])
        .unwrap();
    core.set_policy(Owner::Local, "svc", policy(case.runs[0].policy.clone()))
        .unwrap();
    for to in [CLOSED, CLOSED, CLOSED] {
        kernel.connect(addr(to), Outcome::Refused).unwrap();
    }
    deliver(&mut core, &kernel);
    let b = core.breaker("svc").unwrap();
    assert_eq!(
        (b.counts.state, b.totals.trips, b.counts.forced),
        (state::OPEN, 1, 0)
    );
    assert_eq!(b.open_remaining_ms, 30_000);
    kernel.advance(Duration::from_secs(10));
    assert_eq!(core.breaker("svc").unwrap().open_remaining_ms, 20_000);
    // Past the deadline it reads Half-Open before any connect moves it there.
    kernel.advance(Duration::from_secs(20));
    assert_eq!(core.breaker("svc").unwrap().counts.state, state::HALF_OPEN);
}

#[test]
fn a_kernel_trip_is_published_and_terminates_the_services_connections() {
    let kernel = MemoryKernel::new();
    let mut core = core(&kernel);
    core.put_service(Owner::Local, "db", &[UP, CLOSED]).unwrap();
    core.put_service(Owner::Local, "web", &["127.0.0.1:2000"])
        .unwrap();
    core.set_policy(Owner::Local, "db", policy(consecutive(1)))
        .unwrap();
    let events = core.watch_breakers("db").unwrap().stream();
    let _db = kernel.connect(addr(UP), Outcome::Established).unwrap();
    let _web = kernel
        .connect(addr("127.0.0.1:2000"), Outcome::Established)
        .unwrap();
    kernel.connect(addr(CLOSED), Outcome::Refused).unwrap();
    assert_eq!(kernel.live(), 2);
    deliver(&mut core, &kernel);
    // db's connection is destroyed, web's is not.
    assert_eq!(kernel.live(), 1);
    drop(core);
    let got: Vec<_> = futures::executor::block_on(events.collect());
    assert_eq!(got.len(), 1);
    let (e, lost) = &got[0];
    assert_eq!(*lost, 0);
    assert_eq!(
        (e.service.as_str(), e.transition.from, e.transition.to),
        ("db", state::CLOSED, state::OPEN)
    );
    assert_eq!(
        (
            e.transition.cause,
            e.transition.requests,
            e.transition.failures
        ),
        (cause::CONSECUTIVE_FAILURES, 2, 1)
    );
}

#[test]
fn a_policy_that_keeps_connections_keeps_them() {
    let kernel = MemoryKernel::new();
    let mut core = core(&kernel);
    core.put_service(Owner::Local, "db", &[UP, CLOSED]).unwrap();
    let keep = PolicySpec {
        terminate_established: Some(false),
        ..consecutive(1)
    };
    core.set_policy(Owner::Local, "db", policy(keep)).unwrap();
    kernel.connect(addr(UP), Outcome::Established).unwrap();
    kernel.connect(addr(CLOSED), Outcome::Refused).unwrap();
    deliver(&mut core, &kernel);
    assert_eq!(core.breaker("db").unwrap().counts.state, state::OPEN);
    assert_eq!(kernel.live(), 1);
    let (_, t) = core.trip(Owner::Local, "db", None, "").unwrap();
    assert_eq!((t.terminated, t.not_terminated.as_str()), (0, ""));
    assert_eq!(kernel.live(), 1);
}

#[test]
fn a_reset_by_the_peer_turns_a_success_into_a_failure() {
    let kernel = MemoryKernel::new();
    let mut core = core(&kernel);
    core.put_service(Owner::Local, "db", &[UP]).unwrap();
    core.set_policy(Owner::Local, "db", policy(consecutive(1)))
        .unwrap();
    let c = kernel.connect(addr(UP), Outcome::Established).unwrap();
    deliver(&mut core, &kernel);
    assert_eq!(core.breaker("db").unwrap().counts.successes, 1);
    kernel.reset_by_peer(c);
    deliver(&mut core, &kernel);
    let b = core.breaker("db").unwrap();
    assert_eq!((b.counts.state, b.totals.trips), (state::OPEN, 1));
}

#[test]
fn manual_trips_are_forced_for_their_ttl_and_resets_lift_them() {
    let kernel = MemoryKernel::new();
    let mut core = core(&kernel);
    core.put_service(Owner::Local, "db", &[UP]).unwrap();
    core.set_policy(Owner::Local, "db", policy(consecutive(5)))
        .unwrap();
    let mut events = Box::pin(core.watch_breakers("").unwrap().stream());
    let (b, _) = core
        .trip(
            Owner::Local,
            "db",
            Some(Duration::from_secs(2)),
            "maintenance",
        )
        .unwrap();
    assert_eq!(
        (b.counts.state, b.counts.forced, b.totals.trips),
        (state::OPEN, 1, 1)
    );
    assert_eq!(
        (b.reason.as_str(), b.open_remaining_ms),
        ("maintenance", 2000)
    );
    assert_eq!(
        kernel.connect(addr(UP), Outcome::Established),
        Err(libc::ECONNREFUSED)
    );
    let (e, _) = futures::executor::block_on(events.next()).unwrap();
    assert_eq!(
        (e.transition.cause, e.reason.as_str()),
        (cause::MANUAL, "maintenance")
    );
    // The TTL runs out in the kernel: the next connect finds it closed.
    kernel.advance(Duration::from_secs(2));
    assert_eq!(core.breaker("db").unwrap().counts.state, state::CLOSED);
    kernel.connect(addr(UP), Outcome::Established).unwrap();
    deliver(&mut core, &kernel);
    let (e, _) = futures::executor::block_on(events.next()).unwrap();
    assert_eq!(
        (e.transition.from, e.transition.to, e.transition.cause),
        (state::OPEN, state::CLOSED, cause::TTL_EXPIRED)
    );

    core.trip(Owner::Local, "db", None, "").unwrap();
    assert_eq!(core.breaker("db").unwrap().open_remaining_ms, 0);
    let b = core.reset("db").unwrap();
    assert_eq!(
        (b.counts.state, b.counts.forced, b.reason.as_str()),
        (state::CLOSED, 0, "")
    );
    futures::executor::block_on(events.next()).unwrap();
    let (e, _) = futures::executor::block_on(events.next()).unwrap();
    assert_eq!(e.transition.cause, cause::RESET);
    assert_eq!(core.breaker("db").unwrap().totals.trips, 2);
}

#[test]
fn a_new_core_finds_what_the_kernel_kept() {
    let kernel = MemoryKernel::new();
    let mut first = core(&kernel);
    first
        .put_service(Owner::Local, "db", &[UP, CLOSED])
        .unwrap();
    first
        .put_service(Owner::Local, "web", &["10.0.0.0/8:80"])
        .unwrap();
    let id = first.services().require("db").unwrap().id;
    first
        .set_policy(Owner::Local, "db", policy(consecutive(1)))
        .unwrap();
    first.trip(Owner::Local, "db", None, "by hand").unwrap();
    drop(first);

    // The next agent: same ids and endpoints, and the breaker still open with its reason.
    let config = Config::from_toml(&format!(
        "[[service]]\nname = \"db\"\nendpoints = [\"{UP}\", \"{CLOSED}\"]\n\
         [service.breaker]\nconsecutive_failures = 1\n"
    ))
    .unwrap();
    let mut next = core(&kernel);
    assert_eq!(next.services().require("db").unwrap().id, id);
    assert_eq!(next.services().iter().count(), 2);
    next.apply_config(&config).unwrap();
    let b = next.breaker("db").unwrap();
    assert_eq!(
        (b.counts.state, b.reason.as_str()),
        (state::OPEN, "by hand")
    );

    // Another policy in the config: set, so the breaker starts closed.
    let nginx = Config::from_toml(&format!(
        "[[service]]\nname = \"db\"\nendpoints = [\"{UP}\", \"{CLOSED}\"]\n\
         [service.breaker]\npreset = \"nginx\"\n"
    ))
    .unwrap();
    let mut third = core(&kernel);
    third.apply_config(&nginx).unwrap();
    assert_eq!(third.breaker("db").unwrap().counts.state, state::CLOSED);
}

#[test]
fn a_refused_service_change_changes_nothing() {
    let kernel = MemoryKernel::new();
    let mut core = core(&kernel);
    core.put_service(Owner::Local, "db", &[UP]).unwrap();
    let pinned = kernel.pinned_services();
    let err = core
        .put_service(Owner::Local, "web", &["127.0.0.1:2000", UP])
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "endpoint 127.0.0.1:1001 already belongs to service \"db\""
    );
    assert!(matches!(err, Error::InvalidArgument(_)));
    assert_eq!(kernel.pinned_services(), pinned);
    assert!(core.services().get("web").is_none());
    assert!(matches!(
        core.delete_service(Owner::Local, "web"),
        Err(Error::NotFound(_))
    ));
}

#[test]
fn a_service_deleted_and_put_again_starts_afresh() {
    let kernel = MemoryKernel::new();
    let mut core = core(&kernel);
    core.put_service(Owner::Local, "db", &[CLOSED]).unwrap();
    core.set_policy(Owner::Local, "db", policy(consecutive(1)))
        .unwrap();
    kernel.connect(addr(CLOSED), Outcome::Refused).unwrap();
    deliver(&mut core, &kernel);
    assert_eq!(core.breaker("db").unwrap().counts.state, state::OPEN);
    core.delete_service(Owner::Local, "db").unwrap();
    // Its endpoints match nothing now: connects pass, counted only per destination.
    kernel.connect(addr(CLOSED), Outcome::Refused).unwrap();
    let (svc, replaced) = core.put_service(Owner::Local, "db", &[CLOSED]).unwrap();
    assert!(!replaced);
    assert_eq!(svc.id, 2, "ids are not reused at once");
    let err = core.breaker("db").unwrap_err().to_string();
    assert!(err.contains("has no breaker policy"), "{err}");
    let s = core.service_summary(&svc).unwrap();
    assert_eq!(s.stats[0].failed_refused, 0);
    assert_eq!(destination(&core, CLOSED).failed_refused, 2);
}

#[test]
fn connection_events_carry_their_service_and_what_was_lost() {
    let kernel = MemoryKernel::new();
    let mut core = core(&kernel);
    core.put_service(Owner::Local, "db", &[UP, CLOSED]).unwrap();
    core.set_policy(Owner::Local, "db", policy(consecutive(1)))
        .unwrap();
    let events = core.watch_connections("db").unwrap().stream();
    assert!(kernel.audit_on());
    kernel.set_counter(counter::AUDIT_LOST, 3);
    let c = kernel.connect(addr(UP), Outcome::Established).unwrap();
    kernel.close(c);
    kernel
        .connect(addr("127.0.0.1:2000"), Outcome::Refused)
        .unwrap();
    kernel.connect(addr(CLOSED), Outcome::Refused).unwrap();
    assert!(kernel.connect(addr(UP), Outcome::Established).is_err());
    deliver(&mut core, &kernel);
    drop(core);
    let got: Vec<_> = futures::executor::block_on(events.collect());
    let kinds: Vec<_> = got
        .iter()
        .map(|(e, _)| (e.kind, e.reason.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            (ConnectionEventKind::Opened, ""),
            (ConnectionEventKind::Closed, ""),
            // The one to no service is filtered out.
            (ConnectionEventKind::Failed, "refused"),
            (ConnectionEventKind::Rejected, "ECONNREFUSED"),
        ]
    );
    // The kernel lost 3 (of any service) before the first.
    assert_eq!(got[0].0.lost, 3);
    assert!(got[1..].iter().all(|(e, lost)| e.lost == 0 && *lost == 0));
    let e = &got[0].0;
    assert_eq!(
        (e.service.as_str(), e.pid, e.comm.as_str()),
        ("db", 4242, "test")
    );
    assert_eq!(e.remote_address.to_string(), "127.0.0.1");
    assert_eq!(got[3].0.local_address, None);
}

#[test]
fn the_audit_stream_runs_only_while_watched() {
    let kernel = MemoryKernel::new();
    let mut core = core(&kernel);
    let sub = core.watch_connections("").unwrap();
    assert!(kernel.audit_on());
    core.update_audit();
    assert!(kernel.audit_on());
    drop(sub);
    core.update_audit();
    assert!(!kernel.audit_on());
}

#[test]
fn latency_adds_up_by_service_and_destination() {
    let kernel = MemoryKernel::new();
    let mut core = core(&kernel);
    core.put_service(Owner::Local, "db", &[UP, CLOSED]).unwrap();
    kernel.add_samples(addr(UP), hist_kind::CONNECT, 40, 3);
    kernel.add_samples(addr(CLOSED), hist_kind::CONNECT, 1000, 1);
    let of = super::aggregate::LatencyOf::parse("db", "", 0).unwrap();
    let l = core.latency(&of, &[hist_kind::CONNECT], true).unwrap();
    assert_eq!(l.histograms[0].1.iter().sum::<u64>(), 4);
    let of = super::aggregate::LatencyOf::parse("", UP, 0).unwrap();
    let l = core.latency(&of, &[hist_kind::CONNECT], true).unwrap();
    assert_eq!(l.histograms[0].1.iter().sum::<u64>(), 3);
    let s = core
        .service_summary(core.services().require("db").unwrap())
        .unwrap();
    assert_eq!(super::latency::summarize(&s.connect).count, 4);
    assert_eq!(s.stats[usize::from(direction::INBOUND)].opened, 0);
}

#[test]
fn the_fleets_objects_hide_local_ones_and_give_them_back() {
    let kernel = MemoryKernel::new();
    let mut core = core(&kernel);
    core.put_service(Owner::Config, "db", &[UP]).unwrap();
    core.set_policy(Owner::Config, "db", policy(consecutive(5)))
        .unwrap();

    // The fleet's definition wins; the config's is kept aside.
    core.put_service(Owner::Fleet, "db", &[UP, CLOSED]).unwrap();
    core.set_policy(Owner::Fleet, "db", policy(consecutive(1)))
        .unwrap();
    let s = core.service_summaries().unwrap();
    assert_eq!(
        (s[0].owner, s[0].shadowed),
        (Owner::Fleet, Some(Owner::Config))
    );
    assert_eq!(s[0].service.endpoints.len(), 2);
    let b = core.breaker("db").unwrap();
    assert_eq!(
        (b.policy_owner, b.policy.consecutive_failures),
        (Owner::Fleet, 1)
    );

    // The local API may not change it; the config may, aside.
    for refused in [
        core.put_service(Owner::Local, "db", &[UP]).map(|_| ()),
        core.delete_service(Owner::Local, "db"),
        core.set_policy(Owner::Local, "db", policy(consecutive(2)))
            .map(|_| ()),
        core.clear_policy(Owner::Local, "db"),
    ] {
        let e = refused.unwrap_err();
        assert!(matches!(e, crate::error::Error::Owned(_)), "{e}");
    }
    core.put_service(Owner::Config, "db", &[CLOSED]).unwrap();
    assert_eq!(core.services().get("db").unwrap().endpoints.len(), 2);

    // A trip on a fleet-owned service may still be made on the node, and says so.
    let (b, _) = core.trip(Owner::Local, "db", None, "incident").unwrap();
    assert_eq!(b.tripped_by, Some(Owner::Local));

    // The fleet lets go: the config's latest definition and policy come back.
    core.clear_policy(Owner::Fleet, "db").unwrap();
    let b = core.breaker("db").unwrap();
    assert_eq!(
        (b.policy_owner, b.policy.consecutive_failures),
        (Owner::Config, 5)
    );
    core.delete_service(Owner::Fleet, "db").unwrap();
    let s = core.service_summaries().unwrap();
    assert_eq!((s[0].owner, s[0].shadowed), (Owner::Config, None));
    assert_eq!(
        s[0].service
            .endpoints
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        [CLOSED]
    );
    // The policy stayed with the service.
    assert_eq!(core.breaker("db").unwrap().policy_owner, Owner::Config);
}

#[test]
fn owners_survive_a_restart_in_the_kernel() {
    let kernel = MemoryKernel::new();
    let mut first = core(&kernel);
    first.put_service(Owner::Fleet, "db", &[UP]).unwrap();
    first
        .set_policy(Owner::Fleet, "db", policy(consecutive(5)))
        .unwrap();
    first.trip(Owner::Fleet, "db", None, "deploy").unwrap();
    first.put_service(Owner::Config, "web", &[CLOSED]).unwrap();
    drop(first);

    let second = core(&kernel);
    assert_eq!(second.owners().service("db"), Some(Owner::Fleet));
    assert_eq!(second.owners().service("web"), Some(Owner::Config));
    let b = second.breaker("db").unwrap();
    assert_eq!(
        (b.policy_owner, b.tripped_by, b.reason.as_str()),
        (Owner::Fleet, Some(Owner::Fleet), "deploy")
    );
}

#[test]
fn operators_trip_and_reset_one_destination_and_idle_ones_are_reaped() {
    let kernel = MemoryKernel::new();
    let mut core = core(&kernel);
    core.put_service(Owner::Local, "db", &[UP, CLOSED]).unwrap();
    let per_destination = PolicySpec {
        granularity: Some("destination".into()),
        destination_ttl: Some(Duration::from_secs(60)),
        ..consecutive(1)
    };
    // Destination calls need destination granularity, and a destination of the service.
    core.set_policy(Owner::Local, "db", policy(consecutive(1)))
        .unwrap();
    let e = core
        .trip_destination(Owner::Local, "db", addr(UP), None, "")
        .unwrap_err();
    assert!(
        e.to_string().contains("set its policy's granularity"),
        "{e}"
    );
    core.set_policy(Owner::Local, "db", per_destination.rules().unwrap())
        .unwrap();
    let e = core
        .trip_destination(Owner::Local, "db", addr(HANG), None, "")
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");

    let (b, _) = core
        .trip_destination(Owner::Local, "db", addr(UP), None, "drain")
        .unwrap();
    assert_eq!(
        b.counts.state,
        state::CLOSED,
        "the service itself stays closed"
    );
    let d = &b.destinations[0];
    assert_eq!(d.destination, addr(UP));
    assert_eq!((d.counts.state, d.counts.forced), (state::OPEN, 1));
    assert_eq!(
        (d.reason.as_str(), d.tripped_by),
        ("drain", Some(Owner::Local))
    );
    // Ejected destinations are never reaped, however idle.
    kernel.advance(Duration::from_secs(120));
    core.reap_destinations().unwrap();
    assert_eq!(core.breaker("db").unwrap().destinations.len(), 1);
    let b = core.reset_destination("db", addr(UP)).unwrap();
    assert_eq!(b.destinations[0].counts.state, state::CLOSED);
    // Closed and idle past destination_ttl: reaped.
    kernel.advance(Duration::from_secs(61));
    core.reap_destinations().unwrap();
    assert!(core.breaker("db").unwrap().destinations.is_empty());
}
