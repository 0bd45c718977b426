//! Per-destination ejection (granularity destination), against the real kernel: one service
//! of three loopback backends, real connects from a cgroup the test makes and enters, the errno
//! each client sees, and `ss` for the connections a trip terminates.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use breakwater_tests::{
    closed_port, full_queue, require_root, serial, ss_established_to, Agent, Server,
};
use serde_json::Value;

const SERVICE: &str = "pool";
/// The errno of a connect the breaker refuses: not what a closed port answers (ECONNREFUSED),
/// so that a refusal by the kernel's breaker is told apart from the backend's own.
const EJECTED: i32 = libc::EHOSTUNREACH;

/// An agent enforcing on a cgroup this test has entered, with a service of `backends` and a
/// destination-granularity policy of `policy` (a `[service.breaker]` body).
fn agent(backends: &[SocketAddr], policy: &str) -> Agent {
    agent_with(backends, policy, &[])
}

fn agent_with(backends: &[SocketAddr], policy: &str, args: &[&str]) -> Agent {
    let endpoints: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    let config = format!(
        "[[service]]\nname = \"{SERVICE}\"\nendpoints = [{}]\n[service.breaker]\n\
         granularity = \"destination\"\nerrno = \"EHOSTUNREACH\"\n{policy}\n",
        endpoints.join(", ")
    );
    let mut agent = Agent::start_with(Some(&config), args);
    agent.cgroup().enter();
    agent
}

fn closed() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], closed_port()))
}

/// The errno of a connect (0: it connected).
fn connect(to: SocketAddr) -> i32 {
    match TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

fn breaker(agent: &Agent) -> Value {
    let v = agent.cli_json(&["breakers", "--service", SERVICE]);
    v["breakers"][0].clone()
}

/// A destination's row under the service in `breakers -o json`.
fn destination(agent: &Agent, to: SocketAddr) -> Value {
    let b = breaker(agent);
    b["destinations"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["destination"] == to.to_string())
        .cloned()
        .unwrap_or_else(|| panic!("no row for {to} in {b:#}"))
}

fn state(agent: &Agent, to: SocketAddr) -> String {
    destination(agent, to)["state"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn a_dead_backend_is_refused_in_the_kernel_while_the_others_keep_serving() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let (a, b) = (Server::start("127.0.0.1:0"), Server::start("127.0.0.1:0"));
    let dead = closed();
    let agent = agent(&[a.addr, b.addr, dead], "consecutive_failures = 3");
    assert_eq!((connect(a.addr), connect(b.addr)), (0, 0));
    for i in 0..3 {
        assert_eq!(
            connect(dead),
            libc::ECONNREFUSED,
            "failure {i}: the port's own refusal"
        );
    }
    assert_eq!(state(&agent, dead), "open");
    // Ejected: refused by the gate with the policy's errno (no closed port answers that).
    assert_eq!(connect(dead), EJECTED);
    // The rest of the service keeps serving.
    for _ in 0..5 {
        assert_eq!((connect(a.addr), connect(b.addr)), (0, 0));
    }
    let svc = breaker(&agent);
    assert_eq!(svc["state"], "closed", "the service is not tripped");
    assert_eq!(svc["ejected"], 1, "{svc:#}");
    assert_eq!(svc["rejected"], 1, "{svc:#}");
    assert_eq!(state(&agent, a.addr), "closed");
    assert_eq!(state(&agent, b.addr), "closed");
    assert_eq!(destination(&agent, dead)["trips"], 1);
    // The ejection lives in the kernel's pinned maps: it holds while the agent is gone, and a
    // new agent finds it as it was.
    let mut agent = agent;
    agent.kill();
    assert_eq!(connect(dead), EJECTED, "enforced without the agent");
    assert_eq!(connect(a.addr), 0);
    agent.spawn();
    let d = destination(&agent, dead);
    assert_eq!(
        (d["state"].as_str(), d["trips"].as_u64()),
        (Some("open"), Some(1)),
        "{d:#}"
    );
    assert_eq!(breaker(&agent)["ejected"], 1);
    // Destinations outside the service are not its own.
    let out = agent.cli(&["trip", SERVICE, "--destination", "127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not a destination of service"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn never_more_than_max_ejection_percent_are_ejected() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let up = Server::start("127.0.0.1:0");
    let (first, second) = (closed(), closed());
    // 50% of three destinations: one ejected at most.
    let agent = agent_with(
        &[up.addr, first, second],
        "consecutive_failures = 2\nmax_ejection_percent = 50",
        &["--metrics-listen", "127.0.0.1:0"],
    );
    assert_eq!(connect(up.addr), 0);
    for _ in 0..2 {
        assert_eq!(connect(first), libc::ECONNREFUSED);
    }
    assert_eq!(connect(first), EJECTED);
    // The second meets the rule too, but the cap holds: it stays closed, its connects go on.
    for _ in 0..4 {
        assert_eq!(connect(second), libc::ECONNREFUSED);
    }
    assert_eq!(state(&agent, second), "closed");
    let svc = breaker(&agent);
    assert_eq!(svc["ejected"], 1, "{svc:#}");
    let capped = svc["ejections_capped"].as_u64().unwrap_or(0);
    assert!(capped >= 3, "each refused ejection is counted: {svc:#}");
    // The same on /metrics, with each destination's state under its service.
    let m = scrape(&agent);
    let first_label = first.to_string();
    let open = [
        ("service", SERVICE),
        ("destination", first_label.as_str()),
        ("state", "open"),
    ];
    assert_eq!(m.value("breakwater_breaker_destination_state", &open), 1.0);
    assert_eq!(
        m.value(
            "breakwater_breaker_destinations_ejected",
            &[("service", SERVICE)]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "breakwater_breaker_ejections_capped_total",
            &[("service", SERVICE)]
        ),
        capped as f64
    );
    // An operator's reset of the first makes room: the second's next failure ejects it.
    let out = agent.cli(&["reset", SERVICE, "--destination", &first.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(state(&agent, first), "closed");
    assert_eq!(connect(second), libc::ECONNREFUSED);
    assert_eq!(connect(second), EJECTED);
    assert_eq!(breaker(&agent)["ejected"], 1);
}

#[test]
fn ejection_time_grows_with_each_trip_up_to_the_cap_and_starts_over_after_recovery() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let up = Server::start("127.0.0.1:0");
    let flaky = closed();
    let agent = agent(
        &[up.addr, flaky],
        "consecutive_failures = 1\nopen_timeout = \"1s\"\nmax_open_timeout = \"3s\"\n\
         max_ejection_percent = 100",
    );
    // Trip n opens it for min(1s x n, 3s): the probe after each timeout fails and trips again.
    for (trip, want_ms) in [(1, 1000), (2, 2000), (3, 3000), (4, 3000)] {
        assert_eq!(connect(flaky), libc::ECONNREFUSED, "trip {trip}");
        let d = destination(&agent, flaky);
        assert_eq!(d["state"], "open", "trip {trip}: {d:#}");
        assert_eq!(d["trips"], trip, "{d:#}");
        let left = d["open_remaining_ms"].as_u64().unwrap();
        assert!(
            // Slack for the CLI's own time under QEMU: still 1 s apart from the next.
            left <= want_ms && left > want_ms - 900,
            "trip {trip}: open for {left} ms, want {want_ms}"
        );
        assert_eq!(connect(flaky), EJECTED, "trip {trip}: ejected");
        thread::sleep(Duration::from_millis(left + 50));
    }
    // The backend comes back: the probe succeeds, and the next trip is back to the base.
    let listener = TcpListener::bind(flaky).expect("bind the backend's port");
    assert_eq!(connect(flaky), 0);
    assert_eq!(state(&agent, flaky), "closed");
    drop(listener);
    assert_eq!(connect(flaky), libc::ECONNREFUSED);
    let d = destination(&agent, flaky);
    assert_eq!(d["trips"], 1, "{d:#}");
    assert!(d["open_remaining_ms"].as_u64().unwrap() <= 1000, "{d:#}");
}

#[test]
fn an_operator_ejects_one_destination_and_only_its_connections_are_terminated() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let (a, b) = (Server::start("127.0.0.1:0"), Server::start("127.0.0.1:0"));
    let agent = agent(&[a.addr, b.addr], "consecutive_failures = 5");
    let held: Vec<TcpStream> = (0..2)
        .flat_map(|_| [a.addr, b.addr])
        .map(|to| TcpStream::connect(to).expect("connect"))
        .collect();
    assert_eq!(
        (
            ss_established_to(a.addr, None),
            ss_established_to(b.addr, None)
        ),
        (2, 2)
    );
    // A CIDR is not a destination: bad input, nothing changed.
    let out = agent.cli(&["trip", SERVICE, "--destination", "127.0.0.0/8:80"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("CIDR"));
    let out = agent.cli(&[
        "trip",
        SERVICE,
        "--destination",
        &a.addr.to_string(),
        "--reason",
        "draining a",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = destination(&agent, a.addr);
    assert_eq!(d["state"], "open");
    assert_eq!(d["forced"], true);
    assert_eq!(d["reason"], "draining a");
    // Only a's connections were destroyed (ss is the ground truth), and only a is refused.
    assert_eq!(ss_established_to(a.addr, None), 0);
    assert_eq!(ss_established_to(b.addr, None), 2);
    assert_eq!((connect(a.addr), connect(b.addr)), (EJECTED, 0));
    assert_eq!(breaker(&agent)["state"], "closed");
    let out = agent.cli(&["reset", SERVICE, "--destination", &a.addr.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(connect(a.addr), 0);
    drop(held);
}

/// `/metrics` of an agent started with `--metrics-listen`, strictly parsed.
fn scrape(agent: &Agent) -> breakwater_tests::prom::Exposition {
    use std::io::{Read as _, Write as _};
    let marker = "breakwater agent metrics on http://";
    let log = agent.log();
    let addr: SocketAddr = log
        .lines()
        .find_map(|l| l.split_once(marker).map(|(_, rest)| rest))
        .and_then(|rest| rest.split(['/', ' ']).next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no {marker:?} in the log:\n{log}"));
    let mut s = TcpStream::connect(addr).expect("connect to /metrics");
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read /metrics");
    let (_, body) = raw.split_once("\r\n\r\n").expect("a response");
    breakwater_tests::prom::parse(body).unwrap_or_else(|e| panic!("{e}\n{body}"))
}

/// A plain HTTP backend on loopback answering every request with `body`, on threads of its own.
fn http_backend(body: &'static str) -> SocketAddr {
    use std::io::{Read as _, Write as _};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { break };
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    addr
}

/// nginx (the distribution's, from `cargo xtask setup`) proxying `listen` to an upstream of
/// `servers`, nginx's own failure accounting off (`max_fails=0`), a 1 s connect timeout and the
/// next server tried on error or timeout; stopped on drop.
struct Nginx {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn start(listen: SocketAddr, servers: &[SocketAddr]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let upstream: String = servers
            .iter()
            .map(|s| format!("server {s} max_fails=0;\n"))
            .collect();
        let conf = format!(
            "daemon off;\nmaster_process off;\nuser root;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log;\nevents {{ worker_connections 64; }}\n\
             http {{\n access_log off;\n client_body_temp_path {d}/body;\n\
             proxy_temp_path {d}/proxy;\n fastcgi_temp_path {d}/fastcgi;\n\
             uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n\
             upstream pool {{\n{upstream}}}\n\
             server {{\n listen {listen};\n location / {{\n proxy_pass http://pool;\n\
             proxy_connect_timeout 1s;\n proxy_next_upstream error timeout;\n }}\n }}\n}}\n"
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let child = std::process::Command::new("/usr/sbin/nginx")
            .arg("-c")
            .arg(&path)
            .arg("-p")
            .arg(dir.path())
            // Its log from the start, not the distribution's /var/log/nginx.
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run nginx (installed by `cargo xtask setup`)");
        let up = Instant::now();
        while TcpStream::connect(listen).is_err() {
            assert!(
                up.elapsed() < Duration::from_secs(10),
                "nginx does not listen on {listen}: {}",
                std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(20));
        }
        Self { child, _dir: dir }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request through the proxy: its status line's code, its body, and how long it took.
fn get(proxy: SocketAddr) -> (u16, String, Duration) {
    use std::io::{Read as _, Write as _};
    let start = Instant::now();
    let mut s = TcpStream::connect(proxy).expect("connect to nginx");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: pool\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("nginx answers");
    let code = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body, start.elapsed())
}

#[test]
fn nginx_serves_every_request_through_the_live_servers_and_stops_waiting_on_the_dead_one() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let (a, b) = (http_backend("a"), http_backend("b"));
    // The dead server drops SYNs (its accept queue is full): a connect to it waits for
    // nginx's 1 s connect timeout.
    let (_dead_listener, dead, _filler) = full_queue();
    let agent = agent(
        &[a, b, dead],
        "consecutive_failures = 2\nmax_ejection_percent = 50",
    );
    let proxy = SocketAddr::from(([127, 0, 0, 1], closed_port()));
    // nginx runs in the test's cgroup, where the agent enforces: its connects pass the gate.
    let _nginx = Nginx::start(proxy, &[a, b, dead]);
    let mut waited = 0;
    let mut requests = 0;
    while state_of(&agent, dead).as_deref() != Some("open") {
        let (code, body, took) = get(proxy);
        assert_eq!(
            code, 200,
            "request {requests}: every one is served ({body:?})"
        );
        assert!(body == "a" || body == "b", "{body:?}");
        if took >= Duration::from_millis(900) {
            waited += 1;
        }
        requests += 1;
        assert!(requests < 30, "never ejected after {requests} requests");
    }
    assert!(
        waited >= 2,
        "before the trip, nginx waited on the dead server ({waited} times)"
    );
    // Ejected: nginx's connects to it are refused at once and it moves to the next server.
    let rejected_before = breaker(&agent)["rejected"].as_u64().unwrap();
    for i in 0..12 {
        let (code, body, took) = get(proxy);
        assert_eq!(code, 200, "request {i} after the trip ({body:?})");
        assert!(body == "a" || body == "b", "{body:?}");
        // Waiting on the dead server is nginx's 1 s connect timeout at least.
        assert!(
            took < Duration::from_millis(900),
            "request {i} after the trip took {took:?}: it waited on the dead server"
        );
    }
    let svc = breaker(&agent);
    assert!(
        svc["rejected"].as_u64().unwrap() > rejected_before,
        "nginx did try the dead server, and the kernel refused it: {svc:#}"
    );
    assert_eq!(state(&agent, a), "closed");
    assert_eq!(state(&agent, b), "closed");
}

/// A destination's state, if it has a row yet.
fn state_of(agent: &Agent, to: SocketAddr) -> Option<String> {
    breaker(agent)["destinations"]
        .as_array()?
        .iter()
        .find(|d| d["destination"] == to.to_string())
        .and_then(|d| d["state"].as_str().map(str::to_owned))
}
