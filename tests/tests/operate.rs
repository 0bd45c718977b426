//! Operating the agent: the connection audit stream and config reloads, against the real kernel.

use std::{
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use breakwater_proto::v1 as pb;
use breakwater_tests::{cgroup, closed_port, require_root, serial, Agent, Server};
use pb::ConnectionEventKind as Kind;

/// Collects events from a stream until `done` says so or 5 s pass.
fn collect(
    agent: &Agent,
    stream: &mut tonic::Streaming<pb::ConnectionEvent>,
    mut done: impl FnMut(&[pb::ConnectionEvent]) -> bool,
) -> Vec<pb::ConnectionEvent> {
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done(&seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "events so far: {seen:#?}");
        let next = agent.block_on(async { tokio::time::timeout(left, stream.message()).await });
        match next {
            Ok(Ok(Some(e))) => seen.push(e),
            Ok(other) => panic!("stream ended: {other:?}; events so far: {seen:#?}"),
            Err(_) => panic!("no more events within 5 s; so far: {seen:#?}"),
        }
    }
    seen
}

/// The name of the threads whose connections only show that a watch has subscribed.
const WARM: &str = "bw-warm";

#[test]
fn audit_stream_shows_the_tests_own_connections() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let up = Server::start("127.0.0.1:0");
    let closed = SocketAddr::from(([127, 0, 0, 1], closed_port()));
    let config = format!(
        "[[service]]\nname = \"audited\"\nendpoints = [\"{}\", \"{closed}\"]\n[service.breaker]\nconsecutive_failures = 1\nerrno = \"EHOSTUNREACH\"\n",
        up.addr
    );
    let mut agent = Agent::start_with_config(Some(&config));
    agent.cgroup().enter();
    let scope = agent.scope().to_owned();
    // The CLI's watch too, one JSON object per line. It has subscribed once it prints an event:
    // connections from a thread of another name until it does (a slow guest takes longer to
    // start it than any fixed wait).
    let (mut watch, rx) = agent.watch(&["conns", "--service", "audited"]);
    let warm = |_| {
        thread::Builder::new()
            .name(WARM.into())
            .spawn(move || drop(TcpStream::connect(up.addr).expect("connect")))
            .unwrap()
            .join()
            .unwrap();
        rx.recv_timeout(Duration::from_millis(200)).ok()
    };
    (0..150)
        .find_map(warm)
        .expect("`watch conns` printed an event within 30 s");
    // Subscribed when the call returns.
    let mut client = agent.client();
    let mut stream = agent
        .block_on(client.watch_connections(pb::WatchConnectionsRequest {
            service: "audited".into(),
        }))
        .expect("WatchConnections")
        .into_inner();
    // From a thread with a name of its own: its comm in the kernel.
    let (local, errs) = thread::Builder::new()
        .name("bw-audit".into())
        .spawn(move || {
            let c = TcpStream::connect(up.addr).expect("connect");
            let local = c.local_addr().unwrap();
            drop(c);
            thread::sleep(Duration::from_millis(50));
            // Refused by the network, which trips the breaker; then refused by the breaker.
            let refused = TcpStream::connect(closed).expect_err("closed port");
            let rejected = TcpStream::connect(closed).expect_err("breaker open");
            (local, [refused.raw_os_error(), rejected.raw_os_error()])
        })
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(errs, [Some(libc::ECONNREFUSED), Some(libc::EHOSTUNREACH)]);
    let mut events = collect(&agent, &mut stream, |seen| {
        [Kind::Opened, Kind::Closed, Kind::Failed, Kind::Rejected]
            .iter()
            .all(|k| {
                seen.iter().any(|e| {
                    e.kind() == *k && e.direction() == pb::Direction::Outbound && e.comm != WARM
                })
            })
    });
    // The warm-up's last events may come after the stream subscribed.
    events.retain(|e| e.comm != WARM);
    let first = std::iter::from_fn(|| rx.recv_timeout(Duration::from_secs(5)).ok())
        .map(|line| serde_json::from_str::<serde_json::Value>(&line).expect("JSON per line"))
        .find(|e| e["direction"] == "outbound" && e["comm"] != WARM)
        .expect("`watch conns` printed the test's events");
    let _ = watch.kill();
    let _ = watch.wait();
    let line = first.to_string();
    assert_eq!(
        (&first["kind"], &first["comm"], &first["service"]),
        (
            &serde_json::json!("opened"),
            &serde_json::json!("bw-audit"),
            &serde_json::json!("audited")
        ),
        "{line}"
    );
    let pid = std::process::id();
    let netns = breakwater_tests::netns::own_inode();
    for e in events
        .iter()
        .filter(|e| e.direction() == pb::Direction::Outbound)
    {
        assert_eq!(e.pid, pid, "{e:?}");
        assert_eq!(e.comm, "bw-audit", "{e:?}");
        assert_eq!(e.service, "audited", "{e:?}");
        assert_eq!(e.cgroup, scope, "{e:?}");
        assert_eq!(e.remote_address, "127.0.0.1", "{e:?}");
        assert_eq!(e.netns, netns, "{e:?}");
        assert!(e.time_unix_ms > 0 && e.lost == 0, "{e:?}");
    }
    let find = |k: Kind| {
        events
            .iter()
            .find(|e| e.kind() == k && e.direction() == pb::Direction::Outbound)
            .unwrap()
    };
    let opened = find(Kind::Opened);
    assert_eq!(
        (opened.local_port, opened.remote_port),
        (u32::from(local.port()), u32::from(up.addr.port()))
    );
    assert!(opened.duration_us > 0, "connect time: {opened:?}");
    assert_eq!(find(Kind::Closed).local_port, u32::from(local.port()));
    let failed = find(Kind::Failed);
    assert_eq!(
        (failed.reason.as_str(), failed.remote_port),
        ("refused", u32::from(closed.port()))
    );
    let rejected = find(Kind::Rejected);
    assert_eq!(
        (rejected.reason.as_str(), rejected.remote_port),
        ("EHOSTUNREACH", u32::from(closed.port()))
    );
}

fn services(agent: &Agent) -> Vec<String> {
    let mut client = agent.client();
    agent
        .block_on(client.list_services(pb::ListServicesRequest {}))
        .unwrap()
        .into_inner()
        .services
        .into_iter()
        .map(|s| s.name)
        .collect()
}

fn breaker(agent: &Agent, name: &str) -> pb::Breaker {
    let mut client = agent.client();
    agent
        .block_on(client.get_breaker(pb::GetBreakerRequest {
            service: name.into(),
        }))
        .unwrap()
        .into_inner()
        .breaker
        .unwrap()
}

fn reload(agent: &Agent) -> Result<pb::ReloadConfigResponse, tonic::Status> {
    let mut client = agent.client();
    agent
        .block_on(client.reload_config(pb::ReloadConfigRequest {}))
        .map(|r| r.into_inner())
}

#[test]
fn reload_applies_the_difference_and_keeps_counts_and_state() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let up = Server::start("127.0.0.1:0");
    let closed = SocketAddr::from(([127, 0, 0, 1], closed_port()));
    let (a, b, c) = (
        up.addr,
        closed,
        SocketAddr::from(([127, 0, 0, 1], closed_port())),
    );
    let policy = "[service.breaker]\nconsecutive_failures = 2\nopen_timeout = \"10m\"\n";
    let v1 = format!(
        "[[service]]\nname = \"a\"\nendpoints = [\"{a}\", \"{b}\"]\n{policy}\n[[service]]\nname = \"gone\"\nendpoints = [\"127.0.0.1:1\"]\n"
    );
    let mut agent = Agent::start_with_config(Some(&v1));
    agent.cgroup().enter();
    TcpStream::connect(a).unwrap();
    TcpStream::connect(a).unwrap();
    for _ in 0..2 {
        TcpStream::connect(b).expect_err("closed");
    }
    let before = breaker(&agent, "a");
    assert_eq!(before.state(), pb::BreakerState::Open);

    // v2: "a" as it was, "gone" removed, "new" added with a policy, one more cgroup enforced.
    let mut extra = cgroup::CgroupGuard::new();
    let v2 = format!(
        "{}\n[breaker]\nscope = [\"{}\", \"{}\"]\n[[service]]\nname = \"a\"\nendpoints = [\"{a}\", \"{b}\"]\n{policy}\n[[service]]\nname = \"new\"\nendpoints = [\"{c}\"]\n[service.breaker]\npreset = \"nginx\"\n",
        "# reloaded",
        agent.scope(),
        extra.relative()
    );
    let path = agent.config_path().unwrap().to_owned();
    std::fs::write(&path, &v2).unwrap();
    let r = reload(&agent).expect("ReloadConfig");
    assert_eq!(
        (
            r.services_added.clone(),
            r.services_removed.clone(),
            r.services_changed.clone(),
            r.policies_changed.clone(),
            r.scope_added.clone(),
        ),
        (
            vec!["new".to_owned()],
            vec!["gone".to_owned()],
            vec![],
            vec!["new".to_owned()],
            vec![extra.relative().to_owned()]
        ),
        "{r:?}"
    );
    let mut names = services(&agent);
    names.sort();
    assert_eq!(names, ["a", "new"]);
    let after = breaker(&agent, "a");
    assert_eq!(
        (after.state(), after.trips, after.rejected),
        (before.state(), before.trips, before.rejected),
        "breaker state kept"
    );
    let a_row = agent
        .destination("127.0.0.1", a.port(), "outbound", None)
        .unwrap();
    assert_eq!(a_row["opened"], 2, "counts kept: {a_row}");
    assert_eq!(breaker(&agent, "new").policy.unwrap().max_failures, 3);
    // The added cgroup is enforced: a process in it is rejected by the open breaker.
    let err = cgroup::connect_from_cgroup(extra.relative(), a).expect_err("rejected");
    assert_eq!(err.raw_os_error(), Some(libc::ECONNREFUSED));
    let rejected = breaker(&agent, "a").rejected;
    assert_eq!(rejected, after.rejected + 1);

    // An invalid file is refused whole; the running config stays.
    std::fs::write(
        &path,
        v2.replace(
            "preset = \"nginx\"",
            "preset = \"nginx\"\nfailure_ratio = 1.5",
        ),
    )
    .unwrap();
    let status = reload(&agent).expect_err("invalid config");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
    assert!(status.message().contains("failure_ratio"), "{status}");
    let mut names = services(&agent);
    names.sort();
    assert_eq!(names, ["a", "new"]);
    assert_eq!(breaker(&agent, "new").policy.unwrap().failure_ratio, 0.0);

    // SIGHUP does the same; here it also takes the extra cgroup away again.
    let v4 = format!(
        "[breaker]\nscope = [\"{}\"]\n[[service]]\nname = \"a\"\nendpoints = [\"{a}\", \"{b}\"]\n{policy}\n",
        agent.scope()
    );
    std::fs::write(&path, &v4).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while services(&agent) != ["a"] {
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload: {:?}",
            services(&agent)
        );
        thread::sleep(Duration::from_millis(50));
    }
    cgroup::connect_from_cgroup(extra.relative(), a).expect("no longer enforced there");
    assert_eq!(breaker(&agent, "a").state(), pb::BreakerState::Open);
    // The CLI's reload, with nothing left to change.
    let out = agent.cli(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("nothing changed"),
        "{out:?}"
    );

    // Settings read only at start are reported, at every reload until the restart, and the
    // running ones stay: retransmits are still counted.
    std::fs::write(
        &path,
        format!("[features]\ndisable = [\"retransmits\"]\n[metrics]\ntop_destinations = 5\n{v4}"),
    )
    .unwrap();
    for _ in 0..2 {
        let r = reload(&agent).expect("ReloadConfig");
        assert_eq!(
            r.pending_restart,
            ["features.disable", "metrics.top_destinations"],
            "{r:?}"
        );
        assert!(r.services_added.is_empty() && r.applied.is_empty(), "{r:?}");
    }
    let out = agent.cli(&["reload"]);
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("take effect at the next start: features.disable, metrics.top_destinations"),
        "{out:?}"
    );
    let info = agent.cli_json(&["info"]);
    let retransmits = info["features"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["name"] == "retransmits"))
        .cloned();
    assert_eq!(
        retransmits.as_ref().map(|f| f["status"].clone()),
        Some(serde_json::json!("on")),
        "{info}"
    );
    extra.leave();
}

#[test]
fn logs_are_plain_off_a_terminal_and_json_on_request() {
    let _s = serial();
    if !require_root() {
        return;
    }
    // The harness sends the agent's stderr to a file, as journald and `kubectl logs` take it.
    let text = Agent::start();
    let log = text.log();
    assert!(log.contains("breakwater agent ready"), "{log}");
    assert!(!log.contains('\x1b'), "colour codes in a file: {log:?}");
    drop(text);

    let json = Agent::start_with(None, &["--log-format", "json"]);
    let log = json.log();
    let mut ready = false;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{v}");
        ready |= v["fields"]["message"] == "breakwater agent ready";
    }
    assert!(ready, "{log}");
}

#[test]
fn a_client_whose_reader_goes_away_ends_quietly() {
    use std::os::unix::process::ExitStatusExt as _;
    let _s = serial();
    if !require_root() {
        return;
    }
    let agent = Agent::start();
    let mut child = std::process::Command::new(breakwater_tests::agent_bin())
        .args(["--agent", &agent.address(), "info"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the CLI");
    // Closed before the CLI has its answer to print: `breakwater info | head -0`.
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait for the CLI");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "ended by SIGPIPE, as `cat` would be: {:?} {stderr}",
        out.status
    );
}

#[test]
fn a_client_whose_agent_hangs_up_fails_with_exit_1_not_a_signal() {
    use std::{
        io::{Read as _, Write as _},
        os::unix::net::UnixListener,
    };
    // A peer that stops reading, then sends HTTP/2 frames the client must acknowledge: the
    // acknowledgement is written to a socket nobody reads (EPIPE), as when an agent drops a
    // client mid-call (a TLS handshake refused for want of a client certificate).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let peer = thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut request = [0u8; 4096];
        // The client's preface and request, then silence while it waits for the answer.
        while matches!(conn.read(&mut request), Ok(n) if n > 0) {}
        conn.shutdown(std::net::Shutdown::Read).unwrap();
        let settings = [0, 0, 0, 4, 0, 0, 0, 0, 0];
        let ping = [0, 0, 8, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
        conn.write_all(&[&settings[..], &ping[..]].concat())
            .unwrap();
        // Open until the client has gone: its write fails only because nobody reads.
        let _ = conn.set_read_timeout(None);
        let _ = conn.read(&mut request);
    });
    let agent = format!("unix://{}", path.display());
    let out = std::process::Command::new(breakwater_tests::agent_bin())
        .args(["--agent", &agent, "info"])
        .output()
        .expect("run the CLI");
    peer.join().unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
