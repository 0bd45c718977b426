//! Observability against the real agent: server reflection and the standard health service as a
//! client without our .proto files sees them (Python grpcio, `tests/python/grpc_probe.py`), the
//! health-only listener (`--health-listen`) through start and shutdown, Prometheus
//! `/metrics` (`--metrics-listen`): strictly parsed, and its numbers equal to the API's; and the
//! features the agent runs, reported everywhere, with the calls that need one that is off
//! (`--disable-feature`) saying so. `/metrics` also passes `promtool check metrics`, the
//! conventions Prometheus users check with their own tools.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use breakwater::core::features::{Feature, DISABLED_BY_CONFIG};
use breakwater_proto::v1 as pb;
use breakwater_tests::{
    churn_to_time_wait, closed_port, connect_many, echo_server, eventually, prom, require_root,
    serial, ss_established_to, Agent, Server,
};

/// The Python of the tests' venv if it has grpcio with reflection and health checking; None
/// (with the reason printed) outside CI, a failure under `CI=true`.
fn python() -> Option<PathBuf> {
    let venv = std::env::var_os("BREAKWATER_VENV")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache/breakwater/venv"))
        });
    let python = venv.map(|v| v.join("bin/python"));
    let works = python.as_ref().is_some_and(|p| {
        Command::new(p)
            .args(["-c", "import grpc, grpc_reflection, grpc_health"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if works {
        return python;
    }
    let how = "run `cargo xtask setup` (it installs grpcio, grpcio-reflection and \
               grpcio-health-checking into ~/.cache/breakwater/venv)";
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true but the Python gRPC client is missing: {how}"
    );
    eprintln!("skipped: the Python gRPC client is missing ({how})");
    None
}

/// Debian's promtool (package prometheus, which `cargo xtask setup` installs); None (with the
/// reason printed) outside CI, a failure under `CI=true`.
fn promtool() -> Option<PathBuf> {
    let promtool = PathBuf::from("/usr/bin/promtool");
    let works = Command::new(&promtool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if works {
        return Some(promtool);
    }
    let how = "run `cargo xtask setup` as root (it installs Debian's prometheus package for \
               /usr/bin/promtool, and leaves its server stopped and disabled)";
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true but promtool is missing: {how}"
    );
    eprintln!("skipped: promtool is missing ({how})");
    None
}

/// Runs `tests/python/grpc_probe.py` against `target` and parses what it prints.
fn probe(python: &Path, target: &str, health_only: bool) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/grpc_probe.py");
    let mut cmd = Command::new(python);
    cmd.arg(&script).arg(target);
    if health_only {
        cmd.arg("--health-only");
    }
    let out = cmd.output().expect("run grpc_probe.py");
    assert!(
        out.status.success(),
        "grpc_probe.py {target} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("grpc_probe.py prints JSON")
}

/// The address the agent printed for a listener: "breakwater agent {what} on http://ADDR".
fn listening(agent: &Agent, what: &str) -> SocketAddr {
    let marker = format!("breakwater agent {what} on http://");
    let log = agent.log();
    let line = log
        .lines()
        .find_map(|l| l.split_once(marker.as_str()).map(|(_, rest)| rest))
        .unwrap_or_else(|| panic!("the agent printed no {marker:?}:\n{log}"));
    line.split(['/', ' '])
        .next()
        .unwrap()
        .parse()
        .expect("an address")
}

struct HttpResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One plain HTTP/1.1 request, as a scraper sends it.
fn http(addr: SocketAddr, method: &str, path: &str, accept: Option<&str>) -> HttpResponse {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics listener");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read the response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a complete response");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    HttpResponse {
        status,
        headers,
        body: body.to_owned(),
    }
}

fn scrape(addr: SocketAddr) -> prom::Exposition {
    let r = http(addr, "GET", "/metrics", None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    prom::parse(&r.body).unwrap_or_else(|e| panic!("/metrics does not parse: {e}\n{}", r.body))
}

fn service(agent: &Agent, name: &str) -> pb::Service {
    let mut c = agent.client();
    agent
        .block_on(c.list_services(pb::ListServicesRequest {}))
        .expect("ListServices")
        .into_inner()
        .services
        .into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no service {name}"))
}

#[test]
fn prometheus_parser_is_strict() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"\\\\\"} 3\n\
                # TYPE h histogram\nh_bucket{le=\"0.5\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.7\n\
                h_count 2\n";
    let e = prom::parse(good).unwrap();
    assert_eq!(e.value("a_total", &[("y", "q\"\\")]), 3.0);
    assert_eq!(e.value("h_count", &[]), 2.0);
    for bad in [
        "a 1\n",                                                   // no TYPE
        "# TYPE a gauge\na{x=1} 1\n",                              // unquoted label value
        "# TYPE a gauge\na 1\na 2\n",                              // the same series twice
        "# TYPE a gauge\n# TYPE b gauge\na 1\nb 1\na{x=\"\"} 1\n", // a family split
        "# TYPE a gauge\na one\n",                                 // not a number
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n",
        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 3\n",
    ] {
        assert!(prom::parse(bad).is_err(), "accepted {bad:?}");
    }
}

#[test]
fn reflection_and_health_serve_a_client_without_our_protos() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let Some(python) = python() else { return };
    let server = Server::start("127.0.0.1:0");
    let agent = Agent::start_with(
        Some(&format!(
            "[[service]]\nname = \"inventory\"\nendpoints = [\"127.0.0.1:{}\"]\n",
            server.addr.port()
        )),
        &["--health-listen", "127.0.0.1:0"],
    );

    // The API socket: reflection lists and describes everything, health says SERVING.
    let out = probe(&python, &agent.address(), false);
    let services: Vec<&str> = out["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    for name in [
        "breakwater.v1.Agent",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(services.contains(&name), "{name} not in {services:?}");
    }
    let methods = out["agent_methods"].as_array().unwrap();
    for m in ["ListServices", "GetAgentInfo", "Trip", "WatchBreakerEvents"] {
        assert!(methods.iter().any(|x| x == m), "{m} not in {methods:?}");
    }
    // ListServices, called with message types learnt from reflection, says what the API says.
    let listed = &out["list_services"]["services"][0];
    let api = service(&agent, "inventory");
    assert_eq!(listed["name"], "inventory");
    assert_eq!(listed["endpoints"], serde_json::json!(api.endpoints));
    assert_eq!(
        out["health"],
        serde_json::json!({
            "": "SERVING",
            "breakwater.v1.Agent": "SERVING",
            "no.such.Service": "NOT_FOUND",
        })
    );

    // The health listener: plain TCP, the same statuses, and nothing else.
    let health = listening(&agent, "health");
    let out = probe(&python, &health.to_string(), true);
    assert_eq!(out["health"][""], "SERVING");
    assert_eq!(out["health"]["breakwater.v1.Agent"], "SERVING");
    assert_eq!(out["reflection"], "UNIMPLEMENTED");
    drop(server);
}

#[test]
fn health_turns_not_serving_when_the_agent_stops() {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    let _s = serial();
    if !require_root() {
        return;
    }
    let mut agent = Agent::start_with(None, &["--health-listen", "127.0.0.1:0"]);
    let addr = listening(&agent, "health");
    let pid = agent.pid();
    let seen = agent.block_on(async move {
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .expect("connect to the health listener");
        let mut client = HealthClient::new(channel);
        let mut stream = client
            .watch(HealthCheckRequest {
                service: "breakwater.v1.Agent".into(),
            })
            .await
            .expect("Watch")
            .into_inner();
        let mut seen = Vec::new();
        let first = stream.message().await.expect("a status").expect("a status");
        seen.push(first.status());
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        // Until the process ends the listener answers, NOT_SERVING.
        let next = tokio::time::timeout(Duration::from_secs(10), stream.message()).await;
        if let Ok(Ok(Some(status))) = next {
            seen.push(status.status());
        }
        seen
    });
    assert_eq!(seen, [ServingStatus::Serving, ServingStatus::NotServing]);
    assert!(agent.stop().success(), "{}", agent.log());
}

#[test]
fn metrics_parse_and_equal_the_api() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let server = Server::start("127.0.0.1:0");
    let churn = TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = closed_port();
    let port = server.addr.port();
    let config = format!(
        "[metrics]\ntop_destinations = 1000\n\
         [[service]]\nname = \"shop\"\n\
         endpoints = [\"127.0.0.1:{port}\", \"127.0.0.1:{closed}\", \"127.0.0.1:{}\"]\n\
         [service.breaker]\nconsecutive_failures = 1000\nterminate_established = false\n",
        churn.local_addr().unwrap().port()
    );
    let mut agent = Agent::start_with(Some(&config), &["--metrics-listen", "127.0.0.1:0"]);
    let metrics = listening(&agent, "metrics");

    // 20 held open, 5 refused, 5 closed client side first (into TIME_WAIT).
    let held = connect_many(server.addr, 20);
    for _ in 0..5 {
        let err = TcpStream::connect(("127.0.0.1", closed)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    }
    churn_to_time_wait(&churn, 5);
    let api = eventually(Duration::from_secs(10), || {
        let s = service(&agent, "shop");
        let (o, i) = (s.outbound.unwrap(), s.inbound.unwrap());
        (o.opened == 25 && o.failed_refused == 5 && o.active == 20 && i.closed == 5).then_some(s)
    })
    .expect("the service counts 25 opened, 20 active, 5 refused");

    let info_before = agent.info();
    let m = scrape(metrics);
    let info_after = agent.info();

    // Per service and direction: exactly what ListServices says.
    let shop = [("service", "shop")];
    for (dir, c) in [
        ("outbound", api.outbound.unwrap()),
        ("inbound", api.inbound.unwrap()),
    ] {
        let l = [("service", "shop"), ("direction", dir)];
        let get = |name: &str| m.value(name, &l) as u64;
        assert_eq!(
            get("breakwater_service_connections_active"),
            c.active,
            "{dir}"
        );
        assert_eq!(get("breakwater_service_connections_opened_total"), c.opened);
        assert_eq!(get("breakwater_service_connections_closed_total"), c.closed);
        for (reason, n) in [
            ("refused", c.failed_refused),
            ("timeout", c.failed_timeout),
            ("other", c.failed_other),
        ] {
            let l = [("service", "shop"), ("direction", dir), ("reason", reason)];
            assert_eq!(
                m.value("breakwater_service_connections_failed_total", &l) as u64,
                n,
                "{dir} {reason}"
            );
        }
        assert_eq!(
            get("breakwater_service_time_wait_entered_total"),
            c.time_wait_entered
        );
        assert_eq!(get("breakwater_service_retransmits_total"), c.retransmits);
        assert_eq!(get("breakwater_service_sent_bytes_total"), c.bytes_sent);
        assert_eq!(
            get("breakwater_service_received_bytes_total"),
            c.bytes_received
        );
    }

    // The connect-latency histogram has exactly the API's samples.
    let mut client = agent.client();
    let latency = agent
        .block_on(client.get_latency(pb::GetLatencyRequest {
            service: "shop".into(),
            ..Default::default()
        }))
        .expect("GetLatency")
        .into_inner();
    let connect = latency
        .histograms
        .iter()
        .find(|h| h.kind == "connect")
        .expect("a connect histogram");
    assert!(connect.count >= 25, "{connect:?}");
    assert_eq!(
        m.value("breakwater_service_connect_duration_seconds_count", &shop) as u64,
        connect.count
    );
    // TIME_WAIT and port pressure: what GetTimeWait walks.
    let tw = agent
        .block_on(client.get_time_wait(pb::GetTimeWaitRequest { limit: 0 }))
        .expect("GetTimeWait")
        .into_inner();
    let tw_shop = tw
        .services
        .iter()
        .find(|s| s.service == "shop")
        .expect("shop has sockets in TIME_WAIT");
    assert_eq!(tw_shop.outbound, 5);
    let dir = |d: &'static str| [("service", "shop"), ("direction", d)];
    assert_eq!(
        m.value("breakwater_service_time_wait_sockets", &dir("outbound")) as u64,
        tw_shop.outbound
    );
    assert_eq!(
        m.value("breakwater_service_time_wait_sockets", &dir("inbound")) as u64,
        tw_shop.inbound
    );
    let pressure = tw
        .pressure
        .iter()
        .filter(|p| p.service == "shop")
        .map(|p| p.ratio)
        .fold(0.0, f64::max);
    assert!(pressure > 0.0);
    let got = m.value("breakwater_service_port_pressure_ratio", &shop);
    assert!((got - pressure).abs() < 1e-9, "{got} vs {pressure}");

    // The destination: labelled ip:port, counts equal to ListDestinations'.
    let dest = format!("127.0.0.1:{port}");
    let d = agent
        .block_on(client.list_destinations(pb::ListDestinationsRequest {
            service: "shop".into(),
            ..Default::default()
        }))
        .expect("ListDestinations")
        .into_inner()
        .destinations
        .into_iter()
        .find(|d| d.port == u32::from(port) && d.direction == pb::Direction::Outbound as i32)
        .expect("the server's destination");
    let l = [
        ("destination", dest.as_str()),
        ("direction", "outbound"),
        ("service", "shop"),
    ];
    assert_eq!(d.opened, 20);
    assert_eq!(
        m.value("breakwater_destination_connections_opened_total", &l) as u64,
        d.opened
    );
    assert_eq!(
        m.value("breakwater_destination_connections_active", &l) as u64,
        d.active
    );
    let destinations: std::collections::HashSet<_> = m
        .samples("breakwater_destination_connections_opened_total", &[])
        .map(|s| {
            (
                s.labels["destination"].clone(),
                s.labels["direction"].clone(),
            )
        })
        .collect();
    assert!(destinations.len() <= 1000);

    // The agent's own health: every counter of GetAgentInfo, between the two reads; the maps.
    for c in &info_before.counters {
        let after = info_after
            .counters
            .iter()
            .find(|a| a.name == c.name)
            .unwrap();
        let v = m.value("breakwater_kernel_events_total", &[("counter", &c.name)]) as u64;
        assert!(
            c.value <= v && v <= after.value,
            "{}: {} <= {v} <= {}",
            c.name,
            c.value,
            after.value
        );
    }
    for map in &info_before.maps {
        let l = [("map", map.name.as_str())];
        assert_eq!(m.value("breakwater_map_capacity", &l) as u32, map.capacity);
        m.value("breakwater_map_entries", &l);
        m.value("breakwater_map_evictions_total", &l);
    }
    for p in &info_before.programs {
        m.value(
            "breakwater_program_missed_runs_total",
            &[("program", p.name.as_str())],
        );
    }
    let b = |state: &str| {
        m.value(
            "breakwater_breaker_state",
            &[("service", "shop"), ("state", state)],
        )
    };
    assert_eq!((b("closed"), b("open"), b("half_open")), (1.0, 0.0, 0.0));

    // A trip, then connects from the enforced cgroup: refused, and counted as the API counts.
    agent.cgroup().enter();
    agent
        .block_on(client.trip(pb::TripRequest {
            service: "shop".into(),
            ttl_ms: None,
            reason: "observability test".into(),

            ..Default::default()
        }))
        .expect("Trip");
    for _ in 0..3 {
        let err = TcpStream::connect(server.addr).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    }
    agent.cgroup().leave();
    let breaker = agent
        .block_on(client.get_breaker(pb::GetBreakerRequest {
            service: "shop".into(),
        }))
        .expect("GetBreaker")
        .into_inner()
        .breaker
        .unwrap();
    assert_eq!((breaker.trips, breaker.rejected), (1, 3));
    let m = scrape(metrics);
    let b = |state: &str| {
        m.value(
            "breakwater_breaker_state",
            &[("service", "shop"), ("state", state)],
        )
    };
    assert_eq!((b("closed"), b("open"), b("half_open")), (0.0, 1.0, 0.0));
    assert_eq!(
        m.value("breakwater_breaker_trips_total", &shop) as u64,
        breaker.trips
    );
    assert_eq!(
        m.value("breakwater_breaker_rejected_total", &shop) as u64,
        breaker.rejected
    );
    assert_eq!(
        m.value("breakwater_breaker_events_lost_total", &shop) as u64,
        breaker.events_lost
    );

    // OpenMetrics for whoever asks for it (Prometheus does); nothing but /metrics; GET only.
    let r = http(
        metrics,
        "GET",
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"),
    );
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .is_some_and(|t| t.starts_with("application/openmetrics-text")));
    assert!(r.body.ends_with("# EOF\n"));
    assert!(r
        .body
        .contains("# TYPE breakwater_service_connections_opened counter\n"));
    assert_eq!(http(metrics, "GET", "/", None).status, 404);
    assert_eq!(http(metrics, "POST", "/metrics", None).status, 405);
    drop((held, server));
}

/// `promtool check metrics` finds nothing to say about `/metrics` with every family in it:
/// services with a breaker, destinations, TIME_WAIT, the histograms, the agent's own.
#[test]
fn metrics_pass_promtool_check() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let Some(promtool) = promtool() else { return };
    let server = Server::start("127.0.0.1:0");
    let churn = TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = closed_port();
    let config = format!(
        "[[service]]\nname = \"shop\"\n\
         endpoints = [\"127.0.0.1:{}\", \"127.0.0.1:{closed}\", \"127.0.0.1:{}\"]\n\
         [service.breaker]\nconsecutive_failures = 1000\n",
        server.addr.port(),
        churn.local_addr().unwrap().port()
    );
    let agent = Agent::start_with(Some(&config), &["--metrics-listen", "127.0.0.1:0"]);
    let metrics = listening(&agent, "metrics");
    let held = connect_many(server.addr, 3);
    TcpStream::connect(("127.0.0.1", closed)).unwrap_err();
    churn_to_time_wait(&churn, 2);
    eventually(Duration::from_secs(10), || {
        let o = service(&agent, "shop").outbound.unwrap();
        (o.opened >= 5 && o.failed_refused >= 1).then_some(())
    })
    .expect("the service counts the connects");

    let r = http(metrics, "GET", "/metrics", None);
    assert_eq!(r.status, 200, "{}", r.body);
    let families: Vec<&str> = r
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    for family in [
        "breakwater_service_connections_opened_total",
        "breakwater_service_time_wait_sockets",
        "breakwater_service_connect_duration_seconds",
        "breakwater_breaker_state",
        "breakwater_breaker_trips_total",
        "breakwater_destination_connections_opened_total",
        "breakwater_destination_port_pressure_ratio",
        "breakwater_kernel_events_total",
        "breakwater_map_entries",
        "breakwater_program_run_seconds_total",
        "breakwater_feature_enabled",
        "breakwater_agent_info",
    ] {
        assert!(families.contains(&family), "no {family} in\n{}", r.body);
    }

    let mut check = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool");
    check
        .stdin
        .take()
        .unwrap()
        .write_all(r.body.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics ({}):\n{}{}",
        out.status,
        stdout(&out),
        stderr(&out)
    );
    drop((held, server));
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The row of `feature` in `breakwater info`'s FEATURES table.
fn info_row(table: &str, feature: &str) -> String {
    let header = table
        .lines()
        .position(|l| l.trim_start().starts_with("FEATURE"))
        .unwrap_or_else(|| panic!("no FEATURES table in\n{table}"));
    table
        .lines()
        .skip(header + 1)
        .take_while(|l| !l.trim().is_empty())
        .find(|l| l.split_whitespace().next() == Some(feature))
        .unwrap_or_else(|| panic!("no row for {feature} in\n{table}"))
        .to_owned()
}

/// This machine's kernel has every hook: every feature is on, and `info`, `-o json` and
/// `/metrics` all say so.
#[test]
fn every_feature_is_on_here_and_reported_everywhere() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let agent = Agent::start_with(None, &["--metrics-listen", "127.0.0.1:0"]);
    let info = agent.info();
    let names: Vec<&str> = info.features.iter().map(|f| f.name.as_str()).collect();
    let all: Vec<&str> = Feature::ALL.iter().map(|f| f.name()).collect();
    assert_eq!(names, all, "every feature, in Feature::ALL order");
    for f in &info.features {
        assert_eq!(f.status(), pb::FeatureStatus::On, "{f:?}");
        assert!(!f.hook.is_empty() && f.reason.is_empty(), "{f:?}");
    }
    let first_response = info
        .features
        .iter()
        .find(|f| f.name == "first_response_latency")
        .unwrap();
    assert!(
        first_response.hook.contains("tcp_sendmsg_locked"),
        "{first_response:?}"
    );

    let out = agent.cli(&["info"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    let header = table
        .lines()
        .find(|l| l.trim_start().starts_with("FEATURE"))
        .unwrap();
    for column in ["STATUS", "HOOK", "REASON"] {
        assert!(header.contains(column), "{header}");
    }
    for name in &all {
        let row = info_row(&table, name);
        assert_eq!(row.split_whitespace().nth(1), Some("on"), "{row}");
    }
    let json = agent.cli_json(&["info"]);
    let features = json["features"].as_array().expect("features in -o json");
    assert_eq!(features.len(), all.len());
    assert!(features.iter().all(|f| f["status"] == "on"), "{features:?}");

    let m = scrape(listening(&agent, "metrics"));
    for name in &all {
        assert_eq!(
            m.value("breakwater_feature_enabled", &[("feature", name)]),
            1.0,
            "{name}"
        );
    }
    assert_eq!(m.families["breakwater_feature_enabled"].kind, "gauge");
    assert!(!agent.log().contains("feature off"), "{}", agent.log());
}

/// Features turned off by the operator are off in `info`, the log and `/metrics`, and what
/// needs them says so precisely (FAILED_PRECONDITION, CLI exit 1) while the rest works: connect
/// latency, and a trip (which keeps the connections and says why).
#[test]
fn a_disabled_feature_is_off_everywhere_and_calls_that_need_it_say_so() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let echo = echo_server();
    let config = format!(
        "[[service]]\nname = \"shop\"\nendpoints = [\"{echo}\"]\n\
         [service.breaker]\nconsecutive_failures = 1000\n"
    );
    let mut agent = Agent::start_with(
        Some(&config),
        &[
            "--metrics-listen",
            "127.0.0.1:0",
            "--disable-feature",
            "first_response_latency",
            "--disable-feature=terminate_on_trip,audit_stream",
        ],
    );
    let off = [
        "first_response_latency",
        "terminate_on_trip",
        "audit_stream",
    ];

    // GetAgentInfo, `info` and the start-up log.
    let info = agent.info();
    for f in &info.features {
        if off.contains(&f.name.as_str()) {
            assert_eq!(f.status(), pb::FeatureStatus::Off, "{f:?}");
            assert_eq!(
                (f.hook.as_str(), f.reason.as_str()),
                ("", DISABLED_BY_CONFIG)
            );
        } else {
            assert_eq!(f.status(), pb::FeatureStatus::On, "{f:?}");
        }
    }
    let out = agent.cli(&["info"]);
    let row = info_row(&stdout(&out), "first_response_latency");
    assert_eq!(row.split_whitespace().nth(1), Some("off"), "{row}");
    assert!(row.trim_end().ends_with(DISABLED_BY_CONFIG), "{row}");
    let log = agent.log();
    for name in off {
        assert!(
            log.lines().any(|l| l.contains("WARN")
                && l.contains("feature off")
                && l.contains(name)
                && l.contains(DISABLED_BY_CONFIG)),
            "no warning for {name}:\n{log}"
        );
    }

    // Requests from the enforced cgroup, so that a trip would terminate their connections.
    agent.cgroup().enter();
    let mut pool: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(echo).unwrap()).collect();
    agent.cgroup().leave();
    let ping = |c: &mut TcpStream| {
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        c.write_all(b"ping")?;
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf)
    };
    for c in &mut pool {
        ping(c).unwrap();
    }

    // /metrics: 0 for what is off, and no first-response histogram rather than an empty one.
    let m = scrape(listening(&agent, "metrics"));
    let enabled = |f: &str| m.value("breakwater_feature_enabled", &[("feature", f)]);
    assert_eq!(enabled("first_response_latency"), 0.0);
    assert_eq!(enabled("audit_stream"), 0.0);
    assert_eq!(enabled("connect_latency"), 1.0);
    assert!(!m
        .families
        .contains_key("breakwater_service_first_response_duration_seconds"));

    // GetLatency: the off kind asked for by name is FAILED_PRECONDITION naming the feature;
    // connect latency works; with no kind asked for, the off one is named, not zeroed.
    let mut c = agent.client();
    let latency = |kinds: &[&str]| pb::GetLatencyRequest {
        service: "shop".into(),
        kinds: kinds.iter().map(|k| k.to_string()).collect(),
        ..Default::default()
    };
    let status = agent
        .block_on(c.get_latency(latency(&["first_response"])))
        .expect_err("first_response is off");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        status.message(),
        format!("first_response_latency is off: {DISABLED_BY_CONFIG}")
    );
    let connect = agent
        .block_on(c.get_latency(latency(&["connect"])))
        .expect("connect latency")
        .into_inner();
    assert_eq!(connect.histograms.len(), 1);
    assert_eq!(connect.histograms[0].kind, "connect");
    assert!(connect.histograms[0].count >= 3, "{connect:?}");
    let every = agent
        .block_on(c.get_latency(latency(&[])))
        .expect("every kind that is on")
        .into_inner();
    let kinds: Vec<&str> = every.histograms.iter().map(|h| h.kind.as_str()).collect();
    assert_eq!(kinds, ["connect", "srtt", "lifetime"]);
    let named: Vec<&str> = every.features_off.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(named, ["first_response_latency"]);

    // The CLI: exit 1 (not bad input) with the agent's reason; the rest as usual.
    let out = agent.cli(&["latency", "shop", "--kind", "first_response"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = stderr(&out);
    assert!(
        err.contains("first_response_latency is off: disabled by configuration"),
        "{err}"
    );
    let out = agent.cli(&["latency", "shop", "--kind", "connect"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("connect latency: "), "{out:?}");
    let out = agent.cli(&["latency", "shop"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("first_response latency not measured: first_response_latency is off"),
        "{}",
        stdout(&out)
    );

    // WatchConnections needs the audit stream.
    let status = agent
        .block_on(c.watch_connections(pb::WatchConnectionsRequest::default()))
        .map(drop)
        .expect_err("audit_stream is off");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(
        status.message().starts_with("audit_stream is off"),
        "{status:?}"
    );
    let out = agent.cli(&["watch", "conns"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr(&out).contains("audit_stream is off"), "{out:?}");

    // A trip opens the breaker and keeps the connections, and says why.
    let trip = agent
        .block_on(c.trip(pb::TripRequest {
            service: "shop".into(),
            ttl_ms: Some(60_000),
            reason: "features test".into(),

            ..Default::default()
        }))
        .expect("the trip itself works")
        .into_inner();
    assert_eq!(trip.breaker.unwrap().state(), pb::BreakerState::Open);
    assert_eq!(trip.terminated, 0);
    assert_eq!(
        trip.not_terminated,
        format!("terminate_on_trip is off: {DISABLED_BY_CONFIG}")
    );
    for c in &mut pool {
        ping(c).expect("still connected");
    }
    assert_eq!(ss_established_to(echo, None), 3);
    let out = agent.cli(&["trip", "shop"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("established connections NOT terminated: terminate_on_trip is off"),
        "{}",
        stdout(&out)
    );
    assert_eq!(agent.stop().code(), Some(0));
}
