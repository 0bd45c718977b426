//! The in-kernel circuit breaker, against the real kernel: real connects from a cgroup the test
//! makes and enters, real servers, closed ports and full accept queues on loopback, and the
//! errno and timing each client sees.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Barrier},
    thread,
    time::{Duration, Instant},
};

use breakwater::{
    api::convert::{policy_message, state_message},
    core::{
        conformance::{self, Run, Step, SHORT},
        policy::PolicySpec,
    },
};
use breakwater_proto::v1 as pb;
use breakwater_tests::{
    cgroup, closed_port, echo_server, full_queue, one_syn_retry_socket, require_root, serial,
    Agent, Server,
};
use pb::BreakerState::{Closed, HalfOpen, Open};

/// A service with three endpoints on loopback, one per outcome, and an agent enforcing on a
/// cgroup this test process has entered.
struct Rig {
    agent: Agent,
    up: Server,
    closed: SocketAddr,
    hang: SocketAddr,
    _hang_listener: socket2::Socket,
    _filler: TcpStream,
}

const SERVICE: &str = "svc";

impl Rig {
    fn new() -> Self {
        Self::with_policy_toml("")
    }

    /// `breaker` is the body of a `[service.breaker]` table ("" for none).
    fn with_policy_toml(breaker: &str) -> Self {
        let up = Server::start("127.0.0.1:0");
        let closed = SocketAddr::from(([127, 0, 0, 1], closed_port()));
        let (hang_listener, hang, filler) = full_queue();
        let table = if breaker.is_empty() {
            String::new()
        } else {
            format!("[service.breaker]\n{breaker}\n")
        };
        let config = format!(
            "[[service]]\nname = \"{SERVICE}\"\nendpoints = [\"{}\", \"{closed}\", \"{hang}\"]\n{table}",
            up.addr
        );
        let mut agent = Agent::start_with_config(Some(&config));
        agent.cgroup().enter();
        Self {
            agent,
            up,
            closed,
            hang,
            _hang_listener: hang_listener,
            _filler: filler,
        }
    }

    fn breaker(&self) -> pb::Breaker {
        get_breaker(&self.agent, SERVICE).expect("GetBreaker")
    }

    fn set_policy(&self, req: pb::SetPolicyRequest) -> pb::Breaker {
        let mut client = self.agent.client();
        self.agent
            .block_on(client.set_policy(pb::SetPolicyRequest {
                service: SERVICE.into(),
                ..req
            }))
            .expect("SetPolicy")
            .into_inner()
            .breaker
            .expect("breaker")
    }

    /// Sets a policy of the conformance table.
    fn set_spec(&self, spec: &PolicySpec) -> pb::Breaker {
        self.set_policy(spec.to_request(SERVICE))
    }

    /// Runs of the conformance table, each with its policy set first.
    fn run_table(&self, runs: &[Run]) {
        for run in runs {
            self.set_spec(&run.policy);
            self.run_steps(run);
        }
    }

    /// A run's steps, on the policy set now.
    fn run_steps(&self, run: &Run) {
        let steps: Vec<_> = run
            .steps
            .iter()
            .map(|&(step, state)| (step, state_message(state)))
            .collect();
        self.run(&steps);
    }

    /// Runs each step and checks the breaker's state after it.
    fn run(&self, steps: &[(Step, pb::BreakerState)]) {
        for (i, &(step, want)) in steps.iter().enumerate() {
            match step {
                Step::Up => {
                    TcpStream::connect(self.up.addr)
                        .unwrap_or_else(|e| panic!("step {i}: connect to the server: {e}"));
                }
                Step::Refused => {
                    let before = self.breaker().rejected;
                    let err = TcpStream::connect(self.closed).expect_err("closed port");
                    assert_eq!(err.raw_os_error(), Some(libc::ECONNREFUSED), "step {i}");
                    assert_eq!(
                        self.breaker().rejected,
                        before,
                        "step {i}: refused by the network, not rejected by the breaker"
                    );
                }
                Step::Timeout => {
                    let s = one_syn_retry_socket();
                    let err = s.connect(&self.hang.into()).expect_err("SYNs are dropped");
                    assert_eq!(err.raw_os_error(), Some(libc::ETIMEDOUT), "step {i}");
                }
                Step::Rejected(errno) => self.assert_rejected(errno),
                Step::Wait(d) => thread::sleep(d),
            }
            let b = self.breaker();
            assert_eq!(
                b.state(),
                want,
                "after step {i} ({step:?}) of {steps:?}: {b:?}"
            );
        }
    }

    /// Connects to every endpoint are rejected in the kernel: the policy's errno, at once, no
    /// SYN sent (the destinations' own counters do not move), and the breaker counts them.
    fn assert_rejected(&self, errno: i32) {
        let before = self.breaker().rejected;
        let opened_before = self.opened(self.up.addr);
        let failed_before = self.failures(self.closed);
        let mut took = Vec::new();
        for addr in [
            self.up.addr,
            self.closed,
            self.hang,
            self.up.addr,
            self.up.addr,
        ] {
            let started = Instant::now();
            let err = TcpStream::connect(addr).expect_err("rejected");
            took.push(started.elapsed());
            assert_eq!(err.raw_os_error(), Some(errno), "rejected with {err}");
        }
        took.sort();
        assert!(
            took[2] < Duration::from_millis(1),
            "rejections took {took:?}: the median must be under a millisecond"
        );
        assert_eq!(self.breaker().rejected, before + 5);
        assert_eq!(
            self.opened(self.up.addr),
            opened_before,
            "no rejected connect reached the server"
        );
        assert_eq!(self.failures(self.closed), failed_before);
    }

    /// The outbound destination `addr` over gRPC: in a slow VM, a CLI process per look would
    /// outlast a 1 s open timeout between a trip and the check that it holds.
    fn destination(&self, addr: SocketAddr) -> Option<pb::Destination> {
        let mut client = self.agent.client();
        let all = self
            .agent
            .block_on(client.list_destinations(pb::ListDestinationsRequest {
                direction: pb::Direction::Outbound.into(),
                ..Default::default()
            }))
            .expect("ListDestinations")
            .into_inner()
            .destinations;
        all.into_iter()
            .find(|d| d.address == addr.ip().to_string() && d.port == u32::from(addr.port()))
    }

    fn opened(&self, addr: SocketAddr) -> u64 {
        self.destination(addr).map_or(0, |d| d.opened)
    }

    fn failures(&self, addr: SocketAddr) -> u64 {
        self.destination(addr).map_or(0, |d| d.failed_refused)
    }
}

fn get_breaker(agent: &Agent, service: &str) -> Result<pb::Breaker, tonic::Status> {
    let mut client = agent.client();
    agent
        .block_on(client.get_breaker(pb::GetBreakerRequest {
            service: service.into(),
        }))
        .map(|r| r.into_inner().breaker.expect("breaker"))
}

const ECONNREFUSED: i32 = libc::ECONNREFUSED;

// The conformance tables are breakwater::core::conformance's, which the core's unit tests also
// run against the in-memory kernel.

#[test]
fn gobreaker_preset_conformance() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let case = conformance::case("gobreaker");
    // The first run's policy comes from the config file.
    let rig = Rig::with_policy_toml("preset = \"gobreaker\"");
    let b = rig.breaker();
    assert_eq!(b.state(), Closed);
    let p = b.policy.clone().expect("policy");
    assert_eq!(
        (
            p.min_requests,
            p.failure_ratio,
            p.interval_ms,
            p.open_timeout_ms,
            p.half_open_max
        ),
        (3, 0.6, 60_000, 30_000, 1)
    );
    assert_eq!(
        p,
        policy_message(&case.runs[0].policy.rules().unwrap(), None)
    );
    rig.run_steps(&case.runs[0]);
    let b = rig.breaker();
    assert_eq!((b.trips, b.forced), (1, false));
    assert!(
        b.open_remaining_ms > 25_000 && b.open_remaining_ms <= 30_000,
        "{b:?}"
    );
    // The same preset with a short open_timeout, to see Half-Open.
    rig.run_table(&case.runs[1..]);
    assert_eq!(rig.breaker().trips, 2);
}

#[test]
fn nginx_preset_conformance() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let case = conformance::case("nginx");
    let rig = Rig::new();
    let p = rig.set_spec(&case.runs[0].policy).policy.expect("policy");
    assert_eq!(
        (
            p.max_failures,
            p.interval_ms,
            p.open_timeout_ms,
            p.half_open_max
        ),
        (3, 30_000, 30_000, 1)
    );
    rig.run_steps(&case.runs[0]);
    rig.run_table(&case.runs[1..]);
}

#[test]
fn explicit_policy_conformance() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let rig = Rig::new();
    rig.run_table(&conformance::case("explicit").runs);
}

#[test]
fn reset_by_peer_turns_a_success_into_a_failure() {
    let _s = serial();
    if !require_root() {
        return;
    }
    // A server of its own, which resets what it accepts.
    let rst = TcpListener::bind("127.0.0.1:0").unwrap();
    let rst_addr = rst.local_addr().unwrap();
    let config = format!(
        "[[service]]\nname = \"{SERVICE}\"\nendpoints = [\"{rst_addr}\"]\n[service.breaker]\nconsecutive_failures = 1\n"
    );
    let mut agent = Agent::start_with_config(Some(&config));
    agent.cgroup().enter();
    let client = TcpStream::connect(rst_addr).expect("connect");
    let b = get_breaker(&agent, SERVICE).unwrap();
    assert_eq!((b.state(), b.successes), (Closed, 1));
    let (accepted, _) = rst.accept().unwrap();
    socket2::SockRef::from(&accepted)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(accepted);
    let mut buf = [0u8; 1];
    let err = (&client).read(&mut buf).expect_err("reset by peer");
    assert_eq!(err.raw_os_error(), Some(libc::ECONNRESET));
    let b = get_breaker(&agent, SERVICE).unwrap();
    assert_eq!((b.state(), b.trips), (Open, 1), "{b:?}");
    // Our own close of a healthy connection is no failure.
    drop(client);
}

#[test]
fn half_open_admits_exactly_max_probes_under_concurrency() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let rig = Rig::new();
    rig.set_policy(pb::SetPolicyRequest {
        consecutive_failures: Some(1),
        open_timeout_ms: Some(1000),
        half_open_max: Some(3),
        ..Default::default()
    });
    rig.run(&[(Step::Refused, Open), (Step::Wait(SHORT), HalfOpen)]);
    // 64 threads connect at once to the endpoint whose SYNs are dropped: the admitted probes
    // stay in SYN-SENT (non-blocking: EINPROGRESS), everything else is rejected.
    let threads = 64;
    let barrier = Arc::new(Barrier::new(threads));
    let hang = rig.hang;
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let barrier = barrier.clone();
            thread::spawn(move || {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                    .unwrap();
                s.set_nonblocking(true).unwrap();
                barrier.wait();
                let errno = s.connect(&hang.into()).err().and_then(|e| e.raw_os_error());
                (errno, s)
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let admitted = results
        .iter()
        .filter(|(e, _)| *e == Some(libc::EINPROGRESS))
        .count();
    let rejected = results
        .iter()
        .filter(|(e, _)| *e == Some(ECONNREFUSED))
        .count();
    assert_eq!(
        (admitted, rejected),
        (3, threads - 3),
        "{:?}",
        results.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    let b = rig.breaker();
    assert_eq!((b.state(), b.probes), (HalfOpen, 3), "{b:?}");
    // A probe given up by its application is a failed probe: open again.
    drop(results);
    let b = rig.breaker();
    assert_eq!(b.state(), Open, "{b:?}");
}

#[test]
fn manual_trip_with_ttl_expires_in_the_kernel_with_the_agent_killed() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let mut rig = Rig::with_policy_toml("preset = \"gobreaker\"");
    let (mut watch, rx) = rig.agent.watch(&["breakers"]);
    // The watch has subscribed once it prints an event (a slow guest takes longer to start it
    // than any fixed wait): trip and reset until it does, then let the rest of them go by.
    let mut warm_trips = 0;
    while rx.recv_timeout(Duration::from_millis(300)).is_err() {
        assert!(warm_trips < 30, "`watch breakers` printed no event");
        for verb in ["trip", "reset"] {
            let out = rig.agent.cli(&[verb, SERVICE]);
            assert!(out.status.success(), "{verb}: {out:?}");
        }
        warm_trips += 1;
    }
    while rx.recv_timeout(Duration::from_millis(500)).is_ok() {}
    let out = rig.agent.cli(&[
        "trip",
        SERVICE,
        "--for",
        "2s",
        "--reason",
        "deploying payments",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tripped = Instant::now();
    let v = rig.agent.cli_json(&["breakers"]);
    let b = &v["breakers"][0];
    assert_eq!(b["service"], SERVICE);
    assert_eq!(b["state"], "open");
    assert_eq!(b["forced"], true);
    assert_eq!(b["reason"], "deploying payments");
    assert!(b["open_remaining_ms"].as_u64().unwrap() > 1000, "{b}");
    for key in [
        "requests",
        "failures",
        "consecutive_failures",
        "rejected",
        "trips",
    ] {
        assert!(b[key].is_u64(), "{key} in {b}");
    }
    let line = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("`watch breakers` printed the trip");
    let ev: serde_json::Value = serde_json::from_str(&line).expect("one JSON object per line");
    assert_eq!(
        (
            &ev["service"],
            &ev["from"],
            &ev["to"],
            &ev["cause"],
            &ev["reason"]
        ),
        (
            &serde_json::json!(SERVICE),
            &serde_json::json!("closed"),
            &serde_json::json!("open"),
            &serde_json::json!("manual"),
            &serde_json::json!("deploying payments")
        ),
        "{line}"
    );
    let _ = watch.kill();
    let _ = watch.wait();
    rig.agent.kill();
    // No agent: the kernel still rejects, and lifts the trip on its own when the TTL ends.
    rig.assert_rejected_without_agent();
    let left = Duration::from_millis(2100).saturating_sub(tripped.elapsed());
    assert!(!left.is_zero(), "the test itself was too slow");
    thread::sleep(left);
    TcpStream::connect(rig.up.addr).expect("the trip expired: connects pass again");
    // The next agent sees it closed.
    rig.agent.spawn();
    let b = rig.breaker();
    assert_eq!(
        (b.state(), b.forced, b.trips),
        (Closed, false, warm_trips + 1),
        "{b:?}"
    );
}

impl Rig {
    /// As `assert_rejected`, by the client's errno only (no agent to ask): the endpoint
    /// listens, so ECONNREFUSED can only come from the breaker. (No bound on the time: one
    /// connect's time under QEMU says nothing; `assert_rejected` checks a median.)
    fn assert_rejected_without_agent(&self) {
        let err = TcpStream::connect(self.up.addr).expect_err("rejected");
        assert_eq!(err.raw_os_error(), Some(ECONNREFUSED));
    }
}

#[test]
fn pooled_connections_fail_fast_after_a_trip() {
    let _s = serial();
    if !require_root() {
        return;
    }
    // An echo server: a keep-alive pool of ten clients does a round trip each.
    let echo_addr = echo_server();
    let closed = SocketAddr::from(([127, 0, 0, 1], closed_port()));
    let config = format!(
        "[[service]]\nname = \"{SERVICE}\"\nendpoints = [\"{echo_addr}\", \"{closed}\"]\n[service.breaker]\nconsecutive_failures = 3\nopen_timeout = \"60s\"\n"
    );
    let mut agent = Agent::start_with_config(Some(&config));
    agent.cgroup().enter();
    let mut pool: Vec<TcpStream> = (0..10)
        .map(|_| TcpStream::connect(echo_addr).unwrap())
        .collect();
    for c in &mut pool {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
    }
    // Watch the transitions from before the trip.
    let mut client = agent.client();
    let mut events = agent
        .block_on(client.watch_breaker_events(pb::WatchBreakerEventsRequest {
            service: SERVICE.into(),
        }))
        .expect("WatchBreakerEvents")
        .into_inner();
    // Three refused connects to the service's other endpoint trip it in the kernel.
    for _ in 0..3 {
        let err = TcpStream::connect(closed).expect_err("closed port");
        assert_eq!(err.raw_os_error(), Some(ECONNREFUSED));
    }
    let ev = agent
        .block_on(async { tokio::time::timeout(Duration::from_secs(5), events.message()).await })
        .expect("an event within 5 s")
        .expect("stream")
        .expect("event");
    assert_eq!(
        (ev.service.as_str(), ev.from(), ev.to(), ev.cause()),
        (SERVICE, Closed, Open, pb::BreakerCause::ConsecutiveFailures),
        "{ev:?}"
    );
    assert_eq!(
        (ev.requests, ev.failures, ev.consecutive_failures),
        (13, 3, 3)
    );
    // Every pooled connection fails on its next use, and the peer saw it go.
    let deadline = Instant::now() + Duration::from_secs(5);
    for (i, c) in pool.iter_mut().enumerate() {
        loop {
            let used = c.write_all(b"ping").and_then(|_| {
                let mut buf = [0u8; 4];
                c.read_exact(&mut buf)
            });
            match used {
                Err(e) => {
                    assert!(
                        matches!(
                            e.raw_os_error(),
                            Some(libc::ECONNABORTED | libc::EPIPE | libc::ECONNRESET)
                        ) || e.kind() == std::io::ErrorKind::UnexpectedEof,
                        "connection {i}: {e}"
                    );
                    break;
                }
                Ok(()) => assert!(
                    Instant::now() < deadline,
                    "connection {i} still works 5 s after the trip"
                ),
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
    assert_eq!(
        breakwater_tests::ss_established_to(echo_addr, None),
        0,
        "no connection to the tripped service is left"
    );
}

#[test]
fn restart_keeps_state_and_release_removes_everything() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let mut rig = Rig::new();
    rig.set_policy(pb::SetPolicyRequest {
        consecutive_failures: Some(2),
        open_timeout_ms: Some(600_000),
        ..Default::default()
    });
    rig.run(&[
        (Step::Up, Closed),
        (Step::Refused, Closed),
        (Step::Refused, Open),
    ]);
    let before = rig.breaker();
    rig.agent.stop();
    rig.assert_rejected_without_agent();
    // A new agent, with no policy in its config: the pinned service, policy and state stand.
    rig.agent.spawn();
    let after = rig.breaker();
    assert_eq!(after.state(), Open);
    assert_eq!(
        (after.trips, after.rejected, after.policy.clone()),
        (before.trips, before.rejected + 1, before.policy.clone())
    );
    assert!(after.open_remaining_ms <= before.open_remaining_ms);
    rig.assert_rejected(ECONNREFUSED);
    // Reset: closed, counts cleared, connects pass.
    let out = rig.agent.cli(&["reset", SERVICE]);
    assert!(out.status.success());
    rig.run(&[(Step::Up, Closed)]);
    assert_eq!(rig.breaker().requests, 1);

    // Trip again, then an agent that releases on exit: nothing is pinned and nothing enforced.
    rig.agent.cli(&["trip", SERVICE]);
    rig.agent.stop();
    rig.assert_rejected_without_agent();
    let pin_dir = rig.agent.pin_dir().to_owned();
    let out = std::process::Command::new(breakwater_tests::agent_bin())
        .args(["uninstall", "--pin-dir"])
        .arg(&pin_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!pin_dir.exists());
    TcpStream::connect(rig.up.addr).expect("uninstalled: no breaker left");
}

/// A config with one service, `SERVICE`, on `up`, its breaker on the nginx preset.
fn nginx_service(up: &Server) -> String {
    format!(
        "[[service]]\nname = \"{SERVICE}\"\nendpoints = [\"{}\"]\n[service.breaker]\npreset = \"nginx\"\n",
        up.addr
    )
}

#[test]
fn release_on_exit_removes_the_pins() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let up = Server::start("127.0.0.1:0");
    let mut agent = Agent::start_with(Some(&nginx_service(&up)), &["--release-on-exit"]);
    assert!(agent.pin_dir().join("BW_BREAKERS").exists());
    agent.cgroup().enter();
    let out = agent.cli(&["trip", SERVICE]);
    assert!(out.status.success());
    let err = TcpStream::connect(up.addr).expect_err("tripped");
    assert_eq!(err.raw_os_error(), Some(ECONNREFUSED));
    assert!(agent.stop().success());
    assert!(!agent.pin_dir().exists(), "pins removed");
    TcpStream::connect(up.addr).expect("released: nothing enforces any more");
}

#[test]
fn processes_outside_the_scope_are_never_rejected() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let mut rig = Rig::with_policy_toml("preset = \"gobreaker\"");
    let origin = rig.agent.cgroup().origin().expect("entered").to_owned();
    let out = rig.agent.cli(&["trip", SERVICE]);
    assert!(out.status.success());
    rig.assert_rejected(ECONNREFUSED);
    let rejected = rig.breaker().rejected;
    // A process in the cgroup the test came from connects to the same endpoint.
    cgroup::connect_from_cgroup(&origin, rig.up.addr).expect("outside the scope: connected");
    // And one inside the scope, for contrast.
    let err = cgroup::connect_from_cgroup(rig.agent.cgroup().relative(), rig.up.addr)
        .expect_err("inside the scope: rejected");
    assert_eq!(err.raw_os_error(), Some(ECONNREFUSED));
    assert_eq!(rig.breaker().rejected, rejected + 1);
}

#[test]
fn bad_breaker_input_is_refused_and_changes_nothing() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let rig = Rig::with_policy_toml("preset = \"gobreaker\"");
    rig.run(&[(Step::Refused, Closed)]);
    let before = rig.breaker();
    let mut client = rig.agent.client();
    let bad = |req: pb::SetPolicyRequest, what: &str| {
        let status = rig
            .agent
            .block_on(client.clone().set_policy(req))
            .expect_err(what);
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{what}: {status}"
        );
        assert!(!status.message().is_empty());
        status.message().to_owned()
    };
    let svc = || pb::SetPolicyRequest {
        service: SERVICE.into(),
        ..Default::default()
    };
    let msg = bad(
        pb::SetPolicyRequest {
            service: "nope".into(),
            preset: "gobreaker".into(),
            ..Default::default()
        },
        "unknown service",
    );
    assert!(msg.contains("nope"), "{msg}");
    for ratio in [1.5, -0.1, f64::NAN] {
        let msg = bad(
            pb::SetPolicyRequest {
                failure_ratio: Some(ratio),
                ..svc()
            },
            "ratio",
        );
        assert!(msg.contains("failure_ratio"), "{msg}");
    }
    let msg = bad(
        pb::SetPolicyRequest {
            open_timeout_ms: Some(0),
            ..svc()
        },
        "zero open_timeout",
    );
    assert!(msg.contains("open_timeout"), "{msg}");
    let msg = bad(
        pb::SetPolicyRequest {
            errno: Some("EWHATEVER".into()),
            ..svc()
        },
        "errno",
    );
    assert!(msg.contains("EWHATEVER"), "{msg}");
    let msg = bad(
        pb::SetPolicyRequest {
            preset: "hystrix".into(),
            ..svc()
        },
        "preset",
    );
    assert!(msg.contains("hystrix"), "{msg}");
    for (what, status) in [
        (
            "trip unknown",
            rig.agent
                .block_on(client.trip(pb::TripRequest {
                    service: "nope".into(),
                    ..Default::default()
                }))
                .expect_err("trip"),
        ),
        (
            "reset unknown",
            rig.agent
                .block_on(client.reset(pb::ResetRequest {
                    service: "nope".into(),
                    ..Default::default()
                }))
                .expect_err("reset"),
        ),
    ] {
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{what}: {status}"
        );
    }
    // The CLI: exit code 2 with the reason.
    for args in [
        &["policy", "set", SERVICE, "--failure-ratio", "2"][..],
        &["policy", "set", SERVICE, "--preset", "hystrix"][..],
        &["policy", "set", SERVICE, "--errno", "EWHATEVER"][..],
        &["policy", "set", SERVICE, "--open-timeout", "0s"][..],
        &["policy", "set", "nope", "--preset", "nginx"][..],
        &["trip", "nope"][..],
    ] {
        let out = rig.agent.cli(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(!out.stderr.is_empty(), "{args:?}");
    }
    let after = rig.breaker();
    assert_eq!(after, before, "nothing changed");
}

#[test]
fn ipv6_connects_are_gated_too() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let up = Server::start("[::1]:0");
    let closed = TcpListener::bind("[::1]:0").unwrap().local_addr().unwrap();
    let config = format!(
        "[[service]]\nname = \"{SERVICE}\"\nendpoints = [\"{}\", \"{closed}\"]\n[service.breaker]\nconsecutive_failures = 1\n",
        up.addr
    );
    let mut agent = Agent::start_with_config(Some(&config));
    agent.cgroup().enter();
    TcpStream::connect(up.addr).expect("closed breaker: connects pass");
    let err = TcpStream::connect(closed).expect_err("closed port");
    assert_eq!(err.raw_os_error(), Some(ECONNREFUSED));
    let b = get_breaker(&agent, SERVICE).unwrap();
    assert_eq!((b.state(), b.requests, b.rejected), (Open, 0, 0), "{b:?}");
    // The endpoint listens: ECONNREFUSED can only be the breaker's.
    let err = TcpStream::connect(up.addr).expect_err("open: rejected");
    assert_eq!(err.raw_os_error(), Some(ECONNREFUSED));
    assert_eq!(get_breaker(&agent, SERVICE).unwrap().rejected, 1);
}

#[test]
fn pinned_maps_of_another_size_are_refused_with_the_way_out() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let mut agent = Agent::start();
    agent.stop();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("small.toml");
    std::fs::write(&config, "[maps]\nmax_services = 8\n").unwrap();
    let out = std::process::Command::new(breakwater_tests::agent_bin())
        .arg("agent")
        .arg("--socket")
        .arg(dir.path().join("a.sock"))
        .arg("--pin-dir")
        .arg(agent.pin_dir())
        .args(["--scope", agent.scope()])
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("maps.max_services") && stderr.contains("breakwater uninstall"),
        "{stderr}"
    );
}

/// The pinned state's layout stamp: state from before stamps is adopted (and stamped), state of
/// another layout is refused with the way out, and never read.
#[test]
fn pinned_state_of_another_layout_is_refused_and_unstamped_state_adopted() {
    use aya::maps::{Array, Map, MapData};
    use breakwater_common::{layout, names};
    let _s = serial();
    if !require_root() {
        return;
    }
    let up = Server::start("127.0.0.1:0");
    let mut agent = Agent::start_with_config(Some(&nginx_service(&up)));
    let stamp_path = agent.pin_dir().join(names::MAP_LAYOUT);
    let stamp = || -> Array<MapData, u32> {
        let map = MapData::from_pin(&stamp_path).expect("layout stamp pinned");
        Array::try_from(Map::Array(map)).expect("an array of u32")
    };
    let read = |a: &Array<MapData, u32>| (a.get(&0, 0).unwrap(), a.get(&1, 0).unwrap());
    assert_eq!(read(&stamp()), (layout::MAGIC, layout::VERSION));
    assert!(agent.cli(&["trip", SERVICE]).status.success());
    agent.stop();

    // As an agent from before stamps left it: adopted, stamped, the trip kept.
    std::fs::remove_file(&stamp_path).unwrap();
    agent.spawn();
    assert_eq!(read(&stamp()), (layout::MAGIC, layout::VERSION));
    assert_eq!(get_breaker(&agent, SERVICE).unwrap().state(), Open);
    assert!(
        agent.log().contains("from before layout stamps"),
        "{}",
        agent.log()
    );
    agent.stop();

    let before = pinned(agent.pin_dir());
    // A newer agent's layout: refused, nothing touched.
    let mut a = stamp();
    a.set(1, layout::VERSION + 1, 0).unwrap();
    let (code, stderr) = refused_start(&agent);
    assert_eq!(code, Some(1), "{stderr}");
    let want = format!("has layout {} (a newer agent made it)", layout::VERSION + 1);
    assert!(stderr.contains(&want), "{stderr}");
    assert!(
        stderr.contains("breakwater uninstall --pin-dir"),
        "{stderr}"
    );
    assert_eq!(read(&stamp()), (layout::MAGIC, layout::VERSION + 1));
    assert_eq!(pinned(agent.pin_dir()), before);
    // Not a stamp of ours at all.
    a.set(0, 0xdead_beef, 0).unwrap();
    let (code, stderr) = refused_start(&agent);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("is not a breakwater layout stamp"),
        "{stderr}"
    );

    // Back to this layout: the state is there as it was left.
    a.set(0, layout::MAGIC, 0).unwrap();
    a.set(1, layout::VERSION, 0).unwrap();
    agent.spawn();
    assert_eq!(get_breaker(&agent, SERVICE).unwrap().state(), Open);
    agent.stop();

    // An older layout this agent migrates: stamped with this one, the trip kept.
    stamp().set(1, layout::MIGRATES_FROM, 0).unwrap();
    agent.spawn();
    assert_eq!(read(&stamp()), (layout::MAGIC, layout::VERSION));
    assert_eq!(get_breaker(&agent, SERVICE).unwrap().state(), Open);
    assert!(
        agent
            .log()
            .contains("pinned state of an older layout: migrated"),
        "{}",
        agent.log()
    );
}

#[test]
fn slow_connects_count_as_failures() {
    let _s = serial();
    if !require_root() {
        return;
    }
    // The first SYN to a full accept queue is dropped; the retransmit (about 1 s later) gets
    // through once the queue has drained: a connect that succeeds, slowly.
    let (listener, slow, filler) = full_queue();
    let up = Server::start("127.0.0.1:0");
    let config = format!(
        "[[service]]\nname = \"{SERVICE}\"\nendpoints = [\"{slow}\", \"{}\"]\n[service.breaker]\nconsecutive_failures = 1\nslow_connect = \"500ms\"\n",
        up.addr
    );
    let mut agent = Agent::start_with_config(Some(&config));
    agent.cgroup().enter();
    TcpStream::connect(up.addr).expect("fast connect");
    assert_eq!(get_breaker(&agent, SERVICE).unwrap().state(), Closed);
    let client = thread::spawn(move || {
        let t = Instant::now();
        let c = TcpStream::connect(slow);
        (t.elapsed(), c)
    });
    thread::sleep(Duration::from_millis(300));
    let (accepted, _) = listener.accept().unwrap();
    drop((accepted, filler));
    let (took, connected) = client.join().unwrap();
    // It connects after the SYN retransmission, and trips the breaker; a trip terminates the
    // service's established connections, this one too if connect() has not returned by then.
    if let Err(e) = &connected {
        assert_eq!(e.raw_os_error(), Some(libc::ECONNABORTED), "{e}");
    }
    assert!(took >= Duration::from_millis(900), "not slow: {took:?}");
    let b = get_breaker(&agent, SERVICE).unwrap();
    assert_eq!((b.state(), b.trips), (Open, 1), "{b:?}");
}

#[test]
fn a_trip_terminates_connections_in_other_namespaces() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let mut agent = Agent::start();
    agent.cgroup().enter();
    let ns = breakwater_tests::netns::NetNs::new("brk");
    // An echo server and three pooled clients, all inside the namespace (the clients from this
    // process, so from the enforced cgroup).
    let addr = ns.run(echo_server);
    let endpoint = addr.to_string();
    for args in [
        &["service", "put", SERVICE, "--endpoint", &endpoint][..],
        &["policy", "set", SERVICE, "--preset", "gobreaker"][..],
    ] {
        let out = agent.cli(args);
        assert!(out.status.success(), "{args:?}: {out:?}");
    }
    let mut pool = ns.run(move || {
        (0..3)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect::<Vec<_>>()
    });
    for c in &mut pool {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).unwrap();
    }
    let out = agent.cli(&["trip", SERVICE]);
    assert!(out.status.success(), "{out:?}");
    for (i, c) in pool.iter_mut().enumerate() {
        let used = c.write_all(b"ping").and_then(|_| {
            let mut buf = [0u8; 4];
            c.read_exact(&mut buf)
        });
        let err = used.expect_err("terminated on trip");
        assert_eq!(
            err.raw_os_error(),
            Some(libc::ECONNABORTED),
            "connection {i}: {err}"
        );
    }
    assert_eq!(
        breakwater_tests::ss_established_to(addr, Some(&ns.name)),
        0,
        "{}",
        ns.name
    );
}

#[test]
fn a_probe_lost_before_its_syn_does_not_hold_half_open() {
    let _s = serial();
    if !require_root() {
        return;
    }
    // In a namespace with only `lo`, 10.255.255.1 has no route: connect() fails with
    // ENETUNREACH inside the kernel after the gate admitted it, and no outcome ever comes.
    let ns = breakwater_tests::netns::NetNs::new("lost");
    let closed = SocketAddr::from(([127, 0, 0, 1], closed_port()));
    let unroutable = SocketAddr::from(([10, 255, 255, 1], 80));
    let config = format!(
        "[[service]]\nname = \"{SERVICE}\"\nendpoints = [\"{closed}\", \"{unroutable}\"]\n[service.breaker]\nconsecutive_failures = 1\nopen_timeout = \"1s\"\n"
    );
    let mut agent = Agent::start_with_config(Some(&config));
    agent.cgroup().enter();
    let connect = move |addr: SocketAddr| {
        ns.run(move || {
            TcpStream::connect(addr)
                .expect_err("never connects")
                .raw_os_error()
        })
    };
    let state = |agent: &Agent| get_breaker(agent, SERVICE).unwrap().state();
    assert_eq!(connect(closed), Some(ECONNREFUSED));
    assert_eq!(state(&agent), Open);
    thread::sleep(SHORT);
    // The probe: admitted, then lost before any SYN.
    assert_eq!(connect(unroutable), Some(libc::ENETUNREACH));
    assert_eq!(state(&agent), HalfOpen);
    let rejected = get_breaker(&agent, SERVICE).unwrap().rejected;
    assert_eq!(connect(closed), Some(ECONNREFUSED));
    assert_eq!(
        get_breaker(&agent, SERVICE).unwrap().rejected,
        rejected + 1,
        "the probe is still out: rejected"
    );
    thread::sleep(SHORT);
    // open_timeout later: a fresh probe goes out (and fails: open again).
    assert_eq!(connect(closed), Some(ECONNREFUSED));
    let b = get_breaker(&agent, SERVICE).unwrap();
    assert_eq!((b.state(), b.rejected), (Open, rejected + 1), "{b:?}");
}

/// A pin directory holds one agent: a second one on it stops before it loads or attaches
/// anything, and `uninstall` refuses while the first one runs.
#[test]
fn a_pin_dir_holds_one_agent() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let mut agent = Agent::start();
    let pin_dir = agent.pin_dir().to_owned();
    let before = pinned(&pin_dir);
    assert!(!before.is_empty());
    let (code, stderr) = refused_start(&agent);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("is in use by another running agent"),
        "{stderr}"
    );

    let uninstall = || {
        std::process::Command::new(breakwater_tests::agent_bin())
            .args(["uninstall", "--pin-dir"])
            .arg(&pin_dir)
            .output()
            .unwrap()
    };
    let out = uninstall();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("an agent is running"), "{stderr}");
    // Nothing was replaced or removed, and the first agent still answers.
    assert_eq!(pinned(&pin_dir), before);
    agent.info();

    agent.stop();
    let out = uninstall();
    assert!(out.status.success(), "{out:?}");
    assert!(!pin_dir.exists());
}

/// `--empty-hooks` (the bench's "hooks alone" arm): every program is attached, yet nothing is
/// counted and nothing enforced, even on a tripped breaker.
#[test]
fn empty_hooks_count_and_enforce_nothing() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let up = Server::start("127.0.0.1:0");
    let mut agent = Agent::start_with(Some(&nginx_service(&up)), &["--empty-hooks"]);
    agent.cgroup().enter();
    let attached: Vec<String> = agent
        .info()
        .programs
        .iter()
        .filter(|p| !p.attach.starts_with("iter/"))
        .map(|p| p.name.clone())
        .collect();
    for name in ["bw_sock_state", "bw_connect4", "bw_sockops"] {
        assert!(attached.iter().any(|p| p == name), "{name} in {attached:?}");
    }
    let out = agent.cli(&["trip", SERVICE]);
    assert!(out.status.success(), "{out:?}");
    let clients: Vec<TcpStream> = (0..5)
        .map(|_| TcpStream::connect(up.addr).expect("empty hooks reject nothing"))
        .collect();
    assert_eq!(
        breakwater_tests::ss_established_to(up.addr, None),
        5,
        "ss ground truth"
    );
    drop(clients);
    let breaker = get_breaker(&agent, SERVICE).expect("GetBreaker");
    assert_eq!((breaker.state(), breaker.rejected), (Open, 0));
    for dir in ["outbound", "inbound"] {
        let row = agent.destination("127.0.0.1", up.addr.port(), dir, None);
        assert!(row.is_none(), "{dir}: {row:?}");
    }
    assert_eq!(agent.counter("conns_tracked"), 0);
}

/// Starts a second agent on `agent`'s pin directory and scope, which must refuse to start: its
/// exit code and stderr. One that starts instead (its socket appears, or it is still running
/// after 20 s) is killed, and the test fails.
fn refused_start(agent: &Agent) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("second.sock");
    let mut child = std::process::Command::new(breakwater_tests::agent_bin())
        .arg("agent")
        .arg("--socket")
        .arg(&socket)
        .arg("--pin-dir")
        .arg(agent.pin_dir())
        .args(["--scope", agent.scope()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline || socket.exists() {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "an agent that had to refuse to start ran: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!socket.exists());
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What is pinned in a pin directory, by name.
fn pinned(dir: &std::path::Path) -> Vec<std::ffi::OsString> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    names
}

#[test]
fn audit_mode_counts_and_trips_but_refuses_nothing_and_enforcing_keeps_the_state() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let rig = Rig::with_policy_toml(
        "consecutive_failures = 1\nerrno = \"EHOSTUNREACH\"\nmode = \"audit\"",
    );
    let held = TcpStream::connect(rig.up.addr).expect("connect before the trip");
    let err = TcpStream::connect(rig.closed).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(ECONNREFUSED));
    let b = rig.breaker();
    assert_eq!(b.state(), Open, "it trips as ever");
    assert_eq!(b.policy.as_ref().unwrap().mode, "audit");
    // Open, and nothing refused: the closed port answers itself, the live endpoint connects,
    // and the connection from before the trip is kept.
    for _ in 0..3 {
        let err = TcpStream::connect(rig.closed).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(ECONNREFUSED));
        TcpStream::connect(rig.up.addr).expect("audit mode refuses nothing");
    }
    let b = rig.breaker();
    assert_eq!((b.rejected, b.audited), (0, 6), "{b:?}");
    assert_eq!(
        breakwater_tests::ss_established_to(rig.up.addr, None),
        1,
        "the held connection is kept"
    );
    let out = rig.agent.cli(&["breakers"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("6 connects would have been refused"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Enforce, the rules unchanged: still open (same trip), and now refused.
    let out = rig.agent.cli(&[
        "policy",
        "set",
        SERVICE,
        "--consecutive-failures",
        "1",
        "--errno",
        "EHOSTUNREACH",
        "--mode",
        "enforce",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = rig.breaker();
    assert_eq!((after.state(), after.trips), (Open, b.trips), "{after:?}");
    let err = TcpStream::connect(rig.up.addr).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EHOSTUNREACH));
    drop(held);
}

#[test]
fn protected_destinations_are_never_refused_whatever_the_service_covers() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let rig = Rig::with_policy_toml("consecutive_failures = 1\nerrno = \"EHOSTUNREACH\"");
    // `[breaker] protected`, added by a reload.
    let path = rig.agent.config_path().unwrap().to_owned();
    let text = std::fs::read_to_string(&path).unwrap();
    let scope_line = text.lines().find(|l| l.starts_with("scope = ")).unwrap();
    let text = text.replacen(
        scope_line,
        &format!("{scope_line}\nprotected = [\"{}\"]", rig.up.addr),
        1,
    );
    std::fs::write(&path, text).unwrap();
    let out = rig.agent.cli(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = rig.agent.cli(&["trip", SERVICE]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!(
            "covers protected destinations, never refused: {} (breaker.protected)",
            rig.up.addr
        )),
        "{said}"
    );
    // Open: the protected endpoint connects, the others are refused.
    for _ in 0..3 {
        TcpStream::connect(rig.up.addr).expect("a protected destination is never refused");
        let err = TcpStream::connect(rig.closed).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EHOSTUNREACH));
    }
    assert_eq!(rig.breaker().rejected, 3);
}

#[test]
fn the_agents_own_listeners_are_protected() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let mut agent = Agent::start_with(None, &["--metrics-listen", "127.0.0.1:0"]);
    agent.cgroup().enter();
    let marker = "breakwater agent metrics on http://";
    let log = agent.log();
    let metrics: SocketAddr = log
        .lines()
        .find_map(|l| l.split_once(marker).map(|(_, rest)| rest))
        .and_then(|rest| rest.split(['/', ' ']).next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no metrics address in the log:\n{log}"));
    // A service over all of loopback on the metrics port, tripped by hand.
    let endpoint = format!("127.0.0.0/8:{}", metrics.port());
    let out = agent.cli(&["service", "put", "everything", "--endpoint", &endpoint]);
    assert!(out.status.success());
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("(the agent's metrics)"), "{said}");
    let out = agent.cli(&[
        "policy",
        "set",
        "everything",
        "--preset",
        "gobreaker",
        "--errno",
        "EHOSTUNREACH",
    ]);
    assert!(out.status.success());
    let out = agent.cli(&["trip", "everything"]);
    assert!(out.status.success());
    TcpStream::connect(metrics).expect("the agent's metrics are never refused");
    // Only the address it listens on: the rest of the service is refused.
    let other = SocketAddr::from(([127, 0, 0, 2], metrics.port()));
    let err = TcpStream::connect(other).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EHOSTUNREACH));
}
