//! The connection listing over the agent's real unix socket: `StreamConnections` from a tonic
//! client with default settings, against the sockets this test holds and what `ss` sees, in
//! several messages, with a limit and a service filter; and the deprecated `ListConnections`
//! answering the same rows.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::TcpStream,
    process::Command,
    thread,
    time::Duration,
};

use breakwater_proto::v1 as pb;
use breakwater_tests::{connect_many, eventually, require_root, serial, Agent, Server};
use tonic::Code;

/// At most this many connections come in one message (the proto says so).
const PER_MESSAGE: usize = 1000;

/// `StreamConnections`' messages, from a client with tonic's default settings (4 MiB decode
/// limit).
fn streamed(agent: &Agent, service: &str, limit: u32) -> Result<Vec<Vec<pb::Connection>>, Code> {
    let mut c = agent.client();
    agent.block_on(async move {
        let mut stream = c
            .stream_connections(pb::StreamConnectionsRequest {
                service: service.into(),
                limit,
            })
            .await
            .map_err(|s| s.code())?
            .into_inner();
        let mut chunks = Vec::new();
        while let Some(m) = stream.message().await.map_err(|s| s.code())? {
            chunks.push(m.connections);
        }
        Ok(chunks)
    })
}

#[expect(deprecated, reason = "the unary call must keep answering")]
fn listed(agent: &Agent, service: &str, limit: u32) -> Vec<pb::Connection> {
    let mut c = agent.client();
    agent
        .block_on(c.list_connections(pb::ListConnectionsRequest {
            service: service.into(),
            limit,
        }))
        .expect("ListConnections")
        .into_inner()
        .connections
}

fn sizes(chunks: &[Vec<pb::Connection>]) -> Vec<usize> {
    chunks.iter().map(Vec::len).collect()
}

/// Oldest first, then by cookie.
fn assert_ordered(rows: &[pb::Connection]) {
    for w in rows.windows(2) {
        assert!(
            (w[0].age_ms, w[1].cookie) > (w[1].age_ms, w[0].cookie),
            "out of order: {:?} before {:?}",
            (w[0].age_ms, w[0].cookie),
            (w[1].age_ms, w[1].cookie)
        );
    }
}

fn endpoint(address: &str, port: u32) -> String {
    format!("{address}:{port}")
}

/// The rows of the host namespace on `port` (either end), by cookie, their age left out (it
/// grows between calls).
fn on_port(rows: &[pb::Connection], host: u32, port: u16) -> BTreeMap<u64, pb::Connection> {
    let port = u32::from(port);
    rows.iter()
        .filter(|c| c.netns == host && (c.local_port == port || c.remote_port == port))
        .map(|c| {
            (
                c.cookie,
                pb::Connection {
                    age_ms: 0,
                    ..c.clone()
                },
            )
        })
        .collect()
}

/// Ground truth: the established sockets on `port` (either end) as `ss` lists them, as
/// (local, peer).
fn ss_on_port(port: u16) -> BTreeSet<(String, String)> {
    let filter = format!("( sport = :{port} or dport = :{port} )");
    let out = Command::new("ss")
        .args(["-Htn", "state", "established", &filter])
        .output()
        .expect("run ss (Debian package iproute2)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            // Recv-Q Send-Q Local Peer
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 4).then(|| (f[2].to_owned(), f[3].to_owned()))
        })
        .collect()
}

fn as_pairs(rows: &BTreeMap<u64, pb::Connection>) -> BTreeSet<(String, String)> {
    rows.values()
        .map(|c| {
            (
                endpoint(&c.local_address, c.local_port),
                endpoint(&c.remote_address, c.remote_port),
            )
        })
        .collect()
}

fn pairs_of(clients: &[TcpStream]) -> BTreeSet<(String, String)> {
    clients
        .iter()
        .map(|s| {
            (
                s.local_addr().unwrap().to_string(),
                s.peer_addr().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn connections_stream_in_chunks_as_ss_sees_them() {
    let _s = serial();
    if !require_root() {
        return;
    }
    // The listeners after the agent, so that their process is known (inbound rows carry it).
    let agent = Agent::start();
    let host = agent.info().host_netns;
    let inventory = Server::start("127.0.0.1:0");
    let other = Server::start("127.0.0.1:0");
    let port = inventory.addr.port();
    let endpoint_arg = format!("127.0.0.1:{port}");
    let out = agent.cli(&["service", "put", "inventory", "--endpoint", &endpoint_arg]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // 2,500 sockets: 1,200 of inventory (both ends of 600 connections), made in two batches
    // far enough apart that a limit of 800 takes exactly the first, and 1,300 of no service.
    let older = connect_many(inventory.addr, 400);
    thread::sleep(Duration::from_millis(200));
    let newer = connect_many(inventory.addr, 200);
    let unrelated = connect_many(other.addr, 650);
    let all = eventually(Duration::from_secs(10), || {
        let chunks = streamed(&agent, "", 0).expect("StreamConnections");
        let all = chunks.concat();
        let ok = on_port(&all, host, port).len() == 1200
            && on_port(&all, host, other.addr.port()).len() == 1300;
        ok.then_some(chunks)
    })
    .expect("the 2,500 sockets listed");

    // Several messages, none over the size; the order runs across them.
    assert!(all.len() >= 3, "{:?}", sizes(&all));
    assert!(
        all.iter().all(|c| (1..=PER_MESSAGE).contains(&c.len())),
        "{:?}",
        sizes(&all)
    );
    let all = all.concat();
    assert_ordered(&all);
    assert_eq!(
        all.iter().map(|c| c.cookie).collect::<BTreeSet<_>>().len(),
        all.len(),
        "a socket listed twice"
    );

    // What ss sees, and what this test holds, with the right service and process.
    let mine = on_port(&all, host, port);
    let theirs = on_port(&all, host, other.addr.port());
    assert_eq!(as_pairs(&mine), ss_on_port(port));
    assert_eq!(as_pairs(&theirs), ss_on_port(other.addr.port()));
    let outbound = |rows: &BTreeMap<u64, pb::Connection>| -> BTreeSet<(String, String)> {
        let out: BTreeMap<u64, pb::Connection> = rows
            .iter()
            .filter(|(_, c)| c.direction() == pb::Direction::Outbound)
            .map(|(k, c)| (*k, c.clone()))
            .collect();
        as_pairs(&out)
    };
    let mut held = pairs_of(&older);
    held.extend(pairs_of(&newer));
    assert_eq!(outbound(&mine), held);
    assert_eq!(outbound(&theirs), pairs_of(&unrelated));
    for c in mine.values() {
        assert_eq!(
            (c.service.as_str(), c.state.as_str()),
            ("inventory", "ESTAB")
        );
    }
    assert!(theirs.values().all(|c| c.service.is_empty()));
    assert!(mine
        .values()
        .chain(theirs.values())
        .all(|c| c.pid == std::process::id()));
    assert!(mine
        .values()
        .chain(theirs.values())
        .filter(|c| c.direction() == pb::Direction::Outbound)
        .all(|c| c.comm == "bw-client"));

    // A service: its rows only, in two messages.
    let chunks = streamed(&agent, "inventory", 0).unwrap();
    assert_eq!(sizes(&chunks), [1000, 200]);
    let svc = chunks.concat();
    assert_ordered(&svc);
    assert_eq!(on_port(&svc, host, port), mine);
    assert!(svc.iter().all(|c| c.service == "inventory"));

    // A limit: the oldest first, over the messages.
    let chunks = streamed(&agent, "inventory", 800).unwrap();
    assert_eq!(sizes(&chunks), [800]);
    let first = on_port(&chunks.concat(), host, port);
    let mut older_pairs = pairs_of(&older);
    // The accepted ends of the older connections are as old.
    older_pairs.extend(older_pairs.clone().into_iter().map(|(l, p)| (p, l)));
    assert_eq!(as_pairs(&first), older_pairs);
    let chunks = streamed(&agent, "", 1500).unwrap();
    assert_eq!(sizes(&chunks), [1000, 500]);
    assert_ordered(&chunks.concat());
    assert_eq!(sizes(&streamed(&agent, "inventory", 1).unwrap()), [1]);

    // An unknown service: refused before any message.
    assert_eq!(streamed(&agent, "nope", 0), Err(Code::NotFound));

    // The unary call answers the same rows, in order.
    let unary = listed(&agent, "", 0);
    assert_ordered(&unary);
    assert_eq!(on_port(&unary, host, port), mine);
    assert_eq!(on_port(&unary, host, other.addr.port()), theirs);
    let unary = listed(&agent, "inventory", 800);
    assert_ordered(&unary);
    assert_eq!(on_port(&unary, host, port), first);

    drop((older, newer, unrelated));
}
