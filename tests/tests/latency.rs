//! Latency histograms against the client's own timing.

use std::{
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use breakwater_common::hist_bucket;
use breakwater_proto::v1 as pb;
use breakwater_tests::{require_root, serial, Agent};
use tonic::Code;

/// A listener whose accept queue is full drops the first SYN; once the queue drains, the
/// retransmitted SYN (about 1 s later) gets through. The agent's connect latency for that
/// destination must land within one bucket of what the client measured.
#[test]
fn connect_latency_matches_the_clients_timing() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let listener =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    listener
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    let agent = Agent::start_with_config(Some(&format!(
        "[[service]]\nname = \"slow\"\nendpoints = [\"127.0.0.1:{}\"]\n",
        addr.port()
    )));
    let filler = TcpStream::connect(addr).expect("fills the accept queue");

    let client = thread::spawn(move || {
        let t = Instant::now();
        let c = TcpStream::connect(addr).expect("connects after the SYN retransmission");
        (t.elapsed(), c)
    });
    thread::sleep(Duration::from_millis(300));
    let (accepted, _) = listener.accept().unwrap();
    drop((accepted, filler));
    let (took, _c) = client.join().unwrap();
    assert!(
        took >= Duration::from_millis(900),
        "first SYN was not dropped: {took:?}"
    );
    let client_us = took.as_micros() as u64;

    let mut c = agent.client();
    let r = agent
        .block_on(c.get_latency(pb::GetLatencyRequest {
            destination: addr.to_string(),
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    let h = &r.histograms[0];
    assert_eq!(h.kind, "connect");
    assert_eq!(h.count, 2, "the filler and the slow connect: {h:?}");
    let slow = h.buckets.last().unwrap();
    assert!(
        slow.index.abs_diff(hist_bucket(client_us)) <= 1,
        "agent bucket [{}, {}) vs client {client_us} µs",
        slow.low_us,
        slow.high_us
    );
    assert!(hist_bucket(h.max_us - 1).abs_diff(hist_bucket(client_us)) <= 1);
    // The dropped SYN went out again once.
    let d = agent
        .destination("127.0.0.1", addr.port(), "outbound", None)
        .unwrap();
    assert_eq!(d["retransmits"], 1);

    // The service's histogram holds the same samples; its p99 is the slow one.
    let s = agent
        .block_on(c.list_services(pb::ListServicesRequest {}))
        .unwrap()
        .into_inner()
        .services
        .remove(0);
    assert!(
        hist_bucket(s.connect_p99_us).abs_diff(hist_bucket(client_us)) <= 1,
        "{s:?}"
    );
    let r = agent
        .block_on(c.get_latency(pb::GetLatencyRequest {
            service: "slow".into(),
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    assert_eq!(r.histograms[0].count, 2);
}

#[test]
fn latency_requests_are_checked() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let agent = Agent::start();
    let mut c = agent.client();
    let cases = [
        (
            pb::GetLatencyRequest::default(),
            Code::InvalidArgument,
            "give either a service or a destination",
        ),
        (
            pb::GetLatencyRequest {
                service: "a".into(),
                destination: "1.2.3.4:5".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "not both",
        ),
        (
            pb::GetLatencyRequest {
                destination: "10.0.0.0/8:80".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "must be one address, not a network",
        ),
        (
            pb::GetLatencyRequest {
                destination: "nonsense".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "invalid endpoint \"nonsense\"",
        ),
        (
            pb::GetLatencyRequest {
                service: "nope".into(),
                ..Default::default()
            },
            Code::NotFound,
            "no service named \"nope\"",
        ),
    ];
    for (req, code, why) in cases {
        let status = agent
            .block_on(c.get_latency(req.clone()))
            .expect_err("bad request");
        assert_eq!(status.code(), code, "{req:?}");
        assert!(
            status.message().contains(why),
            "{:?} lacks {why:?}",
            status.message()
        );
    }
}

/// A server that answers each request after 50 ms: the agent's first-response p50 lands within
/// one bucket of the client's own median.
#[test]
fn first_response_latency_matches_the_clients_timing() {
    use std::io::{Read, Write};

    let _s = serial();
    if !require_root() {
        return;
    }
    let agent = Agent::start();
    let (addr, server) = answer_each_ping_after(Duration::from_millis(50));
    let mut c = TcpStream::connect(addr).unwrap();
    let mut took = Vec::new();
    for _ in 0..9 {
        let t = Instant::now();
        c.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).unwrap();
        took.push(t.elapsed().as_micros() as u64);
    }
    let mut client = agent.client();
    let mut latency = || {
        agent
            .block_on(client.get_latency(pb::GetLatencyRequest {
                destination: addr.to_string(),
                ..Default::default()
            }))
            .unwrap()
            .into_inner()
    };
    let first_response = |r: &pb::GetLatencyResponse| {
        r.histograms
            .iter()
            .find(|h| h.kind == "first_response")
            .expect("first_response histogram")
            .clone()
    };
    // The open connection still holds its samples (the maps get them when it closes): the
    // reader counts them all the same, and after the close they are counted once.
    let open = first_response(&latency());
    assert_eq!(open.count, 9, "while the connection is open: {open:?}");
    drop(c);
    server.join().unwrap();
    took.sort_unstable();
    let client_p50 = took[took.len() / 2];

    let r = latency();
    let h = first_response(&r);
    assert_eq!(h.count, 9, "one sample per request: {h:?}");
    assert_eq!(h.p50_us, open.p50_us);
    assert!(
        hist_bucket(h.p50_us).abs_diff(hist_bucket(client_p50)) <= 1,
        "agent p50 {} µs vs client {client_p50} µs",
        h.p50_us
    );

    // What the closed connection moved, from the kernel's own accounting; its SRTT sampled once.
    let d = agent
        .destination("127.0.0.1", addr.port(), "outbound", None)
        .expect("destination row");
    assert_eq!(d["bytes_sent"], 9 * 4);
    assert_eq!(d["bytes_received"], 9 * 4);
    assert_eq!(d["retransmits"], 0);
    // The server's side closed second (CLOSE_WAIT): the same bytes, the other way round.
    let server_side = agent
        .destination("127.0.0.1", addr.port(), "inbound", None)
        .expect("inbound row");
    assert_eq!(server_side["bytes_sent"], 9 * 4);
    assert_eq!(server_side["bytes_received"], 9 * 4);
    let srtt = r.histograms.iter().find(|h| h.kind == "srtt").unwrap();
    assert_eq!(srtt.count, 1);
    assert!(srtt.max_us < 50_000, "loopback SRTT: {srtt:?}");
}

/// Requests sent with `sendfile()` (as file servers and proxies send bodies) are timed too: on
/// 6.1 they take another path through TCP than `write()` (`do_tcp_sendpages`).
#[test]
fn first_response_of_requests_sent_with_sendfile_is_timed() {
    use std::{
        io::{Read, Write},
        os::fd::AsRawFd,
    };

    let _s = serial();
    if !require_root() {
        return;
    }
    let agent = Agent::start();
    let (addr, server) = answer_each_ping_after(Duration::from_millis(20));
    let mut request = tempfile::tempfile().unwrap();
    request.write_all(b"ping").unwrap();
    let mut c = TcpStream::connect(addr).unwrap();
    let mut took = Vec::new();
    for _ in 0..9 {
        let t = Instant::now();
        let mut offset: libc::off_t = 0;
        // SAFETY: two open descriptors and a valid offset; sendfile reads 4 bytes of the file.
        let sent = unsafe { libc::sendfile(c.as_raw_fd(), request.as_raw_fd(), &mut offset, 4) };
        assert_eq!(sent, 4, "sendfile: {}", std::io::Error::last_os_error());
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).unwrap();
        took.push(t.elapsed().as_micros() as u64);
    }
    drop(c);
    server.join().unwrap();
    took.sort_unstable();
    let client_p50 = took[took.len() / 2];
    let mut client = agent.client();
    let r = agent
        .block_on(client.get_latency(pb::GetLatencyRequest {
            destination: addr.to_string(),
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    let h = r
        .histograms
        .iter()
        .find(|h| h.kind == "first_response")
        .expect("first_response histogram");
    assert_eq!(
        h.count, 9,
        "one sample per request sent with sendfile(): {h:?}"
    );
    assert!(
        hist_bucket(h.p50_us).abs_diff(hist_bucket(client_p50)) <= 1,
        "agent p50 {} µs vs client {client_p50} µs",
        h.p50_us
    );
}

/// A server for one connection that answers each 4-byte request with "pong" after `delay`.
fn answer_each_ping_after(delay: Duration) -> (std::net::SocketAddr, thread::JoinHandle<()>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4];
        while s.read_exact(&mut buf).is_ok() {
            thread::sleep(delay);
            s.write_all(b"pong").unwrap();
        }
    });
    (addr, server)
}

/// With `destination_latency` disabled the programs keep histograms per service only: the
/// service's connect histogram still counts every connect, asking for a destination's says
/// why there is none, `info` reports the feature off, and the destination-histogram map is
/// never written (`hist_inserts` stays 0).
#[test]
fn destination_histograms_can_be_disabled() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let (listener, addr, agent) =
        service_on_listener("db", "[features]\ndisable = [\"destination_latency\"]\n\n");
    let conns: Vec<TcpStream> = (0..5).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let accepted: Vec<_> = (0..5).map(|_| listener.accept().unwrap()).collect();
    drop((conns, accepted));

    let h = service_histogram(&agent, "db", "connect");
    assert_eq!(h.count, 5, "{h:?}");

    let mut c = agent.client();

    let e = agent
        .block_on(c.get_latency(pb::GetLatencyRequest {
            destination: addr.to_string(),
            ..Default::default()
        }))
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(
        e.message(),
        "destination_latency is off: disabled by configuration (features.disable)"
    );
    let out = agent.cli(&["latency", "--destination", &addr.to_string()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("destination_latency is off"),
        "{out:?}"
    );

    let info = agent.info();
    let f = info
        .features
        .iter()
        .find(|f| f.name == "destination_latency")
        .expect("destination_latency in GetAgentInfo");
    assert_eq!(f.status, pb::FeatureStatus::Off as i32, "{f:?}");
    assert_eq!(agent.counter("hist_inserts"), 0);
    // The connections themselves are counted as ever.
    let d = agent
        .destination("127.0.0.1", addr.port(), "outbound", None)
        .unwrap();
    assert_eq!(d["opened"], 5);
}

/// A connection the peer closes first leaves ESTABLISHED on the peer's FIN (-> CLOSE_WAIT),
/// where the agent takes the time TCP read for that FIN instead of reading the clock: its
/// lifetime must still land within one bucket of what the client measured.
#[test]
fn lifetime_of_a_connection_the_peer_closed_matches_the_clients_timing() {
    use std::io::Read as _;
    let _s = serial();
    if !require_root() {
        return;
    }
    let (listener, addr, agent) = service_on_listener("peer-closes", "");
    let server = thread::spawn(move || {
        let (c, _) = listener.accept().unwrap();
        thread::sleep(Duration::from_millis(300));
        drop(c);
    });
    let t = Instant::now();
    let mut c = TcpStream::connect(addr).unwrap();
    assert_eq!(c.read(&mut [0u8; 1]).unwrap(), 0, "the server's FIN");
    let client_us = t.elapsed().as_micros() as u64;
    drop(c);
    server.join().unwrap();

    let h = service_histogram(&agent, "peer-closes", "lifetime");
    assert_eq!(h.count, 1, "{h:?}");
    let b = &h.buckets[0];
    assert!(
        b.index.abs_diff(hist_bucket(client_us)) <= 1,
        "agent bucket [{}, {}) vs client {client_us} µs",
        b.low_us,
        b.high_us
    );
}

/// A loopback listener and an agent whose config holds one service, `name`, on it (after
/// `extra`, config text that comes before the service).
fn service_on_listener(name: &str, extra: &str) -> (std::net::TcpListener, SocketAddr, Agent) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let agent = Agent::start_with_config(Some(&format!(
        "{extra}[[service]]\nname = \"{name}\"\nendpoints = [\"127.0.0.1:{}\"]\n",
        addr.port()
    )));
    (listener, addr, agent)
}

/// One histogram of a service.
fn service_histogram(agent: &Agent, service: &str, kind: &str) -> pb::Histogram {
    let mut api = agent.client();
    agent
        .block_on(api.get_latency(pb::GetLatencyRequest {
            service: service.into(),
            kinds: vec![kind.into()],
            ..Default::default()
        }))
        .unwrap()
        .into_inner()
        .histograms
        .remove(0)
}
