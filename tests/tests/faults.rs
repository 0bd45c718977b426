//! Faults: the agent SIGKILLed in the middle of changes, its pins removed by hand while it
//! runs, its maps far too small, cgroup2 missing. The ground truth is the errno a client in the
//! enforced cgroup gets, the pin directory on bpffs, and the agent's own exit code and words.

use std::{
    collections::BTreeSet,
    io::ErrorKind,
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use breakwater_tests::{
    agent_bin, cgroup::connect_from_cgroup, eventually, require_root, serial, Agent, Server,
};

const SETTLE: Duration = Duration::from_secs(10);

fn breaker(agent: &Agent, service: &str) -> serde_json::Value {
    let v = agent.cli_json(&["breakers", "--service", service]);
    v["breakers"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["service"] == service))
        .cloned()
        .unwrap_or_else(|| panic!("no breaker {service} in {v}"))
}

/// The files of the pin directory.
fn pins(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Refused by a breaker: the target listens, so nothing else refuses.
fn refused(agent: &Agent, addr: SocketAddr) -> bool {
    match connect_from_cgroup(agent.scope(), addr) {
        Ok(()) => false,
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => true,
        Err(e) => panic!("connect to {addr}: {e}"),
    }
}

fn ok(out: std::process::Output) {
    assert!(
        out.status.success(),
        "{}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The agent is SIGKILLed while a change is under way (a policy set, a reload, a trip, a
/// destination trip), at a different moment each round, and restarted: a tripped service is
/// refused while the agent is dead and after, and each change is found whole, either before or
/// after, never half made.
#[test]
fn a_sigkill_in_the_middle_of_a_change_leaves_whole_state_enforced_throughout() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let tripped = Server::start("127.0.0.1:0");
    let other = Server::start("127.0.0.1:0");
    let api = Server::start("127.0.0.1:0");
    let backends: Vec<Server> = (2..5)
        .map(|i| Server::start(&format!("127.0.0.{i}:0")))
        .collect();
    let endpoints: Vec<String> = backends.iter().map(|b| format!("\"{}\"", b.addr)).collect();
    let config = |ratio: &str| {
        format!(
            "[[service]]\nname = \"tripped\"\nendpoints = [\"{}\"]\n[service.breaker]\npreset = \"gobreaker\"\n\
             [[service]]\nname = \"other\"\nendpoints = [\"{}\"]\n[service.breaker]\nfailure_ratio = {ratio}\nmin_requests = 3\n\
             [[service]]\nname = \"pool\"\nendpoints = [{}]\n[service.breaker]\npreset = \"nginx\"\n\
             [[service]]\nname = \"api\"\nendpoints = [\"{}\"]\n",
            tripped.addr,
            other.addr,
            endpoints.join(", "),
            api.addr
        )
    };
    let mut agent = Agent::start_with_config(Some(&config("0.5")));
    let path = agent.config_path().expect("config file").to_owned();
    ok(agent.cli(&["trip", "tripped", "--reason", "held"]));
    assert!(refused(&agent, tripped.addr));

    // Two whole policies of `api` (which the config gives none): every round's policy set goes
    // from one to the other.
    let policy_a = [
        "--consecutive-failures",
        "4",
        "--open-timeout",
        "7s",
        "--half-open-max",
        "2",
    ];
    let policy_b = [
        "--consecutive-failures",
        "9",
        "--open-timeout",
        "13s",
        "--half-open-max",
        "5",
    ];
    let policy_of = |agent: &Agent| {
        let b = breaker(agent, "api");
        (
            b["policy"]["consecutive_failures"].clone(),
            b["policy"]["open_timeout_ms"].clone(),
            b["policy"]["half_open_max"].clone(),
        )
    };
    let set = |agent: &Agent, args: &[&str]| {
        let mut all = vec!["policy", "set", "api"];
        all.extend(args);
        ok(agent.cli(&all));
        policy_of(agent)
    };
    let whole_b = set(&agent, &policy_b);
    let whole_a = set(&agent, &policy_a);
    assert_ne!(whole_a, whole_b);

    for round in 0..8u64 {
        // The change, in a process of its own, and the kill a little later each round.
        let delay = Duration::from_micros(round * 2_500);
        let victim = backends[round as usize % backends.len()].addr.to_string();
        let (args, expect_policy): (Vec<String>, bool) = match round % 4 {
            0 => {
                let mut a = vec!["policy", "set", "api"];
                a.extend(if round % 8 == 0 { &policy_b } else { &policy_a });
                (a.into_iter().map(String::from).collect(), true)
            }
            1 => {
                std::fs::write(&path, config(if round % 8 == 1 { "0.7" } else { "0.5" })).unwrap();
                (vec!["reload".into()], false)
            }
            2 => (
                vec!["trip".into(), "other".into(), "--for".into(), "1h".into()],
                false,
            ),
            _ => (
                vec![
                    "trip".into(),
                    "pool".into(),
                    "--destination".into(),
                    victim.clone(),
                ],
                false,
            ),
        };
        let mut change = Command::new(agent_bin())
            .args(["--agent", &agent.address()])
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run the change");
        thread::sleep(delay);
        agent.kill();
        let _ = change.wait();
        assert!(
            refused(&agent, tripped.addr),
            "round {round} ({args:?}): the trip does not hold while the agent is dead"
        );
        agent.spawn();
        assert!(
            refused(&agent, tripped.addr),
            "round {round} ({args:?}): the trip does not hold after the restart"
        );
        let b = breaker(&agent, "tripped");
        assert_eq!(
            (
                b["state"].as_str(),
                b["forced"].as_bool(),
                b["reason"].as_str()
            ),
            (Some("open"), Some(true), Some("held")),
            "round {round}"
        );
        if expect_policy {
            let p = policy_of(&agent);
            assert!(
                p == whole_a || p == whole_b,
                "round {round}: policy of `api` is {p:?}, neither {whole_a:?} nor {whole_b:?}"
            );
        }
        // Whatever the killed change did, each breaker answers and the rest is consistent:
        // a forced trip of `other` refuses, a destination trip refuses only that destination.
        let o = breaker(&agent, "other");
        if o["forced"] == true {
            assert!(refused(&agent, other.addr), "round {round}: {o}");
            ok(agent.cli(&["reset", "other"]));
        }
        assert!(
            !refused(&agent, other.addr),
            "round {round}: `other` refuses after its reset"
        );
        let pool = breaker(&agent, "pool");
        let ejected: Vec<String> = pool["destinations"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| d["state"] == "open")
            .map(|d| d["destination"].as_str().unwrap_or_default().to_owned())
            .collect();
        for b in &backends {
            let is_ejected = ejected.contains(&b.addr.to_string());
            assert_eq!(
                refused(&agent, b.addr),
                is_ejected,
                "round {round}: {} (ejected: {ejected:?})",
                b.addr
            );
        }
        for d in ejected {
            ok(agent.cli(&["reset", "pool", "--destination", &d]));
        }
    }
}

/// The pin directory removed by hand while the agent runs: the gate keeps refusing (the agent
/// holds it), the agent pins everything again, and so a SIGKILL and a restart later the trip
/// still holds.
#[test]
fn pins_removed_by_hand_are_pinned_again_and_outlive_the_agent() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let up = Server::start("127.0.0.1:0");
    let mut agent = Agent::start_with_config(Some(&format!(
        "[[service]]\nname = \"svc\"\nendpoints = [\"{}\"]\n[service.breaker]\npreset = \"nginx\"\n",
        up.addr
    )));
    ok(agent.cli(&["trip", "svc", "--reason", "pinned"]));
    assert!(refused(&agent, up.addr));
    let before = pins(agent.pin_dir());
    assert!(
        before.contains("BW_BREAKERS") && before.iter().any(|p| p.starts_with("link-")),
        "{before:?}"
    );

    std::fs::remove_dir_all(agent.pin_dir()).expect("remove the pin directory");
    assert!(refused(&agent, up.addr), "the gate went with its pins");
    let again = eventually(SETTLE, || {
        let now = pins(agent.pin_dir());
        (now == before).then_some(now)
    });
    assert!(
        again.is_some(),
        "pinned again: {:?}, before: {before:?}\n{}",
        pins(agent.pin_dir()),
        agent.log()
    );
    assert!(agent.log().contains("pinned again"), "{}", agent.log());

    // Files removed one by one, too.
    for name in ["BW_POLICIES", "BW_LAYOUT"] {
        std::fs::remove_file(agent.pin_dir().join(name)).unwrap();
    }
    let again = eventually(SETTLE, || (pins(agent.pin_dir()) == before).then_some(()));
    assert!(again.is_some(), "{:?}", pins(agent.pin_dir()));

    agent.kill();
    assert!(
        refused(&agent, up.addr),
        "the pinned gate ends with the agent"
    );
    agent.spawn();
    let b = breaker(&agent, "svc");
    assert_eq!(
        (
            b["state"].as_str(),
            b["forced"].as_bool(),
            b["reason"].as_str()
        ),
        (Some("open"), Some(true), Some("pinned"))
    );
    assert!(refused(&agent, up.addr));
}

/// Maps at their smallest sizes: what does not fit is counted and reported, and no connect is
/// refused but by a breaker that decided to.
#[test]
fn tiny_maps_count_what_they_drop_and_refuse_nothing_wrongly() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let servers: Vec<Server> = (1..=40)
        .map(|i| Server::start(&format!("127.0.1.{i}:0")))
        .collect();
    let all: Vec<String> = servers.iter().map(|s| format!("\"{}\"", s.addr)).collect();
    let agent = Agent::start_with_config(Some(&format!(
        "[maps]\nmax_destinations = 16\nmax_connections = 16\nmax_histogram_buckets = 16\n\
         max_destination_breakers = 16\n\
         [[service]]\nname = \"wide\"\nendpoints = [{}]\n[service.breaker]\npreset = \"nginx\"\n\
         max_ejection_percent = 100\n",
        all.join(", ")
    )));
    // Three rounds over 40 destinations, each connection held while the next ones open (more
    // than max_connections at once): every connect succeeds.
    for round in 0..3 {
        let mut held = Vec::new();
        for s in &servers {
            match connect_from_cgroup(agent.scope(), s.addr) {
                Ok(()) => {}
                Err(e) => panic!("round {round}: {} refused: {e}", s.addr),
            }
            held.push(std::net::TcpStream::connect(s.addr).expect("connect outside the scope"));
        }
    }
    let info = agent.cli_json(&["info"]);
    let map = |name: &str| {
        info["maps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} in {info}"))
    };
    let counter = |name: &str| agent.counter(name);
    // 40 destinations through a 16-entry LRU: evictions, reported.
    let dests = map("BW_DESTS");
    assert_eq!(dests["capacity"], 16, "{dests}");
    assert!(dests["evictions"].as_u64().unwrap() > 0, "{dests}");
    // 40 connections held at once (80 ends) through 16 entries: the rest counted as untracked.
    assert!(
        counter("conns_full") > 0,
        "conns_full {}",
        counter("conns_full")
    );
    // 40 destinations, 16 destination breakers: the rest pass uncounted, and are counted.
    let wide = breaker(&agent, "wide");
    assert!(
        wide["destinations_untracked"].as_u64().unwrap_or(0) > 0,
        "{wide}"
    );
    assert_eq!(wide["state"], "closed", "{wide}");
}

/// Without cgroup v2 the agent cannot enforce: it says so, exits 1, and leaves nothing.
#[test]
fn without_cgroup2_the_agent_says_so_and_exits_1() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let pin_dir = breakwater_tests::cgroup::pin_dir();
    // In a mount namespace of its own where no cgroup2 is mounted.
    let unmount: Vec<String> = std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .filter(|l| l.split_whitespace().nth(2) == Some("cgroup2"))
        .filter_map(|l| l.split_whitespace().nth(1).map(String::from))
        .collect();
    assert!(!unmount.is_empty(), "no cgroup2 mounted here to hide");
    let script = format!(
        // A scope that does not exist either: should cgroup2 be found after all, nothing is
        // attached anywhere.
        "{} && exec \"$0\" agent --socket \"$1\" --pin-dir \"$2\" --scope /breakwater-none",
        unmount
            .iter()
            .map(|m| format!("umount -l {m}"))
            .collect::<Vec<_>>()
            .join(" && ")
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .arg(agent_bin())
        .arg(&socket)
        .arg(&pin_dir)
        .output()
        .expect("run unshare");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cgroup2") || stderr.contains("cgroup v2"),
        "{stderr}"
    );
    assert!(!socket.exists(), "the socket was left behind");
    breakwater_tests::cgroup::remove_pin_dir(&pin_dir);
}
