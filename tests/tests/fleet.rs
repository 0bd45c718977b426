//! The fleet through a real etcd (Debian's, started by the harness on loopback): agents on this
//! machine act as nodes, each with its own socket, pin directory and scope cgroup. Desired state
//! is written with `breakwater fleet` (the real CLI) or, for what the CLI refuses to write,
//! straight into etcd; the ground truth is each node's API, the errno a client in each node's
//! cgroup gets, and etcd's own keys.

use std::{
    io::ErrorKind,
    net::{SocketAddr, TcpListener},
    process::{Command, Output},
    time::{Duration, Instant},
};

use breakwater_tests::{
    agent_bin,
    cgroup::connect_from_cgroup,
    etcd::{self, Etcd},
    eventually, require_root, serial, Agent, Server,
};

const PREFIX: &str = "/breakwater/v1";

fn node(etcd: &Etcd, name: &str) -> Agent {
    node_with(etcd, name, &[])
}

fn node_with(etcd: &Etcd, name: &str, extra: &[&str]) -> Agent {
    let url = etcd.url();
    let mut args = vec!["--etcd", url.as_str(), "--node-name", name];
    args.extend(extra);
    Agent::start_with(None, &args)
}

/// `breakwater fleet --etcd URL ARGS...`.
fn fleet(etcd: &Etcd, args: &[&str]) -> Output {
    Command::new(agent_bin())
        .arg("fleet")
        .arg("--etcd")
        .arg(etcd.url())
        .args(args)
        .output()
        .expect("run breakwater fleet")
}

fn fleet_ok(etcd: &Etcd, args: &[&str]) -> String {
    let out = fleet(etcd, args);
    assert!(
        out.status.success(),
        "breakwater fleet {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A port nothing listens on.
fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn breaker(agent: &Agent, service: &str) -> Option<serde_json::Value> {
    let v = agent.cli_json(&["breakers"]);
    v["breakers"]
        .as_array()?
        .iter()
        .find(|b| b["service"] == service)
        .cloned()
}

fn service(agent: &Agent, name: &str) -> Option<serde_json::Value> {
    let v = agent.cli_json(&["services"]);
    v["services"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == name)
        .cloned()
}

fn wait<T>(what: &str, agent: &Agent, f: impl FnMut() -> Option<T>) -> T {
    eventually(Duration::from_secs(15), f)
        .unwrap_or_else(|| panic!("{what}: not within 15 s\nagent log:\n{}", agent.log()))
}

fn fleet_link(agent: &Agent) -> serde_json::Value {
    agent.cli_json(&["info"])["fleet"].clone()
}

#[test]
fn services_policies_and_trips_reach_every_node_and_a_late_one() {
    let _serial = serial();
    if !require_root() || !etcd::available() {
        return;
    }
    let etcd = Etcd::start();
    let mut nodes: Vec<Agent> = ["n1", "n2", "n3"].iter().map(|n| node(&etcd, n)).collect();
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap();
    let endpoint = addr.to_string();

    fleet_ok(&etcd, &["service", "put", "db", "--endpoint", &endpoint]);
    fleet_ok(
        &etcd,
        &[
            "policy",
            "set",
            "db",
            "--consecutive-failures",
            "5",
            "--errno",
            "EHOSTUNREACH",
        ],
    );
    for n in &nodes {
        let b = wait("the fleet's policy", n, || {
            breaker(n, "db").filter(|b| b["policy_owner"] == "fleet")
        });
        assert_eq!(b["state"], "closed");
        let s = service(n, "db").unwrap();
        assert_eq!(s["owner"], "fleet");
        assert_eq!(s["endpoints"][0], endpoint.as_str());
    }
    // Every node registered itself, on its lease.
    let registered = etcd.get_prefix(&format!("{PREFIX}/nodes/"));
    let names: Vec<&str> = registered
        .iter()
        .map(|(k, _)| k.rsplit('/').next().unwrap())
        .collect();
    assert_eq!(names, ["n1", "n2", "n3"]);

    // The local API may not change what the fleet owns: exit 2, saying who owns it.
    let out = nodes[0].cli(&["service", "put", "db", "--endpoint", "127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("owned by the fleet"), "{err}");
    assert_eq!(
        service(&nodes[0], "db").unwrap()["endpoints"][0],
        endpoint.as_str()
    );

    // A trip for 30 s: every node refuses connects with the policy's errno, and says why.
    let tripped = Instant::now();
    fleet_ok(
        &etcd,
        &["trip", "db", "--for", "30s", "--reason", "bad deploy"],
    );
    for n in &nodes {
        let b = wait("the fleet's trip", n, || {
            breaker(n, "db").filter(|b| b["forced"] == true)
        });
        assert_eq!(b["state"], "open");
        assert_eq!(b["tripped_by"], "fleet");
        assert_eq!(b["reason"], "bad deploy");
        let left = b["open_remaining_ms"].as_u64().unwrap();
        assert!(left > 25_000 && left <= 30_000, "{left} ms left");
        let scope = n.scope().to_owned();
        let e = connect_from_cgroup(&scope, addr).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EHOSTUNREACH), "{e}");
    }
    // Each node published its breaker's new state.
    for name in ["n1", "n2", "n3"] {
        let key = format!("{PREFIX}/breakers/{name}/db");
        let record = eventually(Duration::from_secs(5), || {
            etcd.get(&key).filter(|v| v.contains("\"forced\":true"))
        })
        .unwrap_or_else(|| panic!("{key}: {:?}", etcd.get(&key)));
        assert!(record.contains("\"tripped_by\":\"fleet\""), "{record}");
    }

    // A node that joins later gets the trip with what is left of it, by etcd's lease.
    std::thread::sleep(Duration::from_secs(3));
    let late = node(&etcd, "n4");
    let b = wait("the trip on a late node", &late, || {
        breaker(&late, "db").filter(|b| b["forced"] == true)
    });
    let left = b["open_remaining_ms"].as_u64().unwrap();
    let elapsed = tripped.elapsed().as_millis() as u64;
    assert!(
        left <= 30_000 - elapsed + 1_000 && left + elapsed >= 27_000,
        "{left} ms left after {elapsed} ms"
    );
    nodes.push(late);

    // Reset: every node closes, and connects pass again.
    fleet_ok(&etcd, &["reset", "db"]);
    for n in &nodes {
        wait("the reset", n, || {
            breaker(n, "db").filter(|b| b["state"] == "closed" && b["forced"] == false)
        });
        connect_from_cgroup(n.scope(), addr).expect("connect after the reset");
    }

    // The fleet deletes the service: it is gone from every node.
    fleet_ok(&etcd, &["service", "delete", "db"]);
    for n in &nodes {
        wait("the delete", n, || service(n, "db").is_none().then_some(()));
    }
    drop(server);
}

#[test]
fn fleet_objects_shadow_local_ones_and_give_them_back() {
    let _serial = serial();
    if !require_root() || !etcd::available() {
        return;
    }
    let etcd = Etcd::start();
    let url = etcd.url();
    let config = format!(
        "[fleet]\netcd = [\"{url}\"]\nnode_name = \"n1\"\n\n[[service]]\nname = \"db\"\nendpoints = [\"127.0.0.1:7001\"]\n"
    );
    let n1 = Agent::start_with_config(Some(&config));
    assert_eq!(service(&n1, "db").unwrap()["owner"], "config");

    fleet_ok(
        &etcd,
        &["service", "put", "db", "--endpoint", "127.0.0.1:7002"],
    );
    let s = wait("the fleet's service", &n1, || {
        service(&n1, "db").filter(|s| s["owner"] == "fleet")
    });
    assert_eq!(s["shadowed"], "config");
    assert_eq!(s["endpoints"][0], "127.0.0.1:7002");
    let table = String::from_utf8_lossy(&n1.cli(&["services"]).stdout).into_owned();
    assert!(table.contains("fleet (shadows config)"), "{table}");

    fleet_ok(&etcd, &["service", "delete", "db"]);
    let s = wait("the config's service back", &n1, || {
        service(&n1, "db").filter(|s| s["owner"] == "config")
    });
    assert_eq!(s["endpoints"][0], "127.0.0.1:7001");
    assert_eq!(s["shadowed"], "unspecified");
}

#[test]
fn nodes_keep_enforcing_without_etcd_and_resync_when_it_is_back() {
    let _serial = serial();
    if !require_root() || !etcd::available() {
        return;
    }
    let mut etcd = Etcd::start();
    let mut n1 = node(&etcd, "n1");
    let addr = closed_port();
    let endpoint = addr.to_string();
    fleet_ok(&etcd, &["service", "put", "db", "--endpoint", &endpoint]);
    fleet_ok(
        &etcd,
        &[
            "policy",
            "set",
            "db",
            "--consecutive-failures",
            "5",
            "--errno",
            "EPERM",
        ],
    );
    fleet_ok(&etcd, &["trip", "db", "--reason", "incident"]);
    wait("the trip", &n1, || {
        breaker(&n1, "db").filter(|b| b["forced"] == true)
    });
    assert_eq!(fleet_link(&n1)["connected"], true);

    // etcd dies: the link is reported down, and the trip holds.
    etcd.kill();
    let link = wait("the link down", &n1, || {
        Some(fleet_link(&n1)).filter(|l| l["connected"] == false)
    });
    assert!(!link["last_error"].as_str().unwrap().is_empty(), "{link}");
    let e = connect_from_cgroup(n1.scope(), addr).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    let metrics = String::from_utf8_lossy(&n1.cli(&["info"]).stdout).into_owned();
    assert!(metrics.contains("DOWN since"), "{metrics}");

    // The agent is SIGKILLed and restarted while etcd is still down: it starts from what it
    // pinned, and still refuses.
    n1.kill();
    n1.spawn();
    let b = breaker(&n1, "db").expect("the pinned breaker");
    assert_eq!(
        (b["state"].as_str(), b["forced"].as_bool()),
        (Some("open"), Some(true))
    );
    // Who owns what is kept in the kernel too: still the fleet's, still refused locally.
    assert_eq!(
        (b["policy_owner"].as_str(), b["tripped_by"].as_str()),
        (Some("fleet"), Some("fleet"))
    );
    assert_eq!(service(&n1, "db").unwrap()["owner"], "fleet");
    let out = n1.cli(&["service", "delete", "db"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e = connect_from_cgroup(n1.scope(), addr).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");

    // etcd is back: the node resyncs (the fleet owns the service again) and follows changes.
    etcd.restart();
    wait("the link up", &n1, || {
        Some(fleet_link(&n1)).filter(|l| l["connected"] == true)
    });
    wait("the fleet's service again", &n1, || {
        service(&n1, "db").filter(|s| s["owner"] == "fleet")
    });
    fleet_ok(&etcd, &["reset", "db"]);
    wait("the reset after the resync", &n1, || {
        breaker(&n1, "db").filter(|b| b["forced"] == false)
    });
    let e = connect_from_cgroup(n1.scope(), addr).unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::ConnectionRefused,
        "the port's own refusal: {e}"
    );
    // What the fleet deletes while a node is down is gone from it when it is back.
    n1.kill();
    fleet_ok(&etcd, &["service", "delete", "db"]);
    n1.spawn();
    wait("the delete made while the node was down", &n1, || {
        service(&n1, "db").is_none().then_some(())
    });
}

#[test]
fn invalid_records_are_counted_and_never_applied() {
    let _serial = serial();
    if !require_root() || !etcd::available() {
        return;
    }
    let etcd = Etcd::start();
    let n1 = node(&etcd, "n1");
    // What the CLI refuses to write, written by something else.
    etcd.put(
        &format!("{PREFIX}/services/db"),
        r#"{"endpoints":["127.0.0.1"]}"#,
    );
    etcd.put(&format!("{PREFIX}/policies/db"), "not json");
    let link = wait("the invalid records counted", &n1, || {
        Some(fleet_link(&n1)).filter(|l| l["invalid_records"] == 2)
    });
    assert_eq!(link["connected"], true);
    assert!(service(&n1, "db").is_none());
    assert!(n1.log().contains("invalid record ignored"), "{}", n1.log());

    // A valid record after it is applied: the agent kept going.
    etcd.put(
        &format!("{PREFIX}/services/db"),
        r#"{"endpoints":["127.0.0.1:7003"]}"#,
    );
    wait("the valid record", &n1, || service(&n1, "db"));
    let metrics = n1.cli(&["info"]);
    assert!(metrics.status.success());
}

#[test]
fn a_fleet_quorum_opens_the_service_on_every_node() {
    let _serial = serial();
    if !require_root() || !etcd::available() {
        return;
    }
    let etcd = Etcd::start();
    let nodes: Vec<Agent> = ["n1", "n2", "n3"].iter().map(|n| node(&etcd, n)).collect();
    let addr = closed_port();
    let endpoint = addr.to_string();
    fleet_ok(&etcd, &["service", "put", "db", "--endpoint", &endpoint]);
    fleet_ok(
        &etcd,
        &[
            "policy",
            "set",
            "db",
            "--consecutive-failures",
            "1",
            "--open-timeout",
            "30s",
            "--errno",
            "EHOSTUNREACH",
            "--fleet-quorum",
            "2",
        ],
    );
    for n in &nodes {
        let b = wait("the quorum policy", n, || {
            breaker(n, "db").filter(|b| b["policy_owner"] == "fleet")
        });
        assert_eq!(b["policy"]["fleet_quorum"], "2");
        assert_eq!(b["policy"]["fleet_quorum_window_ms"], 60_000);
    }
    // One node's failure trips its own breaker only: no quorum yet.
    let e = connect_from_cgroup(nodes[0].scope(), addr).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
    wait("n1's own trip", &nodes[0], || {
        breaker(&nodes[0], "db").filter(|b| b["state"] == "open")
    });
    eventually(Duration::from_secs(5), || {
        etcd.get(&format!("{PREFIX}/autotrips/db/n1"))
    })
    .expect("n1's trip in etcd");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(breaker(&nodes[2], "db").unwrap()["state"], "closed");

    // A second node's: the quorum (2 of 3) opens it on the third, which saw no failure.
    let e = connect_from_cgroup(nodes[1].scope(), addr).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
    let b = wait("the quorum trip", &nodes[2], || {
        breaker(&nodes[2], "db").filter(|b| b["forced"] == true)
    });
    assert_eq!(b["reason"], "fleet quorum: 2 of 3 nodes");
    assert_eq!(b["tripped_by"], "fleet");
    assert!(b["open_remaining_ms"].as_u64().unwrap() > 25_000, "{b}");
    let e = connect_from_cgroup(nodes[2].scope(), addr).unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(libc::EHOSTUNREACH),
        "refused by the breaker: {e}"
    );
}

#[test]
fn quorum_rules_and_fleet_flags_are_refused_without_a_fleet() {
    let _serial = serial();
    if !require_root() {
        return;
    }
    let agent = Agent::start();
    let out = agent.cli(&["service", "put", "db", "--endpoint", "127.0.0.1:7004"]);
    assert!(out.status.success());
    let out = agent.cli(&[
        "policy",
        "set",
        "db",
        "--consecutive-failures",
        "1",
        "--fleet-quorum",
        "2",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("fleet_quorum needs an agent in a fleet"),
        "{err}"
    );
    assert!(breaker(&agent, "db").is_none(), "nothing was set");
    assert!(agent
        .cli_json(&["info"])
        .get("fleet")
        .is_none_or(|f| f.is_null()));
}

#[test]
fn agents_reach_etcd_over_mutual_tls() {
    let _serial = serial();
    if !require_root() || !etcd::available() {
        return;
    }
    let etcd = Etcd::start_tls();
    let (ca, cert, key) = (
        etcd.ca_path().display().to_string(),
        etcd.client_cert_path().display().to_string(),
        etcd.client_key_path().display().to_string(),
    );
    let n1 = node_with(
        &etcd,
        "n1",
        &["--etcd-ca", &ca, "--etcd-cert", &cert, "--etcd-key", &key],
    );
    let tls = ["--etcd-ca", &ca, "--etcd-cert", &cert, "--etcd-key", &key];
    let mut args: Vec<&str> = tls.to_vec();
    args.extend(["service", "put", "db", "--endpoint", "127.0.0.1:7005"]);
    fleet_ok(&etcd, &args);
    wait("the service over TLS", &n1, || {
        service(&n1, "db").filter(|s| s["owner"] == "fleet")
    });
    assert_eq!(fleet_link(&n1)["connected"], true);

    // Without a client certificate the agent does not get in, and says so.
    let n2 = node_with(&etcd, "n2", &["--etcd-ca", &ca]);
    let link = wait("n2 refused", &n2, || {
        Some(fleet_link(&n2)).filter(|l| !l["last_error"].as_str().unwrap_or("").is_empty())
    });
    assert_eq!(link["connected"], false, "{link}");
    assert!(service(&n2, "db").is_none());
}

#[test]
fn a_fleet_trip_with_a_ttl_ends_on_time_while_etcd_is_down() {
    let _serial = serial();
    if !require_root() || !etcd::available() {
        return;
    }
    let mut etcd = Etcd::start();
    let n1 = node(&etcd, "n1");
    let addr = closed_port();
    let endpoint = addr.to_string();
    fleet_ok(&etcd, &["service", "put", "db", "--endpoint", &endpoint]);
    fleet_ok(
        &etcd,
        &[
            "policy",
            "set",
            "db",
            "--consecutive-failures",
            "5",
            "--errno",
            "EPERM",
        ],
    );
    wait("the policy", &n1, || {
        breaker(&n1, "db").filter(|b| b["policy_owner"] == "fleet")
    });
    let tripped = Instant::now();
    fleet_ok(&etcd, &["trip", "db", "--for", "3s"]);
    wait("the trip", &n1, || {
        breaker(&n1, "db").filter(|b| b["forced"] == true)
    });
    etcd.kill();
    let e = connect_from_cgroup(n1.scope(), addr).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "tripped: {e}");
    // The deadline is in the kernel: the trip ends on time with no etcd to delete its key.
    std::thread::sleep(Duration::from_millis(4_000).saturating_sub(tripped.elapsed()));
    let e = connect_from_cgroup(n1.scope(), addr).unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::ConnectionRefused,
        "after the TTL, the port's own refusal: {e}"
    );
    assert_eq!(fleet_link(&n1)["connected"], false);
}

#[test]
fn the_fleet_ejects_one_destination_on_every_node() {
    let _serial = serial();
    if !require_root() || !etcd::available() {
        return;
    }
    let etcd = Etcd::start();
    let nodes: Vec<Agent> = ["n1", "n2"].iter().map(|n| node(&etcd, n)).collect();
    let (a, b) = (
        TcpListener::bind("127.0.0.1:0").unwrap(),
        TcpListener::bind("127.0.0.1:0").unwrap(),
    );
    let (a, b) = (a.local_addr().unwrap(), b.local_addr().unwrap());
    fleet_ok(
        &etcd,
        &[
            "service",
            "put",
            "pool",
            "--endpoint",
            &a.to_string(),
            "--endpoint",
            &b.to_string(),
        ],
    );
    fleet_ok(
        &etcd,
        &[
            "policy",
            "set",
            "pool",
            "--granularity",
            "destination",
            "--errno",
            "EHOSTUNREACH",
        ],
    );
    for n in &nodes {
        wait("the fleet's per-destination policy", n, || {
            breaker(n, "pool")
                .filter(|b| b["policy"]["granularity"] == "destination")
                .map(drop)
        });
    }
    // One destination ejected on every node: the other keeps serving.
    fleet_ok(
        &etcd,
        &[
            "trip",
            "pool",
            "--destination",
            &a.to_string(),
            "--reason",
            "drain a",
        ],
    );
    assert!(etcd.get(&format!("{PREFIX}/trips/pool/{a}")).is_some());
    for n in &nodes {
        let d = wait("the fleet's destination trip", n, || {
            breaker(n, "pool")?["destinations"]
                .as_array()?
                .iter()
                .find(|d| d["destination"] == a.to_string() && d["forced"] == true)
                .cloned()
        });
        assert_eq!(d["tripped_by"], "fleet");
        assert_eq!(d["reason"], "drain a");
        let e = connect_from_cgroup(n.scope(), a).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EHOSTUNREACH), "{e}");
        connect_from_cgroup(n.scope(), b).expect("the other destination serves");
        assert_eq!(breaker(n, "pool").unwrap()["state"], "closed");
    }
    // A CIDR is no destination: refused before etcd is written.
    let out = fleet(&etcd, &["trip", "pool", "--destination", "127.0.0.0/8:80"]);
    assert_eq!(out.status.code(), Some(2));
    fleet_ok(&etcd, &["reset", "pool", "--destination", &a.to_string()]);
    for n in &nodes {
        wait("the destination's reset", n, || {
            connect_from_cgroup(n.scope(), a).ok()
        });
    }
}

/// etcd loses its data (restarted empty, its revisions starting over): every node publishes
/// itself and its breakers again, follows the fleet as etcd now holds it (nothing: the fleet's
/// objects go, the node's own stay), and takes new fleet changes, although their revisions are
/// lower than any it saw before.
#[test]
fn etcd_restarted_without_its_data_is_filled_again_and_followed() {
    let _serial = serial();
    if !require_root() || !etcd::available() {
        return;
    }
    let mut etcd = Etcd::start();
    let n1 = node(&etcd, "n1");
    // Listening: a connect that is refused was refused by a breaker.
    let fleet_up = Server::start("127.0.0.1:0");
    let local_up = Server::start("127.0.0.1:0");
    let (fleet_addr, local_addr) = (fleet_up.addr, local_up.addr);
    fleet_ok(
        &etcd,
        &[
            "service",
            "put",
            "db",
            "--endpoint",
            &fleet_addr.to_string(),
        ],
    );
    fleet_ok(&etcd, &["policy", "set", "db", "--preset", "nginx"]);
    fleet_ok(&etcd, &["trip", "db", "--reason", "incident"]);
    let out = n1.cli(&[
        "service",
        "put",
        "cache",
        "--endpoint",
        &local_addr.to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for args in [
        &["policy", "set", "cache", "--preset", "nginx"][..],
        &["trip", "cache"],
    ] {
        let out = n1.cli(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    wait("the fleet's trip", &n1, || {
        breaker(&n1, "db").filter(|b| b["forced"] == true)
    });
    let node_key = format!("{PREFIX}/nodes/n1");
    let breaker_key = format!("{PREFIX}/breakers/n1/cache");
    wait("the node's records", &n1, || {
        (etcd.get(&node_key).is_some() && etcd.get(&breaker_key).is_some()).then_some(())
    });
    // Enough writes that the empty etcd's revisions stay below what the node saw.
    for i in 0..20 {
        etcd.put(&format!("/unrelated/{i}"), "x");
    }

    etcd.restart_empty();
    assert_eq!(etcd.get(&node_key), None, "etcd kept its data");
    // The node publishes itself and its breakers again.
    wait("the node's records again", &n1, || {
        (etcd.get(&node_key).is_some() && etcd.get(&breaker_key).is_some()).then_some(())
    });
    // It follows etcd: the fleet's service is gone; its own service and trip are kept.
    wait("the fleet's service gone", &n1, || {
        service(&n1, "db").is_none().then_some(())
    });
    connect_from_cgroup(n1.scope(), fleet_addr).expect("no breaker of the fleet's left");
    let b = breaker(&n1, "cache").expect("the node's own breaker");
    assert_eq!(
        (b["state"].as_str(), b["forced"].as_bool()),
        (Some("open"), Some(true))
    );
    assert_eq!(
        connect_from_cgroup(n1.scope(), local_addr)
            .unwrap_err()
            .kind(),
        ErrorKind::ConnectionRefused,
        "the node's own trip still refuses"
    );
    // New fleet changes, at revisions lower than before the loss, are applied.
    fleet_ok(
        &etcd,
        &[
            "service",
            "put",
            "db",
            "--endpoint",
            &fleet_addr.to_string(),
        ],
    );
    fleet_ok(&etcd, &["policy", "set", "db", "--preset", "nginx"]);
    fleet_ok(&etcd, &["trip", "db", "--reason", "after the loss"]);
    let b = wait("a fleet trip after the loss", &n1, || {
        breaker(&n1, "db").filter(|b| b["forced"] == true)
    });
    assert_eq!(b["reason"], "after the loss");
    assert_eq!(fleet_link(&n1)["connected"], true);
}

/// Writes `from` over `to` as kubelet updates a secret volume: beside it, then renamed.
fn replace_file(from: &std::path::Path, to: &std::path::Path) {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

#[test]
fn the_etcd_client_certificates_rotate_without_a_restart() {
    let _serial = serial();
    if !require_root() || !etcd::available() {
        return;
    }
    let mut etcd = Etcd::start_tls();
    // The agent's copies of the files, which the test replaces.
    let live = tempfile::tempdir().unwrap();
    let (ca, cert, key) = (
        live.path().join("ca.crt"),
        live.path().join("tls.crt"),
        live.path().join("tls.key"),
    );
    let install = |etcd: &Etcd| {
        replace_file(etcd.ca_path(), &ca);
        replace_file(etcd.client_cert_path(), &cert);
        replace_file(etcd.client_key_path(), &key);
    };
    install(&etcd);
    let shown = |p: &std::path::Path| p.display().to_string();
    let (ca_s, cert_s, key_s) = (shown(&ca), shown(&cert), shown(&key));
    let n1 = node_with(
        &etcd,
        "n1",
        &[
            "--etcd-ca",
            &ca_s,
            "--etcd-cert",
            &cert_s,
            "--etcd-key",
            &key_s,
        ],
    );
    let put = |etcd: &Etcd, name: &str, port: u16| {
        let (ca, cert, key) = (
            shown(etcd.ca_path()),
            shown(etcd.client_cert_path()),
            shown(etcd.client_key_path()),
        );
        let endpoint = format!("127.0.0.1:{port}");
        fleet_ok(
            etcd,
            &[
                "--etcd-ca",
                &ca,
                "--etcd-cert",
                &cert,
                "--etcd-key",
                &key,
                "service",
                "put",
                name,
                "--endpoint",
                &endpoint,
            ],
        );
    };
    put(&etcd, "db1", 7101);
    wait("db1", &n1, || service(&n1, "db1"));

    // A new client certificate of the same CA: the agent reconnects with it, the link stays up.
    let (cert2, key2) = etcd.issue_client_cert("client-2");
    replace_file(&key2, &key);
    replace_file(&cert2, &cert);
    wait("the reconnection", &n1, || {
        n1.log()
            .contains("etcd client's TLS files changed: reconnected with them")
            .then_some(())
    });
    assert!(n1.log().contains("CN=client-2"), "{}", n1.log());
    assert_eq!(fleet_link(&n1)["connected"], true);
    put(&etcd, "db2", 7102);
    wait("db2", &n1, || service(&n1, "db2"));

    // A key that is not PEM: not used, a warning, the link stays up.
    std::fs::write(&key, "not a key\n").unwrap();
    wait("the warning", &n1, || {
        n1.log().contains("holds no PEM private key").then_some(())
    });
    assert_eq!(fleet_link(&n1)["connected"], true);
    replace_file(&key2, &key);

    // etcd moves to a new CA: the agent's link goes down with the old files and comes back
    // once the new ones are in place, without a restart or a reload.
    etcd.rotate_tls();
    wait("the link down", &n1, || {
        Some(fleet_link(&n1)).filter(|l| l["connected"] == false)
    });
    install(&etcd);
    // The next attempt may be up to 10 s away (the backoff).
    let up = eventually(Duration::from_secs(30), || {
        Some(fleet_link(&n1)).filter(|l| l["connected"] == true)
    });
    assert!(up.is_some(), "link not up again:\n{}", n1.log());
    put(&etcd, "db3", 7103);
    wait("db3", &n1, || service(&n1, "db3"));
    assert!(service(&n1, "db1").is_some());
}
