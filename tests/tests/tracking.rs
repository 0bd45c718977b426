//! Connection tracking against ground truth: `ss`, the client's own errno values, and what the
//! test itself did. Runs the real agent and the real eBPF programs in the real kernel.

use std::{
    io::ErrorKind,
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use breakwater_tests::{
    closed_port, connect_many, eventually, field, full_queue, netns::NetNs, one_syn_retry_socket,
    require_root, serial, ss_established_to, Agent, Server,
};

const SETTLE: Duration = Duration::from_secs(10);

/// Waits until the destination's counters satisfy `pred`; panics with the last value if not.
fn wait_for(
    agent: &Agent,
    addr: &str,
    port: u16,
    dir: &str,
    netns: Option<u32>,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut last = None;
    eventually(SETTLE, || {
        let d = agent.destination(addr, port, dir, netns);
        last = d.clone();
        d.filter(|d| pred(d))
    })
    .unwrap_or_else(|| {
        let all = agent.cli_json(&["destinations"]);
        let same_port: Vec<_> = all["destinations"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| d["port"] == port)
            .collect();
        panic!(
            "{what}: destination {addr}:{port} {dir} is {last:?}\nall rows on that port: {same_port:?}\nagent: {:?}",
            agent.info()
        )
    })
}

#[test]
fn two_hundred_connections_match_ss_then_close() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let agent = Agent::start();
    let server = Server::start("127.0.0.1:0");
    let port = server.addr.port();
    let clients = connect_many(server.addr, 200);

    assert_eq!(ss_established_to(server.addr, None), 200, "ss ground truth");
    let d = wait_for(
        &agent,
        "127.0.0.1",
        port,
        "outbound",
        None,
        "200 open",
        |d| field(d, "active") == 200,
    );
    assert_eq!(field(&d, "opened"), 200);
    assert_eq!(field(&d, "closed"), 0);
    assert_eq!(d["service"], "");
    let inbound = wait_for(
        &agent,
        "127.0.0.1",
        port,
        "inbound",
        None,
        "200 accepted",
        |d| field(d, "active") == 200,
    );
    assert_eq!(field(&inbound, "opened"), 200);

    drop(clients);
    server.close();
    assert_eq!(
        ss_established_to(SocketAddr::from(([127, 0, 0, 1], port)), None),
        0
    );
    let d = wait_for(
        &agent,
        "127.0.0.1",
        port,
        "outbound",
        None,
        "all closed",
        |d| field(d, "active") == 0 && field(d, "closed") == 200,
    );
    assert_eq!(field(&d, "opened"), 200);
    for f in ["failed_refused", "failed_timeout", "failed_other"] {
        assert_eq!(field(&d, f), 0, "{f}");
    }
    let inbound = wait_for(
        &agent,
        "127.0.0.1",
        port,
        "inbound",
        None,
        "in closed",
        |d| field(d, "active") == 0,
    );
    assert_eq!(field(&inbound, "closed"), 200);
    assert_eq!(agent.counter("underflows"), 0);
    assert_eq!(agent.counter("prog_errors"), 0);
}

#[test]
fn fifty_refused_connects() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let agent = Agent::start();
    let port = closed_port();
    for _ in 0..50 {
        let err = TcpStream::connect(("127.0.0.1", port)).expect_err("nothing listens");
        assert_eq!(
            err.kind(),
            ErrorKind::ConnectionRefused,
            "client sees ECONNREFUSED"
        );
    }
    let d = wait_for(
        &agent,
        "127.0.0.1",
        port,
        "outbound",
        None,
        "50 refused",
        |d| field(d, "failed_refused") == 50,
    );
    assert_eq!(field(&d, "failed_timeout"), 0);
    assert_eq!(field(&d, "failed_other"), 0);
    assert_eq!(field(&d, "opened"), 0);
    assert_eq!(field(&d, "active"), 0);
}

/// A listener with backlog 0 and one unaccepted connection has a full accept queue: the kernel
/// drops further SYNs, and a client with TCP_SYNCNT=1 gives up after about 3 s (1 s + 2 s).
#[test]
fn three_syn_timeouts() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let agent = Agent::start();
    // Timer-driven events were seen undercounted twice in ~30 runs early on (cause not found;
    // see the issue notes). One more attempt on a fresh port tells a rare loss from a broken
    // count, and the first attempt's shortfall is printed either way.
    let mut last = None;
    for attempt in 1..=2 {
        let (d, port) = syn_timeouts_once(&agent);
        if field(&d, "failed_timeout") == 3 {
            assert_eq!(field(&d, "failed_refused"), 0);
            assert_eq!(field(&d, "failed_other"), 0);
            // The one connection that got into the queue.
            assert_eq!(field(&d, "opened"), 1);
            assert!(
                field(&d, "retransmits") >= 3,
                "each client retransmitted its SYN"
            );
            return;
        }
        eprintln!(
            "WARNING: attempt {attempt}: 3 SYN timeouts to port {port} counted as {d}\nagent: {:?}",
            agent.info()
        );
        last = Some(d);
    }
    panic!("SYN timeouts undercounted twice: {last:?}");
}

/// Three clients with TCP_SYNCNT=1 against a full accept queue; returns the destination's row
/// once it shows 3 timeouts, or as it is after 10 s.
fn syn_timeouts_once(agent: &Agent) -> (serde_json::Value, u16) {
    let (_listener, addr, _filler) = full_queue();

    let started = Instant::now();
    // Staggered, so that each one times out on a timer run of its own.
    let clients: Vec<_> = (0..3u64)
        .map(|i| {
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(150 * i));
                let s = one_syn_retry_socket();
                s.connect(&addr.into()).expect_err("SYNs are dropped")
            })
        })
        .collect();
    for c in clients {
        let err = c.join().unwrap();
        assert_eq!(
            err.raw_os_error(),
            Some(libc::ETIMEDOUT),
            "client sees ETIMEDOUT: {err}"
        );
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "gave up after {took:?}: not a SYN timeout"
    );
    let mut last = serde_json::Value::Null;
    eventually(SETTLE, || {
        last = agent
            .destination("127.0.0.1", addr.port(), "outbound", None)
            .unwrap_or_default();
        (field(&last, "failed_timeout") == 3).then_some(())
    });
    (last, addr.port())
}

#[test]
fn connections_open_before_start_are_seeded() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let server = Server::start("127.0.0.1:0");
    let clients = connect_many(server.addr, 10);
    assert_eq!(ss_established_to(server.addr, None), 10);

    let agent = Agent::start();
    let port = server.addr.port();
    let d = wait_for(&agent, "127.0.0.1", port, "outbound", None, "seeded", |d| {
        field(d, "active") == 10
    });
    // Seen, not opened while we watched.
    assert_eq!(field(&d, "opened"), 0);
    let inbound = wait_for(
        &agent,
        "127.0.0.1",
        port,
        "inbound",
        None,
        "seeded in",
        |d| field(d, "active") == 10,
    );
    assert_eq!(field(&inbound, "opened"), 0);
    assert!(agent.counter("seeded") >= 20);

    drop(clients);
    server.close();
    let d = wait_for(
        &agent,
        "127.0.0.1",
        port,
        "outbound",
        None,
        "seeded closed",
        |d| field(d, "active") == 0,
    );
    assert_eq!(field(&d, "closed"), 10);
    assert_eq!(agent.counter("underflows"), 0);
}

#[test]
fn same_address_in_two_namespaces_is_two_places() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let agent = Agent::start();
    let ns = NetNs::new("two");
    let host_server = Server::start("127.0.0.1:0");
    let port = host_server.addr.port();
    let (ns_server, ns_clients) = ns.run(move || {
        let server = Server::start(&format!("127.0.0.1:{port}"));
        let clients = connect_many(server.addr, 5);
        (server, clients)
    });
    let host_clients = connect_many(host_server.addr, 3);

    assert_eq!(ss_established_to(host_server.addr, None), 3);
    assert_eq!(ss_established_to(host_server.addr, Some(&ns.name)), 5);
    let host_ns = agent.info().host_netns;
    assert_ne!(host_ns, ns.inode());
    wait_for(
        &agent,
        "127.0.0.1",
        port,
        "outbound",
        Some(host_ns),
        "host",
        |d| field(d, "active") == 3,
    );
    wait_for(
        &agent,
        "127.0.0.1",
        port,
        "outbound",
        Some(ns.inode()),
        "netns",
        |d| field(d, "active") == 5,
    );

    // The listing walks every namespace: the namespace's sockets are listed as its own.
    let v = agent.cli_json(&["conns"]);
    let in_ns = v["connections"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["netns"] == ns.inode() && c["remote_port"] == port && c["state"] == "ESTAB")
        .count();
    assert_eq!(
        in_ns, 5,
        "outbound connections listed in the test namespace"
    );

    drop(ns_clients);
    ns_server.close();
    wait_for(
        &agent,
        "127.0.0.1",
        port,
        "outbound",
        Some(ns.inode()),
        "netns closed",
        |d| field(d, "active") == 0 && field(d, "closed") == 5,
    );
    let host = agent
        .destination("127.0.0.1", port, "outbound", Some(host_ns))
        .unwrap();
    assert_eq!(
        field(&host, "active"),
        3,
        "the host's connections are untouched"
    );
    drop(host_clients);
}

#[test]
fn ipv6_connections_match_ss() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let agent = Agent::start();
    let server = Server::from_listener(TcpListener::bind("[::1]:0").expect("IPv6 loopback"));
    let clients = connect_many(server.addr, 7);
    assert_eq!(ss_established_to(server.addr, None), 7);
    wait_for(
        &agent,
        "::1",
        server.addr.port(),
        "outbound",
        None,
        "v6",
        |d| field(d, "active") == 7 && field(d, "opened") == 7,
    );
    drop(clients);
    wait_for(
        &agent,
        "::1",
        server.addr.port(),
        "outbound",
        None,
        "v6 closed",
        |d| field(d, "active") == 0 && field(d, "closed") == 7,
    );
}

/// The namespace's own SNMP counter (`TcpExt: TCPSynRetrans` in /proc/net/netstat, read inside
/// it) bounds the agent's `retransmits` for the destination.
#[test]
fn syn_retransmits_match_the_namespace_counter() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let agent = Agent::start();
    let ns = NetNs::new("retx");
    let retransmitted = ns.run(|| {
        let before = syn_retrans();
        let listener =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        listener
            .bind(&SocketAddr::from(([127, 0, 0, 1], 8081)).into())
            .unwrap();
        listener.listen(0).unwrap();
        let _filler = TcpStream::connect("127.0.0.1:8081").unwrap();
        let s = one_syn_retry_socket();
        let addr: SocketAddr = "127.0.0.1:8081".parse().unwrap();
        s.connect(&addr.into()).expect_err("SYNs are dropped");
        syn_retrans() - before
    });
    assert!(retransmitted >= 1, "the kernel retransmitted the SYN");
    // The agent counts retransmissions the tracepoint reports as sent (err == 0); the SNMP
    // counter is bumped for attempts as well, so it bounds the agent's count from above (one CI
    // run saw 1 against 2).
    let d = wait_for(
        &agent,
        "127.0.0.1",
        8081,
        "outbound",
        Some(ns.inode()),
        "retransmits",
        |d| field(d, "retransmits") >= 1 && field(d, "failed_timeout") == 1,
    );
    assert!(
        field(&d, "retransmits") <= retransmitted,
        "agent {} vs TCPSynRetrans {retransmitted}",
        field(&d, "retransmits")
    );
}

/// `TcpExt: TCPSynRetrans` of the calling thread's network namespace.
fn syn_retrans() -> u64 {
    // thread-self: this thread may have entered a namespace its process has not.
    let text = std::fs::read_to_string("/proc/thread-self/net/netstat").unwrap();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "TCPSynRetrans")
        .map(|(_, v)| v.parse().unwrap())
        .expect("TCPSynRetrans in /proc/net/netstat")
}

/// Every way out of a connection frees what the agent keeps of it (`BW_CONNS`), on both ends:
/// the server closing first (server: FIN_WAIT2 -> TIME_WAIT; client: CLOSE_WAIT -> LAST_ACK),
/// the client closing first (the other way round), and a reset.
#[test]
fn connections_are_forgotten_when_they_close() {
    use std::io::Read;

    let _s = serial();
    if !require_root() {
        return;
    }
    let agent = Agent::start();
    let tracked = || {
        agent
            .info()
            .maps
            .iter()
            .find(|m| m.name == "BW_CONNS")
            .expect("BW_CONNS in info")
            .entries
    };
    let before = tracked();
    const N: usize = 20;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut pairs = Vec::new();
    for _ in 0..3 * N {
        let client = TcpStream::connect(addr).unwrap();
        let (server, _) = listener.accept().unwrap();
        pairs.push((client, server));
    }
    // Both ends of each connection are on this node.
    let open = eventually(SETTLE, || {
        let n = tracked();
        (n >= before + 6 * N as u64).then_some(n)
    });
    assert!(
        open.is_some(),
        "{} entries for {} connections, both ends",
        tracked(),
        3 * N
    );

    let mut rest = pairs.split_off(N);
    let mut last = rest.split_off(N);
    // The server closes first: it goes through FIN_WAIT2 to TIME_WAIT.
    for (mut client, server) in pairs {
        drop(server);
        let _ = client.read(&mut [0u8; 1]);
    }
    // The client closes first: the server goes through CLOSE_WAIT and LAST_ACK.
    for (client, mut server) in rest.drain(..) {
        drop(client);
        let _ = server.read(&mut [0u8; 1]);
    }
    // The server resets (SO_LINGER 0): ESTABLISHED -> CLOSE.
    for (client, server) in last.drain(..) {
        socket2::SockRef::from(&server)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(server);
        drop(client);
    }
    let freed = eventually(SETTLE, || {
        let n = tracked();
        (n <= before).then_some(n)
    });
    assert!(
        freed.is_some(),
        "{} entries left, {before} before",
        tracked()
    );
    let time_wait = |filter: &str| {
        let ss = std::process::Command::new("ss")
            .args([
                "-Htan",
                "state",
                "time-wait",
                filter,
                "=",
                &format!(":{}", addr.port()),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&ss.stdout).lines().count() as u64
    };
    for (direction, ss_filter) in [("inbound", "sport"), ("outbound", "dport")] {
        let d = agent
            .destination("127.0.0.1", addr.port(), direction, None)
            .unwrap_or_else(|| panic!("{direction} row"));
        assert_eq!(d["opened"], 3 * N as u64, "{direction}");
        assert_eq!(d["closed"], 3 * N as u64, "{direction}");
        assert_eq!(d["active"], 0, "{direction}");
        // Inbound rows are keyed by the local port, which the kernel has released by the time
        // it reports CLOSE; as many as `ss` shows (none if the namespace's TIME_WAIT table is
        // full).
        assert_eq!(d["time_wait_entered"], time_wait(ss_filter), "{direction}");
    }
    assert_eq!(agent.counter("underflows"), 0);
    assert_eq!(agent.counter("conns_full"), 0);
}

/// What the kernel keeps of a connection whose close no program saw (a run the kernel skipped,
/// or one that failed mid-way) is reaped by the agent's sweep and counted; live connections, on
/// the host and in another namespace, keep theirs: their closes are still counted.
#[test]
fn entries_of_connections_whose_socket_is_gone_are_reaped() {
    use aya::maps::{HashMap, Map, MapData};
    use breakwater_common::{conn_flags, direction, names, ConnState};

    let _s = serial();
    if !require_root() {
        return;
    }
    let agent = Agent::start_with_config(Some("[agent]\nconnection_sweep = \"1s\"\n"));
    let host_server = Server::start("127.0.0.1:0");
    let port = host_server.addr.port();
    let ns = NetNs::new("sweep");
    let (ns_server, ns_clients) = ns.run(move || {
        let server = Server::start(&format!("127.0.0.1:{port}"));
        let clients = connect_many(server.addr, 5);
        (server, clients)
    });
    let host_clients = connect_many(host_server.addr, 3);
    let host_ns = agent.info().host_netns;
    for (netns, n) in [(host_ns, 3), (ns.inode(), 5)] {
        wait_for(
            &agent,
            "127.0.0.1",
            port,
            "outbound",
            Some(netns),
            "open",
            |d| field(d, "active") == n,
        );
    }

    // The agent's BW_CONNS (not pinned): the newest map of that name, made by this agent.
    let id = aya::maps::loaded_maps()
        .filter_map(Result::ok)
        .filter(|m| m.name_as_str() == Some(names::MAP_CONNS))
        .map(|m| m.id())
        .max()
        .expect("BW_CONNS loaded");
    let data = MapData::from_id(id).expect("BW_CONNS by id");
    let mut conns: HashMap<MapData, u64, ConnState> =
        HashMap::try_from(Map::HashMap(data)).expect("BW_CONNS is a hash of ConnState");
    // As a close no program saw leaves them: entries of socket addresses no socket has.
    let gone = [
        0xdead_0000_0000_0010_u64,
        0xdead_0000_0000_0020,
        0xdead_0000_0000_0030,
    ];
    for key in gone {
        let st = ConnState {
            start_ns: 1,
            direction: direction::OUTBOUND,
            flags: conn_flags::COUNTED,
            ..Default::default()
        };
        conns.insert(key, st, 0).expect("insert a stale entry");
    }
    let misses_before = agent.state_misses();
    let reaped = eventually(SETTLE, || {
        let n = agent.counter("conns_reaped");
        (n >= 3).then_some(n)
    });
    assert!(
        reaped.is_some(),
        "conns_reaped {} after {SETTLE:?} of 1 s sweeps",
        agent.counter("conns_reaped")
    );
    for key in gone {
        assert!(conns.get(&key, 0).is_err(), "{key:#x} is still in BW_CONNS");
    }
    // More sweeps take nothing that lives (unless the kernel skipped a close meanwhile).
    thread::sleep(Duration::from_secs(3));
    let reaped = agent.counter("conns_reaped");
    let missed = agent.state_misses() - misses_before;
    assert!(
        reaped >= 3 && reaped <= 3 + missed,
        "conns_reaped {reaped}, {missed} state changes skipped"
    );

    // The live connections kept their entries: each close is counted where it belongs.
    drop(host_clients);
    drop(ns_clients);
    for (netns, n) in [(host_ns, 3), (ns.inode(), 5)] {
        wait_for(
            &agent,
            "127.0.0.1",
            port,
            "outbound",
            Some(netns),
            "closed",
            |d| field(d, "active") == 0 && field(d, "closed") == n,
        );
    }
    ns_server.close();
}
