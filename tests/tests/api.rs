//! The API and the CLI over the agent's real unix socket: services, validation, attribution,
//! agent info, map limits.

use std::{
    net::TcpStream,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
    process::Command,
    time::Duration,
};

use breakwater_proto::v1 as pb;
use breakwater_tests::{
    agent_bin, closed_port, connect_many, eventually, field, require_root, serial, Agent, Server,
};
use tonic::Code;

fn services(agent: &Agent) -> Vec<pb::Service> {
    let mut c = agent.client();
    agent
        .block_on(c.list_services(pb::ListServicesRequest {}))
        .expect("ListServices")
        .into_inner()
        .services
}

#[test]
fn services_from_config_and_api_count_their_connections() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let server = Server::start("127.0.0.1:0");
    let other = Server::start("127.0.0.1:0");
    let port = server.addr.port();
    let agent = Agent::start_with_config(Some(&format!(
        "[[service]]\nname = \"inventory\"\nendpoints = [\"127.0.0.0/8:{port}\"]\n"
    )));
    let svc = &services(&agent)[0];
    assert_eq!(svc.name, "inventory");
    assert_eq!(svc.endpoints, vec![format!("127.0.0.0/8:{port}")]);

    let clients = connect_many(server.addr, 4);
    let unrelated = connect_many(other.addr, 2);
    let s = eventually(Duration::from_secs(10), || {
        let v = agent.cli_json(&["services"]);
        let s = v["services"][0].clone();
        (field(&s["outbound"], "active") == 4).then_some(s)
    })
    .expect("service counts 4 active");
    assert_eq!(field(&s["outbound"], "opened"), 4);
    assert_eq!(field(&s["inbound"], "active"), 4);

    // Destinations carry the service; the filter keeps only its endpoints.
    let v = agent.cli_json(&["destinations", "--service", "inventory"]);
    let ds = v["destinations"].as_array().unwrap();
    assert!(!ds.is_empty());
    assert!(ds
        .iter()
        .all(|d| d["service"] == "inventory" && d["port"] == port));
    let d = agent
        .destination("127.0.0.1", other.addr.port(), "outbound", None)
        .unwrap();
    assert_eq!(d["service"], "");

    // A service added at runtime counts from then on.
    let out = agent.cli(&[
        "service",
        "put",
        "other",
        "--endpoint",
        &format!("127.0.0.1:{}", other.addr.port()),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let more = connect_many(other.addr, 3);
    let s = eventually(Duration::from_secs(10), || {
        services(&agent)
            .into_iter()
            .find(|s| s.name == "other")
            .filter(|s| s.outbound.as_ref().is_some_and(|o| o.active == 3))
    })
    .expect("runtime service counts its new connections");
    assert_eq!(s.outbound.unwrap().opened, 3);

    // Connections list carries the service and the process that opened them.
    let v = agent.cli_json(&["conns", "--service", "inventory"]);
    let conns = v["connections"].as_array().unwrap();
    let mine: Vec<_> = conns
        .iter()
        .filter(|c| c["direction"] == "outbound")
        .collect();
    assert_eq!(mine.len(), 4);
    for c in mine {
        assert_eq!(c["pid"], std::process::id());
        assert_eq!(c["comm"], "bw-client");
        assert_eq!(c["state"], "ESTAB");
        assert_eq!(c["remote_port"], port);
        assert!(c["cgroup_id"].as_u64().unwrap() > 0);
    }

    // Delete: gone from the list, and its name is no longer a valid filter.
    let out = agent.cli(&["service", "delete", "other"]);
    assert!(out.status.success());
    assert!(services(&agent).iter().all(|s| s.name != "other"));
    let out = agent.cli(&["destinations", "--service", "other"]);
    assert_eq!(out.status.code(), Some(2));
    drop((clients, unrelated, more));
}

#[test]
fn processes_and_cgroups_are_attributed() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let agent = Agent::start();
    let server = Server::start("127.0.0.1:0");
    let _clients = connect_many(server.addr, 1);
    // cgroup v2: the id is the inode of the cgroup's directory.
    let rel = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let rel = rel
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap()
        .to_owned();
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let root = mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(2) == Some(&"cgroup2"))
        .map(|f| f[1].to_owned())
        .expect("cgroup2 mounted");
    let ino = std::fs::metadata(format!("{root}{rel}")).unwrap().ino();
    let mut c = agent.client();
    let conns = agent.block_on(async {
        let request = pb::StreamConnectionsRequest::default();
        let mut stream = c.stream_connections(request).await.unwrap().into_inner();
        let mut all = Vec::new();
        while let Some(chunk) = stream.message().await.unwrap() {
            all.extend(chunk.connections);
        }
        all
    });
    let mine = conns
        .iter()
        .find(|c| c.remote_port == u32::from(server.addr.port()) && c.pid == std::process::id())
        .expect("our connection");
    assert_eq!(mine.cgroup_id, ino);

    // Inbound: attributed to the process that listens, i.e. this test's thread.
    let comm: String = std::thread::current()
        .name()
        .unwrap()
        .chars()
        .take(15)
        .collect();
    let accepted = conns
        .iter()
        .find(|c| {
            c.direction == pb::Direction::Inbound as i32
                && c.local_port == u32::from(server.addr.port())
        })
        .expect("the accepted side");
    assert_eq!(accepted.pid, std::process::id());
    assert_eq!(accepted.comm, comm);
    assert_eq!(accepted.cgroup_id, ino);
}

#[test]
fn bad_input_is_rejected_precisely_and_changes_nothing() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let agent = Agent::start_with_config(Some(
        "[[service]]\nname = \"db\"\nendpoints = [\"10.1.0.0/16:5432\"]\n",
    ));
    let before = services(&agent);
    let mut c = agent.client();
    let cases: [(&str, Vec<&str>, &str); 5] = [
        (
            "ok-name",
            vec!["10.0.0.1"],
            "invalid endpoint \"10.0.0.1\": missing \":port\"",
        ),
        (
            "ok-name",
            vec!["10.0.0.1/8:80"],
            "host bits set in CIDR; did you mean 10.0.0.0/8?",
        ),
        (
            "bad name",
            vec!["10.0.0.1:80"],
            "invalid service name \"bad name\"",
        ),
        ("ok-name", vec![], "service \"ok-name\" has no endpoints"),
        (
            "ok-name",
            vec!["10.1.0.0/16:5432"],
            "endpoint 10.1.0.0/16:5432 already belongs to service \"db\"",
        ),
    ];
    for (name, endpoints, why) in cases {
        let status = agent
            .block_on(c.put_service(pb::PutServiceRequest {
                name: name.into(),
                endpoints: endpoints.iter().map(|s| s.to_string()).collect(),
            }))
            .expect_err("bad input");
        assert_eq!(status.code(), Code::InvalidArgument, "{name} {endpoints:?}");
        assert!(
            status.message().contains(why),
            "{:?} lacks {why:?}",
            status.message()
        );
    }
    let status = agent
        .block_on(c.delete_service(pb::DeleteServiceRequest {
            name: "nope".into(),
        }))
        .expect_err("unknown service");
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(status.message(), "no service named \"nope\"");
    let status = agent
        .block_on(c.list_destinations(pb::ListDestinationsRequest {
            sort: 42,
            ..Default::default()
        }))
        .expect_err("bad sort");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), "sort: unknown value 42");
    assert_eq!(services(&agent), before, "nothing changed");

    // The CLI: exit code 2 and the reason, for its own checks and for the agent's.
    let out = agent.cli(&["service", "put", "x", "--endpoint", "1.2.3.4"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing \":port\""));
    let out = agent.cli(&["service", "put", "x", "--endpoint", "10.1.0.0/16:5432"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already belongs to service \"db\""));
    let out = agent.cli(&["service", "delete", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    let out = agent.cli(&["destinations", "--sort", "sideways"]);
    assert_eq!(out.status.code(), Some(2));
    let out = agent.cli(&["destinations", "--limit", "-1"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(services(&agent), before, "nothing changed");
}

#[test]
fn cli_without_an_agent_says_how_to_start_one() {
    let _s = serial();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(agent_bin())
        .args([
            "--agent",
            &format!("unix://{}/none.sock", dir.path().display()),
            "info",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the agent"), "{err}");
    assert!(err.contains("breakwater agent"), "{err}");
    let out = Command::new(agent_bin())
        .args(["--agent", "tcp://1.2.3.4:5", "info"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn bad_config_file_is_refused_with_the_reason() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[[service]]\nname = \"a\"\nendpoints = [\"1.2.3.4\"]\n",
    )
    .unwrap();
    let out = Command::new(agent_bin())
        .args(["agent", "--socket"])
        .arg(dir.path().join("a.sock"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid endpoint \"1.2.3.4\""), "{err}");
    assert!(!dir.path().join("a.sock").exists());
}

/// A pin directory must be on bpffs: one elsewhere is refused, and no bpffs is mounted over the
/// directory the operator named (or its parent).
#[test]
fn a_pin_dir_off_bpffs_is_refused_and_nothing_is_mounted() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pins = dir.path().join("pins");
    let out = Command::new(agent_bin())
        .args(["agent", "--socket"])
        .arg(dir.path().join("a.sock"))
        .arg("--pin-dir")
        .arg(&pins)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("not on a bpf filesystem"), "{err}");
    let mounts = breakwater_common::mounts::read().unwrap();
    assert!(
        !mounts.iter().any(|m| m.point.starts_with(dir.path())),
        "{mounts:?}"
    );
    assert!(!pins.exists());
    assert!(!dir.path().join("a.sock").exists());
}

/// `--disable-feature` (and `[features] disable`) take optional features only: anything else
/// is bad input, refused before anything starts.
#[test]
fn unknown_or_core_features_cannot_be_disabled() {
    let _s = serial();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("features.toml");
    std::fs::write(
        &config,
        "[features]\ndisable = [\"first_response_latancy\"]\n",
    )
    .unwrap();
    for (args, why) in [
        (
            vec!["--disable-feature", "nonsense"],
            "unknown feature \"nonsense\" (optional features: time_wait, connect_latency, \
             first_response_latency, tcp_stats, destination_latency, retransmits, breaker_outcomes, \
             terminate_on_trip, audit_stream)",
        ),
        (
            vec!["--disable-feature", "audit_stream,breaker_gate"],
            "breaker_gate is a core feature and cannot be disabled",
        ),
        (
            vec!["--config", config.to_str().unwrap()],
            "features.disable: unknown feature \"first_response_latancy\"",
        ),
    ] {
        let out = Command::new(agent_bin())
            .args(["agent", "--socket"])
            .arg(dir.path().join("a.sock"))
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{args:?}: {err}");
        assert!(!dir.path().join("a.sock").exists(), "{args:?} started");
    }
}

#[test]
fn info_reports_programs_maps_and_socket_mode() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let _stats = BpfStats::enable();
    let agent = Agent::start_with_config(Some("[maps]\nmax_destinations = 16\n"));
    let mode = std::fs::metadata(&agent.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket is root-only");

    let info = agent.info();
    let scope = agent.scope();
    assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
    assert!(!info.kernel.is_empty());
    let programs: Vec<_> = info
        .programs
        .iter()
        .map(|p| (p.name.as_str(), p.attach.as_str()))
        .collect();
    // Each through the hook this kernel has, as its tracefs tells: the tracepoint, else the
    // fallback.
    let event = |name: &str| Path::new("/sys/kernel/tracing/events").join(name);
    let mut send = vec![if event("tcp/tcp_sendmsg_locked").exists() {
        ("bw_sock_send", "tp_btf/tcp_sendmsg_locked")
    } else {
        ("bw_sock_send_fentry", "fentry/tcp_sendmsg_locked")
    }];
    // Kernels whose sendfile() does not go through tcp_sendmsg_locked (6.1) have this instead.
    let kallsyms = std::fs::read_to_string("/proc/kallsyms").unwrap();
    if kallsyms.lines().any(|l| l.ends_with(" do_tcp_sendpages")) {
        send.push(("bw_sock_sendpages_fentry", "fentry/do_tcp_sendpages"));
    }
    let ready = if event("sock/sk_data_ready").exists() {
        ("bw_data_ready", "tp_btf/sk_data_ready")
    } else {
        ("bw_data_ready_fentry", "fentry/tcp_data_ready")
    };
    let format = std::fs::read_to_string(event("tcp/tcp_retransmit_skb/format")).unwrap();
    let retransmit = if format.contains("field:int err;") {
        ("bw_retransmit", "tp_btf/tcp_retransmit_skb")
    } else {
        (
            "bw_retransmit_sent",
            "tp_btf/tcp_retransmit_skb (2-argument form)",
        )
    };
    assert_eq!(
        programs,
        [
            &[("bw_sock_state", "tp_btf/inet_sock_set_state")][..],
            &send,
            &[ready, retransmit],
            &[
                ("bw_seed_tcp", "iter/tcp"),
                ("bw_list_tcp", "iter/tcp"),
                ("bw_socks_tcp", "iter/tcp"),
                ("bw_stamp_tcp", "iter/tcp"),
                ("bw_connect4", &format!("cgroup/connect4 {scope}")),
                ("bw_connect6", &format!("cgroup/connect6 {scope}")),
                ("bw_sockops", &format!("sock_ops {scope}")),
                ("bw_breaker_tcp", "iter/tcp"),
            ],
        ]
        .concat()
    );
    assert!(info.programs.iter().all(|p| p.id > 0));
    let dests = info.maps.iter().find(|m| m.name == "BW_DESTS").unwrap();
    assert_eq!(dests.capacity, 16);

    // 40 distinct destinations into a 16-entry LRU: the evictions are counted and reported.
    for _ in 0..40 {
        let _ = TcpStream::connect(("127.0.0.1", closed_port()));
    }
    let info = eventually(Duration::from_secs(10), || {
        let info = agent.info();
        let m = info
            .maps
            .iter()
            .find(|m| m.name == "BW_DESTS")
            .unwrap()
            .clone();
        (m.evictions >= 24).then_some(m)
    })
    .expect("evictions reported");
    assert!(info.entries <= 16, "{info:?}");
    assert_eq!(agent.counter("prog_errors"), 0);

    // With kernel.bpf_stats_enabled the kernel's own run counts come through.
    let state = agent
        .info()
        .programs
        .into_iter()
        .find(|p| p.name == "bw_sock_state")
        .unwrap();
    assert!(
        state.run_count >= 80,
        "2 state changes per refused connect: {state:?}"
    );
    assert!(state.run_time_ns > 0);
}

/// Turns on `kernel.bpf_stats_enabled` and restores the previous value on drop.
struct BpfStats(String);

impl BpfStats {
    const PATH: &str = "/proc/sys/kernel/bpf_stats_enabled";

    fn enable() -> Self {
        let old = std::fs::read_to_string(Self::PATH).unwrap();
        std::fs::write(Self::PATH, "1").unwrap();
        Self(old)
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, self.0.trim());
    }
}

/// A destination evicted from a full LRU while its connection is open comes back at zero when
/// that connection closes: the gauge stays at 0 (the dropped decrement is counted) instead of
/// wrapping around.
#[test]
fn gauges_never_underflow_after_eviction() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let agent = Agent::start_with_config(Some("[maps]\nmax_destinations = 16\n"));
    let server = Server::start("127.0.0.1:0");
    let port = server.addr.port();
    let client = connect_many(server.addr, 1);
    eventually(Duration::from_secs(10), || {
        agent
            .destination("127.0.0.1", port, "outbound", None)
            .filter(|d| field(d, "active") == 1)
    })
    .expect("counted");
    // Push it out of the 16-entry LRU with refused connects to other ports, until it is gone
    // (the LRU keeps recently referenced entries a while).
    let evicted = (0..100).any(|_| {
        for _ in 0..50 {
            let _ = TcpStream::connect(("127.0.0.1", closed_port()));
        }
        agent
            .destination("127.0.0.1", port, "outbound", None)
            .is_none()
    });
    assert!(evicted, "the destination was never evicted");
    drop(client);
    server.close();
    eventually(Duration::from_secs(10), || {
        (agent.counter("underflows") >= 1).then_some(())
    })
    .expect("the dropped decrement is counted");
    let v = agent.cli_json(&["destinations"]);
    for d in v["destinations"].as_array().unwrap() {
        assert!(field(d, "active") < 1 << 32, "a gauge wrapped around: {d}");
    }
}

#[test]
fn a_second_agent_does_not_take_the_socket_over() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let agent = Agent::start();
    let out = Command::new(agent_bin())
        .args(["agent", "--socket"])
        .arg(&agent.socket)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another agent already serves"), "{err}");
    // The first one still answers on its socket.
    assert!(!agent.info().programs.is_empty());
}
